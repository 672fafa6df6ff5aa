"""Baseline for the preprocessing benchmark: the original system's preprocessing, done the plain way.

A single-process pandas/Python version of what yguooo/cartoon-caption-generation `finetuning/preprocess.py`
did: per contest, 1000 random captions for SFT and up to 1000 preference pairs found by a Python
rejection-sampling loop. Written for this benchmark (not copied); it is meant as a fair, ordinary
implementation, neither tuned nor slowed down.

Differences from the original, all needed to run on the staged data:
- It reads the NEXT summary CSVs (`<contest>[-roundN]_<alg>.csv`) instead of the HF dataset's
  per-contest ranking files; the mean is the file's `score`, the standard error its `precision`.
- Contest splits come from a JSON file (train / validation / test); eval = validation + test,
  as in the original, which merged Hessel's validation and test splits.
- SFT takes min(1000, n) captions (the original's random.sample failed below 1000).
- Pair sampling skips pairs already taken and gives up after MAX_TRIES draws per contest
  (the original allowed duplicates and up to 200000 draws).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import time

import pandas as pd

PER_CONTEST = 1000  # SFT captions and preference pairs per contest, as in the original
SIGMA = 3.0         # a pair is kept when mean_i - mean_j > SIGMA * sqrt(se_i^2 + se_j^2)
MAX_TRIES = 20000   # rejection-sampling draws per contest before giving up

INSTRUCTION = (
    "I want you to act as a sophisticated reader of The New Yorker Magazine. You are competing in The "
    "New Yorker Cartoon Caption Contest. Your task is to generate funny captions for a cartoon. Here are "
    "some ideas for developing funny captions. First think about characteristics associated with the "
    "objects and people featured in the cartoon. Then consider what are the unusual or absurd elements "
    "in the cartoon. It might help to imagine conversations between the characters. Then think about "
    "funny and non-obvious connections that can be made between the objects and characters. Try to come "
    "up with funny captions that fit the cartoon, but are not too direct. It may be funnier if the "
    "person reading the caption has to think a little bit to get the joke. Next, I will describe a "
    "cartoon image and then you should generate 1 funny caption for the cartoon."
)


def simple_prompt(desc: dict) -> str:
    return (f"scene: {desc['scene']}\ndescription: {desc['description']}\n"
            f"uncanny description: {desc['uncanny_description']}\nentities: {desc['entities']}\n"
            "funny caption:")


def long_prompt(desc: dict) -> str:
    return INSTRUCTION + "\n" + simple_prompt(desc)


def first_file_per_contest(summaries_dir: str) -> dict[int, str]:
    """Contest number -> path of one summary file for it.

    The original took whichever file the directory listing gave first; listing order is not
    deterministic, so here it is the first in sorted file-name order.
    """
    files = {}
    for name in sorted(os.listdir(summaries_dir)):
        match = re.match(r"(\d+)[-_]", name)
        if name.endswith(".csv") and match:
            files.setdefault(int(match.group(1)), os.path.join(summaries_dir, name))
    return files


def sample_pairs(means: list, ses: list, rng: random.Random) -> list[tuple[int, int]]:
    """Rejection sampling: i in the top half, j ranked below i; keep if the gap is significant."""
    n = len(means)
    pairs, taken = [], set()
    if n < 2:
        return pairs
    for _ in range(MAX_TRIES):
        if len(pairs) >= PER_CONTEST:
            break
        i = rng.randrange(n // 2)
        j = rng.randrange(i + 1, n)
        # A NaN precision makes the test False, so such captions are never paired.
        if (i, j) not in taken and means[i] - means[j] > SIGMA * math.sqrt(ses[i] ** 2 + ses[j] ** 2):
            taken.add((i, j))
            pairs.append((i, j))
    return pairs


def run_original(summaries_dir: str, descriptions_csv: str, splits_json: str, output_dir: str,
                 seed: int = 2024) -> dict:
    descriptions = {int(row["contest"]): row
                    for row in pd.read_csv(descriptions_csv).to_dict(orient="records")}
    with open(splits_json) as f:
        splits = json.load(f)
    eval_contests = set(splits["validation"]) | set(splits["test"])  # anything unlisted is train

    rng = random.Random(seed)  # the original seeded Python's `random` once for the whole run
    sft = {"train": [], "eval": []}
    pairs = {"train": [], "eval": []}
    contests = captions = 0
    for contest, path in sorted(first_file_per_contest(summaries_dir).items()):
        if contest not in descriptions:
            continue
        desc = descriptions[contest]
        split = "eval" if contest in eval_contests else "train"
        # Empty captions read as NaN and would be written as the text "nan"; drop them.
        df = pd.read_csv(path).dropna(subset=["caption"])
        df = df.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
        contests += 1
        captions += len(df)

        prompt = long_prompt(desc)
        picked = df["caption"].sample(n=min(PER_CONTEST, len(df)), random_state=seed).astype(str)
        sft[split].append(pd.DataFrame({"contest": contest, "prompt": prompt,
                                        "completion": picked.values, "text": prompt + picked.values}))

        caption_list = df["caption"].astype(str).tolist()
        chosen_rejected = sample_pairs(df["score"].tolist(), df["precision"].tolist(), rng)
        pairs[split].append(pd.DataFrame({"contest": contest, "prompt": simple_prompt(desc),
                                          "chosen": [caption_list[i] for i, _ in chosen_rejected],
                                          "rejected": [caption_list[j] for _, j in chosen_rejected]}))

    os.makedirs(output_dir, exist_ok=True)
    counts = {"contests": contests, "captions": captions, "sft_rows": {}, "pair_rows": {}}
    for kind, frames, columns in (("sft", sft, ["contest", "prompt", "completion", "text"]),
                                  ("pairs", pairs, ["contest", "prompt", "chosen", "rejected"])):
        for split, parts in frames.items():
            table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
            table.to_csv(os.path.join(output_dir, f"{kind}_{split}.csv"), index=False)
            counts["sft_rows" if kind == "sft" else "pair_rows"][split] = len(table)
    return counts


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summaries", required=True, help="directory of contest summary CSVs")
    parser.add_argument("--descriptions", required=True,
                        help="CSV with contest,scene,description,uncanny_description,entities")
    parser.add_argument("--splits", required=True, help="JSON with train/validation/test contest lists")
    parser.add_argument("--output", required=True, help="directory for sft_*.csv and pairs_*.csv")
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args()
    start = time.perf_counter()
    result = run_original(args.summaries, args.descriptions, args.splits, args.output, args.seed)
    result["wall_s"] = round(time.perf_counter() - start, 2)
    print(json.dumps(result))
