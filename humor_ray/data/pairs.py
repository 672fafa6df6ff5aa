"""Preference pairs by the paper's rule, sampled with numpy instead of a Python rejection loop.

Captions are ranked by mean (best first). A candidate pair is (i, j) with i in the top half and j ranked
below i. It is kept when mean_i - mean_j > sigma * sqrt(se_i^2 + se_j^2). Up to `max_pairs` distinct
pairs per contest are drawn uniformly from the kept candidates.
"""

from __future__ import annotations

import numpy as np

# Below this many candidate pairs we list them all (exact); above it we draw candidates in batches.
ENUMERATE_LIMIT = 200_000
BATCH = 1 << 15
MAX_BATCHES = 64


def _candidate_counts(n: int) -> np.ndarray:
    """How many j lie below each chosen position i of the top half."""
    top = n // 2
    return (n - 1 - np.arange(top)).astype(np.int64)


def _index_to_pair(index: np.ndarray, cumulative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map a flat candidate index to (i, j) in the triangle of candidates."""
    i = np.searchsorted(cumulative, index, side="right")
    start = np.concatenate(([0], cumulative))[i]
    j = i + 1 + (index - start)
    return i, j


def sample_pairs(mean: np.ndarray, se: np.ndarray, max_pairs: int, sigma: float,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Positions (chosen, rejected) into arrays already sorted best-first."""
    n = len(mean)
    empty = (np.empty(0, np.int64), np.empty(0, np.int64))
    if n < 2 or max_pairs <= 0:
        return empty
    counts = _candidate_counts(n)
    cumulative = np.cumsum(counts)
    total = int(cumulative[-1]) if len(cumulative) else 0
    if total == 0:
        return empty

    def keep(i, j):
        return mean[i] - mean[j] > sigma * np.sqrt(se[i] ** 2 + se[j] ** 2)

    if total <= ENUMERATE_LIMIT:
        i, j = _index_to_pair(np.arange(total, dtype=np.int64), cumulative)
        ok = np.flatnonzero(keep(i, j))
        if len(ok) > max_pairs:
            ok = np.sort(rng.choice(ok, size=max_pairs, replace=False))
        return i[ok], j[ok]

    chosen = np.empty(0, np.int64)
    for _ in range(MAX_BATCHES):
        index = rng.integers(0, total, size=BATCH, dtype=np.int64)
        i, j = _index_to_pair(index, cumulative)
        index = index[keep(i, j)]
        # Distinct, in the order drawn: first occurrences of the new ones.
        merged = np.concatenate((chosen, index))
        _, first = np.unique(merged, return_index=True)
        chosen = merged[np.sort(first)]
        if len(chosen) >= max_pairs:
            break
    chosen = chosen[:max_pairs]
    return _index_to_pair(chosen, cumulative)
