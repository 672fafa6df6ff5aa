"""Folds of the training contests (humor_ray/data/folds.py) and rm's --contest_fold option."""

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from humor_ray.config import ConfigError, parse_config
from humor_ray.data.folds import contest_fold, fold_contests, parse_fold
from humor_ray.train import launcher, rm

CONTESTS = range(500, 900)


def test_a_contests_fold_is_sha256_of_its_id_and_the_folds_are_disjoint_and_cover_every_contest():
    # The rule written out: the first 8 bytes of sha256("530"), big-endian, mod N, plus one.
    assert contest_fold(530, 3) == int.from_bytes(hashlib.sha256(b"530").digest()[:8], "big") % 3 + 1
    for folds in (2, 3, 5):
        members = {k: {c for c in CONTESTS if contest_fold(c, folds) == k} for k in range(1, folds + 1)}
        assert set.union(*members.values()) == set(CONTESTS)
        assert sum(map(len, members.values())) == len(CONTESTS)  # disjoint
        # A hash, not a range: every fold holds a fair share of the contests, old and new alike.
        assert all(len(m) > 0.6 * len(CONTESTS) / folds for m in members.values())
        assert all(min(m) < 520 and max(m) > 880 for m in members.values())
    # Stable: ints of any width and numpy ints give the same fold.
    import numpy as np

    assert contest_fold(np.int32(530), 2) == contest_fold(530, 2)


def test_fold_contests_reads_the_split_and_keeps_only_its_fold(tmp_path):
    split = tmp_path / "train"
    split.mkdir()
    contests = [500, 501, 502, 503, 504, 505, 506, 507]
    pq.write_table(pa.table({"contest": pa.array(contests * 2, pa.int32()), "prompt": ["p"] * 16}),
                   split / "part-0.parquet")
    first, second = fold_contests(str(split), "1/2"), fold_contests(str(split), "2/2")
    assert first and second and sorted(first + second) == contests
    assert all(contest_fold(c, 2) == 1 for c in first)


def test_the_workers_read_only_the_folds_rows(tmp_path):
    split = tmp_path / "train"
    split.mkdir()
    contests = [c for c in range(500, 520) for _ in range(3)]
    pq.write_table(pa.table({"contest": pa.array(contests, pa.int32()),
                             "prompt": [f"p{c}-{i}" for i, c in enumerate(contests)]}), split / "part-0.parquet")
    cfg = rm.Config(output_dir=str(tmp_path / "out"), dataset_dir=str(tmp_path), contest_fold="2/3")
    keep = rm.STAGE.train_rows(cfg, str(split))
    parts = [launcher.direct_part(str(split), ["prompt"], rank, 2, keep=keep) for rank in (0, 1)]
    held = {int(p[1:].split("-")[0]) for part in parts for p in part["prompt"]}
    assert held == {c for c in set(contests) if contest_fold(c, 3) == 2}
    assert sum(len(part) for part in parts) == 3 * len(held)  # every row of the fold, once
    everything = rm.Config(output_dir=str(tmp_path / "out"), dataset_dir=str(tmp_path))
    assert rm.STAGE.train_rows(everything, str(split)) is None


@pytest.mark.parametrize("fold", ["3/2", "0/2", "1/1", "2", "a/b", "1/", "1/2/3", "-1/2"])
def test_a_malformed_fold_is_one_line_naming_the_option(tmp_path, fold):
    with pytest.raises(ConfigError, match=r"--contest_fold .*K/N"):
        parse_config(rm.Config, ["--output_dir", str(tmp_path), "--dataset_dir", str(tmp_path),
                                 f"--contest_fold={fold}"], "humor-ray rm")
    assert parse_fold("2/2") == (2, 2)


def test_the_fold_option_shows_in_help(capsys):
    with pytest.raises(SystemExit):
        parse_config(rm.Config, ["--help"], "humor-ray rm")
    assert "--contest_fold" in capsys.readouterr().out
