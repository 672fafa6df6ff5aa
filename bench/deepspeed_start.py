"""How long a CPU trainer worker's DeepSpeed process group takes to start on a machine that has never run DeepSpeed
(an empty torch extensions folder): ours (`humor_ray.train.deepspeed_presets.start_process_group`, plain gloo)
against DeepSpeed's own `init_distributed`, which first compiles its shared-memory all-reduce op, in the same run.

    python bench/deepspeed_start.py [--repeats 2]

Each start runs in a fresh process of world size 1 whose DeepSpeed is already imported; the sides alternate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from humor_ray.serve import free_port

START = """
import json, sys, time
import deepspeed
from humor_ray.train.deepspeed_presets import start_process_group
wall = time.perf_counter()
if sys.argv[1] == "ours":
    start_process_group(use_gpu=False)
else:
    deepspeed.init_distributed(dist_backend="gloo")
print(json.dumps({"seconds": time.perf_counter() - wall}))
"""


def start(side: str) -> float:
    with tempfile.TemporaryDirectory(prefix="deepspeed_start_") as extensions:
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                   WORLD_SIZE="1", TORCH_EXTENSIONS_DIR=extensions)
        done = subprocess.run([sys.executable, "-c", START, side], capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    sides = {"ours (gloo alone)": [], "DeepSpeed's own": []}
    for _ in range(args.repeats):
        sides["ours (gloo alone)"].append(start("ours"))
        sides["DeepSpeed's own"].append(start("deepspeed"))
    print(f"\nDeepSpeed process group on CPUs, empty extensions folder, median of {args.repeats} (s)")
    medians = {name: statistics.median(runs) for name, runs in sides.items()}
    for name, seconds in medians.items():
        print(f"{name:22}{seconds:>8.2f}")
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
