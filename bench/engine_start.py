"""How long a vLLM engine takes to start once its libraries are imported, with the imported heap frozen (what
`humor_ray.engines.VLLMEngine` does) against the same engine with the freeze turned off, in the same run.

    python bench/engine_start.py [--model tiny] [--repeats 5]

Each start runs in a fresh process, as an engine actor does: the process imports vLLM (not timed), then builds
the engine (timed: wall and CPU seconds). The two sides alternate, so drift in the machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

# One engine start, in a process of its own. With `frozen` false, gc.freeze does nothing for this start.
START = """
import gc, json, os, sys, time
from humor_ray.engines import VLLM_ENV, VLLMEngine
os.environ.update(VLLM_ENV)  # as the engine actors get them
from humor_ray.models import registry
path = registry.resolve(sys.argv[1])
import vllm.entrypoints.llm  # the imports, outside the timing
if sys.argv[2] == "0":
    gc.freeze = lambda: None
wall, cpu = time.perf_counter(), time.process_time()
VLLMEngine(path, seed=0)
print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}))
"""


def start(model: str, frozen: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # an engine actor of one CPU, as generation stages run them
    done = subprocess.run([sys.executable, "-c", START, model, "1" if frozen else "0"], capture_output=True,
                          text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sides = {"heap frozen (ours)": [], "freeze off": []}
    for _ in range(args.repeats):
        sides["heap frozen (ours)"].append(start(args.model, True))
        sides["freeze off"].append(start(args.model, False))
    print(f"\nvLLM engine start, {args.model}, one thread, median of {args.repeats} (s)")
    print(f"{'':22}{'wall':>8}{'cpu':>8}")
    medians = {}
    for name, runs in sides.items():
        medians[name] = {key: statistics.median(run[key] for run in runs) for key in ("wall", "cpu")}
        print(f"{name:22}{medians[name]['wall']:>8.2f}{medians[name]['cpu']:>8.2f}")
    ours, off = medians["heap frozen (ours)"], medians["freeze off"]
    print(f"frozen / off: wall {ours['wall'] / off['wall']:.2f}x, cpu {ours['cpu'] / off['cpu']:.2f}x")
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
