"""Poison messages (issue #6): malformed messages between valid ones never stall a worker; a
request that crashes the pipeline, or keeps killing workers, ends in the dead-letter queue."""

from __future__ import annotations

import json
import os
import random
import signal
import uuid
from typing import Any

from tests.support.bodies import MAX_BODY, malformed_bodies, request_body
from tests.support.config import (
    deployment,
    llm_section,
    write_config,
)
from tests.support.crash import crash_on
from tests.support.peers import raw_peer
from tests.support.processes import WorkerProcess, run_cli
from tests.support.queues import (
    depth_at_least,
    depth_is,
    drain_queue,
    queue_depth,
)
from tests.support.waits import eventually
from worker.app import running_worker
from worker.bus import DEAD_LETTER_PREFIX_BYTES
from worker.messages import LLMResult, Status
from worker.settings import load_settings


async def test_a_fuzzed_stream_of_malformed_messages_never_stalls_the_worker(
    make_settings, start_worker, amqp_url, names, fake
):
    seed = int(os.environ.get("POISON_SEED") or random.randrange(1 << 30))  # the seed a failure names
    rng = random.Random(seed)
    stream: list[tuple[bytes, str | None, bool]] = []  # body, expected error (None: valid), reply?
    for body, expected in malformed_bodies(rng):
        # Damaged bodies always ask for a reply, so that each one's fate is known.
        stream.append((body, expected or "", expected is None or rng.random() < 0.7))
    for i in range(30):
        stream.append((json.dumps(request_body(f"valid {i} {uuid.uuid4().hex}")).encode(), None, True))
    rng.shuffle(stream)

    settings = make_settings(bus={"max_body_bytes": MAX_BODY, "prefetch": 16})
    async with start_worker(settings), raw_peer(amqp_url, names.request_queue) as peer:
        sent = {}
        for body, expected, reply in stream:
            sent[await peer.publish(body, reply=reply)] = (body, expected, reply)
        replies = await peer.wait_replies(sum(reply for *_, reply in stream), timeout_s=60)
        answered = {r.correlation_id: peer_result(r) for r in replies}
        invalid = {cid for cid, result in answered.items() if result.status is Status.invalid}
        silent_bad = {cid for cid, (_, expected, reply) in sent.items() if expected is not None and not reply}
        await eventually(
            lambda: depth_at_least(amqp_url, names.dead_letter_queue, len(invalid | silent_bad)),
            what=f"every malformed message dead-lettered (seed {seed})",
        )
        assert await queue_depth(amqp_url, names.request_queue) == 0

    for cid, (_, expected, reply) in sent.items():
        if expected is None:
            assert answered[cid].status is Status.ok, f"a valid request was not answered (seed {seed})"
        elif expected and reply:
            error = answered[cid].error
            assert answered[cid].status is Status.invalid and error is not None, f"seed {seed}"
            assert error.message.startswith(expected), (seed, error.message)
        elif reply:  # damaged: invalid, or still a valid request by chance (of an agent not configured:
            # forbidden, answered and not dead-lettered, as for any caller naming an unknown agent)
            assert answered[cid].status in (Status.invalid, Status.ok, Status.forbidden), f"seed {seed}"
    dead = await drain_queue(amqp_url, names.dead_letter_queue, keep=True)
    assert {m.correlation_id for m in dead} == invalid | silent_bad, f"seed {seed}"
    assert all(m.headers["x-dlq-reason"] == "InvalidRequest" for m in dead)
    for m in dead:  # kept byte for byte; a body over the limit as its first 4 KiB (issue #16)
        body = sent[m.correlation_id][0]
        assert m.body == (body if len(body) <= MAX_BODY else body[:DEAD_LETTER_PREFIX_BYTES]), f"seed {seed}"


def peer_result(message: Any) -> LLMResult:
    return LLMResult.model_validate_json(message.body)


async def test_a_request_that_crashes_the_pipeline_is_retried_then_dead_lettered_with_the_error(
    make_settings, start_worker, amqp_url, names, fake, monkeypatch
):
    deliveries = crash_on(monkeypatch, b"crash me", "simulated bug in the pipeline")
    settings = make_settings(bus={"delivery_limit": 2})
    async with start_worker(settings), raw_peer(amqp_url, names.request_queue) as peer:
        crash = request_body("crash me", agent="critic")
        await peer.publish(crash)
        await eventually(
            lambda: depth_at_least(amqp_url, names.dead_letter_queue, 1), what="the crasher dead-lettered"
        )
        await peer.publish(request_body("and now something normal"))
        [reply] = await peer.wait_replies(1)

    assert peer_result(reply).status is Status.ok  # the worker kept serving
    assert len(deliveries) == 3  # first delivery + delivery_limit redeliveries, then no more
    [dead] = await drain_queue(amqp_url, names.dead_letter_queue, keep=True)
    assert dead.body == json.dumps(crash).encode()
    assert dead.headers["x-dlq-reason"] == "WorkerCrashed"
    assert dead.headers["x-dlq-message"] == "RuntimeError: simulated bug in the pipeline"
    assert dead.headers["x-dlq-attempts"] == 3 and dead.headers["x-dlq-agent"] == "critic"
    assert dead.headers["x-dlq-request-id"] == crash["request_id"]


async def test_a_message_that_keeps_killing_workers_is_dead_lettered_by_the_broker(
    tmp_path, names, amqp_url, redis_url, fake, worker_processes
):
    """Each worker process dies (SIGKILL) while it holds the poison message. For the broker that
    is exactly what a request that crashes the process (a native-library segfault, an OOM kill)
    looks like: a connection that dies with the delivery unacked. With ``delivery_limit: 1`` the
    second death sends it to the dead-letter queue instead of a third worker."""
    llm = llm_section(
        fake.base_url,
        deadline_s=60,
        timeout=60,
        models=[deployment("primary", "ok", fake.base_url), deployment("poison", "slow3000", fake.base_url)],
    )
    config = write_config(tmp_path / "cfg", names, amqp_url, redis_url, llm, bus={"delivery_limit": 1})
    poison = request_body("this one never comes back", agent="writer", model="poison")

    async with raw_peer(amqp_url, names.request_queue) as peer:
        first = await WorkerProcess(config).start()
        worker_processes.append(first)
        await peer.publish(poison)
        await eventually(lambda: fake.calls["slow3000"] == 1, what="the first worker calls with it")
        first.signal(signal.SIGKILL)
        assert await first.wait() == -signal.SIGKILL
        await eventually(lambda: depth_is(amqp_url, names.request_queue, 1), what="the broker requeues it")

        second = await WorkerProcess(config).start()
        worker_processes.append(second)
        await eventually(
            lambda: depth_is(amqp_url, names.request_queue, 0), what="the second worker takes it"
        )
        second.signal(signal.SIGKILL)
        assert await second.wait() == -signal.SIGKILL
        await eventually(
            lambda: depth_at_least(amqp_url, names.dead_letter_queue, 1), what="the broker dead-letters it"
        )

        async with running_worker(load_settings(config, environ={})):  # a survivor, in this process
            await peer.publish(request_body("business as usual"))
            [reply] = await peer.wait_replies(1)

    assert peer_result(reply).status is Status.ok
    assert await queue_depth(amqp_url, names.request_queue) == 0  # no third worker was given the poison
    assert fake.calls["slow3000"] <= 2
    [dead] = await drain_queue(amqp_url, names.dead_letter_queue, keep=True)
    assert dead.body == json.dumps(poison).encode()
    assert dead.headers["x-first-death-reason"] == "delivery_limit"
    listing = await run_cli(config, "dlq", "list")
    assert "delivery_limit" in listing.out and poison["request_id"] in listing.out
