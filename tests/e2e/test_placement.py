"""The GPU placement of the 7B job specs, for real on this CPU machine: a multi-node Ray cluster whose nodes
declare logical GPUs, so Ray assigns GPU ids and sets CUDA_VISIBLE_DEVICES as on GPU nodes. Each spec's roles
are placed by stand-ins with the options the stages use (`python -m humor_ray.placement`, a driver on the
cluster; the trainer workers are Ray Train's, in Ray Train's placement group), on the shapes the specs name and
on two nodes of four GPUs; a shape too small for a spec is one line before anything loads."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import free_port, ray_address_file

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
HUMOR_RAY = str(Path(sys.executable).parent / "humor-ray")
PPO, SFT = "jobs/ppo-7b.yaml", "jobs/sft-7b.yaml"
TRAINING = ("sft-7b", "sft-simple-7b", "rm-7b", "dpo-7b", "llava-7b")
CPUS_PER_GPU = 10  # logical: a colocated trainer worker's bundle holds its 8 CPUs and those of its engine and reward


@pytest.fixture(scope="module")
def cluster():
    """A head without GPUs; each test gives it the GPU nodes of its shape (`shape`)."""
    from ray.cluster_utils import Cluster

    current = ray_address_file()  # Cluster rewrites it; put back what was there
    before = current.read_text() if current.exists() else None
    head = dict(num_cpus=2, num_gpus=0, gcs_server_port=free_port(), include_dashboard=True,
                dashboard_host="127.0.0.1", dashboard_port=free_port(), dashboard_agent_listen_port=free_port(),
                metrics_export_port=free_port(), runtime_env_agent_port=free_port())
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DASHBOARD_METRIC_PORT", str(free_port()))
        nodes = Cluster(initialize_head=True, head_node_args=head)
    nodes.gpu_nodes = []
    try:
        yield nodes
    finally:
        nodes.shutdown()
        if before is not None:
            current.write_text(before)


def shape(cluster, count: int, gpus: int) -> None:
    """Make the cluster's GPU nodes `count` nodes of `gpus` GPUs (reusing those it has)."""
    while len(cluster.gpu_nodes) > count or (cluster.gpu_nodes and cluster.gpu_nodes[0][1] != gpus):
        node, _ = cluster.gpu_nodes.pop()
        cluster.remove_node(node)
    while len(cluster.gpu_nodes) < count:
        node = cluster.add_node(num_cpus=CPUS_PER_GPU * gpus, num_gpus=gpus, metrics_export_port=free_port(),
                                runtime_env_agent_port=free_port())
        cluster.gpu_nodes.append((node, gpus))
    cluster.wait_for_nodes()


def rehearse(cluster, *specs: str) -> dict:
    """Each spec (with flags) placed by stand-ins on the cluster: {spec: its JSON line}."""
    env = dict(os.environ, RAY_ADDRESS=cluster.address)
    done = subprocess.run([sys.executable, "-m", "humor_ray.placement", *specs], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {line["spec"]: line for line in lines}


def check_placed(line: dict) -> None:
    """Every role scheduled; no two trainer workers on one GPU; separate roles on GPUs of their own; colocated
    roles on their trainer worker's GPU, and the worker's bundle holding their CPUs."""
    assert "error" not in line, line["error"]
    placed, roles = line["placed"], {role["name"]: role for role in line["roles"]}
    assert Counter(p["role"] for p in placed) == {name: role["count"] for name, role in roles.items()}
    trainers = sorted((p for p in placed if p["role"] == "trainer"), key=lambda p: p["index"])
    gpus = [(p["node"], p["gpu_ids"][0]) for p in trainers]
    assert all(len(p["gpu_ids"]) == 1 for p in trainers) and len(set(gpus)) == len(gpus), trainers
    # Ray Train shows a worker the GPUs of its node's workers, its own among them.
    assert all(p["gpu_ids"][0] in p["visible"].split(",") for p in trainers)
    others = [p for p in placed if p["role"] != "trainer"]
    if roles["trainer"]["gpus"] == 1.0 and all(roles[p["role"]]["gpus"] == 1.0 for p in others):  # separate
        held = gpus + [(p["node"], p["gpu_ids"][0]) for p in others]
        assert all(len(p["gpu_ids"]) == 1 and p["visible"] == p["gpu_ids"][0] for p in others), others
        assert len(set(held)) == len(held), held
        return
    workers = len(trainers)
    for p in others:  # colocated: engine j on worker j mod N's GPU, the reward model on worker 0's
        host = trainers[p["index"] % workers if p["role"] == "engine" else 0]
        assert (p["node"], p["visible"], p["gpu_ids"]) == (host["node"], host["gpu_ids"][0], []), (p, host)
    busiest = max(Counter(p["index"] % workers for p in others if p["role"] == "engine").values())
    assert line["trainer_resources"]["CPU"] == roles["trainer"]["cpus"] + busiest * roles["engine"]["cpus"] + \
        roles["reward"]["cpus"]


def spec_shape(spec: str) -> tuple[int, int]:
    first = (REPO / spec).read_text().splitlines()[0]
    count, gpus = first.removeprefix("# shape: ").replace(" GPUs", "").split(" node x ")
    return int(count), int(gpus)


def test_ppo_on_the_shape_it_names_separate_and_colocated(cluster):
    shape(cluster, *spec_shape(PPO))
    colocated = f"{PPO} --placement colocate --num_engines 4 --colocate_fractions 0.3 0.2 0.4"
    lines = rehearse(cluster, PPO, colocated)
    check_placed(lines[PPO])
    assert len({p["node"] for p in lines[PPO]["placed"]}) == 1
    check_placed(lines[colocated])


def test_ppo_and_training_on_two_nodes_of_four_gpus(cluster):
    shape(cluster, 2, 4)
    lines = rehearse(cluster, PPO, SFT)
    for line in lines.values():
        check_placed(line)
    assert len({p["node"] for p in lines[PPO]["placed"]}) == 2  # 7 GPUs: both nodes


def test_training_specs_on_their_shape_and_ppo_refused_in_one_line(cluster, tmp_path):
    shapes = {spec_shape(f"jobs/{name}.yaml") for name in TRAINING}
    assert len(shapes) == 1
    shape(cluster, *shapes.pop())
    lines = rehearse(cluster, *(f"jobs/{name}.yaml" for name in TRAINING), PPO)
    for name in TRAINING:
        check_placed(lines[f"jobs/{name}.yaml"])
    need = ("ppo needs 7 GPUs (2 engines, 1 reward model, 4 trainer workers with --placement separate); the cluster "
            "has 4 GPUs (1 node x 4 GPUs)")
    assert lines[PPO]["error"] == need
    # The stage itself says so before it loads anything (the spec's model is a hub id it never fetches).
    (tmp_path / "datasets" / "prompts" / "train").mkdir(parents=True)
    (tmp_path / "datasets" / "_COMPLETE").write_text("{}")  # a complete build, as far as the stage checks
    done = subprocess.run([HUMOR_RAY, "ppo", "--config", PPO, "--dataset_dir", str(tmp_path / "datasets"),
                           "--output_dir", str(tmp_path / "out"), "--reward_model", "builtin:vowel_share"],
                          cwd=REPO, env=dict(os.environ, RAY_ADDRESS=cluster.address), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == f"humor-ray ppo: error: {need}", \
        done.stderr
    assert not (tmp_path / "out").exists()


def test_colocated_engine_and_reward_model_see_only_their_workers_gpu(ray_local):
    """The options PPO's colocated workers start the real engine and reward model with (on this CPU machine the
    engine runs on the CPU; what counts is where it runs and which GPU it would see)."""
    import ray

    from humor_ray import placement
    from humor_ray.engines import Decoding, start_engines
    from humor_ray.models import registry
    from humor_ray.rl.reward import start_reward_actor

    node = ray.get_runtime_context().get_node_id()
    options = placement.rider_options(node, "3")
    engine, = start_engines("hf", registry.resolve("tiny"), 1, num_cpus=1, gpu_memory=0.36, seed=7, options=options)
    reward = start_reward_actor("builtin:vowel_share", options=options)

    def seen(actor):
        return ray.get(actor.__ray_call__.remote(lambda self: (
            ray.get_runtime_context().get_node_id(), ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"),
            os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING"))))

    try:
        assert seen(engine) == (node, [], "3", "0")  # the engines' own settings are kept beside the device
        assert seen(reward)[:3] == (node, [], "3")
        samples = ray.get(engine.generate.remote(["A caption:"], 2, Decoding(max_new_tokens=4, seed=1)))
        assert len(samples) == 2
        assert ray.get(reward.score.remote(["p"], ["aaa"])) == [1.0]
    finally:
        for actor in (engine, reward):
            ray.kill(actor)


def test_the_reward_model_judge_asks_for_a_gpu_with_use_gpu(ray_local, tmp_path):
    """On a cluster without GPUs `judge --judge rm --use_gpu` says so in one line (it used to score on the CPU of
    the driver)."""
    from humor_ray.config import UserError
    from humor_ray.eval import benchmark

    cfg = benchmark.JudgeConfig(dataset_dir=str(tmp_path), generations=[str(tmp_path)], output_dir=str(tmp_path),
                                reward_model="builtin:vowel_share", use_gpu=True)
    with pytest.raises(UserError) as err:
        benchmark._score_on_gpu(cfg, "builtin:vowel_share", ["p"], ["aaa"])
    assert str(err.value) == "judge needs 1 GPU (1 reward model); the cluster has 0 GPUs"
