"""`humor-ray serve` (Ray Serve + vLLM) against the former hand-written server (`bench/hf_server.py`:
Hugging Face `generate`, one request at a time), side by side in one run on the same model and prompts.

    python bench/serve.py [--model smollm2-135m] [--requests 32] [--max_tokens 32] [--cpus 2]

Each server gets one untimed warm-up request, then --requests chat requests of --max_tokens tokens are sent
all at once (concurrency = --requests) with the OpenAI client. The servers run one after the other, each
with the same --cpus (the old server's torch threads; the vLLM replica's CPUs), so neither shares the
cores with the other. Printed: requests/s, completion tokens/s, p50/p95 latency of each, and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import openai

from hf_server import running_server as running_hf_server  # bench/ is on a script's path
from humor_ray.serve import ServeConfig, free_port, running_server

SCENES = ["a whale in a business meeting", "two cavemen at a laptop", "a dog at a therapist's office",
          "a knight at a drive-through", "penguins in an elevator", "a snail on a treadmill",
          "a robot at a bakery", "a giraffe in a cubicle"]


def chat_requests(count: int, max_tokens: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Write a funny caption for a New Yorker cartoon of "
                                                      f"{SCENES[i % len(SCENES)]} (variant {i})."}],
             "max_tokens": max_tokens, "temperature": 0.7, "top_p": 0.95, "seed": i} for i in range(count)]


async def send_all(base_url: str, model: str, requests: list[dict]) -> dict:
    """All requests at once; wall time, per-request latencies and completion tokens."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)

    async def one(request: dict) -> tuple[float, int]:
        began = time.perf_counter()
        answer = await client.chat.completions.create(model=model, **request)
        return time.perf_counter() - began, answer.usage.completion_tokens

    began = time.perf_counter()
    results = await asyncio.gather(*(one(request) for request in requests))
    wall = time.perf_counter() - began
    await client.close()
    latencies = sorted(latency for latency, _ in results)
    return {"wall": wall, "rps": len(requests) / wall, "tokens_per_s": sum(t for _, t in results) / wall,
            "p50": statistics.median(latencies), "p95": latencies[max(0, round(0.95 * len(latencies)) - 1)],
            "tokens": sum(t for _, t in results)}


def measure(base_url: str, model: str, requests: list[dict]) -> dict:
    asyncio.run(send_all(base_url, model, requests[:1]))  # warm-up: first-call costs are not serving speed
    return asyncio.run(send_all(base_url, model, requests))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    requests = chat_requests(args.requests, args.max_tokens)

    with running_hf_server(args.model, threads=args.cpus, in_subprocess=True) as url:
        old = measure(url, args.model, requests)
    cfg = ServeConfig(model=args.model, port=free_port(), cpus_per_replica=args.cpus)
    with running_server(cfg) as url:
        new = measure(url, args.model, requests)

    print(f"\n{args.requests} concurrent chat requests of {args.max_tokens} tokens, {args.model}, {args.cpus} CPUs "
          "per server")
    print(f"{'server':<34}{'req/s':>8}{'tok/s':>8}{'p50 s':>8}{'p95 s':>8}{'wall s':>8}{'tokens':>8}")
    for name, run in (("hand-written (HF generate, lock)", old), ("Ray Serve + vLLM", new)):
        print(f"{name:<34}{run['rps']:>8.2f}{run['tokens_per_s']:>8.1f}{run['p50']:>8.2f}{run['p95']:>8.2f}"
              f"{run['wall']:>8.2f}{run['tokens']:>8}")
    print(f"speed-up: {new['rps'] / old['rps']:.1f}x requests/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
