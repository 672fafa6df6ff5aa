"""`humor-ray demo`: the main job end to end on local Ray, from the real contest data.

For now the pipeline is the data stage; later stages join here as they land."""

from __future__ import annotations

import dataclasses
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
    print(f"[demo] done. Datasets: {datasets.resolve()}  Report: {(datasets / 'report.json').resolve()}",
          file=sys.stderr)
    return report
