"""The report's table of methods and human groups, and the points of its win-rate-against-diversity plot.

Each row is a method (ours or a released one) or a group of human captions (`human_top10`, `human_rank200`,
`human_rank1000`, `human_median`): its win rates against the four human groups (raw and, when the judge gives
them, length-controlled, with 95% intervals), its diversity, its mean length in words and its mean reward from
a second reward model (the study's reward model A). A human group is judged against the other three groups
only; against itself it counts as 50%, the rate of any set of captions against itself, so that its mean over
the four groups is comparable with a method's.
"""

from __future__ import annotations

import math

from humor_ray.eval.benchmark import GROUPS

HUMAN = "human_"


def human_name(group: str) -> str:
    """The row of a human group: `human_top10`, as the judge names it when it judges the group."""
    return f"{HUMAN}{group}"


def _rates(summary: dict, key: str) -> dict[tuple[str, str], dict]:
    """(name, group) -> the judge's row, for every method and human group that has `key` (a number)."""
    rows = [*summary.get("win_rates", []), *summary.get("references", [])]
    return {(r["method"], r["against"]): r for r in rows if _number(r.get(key)) is not None}


def _number(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _percent(row: dict, keys: tuple[str, ...]) -> tuple[float, ...]:
    """The row's `keys` in percent (NaN where missing)."""
    values = (_number(row.get(key)) for key in keys)
    return tuple(math.nan if value is None else 100 * value for value in values)


def mean_win_rate(summary: dict, name: str, key: str = "win_rate") -> float | None:
    """`name`'s mean win rate (`key`: win_rate or lc_win_rate) against the four human groups, a human group's
    against itself counted as 0.5; None unless the judge rated it against every other group."""
    rates = _rates(summary, key)
    values = []
    for group in GROUPS:
        if name == human_name(group):
            values.append(0.5)
        elif (name, group) in rates:
            values.append(float(rates[(name, group)][key]))
        else:
            return None
    return sum(values) / len(values)


def plot_points(summary: dict, diversity: dict[str, dict]) -> list[dict]:
    """One point per method and human group with a diversity and a mean win rate: name, whether it is human,
    embedding diversity, EAD and the mean win rate in percent; humans first, then by name."""
    points = []
    for name, scores in diversity.items():
        rate = mean_win_rate(summary, name)
        if rate is None:
            continue
        points.append({"name": name, "human": name.startswith(HUMAN), "embedding": scores["embedding"],
                       "ead": scores["ead"], "win_rate": 100 * rate})
    return sorted(points, key=lambda p: (not p["human"], p["name"]))


def method_rows(summary: dict, diversity: dict[str, dict], lengths: dict[str, list[int]],
                rewards: dict[str, float], ranked: bool = True) -> list[dict]:
    """The table: per method and human group, `raw` and `lc` ({group: (rate, low, high)} in percent, the groups
    the judge rated), `mean_win_rate` (percent, or None), `embedding`, `ead`, `words` (mean words per caption)
    and `reward` (None where unknown). Human groups first, then methods by mean win rate, best first when `ranked`
    (a judge that clears chance), else by name."""
    raw, lc = _rates(summary, "win_rate"), _rates(summary, "lc_win_rate")
    names = ({m for m, _ in raw} | set(diversity) | set(lengths)) - {""}
    rows = []
    for name in names:
        row = {"name": name, "human": name.startswith(HUMAN), "raw": {}, "lc": {}}
        for group in GROUPS:
            if (name, group) in raw:
                row["raw"][group] = _percent(raw[(name, group)], ("win_rate", "ci_low", "ci_high"))
            if (name, group) in lc:
                row["lc"][group] = _percent(lc[(name, group)], ("lc_win_rate", "lc_ci_low", "lc_ci_high"))
        rate = mean_win_rate(summary, name)
        row["mean_win_rate"] = None if rate is None else 100 * rate
        scores = diversity.get(name, {})
        row["embedding"], row["ead"] = scores.get("embedding"), scores.get("ead")
        words = lengths.get(name) or []
        row["words"] = sum(words) / len(words) if words else None
        row["reward"] = rewards.get(name)
        rows.append(row)
    def order(row: dict):
        rate = row["mean_win_rate"] if ranked and row["mean_win_rate"] is not None else -math.inf
        return not row["human"], -rate, row["name"]

    return sorted(rows, key=order)


def mean_rewards(judgments) -> dict[str, float]:
    """Each method's and human group's mean reward over its contests, from a reward-model judge's judgments
    (a row's `score` is the mean reward of its captions on the contest, the same against every group)."""
    per_contest = judgments.drop_duplicates(["method", "contest"])
    return {str(m): float(v) for m, v in per_contest.groupby("method")["score"].mean().items()}
