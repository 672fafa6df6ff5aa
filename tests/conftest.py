"""Shared test set-up: offline, real data from ../shared/data (or $HUMOR_RAY_DATA), one local Ray."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

# Set before anything imports transformers, datasets or Ray.
os.environ.update({
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "disabled",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    # For the local S3 server in test_object_store; Ray workers inherit them when Ray starts.
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
})

import pytest

from humor_ray.config import data_root

# Job specs name the data as ${HUMOR_RAY_DATA}: the tests' copy, wherever data_root() found it.
os.environ.setdefault("HUMOR_RAY_DATA", str(data_root()))


@pytest.fixture(autouse=True)
def _ray_address_left_as_it_was():
    """A test that leaves RAY_ADDRESS set sends every later command in its process to a cluster long gone."""
    before = os.environ.get("RAY_ADDRESS")
    yield
    assert os.environ.get("RAY_ADDRESS") == before, "the test left RAY_ADDRESS changed"


@pytest.fixture(scope="session")
def real_data():
    root = data_root()
    if not (root / "summaries").is_dir():
        pytest.fail(f"the real contest data is not at {root}: set HUMOR_RAY_DATA to its folder")
    return root


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting Ray costs seconds on two cores), with the
    dashboard as the training stages start it (Ray Train queries the cluster's state through it)."""
    import ray

    from humor_ray.cluster import init_ray

    init_ray(dashboard=True)
    yield ray
    ray.shutdown()


def build_datasets(out: Path, real_data: Path, summaries: str, datasets: list[str], images: bool = False) -> Path:
    """`humor-ray data build` into `out` of the summaries matching `summaries` (a glob under summaries/), writing
    `datasets`, with the paper's splits and the Humor-in-AI descriptions, and the cartoons with `images`."""
    from humor_ray.data import build

    build.run(build.BuildConfig(
        input=str(real_data / "summaries" / summaries), output=str(out),
        splits=str(real_data / "benchmarks" / "humor_in_ai_splits.json"),
        descriptions=[str(real_data / "descriptions" / "humor_in_ai_prompt_descriptions.csv")],
        images=str(real_data / "images") if images else None, datasets=datasets))
    return out


@pytest.fixture(scope="module")
def datasets_dir(request, tmp_path_factory, real_data, ray_local):
    """The datasets a test module names in its `REAL_DATASETS`: `summaries` (a glob under summaries/), `datasets`
    (which to write) and `images` (with the cartoons, default no). Each module builds only what its tests read."""
    spec = request.module.REAL_DATASETS
    return build_datasets(tmp_path_factory.mktemp(f"{request.module.__name__}_datasets"), real_data,
                          spec["summaries"], spec["datasets"], spec.get("images", False))


# Small training runs: a few steps, every one logged, evaluation and a checkpoint every second step.
SMALL_TRAINING = dict(max_steps=4, eval_steps=2, save_steps=2, logging_steps=1, per_device_train_batch_size=4,
                      max_eval_examples=16, max_length=256, max_failures=0, report_to=["none"])
# The reward model's run, on two contests' pairs.
REWARD_MODEL_RUN = dict(model_name="minilm", learning_rate=5e-5, **SMALL_TRAINING)


@pytest.fixture(scope="session")
def reward_model_run(tmp_path_factory, real_data, ray_local) -> Path:
    """The output folder of one `humor-ray rm` run (REWARD_MODEL_RUN), trained once for the session: test_train
    checks the run itself, test_rl's PPO scores its captions with it."""
    from humor_ray.train import rm

    data = build_datasets(tmp_path_factory.mktemp("reward_model_datasets"), real_data, "53[06]_LilUCB.csv",
                          ["pairs"])
    out = tmp_path_factory.mktemp("reward_model") / "rm"
    rm.run(rm.Config(output_dir=str(out), dataset_dir=str(data), **REWARD_MODEL_RUN))
    return out


def our_processes(*prefixes: str) -> list:
    """Our Ray's processes whose title starts with one of `prefixes` (its workers descend from this process; other
    Ray clusters on the machine are not ours)."""
    import psutil

    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if (process.cmdline() or [""])[0].startswith(prefixes):
                found.append(process)
        except psutil.Error:  # gone meanwhile
            pass
    return found


def scratch_folders() -> set[Path]:
    """The stages' temporary folders on this machine: a stage that ends must leave none behind."""
    return set(Path(tempfile.gettempdir()).glob("humor_ray_*"))


def ray_address_file() -> Path:
    """Where `ray start` records its cluster for a later `ray.init()`, as Ray itself finds it (under its temporary
    folder: $RAY_TMPDIR, else $TMPDIR, else /tmp)."""
    from ray._common.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


def forget_cluster_record(gcs_port: int) -> None:
    """Remove `ray start`'s record when it names our stopped cluster (GCS on `gcs_port`); a later `ray.init()`
    would try to join it. A record of another cluster stays."""
    current = ray_address_file()
    if current.exists() and current.read_text().strip().endswith(f":{gcs_port}"):
        current.unlink()


RAY = str(Path(sys.executable).parent / "ray")


_ports_given: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, and not one given before in this session: the OS hands a just-closed port
    out again, and a Ray node refuses to start when two of its components get the same port."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _ports_given:
            _ports_given.add(port)
            return port


def registered_checkpoints(fs, run_path: str) -> list[str]:
    """The checkpoints Ray Train has registered for a run (their folder names), from the record its controller
    rewrites on every registration, `checkpoint_manager_snapshot.json` in the run's folder on `fs` (a pyarrow
    filesystem). A checkpoint folder alone is not yet registered: that waits for every worker's report of it,
    and a restart resumes only from a registered one."""
    try:
        with fs.open_input_stream(f"{run_path}/checkpoint_manager_snapshot.json") as handle:
            snapshot = json.loads(handle.read())
    except (FileNotFoundError, ValueError):  # not written yet, or read mid-write on a local disk
        return []
    return [result["checkpoint_dir_name"] for result in snapshot["checkpoint_results"]]


def stop_cluster(head: subprocess.Popen, gcs_port: int) -> None:
    """Stop a `ray start --block` node and every process of its cluster, and only those: its process group, and
    the processes that name its GCS port. They are killed: Ray's graceful stop takes about 30 s, and nothing of a
    test's cluster is needed after the test."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        try:
            same_group = os.getpgid(process.pid) == head.pid
            if same_group or any(f":{gcs_port}" in part for part in process.info["cmdline"] or []):
                process.kill()
        except (psutil.Error, ProcessLookupError):  # gone meanwhile
            pass
    head.wait(timeout=60)


@pytest.fixture
def head_node():
    """A Ray head on loopback, with its own ports, stopped at the end without touching other clusters:
    `.address` (its dashboard, for `ray job submit`), `.env` (for the commands run against it) and
    `.metrics_port` (where its node serves Prometheus metrics), `.gcs_address` (for joining it: `--address`)."""
    gcs, dashboard, metrics = free_port(), free_port(), free_port()
    # The cluster's Python is this environment, as on a node image where humor_ray is installed.
    # Metrics reach the node's endpoint every second instead of every ten, for the metrics test.
    # DASHBOARD_METRIC_PORT: the dashboard's own metrics server has a fixed default port another dashboard may hold.
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_metrics_report_interval_ms="1000",
               DASHBOARD_METRIC_PORT=str(free_port()),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
         # Every port of its own: the suite's local Ray already holds the defaults (agent 52365, ...).
         f"--metrics-export-port={metrics}", *(f"--{flag}={free_port()}" for flag in (
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
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
    yield types.SimpleNamespace(address=address, gcs_address=f"127.0.0.1:{gcs}", env=env, metrics_port=metrics)
    stop_cluster(head, gcs)
    forget_cluster_record(gcs)


@pytest.fixture
def s3_endpoint():
    """A local S3-compatible server (moto) on loopback: its host:port."""
    port = free_port()
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
