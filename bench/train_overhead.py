"""Ray Train overhead: the SFT stage through the launcher (1 Ray Train worker) against plain
single-process TRL with the same model, trainer, data and steps, in the same run.

    python bench/train_overhead.py --datasets DIR [--model tiny] [--steps 60] [--repeats 3] [--ray_defaults]

Steady-state tokens/s is measured between the log at step --warmup and the last step, from the
trainer's own logs (tokens seen, time since training began), so start-up stays out of it; the time
outside the training loop (start-up, data, the final save) is reported separately, and for Ray Train
phase by phase, from the `timings` the run itself records in its metrics.json (the driver and rank 0):
once starting its own local cluster, as a lone command does, and once joining one already running, as each
stage of the demo or the study does. `--ray_defaults` adds a fourth side, the same Ray Train run as Ray Train
comes: its own settings instead of the ones a local cluster gets (`humor_ray.cluster.LOCAL_TRAIN_ENV`), and every
helper actor it starts for a run (`humor_ray.train.ray_trainer.StageTrainer` leaves two out), to show what those
changes save.
DIR holds the datasets of `humor-ray data build` (sft_simple is used).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from humor_ray.cluster import LOCAL_TRAIN_ENV
from humor_ray.train import sft
from humor_ray.train.launcher import as_dataset


def steady_tokens_per_second(log_history: list[dict], warmup: int) -> float:
    """Tokens per second between the first log at or after step `warmup` and the last log."""
    logs = [e for e in log_history if "loss" in e and "num_input_tokens_seen" in e and "train_runtime" in e]
    first = next(e for e in logs if e["step"] >= warmup)
    last = logs[-1]
    tokens = last["num_input_tokens_seen"] - first["num_input_tokens_seen"]
    return tokens / (last["train_runtime"] - first["train_runtime"])


def config(args, output_dir: str, workers: int = 1, threads: int | None = None) -> sft.Config:
    """The SFT run every training benchmark times: the same steps, batch and data, no evaluation,
    one save at the end (outside the steady-state window)."""
    return sft.Config(output_dir=output_dir, dataset_dir=args.datasets, model_name=args.model, simple_prompt=True,
                      max_steps=args.steps, logging_steps=1, save_steps=args.steps, do_eval=False,
                      per_device_train_batch_size=args.batch, max_length=256, max_failures=0, report_to=["none"],
                      num_workers=workers, cpus_per_worker=threads or args.threads)


def run_options(description: str) -> argparse.ArgumentParser:
    """The options every training benchmark shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--datasets", required=True)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ray_defaults", action="store_true",
                        help="also time the Ray Train run as Ray Train comes: its defaults for LOCAL_TRAIN_ENV's "
                             "settings, and every helper actor")
    return parser


# Ray Train's own defaults for the settings a local cluster changes.
RAY_TRAIN_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2.0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}


def run_on_ray(args, env: dict | None = None, running: bool = False, stock: bool = False
               ) -> tuple[float, float, dict]:
    """(steady tokens/s, seconds outside the loop, the run's own `timings`); `env`: settings for this run only
    (the local cluster it starts, and its workers, inherit them); `running`: the run joins a cluster started
    before it (as a stage of the demo or the study does), not one it starts itself; `stock`: with every helper
    actor Ray Train starts (TorchTrainer's own callbacks)."""
    import ray
    from ray.train.torch import TorchTrainer

    from humor_ray.cluster import init_ray
    from humor_ray.train.ray_trainer import StageTrainer

    saved = {key: os.environ.get(key) for key in LOCAL_TRAIN_ENV}
    os.environ.update(env or {})
    ours = StageTrainer._create_default_callbacks
    if stock:
        StageTrainer._create_default_callbacks = TorchTrainer._create_default_callbacks
    with tempfile.TemporaryDirectory(prefix="overhead_ray_") as out:
        if running:
            init_ray(dashboard=True)
        started = time.perf_counter()
        try:
            sft.run(config(args, out))
        finally:
            wall = time.perf_counter() - started
            ray.shutdown()  # each run starts (or joins) its cluster itself, as a user's command does
            StageTrainer._create_default_callbacks = ours
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        summary = json.loads(Path(out, "metrics.json").read_text())
    history = summary["log_history"]
    return (steady_tokens_per_second(history, args.warmup), wall - max(e.get("train_runtime", 0) for e in history),
            summary.get("timings", {}))


def run_plain(args) -> tuple[float, float]:
    """What a user would write without Ray: read the Parquet, build the same TRL trainer, train, save."""
    import pyarrow.dataset as pds
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="overhead_plain_") as out:
        cfg = config(args, out)
        started = time.perf_counter()
        table = pds.dataset(os.path.join(args.datasets, "sft_simple", "train"), format="parquet").to_table(
            columns=list(sft.STAGE.columns))
        count = cfg.max_steps * cfg.per_device_train_batch_size
        rows = np.random.default_rng(cfg.seed).permutation(table.num_rows)[:count]
        train = as_dataset(table.take(rows), list(sft.STAGE.columns), sft.STAGE.caption_columns)
        trainer = sft.STAGE.make_trainer(cfg, train, None, out)
        trainer.train()
        trainer.save_model(os.path.join(out, "final"))
        wall = time.perf_counter() - started
    history = trainer.state.log_history
    return (steady_tokens_per_second(history, args.warmup), wall - max(e.get("train_runtime", 0) for e in history),
            {})


def print_phases(sides: dict[str, list[dict]]) -> None:
    """The Ray Train runs' own phase timings, medians over the runs, a column per side."""
    names = list(sides)
    phases = [name for name in sides[names[0]][0] if name != "outside_loop"] + ["outside_loop"]
    print("\nRay Train, outside the training loop by phase (s, median; first step and checkpoint are inside it):")
    print(f"  {'':20}" + "".join(f"{name:>34}" for name in names))
    for phase in phases:
        print(f"  {phase:20}" + "".join(f"{statistics.median(run.get(phase, 0.0) for run in sides[name]):>34.1f}"
                                        for name in names))


def main() -> None:
    args = run_options(__doc__.splitlines()[0]).parse_args()
    results = {"plain TRL (1 process)": [], "Ray Train (1 worker)": [], "Ray Train, cluster running": []}
    if args.ray_defaults:
        results["Ray Train, Ray's defaults"] = []
    for _ in range(args.repeats):  # interleaved, so drift in the machine hits every side alike
        results["plain TRL (1 process)"].append(run_plain(args))
        results["Ray Train (1 worker)"].append(run_on_ray(args))
        results["Ray Train, cluster running"].append(run_on_ray(args, running=True))
        if args.ray_defaults:
            results["Ray Train, Ray's defaults"].append(run_on_ray(args, RAY_TRAIN_DEFAULTS, stock=True))
    print(f"\n{args.model}, {args.steps} steps x {args.batch} examples, {args.threads} threads, "
          f"median of {args.repeats}")
    print(f"{'':30}{'steady tokens/s':>16}{'outside training (s)':>22}")
    medians = {}
    for name, runs in results.items():
        medians[name] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
        print(f"{name:30}{medians[name][0]:>16,.0f}{medians[name][1]:>22.1f}")
    plain, ray = medians["plain TRL (1 process)"], medians["Ray Train (1 worker)"]
    print(f"Ray Train / plain: tokens/s {ray[0] / plain[0]:.3f}; extra start-up and shutdown {ray[1] - plain[1]:.1f} s")
    print_phases({name: [r[2] for r in runs] for name, runs in results.items() if name.startswith("Ray Train")})
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
