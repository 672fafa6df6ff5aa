"""The study's table and its win-rate-against-diversity plot, from a judge's summary (no Ray, no model)."""

import math

import pandas as pd
import pytest

from humor_ray.eval import table
from humor_ray.eval.benchmark import GROUPS


def _row(method, against, rate, low, high, **extra):
    return {"method": method, "against": against, "win_rate": rate, "ci_low": low, "ci_high": high, **extra}


def _summary():
    """Two methods and the four human groups, each human group judged against the other three."""
    win_rates = [_row("sft", g, r, r - 0.1, r + 0.1) for g, r in zip(GROUPS, (0.1, 0.2, 0.3, 0.4))]
    win_rates += [_row("dpo", g, 0.6, 0.5, 0.7, lc_win_rate=0.55, lc_ci_low=0.45, lc_ci_high=0.65) for g in GROUPS]
    win_rates.append(_row("partial", "top10", 0.9, 0.8, 1.0))  # rated against one group only
    references = [_row(table.human_name(mine), other, 0.8 if mine == "top10" else 0.4, 0.0, 1.0)
                  for mine in GROUPS for other in GROUPS if mine != other]
    return {"judge": "rm", "win_rates": win_rates, "references": references}


DIVERSITY = {"sft": {"embedding": 0.6, "ead": 0.9}, "dpo": {"embedding": 0.7, "ead": 0.92},
             "partial": {"embedding": 0.5, "ead": 0.8},
             **{table.human_name(g): {"embedding": 0.75, "ead": 0.95} for g in GROUPS}}


def test_plot_points_hold_every_method_and_human_group_at_its_mean_win_rate():
    points = {p["name"]: p for p in table.plot_points(_summary(), DIVERSITY)}
    # A method rated against only some groups has no mean win rate and is left out of the plot.
    assert set(points) == {"sft", "dpo", *(table.human_name(g) for g in GROUPS)}
    assert points["sft"]["win_rate"] == pytest.approx(25.0)  # (10 + 20 + 30 + 40) / 4
    assert points["dpo"] == {"name": "dpo", "human": False, "embedding": 0.7, "ead": 0.92,
                             "win_rate": pytest.approx(60)}
    # A human group counts 50% against itself: top10 beats the other three in 80%, so (3 x 80 + 50) / 4.
    assert points["human_top10"]["win_rate"] == pytest.approx(72.5)
    assert points["human_top10"]["human"] and points["human_median"]["win_rate"] == pytest.approx(42.5)
    assert [p["human"] for p in table.plot_points(_summary(), DIVERSITY)][:4] == [True] * 4


def test_a_method_without_diversity_or_the_llm_judges_human_rows_is_not_plotted():
    diversity = {k: v for k, v in DIVERSITY.items() if k != "dpo"}
    summary = _summary()
    # The LLM judge rates human top-10 against #1000-1009 only: no mean win rate for the human groups.
    summary["references"] = [_row("human_top10", "rank1000", 0.7, 0.6, 0.8)]
    assert {p["name"] for p in table.plot_points(summary, diversity)} == {"sft"}


def test_method_rows_carry_raw_and_length_controlled_rates_length_and_reward():
    lengths = {"sft": [4, 6], "dpo": [10], "human_top10": [8, 8, 11]}
    rows = table.method_rows(_summary(), DIVERSITY, lengths, {"dpo": 0.25, "human_top10": 0.5})
    by_name = {r["name"]: r for r in rows}
    assert [r["name"] for r in rows][:4] == ["human_top10", "human_median", "human_rank1000", "human_rank200"]
    assert [r["name"] for r in rows][4:] == ["dpo", "sft", "partial"]  # by mean win rate; none last
    dpo = by_name["dpo"]
    assert dpo["raw"]["top10"] == pytest.approx((60.0, 50.0, 70.0))
    assert dpo["lc"]["median"] == pytest.approx((55.0, 45.0, 65.0))
    assert dpo["words"] == 10 and dpo["reward"] == 0.25 and dpo["embedding"] == 0.7
    assert by_name["sft"]["lc"] == {} and by_name["sft"]["words"] == 5 and by_name["sft"]["reward"] is None
    assert by_name["partial"]["mean_win_rate"] is None and set(by_name["partial"]["raw"]) == {"top10"}
    assert "top10" not in by_name["human_top10"]["raw"]  # never judged against itself
    assert by_name["human_top10"]["words"] == pytest.approx(9.0)
    # Under a judge that does not clear chance the rows are no ranking: by name.
    unranked = table.method_rows(_summary(), DIVERSITY, lengths, {}, ranked=False)
    assert [r["name"] for r in unranked][4:] == ["dpo", "partial", "sft"]


def test_mean_rewards_count_each_contest_once():
    judgments = pd.DataFrame([
        # The method's mean score on a contest repeats once per human group it was compared with.
        *({"method": "sft", "contest": 1, "against": g, "score": 1.0} for g in GROUPS),
        *({"method": "sft", "contest": 2, "against": g, "score": 3.0} for g in GROUPS[:1]),
        {"method": "human_top10", "contest": 1, "against": "median", "score": 0.5},
    ])
    assert table.mean_rewards(judgments) == {"sft": 2.0, "human_top10": 0.5}


def test_a_missing_interval_bound_reads_as_nan():
    summary = {"win_rates": [_row("m", g, 0.5, 0.4, 0.6, lc_win_rate=0.5) for g in GROUPS]}
    row, = table.method_rows(summary, {}, {}, {})
    rate, low, high = row["lc"]["top10"]
    assert rate == pytest.approx(50.0) and math.isnan(low) and math.isnan(high)
