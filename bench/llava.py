"""LLaVA on CPU: training samples/s through the llava stage on Ray Train (1 worker) against plain
single-process TRL with the same trainer and data; then image-conditioned generation, vLLM against
Hugging Face `generate`, same model, cartoons, prompts and decoding. All in one run.

    cd bench && python llava.py --datasets DIR [--models tiny-llava smollm2-llava] [--steps 12] [--repeats 3]

Training figures are steady-state (from the log at step --warmup to the last step, start-up excluded);
generation figures are medians over --repeats after a warm-up call, engine start-up reported apart.
DIR holds the datasets of `humor-ray data build` with --images (llava_sft and prompts are used).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pds

from humor_ray.config import data_root
from humor_ray.train import llava
from humor_ray.train.launcher import as_dataset


def steady_samples_per_second(log_history: list[dict], warmup: int, batch: int) -> float:
    logs = [e for e in log_history if "loss" in e and "train_runtime" in e]
    first = next(e for e in logs if e["step"] >= warmup)
    last = logs[-1]
    return (last["step"] - first["step"]) * batch / (last["train_runtime"] - first["train_runtime"])


def config(args, model: str, output_dir: str) -> llava.Config:
    return llava.Config(output_dir=output_dir, dataset_dir=args.datasets, model_name=model, lora_r=16, lora_alpha=32,
                        max_steps=args.steps, logging_steps=1, save_steps=args.steps, do_eval=False,
                        per_device_train_batch_size=args.batch, max_length=256, max_failures=0, report_to=["none"],
                        cpus_per_worker=args.threads, images=args.images)


def train_on_ray(args, model: str) -> float:
    with tempfile.TemporaryDirectory(prefix="bench_llava_ray_") as out:
        llava.run(config(args, model, out))
        history = json.loads(Path(out, "metrics.json").read_text())["log_history"]
    return steady_samples_per_second(history, args.warmup, args.batch)


def train_plain(args, model: str) -> float:
    """What a user would write without Ray: read the Parquet, build the same TRL trainer, train."""
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_llava_plain_") as out:
        cfg = config(args, model, out)
        table = pds.dataset(os.path.join(args.datasets, "llava_sft", "train"), format="parquet").to_table(
            columns=list(llava.STAGE.columns))
        count = cfg.max_steps * cfg.per_device_train_batch_size
        rows = np.random.default_rng(cfg.seed).permutation(table.num_rows)[:count]
        trainer = llava.make_trainer(cfg, as_dataset(table.take(rows), list(llava.STAGE.columns)), None, out)
        trainer.train()
    return steady_samples_per_second(trainer.state.log_history, args.warmup, args.batch)


def generate_with(kind: str, model_dir: str, prompt: str, cartoons: list, args) -> dict:
    import ray

    from humor_ray.engines import Decoding, start_engines

    decoding = Decoding(max_new_tokens=args.max_new_tokens)
    started = time.perf_counter()
    engine, = start_engines(kind, model_dir, 1, num_cpus=args.threads, seed=0)
    ray.get(engine.version.remote())
    startup = time.perf_counter() - started
    prompts = [prompt] * len(cartoons)
    ray.get(engine.generate.remote(prompts[:1], 1, decoding, images=cartoons[:1]))  # warm-up
    rates = []
    for _ in range(args.repeats):
        began = time.perf_counter()
        samples = ray.get(engine.generate.remote(prompts, args.samples, decoding, images=cartoons))
        rates.append(len(samples) / (time.perf_counter() - began))
    ray.kill(engine)
    return {"startup_s": startup, "captions_per_s": statistics.median(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", required=True)
    parser.add_argument("--images", default=str(data_root() / "images"))
    parser.add_argument("--models", nargs="+", default=["tiny-llava", "smollm2-llava"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--contests", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=24)
    args = parser.parse_args()

    from humor_ray.cluster import init_ray
    from humor_ray.data.prompts import IMAGE_INSTRUCTION
    from humor_ray.models import registry
    from humor_ray.models.vision import chat_prompt, open_image

    init_ray(dashboard=True)
    training = {}
    for model in args.models:
        runs = [(train_plain(args, model), train_on_ray(args, model)) for _ in range(args.repeats)]
        training[model] = tuple(statistics.median(r[i] for r in runs) for i in (0, 1))
    names = pds.dataset(os.path.join(args.datasets, "prompts", "eval"), format="parquet").to_table(
        columns=["image"])["image"].to_pylist()
    cartoons = [open_image(args.images, name) for name in names if name][: args.contests]
    generation = {}
    for model in args.models:
        model_dir = registry.resolve(model)
        prompt = chat_prompt(registry.load_processor(model_dir), IMAGE_INSTRUCTION)
        generation[model] = {kind: generate_with(kind, model_dir, prompt, cartoons, args) for kind in ("hf", "vllm")}

    print(f"\nLLaVA SFT, LoRA r16, batch {args.batch}, {args.steps} steps, {args.threads} threads, steady state after "
          f"step {args.warmup}, median of {args.repeats}")
    print(f"{'model':<16}{'plain TRL samples/s':>21}{'Ray Train samples/s':>21}{'ratio':>8}")
    for model, (plain, ray_train) in training.items():
        print(f"{model:<16}{plain:>21.2f}{ray_train:>21.2f}{ray_train / plain:>8.2f}")
    print(f"\nGeneration with the cartoons: {len(cartoons)} contests x {args.samples} captions, <= "
          f"{args.max_new_tokens} tokens, median of {args.repeats}")
    print(f"{'model':<16}{'HF captions/s':>15}{'vLLM captions/s':>17}{'vLLM / HF':>11}{'start-up HF / vLLM s':>22}")
    for model, r in generation.items():
        hf, vllm = r["hf"], r["vllm"]
        print(f"{model:<16}{hf['captions_per_s']:>15.2f}{vllm['captions_per_s']:>17.2f}"
              f"{vllm['captions_per_s'] / hf['captions_per_s']:>11.2f}"
              f"{hf['startup_s']:>11.1f} / {vllm['startup_s']:.1f}")


if __name__ == "__main__":
    main()
