"""Preference pairs by the paper's rule, sampled with numpy instead of a Python rejection loop.

Captions are ranked by mean (best first). A candidate pair is (i, j) with i in the top half and j ranked
below i. It is kept when mean_i - mean_j > sigma * sqrt(se_i^2 + se_j^2). Up to `max_pairs` distinct
pairs per contest are drawn uniformly from the kept candidates.

`diverse_pairs` makes pairs from a pool of sampled captions scored by a reward model instead (DPO's
`--pairs diverse`): a distinct funny caption against a repetitive unfunny one.
"""

from __future__ import annotations

import numpy as np

# Below this many candidate pairs we list them all (exact); above it we draw candidates in batches.
ENUMERATE_LIMIT = 200_000
MIN_BATCH, MAX_BATCH = 1 << 12, 1 << 16
MAX_BATCHES = 64


def _pair_start(i: np.ndarray, n: int) -> np.ndarray:
    """Flat index of the first candidate (i, i+1): the n-1, n-2, ... candidates of every earlier i."""
    return i * (n - 1) - i * (i - 1) // 2


def _index_to_pair(index: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Map a flat candidate index to (i, j) in the triangle of candidates, in closed form: the root of
    the quadratic _pair_start(i) = index, corrected by one where floating point rounds across."""
    b = 2.0 * n - 1.0
    i = np.floor((b - np.sqrt(np.maximum(b * b - 8.0 * index, 0.0))) / 2.0).astype(np.int64)
    i -= _pair_start(i, n) > index
    i += _pair_start(i + 1, n) <= index
    return i, i + 1 + (index - _pair_start(i, n))


def sample_pairs(mean: np.ndarray, se: np.ndarray, max_pairs: int, sigma: float,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Positions (chosen, rejected) into arrays already sorted best-first."""
    n = len(mean)
    empty = (np.empty(0, np.int64), np.empty(0, np.int64))
    if n < 2 or max_pairs <= 0:
        return empty
    total = int(_pair_start(np.int64(n // 2), n))  # i runs over the top half
    if total == 0:
        return empty

    def keep(i, j):
        return mean[i] - mean[j] > sigma * np.sqrt(se[i] ** 2 + se[j] ** 2)

    if total <= ENUMERATE_LIMIT:
        i, j = _index_to_pair(np.arange(total, dtype=np.int64), n)
        ok = np.flatnonzero(keep(i, j))
        if len(ok) > max_pairs:
            ok = np.sort(rng.choice(ok, size=max_pairs, replace=False))
        return i[ok], j[ok]

    chosen = np.empty(0, np.int64)
    batch, drawn = MIN_BATCH, 0
    for _ in range(MAX_BATCHES):
        index = rng.integers(0, total, size=batch, dtype=np.int64)
        drawn += batch
        i, j = _index_to_pair(index, n)
        index = index[keep(i, j)]
        # Distinct, in the order drawn: first occurrences of the new ones.
        merged = np.concatenate((chosen, index))
        _, first = np.unique(merged, return_index=True)
        chosen = merged[np.sort(first)]
        if len(chosen) >= max_pairs:
            break
        # Size the next draw from the share kept so far, with room for rejections and repeats.
        kept_share = max(len(chosen), 1) / drawn
        batch = int(min(MAX_BATCH, max(MIN_BATCH, 2 * (max_pairs - len(chosen)) / kept_share)))
    chosen = chosen[:max_pairs]
    return _index_to_pair(chosen, n)


def diverse_pairs(rewards: np.ndarray, distinctness: np.ndarray, quantile: float,
                  count: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (chosen, rejected) of up to `count` pairs from one contest's pool of scored captions: the
    chosen are the most distinct of the captions whose reward is at or above the pool's `quantile`, the
    rejected the least distinct of those below it, paired in that order (the most distinct with the least).
    `distinctness`: each caption's mean embedding distance to the rest of the pool. Equal distinctness goes to
    the earlier caption. No pair when every reward is at or above the quantile."""
    rewards, distinctness = np.asarray(rewards, dtype=np.float64), np.asarray(distinctness, dtype=np.float64)
    if len(rewards) < 2 or count <= 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    above = rewards >= np.quantile(rewards, quantile)
    positions = np.arange(len(rewards))
    high, low = positions[above], positions[~above]
    chosen = high[np.lexsort((high, -distinctness[high]))]  # most distinct first
    rejected = low[np.lexsort((low, distinctness[low]))]  # least distinct first
    size = min(count, len(chosen), len(rejected))
    return chosen[:size].astype(np.int64), rejected[:size].astype(np.int64)
