"""DeepSpeed for every trainer (sft, rm, dpo, llava through the HF Trainer; ppo's learner directly): the
`--deepspeed` presets and the configs they stand for."""

from __future__ import annotations

# The presets themselves are checked with the option, in humor_ray.config.DeepSpeedOptions.


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
