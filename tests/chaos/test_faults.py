"""The fault suite (issue #9): six faults, each landing while a steady stream of requests is
being served, each reported as one row (tests/support/faults.py says what the columns count) and held
to the same targets: nothing lost, nothing charged twice, the ledger exact, no reservation left.

It restarts services and takes about a minute, so it is kept out of the default run:
``pytest -m chaos`` runs it and prints the table at the end. The shared RabbitMQ and Redis are
never stopped: the restarts happen on private instances (tests/support/services.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
from collections import Counter
from typing import Any

import pytest

from tests.fakes.openai_server import FakeOpenAI
from tests.support.bodies import MAX_BODY, malformed_bodies
from tests.support.config import (
    COST,
    exact_llm,
)
from tests.support.faults import (
    LATENCY_S,
    LLM,
    PREFETCH,
    FaultReport,
    SteadyLoad,
    answered,
    parsed,
    quiesce,
    redis_fault_under_load,
    requests,
    strike,
)
from tests.support.ledger import day_state
from tests.support.peers import FAST_RECONNECT, ReplyInbox, raw_peer
from tests.support.processes import WorkerProcess, start_replicas
from tests.support.queues import (
    queue_depth,
)
from tests.support.services import PrivateRedis
from tests.support.waits import eventually
from worker.app import running_worker
from worker.messages import LLMResult, Status
from worker.settings import Settings, load_settings

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

REDIS_OUTAGE_S = 3.0  # past the Redis client's retries: requests arriving meanwhile fail closed


async def report(
    fault_reports: list[FaultReport],
    fault: str,
    sent: list[str],
    replies: list[tuple[str, LLMResult]],
    *,
    fake: FakeOpenAI,
    settings: Settings,
    in_flight: int,
) -> FaultReport:
    """Tally the run, add its row to the session's table, then hold it to the targets."""
    row = FaultReport.tally(
        fault,
        sent,
        replies,
        provider_calls=fake.total_calls(),
        ledger=await day_state(settings),
        in_flight=in_flight,
    )
    fault_reports.append(row)
    row.assert_targets()
    return row


async def test_kill_9_mid_load(config, amqp_url, names, fake, worker_processes, fault_reports):
    """A worker process is SIGKILLed with calls in flight; a successor takes its requests over."""
    fake.latency_s = LATENCY_S
    folder = config(bus={"prefetch": PREFETCH}, **LLM)
    settings = load_settings(folder, environ={})
    victim = await WorkerProcess(folder).start()
    worker_processes.append(victim)
    bodies = requests("kill")
    async with (
        raw_peer(amqp_url, names.request_queue) as peer,
        SteadyLoad(peer.publish, bodies, per_s=40) as load,
    ):

        async def kill() -> None:
            victim.signal(signal.SIGKILL)
            assert await victim.wait() == -signal.SIGKILL

        # in flight: all the victim's, it is the only worker
        in_flight = await strike(load, kill, busy=lambda: len(peer.replies) >= 20 and fake.in_flight >= 3,
                                 in_flight=lambda: fake.in_flight)  # fmt: skip
        async with running_worker(settings) as successor:
            if await answered(load.sent, lambda: parsed(peer.replies)):
                await quiesce(successor, amqp_url, names.request_queue, peer.flush)

    row = await report(fault_reports, "kill -9 mid-load", load.sent, parsed(peer.replies),
                       fake=fake, settings=settings, in_flight=in_flight)  # fmt: skip
    # Only what the victim held unacked (its prefetch) can be served again: called again when it
    # died before storing its answer, answered again from the store when it died before the ack.
    assert row.extra_calls <= PREFETCH and row.twice <= PREFETCH


async def test_rabbitmq_restart(rabbit, config, names, fake, fault_reports):
    """The broker restarts: the worker and the agent reconnect; calls cut off are not made again."""
    fake.latency_s = LATENCY_S
    folder = config(bus={"prefetch": PREFETCH}, amqp=rabbit.url + FAST_RECONNECT, **LLM)
    settings = load_settings(folder, environ={})
    bodies = requests("rabbitmq")
    async with running_worker(settings) as worker, ReplyInbox(rabbit.url, names.request_queue) as inbox:
        async with SteadyLoad(inbox.publish_one, bodies, per_s=40) as load:
            in_flight = await strike(load, rabbit.restart,
                                     busy=lambda: len(inbox.replies) >= 20 and len(worker.in_flight) >= 3,
                                     in_flight=lambda: len(worker.in_flight))  # fmt: skip
        if await answered(load.sent, lambda: inbox.replies, timeout_s=120):
            await quiesce(worker, rabbit.url, names.request_queue, inbox.flush)
        assert worker.bus.connected and worker.bus.consuming

    row = await report(fault_reports, "RabbitMQ restart", load.sent, inbox.replies,
                       fake=fake, settings=settings, in_flight=in_flight)  # fmt: skip
    assert row.extra_calls == 0  # calls cut off by the restart were answered from the store


async def test_redis_restart(config, amqp_url, names, fake, fault_reports):
    """Redis (persistent, as production runs it) is killed and restarted seconds later: requests
    that arrive meanwhile fail closed to the dead-letter queue; replayed, each is answered once."""
    fake.latency_s = LATENCY_S
    redis = await PrivateRedis(persistent=True).start()
    try:
        settings = load_settings(config(bus={"prefetch": PREFETCH}, redis=redis.url, **LLM), environ={})
        bodies = requests("redis")
        async with running_worker(settings) as worker, raw_peer(amqp_url, names.request_queue) as peer:

            async def outage() -> None:
                await redis.stop()
                await asyncio.sleep(REDIS_OUTAGE_S)  # the outage, under load
                await redis.start()

            seen = await redis_fault_under_load(
                outage, bodies, worker=worker, peer=peer, settings=settings, amqp_url=amqp_url
            )

        row = await report(fault_reports, "Redis restart", seen.load.sent, parsed(peer.replies),
                           fake=fake, settings=settings, in_flight=seen.in_flight)  # fmt: skip
    finally:
        await redis.destroy()
    assert seen.failed > 0, "no request arrived during the outage"
    assert row.replayed == seen.replayed == seen.failed
    assert row.twice == 0  # a `failed` reply then an `ok` one is one answer; two `ok` would be a defect
    assert row.extra_calls == 0


async def test_sigterm_drain(config, amqp_url, names, fake, worker_processes, fault_reports):
    """One of two workers is stopped mid-load (a scale-down): it finishes its calls in flight and
    exits 0; the other serves the rest; no call is made twice."""
    fake.latency_s = 0.3
    folder = config(bus={"prefetch": PREFETCH}, **LLM)
    settings = load_settings(folder, environ={})
    leaving = await WorkerProcess(folder).start()
    worker_processes.append(leaving)
    bodies = requests("sigterm")
    async with running_worker(settings) as staying, raw_peer(amqp_url, names.request_queue) as peer:

        async def scale_down() -> None:
            leaving.signal(signal.SIGTERM)
            assert await leaving.wait(timeout_s=60) == 0

        async with SteadyLoad(peer.publish, bodies, per_s=40) as load:
            await strike(
                load,
                scale_down,
                busy=lambda: len(peer.replies) >= 30 and fake.in_flight >= 8,
                in_flight=lambda: fake.in_flight,
            )  # both workers': the leaving one logs its own
        if await answered(load.sent, lambda: parsed(peer.replies)):
            await quiesce(staying, amqp_url, names.request_queue, peer.flush)

    [draining] = leaving.events("worker.draining") or [{"in_flight": 0}]
    row = await report(fault_reports, "SIGTERM drain", load.sent, parsed(peer.replies),
                       fake=fake, settings=settings, in_flight=draining["in_flight"])  # fmt: skip
    [stopped] = leaving.events("worker.stopped")
    assert stopped["drained"] is True
    by_worker = Counter(m.headers["x-worker-id"] for m in peer.replies)
    assert by_worker[stopped["worker_id"]] == stopped["handled"] > 0
    assert row.twice == 0 and row.extra_calls == 0


async def test_poison_stream(config, amqp_url, names, fake, fault_reports):
    """Malformed messages of every kind among valid requests: each gets one `invalid` reply and a
    dead letter, never a provider call; the valid ones around them are served as usual."""
    fake.latency_s = LATENCY_S
    seed = int(os.environ.get("POISON_SEED") or random.randrange(1 << 30))  # the seed a failure names
    rng = random.Random(seed)
    poison = [body for body, _ in malformed_bodies(rng)]
    stream: list[bytes] = poison + [json.dumps(body).encode() for body in requests("poison")]
    rng.shuffle(stream)
    folder = config(bus={"prefetch": PREFETCH, "max_body_bytes": MAX_BODY}, **LLM)
    settings = load_settings(folder, environ={})
    in_flight_at_poison: list[int] = []

    async with running_worker(settings) as worker, raw_peer(amqp_url, names.request_queue) as peer:

        async def publish(body: bytes) -> str:
            if body in poison:
                in_flight_at_poison.append(len(worker.in_flight))
            return await peer.publish(body)

        async with SteadyLoad(publish, stream, per_s=40) as load:
            await load.finished()
        if await answered(load.sent, lambda: parsed(peer.replies)):
            await quiesce(worker, amqp_url, names.request_queue, peer.flush)

    replies = parsed(peer.replies)
    # The median: most of the poison landed while valid calls were in flight, not just one.
    in_flight = sorted(in_flight_at_poison)[len(in_flight_at_poison) // 2]
    row = await report(fault_reports, "poison stream", load.sent, replies,
                       fake=fake, settings=settings, in_flight=in_flight)  # fmt: skip
    statuses = Counter(result.status for _, result in replies)
    # A randomly damaged body may still be a valid request: ok, or, when the damage hit the agent's
    # name, forbidden (an agent not configured, answered and not dead-lettered). In 2,000 seeds of
    # malformed_bodies() 4.4 % held such a body, which this line used to fail on (seed 20: POISON_SEED=20).
    assert set(statuses) <= {Status.ok, Status.invalid, Status.forbidden}, f"seed {seed}: {statuses}"
    assert statuses[Status.invalid] >= len(poison) - 25  # the 25 randomly damaged may still be valid
    assert statuses[Status.forbidden] <= 25, f"seed {seed}: {statuses}"
    assert await queue_depth(amqp_url, names.dead_letter_queue) == statuses[Status.invalid]
    assert row.twice == 0 and row.extra_calls == 0, f"seed {seed}"


async def test_budget_race_across_four_replicas(
    config, amqp_url, names, fake, worker_processes, fault_reports
):
    """Four worker processes race for one small task budget: exactly what it allows is admitted,
    the rest is refused, and the ledger never goes over it."""
    fake.latency_s = LATENCY_S
    admitted = 30
    limit_usd = admitted * COST + COST / 2  # worst case == actual cost: the count admitted is exact
    budget = {
        "max_cost_per_task": limit_usd,
        "max_cost_per_day": 100.0,
        "max_cost_per_agent_day": {"writer": 100.0},
    }
    folder = config(bus={"prefetch": PREFETCH}, **exact_llm(fake.base_url, budget=budget, **LLM))
    settings = load_settings(folder, environ={})
    await start_replicas(folder, 4, worker_processes)

    bodies = requests("budget", 150, task_id="race")
    async with raw_peer(amqp_url, names.request_queue) as peer:
        async with SteadyLoad(peer.publish, bodies, per_s=200) as load:
            await eventually(lambda: any(refused(m) for m in peer.replies), what="the budget spent")
            in_flight = fake.in_flight  # admitted calls still running when the first is refused
            await load.finished()
        if await answered(load.sent, lambda: parsed(peer.replies)):
            await peer.flush()

    row = await report(fault_reports, "budget race, 4 replicas", load.sent, parsed(peer.replies),
                       fake=fake, settings=settings, in_flight=in_flight)  # fmt: skip
    statuses = Counter(result.status for _, result in parsed(peer.replies))
    assert statuses == {Status.ok: admitted, Status.budget_exceeded: len(bodies) - admitted}
    assert row.ledger_usd <= limit_usd
    assert row.twice == 0 and row.extra_calls == 0
    assert len({m.headers["x-worker-id"] for m in peer.replies}) == 4  # all four raced


def refused(message: Any) -> bool:
    return b'"budget_exceeded"' in message.body
