"""`humor-ray data fetch`: download the public caption-contest data into a local cache.

Two sources:
- a mirror (`--mirror URL` or `--mirror DIR`) with the staged layout: `summaries_manifest.csv` lists
  every summary file with its sha256 and size; the other files sit at known paths;
- the public upstream (no `--mirror`): the GitHub repo nextml/caption-contest-data-api at a pinned
  commit, listed through the GitHub API, whose git blob hashes verify each download.

Every file is verified before it is renamed into place, so the cache never holds a bad file at its
final path. Downloads go to `<path>.part` and resume with an HTTP Range request. `fetch_manifest.json`
in the output records the sha256 of every file fetched, so a rerun verifies what is there and
downloads only what is missing or wrong.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import json
import os
import re
import shutil
import threading
import time
import urllib.parse
from pathlib import Path

import requests

from humor_ray.config import ConfigError, Options, UserError, field
from humor_ray.log import get_logger

log = get_logger("data fetch")

UPSTREAM_REPO = "nextml/caption-contest-data-api"
UPSTREAM_COMMIT = "9e38b2b73a4541dd26111e05b90bcca6bdcae008"
UPSTREAM_TREE_URL = f"https://api.github.com/repos/{UPSTREAM_REPO}/git/trees/{UPSTREAM_COMMIT}?recursive=1"
UPSTREAM_RAW_URL = f"https://raw.githubusercontent.com/{UPSTREAM_REPO}/{UPSTREAM_COMMIT}/"
# Upstream metadata files and where the staged layout keeps them.
UPSTREAM_METADATA = {
    "contests/metadata/descriptions.txt": "descriptions/nextml_descriptions.csv",
    "contests/metadata/contexts.yaml": "descriptions/nextml_contexts.yaml",
    "contests/metadata/anomalies.yaml": "descriptions/nextml_anomalies.yaml",
    "LICENSE.txt": "LICENSES/nextml_caption-contest-data-api_LICENSE.txt",
}
_UPSTREAM_SUMMARY = re.compile(r"contests/summaries/([^/]+\.csv)")
_UPSTREAM_IMAGE = re.compile(r"contests/info/(\d+)/\1\.(jpg|png)")

MANIFEST = "summaries_manifest.csv"
CONTEST_STATS = "contest_stats.csv"
RECORD = "fetch_manifest.json"
# Files of the staged layout outside the manifest: HTTP cannot list a directory, so they are named here.
KNOWN_FILES = (
    "README.md",
    "LICENSES/humor-bench_LICENSE_MIT.txt",
    "LICENSES/nextml_caption-contest-data-api_LICENSE.txt",
    *(f"descriptions/{name}" for name in (
        "humor_in_ai_prompt_descriptions.csv", "humorbench_comprehensive_annotations.csv",
        "nextml_anomalies.yaml", "nextml_artists.csv", "nextml_contexts.yaml", "nextml_descriptions.csv",
        "nextml_descriptions_google_docs.txt")),
    "benchmarks/humor_in_ai_splits.json",
    *(f"benchmarks/humor_in_ai_examples/{name}.csv" for name in (
        "claude", "dpo", "gpt4o", "human_1000", "human_200", "human_median", "human_rows_contest_index",
        "human_top", "llava_sft", "llava_zs", "ppo", "sft", "zs", "zs_BoN")),
    *(f"samples_newer_schema/{name}" for name in (
        "598_lil-KLUCB_head25.csv", "700_head25.csv", "895_head25.csv")),
)
EXTRA_IMAGE_CONTESTS = (497, 499, 505, 507)  # cartoons in the data whose contests have no rating summary
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG, PNG (some .jpg files are PNGs)
_SAFE_NAME = re.compile(r"[\w.\-]+")
PROGRESS_EVERY = 25
CHUNK = 1 << 16


@dataclasses.dataclass
class FetchConfig(Options):
    """Download the public caption-contest data (ratings, images, descriptions) into a local cache."""
    output: str = field(None, "cache directory to download into (created if needed)", required=True)
    mirror: str | None = field(None, "http(s) URL or local directory laid out like the staged data "
                                     "(with summaries_manifest.csv); default: the public upstream on GitHub")
    workers: int = field(8, "parallel downloads", minimum=1)
    timeout: float = field(30.0, "seconds to wait for a server to connect or answer",
                           exclusive_minimum=0)
    retries: int = field(3, "retries per file after a network error or a download that fails "
                                  "verification", minimum=0)

    def __post_init__(self):
        if not self.output:
            raise ConfigError("data fetch needs --output")
        super().__post_init__()


class FetchError(UserError, RuntimeError):
    """The data could not be fetched: source unreachable, or files failed. `summary` holds what was done."""

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary


@dataclasses.dataclass
class Item:
    """One file to fetch: where it goes, where it comes from, and what it must hash to when known."""
    path: str                      # relative to the output directory
    source: str                    # URL or local file
    sha256: str | None = None      # from the mirror's manifest
    git_sha1: str | None = None    # git blob hash, from the upstream tree
    size: int | None = None
    optional: bool = False         # a missing file is reported, not a failure


class _Missing(Exception):
    """The source does not have this file (HTTP 404 or no such local file)."""


class _BadDownload(Exception):
    """One attempt gave a wrong or incomplete file; worth retrying."""



def _hexdigest(path: Path, digest) -> str:
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    return _hexdigest(path, hashlib.sha256())


def git_blob_sha1(path: Path) -> str:
    """The hash git gives a file's content (the upstream tree lists it for every file)."""
    return _hexdigest(path, hashlib.sha1(b"blob %d\0" % path.stat().st_size))


def _is_http(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _network_cause(err: Exception) -> str:
    """The useful part of a requests error ("[Errno 111] Connection refused"), not urllib3's nesting."""
    found = re.search(r"\[Errno -?\d+\][^'\")]*", str(err))
    if found:
        return found.group(0).strip()
    return str(err) or type(err).__name__


def _unreachable(url: str, err: Exception) -> FetchError:
    return FetchError(
        f"cannot reach {url}: {_network_cause(err)}. Check the network and the address; without network, "
        "set HUMOR_RAY_DATA to a local copy of the data, or pass --mirror URL/DIR with a reachable mirror")


class _Fetcher:
    """Fetches lists of items in parallel into one output directory, keeping the tallies and the record."""

    def __init__(self, cfg: FetchConfig, source: str):
        self.cfg = cfg
        self.out = Path(cfg.output)
        self.out.mkdir(parents=True, exist_ok=True)
        self.record = self._load_record()
        self.summary = {"source": source, "output": str(self.out), "files": 0, "downloaded": 0,
                        "skipped": 0, "bytes": 0, "missing": [], "failed": []}
        self._local = threading.local()  # one requests.Session per thread: sessions are not thread-safe

    # ------------------------------------------------------------ the record of verified files

    def _load_record(self) -> dict:
        try:
            return json.loads((self.out / RECORD).read_text())["files"]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return {}  # no usable record: files without a manifest hash are fetched again

    def save_record(self) -> None:
        path = self.out / RECORD
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"source": self.summary["source"], "files": dict(sorted(self.record.items()))},
                                  indent=1))
        os.replace(tmp, path)

    # ------------------------------------------------------------ verification

    def _problem(self, path: Path, item: Item, announced: int | None) -> tuple[str | None, str]:
        """(what is wrong with this file or None, its sha256)."""
        size = path.stat().st_size
        digest = sha256_of(path)
        if announced is not None and size != announced:
            return f"got {size} bytes, the source announced {announced}", digest
        if item.size is not None and size != item.size:
            return f"size mismatch: expected {item.size} bytes, got {size}", digest
        if item.sha256 and digest != item.sha256:
            return f"sha256 mismatch: expected {item.sha256}, got {digest}", digest
        if item.git_sha1 and (actual := git_blob_sha1(path)) != item.git_sha1:
            return f"git blob sha1 mismatch: expected {item.git_sha1}, got {actual}", digest
        if item.path.startswith("images/"):
            with open(path, "rb") as handle:
                head = handle.read(8)
            if not head.startswith(IMAGE_MAGIC):
                return f"not a JPEG or PNG image (starts with {head!r})", digest
        return None, digest

    def _already_there(self, final: Path, item: Item) -> str | None:
        """The sha256 of the file when it is in place and verified, else None; a bad file is removed."""
        if not final.is_file():
            return None
        recorded = self.record.get(item.path)
        if not (item.sha256 or item.git_sha1 or recorded):
            return None  # nothing to verify it against: fetch it again
        problem, digest = self._problem(final, item, recorded["bytes"] if recorded else None)
        if not (item.sha256 or item.git_sha1) and digest != recorded["sha256"]:
            problem = "differs from the record"
        if problem:
            final.unlink()
            return None
        return digest

    # ------------------------------------------------------------ one download attempt

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _download_http(self, url: str, part: Path) -> tuple[int, int | None]:
        """Download into `part`, continuing it when it exists. Returns (bytes received, total size announced)."""
        have = part.stat().st_size if part.exists() else 0
        # identity: Content-Length must describe the bytes we store, not a compressed body
        headers = {"Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        with self._session().get(url, headers=headers, stream=True, timeout=self.cfg.timeout) as resp:
            if resp.status_code == 404:
                raise _Missing
            if resp.status_code == 416 and have:
                part.unlink()  # the partial file is no prefix of this file: start again
                return self._download_http(url, part)
            if resp.status_code >= 400:
                raise _BadDownload(f"HTTP {resp.status_code} {resp.reason} from {url}")
            if resp.status_code == 206:
                content_range = resp.headers.get("Content-Range", "")
                if not content_range.startswith(f"bytes {have}-"):
                    part.unlink()
                    raise _BadDownload(f"{url} answered a request for bytes {have}- with {content_range!r}")
                total = content_range.rpartition("/")[2]
                mode, announced = "ab", int(total) if total.isdigit() else None
            else:
                length = resp.headers.get("Content-Length")
                encoded = resp.headers.get("Content-Encoding", "identity") != "identity"
                mode, announced = "wb", int(length) if length and not encoded else None
            received = 0
            with open(part, mode) as handle:
                for chunk in resp.iter_content(CHUNK):
                    handle.write(chunk)
                    received += len(chunk)
        return received, announced

    @staticmethod
    def _copy_local(source: str, part: Path) -> tuple[int, int]:
        try:
            size = os.stat(source).st_size
            shutil.copyfile(source, part)
        except FileNotFoundError:
            raise _Missing from None
        return part.stat().st_size, size

    # ------------------------------------------------------------ one file, with retries

    def fetch_one(self, item: Item) -> dict:
        final = self.out / item.path
        digest = self._already_there(final, item)
        if digest:
            return {"item": item, "status": "skipped", "bytes": 0, "sha256": digest}
        final.parent.mkdir(parents=True, exist_ok=True)
        part = final.with_name(final.name + ".part")
        received, error, pause = 0, "", 0.0
        for attempt in range(self.cfg.retries + 1):
            time.sleep(pause)  # after a network or server error, give the server a moment
            pause = min(0.5 * 2 ** attempt, 8.0)
            try:
                if _is_http(item.source):
                    got, announced = self._download_http(item.source, part)
                else:
                    got, announced = self._copy_local(item.source, part)
            except _Missing:
                part.unlink(missing_ok=True)
                status = "missing" if item.optional else "failed"
                return {"item": item, "status": status, "bytes": received, "error": f"not found at {item.source}"}
            except (requests.ConnectionError, requests.Timeout) as err:
                if attempt == self.cfg.retries:
                    raise _unreachable(item.source, err) from None
                continue  # the next attempt resumes the .part file
            except (_BadDownload, requests.RequestException) as err:
                error = str(err)
                continue
            received += got
            error, digest = self._problem(part, item, announced)
            if error is None:
                os.replace(part, final)  # atomic: the final path only ever holds a verified file
                return {"item": item, "status": "downloaded", "bytes": received, "sha256": digest}
            part.unlink()  # a bad file is no base to resume from
            pause = 0.0
        return {"item": item, "status": "failed", "bytes": received, "error": error}

    # ------------------------------------------------------------ many files

    def fetch_all(self, items: list[Item]) -> None:
        s = self.summary
        total = s["files"] + len(items)  # counts include the files fetched before (the manifest)
        pool = concurrent.futures.ThreadPoolExecutor(self.cfg.workers, thread_name_prefix="fetch")
        try:
            futures = [pool.submit(self.fetch_one, item) for item in items]
            for future in concurrent.futures.as_completed(futures):
                self.tally(future.result())
                if s["files"] % PROGRESS_EVERY == 0 or s["files"] == total:
                    log.info(f"{s['files']}/{total} files: {s['downloaded']} downloaded, {s['skipped']} already there, "
                             f"{len(s['missing'])} missing, {len(s['failed'])} failed, {s['bytes'] / 1e6:.1f} MB")
        finally:
            # on a fatal error (unreachable source, Ctrl-C) do not start the files still queued
            pool.shutdown(wait=True, cancel_futures=True)

    def tally(self, result: dict) -> None:
        item, status = result["item"], result["status"]
        self.summary["files"] += 1
        self.summary["bytes"] += result["bytes"]
        if status in ("downloaded", "skipped"):
            self.summary[status] += 1
            self.record[item.path] = {"sha256": result["sha256"], "bytes": (self.out / item.path).stat().st_size}
            return
        self.record.pop(item.path, None)
        if status == "missing":
            self.summary["missing"].append(item.path)
        else:
            self.summary["failed"].append({"path": item.path, "error": result["error"]})
            log.warning(f"FAILED {item.path}: {result['error']}")


# ---------------------------------------------------------------- what to fetch

def _mirror_source(mirror: str, path: str) -> str:
    if _is_http(mirror):
        return mirror.rstrip("/") + "/" + urllib.parse.quote(path)
    return str(Path(mirror) / path)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _mirror_items(mirror: str, out: Path) -> list[Item]:
    """Every file of the staged layout, from the manifest (already in `out`) and the known paths."""
    items, contests = [], set(EXTRA_IMAGE_CONTESTS)
    try:
        rows = _read_csv(out / MANIFEST)
        for row in rows:
            name = row["staged_name"]
            if not _SAFE_NAME.fullmatch(name):  # it becomes a path: no directories, no '..'
                raise ValueError(f"bad staged_name {name!r}")
            items.append(Item(f"summaries/{name}", _mirror_source(mirror, f"summaries/{name}"),
                              sha256=row["sha256"].lower(), size=int(row["bytes"])))
            contests.add(int(row["contest"]))
    except (KeyError, ValueError, csv.Error) as err:
        raise FetchError(f"{_mirror_source(mirror, MANIFEST)} is not a usable summaries manifest: {err}") from None
    if (out / CONTEST_STATS).is_file():
        contests.update(int(row["contest"]) for row in _read_csv(out / CONTEST_STATS) if row.get("contest"))
    paths = [*KNOWN_FILES, *(f"images/{c}.jpg" for c in sorted(contests))]
    items += [Item(p, _mirror_source(mirror, p), optional=True) for p in paths]
    return items


def _upstream_items(tree: dict) -> list[Item]:
    """The files we use from the upstream git tree, under their staged names."""
    items = []
    for entry in tree.get("tree", []):
        path = entry.get("path", "")
        if entry.get("type") != "blob":
            continue
        if match := _UPSTREAM_SUMMARY.fullmatch(path):
            target = "summaries/" + match.group(1).replace("_summary", "", 1)
        elif match := _UPSTREAM_IMAGE.fullmatch(path):
            target = f"images/{match.group(1)}.{match.group(2)}"
        elif path in UPSTREAM_METADATA:
            target = UPSTREAM_METADATA[path]
        else:
            continue
        items.append(Item(target, UPSTREAM_RAW_URL + urllib.parse.quote(path), git_sha1=entry["sha"],
                          size=entry.get("size")))
    return items


def _upstream_tree(cfg: FetchConfig) -> dict:
    try:
        resp = requests.get(UPSTREAM_TREE_URL, timeout=cfg.timeout,
                            headers={"Accept": "application/vnd.github+json"})
    except (requests.ConnectionError, requests.Timeout) as err:
        raise _unreachable(UPSTREAM_TREE_URL, err) from None
    if resp.status_code != 200:
        raise FetchError(f"{UPSTREAM_TREE_URL} answered HTTP {resp.status_code} {resp.reason} "
                         f"(403 is GitHub's hourly rate limit: try later, or pass --mirror URL/DIR)")
    tree = resp.json()
    if tree.get("truncated"):
        log.warning("GitHub truncated the file list; some files may be missing")
    return tree


# ---------------------------------------------------------------- the stage

def run(cfg: FetchConfig) -> dict:
    """Fetch everything; return the summary. Raises FetchError when the source is unreachable or any
    required file failed (the summary is then on the exception)."""
    started = time.monotonic()
    mirror = cfg.mirror
    if mirror and mirror.startswith("file://"):
        mirror = urllib.parse.urlparse(mirror).path
    if mirror and not _is_http(mirror) and not Path(mirror).is_dir():
        raise FetchError(f"mirror directory {mirror} does not exist")
    fetcher = _Fetcher(cfg, mirror or UPSTREAM_RAW_URL)
    log.info(f"fetching from {fetcher.summary['source']} into {fetcher.out} with {cfg.workers} workers")
    try:
        if mirror:
            # The manifest comes first, alone: it says which summaries exist and what they hash to, and
            # an unreachable mirror fails right here. contest_stats.csv adds the contests with images.
            fetcher.tally(fetcher.fetch_one(Item(MANIFEST, _mirror_source(mirror, MANIFEST))))
            fetcher.tally(fetcher.fetch_one(Item(CONTEST_STATS, _mirror_source(mirror, CONTEST_STATS),
                                                 optional=True)))
            if not (fetcher.out / MANIFEST).is_file():
                error = fetcher.summary["failed"][0]["error"]
                raise FetchError(f"no usable {MANIFEST} from {mirror} ({error}): "
                                 "--mirror must be the root of a copy of the data")
            items = _mirror_items(mirror, fetcher.out)
        else:
            items = _upstream_items(_upstream_tree(cfg))
        fetcher.fetch_all(items)
    finally:
        fetcher.save_record()  # even after an interruption, so the next run can verify what arrived
    summary = fetcher.summary
    summary["seconds"] = round(time.monotonic() - started, 1)
    log.info(f"done in {summary['seconds']} s: {summary['downloaded']} downloaded, {summary['skipped']} already "
             f"there, {summary['bytes'] / 1e6:.1f} MB")
    if summary["missing"]:
        shown = ", ".join(summary["missing"][:5]) + (" ..." if len(summary["missing"]) > 5 else "")
        log.info(f"{len(summary['missing'])} optional files not on the source: {shown}")
    if summary["failed"]:
        lines = "\n".join(f"  {f['path']}: {f['error']}" for f in summary["failed"])
        raise FetchError(f"{len(summary['failed'])} files failed (rerun to retry them):\n{lines}", summary)
    return summary
