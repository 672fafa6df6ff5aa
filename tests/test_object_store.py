"""`data build` from and to s3:// over real HTTP: a local S3-compatible server (moto) on loopback."""

import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from humor_ray.data import build

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def s3_endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        server.kill()
        pytest.fail("the S3 server did not start")
    yield f"127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=10)


def test_build_reads_and_writes_s3(s3_endpoint, real_data, ray_local):
    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http", region="us-east-1",
                           allow_bucket_creation=True)
    fs.create_dir("ratings-bucket")
    for name in ("530_LilUCB.csv", "536_LilUCB.csv"):
        with fs.open_output_stream(f"ratings-bucket/summaries/{name}") as out:
            out.write((real_data / "summaries" / name).read_bytes())
    query = f"?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    report = build.run(build.BuildConfig(
        input=f"s3://ratings-bucket/summaries{query}", output=f"s3://ratings-bucket/datasets{query}",
        splits=str(real_data / "benchmarks" / "humor_in_ai_splits.json")))
    assert report["contests"] == dict(report["contests"], total=2, train=1, eval=1)
    pairs = pads.dataset("ratings-bucket/datasets/pairs", filesystem=fs, format="parquet").to_table()
    assert pairs.num_rows == 2000 and set(pairs["contest"].to_pylist()) == {530, 536}
    assert fs.get_file_info("ratings-bucket/datasets/report.json").type == pafs.FileType.File
    assert fs.get_file_info("ratings-bucket/datasets/_staging").type == pafs.FileType.NotFound
