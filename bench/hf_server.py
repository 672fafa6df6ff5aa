"""Benchmark-only baseline: the former `humor-ray serve`, a hand-written FastAPI server over Hugging Face
`generate` that answers one request at a time under a lock. The package serves models with Ray Serve and
vLLM (`humor_ray/serve.py`); this file stays only so that `bench/serve.py` can measure the new server
against it and `bench/judge.py` can give the judge client a server with simulated API latency.

    python bench/hf_server.py --model tiny --port 8011 [--latency_ms 200] [--threads 1]

Endpoints: `GET /v1/models` and `POST /v1/chat/completions` (messages with string content or text and
image parts, images unread; max_tokens or
max_completion_tokens, temperature (0 = greedy), top_p, seed, logprobs, top_logprobs; n must be 1 and
streaming is not supported). Errors use OpenAI's body, `{"error": {"message", "type", "param", "code"}}`;
an invalid request body answers 400, as OpenAI does (not FastAPI's 422).

Logprobs are the model's own log-probabilities (log-softmax of its raw logits, before temperature or
top-p), one entry per generated token; an end-of-sequence token is listed too although the content
leaves it out, so a `max_tokens=1` judge always sees the distribution of the first position.

Generation runs one request at a time under a lock (one model, one set of CPU cores), while the
simulated latency (`latency_ms`, a sleep per request) overlaps across concurrent requests, like a real
API's network and queueing time.

Testing aid: `fail_every=N` makes every Nth chat request answer `fail_status` (429 or 503) with
`Retry-After: 0`, so that clients' retries can be tested against a real server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Literal

import httpx
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import decoders
from transformers import GenerationConfig
from transformers.convert_slow_tokenizer import bytes_to_unicode

from humor_ray.config import UserError, field
from humor_ray.models import registry

DEFAULT_MAX_TOKENS = 64  # when a request names no limit (OpenAI's default, the context size, is too slow on CPU)
FAIL_STATUSES = (429, 503)


class Message(BaseModel):
    role: str
    # A string, or OpenAI's list of parts: text parts are read; image parts are left out (the served
    # models read text only), so an image protocol can still be exercised end to end.
    content: str | list[dict]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class ChatRequest(BaseModel):
    """The chat-completions fields this server honours; other OpenAI fields are accepted and ignored."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    n: int = Field(1, ge=1, le=1)
    stream: Literal[False] = False


@dataclasses.dataclass
class Generation:
    text: str
    logprobs: list[dict] | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class ChatModel:
    """A registry model and its tokenizer, turning chat messages into one completion."""

    def __init__(self, spec: str):
        self.name = spec
        self.model, self.tokenizer = registry.load_model(spec)
        self.model.eval()
        self.max_length = getattr(self.model.config, "max_position_embeddings", None)
        self.byte_decoder = _byte_decoder(self.tokenizer)
        self.stop_ids = _stop_ids(self.model, self.tokenizer)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The tokenizer's chat template when it has one, else `role: content` lines ending in
        `assistant:` (a base model continues that naturally)."""
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        return self.tokenizer(text)["input_ids"]

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, top_p: float,
                 top_logprobs: int | None, seed: int | None) -> Generation:
        """One completion; `top_logprobs=None` skips logprobs. Not thread-safe: callers serialise."""
        if seed is not None:
            torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} \
            if temperature > 0 else {"do_sample": False}
        # A whole GenerationConfig, not keyword arguments: then `generate` skips re-deriving one from the
        # model's config, which costs more than the tiny model's forward pass.
        config = GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                  eos_token_id=sorted(self.stop_ids), return_dict_in_generate=True,
                                  output_logits=top_logprobs is not None, **sampling)
        ids = torch.tensor([prompt_ids])
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        new_ids = out.sequences[0, len(prompt_ids):].tolist()
        stopped = bool(new_ids) and new_ids[-1] in self.stop_ids
        text_ids = new_ids[:-1] if stopped else new_ids
        logprobs = None
        if top_logprobs is not None:
            logprobs = [self._token_logprobs(token, step[0], top_logprobs)
                        for token, step in zip(new_ids, out.logits)]
        return Generation(text=self.tokenizer.decode(text_ids, skip_special_tokens=True), logprobs=logprobs,
                          prompt_tokens=len(prompt_ids), completion_tokens=len(new_ids),
                          finish_reason="stop" if stopped else "length")

    def _token_logprobs(self, token: int, logits: torch.Tensor, top: int) -> dict:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        values, indices = torch.topk(logprobs, top)
        return {**self._token_entry(token, logprobs[token].item()),
                "top_logprobs": [self._token_entry(i, v) for i, v in zip(indices.tolist(), values.tolist())]}

    def _token_entry(self, token: int, logprob: float) -> dict:
        text = self.tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": self._token_bytes(token, text)}

    def _token_bytes(self, token: int, text: str) -> list[int]:
        """The token's own bytes, as OpenAI gives them: for byte-level BPE a token can hold part of a
        UTF-8 character, which its decoded text shows only as U+FFFD."""
        raw = self.tokenizer.convert_ids_to_tokens(token)
        if self.byte_decoder is not None and all(char in self.byte_decoder for char in raw):
            return [self.byte_decoder[char] for char in raw]
        return list(text.encode("utf-8"))


def _stop_ids(model, tokenizer) -> set[int]:
    """The tokens `generate` stops at: the generation config's end-of-sequence ids (a chat model can
    have several, e.g. end-of-turn and end-of-text) and the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured) if isinstance(configured, list) else {configured}
    return {i for i in ids | {tokenizer.eos_token_id} if i is not None}


def _byte_decoder(tokenizer) -> dict[str, int] | None:
    """For a byte-level BPE tokenizer (GPT-2 style: tiny, SmolLM2, Llama 3), the map from the characters
    of its tokens back to bytes; None for other tokenizers."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.decoder, decoders.ByteLevel):
        return None
    return {char: byte for byte, char in bytes_to_unicode().items()}


def error_response(status: int, message: str, kind: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error body, which OpenAI clients turn into their error message."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(status_code=status, content=body, headers=headers)


def build_app(chat_model: ChatModel, latency_ms: float = 0, fail_every: int = 0,
              fail_status: int = 429) -> FastAPI:
    if fail_status not in FAIL_STATUSES:
        raise UserError(f"fail_status must be one of {FAIL_STATUSES}, got {fail_status}")
    app = FastAPI(title="humor_ray local OpenAI-compatible server")
    generation_lock = asyncio.Lock()
    counter = {"chat_requests": 0}

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(part) for part in e['loc'][1:]) or 'body'}: {e['msg']}"
                             for e in err.errors())
        return error_response(400, f"invalid request: {problems}", "invalid_request_error")

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": chat_model.name, "object": "model", "created": 0,
                                            "owned_by": "humor_ray"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest) -> JSONResponse:
        counter["chat_requests"] += 1
        if fail_every and counter["chat_requests"] % fail_every == 0:
            kind = "rate_limit_error" if fail_status == 429 else "server_error"
            return error_response(fail_status, f"injected failure (fail_every={fail_every})", kind,
                                  headers={"Retry-After": "0"})
        if body.top_logprobs is not None and not body.logprobs:
            return error_response(400, "top_logprobs requires logprobs=true", "invalid_request_error",
                                  "top_logprobs")
        prompt_ids = chat_model.prompt_ids([{"role": m.role, "content": m.text()} for m in body.messages])
        max_new = body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS
        if chat_model.max_length and len(prompt_ids) + max_new > chat_model.max_length:
            return error_response(400, f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_new}) exceeds "
                                  f"the model's context of {chat_model.max_length} tokens",
                                  "invalid_request_error", "messages")
        if latency_ms:
            await asyncio.sleep(latency_ms / 1000)
        top = (body.top_logprobs or 0) if body.logprobs else None
        async with generation_lock:
            result = await asyncio.to_thread(chat_model.generate, prompt_ids, max_new, body.temperature,
                                             body.top_p, top, body.seed)
        return JSONResponse(completion_body(chat_model.name, result))

    return app


def completion_body(model_name: str, result: Generation) -> dict:
    """A `chat.completion` object as OpenAI returns it."""
    logprobs = None if result.logprobs is None else {"content": result.logprobs, "refusal": None}
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text, "refusal": None},
                     "logprobs": logprobs, "finish_reason": result.finish_reason}],
        "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                  "total_tokens": result.prompt_tokens + result.completion_tokens},
    }


def _uvicorn_server(app: FastAPI, host: str, port: int) -> uvicorn.Server:
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))


def serve(model_spec: str, host: str = "127.0.0.1", port: int = 8011, latency_ms: float = 0,
          fail_every: int = 0, fail_status: int = 429, threads: int | None = None) -> None:
    """Serve `model_spec` until interrupted. `threads` sets torch's CPU threads (1 is fastest for the
    tiny model, whose steps are too small to split)."""
    if threads:
        torch.set_num_threads(threads)
    app = build_app(ChatModel(model_spec), latency_ms, fail_every, fail_status)
    print(f"serving {model_spec} at http://{host}:{port}/v1", file=sys.stderr, flush=True)
    _uvicorn_server(app, host, port).run()


@contextlib.contextmanager
def running_server(model: str = "tiny", latency_ms: float = 0, fail_every: int = 0, fail_status: int = 429,
                   threads: int | None = None, in_subprocess: bool = False,
                   ready_timeout: float = 300) -> Iterator[str]:
    """A server on a free local port for the duration of the block; yields its base URL (`.../v1`).
    In a thread by default (starts fastest, no second copy of torch); `in_subprocess=True` gives it its
    own process and GIL, like a real remote API, for benchmarks. In a thread, `threads` (torch's CPU
    threads) applies to the whole process until the block ends."""
    if in_subprocess:
        with _server_subprocess(model, latency_ms, fail_every, fail_status, threads, ready_timeout) as url:
            yield url
        return
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        app = build_app(ChatModel(model), latency_ms, fail_every, fail_status)
        with _server_thread(app, ready_timeout) as url:
            yield url
    finally:
        torch.set_num_threads(previous_threads)


@contextlib.contextmanager
def _server_thread(app: FastAPI, ready_timeout: float) -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # bound here and handed over: no race for the port
    server = _uvicorn_server(app, "127.0.0.1", sock.getsockname()[1])
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="humor-ray-serve")
    thread.start()
    try:
        deadline = time.monotonic() + ready_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise UserError("the local server did not start (see its log above)")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextlib.contextmanager
def _server_subprocess(model: str, latency_ms: float, fail_every: int, fail_status: int, threads: int | None,
                       ready_timeout: float) -> Iterator[str]:
    port = free_port()
    command = [sys.executable, __file__, "--model", model, "--port", str(port),
               "--latency_ms", str(latency_ms), "--fail_every", str(fail_every), "--fail_status", str(fail_status)]
    if threads:
        command += ["--threads", str(threads)]
    url = f"http://127.0.0.1:{port}/v1"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(url, process, log, ready_timeout)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(url: str, process: subprocess.Popen, log, timeout: float) -> None:
    """Polls `GET /v1/models` until it answers; a server that exits or hangs raises with its log's end."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    log.seek(0)
    tail = log.read().decode(errors="replace")[-2000:]
    raise UserError(f"the local server at {url} did not become ready within {timeout:.0f} s:\n{tail}")


def free_port() -> int:
    """A port free now (the OS's choice); a subprocess server binds it moments later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass
class ServeConfig:
    """A local OpenAI-compatible chat-completions server over a registry model."""
    model: str = field("tiny", "a registry spec: tiny, smollm2-135m, a directory, ...")
    host: str = field("127.0.0.1", "address to listen on")
    port: int = field(8011, "port to listen on")
    latency_ms: float = field(0.0, "simulated API latency per request (overlaps across concurrent requests)")
    fail_every: int = field(0, "testing aid: every Nth chat request fails with --fail_status (0: never)")
    fail_status: int = field(429, "testing aid: 429 or 503")
    threads: int | None = field(None, "torch CPU threads (default: torch's)")

    def __post_init__(self):
        if self.fail_status not in FAIL_STATUSES:
            raise ValueError(f"--fail_status must be one of {FAIL_STATUSES}")


def run(cfg: ServeConfig) -> None:
    serve(cfg.model, cfg.host, cfg.port, cfg.latency_ms, cfg.fail_every, cfg.fail_status, cfg.threads)


if __name__ == "__main__":
    from humor_ray.config import parse_config

    run(parse_config(ServeConfig, sys.argv[1:], "hf_server.py"))
