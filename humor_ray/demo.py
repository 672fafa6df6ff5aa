"""`humor-ray demo`: the main job end to end on local Ray, from the real contest data.

data -> sft -> rm -> dpo -> llava -> ppo -> generate (sft, dpo, ppo, llava) -> best-of-N (sft) -> judge ->
report, on CPU with the laptop job specs in short runs: the policy is --policy (SmolLM2-135M by default, or
the tiny preset), the LLaVA its vision-language preset (SmolLM2 under an untrained vision tower, or
tiny-llava), the reward model MiniLM. The judge is the reward model (offline) unless --judge_base_url
names an OpenAI-compatible endpoint. Every stage writes under --output and can be rerun alone with
the command it logs."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from humor_ray import pipeline
from humor_ray.config import ConfigError, Options, field
from humor_ray.log import get_logger

log = get_logger("demo")


@dataclasses.dataclass
class DemoConfig(Options):
    """Run the whole pipeline on local Ray with small real models."""
    output: str = field("outputs/demo", "where every stage writes")
    data: str | None = field(None, "the contest data; default $HUMOR_RAY_DATA, else a downloaded copy in "
                                   f"{pipeline.DEFAULT_CACHE}")
    mirror: str | None = field(None, "download the data from this mirror (URL or folder) instead of upstream")
    policy: str = field("smollm2-135m", "the policy model: smollm2-135m (SmolLM2) or tiny (a few minutes)")
    train_steps: int | None = field(None, "optimizer steps of each training stage (default 8 for SmolLM2, "
                                          "30 for tiny; 0 skips training)", minimum=0)
    ppo_steps: int | None = field(None, "PPO steps (default 2 for SmolLM2, 4 for tiny)", minimum=1)
    eval_contests: int = field(4, "evaluation contests captions are generated and judged for", minimum=1)
    judge_base_url: str | None = field(None, "an OpenAI-compatible endpoint for the LLM judge (default: the reward "
                                             "model judges)")
    judge_model: str | None = field(None, "the LLM judge's model, with --judge_base_url")

    def __post_init__(self):
        super().__post_init__()
        if self.policy not in POLICY_SPECS:
            raise ConfigError(f"--policy must be one of {sorted(POLICY_SPECS)}")
        tiny = self.policy == "tiny"
        if self.train_steps is None:
            self.train_steps = 30 if tiny else 8
        if self.ppo_steps is None:
            self.ppo_steps = 4 if tiny else 2


# The job specs each policy's stages run (jobs/<stage>-<size>.yaml).
POLICY_SPECS = {"smollm2-135m": "smollm2", "tiny": "tiny"}


def run(cfg: DemoConfig) -> dict:
    data = pipeline.locate_data(cfg.data, cfg.mirror)
    os.environ["HUMOR_RAY_DATA"] = str(data)
    datasets = Path(cfg.output) / "datasets"
    report = pipeline.build_datasets(data, datasets)
    if cfg.train_steps > 0:
        report["training"] = train(cfg, datasets)
        report["report"] = evaluate(cfg, datasets)
        log.info(f"report: {Path(report['report']).resolve()}")
    log.info(f"done: {Path(cfg.output).resolve()}")
    return report


# Held-out pairs of the demo's reward model: its evaluation, and the judge's check of it.
RM_HELD_OUT_PAIRS = 300


def train(cfg: DemoConfig, datasets: Path) -> dict:
    """SFT -> reward model -> DPO from the SFT -> LLaVA SFT, each a short run of its laptop job spec."""
    runs = Path(cfg.output) / "runs"
    steps = cfg.train_steps
    # The specs are for longer runs: here one optimizer step per batch, and one evaluation (on fewer
    # held-out examples) and one checkpoint at the end.
    short = ["--dataset_dir", str(datasets), "--max_steps", str(steps), "--eval_steps", str(steps),
             "--save_steps", str(steps), "--logging_steps", str(max(1, steps // 6)),
             "--gradient_accumulation_steps", "1", "--max_eval_examples", "16"]
    size = POLICY_SPECS[cfg.policy]
    stages = [
        ("sft", f"sft-{size}.yaml", []),
        ("rm", "rm-minilm.yaml", ["--max_eval_examples", str(RM_HELD_OUT_PAIRS)]),
        ("dpo", f"dpo-{size}.yaml", ["--model_checkpoint_name", str(runs / "sft" / "final")]),
        ("llava", f"llava-{size}.yaml", []),
    ]
    # One after another: two training stages side by side took 30-45% longer than in turn here (each worker
    # computes on every core, and two of them crowd each other out).
    results = {}
    for number, (name, spec, extra) in enumerate(stages, start=2):
        out = runs / name
        pipeline.run_stage(number, name, spec, [*short, "--output_dir", str(out), *extra])
        results[name] = json.loads((out / "metrics.json").read_text())["eval"]
    log.info(f"sft held-out loss {results['sft'].get('eval_loss', float('nan')):.3f}; reward model held-out "
             f"pairwise accuracy {results['rm'].get('eval_accuracy', float('nan')):.3f}; dpo held-out reward accuracy "
             f"{results['dpo'].get('eval_rewards/accuracies', float('nan')):.3f}; llava held-out loss "
             f"{results['llava'].get('eval_loss', float('nan')):.3f}")
    return results


def evaluate(cfg: DemoConfig, datasets: Path) -> str:
    """PPO from the SFT policy, captions from every policy, best-of-N, the judge and the report."""
    from humor_ray.config import data_root

    out = Path(cfg.output)
    runs, captions = out / "runs", out / "captions"
    size = POLICY_SPECS[cfg.policy]
    common = ["--dataset_dir", str(datasets)]
    sft_model, reward = str(runs / "sft" / "final"), str(runs / "rm")
    # The SFT specs train on the simple prompt; PPO and generation must read the same.
    prompt = ["--simple_prompt"]
    pipeline.run_stage(6, "ppo", f"ppo-{size}.yaml", [
        *common, *prompt, "--output_dir", str(runs / "ppo"), "--model_name", sft_model, "--reward_model", reward,
        "--reward_max_length", "128", "--max_steps", str(cfg.ppo_steps), "--save_steps", str(cfg.ppo_steps),
        # Two prompts x 4 captions per step: a step of SmolLM2 with its value model takes ~25 s here.
        "--rollout_batch_size", "2", "--mini_batch_size", "8", "--forward_batch_size", "8"])
    released = data_root() / "benchmarks" / "humor_in_ai_examples"
    subset = ["--contests", *map(str, pipeline.eval_contests(datasets, released, cfg.eval_contests))]
    # Named after the policy: the paper's released generations, judged beside ours, are sft, dpo, ...
    names = {name: f"{cfg.policy}_{name}" for name in ("sft", "dpo", "ppo", "llava_sft", "sft_BoN")}
    # Generation side by side, each engine on one CPU: most of a short generation stage is its engine starting
    # (imports, the model) on one core, which leaves the others to the other stages. At most three of the local
    # cluster's four CPUs go to engines and reward models at once: the fourth stays free for the tasks Ray Data
    # runs beside them (splitting the prompts into batches).
    def generation(name: str, model: str, extra: list[str]) -> tuple:
        return 7, "generate", None, [*common, *subset, *extra, "--model_name", model, "--method", names[name],
                                     "--output_dir", str(captions / name), "--cpus_per_engine", "1"]

    pipeline.run_together([generation(name, str(runs / name / "final"), prompt) for name in ("sft", "dpo", "ppo")])
    # The LLaVA reads the cartoon itself; its vision tower is untrained at the start (README: Models).
    pipeline.run_together([
        generation("llava_sft", str(runs / "llava" / "final"), []),
        (8, "bon", None, [*common, *subset, *prompt, "--model_name", sft_model, "--method", names["sft_BoN"],
                          "--reward_model", reward, "--reward_max_length", "128", "--output_dir",
                          str(captions / "sft_BoN"), "--cpus_per_engine", "1"])])
    generations = [str(captions / name) for name in names]
    if released.is_dir():  # the paper's own generations, judged beside ours
        generations.append(str(released))
    judge = (["--judge", "llm", "--base_url", cfg.judge_base_url, "--model", cfg.judge_model or "gpt-4o"]
             if cfg.judge_base_url else ["--judge", "rm", "--reward_model", reward, "--reward_max_length", "128",
                                         # the pairs the reward model evaluated on (2,000 cost 80 s)
                                         "--reliability_pairs", str(RM_HELD_OUT_PAIRS)])
    pipeline.run_stage(9, "judge", None, [
        *common, *subset, "--generations", *generations, *judge, "--output_dir", str(out / "judge")])
    return pipeline.run_stage(10, "report", None, [
        *common, "--judge_dir", str(out / "judge"), "--generations", *generations, "--output_dir", str(out / "report"),
        "--note", SHORT_RUNS_NOTE])


# The demo's report says what its runs cannot show, whatever its judge's reliability came out as.
SHORT_RUNS_NOTE = ("These are the demo's short runs: a few training steps per model, a reward model near chance "
                   "and a handful of contests. They show the pipeline working end to end and cannot rank anything; "
                   "the win rates below are not a leaderboard. To compare methods, run `humor-ray study`.")
