"""How long a CPU vLLM engine takes to start and answer its first request with log-probs (as a PPO rollout or a
judge asks), the way `humor_ray.engines.VLLMEngine` runs it, against the same engine without each of its two
start-up cuts, in the same run:
- the imported heap frozen before the engine starts (gc.freeze: vLLM collects garbage five times while starting);
- dynamo off (`humor_ray.engines.CPU_EAGER_ENV`): vLLM compiles a few sampling helpers with torch.compile on their
  first call, from the compile cache when it holds them, else as C++ (a fresh machine, timed with an empty cache).

    python bench/engine_start.py [--model tiny] [--repeats 3]

Each side runs in a fresh process, as an engine actor does: the process imports vLLM (counted in `process` only),
builds the engine (`start`) and samples 4 captions for 2 prompts with log-probs (`first request`). The sides
alternate, so drift in the machine hits each alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from humor_ray.engines import CPU_EAGER_ENV, vllm_env

# One engine in a process of its own. With argv[2] "0", gc.freeze does nothing.
ENGINE = """
import gc, json, os, sys, time
from humor_ray.engines import Decoding, VLLMEngine
from humor_ray.models import registry
path = registry.resolve(sys.argv[1])
import vllm.entrypoints.llm  # the imports, outside `start`
if sys.argv[2] == "0":
    gc.freeze = lambda: None
wall = time.perf_counter()
engine = VLLMEngine(path, seed=0)
start = time.perf_counter() - wall
wall = time.perf_counter()
engine.generate(["A cat walks into a bar."] * 2, 4, Decoding(max_new_tokens=8, seed=1))
print(json.dumps({"start": start, "first request": time.perf_counter() - wall}))
"""

SIDES = {  # name: (heap frozen, dynamo off, empty compile cache)
    "ours": (True, True, False),
    "freeze off": (False, True, False),
    "compile, cached": (True, False, False),
    "compile, empty cache": (True, False, True),
}


def run_side(model: str, frozen: bool, eager: bool, empty_cache: bool) -> dict:
    # An engine actor of one CPU, as generation stages run them, with the environment the actors get.
    env = {**os.environ, **vllm_env(gpu=False), "OMP_NUM_THREADS": "1"}
    if not eager:
        for name in CPU_EAGER_ENV:
            env.pop(name)
    with tempfile.TemporaryDirectory(prefix="engine_start_") as cache:
        if empty_cache:
            env["TORCHINDUCTOR_CACHE_DIR"] = cache
        wall = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", ENGINE, model, "1" if frozen else "0"], capture_output=True,
                              text=True, env=env, check=True)
        process = time.perf_counter() - wall
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process": process}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs = {name: [] for name in SIDES}
    for _ in range(args.repeats):
        for name, side in SIDES.items():
            runs[name].append(run_side(args.model, *side))
    keys = ("start", "first request", "process")
    print(f"\nCPU vLLM engine, {args.model}, one thread, median of {args.repeats} (s)")
    print(f"{'':22}" + "".join(f"{key:>15}" for key in keys))
    medians = {name: {key: statistics.median(run[key] for run in side) for key in keys} for name, side in runs.items()}
    for name, median in medians.items():
        print(f"{name:22}" + "".join(f"{median[key]:>15.2f}" for key in keys))
    ours = medians["ours"]
    for name in list(SIDES)[1:]:
        print(f"ours / {name}: " + ", ".join(f"{key} {ours[key] / medians[name][key]:.2f}x" for key in keys))
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
