"""Provider calls (issue #3): retries, fallbacks, what is never retried, cooled-down models, and a
failure answered and dead-lettered with its reason."""

from __future__ import annotations

import time

import pytest

from tests.support.config import (
    deployment,
)
from tests.support.queues import (
    drain_queue,
)
from worker.messages import Status


async def test_retry_then_success(make_settings, start_worker, client, fake):
    settings = make_settings(models=[deployment("primary", "flaky2", fake.base_url)])
    async with start_worker(settings):
        result = await client.complete("retry me", agent="writer")

    assert result.status is Status.ok
    assert result.attempts == 3 and not result.fallback_used
    assert fake.calls["flaky2"] == 3


@pytest.mark.parametrize("failing", ["e429", "e503", "e500"])
async def test_fallback_after_retries_on_rate_limit_and_server_errors(
    failing, make_settings, start_worker, client, fake
):
    settings = make_settings(
        fallback_models=["backup"],
        models=[deployment("primary", failing, fake.base_url), deployment("backup", "backup", fake.base_url)],
    )
    async with start_worker(settings):
        result = await client.complete("fall back", agent="writer", use_cache=False)

    assert result.status is Status.ok
    assert result.model == "backup" and result.fallback_used
    assert fake.calls[failing] == 3  # 1 + num_retries
    assert fake.calls["backup"] == 1
    assert result.attempts == 4


async def test_retry_after_is_honoured(make_settings, start_worker, client, fake):
    fake.retry_after_s = 0.4
    settings = make_settings(models=[deployment("primary", "ratelimit1", fake.base_url)])
    async with start_worker(settings):
        started = time.monotonic()
        result = await client.complete("wait for me", agent="writer")
        elapsed = time.monotonic() - started

    assert result.status is Status.ok and result.attempts == 2
    assert elapsed >= 0.4  # the backoff (0.01 s configured) yielded to Retry-After


async def test_no_retry_on_authentication_error_falls_back_once(make_settings, start_worker, client, fake):
    settings = make_settings(
        fallback_models=["backup"],
        models=[deployment("primary", "e401", fake.base_url), deployment("backup", "backup", fake.base_url)],
    )
    async with start_worker(settings):
        result = await client.complete("auth", agent="writer")

    assert fake.calls["e401"] == 1
    assert result.status is Status.ok and result.model == "backup" and result.attempts == 2


async def test_no_retry_on_bad_request_without_fallback_fails(make_settings, start_worker, client, fake):
    settings = make_settings(models=[deployment("primary", "e400", fake.base_url)])
    async with start_worker(settings):
        result = await client.complete("bad", agent="writer")

    assert fake.calls["e400"] == 1
    assert result.status is Status.failed
    assert result.error is not None and result.error.type == "BadRequest" and not result.error.retryable


async def test_context_window_error_is_not_retried_and_uses_context_window_fallback(
    make_settings, start_worker, client, fake
):
    settings = make_settings(
        fallback_models=["backup"],
        context_window_fallbacks={"primary": ["big"]},
        models=[
            deployment("primary", "ctx", fake.base_url),
            deployment("backup", "backup", fake.base_url),
            deployment("big", "big", fake.base_url),
        ],
    )
    async with start_worker(settings):
        result = await client.complete("a very long prompt", agent="writer")

    assert fake.calls["ctx"] == 1
    assert result.status is Status.ok and result.model == "big" and result.fallback_used
    assert fake.calls["backup"] == 0


async def test_failed_request_is_answered_and_dead_lettered_with_reason(
    make_settings, start_worker, client, fake, names, amqp_url
):
    settings = make_settings(models=[deployment("primary", "e500", fake.base_url)])
    async with start_worker(settings):
        result = await client.complete("boom", agent="editor", model="primary")

    assert result.status is Status.failed and result.attempts == 3
    assert result.error is not None and result.error.type == "ServerError" and result.error.retryable
    assert "Traceback" not in result.error.message and "sk-test" not in result.error.message
    dead = await drain_queue(amqp_url, names.dead_letter_queue)
    assert len(dead) == 1
    headers = dead[0].headers
    assert headers["x-dlq-reason"] == "ServerError" and headers["x-dlq-attempts"] == 3
    assert headers["x-dlq-agent"] == "editor" and headers["x-dlq-request-id"] == result.request_id
    assert dead[0].reply_to is not None  # a replay can still answer the caller


async def test_a_cooled_down_model_is_skipped_quickly_instead_of_failing(
    make_settings, start_worker, client, fake
):
    """After a 404 litellm's Router cools the deployment down; later requests fall back at once."""
    settings = make_settings(
        fallback_models=["backup"],
        models=[deployment("primary", "e404", fake.base_url), deployment("backup", "backup", fake.base_url)],
    )
    async with start_worker(settings):
        first = await client.complete("one", agent="writer", use_cache=False)
        second = await client.complete("two", agent="writer", use_cache=False)

    assert first.status is Status.ok and first.model == "backup"
    assert second.status is Status.ok and second.model == "backup" and second.fallback_used
    assert fake.calls["e404"] == 1  # the cooled-down model was not called again
    assert second.latency_ms < 2000  # no wait for the 30 s cooldown: the deadline is 10 s


async def test_a_cooled_down_model_without_fallback_fails_retryable(
    make_settings, start_worker, client, fake
):
    settings = make_settings(models=[deployment("primary", "e404", fake.base_url)])
    async with start_worker(settings):
        first = await client.complete("one", agent="writer", use_cache=False)
        second = await client.complete("two", agent="writer", use_cache=False)

    assert first.error is not None and not first.error.retryable  # litellm reports this 404 as BadRequest
    assert second.error is not None and second.error.type == "NoHealthyDeployment" and second.error.retryable
    assert fake.calls["e404"] == 1
