"""The data stage as a real Ray job: `ray start --head` on loopback, then `ray job submit`."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(420)

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node(tmp_path):
    """A Ray head on loopback, with its own ports, stopped at the end without touching other clusters."""
    gcs, dashboard = free_port(), free_port()
    # The cluster's Python is this environment, as on a node image where humor_ray is installed.
    env = dict(os.environ, RAY_AUTH_MODE="disabled",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
         # Every port of its own: the suite's local Ray already holds the defaults (agent 52365, ...).
         *(f"--{flag}={free_port()}" for flag in (
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "node-manager-port", "object-manager-port", "ray-client-server-port")),
         "--num-cpus=4", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while time.time() < deadline:
        status = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True)
        if status.returncode == 0:
            break
        assert head.poll() is None, head.stdout.read()
        time.sleep(2)
    else:
        pytest.fail("the Ray head did not come up within 120 s")
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)
    head.wait(timeout=60)
    # `ray start` records its cluster for later `ray.init()` calls; ours is gone.
    current = Path("/tmp/ray/ray_current_cluster")
    if current.exists() and current.read_text().strip().endswith(f":{gcs}"):
        current.unlink()


def test_data_build_submitted_as_a_ray_job(ray_local, head_node, real_data, tmp_path):
    # `ray_local` runs too, as in the full suite: the two clusters must not collide.
    address, env = head_node
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
