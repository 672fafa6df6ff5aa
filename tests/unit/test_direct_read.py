"""A small training split reaches the workers as Parquet each reads itself (humor_ray/train/launcher.py)."""

import pyarrow as pa
import pyarrow.parquet as pq

from humor_ray.train import launcher


def write_split(folder, rows: int):
    folder.mkdir(parents=True)
    table = pa.table({"prompt": [f"p{i}" for i in range(rows)], "completion": [f"c{i}" for i in range(rows)]})
    pq.write_table(table.slice(0, rows // 2), folder / "part-0.parquet")
    pq.write_table(table.slice(rows // 2), folder / "part-1.parquet")
    return str(folder)


def test_the_workers_parts_of_a_small_split_are_disjoint_seeded_and_cover_it(tmp_path):
    path = write_split(tmp_path / "train", 101)
    columns = ["prompt", "completion"]
    parts = [launcher.direct_part(path, columns, rank, 3, None, ("completion",), seed=7) for rank in range(3)]
    prompts = [set(part["prompt"]) for part in parts]
    assert sum(map(len, prompts)) == 101 and set.union(*prompts) == {f"p{i}" for i in range(101)}
    assert parts[0]["completion"][0].startswith(" c")  # the caption follows the prompt after a space
    again = launcher.direct_part(path, columns, 1, 3, 10, ("completion",), seed=7)
    assert again["prompt"] == parts[1]["prompt"][:10]  # same seed, same rows; `limit` keeps the first
    assert launcher.direct_part(path, columns, 1, 3, 10, seed=8)["prompt"] != again["prompt"]


def test_a_row_test_filters_the_whole_split_before_the_workers_take_their_parts(tmp_path):
    """The LLaVA stage's rows to skip (unreadable cartoons, too long): every worker drops the same rows of the
    whole split, so the parts stay disjoint and cover exactly the kept rows."""
    path = write_split(tmp_path / "train", 60)
    odd = lambda row: int(row["prompt"][1:]) % 2 == 1  # noqa: E731
    parts = [launcher.direct_part(path, ["prompt", "completion"], rank, 2, seed=3, keep_row=odd) for rank in range(2)]
    prompts = [set(part["prompt"]) for part in parts]
    assert len(prompts[0]) == len(prompts[1]) == 15 and not prompts[0] & prompts[1]
    assert set.union(*prompts) == {f"p{i}" for i in range(1, 60, 2)}


def test_only_a_small_local_split_is_read_directly(tmp_path, monkeypatch):
    path = write_split(tmp_path / "train", 1000)
    assert launcher.read_directly(path)
    monkeypatch.setattr(launcher, "DIRECT_READ_BYTES", 100)
    assert not launcher.read_directly(path)
    assert not launcher.read_directly("s3://bucket/datasets/sft/train")
