"""Outages (issue #6): the worker rides out a RabbitMQ restart, a dropped connection, a consumer
the broker cancels, and a Redis restart, by itself and without losing a request.

The shared services must never go down, so these tests start private ones (tests/support/services.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import uuid

import aio_pika
import pytest

from tests.support.bodies import request_body
from tests.support.ledger import day_state
from tests.support.peers import FAST_RECONNECT, ReplyInbox, raw_peer
from tests.support.processes import WorkerProcess
from tests.support.queues import (
    depth_is,
)
from tests.support.services import PrivateRedis
from tests.support.waits import eventually
from worker.app import running_worker
from worker.deadletters import DeadLetters
from worker.errors import LedgerUnavailable
from worker.messages import LLMRequest, LLMResult, Status
from worker.settings import load_settings
from worker.state.results import fingerprint, request_key


async def test_rabbitmq_restarted_under_load_resumes_and_answers_every_request(rabbit, config, names, fake):
    fake.latency_s = 0.3
    folder = config(bus={"prefetch": 8}, amqp=rabbit.url + FAST_RECONNECT, deadline_s=60, timeout=10)
    settings = load_settings(folder, environ={})
    bodies = [request_body(f"through the restart {i}", use_cache=False) for i in range(60)]
    async with running_worker(settings) as worker, ReplyInbox(rabbit.url, names.request_queue) as inbox:
        await inbox.publish(bodies)
        await eventually(lambda: len(inbox.results) >= 10, what="the first answers")
        in_flight = len(worker.in_flight)
        await rabbit.restart()
        await eventually(lambda: len(inbox.results) == 60, timeout_s=90, what="every request answered")
        assert worker.bus.connected and worker.bus.consuming

    assert in_flight > 0, "the restart did not come under load"
    assert {r.status for r in inbox.results.values()} == {Status.ok}
    assert fake.total_calls() == 60  # calls cut off by the restart were answered from the store
    state = await day_state(settings)
    assert state.calls == 60 and state.reserved_usd == 0


async def test_a_dropped_connection_is_reestablished(rabbit, config, names, fake):
    settings = load_settings(config(amqp=rabbit.url + FAST_RECONNECT), environ={})
    async with running_worker(settings) as worker:
        # Told by aio-pika, not polled: a fast reconnect is over before a poll sees it down.
        reconnected = asyncio.Event()
        worker.bus._consume_conn.reconnect_callbacks.add(lambda *_: reconnected.set())
        await asyncio.to_thread(rabbit.ctl, "close_all_connections", "test: network blip")
        await asyncio.wait_for(reconnected.wait(), 60)
        await eventually(
            lambda: _connected_and_consuming(worker, rabbit.url, names.request_queue),
            what="the worker back on the queue",
        )
        async with raw_peer(rabbit.url, names.request_queue) as peer:
            await peer.publish(request_body("still there?"))
            [reply] = await peer.wait_replies(1)
    assert LLMResult.model_validate_json(reply.body).status is Status.ok


async def _connected_and_consuming(worker, url: str, queue: str) -> bool:
    return worker.bus.connected and await _consumers(url, queue)


async def _consumers(url: str, queue: str) -> bool:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        try:
            q = await channel.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
        return (q.declaration_result.consumer_count or 0) >= 1


async def test_a_consumer_cancelled_by_the_broker_is_resubscribed(
    make_settings, start_worker, amqp_url, names
):
    """Deleting the queue makes the broker send basic.cancel (RabbitMQ 4.3's consumer timeout
    does the same); aio-pika 10.2 re-declares the queue and consumes again."""
    async with start_worker(make_settings()) as worker:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(names.request_queue)
        await eventually(lambda: _consumers(amqp_url, names.request_queue), what="the consumer back")
        async with raw_peer(amqp_url, names.request_queue) as peer:
            await peer.publish(request_body("after the cancel"))
            [reply] = await peer.wait_replies(1)
        assert not worker.bus.consumer_lost.is_set()
    assert LLMResult.model_validate_json(reply.body).status is Status.ok


async def test_a_consumer_that_cannot_be_restored_makes_the_worker_exit_1(
    rabbit, config, names, worker_processes
):
    """The request queue is deleted and the worker may no longer declare it (its user lost the
    configure permission), so aio-pika's re-subscription keeps failing. Idling silently would
    look healthy; the worker exits 1 after ``consumer_recovery_s`` so the platform restarts it."""
    folder = config(bus={"consumer_recovery_s": 2}, amqp=rabbit.url)
    worker = await WorkerProcess(folder, env={"AMQP_URL": rabbit.url + FAST_RECONNECT}).start()
    worker_processes.append(worker)
    admin = f"admin{uuid.uuid4().hex[:6]}"
    ctl = rabbit.ctl
    try:
        for args in (("add_user", admin, "pw"), ("set_user_tags", admin, "administrator"),
                     ("set_permissions", "-p", "/", admin, ".*", ".*", ".*"),
                     ("set_permissions", "-p", "/", "guest", "^$", ".*", ".*")):  # fmt: skip
            await asyncio.to_thread(ctl, *args)
        connection = await aio_pika.connect(f"amqp://{admin}:pw@127.0.0.1:{rabbit.port}/")
        async with connection:
            await (await connection.channel()).queue_delete(names.request_queue)
        assert await worker.wait(timeout_s=30) == 1
    finally:
        await asyncio.to_thread(ctl, "set_permissions", "-p", "/", "guest", ".*", ".*", ".*")
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            await asyncio.to_thread(ctl, "delete_user", admin)
    [lost] = worker.events("consumer.lost")
    assert lost["queue"] == names.request_queue and "restarts the worker" in lost["fix"]
    assert worker.events("consumer.missing")


async def test_a_redis_restart_fails_requests_meanwhile_to_the_dlq_and_service_resumes_by_itself(
    config, amqp_url, names, fake
):
    redis = await PrivateRedis().start()
    try:
        settings = load_settings(config(redis=redis.url), environ={})
        async with running_worker(settings), raw_peer(amqp_url, names.request_queue) as peer:
            await peer.publish(request_body("before"))
            await peer.wait_replies(1)

            await redis.stop()
            during = request_body("during the outage", use_cache=False)
            await peer.publish(during)
            await peer.wait_replies(2)

            await redis.start()
            await peer.publish(request_body("after"))
            await peer.wait_replies(3)
            before, outage, after = [LLMResult.model_validate_json(m.body) for m in peer.replies]
            assert before.status is Status.ok and after.status is Status.ok
            assert outage.status is Status.failed and outage.error is not None
            assert outage.error.type == "LedgerUnavailable" and outage.error.retryable  # fails closed

            # Nothing is lost: the failed request waits in the DLQ, and a replay answers it.
            await eventually(
                lambda: depth_is(amqp_url, names.dead_letter_queue, 1), what="it is dead-lettered"
            )
            async with DeadLetters.open(settings) as dlq:
                report = await dlq.replay(reason="LedgerUnavailable")
            assert [d.request_id for d in report.replayed] == [during["request_id"]]
            await peer.wait_replies(4)
        replayed = LLMResult.model_validate_json(peer.replies[3].body)
        assert replayed.status is Status.ok and replayed.request_id == during["request_id"]
    finally:
        await redis.stop()


async def test_a_claim_an_outage_left_behind_does_not_block_the_replay(config, amqp_url, names, fake):
    """A request claimed just before Redis goes down fails (LedgerUnavailable) and its claim on
    the request_id cannot be released; a persistent Redis keeps that claim, which names this very
    worker. The replay must take it over, not wait for itself until the deadline and fail again
    (found by the fault suite, issue #9)."""
    redis = await PrivateRedis(persistent=True).start()
    try:
        settings = load_settings(config(redis=redis.url, deadline_s=10), environ={})
        body = request_body("claimed just before the outage", use_cache=False)
        async with running_worker(settings) as worker, raw_peer(amqp_url, names.request_queue) as peer:
            results = worker.pipeline.results
            key = request_key("", body["agent"], body["request_id"])  # development mode: no broker user
            asked = fingerprint(LLMRequest.model_validate(body))
            claim = await results.claim_or_wait(key, asked, ttl_s=70, wait_until=time.monotonic())
            assert claim.owned
            await redis.stop()
            with pytest.raises(LedgerUnavailable):  # the state boundary's name for a Redis failure
                await results.release(key, claim)
            await redis.start()
            await peer.publish(body)  # the replay from the dead-letter queue
            [reply] = await peer.wait_replies(1, timeout_s=30)
    finally:
        await redis.destroy()
    result = LLMResult.model_validate_json(reply.body)
    assert result.status is Status.ok, result.error
    assert fake.total_calls() == 1


async def test_calls_in_flight_through_a_redis_outage_are_charged_when_it_is_back(
    config, amqp_url, names, fake
):
    """The provider billed them while Redis was down: each answer waits for its charge (issue #9;
    settling used to give up after ~1.5 s and answer uncharged, the reservation left held)."""
    fake.latency_s = 1.0
    redis = await PrivateRedis(persistent=True).start()
    try:
        settings = load_settings(config(redis=redis.url), environ={})
        async with running_worker(settings), raw_peer(amqp_url, names.request_queue) as peer:
            for i in range(3):
                await peer.publish(request_body(f"in flight {i}", use_cache=False))
            await fake.wait_until(lambda f: f.in_flight == 3)
            await redis.stop()
            await asyncio.sleep(3)  # an outage longer than the old settle retries
            await redis.start()
            await peer.wait_replies(3, timeout_s=30)
        state = await day_state(settings)
    finally:
        await redis.destroy()
    results = peer.results()
    assert [r.status for r in results] == [Status.ok] * 3 and fake.total_calls() == 3
    assert state.calls == 3 and state.reserved_usd == 0
    assert state.spent_usd == pytest.approx(sum(r.cost_usd for r in results), abs=3e-6)
