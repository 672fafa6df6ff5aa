"""Pair sampling: the paper's 3-sigma rule, top-half chosen, distinct pairs, uniform, deterministic."""

import numpy as np
import pytest

from humor_ray.data import pairs


def ranked_contest(n, seed=0):
    rng = np.random.default_rng(seed)
    mean = np.sort(rng.uniform(1.0, 2.2, n))[::-1]
    se = rng.uniform(0.01, 0.15, n)
    return mean, se


@pytest.mark.parametrize("n", [30, 1500, 6000])  # 1500 is listed exhaustively, 6000 drawn in batches
def test_every_pair_obeys_the_rule(n):
    mean, se = ranked_contest(n)
    i, j = pairs.sample_pairs(mean, se, 1000, 3.0, np.random.default_rng(1))
    assert len(i) == len(j) > 0
    assert np.all(i < n // 2) and np.all(j > i)
    assert np.all(mean[i] - mean[j] > 3.0 * np.sqrt(se[i] ** 2 + se[j] ** 2))
    assert len(set(zip(i.tolist(), j.tolist()))) == len(i)
    assert len(i) <= 1000
    if n >= 1500:
        assert len(i) == 1000


def test_small_contest_gives_every_valid_pair():
    mean, se = ranked_contest(30)
    i, j = pairs.sample_pairs(mean, se, 10_000, 3.0, np.random.default_rng(1))
    expected = [(a, b) for a in range(15) for b in range(a + 1, 30)
                if mean[a] - mean[b] > 3.0 * np.sqrt(se[a] ** 2 + se[b] ** 2)]
    assert sorted(zip(i.tolist(), j.tolist())) == expected


def test_deterministic_for_a_seed_and_different_across_seeds():
    mean, se = ranked_contest(6000)
    a = pairs.sample_pairs(mean, se, 1000, 3.0, np.random.default_rng(7))
    b = pairs.sample_pairs(mean, se, 1000, 3.0, np.random.default_rng(7))
    c = pairs.sample_pairs(mean, se, 1000, 3.0, np.random.default_rng(8))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_batched_draws_are_uniform_over_valid_pairs():
    # Every candidate valid (se = 0): each chosen position i should appear in proportion to the
    # number of candidates below it, (n - 1 - i), not equally often as a naive "pick i, then j" would.
    n = 4000
    mean, se = np.linspace(2.5, 1.0, n), np.zeros(n)
    i, _ = pairs.sample_pairs(mean, se, 200_000, 3.0, np.random.default_rng(3))
    top, bottom = np.sum(i < n // 4), np.sum((i >= n // 4) & (i < n // 2))
    weights = n - 1 - np.arange(n // 2)
    expected = weights[: n // 4].sum() / weights.sum()
    assert abs(top / len(i) - expected) < 0.01
    assert top > bottom


def test_nothing_to_pair():
    assert len(pairs.sample_pairs(np.array([2.0]), np.array([0.1]), 10, 3.0, np.random.default_rng(0))[0]) == 0
    mean = np.full(50, 1.5)
    assert len(pairs.sample_pairs(mean, np.full(50, 0.1), 10, 3.0, np.random.default_rng(0))[0]) == 0
