"""Stopping a worker (issue #6): SIGTERM drains and exits 0, the drain deadline is enforced, a
second signal exits at once, and a worker killed mid-batch loses nothing and charges nothing twice.

Each test runs ``python -m worker run`` as a child process and signals it like a platform would.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import pytest

from tests.fakes.openai_server import FakeOpenAI
from tests.support.bodies import request_body
from tests.support.config import (
    deployment,
)
from tests.support.ledger import day_state
from tests.support.peers import RawPeer, raw_peer
from tests.support.processes import WorkerProcess
from tests.support.queues import (
    depth_is,
)
from tests.support.waits import eventually
from worker.app import running_worker
from worker.messages import LLMResult, Status
from worker.settings import load_settings


def results(replies) -> dict[str, LLMResult]:
    return {m.correlation_id: LLMResult.model_validate_json(m.body) for m in replies}


async def three_slow_calls_in_flight(peer: RawPeer, fake: FakeOpenAI, label: str) -> None:
    """Publish three requests to the ``slow5000`` model and wait until all three are at the provider."""
    for i in range(3):
        await peer.publish(request_body(f"{label} {i}", use_cache=False))
    await eventually(lambda: fake.in_flight == 3, what="3 calls in flight")


async def test_sigterm_finishes_calls_in_flight_requeues_the_rest_and_exits_0(
    config, amqp_url, names, fake, worker_processes
):
    fake.latency_s = 2.0
    folder = config(bus={"prefetch": 8})
    worker = await WorkerProcess(folder).start()
    worker_processes.append(worker)

    async with raw_peer(amqp_url, names.request_queue) as peer:
        ids = [await peer.publish(request_body(f"drain {i}", use_cache=False)) for i in range(20)]
        await eventually(lambda: fake.in_flight == 8, what="8 calls in flight (the prefetch)")
        worker.signal(signal.SIGTERM)
        assert await worker.wait(timeout_s=30) == 0
        finished = await peer.wait_replies(8)
        assert fake.total_calls() == 8  # nothing new was started after the signal
        assert {r.status for r in results(finished).values()} == {Status.ok}
        await eventually(lambda: depth_is(amqp_url, names.request_queue, 12), what="12 left in the queue")

        [stopped] = worker.events("worker.stopped")
        assert stopped["drained"] is True and stopped["handled"] == 8
        assert worker.events("worker.stopping")[0]["signal"] == "SIGTERM"

        async with running_worker(load_settings(folder, environ={})):  # a successor, in this process
            await peer.wait_replies(20)
            await asyncio.sleep(0.3)  # a duplicate answer would arrive now

    assert sorted(m.correlation_id for m in peer.replies) == sorted(ids)  # each answered once
    assert fake.total_calls() == 20
    state = await day_state(load_settings(folder, environ={}))
    assert state.calls == 20 and state.reserved_usd == 0


async def test_calls_still_running_at_the_drain_deadline_are_cancelled_released_and_requeued(
    config, amqp_url, names, fake, worker_processes
):
    folder = config(
        bus={"drain_timeout_s": 1},
        timeout=30,
        deadline_s=30,
        models=[deployment("primary", "slow5000", fake.base_url)],
    )
    worker = await WorkerProcess(folder).start()
    worker_processes.append(worker)
    async with raw_peer(amqp_url, names.request_queue) as peer:
        await three_slow_calls_in_flight(peer, fake, "too slow")
        state = await day_state(load_settings(folder, environ={}))
        assert state.reserved_usd > 0  # their worst case is reserved while they run

        started = time.monotonic()
        worker.signal(signal.SIGTERM)
        assert await worker.wait(timeout_s=30) == 0
        elapsed = time.monotonic() - started

    assert elapsed < 4.5, elapsed  # the 1 s deadline, not the 5 s calls
    assert peer.replies == []
    [late] = worker.events("worker.drain_deadline")
    assert late["cancelled"] == 3
    assert worker.events("worker.stopped")[0]["drained"] is False
    await eventually(lambda: depth_is(amqp_url, names.request_queue, 3), what="all 3 requeued")
    state = await day_state(load_settings(folder, environ={}))
    assert state.reserved_usd == 0 and state.spent_usd == 0  # released at once, nothing charged


async def test_a_second_signal_exits_at_once(config, amqp_url, names, fake, worker_processes):
    folder = config(timeout=30, deadline_s=30, models=[deployment("primary", "slow5000", fake.base_url)])
    worker = await WorkerProcess(folder).start()
    worker_processes.append(worker)
    async with raw_peer(amqp_url, names.request_queue) as peer:
        await three_slow_calls_in_flight(peer, fake, "impatient")
        started = time.monotonic()
        worker.signal(signal.SIGTERM)
        await eventually(lambda: bool(worker.events("worker.draining")), what="the drain to start")
        worker.signal(signal.SIGINT)
        assert await worker.wait(timeout_s=10) == 130
        assert time.monotonic() - started < 2.5  # not the 5 s calls, nor the 10 s drain deadline

    assert worker.events("worker.killed")[0]["signal"] == "SIGINT"
    await eventually(lambda: depth_is(amqp_url, names.request_queue, 3), what="the broker requeues all 3")


async def test_a_worker_killed_mid_batch_loses_nothing_and_charges_nothing_twice(
    config, amqp_url, names, fake, worker_processes
):
    fake.latency_s = 0.5
    # A redelivered request waits for the dead worker's claim on it until that worker's
    # heartbeat expires (10 s): its deadline must be longer than that (production: 120 s).
    folder = config(bus={"prefetch": 8}, deadline_s=30, timeout=10)
    first = await WorkerProcess(folder).start()
    worker_processes.append(first)

    async with raw_peer(amqp_url, names.request_queue) as peer:
        prompts = {}
        for i in range(40):
            body = request_body(f"batch {i} {uuid.uuid4().hex}", use_cache=False)
            prompts[await peer.publish(body)] = body["messages"][0]["content"]
        await eventually(
            lambda: len(peer.replies) >= 10 and fake.in_flight >= 4, what="answers given and calls in flight"
        )
        in_flight_at_kill = fake.in_flight
        first.signal(signal.SIGKILL)
        assert await first.wait() == -signal.SIGKILL
        answered_before = set(results(peer.replies))

        async with running_worker(load_settings(folder, environ={})):  # a successor, in this process
            await eventually(lambda: len(results(peer.replies)) == 40, timeout_s=60, what="all 40 answered")

    assert in_flight_at_kill > 0, "the kill did not land mid-batch"
    answers = results(peer.replies)
    assert set(answers) == set(prompts) and {a.status for a in answers.values()} == {Status.ok}
    calls = [r["body"]["messages"][-1]["content"] for r in fake.requests]
    for cid in answered_before:
        assert calls.count(prompts[cid]) == 1  # answered before the kill: never called again
    # Only requests the dead worker held unacked (at most its prefetch) were served again, and of
    # those only the ones whose answer was not stored yet reached the provider a second time.
    assert len(calls) - 40 <= 8
    # The ledger charged each request once: calls, spend and no reservation left behind (the
    # second worker adopted those of the calls the first one never finished).
    state = await day_state(load_settings(folder, environ={}))
    assert state.calls == 40
    assert state.spent_usd == pytest.approx(sum(a.cost_usd for a in answers.values()))
    assert state.reserved_usd == 0
