"""`humor-ray`: one command, a subcommand per stage. Each subcommand parses its stage's config and
calls the stage; nothing else happens here."""

from __future__ import annotations

import sys


# (group, name) -> (module, config class, run function, exception classes shown without a traceback).
STAGES = {
    ("data", "build"): ("humor_ray.data.build", "BuildConfig", "run", ("BuildError",)),
    ("data", "synth"): ("humor_ray.data.synth", "SynthConfig", "run", ()),
    ("data", "fetch"): ("humor_ray.data.fetch", "FetchConfig", "run", ("FetchError",)),
}


def _load(key):
    """Import a stage only when it runs: `humor-ray data fetch` should not pay for torch or Ray."""
    import importlib

    from humor_ray.config import ConfigError
    from humor_ray.data.readers import InputFileError

    module_name, config_name, run_name, error_names = STAGES[key]
    module = importlib.import_module(module_name)
    errors = (ConfigError, ValueError, InputFileError) + tuple(getattr(module, n) for n in error_names)
    return getattr(module, config_name), getattr(module, run_name), errors


def _usage(stages) -> str:
    names = "\n".join(f"  humor-ray {' '.join(key)}" for key in stages)
    return f"usage: humor-ray <stage> [--config FILE.yaml] [--flags ...]\nstages:\n{names}\n" \
           "Each stage takes --help."


def main(argv: list[str] | None = None) -> int:
    from humor_ray.config import parse_config

    argv = list(sys.argv[1:] if argv is None else argv)
    stages = STAGES
    key = tuple(argv[:2]) if tuple(argv[:2]) in stages else tuple(argv[:1])
    if key not in stages:
        print(_usage(stages), file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    config_cls, run, expected_errors = _load(key)
    prog = "humor-ray " + " ".join(key)
    try:
        cfg = parse_config(config_cls, argv[len(key):], prog)
        run(cfg)
    except expected_errors as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
