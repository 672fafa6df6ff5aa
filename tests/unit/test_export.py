"""A run's final model: written aside and renamed into place whole, named relative to the run
(humor_ray/train/export.py)."""

import json

from humor_ray.rl.reward import resolve_reward_model
from humor_ray.train.export import final_model, publish_final, start_final


def export(run, files: dict[str, str], serve_sub: str = "") -> None:
    written = start_final(str(run))
    for name, text in files.items():
        (run / ".final.partial" / name).parent.mkdir(parents=True, exist_ok=True)
        (run / ".final.partial" / name).write_text(text)
    publish_final(str(run), written, str(run / ".final.partial" / serve_sub), {"eval": {"eval_accuracy": 0.6}})


def test_a_retrain_into_the_same_folder_never_keeps_the_old_adapter(tmp_path):
    run = tmp_path / "rm"
    run.mkdir()
    export(run, {"adapter_config.json": "{}", "adapter_model.safetensors": "lora", "merged/model.safetensors": "m"},
           serve_sub="merged")
    assert json.loads((run / "metrics.json").read_text())["model"] == "final/merged"
    export(run, {"model.safetensors": "full"})  # the same run again, without LoRA this time
    assert sorted(p.name for p in (run / "final").iterdir()) == ["model.safetensors"]
    assert json.loads((run / "metrics.json").read_text())["model"] == "final"
    assert sorted(p.name for p in run.iterdir()) == ["final", "metrics.json"]  # nothing partial left beside it


def test_a_moved_run_loads_its_model_from_where_it_is_now(tmp_path):
    run = tmp_path / "rm"
    run.mkdir()
    export(run, {"config.json": "{}"})
    moved = tmp_path / "elsewhere" / "rm-moved"
    moved.parent.mkdir()
    run.rename(moved)
    assert final_model(str(moved)) == str(moved / "final")
    assert resolve_reward_model(str(moved)) == str(moved / "final")


def test_merging_the_live_model_writes_the_same_model_without_loading_the_base_again(tmp_path, monkeypatch):
    """After LoRA training the export merges the trained model in place of loading the base again (outside
    ZeRO-3); the served model is the one merging the saved adapter into a fresh base gives."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from humor_ray.models import registry
    from humor_ray.train.export import save_merged

    monkeypatch.setenv("HUMOR_RAY_MODEL_CACHE", str(tmp_path / "cache"))
    model, tokenizer = registry.load_model("tiny")
    trained = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, parameter in trained.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    trained.config.use_cache = False  # as the trainer leaves it under gradient checkpointing
    reloaded_final, live_final = tmp_path / "reloaded", tmp_path / "live"
    for final in (reloaded_final, live_final):
        trained.save_pretrained(final)
        tokenizer.save_pretrained(final)
    reloaded = save_merged("tiny", "causal_lm", False, str(reloaded_final))

    def no_second_load(*args, **kwargs):
        raise AssertionError("the base model was loaded again")

    monkeypatch.setattr(registry, "load_model", no_second_load)
    live = save_merged("tiny", "causal_lm", False, str(live_final), trained)
    assert live == str(live_final / "merged")
    expected, got = load_file(f"{reloaded}/model.safetensors"), load_file(f"{live}/model.safetensors")
    assert sorted(got) == sorted(expected) and not any("lora" in name for name in got)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor)
    assert json.loads(open(f"{live}/config.json").read()) == json.loads(open(f"{reloaded}/config.json").read())
