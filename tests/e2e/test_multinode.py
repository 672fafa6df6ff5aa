"""Training on several nodes, for real on one machine: a Ray cluster of a head and three worker nodes, each a
raylet with its own processes (`ray.cluster_utils.Cluster`), every node with one CPU so that no two workers can
share a node. The stages run as they do on a cluster: `humor-ray ...` drivers with RAY_ADDRESS set.

- The data build runs on the cluster.
- PPO: its rollout engine, reward model and trainer worker land on three nodes; checkpoints go to a local
  folder every node sees (the machine's disk stands for shared storage).
- SFT: two workers on two nodes, checkpoints to s3:// (a local S3 server); the node of one worker is killed
  mid-run and Ray Train restarts the workers on the nodes left, from the last checkpoint, to the end.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from conftest import free_port, ray_address_file, registered_checkpoints

pytestmark = pytest.mark.timeout(420)

HUMOR_RAY = str(Path(sys.executable).parent / "humor-ray")


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    # Cluster rewrites the file `ray.init()` reads to find a running cluster; put back what was there.
    current = ray_address_file()
    before = current.read_text() if current.exists() else None
    head = dict(num_cpus=1, gcs_server_port=free_port(), include_dashboard=True, dashboard_host="127.0.0.1",
                dashboard_port=free_port(), dashboard_agent_listen_port=free_port(),
                metrics_export_port=free_port(), runtime_env_agent_port=free_port())
    # The dashboard's own metrics server has a fixed default port, taken if another dashboard runs here.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DASHBOARD_METRIC_PORT", str(free_port()))
        nodes = Cluster(initialize_head=True, head_node_args=head)
    try:
        for _ in range(3):
            nodes.add_node(num_cpus=1, metrics_export_port=free_port(), runtime_env_agent_port=free_port())
        yield nodes
    finally:
        nodes.shutdown()
        if before is not None:
            current.write_text(before)


def dashboard(cluster) -> str:
    return f"http://{cluster.head_node.webui_url}"


def actors(cluster, class_suffix: str, job_id: str | None = None) -> list:
    """Every actor whose class name ends with `class_suffix` (of one job's driver, with `job_id`), dead ones
    too (Ray's state API)."""
    from ray.util.state import list_actors

    return [a for a in list_actors(address=dashboard(cluster), detail=True, limit=10000, raise_on_missing_output=False)
            if a.class_name.endswith(class_suffix) and job_id in (None, a.job_id)]


def stage(cluster, *args: str, wait: bool = True):
    env = dict(os.environ, RAY_ADDRESS=cluster.address)
    command = [HUMOR_RAY, *args]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def datasets(cluster, real_data, tmp_path_factory):
    started = time.time()
    root = tmp_path_factory.mktemp("multinode")
    (root / "inputs").mkdir()
    for name in ("530_LilUCB.csv", "536_LilUCB.csv"):  # a train contest and an evaluation contest
        shutil.copy(real_data / "summaries" / name, root / "inputs" / name)
    stage(cluster, "data", "build", "--input", str(root / "inputs"), "--output", str(root / "datasets"),
          "--splits", str(real_data / "benchmarks" / "humor_in_ai_splits.json"), "--datasets", "sft_simple", "prompts")
    print(f"\nmultinode: datasets built on the cluster in {time.time() - started:.0f} s", file=sys.stderr)
    return root / "datasets"


def test_ppo_engine_reward_model_and_trainer_on_three_nodes(cluster, datasets, tmp_path, capsys):
    started = time.time()
    storage = tmp_path / "storage"
    stage(cluster, "ppo", "--config", "jobs/ppo-tiny.yaml", "--dataset_dir", str(datasets),
          "--output_dir", str(tmp_path / "ppo"), "--run_name", "ppo-multinode", "--storage_path", str(storage),
          "--max_steps", "2", "--save_steps", "2", "--logging_steps", "1")
    summary = json.loads((tmp_path / "ppo" / "metrics.json").read_text())
    assert [h["step"] for h in summary["history"]][-1] == 2
    assert list((storage / "ppo-multinode").glob("checkpoint_*")), "no checkpoint in the shared storage"
    (engine,) = actors(cluster, "VLLMEngine")
    (reward,) = actors(cluster, "RewardModel", engine.job_id)
    trainers = actors(cluster, "RayTrainWorker", engine.job_id)
    assert len({engine.node_id, reward.node_id}) == 2, (engine, reward)
    # Every trainer worker that ran (Ray Train starts another if one fails) had a node of its own.
    assert trainers and not {t.node_id for t in trainers} & {engine.node_id, reward.node_id}, trainers
    restarts = [t.death_cause for t in trainers] if len(trainers) > 1 else []
    with capsys.disabled():
        print(f"\nmultinode ppo: 2 steps, engine, reward model and trainer on 3 nodes, {time.time() - started:.0f} s"
              + (f"; {len(trainers)} trainer workers started: {restarts}" if restarts else ""))


def test_sft_survives_losing_a_worker_node_and_resumes_from_s3(cluster, datasets, tmp_path, s3_endpoint, capsys):
    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http", region="us-east-1",
                           allow_bucket_creation=True)
    fs.create_dir("checkpoints")
    storage = f"s3://checkpoints/runs?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    # The node is killed once the first checkpoint (step 4) is registered; the steps after it leave time for
    # that, however slow the state API answers, before the last checkpoint is registered.
    steps = 24
    started = time.time()
    run = stage(cluster, "sft", "--config", "jobs/sft-tiny.yaml", "--dataset_dir", str(datasets),
                "--output_dir", str(tmp_path / "sft"), "--run_name", "sft-multinode", "--storage_path", storage,
                "--num_workers", "2", "--max_steps", str(steps), "--save_steps", "4", "--eval_steps", "4",
                # Every checkpoint kept, so that the one resumed from can be read afterwards.
                "--save_total_limit", "10", "--logging_steps", "4", "--max_eval_examples", "8", "--report_to", "none",
                wait=False)
    try:
        while not registered_checkpoints(fs, "checkpoints/runs/sft-multinode"):
            assert run.poll() is None, f"the run ended before a checkpoint was registered:\n{run.stdout.read()}"
            assert time.time() - started < 240, "no checkpoint registered within 240 s"
            time.sleep(0.5)
        killed_at = time.time() - started
        workers = [a for a in actors(cluster, "RayTrainWorker") if a.state == "ALIVE"]  # the PPO ones are dead
        assert len(workers) == 2 and len({a.node_id for a in workers}) == 2, workers
        victim = next(n for n in cluster.worker_nodes if n.node_id in {a.node_id for a in workers})
        assert run.poll() is None, "the run ended before a node could be killed"
        cluster.remove_node(victim, allow_graceful=False)
        log, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, log
    wall = time.time() - started
    summary = json.loads((tmp_path / "sft" / "metrics.json").read_text())
    assert summary["resumed_from"], f"the run restarted from scratch:\n{log}"
    with fs.open_input_stream(f"{summary['resumed_from']}/checkpoint/trainer_state.json") as state:
        resumed_step = json.loads(state.read())["global_step"]
    assert 0 < resumed_step < steps and summary["log_history"][-1]["step"] == steps, (resumed_step, killed_at)
    assert (tmp_path / "sft" / "final" / "config.json").exists()
    # Two new workers, on the nodes left.
    restarted = [a for a in actors(cluster, "RayTrainWorker", workers[0].job_id)
                 if a.actor_id not in {w.actor_id for w in workers}]
    assert len(restarted) == 2 and victim.node_id not in {a.node_id for a in restarted}, restarted
    with capsys.disabled():
        print(f"\nmultinode sft: a worker's node killed {killed_at:.0f} s after start, resumed from step "
              f"{resumed_step}, {steps} steps done in {wall:.0f} s")
