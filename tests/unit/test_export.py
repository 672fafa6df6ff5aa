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
