"""Autoscaling, for real on one machine: Ray's fake multi-node provider starts worker "nodes" (raylets) as
processes here. A head with no CPUs for tasks gets a `humor-ray data build` job: the autoscaler must launch a
worker node for it, the job must build the same datasets as a local build, and the idle node must go away.
A 2-worker `humor-ray sft` job gets its two Ray Train workers on two nodes the autoscaler launched.

Ray's `AutoscalingCluster` helper runs `ray stop --force` (every Ray process on the machine) and needs an
example file the wheel lacks, so the head is started here, in its own temp dir, and stopped by the ids of the
processes whose command lines name that dir.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import RAY, forget_cluster_record, free_port, stop_cluster

pytestmark = pytest.mark.timeout(360)

REPO = Path(__file__).resolve().parents[2]
INPUTS = ("530_LilUCB.csv", "536_LilUCB.csv", "591_KLUCB.csv")


def fake_cluster_config(gcs_port: int) -> dict:
    return {
        "cluster_name": "humor-ray-fake", "max_workers": 4, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.2,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True,
                     # The fake nodes join this GCS (the provider's default is port 6379).
                     "gcs_address": f"127.0.0.1:{gcs_port}"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            # 1-CPU nodes: two training workers cannot share one.
            "cpu_worker": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 4},
        },
        "head_node_type": "ray.head.default",
        "docker": {}, "auth": {"ssh_user": "ubuntu"},
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def processes_of(temp_dir: str) -> list[int]:
    """The ids of the processes of the cluster that lives in `temp_dir` (it is in their command lines)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and temp_dir in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:  # the process ended meanwhile
            pass
    return [pid for pid in pids if pid != os.getpid()]


def listed(dashboard: str, kind: str) -> list[dict]:
    """Ray's state API: every node or actor the cluster has known (dead ones stay listed)."""
    with urllib.request.urlopen(f"{dashboard}/api/v0/{kind}?limit=1000&detail=true", timeout=10) as response:
        return json.loads(response.read())["data"]["result"]["result"]


def worker_nodes(dashboard: str) -> dict[str, str]:
    """node id -> state of every worker node."""
    return {n["node_id"]: n["state"] for n in listed(dashboard, "nodes") if not n["is_head_node"]}


@pytest.fixture
def autoscaling_head(tmp_path):
    gcs, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray_as_", dir="/tmp")  # short: Ray's socket paths must stay short
    config = tmp_path / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(fake_cluster_config(gcs)))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_FAKE_CLUSTER="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--num-cpus=0", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         f"--temp-dir={temp_dir}", f"--autoscaling-config={config}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", "--include-dashboard=true", "--disable-usage-stats",
         *(f"--{flag}={free_port()}" for flag in (
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "node-manager-port", "object-manager-port", "ray-client-server-port"))],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode:
            assert head.poll() is None, head.stdout.read()
            assert time.time() < deadline, "the Ray head did not come up within 120 s"
            time.sleep(2)
        yield address, env
    finally:
        # The head first (its autoscaler launches nodes), then every process of the cluster; a fake node's
        # raylet can outlive SIGTERM, so what is left after a while gets SIGKILL.
        stop_cluster(head, gcs)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in processes_of(temp_dir):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + 15
            while processes_of(temp_dir) and time.time() < deadline:
                time.sleep(1)
        assert not processes_of(temp_dir), f"processes of the test cluster still run: {processes_of(temp_dir)}"
        forget_cluster_record(gcs)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_data_build_job_scales_workers_up_and_down(autoscaling_head, real_data, tmp_path, capsys):
    address, env = autoscaling_head
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in INPUTS:
        shutil.copy(real_data / "summaries" / name, inputs / name)
    build = ["humor-ray", "data", "build", "--input", str(inputs),
             "--splits", str(real_data / "benchmarks" / "humor_in_ai_splits.json")]
    assert worker_nodes(address) == {}, "the head starts alone"

    started = time.time()
    submitted = subprocess.Popen([RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
                                  *build, "--output", str(tmp_path / "on-cluster")],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_up = None
    while submitted.poll() is None:
        if first_up is None and "ALIVE" in worker_nodes(address).values():
            first_up = time.time() - started
        time.sleep(1)
    log = submitted.stdout.read()
    wall = time.time() - started
    assert submitted.returncode == 0 and "succeeded" in log, log
    launched = worker_nodes(address)
    assert launched and first_up is not None, f"no worker node was launched for the job: {launched}"

    # The same datasets as a build on a local Ray, built while the idle nodes wait out their timeout.
    local_log = tmp_path / "local-build.log"
    with open(local_log, "w") as output:
        local = subprocess.Popen([sys.executable, "-m", "humor_ray", *build[1:], "--output", str(tmp_path / "local")],
                                 env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                                 stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120  # idle_timeout_minutes 0.2, and the autoscaler's own period
        while "ALIVE" in worker_nodes(address).values():
            assert time.time() < deadline, f"idle worker nodes were not removed: {worker_nodes(address)}"
            time.sleep(2)
        removed = time.time() - started - wall
        local.wait(timeout=240)
    finally:
        if local.poll() is None:  # the test failed meanwhile: the build stops its own Ray on SIGTERM
            local.terminate()
            local.wait(timeout=60)
    assert local.returncode == 0, local_log.read_text()
    files = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*.parquet"))
    assert files and files == sorted(p.relative_to(tmp_path / "on-cluster")
                                     for p in (tmp_path / "on-cluster").rglob("*.parquet"))
    for name in files:
        assert pq.read_table(tmp_path / "on-cluster" / name).equals(pq.read_table(tmp_path / "local" / name)), name
    with capsys.disabled():
        print(f"\nautoscaling: first worker node up {first_up:.0f} s after submission, job wall time {wall:.0f} s, "
              f"{len(launched)} node(s) launched, all removed {removed:.0f} s after the job ended")


@pytest.mark.slow  # about two minutes on two cores: node launches for the workers, a Ray Train start
def test_two_worker_sft_job_lands_on_two_launched_nodes(autoscaling_head, real_data, tmp_path):
    address, env = autoscaling_head
    datasets = tmp_path / "datasets"
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in INPUTS[:2]:  # a train contest and an evaluation one
        shutil.copy(real_data / "summaries" / name, inputs / name)
    build = subprocess.run([sys.executable, "-m", "humor_ray", "data", "build", "--input", str(inputs),
                            "--output", str(datasets),
                            "--splits", str(real_data / "benchmarks" / "humor_in_ai_splits.json")],
                           env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                           capture_output=True, text=True, timeout=240)
    assert build.returncode == 0, build.stderr
    # Every node shares this machine's disk, so a local folder serves as the shared checkpoint storage.
    submitted = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
         "humor-ray", "sft", "--config", "jobs/sft-tiny.yaml", "--dataset_dir", str(datasets),
         "--output_dir", str(tmp_path / "sft"), "--storage_path", str(tmp_path / "storage"),
         "--num_workers", "2", "--max_steps", "2", "--logging_steps", "1", "--eval_steps", "2",
         "--save_steps", "2", "--max_eval_examples", "8"],
        env=env, capture_output=True, text=True, timeout=300)
    log = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0 and "succeeded" in log, log
    assert (tmp_path / "sft" / "final" / "config.json").exists()
    workers = [a for a in listed(address, "actors") if a["class_name"].endswith("RayTrainWorker")]
    nodes = worker_nodes(address)
    assert len(workers) == 2, workers
    assert len({a["node_id"] for a in workers}) == 2 and {a["node_id"] for a in workers} <= set(nodes)
