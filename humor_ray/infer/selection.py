"""Which of a contest's scored candidates best-of-N keeps.

- `top`: the N highest rewards, best first (ties: the earlier sample).
- `mmr` (maximal marginal relevance, Carbonell and Goldstein 1998): N picks made greedily, each the
  candidate with the highest (1 - L) x standardised reward - L x its highest cosine similarity to those
  already picked. L = 0 is `top`; a larger L trades reward for captions that are not paraphrases of one
  another. Rewards are standardised within the contest, so L means the same whatever the reward model's
  scale.
"""

from __future__ import annotations

import numpy as np

SELECTIONS = ("top", "mmr")


def top_select(rewards: np.ndarray, k: int) -> list[int]:
    """Positions of the `k` highest rewards, best first; ties go to the earlier position."""
    return np.lexsort((np.arange(len(rewards)), -np.asarray(rewards))).tolist()[:k]


def standardised(rewards: np.ndarray) -> np.ndarray:
    """Rewards less their mean, over their standard deviation (all zeros when they are all equal)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    spread = rewards.std()
    return (rewards - rewards.mean()) / spread if spread > 0 else np.zeros_like(rewards)


def mmr_select(rewards: np.ndarray, embeddings: np.ndarray, k: int, weight: float) -> list[int]:
    """Positions of `k` candidates picked greedily by maximal marginal relevance, in the order picked.
    `embeddings`: one unit-length row per candidate (cosine = dot product). The first pick has nothing to
    resemble (its similarity counts 0); ties go to the earlier position."""
    if not 0 <= weight <= 1:
        raise ValueError(f"the diversity weight must be in [0, 1], got {weight}")
    relevance = (1 - weight) * standardised(rewards)
    vectors = np.asarray(embeddings, dtype=np.float64)
    closest = np.zeros(len(relevance))  # each candidate's highest similarity to the picks so far
    free = np.ones(len(relevance), dtype=bool)
    picked: list[int] = []
    for _ in range(min(k, len(relevance))):
        gain = np.where(free, relevance - weight * closest, -np.inf)
        best = int(np.argmax(gain))  # the first of equal gains: the earlier candidate
        similarity = vectors @ vectors[best]
        # A negative similarity is kept as it is: the zeros only stood for "nothing picked yet".
        closest = similarity if not picked else np.maximum(closest, similarity)
        picked.append(best)
        free[best] = False
    return picked


def pick_rows(contests: np.ndarray, samples: np.ndarray, rewards: np.ndarray, n: int, select: str,
              weight: float = 0.0, embeddings: np.ndarray | None = None) -> list[int]:
    """The rows best-of-N keeps from a table of scored candidates (one row each: contest, sample, reward),
    contest by contest in ascending order, each contest's in the order picked (`top`: best first).
    `embeddings` (one unit row per candidate) are needed by `mmr`."""
    if select not in SELECTIONS:
        raise ValueError(f"unknown selection {select!r}: use one of {', '.join(SELECTIONS)}")
    if select == "mmr" and embeddings is None:
        raise ValueError("mmr needs the candidates' embeddings")
    contests, samples, rewards = (np.asarray(a) for a in (contests, samples, rewards))
    keep: list[int] = []
    for contest in np.unique(contests):
        rows = np.flatnonzero(contests == contest)
        rows = rows[np.argsort(samples[rows], kind="stable")]  # ties go to the earlier sample
        chosen = (mmr_select(rewards[rows], embeddings[rows], n, weight) if select == "mmr"
                  else top_select(rewards[rows], n))
        keep.extend(rows[chosen].tolist())
    return keep
