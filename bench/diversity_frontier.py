"""Win rate against diversity: plain best-of-N (`top`, the baseline) beside best-of-N by maximal marginal
relevance (`mmr`) at several diversity weights L, and optionally GRPO with and without a diversity term and DPO
on diverse pairs against DPO on the data's pairs; one reward model selects or trains, another judges.

    python bench/diversity_frontier.py --dataset_dir out/datasets --policy runs/sft_simple/final --simple_prompt \\
        --select_rm runs/rm_a --judge_rm runs/rm_b --output_dir bench-out/frontier \\
        [--contests 515 516 ... | --max_contests 30] [--pool DIR] [--candidates 50] [--n 10] \\
        [--weights 0.25 0.5 0.75 0.9] [--grpo_steps K] [--dpo_steps K --dpo_from MODEL [--dpo_data_run DIR]]

Best-of-N: one `humor-ray bon` run draws --candidates captions per contest from --policy and scores them with
--select_rm (its candidates.parquet; --pool reuses an earlier bon output instead, the study's `captions/zs_BoN`
for one); every setting then keeps --n of the same candidates, so the settings differ only in how they pick.
GRPO (--grpo_steps K): K steps from --policy against --select_rm without a diversity term and with
--grpo_diversity_weight in each of --grpo_forms, each policy then writing --n captions per contest.
DPO (--dpo_steps K): a pool of sampled captions on --dpo_pool_contests training contests (`bon --split train`)
from --dpo_from, scored by --select_rm; DPO from --dpo_from on its diverse pairs (`dpo --pairs diverse`) and on
the data's pairs (or --dpo_data_run, such a run made already, the study's `runs/dpo`), each writing --n captions.

Every setting is a generation folder under --output_dir, judged by the commands a user runs: `humor-ray judge
--judge rm` with --judge_rm (raw and length-controlled win rates against the four human groups, 95% bootstrap
intervals over contests, the judge's reliability) and with --select_rm (the reward each setting optimised), and
`humor-ray report`, whose page plots win rate against embedding diversity (the frontier) and whose table this
prints: embedding diversity (all-mpnet-base-v2, the paper's), EAD, mean words, the selecting reward. The goal
line names the settings with embedding diversity >= --goal_diversity whose length-controlled win rate against
every human group is no lower than top's. --reuse keeps the outputs already in --output_dir.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pandas as pd

from humor_ray import pipeline
from humor_ray.data.outputs import MARKER
from humor_ray.eval import table
from humor_ray.eval.benchmark import GROUPS
from humor_ray.eval.diversity import embed
from humor_ray.infer.selection import pick_rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_dir", required=True, help="a `humor-ray data build` output (prompts, references)")
    parser.add_argument("--policy", required=True, help="the caption policy (a training output, or a preset)")
    parser.add_argument("--simple_prompt", action="store_true", help="the policy reads the simple prompt (an SFT "
                                                                     "on it, as the study's sft_simple)")
    parser.add_argument("--select_rm", required=True, help="the reward model that scores the candidates")
    parser.add_argument("--judge_rm", required=True, help="the reward model that judges against the humans")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--contests", type=int, nargs="+", default=[], help="the evaluation contests (the study's)")
    parser.add_argument("--max_contests", type=int, default=None, help="only the first this many of them")
    parser.add_argument("--pool", default=None, help="an earlier `humor-ray bon` output to select from")
    parser.add_argument("--candidates", type=int, default=50, help="candidates per contest")
    parser.add_argument("--n", type=int, default=10, help="captions kept per contest")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.9], help="mmr's L values")
    parser.add_argument("--select_embedding", default="minilm", help="mmr's embeddings: minilm or mpnet")
    parser.add_argument("--engine", default="vllm", help="vllm or hf")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--reward_max_length", type=int, default=128)
    parser.add_argument("--goal_diversity", type=float, default=0.70)
    parser.add_argument("--grpo_steps", type=int, default=0, help="GRPO steps per policy (0: no GRPO rows)")
    parser.add_argument("--grpo_diversity_weight", type=float, default=0.5)
    parser.add_argument("--grpo_forms", nargs="+", default=["additive", "multiplicative"],
                        help="the diversity term's forms to train with (one GRPO run each)")
    parser.add_argument("--grpo_config", default="ppo-smollm2.yaml", help="the RL job spec under jobs/")
    parser.add_argument("--dpo_steps", type=int, default=0, help="DPO steps per run (0: no DPO rows)")
    parser.add_argument("--dpo_from", default=None, help="the policy DPO starts from and samples the pool with "
                                                         "(default: --policy)")
    parser.add_argument("--dpo_config", default="dpo-smollm2.yaml", help="the DPO job spec under jobs/")
    parser.add_argument("--dpo_pool_contests", type=int, default=40, help="training contests in the DPO pool")
    parser.add_argument("--dpo_pool_candidates", type=int, default=16, help="sampled captions per pool contest")
    parser.add_argument("--dpo_data_run", default=None, help="a DPO run on the data's pairs with the same start "
                                                             "and steps, instead of training one")
    parser.add_argument("--reuse", action="store_true", help="keep the outputs already in --output_dir")
    args = parser.parse_args(argv)
    if args.candidates < args.n:
        parser.error("--candidates must be at least --n")
    args.dpo_from = args.dpo_from or args.policy
    return args


class Runner:
    """The `humor-ray` commands of the bench, each logged as it runs (pipeline.run_stage); with --reuse, one
    whose output is complete is skipped."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.output_dir)
        self.prompt = ["--simple_prompt"] if args.simple_prompt else []
        self.decoding = ["--engine", args.engine, "--max_new_tokens", str(args.max_new_tokens)]

    @property
    def contests(self) -> list[str]:
        """The contest flags of the generation and judge commands (main narrows them to the pool's contests)."""
        args = self.args
        return [*(["--contests", *map(str, args.contests)] if args.contests else []),
                *(["--max_contests", str(args.max_contests)] if args.max_contests else [])]

    def __call__(self, command: str, output: Path, args: list[str], spec: str | None = None) -> Path:
        if not (self.args.reuse and pipeline.complete(command, output)):
            pipeline.run_stage(output.name, command, spec, [*args, "--output_dir", str(output)])
        return output

    def generate(self, name: str, model: str, prompt: list[str]) -> Path:
        return self("generate", self.out / name, [
            "--dataset_dir", self.args.dataset_dir, "--model_name", model, "--method", name, "--n", str(self.args.n),
            *prompt, *self.contests, *self.decoding, "--overwrite"])


def candidate_pool(args, run: Runner) -> pd.DataFrame:
    """The scored candidates of one `bon` run (the baseline `top` picks from them), exactly --candidates per
    contest (bon draws a multiple of --n)."""
    if args.pool:
        pool_dir = Path(args.pool)
    else:
        factor = -(-args.candidates // args.n)
        pool_dir = run("bon", run.out / "pool", [
            "--dataset_dir", args.dataset_dir, "--model_name", args.policy, "--method", "pool", "--n", str(args.n),
            "--candidates_factor", str(factor), "--reward_model", args.select_rm, "--reward_max_length",
            str(args.reward_max_length), *run.prompt, *run.contests, *run.decoding, "--overwrite"])
    pool = pd.read_parquet(pool_dir / "candidates.parquet").sort_values(["contest", "sample"], ignore_index=True)
    if args.contests:
        pool = pool[pool["contest"].isin(args.contests)]
    if args.max_contests:
        pool = pool[pool["contest"].isin(sorted(pool["contest"].unique())[:args.max_contests])]
    pool = pool[pool.groupby("contest").cumcount() < args.candidates].reset_index(drop=True)
    # bon drops empty captions: a contest short of --candidates is left out, so every setting picks from as many.
    short = pool.groupby("contest").size().lt(args.candidates)
    if short.any():
        print(f"{pool_dir}: fewer than {args.candidates} candidates in contests {list(short[short].index)}: left out",
              file=sys.stderr)
        pool = pool[~pool["contest"].isin(short[short].index)].reset_index(drop=True)
    return pool


def write_selections(args, pool: pd.DataFrame, out: Path) -> list[Path]:
    """The kept captions of `top` and of `mmr` at each weight, each a generation folder (captions.parquet)."""
    vectors = embed(pool["caption"].tolist(), model=args.select_embedding).numpy()
    folders = []
    for name, select, weight in [("top", "top", 0.0)] + [(f"mmr_L{w:g}", "mmr", w) for w in args.weights]:
        rows = pick_rows(pool["contest"].to_numpy(), pool["sample"].to_numpy(), pool["reward"].to_numpy(),
                         args.n, select, weight, vectors)
        kept = pool.loc[rows, ["contest", "caption", "reward"]].copy()
        kept["sample"] = kept.groupby("contest").cumcount()
        folder = out / "selections" / name
        folder.mkdir(parents=True, exist_ok=True)
        kept.assign(method=name)[["contest", "method", "sample", "caption", "reward"]].to_parquet(
            folder / "captions.parquet", index=False)
        (folder / MARKER).touch()
        folders.append(folder)
    return folders


def grpo_runs(args, run: Runner) -> list[Path]:
    """GRPO from --policy without the diversity term and with it in each form, then --n captions from each."""
    strength = args.grpo_diversity_weight
    folders = []
    for name, weight, form in [("grpo_W0", 0.0, "additive")] + [
            (f"grpo_{form[:4]}_W{strength:g}", strength, form) for form in args.grpo_forms]:
        trained = run("ppo", run.out / "runs" / name, [
            "--dataset_dir", args.dataset_dir, "--model_name", args.policy, *run.prompt, "--reward_model",
            args.select_rm, "--estimator", "grpo", "--diversity_weight", str(weight), "--diversity_form", form,
            "--max_steps", str(args.grpo_steps), "--save_steps", str(args.grpo_steps), "--engine", args.engine,
            "--report_to", "none"], args.grpo_config)
        folders.append(run.generate(name, str(trained / "final"), run.prompt))
    return folders


def dpo_runs(args, run: Runner) -> list[Path]:
    """DPO on diverse pairs from a scored pool of the training split, and on the data's pairs; --n captions
    from each (the simple prompt: the DPO specs train on it)."""
    steps = ["--max_steps", str(args.dpo_steps), "--eval_steps", str(args.dpo_steps), "--save_steps",
             str(args.dpo_steps)]
    pool = run("bon", run.out / "dpo_pool", [
        "--dataset_dir", args.dataset_dir, "--split", "train", "--max_contests", str(args.dpo_pool_contests),
        "--model_name", args.dpo_from, "--simple_prompt", "--method", "dpo_pool", "--n", "1",
        "--candidates_factor", str(args.dpo_pool_candidates), "--reward_model", args.select_rm,
        "--reward_max_length", str(args.reward_max_length), *run.decoding, "--overwrite"])
    common = ["--dataset_dir", args.dataset_dir, "--model_checkpoint_name", args.dpo_from, *steps]
    diverse = run("dpo", run.out / "runs" / "dpo_diverse", [*common, "--pairs", "diverse", "--pairs_from", str(pool)],
                  args.dpo_config)
    data = Path(args.dpo_data_run) if args.dpo_data_run else run("dpo", run.out / "runs" / "dpo_data", common,
                                                                  args.dpo_config)
    return [run.generate("dpo_diverse", str(diverse / "final"), ["--simple_prompt"]),
            run.generate("dpo_data", str(data / "final"), ["--simple_prompt"])]


def judge_and_report(args, run: Runner, folders: list[Path]) -> tuple[dict, list[dict]]:
    """Both judges and the report over every setting; the judge's summary and the report's table rows."""
    generations = [str(f) for f in folders]
    judged = ["--dataset_dir", args.dataset_dir, "--generations", *generations, "--judge", "rm",
              "--reward_max_length", str(args.reward_max_length), *run.contests]
    judge = run("judge", run.out / "judge", [*judged, "--reward_model", args.judge_rm])
    selected = run("judge", run.out / "select_reward", [*judged, "--reward_model", args.select_rm])
    report = run("report", run.out / "report", [
        "--dataset_dir", args.dataset_dir, "--judge_dir", str(judge), "--reward_dir", str(selected),
        "--generations", *generations, "--title", "humor_ray: the diversity frontier", "--overwrite"])
    summary = json.loads((judge / "winrates.json").read_text())
    diversity = json.loads((report / "diversity.json").read_text())
    rewards = table.mean_rewards(pd.read_parquet(selected / "judgments.parquet", columns=["method", "contest",
                                                                                          "score"]))
    # The settings and human top-10, with the judge's mean words per caption (over the contests it judged).
    words = summary["lengths"]
    names = {m for m in words if not m.startswith("human_")} | {"human_top10"}
    rows = [r for r in table.method_rows(summary, {m: diversity[m] for m in names if m in diversity}, {}, rewards,
                                         ranked=False) if r["name"] in names]
    for row in rows:
        row["words"] = words.get(row["name"])
    return summary, rows


def print_table(args, summary: dict, rows: list[dict], seconds: float) -> list[str]:
    def cell(value) -> str:
        return f"{value[0]:5.1f} [{value[1]:4.1f},{value[2]:5.1f}]" if value else f"{'-':>18}"

    print(f"\ndiversity frontier: selected by {args.select_rm}, judged by {args.judge_rm}; {seconds:.0f} s")
    reliability = summary.get("reliability", {}).get("top10_vs_rank1000")
    if reliability:
        print(f"judge: picks human top-10 over #1000-1009 in {100 * reliability['win_rate']:.1f}% "
              f"[{100 * reliability['ci_low']:.1f}, {100 * reliability['ci_high']:.1f}] of its judgments")
    print(f"{'setting':<16}{'emb.div':>8}{'EAD':>7}{'words':>7}{'sel.rew':>8}  "
          + "".join(f"{'LC vs ' + g:>20}" for g in GROUPS) + "".join(f"{'raw vs ' + g:>20}" for g in GROUPS))
    for r in rows:
        numbers = "".join(f"{v:>{w}.{d}f}" if v is not None else f"{'-':>{w}}" for v, w, d in
                          ((r["embedding"], 8, 3), (r["ead"], 7, 3), (r["words"], 7, 1), (r["reward"], 8, 3)))
        print(f"{r['name']:<16}{numbers}  " + "".join(f"{cell(r['lc'].get(g)):>20}" for g in GROUPS)
              + "".join(f"{cell(r['raw'].get(g)):>20}" for g in GROUPS))
    base = next(r for r in rows if r["name"] == "top")
    met = [r["name"] for r in rows if not r["human"] and r["name"] != "top" and r["embedding"] is not None
           and r["embedding"] >= args.goal_diversity
           and all(r["lc"].get(g) and base["lc"].get(g) and r["lc"][g][0] >= base["lc"][g][0] for g in GROUPS)]
    print(f"goal (embedding diversity >= {args.goal_diversity}, length-controlled win rates no lower than top's): "
          f"{', '.join(met) if met else 'not met'}")
    # What the goal line cannot tell: a judge at chance, or a baseline the judge already prefers to every group.
    if reliability and reliability["ci_low"] <= 0.5:
        print("the judge's top-10-over-#1000 interval includes chance: these win rates do not rank the settings")
    if all(base["lc"].get(g) and base["lc"][g][0] >= 95 for g in GROUPS):
        print("top's length-controlled win rates are near the ceiling (>= 95 against every group): the goal line "
              "cannot separate the settings from it")
    return met


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = Runner(args)
    pool = candidate_pool(args, run)
    # Every later step on the pool's contests: --contests / --max_contests applied, those short of candidates out.
    args.contests, args.max_contests = sorted(int(c) for c in pool["contest"].unique()), None
    folders = write_selections(args, pool, out)
    if args.grpo_steps:
        folders += grpo_runs(args, run)
    if args.dpo_steps:
        folders += dpo_runs(args, run)
    summary, rows = judge_and_report(args, run, folders)
    seconds = time.perf_counter() - started
    met = print_table(args, summary, rows, seconds)
    result = {"settings": vars(args), "rows": rows, "goal_met_by": met, "seconds": seconds,
              "report": str(out / "report" / "report.html")}
    (out / "frontier.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"results in {out / 'frontier.json'}, the frontier plot in {out / 'report' / 'report.html'}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
