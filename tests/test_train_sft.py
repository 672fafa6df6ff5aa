"""`humor-ray sft` on Ray Train: one CPU worker, the tiny model, real SFT data from the data stage."""

import json

import pytest

from humor_ray.data import build
from humor_ray.train import sft

pytestmark = pytest.mark.timeout(600)


def test_sft_trains_checkpoints_and_exports(tmp_path, real_data, ray_local):
    datasets = tmp_path / "datasets"
    build.run(build.BuildConfig(
        input=str(real_data / "summaries" / "53[06]_LilUCB.csv"), output=str(datasets),
        splits=str(real_data / "benchmarks" / "humor_in_ai_splits.json"),
        descriptions=[str(real_data / "descriptions" / "humor_in_ai_prompt_descriptions.csv")],
        datasets=["sft_simple"]))
    out = tmp_path / "sft"
    sft.run(sft.Config(output_dir=str(out), dataset_dir=str(datasets), model_name="tiny", simple_prompt=True,
                       max_steps=4, eval_steps=2, save_steps=2, logging_steps=1, per_device_train_batch_size=4,
                       max_eval_examples=8, max_length=256, max_failures=0, report_to=["none"]))
    checkpoints = sorted((out / "ray" / "sft").glob("checkpoint_*/checkpoint"))
    assert len(checkpoints) == 2
    metrics = json.loads((out / "metrics.json").read_text())
    losses = [entry["loss"] for entry in metrics["log_history"] if "loss" in entry]
    assert len(losses) == 4 and all(loss > 0 for loss in losses)
    assert "eval_loss" in metrics["eval"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.num_hidden_layers == 2
