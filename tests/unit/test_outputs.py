"""Outputs complete or absent: a folder is written aside, renamed into place with a marker, and readers
require the marker (humor_ray/data/outputs.py)."""

import pytest

from humor_ray.config import UserError
from humor_ray.data.outputs import MARKER, OutputFolder, require_complete

OWNED = ("votes", "captions", "report.json")


def write(folder: OutputFolder, text: str) -> None:
    from pathlib import Path

    (Path(folder.work) / "votes").mkdir()
    (Path(folder.work) / "votes" / "a.txt").write_text(text)


def test_published_output_replaces_the_earlier_one_whole(tmp_path):
    out = tmp_path / "out"
    first = OutputFolder(str(out), "test", OWNED)
    assert not out.exists()  # nothing at the final place until the work is complete
    write(first, "first")
    first.publish()
    require_complete(str(out))
    second = OutputFolder(str(out), "test", OWNED)
    (tmp_path / "out" / "votes" / "stale.txt").write_text("from the first run")
    write(second, "second")
    second.publish()
    assert sorted(p.name for p in (out / "votes").iterdir()) == ["a.txt"]  # nothing stale survives
    assert (out / "votes" / "a.txt").read_text() == "second" and (out / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial or old copies left


def test_an_interrupted_run_leaves_the_earlier_output(tmp_path):
    out = tmp_path / "out"
    done = OutputFolder(str(out), "test", OWNED)
    write(done, "good")
    done.publish()
    failed = OutputFolder(str(out), "test", OWNED)
    write(failed, "half")
    failed.discard()
    assert (out / "votes" / "a.txt").read_text() == "good"
    require_complete(str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_folder_holding_other_work_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "demo" / "runs").mkdir(parents=True)
    with pytest.raises(UserError, match=r"demo already holds files that are not a `test` output \(runs\).*--overwrite"):
        OutputFolder(str(tmp_path / "demo"), "test", OWNED)
    folder = OutputFolder(str(tmp_path / "demo"), "test", OWNED, overwrite=True)
    write(folder, "x")
    folder.publish()
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [MARKER, "votes"]


def test_readers_refuse_a_folder_without_the_marker(tmp_path):
    (tmp_path / "datasets" / "prompts").mkdir(parents=True)
    with pytest.raises(UserError, match="is not a complete `humor-ray data build` output"):
        require_complete(str(tmp_path / "datasets"))
    with pytest.raises(UserError, match="nothing not found: run `humor-ray data build` first"):
        require_complete(str(tmp_path / "nothing"))
