"""Rollout engines: vLLM against Hugging Face `generate`, same model, prompts and decoding, in one run;
then the share of a PPO step spent syncing weights to the engines.

    python bench/rollout.py --datasets DIR [--model smollm2-135m] [--prompts 32] [--samples 4] [--repeats 3]

The workload is PPO's (and generation's): the long prompts of real contests (instruction + cartoon
description), several captions per prompt, the paper's decoding (temperature 0.7, top-p 0.95, repetition
penalty 1.15), stopping at the first newline. Each engine is a Ray actor with the machine's cores;
figures are medians over --repeats after one warm-up call. Engine start-up is reported apart.
DIR holds the datasets of `humor-ray data build` (prompts/train is used).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import pyarrow.dataset as pds


def measure_engine(kind: str, model_dir: str, prompts: list[str], args) -> dict:
    import ray

    from humor_ray.engines import Decoding, start_engines

    decoding = Decoding(max_new_tokens=args.max_new_tokens)
    started = time.perf_counter()
    engine, = start_engines(kind, model_dir, 1, num_cpus=os.cpu_count() or 1, seed=args.seed)
    ray.get(engine.version.remote())
    startup = time.perf_counter() - started
    ray.get(engine.generate.remote(prompts[:2], 1, decoding))  # warm-up
    runs = []
    for _ in range(args.repeats):
        began = time.perf_counter()
        samples = ray.get(engine.generate.remote(prompts, args.samples, decoding))
        seconds = time.perf_counter() - began
        tokens = sum(len(s.completion_ids) for s in samples)
        runs.append((seconds, len(samples) / seconds, tokens / seconds))
    ray.kill(engine)
    return {"startup_s": startup, "seconds": statistics.median(r[0] for r in runs),
            "captions_per_s": statistics.median(r[1] for r in runs),
            "tokens_per_s": statistics.median(r[2] for r in runs)}


def ppo_sync_share(args, model: str) -> dict:
    """A short PPO run with the vLLM engine: the median share of step time spent in weight sync."""
    from humor_ray.rl import ppo

    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as out:
        ppo.run(ppo.Config(output_dir=out, dataset_dir=args.datasets, reward_model="builtin:vowel_share",
                           model_name=model, max_steps=args.ppo_steps, rollout_batch_size=8, samples_per_prompt=4,
                           mini_batch_size=8, forward_batch_size=8, max_new_tokens=args.max_new_tokens,
                           save_steps=args.ppo_steps, report_to=["none"], max_failures=0))
        history = json.loads(open(os.path.join(out, "metrics.json")).read())["history"][1:]  # step 1 warms up
    phases = ("generate", "score", "reference", "train", "sync")
    return {"step_s": statistics.median(m["time/step"] for m in history),
            **{p: statistics.median(m[f"time/{p}"] / m["time/step"] for m in history) for p in phases}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ppo_steps", type=int, default=6)
    parser.add_argument("--ppo_models", nargs="*", default=["tiny"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from humor_ray.cluster import init_ray
    from humor_ray.models import registry

    table = pds.dataset(os.path.join(args.datasets, "prompts", "train"), format="parquet").to_table()
    prompts = [p for p in table["prompt_long"].to_pylist() if p][: args.prompts]
    model_dir = registry.resolve(args.model)
    init_ray()
    print(f"model {args.model}, {len(prompts)} real prompts x {args.samples} captions, up to "
          f"{args.max_new_tokens} new tokens, {os.cpu_count()} cores, median of {args.repeats}", flush=True)
    results = {kind: measure_engine(kind, model_dir, prompts, args) for kind in ("hf", "vllm")}
    print(f"\n{'engine':<8}{'start-up s':>12}{'batch s':>10}{'captions/s':>12}{'tokens/s':>11}")
    for kind, r in results.items():
        print(f"{kind:<8}{r['startup_s']:>12.1f}{r['seconds']:>10.2f}{r['captions_per_s']:>12.2f}{r['tokens_per_s']:>11.1f}")
    print(f"vLLM / HF generate: {results['vllm']['captions_per_s'] / results['hf']['captions_per_s']:.2f}x captions/s, "
          f"{results['vllm']['tokens_per_s'] / results['hf']['tokens_per_s']:.2f}x tokens/s", flush=True)
    shares = {model: ppo_sync_share(args, model) for model in args.ppo_models}
    print(f"\nPPO step (vLLM engine, {args.ppo_steps - 1} steps after the first, medians): share of step time")
    phases = ("generate", "score", "reference", "train", "sync")
    print(f"{'policy':<14}{'step s':>8}" + "".join(f"{p:>11}" for p in phases))
    for model, s in shares.items():
        print(f"{model:<14}{s['step_s']:>8.2f}" + "".join(f"{s[p]:>10.1%} " for p in ("generate", "score", "reference",
                                                                                     "train", "sync")))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
