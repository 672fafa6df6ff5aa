"""How long a `humor-ray` training command takes from its start to the end of checking its options (flags, paths and
model specs: `humor_ray.config.parse_config`), as it does now (model specs checked by humor_ray.models.specs, no
torch) against the same with the model registry imported as the check used to (torch and transformers), in the
same run.

    python bench/command_start.py [--repeats 5]

Each side is a fresh Python process timed from outside, interpreter start included; the sides alternate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

CHECK = """
import sys
from humor_ray.config import parse_config
from humor_ray.train import sft
if sys.argv[2] == "1":
    import humor_ray.models.registry  # what the model check imported before
parse_config(sft.Config, ["--output_dir", sys.argv[1], "--dataset_dir", sys.argv[1], "--model_name", "tiny"],
             "humor-ray sft")
"""


def seconds(folder: str, with_registry: bool) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", CHECK, folder, "1" if with_registry else "0"], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sides = {"specs only (ours)": [], "registry imported": []}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            sides["specs only (ours)"].append(seconds(folder, False))
            sides["registry imported"].append(seconds(folder, True))
    print(f"\n`humor-ray sft` options checked, from process start (s, median of {args.repeats})")
    medians = {name: statistics.median(runs) for name, runs in sides.items()}
    for name, median in medians.items():
        print(f"{name:22}{median:>8.2f}")
    print(f"saved per command: {medians['registry imported'] - medians['specs only (ours)']:.2f} s")
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
