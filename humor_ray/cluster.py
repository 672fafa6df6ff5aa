"""Connecting to Ray: the cluster a job was submitted to, or a local one on a laptop."""

from __future__ import annotations

import os

# No model or dataset hub at run time; workers get the same settings as the driver.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

# Ray Train workers beside a Ray Data pipeline deadlock when the logical CPU count is the physical
# count on small machines, so a local cluster advertises at least this many.
MIN_LOCAL_CPUS = 4


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    env = {key: os.environ.get(key, value) for key, value in OFFLINE_ENV.items()}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env={"env_vars": env},
                 log_to_driver=True)
        return
    # address="local": never attach to some other cluster this machine happens to run.
    ray.init(address="local", num_cpus=num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1),
             runtime_env={"env_vars": env}, include_dashboard=False, log_to_driver=True,
             configure_logging=True, logging_level="WARNING")
