"""The final export every stage shares: Hugging Face format, loadable by `from_pretrained` and vLLM."""

from __future__ import annotations

import os


def save_merged(model_name: str, kind: str, new_padding_token: bool, final: str, live=None) -> str:
    """After LoRA training `final` holds the adapter; write base + adapter merged into `final/merged`.
    Without LoRA `final` already is the full model. Returns the directory to serve.

    `live`, the trained PEFT model when this process holds all of it, is merged in place (it is not
    trained further); without it the merge loads the base and the saved adapter again (under ZeRO-3 the
    live weights are partitioned across workers, while the saved adapter is whole). A vision-language
    model is saved with its processor, its tower in the layout vLLM loads."""
    from humor_ray.models.vision import write_vllm_layout

    if not os.path.isfile(os.path.join(final, "adapter_config.json")):
        write_vllm_layout(final)
        return final
    from transformers import AutoProcessor, AutoTokenizer

    if live is not None:
        merged = live.merge_and_unload()
        # The trainer turned the KV cache off for gradient checkpointing; a served model uses it.
        merged.config.use_cache = True
    else:
        from peft import PeftModel

        from humor_ray.models import registry

        base, _ = registry.load_model(model_name, kind=kind, new_padding_token=new_padding_token)
        merged = PeftModel.from_pretrained(base, final).merge_and_unload()
    merged_dir = os.path.join(final, "merged")
    merged.save_pretrained(merged_dir, safe_serialization=True)
    (AutoProcessor if kind == "image_text" else AutoTokenizer).from_pretrained(final).save_pretrained(merged_dir)
    write_vllm_layout(merged_dir)
    return merged_dir


# A run's final model is written beside `final/` and renamed into place when whole, so that `final/` is always
# one complete export (never an earlier run's adapter beside this run's merge). metrics.json names the model to
# serve relative to the run, so a moved run still finds it.
PARTIAL = ".final.partial"


def start_final(output_dir: str) -> str:
    """The folder to write the final model into (emptied of an interrupted run's leftovers)."""
    import shutil

    partial = os.path.join(output_dir, PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)
    return partial


def publish_final(output_dir: str, written: str, serve: str, record: dict) -> None:
    """Put the final model written into `written` in place of `final/`, then write metrics.json with
    `record` and the model to serve (`serve`, inside `written`) as a path relative to the run."""
    import shutil

    final, old = os.path.join(output_dir, "final"), os.path.join(output_dir, ".final.old")
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(written, final)
    shutil.rmtree(old, ignore_errors=True)
    model = os.path.normpath(os.path.join("final", os.path.relpath(serve, written)))
    rewrite_record(output_dir, {"model": model, **record})


def rewrite_record(output_dir: str, record: dict) -> None:
    """Write `record` as the run's metrics.json, whole or not at all."""
    import json

    temporary = os.path.join(output_dir, ".metrics.json.partial")
    with open(temporary, "w") as handle:
        json.dump(record, handle, indent=1)
    os.replace(temporary, os.path.join(output_dir, "metrics.json"))


def final_model(run_dir: str) -> str:
    """The absolute path of the model a finished run exported (its metrics.json's `model`)."""
    import json

    model = json.loads(open(os.path.join(run_dir, "metrics.json")).read())["model"]
    return os.path.join(os.path.abspath(run_dir), model)
