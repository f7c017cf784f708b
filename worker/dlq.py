"""The dead-letter queue for operators: list, show, replay, purge (``python -m worker dlq ...``).

Two kinds of dead letters arrive in ``bus.dead_letter_queue``, and both keep the request's body
and properties:

- copies the worker published (invalid, failed, crashed requests), with its reason in
  ``x-dlq-reason``, ``x-dlq-message``, ``x-dlq-attempts``, ``x-dlq-at``, ``x-dlq-worker``,
  ``x-dlq-agent``, ``x-dlq-request-id``, ``x-dlq-trace-id``;
- requests the broker dead-lettered itself because they reached the request queue's
  ``x-delivery-limit`` (workers kept dying on them): ``x-death`` and
  ``x-first-death-reason: delivery_limit``.

Reading the queue takes messages without acking them and requeues them afterwards (AMQP 0-9-1
cannot browse), so an interrupted command leaves every message in place. Replay publishes each
chosen message to the request queue with a publisher confirm and acks (removes) it from the
dead-letter queue only after that confirm: a crash in between leaves it in both queues, which
idempotency by ``request_id`` makes harmless, and never in neither. Each replay adds 1 to
``x-replay-count``; messages at the cap are left in place.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from worker.bus import persistent_copy
from worker.errors import WorkerError
from worker.settings import BusSettings, redact_url

DEFAULT_MAX_REPLAYS = 3
REPLAY_WINDOW = 50  # publishes awaiting their confirms at once
PUBLISH_TIMEOUT_S = 30.0
SCAN_IDLE_S = 5.0  # seconds: a scan stops early when no message comes for this long
SCAN_GRACE_S = 0.5  # seconds: ... or for this long once the count at the start is reached
# AMQP's prefetch-count is 16 bits, and "unlimited" (0) means 2,000 on a quorum queue (measured on
# 3.10): a scan holds at most this many messages it does not remove at once.
_MAX_PREFETCH = 65535
_PEEK_LIMIT_BYTES = 4 * 1_048_576


class DeadLetterError(WorkerError):
    """The dead-letter queue could not be read or a replay could not be published."""


@dataclass(frozen=True)
class RequestPeek:
    """The identifiers of a request body, read without validating it (it may be anything)."""

    request_id: str | None = None
    agent: str | None = None
    trace_id: str | None = None


def peek_request(body: bytes) -> RequestPeek:
    if len(body) > _PEEK_LIMIT_BYTES:
        return RequestPeek()
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past Python's limit
        return RequestPeek()
    if not isinstance(data, dict):
        return RequestPeek()

    def text(key: str) -> str | None:
        value = data.get(key)
        return value[:200] if isinstance(value, str) else None

    return RequestPeek(text("request_id"), text("agent"), text("trace_id"))


def is_dead_letter_header(name: str) -> bool:
    """Headers that describe a death; a replayed message starts without them."""
    return name.startswith(("x-dlq-", "x-first-death-", "x-last-death-")) or name in (
        "x-death",
        "x-delivery-count",
    )


@dataclass
class DeadLetter:
    """One message of the dead-letter queue and why it is there."""

    message: AbstractIncomingMessage
    reason: str
    detail: str | None
    request_id: str | None
    agent: str | None
    trace_id: str | None
    dead_at: datetime | None
    replays: int
    headers: dict[str, Any] = field(repr=False)

    @classmethod
    def from_message(cls, message: AbstractIncomingMessage) -> DeadLetter:
        headers = dict(message.headers or {})
        peek = peek_request(message.body)
        deaths = headers.get("x-death")
        first_death = deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}
        reason = headers.get("x-dlq-reason") or headers.get("x-first-death-reason") or "unknown"
        detail = headers.get("x-dlq-message")
        if detail is None and first_death:
            queue, why = first_death.get("queue"), first_death.get("reason")
            detail = f"dead-lettered by the broker from {_text(queue)} ({_text(why)})"
        replays = headers.get("x-replay-count")
        return cls(
            message=message,
            reason=_text(reason) or "unknown",
            detail=_text(detail),
            request_id=_text(headers.get("x-dlq-request-id"))
            or peek.request_id
            or message.correlation_id
            or message.message_id,
            agent=_text(headers.get("x-dlq-agent")) or peek.agent,
            trace_id=peek.trace_id or _text(headers.get("x-dlq-trace-id")),
            dead_at=_when(headers.get("x-dlq-at")) or _when(first_death.get("time")) or message.timestamp,
            replays=replays if isinstance(replays, int) else 0,
            headers=headers,
        )

    def age_s(self, now: datetime | None = None) -> float | None:
        if self.dead_at is None:
            return None
        dead_at = self.dead_at if self.dead_at.tzinfo else self.dead_at.replace(tzinfo=UTC)
        return ((now or datetime.now(UTC)) - dead_at).total_seconds()

    def matches(self, *, reason: str | None, agent: str | None) -> bool:
        return (reason is None or self.reason == reason) and (agent is None or self.agent == agent)

    def replay_message(self, run_id: str) -> aio_pika.Message:
        """The request as it was published, plus the replay count; without the death headers."""
        headers = {k: v for k, v in self.headers.items() if not is_dead_letter_header(k)}
        headers.update(
            {
                "x-replay-count": self.replays + 1,
                "x-replayed-at": datetime.now(UTC).isoformat(),
                "x-replay-run": run_id,
            }
        )
        return persistent_copy(self.message, headers)


@dataclass
class ReplayReport:
    replayed: list[DeadLetter] = field(default_factory=list)
    capped: list[DeadLetter] = field(default_factory=list)  # at the replay cap: left in place
    failed: list[tuple[DeadLetter, str]] = field(default_factory=list)  # not confirmed: left in place
    dry_run: bool = False


class DeadLetters:
    """The dead-letter queue of one config. Use ``async with DeadLetters.open(settings) as dlq``."""

    def __init__(self, settings: BusSettings, read: AbstractChannel, publish: AbstractChannel):
        self.settings, self._read, self._publish = settings, read, publish

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: BusSettings) -> AsyncIterator[DeadLetters]:
        # A plain connection, not a robust one: if it drops, the broker requeues whatever this
        # command holds, and the operator runs it again.
        url = settings.url.get_secret_value()
        try:
            connection = await aio_pika.connect(url, client_properties={"connection_name": "llm-worker:dlq"})
        except (aiormq.exceptions.AMQPError, OSError) as exc:
            raise DeadLetterError(
                f"cannot reach the broker at {redact_url(url)} ({type(exc).__name__}: {exc}); "
                "check bus.url in bus.yaml or AMQP_URL"
            ) from None
        async with connection:
            read = await connection.channel(publisher_confirms=False)
            publish = await connection.channel(publisher_confirms=True, on_return_raises=True)
            yield cls(settings, read, publish)

    async def _queue(self, name: str) -> AbstractQueue:
        try:
            return await self._read.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise DeadLetterError(
                f"queue '{name}' does not exist on this broker: start a worker with this config "
                "(python -m worker run) to declare it, or check --config"
            ) from None

    async def count(self) -> int:
        queue = await self._queue(self.settings.dead_letter_queue)
        return queue.declaration_result.message_count or 0

    @asynccontextmanager
    async def _held(self) -> AsyncIterator[list[AbstractIncomingMessage]]:
        """Messages taken from the queue and not acked are requeued on the way out."""
        held: list[AbstractIncomingMessage] = []
        try:
            yield held
        finally:
            for message in held:
                if not message.processed:
                    await message.nack(requeue=True)

    async def _scan(
        self, held: list[AbstractIncomingMessage], limit: int | None = None
    ) -> AsyncGenerator[DeadLetter, None]:
        """The queue's messages (at most ``limit``), oldest first; each is appended to ``held``
        before it is yielded.

        A consumer streams them in (``basic.get`` costs a round trip each: 3,000 took 17 s). The
        count at the start is only a hint: a quorum queue counts requeued messages a moment
        late, so the scan goes on until no message has come for ``SCAN_GRACE_S`` past that count
        (``SCAN_IDLE_S`` before it, in case another consumer took some). At most ``_MAX_PREFETCH``
        messages that are not removed can be held, so a listing sees the first 65,535.
        """
        queue = await self._queue(self.settings.dead_letter_queue)
        hint = queue.declaration_result.message_count or 0
        await self._read.set_qos(prefetch_count=min(limit or _MAX_PREFETCH, _MAX_PREFETCH))
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        tag = await queue.consume(inbox.put, no_ack=False)
        try:
            while limit is None or len(held) < limit:
                wait_s = SCAN_GRACE_S if len(held) >= hint else SCAN_IDLE_S
                try:
                    message = await asyncio.wait_for(inbox.get(), wait_s)
                except TimeoutError:
                    return
                held.append(message)
                yield DeadLetter.from_message(message)
        finally:
            await queue.cancel(tag)
            while not inbox.empty():  # delivered before the cancel took effect
                held.append(inbox.get_nowait())

    async def head(self, limit: int) -> list[DeadLetter]:
        """The first ``limit`` dead letters, oldest first; all stay in the queue."""
        async with self._held() as held, aclosing(self._scan(held, limit)) as letters:
            return [letter async for letter in letters]

    async def find(self, request_id: str) -> list[DeadLetter]:
        """Every dead letter of ``request_id`` (it may have died more than once); all stay."""
        async with self._held() as held, aclosing(self._scan(held)) as letters:
            return [
                letter
                async for letter in letters
                if request_id in (letter.request_id, letter.message.correlation_id, letter.message.message_id)
            ]

    async def replay(
        self,
        *,
        reason: str | None = None,
        agent: str | None = None,
        limit: int | None = None,
        dry_run: bool = False,
        max_replays: int = DEFAULT_MAX_REPLAYS,
    ) -> ReplayReport:
        """Republish matching dead letters to the request queue, each removed only after its confirm."""
        await self._queue(self.settings.request_queue)  # fail early, before taking anything
        report, run_id = ReplayReport(dry_run=dry_run), uuid.uuid4().hex
        batch: list[DeadLetter] = []

        def chosen(letter: DeadLetter) -> bool:
            # A message that dies again during this run comes back with our run id: not twice.
            if not letter.matches(reason=reason, agent=agent) or letter.headers.get("x-replay-run") == run_id:
                return False
            if letter.replays >= max_replays:
                report.capped.append(letter)
                return False
            return True

        async with self._held() as held, aclosing(self._scan(held)) as letters:
            async for letter in letters:
                if not chosen(letter):
                    continue
                if dry_run:
                    report.replayed.append(letter)
                else:
                    batch.append(letter)
                    if len(batch) >= REPLAY_WINDOW:
                        await self._republish(batch, run_id, report)
                        batch = []
                if limit is not None and len(report.replayed) + len(batch) >= limit:
                    break
            await self._republish(batch, run_id, report)
        return report

    async def _republish(self, batch: list[DeadLetter], run_id: str, report: ReplayReport) -> None:
        async def one(letter: DeadLetter) -> None:
            try:
                await self._publish.default_exchange.publish(
                    letter.replay_message(run_id),
                    routing_key=self.settings.request_queue,
                    mandatory=True,
                    timeout=PUBLISH_TIMEOUT_S,
                )
            except (aiormq.exceptions.DeliveryError, aiormq.exceptions.AMQPError, TimeoutError) as exc:
                report.failed.append((letter, f"{type(exc).__name__}: {exc}"))
                return  # stays unacked: requeued into the dead-letter queue on the way out
            await letter.message.ack()  # only now, after the broker confirmed the copy
            report.replayed.append(letter)

        await asyncio.gather(*(one(letter) for letter in batch))

    async def purge(self) -> int:
        """Delete every dead letter; returns how many were deleted."""
        queue = await self._queue(self.settings.dead_letter_queue)
        result = await queue.purge()
        return int(result.message_count or 0)


# -- rendering (the CLI prints these) --------------------------------------------------------------


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def table(letters: list[DeadLetter], now: datetime | None = None) -> list[str]:
    """One line per dead letter: reason, agent, age, replays, request_id."""
    rows = [("reason", "agent", "age", "replays", "request_id")]
    rows += [
        (d.reason, d.agent or "-", format_age(d.age_s(now)), str(d.replays), d.request_id or "-")
        for d in letters
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def describe(letter: DeadLetter, now: datetime | None = None) -> list[str]:
    """Everything an operator needs to decide about one dead letter."""
    m = letter.message
    lines = [
        f"request_id:   {letter.request_id or '-'}",
        f"trace_id:     {letter.trace_id or '-'}",
        f"agent:        {letter.agent or '-'}",
        f"reason:       {letter.reason}",
        f"message:      {letter.detail or '-'}",
        f"dead since:   {letter.dead_at.isoformat() if letter.dead_at else '-'}"
        f" ({format_age(letter.age_s(now))} ago)",
        f"replays:      {letter.replays}",
        f"reply_to:     {m.reply_to or '-'}   correlation_id: {m.correlation_id or '-'}",
        "headers:",
    ]
    # x-delivery-count here is the dead-letter queue's own, raised by every listing: noise.
    shown = {k: v for k, v in letter.headers.items() if k != "x-delivery-count"}
    lines += [f"  {k}: {_render(v)}" for k, v in sorted(shown.items())]
    lines += ["body:", *_body(m.body)]
    return lines


def _body(body: bytes) -> list[str]:
    try:
        return json.dumps(json.loads(body), indent=2, ensure_ascii=False).splitlines()
    except (ValueError, RecursionError):
        text = repr(body[:2000])
        return [f"  ({len(body)} bytes, not JSON) {text}{' ...' if len(body) > 2000 else ''}"]


def _render(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_render(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return value if isinstance(value, str) and value else None


def _when(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    text = _text(value)
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None
