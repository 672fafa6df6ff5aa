"""`humor-ray`: one command, a subcommand per stage. Each subcommand parses its stage's config and
calls the stage's `run`; nothing else happens here."""

from __future__ import annotations

import difflib
import importlib
import os
import sys

from humor_ray.cluster import OFFLINE_ENV
from humor_ray.config import UserError, parse_config
from humor_ray.log import redact

# Stage name -> (module, config class[, function, default "run"]). A module loads only when its stage runs.
# Without a config class the function takes the arguments itself and returns the exit code.
STAGES = {
    ("data", "build"): ("humor_ray.data.build", "BuildConfig"),
    ("data", "synth"): ("humor_ray.data.synth", "SynthConfig"),
    ("data", "fetch"): ("humor_ray.data.fetch", "FetchConfig"),
    ("sft",): ("humor_ray.train.sft", "Config"),
    ("rm",): ("humor_ray.train.rm", "Config"),
    ("dpo",): ("humor_ray.train.dpo", "Config"),
    ("llava",): ("humor_ray.train.llava", "Config"),
    ("ppo",): ("humor_ray.rl.ppo", "Config"),
    ("generate",): ("humor_ray.infer.generate", "GenerateConfig"),
    ("bon",): ("humor_ray.infer.generate", "BonConfig", "run_bon"),
    ("judge",): ("humor_ray.eval.benchmark", "JudgeConfig"),
    ("diversity",): ("humor_ray.eval.diversity", "DiversityConfig"),
    ("report",): ("humor_ray.eval.report", "ReportConfig"),
    ("serve",): ("humor_ray.serve", "ServeConfig"),
    ("demo",): ("humor_ray.demo", "DemoConfig"),
    ("study",): ("humor_ray.study", "StudyConfig"),
    ("plan",): ("humor_ray.plan", None, "main"),  # parses its own flags and a job spec's; returns the exit code
}
# Exit codes: a mistake in the flags or the config file (found before any work starts), and one the
# run finds in its input later (missing data, an unreachable endpoint).
USAGE_ERROR, RUN_ERROR = 2, 1


def usage() -> str:
    names = "\n".join(f"  humor-ray {' '.join(key)}" for key in STAGES)
    return (f"usage: humor-ray [--address RAY_ADDRESS] <stage> [--config FILE.yaml] [--flags ...]\nstages:\n{names}\n"
            "Each stage takes --help. --address joins a running Ray cluster (as the variable RAY_ADDRESS does: "
            "auto for the one this machine runs); without it a stage starts a local cluster.")


def take_address(argv: list[str]) -> list[str]:
    """`--address ADDR` (or `--address=ADDR`) before the stage, Ray's way of naming a running cluster to
    join: moved into RAY_ADDRESS, which every stage and Ray itself read. Returns the rest of `argv`."""
    if argv[:1] == ["--address"]:
        if len(argv) < 2 or argv[1].startswith("-"):
            raise UserError("--address needs a value (a Ray cluster's address, or auto)")
        os.environ["RAY_ADDRESS"], argv = argv[1], argv[2:]
    elif argv[:1] and argv[0].startswith("--address="):
        os.environ["RAY_ADDRESS"], argv = argv[0].split("=", 1)[1], argv[1:]
    return argv


def unknown_stage(argv: list[str]) -> str:
    """What was typed where a stage belongs, and the nearest stage."""
    names = [" ".join(key) for key in STAGES]
    typed = " ".join(argv[:2]) if argv[:1] == ["data"] else (argv[0] if argv else "")
    if not typed:
        return "humor-ray: error: no stage given (humor-ray --help lists them)"
    nearest = difflib.get_close_matches(typed, names, n=1, cutoff=0.5)
    hint = f"did you mean {nearest[0]}?" if nearest else "humor-ray --help lists the stages"
    return f"humor-ray: error: unknown stage {typed!r} ({hint})"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = take_address(argv)
    except UserError as err:
        print(f"humor-ray: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    key = tuple(argv[:2]) if tuple(argv[:2]) in STAGES else tuple(argv[:1])
    if key not in STAGES:
        if argv[:1] in (["-h"], ["--help"]):
            print(usage())
            return 0
        print(unknown_stage(argv), file=sys.stderr)
        return USAGE_ERROR
    # No model or dataset hub unless the environment asks for it: a model must already be on this machine
    # (or in the Hugging Face cache, for an hf: id), whatever the stage resolves on the driver.
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)
    module_name, config_name, *function = STAGES[key]
    module = importlib.import_module(module_name)
    run = getattr(module, function[0] if function else "run")
    prog = "humor-ray " + " ".join(key)
    try:
        config = parse_config(getattr(module, config_name), argv[len(key):], prog) if config_name else None
    except UserError as err:
        print(f"{prog}: error: {redact(str(err))}", file=sys.stderr)
        return USAGE_ERROR
    try:
        if config is None:
            return run(argv[len(key):])
        run(config)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        user = user_error(err)
        if user is None:
            raise  # a bug: its traceback says where
        print(f"{prog}: error: {redact(str(user))}", file=sys.stderr)
        return RUN_ERROR
    return 0


def user_error(err: BaseException) -> UserError | None:
    """The user error `err` is, or the one a Ray failure carries (Ray raises a task's or actor's exception
    inside a RayTaskError, as its `cause`); None for anything else."""
    ray_exceptions = sys.modules.get("ray.exceptions")  # no Ray failure without Ray loaded
    while ray_exceptions and isinstance(err, ray_exceptions.RayTaskError):
        err = err.cause
    return err if isinstance(err, UserError) else None
