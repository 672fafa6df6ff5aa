import dataclasses
import os
import re
from pathlib import Path

import pytest
import yaml

from humor_ray.config import (ConfigError, DeepSpeedOptions, LoggingOptions, LoraOptions, Options, RunOptions,
                              ScaleOptions, field, load_yaml, parse_config)
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
