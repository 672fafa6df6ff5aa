"""One Ray Train launcher for every training stage (sft, rm, dpo).

A stage is a small module with a config dataclass (a `TrainConfig` subclass), the dataset it reads
and a `make_trainer` that builds its TRL trainer inside a worker. Everything else is here, once:
Ray Train scaling, storage, checkpoints and automatic restarts; streaming the Parquet datasets to
the workers through Ray Data shards; LoRA and DeepSpeed; resuming; the final Hugging Face export.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from humor_ray.config import UserError, field

DEEPSPEED_PRESETS = ("none", "zero2", "zero3", "zero3_offload")


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
        if self.deepspeed not in DEEPSPEED_PRESETS and not self.deepspeed.endswith(".json"):
            raise ValueError(f"--deepspeed must be one of {DEEPSPEED_PRESETS} or a .json file")
        if self.save_steps % self.eval_steps and self.do_eval:
            raise ValueError("--save_steps must be a multiple of --eval_steps, so every checkpoint has fresh "
                             "evaluation metrics")


def deepspeed_config(preset: str, use_gpu: bool) -> dict | str | None:
    """A DeepSpeed config for the HF Trainer ("auto" values are filled from the training args)."""
    if preset == "none":
        return None
    if preset.endswith(".json"):
        return preset
    stage = 2 if preset == "zero2" else 3
    zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if stage == 3:
        # Needed for a normal Hugging Face checkpoint at save time.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if preset == "zero3_offload":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    return {"zero_optimization": zero, "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}


def hf_args(cfg: TrainConfig, args_class, output_dir: str, **extra):
    """The TRL/transformers arguments that follow from the shared options."""
    evaluate = cfg.do_eval
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
        ddp_backend=None if cfg.use_gpu else "gloo", dataloader_num_workers=0, disable_tqdm=True,
        accelerator_config={"dispatch_batches": False}, **extra)


def lora_config(cfg: TrainConfig, task_type: str):
    if cfg.lora_r <= 0:
        return None
    from peft import LoraConfig

    targets = cfg.lora_targets[0] if cfg.lora_targets == ["all-linear"] else cfg.lora_targets
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=targets, lora_dropout=0.0,
                      task_type=task_type)


# ---------------------------------------------------------------- inside a worker

def shard_dataset(shard, columns: list[str], limit: int | None = None):
    """This worker's part of a Ray Data dataset as an in-memory Hugging Face dataset (Arrow, no copy
    into Python objects). Each worker holds only its own shard; `limit` keeps the first rows."""
    import datasets
    import pyarrow as pa

    batches, count = [], 0
    for batch in shard.iter_batches(batch_size=4096, batch_format="pyarrow"):
        # Parquet hands back dictionary-encoded text; the tokenizers want plain strings.
        batches.append(pa.table({c: batch[c].cast(pa.string()) for c in columns}))
        count += batch.num_rows
        if limit is not None and count >= limit:
            break
    if not batches:
        return None
    table = pa.concat_tables(batches)
    return datasets.Dataset(table.slice(0, limit) if limit is not None else table)


def _worker_loop(config: dict) -> None:
    import ray.train
    import torch
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    stage = importlib.import_module(config.pop("_stage_module"))
    cfg = stage.Config(**config)
    # TensorBoard events next to the run's outputs, where `tensorboard --logdir` finds them.
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", os.path.join(cfg.output_dir, "tensorboard"))
    torch.set_num_threads(cfg.cpus_per_worker)
    context = ray.train.get_context()
    if cfg.deepspeed in ("zero3", "zero3_offload") and not cfg.use_gpu:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    started = time.perf_counter()
    rank = context.get_world_rank()

    def note(message: str) -> None:
        print(f"[{stage.NAME} worker {rank}] {message} ({time.perf_counter() - started:.1f} s)", flush=True)

    # A run of N steps needs N * batch * accumulation examples per worker; reading and tokenizing the
    # rest of the shard would only cost time (the driver shuffles block order, so they mix contests).
    needed = cfg.max_steps * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    train = shard_dataset(ray.train.get_dataset_shard("train"), stage.COLUMNS, needed)
    evaluation = (shard_dataset(ray.train.get_dataset_shard("eval"), stage.COLUMNS, cfg.max_eval_examples)
                  if cfg.do_eval else None)
    note(f"data: {len(train):,} train rows, {len(evaluation) if evaluation else 0:,} eval rows")
    scratch = tempfile.mkdtemp(prefix=f"humor_ray_{stage.NAME}_")
    trainer = stage.make_trainer(cfg, train, evaluation, scratch)
    note("trainer ready")
    trainer.add_callback(RayTrainReportCallback())
    trainer = prepare_trainer(trainer)
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as restored:
            resume = os.path.join(scratch, "resumed")
            shutil.copytree(os.path.join(restored, RayTrainReportCallback.CHECKPOINT_NAME), resume)
    if cfg.do_train:
        trainer.train(resume_from_checkpoint=resume)
        note("trained")
    metrics = trainer.evaluate() if evaluation is not None else {}
    final = os.path.join(cfg.output_dir, "final")
    trainer.save_model(final)  # every rank takes part (DeepSpeed gathers); rank 0 writes
    if context.get_world_rank() == 0:
        trainer.processing_class.save_pretrained(final)
        stage.export(cfg, trainer, final)
        with open(os.path.join(cfg.output_dir, "metrics.json"), "w") as handle:
            json.dump({"eval": metrics, "log_history": trainer.state.log_history}, handle, indent=1)


# ---------------------------------------------------------------- the driver

def launch(stage_module: str, cfg: TrainConfig):
    """Run a stage on Ray Train; resumes from the run's latest checkpoint when rerun."""
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from humor_ray.cluster import init_ray

    stage = importlib.import_module(stage_module)
    cfg.output_dir = str(Path(cfg.output_dir).resolve()) if "://" not in cfg.output_dir else cfg.output_dir
    cfg.run_name = cfg.run_name or stage.NAME
    os.makedirs(cfg.output_dir, exist_ok=True)
    init_ray()
    data = {}
    for split in ("train", "eval"):
        path = os.path.join(cfg.dataset_dir, stage.dataset_name(cfg), split)
        if not os.path.isdir(path) and "://" not in path:
            if split == "train" or cfg.do_eval:
                raise TrainError(f"{path} not found: run `humor-ray data build` first")
            continue
        data[split] = ray.data.read_parquet(path, columns=["contest", *stage.COLUMNS])
        if split == "train":
            data[split] = data[split].randomize_block_order(seed=cfg.seed)
    storage = cfg.storage_path or os.path.join(cfg.output_dir, "ray")
    run_config = RunConfig(
        name=cfg.run_name, storage_path=storage,
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.save_total_limit),
        failure_config=FailureConfig(max_failures=cfg.max_failures))
    loop_config = dict(dataclasses.asdict(cfg), _stage_module=stage_module)
    scaling = ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})})
    trainer = TorchTrainer(_worker_loop, train_loop_config=loop_config, scaling_config=scaling,
                           run_config=run_config, datasets=data,
                           dataset_config=DataConfig(datasets_to_split=["train"]))
    print(f"[{stage.NAME}] {cfg.num_workers} worker(s), model {cfg.model_name}, {cfg.max_steps} steps -> "
          f"{cfg.output_dir}", file=sys.stderr, flush=True)
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise TrainError(f"{stage.NAME} failed: {err}") from None
