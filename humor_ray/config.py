"""One config system for every stage: a dataclass per stage, filled from an optional YAML file
(`--config FILE.yaml`) and then from command-line flags, which win.

Flags accept both spellings, `--max-pairs-per-contest` and `--max_pairs_per_contest`, so the data
stage's dashed contract and the training stages' TRL-style underscores work the same way. Every value,
from the file or a flag, is converted to its field's type and checked against the field's choices and
range before the stage's config exists, so a mistake is one line naming the option.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path

import yaml

from humor_ray.log import LEVEL_VARIABLE, LEVELS, setup_logging


class UserError(Exception):
    """A problem the user can fix (bad input, bad flag, no network). The CLI prints the message alone,
    without a traceback, and exits non-zero."""


class ConfigError(UserError, ValueError):
    """A config file or flag that cannot be used; the message says which and why."""


def _base_type(annotation):
    """(python type, is_list) of a field annotation such as `int`, `str | None`, `list[str]`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1] or (str,)
        return item, True
    return annotation, False


def _parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_int(text: str) -> int:
    """An integer; `1e3` and `1_000` too (a float that is a whole number), never a fraction."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not number.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(number)


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


PARSERS = {bool: _parse_bool, int: _parse_int, float: _parse_float}


def _convert_one(kind, value):
    """A YAML scalar as `kind`; ArgumentTypeError says what was expected."""
    if isinstance(value, (dict, list)):
        raise argparse.ArgumentTypeError(f"expected one value, got {type(value).__name__} {value!r}")
    if kind is bool:
        return value if isinstance(value, bool) else _parse_bool(value)
    if isinstance(value, bool):  # YAML's `yes`/`true` where a number or text belongs
        raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {str(value).lower()} (quote it if "
                                         "it is meant as text)")
    if kind is int:
        return value if isinstance(value, int) else _parse_int(str(value))
    if kind is float:
        return float(value) if isinstance(value, (int, float)) else _parse_float(str(value))
    if kind is str:
        return str(value)
    return value


def _optional(annotation) -> bool:
    return type(None) in typing.get_args(annotation)


def convert_value(spec: dataclasses.Field, annotation, value):
    """A value from a config file as the field's type: a list field takes one item or a list, a scalar
    field one scalar; null only where the field may be unset."""
    option = f"--{spec.name}"
    kind, is_list = _base_type(annotation)
    if value is None:
        if _optional(annotation) or spec.default is None:
            return None
        raise ConfigError(f"{option}: needs a value (it is not optional)")
    try:
        if is_list:
            return [_convert_one(kind, item) for item in (value if isinstance(value, list) else [value])]
        return _convert_one(kind, value)
    except argparse.ArgumentTypeError as err:
        raise ConfigError(f"{option}: {err}") from None


def describe_range(metadata) -> str:
    """`> 0`, `0 to 1`, `>= 1`: the range a field declares, for `--help` and errors."""
    low = (">= ", metadata["minimum"]) if "minimum" in metadata else (
        ("> ", metadata["exclusive_minimum"]) if "exclusive_minimum" in metadata else None)
    high = ("<= ", metadata["maximum"]) if "maximum" in metadata else (
        ("< ", metadata["exclusive_maximum"]) if "exclusive_maximum" in metadata else None)
    if low and high and low[0] == ">= " and high[0] == "<= ":
        return f"{low[1]} to {high[1]}"
    return " and ".join(f"{bound[0]}{bound[1]}" for bound in (low, high) if bound)


def check_value(spec: dataclasses.Field, value) -> None:
    """One field's value (each item of a list) against its declared choices and range."""
    metadata = spec.metadata
    choices = metadata.get("choices")
    for item in value if isinstance(value, list) else [value]:
        if item is None:  # the option is unset
            continue
        if choices is not None and item not in choices:
            raise ConfigError(f"--{spec.name} {item}: choose from {', '.join(map(str, choices))}")
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"--{spec.name} {item}: must be a finite number")
        ok = (item >= metadata.get("minimum", -math.inf) and item <= metadata.get("maximum", math.inf)
              and item > metadata.get("exclusive_minimum", -math.inf)
              and item < metadata.get("exclusive_maximum", math.inf))
        if not ok:
            raise ConfigError(f"--{spec.name} {item}: must be {describe_range(metadata)}")


def check_fields(config) -> None:
    """Every field of a config holds a value its declaration allows (choices, range)."""
    for spec in dataclasses.fields(config):
        check_value(spec, getattr(config, spec.name))


def _shown_default(spec: dataclasses.Field) -> str:
    if spec.metadata.get("required"):
        return "required"
    if spec.default is not dataclasses.MISSING:
        value = spec.default
    elif spec.default_factory is not dataclasses.MISSING:
        value = spec.default_factory()
    else:
        return "required"
    if value is None or value == []:
        return "default: none"
    if isinstance(value, bool):
        return f"default: {str(value).lower()}"
    if isinstance(value, list):
        return f"default: {' '.join(map(str, value))}"
    return f"default: {value}"


def help_text(spec: dataclasses.Field) -> str:
    """A field's `--help` line: its text, choices, range and default (or that it is required)."""
    metadata = spec.metadata
    parts = [metadata.get("help", "")]
    if "choices" in metadata:
        parts.append(f"(choices: {', '.join(map(str, metadata['choices']))})")
    if describe_range(metadata):
        parts.append(f"({describe_range(metadata)})")
    parts.append(f"({_shown_default(spec)})")
    return " ".join(p for p in parts if p).replace("%", "%%")  # argparse formats help with %


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are ConfigErrors (the CLI prints them as one line), without abbreviations:
    `--max_st 5` is an unknown flag, not `--max_steps`."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):
        raise ConfigError(message)


def build_parser(config_cls, prog: str, description: str = "") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description or config_cls.__doc__)
    parser.add_argument("--config", help="YAML file with values for any of the flags below (default: none)")
    parser.add_argument("--log_level", "--log-level", type=str.upper, choices=LEVELS,
                        help="what the run logs to standard error (default: INFO; DEBUG adds Ray's own lines)")
    hints = typing.get_type_hints(config_cls)
    for spec in dataclasses.fields(config_cls):
        if not spec.init:
            continue
        kind, is_list = _base_type(hints[spec.name])
        names = [f"--{spec.name}"]
        if "_" in spec.name:
            names.append(f"--{spec.name.replace('_', '-')}")
        kind_parser = PARSERS.get(kind, kind)
        if kind is bool:
            # `--flag` alone means true; `--flag false` is accepted too.
            parser.add_argument(*names, dest=spec.name, nargs="?", const=True, type=_parse_bool,
                                default=argparse.SUPPRESS, help=help_text(spec))
        elif is_list:
            parser.add_argument(*names, dest=spec.name, nargs="+", type=kind_parser,
                                default=argparse.SUPPRESS, help=help_text(spec))
        else:
            parser.add_argument(*names, dest=spec.name, type=kind_parser, default=argparse.SUPPRESS,
                                help=help_text(spec))
    return parser


def find_job_spec(path: str) -> str:
    """A `--config` file: the path as given when it exists, else a job spec shipped with the package, by
    its name in jobs/ (`sft-tiny.yaml`, `jobs/sft-tiny.yaml`, `serve/smollm2.yaml`)."""
    if os.path.exists(path):
        return path
    name = Path(path).as_posix().removeprefix("jobs/")
    package = Path(__file__).resolve().parent
    for jobs in (package / "jobs", package.parent / "jobs"):  # an installed wheel; a source checkout
        if (jobs / name).is_file():
            return str(jobs / name)
    return path


# The variables a job spec may use without listing them; `env: [NAME, ...]` at the top adds others.
SPEC_VARIABLE_PREFIX = "HUMOR_RAY_"
_VARIABLE = re.compile(r"\$\{([^}]*)\}|\$([A-Za-z_]\w*)")


def load_yaml(path: str) -> dict:
    """A job spec's options (keys with `_` for `-`), `${VARS}` expanded; values are converted to their
    fields' types by `parse_config`."""
    path = find_job_spec(path)
    try:
        with open(path) as handle:
            values = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory, not a YAML file") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    for key in values:
        if not isinstance(key, str):
            raise ConfigError(f"config file {path}: {key!r} is not an option name")
    allowed = values.pop("env", None) or []
    if not isinstance(allowed, list) or not all(isinstance(name, str) for name in allowed):
        raise ConfigError(f"config file {path}: env: lists the names of the environment variables the "
                          "spec uses, e.g. env: [RUNS]")
    return {key.replace("-", "_"): _expand(value, path, key, set(allowed)) for key, value in values.items()}


def _expand(value, path: str, key: str, allowed: set[str]):
    """`${HUMOR_RAY_DATA}/summaries` in a job spec: the same file works on every machine. Only
    HUMOR_RAY_* variables and those the spec's `env:` lists expand, and each must be set."""
    if isinstance(value, list):
        return [_expand(v, path, key, allowed) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name = match.group(1) if match.group(1) is not None else match.group(2)
        if not name.startswith(SPEC_VARIABLE_PREFIX) and name not in allowed:
            raise ConfigError(f"config file {path}, option {key}: ${{{name}}} is not expanded: only "
                              f"{SPEC_VARIABLE_PREFIX}* variables and those the spec lists under `env:` are")
        if name not in os.environ:
            raise ConfigError(f"config file {path}, option {key}: the environment variable {name} is not set")
        return os.environ[name]

    return _VARIABLE.sub(substitute, value)


def _unknown_flag_message(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    flags = [e for e in extras if e.startswith("-")]
    if not flags:
        return f"unexpected argument {extras[0]!r} (every value follows its --flag)"
    typed = flags[0].split("=", 1)[0]
    nearest = difflib.get_close_matches(typed, list(parser._option_string_actions), n=1)
    hint = f" (did you mean {nearest[0]}?)" if nearest else " (see --help)"
    return f"unrecognized option {typed}{hint}"


def parse_config(config_cls, argv: list[str] | None, prog: str, check_inputs: bool = True):
    """Build a `config_cls` from `--config FILE.yaml` plus flag overrides. Every value is converted and
    checked against its field's declaration first; with `check_inputs`, the paths and models it names
    must exist too (off where a spec is read on a machine that lacks its files). Any mistake is a
    ConfigError naming the option."""
    parser = build_parser(config_cls, prog)
    parsed, extras = parser.parse_known_args(argv)
    if extras:
        raise ConfigError(_unknown_flag_message(parser, extras))
    args = vars(parsed)
    config_path = args.pop("config", None)
    level = args.pop("log_level", None)
    if level:
        os.environ[LEVEL_VARIABLE] = level  # Ray workers inherit it (see humor_ray/cluster.py)
    setup_logging(level)
    values = load_yaml(config_path) if config_path else {}
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"config file {config_path} has unknown options: {', '.join(unknown)}")
    hints = typing.get_type_hints(config_cls)
    values = {name: convert_value(fields[name], hints[name], value) for name, value in values.items()}
    values.update(args)
    missing = [f"--{name}" for name, spec in fields.items()
               if spec.metadata.get("required") and values.get(name) in (None, [], "")]
    if missing:
        raise ConfigError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")
    for name, value in values.items():
        check_value(fields[name], value)
    try:
        config = config_cls(**values)
    except TypeError as err:
        raise ConfigError(f"{prog}: {err}") from None
    if check_inputs:
        check_paths(config, given=set(values))
    return config


def check_paths(config, given: set[str]) -> None:
    """The inputs a config names exist: each `existing=True` field given a local path, and each model
    a field names (`model=` kinds: a preset of that kind, an `hf:` id or a model directory)."""
    for spec in dataclasses.fields(config):
        value = getattr(config, spec.name)
        if value is None:
            continue
        if spec.metadata.get("existing") and spec.name in given:
            for item in value if isinstance(value, list) else [value]:
                if "://" not in item and not Path(item).expanduser().exists():
                    raise ConfigError(f"--{spec.name} {item}: no such file or directory")
        if spec.metadata.get("model"):
            from humor_ray.models.specs import check_spec

            check_spec(value, spec.metadata["model"], f"--{spec.name}")


def field(default=dataclasses.MISSING, help: str = "", choices=None, *,  # noqa: A002 - mirrors argparse
          minimum=None, maximum=None, exclusive_minimum=None, exclusive_maximum=None, required: bool = False,
          existing: bool = False, model: tuple[str, ...] | None = None, **kwargs):
    """A dataclass field with a help text for the command line, and what its value may be:
    - `choices`: the value (each item of a list) must be one of them;
    - `minimum`/`maximum` (inclusive), `exclusive_minimum`/`exclusive_maximum`: a number's range;
    - `required`: the run needs a value (from the file or a flag);
    - `existing`: a local path given for it must exist (URIs are not checked);
    - `model`: it names a model that loads as one of these kinds (humor_ray.models.registry.AUTO_CLASSES).
    `--help` shows all of it with the default, and `parse_config` checks it before the stage starts."""
    metadata = {"help": help}
    bounds = dict(minimum=minimum, maximum=maximum, exclusive_minimum=exclusive_minimum,
                  exclusive_maximum=exclusive_maximum)
    metadata.update({name: bound for name, bound in bounds.items() if bound is not None})
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if required:
        metadata["required"] = True
    if existing:
        metadata["existing"] = True
    if model:
        metadata["model"] = tuple(model)
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


@dataclasses.dataclass
class Options:
    """The base of every config and option group: the checks run once, whatever groups a config composes
    (each group's `__post_init__` calls `super().__post_init__()`)."""

    def __post_init__(self):
        check_fields(self)


# ---------------------------------------------------------------- option groups the stages compose

DEEPSPEED_PRESETS = ("none", "zero2", "zero3", "zero3_offload")
TRACKERS = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}  # --report_to: its package


@dataclasses.dataclass
class RunOptions(Options):
    """Run and output: what a run reads and writes, its name, seed and checkpoints."""
    output_dir: str = field(None, "where checkpoints, logs and the final model go", required=True)
    dataset_dir: str = field(None, "the output of `humor-ray data build`", required=True)
    model_name: str = field("tiny", "a preset (tiny, smollm2-135m), a local path or a Hugging Face id as "
                                    "hf:OWNER/NAME", model=("causal_lm",))
    run_name: str | None = field(None, "name of the run in Ray and TensorBoard (default: the stage name)")
    max_steps: int = field(100, "optimizer steps", minimum=1)
    learning_rate: float = field(1.41e-5, "peak learning rate", exclusive_minimum=0)
    seed: int = field(2024, "seed for weights, LoRA, data order and sampling", minimum=0)
    save_steps: int = field(50, "checkpoint every this many steps", minimum=1)
    save_total_limit: int = field(2, "checkpoints kept", minimum=1)
    max_failures: int = field(2, "worker failures Ray Train recovers from by restarting from the last "
                                        "checkpoint (-1: any number)", minimum=-1)
    storage_path: str | None = field(None, "Ray Train storage (local or s3://); default <output_dir>/ray")


@dataclasses.dataclass
class ScaleOptions(Options):
    """Scale and placement: the Ray Train workers and what each reserves."""
    num_workers: int = field(1, "Ray Train workers (data-parallel)", minimum=1)
    use_gpu: bool = field(False, "one GPU per worker")
    cpus_per_worker: int = field(1, "CPUs each worker reserves (and its torch threads)", minimum=1)
    gpu_memory_gb: float | None = field(None, "memory of each GPU in GiB, for the memory plan a --use_gpu run checks "
                                              "before it starts (default: this machine's GPU, else 80)",
                                        exclusive_minimum=0)


@dataclasses.dataclass
class LoraOptions(Options):
    lora_r: int = field(0, "LoRA rank; 0 trains every weight", minimum=0)
    lora_alpha: int = field(16, "LoRA alpha", exclusive_minimum=0)
    lora_targets: list[str] = field(["all-linear"], "modules LoRA adapts")


@dataclasses.dataclass
class DeepSpeedOptions(Options):
    deepspeed: str = field("none", f"{', '.join(DEEPSPEED_PRESETS)} or a DeepSpeed JSON file: shards the optimizer "
                                   "state (zero3: also the weights) across the workers; none is DDP")

    def __post_init__(self):
        super().__post_init__()
        if self.deepspeed not in DEEPSPEED_PRESETS and not self.deepspeed.endswith(".json"):
            raise ConfigError(f"--deepspeed {self.deepspeed}: choose from {', '.join(DEEPSPEED_PRESETS)} "
                              "or a .json file")


@dataclasses.dataclass
class LoggingOptions(Options):
    logging_steps: int = field(10, "log every this many steps", minimum=1)
    report_to: list[str] = field(["tensorboard"], "where the logs go", choices=(*TRACKERS, "none"))

    def __post_init__(self):
        super().__post_init__()
        import importlib.util

        for tracker in set(self.report_to) & set(TRACKERS):
            if importlib.util.find_spec(TRACKERS[tracker]) is None:
                raise ConfigError(f"--report_to {tracker} needs the {TRACKERS[tracker]} package: "
                                  f"pip install {TRACKERS[tracker]}")


def data_root() -> Path:
    """The real contest data: `$HUMOR_RAY_DATA`, else `../shared/data` beside the checkout."""
    env = os.environ.get("HUMOR_RAY_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"
