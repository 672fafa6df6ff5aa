"""The data stage as a real Ray job: `ray start --head` on loopback, then `ray job submit`."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(420)

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def test_data_build_submitted_as_a_ray_job(ray_local, head_node, real_data, tmp_path):
    # `ray_local` runs too, as in the full suite: the two clusters must not collide.
    address, env = head_node.address, head_node.env
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("530_LilUCB.csv", "536_LilUCB.csv", "591_KLUCB.csv"):
        shutil.copy(real_data / "summaries" / name, inputs / name)
    output = tmp_path / "datasets"
    command = [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
               "humor-ray", "data", "build", "--input", str(inputs), "--output", str(output),
               "--splits", str(real_data / "benchmarks" / "humor_in_ai_splits.json")]
    # The dashboard answers before the node's job agent is up; Ray says so and asks to retry.
    for _ in range(20):
        submitted = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        log = submitted.stdout + submitted.stderr
        if "No available agent to submit job" not in log:
            break
        time.sleep(3)
    assert submitted.returncode == 0, log
    assert "succeeded" in log and "pass 2/2: building datasets for 2 contests" in log
    report = json.loads((output / "report.json").read_text())
    assert report["contests"]["total"] == 2 and report["quarantined"]["files"] == 1
    assert report["datasets"]["pairs"] == {"train": 1000, "eval": 1000}

    # The same build run from this machine's shell against the running cluster: it joins, says so first.
    joined = subprocess.run([str(Path(sys.executable).parent / "humor-ray"), "--address", head_node.gcs_address,
                             "data", "build", "--input", str(inputs), "--output", str(tmp_path / "joined"),
                             "--splits", str(real_data / "benchmarks" / "humor_in_ai_splits.json")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert joined.returncode == 0, joined.stderr
    first = joined.stderr.splitlines()[0]
    assert f"joining the Ray cluster at {head_node.gcs_address}" in first, joined.stderr
    assert json.loads((tmp_path / "joined" / "report.json").read_text())["datasets"] == report["datasets"]
