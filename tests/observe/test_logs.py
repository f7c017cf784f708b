"""Logs (issue #7): the request.done line, prompts only when switched on, no secret or prompt in
the log of the real process."""

from __future__ import annotations

import json
import secrets
import signal
import uuid
from typing import Any

import pytest
import structlog
from aiohttp import web

from tests.fakes.openai_server import FakeOpenAI
from tests.observe.scenario import TRACE_ID, scenario_models
from tests.support.config import (
    deployment,
    llm_section,
    write_config,
)
from tests.support.processes import WorkerProcess
from worker.client import LLMClient
from worker.messages import Status
from worker.observe.logs import SecretScrubber
from worker.secrets import redact_url

CANONICAL = {
    "request_id", "trace_id", "agent", "task_id", "model", "attempts", "fallback", "tokens",
    "cost_usd", "cached", "latency_ms", "outcome",
}  # fmt: skip


def has(line: dict[str, Any], **expected: Any) -> bool:
    """``line`` holds every expected field with its value (pytest shows the difference)."""
    assert {k: line.get(k) for k in expected} == expected
    return True


class KeyEchoingProvider(FakeOpenAI):
    """Model ``echokey`` answers 401 quoting the API key it was sent, as some providers do."""

    async def _answer(self, model: str, n: int, body: dict[str, Any]) -> web.StreamResponse:
        if model == "echokey":
            key = self.requests[-1]["headers"].get("Authorization", "").removeprefix("Bearer ")
            return self._error(401, f"Incorrect API key provided: {key}. Find your key in the dashboard.")
        return await super()._answer(model, n, body)


async def test_request_done_line_for_ok_cached_failed_and_budget_outcomes(
    make_settings, start_worker, client, fake
):
    settings = make_settings(**scenario_models(fake.base_url))
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with start_worker(settings):
            ok = await client.complete("one two three", agent="writer", task_id="t-1", trace_id=TRACE_ID)
            cached = await client.complete("one two three", agent="writer", task_id="t-1")
            failed = await client.complete("boom", agent="writer", model="broken")
            budget = await client.complete("pricey", agent="critic", task_id="t-1", max_tokens=5000)
            fell_back = await client.complete("long words", agent="writer", model="toolong")

    done = {e["request_id"]: e for e in logs if e["event"] == "request.done"}
    for result in (ok, cached, failed, budget, fell_back):
        line = done[result.request_id]
        assert set(line) >= CANONICAL, CANONICAL - set(line)
        assert line["trace_id"] == result.trace_id and line["outcome"] == result.status.value
        assert line["latency_ms"] > 0

    assert has(
        done[ok.request_id], trace_id=TRACE_ID, agent="writer", task_id="t-1", model="primary", outcome="ok",
        attempts=1, fallback=False, tokens=13, cost_usd=pytest.approx(6e-6 + 7 * 2e-6), cached=False,
    )  # fmt: skip
    assert has(done[cached.request_id], outcome="ok", cached=True, cost_usd=0.0, attempts=0, model="primary")
    assert has(
        done[failed.request_id], outcome="failed", model="broken", attempts=3, error="ServerError",
        dead_lettered=True, cost_usd=0.0,
    )  # fmt: skip
    assert has(
        done[budget.request_id], outcome="budget_exceeded", agent="critic", task_id="t-1",
        budget_scope="task:t-1", attempts=0, cost_usd=0.0,
    )  # fmt: skip
    assert has(done[fell_back.request_id], outcome="ok", model="backup", fallback=True, attempts=2)

    # Retries and fallbacks are logged as they happen, carrying the request's ids (contextvars).
    attempts = [e for e in logs if e["event"] == "llm.attempt_failed" and e["model"] == "broken"]
    assert [e["attempt"] for e in attempts] == [1, 2, 3]
    assert {(e["request_id"], e["trace_id"], e["agent"]) for e in attempts} == {
        (failed.request_id, failed.trace_id, "writer")
    }
    [fallback] = [e for e in logs if e["event"] == "llm.fallback"]
    assert has(
        fallback, request_id=fell_back.request_id, trace_id=fell_back.trace_id,
        from_model="toolong", to_model="backup", error="ContextWindowExceeded",
    )  # fmt: skip
    # Off by default: no prompt, no answer.
    assert not any("prompt" in e or "response" in e for e in logs)


async def test_prompts_and_responses_are_logged_only_when_switched_on(make_settings, start_worker, client):
    settings = make_settings(observe={"log_prompts_and_responses": True})
    with structlog.testing.capture_logs() as logs:
        async with start_worker(settings):
            result = await client.complete("tell me a secret plan", agent="writer")

    [line] = [e for e in logs if e["event"] == "request.done"]
    assert line["prompt"] == [{"role": "user", "content": "tell me a secret plan"}]
    assert line["response"] == result.content == "[m-writer] tell me a secret plan"


async def test_no_api_key_url_password_or_prompt_reaches_the_log(tmp_path, names, amqp_url, redis_url):
    """The real process and its JSON log chain, at debug level, with a provider that echoes the key.

    The key has no well-known prefix (no ``sk-``), so only redaction by value can catch it.
    """
    key = "zq" + secrets.token_hex(19)
    prompt = f"PROMPT-{uuid.uuid4().hex} please keep this private"
    provider = await KeyEchoingProvider().start()
    key_ref = "os.environ/OBS_TEST_PROVIDER_KEY"
    models = [
        deployment("primary", "primary", provider.base_url),
        deployment("leaky", "echokey", provider.base_url),
    ]
    for model in models:
        model["litellm_params"]["api_key"] = key_ref
    config = write_config(
        tmp_path / "cfg", names, amqp_url, redis_url, llm_section(provider.base_url, models=models)
    )
    worker = WorkerProcess(config, env={"OBS_TEST_PROVIDER_KEY": key}, args=("--log-level", "debug"))
    try:
        await worker.start()
        async with LLMClient(amqp_url, request_queue=names.request_queue, default_timeout_s=30) as llm:
            ok = await llm.complete(prompt, agent="writer", model="primary")
            failed = await llm.complete(prompt, agent="writer", model="leaky")
        worker.signal(signal.SIGTERM)
        assert await worker.wait() == 0
    finally:
        await worker.stop()
        await provider.stop()

    assert ok.status is Status.ok and failed.status is Status.failed
    # Nor in what the agent receives (and the dead-letter copy's x-dlq-message, built from it).
    assert failed.error is not None and key not in failed.error.message
    assert "[redacted]" in failed.error.message
    assert provider.requests[-1]["headers"]["Authorization"] == f"Bearer {key}"  # the key was really sent
    text = "\n".join(json.dumps(line) for line in worker.lines)
    assert key not in text and key[:16] not in text
    assert "PROMPT-" not in text and "keep this private" not in text
    # The provider's echo reached the log chain and was redacted there, not silently dropped.
    [echo] = [line for line in worker.events("llm.attempt_failed") if line["model"] == "leaky"]
    assert "Incorrect API key provided: [redacted]" in echo["message"]
    assert echo["request_id"] == failed.request_id and echo["trace_id"] == failed.trace_id
    done = {line["request_id"]: line for line in worker.events("request.done")}
    assert set(done[failed.request_id]) >= CANONICAL and done[failed.request_id]["outcome"] == "failed"


def test_scrubber_redacts_nested_values_urls_and_exception_texts():
    scrubber = SecretScrubber(["cohere-live-0123456789abcdef", "short"])
    event = {
        "event": "x",
        "broker": "amqp://worker:hunter2hunter2@rabbit:5672/",
        "error": ValueError("401 from provider: key cohere-live-0123456789abcdef rejected"),
        "nested": {"calls": [{"auth": "Bearer abcdefghijklmnop"}, 3]},
        "exception": "Traceback ...\nAuthenticationError: api_key=sk-proj-abcdefghijkl",
        "count": 3,
    }
    out = json.dumps(scrubber(None, "info", event))
    for secret in (
        "hunter2hunter2",
        "cohere-live-0123456789abcdef",
        "abcdefghijklmnop",
        "sk-proj-abcdefghijkl",
    ):
        assert secret not in out
    assert "amqp://worker:***@rabbit:5672/" in out and '"count": 3' in out
    assert scrubber.secrets == ["cohere-live-0123456789abcdef"]  # too short to redact by value safely


def test_a_string_seen_before_is_scrubbed_the_same_on_every_line():
    """The scrubber remembers the strings it cleaned (issue #21): a secret logged twice, a short
    one and one past the remembered length, is redacted both times, limits kept apart."""
    scrubber = SecretScrubber(["cohere-live-0123456789abcdef"])
    long_text = "x" * 300 + " Bearer abcdefghijklmnop"
    for _ in range(2):
        event = {
            "event": "x",
            "key": "cohere-live-0123456789abcdef",
            "auth": "Bearer abcdefghijklmnop",
            "long": long_text,
            "status": Status.ok,  # a str subclass takes the general path
        }
        out = json.dumps(scrubber(None, "info", event))
        assert "0123456789abcdef" not in out and "abcdefghijklmnop" not in out
        assert '"status": "ok"' in out
    assert scrubber.clean("y" * 3000) == "y" * 2000 and scrubber.clean("y" * 100, limit=10) == "y" * 10
    assert scrubber.clean("y" * 100) == "y" * 100


def test_level_and_timestamp_are_on_every_line_after_scrubbing():
    import logging

    from worker.observe.logs import configure_logging

    saved, handlers = structlog.get_config(), list(logging.getLogger().handlers)
    try:
        configure_logging(json=True, secrets=["cohere-live-0123456789abcdef"])
        event: Any = {"event": "x.happened", "key": "cohere-live-0123456789abcdef"}
        for processor in structlog.get_config()["processors"]:
            event = processor(None, "warning", event)
    finally:
        structlog.configure(**saved)
        logging.getLogger().handlers = handlers
    line = json.loads(event)
    assert line["level"] == "warning" and line["timestamp"].endswith("Z") and line["event"] == "x.happened"
    assert "0123456789abcdef" not in line["key"]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://worker:p@ss@rabbit:5672/", "amqp://worker:***@rabbit:5672/"),  # an unescaped @
        ("amqp://worker:a/b@c@rabbit/vhost", "amqp://worker:***@rabbit/vhost"),
        ("amqp://worker:p%40ss@rabbit/", "amqp://worker:***@rabbit/"),
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("amqp://rabbit:5672/ and mail@example.com", "amqp://rabbit:5672/ and mail@example.com"),
    ],
)
def test_url_passwords_are_hidden_whatever_they_hold(url, shown):
    assert redact_url(url) == shown
    assert redact_url(f"{url};{url}") == f"{shown};{shown}"  # one list of brokers, each hidden
