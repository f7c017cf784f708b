"""The fault suite on the distributed engines production runs (issue #20): a three-node RabbitMQ
cluster with the request queue a quorum queue on all three, and Redis with a replica and
Sentinel. Each fault lands under a steady load and is one row of the fault table, with
``recover_s``: the longest time the agents waited for any reply from the fault on.

Part of ``pytest -m chaos`` (``.ci/run``). The services are private (tests/support/cluster.py):
the shared broker and Redis are never stopped, joined or reconfigured.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import RabbitCluster
from tests.support.faults import (
    LATENCY_S,
    LLM,
    PREFETCH,
    ReplyGaps,
    SteadyLoad,
    answered,
    quiesce,
    record,
    requests,
    strike,
    tally,
)
from tests.support.peers import FAST_RECONNECT, ReplyInbox
from tests.support.queues import declare_topology
from tests.support.waits import eventually
from worker.app import running_worker
from worker.settings import Settings, load_settings

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]
OK = b'"status":"ok"'  # in a reply's body: an answer, not a fail-closed reply


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    nodes = RabbitCluster()
    try:
        asyncio.run(nodes.start())
        yield nodes
    finally:
        asyncio.run(nodes.destroy())


# -- RabbitMQ: three nodes, a quorum queue on all three ----------------------------------------


def cluster_config(config: Callable[..., Path], brokers: list[str]) -> Settings:
    """A worker trying ``brokers`` in order (so that the test knows which node it is on)."""
    bus = {"prefetch": PREFETCH, "url": [url + FAST_RECONNECT for url in brokers], "failover": "in_order"}
    return load_settings(config(bus=bus, **LLM), environ={})


async def leader_on(
    cluster: RabbitCluster, config: Callable[..., Path], queue: str, via: int
) -> dict[str, Any]:
    """Declare the topology through node ``via`` (a quorum queue's leader starts where it is
    declared) and return the queue as the cluster sees it."""
    node = cluster.nodes[via]
    await declare_topology(load_settings(config(bus={"url": node.url}), environ={}))
    return await asyncio.to_thread(cluster.queue, queue, node)


async def rejoined(cluster: RabbitCluster, node: Any) -> None:
    """Start a stopped node again; it rejoins from its own data directory."""
    await node.start()
    await eventually(lambda: len(cluster.running_nodes()) == len(cluster.nodes), timeout_s=60,
                     what=f"{node.node} back in the cluster")  # fmt: skip


async def test_quorum_queue_leader_stops(cluster, config, names, fake, fault_reports):
    """The node leading the request queue stops under load: a follower takes over the queue and
    the worker (on another node) goes on consuming; every request answered once, charged once."""
    a, b, c = cluster.nodes
    fake.latency_s = LATENCY_S
    settings = cluster_config(config, [b.url, c.url, a.url])
    queue = await leader_on(cluster, config, names.request_queue, via=0)
    assert queue["leader"] == a.node and set(queue["members"]) == {a.node, b.node, c.node}, queue
    try:
        async with (
            running_worker(settings) as worker,
            ReplyInbox(c.url, names.request_queue) as inbox,  # the agent's node stays up
            ReplyGaps(lambda: len(inbox.replies)).watching() as gaps,
        ):
            assert f":{b.port}/" in (worker.bus.broker or "")

            async def stop_leader() -> None:
                gaps.mark()
                await a.stop()

            async with SteadyLoad(inbox.publish_one, requests("leader"), per_s=40) as load:
                in_flight = await strike(load, stop_leader,
                                         busy=lambda: len(inbox.replies) >= 20 and len(worker.in_flight) >= 3,
                                         in_flight=lambda: len(worker.in_flight))  # fmt: skip
            if await answered(load.sent, lambda: inbox.replies, timeout_s=120):
                await quiesce(worker, c.url, names.request_queue, inbox.flush)
            assert worker.bus.connected and worker.bus.consuming
            assert f":{b.port}/" in (worker.bus.broker or "")  # its own node was never lost
        moved = await asyncio.to_thread(cluster.queue, names.request_queue, c)
        row = record(fault_reports, await tally("RMQ cluster: leader stop", load, inbox.replies, fake,
                                                settings, in_flight), gaps)  # fmt: skip
    finally:
        await rejoined(cluster, a)
    assert moved["leader"] in (b.node, c.node), moved
    row.assert_targets()
    assert row.extra_calls == 0


async def test_worker_node_crashes(cluster, config, names, fake, fault_reports, figures):
    """The node the worker is connected to is killed (SIGKILL) under load: the worker fails over
    to the next broker of its list and resumes consuming; calls cut off are answered from the
    store, never called again."""
    a, b, c = cluster.nodes
    fake.latency_s = LATENCY_S
    settings = cluster_config(config, [b.url, c.url, a.url])
    queue = await leader_on(cluster, config, names.request_queue, via=0)
    assert queue["leader"] == a.node, queue
    try:
        async with (
            running_worker(settings) as worker,
            ReplyInbox(c.url, names.request_queue) as inbox,
            ReplyGaps(lambda: len(inbox.replies)).watching() as gaps,
        ):
            assert f":{b.port}/" in (worker.bus.broker or "")

            async def crash_workers_node() -> None:
                gaps.mark()
                started = asyncio.get_running_loop().time()
                await b.crash()
                await eventually(lambda: worker.bus.connected and f":{c.port}/" in (worker.bus.broker or ""),
                                 what="the worker reconnected to the next node")  # fmt: skip
                reconnected_after.append(asyncio.get_running_loop().time() - started)

            reconnected_after: list[float] = []
            async with SteadyLoad(inbox.publish_one, requests("node"), per_s=40) as load:
                in_flight = await strike(load, crash_workers_node,
                                         busy=lambda: len(inbox.replies) >= 20 and len(worker.in_flight) >= 3,
                                         in_flight=lambda: len(worker.in_flight))  # fmt: skip
            if await answered(load.sent, lambda: inbox.replies, timeout_s=120):
                await quiesce(worker, c.url, names.request_queue, inbox.flush)
            assert worker.bus.connected and worker.bus.consuming
            assert f":{c.port}/" in (worker.bus.broker or ""), worker.bus.broker  # the next in its list
        row = record(fault_reports, await tally("RMQ cluster: worker node", load, inbox.replies, fake,
                                                settings, in_flight), gaps)  # fmt: skip
    finally:
        await rejoined(cluster, b)
    figures.append(
        f"RMQ cluster, worker's node killed: worker consuming on the next node {reconnected_after[0]:.2f} s "
        f"after the kill; longest wait for a reply {row.recover_s:.2f} s; {row.twice} requests answered "
        "twice (same answer, from the store)"
    )
    row.assert_targets()
    assert row.extra_calls == 0
