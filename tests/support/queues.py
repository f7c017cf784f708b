"""Reading the broker's queues: how deep, every message in one, and dead letters put there directly."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from tests.support.bodies import request_body
from worker.bus import Bus
from worker.settings import Settings


async def drain_queue(
    amqp_url: str, queue: str, *, keep: bool = False, idle_s: float = 5.0
) -> list[AbstractIncomingMessage]:
    """Every message now in ``queue``: acked, so the queue is empty afterwards, or with ``keep``
    requeued, so it is left in place. A consumer, not ``basic.get`` (one round trip a message is
    slow for the thousands a replay test reads); every message is held unacked until all have
    arrived, so none is delivered twice."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=0)  # no limit: all of them unacked at once
        q = await channel.declare_queue(queue, passive=True)
        expected = q.declaration_result.message_count or 0
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        tag = await q.consume(inbox.put) if expected else None
        messages = [await asyncio.wait_for(inbox.get(), idle_s) for _ in range(expected)]
        if tag is not None:
            await q.cancel(tag)
        for message in messages:
            await (message.nack(requeue=True) if keep else message.ack())
    return messages


async def queue_depth(amqp_url: str, queue: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        q = await channel.declare_queue(queue, passive=True)
        return q.declaration_result.message_count or 0


async def depth_is(amqp_url: str, queue: str, count: int) -> bool:
    return await queue_depth(amqp_url, queue) == count


async def depth_at_least(amqp_url: str, queue: str, count: int) -> bool:
    return await queue_depth(amqp_url, queue) >= count


async def declare_topology(settings: Settings) -> None:
    """Declare the queues and exchanges the way a worker does at start-up, without a worker."""
    bus = Bus(settings.bus, name="test-topology")
    await bus.connect()
    await bus.close()


async def publish_dead_letters(
    settings: Settings, count: int, *, reason: str = "ServerError", agent: str = "writer", **headers: Any
) -> list[dict[str, Any]]:
    """Put ``count`` dead letters shaped like the worker's straight into the dead-letter queue."""
    bodies = [request_body(f"dead {i}", agent=agent, trace_id=uuid.uuid4().hex) for i in range(count)]
    connection = await aio_pika.connect(settings.bus.url.get_secret_value())
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await asyncio.gather(
            *(
                channel.default_exchange.publish(
                    aio_pika.Message(
                        body=json.dumps(body).encode(),
                        content_type="application/json",
                        correlation_id=body["request_id"],
                        message_id=body["request_id"],
                        reply_to="t.nobody.listens",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        headers={
                            "x-dlq-reason": reason,
                            "x-dlq-message": f"{reason}: from the test",
                            "x-dlq-at": datetime.now(UTC).isoformat(),
                            "x-dlq-worker": "test",
                            "x-dlq-agent": agent,
                            "x-dlq-request-id": body["request_id"],
                            **headers,
                        },
                    ),
                    routing_key=settings.bus.dead_letter_queue,
                )
                for body in bodies
            )
        )
    return bodies


def body_of(message: aio_pika.abc.AbstractIncomingMessage) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(message.body)
    return data
