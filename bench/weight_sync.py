"""PPO's weight sync under LoRA: the merged full model against the adapter alone, same policy, same engine
kind, in one run.

    python bench/weight_sync.py [--model smollm2-135m] [--lora_r 16] [--syncs 5] [--engine vllm]

A LoRA policy (every linear layer adapted) is "updated" before each sync (its adapter weights change), then
synced as `humor-ray ppo` does (`ppo.policy_weights` on the trainer, `ray.put`, `EnginePool.sync` into one
engine actor): per sync the bytes sent, the trainer's extraction (the out-of-place merge, or the adapter's
tensors), the put into the object store, the engine's load, and their total; medians over --syncs after
one warm-up sync. After the last sync the engine samples greedily and the trainer recomputes the log-probs:
their mean gap shows the engine samples from the weights just sent.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

PROMPTS = ["scene: an office. description: a cat sits at a desk. funny caption:",
           "scene: a kitchen. description: a man talks to a fish in a bowl. funny caption:",
           "scene: a desert island. description: two castaways and a vending machine. funny caption:",
           "scene: a waiting room. description: a knight in armour holds a numbered ticket. funny caption:"]


def lora_policy(model_dir: str, rank: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                            lora_dropout=0.0, task_type="CAUSAL_LM")).eval()


def update(policy, seed: int) -> None:
    """A stand-in for a PPO update: new adapter weights."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)


def logprob_gap(policy, samples, pad_id: int) -> float:
    import torch

    from humor_ray.rl import ppo
    from humor_ray.rl.algorithms import masked_mean

    seqs = ppo._sequences(samples, pad_id, "cpu")
    with torch.no_grad():
        trainer = ppo._logprobs(policy, seqs, slice(None), 1.0, raw=True)[1]
    engine = torch.zeros_like(seqs.mask)
    for row, sample in enumerate(samples):
        engine[row, :len(sample.logprobs)] = torch.tensor(sample.logprobs)
    return masked_mean((trainer - engine).abs(), seqs.mask).item()


def measure(mode: str, policy, model_dir: str, pad_id: int, args) -> dict:
    import ray

    from humor_ray.engines import Decoding, EnginePool, start_engines
    from humor_ray.rl import ppo

    adapter = mode == "adapter"
    engine, = start_engines(args.engine, model_dir, 1, num_cpus=os.cpu_count() or 1,
                            max_lora_rank=args.lora_r if adapter else 0)
    pool = EnginePool([engine])
    runs = []
    for version in range(1, args.syncs + 2):  # the first sync warms up
        update(policy, version)
        began = time.perf_counter()
        weights = ppo.policy_weights(policy, adapter=adapter)
        extracted = time.perf_counter()
        ref = ray.put(weights)
        put = time.perf_counter()
        pool.sync(ref, version)
        loaded = time.perf_counter()
        runs.append({"bytes": weights.nbytes, "extract": extracted - began, "put": put - extracted,
                     "load": loaded - put, "total": loaded - began})
        del weights, ref
    samples = pool.generate(PROMPTS, 1, Decoding(temperature=0.0, max_new_tokens=12, stop_at_newline=False))
    result = {key: statistics.median(run[key] for run in runs[1:]) for key in runs[0]}
    result["gap"] = logprob_gap(policy, samples, pad_id)
    ray.kill(engine)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--syncs", type=int, default=5)
    parser.add_argument("--engine", default="vllm", choices=("vllm", "hf"))
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from humor_ray.cluster import init_ray
    from humor_ray.models import registry

    model_dir = registry.resolve(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    policy = lora_policy(model_dir, args.lora_r)
    init_ray()
    print(f"model {args.model} (fp32), LoRA r={args.lora_r} on every linear layer, {args.engine} engine, "
          f"{os.cpu_count()} cores, median of {args.syncs} syncs after a warm-up", flush=True)
    results = {mode: measure(mode, policy, model_dir, pad_id, args) for mode in ("full", "adapter")}
    print(f"\n{'sync':<9}{'MB/sync':>10}{'extract s':>11}{'put s':>9}{'load s':>9}{'total s':>9}{'logprob gap':>13}")
    for mode, r in results.items():
        print(f"{mode:<9}{r['bytes'] / 1e6:>10.2f}{r['extract']:>11.3f}{r['put']:>9.3f}{r['load']:>9.3f}"
              f"{r['total']:>9.3f}{r['gap']:>13.1e}")
    full, adapter = results["full"], results["adapter"]
    print(f"adapter / full: {adapter['bytes'] / full['bytes']:.2%} of the bytes, "
          f"{full['total'] / adapter['total']:.1f}x faster per sync", flush=True)


if __name__ == "__main__":
    main()
