import dataclasses

import pytest

from humor_ray.config import (ConfigError, DeepSpeedOptions, LoggingOptions, LoraOptions, Options, RunOptions,
                              ScaleOptions, field, parse_config)


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


def test_bad_flag_value_exits_with_usage():
    with pytest.raises(SystemExit):
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
