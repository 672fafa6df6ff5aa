"""`humor-ray ppo`: policy optimisation against the reward model, as a Ray program with separate roles.

- Rollout engines (`engines.py`): vLLM or HF-generate actors sample captions with the paper's decoding.
- The reward actor (`reward.py`) scores prompt-with-context + caption.
- The trainer: Ray Train workers (data-parallel: DDP, or DeepSpeed ZeRO, see `learners.py`) that hold
  the policy, the reference (a frozen copy, or the policy with its LoRA adapter disabled) and the value
  model. A worker (`PPOWorker`) runs each step as named phases: `rollout` (its prompts sampled by the
  engines), `score` (by the reward actor), `make_experience` (log-probs, reference log-probs, values and
  advantages, in one `Experience`), `update` (the clipped PPO update), `sync_weights` (the new weights to
  every engine, with a version number) and `checkpoint`.
- `--estimator grpo|rloo` replaces the value model by group-normalised advantages over
  `--samples_per_prompt` samples of each prompt (the estimators are looked up by name in `algorithms.py`).

Per step it reports reward, KL and its adaptive coefficient, losses, the trainer-engine log-prob gap
(a staleness alarm: it should be ~0 since the engines get every update), and the time of each phase,
to TensorBoard, the Ray dashboard (`humor_ray_ppo_*` metrics) and the driver's progress bar. It
checkpoints every `--save_steps`; a rerun of the same command resumes from the latest one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from humor_ray import metrics as stage_metrics
from humor_ray.config import (ConfigError, DeepSpeedOptions, LoggingOptions, LoraOptions, RunOptions, ScaleOptions,
                              UserError, field)
from humor_ray.log import get_logger, setup_logging
from humor_ray.placement import EngineGpuOptions, ppo_plan
from humor_ray.rl.algorithms import ESTIMATORS
from humor_ray.engines import ENGINES, DecodingOptions
from humor_ray.rl.learners import deepspeed_loading, unwrap
from humor_ray.train.launcher import WorkerArgs, WorkerContext, lora_config, run_trainer, start_worker

if TYPE_CHECKING:
    import torch

    from humor_ray.engines import Sample

PLACEMENTS = ("separate", "colocate")
# The phases a step's time is reported for, with their names in metrics.json's history (kept from the start).
HISTORY_TIMES = {"rollout": "generate", "score": "score", "make_experience": "reference", "update": "train",
                 "sync_weights": "sync"}


# The groups in reverse: a dataclass lists the last base's fields first.
@dataclasses.dataclass
class Config(LoggingOptions, DeepSpeedOptions, LoraOptions, ScaleOptions, RunOptions, EngineGpuOptions,
             DecodingOptions):
    """PPO (or GRPO/RLOO) of a caption policy against a reward model."""
    reward_model: str = field(None, "a `humor-ray rm` output directory, a reward model directory, or "
                                    "builtin:vowel_share")
    simple_prompt: bool = field(False, "use the simple prompt instead of the long instruction prompt")
    estimator: str = field("gae", "gae (PPO with a value model); grpo or rloo: critic-free, group baselines",
                           choices=tuple(ESTIMATORS))
    rollout_batch_size: int = field(8, "prompts per step per worker")
    samples_per_prompt: int = field(4, "captions sampled per prompt (the group size for grpo/rloo)")
    mini_batch_size: int = field(16, "sequences per optimizer step")
    ppo_epochs: int = field(1, "passes over each rollout batch")
    forward_batch_size: int = field(16, "sequences per forward pass when scoring log-probs and values")
    value_learning_rate: float | None = field(None, "value model learning rate (default: --learning_rate)")
    cliprange: float = field(0.2, "policy ratio clip")
    cliprange_value: float = field(0.2, "value clip")
    vf_coef: float = field(0.1, "weight of the value loss")
    gamma: float = field(1.0, "discount")
    lam: float = field(0.95, "GAE lambda")
    init_kl_coef: float = field(0.05, "initial KL penalty coefficient")
    target_kl: float | None = field(6.0, "KL (nats per caption) the adaptive controller steers to; null keeps "
                                         "the coefficient fixed")
    kl_horizon: int = field(10000, "samples over which the KL controller makes a full correction")
    normalize_rewards: bool = field(True, "scale scores by their running mean and standard deviation")
    max_grad_norm: float = field(1.0, "gradient clipping")
    reward_max_length: int = field(512, "tokens of prompt + caption the reward model reads")
    engine: str = field("vllm", "rollout engine", choices=ENGINES)
    num_engines: int = field(1, "rollout engine actors")
    engine_max_model_len: int | None = field(None, "prompt + caption tokens an engine holds per sequence "
                                                   "(default: the model's limit)")
    placement: str = field("separate", "GPU placement: separate (each engine, the reward model and each trainer "
                                       "worker its own GPU) or colocate (one GPU per trainer worker, shared with "
                                       "the engines and the reward model)", choices=PLACEMENTS)
    colocate_fractions: list[float] = field([0.4, 0.2, 0.4], "shares of a GPU of engine, reward model, trainer "
                                                             "worker when colocated (an engine's vLLM memory is its "
                                                             "share of --engine_gpu_memory)")
    staleness_alarm: float = field(0.05, "warn when the mean trainer-engine log-prob gap exceeds this")

    def __post_init__(self):
        if not self.output_dir or not self.dataset_dir or not self.reward_model:
            raise ConfigError("ppo needs --output_dir, --dataset_dir and --reward_model")
        super().__post_init__()
        if not ESTIMATORS[self.estimator].critic and self.samples_per_prompt < 2:
            raise ConfigError(f"--estimator {self.estimator} needs --samples_per_prompt of at least 2")
        batch = self.rollout_batch_size * self.samples_per_prompt
        if self.mini_batch_size < 1 or batch % self.mini_batch_size:
            raise ConfigError(f"--mini_batch_size must divide the rollout batch (rollout_batch_size x "
                              f"samples_per_prompt = {batch})")
        if self.num_engines < 1:
            raise ConfigError("--num_engines must be at least 1")
        if any(r not in ("tensorboard", "none") for r in self.report_to):
            raise ConfigError("--report_to for ppo: tensorboard or none")
        ppo_plan(self)  # the GPU shares are checked before any cluster starts


# ---------------------------------------------------------------- inside a trainer worker

@dataclasses.dataclass
class Sequences:
    """B sequences, each P prompt columns (left-padded) then T completion columns (right-padded), so every
    completion starts at the same column and its logits are the last T + 1 positions."""
    input_ids: torch.Tensor  # (B, P + T)
    attention_mask: torch.Tensor  # (B, P + T)
    position_ids: torch.Tensor  # (B, P + T)
    mask: torch.Tensor  # (B, T): 1.0 on completion tokens

    @property
    def width(self) -> int:
        return self.mask.shape[1]


@dataclasses.dataclass
class Experience:
    """One step's rollouts with everything the update reads. B = rollout_batch_size x samples_per_prompt
    (a prompt's samples consecutive), T = completion tokens."""
    samples: list[Sample]  # B, as the engines drew them
    captions: list[str]  # B, the first line of each completion
    scores: torch.Tensor  # (B,) the reward model's
    reward_retries: int  # reward calls retried after the reward actor crashed
    sequences: Sequences
    old_logprobs: torch.Tensor  # (B, T) the policy's before the update, at the sampling temperature
    raw_logprobs: torch.Tensor  # (B, T) the same at temperature 1, the engines' scale
    engine_logprobs: torch.Tensor  # (B, T) the engines'
    entropy: torch.Tensor  # (B, T) of the policy at the sampling temperature
    values: torch.Tensor  # (B, T) the value model's before the update (zeros without one)
    kl: torch.Tensor  # (B, T) policy - reference log-probs on completion tokens
    advantages: torch.Tensor  # (B, T)
    returns: torch.Tensor | None  # (B, T) the value model's targets; None without one
    totals: list[float]  # over all workers: score sum, score square sum, sequences, KL sum

    def logprob_gap(self, rows=slice(None)) -> float:
        """Mean |trainer - engine| log-prob of the completion tokens of `rows`."""
        from humor_ray.rl.algorithms import masked_mean

        gap = (self.raw_logprobs[rows] - self.engine_logprobs[rows]).abs()
        return masked_mean(gap, self.sequences.mask[rows]).item()


def _lora(cfg: Config, model, task_type: str):
    from peft import get_peft_model

    settings = lora_config(cfg, task_type)
    return model if settings is None else get_peft_model(model, settings)


def _build_models(cfg: Config, policy_dir: str, restored: str | None, critic: bool):
    """(policy, reference or None, value model or None). The reference is None under LoRA: the policy
    with its adapter disabled is the reference."""
    import torch
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM

    from humor_ray.rl import algorithms as alg

    if restored and cfg.lora_r > 0:
        from peft import PeftModel

        policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32),
                                           os.path.join(restored, "policy"), is_trainable=True)
    elif restored:
        policy = AutoModelForCausalLM.from_pretrained(os.path.join(restored, "policy"), dtype=torch.float32)
    else:
        policy = _lora(cfg, AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32), "CAUSAL_LM")
    reference = None
    if cfg.lora_r <= 0:
        reference = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
        reference = reference.eval().requires_grad_(False)
    value = None
    if critic:
        # The backbone alone: the checkpoint's language-model head is expected to go unused.
        transformers.logging.set_verbosity_error()
        backbone = AutoModel.from_pretrained(policy_dir, dtype=torch.float32)
        transformers.logging.set_verbosity_warning()
        value = alg.ValueModel(_lora(cfg, backbone, "FEATURE_EXTRACTION"))
        if restored:
            value.load_state_dict(torch.load(os.path.join(restored, "value.pt"), weights_only=True))
    return policy, reference, value


def _sequences(samples: list[Sample], pad_id: int, device) -> Sequences:
    import torch

    prompt_width = max(len(s.prompt_ids) for s in samples)
    width = max(len(s.completion_ids) for s in samples)
    ids, attention, mask = [], [], []
    for s in samples:
        left, right = prompt_width - len(s.prompt_ids), width - len(s.completion_ids)
        ids.append([pad_id] * left + s.prompt_ids + s.completion_ids + [pad_id] * right)
        attention.append([0] * left + [1] * (len(s.prompt_ids) + len(s.completion_ids)) + [0] * right)
        mask.append([1.0] * len(s.completion_ids) + [0.0] * right)
    ids, attention = torch.tensor(ids, device=device), torch.tensor(attention, device=device)
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    return Sequences(ids, attention, positions, torch.tensor(mask, device=device))


def _logprobs(model, seqs: Sequences, rows, temperature: float, raw: bool = False):
    """Log-probs of the completion tokens (at the sampling temperature; with `raw`, also at 1) and the
    mean entropy."""
    width = seqs.width
    logits = model(input_ids=seqs.input_ids[rows], attention_mask=seqs.attention_mask[rows],
                   position_ids=seqs.position_ids[rows], logits_to_keep=width + 1).logits[:, :-1].float()
    targets = seqs.input_ids[rows][:, -width:, None]
    scaled = (logits / temperature).log_softmax(-1)
    logprobs = scaled.gather(-1, targets).squeeze(-1)
    if not raw:
        return logprobs
    entropy = -(scaled.exp() * scaled).sum(-1)
    return logprobs, logits.log_softmax(-1).gather(-1, targets).squeeze(-1), entropy


def _values(value_model, seqs: Sequences, rows):
    values = value_model(seqs.input_ids[rows], seqs.attention_mask[rows], seqs.position_ids[rows])
    # The value of the state before each completion token.
    return values[:, -seqs.width - 1:-1].float()


def policy_weights(policy) -> dict:
    """The policy's full weights under their Hugging Face names, LoRA merged in, on the CPU: what a
    rollout engine loads."""
    model = unwrap(policy)
    if not hasattr(model, "merge_adapter"):
        return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    model.merge_adapter()
    try:
        state = {}
        for name, tensor in model.state_dict().items():
            if "lora_" in name:
                continue
            name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            state[name] = tensor.detach().cpu().clone()
    finally:
        model.unmerge_adapter()
    return state


def _all_sum(values: list[float], device) -> list[float]:
    """Sums over all trainer workers."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _broadcast(obj, rank: int):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _read_prompts(cfg: Config) -> tuple[list[str], list[str]]:
    """(what the policy reads, what the reward model reads) per training contest. The reward model
    always reads the simple prompt (the cartoon's context lines), as it was trained on the pairs."""
    import pyarrow.dataset as pds

    column = "prompt" if cfg.simple_prompt else "prompt_long"
    table = pds.dataset(os.path.join(cfg.dataset_dir, "prompts", "train"), format="parquet").to_table(
        columns=list(dict.fromkeys([column, "prompt"])))
    rows = [(p, r) for p, r in zip(table[column].to_pylist(), table["prompt"].to_pylist()) if p]
    return [p for p, _ in rows], [r for _, r in rows]


class PPOWorker:
    """One trainer worker. `train` runs the steps; a step is the phases `rollout`, `score`,
    `make_experience`, `update`, `sync_weights` and `checkpoint`, each a method."""

    def __init__(self, args: WorkerArgs, worker: WorkerContext):
        import transformers
        from transformers import AutoTokenizer

        from humor_ray.models import registry
        from humor_ray.rl import algorithms as alg
        from humor_ray.engines import EnginePool
        from humor_ray.rl.learners import make_learner

        cfg = self.cfg = args.config
        self.worker, self.log, self.board, self.reward_actor = worker, worker.log, args.board, args.reward
        self.estimator = ESTIMATORS[cfg.estimator]
        restored, state = self._restore()
        policy_dir = registry.resolve(cfg.model_name)
        self.tokenizer = AutoTokenizer.from_pretrained(policy_dir)
        pad_id = self.tokenizer.pad_token_id
        self.pad_id = pad_id if pad_id is not None else self.tokenizer.eos_token_id
        transformers.set_seed(cfg.seed)  # new weights (value head, LoRA) start the same on every run
        # A DeepSpeed checkpoint holds the weights in shards, restored by `learner.load`: build from the base.
        weights_from = restored if cfg.deepspeed == "none" else None
        models = _build_models(cfg, policy_dir, weights_from, self.estimator.critic)
        self.learner = make_learner(cfg, *models, worker.device, worker.world)
        if restored:
            self.learner.load(restored)
        self.kl_control = alg.AdaptiveKL(state["kl_coef"], cfg.target_kl, cfg.kl_horizon)
        self.moments = alg.RunningMoments(*state["moments"])
        self.prompts, self.reward_prompts = _read_prompts(cfg)
        if not self.prompts:
            raise UserError(f"{cfg.dataset_dir}/prompts/train has no prompts: run `humor-ray data build` with prompts")
        self.pool = EnginePool(args.engines)
        self.writer = None
        if worker.rank == 0 and "tensorboard" in cfg.report_to:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(cfg.output_dir, "tensorboard", cfg.run_name))
        self.decoding = cfg.decoding()
        self.history: list[dict] = state["history"]
        self.step: int = state["step"]
        self.figures = stage_metrics.StageMetrics(cfg.run_name, "ppo")

    def _restore(self) -> tuple[str | None, dict]:
        """(a local copy of the checkpoint Ray Train resumes from, or None; the run's state at it)."""
        cfg, checkpoint = self.cfg, self.worker.checkpoint
        state = {"step": 0, "kl_coef": cfg.init_kl_coef, "moments": [0.0, 1.0, 0.0], "history": []}
        if not checkpoint:
            return None, state
        with checkpoint.as_directory() as directory:
            restored = shutil.copytree(directory, os.path.join(self.worker.scratch, "restored"))
        state = json.loads(Path(restored, "state.json").read_text())
        self.log.info(f"resuming from {checkpoint.path} at step {state['step']}")
        return restored, state

    def train(self) -> None:
        cfg = self.cfg
        if self.step > 0:  # the engines hold the base weights: bring them to the restored policy
            self.sync_weights(self.step)
        self.log.info(f"ready: {len(self.prompts)} prompts, {cfg.estimator}, step {self.step} of {cfg.max_steps}")
        while self.step < cfg.max_steps:
            times: dict[str, float] = {}
            samples, chosen = self._timed(times, self.rollout)
            captions, scores, retries = self._timed(times, self.score, samples, chosen)
            experience = self._timed(times, self.make_experience, samples, captions, scores, retries)
            stats = self._timed(times, self.update, experience)
            self.step += 1
            self._timed(times, self.sync_weights, self.step)
            metrics = self._record(experience, stats, times)
            self._timed(times, self.checkpoint, metrics)
            self._export(experience, metrics, times)

    @staticmethod
    def _timed(times: dict, phase, *args):
        begin = time.perf_counter()
        result = phase(*args)
        times[phase.__name__] = time.perf_counter() - begin
        return result

    def rollout(self) -> tuple[list[Sample], list[int]]:
        """This step's prompts (drawn by seed, step and rank), sampled by the engines; and which they were."""
        import numpy as np

        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, self.step, self.worker.rank])
        count = len(self.prompts)
        chosen = rng.choice(count, cfg.rollout_batch_size, replace=count < cfg.rollout_batch_size)
        return self.pool.generate([self.prompts[i] for i in chosen], cfg.samples_per_prompt, self.decoding), chosen

    def score(self, samples: list[Sample], chosen) -> tuple[list[str], torch.Tensor, int]:
        """(the captions, the reward model's scores (B,), reward calls retried)."""
        import torch

        from humor_ray.engines import first_line
        from humor_ray.rl.reward import score_with_retries

        captions = [first_line(s.text) for s in samples]
        scores, retries = score_with_retries(
            self.reward_actor, [self.reward_prompts[chosen[s.prompt_index]] for s in samples], captions)
        return captions, torch.tensor(scores, dtype=torch.float32, device=self.worker.device), retries

    def make_experience(self, samples: list[Sample], captions: list[str], scores, retries: int) -> Experience:
        """Log-probs, reference log-probs and values of the samples, then the advantages."""
        import torch

        cfg, device = self.cfg, self.worker.device
        seqs = _sequences(samples, self.pad_id, device)
        mask = seqs.mask
        old_logprobs, raw_logprobs, entropy = (torch.zeros_like(mask) for _ in range(3))
        ref_logprobs, values = torch.zeros_like(mask), torch.zeros_like(mask)
        with torch.no_grad():
            for start in range(0, len(samples), cfg.forward_batch_size):
                rows = slice(start, start + cfg.forward_batch_size)
                old_logprobs[rows], raw_logprobs[rows], entropy[rows] = _logprobs(
                    self.learner.policy, seqs, rows, cfg.temperature, raw=True)
                ref_logprobs[rows] = self._reference_logprobs(seqs, rows)
                if self.learner.value is not None:
                    values[rows] = _values(self.learner.value, seqs, rows)
        engine_logprobs = torch.zeros_like(mask)
        for row, s in enumerate(samples):
            engine_logprobs[row, :len(s.logprobs)] = torch.tensor(s.logprobs)
        kl = (old_logprobs - ref_logprobs) * mask
        totals = _all_sum([scores.sum().item(), (scores ** 2).sum().item(), len(samples), kl.sum(1).sum().item()],
                          device)
        normalized = scores
        if self.estimator.critic and cfg.normalize_rewards:
            self.moments.update(*totals[:3])
            normalized = self.moments.normalize(scores)
        advantages, returns = self.estimator.advantages(normalized, kl, mask, values, self.kl_control.value, cfg)
        return Experience(samples, captions, scores, retries, seqs, old_logprobs, raw_logprobs, engine_logprobs,
                          entropy, values, kl, advantages, returns, totals)

    def _reference_logprobs(self, seqs: Sequences, rows):
        if self.learner.reference is not None:
            return _logprobs(self.learner.reference, seqs, rows, self.cfg.temperature)
        with unwrap(self.learner.policy).disable_adapter():  # LoRA: the policy without its adapter
            return _logprobs(self.learner.policy, seqs, rows, self.cfg.temperature)

    def update(self, exp: Experience) -> dict[str, list[float]]:
        """`--ppo_epochs` passes of clipped PPO over the experience, in shuffled mini-batches; the losses."""
        import torch

        from humor_ray.rl import algorithms as alg

        cfg, policy, value_model = self.cfg, self.learner.policy, self.learner.value
        stats = {"pg_loss": [], "vf_loss": [], "clipfrac": [], "approx_kl": []}
        order_rng = torch.Generator().manual_seed(cfg.seed + self.step)
        size, mask = len(exp.samples), exp.sequences.mask
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(size, generator=order_rng)
            for start in range(0, size, cfg.mini_batch_size):
                rows = order[start:start + cfg.mini_batch_size].to(self.worker.device)
                logprobs = _logprobs(policy, exp.sequences, rows, cfg.temperature)
                pg_loss, clipfrac, approx_kl = alg.policy_loss(logprobs, exp.old_logprobs[rows], exp.advantages[rows],
                                                               mask[rows], cfg.cliprange)
                stats["pg_loss"].append(pg_loss.item())
                v_loss = None
                if value_model is not None:
                    values = _values(value_model, exp.sequences, rows)
                    v_loss = alg.value_loss(values, exp.values[rows], exp.returns[rows], mask[rows],
                                            cfg.cliprange_value)
                    stats["vf_loss"].append(v_loss.item())
                self.learner.update(pg_loss, v_loss)
                stats["clipfrac"].append(clipfrac.item())
                stats["approx_kl"].append(approx_kl.item())
        return stats

    def sync_weights(self, version: int) -> None:
        """Every engine gets the policy's weights as `version`."""
        import ray
        import torch

        rank = self.worker.rank
        with self.learner.whole_weights():
            ref = ray.put(policy_weights(self.learner.policy)) if rank == 0 else None
        ref = _broadcast(ref, rank)
        if rank == 0:
            self.pool.sync(ref, version)
        else:
            self.pool.publish(ref, version)
        if self.worker.world > 1:
            torch.distributed.barrier()

    def _record(self, exp: Experience, stats: dict, times: dict) -> dict:
        """The step's metrics, added to the history, TensorBoard and the progress board; the KL controller
        takes the step's KL."""
        import numpy as np

        from humor_ray.rl import algorithms as alg

        cfg, step, device = self.cfg, self.step, self.worker.device
        total, total_sq, count, kl_total = exp.totals
        mean_kl, kl_coef_used = kl_total / count, self.kl_control.value
        self.kl_control.update(mean_kl, int(count))
        size, generated = len(exp.samples), float(exp.sequences.mask.sum().item())
        step_time, gap = sum(times.values()), exp.logprob_gap()
        if gap > cfg.staleness_alarm and self.worker.rank == 0:
            self.log.warning(f"step {step}: trainer and engine log-probs differ by {gap:.4f} on average "
                             f"(alarm at {cfg.staleness_alarm}): the engines may not hold the current weights")
        metrics = {
            "step": step, "reward/mean": total / count,
            "reward/std": float(exp.scores.std().item()) if size > 1 else 0.0,
            "kl": mean_kl, "kl_coef": kl_coef_used, "entropy": alg.masked_mean(exp.entropy, exp.sequences.mask).item(),
            "logprob_gap": gap, "engine_version": exp.samples[0].version, "engine_restarts": self.pool.restarts,
            "reward_retries": exp.reward_retries, "caption_tokens": generated / size,
            "empty_captions": sum(not c for c in exp.captions),
            "tokens_per_second": _all_sum([generated], device)[0] / step_time,
            **{k: float(np.mean(v)) for k, v in stats.items() if v},
            **{f"time/{HISTORY_TIMES[k]}": v for k, v in times.items()}, "time/step": step_time,
        }
        self.history.append(metrics)
        if self.writer is not None:
            for key, value in metrics.items():
                if key != "step":
                    self.writer.add_scalar(key, value, step)
            self.writer.add_text("sample", f"{exp.captions[0]!r} (reward {exp.scores[0].item():.3f})", step)
            self.writer.flush()
        if self.worker.rank == 0:
            self.board.post.remote(step, cfg.max_steps, {"reward": metrics["reward/mean"], "kl": mean_kl,
                                                         "gap": gap, "s/step": step_time})
        return metrics

    def checkpoint(self, metrics: dict) -> None:
        """Every `--save_steps` (and at the end) a checkpoint; every `--logging_steps` the metrics to Ray Train."""
        import ray.train

        cfg, step, rank = self.cfg, self.step, self.worker.rank
        save = step % cfg.save_steps == 0 or step == cfg.max_steps
        ray_checkpoint = None
        if save:
            directory = os.path.join(self.worker.scratch, f"checkpoint-{step}")
            os.makedirs(directory)
            if rank == 0:
                Path(directory, "state.json").write_text(json.dumps({
                    "step": step, "kl_coef": self.kl_control.value, "history": self.history,
                    "moments": [self.moments.mean, self.moments.var, self.moments.count]}))
            # The ranks that wrote files report them; Ray Train merges them into one checkpoint.
            if self.learner.save(directory, rank) or rank == 0:
                ray_checkpoint = ray.train.Checkpoint.from_directory(directory)
        if save or step % cfg.logging_steps == 0:
            ray.train.report(metrics, checkpoint=ray_checkpoint)
        if save:
            shutil.rmtree(directory, ignore_errors=True)  # reported = copied to the run's storage

    def _export(self, exp: Experience, metrics: dict, times: dict) -> None:
        """The step's figures for the Ray dashboard (rank 0: the others' are the same run's)."""
        if self.worker.rank != 0 or not stage_metrics.enabled():
            return
        figures = self.figures
        figures.gauge("ppo_step", self.step, "PPO steps done")
        figures.gauge("ppo_reward", metrics["reward/mean"], "mean reward of the step's captions, all workers")
        figures.gauge("ppo_kl", metrics["kl"], "KL from the reference, nats per caption")
        figures.gauge("ppo_kl_coef", metrics["kl_coef"], "the KL penalty coefficient of the step")
        for phase, seconds in times.items():
            figures.gauge("ppo_phase_seconds", seconds, "seconds of the step's phase", phase=phase)
        for engine in sorted({s.engine for s in exp.samples}):
            rows = [i for i, s in enumerate(exp.samples) if s.engine == engine]
            figures.gauge("ppo_weight_version", max(exp.samples[i].version for i in rows),
                          "the weight version the engine sampled with", engine=str(engine))
            figures.gauge("ppo_logprob_gap", exp.logprob_gap(rows), "mean trainer-engine log-prob gap of the "
                          "engine's samples", engine=str(engine))

    def finish(self) -> None:
        """The final policy, merged for serving, and metrics.json (rank 0)."""
        with self.learner.whole_weights():
            if self.worker.rank == 0:
                checkpoint = self.worker.checkpoint
                _save_final(self.cfg, self.learner.policy, self.tokenizer, self.history,
                            checkpoint.path if checkpoint else None)
                self.log.info(f"final policy in {self.cfg.output_dir}/final")
        if self.writer is not None:
            self.writer.close()


def _start_colocated(args: WorkerArgs, worker: WorkerContext) -> WorkerArgs:
    """--placement colocate: this worker starts the engines and (worker 0) the reward model that share its GPU,
    before its own models take their part of it; every worker gets all of them (`humor_ray.placement`)."""
    from humor_ray import placement
    from humor_ray.engines import start_engines
    from humor_ray.models import registry
    from humor_ray.rl.reward import resolve_reward_model, start_reward_actor

    cfg = args.config
    plan = ppo_plan(cfg)

    def start(name: str, index: int, options: dict):
        role = plan.role(name)
        if name == "engine":
            actor, = start_engines(cfg.engine, registry.resolve(cfg.model_name), 1, num_cpus=role.cpus,
                                   gpu_memory=role.memory, max_model_len=cfg.engine_max_model_len,
                                   seed=cfg.seed + index, options=options)
            return actor, actor.version.remote()
        actor = start_reward_actor(resolve_reward_model(cfg.reward_model), max_length=cfg.reward_max_length,
                                   num_cpus=role.cpus, options=options)
        return actor, actor.pid.remote()

    roles = placement.start_colocated(plan, worker.rank, start)
    return dataclasses.replace(args, engines=[roles[("engine", j)] for j in range(cfg.num_engines)],
                               reward=roles[("reward", 0)])


def _worker_loop(config: dict) -> None:
    args: WorkerArgs = config["args"]
    context = start_worker(args.config, "ppo")
    if not args.engines:  # colocated: the worker starts them
        args = _start_colocated(args, context)
    with deepspeed_loading(args.config):  # the models are built and trained in it; the final merge is not
        worker = PPOWorker(args, context)
        worker.train()
    worker.finish()


def _save_final(cfg: Config, policy, tokenizer, history: list[dict], resumed_from: str | None) -> None:
    from humor_ray.train.export import save_merged

    final = os.path.join(cfg.output_dir, "final")
    shutil.rmtree(final, ignore_errors=True)
    unwrap(policy).save_pretrained(final, safe_serialization=True)
    tokenizer.save_pretrained(final)
    serve = save_merged(cfg.model_name, "causal_lm", False, final)
    Path(cfg.output_dir, "metrics.json").write_text(json.dumps(
        {"model": serve, "history": history, "resumed_from": resumed_from}, indent=1))


# ---------------------------------------------------------------- the driver

def run(cfg: Config):
    """Start the engines and the reward actor, then the trainer workers; resumes when rerun."""
    import ray

    from humor_ray.cluster import init_ray
    from humor_ray.models import registry
    from humor_ray.engines import start_engines
    from humor_ray.placement import check_cluster
    from humor_ray.rl.reward import resolve_reward_model, start_reward_actor
    from humor_ray.train.launcher import TrainError, absolute_local_paths

    setup_logging()
    log = get_logger("ppo")
    absolute_local_paths(cfg, ("output_dir", "dataset_dir", "model_name", "reward_model"))
    cfg.run_name = cfg.run_name or "ppo"
    prompts_dir = os.path.join(cfg.dataset_dir, "prompts", "train")
    if "://" not in prompts_dir and not os.path.isdir(prompts_dir):
        raise TrainError(f"{prompts_dir} not found: run `humor-ray data build` first")
    init_ray(dashboard=True)
    plan = ppo_plan(cfg)
    check_cluster(plan)  # a cluster too small is one line, before anything loads
    reward_spec = resolve_reward_model(cfg.reward_model)
    policy_dir = registry.resolve(cfg.model_name)
    os.makedirs(cfg.output_dir, exist_ok=True)
    engines, reward_actor = [], None  # colocated: each trainer worker starts those that share its GPU
    if plan.mode != "colocate":
        engine = plan.role("engine")
        engines = start_engines(cfg.engine, policy_dir, cfg.num_engines, **plan.actor_options("engine"),
                                gpu_memory=engine.memory, max_model_len=cfg.engine_max_model_len, seed=cfg.seed)
        reward_actor = start_reward_actor(reward_spec, max_length=cfg.reward_max_length,
                                          **plan.actor_options("reward"))
    try:
        # Ready before the trainer starts, so a model that cannot load fails here with its own message.
        try:
            ray.get([e.version.remote() for e in engines] + ([reward_actor.pid.remote()] if reward_actor else []))
        except ray.exceptions.RayActorError as err:
            raise TrainError(f"a rollout engine or the reward model could not start: {err}") from err
        log.info(f"{cfg.num_workers} trainer worker(s), {cfg.num_engines} {cfg.engine} engine(s), policy "
                 f"{cfg.model_name}, reward {reward_spec}, {cfg.estimator}, {cfg.max_steps} steps -> {cfg.output_dir}")
        result = run_trainer(_worker_loop, WorkerArgs(config=cfg, engines=engines, reward=reward_actor), "ppo",
                             shown=("reward", "kl", "gap", "s/step"), resources=plan.trainer_resources())
    finally:
        for actor in [*engines, reward_actor]:
            if actor is not None:
                ray.kill(actor)
    summary = json.loads(Path(cfg.output_dir, "metrics.json").read_text())
    last = summary["history"][-1] if summary["history"] else {}
    log.info(f"done: {summary['model']}  step {last.get('step')} reward {last.get('reward/mean', float('nan')):.4f} "
             f"kl {last.get('kl', float('nan')):.3f}")
    return result
