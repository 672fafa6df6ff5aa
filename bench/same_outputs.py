"""Fingerprints of what humor_ray produces, to check that a refactor changed no output: every dataset
of a data build of real contests, and the logged figures of seeded short runs of each training stage.

    python bench/same_outputs.py --output DIR            # writes DIR/fingerprint.json
    python bench/same_outputs.py --compare A.json B.json # prints what differs; exit 1 if anything does

Datasets are compared row for row (each split's rows, sorted, hashed). Training runs are compared by
their logged losses and metrics, rounded to 4 significant digits (thread scheduling can move the last bits
of a float sum on CPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

import humor_ray
from humor_ray.config import data_root

ROOT = Path(humor_ray.__file__).resolve().parent.parent  # the checkout under test: its jobs/
CONTESTS = "53[06]_LilUCB.csv"  # one train and one evaluation contest of the paper's splits
RUNS = {  # stage -> (job spec, flags that keep it short)
    "sft": ("jobs/sft-tiny.yaml", ["--max_steps", "10", "--logging_steps", "2", "--eval_steps", "10",
                                   "--save_steps", "10"]),
    "rm": ("jobs/rm-minilm.yaml", ["--max_steps", "6", "--logging_steps", "2", "--eval_steps", "6",
                                   "--save_steps", "6", "--max_eval_examples", "64"]),
    "dpo": ("jobs/dpo-tiny.yaml", ["--max_steps", "6", "--logging_steps", "2", "--eval_steps", "6",
                                   "--save_steps", "6"]),
    "ppo": ("jobs/ppo-tiny.yaml", ["--max_steps", "6", "--save_steps", "6"]),
    "llava": ("jobs/llava-tiny.yaml", ["--max_steps", "6", "--logging_steps", "2", "--eval_steps", "6",
                                       "--save_steps", "6"]),
}


def humor_ray(*args: str) -> None:
    env = dict(os.environ, HUMOR_RAY_DATA=str(data_root()))  # job specs name ${HUMOR_RAY_DATA}/images
    subprocess.run([sys.executable, "-m", "humor_ray", *args], check=True, cwd=ROOT, env=env)


def dataset_hashes(datasets: Path) -> dict[str, str]:
    hashes = {}
    for split_dir in sorted(p for p in datasets.glob("*/*") if p.is_dir()):
        files = sorted(split_dir.rglob("*.parquet"))
        if not files:
            continue
        rows = [json.dumps(row, sort_keys=True, default=str) for f in files for row in pq.read_table(f).to_pylist()]
        digest = hashlib.sha256("\n".join(sorted(rows)).encode()).hexdigest()[:16]
        hashes[str(split_dir.relative_to(datasets))] = f"{len(rows)} rows {digest}"
    return hashes


def rounded(value):
    if isinstance(value, float) and math.isfinite(value):
        return 0.0 if abs(value) < 1e-4 else float(f"{value:.4g}")  # below that, float noise (a log-prob gap)
    return value


# Wall-clock figures and recoveries (an engine restarted under load) differ from run to run.
VARYING = ("runtime", "per_second", "seconds", "time", "grad_norm", "restarts", "retries")


def comparable(entry: dict) -> dict:
    return {k: rounded(v) for k, v in entry.items() if not any(word in k for word in VARYING)}


def logged_figures(run_dir: Path) -> list[dict]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return [comparable(entry) for entry in metrics.get("log_history") or metrics["history"]]  # Trainer / PPO


def fingerprint(output: Path) -> dict:
    data = data_root()
    datasets = output / "datasets"
    if not (datasets / "report.json").is_file():  # a rerun into the same folder reuses finished parts
        humor_ray("data", "build", "--input", str(data / "summaries" / CONTESTS), "--output", str(datasets),
                  "--splits", str(data / "benchmarks" / "humor_in_ai_splits.json"),
                  "--descriptions", str(data / "descriptions" / "humor_in_ai_prompt_descriptions.csv"),
                  "--images", str(data / "images"))
    result = {"datasets": dataset_hashes(datasets), "runs": {}}
    for stage, (spec, flags) in RUNS.items():
        run_dir = output / stage
        if not (run_dir / "metrics.json").is_file():
            humor_ray(stage, "--config", spec, "--dataset_dir", str(datasets), "--output_dir", str(run_dir),
                      "--seed", "7", *flags)
        result["runs"][stage] = logged_figures(run_dir)
    return result


def compare(before: dict, after: dict) -> int:
    differences = 0
    for section in ("datasets", "runs"):
        for name in sorted(set(before[section]) | set(after[section])):
            old, new = before[section].get(name), after[section].get(name)
            if section == "runs" and old and new:
                old, new = [comparable(e) for e in old], [comparable(e) for e in new]
            same = old == new
            differences += not same
            print(f"{'same     ' if same else 'DIFFERENT'} {section}/{name}" + ("" if same else f"\n  before {old}\n"
                                                                                     f"  after  {new}"))
    print(f"{differences} difference(s)")
    return 1 if differences else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="folder for the datasets, the runs and fingerprint.json")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        sys.exit(compare(*(json.loads(Path(p).read_text()) for p in args.compare)))
    output = Path(args.output)
    os.makedirs(output, exist_ok=True)
    result = fingerprint(output)
    (output / "fingerprint.json").write_text(json.dumps(result, indent=1))
    print(f"{len(result['datasets'])} dataset splits, {len(result['runs'])} runs -> {output / 'fingerprint.json'}")


if __name__ == "__main__":
    main()
