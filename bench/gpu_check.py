"""The GPU check, one prepared script for a machine with one NVIDIA GPU (sized for under 8 minutes on an H100):

1. the memory plan beside the measured peak: SFT, the reward model, DPO and the LLaVA on the small models
   (smollm2-135m, smollm2-llava) train --steps steps in this process with the stage's own trainer (one GPU,
   no DeepSpeed), and `torch.cuda.max_memory_allocated` is printed beside the plan's estimate of that GPU
   (less the CUDA context, which the allocator does not see);
2. the LLaVA collate at the 7B recipe's processor settings (llava-v1.6-mistral-7b-hf's any-resolution image
   processor, from humor_ray/models/configs/, no weights) on real cartoons: image tokens per row beside the
   recipe's --max_length, and whether truncation cuts into an image;
3. PPO steps on smollm2-135m with the vLLM engine, `--placement colocate` (engine, reward actor and trainer on
   shares of the GPU) and `--placement separate` (each role a GPU of its own, the engine at its memory share;
   it needs 3 GPUs and is reported as skipped on fewer).

    python bench/gpu_check.py --datasets DIR [--images DIR] [--steps 8] [--ppo_steps 2] [--dry_run]

DIR holds `humor-ray data build` output with --images (sft_simple, pairs, prompts, llava_sft). It needs
`vllm==0.31.0` (the `vllm-gpu` extra) instead of the CPU wheel. `--dry_run` runs anywhere, without CUDA: it
parses, plans every check's configuration, runs the LLaVA collate (on the CPU) and checks that everything the
GPU part calls exists. The exit code is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from humor_ray import plan
from humor_ray.config import data_root

# (stage, model, the stage's options): small enough for a few seconds a step, large enough to measure.
TRAINING = (
    ("sft", "smollm2-135m", dict(simple_prompt=True, per_device_train_batch_size=16, max_length=256)),
    ("rm", "smollm2-135m", dict(per_device_train_batch_size=8, max_length=256, lora_r=16)),
    ("dpo", "smollm2-135m", dict(per_device_train_batch_size=8, max_length=256, lora_r=16)),
    ("llava", "smollm2-llava", dict(per_device_train_batch_size=8, max_length=512, lora_r=16, lora_alpha=32,
                                    mm_projector_lr=2e-4)),
)
RECIPE_LLAVA = "hf:llava-hf/llava-v1.6-mistral-7b-hf"
# What the GPU part calls: checked to exist by --dry_run.
CALLED = ("torch.cuda.max_memory_allocated", "torch.cuda.reset_peak_memory_stats", "torch.cuda.empty_cache",
          "humor_ray.train.launcher.as_dataset", "humor_ray.rl.ppo.run", "humor_ray.rl.ppo.Config",
          "humor_ray.cluster.init_ray", "ray.shutdown", "pyarrow.dataset.dataset",
          *(f"{plan.STAGES[stage]}.STAGE" for stage, _, _ in TRAINING))


def stage_config(stage: str, model: str, options: dict, args, output_dir: str):
    module = importlib.import_module(plan.STAGES[stage])
    extra = {"images": args.images} if stage == "llava" else {}
    return module.Config(output_dir=output_dir, dataset_dir=args.datasets, model_name=model, use_gpu=True,
                         num_workers=1, deepspeed="none", max_steps=args.steps, logging_steps=1,
                         save_steps=args.steps, do_eval=False, report_to=["none"], max_failures=0,
                         **extra, **options)


def planned_trainer_gpu(stage: str, cfg, gpu_gib: float) -> int:
    """The plan's bytes on the trainer's GPU, less the CUDA context (not the allocator's)."""
    return plan.plan_stage(stage, cfg, gpu_gib, hints=False).gpu_totals()["trainer"] - plan.CUDA_CONTEXT


def measure_training(stage: str, cfg) -> int:
    """Peak bytes the allocator held while the stage's own trainer ran --steps steps in this process."""
    import pyarrow.dataset as pds
    import torch
    import transformers

    from humor_ray.train.launcher import as_dataset

    definition = importlib.import_module(plan.STAGES[stage]).STAGE
    rows = cfg.max_steps * cfg.per_device_train_batch_size
    table = pds.dataset(os.path.join(cfg.dataset_dir, definition.dataset_name(cfg), "train"),
                        format="parquet").to_table(columns=list(definition.columns)).slice(0, rows)
    train = as_dataset(table, list(definition.columns), definition.caption_columns)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    transformers.set_seed(cfg.seed)
    trainer = definition.make_trainer(cfg, train, None, os.path.join(cfg.output_dir, "trainer_scratch"))
    trainer.train()
    peak = torch.cuda.max_memory_allocated()
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def recipe_processor():
    """The 7B LLaVA recipe's processor without its weights: llava-v1.6's image processor from the shipped settings,
    with the smollm2-llava tokenizer and chat template (the recipe's Mistral tokenizer is not on this machine:
    the text tokens differ, the image tokens do not)."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from humor_ray.models import registry

    settings = json.loads((plan.CONFIGS_DIR / "llava-v1.6-mistral-7b-hf.processor.json").read_text())
    base = registry.load_processor("smollm2-llava")
    return LlavaNextProcessor(image_processor=LlavaNextImageProcessorPil(**settings["image_processor"]),
                              tokenizer=base.tokenizer, chat_template=base.chat_template,
                              patch_size=settings["patch_size"], image_token=settings["image_token"],
                              num_additional_image_tokens=settings["num_additional_image_tokens"],
                              vision_feature_select_strategy=settings["vision_feature_select_strategy"])


def llava_rows(args, count: int) -> list[dict]:
    """llava_sft rows: from the datasets when there are any, else the first cartoons with the image prompt."""
    from humor_ray.data.prompts import image_prompt

    folder = Path(args.datasets, "llava_sft", "train")
    if folder.is_dir():
        import pyarrow.dataset as pds

        table = pds.dataset(str(folder), format="parquet").to_table(columns=["image", "prompt", "caption"])
        return table.slice(0, count).to_pylist()
    names = sorted(p.name for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return [{"image": name, "prompt": image_prompt(), "caption": "I told you the cat would find the remote."}
            for name in names[:count]]


def check_recipe_collate(args) -> dict:
    """The LLaVA stage's collate with the 7B recipe's processor and --max_length, on real cartoons."""
    from humor_ray.models.vision import open_image, single_view_processor
    from humor_ray.train.llava import ImageConversations

    recipe = plan.load_stage_config("llava", "llava-7b.yaml", ["--images", args.images])
    processor = recipe_processor()
    architecture = plan.architecture(RECIPE_LLAVA, "image_text")
    rows = llava_rows(args, recipe.per_device_train_batch_size)
    if recipe.image_aspect_ratio == "pad":  # one padded view per cartoon, as the stage reads it
        processor = single_view_processor(processor)
        expected = [architecture.padded_image_tokens] * len(rows)
    else:
        side = processor.image_processor.crop_size["height"]
        # The processor's own count (with "default" feature selection the CLS feature is dropped: one fewer).
        dropped = 1 if processor.vision_feature_select_strategy == "default" else 0
        expected = []
        for row in rows:
            width, height = open_image(args.images, row["image"]).size
            expected.append(processor._get_number_of_features(height, width, side, side) - dropped)
    batch = ImageConversations(processor, args.images, recipe.max_length)(rows)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    found = (batch["input_ids"] == image_id).sum(1).tolist()
    return {"max_length": recipe.max_length, "sequence_length": int(batch["input_ids"].shape[1]),
            "image_tokens": found, "image_tokens_expected": expected,
            "rows_with_images_cut": sum(f < e for f, e in zip(found, expected)),
            "pixel_values": list(batch["pixel_values"].shape),
            "image_aspect_ratio": recipe.image_aspect_ratio,
            "planned_image_tokens_at_most": (architecture.padded_image_tokens if recipe.image_aspect_ratio == "pad"
                                             else architecture.image_tokens),
            "ok": found == expected}


def ppo_config(args, placement: str, output_dir: str):
    from humor_ray.rl import ppo

    extra = {}
    if placement == "separate" and "engine_gpu_memory" in {f.name for f in dataclasses.fields(ppo.Config)}:
        extra["engine_gpu_memory"] = 0.5
    return ppo.Config(output_dir=output_dir, dataset_dir=args.datasets, model_name="smollm2-135m",
                      reward_model="builtin:vowel_share", use_gpu=True, placement=placement, engine="vllm",
                      max_steps=args.ppo_steps, save_steps=args.ppo_steps, report_to=["none"], max_failures=0,
                      **extra)


def run_ppo(args, placement: str, scratch: str) -> dict:
    import ray
    import torch

    from humor_ray.rl import ppo

    out = os.path.join(scratch, f"ppo_{placement}")
    cfg = ppo_config(args, placement, out)
    needed = plan.plan_stage("ppo", cfg, args.gpu_memory_gb, hints=False).gpus_needed
    if torch.cuda.device_count() < needed:
        return {"skipped": f"--placement {placement} needs {needed} GPUs, this machine has "
                           f"{torch.cuda.device_count()}"}
    began = time.perf_counter()
    try:
        ppo.run(cfg)
    finally:
        ray.shutdown()
    history = json.loads(Path(out, "metrics.json").read_text())["history"]
    return {"steps": len(history), "seconds": round(time.perf_counter() - began, 1),
            "engine_versions": [m["engine_version"] for m in history],
            "logprob_gap": max(m["logprob_gap"] for m in history),
            "ok": [m["engine_version"] for m in history] == list(range(len(history)))}


def resolved(dotted: str) -> bool:
    module, _, name = dotted.rpartition(".")
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", help="`humor-ray data build` output with --images (needed on the GPU)")
    parser.add_argument("--images", default=str(data_root() / "images"), help="the cartoons")
    parser.add_argument("--steps", type=int, default=8, help="training steps of each measured stage")
    parser.add_argument("--ppo_steps", type=int, default=2)
    parser.add_argument("--gpu_memory_gb", type=float, default=None,
                        help="GiB of the GPU for the plans (default: this machine's, else 80)")
    parser.add_argument("--dry_run", action="store_true",
                        help="no CUDA: plan, run the LLaVA collate on the CPU, check what the GPU part calls")
    args = parser.parse_args()
    args.gpu_memory_gb = args.gpu_memory_gb or plan.local_gpu_gib() or plan.DEFAULT_GPU_GIB
    if not args.dry_run and not args.datasets:
        parser.error("--datasets is needed on the GPU (the measured stages train on it)")
    if args.dry_run and not args.datasets:
        args.datasets = plan.PLACEHOLDERS["dataset_dir"]  # planned only: nothing reads it
    # The measured runs' outputs, removed at the end (each stage's is a whole model).
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        return run_checks(args, scratch)


def run_checks(args, scratch: str) -> int:
    """Every check in turn, each reported as it ends; returns 1 if any failed."""
    results: dict = {"gpu_memory_gib": round(args.gpu_memory_gb, 1)}
    failed = []

    def check(name: str, work):
        began = time.perf_counter()
        try:
            results[name] = work()
        except Exception:  # noqa: BLE001 - every check runs; the failure is reported with its traceback
            results[name] = {"error": traceback.format_exc(limit=3).strip().splitlines()[-1]}
            traceback.print_exc()
        if isinstance(results[name], dict) and (results[name].get("error") or results[name].get("ok") is False):
            failed.append(name)
        print(f"{name} ({time.perf_counter() - began:.0f} s): {json.dumps(results[name])}", flush=True)

    for stage, model, options in TRAINING:
        def measured(stage=stage, model=model, options=options):
            cfg = stage_config(stage, model, options, args, os.path.join(scratch, stage))
            planned = planned_trainer_gpu(stage, cfg, args.gpu_memory_gb)
            row = {"model": model, "planned_gib": round(planned / plan.GIB, 2)}
            if not args.dry_run:
                peak = measure_training(stage, cfg)
                row.update(measured_gib=round(peak / plan.GIB, 2), planned_over_measured=round(planned / peak, 2))
            return row
        check(f"plan vs peak: {stage}", measured)
    check("llava collate at the 7B recipe's settings", lambda: check_recipe_collate(args))
    if args.dry_run:
        for placement in ("colocate", "separate"):
            check(f"ppo {placement} (planned)", lambda p=placement: {
                "gpus_needed": plan.plan_stage("ppo", ppo_config(args, p, scratch), args.gpu_memory_gb,
                                               hints=False).gpus_needed})
        missing = [name for name in CALLED if not resolved(name)]
        check("everything the GPU part calls exists", lambda: {"missing": missing, "ok": not missing})
    else:
        for placement in ("colocate", "separate"):
            check(f"ppo {placement}", lambda p=placement: run_ppo(args, p, scratch))
    print(json.dumps({"failed": failed, **results}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
