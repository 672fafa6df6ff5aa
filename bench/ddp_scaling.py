"""Data-parallel scaling on this machine: the SFT stage with 2 Ray Train workers (DDP over gloo) against
1 worker, each worker one CPU thread and the same per-worker batch, in the same run; and 1 worker with
every core as the alternative use of the same machine.

    python bench/ddp_scaling.py --datasets DIR [--model tiny] [--steps 60] [--repeats 3]
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path

from humor_ray.train import sft
from train_overhead import config, run_options, steady_tokens_per_second


def tokens_per_second(args, workers: int, threads: int) -> float:
    with tempfile.TemporaryDirectory(prefix=f"ddp_{workers}x{threads}_") as out:
        sft.run(config(args, out, workers, threads))
        history = json.loads(Path(out, "metrics.json").read_text())["log_history"]
    return steady_tokens_per_second(history, args.warmup)  # tokens of all workers together


def main() -> None:
    args = run_options(__doc__.splitlines()[0]).parse_args()
    cores = os.cpu_count()
    layouts = {"1 worker x 1 thread": (1, 1), "2 workers x 1 thread": (2, 1), f"1 worker x {cores} threads": (1, cores)}
    runs = {name: [] for name in layouts}
    for _ in range(args.repeats):
        for name, (workers, threads) in layouts.items():
            runs[name].append(tokens_per_second(args, workers, threads))
    base = statistics.median(runs["1 worker x 1 thread"])
    print(f"\n{args.model}, {args.steps} steps, {args.batch} examples per worker per step, {cores} cores, "
          f"median of {args.repeats}")
    print(f"{'':26}{'tokens/s (all workers)':>24}{'vs 1 worker':>14}")
    for name in layouts:
        value = statistics.median(runs[name])
        print(f"{name:26}{value:>24,.0f}{value / base:>13.2f}x")


if __name__ == "__main__":
    main()
