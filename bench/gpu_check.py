"""The GPU check, as one script for a machine with one NVIDIA GPU:
SFT and DPO a few steps on smollm2-135m and LLaVA SFT on smollm2-llava, each with 1 GPU worker under
ZeRO-3 (bf16), then a few PPO steps with the vLLM engine on the same GPU (colocated roles), then captions
with the cartoons from the LLaVA on vLLM; prints tokens/s, peak GPU memory (the device's, polled with
nvidia-smi), PPO's per-phase timings and the LLaVA's captions/s.

    python bench/gpu_check.py --datasets DIR [--steps 20] [--ppo_steps 5]

It needs `vllm==0.31.0` (the `vllm-gpu` extra) instead of the CPU wheel. DIR holds `humor-ray data build`
output with --images (sft_simple, pairs, prompts, llava_sft); the cartoons are read from $HUMOR_RAY_DATA/images.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path


class PeakGpuMemory:
    """The highest memory.used nvidia-smi reports while the block runs (MiB)."""

    def __enter__(self):
        self.peak, self.stop = 0, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.stop.wait(0.5):
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout.split()
            if out:
                self.peak = max(self.peak, max(int(v) for v in out))

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ppo_steps", type=int, default=5)
    args = parser.parse_args()

    from humor_ray.infer import generate
    from humor_ray.rl import ppo
    from humor_ray.train import dpo, llava, sft

    root = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    common = dict(dataset_dir=args.datasets, use_gpu=True, num_workers=1,
                  deepspeed="zero3", max_steps=args.steps, logging_steps=1, save_steps=args.steps,
                  eval_steps=args.steps, max_eval_examples=64, report_to=["none"], max_failures=0)
    rows = []
    smollm2 = "smollm2-135m"
    for name, module, extra in (
            ("sft", sft, dict(model_name=smollm2, simple_prompt=True, per_device_train_batch_size=16)),
            ("dpo", dpo, dict(model_name=smollm2, per_device_train_batch_size=8, lora_r=16)),
            ("llava", llava, dict(model_name="smollm2-llava", per_device_train_batch_size=16, lora_r=16,
                                  lora_alpha=32, mm_projector_lr=2e-4))):
        out = root / name
        began = time.perf_counter()
        with PeakGpuMemory() as memory:
            module.run(module.Config(output_dir=str(out), **common, **extra))
        logs = json.loads((out / "metrics.json").read_text())["log_history"]
        rates = [e["train_tokens_per_second"] for e in logs if "train_tokens_per_second" in e]
        rows.append((name, rates[-1] if rates else float("nan"), memory.peak, time.perf_counter() - began))
    out = root / "ppo"
    with PeakGpuMemory() as memory:
        ppo.run(ppo.Config(output_dir=str(out), dataset_dir=args.datasets, model_name="smollm2-135m",
                           reward_model="builtin:vowel_share", use_gpu=True, placement="colocate", engine="vllm",
                           max_steps=args.ppo_steps, save_steps=args.ppo_steps, report_to=["none"], max_failures=0))
    history = json.loads((out / "metrics.json").read_text())["history"][1:]
    captions = generate.run(generate.GenerateConfig(dataset_dir=args.datasets, output_dir=str(root / "llava_sft"),
                                                    model_name=str(root / "llava" / "final"), method="llava_sft",
                                                    engine="vllm", use_gpu=True, n=10, max_contests=16))
    print(f"\n{'stage':<6}{'tokens/s':>12}{'peak GPU MiB':>14}{'wall s':>9}")
    for name, rate, peak, wall in rows:
        print(f"{name:<6}{rate:>12.0f}{peak:>14}{wall:>9.0f}")
    print(f"ppo peak GPU memory {memory.peak} MiB; per-phase medians over steps 2..{args.ppo_steps}:")
    for phase in ("generate", "score", "reference", "train", "sync", "step"):
        print(f"  {phase:<10}{statistics.median(m[f'time/{phase}'] for m in history):8.3f} s")
    print(f"  logprob gap {max(m['logprob_gap'] for m in history):.2e}")
    print(f"llava_sft on vLLM with the cartoons: {captions['captions']} captions for {captions['contests']} contests "
          f"in {captions['seconds']} s ({captions['captions'] / captions['seconds']:.1f} captions/s, "
          "start-up included)")


if __name__ == "__main__":
    main()
