"""The paper's diversity table beside ours, on the generations the paper released.

    python bench/paper_tables.py [--embedding mpnet] [--ead paper] [--pairs with_self] [--released DIR]

For each of the 13 released sets (the four human groups, Claude, GPT-4o, and the Mistral and LLaVA
methods) it computes embedding diversity and EAD with `humor_ray.eval.diversity.method_diversity` (what
`humor-ray diversity` and the report use), each set over every contest it covers, and prints them beside
the figures of the paper's diversity table (`PAPER_TABLE`), with the difference. With the defaults (the paper's
definitions) every difference should be under 0.005. all-mpnet-base-v2 embeds about 17,000 captions
here: some minutes on two cores.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from humor_ray.config import data_root
from humor_ray.data.generations import RELEASED_DIR, read_generations
from humor_ray.eval.diversity import EAD_KINDS, EMBEDDING_MODELS, PAIRS, PAPER_TABLE, method_diversity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedding", default="mpnet", choices=EMBEDDING_MODELS)
    parser.add_argument("--ead", default="paper", choices=tuple(EAD_KINDS))
    parser.add_argument("--pairs", default="with_self", choices=PAIRS)
    parser.add_argument("--released", default=str(data_root().joinpath(*RELEASED_DIR)))
    args = parser.parse_args()

    started = time.perf_counter()
    table = read_generations([args.released], humans=True)
    ours = method_diversity(table, model=args.embedding, ead_kind=args.ead, pairs=args.pairs)
    seconds = time.perf_counter() - started
    print(f"embedding {args.embedding} ({args.pairs} pairs), EAD {args.ead}; {len(table):,} captions "
          f"in {seconds:.0f} s\n")
    print(f"{'method':13} {'contests':>8} | {'embedding':>9} {'paper':>7} {'diff':>7} | {'EAD':>7} {'paper':>7} "
          f"{'diff':>7}")
    worst = 0.0
    for method, (paper_embedding, paper_ead) in PAPER_TABLE.items():
        row = ours[method]
        d_embedding, d_ead = row["embedding"] - paper_embedding, row["ead"] - paper_ead
        worst = max(worst, abs(d_embedding), abs(d_ead))
        print(f"{method:13} {row['contests']:>8} | {row['embedding']:9.4f} {paper_embedding:7.4f} {d_embedding:+7.4f} "
              f"| {row['ead']:7.4f} {paper_ead:7.4f} {d_ead:+7.4f}")
    print(f"\nlargest difference: {worst:.4f}")


if __name__ == "__main__":
    main()
