"""The worker end to end (issue #3): real broker, real Redis, litellm's real code, a fake provider."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import AGENTS, WorkerProcess, deployment
from tests.helpers import drain_queue, raw_peer, request_body
from worker.client import LLMTimeout
from worker.messages import LLMRequest, LLMResult, Status


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


async def test_redelivered_request_is_answered_from_the_result_store(
    make_settings, start_worker, amqp_url, names, fake
):
    body = request_body("only once", use_cache=False)
    async with start_worker(make_settings()), raw_peer(amqp_url, names.request_queue) as peer:
        await peer.publish(body)
        await peer.wait_replies(1)
        await peer.publish(body)  # the same request_id again, e.g. re-published after a lost confirm
        await peer.wait_replies(2)

    first, second = peer.results()
    assert fake.calls["m-writer"] == 1
    assert first.status is Status.ok and second.model_dump() == first.model_dump()


async def test_two_copies_in_flight_make_one_provider_call(
    make_settings, start_worker, amqp_url, names, fake
):
    fake.latency_s = 0.3
    body = request_body("concurrent twins", use_cache=False)
    async with start_worker(make_settings()), raw_peer(amqp_url, names.request_queue) as peer:
        await asyncio.gather(peer.publish(body), peer.publish(body))
        await peer.wait_replies(2)

    assert fake.calls["m-writer"] == 1
    assert {r.status for r in peer.results()} == {Status.ok}


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


async def test_two_replicas_share_one_queue_and_answer_each_request_once(
    tmp_path, names, amqp_url, redis_url, fake, worker_processes
):
    from tests.conftest import WorkerProcess, llm_section, write_config

    fake.latency_s = 0.05
    config = write_config(
        tmp_path / "cfg", names, amqp_url, redis_url, llm_section(fake.base_url), bus={"prefetch": 8}
    )
    for _ in range(2):
        worker_processes.append(await WorkerProcess(config).start())

    async with raw_peer(amqp_url, names.request_queue) as peer:
        ids = [await peer.publish(request_body(f"share {i}", use_cache=False)) for i in range(80)]
        replies = await peer.wait_replies(80)
        await asyncio.sleep(0.5)  # a duplicate would arrive now

    assert sorted(r.correlation_id for r in peer.replies) == sorted(ids)  # each answered exactly once
    by_worker = {r.headers["x-worker-id"] for r in replies}
    assert len(by_worker) == 2  # both replicas took work
    assert fake.calls["m-writer"] == 80


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


async def test_offline_profile_answers_ask_over_the_bus(
    tmp_path, names, amqp_url, redis_url, worker_processes
):
    """The README's path for a newcomer without keys: run the offline profile, then `ask`."""
    import shutil
    import subprocess
    import sys

    import yaml

    from tests.conftest import ROOT, WorkerProcess

    config = tmp_path / "offline"
    shutil.copytree(ROOT / "config" / "offline", config)
    bus = yaml.safe_load((config / "bus.yaml").read_text())
    bus["bus"].update(
        request_queue=names.request_queue,
        results_exchange=names.results_exchange,
        dead_letter_exchange=names.dead_letter_exchange,
        dead_letter_queue=names.dead_letter_queue,
    )
    (config / "bus.yaml").write_text(yaml.safe_dump(bus))
    redis = yaml.safe_load((config / "redis.yaml").read_text())
    redis["redis"]["key_prefix"] = names.prefix
    (config / "redis.yaml").write_text(yaml.safe_dump(redis))

    worker = await WorkerProcess(config).start()
    worker_processes.append(worker)
    assert "OFFLINE" in worker.events("worker.ready")[0]["profile"]

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "--config",
        str(config),
        "ask",
        "--agent",
        "writer",
        "Write a haiku about queues",
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    assert "queue" in out.decode()
    summary = err.decode()
    assert "[ok] model=claude-sonnet-4-6" in summary and "trace_id=" in summary
    assert "cost_usd=0.000330" in summary  # the mock's 10 + 20 tokens at the configured prices


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


async def test_the_worker_process_freezes_its_start_up_heap_and_still_answers(
    config, amqp_url, names, fake, worker_processes
):
    """`python -m worker run` moves litellm's ~300,000 start-up objects out of the garbage
    collector's reach before consuming (full collections stop walking them)."""
    worker = await WorkerProcess(config()).start()
    worker_processes.append(worker)
    [ready] = worker.events("worker.ready")
    assert ready["frozen_objects"] > 100_000
    async with raw_peer(amqp_url, names.request_queue) as peer:
        await peer.publish(request_body("after the freeze", use_cache=False))
        [reply] = await peer.wait_replies(1)
    assert LLMResult.model_validate_json(reply.body).status is Status.ok
