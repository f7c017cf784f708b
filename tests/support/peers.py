"""Raw AMQP peers for tests: publish any body, collect every reply, outlive a broker restart.

``LLMClient`` hides duplicates (it keeps the first reply per call); tests that must count
replies, or send malformed bodies, use these instead.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from worker.messages import LLMResult, Status

FLUSH_MARKER = "flush-marker"


class RawPeer:
    def __init__(
        self,
        channel: aio_pika.abc.AbstractChannel,
        reply_queue: aio_pika.abc.AbstractQueue,
        request_queue: str,
        user: str | None = None,
    ):
        self.channel, self.reply_queue, self.request_queue = channel, reply_queue, request_queue
        self.user = user  # the AMQP user_id it publishes with (its connection's broker user)
        self.replies: list[AbstractIncomingMessage] = []
        self._arrived = asyncio.Condition()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        async with self._arrived:
            self.replies.append(message)
            self._arrived.notify_all()

    async def publish(
        self,
        body: bytes | dict[str, Any],
        *,
        reply: bool = True,
        correlation_id: str | None = None,
        headers: dict[str, Any] | None = None,
        to: str | None = None,
        signed: bool = True,
    ) -> str:
        """Publish ``body`` to the request queue (or the queue ``to``), with ``user_id`` unless
        ``signed`` is false or the peer has no user; returns the correlation id."""
        raw = json.dumps(body).encode() if isinstance(body, dict) else body
        if correlation_id is None:
            correlation_id = (
                body.get("request_id", uuid.uuid4().hex) if isinstance(body, dict) else uuid.uuid4().hex
            )
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                body=raw,
                correlation_id=correlation_id,
                headers=headers or {},
                reply_to=self.reply_queue.name if reply else None,
                content_type="application/json",
                user_id=self.user if signed else None,
            ),
            routing_key=to or self.request_queue,
        )
        return correlation_id

    async def wait_replies(self, count: int, timeout_s: float = 30) -> list[AbstractIncomingMessage]:
        async def enough() -> None:
            async with self._arrived:
                await self._arrived.wait_for(lambda: len(self.replies) >= count)

        await asyncio.wait_for(enough(), timeout_s)
        return list(self.replies)

    def results(self) -> list[LLMResult]:
        return [LLMResult.model_validate_json(m.body) for m in self.replies]

    async def flush(self) -> None:
        """Deliver everything already in the reply queue: a marker sent now arrives after it (FIFO)."""
        count = len(self.replies) + 1
        await self.channel.default_exchange.publish(
            aio_pika.Message(b"{}", correlation_id=FLUSH_MARKER), routing_key=self.reply_queue.name
        )
        await self.wait_replies(count)
        self.replies[:] = [r for r in self.replies if r.correlation_id != FLUSH_MARKER]


@asynccontextmanager
async def raw_peer(amqp_url: str, request_queue: str, *, user: str | None = None) -> AsyncIterator[RawPeer]:
    """``user``: the URL's broker user, as an agent under enforced identity: publish with its
    ``user_id`` and read replies from a queue of its own (``llm.reply.<user>.*``)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        owner = f"llm.reply.{user}" if user else "t.reply"
        reply_queue = await channel.declare_queue(
            f"{owner}.{uuid.uuid4().hex}", exclusive=True, auto_delete=True
        )
        peer = RawPeer(channel, reply_queue, request_queue, user)
        await reply_queue.consume(peer._on_reply, no_ack=True)
        yield peer


# -- a stand-in for the worker, for the client's tests ----------------------------------------

Replier = Callable[[aio_pika.abc.AbstractIncomingMessage, aio_pika.abc.AbstractExchange], Awaitable[None]]


def result_for(request_id: str, content: str) -> bytes:
    return LLMResult(request_id=request_id, status=Status.ok, content=content).model_dump_json().encode()


@asynccontextmanager
async def fake_worker(amqp_url: str, queue: str, reply: Replier) -> AsyncIterator[list[str]]:
    """A peer on the request queue that answers each request with ``reply``; yields the ids seen."""
    seen: list[str] = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        q = await channel.declare_queue(queue, auto_delete=True)

        async def on_request(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                seen.append(json.loads(message.body)["request_id"])
                await reply(message, channel.default_exchange)

        await q.consume(on_request)
        yield seen


async def send(
    exchange: aio_pika.abc.AbstractExchange,
    to: str,
    correlation_id: str,
    body: bytes,
    *,
    user_id: str | None = None,
    kind: str | None = None,
) -> None:
    """A reply as a peer writes it: ``user_id`` (the broker checks it is the peer's) and AMQP ``type``."""
    message = aio_pika.Message(body=body, correlation_id=correlation_id, user_id=user_id, type=kind)
    await exchange.publish(message, routing_key=to)


FAST_RECONNECT = "?reconnect_interval=1"  # aio-pika's default is 5 s


class ReplyInbox:
    """An agent that outlives a broker restart: a durable reply queue read, and requests published
    with confirms, over one robust connection. Replies published before the restart are still
    there after it; a publish the restart cuts off is sent again until the broker confirms it."""

    def __init__(self, url: str, request_queue: str):
        self.url, self.request_queue = url, request_queue
        self.name = f"t.replies.{uuid.uuid4().hex[:8]}"
        self.results: dict[str, LLMResult] = {}  # the last reply per correlation id
        self.replies: list[tuple[str, LLMResult]] = []  # every reply, duplicates included
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._flushed = asyncio.Event()

    async def __aenter__(self) -> ReplyInbox:
        self._connection = await aio_pika.connect_robust(self.url + FAST_RECONNECT)
        channel = await self._connection.channel()
        self._queue = await channel.declare_queue(self.name, durable=True)
        await self._queue.consume(self._on_reply, no_ack=True)
        self._publisher = await self._connection.channel(publisher_confirms=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._connection is not None
        await self._connection.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        if message.correlation_id == FLUSH_MARKER:
            self._flushed.set()
            return
        result = LLMResult.model_validate_json(message.body)
        self.results[message.correlation_id or ""] = result
        self.replies.append((message.correlation_id or "", result))

    async def publish_one(self, body: dict[str, Any]) -> str:
        message = aio_pika.Message(
            json.dumps(body).encode(),
            correlation_id=body["request_id"],
            reply_to=self.name,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        while True:
            try:
                await self._publisher.default_exchange.publish(
                    message, routing_key=self.request_queue, timeout=5
                )
                return str(body["request_id"])
            except (*CONNECTION_EXCEPTIONS, aio_pika.exceptions.AMQPError, TimeoutError):
                await asyncio.sleep(0.2)  # the robust connection is coming back

    async def publish(self, bodies: list[dict[str, Any]]) -> None:
        for body in bodies:
            await self.publish_one(body)

    async def flush(self, timeout_s: float = 30) -> None:
        """Deliver every reply already in the queue: a marker sent now arrives after it (FIFO)."""
        self._flushed.clear()
        await self._publisher.default_exchange.publish(
            aio_pika.Message(b"{}", correlation_id=FLUSH_MARKER), routing_key=self.name, timeout=timeout_s
        )
        await asyncio.wait_for(self._flushed.wait(), timeout_s)
