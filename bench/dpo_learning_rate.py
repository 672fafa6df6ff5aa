"""DPO's learning rate on a laptop: the same short DPO run from the same SFT at each learning rate (same pairs,
same order, same seed), printing side by side what TRL logs on the training pairs (loss, reward margin, reward
accuracy: the mean over the second half of the steps) and the held-out figures of the final evaluation.

    python bench/dpo_learning_rate.py --datasets DIR --sft RUN/final --output DIR \
        [--spec jobs/dpo-smollm2.yaml] [--rates 5e-5 5e-4 2e-3] [--steps 10] [--eval_examples 48]

DIR is the output of `humor-ray data build`; RUN/final the simple-prompt SFT the study's DPO starts from. A run
whose metrics.json exists under --output is kept (--output/lr-RATE).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

TRAIN = (("loss", "loss"), ("rewards/margins", "margin"), ("rewards/accuracies", "accuracy"))
HELD_OUT = (("eval_loss", "loss"), ("eval_rewards/margins", "margin"), ("eval_rewards/accuracies", "accuracy"))


def train(args, rate: str, run: Path) -> dict:
    if not (run / "metrics.json").is_file():
        steps = str(args.steps)
        subprocess.run([sys.executable, "-m", "humor_ray", "dpo", "--config", args.spec, "--dataset_dir", args.datasets,
                        "--model_checkpoint_name", args.sft, "--output_dir", str(run), "--learning_rate", rate,
                        "--max_steps", steps, "--eval_steps", steps, "--save_steps", steps, "--logging_steps", "1",
                        "--max_eval_examples", str(args.eval_examples)], check=True)
    return json.loads((run / "metrics.json").read_text())


def second_half(history: list[dict], key: str) -> float:
    values = [e[key] for e in history if key in e and "eval_loss" not in e]
    return statistics.mean(values[len(values) // 2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", required=True)
    parser.add_argument("--sft", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--spec", default="jobs/dpo-smollm2.yaml")
    parser.add_argument("--rates", nargs="+", default=["5e-5", "5e-4", "2e-3"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eval_examples", type=int, default=48)
    args = parser.parse_args()
    metrics = {rate: train(args, rate, Path(args.output) / f"lr-{rate}") for rate in args.rates}
    print(f"\nDPO from {args.sft}, {args.steps} steps ({args.spec}); training pairs: mean of the second half of the "
          f"steps; held-out: {args.eval_examples} pairs at the end")
    header = "".join(f"{'train ' + name:>16}" for _, name in TRAIN) + "".join(f"{'held-out ' + name:>19}"
                                                                              for _, name in HELD_OUT)
    print(f"{'learning rate':>14}{header}")
    for rate, run in metrics.items():
        cells = "".join(f"{second_half(run['log_history'], key):16.4f}" for key, _ in TRAIN)
        cells += "".join(f"{run['eval'][key]:19.4f}" for key, _ in HELD_OUT)
        print(f"{rate:>14}{cells}")


if __name__ == "__main__":
    main()
