"""The memory plan (`humor-ray plan`, humor_ray/plan.py): its model states against DeepSpeed's own estimators,
its activation estimate against the tensors a real model keeps for backward, every 7B job spec fitting on 80 GiB
GPUs, the flag it names when something does not fit, and the check every GPU stage runs before Ray starts."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from humor_ray import plan
from humor_ray.cli import main
from humor_ray.config import ConfigError, load_yaml

JOBS = Path(__file__).resolve().parents[2] / "jobs"
# The 7B specs of a stage (study-7b.yaml runs them all: each is planned here on its own).
STAGE_SPECS_7B = sorted(s for s in JOBS.glob("*-7b.yaml") if not s.name.startswith("study-"))
MISTRAL = "hf:mistralai/Mistral-7B-Instruct-v0.1"
# The spec values this file needs and a spec may not set yet; a spec's own value wins. PPO's trainer holds
# the policy and the value model, each a 7B network: in fp32 under DDP (the spec's deepspeed: none) they
# need about 149 GiB on a trainer GPU; ZeRO-3 casts them to bf16 and shards them over the 4 ranks.
ASSUMED_SPEC_VALUES = {"ppo-7b.yaml": {"deepspeed": "zero3"}}
# Where a spec's first line names no `# shape: N node(s) x G GPUs`: one node of 8 GPUs.
DEFAULT_SHAPE = (1, 8)


def deepspeed_per_gpu_gib(estimator, *args, capsys, **kwargs) -> dict[str, float]:
    """DeepSpeed's printed table (per GPU, in its GB of 2**30 bytes) by its options column."""
    estimator(*args, **kwargs)
    rows = re.findall(r"^\s*[\d.]+GB \|\s*([\d.]+)GB \| (.+)$", capsys.readouterr().out, re.MULTILINE)
    return {options.strip(): float(gib) for gib, options in rows}


@pytest.mark.parametrize("world", [4, 8])
def test_model_states_match_deepspeeds_estimators(world, capsys):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    arch = plan.architecture(MISTRAL, "causal_lm")  # every weight trained: what DeepSpeed's estimators assume
    assert arch.params == arch.trainable == 7_241_732_096 and arch.largest_layer == 32000 * 4096

    def ours(stage, offload_optimizer=False, offload_params=False):
        return sum(plan.model_states(arch, plan.Zero(stage, offload_optimizer, offload_params), world, 4)) / plan.GIB

    zero3 = deepspeed_per_gpu_gib(estimate_zero3_model_states_mem_needs_all_cold, arch.params, arch.largest_layer,
                                  num_gpus_per_node=world, num_nodes=1, capsys=capsys)
    cpu = "OffloadDeviceEnum.cpu"
    assert ours(3) == pytest.approx(zero3["offload_param=none, offload_optimizer=none, zero_init=1"], abs=0.01)
    assert ours(3, True) == pytest.approx(zero3[f"offload_param=none, offload_optimizer={cpu}, zero_init=1"],
                                          abs=0.01)
    assert ours(3, True, True) == pytest.approx(zero3[f"offload_param={cpu}, offload_optimizer={cpu}, zero_init=1"],
                                                abs=0.01)
    zero2 = deepspeed_per_gpu_gib(estimate_zero2_model_states_mem_needs_all_cold, arch.params,
                                  num_gpus_per_node=world, num_nodes=1, capsys=capsys)
    assert ours(2) == pytest.approx(zero2["offload_optimizer=none"], abs=0.01)
    assert ours(2, True) == pytest.approx(zero2[f"offload_optimizer={cpu}"], abs=0.01)


def test_lora_leaves_the_frozen_weights_without_gradients_or_optimizer_state():
    from peft import LoraConfig

    full = plan.architecture(MISTRAL, "causal_lm")
    lora = plan.architecture(MISTRAL, "causal_lm", LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    # r x (in + out) for q, k, v, o, gate, up, down in each of 32 layers.
    per_layer = 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 3)
    assert lora.trainable == 32 * per_layer and lora.params == full.params + lora.trainable
    weights, grads, optimizer = plan.model_states(lora, plan.Zero(2, False, False), 4, 4)
    assert weights == 2 * lora.params and grads == 6 * lora.trainable // 4 and optimizer == 12 * lora.trainable // 4


def test_activation_estimate_is_close_to_what_a_real_model_keeps_for_backward():
    """The formula against the bytes of the tensors a real (small, fp32) Mistral saves for its backward pass."""
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(hidden_size=256, intermediate_size=896, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    sequences, length = 2, 128
    ids = torch.randint(0, config.vocab_size, (sequences, length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    arch = plan.Architecture("small", 0, 0, 0, layers=4, hidden=256, kv_hidden=64, intermediate=896, vocab=1000,
                             max_positions=512, lora_rank_sum=0)
    full, checkpointed = plan.training_activations(arch, sequences, length, 4, length, autocast_weight_copies=False)
    assert sum(kept.values()) == pytest.approx(full, rel=0.15)
    assert checkpointed < full / 2


def spec_plan(spec: Path):
    """The plan of a 7B spec on 80 GiB GPUs in its shape, with the ASSUMED_SPEC_VALUES it does not set itself."""
    own = load_yaml(str(spec))
    assumed = {key: value for key, value in ASSUMED_SPEC_VALUES.get(spec.name, {}).items() if key not in own}
    stage = plan.stage_of(spec.name)
    cfg = dataclasses.replace(plan.load_stage_config(stage, str(spec), []), **assumed)
    shape = plan.spec_shape(str(spec)) or DEFAULT_SHAPE
    return plan.plan_stage(stage, cfg, 80, spec=spec.name, shape=shape), assumed


@pytest.mark.parametrize("spec", STAGE_SPECS_7B, ids=lambda p: p.name)
def test_every_7b_spec_fits_on_80_gib_gpus_in_its_shape(spec):
    result, assumed = spec_plan(spec)
    assert result.fits, (f"{spec.name} (assuming {assumed}): "
                         + "; ".join(f"{p.message} (try {p.hint})" for p in result.problems))
    assert all(total <= 80 * plan.GIB for total in result.gpu_totals().values())
    trainer = result.roles[0]
    assert trainer.weights > 0 and trainer.activations > 0 and trainer.count >= 1


def test_ppo_plan_holds_every_role():
    result, _ = spec_plan(JOBS / "ppo-7b.yaml")
    roles = {role.name: role for role in result.roles}
    assert set(roles) == {"trainer rank", "reference", "value model", "reward actor", "engine"}
    # LoRA: the reference is the policy with its adapter disabled; the engine holds bf16 weights and a KV cache
    # for at least one sequence of the model's length (32k tokens of 128 KiB).
    assert roles["reference"].weights == 0
    engine = roles["engine"]
    assert engine.weights == pytest.approx(2 * 7_241_732_096, rel=1e-6)
    assert engine.kv_cache >= 32768 * 2 * 32 * 1024 * 2 and engine.total == int(0.9 * 80 * plan.GIB)
    assert result.gpus_needed == 4 + 2 + 1


def test_a_role_that_does_not_fit_names_the_flag_that_fixes_it(capsys):
    assert main(["plan", "--config", "jobs/sft-7b.yaml", "--gpu_memory_gb", "16"]) == 1
    # Lines a connected Ray forwards from its own processes ("(raylet) ...") are not the command's.
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not re.match(r"(\x1b\[\d+m)?\(\w+", line)]
    assert len(err) == 1 and err[0].startswith("humor-ray plan: error: the trainer GPU needs"), err
    flag = re.search(r"try (--\S+ \S+)", err[0]).group(1).split()
    # The named flag really fits, planned again.
    assert main(["plan", "--config", "jobs/sft-7b.yaml", "--gpu_memory_gb", "16", *flag]) == 0


def test_plan_json_is_the_table(capsys):
    assert main(["plan", "--config", "jobs/llava-7b.yaml", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["stage"] == "llava" and table["fits"] and table["gpu_memory_gib"] == 80
    (worker,) = table["roles"]
    assert worker["role"] == "LLaVA worker" and worker["gradient_checkpointing"] is True
    assert worker["activations"] == worker["activations_checkpointed"] < worker["activations_full"]
    assert table["gpus"] == [{"gpu": "trainer", "roles": ["LLaVA worker"], "total": worker["total"], "fits": True}]


def test_llava_image_tokens_follow_the_any_resolution_tiling():
    arch = plan.architecture("hf:llava-hf/llava-v1.6-mistral-7b-hf", "image_text")
    # A 672 x 672 image: the 336 base image (576 features) and 2 x 2 tiles (48 x 48 features, a newline a row).
    assert arch.image_tokens == 576 + 48 * 48 + 48 and arch.vision_tokens == 5 * 577
    assert arch.padded_image_tokens == 576  # --image_aspect_ratio pad: one 336-px view


def test_an_unknown_hub_model_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["plan", "--config", "jobs/sft-7b.yaml", "--model_name", "hf:nobody/no-such-model"]) == 1
    assert "no config for model 'hf:nobody/no-such-model'" in capsys.readouterr().err
    assert main(["plan", "--config", "jobs/sft-7b.yaml", "--model_name", "nobody/no-such-model"]) == 1
    assert "a Hugging Face id takes the hf: prefix (hf:nobody/no-such-model)" in capsys.readouterr().err


def make_dataset_dirs(root: Path, *names: str) -> str:
    """Empty dataset folders of a complete build: the plan refuses before any of them is read."""
    from humor_ray.data.outputs import MARKER

    for name in names:
        (root / name).mkdir(parents=True)
    (root / MARKER).write_text("{}")
    return str(root)


def never_start_ray(monkeypatch) -> list:
    """Records any call of `init_ray` (a test run may already have a Ray of its own, so `ray.is_initialized()`
    says nothing about the stage)."""
    import humor_ray.cluster

    calls = []
    monkeypatch.setattr(humor_ray.cluster, "init_ray", lambda *args, **kwargs: calls.append(args))
    return calls


def test_a_gpu_stage_refuses_before_ray_starts(tmp_path, monkeypatch):
    from humor_ray.train import sft

    ray_started = never_start_ray(monkeypatch)
    datasets = make_dataset_dirs(tmp_path / "datasets", "sft/train", "sft/eval")
    # The logits of 256 sequences of 512 tokens alone outgrow a 2 GiB GPU; 64 sequences fit.
    cfg = sft.Config(output_dir=str(tmp_path / "out"), dataset_dir=datasets, model_name="tiny", use_gpu=True,
                     gpu_memory_gb=2, per_device_train_batch_size=256, report_to=["none"])
    refusal = r"memory plan: the trainer GPU needs .*; try --per_device_train_batch_size \d+ \(then"
    with pytest.raises(ConfigError, match=refusal):
        sft.run(cfg)
    assert not ray_started


def test_ppo_refuses_before_ray_starts(tmp_path, monkeypatch):
    from humor_ray.rl import ppo

    ray_started = never_start_ray(monkeypatch)
    datasets = make_dataset_dirs(tmp_path / "datasets", "prompts/train")
    cfg = ppo.Config(output_dir=str(tmp_path / "out"), dataset_dir=datasets, model_name="tiny",
                     reward_model="builtin:vowel_share", use_gpu=True, gpu_memory_gb=0.01, report_to=["none"])
    with pytest.raises(ConfigError, match="memory plan: the .* GPU needs .*; no single flag makes it fit"):
        ppo.run(cfg)
    assert not ray_started


def test_cpu_runs_are_not_planned():
    from humor_ray.train import sft

    cfg = sft.Config(output_dir="/x", dataset_dir="/y", model_name="tiny", gpu_memory_gb=0.01)
    assert plan.check_before_start("sft", cfg) is None


def test_the_gpu_check_plans_its_runs_and_finds_what_it_calls():
    """bench/gpu_check.py --dry_run: what runs of it without a GPU, and the 7B LLaVA recipe's collate, which
    keeps every image token (one padded 336-px view, 576 tokens, per cartoon)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry_run"], cwd=root, capture_output=True,
                          text=True, timeout=300)
    report = json.loads(done.stdout[done.stdout.index("\n{") + 1:])
    assert report["everything the GPU part calls exists"] == {"missing": [], "ok": True}
    assert all(report[f"plan vs peak: {stage}"]["planned_gib"] > 0 for stage in ("sft", "rm", "dpo", "llava"))
    assert report["ppo colocate (planned)"]["gpus_needed"] == 1
    assert report["ppo separate (planned)"]["gpus_needed"] == 3
    collate = report["llava collate at the 7B recipe's settings"]
    assert collate["pixel_values"][-3:] == [3, 336, 336] and collate["image_tokens"] == [576] * 4
    assert collate["ok"] and collate["rows_with_images_cut"] == 0 and done.returncode == 0
    assert max(collate["image_tokens_expected"]) <= collate["planned_image_tokens_at_most"]


@pytest.mark.parametrize("first_line, shape", [
    ("# shape: 1 node(s) x 8 GPUs", (1, 8)), ("# shape: 2 nodes x 4 GPUs", (2, 4)),
    ("# Shape: 1 node x 1 GPU (colocated)", (1, 1)), ("# SFT as in the paper", None)])
def test_the_shape_comment(tmp_path, first_line, shape):
    spec = tmp_path / "sft-x.yaml"
    spec.write_text(f"{first_line}\nuse_gpu: true\n")
    assert plan.spec_shape(str(spec)) == shape


def test_a_job_larger_than_its_shape_does_not_fit(tmp_path):
    spec = tmp_path / "ppo-7b.yaml"
    spec.write_text("# shape: 1 node x 4 GPUs\n" + (JOBS / "ppo-7b.yaml").read_text())
    result, _ = spec_plan(spec)
    assert [p.message for p in result.problems] == ["the job needs 7 GPUs, its shape has 4"]
