"""`humor-ray ppo`: policy optimisation against the reward model, as a Ray program with separate roles.

- Rollout engines (`engines.py`): vLLM or HF-generate actors sample captions with the paper's decoding.
- The reward actor (`reward.py`) scores prompt-with-context + caption.
- The trainer: Ray Train workers (data-parallel: DDP, or DeepSpeed ZeRO, see `learners.py`) that hold
  the policy, the reference (a frozen copy, or the policy with its LoRA adapter disabled) and the value
  model. Each step a worker draws its prompts, has them sampled by the engines and scored by the reward
  actor, computes log-probs, reference log-probs and values, and runs the clipped PPO update; then the
  new weights go to every engine with a version number.
- `--estimator grpo|rloo` replaces the value model by group-normalised advantages over
  `--samples_per_prompt` samples of each prompt.

Per step it reports reward, KL and its adaptive coefficient, losses, the trainer-engine log-prob gap
(a staleness alarm: it should be ~0 since the engines get every update), and the time of each phase
(generate, score, reference, train, sync), to TensorBoard, the Ray dashboard and the driver's progress
bar. It checkpoints every `--save_steps`; a rerun of the same command resumes from the latest one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from humor_ray.config import UserError, field
from humor_ray.rl.algorithms import ESTIMATORS
from humor_ray.engines import ENGINES, DecodingOptions
from humor_ray.rl.learners import unwrap
from humor_ray.train.deepspeed_presets import check_deepspeed

PLACEMENTS = ("separate", "colocate")


@dataclasses.dataclass
class Config(DecodingOptions):
    """PPO (or GRPO/RLOO) of a caption policy against a reward model."""
    output_dir: str = field(None, "where checkpoints, logs and the final policy go")
    dataset_dir: str = field(None, "the output of `humor-ray data build` (its prompts/train)")
    reward_model: str = field(None, "a `humor-ray rm` output directory, a reward model directory, or builtin:vowel_share")
    model_name: str = field("tiny", "the policy to start from: an SFT output directory, a preset or a Hugging Face id")
    run_name: str = field("ppo", "name of the run in Ray and TensorBoard")
    simple_prompt: bool = field(False, "use the simple prompt instead of the long instruction prompt")
    estimator: str = field("gae", "gae (PPO with a value model), grpo or rloo (critic-free, group baselines)")
    max_steps: int = field(20, "PPO steps (rollout + update)")
    rollout_batch_size: int = field(8, "prompts per step per worker")
    samples_per_prompt: int = field(4, "captions sampled per prompt (the group size for grpo/rloo)")
    mini_batch_size: int = field(16, "sequences per optimizer step")
    ppo_epochs: int = field(1, "passes over each rollout batch")
    forward_batch_size: int = field(16, "sequences per forward pass when scoring log-probs and values")
    learning_rate: float = field(1.41e-5, "policy learning rate")
    value_learning_rate: float | None = field(None, "value model learning rate (default: --learning_rate)")
    cliprange: float = field(0.2, "policy ratio clip")
    cliprange_value: float = field(0.2, "value clip")
    vf_coef: float = field(0.1, "weight of the value loss")
    gamma: float = field(1.0, "discount")
    lam: float = field(0.95, "GAE lambda")
    init_kl_coef: float = field(0.05, "initial KL penalty coefficient")
    target_kl: float | None = field(6.0, "KL (nats per caption) the adaptive controller steers to; null keeps the coefficient fixed")
    kl_horizon: int = field(10000, "samples over which the KL controller makes a full correction")
    normalize_rewards: bool = field(True, "scale scores by their running mean and standard deviation")
    max_grad_norm: float = field(1.0, "gradient clipping")
    reward_max_length: int = field(512, "tokens of prompt + caption the reward model reads")
    engine: str = field("vllm", "rollout engine: vllm or hf")
    num_engines: int = field(1, "rollout engine actors")
    engine_max_model_len: int | None = field(None, "prompt + caption tokens an engine holds per sequence (default: the model's limit)")
    placement: str = field("separate", "GPU placement: separate (each role its own GPUs) or colocate (shares of one)")
    colocate_fractions: list[float] = field([0.4, 0.2, 0.4], "GPU shares of engine, reward model, trainer worker when colocated")
    staleness_alarm: float = field(0.05, "warn when the mean trainer-engine log-prob gap exceeds this")
    lora_r: int = field(0, "LoRA rank for policy and value model; 0 trains every weight")
    lora_alpha: int = field(16, "LoRA alpha")
    lora_targets: list[str] = field(["all-linear"], "modules LoRA adapts")
    num_workers: int = field(1, "trainer workers (data-parallel)")
    deepspeed: str = field("none", "none (DDP), zero2, zero3, zero3_offload or a DeepSpeed JSON file: shards the "
                                   "optimizer state (zero3: also the weights) of policy and value model across workers")
    use_gpu: bool = field(False, "GPUs for every role (see --placement)")
    cpus_per_worker: int = field(1, "CPUs each trainer worker reserves (and its torch threads)")
    seed: int = field(2024, "seed for prompts, sampling and new weights")
    logging_steps: int = field(5, "send metrics to Ray Train (the dashboard) every this many steps; each send "
                               "waits for the controller's next poll (about 2 s). TensorBoard gets every step")
    save_steps: int = field(10, "checkpoint every this many steps")
    save_total_limit: int = field(2, "checkpoints kept")
    max_failures: int = field(2, "trainer-worker failures recovered by restarting from the last checkpoint")
    report_to: list[str] = field(["tensorboard"], "tensorboard or none")
    storage_path: str | None = field(None, "Ray Train storage (local or s3://); default <output_dir>/ray")

    def __post_init__(self):
        if not self.output_dir or not self.dataset_dir or not self.reward_model:
            raise ValueError("ppo needs --output_dir, --dataset_dir and --reward_model")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"--estimator must be one of {ESTIMATORS}")
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {ENGINES}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"--placement must be one of {PLACEMENTS}")
        if self.estimator != "gae" and self.samples_per_prompt < 2:
            raise ValueError(f"--estimator {self.estimator} needs --samples_per_prompt of at least 2")
        batch = self.rollout_batch_size * self.samples_per_prompt
        if self.mini_batch_size < 1 or batch % self.mini_batch_size:
            raise ValueError(f"--mini_batch_size must divide the rollout batch (rollout_batch_size x "
                             f"samples_per_prompt = {batch})")
        if min(self.max_steps, self.num_workers, self.num_engines, self.save_steps, self.logging_steps) < 1:
            raise ValueError("--max_steps, --num_workers, --num_engines, --save_steps and --logging_steps must be at least 1")
        check_deepspeed(self.deepspeed)
        if any(r not in ("tensorboard", "none") for r in self.report_to):
            raise ValueError("--report_to for ppo: tensorboard or none")

    def gpu_shares(self) -> tuple[float, float, float]:
        """GPUs for (each engine, the reward actor, each trainer worker)."""
        if not self.use_gpu:
            return 0.0, 0.0, 0.0
        if self.placement == "colocate":
            engine, reward, trainer = self.colocate_fractions
            return engine, reward, trainer
        return 1.0, 1.0, 1.0


# ---------------------------------------------------------------- inside a trainer worker

def _lora(cfg: Config, model, task_type: str):
    if cfg.lora_r <= 0:
        return model
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_targets[0] if cfg.lora_targets == ["all-linear"] else cfg.lora_targets
    return get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=targets,
                                            lora_dropout=0.0, task_type=task_type))


def _build_models(cfg: Config, policy_dir: str, restored: str | None):
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
        reference = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval().requires_grad_(False)
    value = None
    if cfg.estimator == "gae":
        # The backbone alone: the checkpoint's language-model head is expected to go unused.
        transformers.logging.set_verbosity_error()
        backbone = AutoModel.from_pretrained(policy_dir, dtype=torch.float32)
        transformers.logging.set_verbosity_warning()
        value = alg.ValueModel(_lora(cfg, backbone, "FEATURE_EXTRACTION"))
        if restored:
            value.load_state_dict(torch.load(os.path.join(restored, "value.pt"), weights_only=True))
    return policy, reference, value


def _batch(samples, pad_id: int, device):
    """Left-padded prompts and right-padded completions, so every completion starts at the same column
    and the logits of the completion tokens are the last `width + 1` positions."""
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
    return {"input_ids": ids, "attention_mask": attention, "position_ids": positions,
            "mask": torch.tensor(mask, device=device), "width": width}


def _logprobs(model, batch, rows, temperature: float, raw: bool = False):
    """Log-probs of the completion tokens (at the sampling temperature; with `raw`, also at 1) and the
    mean entropy."""
    width = batch["width"]
    logits = model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows],
                   position_ids=batch["position_ids"][rows], logits_to_keep=width + 1).logits[:, :-1].float()
    targets = batch["input_ids"][rows][:, -width:, None]
    scaled = (logits / temperature).log_softmax(-1)
    logprobs = scaled.gather(-1, targets).squeeze(-1)
    if not raw:
        return logprobs
    entropy = -(scaled.exp() * scaled).sum(-1)
    return logprobs, logits.log_softmax(-1).gather(-1, targets).squeeze(-1), entropy


def _values(value_model, batch, rows):
    width = batch["width"]
    values = value_model(batch["input_ids"][rows], batch["attention_mask"][rows], batch["position_ids"][rows])
    # The value of the state before each completion token.
    return values[:, -width - 1:-1].float()


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


def _worker_loop(config: dict) -> None:
    import numpy as np
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import transformers
    from transformers import AutoTokenizer

    from humor_ray.models import registry
    from humor_ray.rl import algorithms as alg
    from humor_ray.engines import EnginePool, first_line
    from humor_ray.rl.learners import make_learner, start_deepspeed
    from humor_ray.rl.reward import score_with_retries
    from humor_ray.train.launcher import quiet_train_reports

    engines, reward_actor, board = config.pop("_engines"), config.pop("_reward"), config.pop("_board")
    cfg = Config(**config)
    quiet_train_reports()
    torch.set_num_threads(cfg.cpus_per_worker)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    started = time.perf_counter()

    def note(message: str) -> None:
        print(f"[ppo worker {rank}] {message} ({time.perf_counter() - started:.1f} s)", flush=True)

    checkpoint = ray.train.get_checkpoint()
    scratch = tempfile.mkdtemp(prefix="humor_ray_ppo_")
    restored, state = None, {"step": 0, "kl_coef": cfg.init_kl_coef, "moments": [0.0, 1.0, 0.0], "history": []}
    if checkpoint:
        with checkpoint.as_directory() as directory:
            restored = shutil.copytree(directory, os.path.join(scratch, "restored"))
        state = json.loads(Path(restored, "state.json").read_text())
        note(f"resuming from {checkpoint.path} at step {state['step']}")
    policy_dir = registry.resolve(cfg.model_name)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    transformers.set_seed(cfg.seed)  # new weights (value head, LoRA) start the same on every run
    # Alive while training: under ZeRO-3 it makes `from_pretrained` load each weight into its shard.
    zero3_loading = start_deepspeed(cfg) if cfg.deepspeed != "none" else None
    # A DeepSpeed checkpoint holds the weights in shards, restored by `learner.load`: build from the base.
    weights_from = restored if cfg.deepspeed == "none" else None
    learner = make_learner(cfg, *_build_models(cfg, policy_dir, weights_from), device, world)
    if restored:
        learner.load(restored)
    policy, reference, value_model = learner.policy, learner.reference, learner.value
    kl_control = alg.AdaptiveKL(state["kl_coef"], cfg.target_kl, cfg.kl_horizon)
    moments = alg.RunningMoments(*state["moments"])
    prompts, reward_prompts = _read_prompts(cfg)
    if not prompts:
        raise UserError(f"{cfg.dataset_dir}/prompts/train has no prompts: run `humor-ray data build` with prompts")
    pool = EnginePool(engines)
    writer = None
    if rank == 0 and "tensorboard" in cfg.report_to:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(os.path.join(cfg.output_dir, "tensorboard", cfg.run_name))
    decoding, n = cfg.decoding(), cfg.samples_per_prompt
    history: list[dict] = state["history"]
    step = state["step"]

    def sync(version: int) -> float:
        """Every engine gets the policy's weights as `version`; returns the seconds it took."""
        begin = time.perf_counter()
        with learner.whole_weights():
            ref = ray.put(policy_weights(policy)) if rank == 0 else None
        ref = _broadcast(ref, rank)
        if rank == 0:
            pool.sync(ref, version)
        else:
            pool.publish(ref, version)
        if world > 1:
            torch.distributed.barrier()
        return time.perf_counter() - begin

    if step > 0:  # the engines hold the base weights: bring them to the restored policy
        sync(step)
    note(f"ready: {len(prompts)} prompts, {cfg.estimator}, step {step} of {cfg.max_steps}")
    while step < cfg.max_steps:
        times = {}
        begin = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, step, rank])
        chosen = rng.choice(len(prompts), cfg.rollout_batch_size, replace=len(prompts) < cfg.rollout_batch_size)
        step_prompts = [prompts[i] for i in chosen]
        samples = pool.generate(step_prompts, n, decoding)
        times["generate"] = time.perf_counter() - begin

        begin = time.perf_counter()
        captions = [first_line(s.text) for s in samples]
        scores, reward_retries = score_with_retries(
            reward_actor, [reward_prompts[chosen[s.prompt_index]] for s in samples], captions)
        scores = torch.tensor(scores, dtype=torch.float32, device=device)
        times["score"] = time.perf_counter() - begin

        begin = time.perf_counter()
        batch = _batch(samples, pad_id, device)
        mask = batch["mask"]
        size = len(samples)
        old_logprobs, raw_logprobs, entropy = (torch.zeros_like(mask) for _ in range(3))
        ref_logprobs, old_values = torch.zeros_like(mask), torch.zeros_like(mask)
        with torch.no_grad():
            for start in range(0, size, cfg.forward_batch_size):
                rows = slice(start, start + cfg.forward_batch_size)
                old_logprobs[rows], raw_logprobs[rows], entropy[rows] = _logprobs(policy, batch, rows,
                                                                                   cfg.temperature, raw=True)
                if reference is None:
                    with unwrap(policy).disable_adapter():
                        ref_logprobs[rows] = _logprobs(policy, batch, rows, cfg.temperature)
                else:
                    ref_logprobs[rows] = _logprobs(reference, batch, rows, cfg.temperature)
                if value_model is not None:
                    old_values[rows] = _values(value_model, batch, rows)
        engine_logprobs = torch.zeros_like(mask)
        for row, s in enumerate(samples):
            engine_logprobs[row, :len(s.logprobs)] = torch.tensor(s.logprobs)
        gap = alg.masked_mean((raw_logprobs - engine_logprobs).abs(), mask).item()
        kl = (old_logprobs - ref_logprobs) * mask
        sequence_kl = kl.sum(1)
        total, total_sq, count, kl_total = _all_sum([scores.sum().item(), (scores ** 2).sum().item(), size,
                                                      sequence_kl.sum().item()], device)
        if cfg.estimator == "gae":
            if cfg.normalize_rewards:
                moments.update(total, total_sq, count)
                normalized = moments.normalize(scores)
            else:
                normalized = scores
            rewards = alg.token_rewards(normalized, kl, mask, kl_control.value)
            advantages, returns = alg.gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            advantages = alg.masked_whiten(advantages, mask)
        else:
            sequence_returns = scores - kl_control.value * sequence_kl
            advantages = alg.group_advantages(sequence_returns, n, cfg.estimator)[:, None] * mask
            returns = None
        times["reference"] = time.perf_counter() - begin

        begin = time.perf_counter()
        stats = {"pg_loss": [], "vf_loss": [], "clipfrac": [], "approx_kl": []}
        order_rng = torch.Generator().manual_seed(cfg.seed + step)
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(size, generator=order_rng)
            for start in range(0, size, cfg.mini_batch_size):
                rows = order[start:start + cfg.mini_batch_size].to(device)
                logprobs = _logprobs(policy, batch, rows, cfg.temperature)
                pg_loss, clipfrac, approx_kl = alg.policy_loss(logprobs, old_logprobs[rows], advantages[rows],
                                                               mask[rows], cfg.cliprange)
                stats["pg_loss"].append(pg_loss.item())
                v_loss = None
                if value_model is not None:
                    values = _values(value_model, batch, rows)
                    v_loss = alg.value_loss(values, old_values[rows], returns[rows], mask[rows], cfg.cliprange_value)
                    stats["vf_loss"].append(v_loss.item())
                learner.update(pg_loss, v_loss)
                stats["clipfrac"].append(clipfrac.item())
                stats["approx_kl"].append(approx_kl.item())
        times["train"] = time.perf_counter() - begin

        step += 1
        times["sync"] = sync(step)
        mean_kl = kl_total / count
        kl_coef_used = kl_control.value
        kl_control.update(mean_kl, int(count))
        generated = float(mask.sum().item())
        step_time = sum(times.values())
        if gap > cfg.staleness_alarm and rank == 0:
            print(f"[ppo] WARNING step {step}: trainer and engine log-probs differ by {gap:.4f} on average "
                  f"(alarm at {cfg.staleness_alarm}): the engines may not hold the current weights", flush=True)
        metrics = {
            "step": step, "reward/mean": total / count, "reward/std": float(scores.std().item()) if size > 1 else 0.0,
            "kl": mean_kl, "kl_coef": kl_coef_used, "entropy": alg.masked_mean(entropy, mask).item(),
            "logprob_gap": gap, "engine_version": samples[0].version, "engine_restarts": pool.restarts,
            "reward_retries": reward_retries, "caption_tokens": generated / size,
            "empty_captions": sum(not c for c in captions),
            "tokens_per_second": _all_sum([generated], device)[0] / step_time,
            **{k: float(np.mean(v)) for k, v in stats.items() if v},
            **{f"time/{k}": v for k, v in times.items()}, "time/step": step_time,
        }
        history.append(metrics)
        if writer is not None:
            for key, value in metrics.items():
                if key != "step":
                    writer.add_scalar(key, value, step)
            writer.add_text("sample", f"{captions[0]!r} (reward {scores[0].item():.3f})", step)
            writer.flush()
        if rank == 0:
            board.post.remote(step, cfg.max_steps, {"reward": metrics["reward/mean"], "kl": mean_kl,
                                                     "gap": gap, "s/step": step_time})
        save = step % cfg.save_steps == 0 or step == cfg.max_steps
        ray_checkpoint = None
        if save:
            directory = os.path.join(scratch, f"checkpoint-{step}")
            os.makedirs(directory)
            if rank == 0:
                Path(directory, "state.json").write_text(json.dumps({
                    "step": step, "kl_coef": kl_control.value, "history": history,
                    "moments": [moments.mean, moments.var, moments.count]}))
            # The ranks that wrote files report them; Ray Train merges them into one checkpoint.
            if learner.save(directory, rank) or rank == 0:
                ray_checkpoint = ray.train.Checkpoint.from_directory(directory)
        if save or step % cfg.logging_steps == 0:
            ray.train.report(metrics, checkpoint=ray_checkpoint)
        if save:
            shutil.rmtree(directory, ignore_errors=True)  # reported = copied to the run's storage
    zero3_loading = None  # noqa: F841 (the final merge loads whole models again)
    with learner.whole_weights():
        if rank == 0:
            _save_final(cfg, policy, tokenizer, history, checkpoint.path if checkpoint else None)
            note(f"final policy in {cfg.output_dir}/final")
    if writer is not None:
        writer.close()


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
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from humor_ray.cluster import init_ray
    from humor_ray.models import registry
    from humor_ray.engines import start_engines
    from humor_ray.rl.reward import resolve_reward_model, start_reward_actor
    from humor_ray.train.launcher import ProgressBoard, TrainError, absolute_local_paths, fit_with_progress

    absolute_local_paths(cfg, ("output_dir", "dataset_dir", "model_name", "reward_model"))
    prompts_dir = os.path.join(cfg.dataset_dir, "prompts", "train")
    if "://" not in prompts_dir and not os.path.isdir(prompts_dir):
        raise TrainError(f"{prompts_dir} not found: run `humor-ray data build` first")
    reward_spec = resolve_reward_model(cfg.reward_model)
    policy_dir = registry.resolve(cfg.model_name)
    os.makedirs(cfg.output_dir, exist_ok=True)
    init_ray(dashboard=True)
    engine_gpus, reward_gpus, trainer_gpus = cfg.gpu_shares()
    engines = start_engines(cfg.engine, policy_dir, cfg.num_engines, num_gpus=engine_gpus,
                            max_model_len=cfg.engine_max_model_len, seed=cfg.seed)
    reward_actor = start_reward_actor(reward_spec, max_length=cfg.reward_max_length, num_gpus=reward_gpus)
    board = ray.remote(num_cpus=0)(ProgressBoard).remote()
    # Ready before the trainer starts, so a model that cannot load fails here with its own message.
    try:
        ray.get([e.version.remote() for e in engines] + [reward_actor.pid.remote()])
    except ray.exceptions.RayActorError as err:
        raise TrainError(f"a rollout engine or the reward model could not start: {err}") from None
    storage = cfg.storage_path or os.path.join(cfg.output_dir, "ray")
    run_config = RunConfig(name=cfg.run_name, storage_path=storage,
                           checkpoint_config=CheckpointConfig(num_to_keep=cfg.save_total_limit),
                           failure_config=FailureConfig(max_failures=cfg.max_failures))
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": trainer_gpus} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        _worker_loop, scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                                   resources_per_worker=resources),
        train_loop_config=dict(dataclasses.asdict(cfg), _engines=engines, _reward=reward_actor, _board=board),
        run_config=run_config)
    print(f"[ppo] {cfg.num_workers} trainer worker(s), {cfg.num_engines} {cfg.engine} engine(s), policy "
          f"{cfg.model_name}, reward {reward_spec}, {cfg.estimator}, {cfg.max_steps} steps -> {cfg.output_dir}",
          file=sys.stderr, flush=True)
    try:
        result = fit_with_progress(trainer, board, cfg.run_name, "ppo", ("reward", "kl", "gap", "s/step"))
    finally:
        for actor in [*engines, reward_actor, board]:
            ray.kill(actor)
    summary = json.loads(Path(cfg.output_dir, "metrics.json").read_text())
    last = summary["history"][-1] if summary["history"] else {}
    print(f"[ppo] done: {summary['model']}  step {last.get('step')} reward {last.get('reward/mean', float('nan')):.4f} "
          f"kl {last.get('kl', float('nan')):.3f}", file=sys.stderr, flush=True)
    return result
