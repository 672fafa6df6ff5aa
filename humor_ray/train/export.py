"""The final export every stage shares: Hugging Face format, loadable by `from_pretrained` and vLLM."""

from __future__ import annotations

import os


def save_merged(model_name: str, kind: str, new_padding_token: bool, final: str) -> str:
    """After LoRA training `final` holds the adapter; write base + adapter merged into `final/merged`.
    Without LoRA `final` already is the full model. Returns the directory to serve.

    The merge starts from the saved files, not the live model: under ZeRO-3 the live weights are
    partitioned across workers, while the saved adapter is whole. A vision-language model is saved with
    its processor, its tower in the layout vLLM loads."""
    from humor_ray.models.vision import write_vllm_layout

    if not os.path.isfile(os.path.join(final, "adapter_config.json")):
        write_vllm_layout(final)
        return final
    from peft import PeftModel
    from transformers import AutoProcessor, AutoTokenizer

    from humor_ray.models import registry

    base, _ = registry.load_model(model_name, kind=kind, new_padding_token=new_padding_token)
    merged = PeftModel.from_pretrained(base, final).merge_and_unload()
    merged_dir = os.path.join(final, "merged")
    merged.save_pretrained(merged_dir, safe_serialization=True)
    (AutoProcessor if kind == "image_text" else AutoTokenizer).from_pretrained(final).save_pretrained(merged_dir)
    write_vllm_layout(merged_dir)
    return merged_dir
