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
    # Credentials in the URIs (the server's own keys) are used, and recorded nowhere.
    report = build.run(build.BuildConfig(
        input=f"s3://testing:testing@ratings-bucket/summaries{query}",
        output=f"s3://testing:testing@ratings-bucket/datasets{query}",
        splits=str(real_data / "benchmarks" / "humor_in_ai_splits.json")))
    assert report["contests"] == dict(report["contests"], total=2, train=1, eval=1)
    pairs = pads.dataset("ratings-bucket/datasets/pairs", filesystem=fs, format="parquet").to_table()
    assert pairs.num_rows == 2000 and set(pairs["contest"].to_pylist()) == {530, 536}
    with fs.open_input_stream("ratings-bucket/datasets/report.json") as handle:
        written = handle.read().decode()
    assert "testing:testing" not in written and "s3://***@ratings-bucket/summaries" in written
    assert fs.get_file_info("ratings-bucket/datasets/_COMPLETE").type == pafs.FileType.File
    assert fs.get_file_info("ratings-bucket/datasets/_staging").type == pafs.FileType.NotFound


def test_an_error_line_names_the_uri_without_its_credentials(s3_endpoint, tmp_path, capsys):
    from humor_ray import cli

    pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http", region="us-east-1",
                      allow_bucket_creation=True).create_dir("empty-bucket")
    uri = f"s3://testing:TOPSECRET@empty-bucket/?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    assert cli.main(["data", "build", "--input", uri, "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "no rating files" in err and "s3://***@empty-bucket" in err and "TOPSECRET" not in err

