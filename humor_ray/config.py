"""One config system for every stage: a dataclass per stage, filled from an optional YAML file
(`--config FILE.yaml`) and then from command-line flags, which win.

Flags accept both spellings, `--max-pairs-per-contest` and `--max_pairs_per_contest`, so the data
stage's dashed contract and the training stages' TRL-style underscores work the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
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


def build_parser(config_cls, prog: str, description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description or config_cls.__doc__)
    parser.add_argument("--config", help="YAML file with values for any of the flags below")
    parser.add_argument("--log_level", "--log-level", type=str.upper, choices=LEVELS,
                        help="what the run logs to standard error (default INFO; DEBUG adds Ray's own lines)")
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        kind, is_list = _base_type(hints[field.name])
        names = [f"--{field.name}"]
        if "_" in field.name:
            names.append(f"--{field.name.replace('_', '-')}")
        help_text = field.metadata.get("help", "")
        if kind is bool:
            # `--flag` alone means true; `--flag false` is accepted too.
            parser.add_argument(*names, dest=field.name, nargs="?", const=True, type=_parse_bool,
                                default=argparse.SUPPRESS, help=help_text)
        elif is_list:
            parser.add_argument(*names, dest=field.name, nargs="+", type=kind,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(*names, dest=field.name, type=kind, default=argparse.SUPPRESS,
                                help=help_text)
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


def load_yaml(path: str) -> dict:
    path = find_job_spec(path)
    try:
        with open(path) as handle:
            values = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    return {key.replace("-", "_"): _expand(value) for key, value in values.items()}


def _expand(value):
    """`${HUMOR_RAY_DATA}/summaries` in a job spec: the same file works on every machine."""
    if isinstance(value, str):
        return os.path.expandvars(value)
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def parse_config(config_cls, argv: list[str] | None, prog: str):
    """Build a `config_cls` from `--config FILE.yaml` plus flag overrides."""
    parser = build_parser(config_cls, prog)
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config", None)
    level = args.pop("log_level", None)
    if level:
        os.environ[LEVEL_VARIABLE] = level  # Ray workers inherit it (see humor_ray/cluster.py)
    setup_logging(level)
    values = load_yaml(config_path) if config_path else {}
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"config file {config_path} has unknown options: {', '.join(unknown)}")
    values.update(args)
    try:
        return config_cls(**values)
    except TypeError as err:
        raise ConfigError(f"{prog}: {err}") from None


def field(default=dataclasses.MISSING, help: str = "", choices=None, **kwargs):  # noqa: A002 - mirrors argparse
    """A dataclass field with a help text for the command line. With `choices`, the value (each item of a
    list) must be one of them: `--help` lists them and `Options` checks them."""
    metadata = {"help": help}
    if choices is not None:
        metadata.update(help=f"{help} (choices: {', '.join(map(str, choices))})", choices=tuple(choices))
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def check_choices(config) -> None:
    """Every field declared with `choices` holds one of them (None: the option is unset)."""
    for spec in dataclasses.fields(config):
        choices = spec.metadata.get("choices")
        value = getattr(config, spec.name)
        for item in value if isinstance(value, list) else [value]:
            if choices is not None and item is not None and item not in choices:
                raise ConfigError(f"--{spec.name} {item}: choose from {', '.join(map(str, choices))}")


@dataclasses.dataclass
class Options:
    """The base of every config and option group: the checks run once, whatever groups a config composes
    (each group's `__post_init__` calls `super().__post_init__()`)."""

    def __post_init__(self):
        check_choices(self)


# ---------------------------------------------------------------- option groups the stages compose

DEEPSPEED_PRESETS = ("none", "zero2", "zero3", "zero3_offload")
TRACKERS = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}  # --report_to: its package


@dataclasses.dataclass
class RunOptions(Options):
    """Run and output: what a run reads and writes, its name, seed and checkpoints."""
    output_dir: str = field(None, "where checkpoints, logs and the final model go")
    dataset_dir: str = field(None, "the output of `humor-ray data build`")
    model_name: str = field("tiny", "a preset (tiny, smollm2-135m, minilm), a Hugging Face id or a local path")
    run_name: str | None = field(None, "name of the run in Ray and TensorBoard (default: the stage name)")
    max_steps: int = field(100, "optimizer steps")
    learning_rate: float = field(1.41e-5, "peak learning rate")
    seed: int = field(2024, "seed for weights, LoRA, data order and sampling")
    save_steps: int = field(50, "checkpoint every this many steps")
    save_total_limit: int = field(2, "checkpoints kept")
    max_failures: int = field(2, "worker failures Ray Train recovers from by restarting from the last checkpoint")
    storage_path: str | None = field(None, "Ray Train storage (local or s3://); default <output_dir>/ray")

    def __post_init__(self):
        super().__post_init__()
        if min(self.max_steps, self.save_steps) < 1:
            raise ConfigError("--max_steps and --save_steps must be at least 1")


@dataclasses.dataclass
class ScaleOptions(Options):
    """Scale and placement: the Ray Train workers and what each reserves."""
    num_workers: int = field(1, "Ray Train workers (data-parallel)")
    use_gpu: bool = field(False, "one GPU per worker")
    cpus_per_worker: int = field(1, "CPUs each worker reserves (and its torch threads)")
    gpu_memory_gb: float | None = field(None, "memory of each GPU in GiB, for the memory plan a --use_gpu run checks "
                                              "before it starts (default: this machine's GPU, else 80)")

    def __post_init__(self):
        super().__post_init__()
        if self.num_workers < 1:
            raise ConfigError("--num_workers must be at least 1")


@dataclasses.dataclass
class LoraOptions(Options):
    lora_r: int = field(0, "LoRA rank; 0 trains every weight")
    lora_alpha: int = field(16, "LoRA alpha")
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
    logging_steps: int = field(10, "log every this many steps")
    report_to: list[str] = field(["tensorboard"], "where the logs go", choices=(*TRACKERS, "none"))

    def __post_init__(self):
        super().__post_init__()
        import importlib.util

        if self.logging_steps < 1:
            raise ConfigError("--logging_steps must be at least 1")
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
