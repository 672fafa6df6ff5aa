"""One `humor-ray serve` for the tests in this folder (starting vLLM costs about 40 s on two cores): the tiny
model plus a LoRA adapter saved as a training run's `final/`, behind an API key, with small limits (4 requests
in flight, 8 queued, 1 MB bodies) that a test can reach, and the context left to its default (the model's
own). The folder is a package so that the server stops after its last test, not at the end of the session."""

from __future__ import annotations

import secrets

import pytest
import torch

from humor_ray.serve import ServeConfig, free_port, running_server

CONTEXT = 512  # the tiny model's own positions: the server is given no --max_model_len
MAX_ONGOING, MAX_QUEUED, MAX_BODY_MB = 4, 8, 1.0
KEY_ENV = "HUMOR_RAY_SERVE_TEST_KEY"
SERVER_KEY = f"sk-humorray-LEAKCHECK-{secrets.token_hex(8)}"


@pytest.fixture(scope="package")
def adapter_run(tmp_path_factory):
    """A LoRA adapter on the tiny model as `sft` leaves it (`RUN/final/`), with weights far from zero
    so that its answers differ from the base model's."""
    from peft import LoraConfig, get_peft_model

    from humor_ray.models import registry

    model, _ = registry.load_model("tiny")
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, weight in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=0.5)
    final = tmp_path_factory.mktemp("sft-lora") / "final"
    peft.save_pretrained(final)
    return final


@pytest.fixture(scope="package")
def server(ray_local, adapter_run):
    """The base URL (`.../v1`) of the running server; its key is in $HUMOR_RAY_SERVE_TEST_KEY meanwhile."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv(KEY_ENV, SERVER_KEY)
        cfg = ServeConfig(model="tiny", lora=[str(adapter_run)], port=free_port(),
                          api_key_env=KEY_ENV, max_ongoing_requests=MAX_ONGOING, max_queued_requests=MAX_QUEUED,
                          max_body_mb=MAX_BODY_MB)
        with running_server(cfg) as base_url:
            yield base_url


@pytest.fixture(scope="package")
def auth() -> dict:
    """The header every request to the server needs."""
    return {"Authorization": f"Bearer {SERVER_KEY}"}
