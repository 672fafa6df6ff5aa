"""On one NVIDIA GPU (opt-in: `pytest -m gpu`; skipped without CUDA): SFT, DPO and LLaVA SFT on SmolLM2 with one
GPU worker under ZeRO-3 in bf16, PPO with the vLLM engine beside the trainer on the same GPU, and captions with
the cartoons from the trained LLaVA on vLLM. Needs `vllm==0.31.0` (the `vllm-gpu` extra) instead of the CPU wheel."""

import json
import math

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(3600),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
REAL_DATASETS = {"summaries": "5[0-4][0-9]_*.csv", "datasets": ["sft_simple", "pairs", "prompts", "llava_sft"],
                 "images": True}
STEPS = 20


def train(module, out, datasets_dir, **extra) -> dict:
    """A short ZeRO-3 run of a training stage on one GPU worker; its metrics.json."""
    module.run(module.Config(output_dir=str(out), dataset_dir=str(datasets_dir), use_gpu=True, num_workers=1,
                             deepspeed="zero3", max_steps=STEPS, logging_steps=1, save_steps=STEPS, eval_steps=STEPS,
                             max_eval_examples=64, report_to=["none"], max_failures=0, **extra))
    return json.loads((out / "metrics.json").read_text())


def check_trained(metrics: dict) -> None:
    losses = [e["loss"] for e in metrics["log_history"] if "loss" in e]
    rates = [e["train_tokens_per_second"] for e in metrics["log_history"] if "train_tokens_per_second" in e]
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses)
    assert rates and rates[-1] > 0 and math.isfinite(metrics["eval"]["eval_loss"])


@pytest.fixture(scope="module")
def llava_run(tmp_path_factory, datasets_dir):
    from humor_ray.train import llava

    out = tmp_path_factory.mktemp("llava")
    return out, train(llava, out, datasets_dir, model_name="smollm2-llava", per_device_train_batch_size=16,
                      lora_r=16, lora_alpha=32, mm_projector_lr=2e-4)


def test_sft_under_zero3(tmp_path, datasets_dir):
    from humor_ray.train import sft

    check_trained(train(sft, tmp_path, datasets_dir, model_name="smollm2-135m", simple_prompt=True,
                        per_device_train_batch_size=16))


def test_dpo_with_lora_under_zero3(tmp_path, datasets_dir):
    from humor_ray.train import dpo

    check_trained(train(dpo, tmp_path, datasets_dir, model_name="smollm2-135m", per_device_train_batch_size=8,
                        lora_r=16))


def test_llava_under_zero3(llava_run):
    check_trained(llava_run[1])


def test_ppo_colocated_with_the_vllm_engine(tmp_path, datasets_dir):
    from humor_ray.rl import ppo

    steps = 5
    ppo.run(ppo.Config(output_dir=str(tmp_path), dataset_dir=str(datasets_dir), model_name="smollm2-135m",
                       reward_model="builtin:vowel_share", use_gpu=True, placement="colocate", engine="vllm",
                       max_steps=steps, save_steps=steps, report_to=["none"], max_failures=0))
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    # The engine got every update and samples from the weights the trainer holds (bf16 on both sides: a
    # small gap; a missed weight sync shows as a gap of nats).
    assert [m["engine_version"] for m in history] == list(range(steps))
    assert max(m["logprob_gap"] for m in history) < 0.1, [m["logprob_gap"] for m in history]


def test_llava_captions_with_the_cartoons_on_vllm(tmp_path, datasets_dir, llava_run):
    from humor_ray.infer import generate

    summary = generate.run(generate.GenerateConfig(
        dataset_dir=str(datasets_dir), output_dir=str(tmp_path), model_name=str(llava_run[0] / "final"),
        method="llava_sft", engine="vllm", use_gpu=True, n=10, max_contests=16))
    assert summary["contests"] > 0 and summary["captions"] == 10 * summary["contests"] - sum(
        summary["missing_captions"].values())
