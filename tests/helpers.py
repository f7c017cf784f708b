"""A raw AMQP peer for tests: publish any body, collect every reply, read the dead-letter queue.

``LLMClient`` hides duplicates (it keeps the first reply per call); tests that must count
replies, or send malformed bodies, use this instead.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from worker.messages import LLMResult


def request_body(prompt: str = "hello", *, agent: str = "writer", **fields: Any) -> dict[str, Any]:
    return {
        "request_id": fields.pop("request_id", uuid.uuid4().hex),
        "agent": agent,
        "messages": [{"role": "user", "content": prompt}],
        **fields,
    }


class RawPeer:
    def __init__(
        self,
        channel: aio_pika.abc.AbstractChannel,
        reply_queue: aio_pika.abc.AbstractQueue,
        request_queue: str,
    ):
        self.channel, self.reply_queue, self.request_queue = channel, reply_queue, request_queue
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
    ) -> str:
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
            ),
            routing_key=self.request_queue,
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


@asynccontextmanager
async def raw_peer(amqp_url: str, request_queue: str) -> AsyncIterator[RawPeer]:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        reply_queue = await channel.declare_queue(
            f"t.reply.{uuid.uuid4().hex}", exclusive=True, auto_delete=True
        )
        peer = RawPeer(channel, reply_queue, request_queue)
        await reply_queue.consume(peer._on_reply, no_ack=True)
        yield peer


async def drain_queue(amqp_url: str, queue: str) -> list[AbstractIncomingMessage]:
    """Every message now in ``queue`` (acked: the queue is empty afterwards)."""
    messages = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        q = await channel.declare_queue(queue, passive=True)
        while (message := await q.get(fail=False)) is not None:
            await message.ack()
            messages.append(message)
    return messages


async def queue_depth(amqp_url: str, queue: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        q = await channel.declare_queue(queue, passive=True)
        return q.declaration_result.message_count or 0
