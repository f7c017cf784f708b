"""The dead-letter queue for operators: list, show, replay, purge (``python -m worker dlq ...``);
the CLI renders what this module reads (:mod:`worker.cli.render`).

Two kinds of dead letters arrive in ``bus.dead_letter_queue``, and both keep the request's body
and properties:

- copies the worker published (invalid, failed, crashed requests, answers no queue took), with
  its reason in ``x-dlq-reason``, ``x-dlq-message``, ``x-dlq-attempts``, ``x-dlq-at``,
  ``x-dlq-worker``, ``x-dlq-agent``, ``x-dlq-request-id``, ``x-dlq-trace-id``, ``x-dlq-reply``,
  ``x-dlq-status``; a body over ``bus.max_body_bytes`` as its first 4 KiB, with
  ``x-dlq-body-bytes``, ``x-dlq-body-sha256`` and ``x-dlq-body-truncated``;
- requests the broker dead-lettered itself because they reached the request queue's
  ``x-delivery-limit`` (workers kept dying on them): ``x-death`` and
  ``x-first-death-reason: delivery_limit``.

Anyone who may publish to the dead-letter queue can set any header, so a letter's identity
(request id, agent, trace id) comes from its body, validated as an ``LLMRequest`` as the worker
validated it, never from ``x-dlq-*`` headers; a body that does not validate has no agent (no
``--agent`` filter matches it) and is shown by the ids it claims, marked unvalidated. Likewise
the replay cap counts what this tool did, not what a header says: each replay adds 1 to a
counter in Redis keyed by the sha-256 of the body (``<prefix>dlq:replays:<hex>``, kept 30 days),
and ``x-replay-count`` is written for information only.

A replay is published as the tool's own broker user (RabbitMQ checks ``user_id``) and names the
request's original caller in ``x-replay-caller`` (:meth:`DeadLetter.caller`); a worker serves it as
that caller when the tool's user is one of ``callers.replayers`` (:mod:`worker.boundary.identity`).

Reading the queue takes messages without acking them and requeues them afterwards (AMQP 0-9-1
cannot browse), so an interrupted command leaves every message in place. Replay publishes each
chosen message to the request queue with a publisher confirm and acks (removes) it from the
dead-letter queue only after that confirm: a crash in between leaves it in both queues, which
idempotency by ``request_id`` makes harmless, and never in neither. Messages at the cap are left
in place. A request whose ``deadline`` has passed is replayed all the same but counted apart:
the worker answers it ``expired`` without calling the provider, because its caller stopped
waiting at that deadline. Purge removes at most the messages it counted, oldest first.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Collection
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
import redis.asyncio as aioredis
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from pydantic import ValidationError

from worker import connections
from worker.boundary.identity import REPLAY_CALLER
from worker.boundary.parse import peek_request
from worker.bus import PUBLISH_TIMEOUT_S, persistent_copy
from worker.errors import DeadLetterError
from worker.messages import LLMRequest
from worker.settings import BusSettings, Settings
from worker.state.redis import REDIS_ERRORS, describe
from worker.text import as_text

DEFAULT_MAX_REPLAYS = 3
REPLAY_WINDOW = 50  # publishes awaiting their confirms at once
SCAN_IDLE_S = 5.0  # seconds: a scan stops early when no message comes for this long
SCAN_GRACE_S = 0.5  # seconds: ... or for this long once the count at the start is reached
# AMQP's prefetch-count is 16 bits, and "unlimited" (0) means 2,000 on a quorum queue (measured on
# 3.10): a scan holds at most this many messages it does not remove at once.
_MAX_PREFETCH = 65535
_PEEK_LIMIT_BYTES = 4 * 1_048_576
REPLAY_COUNT_TTL_S = 30 * 86400


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
    replays: int  # by this tool, as counted in Redis (ReplayCounts)
    headers: dict[str, Any] = field(repr=False)
    validated: bool = False  # the body is a valid LLMRequest: the ids above are its own
    deadline: datetime | None = None

    @classmethod
    def from_message(cls, message: AbstractIncomingMessage, replays: int = 0) -> DeadLetter:
        headers = dict(message.headers or {})
        request = _validated(message.body)
        deaths = headers.get("x-death")
        first_death = deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}
        reason = headers.get("x-dlq-reason") or headers.get("x-first-death-reason") or "unknown"
        detail = headers.get("x-dlq-message")
        if detail is None and first_death:
            queue, why = first_death.get("queue"), first_death.get("reason")
            detail = f"dead-lettered by the broker from {_text(queue)} ({_text(why)})"
        request_id: str | None
        agent: str | None
        trace_id: str | None
        if request is not None:
            request_id, agent, trace_id = request.request_id, request.agent, request.trace_id
        else:  # the ids it claims, to find it by; no agent to filter on
            peek = peek_request(message.body)
            request_id, agent, trace_id = peek.request_id or message.correlation_id, None, peek.trace_id
        return cls(
            message=message,
            reason=_text(reason) or "unknown",
            detail=_text(detail),
            request_id=request_id,
            agent=agent,
            trace_id=trace_id,
            dead_at=_when(headers.get("x-dlq-at")) or _when(first_death.get("time")) or message.timestamp,
            replays=replays,
            headers=headers,
            validated=request is not None,
            deadline=request.deadline if request is not None else None,
        )

    def expired(self, now: datetime | None = None) -> bool:
        """Its deadline has passed: a replay is answered ``expired``, nobody waits for it."""
        return self.deadline is not None and self.deadline <= (now or datetime.now(UTC))

    def age_s(self, now: datetime | None = None) -> float | None:
        if self.dead_at is None:
            return None
        dead_at = self.dead_at if self.dead_at.tzinfo else self.dead_at.replace(tzinfo=UTC)
        return ((now or datetime.now(UTC)) - dead_at).total_seconds()

    def matches(self, *, reason: str | None, agent: str | None) -> bool:
        return (reason is None or self.reason == reason) and (agent is None or self.agent == agent)

    def caller(self, workers: Collection[str]) -> str | None:
        """The broker user the request came from, as far as RabbitMQ vouches for it ("": it came
        with none; None: not known). A copy a worker published (its validated ``user_id`` is one
        of ``workers``) names it in ``x-dlq-user-id``; any other letter (the broker's own
        dead-lettering, or a message someone put in the queue) keeps its publisher's ``user_id``.
        Without ``workers`` (development, or no replayers: workers ignore the name then), a letter
        with the worker's ``x-dlq-reason`` is taken for a worker's copy."""
        user = self.message.user_id or None
        if (user is not None and user in workers) or (not workers and "x-dlq-reason" in self.headers):
            named = self.headers.get("x-dlq-user-id", "")
            return named if isinstance(named, str) else None
        return user

    def replay_message(self, run_id: str, *, caller: str | None, user_id: str | None) -> aio_pika.Message:
        """The request as it was published, plus the replay count; without the death headers.
        Published as ``user_id`` (the replaying tool's broker user), on behalf of ``caller``."""
        headers = {k: v for k, v in self.headers.items() if not is_dead_letter_header(k)}
        headers.pop(REPLAY_CALLER, None)  # whatever the request itself carried
        headers.update(
            {
                "x-replay-count": self.replays + 1,
                "x-replayed-at": datetime.now(UTC).isoformat(),
                "x-replay-run": run_id,
                **({REPLAY_CALLER: caller} if caller is not None else {}),
            }
        )
        return persistent_copy(self.message, headers, user_id=user_id)


class ReplayCounts:
    """How many times this tool replayed each dead letter, in Redis, keyed by its body's sha-256
    (a replay republishes the body unchanged; a header would be whatever a publisher wrote)."""

    def __init__(self, redis: aioredis.Redis, prefix: str):
        self.redis, self.prefix = redis, prefix

    def key(self, body: bytes) -> str:
        return f"{self.prefix}dlq:replays:{hashlib.sha256(body).hexdigest()}"

    async def get(self, messages: list[AbstractIncomingMessage]) -> list[int]:
        if not messages:
            return []
        try:
            values = await self.redis.mget([self.key(m.body) for m in messages])
        except REDIS_ERRORS as exc:
            raise _counts_unreachable(exc) from None
        return [int(v) if v is not None else 0 for v in values]

    async def add(self, messages: list[AbstractIncomingMessage]) -> None:
        """One more replay of each of ``messages`` (one round trip)."""
        if not messages:
            return
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                for key in (self.key(m.body) for m in messages):
                    pipe.incr(key)
                    pipe.expire(key, REPLAY_COUNT_TTL_S)
                await pipe.execute()
        except REDIS_ERRORS as exc:
            raise _counts_unreachable(exc) from None


def _counts_unreachable(exc: BaseException) -> DeadLetterError:
    return DeadLetterError(
        f"cannot read or write the replay counts in Redis ({describe(exc)}): the replay cap is kept "
        "there; check redis.url in redis.yaml or REDIS_URL"
    )


@dataclass
class ReplayReport:
    replayed: list[DeadLetter] = field(default_factory=list)
    capped: list[DeadLetter] = field(default_factory=list)  # at the replay cap: left in place
    failed: list[tuple[DeadLetter, str]] = field(default_factory=list)  # not confirmed: left in place
    dry_run: bool = False

    @property
    def expired(self) -> list[DeadLetter]:
        """Replayed (or to be) with their deadline past: the worker answers them ``expired``."""
        return [letter for letter in self.replayed if letter.expired()]


@dataclass
class PurgeReport:
    deleted: int
    left: int  # still in the queue afterwards: arrived since the count, or held by another reader


class DeadLetters:
    """The dead-letter queue of one config. Use ``async with DeadLetters.open(settings) as dlq``."""

    def __init__(
        self,
        settings: BusSettings,
        read: AbstractChannel,
        publish: AbstractChannel,
        counts: ReplayCounts,
        *,
        workers: Collection[str] = (),
        user: str | None = None,
    ):
        """``workers``: ``callers.workers``; ``user``: the broker user this tool publishes as."""
        self.settings, self._read, self._publish, self.counts = settings, read, publish, counts
        self.workers, self.user = workers, user

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[DeadLetters]:
        # A plain connection, not a robust one: if it drops, the broker requeues whatever this
        # command holds, and the operator runs it again.
        connection = await connections.amqp_plain(settings.bus, name="llm-worker:dlq")
        redis = connections.redis(settings, max_connections=4)
        try:
            async with connection:
                read = await connection.channel(publisher_confirms=False)
                publish = await connection.channel(publisher_confirms=True, on_return_raises=True)
                counts = ReplayCounts(redis, settings.redis.key_prefix)
                user = connections.login_user(connection)
                yield cls(settings.bus, read, publish, counts, workers=settings.callers.workers, user=user)
        finally:
            await redis.aclose()

    async def _queue(self, name: str) -> AbstractQueue:
        try:
            return await self._read.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise DeadLetterError(
                f"queue '{name}' does not exist on this broker: start a worker with this config "
                "(python -m worker run) to declare it, or check --config"
            ) from None

    async def count(self) -> int:
        """Messages ready in the queue (not those another reader holds unacked)."""
        queue = await self._queue(self.settings.dead_letter_queue)
        return queue.declaration_result.message_count or 0

    async def readers(self) -> int:
        """Other consumers of the queue now (another ``dlq`` command): counts are then estimates."""
        queue = await self._queue(self.settings.dead_letter_queue)
        return queue.declaration_result.consumer_count or 0

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
                yield DeadLetter.from_message(message)  # replays: see _counted
        finally:
            await queue.cancel(tag)
            while not inbox.empty():  # delivered before the cancel took effect
                held.append(inbox.get_nowait())

    async def _counted(self, letters: list[DeadLetter]) -> list[DeadLetter]:
        for letter, replays in zip(letters, await self.counts.get([d.message for d in letters]), strict=True):
            letter.replays = replays
        return letters

    async def head(self, limit: int) -> list[DeadLetter]:
        """The first ``limit`` dead letters, oldest first; all stay in the queue."""
        async with self._held() as held, aclosing(self._scan(held, limit)) as letters:
            return await self._counted([letter async for letter in letters])

    async def find(self, request_id: str) -> list[DeadLetter]:
        """Every dead letter of ``request_id`` (it may have died more than once); all stay."""
        async with self._held() as held, aclosing(self._scan(held)) as letters:
            return await self._counted(
                [
                    letter
                    async for letter in letters
                    if request_id
                    in (letter.request_id, letter.message.correlation_id, letter.message.message_id)
                ]
            )

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
                [letter.replays] = await self.counts.get([letter.message])
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
        # Counted before the publish: a replay that fails after it costs one of the cap, never
        # the reverse (a replay that was not counted).
        try:
            await self.counts.add([letter.message for letter in batch])
        except DeadLetterError as exc:
            report.failed += [(letter, str(exc)) for letter in batch]
            return

        async def one(letter: DeadLetter) -> None:
            try:
                await self._publish.default_exchange.publish(
                    letter.replay_message(run_id, caller=letter.caller(self.workers), user_id=self.user),
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

    async def purge(self, at_most: int) -> PurgeReport:
        """Delete the oldest ``at_most`` dead letters (those the operator was shown the count
        of), not what arrived since: each is taken and acked, none by a blind ``queue.purge``.
        Messages another reader holds are not seen, and stay."""
        async with self._held() as held, aclosing(self._scan(held, at_most)) as letters:
            deleted = 0
            async for letter in letters:
                await letter.message.ack()
                deleted += 1
        return PurgeReport(deleted=deleted, left=await self.count())


def _validated(body: bytes) -> LLMRequest | None:
    if len(body) > _PEEK_LIMIT_BYTES:
        return None
    try:
        return LLMRequest.model_validate_json(body)
    except (ValidationError, ValueError, RecursionError):
        return None


def _text(value: Any) -> str | None:
    """A header's text, or None when it is absent, empty or not text."""
    return as_text(value) if isinstance(value, bytes | str) and value else None


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
