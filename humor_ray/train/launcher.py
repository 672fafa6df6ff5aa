"""One Ray Train driver and one worker preamble for every training stage (sft, rm, dpo, llava, and ppo's
trainer workers).

A TRL stage is a small module that declares a `Stage` (the dataset columns it reads, its export kind, the
metric that ranks its checkpoints, how it builds its trainer) and a `Config` composed of `TrainConfig`.
Everything else is here, once: Ray Train scaling, storage, checkpoints and automatic restarts
(`run_trainer`); each worker's set-up (`started_worker`); streaming the Parquet datasets to the workers
through Ray Data shards; LoRA and DeepSpeed; resuming; the progress bar; the final Hugging Face export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from humor_ray.config import (ConfigError, DeepSpeedOptions, LoggingOptions, LoraOptions, RunOptions, ScaleOptions,
                              UserError, field)
from humor_ray.data.outputs import require_complete
from humor_ray.log import get_logger, setup_logging
from humor_ray.metrics import StageMetrics
from humor_ray.placement import check_cluster, train_plan
from humor_ray.train.deepspeed_presets import deepspeed_config, start_process_group, trainer_half_precision
from humor_ray.train.export import PARTIAL, final_model, publish_final, rewrite_record, save_merged, start_final

class TrainError(UserError):
    """A training run that cannot start or finish; the message says why."""


# The groups in reverse: a dataclass lists the last base's fields first, and --help shows run options first.
@dataclasses.dataclass
class TrainConfig(LoggingOptions, DeepSpeedOptions, LoraOptions, ScaleOptions, RunOptions):
    """Options every TRL training stage shares (TRL's names where TRL has one)."""
    do_train: bool = field(True, "train")
    do_eval: bool = field(True, "evaluate on the held-out contests during and after training")
    per_device_train_batch_size: int = field(8, "examples per worker per micro-batch", minimum=1)
    gradient_accumulation_steps: int = field(1, "micro-batches per optimizer step", minimum=1)
    max_length: int = field(512, "tokens per example, at most", minimum=1)
    eval_steps: int = field(50, "evaluate every this many steps", minimum=1)
    max_eval_examples: int = field(1000, "held-out examples used per evaluation", minimum=1)
    new_padding_token: bool = field(False, "add a real pad token and resize the embeddings")
    # TRL's default. A small model on a CPU has the memory to spare and gains about a quarter of its step time.
    gradient_checkpointing: bool = field(True, "recompute activations in the backward pass: less memory, about a "
                                               "third more compute")

    def __post_init__(self):
        if not self.output_dir or not self.dataset_dir:
            raise ConfigError("training needs --output_dir and --dataset_dir")
        super().__post_init__()
        if self.save_steps % self.eval_steps and self.do_eval:
            raise ConfigError("--save_steps must be a multiple of --eval_steps, so every checkpoint has fresh "
                             "evaluation metrics")

    def base_model(self) -> str:
        """The model training starts from (DPO may start from an SFT output instead)."""
        return self.model_name


@dataclasses.dataclass(frozen=True)
class Stage:
    """A TRL training stage: what it reads and how it builds its trainer; `launch` does the rest."""
    name: str
    columns: tuple[str, ...]  # the dataset columns it reads
    caption_columns: tuple[str, ...]  # those that follow the prompt and get a separating space
    model_kind: str  # the final export: causal_lm, reward or image_text
    best_metric: tuple[str, str]  # (metric, "min" or "max"): what ranks the kept checkpoints
    dataset_name: Callable[[Any], str]  # cfg -> the dataset folder it reads
    # (cfg, train, evaluation, scratch) -> its TRL trainer, inside a worker. It creates the training
    # arguments BEFORE loading the model: under ZeRO-3 they set up DeepSpeed's partitioned loading.
    make_trainer: Callable
    # cfg -> a folder of training rows the stage wrote itself (DPO's pairs from a pool of captions), read
    # instead of the dataset's training split; None: the dataset's.
    train_dir: Callable[[Any], str | None] | None = None
    # (cfg, training split path) -> (column, values): train only on the rows whose column holds one of the
    # values, or None for every row. Applied as the split is read, before its rows are shared among the
    # workers (rm's --contest_fold).
    train_filter: Callable[[Any, str], tuple[str, list] | None] | None = None

    def train_rows(self, cfg, path: str) -> tuple[str, list] | None:
        return self.train_filter(cfg, path) if self.train_filter else None


@dataclasses.dataclass
class WorkerArgs:
    """What the driver hands every Ray Train worker."""
    config: Any  # the stage's config
    board: Any = None  # the ProgressBoard actor rank 0 posts to (run_trainer starts it)
    stage: Stage | None = None  # a TRL stage: what the worker builds
    engines: list = dataclasses.field(default_factory=list)  # ppo: the rollout engine actors
    reward: Any = None  # ppo: the reward-model actor
    # Tests: a folder where each worker writes the training rows it holds and those its trainer consumed
    # (taken from $HUMOR_RAY_RECORD_TRAIN_ROWS by `launch`).
    record_rows: str | None = None
    marks: dict = dataclasses.field(default_factory=dict)  # the driver's wall-clock marks (see `outside_loop`)
    # Whether the workers read the training split themselves (small, local) or get Ray Data shards.
    direct_read: bool = False
    keep_train_row: Any = None  # with direct_read: which training rows to keep (launch's keep_train_row)


def hf_args(cfg: TrainConfig, args_class, output_dir: str, **extra):
    """The TRL/transformers arguments that follow from the shared options."""
    import torch.distributed

    evaluate = cfg.do_eval
    # Inside Ray Train the process group exists already (gloo on CPU); a single plain process has none.
    distributed_cpu = not cfg.use_gpu and torch.distributed.is_initialized()
    half = trainer_half_precision(cfg.deepspeed, cfg.use_gpu)
    return args_class(
        output_dir=output_dir, run_name=cfg.run_name, max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, seed=cfg.seed, data_seed=cfg.seed,
        gradient_checkpointing=cfg.gradient_checkpointing,
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, eval_strategy="steps" if evaluate else "no",
        eval_steps=cfg.eval_steps if evaluate else None,
        report_to=[r for r in cfg.report_to if r != "none"],
        bf16=half == "bf16", fp16=half == "fp16", use_cpu=not cfg.use_gpu,
        deepspeed=deepspeed_config(cfg.deepspeed, cfg.use_gpu),
        ddp_backend="gloo" if distributed_cpu else None, dataloader_num_workers=0, disable_tqdm=True,
        accelerator_config={"dispatch_batches": False}, ddp_find_unused_parameters=False,
        # Tokens/s in the logs (all workers together), padding not counted.
        include_num_input_tokens_seen="non_padding", **extra)


def lora_config(cfg: TrainConfig, task_type: str, **overrides):
    """PEFT's LoRA settings from the shared options (`overrides`: a stage's own LoraConfig fields)."""
    if cfg.lora_r <= 0:
        return None
    from peft import LoraConfig

    targets = cfg.lora_targets[0] if cfg.lora_targets == ["all-linear"] else cfg.lora_targets
    settings = dict(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=targets, lora_dropout=0.0,
                    task_type=task_type)
    return LoraConfig(**{**settings, **overrides})


def split_path(cfg: TrainConfig, stage: Stage, split: str) -> str:
    own = stage.train_dir(cfg) if split == "train" and stage.train_dir else None
    return own or os.path.join(cfg.dataset_dir, stage.dataset_name(cfg), split)


# ---------------------------------------------------------------- inside a worker

def as_dataset(table, columns: list[str], caption_columns: tuple[str, ...] = ()):
    """An Arrow table as an in-memory Hugging Face dataset (no copy into Python objects).
    `caption_columns` get a leading space: they are appended to the prompt ("... funny caption:"),
    and the space makes prompt + caption the same text as the datasets' `text` column."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    def column(name):
        # Parquet hands back dictionary-encoded text; the tokenizers want plain strings.
        values = table[name].cast(pa.string())
        return pc.utf8_replace_slice(values, 0, 0, " ") if name in caption_columns else values

    return datasets.Dataset(pa.table({c: column(c) for c in columns}))


def shard_dataset(shard, columns: list[str], limit: int | None = None, caption_columns: tuple[str, ...] = (),
                  seed: int = 0):
    """This worker's part of the training data, streamed from its Ray Data shard (each worker holds
    only its own part, as Arrow). With `limit`, a seeded uniform sample of that many rows: blocks are
    whole contests, so the first rows alone would cover only a few cartoons."""
    import numpy as np
    import pyarrow as pa

    batches = [batch.select(columns) for batch in shard.iter_batches(batch_size=4096, batch_format="pyarrow")]
    if not batches:
        return None
    table = pa.concat_tables(batches)
    if limit is not None and table.num_rows > limit:
        table = table.take(np.random.default_rng(seed).choice(table.num_rows, limit, replace=False))
    return as_dataset(table, columns, caption_columns)


# A local training split up to this size on disk reaches each worker as Parquet read in the worker, without a
# Ray Data pipeline (whose read tasks and split coordinator cost seconds at every start); larger ones stream.
DIRECT_READ_BYTES = 256 * 2**20


def read_directly(path: str) -> bool:
    """Whether the workers read the split at `path` themselves (local and small) instead of a Ray Data shard."""
    if "://" in path:
        return False
    return sum(f.stat().st_size for f in Path(path).rglob("*.parquet")) <= DIRECT_READ_BYTES


def direct_part(path: str, columns: list[str], rank: int, world: int, limit: int | None = None,
                caption_columns: tuple[str, ...] = (), seed: int = 0, keep: tuple[str, list] | None = None,
                keep_row: Callable[[dict], bool] | None = None):
    """This worker's part of a small split read straight from Parquet: of the rows `keep` keeps ((column,
    values); None: all) and `keep_row` keeps (a test on each row's dict), every `world`-th row of one seeded
    permutation, from `rank` on (the workers' parts are disjoint), at most `limit` of them."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.dataset as pds

    row_filter = pds.field(keep[0]).isin(keep[1]) if keep else None
    table = pds.dataset(path, format="parquet").to_table(columns=columns, filter=row_filter)
    if keep_row is not None:  # every worker filters the whole split alike, so their parts stay disjoint
        table = table.filter(pa.array([bool(keep_row(row)) for row in table.to_pylist()], type=pa.bool_()))
    rows = np.random.default_rng(seed).permutation(table.num_rows)[rank::world][:limit]
    return as_dataset(table.take(rows), columns, caption_columns) if len(rows) else None


def seeded_sample(path: str, columns: list[str], limit: int, seed: int):
    """`limit` rows of the Parquet split at `path` drawn at random (seeded), in their order in the split: the
    held-out examples a training stage evaluates on, and the pairs the judge measures a reward model on."""
    import numpy as np
    import pyarrow.dataset as pds

    table = pds.dataset(path, format="parquet").to_table(columns=columns)
    if table.num_rows > limit:
        table = table.take(np.sort(np.random.default_rng(seed).choice(table.num_rows, limit, replace=False)))
    return table


def eval_dataset(path: str, columns: list[str], limit: int, seed: int, caption_columns: tuple[str, ...] = ()):
    """The held-out examples every worker evaluates on: `limit` rows drawn at random (seeded) across
    all evaluation contests. Small by construction, so each worker reads it directly (local or s3://)."""
    return as_dataset(seeded_sample(path, columns, limit, seed), columns, caption_columns)


class ProgressBoard:
    """A Ray actor the rank-0 worker posts its step and latest logs to; the driver's progress bar
    reads it (the driver is blocked in `fit()` and sees nothing else until the run ends)."""

    def __init__(self):
        self.step, self.total, self.logs = 0, None, {}

    def post(self, step: int, total: int, logs: dict | None) -> None:
        self.step, self.total = step, total
        if logs:
            self.logs.update(logs)

    def read(self) -> tuple[int, int | None, dict]:
        return self.step, self.total, self.logs


def quiet_train_reports() -> None:
    """Ray Train logs every report's full metrics from each worker; TensorBoard, the dashboard and the
    progress bar show them already."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train version: its logging stays as it is
        return
    context.logger.setLevel(logging.WARNING)


def _progress_callback(board):
    from transformers import TrainerCallback

    class PostProgress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            board.post.remote(state.global_step, state.max_steps, None)

        def on_log(self, args, state, control, logs=None, **kwargs):
            board.post.remote(state.global_step, state.max_steps, logs)

    return PostProgress()


def _metrics_callback(run_name: str, stage_name: str):
    """The trainer's figures for the Ray dashboard: step, loss, learning rate, tokens/s, evaluations."""
    from transformers import TrainerCallback

    figures = StageMetrics(run_name, stage_name)

    class ExportMetrics(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.since = (time.perf_counter(), state.num_input_tokens_seen)

        def on_step_end(self, args, state, control, **kwargs):
            figures.gauge("train_step", state.global_step, "optimizer steps done")

        def on_log(self, args, state, control, logs=None, **kwargs):
            # Tokens seen are summed over the workers (include_num_input_tokens_seen).
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            if tokens > self.since[1]:
                figures.gauge("train_tokens_per_second", (tokens - self.since[1]) / (now - self.since[0]),
                              "training tokens per second, all workers")
                self.since = (now, tokens)
            for key, value in (logs or {}).items():
                if not isinstance(value, (int, float)):
                    continue
                if key.startswith("eval_"):
                    figures.gauge("train_eval", value, "the latest evaluation on held-out contests", metric=key[5:])
                elif key in ("loss", "learning_rate", "grad_norm"):
                    figures.gauge(f"train_{key}", value, f"the trainer's logged {key}")

    return ExportMetrics()


@dataclasses.dataclass
class WorkerContext:
    """What a Ray Train worker knows about itself, the same for every stage."""
    rank: int
    world: int
    device: Any  # torch.device
    scratch: str  # a private temporary folder
    log: logging.Logger  # "<stage> worker <rank>"
    checkpoint: Any  # the ray.train.Checkpoint to resume from, or None


@contextlib.contextmanager
def started_worker(cfg, name: str):
    """The preamble of every stage's worker loop: logging, torch threads, rank, device, checkpoint. Its scratch
    folder (the trainer's checkpoints, a restored one) goes when the loop ends, failed or not: what lasts is
    reported to the run's storage or written to its output folder."""
    import ray.train
    import ray.train.torch
    import torch

    setup_logging()
    quiet_train_reports()
    torch.set_num_threads(cfg.cpus_per_worker)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    scratch = tempfile.mkdtemp(prefix=f"humor_ray_{name}_")
    try:
        yield WorkerContext(rank=rank, world=context.get_world_size(), device=device, scratch=scratch,
                            log=get_logger(f"{name} worker {rank}"), checkpoint=ray.train.get_checkpoint())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _worker_loop(config: dict) -> None:
    args: WorkerArgs = config["args"]
    with started_worker(args.config, args.stage.name) as worker:
        _train_on_worker(args, worker)


def _train_on_worker(args: WorkerArgs, worker: WorkerContext) -> None:
    cfg, stage = args.config, args.stage
    marks = {**args.marks, "worker_ready": time.time()}
    # TensorBoard events next to the run's outputs, where `tensorboard --logdir` finds them.
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", os.path.join(cfg.output_dir, "tensorboard"))
    # TRL still calls the old gradient-checkpointing names; one warning per call floods the logs.
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)
    if cfg.deepspeed != "none" and not cfg.use_gpu:  # gloo, before the model loads (ZeRO-3 shards it as it loads)
        start_process_group(use_gpu=False)
    train, evaluation = _worker_datasets(args, worker)
    marks["data_ready"] = time.time()
    trainer = _ready_trainer(cfg, stage, worker, args.board, train, evaluation)
    train_on_own_rows(trainer, worker, args.record_rows)
    marks["trainer_ready"] = time.time()
    timer = _loop_timer()
    trainer.add_callback(timer)
    if cfg.do_train:
        trainer.train(resume_from_checkpoint=_resume_from(worker))
        worker.log.info("trained")
    marks.update(timer.marks, trained=time.time(), checkpoint_s=timer.checkpoint_s)
    _save_final_model(cfg, stage, worker, trainer, evaluation, marks)


def _worker_datasets(args: WorkerArgs, worker: WorkerContext):
    """(this worker's training rows, the held-out rows or None)."""
    import ray.train

    cfg, stage = args.config, args.stage
    # A run of N steps needs N * batch * accumulation examples per worker; tokenizing the rest of the
    # shard would only cost time.
    needed = cfg.max_steps * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    columns = list(stage.columns)
    path = split_path(cfg, stage, "train")
    if args.direct_read:  # the driver passed no Ray Data dataset
        train = direct_part(path, columns, worker.rank, worker.world, needed, stage.caption_columns, cfg.seed,
                            stage.train_rows(cfg, path), args.keep_train_row)
    else:
        train = shard_dataset(ray.train.get_dataset_shard("train"), columns, needed, stage.caption_columns,
                              seed=cfg.seed + worker.rank)
    if train is None:
        raise TrainError(f"worker {worker.rank} got no training rows: the {stage.dataset_name(cfg)} train split "
                         "is empty")
    evaluation = (eval_dataset(split_path(cfg, stage, "eval"), columns, cfg.max_eval_examples, cfg.seed,
                               stage.caption_columns) if cfg.do_eval else None)
    worker.log.info(f"data: {len(train):,} train rows, {len(evaluation) if evaluation else 0:,} eval rows")
    return train, evaluation


def _ready_trainer(cfg: TrainConfig, stage: Stage, worker: WorkerContext, board, train, evaluation):
    """The stage's TRL trainer with Ray Train's reporting, the progress board and the metrics export."""
    import transformers
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    transformers.set_seed(cfg.seed)  # new weights (a reward head, LoRA) start the same on every run
    trainer = stage.make_trainer(cfg, train, evaluation, worker.scratch)
    if len(trainer.train_dataset) == 0:
        raise TrainError(f"no training example fits in --max_length {cfg.max_length} tokens; raise it")
    worker.log.info("trainer ready")
    trainer.add_callback(RayTrainReportCallback())
    if worker.rank == 0:  # the logs are the same on every rank
        trainer.add_callback(_progress_callback(board))
        trainer.add_callback(_metrics_callback(cfg.run_name, stage.name))
    trainer.remove_callback(transformers.PrinterCallback)  # the driver's progress bar and TensorBoard show the logs
    return prepare_trainer(trainer)


def train_on_own_rows(trainer, worker: WorkerContext, record_rows: str | None = None) -> None:
    """Each worker trains on all of its own Ray Data shard. Its Hugging Face trainer would shard the rows
    again by rank (accelerate's `BatchSamplerShard` keeps every world-th batch), so with N workers each would
    see 1/N of its rows per epoch, and a run of --max_steps would repeat some and never reach others. The
    training loader is made to yield every batch of the worker's rows; evaluation stays sharded (every
    worker holds the same held-out rows, and the results are gathered)."""
    from accelerate.data_loader import BatchSamplerShard

    build = trainer.get_train_dataloader

    def get_train_dataloader():
        recorder = RecordedRows(trainer.data_collator, os.path.join(record_rows, f"rank{worker.rank}")) \
            if record_rows else None
        collator, trainer.data_collator = trainer.data_collator, recorder or trainer.data_collator
        try:
            loader = build()
        finally:
            trainer.data_collator = collator
        if isinstance(loader.batch_sampler, BatchSamplerShard):
            loader.batch_sampler.num_processes, loader.batch_sampler.process_index = 1, 0
        elif worker.world > 1:
            raise RuntimeError(f"unexpected training loader {type(loader.batch_sampler).__name__}: cannot stop "
                               "it from sharding this worker's rows again")
        if recorder:
            recorder.write_held(loader.dataset)
        return loader

    trainer.get_train_dataloader = get_train_dataloader


class RecordedRows:
    """For tests: a training collator that also appends the rows it is handed to `<prefix>-consumed.jsonl`;
    `write_held` writes every row the loader draws from to `<prefix>-rows.jsonl`."""

    def __init__(self, collate, prefix: str):
        self.collate, self.prefix = collate, prefix
        os.makedirs(os.path.dirname(prefix), exist_ok=True)

    @staticmethod
    def line(row: dict) -> str:
        return json.dumps(row, sort_keys=True, default=str) + "\n"

    def write_held(self, dataset) -> None:
        with open(f"{self.prefix}-rows.jsonl", "w") as handle:
            handle.writelines(self.line(row) for row in dataset)

    def __call__(self, rows: list[dict]):
        with open(f"{self.prefix}-consumed.jsonl", "a") as handle:
            handle.writelines(self.line(row) for row in rows)
        return self.collate(rows)


def _loop_timer():
    """A callback that marks when the training loop began and ended its first step, and adds up the time
    its checkpoints took (from the step's last log or evaluation to the end of Ray Train's report)."""
    from transformers import TrainerCallback

    class LoopTimer(TrainerCallback):
        def __init__(self):
            self.marks, self.checkpoint_s, self.last = {}, 0.0, time.time()

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks["loop_begin"] = self.last = time.time()

        def on_step_end(self, args, state, control, **kwargs):
            self.last = time.time()
            self.marks.setdefault("first_step", self.last)

        def on_log(self, args, state, control, **kwargs):
            self.last = time.time()

        def on_evaluate(self, args, state, control, **kwargs):
            self.last = time.time()

        def on_save(self, args, state, control, **kwargs):  # added last: runs after Ray Train's report
            self.checkpoint_s += time.time() - self.last

    return LoopTimer()


# The phases of a run outside its training loop, from the wall-clock marks the driver and rank 0 take (one
# machine's clock, or clocks a cluster keeps in step): (phase, mark it starts at, mark it ends at).
PHASES = (("cluster", "launch", "cluster_ready"),  # start a local Ray or join one, and the checks before
          ("driver", "cluster_ready", "fit"),  # the dataset's plan, the trainer's set-up
          ("worker start", "fit", "worker_ready"),  # Ray Train's controller, placement, worker processes
          ("dataset", "worker_ready", "data_ready"),  # this worker's training and evaluation rows
          ("model load", "data_ready", "trainer_ready"),  # the model, the tokenized dataset, the trainer
          ("loop start", "trainer_ready", "loop_begin"),  # the trainer's own set-up, a resumed checkpoint
          ("first step", "loop_begin", "first_step"),  # inside the loop: its first step
          ("final evaluation", "trained", "evaluated"),
          ("export", "evaluated", "exported"))  # the final save and the merged model


def outside_loop(marks: dict) -> dict:
    """Seconds per phase (PHASES, and `checkpoint`: the checkpoints inside the loop), from `marks`."""
    timings = {name: round(marks[end] - marks[start], 2) for name, start, end in PHASES
               if start in marks and end in marks}
    timings["checkpoint"] = round(marks.get("checkpoint_s", 0.0), 2)
    return timings


def _resume_from(worker: WorkerContext) -> str | None:
    """A local copy of the checkpoint's Hugging Face folder, when Ray Train restarts or resumes a run."""
    from ray.train.huggingface.transformers import RayTrainReportCallback

    if not worker.checkpoint:
        return None
    # Into this worker's own folder: `as_directory()` shares one temporary folder among the workers of a
    # machine, and when one machine runs several Ray nodes, one node's worker deletes it under the other's.
    restored = worker.checkpoint.to_directory(os.path.join(worker.scratch, "restored"))
    worker.log.info(f"resuming from {worker.checkpoint.path}")
    return os.path.join(restored, RayTrainReportCallback.CHECKPOINT_NAME)


def _save_final_model(cfg: TrainConfig, stage: Stage, worker: WorkerContext, trainer, evaluation,
                      marks: dict) -> None:
    metrics = {}
    if evaluation is not None:
        # The last step's evaluation already ran when --eval_steps divides --max_steps: reuse it.
        last = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), None)
        fresh = last is not None and last["step"] == trainer.state.global_step
        metrics = {k: v for k, v in last.items() if k.startswith("eval_")} if fresh else trainer.evaluate()
    marks["evaluated"] = time.time()
    # Every rank takes part (DeepSpeed gathers); rank 0 alone writes, so it alone clears the folder.
    written = start_final(cfg.output_dir) if worker.rank == 0 else os.path.join(cfg.output_dir, PARTIAL)
    trainer.save_model(written)
    if worker.rank == 0:
        trainer.processing_class.save_pretrained(written)
        # Under ZeRO-3 each worker holds a part of the weights: the merge reloads the base instead.
        live = None if cfg.deepspeed.startswith("zero3") else trainer.model
        serve = save_merged(cfg.base_model(), stage.model_kind, cfg.new_padding_token, written, live)
        marks["exported"] = time.time()
        publish_final(cfg.output_dir, written, serve,
                      {"eval": metrics, "log_history": trainer.state.log_history,
                       "max_length": cfg.max_length,  # what a reward model reads when PPO scores with it
                       "resumed_from": worker.checkpoint.path if worker.checkpoint else None,
                       "timings": outside_loop(marks), "timing_marks": marks})
        worker.log.info(f"final model in {final_model(cfg.output_dir)}")


# ---------------------------------------------------------------- the driver

TRAINER_SHOWN = ("loss", "eval_loss", "eval_accuracy", "eval_rewards/accuracies", "train_tokens_per_second")


def show_progress(board, name: str, stop, shown: tuple[str, ...] = TRAINER_SHOWN) -> None:
    """The driver's progress bar: steps done and the latest of the `shown` logs, until `stop` is set."""
    import sys

    import ray
    from tqdm import tqdm

    bar = None
    while not stop.wait(2.0):
        try:
            step, total, logs = ray.get(board.read.remote(), timeout=10)
        except ray.exceptions.RayError:  # the board is gone (the run is over), or did not answer in time
            break
        if total is None:
            continue
        if bar is None:
            bar = tqdm(total=total, desc=name, unit="step", file=sys.stderr, mininterval=2.0)
        bar.update(step - bar.n)
        bar.set_postfix({k.replace("eval_", "e_"): round(v, 4) for k, v in logs.items()
                         if k in shown and isinstance(v, (int, float))}, refresh=False)
    if bar is not None:
        bar.close()


def absolute_local_paths(cfg, names: tuple[str, ...]) -> None:
    """Workers run in other directories (and on other machines): local paths go to them absolute.
    A `*_dir` option is a path even before it exists; any other option only when it names an existing
    path (a model spec may be a preset or a Hugging Face id instead)."""
    for name in names:
        value = getattr(cfg, name, None)
        if value and "://" not in value and (name.endswith("_dir") or Path(value).exists()):
            setattr(cfg, name, str(Path(value).resolve()))


def fit_with_progress(trainer, board, run_name: str, stage_name: str, shown: tuple[str, ...] = TRAINER_SHOWN):
    """`trainer.fit()` with the driver's progress bar reading `board`; a failed run is a TrainError."""
    import threading

    import ray.train

    stop = threading.Event()
    progress = threading.Thread(target=show_progress, args=(board, run_name, stop, shown), daemon=True)
    progress.start()
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise TrainError(f"{stage_name} failed: {err}") from err
    finally:
        stop.set()
        progress.join()


def run_trainer(loop: Callable[[dict], None], args: WorkerArgs, stage_name: str, *, shown=TRAINER_SHOWN,
                datasets: dict | None = None, checkpoint_config=None, resources: dict | None = None):
    """`loop` on `--num_workers` Ray Train workers, each given `args` (and the progress board this starts) and
    reserving `resources` (default: the stage's `humor_ray.placement` plan): storage, the checkpoints kept,
    restarts after failures, the driver's progress bar."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from humor_ray.train.ray_trainer import StageTrainer

    cfg = args.config
    run_config = RunConfig(name=cfg.run_name, storage_path=cfg.storage_path or os.path.join(cfg.output_dir, "ray"),
                           checkpoint_config=checkpoint_config or CheckpointConfig(num_to_keep=cfg.save_total_limit),
                           failure_config=FailureConfig(max_failures=cfg.max_failures))
    resources = resources or train_plan(stage_name, cfg).trainer_resources()
    board = ray.remote(num_cpus=0)(ProgressBoard).remote()
    trainer = StageTrainer(loop, train_loop_config={"args": dataclasses.replace(args, board=board)},
                           scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                                        resources_per_worker=resources),
                           run_config=run_config, datasets=datasets)
    try:
        return fit_with_progress(trainer, board, cfg.run_name, stage_name, shown)
    finally:
        ray.kill(board)


def launch(stage: Stage, cfg: TrainConfig, keep_train_row: Callable[[dict], bool] | None = None):
    """Run a TRL stage on Ray Train; resumes from the run's latest checkpoint when rerun. `keep_train_row`:
    which training rows to keep, decided before the rows are split among the workers."""
    from ray.train import CheckpointConfig

    from humor_ray.cluster import init_ray
    from humor_ray.plan import check_before_start

    marks = {"launch": time.time()}
    setup_logging()
    absolute_local_paths(cfg, ("output_dir", "dataset_dir", "model_name", "model_checkpoint_name", "images"))
    cfg.run_name = cfg.run_name or stage.name
    require_complete(cfg.dataset_dir)
    for split in ("train", "eval") if cfg.do_eval else ("train",):
        path = split_path(cfg, stage, split)
        if "://" not in path and not os.path.isdir(path):
            raise TrainError(f"{path} not found: run `humor-ray data build` first")
    check_before_start(stage.name, cfg)  # a role that cannot fit its GPU stops here, before Ray starts
    os.makedirs(cfg.output_dir, exist_ok=True)
    init_ray(dashboard=True)
    check_cluster(train_plan(stage.name, cfg))  # a cluster too small is one line, before anything loads
    marks["cluster_ready"] = time.time()
    direct = read_directly(split_path(cfg, stage, "train"))
    datasets = None if direct else {"train": stream_split(cfg, stage, keep_train_row)}
    metric, order = stage.best_metric if cfg.do_eval else (None, "max")
    # With evaluation the kept checkpoints are the best by the stage's metric (the newest is always kept
    # too, for resuming); without it, the newest ones.
    kept = CheckpointConfig(num_to_keep=cfg.save_total_limit, checkpoint_score_attribute=metric,
                            checkpoint_score_order=order)
    log = get_logger(stage.name)
    log.info(f"{cfg.num_workers} worker(s), model {cfg.base_model()}, {cfg.max_steps} steps -> "
             f"{cfg.output_dir}")
    marks["fit"] = time.time()
    args = WorkerArgs(config=cfg, stage=stage, record_rows=os.environ.get("HUMOR_RAY_RECORD_TRAIN_ROWS"),
                      marks=marks, direct_read=direct, keep_train_row=keep_train_row if direct else None)
    result = run_trainer(_worker_loop, args, stage.name, datasets=datasets, checkpoint_config=kept)
    summary = record_teardown(cfg.output_dir, marks["launch"])
    shown = {k: round(v, 4) for k, v in summary["eval"].items() if isinstance(v, (int, float))}
    log.info(f"done: {final_model(cfg.output_dir)}  eval {shown}")
    timings = summary["timings"]
    log.info(f"{timings['outside_loop']:.1f} s outside the training loop: "
             + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items() if name != "outside_loop"))
    return result


def stream_split(cfg: TrainConfig, stage: Stage, keep_train_row: Callable[[dict], bool] | None = None):
    """The training split as a Ray Data dataset, for Ray Train to shard across the workers; `keep_train_row`
    filters it before it is split, so every worker gets as many rows."""
    import ray.data
    from ray.data.expressions import col

    # Same seed, same rows in the same order (block order is shuffled, then kept).
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    path = split_path(cfg, stage, "train")
    train = ray.data.read_parquet(path)
    keep = stage.train_rows(cfg, path)
    if keep:
        train = train.filter(expr=col(keep[0]).is_in(keep[1]))
    train = train.select_columns(list(stage.columns))
    if keep_train_row is not None:
        train = train.filter(keep_train_row)
    return train.randomize_block_order(seed=cfg.seed)


def record_teardown(output_dir: str, launched: float) -> dict:
    """Adds the driver's part to metrics.json's `timings` (rank 0 wrote the rest): `teardown`, from the
    export to `fit()` returning, and `outside_loop`, the run's wall time less the training loop's."""
    summary = json.loads(Path(output_dir, "metrics.json").read_text())
    now = time.time()
    timings = summary["timings"]
    if "exported" in summary.get("timing_marks", {}):
        timings["teardown"] = round(now - summary["timing_marks"]["exported"], 2)
    loop = max((e.get("train_runtime", 0.0) for e in summary["log_history"]), default=0.0)
    timings["outside_loop"] = round(now - launched - loop, 2)
    rewrite_record(output_dir, summary)
    return summary
