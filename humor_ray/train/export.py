"""The final export every stage shares: Hugging Face format, loadable by `from_pretrained` and vLLM."""

from __future__ import annotations

import os


def save_merged(trainer, final: str) -> str:
    """After LoRA training, `final` holds the adapter; write the merged full model to `final/merged`.
    Without LoRA `final` already is the full model. Returns the directory to serve."""
    from peft import PeftModel

    model = trainer.model
    while hasattr(model, "module") and not isinstance(model, PeftModel):  # DDP / DeepSpeed wrappers
        model = model.module
    if not isinstance(model, PeftModel):
        return final
    merged_dir = os.path.join(final, "merged")
    merged = model.merge_and_unload()
    merged.save_pretrained(merged_dir, safe_serialization=True)
    trainer.processing_class.save_pretrained(merged_dir)
    return merged_dir
