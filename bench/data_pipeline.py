"""Benchmark of `humor-ray data build`, each figure beside a baseline measured in the same run.

(a) The real contest data -> every dataset, against a single-process pandas version of the original
    system's preprocessing (`original_preprocess.py`). Wall time with and without Ray start-up, input
    caption rows per second, and peak memory of the whole process tree (driver, raylet, workers).
(b) Synthetic raw votes (`humor-ray data synth`) -> pairs at several sizes, against the floor: one
    process that only reads the same vote files with Arrow and counts ratings per caption.

Each configuration runs `--repeats` times; the table shows medians. Usage:
    .venv/bin/python bench/data_pipeline.py [--sizes 10M,50M,250M] [--repeats 3] [--skip-real]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))

from humor_ray.config import data_root  # noqa: E402


def measured(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """Run a command; return (wall seconds, peak RSS summed over its whole process tree, stdout)."""
    log, out = tempfile.TemporaryFile(mode="w+"), tempfile.TemporaryFile(mode="w+")
    started = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=out, stderr=log, env=env, cwd=REPO)
    peak = 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [proc, *proc.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(0.05)
    wall = time.perf_counter() - started
    log.seek(0)
    out.seek(0)
    if proc.returncode:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{log.read()[-3000:]}")
    return wall, peak, out.read()


def interleaved_runs(repeats: int, *labelled) -> list[list[dict]]:
    """Alternate the configurations run by run, so a slow spell of a shared machine hits both."""
    runs = [[] for _ in labelled]
    for k in range(repeats):
        for (label, fn), done in zip(labelled, runs):
            done.append(fn())
            print(f"  {label} run {k + 1}/{repeats}: " + ", ".join(
                f"{key}={value:.2f}" if isinstance(value, float) else f"{key}={value}"
                for key, value in done[-1].items()), file=sys.stderr, flush=True)
    return runs


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def bench_real(repeats: int, work: Path) -> None:
    data = data_root()
    env = dict(os.environ, HUMOR_RAY_DATA=str(data), RAY_AUTH_MODE="disabled")

    def ours():
        out = work / "ours"
        wall, peak, _ = measured([str(BIN / "humor-ray"), "data", "build", "--config", "jobs/data.yaml",
                                  "--output", str(out)], env)
        report = json.loads((out / "report.json").read_text())
        processing = report["seconds"]["read"] + report["seconds"]["build"]
        return {"wall": wall, "processing": processing, "ray_start": report["seconds"]["ray_start"],
                "rows": report["captions"]["rows_read"], "peak_gb": peak / 1e9,
                "pairs": sum(report["datasets"]["pairs"].values())}

    def baseline():
        out = work / "baseline"
        shutil.rmtree(out, ignore_errors=True)
        wall, peak, stdout = measured([sys.executable, "bench/original_preprocess.py",
                                  "--summaries", str(data / "summaries"),
                                  "--descriptions", str(data / "descriptions" / "humor_in_ai_prompt_descriptions.csv"),
                                  "--splits", str(data / "benchmarks" / "humor_in_ai_splits.json"),
                                  "--output", str(out)], env)
        sizes = json.loads(stdout.strip().splitlines()[-1])
        return {"wall": wall, "rows": sizes["captions"], "peak_gb": peak / 1e9,
                "pairs": sum(sizes["pair_rows"].values())}

    print("(a) real data: 182 contests -> datasets", file=sys.stderr)
    base, mine = interleaved_runs(repeats, ("baseline", baseline), ("humor_ray", ours))
    b_wall, o_wall, o_proc = med(base, "wall"), med(mine, "wall"), med(mine, "processing")
    b_rate, o_rate = med(base, "rows") / b_wall, med(mine, "rows") / o_proc
    print("\n(a) real data -> datasets (medians of %d runs)" % repeats)
    print(f"{'':34}{'pandas original':>18}{'humor_ray':>14}{'ratio':>9}")
    print(f"{'wall time, end to end (s)':34}{b_wall:18.2f}{o_wall:14.2f}{b_wall / o_wall:8.2f}x")
    print(f"{'  of which Ray start-up (s)':34}{'-':>18}{med(mine, 'ray_start'):14.2f}")
    print(f"{'processing, without start-up (s)':34}{b_wall:18.2f}{o_proc:14.2f}{b_wall / o_proc:8.2f}x")
    print(f"{'input caption rows':34}{med(base, 'rows'):18,.0f}{med(mine, 'rows'):14,.0f}")
    print(f"{'rows per second of processing':34}{b_rate:18,.0f}{o_rate:14,.0f}{o_rate / b_rate:8.2f}x")
    print(f"{'pairs written':34}{med(base, 'pairs'):18,.0f}{med(mine, 'pairs'):14,.0f}")
    print(f"{'peak memory, process tree (GB)':34}{med(base, 'peak_gb'):18.2f}{med(mine, 'peak_gb'):14.2f}")
    print("  baseline: one file per contest, pairs by rejection sampling, SFT + pairs only, CSV output.")
    print("  humor_ray: every file validated, scrubbed, combined; all datasets; Parquet; quarantine; report.")


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1_000, "M": 1_000_000, "G": 1_000_000_000}.get(text[-1], 1)
    return int(float(text.rstrip("KMG")) * scale)


ARROW_FLOOR = """
import sys, time, pyarrow.dataset as ds
t = time.perf_counter()
table = ds.dataset(sys.argv[1], format="parquet").to_table(columns=["contest", "caption_id", "rating"])
counts = table.group_by(["contest", "caption_id", "rating"]).aggregate([([], "count_all")])
print(table.num_rows, counts.num_rows, time.perf_counter() - t)
"""


def bench_synthetic(sizes: list[int], repeats: int, work: Path, cache: Path) -> None:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    rows = []
    for n in sizes:
        votes_dir = cache / f"synth_{n}"
        marker = votes_dir / "done.json"
        if not marker.exists():
            shutil.rmtree(votes_dir, ignore_errors=True)
            print(f"(b) writing {n:,} synthetic ratings to {votes_dir}", file=sys.stderr, flush=True)
            wall, _, _ = measured([str(BIN / "humor-ray"), "data", "synth", "--output", str(votes_dir),
                                   "--ratings", str(n)], env)
            marker.write_text(json.dumps({"ratings": n, "synth_seconds": wall}))

        def ours(n=n, votes_dir=votes_dir):
            out = work / f"synth_out_{n}"
            wall, peak, _ = measured([str(BIN / "humor-ray"), "data", "build", "--input", str(votes_dir),
                                      "--output", str(out), "--datasets", "pairs"], env)
            report = json.loads((out / "report.json").read_text())
            assert report["votes_read"] == n, report["votes_read"]
            processing = report["seconds"]["read"] + report["seconds"]["build"]
            shutil.rmtree(out)
            return {"wall": wall, "processing": processing, "peak_gb": peak / 1e9,
                    "pairs": sum(report["datasets"]["pairs"].values())}

        def floor(votes_dir=votes_dir):
            wall, peak, _ = measured([sys.executable, "-c", ARROW_FLOOR, str(votes_dir / "votes")], env)
            return {"wall": wall, "peak_gb": peak / 1e9}

        print(f"(b) {n:,} ratings", file=sys.stderr)
        base, mine = interleaved_runs(repeats, ("arrow floor", floor), ("humor_ray", ours))
        rows.append((n, base, mine))

    print("\n(b) synthetic raw votes -> pairs (medians of %d runs)" % repeats)
    print(f"{'ratings':>13}{'floor s':>9}{'floor r/s':>14}{'floor GB':>9} | {'ours s':>8}{'proc s':>8}"
          f"{'ours r/s':>14}{'proc r/s':>14}{'peak GB':>9}{'pairs':>10}")
    for n, base, mine in rows:
        print(f"{n:13,}{med(base, 'wall'):9.2f}{n / med(base, 'wall'):14,.0f}{med(base, 'peak_gb'):9.2f} | "
              f"{med(mine, 'wall'):8.2f}{med(mine, 'processing'):8.2f}{n / med(mine, 'wall'):14,.0f}"
              f"{n / med(mine, 'processing'):14,.0f}{med(mine, 'peak_gb'):9.2f}{med(mine, 'pairs'):10,.0f}")
    print("  floor: one process, Arrow reads (contest, caption_id, rating) and counts per caption; nothing else.")
    print("  ours: end to end (`ours s`, Ray start-up included) and processing alone (`proc s`).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10M,50M,250M")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "humor_ray_bench"),
                        help="where synthetic votes are kept between runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_real:
            bench_real(args.repeats, work)
        sizes = [parse_size(s) for s in args.sizes.split(",") if s]
        if sizes:
            bench_synthetic(sizes, args.repeats, work, Path(args.cache))


if __name__ == "__main__":
    main()
