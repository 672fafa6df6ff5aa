"""Where the judge client sends an API key: only over https or to loopback, OpenAI's own key only to OpenAI,
and no Authorization header at all to a server that needs none (checked on the wire, over real HTTP); and
its cache told apart by the weights fingerprint an endpoint reports for the model."""

from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from humor_ray.config import UserError
from humor_ray.eval.client import JudgeClient, api_key_for, is_loopback

KEY = "sk-humorray-KEYCHECK-41d2"


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST", "127.0.0.1", "127.1", "127.0.1", "127.255.255.254",
                                  "2130706433", "0x7f000001", "0x7f.1", "0177.0.0.1", "::1", "[::1]",
                                  "0:0:0:0:0:0:0:1", "::ffff:127.0.0.1"])
def test_loopback_in_any_spelling(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["10.0.0.1", "0.0.0.0", "128.0.0.1", "8.8.8.8", "::", "::2", "example.com",
                                  "localhost.example.com", "127.0.0.1.example.com", "0xdeadbeef", "1.2.3.4.5",
                                  "api.openai.com", ""])
def test_anything_else_is_not_loopback(host):
    assert not is_loopback(host)


@pytest.mark.parametrize("url", ["http://HOST:8000/v1", "http://10.1.2.3:8000/v1", "http://gpu-node/v1"])
def test_a_named_key_is_never_sent_in_clear_text(url, monkeypatch):
    monkeypatch.setenv("HUMOR_RAY_TEST_KEY", KEY)
    with pytest.raises(UserError, match="clear text: use an https URL") as refused:
        api_key_for(url, "HUMOR_RAY_TEST_KEY")
    assert KEY not in str(refused.value)


@pytest.mark.parametrize("url", ["https://judge.example.com/v1", "http://127.1:8000/v1", "http://[::1]:8000/v1",
                                 "http://localhost:8000/v1", "http://2130706433:8000/v1"])
def test_a_named_key_goes_over_https_or_to_loopback(url, monkeypatch):
    monkeypatch.setenv("HUMOR_RAY_TEST_KEY", KEY)
    assert api_key_for(url, "HUMOR_RAY_TEST_KEY") == KEY


@pytest.mark.parametrize("url", ["http://HOST:8000/v1", "http://127.1:8000/v1", "https://judge.example.com/v1",
                                 "https://api.openai.com.example.com/v1"])
def test_openais_key_goes_to_openai_alone(url, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert api_key_for(url, None) is None


def test_openais_key_goes_to_openai(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert api_key_for("https://api.openai.com/v1", None) == KEY
    with pytest.raises(UserError, match="clear text"):
        api_key_for("http://api.openai.com/v1", None)
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(UserError, match="OPENAI_API_KEY"):
        api_key_for("https://api.openai.com/v1", None)


def test_a_named_variable_must_hold_a_key(monkeypatch):
    monkeypatch.delenv("HUMOR_RAY_NO_SUCH_KEY", raising=False)
    with pytest.raises(UserError, match="HUMOR_RAY_NO_SUCH_KEY"):
        api_key_for("http://127.0.0.1:8000/v1", "HUMOR_RAY_NO_SUCH_KEY")


@contextlib.contextmanager
def recording_server(fingerprint: list[str | None]):
    """A real HTTP server on loopback, an OpenAI-compatible endpoint in miniature: it records each request's
    Authorization header, lists the model "m" with `fingerprint[0]` as its weights fingerprint (no model list
    at all when that is None), and answers every chat completion with one token."""
    seen: list[tuple[str, str | None]] = []

    class Handler(BaseHTTPRequestHandler):
        def answer(self, status: int, payload: dict):
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            seen.append(("GET", self.headers.get("authorization")))
            if fingerprint[0] is None:
                return self.answer(404, {"error": {"message": "no such route", "type": "x", "param": None,
                                                   "code": None}})
            self.answer(200, {"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "me",
                                                          "metadata": {"weights_fingerprint": fingerprint[0]}}]})

        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length") or 0))
            seen.append(("POST", self.headers.get("authorization")))
            self.answer(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                              "choices": [{"index": 0, "finish_reason": "length", "logprobs": None,
                                           "message": {"role": "assistant", "content": "A"}}],
                              "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.1:{server.server_port}/v1", seen
    finally:
        server.shutdown()
        server.server_close()


REQUEST = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def test_on_the_wire_no_key_unless_one_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-must-not-leave")
    monkeypatch.setenv("HUMOR_RAY_TEST_KEY", KEY)
    with recording_server(["sha256:1"]) as (url, seen):
        JudgeClient(url, "m", tmp_path / "a").complete_many([REQUEST])
        JudgeClient(url, "m", tmp_path / "b", api_key_env="HUMOR_RAY_TEST_KEY").complete_many([REQUEST])
    assert seen == [("GET", None), ("POST", None), ("GET", f"Bearer {KEY}"), ("POST", f"Bearer {KEY}")]


def test_a_retrained_model_under_the_same_name_is_not_answered_from_the_cache(tmp_path):
    fingerprint = ["sha256:first"]
    with recording_server(fingerprint) as (url, _):
        def sent() -> int:
            client = JudgeClient(url, "m", tmp_path)
            client.complete_many([REQUEST])
            return client.stats.sent

        assert [sent(), sent()] == [1, 0]
        fingerprint[0] = "sha256:retrained"
        assert [sent(), sent()] == [1, 0]
        assert JudgeClient(url, "m", tmp_path).dry_run([REQUEST])["cached"] == 1
        fingerprint[0] = None  # an endpoint without a model list: keyed by the name alone, as before
        assert [sent(), sent()] == [1, 0]
