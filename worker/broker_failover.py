"""Connections to a RabbitMQ cluster: on losing a node, reconnect to the next one (issue #20).

aio-pika's robust connection reconnects, restoring its channels, QoS, topology and consumers,
but always to the one URL it was made with (``RobustConnection`` keeps ``self.url`` and its
connection factory calls ``Connection.connect``, which dials ``self.url``, every
``reconnect_interval``). With a node gone for good that is a worker idling until the node comes
back. :class:`FailoverConnection` is that robust connection with a list of brokers: each time a
connection ends or an attempt fails, aio-pika calls ``_on_connection_close`` (``UnderlayConnection
.connect`` calls it on a failed attempt too), and there the URL moves on to the next broker, so the
next attempt, and every restore after it, goes to another node.

Order (``bus.failover``): ``shuffle`` (the default) starts each worker at a random node so that a
fleet spreads over the cluster, then goes round the list from there; ``in_order`` starts at the
first and goes round in the order written, as kombu's ``round-robin`` failover strategy does.
``reconnect_interval`` is read from the first URL's query; ``heartbeat`` is set on each.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any, Literal

import structlog
from aio_pika import RobustConnection
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from yarl import URL

from worker.secrets import redact_url

log = structlog.get_logger("worker.broker")

Strategy = Literal["shuffle", "in_order"]


def failover_order(urls: Sequence[str], strategy: Strategy, rng: random.Random | None = None) -> list[str]:
    """The brokers in the order to try them: ``in_order`` as given, ``shuffle`` rotated to a
    random start (a rotation, not a full shuffle, keeps the operator's order from there on)."""
    if strategy == "in_order" or len(urls) < 2:
        return list(urls)
    start = (rng or random.Random()).randrange(len(urls))
    return [*urls[start:], *urls[:start]]


class FailoverConnection(RobustConnection):
    """A robust connection over several brokers; :attr:`url` is the one in use (or being tried)."""

    def __init__(self, urls: Sequence[str], **kwargs: Any):
        if not urls:
            raise ValueError("at least one broker URL is needed")
        self.urls = [URL(u) for u in urls]
        self._index = 0
        self.failovers = 0  # moves to another broker, for tests and logs
        super().__init__(self.urls[0], **kwargs)

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        lost = self.url
        await super()._on_connection_close(closing)
        if self._close_called or self.is_closed or len(self.urls) < 2:
            return
        self._index = (self._index + 1) % len(self.urls)
        # Keep the query options aio-pika parsed from the first URL: the next node gets the same.
        self.url = self.urls[self._index]
        self.failovers += 1
        log.warning(
            "broker.failover",
            lost=redact_url(str(lost)),
            next=redact_url(str(self.url)),
            reconnect_in_s=self.reconnect_interval,
        )


async def connect_failover(
    urls: Sequence[str],
    *,
    heartbeat: int,
    connection_name: str,
) -> AbstractRobustConnection:
    """Connect to the first broker of ``urls`` that answers, then stay robust across all of them.

    At start-up every broker is tried once, in order, before giving up with the last error: a
    worker starting while one node is down still starts.
    """
    last: BaseException | None = None
    for attempt in range(len(urls)):
        ordered = [*urls[attempt:], *urls[:attempt]]
        # aiormq reads the heartbeat from each URL's query, as connect_robust(heartbeat=) puts it.
        dialled = [str(URL(u).update_query(heartbeat=heartbeat)) for u in ordered]
        connection = FailoverConnection(dialled, client_properties={"connection_name": connection_name})
        try:
            await connection.connect()
        except (*CONNECTION_EXCEPTIONS, TimeoutError) as exc:
            # A refused login fails on every node alike: the last error is raised below.
            await connection.close()
            last = exc
            log.warning("broker.unreachable", url=redact_url(ordered[0]), error=type(exc).__name__)
            continue
        return connection
    assert last is not None
    raise last
