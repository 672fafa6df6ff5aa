"""Folds of the training contests, by a stable hash of the contest id.

Two reward models trained on different folds never saw the same contest: one can steer best-of-N or PPO
while the other judges, so a method cannot win by pleasing the very model that judges it. The fold of a
contest depends on its id and the number of folds alone (not on the data, the machine or Python's hash
seed), so `--contest_fold 1/2` and `--contest_fold 2/2` split any training split the same way everywhere.
"""

from __future__ import annotations

import hashlib

from humor_ray.config import ConfigError


def contest_fold(contest: int, folds: int) -> int:
    """The fold, 1..folds, of a contest: sha256 of its id in decimal, as a number, mod folds, plus one."""
    digest = hashlib.sha256(str(int(contest)).encode()).digest()
    return int.from_bytes(digest[:8], "big") % folds + 1


def parse_fold(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N), with N >= 2 folds and K in 1..N."""
    k, slash, n = str(text).partition("/")
    try:
        k, n = int(k), int(n)
    except ValueError:
        slash = ""
    if not slash or n < 2 or not 1 <= k <= n:
        raise ConfigError(f"--contest_fold {text!r}: expected K/N, N folds (at least 2) and K in 1..N, e.g. 1/2")
    return k, n


def fold_contests(path: str, fold: str) -> list[int]:
    """The contests of the Parquet split at `path` (local or a URI) that fall in `fold` ('K/N')."""
    import pyarrow.dataset as pds

    k, n = parse_fold(fold)
    table = pds.dataset(path, format="parquet").to_table(columns=["contest"])
    return sorted(c for c in set(table.column("contest").to_pylist()) if contest_fold(c, n) == k)


def fold_rows(path: str, fold: str) -> tuple[str, list[int]]:
    """(column, values): the rows of the split at `path` whose contest falls in `fold`, as a training
    stage's row filter (humor_ray.train.launcher.Stage.train_filter)."""
    return "contest", fold_contests(path, fold)
