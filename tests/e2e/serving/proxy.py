"""A test-only HTTP proxy in front of a real OpenAI-compatible server, injecting the faults a client must
survive: every Nth chat request answers `fail_status` (429 or 503, `Retry-After: 0`) without reaching the
server, and every request can wait `latency_ms` first (a remote API's network and queueing time)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def proxy_app(upstream: str, fail_every: int = 0, fail_status: int = 429, latency_ms: float = 0) -> Starlette:
    """`upstream` is the server's root (`http://host:port`); paths are forwarded unchanged."""
    assert fail_status in (429, 503), fail_status
    client = httpx.AsyncClient(base_url=upstream, timeout=300)
    chat_requests = 0

    async def forward(request: Request) -> Response:
        nonlocal chat_requests
        if latency_ms:
            await asyncio.sleep(latency_ms / 1000)
        if request.url.path.endswith("/chat/completions"):
            chat_requests += 1
            if fail_every and chat_requests % fail_every == 0:
                kind = "rate_limit_error" if fail_status == 429 else "server_error"
                return JSONResponse({"error": {"message": f"injected failure (fail_every={fail_every})",
                                               "type": kind, "param": None, "code": None}},
                                    status_code=fail_status, headers={"Retry-After": "0"})
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        answer = await client.request(request.method, request.url.path, content=await request.body(),
                                      headers=headers, params=request.query_params)
        return Response(answer.content, status_code=answer.status_code, media_type=answer.headers.get("content-type"))

    return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST"])])


@contextlib.contextmanager
def running_proxy(base_url: str, **faults) -> Iterator[str]:
    """The proxy in a thread on a free port for the block; takes and yields base URLs (`.../v1`)."""
    upstream = base_url.removesuffix("/v1")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # bound here and handed over: no race for the port
    server = uvicorn.Server(uvicorn.Config(proxy_app(upstream, **faults), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the proxy did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
