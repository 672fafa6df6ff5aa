"""The judge client's concurrency and cache against a local OpenAI-compatible server with realistic
API latency.

    python bench/judge.py [--requests 2000] [--sequential 50] [--concurrency 64] [--latency_ms 200]

Judge-like requests (a short pairwise prompt, max_tokens=1, logprobs with top_logprobs=5) go to the
`tiny` model served in its own process (`bench/hf_server.py`), which sleeps `latency_ms` per request as a
remote API's network and queueing time would. Three runs after one untimed warm-up request:
(a) sequential (concurrency 1) on the first --sequential requests, extrapolated to all of them (a full
sequential run would take minutes of sleeping); (b) --concurrency on all; (a) and (b) start from fresh
temporary caches; (c) (b) again on (b)'s cache, which must send nothing.

The table gives the CPU time per request of the client (this process) and of the server too: (b) hides
the latency, so its speed is bounded by that CPU, and it drops when other work shares the cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import psutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from humor_ray.eval.client import JudgeClient
from hf_server import running_server  # bench/ is on the path of a script in it

SCENES = ["a whale in a business meeting", "two cavemen at a laptop", "a dog at a therapist's office",
          "a knight at a drive-through", "penguins in an elevator", "a snail on a treadmill"]


def judge_requests(count: int) -> list[dict]:
    """Distinct pairwise judging prompts, as an LLM judge of caption contests sends them."""
    return [{
        "messages": [
            {"role": "system", "content": "You judge New Yorker cartoon caption contest entries."},
            {"role": "user", "content": f"Cartoon: {SCENES[i % len(SCENES)]}.\n"
                                        f"Caption A: entry {i}, take one.\nCaption B: entry {i}, take two.\n"
                                        "Which caption is funnier? Answer A or B."},
        ],
        "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 5,
    } for i in range(count)]


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def timed_run(base_url: str, cache_dir: str, requests: list[dict], concurrency: int) -> dict:
    """Wall time, the client, and the CPU seconds this process (client) and the server spent."""
    client = JudgeClient(base_url, "tiny", cache_dir, concurrency=concurrency)
    me = psutil.Process()
    server, = me.children()
    cpu_before = cpu_seconds(me), cpu_seconds(server)
    began = time.perf_counter()
    answers = client.complete_many(requests)
    seconds = time.perf_counter() - began
    assert len(answers) == len(requests) and all(a["logprobs"] for a in answers)
    return {"seconds": seconds, "client": client, "client_cpu": cpu_seconds(me) - cpu_before[0],
            "server_cpu": cpu_seconds(server) - cpu_before[1]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--sequential", type=int, default=50, help="requests in the sequential run")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency_ms", type=float, default=200)
    args = parser.parse_args(argv)
    requests = judge_requests(args.requests)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_judge_") as tmp, \
            running_server("tiny", latency_ms=args.latency_ms, threads=1, in_subprocess=True) as base_url:
        timed_run(base_url, os.path.join(tmp, "warmup"), judge_requests(1), 1)
        seq = timed_run(base_url, os.path.join(tmp, "sequential"), requests[:args.sequential], 1)
        conc = timed_run(base_url, os.path.join(tmp, "concurrent"), requests, args.concurrency)
        rerun = timed_run(base_url, os.path.join(tmp, "concurrent"), requests, args.concurrency)
    seq_total = seq["seconds"] / args.sequential * args.requests
    rows = [
        (f"(a) sequential, concurrency 1, {args.sequential} requests", seq, args.sequential),
        (f"(b) concurrency {args.concurrency}, {args.requests} requests", conc, args.requests),
        ("(c) rerun of (b), same cache", rerun, args.requests),
    ]
    print(f"\njudge client against the local server (tiny model, {args.latency_ms:g} ms simulated latency, "
          f"{os.cpu_count()} CPUs, load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after)")
    print(f"{'run':<44} {'wall s':>8} {'req/s':>8} {'sent':>6} {'cache hits':>10} "
          f"{'CPU ms/req client+server':>25}")
    for name, run, count in rows:
        stats = run["client"].stats
        cpu = f"{run['client_cpu'] / count * 1000:.1f} + {run['server_cpu'] / count * 1000:.1f}"
        print(f"{name:<44} {run['seconds']:>8.2f} {count / run['seconds']:>8.1f} {stats.sent:>6} "
              f"{stats.cache_hits:>10} {cpu:>25}")
    print(f"{'    (a) extrapolated to ' + str(args.requests) + ' requests':<44} {seq_total:>8.0f}")
    print(f"speed-up of (b) over sequential (extrapolated from {args.sequential} requests): "
          f"{seq_total / conc['seconds']:.1f}x (target >= 20x; ideal {args.concurrency}x, less when the CPU "
          f"per request, not the latency, bounds (b))")
    print(f"(b) retries: {conc['client'].stats.retries}, prompt tokens: {conc['client'].stats.prompt_tokens}, "
          f"completion tokens: {conc['client'].stats.completion_tokens}; (c) sent {rerun['client'].stats.sent} "
          f"requests, {rerun['client'].stats.cache_hits} cache hits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
