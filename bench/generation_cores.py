"""Generation on a laptop: the vLLM engine actor as it was (one CPU, so one compute thread, and 4 contests a
call) against the defaults (this machine's cores, 8 contests a call), in the same run on the same contests.

    python bench/generation_cores.py --datasets DIR [--model smollm2-135m] [--contests 16] [--n 10] [--repeats 2]

Each side is one `humor-ray generate` run (engine start, model load and every caption: what a user waits
for), alternated side by side --repeats times; it prints each run's captions per second and the medians'
ratio. DIR holds the datasets of `humor-ray data build` (prompts/eval is used).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from humor_ray.cluster import init_ray, local_cores
from humor_ray.infer import generate


def one_run(args, settings: dict, output_dir: str) -> float:
    cfg = generate.GenerateConfig(dataset_dir=args.datasets, output_dir=output_dir, model_name=args.model,
                                  n=args.n, max_contests=args.contests, seed=args.seed, overwrite=True, **settings)
    summary = generate.run(cfg)
    return summary["captions"] / summary["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--contests", type=int, default=16)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args()
    init_ray()
    default = generate.GenerateConfig(dataset_dir=args.datasets, output_dir="unused")
    sides = {"1 CPU, 4 a call": {"cpus_per_engine": 1, "batch_size": 4},
             f"{generate.placement_plan(default).role('engine').cpus} CPUs, {default.batch_size} a call": {}}
    rates: dict[str, list[float]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for number, (name, settings) in enumerate(sides.items()):
                rate = one_run(args, settings, os.path.join(scratch, f"{repeat}-{number}"))
                rates[name].append(rate)
                print(f"run {repeat + 1} {name}: {rate:.2f} captions/s", flush=True)
    print(f"\n{args.model}, {args.contests} contests x {args.n} captions, {local_cores()} cores, "
          f"median of {args.repeats}:")
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, value in medians.items():
        print(f"  {name:>18}: {value:.2f} captions/s")
    before, after = medians.values()
    print(f"  defaults / as it was: {after / before:.2f}x")


if __name__ == "__main__":
    main()
