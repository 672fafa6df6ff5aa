"""The judge's statistics (humor_ray/eval/benchmark.py): length-controlled win rates, the reliability block,
and the warning shown when the judge does not clear chance (printout and report)."""

import math

import pandas as pd
import pytest

from humor_ray.eval import benchmark, report
from humor_ray.eval.benchmark import (group_order, held_out_accuracy, lc_win_rate, reliability_block,
                                      reliability_warning, spearman, win_rates)


def test_judgments_that_follow_length_alone_have_a_length_controlled_win_rate_of_one_half():
    # The longer side wins 3 times in 4, the shorter 1 in 4, and ours is the longer in most contests: a raw
    # win rate of 62.5%, but at equal length the judge has no preference.
    diffs = [3.0] * 12 + [-3.0] * 4
    wins = [1, 1, 1, 0] * 3 + [1, 0, 0, 0]
    rate, low, high = lc_win_rate(range(16), wins, diffs, 300, 1)
    assert sum(wins) / len(wins) == 0.625
    assert rate == pytest.approx(0.5, abs=2e-3) and low < 0.5 < high


def test_the_length_controlled_win_rate_of_a_hand_computed_example():
    # One word longer: 3 wins in 4; one word shorter: 2 in 4. The fitted logistic line passes through both
    # cells' log-odds, so at zero difference it reads their mean: sigmoid((logit .75 + logit .5) / 2).
    diffs = [1.0] * 4 + [-1.0] * 4
    wins = [1, 1, 1, 0, 1, 1, 0, 0]
    expected = 1 / (1 + math.exp(-(math.log(3) + 0.0) / 2))  # 0.634
    rate, _, _ = lc_win_rate(range(8), wins, diffs, 50, 1)
    assert rate == pytest.approx(expected, abs=2e-3)
    # No length difference at all: the raw win rate.
    assert lc_win_rate(range(8), wins, [0.0] * 8, 50, 1)[0] == pytest.approx(5 / 8, abs=2e-3)


def test_every_bootstrap_fit_reaches_the_optimum_of_its_own_weighted_likelihood():
    """The fits of all resamples are solved together: each one's penalised score equations hold at its answer."""
    import numpy as np

    rng = np.random.default_rng(5)
    x = rng.normal(0, 3, 120)
    y = (rng.random(120) < 1 / (1 + np.exp(-(0.4 + 0.3 * x)))).astype(float)
    weights = benchmark._contest_weights(rng.integers(0, 30, 120), 200, 7)
    intercepts = benchmark._logistic_intercepts(x, y, weights)
    for row, intercept in zip(weights, intercepts):
        # The slope that goes with this intercept: the root of the second score equation, by bisection.
        def score(slope, b0=intercept, w=row):
            p = 1 / (1 + np.exp(-(b0 + slope * x)))
            return np.sum(w * (y - p) * x) - 1e-3 * slope
        low, high = -10.0, 10.0
        for _ in range(100):
            low, high = ((low + high) / 2, high) if score((low + high) / 2) > 0 else (low, (low + high) / 2)
        p = 1 / (1 + np.exp(-(intercept + low * x)))
        assert np.sum(row * (y - p)) - 1e-3 * intercept == pytest.approx(0, abs=1e-6)


def test_win_rates_carry_the_length_controlled_rate_beside_the_raw_one():
    judgments = [{"contest": c, "method": "m", "against": "top10", "win": float(w), "length_diff": d}
                 for c, (w, d) in enumerate(zip([1, 1, 1, 0] * 3 + [1, 0, 0, 0], [3.0] * 12 + [-3.0] * 4))]
    (row,) = win_rates(judgments, 200, 3)
    assert row["win_rate"] == 0.625 and row["lc_win_rate"] == pytest.approx(0.5, abs=2e-3)
    assert row["lc_ci_low"] <= row["lc_win_rate"] <= row["lc_ci_high"] and row["length_diff"] == 1.5


def _human_judgments(contest: int, scores: dict[str, float]) -> list[dict]:
    """The reward judge's rows for the human groups of one contest, from each group's mean reward."""
    return [{"contest": contest, "method": f"human_{g}", "against": h, "win": float(scores[g] > scores[h])}
            for g in scores for h in scores if g != h]


def test_group_order_is_the_share_of_the_six_pairs_ordered_as_the_ranks_averaged_over_contests():
    right = _human_judgments(1, {"top10": 4, "rank200": 3, "rank1000": 2, "median": 1})
    swapped = _human_judgments(2, {"top10": 3, "rank200": 4, "rank1000": 2, "median": 1})  # 5 of 6 right
    reversed_ = _human_judgments(3, {"top10": 1, "rank200": 2, "rank1000": 3, "median": 4})  # none right
    order = group_order(right + swapped + reversed_, 200, 1)
    assert order["share_right"] == pytest.approx((1 + 5 / 6 + 0) / 3)
    assert order["contests"] == 3 and order["pairs"] == 18
    # An LLM judge's two orders of one pair count as their mean.
    both = [{"contest": 1, "method": "human_top10", "against": "median", "win": w} for w in (1.0, 0.0)]
    assert group_order(both, 10, 1)["share_right"] == 0.5


def test_held_out_accuracy_by_margin_and_on_length_matched_pairs():
    pairs = pd.DataFrame({"chosen": ["a b", "a b c d e f", "a", "a b c"], "rejected": ["a b c", "a", "a b", "a b c"],
                          "chosen_mean": [2.0, 2.4, 2.2, 2.6], "rejected_mean": [1.9, 2.0, 1.6, 1.8]})
    out = held_out_accuracy(pairs, [1.0, 2.0, 0.0, 5.0], [0.0, 1.0, 1.0, 4.0])  # the third pair wrong
    assert out["accuracy"] == 0.75 and out["pairs"] == 4
    # Within 2 words: pairs 1, 3 and 4 (pair 2 is 5 words apart); the third is wrong.
    assert out["length_matched"]["pairs"] == 3 and out["length_matched"]["accuracy"] == pytest.approx(2 / 3)
    assert sum(b["pairs"] for b in out["by_margin"]) == 4
    assert next(b for b in out["by_margin"] if b["margin_high"] == pytest.approx(0.8))["accuracy"] == 1.0
    # The longer caption is the chosen one in pair 2 only; pair 4 is a tie (half).
    assert out["longer_caption_accuracy"] == pytest.approx((1 + 0.5) / 4)


def test_spearman_is_pearson_on_ranks():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def _reliability(top_rate: float, top_low: float, order_low: float) -> dict:
    rates = [{"method": "human_top10", "against": "rank1000", "win_rate": top_rate, "ci_low": top_low,
              "ci_high": min(1.0, top_rate + 0.2), "contests": 4, "judgments": 4}]
    block = reliability_block(rates, [], {}, 10, 1)
    block["group_order"] = {"share_right": 0.7, "ci_low": order_low, "ci_high": 0.8, "contests": 4, "pairs": 24}
    block["includes_chance"] = not (top_low > 0.5 and order_low > 0.5)
    return block


SUMMARY = {"judge": "rm", "lengths": {"ours": 12.0, "theirs": 8.0, "human_top10": 9.0},
           "win_rates": [{"method": m, "against": g, "win_rate": rate, "ci_low": rate - 0.1, "ci_high": rate + 0.1,
                          "lc_win_rate": rate, "lc_ci_low": rate - 0.2, "lc_ci_high": rate + 0.2, "contests": 4,
                          "judgments": 4} for m, rate in (("ours", 1.0), ("theirs", 0.5)) for g in benchmark.GROUPS]}


def test_a_judge_at_chance_is_said_so_above_the_table_and_the_table_is_not_a_ranking():
    summary = {**SUMMARY, "reliability": _reliability(0.25, 0.0, 0.3)}
    assert reliability_block([], [], {}, 10, 1)["includes_chance"]  # nothing measured: not trusted either
    warning = reliability_warning(summary["reliability"])
    assert "cannot rank" in warning and "25.0% [0.0, 45.0]" in warning and "not a ranking" in warning
    printed = benchmark.format_table(summary)
    assert printed.startswith("WARNING: This judge cannot rank these methods")
    assert printed.index("WARNING") < printed.index("method ") and "(not a ranking)" in printed
    page = report._leaderboard(summary)
    assert page.startswith("<h2>Win rates (not a ranking)</h2><p id='judge-warning'")
    assert "Leaderboard" not in page
    # Not ordered by win rate: alphabetical, whatever the rates.
    summary["win_rates"] = [{**r, "method": {"ours": "zz", "theirs": "aa"}[r["method"]]} for r in SUMMARY["win_rates"]]
    assert report._leaderboard(summary).index(">aa<") < report._leaderboard(summary).index(">zz<")


def test_a_judge_that_clears_chance_gets_a_leaderboard_and_no_warning():
    summary = {**SUMMARY, "reliability": _reliability(0.75, 0.6, 0.55)}
    assert reliability_warning(summary["reliability"]) is None
    printed = benchmark.format_table(summary)
    assert "WARNING" not in printed and "not a ranking" not in printed
    assert "(a) human top-10 beats #1000-1009 in 75.0% [60.0, 95.0]" in printed
    page = report._leaderboard(summary)
    assert page.startswith("<h2>Leaderboard</h2>") and "judge-warning" not in page
    assert page.index(">ours<") < page.index(">theirs<")  # a ranking: the best first
    assert "<td>12.0</td>" in page  # mean words per caption beside the method


def test_the_demos_report_says_its_runs_cannot_rank_and_points_to_the_study(tmp_path):
    from humor_ray import demo

    cfg = report.ReportConfig(judge_dir=str(tmp_path), generations=[str(tmp_path)], dataset_dir=str(tmp_path),
                              output_dir=str(tmp_path / "out"), note=demo.SHORT_RUNS_NOTE)
    summary = {**SUMMARY, "reliability": _reliability(0.25, 0.0, 0.3)}
    page = report._page(cfg, summary, {}, {"diversity": "diversity.png", "lengths": "lengths.png"}, [])
    note = page.index("<p id='note'")
    assert "cannot rank anything" in page[note:] and "humor-ray study" in page[note:]
    # The note, then the judge's warning, then its table.
    assert note < page.index("id='judge-warning'") < page.index("id='leaderboard'") < page.index("id='reliability'")
