"""The GPU placement of every stage, computed without CUDA: the engines' memory shares against vLLM's own start-up
check, the colocated shares, the cluster-size check and the shapes the 7B job specs are meant for."""

import types
from pathlib import Path

import pytest

from humor_ray import placement
from humor_ray.config import ConfigError, UserError, parse_config
from humor_ray.infer import generate
from humor_ray.rl import ppo

JOBS = Path(__file__).resolve().parents[2] / "jobs"
# The 7B specs of a stage (study-7b.yaml runs them all: each is planned here on its own).
STAGE_SPECS_7B = sorted(s for s in JOBS.glob("*-7b.yaml") if not s.name.startswith("study-"))
GIB = 2 ** 30
H100 = 80 * GIB
CUDA_CONTEXT = GIB // 2  # what a process's CUDA context holds before vLLM measures the free memory


def ppo_config(*flags: str) -> ppo.Config:
    return parse_config(ppo.Config, ["--config", str(JOBS / "ppo-7b.yaml"), "--output_dir", "/tmp/out",
                                     "--dataset_dir", "/tmp/ds", "--reward_model", "/runs/rm", *flags], "humor-ray ppo")


def vllm_accepts(free: int, total: int, utilization: float) -> bool:
    """vLLM's own start-up check (vllm/v1/worker/utils.py), on a memory snapshot made by hand."""
    from vllm.v1.worker.utils import request_memory

    snapshot = types.SimpleNamespace(total_memory=total, free_memory=free, device_="cuda:0")
    try:
        request_memory(snapshot, types.SimpleNamespace(gpu_memory_utilization=utilization))
    except ValueError:
        return False
    return True


def ours_accepts(free: int, total: int, utilization: float) -> bool:
    try:
        placement.check_free_memory(free, total, utilization, "GPU 0")
    except UserError as err:
        assert "--engine_gpu_memory" in str(err)
        return False
    return True


@pytest.mark.parametrize("free", [H100, H100 - CUDA_CONTEXT, int(H100 * 0.9), int(H100 * 0.9) - 1, 20 * GIB])
@pytest.mark.parametrize("utilization", [1.0, 0.95, 0.9, 0.36, 0.25])
def test_the_memory_check_is_vllms(free, utilization):
    assert ours_accepts(free, H100, utilization) == vllm_accepts(free, H100, utilization)


def test_separate_engines_ask_for_memory_a_gpu_with_a_cuda_context_has():
    plan = placement.ppo_plan(ppo_config())
    engine = plan.role("engine")
    assert (plan.mode, engine.gpus, engine.memory) == ("separate", 1.0, 0.9)
    # A whole GPU's memory (what the engines asked for before) is never free once a CUDA context exists.
    assert not vllm_accepts(H100 - CUDA_CONTEXT, H100, 1.0)
    assert vllm_accepts(H100 - CUDA_CONTEXT, H100, engine.memory)


def test_a_colocated_engine_gets_its_share_of_the_engine_memory():
    plan = placement.ppo_plan(ppo_config("--placement", "colocate", "--engine_gpu_memory", "0.8"))
    assert plan.role("engine").memory == pytest.approx(0.4 * 0.8)
    # The engine starts before its worker loads the policy: the trainer's context alone is taken.
    assert vllm_accepts(H100 - 2 * CUDA_CONTEXT, H100, plan.role("engine").memory)


@pytest.mark.parametrize("value", ["1.0", "0", "1.5", "-0.1"])
def test_engine_gpu_memory_is_a_fraction_below_one(value):
    with pytest.raises(ConfigError, match="--engine_gpu_memory"):
        ppo_config("--engine_gpu_memory", value)
    with pytest.raises(ConfigError, match="--engine_gpu_memory"):
        parse_config(generate.GenerateConfig, ["--dataset_dir", "/d", "--output_dir", "/o",
                                               "--engine_gpu_memory", value], "humor-ray generate")


def test_generation_engines_take_the_option():
    cfg = parse_config(generate.BonConfig, ["--dataset_dir", "/d", "--output_dir", "/o", "--reward_model", "/rm",
                                            "--use_gpu", "--num_engines", "3", "--engine_gpu_memory", "0.85"],
                       "humor-ray bon")
    plan = generate.placement_plan(cfg)
    assert [(r.name, r.count, r.gpus, r.memory) for r in plan.roles] == [("engine", 3, 1.0, 0.85),
                                                                         ("reward", 1, 1.0, 0.0)]
    assert plan.gpus_needed() == 4
    cpu = generate.placement_plan(parse_config(generate.GenerateConfig, ["--dataset_dir", "/d", "--output_dir", "/o"],
                                               "humor-ray generate"))
    assert (cpu.mode, cpu.role("engine").gpus, cpu.role("engine").memory) == ("cpu", 0.0, 0.0)


@pytest.mark.parametrize("cores, cluster_cpus, args, expected", [
    (2, 4, [], 2),  # a laptop: the local cluster advertises 4 logical CPUs on 2 cores
    (2, 4, ["--num_engines", "2"], 1),
    (8, 8, [], 8),
    (8, None, [], 8),  # before Ray starts
    (2, 4, ["--cpus_per_engine", "3"], 3),
    (2, 4, ["--use_gpu"], 1),
])
def test_a_local_cpu_engine_gets_the_machines_cores(monkeypatch, cores, cluster_cpus, args, expected):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    cfg = parse_config(generate.GenerateConfig, ["--dataset_dir", "/d", "--output_dir", "/o", *args],
                       "humor-ray generate")
    assert generate.engine_cpus(cfg, cluster_cpus) == expected


def test_best_of_n_leaves_its_reward_model_a_cpu_and_a_cluster_engine_gets_one(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    bon = parse_config(generate.BonConfig, ["--dataset_dir", "/d", "--output_dir", "/o", "--reward_model", "/rm"],
                       "humor-ray bon")
    assert generate.engine_cpus(bon, 8) == 7
    assert placement.inference_plan("bon", False, 1, reward=True, engine_cpus=7).role("engine").cpus == 7
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a cluster sizes itself: one CPU an engine
    assert generate.engine_cpus(bon, 64) == 1


def test_colocated_trainer_workers_each_hold_a_whole_gpu_with_their_roles_cpus():
    plan = placement.ppo_plan(ppo_config("--placement", "colocate", "--num_engines", "6", "--colocate_fractions", "0.2",
                                         "0.1", "0.4"))
    assert plan.gpus_needed() == 4  # one GPU per trainer worker, shared
    assert plan.trainer_resources() == {"CPU": 8 + 2 * 1 + 1, "GPU": 1.0}  # 2 engines on the busiest GPU
    assert [r.gpus for r in plan.roles if r.name != "trainer"] == [0.0, 0.0]
    roles = [placement.colocated_roles(plan, rank) for rank in range(4)]
    assert roles == [[("engine", 0), ("engine", 4), ("reward", 0)], [("engine", 1), ("engine", 5)],
                     [("engine", 2)], [("engine", 3)]]


def test_colocated_shares_must_fit_one_gpu():
    with pytest.raises(ConfigError, match="holds 2 engine"):  # 2 x 0.4 + 0.2 + 0.4 of the busiest GPU
        ppo_config("--placement", "colocate", "--num_engines", "5")
    with pytest.raises(ConfigError, match="three shares"):
        ppo_config("--placement", "colocate", "--colocate_fractions", "0.5", "0.5")


def test_a_cluster_too_small_is_one_line_naming_need_and_gpus():
    plan = placement.ppo_plan(ppo_config())
    shape = placement.ClusterShape(((36.0, 4.0, 1), (8.0, 0.0, 1)))
    with pytest.raises(UserError) as err:
        placement.check_fits(plan, shape)
    assert str(err.value) == ("ppo needs 7 GPUs (2 engines, 1 reward model, 4 trainer workers with --placement "
                              "separate); the cluster has 4 GPUs (1 node x 4 GPUs)")
    autoscaling = placement.ClusterShape(((72.0, 8.0, 0),), autoscaling=True)
    with pytest.raises(UserError, match="the cluster can scale to 0 GPUs"):
        placement.check_fits(plan, autoscaling)
    few_cpus = placement.ClusterShape(((4.0, 8.0, 1),))
    with pytest.raises(UserError, match="1 GPU and 8 CPUs per trainer worker"):
        placement.check_fits(plan, few_cpus)


@pytest.mark.parametrize("spec", STAGE_SPECS_7B, ids=lambda p: p.name)
def test_each_7b_spec_names_a_shape_it_fits(spec, monkeypatch):
    monkeypatch.setenv("HUMOR_RAY_DATA", "/data")
    assert spec.read_text().splitlines()[0].startswith("# shape: "), "the shape comes first"
    nodes, gpus = placement.spec_shape(spec)
    plan = placement.spec_plan(str(spec), [])
    # The GPU nodes of clusters/kuberay.yaml: 9 CPUs per GPU.
    placement.check_fits(plan, placement.ClusterShape(((9.0 * gpus, float(gpus), nodes),)))
