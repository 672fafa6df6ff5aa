"""One Ray Train launcher for every training stage (sft, rm, dpo).

A stage is a small module that declares:
- `NAME`, `COLUMNS` (the dataset columns it reads), `CAPTION_COLUMNS` (the ones that follow the prompt
  and get a separating space), `MODEL_KIND` ("causal_lm" or "reward"), `BEST_METRIC` (name, "min"/"max");
- `Config`, a `TrainConfig` subclass, and `dataset_name(cfg)`;
- `make_trainer(cfg, train, evaluation, scratch)`, building its TRL trainer inside a worker. It creates
  the training arguments BEFORE loading the model: under ZeRO-3 the arguments set up DeepSpeed's
  partitioned loading, which must be in place when the weights are read.
Everything else is here, once: Ray Train scaling, storage, checkpoints and automatic restarts;
streaming the Parquet datasets to the workers through Ray Data shards; LoRA and DeepSpeed; resuming;
the progress bar; the final Hugging Face export.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

from humor_ray.config import UserError, field
from humor_ray.metrics import StageMetrics
from humor_ray.train.export import save_merged

DEEPSPEED_PRESETS = ("none", "zero2", "zero3", "zero3_offload")


def check_deepspeed(value: str) -> None:
    """The `--deepspeed` option of every trainer: a preset or a DeepSpeed JSON file."""
    if value not in DEEPSPEED_PRESETS and not value.endswith(".json"):
        raise ValueError(f"--deepspeed must be one of {DEEPSPEED_PRESETS} or a .json file")


class TrainError(UserError):
    """A training run that cannot start or finish; the message says why."""


@dataclasses.dataclass
class TrainConfig:
    """Options every training stage shares (TRL's names where TRL has one)."""
    output_dir: str = field(None, "where checkpoints, logs and the final model go")
    dataset_dir: str = field(None, "the output of `humor-ray data build`")
    model_name: str = field("tiny", "a preset (tiny, smollm2-135m, minilm), a Hugging Face id or a local path")
    run_name: str | None = field(None, "name of the run in Ray and TensorBoard (default: the stage name)")
    do_train: bool = field(True, "train")
    do_eval: bool = field(True, "evaluate on the held-out contests during and after training")
    max_steps: int = field(100, "optimizer steps")
    learning_rate: float = field(1.41e-5, "peak learning rate")
    per_device_train_batch_size: int = field(8, "examples per worker per micro-batch")
    gradient_accumulation_steps: int = field(1, "micro-batches per optimizer step")
    max_length: int = field(512, "tokens per example, at most")
    seed: int = field(2024, "seed for weights, LoRA and data order")
    logging_steps: int = field(10, "log every this many steps")
    eval_steps: int = field(50, "evaluate every this many steps")
    save_steps: int = field(50, "checkpoint every this many steps")
    save_total_limit: int = field(2, "checkpoints kept")
    max_eval_examples: int = field(1000, "held-out examples used per evaluation")
    new_padding_token: bool = field(False, "add a real pad token and resize the embeddings")
    lora_r: int = field(0, "LoRA rank; 0 trains every weight")
    lora_alpha: int = field(16, "LoRA alpha")
    lora_targets: list[str] = field(["all-linear"], "modules LoRA adapts")
    num_workers: int = field(1, "Ray Train workers (data-parallel)")
    use_gpu: bool = field(False, "one GPU per worker")
    cpus_per_worker: int = field(1, "CPUs each worker reserves (and its torch threads)")
    deepspeed: str = field("none", "none, zero2, zero3, zero3_offload, or a DeepSpeed JSON file")
    report_to: list[str] = field(["tensorboard"], "tensorboard, mlflow, wandb or none")
    max_failures: int = field(2, "worker failures Ray Train recovers from by restarting from the last checkpoint")
    storage_path: str | None = field(None, "Ray Train storage (local or s3://); default <output_dir>/ray")

    def __post_init__(self):
        if not self.output_dir or not self.dataset_dir:
            raise ValueError("training needs --output_dir and --dataset_dir")
        check_deepspeed(self.deepspeed)
        if self.save_steps % self.eval_steps and self.do_eval:
            raise ValueError("--save_steps must be a multiple of --eval_steps, so every checkpoint has fresh "
                             "evaluation metrics")
        if self.num_workers < 1 or self.max_steps < 1:
            raise ValueError("--num_workers and --max_steps must be at least 1")
        trackers = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}
        for tracker in self.report_to:
            if tracker != "none" and tracker not in trackers:
                raise ValueError(f"--report_to {tracker}: use tensorboard, mlflow, wandb or none")
            if tracker in trackers and importlib.util.find_spec(trackers[tracker]) is None:
                raise ValueError(f"--report_to {tracker} needs the {trackers[tracker]} package: "
                                 f"pip install {trackers[tracker]}")

    def base_model(self) -> str:
        """The model training starts from (DPO may start from an SFT output instead)."""
        return self.model_name


def zero_optimization(preset: str, use_gpu: bool) -> dict:
    """The `zero_optimization` section of a DeepSpeed preset (zero2, zero3, zero3_offload)."""
    stage = 2 if preset == "zero2" else 3
    zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if stage == 3:
        # Needed for a normal Hugging Face checkpoint at save time.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if preset == "zero3_offload":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    return zero


def deepspeed_config(preset: str, use_gpu: bool) -> dict | str | None:
    """A DeepSpeed config for the HF Trainer ("auto" values are filled from the training args)."""
    if preset == "none":
        return None
    if preset.endswith(".json"):
        return preset
    return {"zero_optimization": zero_optimization(preset, use_gpu),
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}


def hf_args(cfg: TrainConfig, args_class, output_dir: str, **extra):
    """The TRL/transformers arguments that follow from the shared options."""
    import torch.distributed

    evaluate = cfg.do_eval
    # Inside Ray Train the process group exists already (gloo on CPU); a single plain process has none.
    distributed_cpu = not cfg.use_gpu and torch.distributed.is_initialized()
    return args_class(
        output_dir=output_dir, run_name=cfg.run_name, max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, seed=cfg.seed, data_seed=cfg.seed,
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, eval_strategy="steps" if evaluate else "no",
        eval_steps=cfg.eval_steps if evaluate else None,
        report_to=[r for r in cfg.report_to if r != "none"],
        bf16=cfg.use_gpu, use_cpu=not cfg.use_gpu, deepspeed=deepspeed_config(cfg.deepspeed, cfg.use_gpu),
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


def split_path(cfg: TrainConfig, stage, split: str) -> str:
    return os.path.join(cfg.dataset_dir, stage.dataset_name(cfg), split)


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


def eval_dataset(path: str, columns: list[str], limit: int, seed: int, caption_columns: tuple[str, ...] = ()):
    """The held-out examples every worker evaluates on: `limit` rows drawn at random (seeded) across
    all evaluation contests. Small by construction, so each worker reads it directly (local or s3://)."""
    import numpy as np
    import pyarrow.dataset as pds

    table = pds.dataset(path, format="parquet").to_table(columns=columns)
    if table.num_rows > limit:
        rows = np.sort(np.random.default_rng(seed).choice(table.num_rows, limit, replace=False))
        table = table.take(rows)
    return as_dataset(table, columns, caption_columns)


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
    import logging

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


def _worker_loop(config: dict) -> None:
    import ray.train
    import torch
    import transformers
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    stage = importlib.import_module(config.pop("_stage_module"))
    board = config.pop("_progress_board")
    cfg = stage.Config(**config)
    quiet_train_reports()
    # TensorBoard events next to the run's outputs, where `tensorboard --logdir` finds them.
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", os.path.join(cfg.output_dir, "tensorboard"))
    torch.set_num_threads(cfg.cpus_per_worker)
    # TRL still calls the old gradient-checkpointing names; one warning per call floods the logs.
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    if cfg.deepspeed in ("zero3", "zero3_offload") and not cfg.use_gpu:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    started = time.perf_counter()

    def note(message: str) -> None:
        print(f"[{stage.NAME} worker {rank}] {message} ({time.perf_counter() - started:.1f} s)", flush=True)

    # A run of N steps needs N * batch * accumulation examples per worker; tokenizing the rest of the
    # shard would only cost time.
    needed = cfg.max_steps * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    train = shard_dataset(ray.train.get_dataset_shard("train"), stage.COLUMNS, needed, stage.CAPTION_COLUMNS,
                          seed=cfg.seed + rank)
    if train is None:
        raise TrainError(f"worker {rank} got no training rows: the {stage.dataset_name(cfg)} train split is empty")
    evaluation = (eval_dataset(split_path(cfg, stage, "eval"), stage.COLUMNS, cfg.max_eval_examples, cfg.seed,
                               stage.CAPTION_COLUMNS) if cfg.do_eval else None)
    note(f"data: {len(train):,} train rows, {len(evaluation) if evaluation else 0:,} eval rows")
    scratch = tempfile.mkdtemp(prefix=f"humor_ray_{stage.NAME}_")
    transformers.set_seed(cfg.seed)  # new weights (a reward head, LoRA) start the same on every run
    trainer = stage.make_trainer(cfg, train, evaluation, scratch)
    if len(trainer.train_dataset) == 0:
        raise TrainError(f"no training example fits in --max_length {cfg.max_length} tokens; raise it")
    note("trainer ready")
    trainer.add_callback(RayTrainReportCallback())
    if rank == 0:  # the logs are the same on every rank
        trainer.add_callback(_progress_callback(board))
        trainer.add_callback(_metrics_callback(cfg.run_name, stage.NAME))
    trainer.remove_callback(transformers.PrinterCallback)  # the driver's progress bar and TensorBoard show the logs
    trainer = prepare_trainer(trainer)
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        # Into this worker's own folder: `as_directory()` shares one temporary folder among the workers of a
        # machine, and when one machine runs several Ray nodes, one node's worker deletes it under the other's.
        restored = checkpoint.to_directory(os.path.join(scratch, "restored"))
        resume = os.path.join(restored, RayTrainReportCallback.CHECKPOINT_NAME)
        note(f"resuming from {checkpoint.path}")
    if cfg.do_train:
        trainer.train(resume_from_checkpoint=resume)
        note("trained")
    metrics = {}
    if evaluation is not None:
        # The last step's evaluation already ran when --eval_steps divides --max_steps: reuse it.
        last = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), None)
        fresh = last is not None and last["step"] == trainer.state.global_step
        metrics = {k: v for k, v in last.items() if k.startswith("eval_")} if fresh else trainer.evaluate()
    final = os.path.join(cfg.output_dir, "final")
    trainer.save_model(final)  # every rank takes part (DeepSpeed gathers); rank 0 writes
    if rank == 0:
        trainer.processing_class.save_pretrained(final)
        serve = save_merged(cfg.base_model(), stage.MODEL_KIND, cfg.new_padding_token, final)
        with open(os.path.join(cfg.output_dir, "metrics.json"), "w") as handle:
            json.dump({"eval": metrics, "log_history": trainer.state.log_history, "model": serve,
                       "resumed_from": checkpoint.path if checkpoint else None}, handle, indent=1)
        note(f"final model in {serve}")


# ---------------------------------------------------------------- the driver

TRAINER_SHOWN = ("loss", "eval_loss", "eval_accuracy", "eval_rewards/accuracies", "train_tokens_per_second")


def show_progress(board, name: str, stop, shown: tuple[str, ...] = TRAINER_SHOWN) -> None:
    """The driver's progress bar: steps done and the latest of the `shown` logs, until `stop` is set."""
    import ray
    from tqdm import tqdm

    bar = None
    while not stop.wait(2.0):
        try:
            step, total, logs = ray.get(board.read.remote(), timeout=10)
        except Exception:  # the board is gone: the run is over
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
        raise TrainError(f"{stage_name} failed: {err}") from None
    finally:
        stop.set()
        progress.join()


def launch(stage_module: str, cfg: TrainConfig):
    """Run a stage on Ray Train; resumes from the run's latest checkpoint when rerun."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from humor_ray.cluster import init_ray

    stage = importlib.import_module(stage_module)
    absolute_local_paths(cfg, ("output_dir", "dataset_dir", "model_name", "model_checkpoint_name", "images"))
    cfg.run_name = cfg.run_name or stage.NAME
    for split in ("train", "eval") if cfg.do_eval else ("train",):
        path = split_path(cfg, stage, split)
        if "://" not in path and not os.path.isdir(path):
            raise TrainError(f"{path} not found: run `humor-ray data build` first")
    os.makedirs(cfg.output_dir, exist_ok=True)
    init_ray(dashboard=True)
    # Same seed, same rows in the same order (block order is shuffled, then kept).
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    train = ray.data.read_parquet(split_path(cfg, stage, "train")).select_columns(stage.COLUMNS)
    train = train.randomize_block_order(seed=cfg.seed)
    storage = cfg.storage_path or os.path.join(cfg.output_dir, "ray")
    metric, order = stage.BEST_METRIC if cfg.do_eval else (None, "max")
    run_config = RunConfig(
        name=cfg.run_name, storage_path=storage,
        # With evaluation the kept checkpoints are the best by the stage's metric (the newest is always
        # kept too, for resuming); without it, the newest ones.
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.save_total_limit, checkpoint_score_attribute=metric,
                                           checkpoint_score_order=order),
        failure_config=FailureConfig(max_failures=cfg.max_failures))
    board = ray.remote(num_cpus=0)(ProgressBoard).remote()
    loop_config = dict(dataclasses.asdict(cfg), _stage_module=stage_module, _progress_board=board)
    scaling = ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})})
    trainer = TorchTrainer(_worker_loop, train_loop_config=loop_config, scaling_config=scaling,
                           run_config=run_config, datasets={"train": train})
    print(f"[{stage.NAME}] {cfg.num_workers} worker(s), model {cfg.base_model()}, {cfg.max_steps} steps -> "
          f"{cfg.output_dir}", file=sys.stderr, flush=True)
    try:
        result = fit_with_progress(trainer, board, cfg.run_name, stage.NAME)
    finally:
        ray.kill(board)
    summary = json.loads(Path(cfg.output_dir, "metrics.json").read_text())
    shown = {k: round(v, 4) for k, v in summary["eval"].items() if isinstance(v, (int, float))}
    print(f"[{stage.NAME}] done: {summary['model']}  eval {shown}", file=sys.stderr, flush=True)
    return result
