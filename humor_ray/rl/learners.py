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
import json
import os


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
    """What --deepspeed names: the user's JSON file, or the preset's ZeRO section."""
    from humor_ray.train.deepspeed_presets import zero_optimization

    if cfg.deepspeed.endswith(".json"):
        with open(cfg.deepspeed) as handle:
            return json.load(handle)
    return {"zero_optimization": zero_optimization(cfg.deepspeed, cfg.use_gpu)}


def zero_stage(cfg) -> int:
    return int(_chosen_settings(cfg).get("zero_optimization", {}).get("stage", 0))


def deepspeed_settings(cfg, world: int, learning_rate: float) -> dict:
    """A complete DeepSpeed config for one of the trainer's models (no "auto": no HF Trainer fills it)."""
    settings = _chosen_settings(cfg)
    offload = bool(settings.get("zero_optimization", {}).get("offload_optimizer"))
    settings.update({
        "train_micro_batch_size_per_gpu": cfg.mini_batch_size, "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.mini_batch_size * world, "gradient_clipping": cfg.max_grad_norm,
        # torch's AdamW on CPU: DeepSpeed's fused Adam needs CUDA, its CPU Adam is for offload.
        "optimizer": {"type": "AdamW", "params": {"lr": learning_rate, "eps": 1e-6, "weight_decay": 0.01,
                                                  "torch_adam": not cfg.use_gpu and not offload}},
        "steps_per_print": 10 ** 9, "wall_clock_breakdown": False,
    })
    settings.setdefault("bf16", {"enabled": cfg.use_gpu})
    return settings


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
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")
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
