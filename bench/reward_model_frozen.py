"""How far frozen sentence embeddings take a reward model on this machine: all-MiniLM-L6-v2 embeddings of
train captions and of each contest's prompt with context, computed once; a linear head trained on each
caption's standardised mean within its contest (weighted by its standard error), on an eighth, a quarter,
half and all of the sample; pairwise accuracy on the same held-out pairs as bench/reward_model.py (the
seeded sample of pairs/eval its job spec scores on), with the embedding throughput and the time all train
captions would take.

    python bench/reward_model_frozen.py --datasets DIR [--per_contest 600] [--epochs 25]

DIR is the output of `humor-ray data build --config jobs/data.yaml --datasets pairs captions`.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pyarrow.parquet as pq
import torch

from reward_model import RECIPE, held_out_pairs, length_baselines

from humor_ray.config import parse_config
from humor_ray.eval.diversity import embed
from humor_ray.train import rm

MIN_VOTES = 5  # a caption's mean from fewer votes is mostly noise


def train_captions(datasets: str, per_contest: int, seed: int):
    """(sampled train captions with their standardised score and weight, prompt of each train contest)."""
    captions = pq.read_table(os.path.join(datasets, "captions"),
                             columns=["contest", "caption", "votes", "mean", "se", "split"]).to_pandas()
    captions = captions[captions["split"] == "train"]
    stats = captions.groupby("contest")["mean"].agg(["mean", "std"])
    prompts = (pq.read_table(os.path.join(datasets, "pairs", "train"), columns=["contest", "prompt"]).to_pandas()
               .groupby("contest")["prompt"].first())
    sample = captions[(captions["votes"] >= MIN_VOTES) & captions["contest"].isin(prompts.index)]
    sample = sample.sample(frac=1.0, random_state=seed).groupby("contest").head(per_contest)
    contest = stats.loc[sample["contest"]]
    sample = sample.assign(score=(sample["mean"].values - contest["mean"].values) / contest["std"].values)
    precision = 1.0 / np.clip(sample["se"].values, 0.02, None) ** 2
    sample = sample.assign(weight=np.clip(precision / precision.mean(), 0.0, 5.0))
    return sample, prompts, len(captions)


def features(captions: torch.Tensor, contexts: torch.Tensor, with_context: bool) -> torch.Tensor:
    return torch.cat([captions, contexts, captions * contexts], dim=1) if with_context else captions


def train_head(x: torch.Tensor, score: torch.Tensor, weight: torch.Tensor, epochs: int, held_out,
               seed: int) -> list:
    """A linear head fitted by weighted least squares with AdamW; [(epoch, held-out accuracy)] every 5 epochs."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], 1)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-2)
    chosen, rejected = held_out
    curve = []
    for epoch in range(1, epochs + 1):
        for batch in torch.randperm(len(x)).split(512):
            loss = (weight[batch] * (head(x[batch]).squeeze(-1) - score[batch]) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch % 5 == 0 or epoch == epochs:
            with torch.no_grad():
                curve.append((epoch, (head(chosen) > head(rejected)).float().mean().item()))
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", required=True, help="datasets with pairs and captions")
    parser.add_argument("--per_contest", type=int, default=600, help="train captions sampled per contest")
    parser.add_argument("--epochs", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    # The reward model's job spec: its seed and held-out sample (no run: the folders are only required).
    cfg = parse_config(rm.Config, ["--config", str(RECIPE), "--dataset_dir", args.datasets, "--output_dir",
                                   args.datasets], "bench")

    sample, prompts, all_train = train_captions(args.datasets, args.per_contest, cfg.seed)
    started = time.perf_counter()
    caption_vectors = embed(list(sample["caption"]), model="minilm", batch_size=128)
    embed_seconds = time.perf_counter() - started
    rate = len(sample) / embed_seconds
    context_of = dict(zip(prompts.index, embed(list(prompts.values), model="minilm", batch_size=16)))
    train_contexts = torch.stack([context_of[c] for c in sample["contest"]])
    score = torch.tensor(sample["score"].values, dtype=torch.float32)
    weight = torch.tensor(sample["weight"].values, dtype=torch.float32)

    held = held_out_pairs(args.datasets, cfg)
    unique_prompts = sorted(set(held["prompt"]))
    prompt_vector = dict(zip(unique_prompts, embed(unique_prompts, model="minilm", batch_size=16)))
    held_contexts = torch.stack([prompt_vector[p] for p in held["prompt"]])
    chosen, rejected = embed(list(held["chosen"]), model="minilm"), embed(list(held["rejected"]), model="minilm")
    longer, _ = length_baselines(held)

    print(f"\nfrozen minilm embeddings: {len(sample):,} train captions ({args.per_contest} per contest, "
          f"{sample['contest'].nunique()} contests) in {embed_seconds:.0f} s, {rate:.0f} captions/s on "
          f"{os.cpu_count()} cores; all {all_train:,} train captions would take {all_train / rate / 60:.0f} min")
    print(f"{len(held):,} held-out pairs from {len(unique_prompts)} eval contests")
    print(f"{'':48}{'pairwise accuracy':>18}   by epoch")
    print(f"{'longer caption wins':48}{longer:>18.3f}")
    # The sample is in random order: its first n rows are a random subset, for accuracy against data size.
    sizes = sorted({len(sample) // 8, len(sample) // 4, len(sample) // 2, len(sample)})
    for name, with_context in (("linear head, caption", False), ("linear head, caption x context", True)):
        x = features(caption_vectors, train_contexts, with_context)
        held_out = (features(chosen, held_contexts, with_context), features(rejected, held_contexts, with_context))
        for size in sizes:
            head_started = time.perf_counter()
            curve = train_head(x[:size], score[:size], weight[:size], args.epochs, held_out, cfg.seed)
            shown = ", ".join(f"{epoch}: {accuracy:.3f}" for epoch, accuracy in curve)
            label = f"{name}, {size:,} captions"
            print(f"{label:48}{curve[-1][1]:>18.3f}   {shown}  ({time.perf_counter() - head_started:.0f} s)")


if __name__ == "__main__":
    main()
