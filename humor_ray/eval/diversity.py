"""Caption diversity, as in "Humor in AI" (Zhang et al. 2024): every method writes N captions per
held-out contest, a diversity score is computed per contest over its N captions, then averaged over
contests. Two scores:

- embedding diversity: 1 - mean pairwise cosine similarity of sentence embeddings (`mpnet`,
  all-mpnet-base-v2 as the paper; `minilm`, all-MiniLM-L6-v2, a fifth of its size and faster), which sees
  paraphrases of one joke as the same joke; the paper's mean takes each caption with itself too;
- EAD-n (Liu et al. 2022, "Rethinking and Refining the Distinct Metric"): distinct n-grams over their
  expected number for text drawn at random from a vocabulary of V tokens, which unlike Distinct-n
  does not fall just because a method writes longer captions. Two kinds (`EAD_KINDS`): `paper`, the
  paper's (words split on spaces after removing '.' and newlines, V = 32,000, Mistral-7B's vocabulary),
  and `words` (lowercased words and punctuation marks, V = the word vocabulary of the whole evaluation).

Tables are pandas DataFrames in the long layout of `humor_ray.data.generations`, one row per caption:
`contest, method, sample, caption`. `humor-ray diversity` prints the scores of every method and writes them
to `diversity.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING
from pathlib import Path

import numpy as np
import pandas as pd
from humor_ray.config import ConfigError, Options, UserError, field
from humor_ray.data.generations import read_generations
from humor_ray.log import get_logger

if TYPE_CHECKING:
    import torch

log = get_logger("diversity")

EMBEDDING_MODELS = ("mpnet", "minilm")
EMBEDDING_MODEL = "mpnet"
# Which cosine similarities embedding diversity averages (see `embedding_diversity`).
PAIRS = ("with_self", "distinct")
# Used when a model directory has no sentence_bert_config.json giving its `max_seq_length`.
MAX_TOKENS = 256
# Lowercased words (contractions such as "don't" stay one word) and single punctuation marks.
TOKEN = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")
# The paper's V: the vocabulary size of Mistral-7B, whose fine-tunes wrote most of the captions.
PAPER_VOCAB_SIZE = 32000
# The paper's diversity table (Zhang et al. 2024), to 4 places: (embedding diversity, EAD) of each set of
# released generations, each over all its rows, with the paper's definitions (the defaults here).
PAPER_TABLE = {
    "human_top": (0.7452, 0.9456), "human_200": (0.7496, 0.9564), "human_1000": (0.7522, 0.9608),
    "human_median": (0.7489, 0.9597), "claude": (0.6813, 0.9533), "gpt4o": (0.5789, 0.9603),
    "zs": (0.5312, 0.9028), "zs_BoN": (0.4868, 0.8663), "sft": (0.5806, 0.9043), "dpo": (0.7129, 0.9202),
    "ppo": (0.5994, 0.9006), "llava_zs": (0.5220, 0.8986), "llava_sft": (0.5173, 0.9002),
}


# ---------------------------------------------------------------------------------------- EAD


def tokenize(caption: str) -> list[str]:
    """Lowercased words and punctuation marks, each a token (the `words` EAD)."""
    return TOKEN.findall(caption.lower())


def paper_words(caption: str) -> list[str]:
    """The paper's tokens: '.' and newlines removed, then the pieces between single spaces (case and
    other punctuation kept, so "Honey," and "honey" differ)."""
    return [word for word in caption.replace(".", "").replace("\n", "").split(" ") if word]


EAD_KINDS: dict[str, Callable[[str], list[str]]] = {"paper": paper_words, "words": tokenize}


def vocabulary_size(all_captions: Iterable[str]) -> int:
    """Distinct tokens over every caption of an evaluation: the V of the `words` EAD. Computed once
    over all methods being compared, so that their EAD scores share one scale."""
    return len({token for caption in all_captions for token in tokenize(caption)})


def ead(captions: Sequence[str], n: int, vocab_size: int,
        words: Callable[[str], list[str]] = tokenize) -> float:
    """Expectation-Adjusted Distinct n-grams of one set of captions:
    distinct / (V * (1 - ((V - 1) / V) ** C)), with C the number of n-grams (none spans two
    captions) and V = `vocab_size`; `words` splits a caption into tokens. The denominator is the
    expected number of distinct n-grams among C drawn uniformly from V (a little under C when C is
    small against V), so EAD is a little above 1 when nothing repeats. NaN when there is no n-gram."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be at least 1, got {vocab_size}")
    grams = [gram for caption in captions for gram in _ngrams(words(caption), n)]
    if not grams:
        return math.nan
    # V * (1 - ((V - 1) / V) ** C), written with log1p/expm1 so that a large V loses no precision.
    expected = 1.0 if vocab_size == 1 else -vocab_size * math.expm1(len(grams) * math.log1p(-1 / vocab_size))
    return len(set(grams)) / expected


def ead_scores(groups: Sequence[Sequence[str]], vocab_size: int, ns: Sequence[int] = (1, 2, 3, 4, 5),
               words: Callable[[str], list[str]] = tokenize) -> dict[int, list[float]]:
    """EAD-n of every group (one contest's captions), for each n."""
    return {n: [ead(group, n, vocab_size, words) for group in groups] for n in ns}


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return list(zip(*(tokens[i:] for i in range(n))))


# ---------------------------------------------------------------------------------- embeddings


@functools.cache
def _encoder(spec: str):
    """(model, tokenizer, max tokens), loaded once per process: evaluating many methods loads the
    model once. Max tokens is the sentence-transformers `max_seq_length` (384 for mpnet, 256 for
    minilm): longer texts are cut, as there."""
    from humor_ray.models import registry

    model, tokenizer = registry.load_model(spec, kind="embedding")
    config = Path(registry.resolve(spec)) / "sentence_bert_config.json"
    max_tokens = json.loads(config.read_text())["max_seq_length"] if config.is_file() else MAX_TOKENS
    return model.eval(), tokenizer, max_tokens


def embed(texts: Sequence[str], model: str = EMBEDDING_MODEL, batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings, one unit-length row per text: the attention-masked mean of the last hidden
    state, L2-normalised (what sentence-transformers computes for mpnet and minilm). Texts are batched
    by length, so that a few long captions do not pad every batch."""
    import torch  # here, not at import: best-of-N's options name the embedding models without loading torch

    encoder, tokenizer, max_tokens = _encoder(model)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), encoder.config.hidden_size)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                              max_length=max_tokens, return_tensors="pt")
            hidden = encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            out[rows] = torch.nn.functional.normalize(pooled, dim=-1).float()
    return out


def embedding_diversity(groups: Sequence[Sequence[str]], model: str = EMBEDDING_MODEL,
                        batch_size: int = 64, pairs: str = "with_self") -> list[float]:
    """1 - mean cosine similarity of a group's non-empty captions, per group (NaN for fewer than two).
    `pairs`: "with_self", the paper's, over all k x k ordered pairs, each caption with itself included
    (so (k - 1) / k times the other); "distinct", over the k (k - 1) / 2 pairs of two different captions.
    All groups are embedded together, in batches."""
    if pairs not in PAIRS:
        raise UserError(f"unknown pairs {pairs!r}: use one of {', '.join(PAIRS)}")
    import torch

    kept = [[c for c in group if c.strip()] for group in groups]
    vectors = embed([c for group in kept for c in group], model=model, batch_size=batch_size)
    scores, start = [], 0
    for group in kept:
        k = len(group)
        block = vectors[start:start + k]
        start += k
        if k < 2:
            scores.append(math.nan)
            continue
        similarity = (block @ block.T).double()
        if pairs == "distinct":
            upper = torch.triu_indices(k, k, offset=1)
            similarity = similarity[upper[0], upper[1]]
        scores.append(1.0 - float(similarity.mean()))
    return scores


def group_diversity(embeddings: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each text's mean embedding distance (1 - cosine) to the other texts of its group (groups: consecutive
    `group_size` rows of `embeddings`, unit length, as `embed` gives them); (B,). PPO's diversity term and
    the diverse DPO pairs read it."""
    import torch

    if group_size < 2:
        raise ValueError(f"a group needs at least 2 texts, got {group_size}")
    grouped = embeddings.double().view(-1, group_size, embeddings.shape[-1])
    distance = (1.0 - grouped @ grouped.transpose(1, 2)).clamp(min=0)  # a cosine a rounding above 1 is 1
    distance = distance - torch.diag_embed(torch.diagonal(distance, dim1=1, dim2=2))  # not a text to itself
    return (distance.sum(2) / (group_size - 1)).reshape(-1).to(embeddings.dtype)


# ------------------------------------------------------------------------------ per method


def method_diversity(table: pd.DataFrame, model: str = EMBEDDING_MODEL, ead_kind: str = "paper",
                     pairs: str = "with_self", batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Per method of a long table (a DataFrame with columns `contest, method, caption`): the means over
    its contests of embedding diversity (`embedding`, with `model` over `pairs`) and of EAD-1..5 (`ead_1`..`ead_5`,
    and their average `ead`, of the kind `ead_kind`), the number of contests and the mean number of
    captions per contest. The `words` EAD takes one vocabulary, from every caption in the table, for
    all methods. Compare methods on the same contests: filter the table first if their contest sets
    differ."""
    missing = {"contest", "method", "caption"} - set(table.columns)
    if missing:
        raise UserError(f"method_diversity needs columns contest, method, caption; missing: "
                        f"{', '.join(sorted(missing))}")
    if ead_kind not in EAD_KINDS:
        raise UserError(f"unknown EAD {ead_kind!r}: use one of {', '.join(EAD_KINDS)}")
    captions = table[table["caption"].fillna("").str.strip() != ""]
    vocab = PAPER_VOCAB_SIZE if ead_kind == "paper" else vocabulary_size(captions["caption"])
    keys, groups = [], []
    for (method, _), rows in captions.groupby(["method", "contest"], sort=True):
        keys.append(method)
        groups.append(rows["caption"].tolist())
    per_group = {"embedding": embedding_diversity(groups, model=model, batch_size=batch_size, pairs=pairs)}
    per_group |= {f"ead_{n}": scores for n, scores in ead_scores(groups, vocab, words=EAD_KINDS[ead_kind]).items()}
    scores = pd.DataFrame(per_group).assign(method=keys, size=[len(g) for g in groups])
    result = {}
    for method, rows in scores.groupby("method", sort=True):
        ead_means = [float(np.nanmean(rows[f"ead_{n}"])) for n in range(1, 6)]
        result[str(method)] = {
            "embedding": float(np.nanmean(rows["embedding"])),
            **{f"ead_{n}": value for n, value in zip(range(1, 6), ead_means)},
            "ead": float(np.mean(ead_means)),
            "contests": len(rows),
            "captions_per_contest": float(rows["size"].mean()),
        }
    return result


# ------------------------------------------------------------------------------- the stage


@dataclasses.dataclass
class DiversityConfig(Options):
    """Embedding diversity and EAD of every method's captions."""
    generations: list[str] = field(None, "generation outputs: `humor-ray generate` directories, wide CSVs, the "
                                         "paper's released files or directories of them", required=True)
    contests: list[int] = field([], "only these contests (default: every contest a method has captions for)",
                                 minimum=1)
    embedding: str = field(EMBEDDING_MODEL, "mpnet (all-mpnet-base-v2, the paper's) or minilm (faster)",
                           choices=EMBEDDING_MODELS)
    ead: str = field("paper", "paper (the paper's words, V = 32,000) or words (our tokens, V = the captions' "
                              "vocabulary)", choices=tuple(EAD_KINDS))
    pairs: str = field("with_self", "cosines averaged: with_self (the paper's: each caption with itself too) "
                                    "or distinct (pairs of two different captions)", choices=PAIRS)
    output_dir: str | None = field(None, "where diversity.json goes (default: print only)")
    batch_size: int = field(64, "captions per embedding batch", minimum=1)

    def __post_init__(self):
        if not self.generations:
            raise ConfigError("diversity needs --generations")
        super().__post_init__()


def run(cfg: DiversityConfig) -> dict[str, dict[str, float]]:
    table = read_generations(cfg.generations, humans=True)
    if cfg.contests:
        unknown = sorted(set(cfg.contests) - set(table["contest"]))
        if unknown:
            raise UserError(f"--contests {unknown}: no method has captions for them")
        table = table[table["contest"].isin(cfg.contests)]
    result = method_diversity(table, model=cfg.embedding, ead_kind=cfg.ead, pairs=cfg.pairs,
                              batch_size=cfg.batch_size)
    columns = ["contests", "embedding", "ead", *(f"ead_{n}" for n in range(1, 6))]
    print(pd.DataFrame(result).T[columns].round(4).to_string())
    if cfg.output_dir:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        settings = {"embedding": cfg.embedding, "ead": cfg.ead, "pairs": cfg.pairs, "contests": cfg.contests or "all"}
        (out / "diversity.json").write_text(json.dumps({"settings": settings, "methods": result}, indent=1))
        log.info(f"scores in {out / 'diversity.json'}")
    return result
