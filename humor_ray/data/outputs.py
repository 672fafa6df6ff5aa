"""Output folders that are complete or absent.

A command that writes a folder of many files (`data build`, `data synth`) writes into a hidden sibling and
renames it into place when everything is written, with a completion marker inside; every reader requires the
marker. An interrupted run leaves the earlier output as it was (or nothing), never a half-written folder that a
later stage would take as complete. Object stores (s3://, gs://) have no rename: there the marker is removed
before the first write and written after the last, so readers see the folder as incomplete in between.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import time
import uuid
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from humor_ray.config import UserError

MARKER = "_COMPLETE"


def _is_uri(path: str) -> bool:
    return "://" in path


def _entries(fs: pafs.FileSystem, root: str) -> list[str]:
    """The names directly inside `root` (empty when it does not exist)."""
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    return sorted(PurePosixPath(i.path).name for i in fs.get_file_info(pafs.FileSelector(root)))


class OutputFolder:
    """Where a command writes (`work`), and how it becomes `final`.

    `kind` names what the folder holds (written into the marker); `owned` lists the entries such a command
    writes, so an earlier output of the same command, complete or not, may be replaced; anything else in the
    folder is refused unless `overwrite`, so that a mistyped `--output` never deletes other work."""

    def __init__(self, final: str, kind: str, owned: tuple[str, ...], overwrite: bool = False):
        from humor_ray.data import readers

        self.final, self.kind = final, kind
        self.fs, self.final_root = readers.open_filesystem(final)
        foreign = [name for name in _entries(self.fs, self.final_root) if not name.startswith(".")
                   and not any(fnmatch.fnmatch(name, pattern) for pattern in (*owned, MARKER))]
        if foreign and not overwrite:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise UserError(f"{final} already holds files that are not a `{kind}` output ({shown}): name an empty "
                            f"or new folder, or pass --overwrite to replace it whole")
        if _is_uri(final):
            self.work = final
            self._remove_marker()
            for name in _entries(self.fs, self.final_root):
                path = f"{self.final_root}/{name}"
                info = self.fs.get_file_info(path)
                if info.type == pafs.FileType.Directory:
                    self.fs.delete_dir(path)
                elif info.type == pafs.FileType.File:
                    self.fs.delete_file(path)
            self.fs.create_dir(self.final_root, recursive=True)
        else:
            target = Path(final).absolute()
            target.parent.mkdir(parents=True, exist_ok=True)
            self.work = str(target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
            os.mkdir(self.work)

    def _remove_marker(self) -> None:
        marker = f"{self.final_root}/{MARKER}"
        if self.fs.get_file_info(marker).type == pafs.FileType.File:
            self.fs.delete_file(marker)

    def publish(self) -> None:
        """Mark the work complete and put it in place of the earlier output."""
        from humor_ray.data import readers

        fs, work_root = readers.open_filesystem(self.work)
        with fs.open_output_stream(f"{work_root}/{MARKER}") as handle:
            handle.write(json.dumps({"kind": self.kind, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
        if _is_uri(self.final):
            return
        target = Path(self.final).absolute()
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        if target.exists():
            os.rename(target, old)
        os.rename(self.work, target)
        shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        """Remove the unfinished work of a failed run (the earlier output stays)."""
        if not _is_uri(self.final):
            shutil.rmtree(self.work, ignore_errors=True)


@contextlib.contextmanager
def written_aside(final: str, kind: str, owned: tuple[str, ...], overwrite: bool = False):
    """The folder to write an output into (see OutputFolder), put in place when the block ends without an
    error and removed when it fails. `owned` are names or glob patterns."""
    folder = OutputFolder(final, kind, owned, overwrite)
    try:
        yield folder.work
    except BaseException:
        folder.discard()
        raise
    folder.publish()


def require_complete(path: str, command: str = "humor-ray data build") -> None:
    """Refuse, in one line, a folder that an interrupted or foreign run left: no completion marker."""
    from humor_ray.data import readers

    fs, root = readers.open_filesystem(path)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise UserError(f"{path} not found: run `{command}` first")
    if fs.get_file_info(f"{root}/{MARKER}").type != pafs.FileType.File:
        raise UserError(f"{path} is not a complete `{command}` output (no {MARKER} marker: the run that wrote it "
                        f"was interrupted or is older): run `{command}` again")
