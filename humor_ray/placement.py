"""Where every role of a stage runs on a cluster's GPUs, decided without CUDA.

A stage's `Plan` lists its roles (trainer workers, rollout engines, the reward model) with the CPUs, the logical
GPUs (what Ray schedules and assigns GPU ids by) and the share of a GPU's memory each may use. The stages start
their real roles with these options; `rehearse` starts stand-ins with the same options, so the placement of a
job spec can be checked on any Ray cluster, including a CPU one that declares logical GPUs
(`ray start --num-gpus 8`): Ray assigns GPU ids and sets CUDA_VISIBLE_DEVICES exactly as on a GPU node.

- Training stages (sft, rm, dpo, llava): Ray Train workers with one whole GPU each.
- PPO, `--placement separate`: every engine, the reward model and every trainer worker has its own whole GPU.
- PPO, `--placement colocate`: one GPU per trainer worker, shared with the engines and the reward model.
  Ray Train 2.60 reserves its workers in a placement group of its own, one bundle per worker, and cannot
  be given the bundles of an outer one; fractional GPUs outside one bundle each (in a placement group or
  not) are packed onto the same GPU id, so trainer workers with a fraction of a GPU could share a GPU and
  NCCL would fail ("Duplicate GPU detected"). So each trainer worker's Ray Train bundle is the whole GPU,
  with the CPUs of the roles that share it; the worker starts those roles itself on its node, with its GPU
  as their only visible device (`colocated_roles`, `rider_options`). The shares of `--colocate_fractions`
  are memory shares: a colocated engine's vLLM budget is its share of `--engine_gpu_memory`.

`check_cluster` reports a cluster too small for a plan in one line before anything loads: the GPUs the
cluster has (or, when it autoscales, the most its node groups can reach) against the plan's need.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

from humor_ray.config import ConfigError, Options, UserError, field

# vLLM's start-up check: the free memory of its GPU must cover gpu_memory_utilization x total. A CUDA context
# (this process's own, or a colocated trainer's) always holds some, so a whole GPU's memory is never free.
ENGINE_GPU_MEMORY = 0.9
PPO_ROLES = ("engine", "reward", "trainer")  # the order of --colocate_fractions
SHAPE = re.compile(r"^#\s*shape:\s*(\d+)\s+nodes?\s+x\s+(\d+)\s+GPUs?\s*$", re.IGNORECASE)


@dataclasses.dataclass
class EngineGpuOptions(Options):
    """How much of a GPU's memory a vLLM engine may take (stages that start engines: ppo, generate, bon)."""
    engine_gpu_memory: float = field(ENGINE_GPU_MEMORY, "fraction of a whole GPU's memory a vLLM engine alone on its "
                                                        "GPU may use (vLLM's gpu_memory_utilization; that much must "
                                                        "be free when it starts, so below 1); a colocated engine "
                                                        "gets its --colocate_fractions share of it",
                                     exclusive_minimum=0, exclusive_maximum=1)


def engine_memory(gpu_share: float, engine_gpu_memory: float) -> float:
    """vLLM's gpu_memory_utilization for an engine that holds `gpu_share` of a GPU."""
    return round(gpu_share * engine_gpu_memory, 6)


def check_free_memory(free_bytes: int, total_bytes: int, utilization: float, device: str) -> None:
    """vLLM's start-up check (vllm/v1/worker/utils.py `request_memory`), made before vLLM starts so that the
    message names the option to change."""
    requested = math.ceil(total_bytes * utilization)
    if free_bytes < requested:
        gib = 2 ** 30
        raise UserError(f"the vLLM engine on {device} needs {utilization:g} of its {total_bytes / gib:.1f} GiB "
                        f"({requested / gib:.1f} GiB) free at start and only {free_bytes / gib:.1f} GiB are: lower "
                        "--engine_gpu_memory (or the engine's --colocate_fractions share)")


# ---------------------------------------------------------------- plans

@dataclasses.dataclass(frozen=True)
class Role:
    """`count` actors of one kind and what each asks Ray for."""
    name: str  # trainer, engine or reward
    count: int
    cpus: float
    gpus: float  # logical GPUs from Ray (0: none, or a colocated role on its trainer worker's GPU)
    memory: float = 0.0  # for an engine: vLLM's gpu_memory_utilization (0 on CPU)

    def label(self) -> str:
        noun = {"trainer": "trainer worker", "engine": "engine", "reward": "reward model"}[self.name]
        return f"{self.count} {noun}{'s' if self.count != 1 else ''}"


@dataclasses.dataclass(frozen=True)
class Plan:
    """The roles of one stage and how they use GPUs (`mode`): cpu (none); whole (training and generation: a GPU
    each); separate or colocate (ppo's --placement)."""
    stage: str
    mode: str
    roles: tuple[Role, ...]
    engines_per_gpu: int = 0  # colocate: engines a trainer worker's GPU holds at most

    def role(self, name: str) -> Role | None:
        return next((r for r in self.roles if r.name == name), None)

    @property
    def trainer(self) -> Role | None:
        return self.role("trainer")

    def gpus_needed(self) -> int:
        return math.ceil(sum(r.count * r.gpus for r in self.roles) - 1e-9)

    def trainer_resources(self) -> dict:
        """`resources_per_worker` of the Ray Train workers: colocated, each bundle also holds the CPUs of
        the roles its worker starts."""
        trainer = self.trainer
        cpus = trainer.cpus
        if self.mode == "colocate":
            cpus += self.engines_per_gpu * self.role("engine").cpus + self.role("reward").cpus
        return {"CPU": cpus, **({"GPU": trainer.gpus} if trainer.gpus else {})}

    def actor_options(self, name: str) -> dict:
        """Ray options of a role the driver starts (engines and the reward model when not colocated)."""
        role = self.role(name)
        return {"num_cpus": role.cpus, "num_gpus": role.gpus}

    def describe(self) -> str:
        placed = f" with --placement {self.mode}" if self.stage == "ppo" and self.mode != "cpu" else ""
        return ", ".join(r.label() for r in self.roles) + placed


def train_plan(stage: str, cfg) -> Plan:
    """sft, rm, dpo, llava: `--num_workers` Ray Train workers, a whole GPU each with --use_gpu."""
    gpus = 1.0 if cfg.use_gpu else 0.0
    return Plan(stage, "whole" if cfg.use_gpu else "cpu",
                (Role("trainer", cfg.num_workers, cfg.cpus_per_worker, gpus),))


def ppo_plan(cfg) -> Plan:
    """The engines, the reward model and the trainer workers of `humor-ray ppo`."""
    engine_cpus, reward_cpus = 1, 1
    if not cfg.use_gpu:
        return Plan("ppo", "cpu", (Role("engine", cfg.num_engines, engine_cpus, 0.0),
                                   Role("reward", 1, reward_cpus, 0.0),
                                   Role("trainer", cfg.num_workers, cfg.cpus_per_worker, 0.0)))
    if cfg.placement == "separate":
        return Plan("ppo", "separate", (
            Role("engine", cfg.num_engines, engine_cpus, 1.0, engine_memory(1.0, cfg.engine_gpu_memory)),
            Role("reward", 1, reward_cpus, 1.0), Role("trainer", cfg.num_workers, cfg.cpus_per_worker, 1.0)))
    if len(cfg.colocate_fractions) != len(PPO_ROLES) or min(cfg.colocate_fractions) <= 0:
        raise ConfigError(f"--colocate_fractions {cfg.colocate_fractions}: three shares above 0, of engine, "
                          "reward model and trainer worker")
    shares = dict(zip(PPO_ROLES, cfg.colocate_fractions))
    per_gpu = math.ceil(cfg.num_engines / cfg.num_workers)
    busiest = per_gpu * shares["engine"] + shares["reward"] + shares["trainer"]
    if busiest > 1 + 1e-9:
        raise ConfigError(f"--colocate_fractions {cfg.colocate_fractions}: the busiest of the {cfg.num_workers} GPUs "
                          f"holds {per_gpu} engine(s), the reward model and a trainer worker, {busiest:g} of a GPU; "
                          "lower the shares, or raise --num_workers or lower --num_engines")
    return Plan("ppo", "colocate", (
        Role("engine", cfg.num_engines, engine_cpus, 0.0, engine_memory(shares["engine"], cfg.engine_gpu_memory)),
        Role("reward", 1, reward_cpus, 0.0), Role("trainer", cfg.num_workers, cfg.cpus_per_worker, 1.0)),
        engines_per_gpu=per_gpu)


def inference_plan(stage: str, use_gpu: bool, num_engines: int = 0, reward: bool = False,
                   engine_gpu_memory: float = ENGINE_GPU_MEMORY, engine_cpus: int = 1) -> Plan:
    """generate (engines), bon (engines, then the reward model in the same streaming pipeline: both at once)
    and judge --judge rm (the reward model): a whole GPU each with --use_gpu. An engine on the CPU computes
    with as many threads as it has CPUs (Ray sets OMP_NUM_THREADS from them)."""
    gpus = 1.0 if use_gpu else 0.0
    engines = ((Role("engine", num_engines, engine_cpus, gpus, engine_memory(gpus, engine_gpu_memory)),)
               if num_engines else ())
    return Plan(stage, "whole" if use_gpu else "cpu", engines + ((Role("reward", 1, 1, gpus),) if reward else ()))


def colocated_roles(plan: Plan, rank: int) -> list[tuple[str, int]]:
    """(role, index) of the roles trainer worker `rank` starts on its GPU: engine j on worker j mod N, the
    reward model on worker 0."""
    workers = plan.trainer.count
    engines = [("engine", j) for j in range(plan.role("engine").count) if j % workers == rank]
    return engines + ([("reward", 0)] if rank == 0 else [])


def rider_options(node_id: str, gpu_id: str) -> dict:
    """Ray options of a role sharing a trainer worker's GPU: on the worker's node, with that GPU as its only
    visible device. It asks Ray for no GPU and no CPU: the worker's bundle holds both for it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"num_cpus": 0, "num_gpus": 0,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False),
            "runtime_env": {"env_vars": {"CUDA_VISIBLE_DEVICES": str(gpu_id)}}}


def start_colocated(plan: Plan, rank: int, start) -> dict:
    """Inside trainer worker `rank`: start the roles that share its GPU (`start(name, index, options)` starts
    one and returns (its actor, a reference that resolves when it is ready)), wait until they are ready, and
    return every worker's colocated actors, {(name, index): actor}, gathered from all the workers."""
    import ray
    import torch.distributed as dist

    options = rider_options(ray.get_runtime_context().get_node_id(), ray.get_gpu_ids()[0])
    mine, ready = {}, []
    for name, index in colocated_roles(plan, rank):
        mine[(name, index)], started = start(name, index, options)
        ready.append(started)
    ray.get(ready)
    everyone = [mine]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    return {key: actor for part in everyone for key, actor in part.items()}


# ---------------------------------------------------------------- the cluster

@dataclasses.dataclass(frozen=True)
class ClusterShape:
    """What a cluster has, or can scale to: (CPUs, GPUs, how many such nodes at most) per kind of node."""
    nodes: tuple[tuple[float, float, int], ...]
    autoscaling: bool = False

    @property
    def gpus(self) -> int:
        return int(sum(gpus * count for _, gpus, count in self.nodes))

    def describe(self) -> str:
        groups = [f"{count} node{'s' if count != 1 else ''} x {gpus:g} GPUs" for _, gpus, count in self.nodes if gpus]
        where = f" ({' + '.join(groups)})" if groups else ""
        return f"{'can scale to ' if self.autoscaling else 'has '}{self.gpus} GPUs{where}"


def cluster_shape() -> ClusterShape:
    """The connected cluster: the node groups its autoscaler may start, else the nodes alive now."""
    import ray
    from ray._private.state import state  # the autoscaler's node groups; Ray Train reads them the same way

    config = state.get_cluster_config()
    if config is not None and config.node_group_configs:
        groups = {}
        for group in config.node_group_configs:
            key = (float(group.resources.get("CPU", 0)), float(group.resources.get("GPU", 0)))
            count = max(group.max_count, 0) if group.max_count != -1 else 10 ** 6
            groups[key] = groups.get(key, 0) + count
        return ClusterShape(tuple((c, g, n) for (c, g), n in groups.items() if n), autoscaling=True)
    groups = {}
    for node in ray.nodes():
        if node["Alive"]:
            key = (float(node["Resources"].get("CPU", 0)), float(node["Resources"].get("GPU", 0)))
            groups[key] = groups.get(key, 0) + 1
    return ClusterShape(tuple((c, g, n) for (c, g), n in sorted(groups.items(), key=lambda kv: -kv[0][1])))


def check_fits(plan: Plan, shape: ClusterShape) -> None:
    """One line when the cluster cannot hold the plan: too few GPUs, or no node with a worker's bundle."""
    if plan.mode == "cpu":
        return
    need = plan.gpus_needed()
    if need > shape.gpus:
        raise UserError(f"{plan.stage} needs {need} GPU{'s' if need != 1 else ''} ({plan.describe()}); the cluster "
                        f"{shape.describe()}")
    if plan.trainer is None:
        return
    bundle = plan.trainer_resources()
    if not any(cpus >= bundle["CPU"] and gpus >= bundle.get("GPU", 0) for cpus, gpus, _ in shape.nodes):
        raise UserError(f"{plan.stage} needs nodes with {bundle.get('GPU', 0):g} GPU and {bundle['CPU']:g} CPUs per "
                        f"trainer worker ({plan.describe()}); no node of the cluster has that "
                        f"({shape.describe()}): lower --cpus_per_worker")


def check_cluster(plan: Plan) -> None:
    """`check_fits` on the connected cluster (Ray must be initialised)."""
    if plan.mode != "cpu":
        check_fits(plan, cluster_shape())


def spec_shape(path: str | Path) -> tuple[int, int] | None:
    """(nodes, GPUs per node) from a job spec's `# shape: N node(s) x G GPUs` comment among its first lines."""
    for line in Path(path).read_text().splitlines()[:5]:
        match = SHAPE.match(line.strip())
        if match:
            return int(match.group(1)), int(match.group(2))
    return None


# ---------------------------------------------------------------- a rehearsal with stand-ins

class StandIn:
    """Stands where a role would run and says what Ray gave it."""

    def __init__(self, role: str, index: int):
        self.role, self.index = role, index

    def where(self) -> dict:
        return where(self.role, self.index)


def where(role: str, index: int) -> dict:
    import os

    import ray

    return {"role": role, "index": index, "node": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [str(i) for i in ray.get_gpu_ids()], "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}


def _start_stand_in(name: str, index: int, options: dict):
    import ray

    actor = ray.remote(StandIn).options(**options).remote(name, index)
    return actor, actor.where.remote()


def _rehearse_trainer(config: dict) -> None:
    """A Ray Train worker of the rehearsal: records itself; colocated, it starts stand-ins on its GPU as PPO's
    workers start their engines and reward model, and worker 0 records all of them through the handles
    gathered from every worker."""
    import ray
    import ray.train

    plan, records = config["plan"], config["records"]
    rank = ray.train.get_context().get_world_rank()
    found = [where("trainer", rank)]
    if plan.mode == "colocate":
        import torch.distributed as dist

        roles = start_colocated(plan, rank, _start_stand_in)
        if rank == 0:
            found += ray.get([actor.where.remote() for actor in roles.values()])
        ray.get(records.extend.remote(found))
        dist.barrier()  # a worker's stand-ins end with it: worker 0 has asked them first
    else:
        ray.get(records.extend.remote(found))


class Records:
    def __init__(self):
        self.items = []

    def extend(self, items: list) -> None:
        self.items.extend(items)

    def all(self) -> list:
        return self.items


def rehearse(plan: Plan, storage_path: str) -> list[dict]:
    """Every role of `plan` placed as the stage places it, by stand-ins (no model, no CUDA): one record per
    actor, {role, index, node, gpu_ids, visible}. Ray must be initialised."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    check_cluster(plan)
    records = ray.remote(num_cpus=0)(Records).remote()
    found = []
    others = [] if plan.mode == "colocate" else [r for r in plan.roles if r.name != "trainer"]
    actors = [ray.remote(StandIn).options(**plan.actor_options(role.name)).remote(role.name, i)
              for role in others for i in range(role.count)]
    found += ray.get([actor.where.remote() for actor in actors])
    trainer = plan.trainer
    scaling = ScalingConfig(num_workers=trainer.count, use_gpu=trainer.gpus > 0,
                            resources_per_worker=plan.trainer_resources())
    run = RunConfig(name="rehearsal", storage_path=storage_path)
    if plan.mode == "colocate":  # the workers gather their stand-ins as PPO's do: through torch.distributed
        from ray.train.torch import TorchConfig, TorchTrainer

        # gloo: the stand-ins need no CUDA (the stages use NCCL on GPUs).
        TorchTrainer(_rehearse_trainer, train_loop_config={"plan": plan, "records": records}, scaling_config=scaling,
                     torch_config=TorchConfig(backend="gloo"), run_config=run).fit()
    else:  # the same placement as the stages' TorchTrainer, without starting torch
        DataParallelTrainer(_rehearse_trainer, train_loop_config={"plan": plan, "records": records},
                            scaling_config=scaling, run_config=run).fit()
    found += ray.get(records.all.remote())
    for actor in [*actors, records]:
        ray.kill(actor)
    return found


def spec_plan(spec: str, flags: list[str]) -> Plan:
    """The plan of a job spec (with flags that override it), for the stage its file name starts with."""
    import importlib

    from humor_ray.cli import STAGES
    from humor_ray.config import parse_config

    stage = Path(spec).name.split("-")[0]
    if (stage,) not in STAGES or stage not in ("sft", "rm", "dpo", "llava", "ppo"):
        raise UserError(f"{spec}: a training or ppo job spec (sft-, rm-, dpo-, llava-, ppo-...)")
    module_name, config_name = STAGES[(stage,)]
    # The outputs and inputs are not read: a placement needs none of them.
    needed = ["--output_dir", "/unused", "--dataset_dir", "/unused"] + (
        ["--reward_model", "builtin:vowel_share"] if stage == "ppo" else [])
    # The spec's paths name the cluster's storage, not this machine's: they are not checked here.
    cfg = parse_config(getattr(importlib.import_module(module_name), config_name), ["--config", spec, *needed, *flags],
                       f"humor-ray {stage}", check_inputs=False)
    return ppo_plan(cfg) if stage == "ppo" else train_plan(stage, cfg)


def main(argv: list[str] | None = None) -> int:
    """`python -m humor_ray.placement "jobs/ppo-7b.yaml [--flag value ...]" ...`: rehearse the placement of each
    job spec on the cluster in RAY_ADDRESS with stand-ins (no model loads), one JSON line per spec: its roles
    and where each landed, or the one-line reason it does not fit."""
    import json
    import os
    import shlex
    import sys
    import tempfile

    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), logging_level="WARNING", log_to_driver=False)
    outcomes = {}  # specs with the same roles (the training specs) are rehearsed once
    for item in sys.argv[1:] if argv is None else argv:
        spec, *flags = shlex.split(item)
        plan = spec_plan(spec, flags)
        key = (plan.mode, plan.roles, plan.engines_per_gpu)
        try:
            check_cluster(plan)
            if key not in outcomes:
                with tempfile.TemporaryDirectory() as storage:
                    outcomes[key] = rehearse(plan, storage)
            outcome = {"placed": outcomes[key]}
        except UserError as err:
            outcome = {"error": str(err)}
        print(json.dumps({"spec": item, "roles": [dataclasses.asdict(role) for role in plan.roles],
                          "trainer_resources": plan.trainer_resources(), **outcome}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
