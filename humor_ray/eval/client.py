"""A batch client for any OpenAI-compatible chat-completions endpoint, built for LLM-judge workloads:
thousands of short requests, bounded concurrency, retries that respect rate limits, and a persistent
cache so that a crashed or interrupted run resumes where it stopped and a rerun costs nothing.

    client = JudgeClient("https://api.openai.com/v1", "gpt-4o-mini", "runs/judge_cache",
                         price_per_mtok_in=0.15, price_per_mtok_out=0.6)
    client.dry_run(requests)               # what it would send and cost; sends nothing
    answers = client.complete_many(requests)

A request is a chat-completions body without `model` (messages, max_tokens, temperature, logprobs,
top_logprobs, ...), sent as given. Identical requests in one batch are sent once (the cache would
answer the repeats anyway); give them distinct `seed`s to draw distinct samples.

The API key comes only from an environment variable and is never logged, cached or put in an error
message. It travels only where nothing can read it on the way: over https, or to a loopback address
(127.0.0.0/8 in any spelling, ::1, localhost). `api_key_env` names the variable; without it the client
sends `$OPENAI_API_KEY` to OpenAI's own API (https://api.openai.com) and no key anywhere else (a local
`humor-ray serve` needs none unless started with `--api_key_env`).

The cache is one SQLite file, `cache_dir/answers.sqlite` (WAL mode), keyed by a hash of (base URL,
model, the model's weights fingerprint where the endpoint reports one, canonical JSON of the request);
each answer is committed as it arrives. The fingerprint (`humor-ray serve` reports it in `/v1/models`)
keeps a model retrained and served again under the same name from getting the old model's answers.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import email.utils
import hashlib
import json
import os
import ipaddress
import random
import re
import socket
import sqlite3
import sys
import time
import urllib.parse
from collections.abc import Iterable
from pathlib import Path

import openai
from tqdm import tqdm

from humor_ray.config import UserError
from humor_ray.log import get_logger
from humor_ray.metrics import StageMetrics

log = get_logger("judge client")

OPENAI_HOST = "api.openai.com"
OPENAI_KEY_ENV = "OPENAI_API_KEY"
# The OpenAI client insists on a key; requests to a server that needs none omit the header it would carry.
NO_KEY_PLACEHOLDER = "unused"
# The spellings the C resolver reads as an IPv4 address: 127.1, 0x7f.1, 2130706433, 0177.0.0.1 ...
IPV4_SPELLING = re.compile(r"[0-9a-fA-FxX.]+")
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
RETRY_AFTER_MAX_S = 120.0
# Token estimate for dry runs (tiktoken needs a download for its encodings, which offline machines
# lack): about 4 characters per token for English, plus OpenAI's framing of ~4 tokens per message and
# 3 for the reply's priming.
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
TOKENS_PER_REPLY = 3


@dataclasses.dataclass
class ClientStats:
    """Counters over the client's lifetime. `sent` counts each request once however many attempts it
    took; `retries` counts the extra attempts. Tokens and cost cover fresh answers only (cache hits
    cost nothing)."""
    sent: int = 0
    cache_hits: int = 0
    retries: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


class AnswerCache:
    """Answers by request key in SQLite. WAL mode lets several processes share the file (readers never
    block the writer); autocommit makes every answer durable the moment it is written, so a crash
    loses at most the requests in flight."""

    def __init__(self, cache_dir: str | Path):
        folder = Path(cache_dir).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(folder / "answers.sqlite", timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # durable against a process crash, cheap per commit
        self.db.execute("CREATE TABLE IF NOT EXISTS answers "
                        "(key TEXT PRIMARY KEY, answer TEXT NOT NULL, created REAL NOT NULL)")

    def get_many(self, keys: Iterable[str]) -> dict[str, dict]:
        keys = list(keys)
        found: dict[str, dict] = {}
        for start in range(0, len(keys), 500):  # SQLite caps the number of query parameters
            chunk = keys[start:start + 500]
            rows = self.db.execute(f"SELECT key, answer FROM answers WHERE key IN ({','.join('?' * len(chunk))})",
                                   chunk)
            found.update((key, json.loads(answer)) for key, answer in rows)
        return found

    def put(self, key: str, answer: dict) -> None:
        self.db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?)", (key, json.dumps(answer), time.time()))

    def close(self) -> None:
        self.db.close()


class TransientError(Exception):
    """A failure worth retrying (429, 408, 5xx, timeout, lost connection); its message is safe to show."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class RejectedError(Exception):
    """A request the server refuses (a 4xx other than 408/429): retrying cannot help."""


class JudgeClient:
    """Sends many chat-completion requests concurrently, with retries and a persistent cache."""

    def __init__(self, base_url: str, model: str, cache_dir: str | Path, concurrency: int = 16,
                 max_retries: int = 6, timeout: float = 60, price_per_mtok_in: float = 0.0,
                 price_per_mtok_out: float = 0.0, api_key_env: str | None = None,
                 figures: StageMetrics | None = None):
        if concurrency < 1 or max_retries < 0:
            raise UserError(f"concurrency must be >= 1 and max_retries >= 0 (got {concurrency}, {max_retries})")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.cache_dir = Path(cache_dir).expanduser()
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout = timeout
        self.price_per_mtok_in = price_per_mtok_in
        self.price_per_mtok_out = price_per_mtok_out
        self._api_key = api_key_for(self.base_url, api_key_env)  # None: the request carries no key
        self.stats = ClientStats()
        # The same counters for the Ray dashboard (exported only inside a Ray driver or worker).
        self.figures = figures or StageMetrics(model, "judge")

    def __repr__(self) -> str:
        return (f"JudgeClient(base_url={self.base_url!r}, model={self.model!r}, "
                f"cache_dir={str(self.cache_dir)!r}, concurrency={self.concurrency})")

    def cache_key(self, request: dict, model_version: str | None = None) -> str:
        identity = {"base_url": self.base_url, "model": self.model, "request": request}
        if model_version is not None:  # endpoints reporting none keep the keys they always had
            identity["model_version"] = model_version
        canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def model_version(self) -> str | None:
        """The weights fingerprint the endpoint reports for the model in `/v1/models` (the card's
        `metadata.weights_fingerprint`, as `humor-ray serve` gives it), or None where it reports none.
        Read once per batch: free, and a dry run needs it to know what is cached."""
        client = openai.OpenAI(base_url=self.base_url, api_key=self._api_key or NO_KEY_PLACEHOLDER, max_retries=2,
                               timeout=self.timeout)
        try:
            cards = client.models.list(extra_headers=self._auth_headers()).data
        except openai.NotFoundError:  # an endpoint without a model list
            return None
        except openai.APIStatusError as err:
            message = self._redact(f"{self.base_url}/models answered HTTP {err.status_code}: {server_message(err)}")
            if err.status_code == 401 and self._api_key is None:
                message += " (the server wants a key: name its environment variable with --api_key_env)"
            raise UserError(message) from None
        except openai.APIConnectionError as err:
            cause = f": {err.__cause__}" if err.__cause__ else ""
            raise UserError(self._redact(f"cannot reach {self.base_url}{cause}")) from None
        finally:
            client.close()
        for card in cards:
            metadata = getattr(card, "metadata", None)
            if card.id == self.model and isinstance(metadata, dict):
                return metadata.get("weights_fingerprint")
        return None

    def complete_many(self, requests: list[dict]) -> list[dict]:
        """One answer per request, in request order: {"content", "logprobs", "usage", "cached"}.
        Raises UserError at once on a request the server rejects (a 4xx other than 408/429), or after
        all requests have run if some still failed after `max_retries` retries; either way, every
        answer received so far is cached, so a rerun resumes."""
        checked = [validated(request) for request in requests]
        version = self.model_version()
        keys = [self.cache_key(request, version) for request in checked]
        cache = AnswerCache(self.cache_dir)
        try:
            answers = {key: {**answer, "cached": True} for key, answer in cache.get_many(set(keys)).items()}
            hits = sum(key in answers for key in keys)
            self.stats.cache_hits += hits
            self.figures.count("judge_cache_hits", hits, "requests answered from the cache")
            pending = {key: request for key, request in zip(keys, requests) if key not in answers}
            if pending:
                asyncio.run(self._send_all(pending, keys, answers, cache))
        finally:
            cache.close()
        return [dict(answers[key]) for key in keys]

    def dry_run(self, requests: list[dict]) -> dict:
        """What `complete_many(requests)` would send and cost, sending no request (it reads the endpoint's
        model list for the model's fingerprint). Prompt tokens
        are estimated (characters / 4 plus per-message framing); completion tokens are the requests'
        max_tokens, an upper bound (requests without a limit count 0)."""
        checked = [validated(request) for request in requests]
        version = self.model_version()
        keys = [self.cache_key(request, version) for request in checked]
        cache = AnswerCache(self.cache_dir)
        try:
            cached = cache.get_many(set(keys))
        finally:
            cache.close()
        pending = {key: request for key, request in zip(keys, requests) if key not in cached}
        prompt_tokens = sum(estimate_prompt_tokens(request) for request in pending.values())
        max_completion = sum(request.get("max_completion_tokens") or request.get("max_tokens") or 0
                             for request in pending.values())
        summary = {"requests": len(requests), "cached": sum(key in cached for key in keys),
                   "to_send": len(pending), "est_prompt_tokens": prompt_tokens,
                   "max_completion_tokens": max_completion,
                   "est_cost_usd": self._cost(prompt_tokens, max_completion)}
        log.info(f"dry run against {self.base_url} ({self.model}): {summary['to_send']} of {len(requests)} "
                 f"requests to send ({summary['cached']} cached), ~{prompt_tokens} prompt tokens, <= "
                 f"{max_completion} completion tokens, <= ${summary['est_cost_usd']:.4f}")
        return summary

    def _cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.price_per_mtok_in + completion_tokens * self.price_per_mtok_out) / 1e6

    async def _send_all(self, pending: dict[str, dict], keys: list[str], answers: dict[str, dict],
                        cache: AnswerCache) -> None:
        """Sends the pending requests, storing each answer in `answers` and the cache as it arrives."""
        positions = collections.Counter(key for key in keys if key in pending)
        semaphore = asyncio.Semaphore(self.concurrency)
        bar = tqdm(total=len(keys), initial=len(keys) - sum(positions.values()), unit="req", file=sys.stderr,
                   desc=f"{self.model}", dynamic_ncols=True)
        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self._api_key or NO_KEY_PLACEHOLDER,
                                    max_retries=0, timeout=self.timeout)

        async def answer(key: str, request: dict) -> str | None:
            async with semaphore:
                try:
                    result = await self._send_with_retries(client, request)
                except TransientError as err:
                    self.stats.failed += 1
                    self.figures.count("judge_failed", 1, "requests still failing after every retry")
                    return str(err)
            cache.put(key, result)
            answers[key] = {**result, "cached": False}
            bar.update(positions[key])
            return None

        tasks = [asyncio.create_task(answer(key, request)) for key, request in pending.items()]
        try:
            failures = [error for error in await asyncio.gather(*tasks) if error is not None]
        except RejectedError as err:  # retrying cannot help: the batch stops here
            raise UserError(f"{err} (not retried; the {len(answers)} answered so far are cached)") from None
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()
            bar.close()
        if failures:
            raise UserError(f"{len(failures)} of {len(pending)} requests to {self.base_url} failed after "
                            f"{self.max_retries} retries (last error: {failures[-1]}); the {len(answers)} "
                            "answered are cached: rerun to resume")

    async def _send_with_retries(self, client: openai.AsyncOpenAI, request: dict) -> dict:
        """The answer to one request, retrying transient failures after the server's Retry-After or an
        exponential backoff with full jitter. The caller's concurrency slot is held while waiting, so a
        rate-limited batch slows down as a whole instead of refilling the slot at once."""
        self.stats.sent += 1
        self.figures.count("judge_requests", 1, "requests sent to the judge (once however many attempts)")
        attempt = 0
        while True:
            try:
                result = parse_completion(await self._create(client, request))
            except TransientError as err:
                if attempt == self.max_retries:
                    raise
                attempt += 1
                self.stats.retries += 1
                self.figures.count("judge_retries", 1, "extra attempts after a transient failure")
                backoff = random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** attempt))
                await asyncio.sleep(backoff if err.retry_after is None else err.retry_after)
                continue
            usage = result["usage"]
            self.stats.prompt_tokens += usage["prompt_tokens"]
            self.stats.completion_tokens += usage["completion_tokens"]
            self.stats.cost_usd += self._cost(usage["prompt_tokens"], usage["completion_tokens"])
            for kind in ("prompt", "completion"):
                self.figures.count("judge_tokens", usage[f"{kind}_tokens"], "tokens of fresh answers", kind=kind)
            self.figures.count("judge_cost_usd", self._cost(usage["prompt_tokens"], usage["completion_tokens"]),
                               "cost of fresh answers, at the given prices")
            return result

    async def _create(self, client: openai.AsyncOpenAI, request: dict):
        """One attempt; failures become TransientError or RejectedError, with messages free of the key."""
        body = {name: value for name, value in request.items() if name != "messages"}
        try:
            return await client.chat.completions.create(model=self.model, messages=request["messages"],
                                                        extra_body=body, extra_headers=self._auth_headers())
        except openai.APITimeoutError:
            raise TransientError(f"timed out after {self.timeout:g} s") from None
        except openai.APIConnectionError as err:
            cause = f": {err.__cause__}" if err.__cause__ else ""
            raise TransientError(self._redact(f"cannot connect to {self.base_url}{cause}")) from None
        except openai.APIStatusError as err:
            status = err.status_code
            message = self._redact(f"{self.base_url} answered HTTP {status}: {server_message(err)}")
            if status == 401 and self._api_key is None:
                message += " (the server wants a key: name its environment variable with --api_key_env)"
            if status in (408, 429) or status >= 500:
                raise TransientError(message, retry_after_seconds(err.response.headers)) from None
            raise RejectedError(message) from None

    def _auth_headers(self) -> dict:
        """Without a key, no Authorization header at all (not even a placeholder)."""
        return {} if self._api_key else {"Authorization": openai.Omit()}

    def _redact(self, text: str) -> str:
        """Servers sometimes quote the key they were given (e.g. in a 401); never pass it on."""
        return text.replace(self._api_key, "***") if self._api_key else text


def api_key_for(base_url: str, api_key_env: str | None) -> str | None:
    """The key to send to `base_url`, or None to send none. A named variable must hold a key, and it
    goes only over https or to a loopback address; unnamed, `$OPENAI_API_KEY` goes to OpenAI's API
    alone."""
    parts = urllib.parse.urlsplit(base_url)
    host = parts.hostname or ""
    if api_key_env is None:
        if host != OPENAI_HOST:
            return None  # never OpenAI's key to anyone else
        api_key_env = OPENAI_KEY_ENV
    key = os.environ.get(api_key_env, "")
    if not key:
        raise UserError(f"no API key for {base_url}: set the environment variable {api_key_env}")
    if parts.scheme != "https" and not is_loopback(host):
        raise UserError(f"refusing to send the key in {api_key_env} to {base_url} in clear text: use an https "
                        "URL (or a loopback address for a server on this machine)")
    return key


def is_loopback(host: str) -> bool:
    """Whether a URL's host is this machine's loopback: `localhost`, an IPv6 loopback (also IPv4-mapped)
    or an IPv4 address in 127.0.0.0/8 written any way the system resolver accepts (127.1, 0x7f000001,
    2130706433). Other names are not resolved: a DNS answer could change between check and connection."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not IPV4_SPELLING.fullmatch(host):
            return False
        try:
            address = ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def validated(request: dict) -> dict:
    if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
        raise UserError("each request must be a dict with a `messages` list (a chat-completions body)")
    if "model" in request:
        raise UserError("requests must not name a `model`: the JudgeClient's model is used for all")
    if request.get("stream"):
        raise UserError("streaming requests are not supported")
    return request


def parse_completion(completion) -> dict:
    """The parts of a ChatCompletion a judge needs, as plain JSON-able data."""
    if not completion.choices:
        raise TransientError("the server answered with no choices")
    choice = completion.choices[0]
    logprobs = None
    if choice.logprobs is not None and choice.logprobs.content is not None:
        logprobs = [{"token": entry.token, "logprob": entry.logprob,
                     "top_logprobs": [{"token": top.token, "logprob": top.logprob} for top in entry.top_logprobs]}
                    for entry in choice.logprobs.content]
    usage = completion.usage
    return {"content": choice.message.content or "", "logprobs": logprobs,
            "usage": {"prompt_tokens": usage.prompt_tokens if usage else 0,
                      "completion_tokens": usage.completion_tokens if usage else 0}}


def server_message(err: openai.APIStatusError) -> str:
    """The server's own explanation: OpenAI's `error.message`, else the raw body's start."""
    if isinstance(err.body, dict) and isinstance(err.body.get("message"), str):
        return err.body["message"]
    if isinstance(err.body, str) and err.body:
        return err.body[:500]
    return err.response.reason_phrase or "no message"


def retry_after_seconds(headers) -> float | None:
    """The wait a 429/503 asks for: `retry-after-ms` (OpenAI's), else `Retry-After` in seconds or as an
    HTTP date; capped so that a wild value cannot stall the batch."""
    try:
        if headers.get("retry-after-ms") is not None:
            return min(RETRY_AFTER_MAX_S, max(0.0, float(headers["retry-after-ms"]) / 1000))
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            seconds = float(value)
        except ValueError:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        return min(RETRY_AFTER_MAX_S, max(0.0, seconds))
    except (TypeError, ValueError):
        return None


def estimate_prompt_tokens(request: dict) -> int:
    """A rough prompt size: characters / 4, plus OpenAI's per-message framing."""
    chars = sum(len(m.get("content") if isinstance(m.get("content"), str) else json.dumps(m.get("content")))
                for m in request["messages"])
    return chars // CHARS_PER_TOKEN + TOKENS_PER_MESSAGE * len(request["messages"]) + TOKENS_PER_REPLY
