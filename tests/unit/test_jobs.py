"""Every job spec in jobs/ loads into its stage's config, and the 7B specs keep the paper's recipes."""

import importlib
from pathlib import Path

import pytest

from humor_ray.cli import STAGES
from humor_ray.config import parse_config

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def load(spec: Path):
    stage = spec.stem.split("-")[0]
    key = ("data", "build") if stage == "data" else (stage,)
    module_name, config_name = STAGES[key]
    config_cls = getattr(importlib.import_module(module_name), config_name)
    required = ["--output", "/tmp/out"] if stage == "data" else ["--output_dir", "/tmp/out", "--dataset_dir", "/tmp/ds"]
    if stage == "study":  # a pipeline of stages, whose own specs are loaded here too
        required = []
    if stage == "ppo":  # the reward model is a run's output, named on the command line
        required += ["--reward_model", "/runs/rm"]
    return parse_config(config_cls, ["--config", str(spec), *required], f"humor-ray {stage}")


# runtime_env.yaml is Ray's runtime environment, not a stage's spec (tests/test_image.py checks it).
@pytest.mark.parametrize("spec", sorted(set(JOBS.glob("*.yaml")) - {JOBS / "runtime_env.yaml"}), ids=lambda p: p.name)
def test_job_spec_loads(spec, real_data, monkeypatch):
    """With the real data, every spec's inputs exist (its images, splits and descriptions)."""
    monkeypatch.setenv("HUMOR_RAY_DATA", str(real_data))
    assert load(spec) is not None


def effective_batch(cfg):
    return cfg.num_workers * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps


def test_paper_recipes():
    sft = load(JOBS / "sft-7b.yaml")
    assert (sft.model_name, sft.lora_r, sft.lora_alpha, sft.learning_rate, effective_batch(sft), sft.max_length) == (
        "hf:mistralai/Mistral-7B-Instruct-v0.1", 16, 16, 1.41e-5, 64, 512)
    dpo = load(JOBS / "dpo-7b.yaml")
    assert (dpo.beta, dpo.lora_r, dpo.lora_alpha, effective_batch(dpo), dpo.max_steps, dpo.max_prompt_length) == (
        0.1, 64, 16, 128, 1500, 128)
    assert dpo.new_padding_token and load(JOBS / "sft-simple-7b.yaml").simple_prompt
    rm = load(JOBS / "rm-7b.yaml")
    assert (rm.model_name, rm.lora_r, effective_batch(rm), rm.max_steps) == (
        "hf:weqweasdas/RM-Mistral-7B", 16, 64, 5000)
    assert all(load(JOBS / name).use_gpu for name in ("sft-7b.yaml", "dpo-7b.yaml", "rm-7b.yaml", "ppo-7b.yaml"))
    llava = load(JOBS / "llava-7b.yaml")
    assert (llava.model_name, llava.lora_r, llava.lora_alpha, llava.learning_rate, llava.mm_projector_lr,
            llava.deepspeed, effective_batch(llava), llava.max_length, llava.lr_scheduler_type, llava.warmup_ratio,
            llava.gradient_checkpointing, llava.use_gpu) == (
        "hf:llava-hf/llava-v1.6-mistral-7b-hf", 128, 256, 2e-4, 2e-5, "zero3", 16, 2048, "cosine", 0.03, True, True)
    ppo = load(JOBS / "ppo-7b.yaml")
    # The paper's batch, temperature and LoRA; its rollouts sample at the temperature alone (the paper's top-p
    # and repetition penalty would bias PPO's importance ratios: see jobs/ppo-7b.yaml).
    assert (ppo.num_workers * ppo.rollout_batch_size * ppo.samples_per_prompt, ppo.temperature, ppo.top_p,
            ppo.repetition_penalty, ppo.lora_r) == (128, 0.7, 1.0, 1.0, 16)
