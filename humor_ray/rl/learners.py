"""How a PPO trainer worker updates, reads out and checkpoints its models.

- `TorchLearner`: one AdamW over policy and value model; across workers, DDP (Ray Train's
  `prepare_model`). Checkpoints are written by rank 0 alone.
- `DeepSpeedLearner` (`--deepspeed zero2|zero3|zero3_offload|FILE.json`): a DeepSpeed engine each for
  policy and value model. ZeRO-2 shards their optimizer state and gradients across the workers; ZeRO-3
  also their weights (and the frozen reference's); offload keeps those shards in CPU memory. Every rank
  writes its own shard of a checkpoint; Ray Train merges the ranks' files into one checkpoint folder.

Both expose the same models for the forward passes (`policy`, `reference`, `value`), `update()` for one
mini-batch, `whole_weights()` around any read of full weights (weight sync, the final save), and
`save()`/`load()` for checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

# The "auto" values of a user's DeepSpeed JSON that the learner fills: it sets these keys itself.
FILLED_BY_LEARNER = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                     "gradient_clipping", "optimizer.")


def unwrap(model):
    """The Hugging Face / PEFT model inside a DDP wrapper or a DeepSpeed engine."""
    return getattr(model, "module", model)


def _trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


class TorchLearner:
    def __init__(self, cfg, policy, reference, value, device, world: int):
        import ray.train.torch
        import torch

        self.cfg = cfg
        policy.to(device)
        if reference is not None:
            reference.to(device)
        groups = [{"params": _trainable(policy), "lr": cfg.learning_rate}]
        if value is not None:
            value.to(device)
            groups.append({"params": _trainable(value), "lr": cfg.value_learning_rate or cfg.learning_rate})
        self.params = [p for group in groups for p in group["params"]]
        self.optimizer = torch.optim.AdamW(groups, eps=1e-6)
        if world > 1:
            policy = ray.train.torch.prepare_model(policy, move_to_device=False)
            if value is not None:
                value = ray.train.torch.prepare_model(value, move_to_device=False)
        self.policy, self.reference, self.value = policy, reference, value

    def update(self, policy_loss, value_loss) -> None:
        import torch

        loss = policy_loss if value_loss is None else policy_loss + self.cfg.vf_coef * value_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()

    @contextlib.contextmanager
    def whole_weights(self):
        yield  # every worker holds every weight

    def save(self, directory: str, rank: int) -> bool:
        """Rank 0 writes policy (HF format), value head and optimizer; returns whether this rank wrote."""
        import torch

        if rank != 0:
            return False
        unwrap(self.policy).save_pretrained(os.path.join(directory, "policy"))
        if self.value is not None:
            torch.save(unwrap(self.value).state_dict(), os.path.join(directory, "value.pt"))
        torch.save(self.optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))
        return True

    def load(self, directory: str) -> None:
        import torch

        self.optimizer.load_state_dict(torch.load(os.path.join(directory, "optimizer.pt"), weights_only=True))


def _chosen_settings(cfg) -> dict:
    """What --deepspeed names: the user's JSON file (checked), or the preset's ZeRO section."""
    from humor_ray.train.deepspeed_presets import check_user_json, zero_optimization

    if cfg.deepspeed.endswith(".json"):
        return check_user_json(cfg.deepspeed, cfg.use_gpu, FILLED_BY_LEARNER)
    return {"zero_optimization": zero_optimization(cfg.deepspeed, cfg.use_gpu)}


@dataclasses.dataclass(frozen=True)
class Precision:
    """The dtype a trainer worker loads policy, reference and value model in (one for all, so that policy
    and reference agree to the bit at step 0), and the dtype its forward passes autocast to (None: none)."""
    weights: Any  # torch.dtype
    autocast: Any  # torch.dtype | None


def precision(cfg) -> Precision:
    """fp32 on the CPU. On a GPU the engines sample in bf16, and the trainer computes in the same half
    precision (bf16, or fp16 where a user's DeepSpeed JSON enables it): the weights load in it under
    DeepSpeed (which keeps fp32 master weights in its optimizer) and under LoRA (the frozen base; PEFT keeps
    the adapter in fp32); a full fine-tune with DDP keeps fp32 weights for AdamW and autocasts."""
    import torch

    from humor_ray.train.deepspeed_presets import half_precision

    if cfg.deepspeed != "none":
        half = half_precision(_chosen_settings(cfg), cfg.use_gpu)
    else:
        half = "bf16" if cfg.use_gpu else None
    if half is None:
        return Precision(torch.float32, None)
    dtype = torch.float16 if half == "fp16" else torch.bfloat16
    return Precision(dtype if cfg.deepspeed != "none" or cfg.lora_r > 0 else torch.float32, dtype)


def _hidden_size(cfg) -> int:
    from transformers import AutoConfig

    from humor_ray.models import registry

    config = AutoConfig.from_pretrained(registry.resolve(cfg.model_name))
    config = getattr(config, "text_config", None) or config
    return config.hidden_size


def zero_stage(cfg) -> int:
    return int(_chosen_settings(cfg).get("zero_optimization", {}).get("stage", 0))


def deepspeed_settings(cfg, world: int, learning_rate: float) -> dict:
    """A complete DeepSpeed config for one of the trainer's models: no HF Trainer fills its "auto" values,
    so the learner does (the keys below, the half precision, the model-width ones)."""
    from humor_ray.train.deepspeed_presets import fill_auto, half_precision

    settings = _chosen_settings(cfg)
    half = half_precision(settings, cfg.use_gpu)
    offload = bool(settings.get("zero_optimization", {}).get("offload_optimizer"))
    settings.update({
        "train_micro_batch_size_per_gpu": cfg.mini_batch_size, "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.mini_batch_size * world, "gradient_clipping": cfg.max_grad_norm,
        # torch's AdamW on CPU: DeepSpeed's fused Adam needs CUDA, its CPU Adam is for offload.
        "optimizer": {"type": "AdamW", "params": {"lr": learning_rate, "eps": 1e-6, "weight_decay": 0.01,
                                                  "torch_adam": not cfg.use_gpu and not offload}},
        "steps_per_print": 10 ** 9, "wall_clock_breakdown": False,
    })
    # One half precision at most: DeepSpeed refuses fp16 and bf16 together.
    for name in ("bf16", "fp16"):
        if name in settings or half == name:
            settings[name] = {**settings.get(name, {}), "enabled": half == name}
    return fill_auto(settings, lambda: _hidden_size(cfg))


@contextlib.contextmanager
def deepspeed_loading(cfg):
    """While open, under --deepspeed: DeepSpeed's process group is up (gloo on CPU) and, under ZeRO-3,
    `from_pretrained` loads each weight straight into its shard (transformers reads that from a live
    HfDeepSpeedConfig). Models built and trained inside; whole models loaded after it closes."""
    settings = start_deepspeed(cfg) if cfg.deepspeed != "none" else None
    try:
        yield settings
    finally:
        del settings


def start_deepspeed(cfg):
    """DeepSpeed's process group and, under ZeRO-3, the config that must stay alive while models load."""
    from transformers.integrations import HfDeepSpeedConfig

    from humor_ray.train.deepspeed_presets import start_process_group

    start_process_group(cfg.use_gpu)
    if zero_stage(cfg) < 3:
        return None
    import torch.distributed as dist

    return HfDeepSpeedConfig(deepspeed_settings(cfg, dist.get_world_size(), cfg.learning_rate))


class DeepSpeedLearner:
    TAGS = ("policy_ds", "value_ds")

    def __init__(self, cfg, policy, reference, value, device, world: int):
        import deepspeed

        self.cfg, self.stage = cfg, zero_stage(cfg)
        self.policy, *_ = deepspeed.initialize(model=policy, model_parameters=_trainable(policy),
                                               config=deepspeed_settings(cfg, world, cfg.learning_rate))
        self.value = None
        if value is not None:
            value_lr = cfg.value_learning_rate or cfg.learning_rate
            self.value, *_ = deepspeed.initialize(model=value, model_parameters=_trainable(value),
                                                  config=deepspeed_settings(cfg, world, value_lr))
        if reference is not None and self.stage == 3:
            # Sharded like the policy, with no optimizer: ZeRO-3 inference.
            settings = deepspeed_settings(cfg, world, cfg.learning_rate)
            settings.pop("optimizer")
            reference, *_ = deepspeed.initialize(model=reference, config=settings)
        elif reference is not None:
            reference.to(device)
        self.reference = reference

    def update(self, policy_loss, value_loss) -> None:
        # Policy and value model share no weights: each engine reduces and steps its own gradients.
        self.policy.backward(policy_loss)
        self.policy.step()
        if value_loss is not None:
            self.value.backward(self.cfg.vf_coef * value_loss)
            self.value.step()

    @contextlib.contextmanager
    def whole_weights(self):
        """Under ZeRO-3 every worker gathers the policy's full weights for the duration (all workers
        must enter together); under ZeRO-2 every worker holds them anyway."""
        if self.stage < 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.policy.module.parameters()), modifier_rank=None):
            yield

    def save(self, directory: str, rank: int) -> bool:
        """Every rank writes its shard (DeepSpeed names the files by rank, so the ranks' folders merge)."""
        for engine, tag in zip((self.policy, self.value), self.TAGS):
            if engine is not None:
                engine.save_checkpoint(os.path.join(directory, tag), tag="step")
        return True

    def load(self, directory: str) -> None:
        for engine, tag in zip((self.policy, self.value), self.TAGS):
            if engine is not None:
                path, _ = engine.load_checkpoint(os.path.join(directory, tag), tag="step")
                if path is None:
                    raise RuntimeError(f"{directory}/{tag}: no DeepSpeed checkpoint to resume from")


def make_learner(cfg, policy, reference, value, device, world: int):
    learner = TorchLearner if cfg.deepspeed == "none" else DeepSpeedLearner
    return learner(cfg, policy, reference, value, device, world)
