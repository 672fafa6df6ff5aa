"""The length-controlled win rate's fits (humor_ray.eval.benchmark._logistic_intercepts): Newton's 2x2 steps solved
by hand against the same Newton steps through numpy's batched einsum and solve, in the same run, on judgments of
the judge's size (methods x human groups x contests, 2,000 bootstrap resamples of whole contests).

    python bench/judge_stats.py [--judgments 320] [--contests 40] [--fits 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from humor_ray.eval.benchmark import _contest_weights, _logistic_intercepts


def batched_solve(x: np.ndarray, y: np.ndarray, weights: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """The same 60 damped Newton steps, each Hessian built with einsum and solved with np.linalg.solve."""
    design = np.stack([np.ones_like(x), x], axis=1)
    beta = np.zeros((len(weights), 2))
    for _ in range(60):
        p = 1.0 / (1.0 + np.exp(-np.clip(beta @ design.T, -30, 30)))
        gradient = (weights * (y - p)) @ design - ridge * beta
        hessian = np.einsum("rn,ni,nj->rij", weights * p * (1 - p), design, design) + ridge * np.eye(2)
        beta += np.clip(np.linalg.solve(hessian, gradient[..., None])[..., 0], -2.0, 2.0)
    return beta[:, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judgments", type=int, default=320, help="judgments per fit (one method vs one group)")
    parser.add_argument("--contests", type=int, default=40)
    parser.add_argument("--fits", type=int, default=20, help="fits per repeat (methods x human groups)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    problems = []
    for _ in range(args.fits):
        x = rng.normal(0, 3, args.judgments)
        y = (rng.random(args.judgments) < 1 / (1 + np.exp(-(0.3 + 0.2 * x)))).astype(float)
        problems.append((x, y, _contest_weights(rng.integers(0, args.contests, args.judgments), 2000, 1)))
    sides = {"2x2 by hand (ours)": _logistic_intercepts, "einsum + solve": batched_solve}
    seconds = {name: [] for name in sides}
    worst = 0.0
    for _ in range(args.repeats):
        intercepts = {}
        for name, fit in sides.items():
            started = time.perf_counter()
            intercepts[name] = [fit(*problem) for problem in problems]
            seconds[name].append(time.perf_counter() - started)
        worst = max(worst, *(np.abs(a - b).max() for a, b in zip(*intercepts.values())))
    print(f"\n{args.fits} fits x 2,001 resamples x {args.judgments} judgments, median of {args.repeats} (s)")
    medians = {name: statistics.median(runs) for name, runs in seconds.items()}
    for name, median in medians.items():
        print(f"{name:22}{median:>8.2f}")
    print(f"speed-up {medians['einsum + solve'] / medians['2x2 by hand (ours)']:.1f}x; largest difference of an "
          f"intercept {worst:.1e}")


if __name__ == "__main__":
    main()
