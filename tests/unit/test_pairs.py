"""Pair sampling: the paper's 3-sigma rule, top-half chosen, distinct pairs, uniform, deterministic; diverse
pairs from a pool of scored captions."""

import numpy as np
import pandas as pd
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


# ---------------------------------------------------------------- diverse pairs from a scored pool

def test_diverse_pairs_by_hand():
    rewards = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    distinct = np.array([0.2, 0.9, 0.5, 0.3, 0.1, 0.3])
    # The median (2.5) splits {0, 1, 2} from {3, 4, 5}. Chosen, most distinct first: 1 (0.9), 2 (0.5), 0 (0.2);
    # rejected, least distinct first: 4 (0.1), then 3 and 5 (0.3 each: the earlier, 3).
    chosen, rejected = pairs.diverse_pairs(rewards, distinct, 0.5, 3)
    assert chosen.tolist() == [1, 2, 0] and rejected.tolist() == [4, 3, 5]
    chosen, rejected = pairs.diverse_pairs(rewards, distinct, 0.5, 2)
    assert chosen.tolist() == [1, 2] and rejected.tolist() == [4, 3]
    # A higher quantile: the top sixth (5.0 is at or above the 0.9 quantile, 4.5) against the rest.
    chosen, rejected = pairs.diverse_pairs(rewards, distinct, 0.9, 3)
    assert chosen.tolist() == [0] and rejected.tolist() == [4]
    # Every chosen caption scores above every rejected one.
    for q in (0.1, 0.3, 0.5, 0.7):
        chosen, rejected = pairs.diverse_pairs(rewards, distinct, q, 6)
        assert len(chosen) and rewards[chosen].min() > rewards[rejected].max()


def test_no_diverse_pair_without_a_reward_below_the_quantile():
    chosen, rejected = pairs.diverse_pairs(np.ones(4), np.array([0.1, 0.2, 0.3, 0.4]), 0.5, 2)
    assert len(chosen) == len(rejected) == 0
    assert len(pairs.diverse_pairs(np.array([1.0]), np.array([0.0]), 0.5, 2)[0]) == 0


def write_pool(tmp_path, contests):
    """A `bon` output (candidates.parquet) and a dataset with the training prompts of contests 10 and 11."""
    rows = [{"contest": contest, "sample": k, "caption": caption, "reward": reward}
            for contest, captions in contests.items() for k, (caption, reward) in enumerate(captions)]
    (tmp_path / "pool").mkdir()
    pd.DataFrame(rows).to_parquet(tmp_path / "pool" / "candidates.parquet")
    (tmp_path / "data" / "prompts" / "train").mkdir(parents=True)
    pd.DataFrame({"contest": [10, 11], "prompt": ["a dragon in an office", "a cat on a throne"],
                  "prompt_long": ["long 10", "long 11"]}).to_parquet(tmp_path / "data/prompts/train/part.parquet")
    return {"dataset_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / "out"), "pairs": "diverse",
            "pairs_from": str(tmp_path / "pool")}


def test_diverse_dpo_pairs_from_a_pool(tmp_path):
    from humor_ray.config import ConfigError
    from humor_ray.train import dpo

    pool = {10: [("My lawyer says the dragon is tax deductible.", 3.0),
                 ("I told you not to feed the cat after midnight.", 2.9),
                 ("I told you not to feed the cat after midnight!", 2.8),
                 ("I told you not to feed the cat.", 0.5),
                 ("Who ordered the penguin?", 0.1),
                 ("This elevator is going sideways again.", 0.0)],
            11: [("Only one caption: no pair.", 1.0)]}
    cfg = dpo.Config(**write_pool(tmp_path, pool), pairs_per_contest=1)
    table = dpo.pool_pairs(cfg)
    # The distinct funny caption against the unfunny paraphrase of the others.
    assert table.to_dict("records") == [{"contest": 10, "prompt": "a dragon in an office",
                                         "chosen": pool[10][0][0], "rejected": pool[10][3][0]}]
    cfg.pairs_per_contest = 3
    assert dpo.write_pool_pairs(cfg) == 3
    assert dpo.train_dir(cfg) == str(tmp_path / "out" / "pairs" / "train")
    written = pd.read_parquet(dpo.train_dir(cfg))
    assert written["chosen"].tolist()[0] == pool[10][0][0] and set(written["contest"]) == {10}

    with pytest.raises(ConfigError, match="--pairs diverse and --pairs_from go together"):
        dpo.Config(dataset_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "o"), pairs="diverse")
    assert dpo.train_dir(dpo.Config(dataset_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "o"))) is None


def test_a_pool_from_other_contests_is_refused(tmp_path):
    from humor_ray.config import UserError
    from humor_ray.train import dpo

    cfg = dpo.Config(**write_pool(tmp_path, {10: [("a", 1.0), ("b", 0.0)], 99: [("c", 1.0), ("d", 0.0)]}))
    with pytest.raises(UserError, match=r"contests \[99\] are not training contests"):
        dpo.pool_pairs(cfg)
