"""Best-of-N's selections: maximal marginal relevance by hand, L = 0 as `top`, and bon's kept rows and
candidates.parquet from real sentence embeddings."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from humor_ray.infer import generate
from humor_ray.infer.selection import mmr_select, pick_rows, standardised, top_select

pytestmark = pytest.mark.timeout(300)

# Rewards with mean 0 and standard deviation 1: standardised, they stay as they are.
REWARDS = np.array([1.0, 1.0, -1.0, -1.0])
# Candidate 1 says what 0 says; 3 is close to 2 (cosine 0.6) and unlike 0 and 1.
VECTORS = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.6, 0.8]])


def test_standardised_rewards():
    assert standardised(REWARDS).tolist() == REWARDS.tolist()
    assert standardised(np.array([3.0, 1.0])).tolist() == [1.0, -1.0]
    assert standardised(np.array([2.0, 2.0])).tolist() == [0.0, 0.0]


def test_mmr_picks_by_hand():
    # L = 0.8: relevance 0.2 x [1, 1, -1, -1]. First pick: 0 (the earlier of two equal gains). Then
    # 1: 0.2 - 0.8 x 1 = -0.6; 2: -0.2 - 0.8 x 0 = -0.2; 3: -0.2 - 0.8 x 0 = -0.2 -> 2 (earlier).
    # Then 1: -0.6; 3: -0.2 - 0.8 x max(0, 0.6) = -0.68 -> 1.
    assert mmr_select(REWARDS, VECTORS, 3, 0.8) == [0, 2, 1]
    # L = 0.5: relevance 0.5 x [1, 1, -1, -1]. After 0: 1 gains 0.5 - 0.5 = 0, 2 and 3 gain -0.5 -> 1;
    # then 2 and 3 both -0.5 -> 2. The reward still wins: the same as top.
    assert mmr_select(REWARDS, VECTORS, 3, 0.5) == [0, 1, 2] == top_select(REWARDS, 3)
    # L = 1: rewards ignored; after 0 the least similar, 2 (3 is as unlike 0 but later), then 3 (its
    # highest similarity 0.6, against 1's 1).
    assert mmr_select(REWARDS, VECTORS, 4, 1.0) == [0, 2, 3, 1]
    assert mmr_select(REWARDS, VECTORS, 10, 0.8) == [0, 2, 1, 3]  # k above the candidates: all of them
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mmr_select(REWARDS, VECTORS, 2, 1.5)


def test_mmr_with_no_diversity_weight_is_top():
    rng = np.random.default_rng(0)
    for _ in range(50):
        count = int(rng.integers(1, 30))
        rewards = np.round(rng.normal(size=count), 1)  # rounded: ties occur
        vectors = rng.normal(size=(count, 8))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        k = int(rng.integers(1, count + 1))
        assert mmr_select(rewards, vectors, k, 0.0) == top_select(rewards, k)
    contests = rng.integers(0, 4, size=60)
    samples = rng.permutation(60)
    rewards = np.round(rng.normal(size=60), 1)
    vectors = rng.normal(size=(60, 8))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    assert (pick_rows(contests, samples, rewards, 5, "mmr", 0.0, vectors)
            == pick_rows(contests, samples, rewards, 5, "top"))


def test_pick_rows_goes_contest_by_contest_and_breaks_ties_by_sample():
    contests = np.array([7, 3, 7, 3, 7])
    samples = np.array([2, 1, 0, 0, 1])
    rewards = np.array([1.0, 5.0, 1.0, 5.0, 0.0])
    # Contest 3: rows 3 (sample 0) and 1 (sample 1) tie; contest 7: rows 2 (sample 0) and 0 tie.
    assert pick_rows(contests, samples, rewards, 2, "top") == [3, 1, 2, 0]
    with pytest.raises(ValueError, match="embeddings"):
        pick_rows(contests, samples, rewards, 2, "mmr", 0.5)


def test_bon_mmr_skips_a_paraphrase_and_records_every_candidate(tmp_path):
    captions = ["I told you not to feed the cat after midnight.",
                "I told you not to feed the cat after midnight!",
                "Honestly, this meeting could have been an email.",
                "Relax, the lawyers said the dragon is tax deductible."]
    scored = pa.table({"contest": [5, 5, 5, 5], "sample": [0, 1, 2, 3], "caption": captions,
                       "reward": [2.0, 1.9, 0.5, 0.0], "prompt": ["p"] * 4})

    def kept(**options):
        cfg = generate.BonConfig(dataset_dir="/d", output_dir=str(tmp_path), reward_model="rm", n=2, **options)
        table = generate._pick(cfg, scored)
        return table["caption"].to_pylist(), table["sample"].to_pylist()

    assert kept(select="top") == (captions[:2], [0, 1])
    assert kept(select="mmr", diversity_weight=0.0) == (captions[:2], [0, 1])
    assert kept(select="mmr", diversity_weight=0.7, embedding="minilm") == ([captions[0], captions[2]], [0, 1])
    candidates = pd.read_parquet(tmp_path / "candidates.parquet")
    assert candidates["picked"].tolist() == [True, False, True, False]
    assert candidates["pick"].tolist() == [0, -1, 1, -1]
    assert candidates["reward"].tolist() == [2.0, 1.9, 0.5, 0.0]


def test_bon_selection_options_on_the_command_line():
    from humor_ray.config import ConfigError, parse_config

    base = ["--dataset_dir", "/d", "--output_dir", "/o", "--reward_model", "/rm"]
    cfg = parse_config(generate.BonConfig, [*base, "--select", "mmr", "--diversity_weight", "0.3", "--embedding",
                                            "mpnet"], "humor-ray bon")
    assert (cfg.select, cfg.diversity_weight, cfg.embedding) == ("mmr", 0.3, "mpnet")
    for flag, value in (("--diversity_weight", "1.5"), ("--select", "random"), ("--embedding", "glove")):
        with pytest.raises(ConfigError, match=flag):
            parse_config(generate.BonConfig, [*base, flag, value], "humor-ray bon")
