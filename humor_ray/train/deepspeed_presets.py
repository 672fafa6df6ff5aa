"""DeepSpeed for every trainer (sft, rm, dpo, llava through the HF Trainer; ppo's learner directly): the
`--deepspeed` presets and the configs they stand for, and the checks of a user's DeepSpeed JSON."""

from __future__ import annotations

import json

from humor_ray.config import ConfigError

# The presets themselves are checked with the option, in humor_ray.config.DeepSpeedOptions.

# "auto" values that depend on the model's width, filled as the HF Trainer fills them.
HIDDEN_SIZE_KEYS = {
    "zero_optimization.reduce_bucket_size": lambda hidden: hidden * hidden,
    "zero_optimization.stage3_prefetch_bucket_size": lambda hidden: int(0.9 * hidden * hidden),
    "zero_optimization.stage3_param_persistence_threshold": lambda hidden: 10 * hidden,
}


def zero_optimization(preset: str, use_gpu: bool) -> dict:
    """The `zero_optimization` section of a DeepSpeed preset (zero2, zero3, zero3_offload)."""
    stage = 2 if preset == "zero2" else 3
    zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if stage == 3:
        # Needed for a normal Hugging Face checkpoint at save time.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if preset == "zero3_offload":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    return zero


def start_process_group(use_gpu: bool) -> None:
    """DeepSpeed's process group: NCCL on GPUs, gloo on CPUs. On CPUs without DeepSpeed's shared-memory
    all-reduce: that op is C++ that DeepSpeed compiles on its first use on a machine (40 s of both cores on two,
    again whenever its compiler flags change) to speed up all-reduces a CPU run spends milliseconds in."""
    import deepspeed
    import deepspeed.ops

    if not use_gpu:
        # deepspeed.comm builds the op only where this table (probed once per process) says it can.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")


def deepspeed_config(preset: str, use_gpu: bool) -> dict | str | None:
    """A DeepSpeed config for the HF Trainer ("auto" values are filled from the training args)."""
    if preset == "none":
        return None
    if preset.endswith(".json"):
        return preset
    return {"zero_optimization": zero_optimization(preset, use_gpu),
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}


def trainer_half_precision(preset: str, use_gpu: bool) -> str | None:
    """The HF Trainer's half precision ("bf16", "fp16" or None): bf16 on a GPU, unless a user's JSON says
    otherwise (the Trainer refuses a JSON whose fp16/bf16 switches contradict its own arguments)."""
    if preset.endswith(".json"):
        return half_precision(read_json(preset), use_gpu, f"--deepspeed {preset}")
    return "bf16" if use_gpu else None


def read_json(path: str) -> dict:
    """A user's DeepSpeed JSON, or one line saying why it cannot be read."""
    try:
        with open(path) as handle:
            settings = json.load(handle)
    except OSError as err:
        raise ConfigError(f"--deepspeed {path}: {err.strerror}") from None
    except ValueError as err:
        raise ConfigError(f"--deepspeed {path}: not valid JSON ({err})") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"--deepspeed {path}: a DeepSpeed config is a JSON object")
    return settings


def auto_keys(settings: dict, prefix: str = "") -> list[str]:
    """The dotted names of every "auto" value in a DeepSpeed config."""
    found = []
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found += auto_keys(value, f"{name}.")
        elif value == "auto":
            found.append(name)
    return found


def half_precision(settings: dict, use_gpu: bool, source: str = "--deepspeed") -> str | None:
    """The half precision a DeepSpeed config trains in: "fp16" or "bf16" where its `enabled` is true,
    bf16 on a GPU where neither says (or says "auto"), None (fp32) on the CPU or where bf16 is switched off."""
    enabled = {name: settings.get(name, {}).get("enabled") for name in ("fp16", "bf16")}
    if enabled["fp16"] is True and enabled["bf16"] is True:
        raise ConfigError(f"{source}: fp16.enabled and bf16.enabled are both true; DeepSpeed takes one of them")
    if enabled["fp16"] is True:
        return "fp16"
    if enabled["bf16"] is True or (use_gpu and enabled["bf16"] is not False):
        return "bf16"
    return None


def check_user_json(path: str, use_gpu: bool, filled: tuple[str, ...]) -> dict:
    """A user's DeepSpeed JSON for a trainer that fills the "auto" values named in `filled` (dotted names;
    one ending in "." stands for everything under it), the half-precision switches and the model-width
    ones: every other "auto" is refused by name, as is fp16 with bf16. Returns the settings."""
    settings = read_json(path)
    half_precision(settings, use_gpu, f"--deepspeed {path}")
    fillable = (*filled, "fp16.enabled", "bf16.enabled", *HIDDEN_SIZE_KEYS)
    unknown = [key for key in auto_keys(settings)
               if not any(key == name or (name.endswith(".") and key.startswith(name)) for name in fillable)]
    if unknown:
        raise ConfigError(f"--deepspeed {path}: \"auto\" for {', '.join(unknown)}, which this stage does not fill: "
                          "give a value or leave the key out")
    return settings


def fill_auto(settings: dict, hidden_size) -> dict:
    """Fill the model-width "auto" values (`hidden_size`: a function giving the model's width, called only
    when one is needed)."""
    for name, value in HIDDEN_SIZE_KEYS.items():
        section, key = name.split(".")
        if settings.get(section, {}).get(key) == "auto":
            settings[section][key] = value(hidden_size())
    return settings
