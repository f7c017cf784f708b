"""Helpers for the operations tests: the CLI as a subprocess, queue contents, dead letters, ledger."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import redis.asyncio as aioredis

from tests.conftest import ROOT
from tests.helpers import request_body
from worker.bus import Bus
from worker.ledger import BudgetLedger, ScopeState
from worker.settings import Settings


@dataclass
class CliRun:
    code: int
    out: str
    err: str


async def run_cli(
    config_dir: Path, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> CliRun:
    """``python -m worker --config DIR ARGS`` as a user would run it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "--config",
        str(config_dir),
        *args,
        cwd=ROOT,
        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", **(env or {})},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return CliRun(proc.returncode, out.decode(), err.decode())


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


async def day_state(settings: Settings) -> ScopeState:
    """Today's whole-day budget scope (spend, live reservations, calls) from the real ledger."""
    client = aioredis.Redis.from_url(settings.redis.url.get_secret_value())
    try:
        ledger = BudgetLedger(client, settings.redis.key_prefix, settings.llm.budget, reservation_ttl_s=60)
        return await ledger.state(ledger.day_scope(ledger.today()))
    finally:
        await client.aclose()


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], *, timeout_s: float = 30, what: str
) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = check()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for: {what}")
        await asyncio.sleep(0.05)


async def take_all(
    amqp_url: str, queue: str, *, idle_s: float = 5.0
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message now in ``queue``, consumed and acked (a consumer: ``basic.get`` is slow)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        q = await channel.declare_queue(queue, passive=True)
        expected = q.declaration_result.message_count or 0
        inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        tag = await q.consume(inbox.put)
        messages = []
        for _ in range(expected):
            message = await asyncio.wait_for(inbox.get(), idle_s)
            await message.ack()
            messages.append(message)
        await q.cancel(tag)
    return messages
