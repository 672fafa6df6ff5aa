"""The server's limits over real HTTP: the API key (OpenAI's 401 bodies, the key never echoed nor logged), the
body cap (413, declared or chunked), and a bounded load test: a few hundred requests at once, some malformed,
most beyond the queue, each answered with its status, the server alive and unchanged afterwards."""

from __future__ import annotations

import asyncio
import collections
import statistics
import time
from pathlib import Path

import httpx
import pytest

from .conftest import MAX_BODY_MB, MAX_ONGOING, MAX_QUEUED, SERVER_KEY

WRONG_KEY = "sk-humorray-WRONGKEY-5f0a"
CHAT = [{"role": "user", "content": "A caption for a cartoon of a moose at a spa."}]


def chat(max_tokens: int = 2, **extra) -> dict:
    return {"model": "tiny", "messages": CHAT, "max_tokens": max_tokens, "temperature": 0, **extra}


# Named ids: the key stays out of the test report (and is drawn anew in each process, so ids holding it would
# differ from run to run).
@pytest.mark.parametrize("header", [None, "Bearer", f"Bearer {WRONG_KEY}", f"Basic {SERVER_KEY}", SERVER_KEY],
                         ids=["no-header", "scheme-alone", "wrong-key", "basic-scheme", "key-without-scheme"])
@pytest.mark.parametrize("method, path", [("GET", "/models"), ("POST", "/chat/completions")])
def test_without_the_key_openais_401(server, header, method, path):
    headers = {"Authorization": header} if header else {}
    answer = httpx.request(method, f"{server}{path}", json=chat(), headers=headers, timeout=60)
    error = answer.json()["error"]
    assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
    assert error["type"] == "invalid_request_error" and set(error) == {"message", "type", "param", "code"}
    assert error["code"] == ("invalid_api_key" if header == f"Bearer {WRONG_KEY}" else None)
    assert WRONG_KEY not in answer.text and SERVER_KEY not in answer.text


def test_a_body_over_the_cap_is_413_declared_or_chunked(server, auth):
    limit = int(MAX_BODY_MB * 1e6)
    image = "data:image/png;base64," + "A" * limit
    big = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "caption?"},
                                                      {"type": "image_url", "image_url": {"url": image}}]}])
    declared = httpx.post(f"{server}/chat/completions", json=big, headers=auth, timeout=60)
    payload = declared.request.content

    def chunks():
        for start in range(0, len(payload), 1 << 16):
            yield payload[start:start + (1 << 16)]

    chunked = httpx.post(f"{server}/chat/completions", content=chunks(), timeout=60,
                         headers={**auth, "Content-Type": "application/json"})
    assert "content-length" not in chunked.request.headers
    for answer in (declared, chunked):
        assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large"
        assert str(limit) in answer.json()["error"]["message"]


async def load(server: str, auth: dict, requests: list[tuple[str, dict, dict]]) -> list[tuple[str, int, float, dict]]:
    """Every request at once: (kind, status, seconds, headers) of each."""
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server, timeout=240, limits=limits) as client:
        async def one(kind: str, body: dict, options: dict):
            began = time.perf_counter()
            answer = await client.post("/chat/completions", headers={**auth, **options.pop("headers", {})},
                                       **({"json": body} if body is not None else {}), **options)
            return kind, answer.status_code, time.perf_counter() - began, answer

        return await asyncio.gather(*(one(kind, body, dict(options)) for kind, body, options in requests))


def test_bounded_load_every_request_answered_and_the_server_unharmed(server, auth, ray_local):
    from ray import serve
    from ray.serve.context import _get_global_client

    before = httpx.post(f"{server}/chat/completions", json=chat(max_tokens=4), headers=auth, timeout=120).json()
    oversized = "x" * int(MAX_BODY_MB * 1e6 + 1)
    requests = (
        [("valid", chat(max_tokens=4, seed=i), {}) for i in range(160)]
        + [("wrong key", chat(), {"headers": {"Authorization": f"Bearer {WRONG_KEY}"}})] * 30
        + [("not json", None, {"content": b"{\"model\": \"tiny\", \"messages\": [", "headers":
                               {"Content-Type": "application/json"}})] * 30
        + [("no messages", {"model": "tiny", "max_tokens": 2}, {})] * 30
        + [("unknown model", {**chat(), "model": "gpt-4o"}, {})] * 30
        + [("over the context", chat(messages=[{"role": "user", "content": "cat " * 400}], max_tokens=1), {})] * 30
        + [("too large", chat(messages=[{"role": "user", "content": oversized}]), {})] * 10
    )
    # Valid and over-context requests need an engine slot: beyond the slots and the queue they are refused 503.
    expected = {"valid": {200, 503}, "wrong key": {401}, "not json": {400}, "no messages": {400},
                "unknown model": {404}, "over the context": {400, 503}, "too large": {413}}
    began = time.perf_counter()
    results = asyncio.run(load(server, auth, requests))
    wall = time.perf_counter() - began

    counts = collections.Counter((kind, status) for kind, status, _, _ in results)
    print(f"\n{len(requests)} requests at once against {MAX_ONGOING} in flight + {MAX_QUEUED} queued, {wall:.1f} s")
    print(f"{'kind':<18}{'status':>7}{'count':>7}{'p50 s':>8}{'p95 s':>8}")
    for (kind, status), count in sorted(counts.items()):
        seconds = sorted(s for k, st, s, _ in results if (k, st) == (kind, status))
        p95 = seconds[max(0, round(0.95 * len(seconds)) - 1)]
        print(f"{kind:<18}{status:>7}{count:>7}{statistics.median(seconds):>8.2f}{p95:>8.2f}")

    for kind, status, _, answer in results:
        assert status in expected[kind], (kind, status, answer.text[:300])
        if status == 200:
            assert answer.json()["choices"]
        else:  # OpenAI's error body, whoever refused it
            assert {"message", "type"} <= set(answer.json()["error"])
        if status == 503:  # the queue was full: refused at once, told when to come back
            assert int(answer.headers["retry-after"]) >= 1 and "at capacity" in answer.json()["error"]["message"]
    valid = collections.Counter(status for kind, status, _, _ in results if kind == "valid")
    assert valid[200] >= MAX_ONGOING and valid[503] > 0  # some were served, the overflow was refused
    assert valid[200] + valid[503] == 160

    # Alive and unchanged: the same greedy answer, every deployment healthy, the key in no log.
    after = httpx.post(f"{server}/chat/completions", json=chat(max_tokens=4), headers=auth, timeout=120).json()
    assert after["choices"][0]["message"]["content"] == before["choices"][0]["message"]["content"]
    status = serve.status().applications["humor-ray"]
    assert status.status == "RUNNING"
    assert _get_global_client().http_config.request_timeout_s == 300  # --request_timeout_s's default
    assert all(deployment.status == "HEALTHY" for deployment in status.deployments.values())
    logs = [path.read_bytes() for path in Path(ray_local._private.worker._global_node.get_logs_dir_path()).rglob("*")
            if path.is_file()]
    assert any(b"POST /v1/chat/completions 401" in log for log in logs)  # the access log of these requests is here
    assert not any(SERVER_KEY.encode() in log or WRONG_KEY.encode() in log for log in logs)
