"""`humor-ray study`: every method the paper compared, trained and judged in one command.

The policy (--policy: SmolLM2-135M-Instruct on a laptop's CPU, Mistral-7B-Instruct on GPUs, or the tiny preset
for tests) zero-shot; SFT on the long prompt; SFT on the simple prompt, then DPO from it; PPO (or --estimator
grpo/rloo) from it against reward model A; best-of-N (5x) of the zero-shot policy with reward model A; and the
paper's released generations (its LLaVA ones among them) beside ours. Two reward models are trained on disjoint
halves of the training contests (`humor-ray rm --contest_fold 1/2` and `2/2`): A is the one the policies optimise,
B the judge, so no method is judged by the model it was tuned against. Every method writes --captions captions
for each evaluation contest with a cartoon and human references; B's win rates against the four human groups
(raw and length-controlled, 95% intervals), diversity, mean length and A's reward go into the report's table
and its win-rate-against-diversity plot.

Each stage is the `humor-ray` command it logs, with the job spec `jobs/<stage>-<size>.yaml` of the policy (the
budget flags shorten them); one that an earlier run completed is skipped, so a rerun after an interruption
resumes where it stopped (a training stage from its latest checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from humor_ray import pipeline
from humor_ray.config import ConfigError, Options, data_root, field, load_yaml
from humor_ray.engines import ENGINES
from humor_ray.log import get_logger

log = get_logger("study")


@dataclasses.dataclass(frozen=True)
class Profile:
    """The job specs of a policy size, and the flags that turn its `sft` spec into the long-prompt SFT where no
    long-prompt spec exists (None: the policy's context cannot hold the long prompt, so every stage reads the
    simple one)."""
    prefix: str  # our methods' names: <prefix>_sft, ... (the released ones are sft, dpo, ...)
    sft: str
    sft_simple: str
    rm: str
    dpo: str
    ppo: str
    long_prompt: tuple[str, ...] | None = ()


PROFILES = {
    # The tiny preset has 512 positions and a small vocabulary: a long prompt alone is 454-501 of its tokens.
    "tiny": Profile("tiny", "sft-tiny.yaml", "sft-tiny.yaml", "rm-minilm.yaml", "dpo-tiny.yaml", "ppo-tiny.yaml",
                    None),
    # SmolLM2's long prompt and caption: 256 tokens (median), 310 at most.
    "smollm2-135m": Profile("smollm2", "sft-smollm2.yaml", "sft-smollm2.yaml", "rm-minilm.yaml", "dpo-smollm2.yaml",
                            "ppo-smollm2.yaml", ("--simple_prompt", "false", "--new_padding_token", "false",
                                                 "--max_length", "384")),
    "mistral-7b": Profile("mistral7b", "sft-7b.yaml", "sft-simple-7b.yaml", "rm-7b.yaml", "dpo-7b.yaml",
                          "ppo-7b.yaml"),
}
ESTIMATOR_METHODS = {"gae": "ppo", "grpo": "grpo", "rloo": "rloo"}
# Reward model A (the policies') and B (the judge): halves of the training contests.
FOLD_A, FOLD_B = "1/2", "2/2"


@dataclasses.dataclass
class StudyConfig(Options):
    """Train and judge every method of the study (zero-shot, SFT, DPO, PPO, best-of-N) on Ray, resuming a
    rerun where it stopped."""
    output: str = field("outputs/study", "where every stage writes")
    data: str | None = field(None, "the contest data; unset: $HUMOR_RAY_DATA, else a downloaded copy in "
                                   f"{pipeline.DEFAULT_CACHE}")
    mirror: str | None = field(None, "download the data from this mirror (URL or folder) instead of upstream")
    datasets: str | None = field(None, "a complete `humor-ray data build` output to use; unset: build one into "
                                       "<output>/datasets", existing=True)
    policy: str = field("smollm2-135m", "the policy and its job specs: smollm2-135m (CPU), mistral-7b (the paper's, "
                                        "GPUs) or tiny (tests)", choices=tuple(PROFILES))
    train_steps: int | None = field(None, "optimizer steps of each policy training stage (both SFTs, DPO); "
                                          "unset: each job spec's", minimum=1)
    rm_steps: int | None = field(None, "optimizer steps of each reward model; unset: the job spec's", minimum=1)
    ppo_steps: int | None = field(None, "PPO steps; unset: the job spec's", minimum=1)
    eval_examples: int | None = field(None, "held-out examples each policy training stage (SFT, DPO) evaluates on; "
                                            "unset: each job spec's", minimum=1)
    rm_eval_pairs: int | None = field(None, "held-out pairs each reward model evaluates on, in training and in the "
                                            "judges' reliability block; unset: the reward model job spec's",
                                      minimum=1)
    estimator: str | None = field(None, "the RL stage: gae (PPO), grpo or rloo; unset: the job spec's",
                                  choices=tuple(ESTIMATOR_METHODS))
    eval_contests: int | None = field(None, "evaluation contests, a seeded sample; unset: every held-out contest with "
                                            "a cartoon and human references", minimum=1)
    captions: int = field(10, "captions per method and contest", minimum=1)
    candidates_factor: int = field(5, "best-of-N: candidates per kept caption", minimum=1)
    use_gpu: bool = field(False, "generation, best-of-N and the judges on GPUs (the training specs say their own)")
    engine: str | None = field(None, "what samples captions in generation, best-of-N and PPO's rollouts: vllm, or hf "
                                     "(Hugging Face generate, slower per caption but quicker to start, and no vLLM "
                                     "needed); unset: vllm, or the PPO spec's", choices=ENGINES)
    seed: int = field(2024, "seed of the evaluation contests' sample", minimum=0)

    def __post_init__(self):
        super().__post_init__()
        if self.policy not in PROFILES:
            raise ConfigError(f"--policy must be one of {sorted(PROFILES)}")


def _training_budget(steps: int | None, eval_examples: int | None) -> list[str]:
    """The flags that shorten a training spec to `steps`: a checkpoint and an evaluation halfway and at the end
    (a checkpoint must have a fresh evaluation), on `eval_examples` held-out examples."""
    evaluated = [] if eval_examples is None else ["--max_eval_examples", str(eval_examples)]
    if steps is None:
        return evaluated
    half = str(max(1, steps // 2))
    return ["--max_steps", str(steps), "--eval_steps", half, "--save_steps", half,
            "--logging_steps", str(max(1, steps // 10)), *evaluated]


def _engine(cfg: StudyConfig) -> list[str]:
    return ["--engine", cfg.engine] if cfg.engine else []


def method_names(cfg: StudyConfig) -> dict[str, str]:
    """Our methods' names in the tables, by stage: the released generations use the bare names."""
    prefix = PROFILES[cfg.policy].prefix
    rl = ESTIMATOR_METHODS[cfg.estimator or load_yaml(PROFILES[cfg.policy].ppo).get("estimator", "gae")]
    return {"zs": f"{prefix}_zs", "sft": f"{prefix}_sft", "dpo": f"{prefix}_dpo", "ppo": f"{prefix}_{rl}",
            "zs_BoN": f"{prefix}_zs_BoN"}


def plan(cfg: StudyConfig, datasets: Path, contests: list[int], released: Path | None) -> list[pipeline.Stage]:
    """Every stage after the data build, in order, as the commands it runs."""
    return training_stages(cfg, datasets) + evaluation_stages(cfg, datasets, contests, released)


def training_stages(cfg: StudyConfig, datasets: Path) -> list[pipeline.Stage]:
    """Both SFTs, both reward models, DPO and PPO, each shortened to the study's budgets."""
    profile = PROFILES[cfg.policy]
    runs = Path(cfg.output) / "runs"
    data = ["--dataset_dir", str(datasets)]
    trained = _training_budget(cfg.train_steps, cfg.eval_examples)
    rewarded = _training_budget(cfg.rm_steps, cfg.rm_eval_pairs)
    stage = pipeline.Stage
    stages = [
        stage("sft", "sft", runs / "sft", [*data, *trained, *(profile.long_prompt or ()),
                                           "--output_dir", str(runs / "sft")], profile.sft),
        stage("sft_simple", "sft", runs / "sft_simple",
              [*data, *trained, "--output_dir", str(runs / "sft_simple")], profile.sft_simple),
        stage("rm_a", "rm", runs / "rm_a", [*data, *rewarded, "--contest_fold", FOLD_A,
                                            "--output_dir", str(runs / "rm_a")], profile.rm),
        stage("rm_b", "rm", runs / "rm_b", [*data, *rewarded, "--contest_fold", FOLD_B,
                                            "--output_dir", str(runs / "rm_b")], profile.rm),
        stage("dpo", "dpo", runs / "dpo", [*data, *trained, "--model_checkpoint_name",
                                           str(runs / "sft_simple" / "final"), "--output_dir", str(runs / "dpo")],
              profile.dpo),
    ]
    rl_budget = [] if cfg.ppo_steps is None else ["--max_steps", str(cfg.ppo_steps),
                                                  "--save_steps", str(max(1, cfg.ppo_steps // 4))]
    stages.append(stage("ppo", "ppo", runs / "ppo", [
        *data, *rl_budget, *(["--estimator", cfg.estimator] if cfg.estimator else []), *_engine(cfg), "--simple_prompt",
        "--model_name", str(runs / "sft_simple" / "final"), "--reward_model", str(runs / "rm_a"),
        "--output_dir", str(runs / "ppo")], profile.ppo))
    return stages


def evaluation_stages(cfg: StudyConfig, datasets: Path, contests: list[int], released: Path | None
                      ) -> list[pipeline.Stage]:
    """Each method's captions on the evaluation contests, both judges' scores of them, and the report."""
    profile = PROFILES[cfg.policy]
    out = Path(cfg.output)
    runs, captions = out / "runs", out / "captions"
    data = ["--dataset_dir", str(datasets)]
    base = load_yaml(profile.sft)["model_name"]  # the zero-shot policy: what SFT starts from
    reward_spec = load_yaml(profile.rm)
    reward_length = str(reward_spec.get("max_length", 512))
    # The reward models' held-out accuracy in the reliability block, on the pairs they evaluated on.
    reward_pairs = cfg.rm_eval_pairs or reward_spec.get("max_eval_examples")
    names = method_names(cfg)
    stage = pipeline.Stage
    sample = [*data, "--contests", *map(str, contests), "--n", str(cfg.captions), "--seed", str(cfg.seed),
              *(["--use_gpu"] if cfg.use_gpu else []), *_engine(cfg)]
    # On CPUs, three policies' captions side by side, each engine on one CPU (the local cluster's fourth is left to
    # the Ray Data tasks beside them), then both judges side by side, as in the demo: a short stage is mostly its
    # engine or reward model starting on one core. PPO's captions and best-of-N (the longest stage: its candidates
    # on one core took half as long again as on two) keep every core. On GPUs each stage runs alone.
    def wave(label: str) -> str | None:
        return None if cfg.use_gpu else label

    # Each policy reads the prompt it was trained on: the long one zero-shot and after the long SFT.
    long = [] if profile.long_prompt is not None else ["--simple_prompt"]
    policies = {"zs": (base, long), "sft": (str(runs / "sft" / "final"), long),
                "dpo": (str(runs / "dpo" / "final"), ["--simple_prompt"]),
                "ppo": (str(runs / "ppo" / "final"), ["--simple_prompt"])}
    stages = []
    for name, (model, prompt) in policies.items():
        together = wave("captions") if name in ("zs", "sft", "dpo") else None
        one_cpu = ["--cpus_per_engine", "1"] if together else []
        stages.append(stage(f"generate {names[name]}", "generate", captions / name, [
            *sample, *one_cpu, *prompt, "--model_name", model, "--method", names[name],
            "--output_dir", str(captions / name)], together=together))
    stages.append(stage(f"bon {names['zs_BoN']}", "bon", captions / "zs_BoN", [
        *sample, *long, "--model_name", base, "--method", names["zs_BoN"], "--reward_model", str(runs / "rm_a"),
        "--reward_max_length", reward_length, "--candidates_factor", str(cfg.candidates_factor),
        "--output_dir", str(captions / "zs_BoN")]))
    generations = [str(captions / name) for name in names] + ([str(released)] if released else [])
    judged = [*data, "--contests", *map(str, contests), "--generations", *generations, "--judge", "rm",
              "--reward_max_length", reward_length, "--seed", str(cfg.seed), *(["--use_gpu"] if cfg.use_gpu else []),
              *(["--reliability_pairs", str(reward_pairs)] if reward_pairs else [])]
    stages += [
        # Reward model B judges; A's scores of the same captions are the reward each method was tuned for.
        stage("judge (reward model B)", "judge", out / "judge", [
            *judged, "--reward_model", str(runs / "rm_b"), "--output_dir", str(out / "judge")],
            together=wave("judges")),
        stage("reward A", "judge", out / "reward_a", [
            *judged, "--reward_model", str(runs / "rm_a"), "--output_dir", str(out / "reward_a")],
            together=wave("judges")),
        stage("report", "report", out / "report", [
            *data, "--judge_dir", str(out / "judge"), "--reward_dir", str(out / "reward_a"), "--generations",
            *generations, "--title", f"humor_ray study: {cfg.policy}", "--output_dir", str(out / "report")]),
    ]
    return stages


def run(cfg: StudyConfig) -> dict:
    from humor_ray.data.outputs import require_complete

    out = Path(cfg.output)
    if cfg.datasets:
        datasets = Path(cfg.datasets)
        require_complete(str(datasets))
        data = None
    else:
        data = pipeline.locate_data(cfg.data, cfg.mirror)
        datasets = out / "datasets"
    released = data_root() / "benchmarks" / "humor_in_ai_examples"
    released = released if released.is_dir() else None
    if data is not None:
        os.environ["HUMOR_RAY_DATA"] = str(data)
        if pipeline.complete("data build", datasets):
            log.info(f"stage 1 data build: complete in {datasets}, skipped (delete it to run it again)")
        else:
            pipeline.build_datasets(data, datasets)
    contests = pipeline.eval_contests(datasets, released, cfg.eval_contests, cfg.seed)
    log.info(f"{len(contests)} evaluation contests: {' '.join(map(str, contests))}")
    stages = plan(cfg, datasets, contests, released)
    for stage in stages:  # a spec or flag that cannot work stops the study here, not hours in
        stage.check()
    outcome = pipeline.run_stages(stages, first_number=2)
    skipped = [name for name, how in outcome.items() if how["outcome"] == "skipped"]
    if skipped:
        log.info(f"resumed: {len(skipped)} of {len(stages)} stages were complete and skipped ({', '.join(skipped)})")
    ran = {name: how["seconds"] for name, how in outcome.items() if how["outcome"] == "ran"}
    if ran:
        log.info("wall time of the stages this run ran (min): "
                 + ", ".join(f"{name} {seconds / 60:.1f}" for name, seconds in ran.items())
                 + f"; {sum(ran.values()) / 60:.1f} in all")
    summary = {"contests": contests, "stages": outcome, "report": str(out / "report" / "report.html"),
               "winrates": json.loads((out / "judge" / "winrates.json").read_text())}
    log.info(f"report: {(out / 'report' / 'report.html').resolve()}")
    return summary
