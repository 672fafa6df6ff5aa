"""The diversity term of the group estimators: by hand, 0 on a group of identical samples, its two forms,
the options it needs; and on real sentence embeddings of captions."""

import pytest
import torch

from humor_ray.config import ConfigError
from humor_ray.eval.diversity import embed, group_diversity
from humor_ray.rl import algorithms as alg
from humor_ray.rl import ppo

pytestmark = pytest.mark.timeout(300)


def unit(rows):
    vectors = torch.tensor(rows, dtype=torch.float32)
    return vectors / vectors.norm(dim=1, keepdim=True)


def test_group_diversity_by_hand():
    # Group 1: two the same, one at right angles to both. Group 2: opposite directions, and one between.
    vectors = unit([[1, 0], [1, 0], [0, 1], [1, 0], [-1, 0], [0, 1]])
    diversity = group_diversity(vectors, 3)
    # Sample 0: distances 0 (to 1) and 1 (to 2) -> 0.5; sample 2: 1 and 1 -> 1.
    # Sample 3: 2 (to 4) and 1 (to 5) -> 1.5; 4 the same; 5: 1 and 1 -> 1.
    assert diversity.tolist() == pytest.approx([0.5, 0.5, 1.0, 1.5, 1.5, 1.0])


def test_identical_samples_gain_nothing():
    same = unit([[0.3, -1.2, 2.0]] * 4)
    assert group_diversity(same, 4).abs().max().item() < 1e-6
    scores = torch.tensor([0.2, 0.9, -0.4, 0.1])
    for form in alg.DIVERSITY_FORMS:
        term = alg.diversity_term(scores, group_diversity(same, 4), 4, 0.5, form)
        assert term.abs().max().item() < 1e-6, form
    # Nor does any group under W = 0.
    spread = group_diversity(unit([[1, 0], [0, 1], [-1, 0], [0, -1]]), 4)
    assert alg.diversity_term(scores, spread, 4, 0.0, "additive").tolist() == [0.0] * 4


def test_the_two_forms_by_hand():
    scores = torch.tensor([3.0, 1.0, -1.0, 0.0, 0.0, 2.0])
    diversity = torch.tensor([0.5, 0.25, 0.5, 0.2, 0.4, 0.1])
    assert alg.diversity_term(scores, diversity, 3, 2.0, "additive").tolist() == pytest.approx(
        [1.0, 0.5, 1.0, 0.4, 0.8, 0.2])
    # Scores above the group's lowest (-1, then 0) times diversity over the group's highest (0.5, then 0.4).
    assert alg.diversity_term(scores, diversity, 3, 2.0, "multiplicative").tolist() == pytest.approx(
        [2 * 4 * 1.0, 2 * 2 * 0.5, 0.0, 2 * 0 * 0.5, 2 * 0 * 1.0, 2 * 2 * 0.25])
    with pytest.raises(ValueError, match="at least 2"):
        group_diversity(torch.eye(3), 1)


def test_a_paraphrase_is_less_diverse_than_a_new_joke():
    captions = ["I told you not to feed him after midnight.", "I said don't feed him after midnight!",
                "The quarterly numbers are in, and so is the moat."]
    diversity = group_diversity(embed(captions, model="minilm"), 3)
    assert diversity[2] > diversity[0] and diversity[2] > diversity[1]


def test_the_diversity_options_need_a_group_estimator(tmp_path):
    base = dict(output_dir=str(tmp_path), dataset_dir=str(tmp_path), reward_model="builtin:vowel_share")
    with pytest.raises(ConfigError, match="--diversity_weight needs a group estimator"):
        ppo.Config(**base, diversity_weight=0.1)
    with pytest.raises(ValueError, match="--diversity_form"):
        ppo.Config(**base, estimator="grpo", diversity_weight=0.1, diversity_form="product")
    with pytest.raises(ValueError, match="--diversity_weight"):
        ppo.Config(**base, estimator="grpo", diversity_weight=-1.0)
    cfg = ppo.Config(**base, estimator="rloo", diversity_weight=0.1, diversity_form="multiplicative")
    assert (cfg.diversity_embedding, cfg.diversity_form) == ("minilm", "multiplicative")
