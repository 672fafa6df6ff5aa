import dataclasses
import importlib
import os
import re
import typing
from pathlib import Path

import pytest
import yaml

from humor_ray.config import (ConfigError, DeepSpeedOptions, LoggingOptions, LoraOptions, Options, RunOptions,
                              ScaleOptions, _base_type, field, load_yaml, parse_config)
from humor_ray.log import LEVEL_VARIABLE, RAY_DATA_CONFIG_VARIABLE, RAY_DATA_QUIET, get_logger, setup_logging


@dataclasses.dataclass
class Example:
    """An example stage."""
    output: str = field(None, "where")
    max_pairs_per_contest: int = field(1000, "how many")
    sigma: float = field(3.0, "how strict")
    exclude: list[str] = field([], "what to skip")
    strict: bool = field(False, "fail on anything")


def test_defaults_yaml_then_flags(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("output: from-yaml\nmax-pairs-per-contest: 7\nexclude: [a.csv, b.csv]\n")
    cfg = parse_config(Example, ["--config", str(spec), "--sigma", "2.5", "--max_pairs_per_contest", "9"], "t")
    assert cfg == Example(output="from-yaml", max_pairs_per_contest=9, sigma=2.5, exclude=["a.csv", "b.csv"])


def test_dashed_and_underscored_flags_and_bools():
    cfg = parse_config(Example, ["--max-pairs-per-contest", "5", "--strict", "--exclude", "x", "y"], "t")
    assert (cfg.max_pairs_per_contest, cfg.strict, cfg.exclude) == (5, True, ["x", "y"])
    assert parse_config(Example, ["--strict", "false"], "t").strict is False


def test_list_defaults_are_not_shared():
    first, second = Example(), Example()
    first.exclude.append("z")
    assert second.exclude == []


def test_unknown_yaml_option_is_named(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("outptu: typo\n")
    with pytest.raises(ConfigError, match="outptu"):
        parse_config(Example, ["--config", str(spec)], "t")


def test_bad_yaml_and_missing_file(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_config(Example, ["--config", str(spec)], "t")
    with pytest.raises(ConfigError, match="not found"):
        parse_config(Example, ["--config", str(tmp_path / "none.yaml")], "t")


def test_bad_flag_value_names_the_flag():
    with pytest.raises(ConfigError, match="^argument --sigma: expected a number, got 'lots'$"):
        parse_config(Example, ["--sigma", "lots"], "t")


def test_environment_variables_expand_in_yaml(tmp_path, monkeypatch):
    monkeypatch.setenv("HUMOR_RAY_DATA", "/data/nycc")
    spec = tmp_path / "job.yaml"
    spec.write_text('output: ${HUMOR_RAY_DATA}/out\nexclude: ["${HUMOR_RAY_DATA}/x.csv"]\n')
    cfg = parse_config(Example, ["--config", str(spec)], "t")
    assert cfg.output == "/data/nycc/out" and cfg.exclude == ["/data/nycc/x.csv"]


@dataclasses.dataclass
class Choosing(Options):
    """A stage with choices."""
    engine: str = field("vllm", "the engine", choices=("vllm", "hf"))
    report_to: list[str] = field(["tensorboard"], "trackers", choices=("tensorboard", "none"))


def test_a_bad_choice_names_the_flag_the_value_and_the_choices(tmp_path, capsys):
    spec = tmp_path / "job.yaml"
    spec.write_text("engine: sglang\n")
    for argv in (["--config", str(spec)], ["--engine", "sglang"]):
        with pytest.raises(ConfigError) as raised:
            parse_config(Choosing, argv, "t")
        assert str(raised.value) == "--engine sglang: choose from vllm, hf"
    with pytest.raises(ConfigError, match="^--report_to wandb: choose from tensorboard, none$"):
        Choosing(report_to=["tensorboard", "wandb"])
    assert parse_config(Choosing, ["--engine", "hf"], "t").engine == "hf"
    with pytest.raises(SystemExit):
        parse_config(Choosing, ["--help"], "t")
    assert "(choices: vllm, hf)" in capsys.readouterr().out


def test_stages_compose_the_shared_option_groups():
    """One declaration of each shared option: the same defaults in every stage that composes it."""
    from humor_ray.rl import ppo
    from humor_ray.train import dpo, sft

    required = dict(output_dir="/tmp/out", dataset_dir="/tmp/ds")
    configs = [sft.Config(**required), dpo.Config(**required), ppo.Config(**required, reward_model="x")]
    for group in (RunOptions, ScaleOptions, LoraOptions, DeepSpeedOptions, LoggingOptions):
        names = [f.name for f in dataclasses.fields(group)]
        assert all(isinstance(cfg, group) for cfg in configs)
        assert len({repr([getattr(cfg, name) for name in names]) for cfg in configs}) == 1, group.__name__
    with pytest.raises(ConfigError, match="^--deepspeed zero9: choose from none, zero2, zero3, zero3_offload or a"):
        ppo.Config(**required, reward_model="x", deepspeed="zero9")


def test_a_job_spec_by_its_name_from_anywhere(tmp_path, monkeypatch):
    """`--config sft-tiny.yaml` or `jobs/sft-tiny.yaml` from any directory: the specs shipped with the package."""
    monkeypatch.chdir(tmp_path)
    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "jobs" / "sft-tiny.yaml").read_text())
    for name in ("sft-tiny.yaml", "jobs/sft-tiny.yaml"):
        assert load_yaml(name)["model_name"] == spec["model_name"]
    assert load_yaml("serve/smollm2.yaml")
    with pytest.raises(ConfigError, match="config file not found: sft-huge.yaml"):
        load_yaml("sft-huge.yaml")
    (tmp_path / "sft-tiny.yaml").write_text("model_name: mine\n")  # a file of that name here comes first
    assert load_yaml("sft-tiny.yaml") == {"model_name": "mine"}


@pytest.fixture
def log_level(monkeypatch):
    """The level a test sets, undone after it (the variables by monkeypatch, the logger's level here)."""
    monkeypatch.delenv(LEVEL_VARIABLE, raising=False)
    monkeypatch.delenv(RAY_DATA_CONFIG_VARIABLE, raising=False)
    yield
    setup_logging("INFO")


def test_log_level_flag(log_level, capsys):
    log = get_logger("example")
    parse_config(Example, ["--log_level", "warning"], "t")
    log.info("not shown")
    log.warning("shown")
    err = capsys.readouterr().err
    assert "not shown" not in err and re.search(r"^\[ *\d+\.\d s example\] WARNING: shown$", err, re.MULTILINE), err
    # Ray workers inherit the level; Ray Data's console shows only its warnings.
    assert os.environ[LEVEL_VARIABLE] == "WARNING" and os.environ[RAY_DATA_CONFIG_VARIABLE] == RAY_DATA_QUIET
    parse_config(Example, ["--log-level", "DEBUG"], "t")
    log.debug("details")
    assert "] DEBUG: details" in capsys.readouterr().err and RAY_DATA_CONFIG_VARIABLE not in os.environ
    with pytest.raises(ConfigError, match="invalid choice: 'LOUD'"):
        parse_config(Example, ["--log_level", "loud"], "t")


# ---------------------------------------------------------------- typed values from a job spec


@dataclasses.dataclass
class Typed(Options):
    """A stage with one option of each kind."""
    learning_rate: float = field(1e-3, "rate", exclusive_minimum=0)
    use_gpu: bool = field(False, "gpu")
    exclude: list[str] = field([], "skip")
    max_steps: int = field(10, "steps", minimum=1)
    run_name: str | None = field(None, "name")


def spec_file(tmp_path, text: str) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_values_are_converted_to_their_fields_types(tmp_path):
    """YAML reads `1e-5` as text and `"false"` as a true string: each value takes its field's type."""
    spec = spec_file(tmp_path, 'learning_rate: 1e-5\nuse_gpu: "false"\nexclude: one.csv\nmax_steps: 1e3\n'
                               "run_name: 2024\n")
    cfg = parse_config(Typed, ["--config", spec], "t")
    assert (cfg.learning_rate, cfg.use_gpu, cfg.exclude, cfg.max_steps, cfg.run_name) == (
        1e-5, False, ["one.csv"], 1000, "2024")
    assert type(cfg.learning_rate) is float and type(cfg.max_steps) is int


@pytest.mark.parametrize("text, message", [
    ("max_steps: abc\n", "--max_steps: expected a whole number, got 'abc'"),
    ("max_steps: 2.5\n", "--max_steps: expected a whole number, got '2.5'"),
    ("use_gpu: maybe\n", "--use_gpu: expected true/false, got 'maybe'"),
    ("learning_rate: fast\n", "--learning_rate: expected a number, got 'fast'"),
    ("learning_rate: [1, 2]\n", "--learning_rate: expected one value, got list [1, 2]"),
    ("max_steps:\n", "--max_steps: needs a value (it is not optional)"),
    ("run_name: yes\n", "--run_name: expected str, got true (quote it if it is meant as text)"),
    ("1: 2\n", "config file {spec}: 1 is not an option name"),
    ("env: HOME\n", "config file {spec}: env: lists the names of the environment variables"),
])
def test_a_yaml_value_of_the_wrong_type_names_the_option(tmp_path, text, message):
    spec = spec_file(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        parse_config(Typed, ["--config", spec], "t")
    assert str(raised.value).startswith(message.format(spec=spec))


def test_a_config_that_is_a_folder_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=f"^config file {tmp_path} is a directory, not a YAML file$"):
        parse_config(Typed, ["--config", str(tmp_path)], "t")


def test_only_humor_ray_and_listed_variables_expand_and_each_must_be_set(tmp_path, monkeypatch):
    monkeypatch.setenv("HUMOR_RAY_RUNS", "/runs")
    monkeypatch.setenv("RUN_TAG", "a")
    monkeypatch.delenv("HUMOR_RAY_UNSET", raising=False)
    cfg = parse_config(Typed, ["--config", spec_file(tmp_path, "env: [RUN_TAG]\nrun_name: ${HUMOR_RAY_RUNS}/$RUN_TAG\n"
                                                              "exclude: [\"x-${RUN_TAG}.csv\"]\n")], "t")
    assert (cfg.run_name, cfg.exclude) == ("/runs/a", ["x-a.csv"])
    spec = spec_file(tmp_path, "run_name: ${HUMOR_RAY_UNSET}/x\n")
    with pytest.raises(ConfigError, match=f"^config file {spec}, option run_name: the environment variable "
                                          "HUMOR_RAY_UNSET is not set$"):
        parse_config(Typed, ["--config", spec], "t")
    spec = spec_file(tmp_path, "run_name: ${RUN_TAG}\n")  # set, but the spec does not list it
    with pytest.raises(ConfigError, match=r"option run_name: \$\{RUN_TAG\} is not expanded: only HUMOR_RAY_\*"):
        parse_config(Typed, ["--config", spec], "t")


# ---------------------------------------------------------------- ranges, checked before any work


def stage_config(stage: str):
    from humor_ray.cli import STAGES

    module_name, config_name, *_ = STAGES[tuple(stage.split())]
    return getattr(importlib.import_module(module_name), config_name)


TRAIN = ["--output_dir", "/tmp/out", "--dataset_dir", "/tmp/ds"]
BUILD = ["--input", "/tmp/in", "--output", "/tmp/out"]


@pytest.mark.parametrize("stage, argv, message", [
    ("sft", [*TRAIN, "--learning_rate", "-1"], "--learning_rate -1.0: must be > 0"),
    ("sft", [*TRAIN, "--lora_r", "-3"], "--lora_r -3: must be >= 0"),
    ("sft", [*TRAIN, "--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: must be >= 1"),
    ("sft", [*TRAIN, "--learning_rate", "nan"], "--learning_rate nan: must be a finite number"),
    ("dpo", [*TRAIN, "--beta", "-1"], "--beta -1.0: must be > 0"),
    ("data build", [*BUILD, "--sigma", "-1"], "--sigma -1.0: must be >= 0"),
    ("data build", [*BUILD, "--max-pairs-per-contest", "-5"], "--max_pairs_per_contest -5: must be >= 1"),
    ("data build", [*BUILD, "--eval-fraction", "1.5"], "--eval_fraction 1.5: must be 0 to 1"),
    ("generate", [*TRAIN, "--max_contests", "-2"], "--max_contests -2: must be >= 1"),
    ("generate", [*TRAIN, "--top_p", "0"], "--top_p 0.0: must be > 0 and <= 1"),
    ("judge", ["--dataset_dir", "d", "--generations", "g", "--output_dir", "o", "--reward_model", "r",
               "--bootstrap", "0"], "--bootstrap 0: must be >= 1"),
    ("ppo", [*TRAIN, "--reward_model", "r", "--colocate_fractions", "0.5", "0", "0.5"],
     "--colocate_fractions 0.0: must be > 0 and <= 1"),
])
def test_a_number_out_of_its_range_is_refused_at_parse_time(stage, argv, message):
    with pytest.raises(ConfigError) as raised:
        parse_config(stage_config(stage), argv, f"humor-ray {stage}", check_inputs=False)
    assert str(raised.value) == message


def test_a_range_holds_in_a_job_spec_and_when_a_config_is_built_in_code(tmp_path):
    from humor_ray.train import sft

    with pytest.raises(ConfigError, match="^--max_steps 0: must be >= 1$"):
        parse_config(sft.Config, ["--config", spec_file(tmp_path, "max_steps: 0\n"), *TRAIN], "t")
    with pytest.raises(ConfigError, match="^--lora_alpha 0: must be > 0$"):
        sft.Config(output_dir="o", dataset_dir="d", lora_alpha=0)


def all_stage_configs():
    """Stage -> its config class, for every stage whose flags the config system parses (not plan's own)."""
    from humor_ray.cli import STAGES

    return {" ".join(key): stage_config(" ".join(key)) for key, (_, config_name, *_) in STAGES.items() if config_name}


# Serving's options belong with its own module's checks.
WITHOUT_DECLARED_RANGES = {"serve"}


def test_every_numeric_option_of_every_stage_declares_its_range():
    bounds = ("minimum", "maximum", "exclusive_minimum", "exclusive_maximum")
    missing = []
    for stage, config_cls in all_stage_configs().items():
        if stage in WITHOUT_DECLARED_RANGES:
            continue
        hints = typing.get_type_hints(config_cls)
        for spec in dataclasses.fields(config_cls):
            kind = _base_type(hints[spec.name])[0]
            if kind in (int, float) and not any(b in spec.metadata for b in bounds):
                missing.append(f"{stage} --{spec.name}")
    assert not missing, missing


# ---------------------------------------------------------------- --help


def help_blocks(text: str) -> dict[str, str]:
    """Each option's entry in `--help` output: its first flag -> its whole text (wrapped lines joined)."""
    blocks, current = {}, None
    for line in text.splitlines():
        found = re.match(r"^  (-{1,2}[\w-]+)", line)
        if found:
            current = found.group(1)
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


def test_help_shows_every_options_default_or_that_it_is_required(capsys, monkeypatch):
    from humor_ray.cli import main

    from humor_ray.cli import STAGES

    monkeypatch.setenv("COLUMNS", "200")
    for stage in (" ".join(key) for key in STAGES):
        with pytest.raises(SystemExit) as exited:
            main([*stage.split(), "--help"])
        assert exited.value.code == 0
        blocks = help_blocks(capsys.readouterr().out)
        assert len(blocks) > 3, stage
        blocks.pop("-h")
        lacking = [flag for flag, text in blocks.items() if "default" not in text and "(required)" not in text]
        assert not lacking, f"{stage}: {lacking}"
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    blocks = help_blocks(capsys.readouterr().out)
    assert "(required)" in blocks["--output_dir"] and "(> 0) (default: 1.41e-05)" in blocks["--learning_rate"]
    assert "(default: all-linear)" in blocks["--lora_targets"] and "(default: false)" in blocks["--use_gpu"]
