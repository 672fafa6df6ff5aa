"""`humor-ray serve` coming up with its own defaults, and a replica that cannot start ending the command with
one line. Each test starts its own server, so they live outside tests/e2e/serving (whose shared server would
otherwise be replaced: one Ray cluster runs one Serve)."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest

from humor_ray.config import UserError
from humor_ray.models import registry
from humor_ray.serve import ServeConfig, free_port, running_server


def test_the_defaults_come_up_with_the_models_own_context(ray_local):
    cfg = ServeConfig(port=free_port())  # --model tiny: 512 positions
    assert cfg.model == "tiny" and cfg.max_model_len is None
    with running_server(cfg) as url:
        card, = httpx.get(f"{url}/models", timeout=60).json()["data"]
        assert card["id"] == "tiny" and card["metadata"]["max_request_context_length"] == 512
        # 300 prompt tokens + 200 to generate: beyond the old default's reach on this model, within its own.
        answer = httpx.post(f"{url}/completions", timeout=300, json={
            "model": "tiny", "prompt": [7] * 300, "max_tokens": 200, "temperature": 0, "ignore_eos": True})
        assert answer.status_code == 200, answer.text
        usage = answer.json()["usage"]
        # All 200 asked for: the paper's 32 tokens are a default for requests naming none, not a cap.
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (300, 200)


def test_a_replica_that_cannot_start_ends_the_command_with_one_line(ray_local, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(registry.resolve("tiny"), broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    began = time.monotonic()
    with pytest.raises(UserError) as failure:
        with running_server(ServeConfig(model=str(broken), port=free_port())):
            pass
    message = str(failure.value)
    print(f"\nended after {time.monotonic() - began:.0f} s: {message}")
    assert "\n" not in message and message.startswith("the server for http://127.0.0.1:")
    assert "did not start" in message
    assert time.monotonic() - began < 300
