"""`humor-ray demo`: the main job end to end on local Ray, from the real contest data.

The data stage, then the training stages on CPU with the laptop job specs (short runs): SFT of the
tiny model, the MiniLM reward model, DPO starting from that SFT. Later stages join here as they land."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from humor_ray.config import field, parse_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "humor_ray" / "data"


@dataclasses.dataclass
class DemoConfig:
    """Run the whole pipeline on local Ray with small real models."""
    output: str = field("outputs/demo", "where every stage writes")
    data: str | None = field(None, "the contest data; default $HUMOR_RAY_DATA, else a downloaded copy in "
                                   f"{DEFAULT_CACHE}")
    mirror: str | None = field(None, "download the data from this mirror (URL or folder) instead of upstream")
    train_steps: int = field(30, "optimizer steps of each training stage (0 skips training)")


def locate_data(cfg: DemoConfig) -> Path:
    """The data folder, downloading the public data into the cache when none is given."""
    from humor_ray.data import fetch

    given = cfg.data or os.environ.get("HUMOR_RAY_DATA")
    if given:
        if not (Path(given) / "summaries").is_dir():
            raise fetch.FetchError(f"{given} has no summaries/ folder: point HUMOR_RAY_DATA at the contest data")
        return Path(given)
    if not (DEFAULT_CACHE / "summaries").is_dir():
        print(f"[demo] HUMOR_RAY_DATA is not set: downloading the public data into {DEFAULT_CACHE}",
              file=sys.stderr)
        fetch.run(fetch.FetchConfig(output=str(DEFAULT_CACHE), mirror=cfg.mirror))
    return DEFAULT_CACHE


def run(cfg: DemoConfig) -> dict:
    from humor_ray.data import build

    data = locate_data(cfg)
    os.environ["HUMOR_RAY_DATA"] = str(data)
    datasets = Path(cfg.output) / "datasets"
    print(f"[demo] stage 1: data build from {data} -> {datasets}", file=sys.stderr)
    build_cfg = parse_config(build.BuildConfig, ["--config", str(REPO / "jobs" / "data.yaml"),
                                                 "--output", str(datasets)], "humor-ray data build")
    # The upstream download has no paper split or Humor-in-AI descriptions: use what is there.
    build_cfg.descriptions = [d for d in build_cfg.descriptions if Path(d).is_file()]
    if build_cfg.splits and not Path(build_cfg.splits).is_file():
        print(f"[demo] no split file at {build_cfg.splits}: contests are split by hash", file=sys.stderr)
        build_cfg.splits = None
    report = build.run(build_cfg)
    print(f"[demo] datasets: {datasets.resolve()}  report: {(datasets / 'report.json').resolve()}", file=sys.stderr)
    if cfg.train_steps > 0:
        report["training"] = train(cfg, datasets)
    print(f"[demo] done: {Path(cfg.output).resolve()}", file=sys.stderr)
    return report


def train(cfg: DemoConfig, datasets: Path) -> dict:
    """SFT -> reward model -> DPO from the SFT, each a short run of its laptop job spec."""
    from humor_ray.train import dpo, rm, sft

    runs = Path(cfg.output) / "runs"
    steps = cfg.train_steps
    # Evaluate and checkpoint twice per run; the specs' settings are for longer runs.
    short = ["--dataset_dir", str(datasets), "--max_steps", str(steps), "--eval_steps", str(max(1, steps // 2)),
             "--save_steps", str(max(1, steps // 2)), "--logging_steps", str(max(1, steps // 10))]
    stages = [
        ("sft", sft, "sft-tiny.yaml", []),
        ("rm", rm, "rm-minilm.yaml", ["--max_eval_examples", "500"]),
        ("dpo", dpo, "dpo-tiny.yaml", ["--model_checkpoint_name", str(runs / "sft" / "final")]),
    ]
    results = {}
    for number, (name, module, spec, extra) in enumerate(stages, start=2):
        out = runs / name
        print(f"[demo] stage {number}: {name} ({spec}, {steps} steps) -> {out}", file=sys.stderr)
        stage_cfg = parse_config(module.Config, ["--config", str(REPO / "jobs" / spec), *short,
                                                 "--output_dir", str(out), *extra], f"humor-ray {name}")
        module.run(stage_cfg)
        results[name] = json.loads((out / "metrics.json").read_text())["eval"]
    print(f"[demo] sft held-out loss {results['sft'].get('eval_loss', float('nan')):.3f}; reward model held-out "
          f"pairwise accuracy {results['rm'].get('eval_accuracy', float('nan')):.3f}; dpo held-out reward accuracy "
          f"{results['dpo'].get('eval_rewards/accuracies', float('nan')):.3f}", file=sys.stderr)
    return results
