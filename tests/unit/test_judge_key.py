"""Where the judge client sends an API key: only over https or to loopback, OpenAI's own key only to OpenAI,
and no Authorization header at all to a server that needs none (checked on the wire, over real HTTP)."""

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
def recording_server():
    """A real HTTP server on loopback that records each request's Authorization header and answers a
    one-token chat completion."""
    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length") or 0))
            seen.append(self.headers.get("authorization"))
            body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                               "choices": [{"index": 0, "finish_reason": "length", "logprobs": None,
                                            "message": {"role": "assistant", "content": "A"}}],
                               "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

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


def test_on_the_wire_no_key_unless_one_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-must-not-leave")
    monkeypatch.setenv("HUMOR_RAY_TEST_KEY", KEY)
    request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    with recording_server() as (url, seen):
        JudgeClient(url, "m", tmp_path / "a").complete_many([request])
        JudgeClient(url, "m", tmp_path / "b", api_key_env="HUMOR_RAY_TEST_KEY").complete_many([request])
    assert seen == [None, f"Bearer {KEY}"]
