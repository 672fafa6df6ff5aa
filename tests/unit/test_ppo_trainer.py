"""PPO's trainer without a cluster: the caption every stage scores, the tokens it trains on, the dtypes
on a GPU, the DeepSpeed JSON it accepts, its decoding, and a bf16 step of the `tiny` policy on the CPU."""

import json

import pytest
import torch

from humor_ray.config import ConfigError, parse_config
from humor_ray.engines import Sample, clean_caption
from humor_ray.rl import learners, ppo
from humor_ray.train.deepspeed_presets import check_user_json, trainer_half_precision


def config(tmp_path, **overrides):
    return ppo.Config(output_dir=str(tmp_path), dataset_dir=str(tmp_path), reward_model="builtin:vowel_share",
                      **overrides)


def user_json(tmp_path, settings) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(settings))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from humor_ray.models import registry

    return AutoTokenizer.from_pretrained(registry.resolve("tiny"))


# ---------------------------------------------------------------- the caption and its tokens

def test_one_cleaning_for_generation_best_of_n_and_ppo():
    from humor_ray.infer import generate

    assert generate.clean_caption is clean_caption  # generate and bon use it; PPO's `score` phase too
    assert clean_caption('Caption: "I said no pickles."\nmore text', finished=True) == "I said no pickles."
    assert clean_caption("funny caption: Fish are friends", finished=True) == "Fish are friends"
    # Cut at max_new_tokens: the unfinished last word goes; a first line that ended is whole.
    assert clean_caption("Caption: I told you the elephant would nev", finished=False) == \
        "I told you the elephant would"
    assert clean_caption("He is late\n", finished=False) == "He is late"
    assert clean_caption("Incompr", finished=False) == ""


def test_a_cut_caption_trains_only_the_tokens_it_was_scored_on(tokenizer):
    """A sample that ran into max_new_tokens is scored as its whole words; its tokens after them are
    masked out of the update, so the score goes to the tokens that wrote the scored text."""
    text = "Caption: I told you the elephant would never fit through the doorway"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = ids[:-1]  # the generation stopped inside the last word
    cut = tokenizer.decode(ids, skip_special_tokens=True)
    assert not text.startswith(cut + " ")  # it really ends inside a word
    sample = Sample(0, [5, 6, 7], ids, [0.0] * len(ids), cut, version=0, finished=False)
    caption = clean_caption(sample.text, sample.finished)
    count = ppo.scored_tokens(tokenizer, sample, caption)
    assert 0 < count < len(ids)
    # The trained tokens are exactly the scored caption: it is whole in them, and not in one token fewer.
    assert clean_caption(tokenizer.decode(ids[:count]), finished=True) == caption
    assert caption not in tokenizer.decode(ids[:count - 1])
    finished = Sample(1, [5, 6], ids[:3], [0.0] * 3, tokenizer.decode(ids[:3]), version=0, finished=True)
    assert ppo.scored_tokens(tokenizer, finished, clean_caption(finished.text, True)) == 3
    seqs = ppo._sequences([sample, finished], 0, "cpu", [count, 3])
    assert seqs.mask.sum(1).tolist() == [count, 3]
    assert seqs.input_ids.shape[1] == 3 + len(ids)  # every sampled token is still in the sequence


# ---------------------------------------------------------------- decoding and temperature

def test_ppo_samples_from_the_distribution_its_trainer_scores(tmp_path):
    decoding = config(tmp_path).decoding()
    assert (decoding.top_p, decoding.repetition_penalty) == (1.0, 1.0) and decoding.temperature > 0
    # The paper's settings stay possible, and --help says what they do to the ratios.
    paper = config(tmp_path, top_p=0.95, repetition_penalty=1.15).decoding()
    assert (paper.top_p, paper.repetition_penalty) == (0.95, 1.15)
    helps = {f.name: f.metadata["help"] for f in ppo.Config.__dataclass_fields__.values()}
    assert "biased" in helps["top_p"] and "biased" in helps["repetition_penalty"]


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_ppo_refuses_a_deterministic_policy(tmp_path, temperature):
    with pytest.raises(ConfigError, match="--temperature .*must be > 0"):
        config(tmp_path, temperature=temperature)
    with pytest.raises(ConfigError, match="--temperature"):  # from the command line too
        parse_config(ppo.Config, ["--output_dir", "o", "--dataset_dir", "d", "--reward_model", "builtin:vowel_share",
                                  "--temperature", str(temperature)], "humor-ray ppo")


# ---------------------------------------------------------------- precision

def test_fp32_on_the_cpu_and_the_engines_half_precision_on_a_gpu(tmp_path):
    bf16, fp32 = torch.bfloat16, torch.float32
    assert learners.precision(config(tmp_path)) == learners.Precision(fp32, None)
    assert learners.precision(config(tmp_path, deepspeed="zero2")) == learners.Precision(fp32, None)
    # DeepSpeed and LoRA: every model loads in bf16 (the reference too: it matches the policy at step 0).
    assert learners.precision(config(tmp_path, use_gpu=True, deepspeed="zero2")) == learners.Precision(bf16, bf16)
    assert learners.precision(config(tmp_path, use_gpu=True, lora_r=8)) == learners.Precision(bf16, bf16)
    # A full fine-tune under DDP keeps fp32 weights for AdamW and computes in bf16.
    assert learners.precision(config(tmp_path, use_gpu=True)) == learners.Precision(fp32, bf16)
    fp16 = user_json(tmp_path, {"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}})
    half = torch.float16
    assert learners.precision(config(tmp_path, use_gpu=True, deepspeed=fp16)) == learners.Precision(half, half)


def test_the_7b_recipe_trains_in_bf16_under_zero_with_gradient_checkpointing():
    from pathlib import Path

    spec = Path(__file__).resolve().parents[2] / "jobs" / "ppo-7b.yaml"
    cfg = parse_config(ppo.Config, ["--config", str(spec), "--output_dir", "o", "--dataset_dir", "d",
                                    "--reward_model", "r"], "humor-ray ppo")
    assert cfg.use_gpu and cfg.deepspeed in ("zero2", "zero3") and cfg.gradient_checkpointing
    assert learners.precision(cfg).weights == torch.bfloat16
    assert (cfg.top_p, cfg.repetition_penalty) == (1.0, 1.0)


def test_a_bf16_ppo_step_of_tiny_on_the_cpu(tmp_path):
    """The GPU's precision, on the CPU: policy and reference load in bf16 and agree to the bit (KL 0 at step
    0), the value model's fp32 head reads the bf16 backbone, and one update under autocast moves the policy."""
    from humor_ray.models import registry
    from humor_ray.rl import algorithms as alg

    cfg = config(tmp_path, gradient_checkpointing=True, learning_rate=1e-3)
    bf16 = learners.Precision(torch.bfloat16, torch.bfloat16)
    policy, reference, value = ppo._build_models(cfg, registry.resolve("tiny"), None, True, bf16)
    assert {p.dtype for p in policy.parameters()} == {torch.bfloat16} == {p.dtype for p in reference.parameters()}
    assert unwrap_training(policy)
    samples = [Sample(0, [10, 11, 12, 13], [20, 21, 22], [0.0] * 3, "", 0),
               Sample(0, [14, 15], [23, 24, 25, 26], [0.0] * 4, "", 0)]
    seqs = ppo._sequences(samples, 0, "cpu")
    rows = slice(None)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        old = ppo._logprobs(policy, seqs, rows, 0.7)
        ref = ppo._logprobs(reference, seqs, rows, 0.7)
        values = ppo._values(value, seqs, rows)
    assert torch.equal(old * seqs.mask, ref * seqs.mask)
    assert values.dtype == torch.float32 and torch.isfinite(values).all()
    learner = learners.TorchLearner(cfg, policy, reference, value, torch.device("cpu"), world=1)
    advantages = torch.tensor([[1.0, 1.0, 1.0, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        new = ppo._logprobs(policy, seqs, rows, 0.7)
        new_values = ppo._values(value, seqs, rows)
    pg_loss, _, _ = alg.policy_loss(new, old, advantages, seqs.mask, 0.2)
    v_loss = alg.value_loss(new_values, values, torch.ones_like(values), seqs.mask, 0.2)
    learner.update(pg_loss, v_loss)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        after = ppo._logprobs(policy, seqs, rows, 0.7)
    assert torch.isfinite(after).all() and not torch.equal(after * seqs.mask, old * seqs.mask)


def unwrap_training(model) -> bool:
    """In training mode (gradient checkpointing needs it) with no dropout left."""
    return model.training and all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


# ---------------------------------------------------------------- a user's DeepSpeed JSON

def test_a_fp16_json_on_a_gpu_gets_no_bf16(tmp_path):
    path = user_json(tmp_path, {"zero_optimization": {"stage": 2}, "fp16": {"enabled": True, "loss_scale": 0}})
    settings = learners.deepspeed_settings(config(tmp_path, use_gpu=True, deepspeed=path), 2, 1e-5)
    assert settings["fp16"] == {"enabled": True, "loss_scale": 0}
    assert not settings.get("bf16", {}).get("enabled")
    preset = learners.deepspeed_settings(config(tmp_path, use_gpu=True, deepspeed="zero2"), 2, 1e-5)
    assert preset["bf16"] == {"enabled": True} and "fp16" not in preset
    on_cpu = learners.deepspeed_settings(config(tmp_path, deepspeed="zero2"), 2, 1e-5)
    assert not on_cpu.get("bf16", {}).get("enabled")


def test_the_hf_trainers_half_precision_follows_a_users_json(tmp_path):
    """sft, rm, dpo and llava pass bf16/fp16 to the HF Trainer, which refuses a JSON that contradicts them."""
    fp16 = user_json(tmp_path, {"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}})
    assert trainer_half_precision(fp16, use_gpu=True) == "fp16"
    assert trainer_half_precision("zero3", use_gpu=True) == "bf16"
    assert trainer_half_precision("none", use_gpu=False) is None


def test_auto_values_are_filled_as_the_hf_trainer_fills_them(tmp_path):
    path = user_json(tmp_path, {
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                              "stage3_param_persistence_threshold": "auto"},
        "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}}})
    cfg = config(tmp_path, use_gpu=True, deepspeed=path, mini_batch_size=8, model_name="tiny")
    settings = learners.deepspeed_settings(cfg, 4, 1e-5)
    hidden = 64  # the tiny preset's width
    assert settings["zero_optimization"]["reduce_bucket_size"] == hidden * hidden
    assert settings["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * hidden * hidden)
    assert settings["zero_optimization"]["stage3_param_persistence_threshold"] == 10 * hidden
    assert (settings["bf16"], settings["fp16"]) == ({"enabled": True}, {"enabled": False})
    assert (settings["train_batch_size"], settings["gradient_clipping"]) == (32, cfg.max_grad_norm)
    assert settings["optimizer"]["params"]["lr"] == 1e-5
    assert "auto" not in json.dumps(settings)


def test_a_json_the_learner_cannot_use_is_one_line_naming_the_key(tmp_path):
    scheduler = user_json(tmp_path, {"zero_optimization": {"stage": 2},
                                     "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}})
    with pytest.raises(ConfigError, match=r"ds.json: \"auto\" for scheduler.params.warmup_num_steps"):
        config(tmp_path, deepspeed=scheduler)
    both = user_json(tmp_path, {"fp16": {"enabled": True}, "bf16": {"enabled": True}})
    with pytest.raises(ConfigError, match="fp16.enabled and bf16.enabled are both true"):
        config(tmp_path, use_gpu=True, deepspeed=both)
    (tmp_path / "broken.json").write_text("{\"zero_optimization\": ")
    with pytest.raises(ConfigError, match="broken.json: not valid JSON"):
        config(tmp_path, deepspeed=str(tmp_path / "broken.json"))
    with pytest.raises(ConfigError, match="missing.json"):
        check_user_json(str(tmp_path / "missing.json"), False, ())


# ---------------------------------------------------------------- figures of all workers

def test_reward_std_is_of_every_workers_scores():
    """Each worker sums its scores and their squares; the standard deviation comes from the sums over all
    workers, not from one worker's scores."""
    from humor_ray.rl import algorithms as alg

    workers = [torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.9, 1.0])]
    sums = [sum(t.sum().item() for t in workers), sum((t ** 2).sum().item() for t in workers), 5]
    assert alg.pooled_std(*sums) == pytest.approx(torch.cat(workers).std().item(), rel=1e-5)
    assert alg.pooled_std(0.5, 0.25, 1) == 0.0


# ---------------------------------------------------------------- the reward model's own max_length

def test_the_reward_length_defaults_to_the_reward_model_runs(tmp_path):
    from humor_ray.rl.reward import recorded_max_length

    run = tmp_path / "rm"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"model": str(run / "final"), "max_length": 128}))
    assert recorded_max_length(str(run)) == 128
    assert recorded_max_length("builtin:vowel_share") is None
    assert config(tmp_path).reward_max_length is None  # resolved by `run` before the reward actor starts


def test_deepspeed_on_cpus_goes_through_gloo_without_compiling_its_shared_memory_op(tmp_path):
    """DeepSpeed's CPU all-reduce op is C++ it compiles on first use (40 s of two cores): a CPU run's process group
    is plain gloo, and nothing is built. In a process of its own, as a trainer worker is."""
    import os
    import subprocess
    import sys

    from conftest import free_port

    code = ("import sys\n"
            "from humor_ray.train.deepspeed_presets import start_process_group\n"
            "start_process_group(use_gpu=False)\n"
            "import torch.distributed as dist\n"
            "from deepspeed.comm import comm\n"
            "print(dist.get_backend(), comm.cdb.shm_comm_op, 'deepspeed_shm_comm' in sys.modules)\n")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
               WORLD_SIZE="1", TORCH_EXTENSIONS_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "gloo None False"
    assert not list(tmp_path.iterdir())
