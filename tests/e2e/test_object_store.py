"""`data build` from and to s3:// over real HTTP: a local S3-compatible server (moto) on loopback."""

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from humor_ray.data import build

pytestmark = pytest.mark.timeout(300)


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
