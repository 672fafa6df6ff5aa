"""Connecting to Ray: the cluster a job was submitted to, or a local one on a laptop."""

from __future__ import annotations

import os

from humor_ray.log import LEVEL_VARIABLE, get_logger, ray_level

# No model or dataset hub at run time; workers get the same settings as the driver.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Ray Train's print patch copies every print into its logger, including what a library prints into
    # a captured stream (dill disassembles each function `datasets` fingerprints): pages of bytecode.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}

# A local cluster's Ray Train, tuned for runs of seconds to minutes on one machine: its controller polls the
# workers every half second instead of two (a finished or failed run is noticed sooner; a poll is one cheap
# call per worker), and no preemption watcher (one more actor process per run, for nodes a cloud reclaims).
LOCAL_TRAIN_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}

# Ray Train workers beside a Ray Data pipeline deadlock when the logical CPU count is the physical
# count on small machines, so a local cluster advertises at least this many.
MIN_LOCAL_CPUS = 4
log = get_logger("ray")


def init_ray(num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`), else start a local one; with
    `dashboard`, the local one serves the Ray dashboard (Train runs are watched there)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        log.info(f"joining the Ray cluster at {os.environ['RAY_ADDRESS']} (--address / RAY_ADDRESS)")
        env = {key: os.environ.get(key, value) for key, value in OFFLINE_ENV.items()}
        if LEVEL_VARIABLE in os.environ:  # --log_level, for our lines in the workers
            env[LEVEL_VARIABLE] = os.environ[LEVEL_VARIABLE]
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env={"env_vars": env}, log_to_driver=True,
                 logging_level=ray_level())
        return
    # A local cluster's workers inherit this process's environment (the log level too): cheaper than a runtime_env,
    # which makes every worker start wait for the runtime-env agent.
    for key, value in {**OFFLINE_ENV, **LOCAL_TRAIN_ENV}.items():
        os.environ.setdefault(key, value)
    # address="local": never attach to some other cluster this machine happens to run.
    log.info("starting a local Ray cluster (humor-ray --address ADDR, or RAY_ADDRESS, joins a running one instead)")
    context = ray.init(address="local", num_cpus=num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1),
                       include_dashboard=dashboard, log_to_driver=True, logging_level=ray_level())
    if dashboard and context.dashboard_url:
        log.info(f"Ray dashboard: http://{context.dashboard_url}")


def local_cores() -> int | None:
    """Physical cores when Ray runs on this machine alone, else None (a cluster sizes itself).
    A local cluster advertises more logical CPUs than cores; running that many CPU-bound tasks at
    once only adds contention."""
    return None if os.environ.get("RAY_ADDRESS") else (os.cpu_count() or 1)
