"""Redis that survives losing its primary (issue #20): a primary, a replica and three Sentinels
under load; what asynchronous replication can lose and what ``WAIT`` after the settle costs;
and why the ledger needs one hash slot on Redis Cluster.

Part of ``pytest -m chaos`` (``.ci/run``): every Redis here is private (tests/support/cluster.py).
Measured figures are printed under the fault table, after the machine line.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, ResponseError

from tests.support.cluster import RedisClusterSet, SentinelSet
from tests.support.faults import (
    LATENCY_S,
    LLM,
    PREFETCH,
    ReplyGaps,
    parsed,
    record,
    redis_fault_under_load,
    requests,
    tally,
)
from tests.support.peers import raw_peer
from tests.support.services import PrivateRedis
from tests.support.waits import eventually
from worker import connections
from worker.app import running_worker
from worker.settings import Budget, Settings, load_settings
from worker.state.ledger import BudgetLedger, to_nano
from worker.state.results import request_key, result_key

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]
OK = b'"status":"ok"'  # in a reply's body: an answer, not a fail-closed reply
BUDGET = Budget(max_cost_per_task=1e6, max_cost_per_day=1e9, max_cost_per_agent_day={"writer": 1e7})


def sentinel_config(folder: Path, sentinels: SentinelSet, *, wait_replicas: int) -> Settings:
    path = folder / "redis.yaml"
    data = yaml.safe_load(path.read_text())
    redis = data["redis"]
    redis.pop("url")
    redis.update(sentinel=sentinels.addresses, sentinel_service=sentinels.service,
                 settle_wait_replicas=wait_replicas, settle_wait_timeout_ms=100)  # fmt: skip
    path.write_text(yaml.safe_dump(data))
    return load_settings(folder, environ={})


async def stored_answers(settings: Settings, request_ids: list[str]) -> int:
    client = connections.redis(settings)
    async with client:
        prefix = settings.redis.key_prefix
        keys = [result_key(prefix, request_key("", "writer", rid)) for rid in request_ids]
        return int(await client.exists(*keys)) if keys else 0


@pytest.mark.parametrize("wait_replicas", [0, 1], ids=["async-replication", "WAIT-1"])
async def test_redis_primary_killed(wait_replicas, config, amqp_url, names, fake, fault_reports, figures):
    """The Redis primary is killed under load: the Sentinels promote the replica and the worker
    follows it by itself. Requests arriving before the promotion fail closed to the dead-letter
    queue and are replayed. What the failover lost is measured: charges, stored answers,
    reservations left; with ``settle_wait_replicas: 1`` nothing answered may be lost."""
    fake.latency_s = LATENCY_S
    sentinels = SentinelSet()
    try:
        await sentinels.start()
        settings = sentinel_config(
            config(bus={"prefetch": PREFETCH}, **LLM), sentinels, wait_replicas=wait_replicas
        )
        async with (
            running_worker(settings) as worker,
            raw_peer(amqp_url, names.request_queue) as peer,
            ReplyGaps(lambda: sum(OK in m.body for m in peer.replies)).watching() as gaps,
        ):
            promoted_after: list[float] = []

            async def kill_primary() -> None:
                gaps.mark()
                started = asyncio.get_running_loop().time()
                await sentinels.primary.stop()  # SIGKILL
                await eventually(lambda: _is(sentinels.primary_port(), sentinels.replica.port),
                                 timeout_s=30, what="the replica promoted")  # fmt: skip
                promoted_after.append(asyncio.get_running_loop().time() - started)

            seen = await redis_fault_under_load(
                kill_primary,
                requests("sentinel"),
                worker=worker,
                peer=peer,
                settings=settings,
                amqp_url=amqp_url,
            )
        fault = f"Redis failover, {'WAIT 1' if wait_replicas else 'async'}"
        tallied = await tally(fault, seen.load, parsed(peer.replies), fake, settings, seen.in_flight)
        row = record(fault_reports, tallied, gaps)
        ok_ids = [r.request_id for _, r in parsed(peer.replies) if r.status.value == "ok"]
        stored = await stored_answers(settings, sorted(set(ok_ids)))
    finally:
        await sentinels.destroy()
    figures.append(
        f"{fault}: replica promoted {promoted_after[0]:.2f} s after the kill; failed closed and replayed "
        f"{seen.failed}; lost charges {row.ok - row.ledger_calls}, lost stored answers "
        f"{len(set(ok_ids)) - stored} of {len(set(ok_ids))}, reservations left {row.reserved_usd:g} USD"
    )
    assert row.lost == 0 and row.different_answers == []
    if wait_replicas:  # every answer sent was on the replica before it was sent
        row.assert_targets()
        assert stored == len(set(ok_ids))


async def _is(port: Any, expected: int) -> bool:
    return bool(await port == expected)


# -- what WAIT costs, and what it saves ------------------------------------------------------


async def replicated_pair() -> tuple[PrivateRedis, PrivateRedis]:
    primary, replica = await PrivateRedis().start(), await PrivateRedis().start()
    client = aioredis.Redis(port=replica.port)
    async with client:
        await client.replicaof("127.0.0.1", primary.port)

        async def in_sync() -> bool:
            return (await client.info("replication")).get("master_link_status") == "up"

        await eventually(in_sync, what="the replica in sync")
    return primary, replica


async def timed_settles(ledger: BudgetLedger, count: int, tag: str) -> list[float]:
    """Reserve then settle ``count`` requests one by one; the settles' durations, sorted."""
    took = []
    for i in range(count):
        reservation = await ledger.reserve(f"{tag}{i}", to_nano(0.002), ledger.scopes("writer", None))
        started = time.perf_counter()
        await ledger.settle(reservation, cost_nano=to_nano(0.001), model="m", result_json='{"status":"ok"}')
        took.append(time.perf_counter() - started)
    return sorted(took)


def quantiles(took: list[float]) -> str:
    return f"p50 {took[len(took) // 2] * 1e3:.2f} ms, p99 {took[int(len(took) * 0.99)] * 1e3:.2f} ms"


async def test_settle_wait_latency(figures):
    """Settle latency without and with ``WAIT 1 100`` on a primary with one replica, and with the
    replica stalled (SIGSTOP): then every settle with WAIT takes its whole timeout, and is
    reported unreplicated, while settles without it do not notice."""
    primary, replica = await replicated_pair()
    client = aioredis.Redis(port=primary.port, max_connections=8)
    prefix = f"t:{uuid.uuid4().hex[:8]}:"
    plain = BudgetLedger(client, prefix, BUDGET, reservation_ttl_s=60)
    waiting = BudgetLedger(client, prefix, BUDGET, reservation_ttl_s=60, settle_wait=(1, 100))
    try:
        await timed_settles(plain, 50, "warm")
        without: list[float] = []
        with_wait: list[float] = []
        for rnd in range(4):  # interleaved, so that machine noise falls on both alike
            without += await timed_settles(plain, 100, f"a{rnd}-")
            with_wait += await timed_settles(waiting, 100, f"w{rnd}-")
        without.sort()
        with_wait.sort()
        follower = aioredis.Redis(port=replica.port)
        async with follower:  # what WAIT returned for is on the replica
            day = plain.day_scope(plain.today())
            assert int(await follower.hget(f"{prefix}budget:{day.name}", "calls") or 0) == 850
        assert replica.proc is not None
        replica.proc.send_signal(signal.SIGSTOP)
        try:
            stalled = await timed_settles(plain, 20, "lag-")
            stalled_wait = await timed_settles(waiting, 5, "lagw-")
        finally:
            replica.proc.send_signal(signal.SIGCONT)
    finally:
        await client.aclose()
        await primary.destroy()
        await replica.destroy()
    figures.append(f"settle, async replication: {quantiles(without)} (n={len(without)})")
    figures.append(f"settle + WAIT 1 100, replica healthy: {quantiles(with_wait)} (n={len(with_wait)})")
    figures.append(
        f"replica stalled (SIGSTOP): settle {quantiles(stalled)} without WAIT, "
        f"{quantiles(stalled_wait)} with WAIT 1 100"
    )
    assert with_wait[len(with_wait) // 2] < 0.01  # healthy: far below the timeout
    assert min(stalled_wait) >= 0.1  # a stalled replica costs each settle the whole timeout


# -- Redis Cluster: one ledger, one slot ----------------------------------------------------


async def test_ledger_on_redis_cluster_needs_a_hash_tag():
    """On a three-primary Redis Cluster the ledger works when the key prefix carries a hash tag
    (every key of a script in one slot), and is refused without one (CROSSSLOT)."""
    nodes = RedisClusterSet()
    try:
        await nodes.start()
        client = RedisCluster(host="127.0.0.1", port=nodes.ports[0])
        tag = uuid.uuid4().hex[:8]
        tagged = BudgetLedger(client, f"{{llmw-{tag}}}:", BUDGET, reservation_ttl_s=60)  # type: ignore[arg-type]
        reservation = await tagged.reserve("r1", to_nano(0.002), tagged.scopes("writer", "task-1"))
        assert await tagged.settle(
            reservation, cost_nano=to_nano(0.001), model="m", result_json='{"status":"ok"}'
        )
        state = await tagged.state(tagged.day_scope(tagged.today()))
        assert state.calls == 1 and state.spent_usd == 0.001
        untagged = BudgetLedger(client, f"llmw-{tag}:", BUDGET, reservation_ttl_s=60)  # type: ignore[arg-type]
        with pytest.raises((RedisClusterException, ResponseError), match=r"(?i)slot"):
            await untagged.reserve("r2", to_nano(0.002), untagged.scopes("writer", "task-1"))
        await client.aclose()
    finally:
        await nodes.destroy()
