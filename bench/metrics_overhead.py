"""What the Ray-dashboard figures cost, with the metrics export on and off (`HUMOR_RAY_METRICS=0`), runs
alternating so that both see the same machine load; target: within 2%.
- data: `humor-ray data build` on the real data, its own time (report.json `seconds`, without Ray start-up);
- ppo: `humor-ray ppo --config jobs/ppo-tiny.yaml` on the real data's prompts, steps per second from the
  TensorBoard event times of its steps (every phase and the export between them; the first step, which
  warms up, left out).

Usage: .venv/bin/python bench/metrics_overhead.py [--stages data ppo] [--repeats 3] [--ppo_steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from humor_ray.config import data_root  # noqa: E402


def build_seconds(metrics: bool, output: Path, extra: tuple[str, ...] = ()) -> float:
    """The build's own time (without Ray start-up) of one run, from its report."""
    data = data_root()
    env = dict(os.environ, HUMOR_RAY_METRICS="1" if metrics else "0")
    env.pop("RAY_ADDRESS", None)
    subprocess.run([sys.executable, "-m", "humor_ray", "data", "build", "--input", str(data / "summaries"),
                    "--output", str(output), "--splits", str(data / "benchmarks" / "humor_in_ai_splits.json"),
                    "--descriptions", str(data / "descriptions" / "humor_in_ai_prompt_descriptions.csv"), *extra],
                   env=env, cwd=REPO, check=True, capture_output=True, text=True)
    seconds = json.loads((output / "report.json").read_text())["seconds"]
    return seconds["total"] - seconds["ray_start"]


def step_times(events: Path) -> dict[int, float]:
    """Step -> wall time of its `reward/mean` scalar, from a TensorBoard event file (TFRecord framing:
    length, its checksum, the Event, its checksum)."""
    from tensorboardX.proto.event_pb2 import Event

    data, offset, times = events.read_bytes(), 0, {}
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        event = Event.FromString(data[offset + 12:offset + 12 + length])
        offset += 16 + length
        if any(value.tag == "reward/mean" for value in event.summary.value):
            times[event.step] = event.wall_time
    return times


def ppo_steps_per_second(metrics: bool, datasets: Path, output: Path, steps: int) -> float:
    env = dict(os.environ, HUMOR_RAY_METRICS="1" if metrics else "0")
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "humor_ray", "ppo", "--config", "jobs/ppo-tiny.yaml", "--dataset_dir",
                           str(datasets), "--output_dir", str(output), "--max_steps", str(steps), "--save_steps",
                           str(steps)], env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"humor-ray ppo failed:\n{done.stderr[-3000:]}")
    (events,) = (output / "tensorboard" / "ppo").glob("events.out.tfevents.*")
    times = step_times(events)
    return (steps - 2) / (times[steps] - times[2])


def compare(label: str, measure, repeats: int, unit: str, higher_is_better: bool) -> None:
    values = {True: [], False: []}
    for i in range(repeats):
        for metrics in (True, False):
            values[metrics].append(measure(metrics, i))
    on, off = statistics.median(values[True]), statistics.median(values[False])
    cost = (off / on - 1) if higher_is_better else (on / off - 1)
    print(f"{label} (median of {repeats}): metrics on {on:.3f} {unit}, off {off:.3f} {unit}, on/off {on / off:.3f}, "
          f"overhead {100 * cost:+.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", choices=("data", "ppo"), default=["data", "ppo"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ppo_steps", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if "data" in args.stages:
            compare("data build (real data, without Ray start-up)",
                    lambda metrics, i: build_seconds(metrics, scratch / f"build-{i}-{metrics}"), args.repeats, "s",
                    higher_is_better=False)
        if "ppo" in args.stages:
            datasets = scratch / "prompts"
            build_seconds(False, datasets, ["--datasets", "prompts"])
            compare(f"ppo (jobs/ppo-tiny.yaml, {args.ppo_steps} steps)",
                    lambda metrics, i: ppo_steps_per_second(metrics, datasets, scratch / f"ppo-{i}-{metrics}",
                                                            args.ppo_steps), args.repeats, "steps/s",
                    higher_is_better=True)


if __name__ == "__main__":
    main()
