"""The judge client against the real OpenAI-compatible server (`humor-ray serve`: Ray Serve + vLLM, tiny
model, over HTTP, no mocks): order and logprobs, the cache, retries of 429/503s injected by a test proxy
in front of it, fast failure on a 400, the API key's secrecy, dry runs, and the figures the Ray dashboard gets."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from humor_ray.config import UserError
from humor_ray.eval.client import AnswerCache, JudgeClient
from humor_ray.metrics import StageMetrics

from .conftest import KEY_ENV, SERVER_KEY
from .proxy import running_proxy


@pytest.fixture(params=[429, 503])
def flaky_server(server, request):
    """Every second chat request fails with the parametrised status and Retry-After: 0."""
    with running_proxy(server, fail_every=2, fail_status=request.param) as base_url:
        yield base_url


def judge_request(text: str, max_tokens: int = 1, top: int = 3) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0,
            "logprobs": True, "top_logprobs": top}


def test_answers_come_back_in_request_order_with_logprobs(server, tmp_path):
    # Prompts grow with the index, so the prompt token counts reveal any reordering.
    requests = [judge_request("funny " * (i + 1), max_tokens=3) for i in range(24)]
    answers = JudgeClient(server, "tiny", tmp_path, concurrency=8, api_key_env=KEY_ENV).complete_many(requests)
    prompt_tokens = [a["usage"]["prompt_tokens"] for a in answers]
    assert prompt_tokens == sorted(prompt_tokens) and len(set(prompt_tokens)) == len(requests)
    for answer in answers:
        assert not answer["cached"] and isinstance(answer["content"], str)
        assert 1 <= len(answer["logprobs"]) <= 3
        assert answer["usage"]["completion_tokens"] == len(answer["logprobs"])
        for entry in answer["logprobs"]:
            assert len(entry["top_logprobs"]) == 3
            assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])  # greedy: the top token


def test_rerun_is_answered_from_the_cache(server, tmp_path):
    requests = [judge_request(f"caption {i}") for i in range(10)]
    first = JudgeClient(server, "tiny", tmp_path, concurrency=4, api_key_env=KEY_ENV)
    answers = first.complete_many(requests)
    assert first.stats.sent == 10 and first.stats.cache_hits == 0 and first.stats.completion_tokens == 10
    rerun = JudgeClient(server, "tiny", tmp_path, concurrency=4, api_key_env=KEY_ENV)
    again = rerun.complete_many(requests)
    assert rerun.stats.sent == 0 and rerun.stats.cache_hits == 10 and rerun.stats.completion_tokens == 0
    assert all(a["cached"] for a in again)
    assert [a["logprobs"] for a in again] == [a["logprobs"] for a in answers]


def test_injected_failures_are_retried(flaky_server, tmp_path):
    client = JudgeClient(flaky_server, "tiny", tmp_path, concurrency=4, api_key_env=KEY_ENV)
    answers = client.complete_many([judge_request(f"retry me {i}") for i in range(8)])
    assert len(answers) == 8 and all(a["logprobs"] for a in answers)
    # Arrivals alternate between failing and succeeding, so 8 successes took 7 or 8 failed attempts.
    assert client.stats.sent == 8 and client.stats.retries in (7, 8) and client.stats.failed == 0


def test_exhausted_retries_report_failures_and_a_rerun_resumes(flaky_server, tmp_path):
    requests = [judge_request(f"resume {i}") for i in range(2)]
    # Of any two consecutive requests to the server, exactly one fails; without retries it stays failed.
    with pytest.raises(UserError, match=r"1 of 2 requests .* failed after 0 retries .*rerun to resume"):
        JudgeClient(flaky_server, "tiny", tmp_path, concurrency=2, max_retries=0,
                    api_key_env=KEY_ENV).complete_many(requests)
    rerun = JudgeClient(flaky_server, "tiny", tmp_path, concurrency=2, max_retries=3, api_key_env=KEY_ENV)
    assert len(rerun.complete_many(requests)) == 2
    assert rerun.stats.sent == 1 and rerun.stats.cache_hits == 1


def test_bad_request_fails_fast_with_the_server_message(server, tmp_path):
    client = JudgeClient(server, "tiny", tmp_path, max_retries=6, api_key_env=KEY_ENV)
    began = time.monotonic()
    with pytest.raises(UserError, match=r"HTTP 400: .*max_tokens.*not retried"):
        client.complete_many([judge_request("fine"), {**judge_request("broken"), "max_tokens": 0}])
    assert time.monotonic() - began < 10 and client.stats.retries == 0


def test_api_key_never_reaches_cache_errors_or_repr(server, tmp_path):
    client = JudgeClient(server, "tiny", tmp_path, api_key_env=KEY_ENV)
    assert client._api_key == SERVER_KEY  # the key is really in use (the server refuses requests without it)
    client.complete_many([judge_request(f"secret {i}") for i in range(4)])
    with pytest.raises(UserError) as failure:
        client.complete_many([{**judge_request("broken"), "temperature": 9}])
    assert SERVER_KEY not in str(failure.value) and SERVER_KEY not in repr(client)
    files = [path for path in Path(tmp_path).rglob("*") if path.is_file()]
    assert files and not any(SERVER_KEY.encode() in path.read_bytes() for path in files)


def test_a_server_that_wants_a_key_gets_none_unless_named_and_says_so(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SERVER_KEY)  # OpenAI's variable goes to OpenAI alone, even to loopback
    with pytest.raises(UserError, match=r"HTTP 401: You didn't provide an API key.*--api_key_env"):
        JudgeClient(server, "tiny", tmp_path).complete_many([judge_request("who goes there")])


def test_the_cache_is_keyed_by_the_served_weights(server, tmp_path):
    """The fingerprint the server reports for its model is the hash of the weights it loaded, and the cache
    keys carry it."""
    from humor_ray.models import registry
    from humor_ray.serve import weights_fingerprint

    client = JudgeClient(server, "tiny", tmp_path, api_key_env=KEY_ENV)
    version = client.model_version()
    assert version == weights_fingerprint(registry.resolve("tiny"))
    request = judge_request("fingerprinted")
    client.complete_many([request])
    assert client.stats.sent == 1
    cache = AnswerCache(tmp_path)
    try:
        assert list(cache.get_many([client.cache_key(request, version)])) == [client.cache_key(request, version)]
        assert not cache.get_many([client.cache_key(request, "sha256:another-model")])
    finally:
        cache.close()


def test_remote_endpoint_without_key_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("HUMOR_RAY_NO_SUCH_KEY", raising=False)
    with pytest.raises(UserError, match="HUMOR_RAY_NO_SUCH_KEY"):
        JudgeClient("https://api.example.com/v1", "judge", tmp_path, api_key_env="HUMOR_RAY_NO_SUCH_KEY")


def test_dry_run_sends_nothing(server, tmp_path):
    requests = [judge_request(f"dry {i}", max_tokens=2) for i in range(5)]
    client = JudgeClient(server, "tiny", tmp_path, price_per_mtok_in=1.0, price_per_mtok_out=4.0, api_key_env=KEY_ENV)
    plan = client.dry_run(requests)
    assert client.stats.sent == 0
    assert plan["to_send"] == 5 and plan["cached"] == 0 and plan["max_completion_tokens"] == 10
    assert plan["est_prompt_tokens"] > 0 and plan["est_cost_usd"] == pytest.approx(
        (plan["est_prompt_tokens"] * 1.0 + 10 * 4.0) / 1e6)
    client.complete_many(requests[:3])
    assert client.dry_run(requests)["to_send"] == 2 and client.stats.sent == 3
    client.complete_many(requests)
    assert client.stats.sent == 5


def test_the_clients_figures_reach_the_ray_node_metrics_endpoint(server, tmp_path, ray_local):
    """Requests, retries, cache hits, tokens and cost as the Ray dashboard gets them (the node's Prometheus
    endpoint, scraped) equal the client's own counters."""
    from test_metrics import scrape, series

    with running_proxy(server, fail_every=2, fail_status=503) as flaky:
        client = JudgeClient(flaky, "tiny", tmp_path, concurrency=4, price_per_mtok_in=1.0, price_per_mtok_out=4.0,
                             api_key_env=KEY_ENV, figures=StageMetrics("judge-metrics", "judge"))
        requests = [judge_request(f"count me {i}", max_tokens=2) for i in range(6)]
        client.complete_many(requests)
        client.complete_many(requests[:4])  # answered from the cache
    stats = client.stats
    assert stats.retries > 0 and stats.cache_hits == 4
    expected = {"judge_requests": stats.sent, "judge_retries": stats.retries, "judge_cache_hits": stats.cache_hits,
                "judge_cost_usd": stats.cost_usd}
    port = next(node["MetricsExportPort"] for node in ray_local.nodes() if node["Alive"])
    run = {"run": "judge-metrics", "stage": "judge"}
    deadline = time.time() + 40  # a driver sends its figures to the node every few seconds
    while True:
        seen = scrape(port)
        exported = {name: sum(series(seen, f"humor_ray_{name}", **run)) for name in expected}
        tokens = {kind: sum(series(seen, "humor_ray_judge_tokens", kind=kind, **run))
                  for kind in ("prompt", "completion")}
        if exported == pytest.approx(expected) or time.time() > deadline:
            break
        time.sleep(2)
    assert exported == pytest.approx(expected)
    assert tokens == {"prompt": stats.prompt_tokens, "completion": stats.completion_tokens}
