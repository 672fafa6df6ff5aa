"""`humor-ray plan`: the GPU memory of every role of a training job, before anything starts.

    humor-ray plan --config jobs/ppo-7b.yaml [--gpu_memory_gb 80] [--gpus_per_node 8] [--json] [stage flags]

Per role (trainer rank or LLaVA worker, reference, value model, reward actor, rollout engine) it prints the
memory of the weights, gradients and optimizer states (under the spec's ZeRO stage, offload and LoRA), the
activations of one micro-batch at the spec's lengths (with and without gradient checkpointing; the one the run
uses is marked), the vLLM engine's weights and KV cache at its memory share, and each GPU's total against the
GPU. It exits 1 when something does not fit, naming the flag that would make it fit (found by planning again
with it). Every GPU stage runs the same plan at start (`check_before_start`) and refuses before Ray starts.

The models are built from their configs on PyTorch's meta device: no weights, no network. The configs of the
7B models the job specs name ship in humor_ray/models/configs/; a local model directory or a preset is read
from its own config.json. The figures follow what the stages do (humor_ray/train/*.py, humor_ray/rl/ppo.py
and learners.py, humor_ray/engines.py); each formula is stated where it is computed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import math
import re
import sys
from pathlib import Path

from humor_ray.config import ConfigError, UserError, find_job_spec, parse_config
from humor_ray.log import get_logger

GIB = 1024 ** 3
DEFAULT_GPU_GIB = 80.0
DEFAULT_GPUS_PER_NODE = 8
DEFAULT_ENGINE_SHARE = 0.9  # vLLM's gpu_memory_utilization when a spec names none
CONFIGS_DIR = Path(__file__).resolve().parent / "models" / "configs"
STAGES = {"sft": "humor_ray.train.sft", "rm": "humor_ray.train.rm", "dpo": "humor_ray.train.dpo",
          "llava": "humor_ray.train.llava", "ppo": "humor_ray.rl.ppo"}
# What a stage's model loads as (registry.AUTO_CLASSES' kinds).
STAGE_KIND = {"sft": "causal_lm", "dpo": "causal_lm", "rm": "reward", "llava": "image_text"}
SHAPE = re.compile(r"#\s*shape:\s*(\d+)\s*node(?:s|\(s\))?\s*[x×]\s*(\d+)\s*GPU(?:s|\(s\))?", re.IGNORECASE)
# Every process that holds a GPU: the CUDA context, cuBLAS/NCCL workspaces and allocator slack.
CUDA_CONTEXT = GIB
# vLLM's LLM class on GPUs of 70 GiB or more (vllm/engine/arg_utils.py): tokens per scheduler step and sequences.
VLLM_BATCHED_TOKENS, VLLM_MAX_SEQS = {True: 16384, False: 8192}, {True: 1024, False: 256}
VLLM_CUDA_GRAPHS = GIB // 2  # captured graphs' memory (the engine runs with enforce_eager=False on GPU)
PLACEHOLDERS = {"output_dir": "/plan/output", "dataset_dir": "/plan/datasets"}
log = get_logger("plan")


class ModelConfigMissing(UserError):
    """No config for a model spec without the network."""


# ---------------------------------------------------------------- the models, on the meta device

@dataclasses.dataclass(frozen=True)
class Architecture:
    """What the plan needs of a model: parameter counts (after LoRA) and the decoder's dimensions."""
    name: str
    params: int  # every parameter, LoRA's and PEFT's trainable copies included
    trainable: int
    largest_layer: int  # parameters of the largest module (what ZeRO-3 gathers at once)
    layers: int
    hidden: int
    kv_hidden: int  # key/value heads x head dim (grouped-query attention)
    intermediate: int
    vocab: int
    max_positions: int
    lora_rank_sum: int  # sum of the LoRA ranks of one decoder layer's adapted linears
    image_tokens: int = 0  # a vision-language model: language-model tokens of one image, at most
    padded_image_tokens: int = 0  # the same for one padded view (--image_aspect_ratio pad: LLaVA-1.5's reading)
    vision_tokens: int = 0  # ... and the vision tower's tokens over all of an image's tiles
    vision_width: int = 0  # the tower's widest intermediates per token and layer: 4 x hidden + intermediate

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_hidden * dtype_bytes  # K and V of every layer


def shipped_configs() -> dict[str, Path]:
    """Hugging Face id -> the shipped config.json of that model (`*.processor.json`: its processor's settings)."""
    found = {}
    for path in sorted(CONFIGS_DIR.glob("*.json")):
        if path.name.endswith(".processor.json"):
            continue
        found[json.loads(path.read_text())["_name_or_path"]] = path
    return found


def model_config(spec: str):
    """The transformers config of a model spec, without the network where it can be: a shipped config, a
    preset (built locally), a local directory; else the Hugging Face cache (or hub)."""
    from transformers import AutoConfig

    from humor_ray.models import registry

    shipped = shipped_configs()
    if not spec.startswith(registry.HUB_PREFIX):  # a preset or a local directory (else a clear ModelError)
        return AutoConfig.from_pretrained(registry.resolve(spec))
    repo_id = spec.removeprefix(registry.HUB_PREFIX)
    if repo_id in shipped:
        values = json.loads(shipped[repo_id].read_text())
        return AutoConfig.for_model(values.pop("model_type"), **values)
    try:
        return AutoConfig.from_pretrained(repo_id)
    except OSError as err:
        raise ModelConfigMissing(f"no config for model {spec!r} (shipped: {', '.join(shipped)}; or a local "
                                 f"directory): {str(err).splitlines()[0]}") from None


def _meta_model(config, kind: str):
    import torch
    from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText,
                              AutoModelForSequenceClassification)

    auto = {"causal_lm": AutoModelForCausalLM, "reward": AutoModelForSequenceClassification,
            "backbone": AutoModel, "image_text": AutoModelForImageTextToText}[kind]
    if kind == "reward":
        config.num_labels = 1  # a Bradley-Terry scalar, as registry.load_model asks
    with torch.device("meta"):
        return auto.from_config(config)


def _image_tokens(config) -> tuple[int, int, int, int]:
    """(language-model tokens, vision-tower tokens, the tower's width) of one image at most, and the language-model
    tokens of one padded view: LLaVA-NeXT's any-resolution tiling (the base image and the best grid of tiles,
    unpadded, a newline token per row of features) or LLaVA-1.5's single image."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    per_tile = side * side + (0 if config.vision_feature_select_strategy == "default" else 1)
    grids = getattr(config, "image_grid_pinpoints", None)
    width = 4 * vision.hidden_size + vision.intermediate_size
    if not grids:
        return per_tile, side * side + 1, width, per_tile
    # The worst case is an image of exactly a grid's size: no unpadding removes any feature row.
    best = max(grids, key=lambda hw: (hw[0] // vision.image_size) * (hw[1] // vision.image_size))
    rows, cols = (best[0] // vision.image_size) * side, (best[1] // vision.image_size) * side
    tiles = 1 + (best[0] // vision.image_size) * (best[1] // vision.image_size)
    return per_tile + rows * cols + rows, tiles * (side * side + 1), width, per_tile


@functools.lru_cache(maxsize=32)
def _architecture(spec: str, kind: str, peft_key: str, freeze_tower: bool, value_head: bool) -> Architecture:
    import torch

    config = model_config(spec)
    model = _meta_model(config, kind)
    if freeze_tower:
        model.get_submodule(next(n for n, _ in model.named_modules() if n.split(".")[-1] == "vision_tower")
                            ).requires_grad_(False)
    peft = _PEFT_SETTINGS.get(peft_key)
    if peft is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    text = config.get_text_config()
    if value_head:  # ValueModel: the backbone and a Linear(hidden, 1), trained fully
        params, trainable = params + text.hidden_size + 1, trainable + text.hidden_size + 1
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    lora_rank_sum = 0
    if peft is not None:
        adapted = [m for m in model.modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)
                   and m.lora_A]
        lora_rank_sum = sum(next(iter(m.lora_A.values())).out_features for m in adapted) // text.num_hidden_layers
    image, vision, vision_width, padded = _image_tokens(config) if hasattr(config, "vision_config") else (0,) * 4
    return Architecture(name=spec, params=params, trainable=trainable, largest_layer=largest,
                        layers=text.num_hidden_layers, hidden=text.hidden_size,
                        kv_hidden=(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
                        intermediate=text.intermediate_size,
                        vocab=text.vocab_size, max_positions=text.max_position_embeddings,
                        lora_rank_sum=lora_rank_sum, image_tokens=image, padded_image_tokens=padded,
                        vision_tokens=vision,
                        vision_width=vision_width)


_PEFT_SETTINGS: dict = {}  # repr -> LoraConfig: the cache key of a PEFT config is its repr


def architecture(spec: str, kind: str, peft=None, freeze_tower: bool = False, value_head: bool = False):
    """The model `spec` as `kind` (causal_lm, reward, backbone, image_text) with `peft` (a LoraConfig) applied."""
    key = repr(peft)
    _PEFT_SETTINGS[key] = peft
    return _architecture(spec, kind, key, freeze_tower, value_head)


# ---------------------------------------------------------------- the arithmetic

@dataclasses.dataclass(frozen=True)
class Zero:
    """The DeepSpeed settings that decide memory: ZeRO stage and what is offloaded to the CPU."""
    stage: int
    offload_optimizer: bool
    offload_params: bool

    def describe(self) -> str:
        offloaded = [name for name, on in (("optimizer", self.offload_optimizer), ("weights", self.offload_params))
                     if on]
        return f"ZeRO-{self.stage}" + (f", {' and '.join(offloaded)} offloaded to CPU" if offloaded else "")


def zero_settings(preset: str) -> Zero | None:
    """What `--deepspeed` (a preset or a JSON file) sets; None for none (DDP)."""
    from humor_ray.train.deepspeed_presets import zero_optimization

    if preset == "none":
        return None
    if preset.endswith(".json"):
        try:
            zero = json.loads(Path(preset).read_text()).get("zero_optimization", {})
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"--deepspeed {preset}: {err}") from None
    else:
        zero = zero_optimization(preset, use_gpu=True)

    def off(key: str) -> bool:
        return (zero.get(key) or {}).get("device", "none") in ("cpu", "nvme")

    return Zero(int(zero.get("stage", 0)), off("offload_optimizer"), off("offload_param"))


def model_states(arch: Architecture, zero: Zero | None, world: int, weight_bytes: int) -> tuple[int, int, int]:
    """(weights, gradients, optimizer states) per rank, in bytes.

    Under DeepSpeed (bf16, as every GPU run enables it) the count is DeepSpeed's own estimators' (see
    `estimate_zero2/3_model_states_mem_needs`): weights 2 bytes each (ZeRO-3: sharded over the ranks, plus the
    largest layer gathered with its gradient, 4 bytes a parameter); per trainable parameter 16 bytes sharded
    over the ranks (fp32 gradient, fp32 master weight, Adam's two moments), and under ZeRO-2 its bf16
    gradient too (2 bytes, sharded). Offloading the optimizer moves the 16 bytes (and ZeRO-2's gradients) to
    the CPU; offloading the weights moves ZeRO-3's shards too. Frozen weights (LoRA's base) have no gradient
    and no optimizer state.
    Without DeepSpeed: weights of `weight_bytes`, gradients as large as the trainable weights, AdamW's two fp32
    moments (8 bytes), and DDP's gradient buckets (another copy of the gradients) across several ranks."""
    params, trainable = arch.params, arch.trainable
    if zero is None:
        grads = trainable * weight_bytes * (2 if world > 1 else 1)
        return params * weight_bytes, grads, trainable * 8
    if zero.stage >= 3:
        weights = 4 * arch.largest_layer + (0 if zero.offload_params else 2 * params // world)
        grads = 0 if zero.offload_optimizer else 4 * trainable // world
        optimizer = 0 if zero.offload_optimizer else 12 * trainable // world
        return weights, grads, optimizer
    if zero.offload_optimizer:
        return 2 * params, 0, 0
    bf16_grads = 2 * trainable // world if zero.stage == 2 else 2 * trainable  # ZeRO-1 keeps them whole
    return 2 * params, bf16_grads + 4 * trainable // world, 12 * trainable // world


def layer_activation_bytes(arch: Architecture, dtype_bytes: int) -> int:
    """Bytes one decoder layer keeps per token for its backward pass (a standard estimate; flash/SDPA
    attention keeps no sequence x sequence scores): its input and normalised input (2h), q (h), k and v (2 kv),
    the attention output (h); the MLP's input and normalised input (2h), gate, up, act(gate) and their product
    (4 i); each LoRA adapter its rank-r intermediate. All in the compute dtype:
        a x (6h + 2kv + 4i + sum of LoRA ranks)."""
    return dtype_bytes * (6 * arch.hidden + 2 * arch.kv_hidden + 4 * arch.intermediate + arch.lora_rank_sum)


def training_activations(arch: Architecture, sequences: int, length: int, dtype_bytes: int, logit_positions: int,
                         autocast_weight_copies: bool) -> tuple[int, int]:
    """(without, with gradient checkpointing) bytes of one micro-batch's saved activations.

    Without checkpointing every layer keeps `layer_activation_bytes` per token; with it (one checkpoint per
    decoder layer, as transformers does) every layer keeps only its input (a x h per token) and one layer's
    full set lives while it is recomputed. Both add the embeddings' output (a x h per token) and the logits of
    the `logit_positions` (per sequence) the loss reads: a x V for the logits, 4 V for their fp32 copy and 4 V
    for the fp32 log-softmax the loss keeps. Under torch autocast over fp32 weights (the HF Trainer's bf16
    without DeepSpeed) every layer kept for backward also keeps the bf16 copy of its weights (2 bytes each)."""
    tokens = sequences * length
    per_layer = layer_activation_bytes(arch, dtype_bytes) * tokens
    inputs = dtype_bytes * arch.hidden * tokens
    logits = sequences * logit_positions * arch.vocab * (dtype_bytes + 8)
    copies = 2 * arch.params if autocast_weight_copies else 0
    full = arch.layers * per_layer + inputs + logits + copies
    checkpointed = arch.layers * inputs + per_layer + inputs + logits + copies // max(1, arch.layers)
    return full, checkpointed


def inference_activations(arch: Architecture, sequences: int, length: int, dtype_bytes: int,
                          logit_positions: int) -> int:
    """A forward pass without gradients frees each layer's intermediates: one layer's worth at a time, the
    hidden states, and the logits (the fp32 copy and log-softmaxes PPO takes: 4 x 4 V per position)."""
    tokens = sequences * length
    return (layer_activation_bytes(arch, dtype_bytes) + 2 * dtype_bytes * arch.hidden) * tokens \
        + sequences * logit_positions * arch.vocab * (dtype_bytes + 16)


# ---------------------------------------------------------------- the plan

@dataclasses.dataclass
class Role:
    """One role's memory on its GPU, in bytes. `count` instances, each on its own GPU or share of one."""
    name: str
    gpu: str  # roles with the same label share one GPU
    count: int
    model: str = ""
    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0  # what the run holds: with or without checkpointing, as it is configured
    activations_full: int | None = None  # without gradient checkpointing
    activations_checkpointed: int | None = None  # with it
    checkpointing: bool | None = None
    kv_cache: int = 0
    other: int = 0  # CUDA context, DeepSpeed buffers, vLLM's profile and graphs
    reserved: int | None = None  # an engine: what vLLM reserves (its share of the GPU)
    note: str = ""

    @property
    def total(self) -> int:
        parts = self.weights + self.gradients + self.optimizer + self.activations + self.kv_cache + self.other
        return self.reserved if self.reserved is not None else parts


@dataclasses.dataclass
class Problem:
    gpu: str
    kind: str  # memory (a GPU's total), kv_cache (an engine's), gpus (the job's shape)
    message: str
    hint: str = ""  # the flag that makes it fit, and what it brings the GPU to

    def advice(self) -> str:
        return f"{self.message}; " + (f"try {self.hint}" if self.hint else "no single flag makes it fit")


@dataclasses.dataclass
class Plan:
    spec: str
    stage: str
    gpu_bytes: int
    roles: list[Role]
    gpus_needed: int
    assumptions: list[str] = dataclasses.field(default_factory=list)
    problems: list[Problem] = dataclasses.field(default_factory=list)

    def gpu_totals(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for role in self.roles:
            if role.gpu:
                totals[role.gpu] = totals.get(role.gpu, 0) + role.total
        return totals

    @property
    def fits(self) -> bool:
        return not self.problems


def _activations(role: Role, full: int, checkpointed: int, checkpointing: bool) -> None:
    role.activations_full, role.activations_checkpointed, role.checkpointing = full, checkpointed, checkpointing
    role.activations = checkpointed if checkpointing else full


def _trainer_checkpointing(cfg) -> bool:
    # TRL's SFT/DPO/Reward configs turn gradient checkpointing on unless told otherwise; the LLaVA stage sets it.
    return bool(getattr(cfg, "gradient_checkpointing", True))


def plan_trainer_stage(stage: str, cfg, gpu_bytes: int) -> Plan:
    """sft, rm, dpo, llava: one HF/TRL trainer per Ray Train worker, one GPU each."""
    from humor_ray.train.launcher import lora_config

    kind = STAGE_KIND[stage]
    if stage == "llava":
        from humor_ray.train.llava import peft_config

        peft = peft_config(cfg)
    else:
        peft = lora_config(cfg, "SEQ_CLS" if stage == "rm" else "CAUSAL_LM")
    arch = architecture(cfg.base_model(), kind, peft, freeze_tower=stage == "llava" and not cfg.train_vision_tower)
    zero, world = zero_settings(cfg.deepspeed), cfg.num_workers
    # The models load in fp32; DeepSpeed's bf16 casts them, the HF Trainer alone runs autocast over fp32 weights.
    weights, grads, optimizer = model_states(arch, zero, world, weight_bytes=4)
    # DPO and the reward model put chosen and rejected through one forward pass: two sequences per example.
    sequences = cfg.per_device_train_batch_size * (2 if stage in ("rm", "dpo") else 1)
    logit_positions = 0 if stage == "rm" else cfg.max_length
    full, checkpointed = training_activations(arch, sequences, cfg.max_length, 2, logit_positions,
                                              autocast_weight_copies=zero is None)
    # One padded view (llava.py's --image_aspect_ratio pad) or NeXT's tiles: what the tower and the LM read.
    padded = getattr(cfg, "image_aspect_ratio", "native") == "pad"
    image_tokens = arch.padded_image_tokens if padded else arch.image_tokens
    vision_tokens = arch.padded_image_tokens + 1 if padded and arch.vision_tokens else arch.vision_tokens
    # A frozen vision tower runs without gradients: one of its layers at a time (bf16), beside the rest.
    vision = 2 * cfg.per_device_train_batch_size * vision_tokens * arch.vision_width
    name = "LLaVA worker" if stage == "llava" else "trainer rank"
    trainer = Role(name, "trainer", world, arch.name, weights, grads, optimizer,
                   other=CUDA_CONTEXT + _zero_buffers(arch, zero))
    _activations(trainer, full + vision, checkpointed + vision, _trainer_checkpointing(cfg))
    notes = [f"{sequences} sequences x {cfg.max_length} tokens per micro-batch"]
    if stage == "llava":
        notes.append(f"an image is {'one padded view, ' if padded else 'up to '}{image_tokens} language-model tokens"
                     + (f", more than --max_length {cfg.max_length}" if image_tokens > cfg.max_length else ""))
    trainer.note = "; ".join(notes)
    roles = [trainer]
    if stage == "dpo":
        reference = Role("reference", "trainer", world, arch.name)
        if peft is not None:
            reference.note = "the policy with its LoRA adapter disabled: no copy"
        else:  # TRL prepares a frozen copy: ZeRO-3 shards it; otherwise whole, bf16 under DeepSpeed
            frozen = dataclasses.replace(arch, trainable=0)
            reference.weights = model_states(frozen, zero, world, 4)[0] if zero and zero.stage >= 3 else \
                arch.params * (2 if zero else 4)
            reference.note = "a frozen copy"
        roles.append(reference)
    plan = Plan(spec="", stage=stage, gpu_bytes=gpu_bytes, roles=roles, gpus_needed=world)
    plan.assumptions.append(f"{name}: {zero.describe() if zero else 'DDP, fp32 weights, bf16 autocast'} over "
                            f"{world} rank(s); {_lora_text(arch, cfg)}; gradient checkpointing "
                            f"{'on' if trainer.checkpointing else 'off'}")
    return plan


def _lora_text(arch: Architecture, cfg) -> str:
    lora = f"LoRA r{cfg.lora_r}" if cfg.lora_r > 0 else "every weight trained"
    return f"{lora}, {arch.trainable / 1e6:,.1f} M of {arch.params / 1e9:.2f} B parameters trainable"


def _zero_buffers(arch: Architecture, zero: Zero | None) -> int:
    """DeepSpeed's own GPU buffers: ZeRO-2's gradient reduce bucket (5e8 elements by default, bf16, at most
    the trainable parameters), ZeRO-3's prefetch bucket (5e7 elements)."""
    if zero is None:
        return 0
    if zero.stage >= 3:
        return 2 * 50_000_000
    return 2 * min(500_000_000, arch.trainable)


def engine_share(cfg) -> float:
    """The share of its GPU a rollout engine's vLLM takes (gpu_memory_utilization)."""
    if cfg.placement == "colocate":
        return cfg.colocate_fractions[0]
    return getattr(cfg, "engine_gpu_memory", None) or DEFAULT_ENGINE_SHARE


def plan_ppo(cfg, gpu_bytes: int, prompt_tokens: int) -> Plan:
    """ppo: trainer workers (policy, reference, value model), the reward actor and the vLLM engines."""
    from humor_ray.rl.algorithms import ESTIMATORS
    from humor_ray.train.launcher import lora_config

    zero, world = zero_settings(cfg.deepspeed), cfg.num_workers
    colocate = cfg.placement == "colocate"
    trainer_gpu, reward_gpu, engine_gpu = ("shared",) * 3 if colocate else ("trainer", "reward", "engine")
    policy = architecture(cfg.model_name, "causal_lm", lora_config(cfg, "CAUSAL_LM"))
    # learners.precision: on a GPU the models load in bf16 under DeepSpeed or LoRA; a full fine-tune with DDP
    # keeps fp32 weights (for AdamW) and autocasts.
    dtype_bytes = 2 if zero or cfg.lora_r > 0 else 4
    length = prompt_tokens + cfg.max_new_tokens
    checkpointing = bool(getattr(cfg, "gradient_checkpointing", False))
    trainer = Role("trainer rank", trainer_gpu, world, policy.name, *model_states(policy, zero, world, dtype_bytes),
                   other=CUDA_CONTEXT + _zero_buffers(policy, zero))
    # The update keeps the policy's activations of a mini-batch; the log-probs keep T + 1 positions' logits.
    full, checkpointed = training_activations(policy, cfg.mini_batch_size, length, dtype_bytes,
                                              cfg.max_new_tokens + 1, autocast_weight_copies=False)
    _activations(trainer, full, checkpointed, checkpointing)
    experience = inference_activations(policy, cfg.forward_batch_size, length, dtype_bytes, cfg.max_new_tokens + 1)
    trainer.activations = max(trainer.activations, experience)
    trainer.note = f"{cfg.mini_batch_size} sequences x {length} tokens per mini-batch ({prompt_tokens} prompt)"
    reference = Role("reference", trainer_gpu, world, policy.name)
    if cfg.lora_r > 0:
        reference.note = "the policy with its LoRA adapter disabled: no copy"
    else:
        frozen = dataclasses.replace(policy, trainable=0)
        # learners.py: ZeRO-3 shards it (bf16); otherwise it is moved whole to the GPU in fp32.
        reference.weights = model_states(frozen, zero, world, 4)[0] if zero and zero.stage >= 3 else 4 * policy.params
        reference.note = "a frozen copy"
    roles = [trainer, reference]
    if ESTIMATORS[cfg.estimator].critic:
        value = architecture(cfg.model_name, "backbone", lora_config(cfg, "FEATURE_EXTRACTION"), value_head=True)
        role = Role("value model", trainer_gpu, world, value.name, *model_states(value, zero, world, dtype_bytes),
                    other=_zero_buffers(value, zero), note="the policy's backbone and a scalar head")
        _activations(role, *training_activations(value, cfg.mini_batch_size, length, dtype_bytes, 0, False),
                     checkpointing)
        roles.append(role)
    roles.append(_reward_role(cfg, reward_gpu, policy))
    engine = _engine_role(cfg, engine_gpu, policy, gpu_bytes)
    roles.append(engine)
    engine_gpus, reward_gpus, trainer_gpus = (cfg.colocate_fractions if colocate else (1.0, 1.0, 1.0))
    needed = math.ceil(cfg.num_engines * engine_gpus + reward_gpus + world * trainer_gpus - 1e-9)
    plan = Plan(spec="", stage="ppo", gpu_bytes=gpu_bytes, roles=roles, gpus_needed=needed)
    plan.assumptions.append(
        f"trainer: {zero.describe() if zero else 'torch AdamW (DDP), fp32 weights, no autocast'} over {world} "
        f"rank(s); {_lora_text(policy, cfg)}; gradient checkpointing {'on' if checkpointing else 'off'}; "
        f"prompts of {prompt_tokens} tokens (--prompt_tokens)")
    plan.assumptions.append(f"placement {cfg.placement}: " + (
        "one GPU holds an engine, the reward actor and a trainer rank" if colocate
        else "each trainer rank, engine and the reward actor on a GPU of its own"))
    kv_needed = _engine_model_len(cfg, policy) * policy.kv_bytes_per_token()
    if engine.kv_cache < kv_needed:
        plan.problems.append(Problem(engine_gpu, "kv_cache", f"the engine's KV cache ({engine.kv_cache / GIB:.1f} "
                                     f"GiB) cannot hold one sequence of {_engine_model_len(cfg, policy)} tokens "
                                     f"({kv_needed / GIB:.1f} GiB)"))
    return plan


def _reward_role(cfg, gpu: str, policy: Architecture) -> Role:
    """The reward actor: a sequence classifier in fp32 (reward.py), scoring 32 texts of up to
    --reward_max_length tokens per forward pass, without gradients."""
    from humor_ray.rl.reward import BUILTIN, resolve_reward_model, reward_max_length

    if cfg.reward_model in BUILTIN:  # ppo.run still gives its actor the reward model's GPU share
        return Role("reward actor", gpu, 1, cfg.reward_model, note="a rule: its GPU (share) holds nothing")
    if cfg.reward_model == PLACEHOLDER_REWARD:
        spec, note = policy.name, "no --reward_model given: the policy's architecture with a scalar head"
    else:
        spec, note = resolve_reward_model(cfg.reward_model), ""
    arch = architecture(spec, "reward")
    role = Role("reward actor", gpu, 1, spec, weights=4 * arch.params, other=CUDA_CONTEXT, note=note)
    role.activations = inference_activations(arch, 32, reward_max_length(cfg), 4, 0)
    return role


def _engine_model_len(cfg, policy: Architecture) -> int:
    return cfg.engine_max_model_len or policy.max_positions


def _engine_role(cfg, gpu: str, policy: Architecture, gpu_bytes: int) -> Role:
    """A vLLM engine (engines.py: bf16 on GPU, CUDA graphs). It reserves share x GPU; the KV cache is what is left
    after the weights (2 bytes each, the policy without LoRA), its profile run's peak (a forward pass of
    max_num_batched_tokens tokens: one layer's intermediates, a x (4h + 3i) per token, and the sampler's fp32
    logits of max_num_seqs sequences) and the CUDA context and graphs. vLLM needs room for at least one
    sequence of the model length: K and V of every layer, 2 x layers x kv x 2 bytes per token."""
    share = engine_share(cfg)
    large = gpu_bytes >= 70 * GIB
    base_params = policy.params - policy.trainable if cfg.lora_r > 0 else policy.params
    weights = 2 * base_params
    profile = VLLM_BATCHED_TOKENS[large] * 2 * (4 * policy.hidden + 3 * policy.intermediate) \
        + VLLM_MAX_SEQS[large] * policy.vocab * 4 * 2
    other = CUDA_CONTEXT + VLLM_CUDA_GRAPHS
    reserved = int(share * gpu_bytes)
    kv = max(0, reserved - weights - profile - other)
    length = _engine_model_len(cfg, policy)
    per_token = policy.kv_bytes_per_token()
    return Role("engine", gpu, cfg.num_engines, policy.name, weights=weights, activations=profile, kv_cache=kv,
                other=other, reserved=reserved,
                note=f"vLLM at {share:g} of the GPU; KV cache {kv // per_token:,} tokens = "
                     f"{kv // (per_token * length)} sequence(s) of {length}")


PLACEHOLDER_REWARD = "builtin:plan-placeholder"


# ---------------------------------------------------------------- planning a stage's config

def plan_stage(stage: str, cfg, gpu_gib: float, prompt_tokens: int = 512, spec: str = "",
               shape: tuple[int, int] | None = None, hints: bool = True) -> Plan:
    """The plan of a stage's config on GPUs of `gpu_gib` GiB; with `hints`, each problem names a flag that fixes it."""
    gpu_bytes = int(gpu_gib * GIB)
    plan = plan_ppo(cfg, gpu_bytes, prompt_tokens) if stage == "ppo" else plan_trainer_stage(stage, cfg, gpu_bytes)
    plan.spec = spec
    if not cfg.use_gpu:
        plan.assumptions.append("the config runs on CPU (use_gpu false): planned as if on GPUs")
    for gpu, total in plan.gpu_totals().items():
        if total > gpu_bytes:
            plan.problems.insert(0, Problem(gpu, "memory", f"the {gpu} GPU needs {total / GIB:.1f} GiB, more than its "
                                                 f"{gpu_gib:g} GiB"))
    if shape and plan.gpus_needed > shape[0] * shape[1]:
        plan.problems.append(Problem("", "gpus", f"the job needs {plan.gpus_needed} GPUs, its shape has "
                                                 f"{shape[0] * shape[1]}"))
    if hints:
        for problem in plan.problems:
            problem.hint = _hint(stage, cfg, gpu_gib, prompt_tokens, problem)
    return plan


def _candidates(stage: str, cfg) -> list[tuple[str, dict]]:
    """Changes that lower memory, in the order they cost least to the recipe: (flag text, config changes)."""
    from humor_ray.rl.reward import reward_max_length

    changes: list[tuple[str, dict]] = []
    if hasattr(cfg, "gradient_checkpointing") and not cfg.gradient_checkpointing:
        changes.append(("--gradient_checkpointing", {"gradient_checkpointing": True}))
    presets = ["none", "zero2", "zero3", "zero3_offload"]
    if cfg.deepspeed in presets:
        for preset in presets[presets.index(cfg.deepspeed) + 1:]:
            changes.append((f"--deepspeed {preset}", {"deepspeed": preset}))
    batch = "mini_batch_size" if stage == "ppo" else "per_device_train_batch_size"
    size = getattr(cfg, batch) // 2
    while size >= 1:
        changes.append((f"--{batch} {size}", {batch: size}))
        size //= 2
    if cfg.lora_r <= 0:
        changes.append(("--lora_r 16", {"lora_r": 16}))
    if stage == "ppo":
        if cfg.placement == "colocate":
            changes.append(("--placement separate", {"placement": "separate"}))
        if hasattr(cfg, "engine_gpu_memory"):
            for share in (0.92, 0.95):
                if share > engine_share(cfg):
                    changes.append((f"--engine_gpu_memory {share}", {"engine_gpu_memory": share}))
        for length in (16384, 8192, 4096, 2048, 1024):
            if length < (cfg.engine_max_model_len or 1 << 30):
                changes.append((f"--engine_max_model_len {length}", {"engine_max_model_len": length}))
        for length in (256, 128):
            if length < reward_max_length(cfg):
                changes.append((f"--reward_max_length {length}", {"reward_max_length": length}))
    return changes


def _hint(stage: str, cfg, gpu_gib: float, prompt_tokens: int, problem: Problem) -> str:
    """The first change after which the problem is gone: planned again, not guessed."""
    for flag, change in _candidates(stage, cfg):
        try:
            changed = dataclasses.replace(cfg, **change)
        except ConfigError:  # e.g. a mini-batch that no longer divides the rollout batch
            continue
        again = plan_stage(stage, changed, gpu_gib, prompt_tokens, hints=False)
        if not any((p.gpu, p.kind) == (problem.gpu, problem.kind) for p in again.problems):
            total = again.gpu_totals().get(problem.gpu)
            return f"{flag}" + (f" (then {total / GIB:.1f} GiB)" if total is not None and problem.gpu else "")
    return ""


def stage_of(spec_path: str) -> str | None:
    """The stage a job spec is for, from its file name (sft-simple-7b.yaml: sft)."""
    prefix = Path(spec_path).name.split("-")[0].split(".")[0]
    return prefix if prefix in STAGES else None


def spec_shape(spec_path: str) -> tuple[int, int] | None:
    """(nodes, GPUs per node) from a job spec's first-line comment `# shape: N node(s) x G GPUs`."""
    try:
        first = Path(find_job_spec(spec_path)).read_text().splitlines()[:1]
    except OSError:
        return None
    match = SHAPE.search(first[0]) if first else None
    return (int(match.group(1)), int(match.group(2))) if match else None


def load_stage_config(stage: str, spec_path: str | None, overrides: list[str]):
    """The stage's config from a job spec and flags, with placeholders for the paths a plan does not read."""
    module = importlib.import_module(STAGES[stage])
    argv = (["--config", spec_path] if spec_path else []) + list(overrides)
    given = {arg.lstrip("-").split("=")[0].replace("-", "_") for arg in overrides if arg.startswith("--")}
    filled = {**PLACEHOLDERS, **({"reward_model": PLACEHOLDER_REWARD} if stage == "ppo" else {})}
    from humor_ray.config import load_yaml

    in_spec = set(load_yaml(spec_path)) if spec_path else set()
    for name, value in filled.items():
        if name not in given and name not in in_spec:
            argv += [f"--{name}", value]
    # The plan reads no input: the paths a spec names exist where the job runs, not necessarily here.
    return parse_config(module.Config, argv, f"humor-ray plan ({stage})", check_inputs=False)


# ---------------------------------------------------------------- output

def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.1f}"


def _mark(value: int | None, used: bool) -> str:
    return "-" if value is None else _gib(value) + ("*" if used else "")


def render(plan: Plan, gpu_gib: float, gpus_per_node: int, shape) -> str:
    lines = [f"{plan.spec or plan.stage} ({plan.stage}): {plan.gpus_needed} GPU(s) of {gpu_gib:g} GiB"
             + (f", shape {shape[0]} node(s) x {shape[1]} GPUs" if shape else f", {gpus_per_node} per node")]
    lines += [f"  {text}" for text in plan.assumptions]
    header = ("role", "GPU", "x", "weights", "grads", "optim", "act ckpt", "act full", "KV cache", "other", "total")
    rows = [header]
    for role in plan.roles:
        rows.append((role.name, role.gpu or "cpu", str(role.count), _gib(role.weights), _gib(role.gradients),
                     _gib(role.optimizer),
                     _mark(role.activations_checkpointed, role.checkpointing) if role.checkpointing is not None
                     else _gib(role.activations),
                     _mark(role.activations_full, role.checkpointing is False), _gib(role.kv_cache), _gib(role.other),
                     _gib(role.total)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  " + "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                                      for i, (cell, w) in enumerate(zip(row, widths))))
    lines.append("  (GiB per instance; * the activations the run keeps: with or without gradient checkpointing)")
    for role in plan.roles:
        if role.note:
            lines.append(f"  {role.name}: {role.note}")
    for gpu, total in plan.gpu_totals().items():
        holds = " + ".join(r.name for r in plan.roles if r.gpu == gpu)
        verdict = "fits" if total <= plan.gpu_bytes else "DOES NOT FIT"
        lines.append(f"  {gpu} GPU ({holds}): {total / GIB:.1f} of {plan.gpu_bytes / GIB:g} GiB: {verdict}")
    for problem in plan.problems:
        lines.append(f"  problem: {problem.advice()}")
    return "\n".join(lines)


def as_json(plan: Plan, gpu_gib: float, gpus_per_node: int, shape) -> dict:
    def gib(value):
        return None if value is None else round(value / GIB, 3)

    roles = [{"role": r.name, "gpu": r.gpu or None, "count": r.count, "model": r.model,
              **{k: gib(getattr(r, k)) for k in ("weights", "gradients", "optimizer", "activations",
                                                  "activations_checkpointed", "activations_full", "kv_cache",
                                                  "other", "reserved")},
              "gradient_checkpointing": r.checkpointing, "total": gib(r.total), "note": r.note} for r in plan.roles]
    return {"spec": plan.spec, "stage": plan.stage, "gpu_memory_gib": gpu_gib, "gpus_per_node": gpus_per_node,
            "shape": {"nodes": shape[0], "gpus_per_node": shape[1]} if shape else None,
            "gpus_needed": plan.gpus_needed, "assumptions": plan.assumptions, "unit": "GiB", "roles": roles,
            "gpus": [{"gpu": gpu, "roles": [r.name for r in plan.roles if r.gpu == gpu], "total": gib(total),
                      "fits": total <= plan.gpu_bytes} for gpu, total in plan.gpu_totals().items()],
            "problems": [dataclasses.asdict(p) for p in plan.problems], "fits": plan.fits}


# ---------------------------------------------------------------- the command and the stages' check

def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="humor-ray plan", description="The GPU memory of every role of a job spec, before it runs.",
        allow_abbrev=False,
        epilog="Any other flag is the stage's own and overrides the spec (e.g. --deepspeed zero3, "
               "--per_device_train_batch_size 2, --reward_model RM_DIR). Exit code 1 when a role does not fit.")
    parser.add_argument("--config", required=True, help="the job spec (jobs/*.yaml, or its name) (required)")
    parser.add_argument("--stage", choices=tuple(STAGES), help="the stage (default: from the file name)")
    parser.add_argument("--gpu_memory_gb", "--gpu-memory-gb", type=float,
                        help=f"memory of each GPU in GiB (default: the spec's, else {DEFAULT_GPU_GIB:g})")
    parser.add_argument("--gpus_per_node", "--gpus-per-node", type=int,
                        help=f"GPUs per node (default: the spec's `# shape:` comment, else {DEFAULT_GPUS_PER_NODE})")
    parser.add_argument("--prompt_tokens", "--prompt-tokens", type=int, default=512,
                        help="ppo: prompt tokens per sequence (the long prompt is about 400 Mistral tokens) "
                             "(default: 512)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (default: a table)")
    args, rest = parser.parse_known_args(argv)
    stage = args.stage or stage_of(args.config)
    if stage is None:
        raise ConfigError(f"--config {args.config}: cannot tell its stage from the name: pass --stage "
                          f"({', '.join(STAGES)})")
    overrides = rest + ([f"--gpu_memory_gb={args.gpu_memory_gb}"] if args.gpu_memory_gb else [])
    cfg = load_stage_config(stage, args.config, overrides)
    shape = spec_shape(args.config)
    gpus_per_node = args.gpus_per_node or (shape[1] if shape else DEFAULT_GPUS_PER_NODE)
    if args.gpus_per_node and shape:
        shape = (shape[0], args.gpus_per_node)
    gpu_gib = getattr(cfg, "gpu_memory_gb", None) or DEFAULT_GPU_GIB
    plan = plan_stage(stage, cfg, gpu_gib, args.prompt_tokens, spec=args.config, shape=shape)
    if args.json:
        print(json.dumps(as_json(plan, gpu_gib, gpus_per_node, shape), indent=1))
    else:
        print(render(plan, gpu_gib, gpus_per_node, shape))
    if plan.problems:
        first = plan.problems[0]
        print(f"humor-ray plan: error: {first.advice()}", file=sys.stderr)
        return 1
    return 0


def local_gpu_gib() -> float | None:
    """This machine's GPU memory in GiB, when it has one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GIB


def check_before_start(stage: str, cfg) -> Plan | None:
    """A GPU run's memory plan, at its start: a role that does not fit stops the run in one line, before Ray
    starts. Without a config for the model (an uncached hub id offline) the check is skipped with a warning."""
    if not cfg.use_gpu:
        return None
    gpu_gib = getattr(cfg, "gpu_memory_gb", None) or local_gpu_gib() or DEFAULT_GPU_GIB
    try:
        plan = plan_stage(stage, cfg, gpu_gib)
    except ModelConfigMissing as err:
        log.warning(f"memory plan skipped: {err}")
        return None
    for gpu, total in plan.gpu_totals().items():
        log.info(f"memory plan: the {gpu} GPU needs {total / GIB:.1f} of {gpu_gib:g} GiB")
    if plan.problems:
        first = plan.problems[0]
        raise ConfigError(f"memory plan: {first.advice()} (`humor-ray plan --stage {stage} --config SPEC` shows "
                          "every role; --gpu_memory_gb sets the GPU size)")
    return plan
