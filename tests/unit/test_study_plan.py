"""`humor-ray study`'s stages, from its job specs, before anything runs (no Ray, no model)."""

from pathlib import Path

import pytest

from humor_ray import pipeline, study
from humor_ray.config import ConfigError, UserError, parse_config

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def stages_of(spec: str, *flags: str, tmp_path: Path):
    cfg = parse_config(study.StudyConfig, ["--config", str(JOBS / spec), "--output", str(tmp_path), *flags],
                       "humor-ray study")
    return cfg, study.plan(cfg, tmp_path / "datasets", [501, 502], tmp_path / "released")


def args_of(stage: pipeline.Stage) -> dict[str, list[str]]:
    """A stage's flags, each with the values that follow it."""
    options, name = {}, None
    for arg in stage.args:
        if arg.startswith("--"):
            name = arg
            options[name] = []
        else:
            options[name].append(arg)
    return options


@pytest.mark.parametrize("spec, sizes", [("study-smollm2.yaml", ("smollm2", "minilm")),
                                         ("study-7b.yaml", ("7b", "7b"))])
def test_the_cpu_and_gpu_studies_run_the_same_stages_with_their_sizes_specs(spec, sizes, tmp_path):
    cfg, stages = stages_of(spec, tmp_path=tmp_path)
    for stage in stages:  # every stage's spec and flags parse as its command would read them
        stage.check()
    by_name = {s.name: s for s in stages}
    names = study.method_names(cfg)
    assert list(by_name) == ["sft", "sft_simple", "rm_a", "rm_b", "dpo", "ppo", *(f"generate {names[m]}" for m in (
        "zs", "sft", "dpo", "ppo")), f"bon {names['zs_BoN']}", "judge (reward model B)", "reward A", "report"]
    policy, reward = sizes
    assert all(policy in by_name[n].spec for n in ("sft", "sft_simple", "dpo", "ppo"))
    assert all(reward in by_name[n].spec for n in ("rm_a", "rm_b"))
    runs = tmp_path / "runs"
    # Two reward models on disjoint halves of the training contests: A for the policies, B the judge.
    assert args_of(by_name["rm_a"])["--contest_fold"] == ["1/2"]
    assert args_of(by_name["rm_b"])["--contest_fold"] == ["2/2"]
    assert args_of(by_name["ppo"])["--reward_model"] == [str(runs / "rm_a")]
    assert args_of(by_name[f"bon {names['zs_BoN']}"])["--reward_model"] == [str(runs / "rm_a")]
    assert args_of(by_name["judge (reward model B)"])["--reward_model"] == [str(runs / "rm_b")]
    assert args_of(by_name["reward A"])["--reward_model"] == [str(runs / "rm_a")]
    # DPO and PPO start from the simple-prompt SFT and read its prompt; the long SFT and zero-shot the long one.
    assert args_of(by_name["dpo"])["--model_checkpoint_name"] == [str(runs / "sft_simple" / "final")]
    assert "--simple_prompt" in args_of(by_name["ppo"])
    assert "--simple_prompt" not in args_of(by_name[f"generate {names['sft']}"])
    assert "--simple_prompt" in args_of(by_name[f"generate {names['dpo']}"])
    # The paper's released generations are judged beside ours, on the same contests.
    judged = args_of(by_name["judge (reward model B)"])
    assert str(tmp_path / "released") in judged["--generations"] and judged["--contests"] == ["501", "502"]
    assert ("--use_gpu" in judged) == (policy == "7b")


def test_budgets_shorten_every_training_stage(tmp_path):
    cfg, stages = stages_of("study-smollm2.yaml", "--train_steps", "6", "--rm_steps", "4", "--ppo_steps", "2",
                            "--estimator", "grpo", tmp_path=tmp_path)
    by_name = {s.name: args_of(s) for s in stages}
    assert by_name["sft"]["--max_steps"] == ["6"] and by_name["dpo"]["--save_steps"] == ["3"]
    assert by_name["rm_b"]["--max_steps"] == ["4"] and by_name["ppo"]["--max_steps"] == ["2"]
    assert by_name["ppo"]["--estimator"] == ["grpo"] and study.method_names(cfg)["ppo"] == "smollm2_grpo"
    # Without budgets a stage runs its spec's own steps.
    _, stages = stages_of("study-7b.yaml", tmp_path=tmp_path)
    assert all("--max_steps" not in args_of(s) for s in stages)


def test_one_engine_flag_reaches_every_stage_that_samples_captions(tmp_path):
    cfg, stages = stages_of("study-smollm2.yaml", "--engine", "hf", tmp_path=tmp_path)
    engines = {s.name: args_of(s).get("--engine") for s in stages}
    names = study.method_names(cfg)
    sampling = {"ppo", f"bon {names['zs_BoN']}", *(f"generate {names[m]}" for m in ("zs", "sft", "dpo", "ppo"))}
    assert {name for name, engine in engines.items() if engine == ["hf"]} == sampling
    assert {name for name, engine in engines.items() if engine is not None} == sampling
    # Unset, each command's own default (vllm) or the PPO spec's engine.
    _, stages = stages_of("study-smollm2.yaml", tmp_path=tmp_path)
    assert not any("--engine" in args_of(s) for s in stages)
    with pytest.raises(UserError, match="--engine"):
        stages_of("study-smollm2.yaml", "--engine", "tgi", tmp_path=tmp_path)


def test_policies_and_reward_models_evaluate_on_their_own_held_out_counts(tmp_path):
    _, stages = stages_of("study-smollm2.yaml", "--eval_examples", "50", "--rm_eval_pairs", "300", tmp_path=tmp_path)
    by_name = {s.name: args_of(s) for s in stages}
    assert all(by_name[n]["--max_eval_examples"] == ["50"] for n in ("sft", "sft_simple", "dpo"))
    assert all(by_name[n]["--max_eval_examples"] == ["300"] for n in ("rm_a", "rm_b"))
    # The judges score each reward model on the pairs it evaluated on.
    assert by_name["judge (reward model B)"]["--reliability_pairs"] == by_name["reward A"]["--reliability_pairs"] == [
        "300"]
    # The CPU study's spec shortens the policies' evaluations, never the reward models' 2,000 pairs; without
    # --rm_eval_pairs the judges score the pairs of each size's reward model spec.
    _, stages = stages_of("study-smollm2.yaml", tmp_path=tmp_path)
    by_name = {s.name: args_of(s) for s in stages}
    assert by_name["dpo"]["--max_eval_examples"] == ["100"] and "--max_eval_examples" not in by_name["rm_a"]
    assert by_name["judge (reward model B)"]["--reliability_pairs"] == ["2000"]  # jobs/rm-minilm.yaml
    _, stages = stages_of("study-7b.yaml", tmp_path=tmp_path)
    by_name = {s.name: args_of(s) for s in stages}
    assert by_name["reward A"]["--reliability_pairs"] == ["4000"]  # jobs/rm-7b.yaml


def test_a_policy_without_specs_is_refused_before_anything_runs():
    with pytest.raises(UserError, match="--policy llama: choose from"):
        parse_config(study.StudyConfig, ["--policy", "llama"], "humor-ray study")


def test_a_complete_stage_is_told_apart_from_an_interrupted_one(tmp_path):
    run = tmp_path / "sft"
    assert not pipeline.complete("sft", run)
    (run / ".final.partial").mkdir(parents=True)  # interrupted while exporting
    assert not pipeline.complete("sft", run)
    (run / "final").mkdir()
    (run / "metrics.json").write_text('{"model": "final"}')
    assert pipeline.complete("sft", run)
    judge = tmp_path / "judge"
    judge.mkdir()
    (judge / "judgments.parquet").write_bytes(b"")
    assert not pipeline.complete("judge", judge)
    (judge / "winrates.json").write_text('{"win_rates": []}')
    assert pipeline.complete("judge", judge)
    captions = tmp_path / "captions"
    captions.mkdir()
    assert not pipeline.complete("generate", captions)
    (captions / "_COMPLETE").write_text("{}")
    assert pipeline.complete("generate", captions)


def test_a_stage_checks_its_flags_then_starts_one_cluster_with_the_dashboard(tmp_path, monkeypatch):
    """run_stage starts Ray with the dashboard before whichever stage comes first (a later training stage needs
    it, and a running cluster cannot gain one), and only after the stage's flags parse."""
    import humor_ray.cluster
    import humor_ray.data.build

    calls = []
    monkeypatch.setattr(humor_ray.cluster, "init_ray", lambda **kwargs: calls.append(("init_ray", kwargs)))
    monkeypatch.setattr(humor_ray.data.build, "run", lambda cfg: calls.append(("build", cfg.output)))
    with pytest.raises(ConfigError, match="--max_pairs_per_contest -1: must be >= 1"):  # no cluster
        pipeline.run_stage(1, "data build", None, ["--input", str(tmp_path), "--output", str(tmp_path / "out"),
                                                   "--max_pairs_per_contest", "-1"])
    assert calls == []
    pipeline.run_stage(1, "data build", None, ["--input", str(tmp_path), "--output", str(tmp_path / "out")])
    assert calls == [("init_ray", {"dashboard": True}), ("build", str(tmp_path / "out"))]


def test_on_cpus_the_captions_and_the_judges_run_in_waves_and_on_gpus_one_at_a_time(tmp_path):
    cfg, stages = stages_of("study-smollm2.yaml", tmp_path=tmp_path)
    names = study.method_names(cfg)
    waves = [[stage.name for _, stage in wave] for wave in pipeline._waves(list(enumerate(stages)))]
    assert waves == [["sft"], ["sft_simple"], ["rm_a"], ["rm_b"], ["dpo"], ["ppo"],
                     [f"generate {names[m]}" for m in ("zs", "sft", "dpo")],
                     [f"generate {names['ppo']}"], [f"bon {names['zs_BoN']}"],
                     ["judge (reward model B)", "reward A"], ["report"]]
    # Side by side each engine has one CPU, so that three fit beside the Ray Data tasks; alone, every core.
    cpus = {s.name: args_of(s).get("--cpus_per_engine") for s in stages if s.command in ("generate", "bon")}
    assert cpus == {**{f"generate {names[m]}": ["1"] for m in ("zs", "sft", "dpo")},
                    f"generate {names['ppo']}": None, f"bon {names['zs_BoN']}": None}
    _, stages = stages_of("study-7b.yaml", tmp_path=tmp_path)
    assert all(len(wave) == 1 for wave in pipeline._waves(list(enumerate(stages))))
    assert not any("--cpus_per_engine" in args_of(s) for s in stages)


def test_stages_of_a_wave_run_side_by_side_and_a_complete_one_is_skipped(tmp_path, monkeypatch):
    """run_stages: the due stages of a wave each in a thread at once (each waits until every one has started), a
    complete one skipped, the outcome in the stages' order."""
    import threading

    started = threading.Barrier(2, timeout=30)
    ran = []

    def run_stage(number, command, spec, args):
        if command == "generate":
            started.wait()  # both stages of the wave are running at once, or this times out
        ran.append(number)
        out = Path(args[-1])
        out.mkdir()
        (out / "_COMPLETE").write_text("{}")

    monkeypatch.setattr(pipeline, "run_stage", run_stage)
    stage = pipeline.Stage
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "_COMPLETE").write_text("{}")
    stages = [stage("a", "generate", tmp_path / "a", [str(tmp_path / "a")], together="w"),
              stage("done", "generate", tmp_path / "done", [str(tmp_path / "done")], together="w"),
              stage("b", "generate", tmp_path / "b", [str(tmp_path / "b")], together="w"),
              stage("report", "report", tmp_path / "report", [str(tmp_path / "report")])]
    outcome = pipeline.run_stages(stages, first_number=2)
    assert list(outcome) == ["a", "done", "b", "report"]
    assert [outcome[name]["outcome"] for name in outcome] == ["ran", "skipped", "ran", "ran"]
    assert sorted(ran[:2]) == ["2 a", "4 b"] and ran[2] == "5 report"
