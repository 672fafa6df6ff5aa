"""What `humor-ray demo` and `humor-ray study` share: finding the data, building the datasets, choosing the
evaluation contests, and running a stage as its command line would (logged, so it can be rerun alone), skipping
one whose output an earlier run completed."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from humor_ray.config import parse_config
from humor_ray.log import get_logger

log = get_logger("pipeline")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "humor_ray" / "data"


def locate_data(data: str | None, mirror: str | None) -> Path:
    """The data folder (`data`, else $HUMOR_RAY_DATA), downloading the public data into the cache when neither
    is given."""
    from humor_ray.data import fetch

    given = data or os.environ.get("HUMOR_RAY_DATA")
    if given:
        if not (Path(given) / "summaries").is_dir():
            raise fetch.FetchError(f"{given} has no summaries/ folder: point HUMOR_RAY_DATA at the contest data")
        return Path(given)
    if not (DEFAULT_CACHE / "summaries").is_dir():
        log.info(f"HUMOR_RAY_DATA is not set: downloading the public data into {DEFAULT_CACHE}")
        fetch.run(fetch.FetchConfig(output=str(DEFAULT_CACHE), mirror=mirror))
    return DEFAULT_CACHE


def build_datasets(data: Path, datasets: Path) -> dict:
    """`humor-ray data build --config jobs/data.yaml` of `data` into `datasets`; returns the build's report."""
    from humor_ray.cluster import init_ray
    from humor_ray.data import build

    log.info(f"data build from {data} -> {datasets}")
    # Inputs unchecked: what the download lacks is dropped just below.
    build_cfg = parse_config(build.BuildConfig, ["--config", "jobs/data.yaml", "--output", str(datasets)],
                             "humor-ray data build", check_inputs=False)
    # The upstream download has no paper split or Humor-in-AI descriptions: use what is there.
    build_cfg.descriptions = [d for d in build_cfg.descriptions if Path(d).is_file()]
    if build_cfg.splits and not Path(build_cfg.splits).is_file():
        log.info(f"no split file at {build_cfg.splits}: contests are split by hash")
        build_cfg.splits = None
    init_ray(dashboard=True)  # the cluster the later stages run on (see run_stage)
    report = build.run(build_cfg)
    log.info(f"datasets: {datasets.resolve()}  report: {(datasets / 'report.json').resolve()}")
    return report


def eval_contests(datasets: Path, released: Path | None, count: int | None, seed: int | None = None) -> list[int]:
    """Evaluation contests with a cartoon and human references, preferring those every one of the paper's
    released generations covers (so that ours and theirs are judged on the same cartoons): all of them when
    `count` is None, else `count` of them, the first ones or, with `seed`, a seeded sample."""
    import numpy as np
    import pandas as pd

    from humor_ray.data.generations import read_generations

    prompts = pd.read_parquet(datasets / "prompts" / "eval", columns=["contest", "image"])
    with_image = {int(c) for c, image in zip(prompts["contest"], prompts["image"]) if isinstance(image, str) and image}
    referenced = set(pd.read_parquet(datasets / "references" / "eval", columns=["contest"])["contest"].astype(int))
    contests = sorted(with_image & referenced)
    covered = set()
    if released is not None and released.is_dir():
        theirs = read_generations([str(released)])
        covered = set.intersection(*(set(rows["contest"]) for _, rows in theirs.groupby("method")))
    ordered = [c for c in contests if c in covered] + [c for c in contests if c not in covered]
    if count is None or count >= len(ordered):
        return sorted(ordered)
    if seed is None:
        return ordered[:count]
    # From the covered contests first, as above, then the rest.
    rng = np.random.default_rng(seed)
    first = [c for c in ordered if c in covered]
    picked = list(rng.choice(first, min(count, len(first)), replace=False)) if first else []
    rest = [c for c in ordered if c not in covered]
    if len(picked) < count:
        picked += list(rng.choice(rest, count - len(picked), replace=False))
    return sorted(int(c) for c in picked)


def run_stage(number: int | str, command: str, spec: str | None, args: list[str]):
    """One stage (`command`, a `humor-ray` subcommand) as its command line would run it: logged, so it can be
    rerun alone, with the job spec `jobs/<spec>` and the flags `args`; returns the stage's result."""
    from humor_ray.cli import STAGES
    from humor_ray.cluster import init_ray

    module_name, config_name, *function = STAGES[tuple(command.split())]
    module = importlib.import_module(module_name)
    argv = (["--config", f"jobs/{spec}"] if spec else []) + args
    log.info(f"stage {number}: humor-ray {command} {' '.join(argv)}")
    cfg = parse_config(getattr(module, config_name), argv, f"humor-ray {command}")
    # Every stage on one cluster, started with the dashboard whichever stage comes first: a later training
    # stage needs it (Ray Train's controller asks the cluster's state through it), and a running cluster
    # cannot gain one. The stage's own init_ray then finds this cluster.
    init_ray(dashboard=True)
    return getattr(module, function[0] if function else "run")(cfg)


def run_together(stages: list[tuple]) -> list:
    """Stages that do not depend on each other (each the arguments of `run_stage`), each in a thread of this
    driver on the one cluster: Ray runs them side by side as far as its CPUs go. A short stage spends much of
    its time starting processes, importing libraries and loading models, on one core, which leaves the other
    cores to the other stage. Returns their results in order; a failure is raised once every stage has ended."""
    return side_by_side([functools.partial(run_stage, *stage) for stage in stages])


def side_by_side(calls: list[Callable]) -> list:
    """Each call in a thread of its own (one call runs in this thread); their results in order. A failure is
    raised once every call has ended, so no stage is left running unwatched."""
    from concurrent.futures import ThreadPoolExecutor

    if len(calls) <= 1:
        return [call() for call in calls]
    with ThreadPoolExecutor(len(calls), thread_name_prefix="stage") as pool:
        futures = [pool.submit(call) for call in calls]
    return [future.result() for future in futures]


# ---------------------------------------------------------------- stages that resume

@dataclasses.dataclass
class Stage:
    """A stage of a pipeline: a `humor-ray` subcommand with its job spec and flags, writing `output`."""
    name: str
    command: str
    output: Path
    args: list[str]
    spec: str | None = None
    # Stages next to each other with the same label run side by side (`side_by_side`): none reads another's output.
    together: str | None = None

    def check(self) -> None:
        """Its flags and spec parse (paths unchecked: earlier stages write them), before anything runs."""
        from humor_ray.cli import STAGES

        module_name, config_name, *_ = STAGES[tuple(self.command.split())]
        config_class = getattr(importlib.import_module(module_name), config_name)
        argv = (["--config", f"jobs/{self.spec}"] if self.spec else []) + self.args
        parse_config(config_class, argv, f"humor-ray {self.command}", check_inputs=False)


def complete(command: str, output: Path) -> bool:
    """Whether `output` holds what a finished `command` writes: a training run's metrics.json naming its exported
    model (written last, after the final model is in place), the judge's winrates.json (written last), or the
    completion marker of a folder written aside (data build, generate, bon, report)."""
    from humor_ray.data.outputs import MARKER

    if command in ("sft", "rm", "dpo", "llava", "ppo"):
        try:
            model = json.loads((output / "metrics.json").read_text())["model"]
        except (OSError, ValueError, KeyError):
            return False
        return (output / model).is_dir()
    if command == "judge":
        try:
            return "win_rates" in json.loads((output / "winrates.json").read_text())
        except (OSError, ValueError):
            return False
    return (output / MARKER).is_file()


def run_stages(stages: list[Stage], first_number: int = 1) -> dict[str, dict]:
    """Each stage in order (those labelled `together` side by side), skipping those whose output is complete, each
    logged with its command and, once done, its wall time; an output left incomplete by an interrupted run is run
    again (training continues from its latest checkpoint). Returns each stage's outcome (`skipped` or `ran`) and
    seconds, in the stages' order."""
    outcome = {}
    for wave in _waves(list(enumerate(stages, start=first_number))):
        due = []
        for number, stage in wave:
            if complete(stage.command, stage.output):
                log.info(f"stage {number} {stage.name}: complete in {stage.output}, skipped (delete it to run it "
                         "again)")
                continue
            if stage.output.exists():
                log.info(f"stage {number} {stage.name}: {stage.output} is incomplete (an interrupted run): running "
                         "it again" + (", from its latest checkpoint" if stage.command in ("sft", "rm", "dpo", "ppo")
                                       else ""))
            due.append((number, stage))
        seconds = dict(zip((stage.name for _, stage in due),
                           side_by_side([functools.partial(_run_to_completion, *numbered) for numbered in due])))
        for _, stage in wave:
            ran = stage.name in seconds
            outcome[stage.name] = {"outcome": "ran" if ran else "skipped", "seconds": seconds.get(stage.name, 0.0)}
    return outcome


def _waves(numbered: list[tuple[int, Stage]]) -> list[list[tuple[int, Stage]]]:
    """The numbered stages in runs of those next to each other with the same `together` label (alone if none)."""
    waves = []
    for number, stage in numbered:
        if waves and stage.together is not None and waves[-1][-1][1].together == stage.together:
            waves[-1].append((number, stage))
        else:
            waves.append([(number, stage)])
    return waves


def _run_to_completion(number: int, stage: Stage) -> float:
    """Runs `stage` (number `number`); its wall time in seconds, once its output is complete."""
    started = time.perf_counter()
    run_stage(f"{number} {stage.name}", stage.command, stage.spec, stage.args)
    if not complete(stage.command, stage.output):
        raise RuntimeError(f"stage {number} {stage.name} ended without a complete output in {stage.output}")
    seconds = time.perf_counter() - started
    log.info(f"stage {number} {stage.name}: done in {seconds / 60:.1f} min")
    return round(seconds, 1)
