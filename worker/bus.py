"""aio-pika: topology, consuming with a bounded prefetch, publishing with confirms, dead letters.

Two robust connections (over every broker of ``bus.url``: worker/broker_failover.py), one to
consume and one to publish, so broker flow control on publishes
never delays acks (RabbitMQ production checklist). Both reconnect by themselves and restore
their channels, QoS, topology and consumer; this object keeps strong references to all of them
because aio-pika restores only what is still referenced.

A consumer the broker cancels (its queue deleted; on RabbitMQ 4.3 a consumer timeout) is
re-subscribed by aio-pika 10.2 itself (its README, "Consumer recovery"; aio-pika #334 is fixed
there). :meth:`Bus.watch_consumer` checks that this really happened: a consumer still missing
``bus.consumer_recovery_s`` after the cancel, while connected, sets :attr:`Bus.consumer_lost` so
the worker exits non-zero and the platform restarts it, instead of idling silently.

Topology (names from ``bus.yaml``)::

    request_queue  quorum, durable; x-dead-letter-exchange=dead_letter_exchange,
    (batch_queue   the same, for batch requests: consumed on a channel of its own with
                   batch_prefetch, so interactive requests never queue behind batch work)
                   x-delivery-limit, at-least-once dead-lettering
    dead_letter_exchange (fanout) -> dead_letter_queue (quorum, durable, x-delivery-limit 10^6:
                   browsing it requeues, and from 4.0 a quorum queue's default limit of 20
                   would silently drop a dead letter after its 20th `dlq list`)
    results_exchange (topic): results of requests without reply_to, routing key = agent
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from worker import connections
from worker.errors import ConfigError
from worker.messages import (
    CHUNK_TYPE,
    EMBEDDING_RESULT_TYPE,
    RESULT_TYPE,
    EmbeddingResult,
    LLMChunk,
    LLMResult,
)
from worker.settings import BusSettings

log = structlog.get_logger("worker.bus")

PUBLISH_TIMEOUT_S = 30.0
# Of a body refused for its size, what its dead-letter copy keeps (with its size and SHA-256):
# a 20 MiB body was copied whole into the dead-letter queue (issue #16).
DEAD_LETTER_PREFIX_BYTES = 4096
# Not -1 ("unlimited" from 4.0): RabbitMQ 3.10 drops a message at once under a negative limit.
DEAD_LETTER_DELIVERY_LIMIT = 1_000_000
Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]


def request_queue_arguments(settings: BusSettings) -> dict[str, Any]:
    """Arguments of the request queue; supported by RabbitMQ 3.10 through 4.x."""
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": settings.dead_letter_exchange,
        "x-delivery-limit": settings.delivery_limit,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def dead_letter_queue_arguments() -> dict[str, Any]:
    return {"x-queue-type": "quorum", "x-delivery-limit": DEAD_LETTER_DELIVERY_LIMIT}


class Bus:
    def __init__(self, settings: BusSettings, *, name: str = "llm-worker"):
        self.settings = settings
        self.name = name
        self._consume_conn: AbstractRobustConnection | None = None
        self._publish_conn: AbstractRobustConnection | None = None
        self._consume_ch: AbstractChannel | None = None
        self._batch_ch: AbstractChannel | None = None
        self.batch_queue: AbstractQueue | None = None
        self._batch_tag: str | None = None
        self._publish_ch: AbstractChannel | None = None
        self.request_queue: AbstractQueue | None = None
        self.dead_letter_queue: AbstractQueue | None = None
        self._results: AbstractExchange | None = None
        self._dlx: AbstractExchange | None = None
        # aiormq matches a basic.return to its publish by message_id: two publishes in flight with
        # one id (a reply and its duplicate's) would each get the other's verdict. See _one_by_id.
        self._in_flight: dict[str, tuple[asyncio.Lock, int]] = {}
        self._consumer_tag: str | None = None
        self.consumer_lost = asyncio.Event()
        self._watchdog: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def connect(self) -> None:
        # One order for both connections, so that they start on the same node (broker_failover.py).
        urls = connections.broker_order(self.settings)
        self._consume_conn = await connections.amqp_robust(self.settings, urls, name=f"{self.name}:consume")
        self._publish_conn = await connections.amqp_robust(self.settings, urls, name=f"{self.name}:publish")
        self._consume_ch = await self._consume_conn.channel(publisher_confirms=False)
        await self._consume_ch.set_qos(prefetch_count=self.settings.prefetch)
        self._batch_ch = await self._consume_conn.channel(publisher_confirms=False)
        await self._batch_ch.set_qos(prefetch_count=self.settings.batch_prefetch)
        self._publish_ch = await self._publish_conn.channel(publisher_confirms=True, on_return_raises=False)
        await self.declare_topology()

    async def declare_topology(self) -> None:
        """Declare exchanges and queues; a mismatch with what exists names the fix."""
        assert self._consume_ch is not None, "call connect() first"
        assert self._publish_ch is not None
        s = self.settings
        try:
            self._dlx = await self._publish_ch.declare_exchange(
                s.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
            )
            self.dead_letter_queue = await self._consume_ch.declare_queue(
                s.dead_letter_queue, durable=True, arguments=dead_letter_queue_arguments()
            )
            await self.dead_letter_queue.bind(s.dead_letter_exchange)
            self.request_queue = await self._consume_ch.declare_queue(
                s.request_queue, durable=True, arguments=request_queue_arguments(s)
            )
            assert self._batch_ch is not None
            self.batch_queue = await self._batch_ch.declare_queue(
                s.batch_queue_name, durable=True, arguments=request_queue_arguments(s)
            )
            self._results = await self._publish_ch.declare_exchange(
                s.results_exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
        except aiormq.exceptions.PreconditionFailed as exc:
            raise ConfigError(
                "bus.yaml",
                "bus",
                f"the broker already has this queue or exchange with other settings ({exc}); delete it "
                "(after draining it) or choose another name in bus.yaml",
            ) from None

    async def close(self) -> None:
        await self._stop_watchdog()
        for conn in (self._consume_conn, self._publish_conn):
            if conn is not None and not conn.is_closed:
                await conn.close()

    @property
    def connected(self) -> bool:
        return all(
            c is not None and not c.is_closed and c.connected.is_set()
            for c in (self._consume_conn, self._publish_conn)
        )

    @property
    def broker(self) -> str | None:
        """The broker the consumer's connection is on (or dialling), password redacted."""
        return str(self._consume_conn) if self._consume_conn is not None else None  # password: ******

    # -- consuming -----------------------------------------------------------------------------

    async def start_consuming(self, handler: Handler) -> None:
        assert self.request_queue is not None and self.batch_queue is not None
        self._consumer_tag = await self.request_queue.consume(handler, no_ack=False)
        self._batch_tag = await self.batch_queue.consume(handler, no_ack=False)
        self._watchdog = asyncio.create_task(self.watch_consumer(), name="consumer-watchdog")

    async def stop_consuming(self) -> None:
        """Stop new deliveries; those already received stay ours to finish and ack."""
        await self._stop_watchdog()
        if self.batch_queue is not None and self._batch_tag is not None:
            tag, self._batch_tag = self._batch_tag, None
            try:
                await self.batch_queue.cancel(tag, timeout=PUBLISH_TIMEOUT_S)
            except CONNECTION_EXCEPTIONS as exc:
                log.warning("consumer.cancel_failed", error=f"{type(exc).__name__}: {exc}")
        if self.request_queue is not None and self._consumer_tag is not None:
            tag, self._consumer_tag = self._consumer_tag, None
            try:
                await self.request_queue.cancel(tag, timeout=PUBLISH_TIMEOUT_S)
            except CONNECTION_EXCEPTIONS as exc:
                # The channel is gone: the broker has stopped delivering to it anyway.
                log.warning("consumer.cancel_failed", error=f"{type(exc).__name__}: {exc}")

    @property
    def consuming(self) -> bool:
        return self._consumer_tag is not None

    async def consumer_registered(self) -> bool | None:
        """Whether the broker delivers to our consumer now; None while disconnected (unknown)."""
        channel = self._consume_ch
        if self._consumer_tag is None or channel is None or not self.connected or channel.is_closed:
            return None
        try:
            underlay = await asyncio.wait_for(channel.get_underlay_channel(), 1.0)
        except CONNECTION_EXCEPTIONS:
            return None
        return self._consumer_tag in underlay.consumers

    async def watch_consumer(self) -> None:
        """Set :attr:`consumer_lost` when the consumer stays cancelled for ``consumer_recovery_s``."""
        grace_s = self.settings.consumer_recovery_s
        missing_since: float | None = None
        while self._consumer_tag is not None:
            await asyncio.sleep(min(5.0, grace_s / 4))
            registered = await self.consumer_registered()
            if registered is None:  # reconnecting: aio-pika restores the consumer with the channel
                continue
            if registered:
                if missing_since is not None:
                    log.info("consumer.restored", queue=self.settings.request_queue)
                missing_since = None
                continue
            now = time.monotonic()
            if missing_since is None:
                missing_since = now
                log.warning("consumer.missing", queue=self.settings.request_queue, grace_s=grace_s)
            elif now - missing_since >= grace_s:
                log.error(
                    "consumer.lost",
                    queue=self.settings.request_queue,
                    missing_s=round(now - missing_since, 1),
                    fix="the broker cancelled our consumer and re-subscribing keeps failing (queue "
                    "deleted, redeclared with other arguments, or permissions changed?); exiting "
                    "so that the platform restarts the worker",
                )
                self.consumer_lost.set()
                return

    async def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None

    @staticmethod
    async def give_back(message: AbstractIncomingMessage, *, reason: str) -> None:
        """Requeue a delivery we will not finish (``nack``, which RabbitMQ 4.3 does not count
        against the delivery limit); when the channel is gone the broker has requeued it already."""
        if message.processed:
            return
        try:
            await message.nack(requeue=True)
        except CONNECTION_EXCEPTIONS as exc:
            log.info("request.requeue_by_broker", reason=reason, error=type(exc).__name__)

    # -- publishing ----------------------------------------------------------------------------

    async def reply(
        self,
        result: LLMResult | EmbeddingResult,
        *,
        reply_to: str | None,
        correlation_id: str | None,
        headers: dict[str, Any],
        message_type: str = RESULT_TYPE,
    ) -> str:
        """Publish ``result`` (AMQP ``type`` ``message_type``) and wait for the broker's confirm.

        Returns ``"replied"``, ``"published"`` (to the results exchange, no ``reply_to``),
        ``"unroutable"`` (the reply queue is gone: the caller left) or ``"refused"`` (the broker
        nacked it: a full reply queue that rejects publishes). The consumer decides what becomes
        of an answer that was not delivered.
        """
        assert self._publish_ch is not None, "call connect() first"
        assert self._results is not None
        message = aio_pika.Message(
            body=result.model_dump_json().encode(),
            content_type="application/json",
            correlation_id=correlation_id or result.request_id,
            message_id=result.request_id,
            user_id=self._signed_by(),
            type=EMBEDDING_RESULT_TYPE if isinstance(result, EmbeddingResult) else message_type,
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            timestamp=datetime.now(UTC),
        )
        exchange = self._publish_ch.default_exchange if reply_to else self._results
        try:
            async with self._one_by_id(result.request_id):
                confirm = await exchange.publish(
                    message,
                    routing_key=reply_to or result.agent or "unknown",
                    mandatory=True,
                    timeout=PUBLISH_TIMEOUT_S,
                )
        except aiormq.exceptions.DeliveryError:  # basic.nack: the broker will not take it
            return "refused"
        if _returned(confirm):
            return "unroutable"
        return "replied" if reply_to else "published"

    async def chunk(
        self, chunk: LLMChunk, *, reply_to: str, correlation_id: str | None, headers: dict[str, Any]
    ) -> None:
        """Publish a piece of a streamed answer: transient, not mandatory (an unroutable chunk is
        dropped: the final result says what became of the answer), on the reply channel.

        The reply channel, because RabbitMQ keeps order per channel only: a chunk published on a
        channel of its own could arrive after the final result. The channel confirms every publish,
        but only the stream's sender task waits for it (:mod:`worker.chunks`), never the model.
        """
        assert self._publish_ch is not None, "call connect() first"
        message = aio_pika.Message(
            body=chunk.model_dump_json(exclude_none=True).encode(),
            content_type="application/json",
            correlation_id=correlation_id or chunk.request_id,
            message_id=f"{chunk.request_id}#{chunk.seq}",
            user_id=self._signed_by(),
            type=CHUNK_TYPE,
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
        )
        await self._publish_ch.default_exchange.publish(
            message, routing_key=reply_to, mandatory=False, timeout=PUBLISH_TIMEOUT_S
        )

    def _signed_by(self) -> str | None:
        """The AMQP ``user_id`` of our replies and chunks: the broker user we publish as.

        RabbitMQ refuses a publish whose ``user_id`` is not its connection's user (validated
        user-ID), so an agent that learns another's reply queue cannot pass a message off as ours:
        ``LLMClient(worker_user=...)`` takes replies only from this user. With PLAIN login (an AMQP
        URL's user, ``guest`` when it names none, as aiormq logs in); with another mechanism
        (EXTERNAL: the user is the certificate's) the name is not known here and none is set.
        """
        return connections.login_user(self._publish_conn)

    async def dead_letter(self, message: AbstractIncomingMessage, reason: dict[str, Any]) -> None:
        """Copy ``message`` to the dead-letter exchange with ``reason`` in ``x-dlq-*`` headers.

        The copy keeps the body and the properties (:func:`persistent_copy`), so that a replay
        sends the request as it came; a body over ``max_body_bytes`` keeps its first
        ``DEAD_LETTER_PREFIX_BYTES`` and its size and SHA-256 in ``x-dlq-body-*``. Raises when the
        broker does not confirm, so the caller does not ack.
        """
        assert self._dlx is not None
        headers = {k: v for k, v in (message.headers or {}).items() if not str(k).startswith("x-dlq-")}
        headers.update({f"x-dlq-{k}": v for k, v in reason.items() if v is not None})
        if message.user_id:  # who sent it, as RabbitMQ vouched; the copy is signed by us (below)
            headers["x-dlq-user-id"] = message.user_id
        body = message.body
        if len(body) > self.settings.max_body_bytes:  # refused for its size: keep a sample, not all of it
            headers.update(
                {
                    "x-dlq-body-bytes": len(body),
                    "x-dlq-body-sha256": hashlib.sha256(body).hexdigest(),
                    "x-dlq-body-truncated": True,
                }
            )
            body = body[:DEAD_LETTER_PREFIX_BYTES]
        async with self._one_by_id(message.message_id):
            confirm = await self._dlx.publish(
                persistent_copy(message, headers, body=body, user_id=self._signed_by()),
                routing_key=self.settings.request_queue,
                mandatory=True,
                timeout=PUBLISH_TIMEOUT_S,
            )
        if _returned(confirm):
            raise RuntimeError(
                f"dead-letter exchange {self.settings.dead_letter_exchange} routes nowhere; "
                f"is {self.settings.dead_letter_queue} bound to it?"
            )

    @contextlib.asynccontextmanager
    async def _one_by_id(self, message_id: str | None) -> AsyncIterator[None]:
        """One mandatory publish at a time per ``message_id`` on the publish channel.

        aiormq finds the publish a ``basic.return`` belongs to by the message's ``message_id``
        (``Channel.message_id_delivery_tag``), the last publish with that id winning. A reply and
        the reply to its duplicate, in flight together, were each told the other's fate: one
        answer to a gone queue was logged as ``replied`` while its return went unclaimed.
        """
        if message_id is None:  # aiormq gives it a random id of its own
            yield
            return
        lock, users = self._in_flight.get(message_id, (asyncio.Lock(), 0))
        self._in_flight[message_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._in_flight[message_id]
            if users == 1:
                del self._in_flight[message_id]
            else:
                self._in_flight[message_id] = (lock, users - 1)


def _returned(confirm: object) -> bool:
    """aio-pika returns the message itself (not an Ack frame) when a mandatory publish was unroutable."""
    return isinstance(confirm, aiormq.abc.DeliveredMessage)


def persistent_copy(
    message: AbstractIncomingMessage,
    headers: dict[str, Any],
    *,
    body: bytes | None = None,
    user_id: str | None = None,
) -> aio_pika.Message:
    """``message`` to publish again (a dead letter, a replay): its body (or ``body``) and
    properties, persistent, stamped now, with ``headers`` instead of its own. Its ``user_id`` is
    the publisher's (``user_id``: RabbitMQ refuses any other), never the original's."""
    return aio_pika.Message(
        user_id=user_id,
        body=message.body if body is None else body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        correlation_id=message.correlation_id,
        message_id=message.message_id,
        reply_to=message.reply_to,
        type=message.type,
        priority=message.priority,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        timestamp=datetime.now(UTC),
    )
