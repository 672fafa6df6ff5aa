"""`humor-ray serve` with a replica that cannot start ends the command with one line. The test starts its own
server, so it lives outside tests/e2e/serving (whose shared server would otherwise be replaced: one Ray cluster
runs one Serve); the defaults are checked on that shared server, which is given no --max_model_len."""

from __future__ import annotations

import shutil
import time

import pytest

from humor_ray.config import UserError
from humor_ray.models import registry
from humor_ray.serve import ServeConfig, free_port, running_server


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
