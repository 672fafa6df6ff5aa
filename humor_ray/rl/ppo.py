"""`humor-ray ppo`: policy optimisation against the reward model, as a Ray program with separate roles.

- Rollout engines (`engines.py`): vLLM or HF-generate actors sample captions with the paper's decoding.
- The reward actor (`reward.py`) scores prompt-with-context + caption.
- The trainer: Ray Train workers (data-parallel: DDP, or DeepSpeed ZeRO, see `learners.py`) that hold
  the policy, the reference (a frozen copy, or the policy with its LoRA adapter disabled) and the value
  model. A worker (`PPOWorker`) runs each step as named phases: `rollout` (its prompts sampled by the
  engines), `score` (by the reward actor), `make_experience` (log-probs, reference log-probs, values and
  advantages, in one `Experience`), `update` (the clipped PPO update), `sync_weights` (the new weights to
  every engine, with a version number; under LoRA the adapter alone, see `--weight_sync`) and `checkpoint`.
  Every (re)start of the workers first brings the engines to the policy it starts from.
- `--estimator grpo|rloo` replaces the value model by group-normalised advantages over
  `--samples_per_prompt` samples of each prompt (the estimators are looked up by name in `algorithms.py`);
  `--diversity_weight` adds to each sample's score a term for how unlike the other samples of its group it
  is (sentence embeddings from the reward actor), logged and exported beside the reward.

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
from humor_ray.data.outputs import require_complete
from humor_ray.log import get_logger, setup_logging
from humor_ray.placement import EngineGpuOptions, ppo_plan
from humor_ray.eval.diversity import EMBEDDING_MODELS
from humor_ray.rl.algorithms import DIVERSITY_FORMS, ESTIMATORS
from humor_ray.engines import ENGINES, DecodingOptions
from humor_ray.rl.learners import deepspeed_loading, precision, unwrap
from humor_ray.train.launcher import WorkerArgs, WorkerContext, lora_config, run_trainer, started_worker

if TYPE_CHECKING:
    import torch

    from humor_ray.engines import PolicyWeights, Sample

PLACEMENTS = ("separate", "colocate")
TRUNCATED = ("trim", "penalize")
WEIGHT_SYNCS = ("adapter", "full")
# The phases a step's time is reported for, with their names in metrics.json's history (kept from the start).
HISTORY_TIMES = {"rollout": "generate", "score": "score", "make_experience": "reference", "update": "train",
                 "sync_weights": "sync"}


# The groups in reverse: a dataclass lists the last base's fields first.
@dataclasses.dataclass
class Config(LoggingOptions, DeepSpeedOptions, LoraOptions, ScaleOptions, RunOptions, EngineGpuOptions,
             DecodingOptions):
    """PPO (or GRPO/RLOO) of a caption policy against a reward model."""
    # The trainer scores sampled tokens by the policy at --temperature alone, so by default PPO samples
    # from exactly that: no nucleus cut, no repetition penalty (the paper's 0.95 and 1.15 are for generate/bon).
    temperature: float = field(0.7, "sampling temperature (above 0: PPO needs a stochastic policy)",
                               exclusive_minimum=0)
    top_p: float = field(1.0, "nucleus sampling. Below 1 the engines sample from a cut distribution that the "
                              "trainer does not score (it scores at --temperature alone): the importance ratios "
                              "and the KL estimate are then biased (the KL can read negative)",
                        exclusive_minimum=0, maximum=1)
    repetition_penalty: float = field(1.0, "repetition penalty. Above 1 the engines sample from a penalised "
                                           "distribution that the trainer does not score: the importance "
                                           "ratios and the KL estimate are then biased (the KL can read negative)",
                                       exclusive_minimum=0)
    reward_model: str = field(None, "a `humor-ray rm` output directory, a reward model directory, or "
                                    "builtin:vowel_share", required=True)
    simple_prompt: bool = field(False, "use the simple prompt instead of the long instruction prompt")
    estimator: str = field("gae", "gae (PPO with a value model); grpo or rloo: critic-free, group baselines",
                           choices=tuple(ESTIMATORS))
    diversity_weight: float = field(0.0, "grpo/rloo: weight W of a diversity term added to each sample's score, "
                                         "from its mean embedding distance (1 - cosine) to the other samples "
                                         "of its group (0: none)", minimum=0)
    diversity_form: str = field("additive", "the diversity term: additive (W x the distance) or multiplicative "
                                            "(W x the score above the group's lowest x the distance over the "
                                            "group's highest)", choices=DIVERSITY_FORMS)
    diversity_embedding: str = field("minilm", "sentence embeddings of the diversity term: minilm or mpnet",
                                     choices=EMBEDDING_MODELS)
    rollout_batch_size: int = field(8, "prompts per step per worker", minimum=1)
    samples_per_prompt: int = field(4, "captions sampled per prompt (the group size for grpo/rloo)", minimum=1)
    mini_batch_size: int = field(16, "sequences per optimizer step", minimum=1)
    ppo_epochs: int = field(1, "passes over each rollout batch", minimum=1)
    forward_batch_size: int = field(16, "sequences per forward pass when scoring log-probs and values",
                                     minimum=1)
    value_learning_rate: float | None = field(None, "value model learning rate (default: --learning_rate)",
                                                exclusive_minimum=0)
    cliprange: float = field(0.2, "policy ratio clip", exclusive_minimum=0)
    cliprange_value: float = field(0.2, "value clip", exclusive_minimum=0)
    vf_coef: float = field(0.1, "weight of the value loss", minimum=0)
    gamma: float = field(1.0, "discount", minimum=0, maximum=1)
    lam: float = field(0.95, "GAE lambda", minimum=0, maximum=1)
    init_kl_coef: float = field(0.05, "initial KL penalty coefficient", minimum=0)
    target_kl: float | None = field(6.0, "KL (nats per caption) the adaptive controller steers to; null keeps "
                                         "the coefficient fixed", exclusive_minimum=0)
    kl_horizon: int = field(10000, "samples over which the KL controller makes a full correction",
                           minimum=1)
    normalize_rewards: bool = field(True, "scale scores by their running mean and standard deviation")
    max_grad_norm: float = field(1.0, "gradient clipping", exclusive_minimum=0)
    reward_max_length: int | None = field(None, "tokens of prompt + caption the reward model reads (default: the "
                                                "`humor-ray rm` run's --max_length, else 512)", minimum=1)
    truncated: str = field("trim", "a caption cut at --max_new_tokens: trim (scored as its whole words; the "
                                   "tokens after them are left out of the update) or penalize (scored as its "
                                   "whole words less --truncation_penalty; every token is trained)",
                           choices=TRUNCATED)
    truncation_penalty: float = field(1.0, "subtracted from a cut caption's score under --truncated penalize",
                                      minimum=0)
    engine: str = field("vllm", "rollout engine", choices=ENGINES)
    num_engines: int = field(1, "rollout engine actors", minimum=1)
    engine_max_model_len: int | None = field(None, "prompt + caption tokens an engine holds per sequence "
                                                   "(default: the model's limit)", minimum=1)
    placement: str = field("separate", "GPU placement: separate (each engine, the reward model and each trainer "
                                       "worker its own GPU) or colocate (one GPU per trainer worker, shared with "
                                       "the engines and the reward model)", choices=PLACEMENTS)
    colocate_fractions: list[float] = field([0.4, 0.2, 0.4], "shares of a GPU of engine, reward model, trainer "
                                                             "worker when colocated (an engine's vLLM memory is its "
                                                             "share of --engine_gpu_memory)",
                                            exclusive_minimum=0, maximum=1)
    staleness_alarm: float = field(0.05, "warn when the mean trainer-engine log-prob gap exceeds this",
                                   minimum=0)
    gradient_checkpointing: bool = field(False, "recompute the policy's and value model's activations in the "
                                                "backward pass: less memory, longer updates")
    weight_sync: str = field("adapter", "with --lora_r > 0, what the engines get after each update: adapter (the "
                                        "LoRA weights alone, applied by the engine) or full (the merged model); "
                                        "without LoRA always the full model", choices=WEIGHT_SYNCS)

    def __post_init__(self):
        if not self.output_dir or not self.dataset_dir or not self.reward_model:
            raise ConfigError("ppo needs --output_dir, --dataset_dir and --reward_model")
        super().__post_init__()
        if not ESTIMATORS[self.estimator].critic and self.samples_per_prompt < 2:
            raise ConfigError(f"--estimator {self.estimator} needs --samples_per_prompt of at least 2")
        if self.diversity_weight and ESTIMATORS[self.estimator].critic:
            raise ConfigError(f"--diversity_weight needs a group estimator (--estimator grpo or rloo), not "
                              f"{self.estimator}")
        batch = self.rollout_batch_size * self.samples_per_prompt
        if batch % self.mini_batch_size:
            raise ConfigError(f"--mini_batch_size must divide the rollout batch (rollout_batch_size x "
                              f"samples_per_prompt = {batch})")
        if self.deepspeed.endswith(".json"):
            from humor_ray.rl.learners import FILLED_BY_LEARNER
            from humor_ray.train.deepspeed_presets import check_user_json

            check_user_json(self.deepspeed, self.use_gpu, FILLED_BY_LEARNER)
        if any(r not in ("tensorboard", "none") for r in self.report_to):
            raise ConfigError("--report_to for ppo: tensorboard or none")
        if self.syncs_adapter() and self.engine == "vllm":
            from humor_ray.engines import vllm_lora_rank

            try:
                vllm_lora_rank(self.lora_r)
            except UserError as err:
                raise ConfigError(f"{err}; or use --weight_sync full") from None
        ppo_plan(self)  # the GPU shares are checked before any cluster starts

    def syncs_adapter(self) -> bool:
        """Whether the engines get the LoRA adapter alone after each update."""
        return self.lora_r > 0 and self.weight_sync == "adapter"

    def max_lora_rank(self) -> int:
        """The LoRA rank the engines must take (0: they get whole weights)."""
        return self.lora_r if self.syncs_adapter() else 0


# ---------------------------------------------------------------- inside a trainer worker

@dataclasses.dataclass
class Sequences:
    """B sequences, each P prompt columns (left-padded) then T completion columns (right-padded), so every
    completion starts at the same column and its logits are the last T + 1 positions."""
    input_ids: torch.Tensor  # (B, P + T)
    attention_mask: torch.Tensor  # (B, P + T)
    position_ids: torch.Tensor  # (B, P + T)
    mask: torch.Tensor  # (B, T): 1.0 on the completion tokens that are trained (those of the scored caption)

    @property
    def width(self) -> int:
        return self.mask.shape[1]


@dataclasses.dataclass
class Experience:
    """One step's rollouts with everything the update reads. B = rollout_batch_size x samples_per_prompt
    (a prompt's samples consecutive), T = completion tokens."""
    samples: list[Sample]  # B, as the engines drew them
    captions: list[str]  # B, what the reward model scored: each completion's caption (`clean_caption`)
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
    totals: list[float]  # over all workers: score sum, score square sum, sequences, KL sum, cut captions,
    #                      diversity term sum, diversity sum
    diversity: torch.Tensor | None = None  # (B,) each sample's mean distance to its group (with --diversity_weight)

    def logprob_gap(self, rows=slice(None)) -> float:
        """Mean |trainer - engine| log-prob of the completion tokens of `rows`."""
        from humor_ray.rl.algorithms import masked_mean

        gap = (self.raw_logprobs[rows] - self.engine_logprobs[rows]).abs()
        return masked_mean(gap, self.sequences.mask[rows]).item()


def _lora(cfg: Config, model, task_type: str):
    from peft import get_peft_model

    settings = lora_config(cfg, task_type)
    return model if settings is None else get_peft_model(model, settings)


def _disable_dropout(model) -> None:
    """PPO's forward passes must be deterministic (old and new log-probs of the same weights must agree);
    the models run in training mode, which gradient checkpointing needs."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()


def _build_models(cfg: Config, policy_dir: str, restored: str | None, critic: bool, precision):
    """(policy, reference or None, value model or None), every one loaded in `precision.weights`. The
    reference is None under LoRA: the policy with its adapter disabled is the reference."""
    import torch
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM

    from humor_ray.models.loading import from_pretrained
    from humor_ray.rl import algorithms as alg

    dtype = precision.weights
    if restored and cfg.lora_r > 0:
        from peft import PeftModel

        policy = PeftModel.from_pretrained(from_pretrained(AutoModelForCausalLM, policy_dir, dtype=dtype),
                                           os.path.join(restored, "policy"), is_trainable=True)
    elif restored:
        policy = from_pretrained(AutoModelForCausalLM, os.path.join(restored, "policy"), dtype=dtype)
    else:
        policy = _lora(cfg, from_pretrained(AutoModelForCausalLM, policy_dir, dtype=dtype), "CAUSAL_LM")
    reference = None
    if cfg.lora_r <= 0:
        reference = from_pretrained(AutoModelForCausalLM, policy_dir, dtype=dtype)
        reference = reference.eval().requires_grad_(False)
    value = None
    if critic:
        # The backbone alone: the checkpoint's language-model head is expected to go unused.
        transformers.logging.set_verbosity_error()
        backbone = from_pretrained(AutoModel, policy_dir, dtype=dtype)
        transformers.logging.set_verbosity_warning()
        value = alg.ValueModel(_lora(cfg, backbone, "FEATURE_EXTRACTION"))
        if restored:
            value.load_state_dict(torch.load(os.path.join(restored, "value.pt"), weights_only=True))
    for model in (policy, value):
        if model is None:
            continue
        _disable_dropout(model)
        if cfg.gradient_checkpointing:
            inner = model.backbone if model is value else model
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return policy, reference, value


def scored_tokens(tokenizer, sample: Sample, caption: str) -> int:
    """How many of the sample's completion tokens make its caption: all of them, except for a caption cut
    at max_new_tokens, whose scored text (its whole words) ends earlier: the shortest prefix that holds it."""
    ids = sample.completion_ids
    if sample.finished or not caption:
        return len(ids)
    for count in range(1, len(ids) + 1):
        if caption in tokenizer.decode(ids[:count], skip_special_tokens=True):
            return count
    return len(ids)


def _sequences(samples: list[Sample], pad_id: int, device, trained: list[int] | None = None) -> Sequences:
    """The samples as one batch; the mask covers the first `trained[i]` completion tokens of sample i
    (default: all of them)."""
    import torch

    prompt_width = max(len(s.prompt_ids) for s in samples)
    width = max(len(s.completion_ids) for s in samples)
    trained = trained or [len(s.completion_ids) for s in samples]
    ids, attention, mask = [], [], []
    for s, count in zip(samples, trained):
        left, right = prompt_width - len(s.prompt_ids), width - len(s.completion_ids)
        ids.append([pad_id] * left + s.prompt_ids + s.completion_ids + [pad_id] * right)
        attention.append([0] * left + [1] * (len(s.prompt_ids) + len(s.completion_ids)) + [0] * right)
        mask.append([1.0] * count + [0.0] * (width - count))
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


def merged_lora_weight(weight, lora_a, lora_b, scaling: float, fan_in_fan_out: bool = False):
    """W + scaling * B @ A as a new tensor in W's dtype, summed in float32. W is left as it is: merging into
    W and subtracting again rounds W twice in bf16, and the frozen base (the reference) drifts sync by sync."""
    delta = lora_b.float() @ lora_a.float()
    return (weight.float() + scaling * (delta.T if fan_in_fan_out else delta)).to(weight.dtype)


def policy_weights(policy, adapter: bool = False) -> PolicyWeights:
    """What the rollout engines load, on the CPU: with `adapter` (and a LoRA policy) the adapter's weights
    and config; otherwise the full weights under their Hugging Face names, LoRA merged in (out of place)."""
    from humor_ray.engines import PolicyWeights

    model = unwrap(policy)
    if not hasattr(model, "peft_config"):
        return PolicyWeights({name: tensor.detach().cpu() for name, tensor in model.state_dict().items()})
    name = model.active_adapter
    if adapter:
        from peft import get_peft_model_state_dict

        tensors = get_peft_model_state_dict(model, adapter_name=name)
        return PolicyWeights({key: t.detach().cpu().contiguous() for key, t in tensors.items()},
                             lora=model.peft_config[name])
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    merged = {}
    for prefix, module in model.named_modules():
        if not isinstance(module, LoraLayer) or name not in module.scaling:
            continue
        if not isinstance(module, LoraLinear):
            raise NotImplementedError(f"{prefix}: a full weight sync merges LoRA on linear layers only "
                                      f"(this is a {type(module).__name__}): use --weight_sync adapter")
        merged[f"{prefix}.base_layer.weight"] = merged_lora_weight(
            module.base_layer.weight, module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name],
            module.fan_in_fan_out)
    state = {}
    for key, tensor in model.state_dict().items():
        if "lora_" not in key:
            hf_name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
            state[hf_name] = merged.get(key, tensor).detach().cpu()
    return PolicyWeights(state)


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
        from humor_ray.engines import EnginePool, start_weight_store
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
        self.precision = precision(cfg)
        models = _build_models(cfg, policy_dir, weights_from, self.estimator.critic, self.precision)
        self.learner = make_learner(cfg, *models, worker.device, worker.world)
        if restored:
            self.learner.load(restored)
        self.kl_control = alg.AdaptiveKL(state["kl_coef"], cfg.target_kl, cfg.kl_horizon)
        self.moments = alg.RunningMoments(*state["moments"])
        self.prompts, self.reward_prompts = _read_prompts(cfg)
        if not self.prompts:
            raise UserError(f"{cfg.dataset_dir}/prompts/train has no prompts: run `humor-ray data build` with prompts")
        # One record of the newest weights for every worker's pool (rank 0 syncs, the others read it to
        # bring a restarted engine up to date).
        store = start_weight_store() if worker.rank == 0 else None
        self.pool = EnginePool(args.engines, _broadcast(store, worker.rank))
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
        # The engines may hold any version: the base weights (a first start), or a newer one than the step
        # resumed from (the workers restarted after a failure). Bring them to the policy this start holds.
        self.sync_weights(self.step)
        self.log.info(f"ready: {len(self.prompts)} prompts, {cfg.estimator}, step {self.step} of {cfg.max_steps}")
        while self.step < cfg.max_steps:
            times: dict[str, float] = {}
            samples, chosen = self._timed(times, self.rollout)
            captions, scores, retries, diversity = self._timed(times, self.score, samples, chosen)
            experience = self._timed(times, self.make_experience, samples, captions, scores, retries, diversity)
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
        """This step's prompts (drawn by seed, step and rank), sampled by the engines; and which they were.
        The sampling is seeded by seed, step and rank too: a resumed run draws new captions, not the first
        steps' again."""
        import numpy as np

        cfg = self.cfg
        entropy = [cfg.seed, self.step, self.worker.rank]
        rng = np.random.default_rng(entropy)
        count = len(self.prompts)
        chosen = rng.choice(count, cfg.rollout_batch_size, replace=count < cfg.rollout_batch_size)
        seed = int(np.random.SeedSequence(entropy).generate_state(1)[0]) % 2 ** 30
        decoding = dataclasses.replace(self.decoding, seed=seed)
        return self.pool.generate([self.prompts[i] for i in chosen], cfg.samples_per_prompt, decoding), chosen

    def score(self, samples: list[Sample], chosen) -> tuple[list[str], torch.Tensor, int, torch.Tensor | None]:
        """(the captions, the reward model's scores (B,), reward calls retried, with --diversity_weight each
        caption's mean embedding distance to the others of its group (B,), else None). The caption is what
        generate and bon keep (`clean_caption`): one cut at max_new_tokens keeps its whole words, and under
        --truncated penalize loses --truncation_penalty."""
        import torch

        from humor_ray.engines import clean_caption
        from humor_ray.eval.diversity import group_diversity
        from humor_ray.rl.reward import call_with_retries, score_with_retries

        cfg = self.cfg
        captions = [clean_caption(s.text, s.finished) for s in samples]
        scores, retries = score_with_retries(
            self.reward_actor, [self.reward_prompts[chosen[s.prompt_index]] for s in samples], captions)
        scores = torch.tensor(scores, dtype=torch.float32, device=self.worker.device)
        if cfg.truncated == "penalize":
            cut = torch.tensor([not s.finished for s in samples], device=scores.device)
            scores = scores - cfg.truncation_penalty * cut
        diversity = None
        if cfg.diversity_weight:
            vectors, failed = call_with_retries(self.reward_actor.embed, captions, cfg.diversity_embedding)
            retries += failed
            diversity = group_diversity(torch.as_tensor(vectors, device=scores.device), cfg.samples_per_prompt)
        return captions, scores, retries, diversity

    def make_experience(self, samples: list[Sample], captions: list[str], scores, retries: int,
                        diversity=None) -> Experience:
        """Log-probs, reference log-probs and values of the samples, then the advantages (of the scores plus,
        with --diversity_weight, the diversity term)."""
        import torch

        from humor_ray.rl import algorithms as alg

        cfg, device = self.cfg, self.worker.device
        # Under --truncated trim the tokens past a cut caption's last whole word are not trained: the
        # score is the caption's, so it goes to the tokens that wrote it.
        trained = ([scored_tokens(self.tokenizer, s, c) for s, c in zip(samples, captions)]
                   if cfg.truncated == "trim" else None)
        seqs = _sequences(samples, self.pad_id, device, trained)
        mask = seqs.mask
        old_logprobs, raw_logprobs, entropy = (torch.zeros_like(mask) for _ in range(3))
        ref_logprobs, values = torch.zeros_like(mask), torch.zeros_like(mask)
        with torch.no_grad(), self._autocast():
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
        term = torch.zeros_like(scores)
        if diversity is not None:
            term = alg.diversity_term(scores, diversity, cfg.samples_per_prompt, cfg.diversity_weight,
                                      cfg.diversity_form)
        totals = _all_sum([scores.sum().item(), (scores ** 2).sum().item(), len(samples), kl.sum(1).sum().item(),
                           sum(not s.finished for s in samples), term.sum().item(),
                           0.0 if diversity is None else diversity.sum().item()], device)
        normalized = scores
        if self.estimator.critic and cfg.normalize_rewards:
            self.moments.update(*totals[:3])
            normalized = self.moments.normalize(scores)
        advantages, returns = self.estimator.advantages(normalized + term, kl, mask, values, self.kl_control.value,
                                                        cfg)
        return Experience(samples, captions, scores, retries, seqs, old_logprobs, raw_logprobs, engine_logprobs,
                          entropy, values, kl, advantages, returns, totals, diversity)

    def _autocast(self):
        """The forward passes' half precision on a GPU (`learners.precision`)."""
        import contextlib

        import torch

        dtype = self.precision.autocast
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.worker.device.type, dtype=dtype)

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
                with self._autocast():
                    logprobs = _logprobs(policy, exp.sequences, rows, cfg.temperature)
                    values = _values(value_model, exp.sequences, rows) if value_model is not None else None
                pg_loss, clipfrac, approx_kl = alg.policy_loss(logprobs, exp.old_logprobs[rows], exp.advantages[rows],
                                                               mask[rows], cfg.cliprange)
                stats["pg_loss"].append(pg_loss.item())
                v_loss = None
                if values is not None:
                    v_loss = alg.value_loss(values, exp.values[rows], exp.returns[rows], mask[rows],
                                            cfg.cliprange_value)
                    stats["vf_loss"].append(v_loss.item())
                self.learner.update(pg_loss, v_loss)
                stats["clipfrac"].append(clipfrac.item())
                stats["approx_kl"].append(approx_kl.item())
        return stats

    def sync_weights(self, version: int) -> None:
        """Every engine gets the policy's weights (under LoRA by default its adapter alone) as `version`."""
        import ray
        import torch

        rank = self.worker.rank
        with self.learner.whole_weights():  # all ranks: under ZeRO-3 gathering the weights is collective
            ref = ray.put(policy_weights(self.learner.policy, self.cfg.syncs_adapter())) if rank == 0 else None
        if rank == 0:
            self.pool.sync(ref, version)
        else:
            self.pool.expect(version)
        if self.worker.world > 1:
            torch.distributed.barrier()

    def _record(self, exp: Experience, stats: dict, times: dict) -> dict:
        """The step's metrics, added to the history, TensorBoard and the progress board; the KL controller
        takes the step's KL."""
        import numpy as np

        from humor_ray.rl import algorithms as alg

        cfg, step, device = self.cfg, self.step, self.worker.device
        total, total_sq, count, kl_total, cut, term_total, diversity_total = exp.totals
        mean_kl, kl_coef_used = kl_total / count, self.kl_control.value
        self.kl_control.update(mean_kl, int(count))
        size, generated = len(exp.samples), float(sum(len(s.completion_ids) for s in exp.samples))
        trained = float(exp.sequences.mask.sum().item())
        step_time, gap = sum(times.values()), exp.logprob_gap()
        if gap > cfg.staleness_alarm and self.worker.rank == 0:
            self.log.warning(f"step {step}: trainer and engine log-probs differ by {gap:.4f} on average "
                             f"(alarm at {cfg.staleness_alarm}): the engines may not hold the current weights")
        metrics = {
            "step": step, "reward/mean": total / count,
            "reward/std": alg.pooled_std(total, total_sq, count),
            "kl": mean_kl, "kl_coef": kl_coef_used, "entropy": alg.masked_mean(exp.entropy, exp.sequences.mask).item(),
            "logprob_gap": gap, "engine_version": exp.samples[0].version, "engine_restarts": self.pool.restarts,
            "reward_retries": exp.reward_retries, "caption_tokens": generated / size, "trained_tokens": trained / size,
            "empty_captions": sum(not c for c in exp.captions), "cut_captions": cut / count,
            "tokens_per_second": _all_sum([generated], device)[0] / step_time,
            **({"diversity/mean": diversity_total / count, "diversity/term": term_total / count}
               if exp.diversity is not None else {}),
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
        if "diversity/term" in metrics:
            figures.gauge("ppo_diversity_term", metrics["diversity/term"], "mean diversity term added to the step's "
                          "scores (--diversity_weight), all workers")
            figures.gauge("ppo_diversity", metrics["diversity/mean"], "mean embedding distance of the step's "
                          "captions to the others of their group, all workers")
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
                                   seed=cfg.seed + index, max_lora_rank=cfg.max_lora_rank(), options=options)
            return actor, actor.version.remote()
        actor = start_reward_actor(resolve_reward_model(cfg.reward_model), max_length=cfg.reward_max_length,
                                   num_cpus=role.cpus, options=options)
        return actor, actor.pid.remote()

    roles = placement.start_colocated(plan, worker.rank, start)
    return dataclasses.replace(args, engines=[roles[("engine", j)] for j in range(cfg.num_engines)],
                               reward=roles[("reward", 0)])


def _worker_loop(config: dict) -> None:
    args: WorkerArgs = config["args"]
    with started_worker(args.config, "ppo") as context:
        if not args.engines:  # colocated: the worker starts them
            args = _start_colocated(args, context)
        with deepspeed_loading(args.config):  # the models are built and trained in it; the final merge is not
            worker = PPOWorker(args, context)
            worker.train()
        worker.finish()


def _save_final(cfg: Config, policy, tokenizer, history: list[dict], resumed_from: str | None) -> None:
    from humor_ray.train.export import publish_final, save_merged, start_final

    written = start_final(cfg.output_dir)
    unwrap(policy).save_pretrained(written, safe_serialization=True)
    tokenizer.save_pretrained(written)
    serve = save_merged(cfg.model_name, "causal_lm", False, written)
    publish_final(cfg.output_dir, written, serve, {"history": history, "resumed_from": resumed_from,
                                                   "reward_max_length": cfg.reward_max_length})


# ---------------------------------------------------------------- the driver

def run(cfg: Config):
    """Start the engines and the reward actor, then the trainer workers; resumes when rerun."""
    import ray

    from humor_ray.cluster import init_ray
    from humor_ray.models import registry
    from humor_ray.engines import start_engines
    from humor_ray.placement import check_cluster
    from humor_ray.plan import check_before_start
    from humor_ray.rl.reward import resolve_reward_model, reward_max_length, start_reward_actor
    from humor_ray.train.launcher import TrainError, absolute_local_paths

    setup_logging()
    log = get_logger("ppo")
    absolute_local_paths(cfg, ("output_dir", "dataset_dir", "model_name", "reward_model"))
    cfg.run_name = cfg.run_name or "ppo"
    require_complete(cfg.dataset_dir)
    prompts_dir = os.path.join(cfg.dataset_dir, "prompts", "train")
    if "://" not in prompts_dir and not os.path.isdir(prompts_dir):
        raise TrainError(f"{prompts_dir} not found: run `humor-ray data build` first")
    cfg.reward_max_length = reward_max_length(cfg)  # as the reward model was trained, when its run says
    check_before_start("ppo", cfg)  # a role that cannot fit its GPU stops here, before Ray starts
    init_ray(dashboard=True)
    plan = ppo_plan(cfg)
    check_cluster(plan)  # a cluster too small is one line, before anything loads
    reward_spec = resolve_reward_model(cfg.reward_model)
    if cfg.top_p < 1 or cfg.repetition_penalty != 1:
        log.warning(f"--top_p {cfg.top_p} --repetition_penalty {cfg.repetition_penalty}: the engines sample from a "
                    "distribution the trainer does not score; importance ratios and KL are biased")
    policy_dir = registry.resolve(cfg.model_name)
    os.makedirs(cfg.output_dir, exist_ok=True)
    engines, reward_actor = [], None  # colocated: each trainer worker starts those that share its GPU
    if plan.mode != "colocate":
        engine = plan.role("engine")
        engines = start_engines(cfg.engine, policy_dir, cfg.num_engines, **plan.actor_options("engine"),
                                gpu_memory=engine.memory, max_model_len=cfg.engine_max_model_len, seed=cfg.seed,
                                max_lora_rank=cfg.max_lora_rank())
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
    from humor_ray.train.export import final_model

    summary = json.loads(Path(cfg.output_dir, "metrics.json").read_text())
    last = summary["history"][-1] if summary["history"] else {}
    log.info(f"done: {final_model(cfg.output_dir)}  step {last.get('step')} "
             f"reward {last.get('reward/mean', float('nan')):.4f} kl {last.get('kl', float('nan')):.3f}")
    return result
