"""`humor-ray data fetch` against a real HTTP server on 127.0.0.1 serving a small copy of the real data."""

import contextlib
import csv
import hashlib
import http.server
import json
import re
import shutil
import socket
import threading
import urllib.parse
from pathlib import Path

import pytest

from humor_ray import cli
from humor_ray.data import fetch
from humor_ray.data.fetch import FetchConfig, FetchError

pytestmark = pytest.mark.timeout(120)

# Four small summary files (two contests without an image in the copy, so those images are 404s).
SUMMARIES = ("508-round2_RoundRobin.csv", "509-round2_RoundRobin.csv", "559_RandomSamping.csv", "511_LilUCB.csv")
IMAGES = ("508.jpg", "511.jpg")
SMALL = ("descriptions/humor_in_ai_prompt_descriptions.csv", "benchmarks/humor_in_ai_splits.json")


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves files under `server.root`, honouring `Range: bytes=N-`; logs (path, Range) per GET."""

    def do_GET(self):  # http.server's naming
        self.server.requests.append((self.path, self.headers.get("Range")))
        file = self.server.root / urllib.parse.unquote(urllib.parse.urlparse(self.path).path).lstrip("/")
        if not file.is_file():
            self.send_error(404)
            return
        data, start = file.read_bytes(), 0
        wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if wanted:
            start = int(wanted.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass  # keep the test output quiet


@contextlib.contextmanager
def serve(root: Path):
    """(base URL, request log) of a threading HTTP server on a free port, for the `with` block."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    server.root, server.requests = root, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def mirror_dir(real_data, tmp_path_factory):
    """A copy of a small part of the real data, with the manifest restricted to the copied summaries."""
    root = tmp_path_factory.mktemp("mirror")
    with open(real_data / fetch.MANIFEST, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [row for row in reader if row["staged_name"] in SUMMARIES]
    with open(root / fetch.MANIFEST, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=reader.fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    for path in [*(f"summaries/{n}" for n in SUMMARIES), *(f"images/{n}" for n in IMAGES), *SMALL]:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real_data / path, root / path)
    return root


@pytest.fixture(scope="module")
def mirror(mirror_dir):
    with serve(mirror_dir) as (url, requests_seen):
        yield url, requests_seen


def served_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def assert_identical(mirror_root: Path, out: Path):
    for path in served_files(mirror_root):
        assert (out / path).read_bytes() == (mirror_root / path).read_bytes(), path
    assert not list(out.rglob("*.part"))


def config(out, mirror, **kwargs) -> FetchConfig:
    return FetchConfig(output=str(out), mirror=mirror, workers=4, timeout=5.0, retries=1, **kwargs)


def test_http_fetch_is_identical_and_rerun_downloads_nothing(mirror, mirror_dir, tmp_path):
    url, _ = mirror
    out = tmp_path / "cache"
    summary = fetch.run(config(out, url))
    assert_identical(mirror_dir, out)
    served = served_files(mirror_dir)
    assert summary["downloaded"] == len(served) and summary["failed"] == []
    assert summary["bytes"] == sum((mirror_dir / p).stat().st_size for p in served)
    # absent optional files are reported, not fatal: the images of 509 and 559, files not in the copy
    assert {"images/509.jpg", "images/559.jpg", "README.md"} <= set(summary["missing"])
    record = json.loads((out / fetch.RECORD).read_text())["files"]
    image_sha256 = hashlib.sha256((mirror_dir / "images/511.jpg").read_bytes()).hexdigest()
    assert record["images/511.jpg"] == {"sha256": image_sha256, "bytes": (mirror_dir / "images/511.jpg").stat().st_size}
    assert set(record) == set(served)

    again = fetch.run(config(out, url))
    assert (again["downloaded"], again["bytes"], again["skipped"]) == (0, 0, len(served))
    assert_identical(mirror_dir, out)


def test_truncated_part_file_resumes_with_range(mirror, mirror_dir, tmp_path):
    url, requests_seen = mirror
    out = tmp_path / "cache"
    name = "summaries/511_LilUCB.csv"
    data = (mirror_dir / name).read_bytes()
    (out / "summaries").mkdir(parents=True)
    (out / f"{name}.part").write_bytes(data[:100_000])
    summary = fetch.run(config(out, url))
    assert (f"/{name}", "bytes=100000-") in requests_seen
    assert (out / name).read_bytes() == data
    assert summary["bytes"] == sum((mirror_dir / p).stat().st_size for p in served_files(mirror_dir)) - 100_000
    assert_identical(mirror_dir, out)


def test_corrupt_files_fail_by_name_and_good_files_land(mirror_dir, tmp_path):
    bad_root = tmp_path / "bad_mirror"
    shutil.copytree(mirror_dir, bad_root)
    csv_path = bad_root / "summaries/559_RandomSamping.csv"
    data = bytearray(csv_path.read_bytes())
    data[100:110] = b"X" * 10  # same size, different bytes
    csv_path.write_bytes(bytes(data))
    (bad_root / "images/511.jpg").write_bytes(b"<html>not found</html>")  # an error page saved as an image
    out = tmp_path / "cache"
    with serve(bad_root) as (url, _), pytest.raises(FetchError) as caught:
        fetch.run(config(out, url))
    message = str(caught.value)
    expected = hashlib.sha256((mirror_dir / "summaries/559_RandomSamping.csv").read_bytes()).hexdigest()
    actual = hashlib.sha256(bytes(data)).hexdigest()
    assert "summaries/559_RandomSamping.csv" in message and expected in message and actual in message
    assert "images/511.jpg: not a JPEG or PNG" in message
    failed = {f["path"] for f in caught.value.summary["failed"]}
    assert failed == {"summaries/559_RandomSamping.csv", "images/511.jpg"}
    assert not (out / "summaries/559_RandomSamping.csv").exists() and not (out / "images/511.jpg").exists()
    assert not list(out.rglob("*.part"))
    for good in ("summaries/511_LilUCB.csv", "images/508.jpg", "benchmarks/humor_in_ai_splits.json"):
        assert (out / good).read_bytes() == (mirror_dir / good).read_bytes()


def test_unreachable_mirror_is_one_clear_error(tmp_path, capsys):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(FetchError) as caught:
        fetch.run(config(tmp_path / "cache", url))
    message = str(caught.value)
    assert f"{url}/summaries_manifest.csv" in message and "refused" in message.lower()
    assert "HUMOR_RAY_DATA" in message and "--mirror" in message

    code = cli.main(["data", "fetch", "--output", str(tmp_path / "cli"), "--mirror", url, "--retries", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "humor-ray data fetch: error: cannot reach" in err and "Traceback" not in err


def test_local_directory_mirror(mirror_dir, tmp_path):
    out = tmp_path / "cache"
    summary = fetch.run(config(out, str(mirror_dir)))
    assert summary["downloaded"] == len(served_files(mirror_dir)) and summary["failed"] == []
    assert_identical(mirror_dir, out)
    assert fetch.run(config(out, str(mirror_dir)))["bytes"] == 0


def test_upstream_mode_against_a_local_github_stand_in(mirror_dir, tmp_path, monkeypatch):
    """Upstream layout and git blob hashes, served locally: the real GitHub is not reachable here."""
    root = tmp_path / "github"
    commit = root / "raw"
    entries = []
    for name in SUMMARIES[:2]:
        contest, _, algorithm = name.partition("_")
        source = f"contests/summaries/{contest}_summary_{algorithm}"
        entries.append((source, mirror_dir / "summaries" / name))
    entries.append(("contests/info/508/508.jpg", mirror_dir / "images/508.jpg"))
    entries.append(("contests/metadata/contexts.yaml", None))  # in the tree, but its download will 404
    tree = []
    for source, local in entries:
        if local is not None:
            (commit / source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, commit / source)
        content = local.read_bytes() if local else b"a: [b]\n"
        sha = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
        tree.append({"path": source, "type": "blob", "sha": sha, "size": len(content)})
    tree.append({"path": "contests/summaries", "type": "tree", "sha": "0" * 40})
    (root / "tree.json").write_text(json.dumps({"tree": tree, "truncated": False}))
    with serve(root) as (url, _):
        monkeypatch.setattr(fetch, "UPSTREAM_TREE_URL", f"{url}/tree.json")
        monkeypatch.setattr(fetch, "UPSTREAM_RAW_URL", f"{url}/raw/")
        with pytest.raises(FetchError, match="descriptions/nextml_contexts.yaml: not found"):
            fetch.run(FetchConfig(output=str(tmp_path / "cache"), workers=2, timeout=5.0, retries=0))
    out = tmp_path / "cache"
    for name in SUMMARIES[:2]:
        assert (out / "summaries" / name).read_bytes() == (mirror_dir / "summaries" / name).read_bytes()
    assert (out / "images/508.jpg").read_bytes() == (mirror_dir / "images/508.jpg").read_bytes()


def test_git_blob_hash_matches_git(tmp_path):
    path = tmp_path / "hello"
    path.write_bytes(b"hello\n")
    assert fetch.git_blob_sha1(path) == "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object`
