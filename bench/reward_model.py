"""Reward-model quality on the real data: train the CPU reward model (jobs/rm-minilm.yaml) on the
train contests' preference pairs and report pairwise accuracy on held-out contests' pairs, with the
training time, next to simple baselines scored on the very same held-out pairs.

    python bench/reward_model.py --datasets DIR [--max_steps N] [--output DIR]

DIR is the output of `humor-ray data build --config jobs/data.yaml`; built into the output folder
when not given. The paper's 7B reward model reached about 0.70 on this task.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from humor_ray.config import parse_config
from humor_ray.train import rm
from humor_ray.train.launcher import eval_dataset

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "jobs/rm-minilm.yaml"


def held_out_pairs(datasets: str, cfg: rm.Config):
    """The held-out pairs a reward model of `cfg` is scored on: its seeded sample of pairs/eval."""
    return eval_dataset(os.path.join(datasets, "pairs", "eval"), list(rm.STAGE.columns), cfg.max_eval_examples,
                        cfg.seed)


def length_baselines(held_out) -> tuple[float, float]:
    """(longer caption wins, shorter caption wins) on `held_out`; a tie counts half."""
    chosen_len = np.array([len(c) for c in held_out["chosen"]])
    rejected_len = np.array([len(c) for c in held_out["rejected"]])
    longer = float(np.mean(np.where(chosen_len == rejected_len, 0.5, chosen_len > rejected_len)))
    shorter = float(np.mean(np.where(chosen_len == rejected_len, 0.5, chosen_len < rejected_len)))
    return longer, shorter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", help="datasets from `humor-ray data build` (default: build them)")
    parser.add_argument("--output", default="/tmp/humor_ray_bench/reward_model")
    parser.add_argument("--max_steps", type=int, help="override the job spec's steps")
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)
    datasets = args.datasets or os.path.join(args.output, "datasets")
    if not os.path.isfile(os.path.join(datasets, "report.json")):
        subprocess.run([sys.executable, "-m", "humor_ray", "data", "build", "--config", str(ROOT / "jobs/data.yaml"),
                        "--output", datasets, "--datasets", "pairs"], check=True)
    run_dir = os.path.join(args.output, f"run-{int(time.time())}")
    flags = ["--config", str(RECIPE), "--dataset_dir", datasets, "--output_dir", run_dir]
    if args.max_steps:
        flags += ["--max_steps", str(args.max_steps)]
    cfg = parse_config(rm.Config, flags, "bench")

    started = time.perf_counter()
    rm.run(cfg)
    wall = time.perf_counter() - started
    metrics = json.loads(Path(run_dir, "metrics.json").read_text())
    train_seconds = max(e.get("train_runtime", 0) for e in metrics["log_history"])
    curve = sorted({e["step"]: e["eval_accuracy"] for e in metrics["log_history"] if "eval_accuracy" in e}.items())

    # Baselines on exactly the held-out pairs the model was scored on (same sample, same seed).
    held_out = held_out_pairs(datasets, cfg)
    longer, shorter = length_baselines(held_out)

    print(f"\nreward model: {cfg.model_name}, {cfg.max_steps} steps x {cfg.per_device_train_batch_size} pairs, "
          f"{len(held_out):,} held-out pairs from {len(set(held_out['prompt']))} eval contests")
    print(f"{'':34}{'pairwise accuracy':>18}")
    print(f"{'chance':34}{0.5:>18.3f}")
    print(f"{'longer caption wins':34}{longer:>18.3f}")
    print(f"{'shorter caption wins':34}{shorter:>18.3f}")
    for step, accuracy in curve:
        print(f"{f'reward model, step {step}':34}{accuracy:>18.3f}")
    print(f"{'paper (7B RM, no context)':34}{'~0.70':>18}")
    print(f"training {train_seconds:.0f} s ({train_seconds / cfg.max_steps:.2f} s/step), end to end {wall:.0f} s "
          f"on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
