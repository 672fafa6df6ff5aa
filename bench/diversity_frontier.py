"""Win rate against diversity for best-of-N: `top` (plain best-of-N, the baseline) beside `mmr` at several
diversity weights L, on the evaluation contests, with one reward model selecting and another judging.

    python bench/diversity_frontier.py --dataset_dir out/datasets --policy runs/sft-smollm2/final \\
        --select_rm runs/rm-fold1 --judge_rm runs/rm-fold2 --output_dir bench-out/frontier \\
        [--max_contests 91] [--candidates 50] [--n 10] [--weights 0.25 0.5 0.75 0.9] [--engine vllm] \\
        [--grpo_steps 0]

One `humor-ray bon` run draws --candidates captions per contest from --policy and scores them with
--select_rm (its candidates.parquet); every setting then keeps --n of the same candidates, so the settings
differ only in how they pick. Per setting: the selecting reward model's mean over the kept captions,
embedding diversity (the paper's: all-mpnet-base-v2, every ordered pair with each caption beside itself),
EAD (the paper's words, V = 32,000), and --judge_rm's win rates against the four human groups with 95%
bootstrap intervals over contests (`humor-ray judge --judge rm`'s functions). The human top-10's diversity is
printed beside them. The goal line names the settings with embedding diversity >= --goal_diversity whose win
rate against every human group is no lower than top's.

--grpo_steps K > 0 adds GRPO from --policy against --select_rm for K steps, without a diversity term and with
--grpo_diversity_weight in each of --grpo_forms (additive, multiplicative), each policy then writing --n
captions per contest (plain `generate`), judged the same way. Shrink the run with --max_contests and
--candidates; --reuse keeps earlier outputs in --output_dir.
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

from humor_ray.eval import benchmark
from humor_ray.eval.diversity import embed, method_diversity
from humor_ray.infer import generate
from humor_ray.infer.selection import pick_rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_dir", required=True, help="a `humor-ray data build` output (prompts, references)")
    parser.add_argument("--policy", required=True, help="the caption policy (a training output, or a preset)")
    parser.add_argument("--select_rm", required=True, help="the reward model that scores the candidates")
    parser.add_argument("--judge_rm", required=True, help="the reward model that judges against the humans")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_contests", type=int, default=None, help="only the first this many eval contests")
    parser.add_argument("--candidates", type=int, default=50, help="candidates per contest")
    parser.add_argument("--n", type=int, default=10, help="captions kept per contest")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.9], help="mmr's L values")
    parser.add_argument("--select_embedding", default="minilm", help="mmr's embeddings: minilm or mpnet")
    parser.add_argument("--measure_embedding", default="mpnet", help="embedding diversity's model (the paper's)")
    parser.add_argument("--engine", default="vllm", help="vllm or hf")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--reward_max_length", type=int, default=512)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--goal_diversity", type=float, default=0.70)
    parser.add_argument("--grpo_steps", type=int, default=0, help="GRPO steps per policy (0: no GRPO rows)")
    parser.add_argument("--grpo_diversity_weight", type=float, default=0.5)
    parser.add_argument("--grpo_forms", nargs="+", default=["additive", "multiplicative"],
                        help="the diversity term's forms to train with (one GRPO run each)")
    parser.add_argument("--reuse", action="store_true", help="keep the pool and GRPO runs already in --output_dir")
    args = parser.parse_args(argv)
    if args.candidates < args.n:
        parser.error("--candidates must be at least --n")
    return args


def candidate_pool(args) -> pd.DataFrame:
    """The scored candidates of one `bon` run (`top`, the baseline), made unless --reuse finds them."""
    out = Path(args.output_dir) / "pool"
    if not (args.reuse and (out / "candidates.parquet").is_file()):
        factor = -(-args.candidates // args.n)  # bon draws factor x n: at least --candidates
        generate.run_bon(generate.BonConfig(
            dataset_dir=args.dataset_dir, output_dir=str(out), model_name=args.policy, method="top", n=args.n,
            candidates_factor=factor, max_contests=args.max_contests, engine=args.engine,
            max_new_tokens=args.max_new_tokens, reward_model=args.select_rm,
            reward_max_length=args.reward_max_length, overwrite=True))
    pool = pd.read_parquet(out / "candidates.parquet").sort_values(["contest", "sample"], ignore_index=True)
    # Exactly --candidates per contest (bon draws a multiple of --n).
    return pool[pool.groupby("contest").cumcount() < args.candidates].reset_index(drop=True)


def selections(args, pool: pd.DataFrame) -> pd.DataFrame:
    """The kept captions of every setting, in the long layout (contest, method, sample, caption, reward)."""
    vectors = embed(pool["caption"].tolist(), model=args.select_embedding).numpy()
    settings = [("top", "top", 0.0)] + [(f"mmr_L{w:g}", "mmr", w) for w in args.weights]
    frames = []
    for name, select, weight in settings:
        rows = pick_rows(pool["contest"].to_numpy(), pool["sample"].to_numpy(), pool["reward"].to_numpy(),
                         args.n, select, weight, vectors)
        kept = pool.loc[rows, ["contest", "caption", "reward"]].copy()
        kept["sample"] = kept.groupby("contest").cumcount()
        frames.append(kept.assign(method=name))
    return pd.concat(frames, ignore_index=True)


def grpo_captions(args) -> pd.DataFrame:
    """--grpo_steps of GRPO without and with the diversity term, then --n captions per contest from each."""
    from humor_ray.rl import ppo
    from humor_ray.train.export import final_model

    frames = []
    strength = args.grpo_diversity_weight
    runs = [("grpo_W0", 0.0, "additive")] + [(f"grpo_{form[:4]}_W{strength:g}", strength, form)
                                             for form in args.grpo_forms]
    for name, weight, form in runs:
        run_dir, captions_dir = Path(args.output_dir) / name, Path(args.output_dir) / f"{name}_captions"
        if not (args.reuse and (run_dir / "final").exists()):
            ppo.run(ppo.Config(output_dir=str(run_dir), dataset_dir=args.dataset_dir, model_name=args.policy,
                               reward_model=args.select_rm, estimator="grpo", diversity_weight=weight,
                               diversity_form=form,
                               max_steps=args.grpo_steps, save_steps=args.grpo_steps, engine=args.engine,
                               max_new_tokens=args.max_new_tokens, report_to=["none"]))
        if not (args.reuse and (captions_dir / "captions.parquet").is_file()):
            generate.run(generate.GenerateConfig(
                dataset_dir=args.dataset_dir, output_dir=str(captions_dir), model_name=final_model(str(run_dir)),
                method=name, n=args.n, max_contests=args.max_contests, engine=args.engine,
                max_new_tokens=args.max_new_tokens, overwrite=True))
        frames.append(pd.read_parquet(captions_dir / "captions.parquet").assign(method=name))
    return pd.concat(frames, ignore_index=True)


def judged(args, table: pd.DataFrame, references: pd.DataFrame) -> dict:
    """(method, human group) -> win rate with its interval, by --judge_rm."""
    cfg = benchmark.JudgeConfig(dataset_dir=args.dataset_dir, generations=["(in memory)"],
                                output_dir=str(Path(args.output_dir) / "judge"), judge="rm",
                                reward_model=args.judge_rm, reward_max_length=args.reward_max_length,
                                bootstrap=args.bootstrap)
    rates = benchmark.win_rates(benchmark.rm_judgments(cfg, table, references), args.bootstrap, cfg.seed)
    return {(r["method"], r["against"]): r for r in rates}


def report(args, table: pd.DataFrame, references: pd.DataFrame, seconds: float) -> dict:
    humans = references[references["group"] == "top10"].assign(method="human_top10")
    diversity = method_diversity(pd.concat([table, humans[["contest", "method", "caption"]]], ignore_index=True),
                                 model=args.measure_embedding, ead_kind="paper")
    rates = judged(args, table, references)
    methods = list(dict.fromkeys(table["method"]))
    rows = []
    for method in methods + ["human_top10"]:
        kept = table[table["method"] == method]
        row = {"method": method, "select_reward": float(kept["reward"].mean()) if "reward" in kept and len(kept)
               else float("nan"), "embedding": diversity[method]["embedding"], "ead": diversity[method]["ead"]}
        for group in benchmark.GROUPS:
            r = rates.get((method, group))
            row[group] = [r["win_rate"], r["ci_low"], r["ci_high"]] if r else None
        rows.append(row)
    print_table(args, rows, seconds)
    return {"settings": vars(args), "rows": rows, "seconds": seconds}


def print_table(args, rows: list[dict], seconds: float) -> None:
    print(f"\nbest-of-N diversity frontier: {args.candidates} candidates, {args.n} kept per contest, "
          f"selected by {args.select_rm}, judged by {args.judge_rm}; {seconds:.0f} s")
    print(f"{'method':<14}{'sel. reward':>12}{'emb. div.':>10}{'EAD':>8}"
          + "".join(f"{g:>20}" for g in benchmark.GROUPS))
    for row in rows:
        cells = "".join(f"{100 * r[0]:6.1f} [{100 * r[1]:4.1f},{100 * r[2]:5.1f}]" if r else f"{'-':>20}"
                        for r in (row[g] for g in benchmark.GROUPS))
        print(f"{row['method']:<14}{row['select_reward']:>12.3f}{row['embedding']:>10.3f}{row['ead']:>8.3f}{cells}")
    base = next(r for r in rows if r["method"] == "top")
    met = [r["method"] for r in rows if r["method"] not in ("top", "human_top10")
           and r["embedding"] >= args.goal_diversity and all(r[g] and base[g] and r[g][0] >= base[g][0]
                                                             for g in benchmark.GROUPS)]
    print(f"goal (embedding diversity >= {args.goal_diversity}, win rates no lower than top's): "
          f"{', '.join(met) if met else 'not met'}")


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    pool = candidate_pool(args)
    table = selections(args, pool)
    if args.grpo_steps:
        table = pd.concat([table, grpo_captions(args)], ignore_index=True)
    references = benchmark.read_references(args.dataset_dir)
    references = references[references["contest"].isin(set(pool["contest"]))]
    result = report(args, table[["contest", "method", "sample", "caption"]
                                + (["reward"] if "reward" in table else [])], references,
                    time.perf_counter() - started)
    Path(args.output_dir, "frontier.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"results in {Path(args.output_dir) / 'frontier.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
