"""The request path end to end (issue #3): real broker, real Redis, litellm's real code, a fake
provider. Each agent's model, per-request overrides, deadlines, and replies reaching their caller."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from tests.support.bodies import request_body
from tests.support.config import (
    AGENTS,
    deployment,
)
from tests.support.peers import raw_peer
from tests.support.queues import (
    drain_queue,
)
from worker.client import LLMTimeout
from worker.messages import LLMRequest, Status


@pytest.mark.parametrize("agent", AGENTS)
async def test_each_agent_round_trip_uses_its_model(agent, make_settings, start_worker, client, fake):
    async with start_worker(make_settings()):
        result = await client.complete(f"a question for the {agent}", agent=agent, task_id="task-1")

    assert result.status is Status.ok
    assert result.model == f"m-{agent}"
    assert result.content == f"[m-{agent}] a question for the {agent}"
    assert result.agent == agent and result.task_id == "task-1"
    assert len(result.trace_id) == 32
    # Tokens come from the provider's usage block; cost from the configured prices.
    assert result.tokens.prompt == 3 + 5 and result.tokens.completion == 7 and result.tokens.total == 15
    assert result.cost_usd == pytest.approx(8 * 1e-6 + 7 * 2e-6)
    assert result.attempts == 1 and not result.fallback_used and not result.cached
    assert fake.calls[f"m-{agent}"] == 1


async def test_request_model_overrides_agent_model_and_temperature_zero_is_sent(
    make_settings, start_worker, client, fake
):
    async with start_worker(make_settings()):
        result = await client.complete("exact", agent="writer", model="backup", temperature=0, max_tokens=5)

    assert result.model == "backup"
    body = fake.requests[-1]["body"]
    assert body["temperature"] == 0  # not dropped by a `temperature or default`
    assert body["max_tokens"] == 5


async def test_unconfigured_model_is_invalid(make_settings, start_worker, client, fake):
    async with start_worker(make_settings()):
        result = await client.complete("x", agent="writer", model="nope")
    assert result.status is Status.invalid
    assert result.error is not None and "model" in result.error.message and "nope" in result.error.message
    assert fake.total_calls() == 0


async def test_hung_provider_is_bounded_by_the_total_deadline(
    make_settings, start_worker, client, fake, names, amqp_url
):
    settings = make_settings(
        timeout=30,
        deadline_s=1.5,
        num_retries=3,
        fallback_models=["backup"],
        models=[deployment("primary", "hang", fake.base_url), deployment("backup", "hang", fake.base_url)],
    )
    async with start_worker(settings):
        started = time.monotonic()
        result = await client.complete("hello?", agent="writer")
        elapsed = time.monotonic() - started

    assert result.status is Status.failed
    assert result.error is not None and result.error.type == "DeadlineExceeded" and result.error.retryable
    assert 1.4 <= elapsed < 4, elapsed  # not retries x timeout (4 x 30 s)
    dead = await drain_queue(amqp_url, names.dead_letter_queue)
    assert [m.headers["x-dlq-reason"] for m in dead] == ["DeadlineExceeded"]


async def test_past_deadline_is_expired_without_provider_call(
    make_settings, start_worker, amqp_url, names, fake
):
    async with start_worker(make_settings()), raw_peer(amqp_url, names.request_queue) as peer:
        past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
        await peer.publish(request_body("too late", deadline=past))
        await peer.wait_replies(1)

    result = peer.results()[0]
    assert result.status is Status.expired
    assert fake.total_calls() == 0


async def test_replies_reach_the_right_caller_among_many(make_settings, start_worker, client, fake):
    fake.latency_s = 0.5  # long enough that the calls overlap even on a loaded machine
    prompts = [f"question number {i} {uuid.uuid4().hex}" for i in range(60)]
    async with start_worker(make_settings()):
        results = await asyncio.gather(*(client.complete(p, agent="critic") for p in prompts))

    for prompt, result in zip(prompts, results, strict=True):
        assert result.content == f"[m-critic] {prompt}"
    assert fake.max_in_flight > 10  # they really were concurrent


async def test_many_calls_in_flight_on_one_event_loop(make_settings, start_worker, client, fake):
    # Provider calls take seconds; one worker must hold hundreds at once, not tens. The fake's
    # latency is long enough that every request arrives before the first answer on 2 cores.
    fake.latency_s = 5.0
    settings = make_settings(bus={"prefetch": 300}, timeout=30, deadline_s=60)
    async with start_worker(settings):
        started = time.monotonic()
        results = await asyncio.gather(
            *(client.complete(f"slow {i}", agent="writer", timeout_s=60) for i in range(250))
        )
        elapsed = time.monotonic() - started

    assert all(r.status is Status.ok for r in results)
    assert fake.max_in_flight >= 200, fake.max_in_flight
    assert elapsed < 20, elapsed  # 250 five-second calls at once, not one after another


async def test_client_timeout_raises_a_clear_error(make_settings, start_worker, client, fake):
    settings = make_settings(models=[deployment("primary", "slow3000", fake.base_url)])
    # No deadline in the request (complete() would send one, and the worker would answer
    # `failed` at that deadline): only the client's own patience is tested here.
    request = LLMRequest(
        request_id="patience", agent="writer", messages=[{"role": "user", "content": "slow"}]
    )
    async with start_worker(settings):
        with pytest.raises(LLMTimeout, match="retry with the same request_id"):
            await client.send(request, timeout_s=0.5)


async def test_worker_answers_at_the_deadline_the_client_sent(make_settings, start_worker, client, fake):
    settings = make_settings(models=[deployment("primary", "slow3000", fake.base_url)])
    async with start_worker(settings):
        result = await client.complete("slow", agent="writer", timeout_s=1.0)
    assert result.status is Status.failed
    assert result.error is not None and result.error.type == "DeadlineExceeded"
    assert result.latency_ms < 1500  # the deadline (1 s), not the provider (3 s)


async def test_unknown_field_gets_an_invalid_reply_naming_it_and_is_dead_lettered(
    make_settings, start_worker, amqp_url, names, fake
):
    async with start_worker(make_settings()), raw_peer(amqp_url, names.request_queue) as peer:
        await peer.publish({**request_body("x"), "prompt": "the old field name"})
        await peer.wait_replies(1)

    [result] = peer.results()
    assert result.status is Status.invalid
    assert result.error is not None and result.error.message.startswith("prompt: unknown field")
    assert result.request_id is not None
    [dead] = await drain_queue(amqp_url, names.dead_letter_queue)
    assert dead.headers["x-dlq-reason"] == "InvalidRequest"
    assert fake.total_calls() == 0
