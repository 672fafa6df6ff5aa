"""What the Ray-dashboard figures cost: `humor-ray data build` on the real data with the metrics export on and
off (`HUMOR_RAY_METRICS=0`), alternating so that both see the same machine load. The build's own timings
(report.json `seconds`: pass 1, pass 2, total without Ray start-up) are compared; target: within 2%.

Usage: .venv/bin/python bench/metrics_overhead.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from humor_ray.config import data_root  # noqa: E402


def build_seconds(metrics: bool, output: Path) -> float:
    """The build's own time (without Ray start-up) of one run, from its report."""
    data = data_root()
    env = dict(os.environ, HUMOR_RAY_METRICS="1" if metrics else "0")
    env.pop("RAY_ADDRESS", None)
    subprocess.run([sys.executable, "-m", "humor_ray", "data", "build", "--input", str(data / "summaries"),
                    "--output", str(output), "--splits", str(data / "benchmarks" / "humor_in_ai_splits.json"),
                    "--descriptions", str(data / "descriptions" / "humor_in_ai_prompt_descriptions.csv")],
                   env=env, cwd=REPO, check=True, capture_output=True, text=True)
    seconds = json.loads((output / "report.json").read_text())["seconds"]
    return seconds["total"] - seconds["ray_start"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    times = {True: [], False: []}
    with tempfile.TemporaryDirectory() as scratch:
        for i in range(args.repeats):
            for metrics in (True, False):
                times[metrics].append(build_seconds(metrics, Path(scratch) / f"run-{i}-{metrics}"))
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"data build (real data, median of {args.repeats}, without Ray start-up): metrics on {on:.2f} s, "
          f"off {off:.2f} s, overhead {100 * (on - off) / off:+.1f}%")


if __name__ == "__main__":
    main()
