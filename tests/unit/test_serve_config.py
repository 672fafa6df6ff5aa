"""`humor-ray serve`'s options checked before anything starts (no Ray here): the context against the model's
positions, a key before listening beyond loopback, the limits; and the weights fingerprint of a retrained
model saved in the same folder."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from humor_ray.config import ConfigError
from humor_ray.models import registry
from humor_ray.serve import ServeConfig, weights_fingerprint


def test_the_context_defaults_to_the_models_own_and_a_longer_one_is_refused():
    assert ServeConfig().model == "tiny" and ServeConfig().max_model_len is None
    assert ServeConfig(model="tiny").context() == 512
    assert ServeConfig(model="tiny", max_model_len=256).context() == 256
    with pytest.raises(ConfigError, match="--max_model_len 2048: tiny holds at most 512 tokens"):
        ServeConfig(model="tiny", max_model_len=2048)
    with pytest.raises(ConfigError, match="--max_model_len 0"):
        ServeConfig(model="tiny", max_model_len=0)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "node-1.cluster"])
def test_listening_beyond_loopback_needs_a_key_or_insecure(host, monkeypatch):
    with pytest.raises(ConfigError, match=f"--host {host} lets other machines reach the server"):
        ServeConfig(host=host)
    assert ServeConfig(host=host, insecure=True).api_key() is None
    monkeypatch.delenv("HUMOR_RAY_TEST_SERVE_KEY", raising=False)
    with pytest.raises(ConfigError, match="--api_key_env HUMOR_RAY_TEST_SERVE_KEY: the environment variable is unset"):
        ServeConfig(host=host, api_key_env="HUMOR_RAY_TEST_SERVE_KEY")
    monkeypatch.setenv("HUMOR_RAY_TEST_SERVE_KEY", "k3y")
    cfg = ServeConfig(host=host, api_key_env="HUMOR_RAY_TEST_SERVE_KEY")
    assert cfg.api_key() == "k3y" and "k3y" not in repr(cfg)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_needs_no_key(host):
    assert ServeConfig(host=host).api_key() is None


@pytest.mark.parametrize("options, message", [
    ({"max_queued_requests": 0}, "--max_queued_requests must be >= 1"),
    ({"max_ongoing_requests": 0}, "--max_ongoing_requests must be >= 1"),
    ({"request_timeout_s": 0}, "--request_timeout_s and --max_body_mb must be > 0"),
    ({"autoscale": "1:4", "target_ongoing_requests": 80, "max_ongoing_requests": 64}, "never reach it"),
])
def test_limits_are_checked(options, message):
    with pytest.raises(ConfigError, match=message):
        ServeConfig(**options)


def test_a_retrained_model_in_the_same_folder_has_another_fingerprint(tmp_path):
    folder = tmp_path / "sft" / "final"
    shutil.copytree(registry.resolve("tiny"), folder)
    first = weights_fingerprint(str(folder))
    assert weights_fingerprint(str(folder)) == first == weights_fingerprint(registry.resolve("tiny"))
    weights = load_file(folder / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3 * torch.ones_like(weights[name])  # one more training step, as it were
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert weights_fingerprint(str(folder)) != first
    assert ServeConfig(model=str(folder)).model_id() == "sft"  # served under the same name as before
