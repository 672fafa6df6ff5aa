"""A judge that is not the optimiser's own reward model: the paper's released generations judged by the
CPU reward model trained on every training contest (the judge before `--contest_fold`) beside the same
recipe trained on each of two folds of the training contests, on the same held-out pairs.

    python bench/judge_folds.py --datasets DIR --output DIR [--max_steps 80]

DIR is the output of `humor-ray data build` (with pairs, prompts and references). Trains three reward models
with jobs/rm-minilm.yaml (`rm-all`, `rm-1of2`, `rm-2of2` under --output; a run whose metrics.json exists is
kept), judges the released generations with each (`judge-rm-*`), then prints their held-out accuracies, the
judges' reliability blocks, and raw and length-controlled win rates against human top-10 side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from humor_ray.config import data_root
from humor_ray.eval.benchmark import reliability_lines

RUNS = {"rm-all": None, "rm-1of2": "1/2", "rm-2of2": "2/2"}


def humor_ray(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "humor_ray", *args], check=True)


def train_and_judge(datasets: str, output: Path, max_steps: int) -> None:
    for name, fold in RUNS.items():
        run = output / name
        if not (run / "metrics.json").is_file():
            steps = str(max_steps)
            humor_ray("rm", "--config", "jobs/rm-minilm.yaml", "--dataset_dir", datasets, "--output_dir", str(run),
                      "--max_steps", steps, "--eval_steps", steps, "--save_steps", steps,
                      *(["--contest_fold", fold] if fold else []))
        judged = output / f"judge-{name}"
        if not (judged / "winrates.json").is_file():
            humor_ray("judge", "--dataset_dir", datasets, "--generations",
                      str(data_root() / "benchmarks" / "humor_in_ai_examples"), "--judge", "rm", "--reward_model",
                      str(run), "--reward_max_length", "128", "--output_dir", str(judged))


def report(output: Path) -> None:
    summaries = {name: json.loads((output / f"judge-{name}" / "winrates.json").read_text()) for name in RUNS}
    for name in RUNS:
        metrics = json.loads((output / name / "metrics.json").read_text())
        held = metrics.get("held_out", {})
        contests = metrics.get("train_contests")
        print(f"{name}: fold {metrics.get('contest_fold') or 'all'} "
              f"({len(contests) if contests else 'all'} training contests), held-out accuracy "
              f"{held.get('accuracy', float('nan')):.3f} on {held.get('pairs')} pairs (seed {held.get('seed')})")
    for name, summary in summaries.items():
        print(f"\njudged by {name}:")
        print("\n".join(reliability_lines(summary["reliability"])))
        print(f"  includes chance: {summary['reliability']['includes_chance']}")
    print("\nwin rate vs human top-10, raw / length-controlled (%), 95% CI; mean words per caption")
    print(f"{'method':<11}{'words':>6}" + "".join(f"{name:>44}" for name in RUNS))
    lengths = summaries["rm-all"]["lengths"]
    for method in sorted({r["method"] for r in summaries["rm-all"]["win_rates"]}):
        cells = []
        for summary in summaries.values():
            r = next(r for r in summary["win_rates"] if r["method"] == method and r["against"] == "top10")
            cells.append(f"{100 * r['win_rate']:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}] / "
                         f"{100 * r['lc_win_rate']:.1f} [{100 * r['lc_ci_low']:.1f}, {100 * r['lc_ci_high']:.1f}]")
        print(f"{method:<11}{lengths[method]:6.1f}" + "".join(f"{c:>44}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--max_steps", type=int, default=80)
    args = parser.parse_args()
    os.chdir(Path(__file__).resolve().parent.parent)  # the job specs are named relative to the checkout
    output = Path(args.output).resolve()
    train_and_judge(os.path.abspath(args.datasets), output, args.max_steps)
    report(output)


if __name__ == "__main__":
    main()
