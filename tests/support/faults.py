"""The fault suite's bookkeeping (tests/chaos/test_faults.py, issue #9): a steady load to put a fault
under, and one report row per fault, printed as a table at the end of the session.

What a row counts, per request (matched by correlation id):

- ``sent``: requests published; ``answered``: those with a *final* reply; ``lost``: the rest.
  Every reply is final except a retryable ``failed`` one, which sends the request to the
  dead-letter queue to be replayed (a Redis outage's ``LedgerUnavailable``): such a request
  counts as answered once its replay is answered, and as ``replayed``.
- ``twice``: requests with more than one final reply. At-least-once delivery allows it where a
  reply was confirmed and its ack then lost (a killed worker, a broker restart): the redelivery
  is answered again from the result store, the very same answer, charged once. Two *different*
  final answers to one request are a defect, and :meth:`FaultReport.assert_targets` fails on them.
- ``provider_calls``: calls the fake provider received; ``extra_calls``: beyond one per request
  that needed one (answered ``ok`` and not from the cache).
- ``ledger_calls``, ``ledger_usd``, ``reserved``: today's whole-day scope of the Redis ledger
  after the run; ``replies_usd``: ``cost_usd`` summed over each request's final ``ok`` answer.
- ``recover_s`` (the cluster faults): the longest time without a reply from the fault on, i.e.
  how long the agents saw the service stalled.

Targets: nothing lost, nothing charged twice (ledger calls == requests answered ``ok``, ledger
spend == the replies' costs), no reservation left behind, and the fault landed under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.support.bodies import request_body
from tests.support.ledger import day_state
from tests.support.peers import RawPeer
from tests.support.queues import depth_is, queue_depth
from tests.support.waits import eventually
from worker.consumer import Worker
from worker.deadletters import DeadLetters
from worker.messages import LLMResult, Status
from worker.settings import Settings
from worker.state.ledger import NANO, ScopeState

FAULT_REPORTS = pytest.StashKey[list["FaultReport"]]()
FIGURES = pytest.StashKey[list[str]]()  # measured lines printed under the table (tests/chaos/test_cluster.py)
MIN_IN_FLIGHT = 3  # requests in flight when the fault lands, at least


def is_final(result: LLMResult) -> bool:
    """Not a retryable failure waiting in the dead-letter queue for a replay."""
    return not (result.status is Status.failed and result.error is not None and result.error.retryable)


@dataclass
class FaultReport:
    fault: str
    sent: int
    answered: int
    twice: int
    replayed: int
    ok: int
    in_flight: int  # requests in flight when the fault landed
    provider_calls: int
    extra_calls: int
    ledger_calls: int
    ledger_usd: float
    replies_usd: float
    reserved_usd: float
    recover_s: float | None = None  # the longest gap between two replies around the fault
    unanswered: dict[str, str] = field(default_factory=dict)  # request -> its last reply, if any
    different_answers: list[str] = field(default_factory=list)  # requests answered twice, differently

    @property
    def lost(self) -> int:
        return self.sent - self.answered

    @classmethod
    def tally(
        cls,
        fault: str,
        sent: Sequence[str],
        replies: Iterable[tuple[str, LLMResult]],
        *,
        provider_calls: int,
        ledger: ScopeState,
        in_flight: int,
    ) -> FaultReport:
        """Count ``replies`` (correlation id, result) against the ``sent`` correlation ids."""
        by_request: dict[str, list[LLMResult]] = defaultdict(list)
        for correlation_id, result in replies:
            by_request[correlation_id].append(result)
        final = {cid: [r for r in by_request[cid] if is_final(r)] for cid in sent}
        answers = {cid: results[0] for cid, results in final.items() if results}
        ok = [a for a in answers.values() if a.status is Status.ok]
        return cls(
            fault=fault,
            sent=len(sent),
            answered=len(answers),
            twice=sum(len(results) > 1 for results in final.values()),
            replayed=sum(len(final[cid]) < len(by_request[cid]) for cid in sent if final[cid]),
            ok=len(ok),
            in_flight=in_flight,
            provider_calls=provider_calls,
            extra_calls=provider_calls - sum(not a.cached for a in ok),
            ledger_calls=ledger.calls,
            ledger_usd=ledger.spent_usd,
            replies_usd=sum(a.cost_usd for a in ok),
            reserved_usd=ledger.reserved_usd,
            unanswered={cid: _describe(by_request[cid]) for cid in sent if cid not in answers},
            different_answers=[
                cid for cid, results in final.items() if any(r != results[0] for r in results[1:])
            ],
        )

    def assert_targets(self) -> None:
        assert self.in_flight >= MIN_IN_FLIGHT, f"{self.fault}: the fault did not land under load"
        assert self.lost == 0, f"{self.fault}: {self.lost} lost: {self.unanswered}"
        assert self.different_answers == [], f"{self.fault}: answered twice, differently"
        assert self.ledger_calls == self.ok, f"{self.fault}: ledger calls vs requests answered ok"
        # The ledger rounds each charge up to a whole micro-dollar.
        assert self.ledger_usd == pytest.approx(self.replies_usd, abs=self.ok / NANO + 1e-9), self.fault
        assert self.reserved_usd == 0, f"{self.fault}: reservations left in the ledger"


def _describe(results: list[LLMResult]) -> str:
    if not results:
        return "no reply"
    last = results[-1]
    return f"{last.status.value} {last.error.type if last.error else ''}".strip()


COLUMNS = (
    ("fault", "<24", lambda r: r.fault),
    ("sent", ">5", lambda r: r.sent),
    ("answered", ">9", lambda r: r.answered),
    ("lost", ">5", lambda r: r.lost),
    ("twice", ">6", lambda r: r.twice),
    ("replayed", ">9", lambda r: r.replayed),
    ("in_flight", ">10", lambda r: r.in_flight),
    ("provider_calls", ">15", lambda r: r.provider_calls),
    ("extra", ">6", lambda r: r.extra_calls),
    ("ledger_calls", ">13", lambda r: r.ledger_calls),
    ("ledger_usd", ">11", lambda r: f"{r.ledger_usd:.6f}"),
    ("replies_usd", ">12", lambda r: f"{r.replies_usd:.6f}"),
    ("reserved", ">9", lambda r: f"{r.reserved_usd:g}"),
    ("recover_s", ">10", lambda r: "-" if r.recover_s is None else f"{r.recover_s:.2f}"),
)


def table(reports: Iterable[FaultReport]) -> list[str]:
    """The rows under a header, one column per field."""
    header = "".join(f"{name:{align}}" for name, align, _ in COLUMNS)
    rows = ["".join(f"{value(r)!s:{align}}" for _, align, value in COLUMNS) for r in reports]
    return [header, *rows]


class SteadyLoad:
    """Publishes ``bodies`` at ``per_s`` a second in the background, as agents keep doing while a
    fault happens: ``async with SteadyLoad(peer.publish, bodies, per_s=40) as load: ...``.

    ``publish`` returns the correlation id it used; :attr:`sent` lists them in order.
    """

    def __init__(self, publish: Callable[[Any], Awaitable[str]], bodies: Sequence[Any], *, per_s: float):
        self.publish, self.bodies, self.interval_s = publish, bodies, 1 / per_s
        self.sent: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SteadyLoad:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        if exc[0] is not None:
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i, body in enumerate(self.bodies):
            self.sent.append(await self.publish(body))
            await asyncio.sleep(max(0.0, start + (i + 1) * self.interval_s - loop.time()))

    @property
    def done(self) -> bool:
        return len(self.sent) == len(self.bodies)

    async def finished(self, timeout_s: float = 120) -> list[str]:
        assert self._task is not None
        await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        return self.sent


class ReplyGaps:
    """Watches a count of answers; :attr:`longest` is the longest wait for the next one since
    :meth:`mark` (the fault), up to the last."""

    def __init__(self, count: Callable[[], int]):
        self.count = count
        self.arrivals: list[float] = []
        self.since: float | None = None
        self._task: asyncio.Task[None] | None = None

    def mark(self) -> None:
        self.since = asyncio.get_running_loop().time()

    @property
    def longest(self) -> float | None:
        if self.since is None:
            return None
        times = [self.since, *(t for t in self.arrivals if t >= self.since)]
        return max((b - a for a, b in itertools.pairwise(times)), default=None)

    async def _watch(self) -> None:
        seen = self.count()
        while True:
            await asyncio.sleep(0.01)
            if (now := self.count()) != seen:
                seen = now
                self.arrivals.append(asyncio.get_running_loop().time())

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[ReplyGaps]:
        self._task = asyncio.create_task(self._watch())
        try:
            yield self
        finally:
            self._task.cancel()


# -- shared by the fault suites (tests/chaos/) ---------------------------------------------

LATENCY_S = 0.2  # the fake provider's, per call
PREFETCH = 16
# A redelivered request waits for the dead worker's claim until its heartbeat expires (10 s):
# the deadline must be longer than that.
LLM = {"deadline_s": 30, "timeout": 10}


def requests(fault: str, count: int = 200, **fields: Any) -> list[dict[str, Any]]:
    return [request_body(f"{fault} {i}", use_cache=False, **fields) for i in range(count)]


def parsed(messages: Iterable[Any]) -> list[tuple[str, LLMResult]]:
    return [(m.correlation_id or "", LLMResult.model_validate_json(m.body)) for m in messages]


async def strike(
    load: SteadyLoad,
    fault: Callable[[], Awaitable[object]],
    *,
    busy: Callable[[], bool],
    in_flight: Callable[[], int],
) -> int:
    """Once ``busy()`` holds, run ``fault`` while ``load`` goes on, then let the load finish.
    Returns ``in_flight()`` read as the fault struck."""
    await eventually(busy, what="the workers busy")
    count = in_flight()
    assert not load.done, "the load ended before the fault"
    await fault()
    await load.finished()
    return count


async def answered(
    sent: list[str], replies: Callable[[], list[tuple[str, LLMResult]]], *, timeout_s: float = 90
) -> bool:
    """Wait until each request in ``sent`` has a final reply; False at the time-out (then the
    report counts the rest as lost and names them)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not set(sent) <= {cid for cid, result in replies() if is_final(result)}:
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def quiesce(worker: Worker, amqp_url: str, queue: str, flush: Callable[[], Awaitable[None]]) -> None:
    """Wait until the worker has acked everything, then until its replies have all arrived: a
    second answer to a request would be among them."""

    async def idle() -> bool:
        return not (worker.in_flight or worker.finishing) and await queue_depth(amqp_url, queue) == 0

    await eventually(idle, what="every request acked")
    await flush()


@dataclass
class FailedClosed:
    """What :func:`redis_fault_under_load` saw."""

    load: SteadyLoad
    in_flight: int  # the worker's calls in flight as the fault struck
    failed: int  # requests answered `failed` (Redis gone: fail closed) and dead-lettered
    replayed: int  # of those, replayed from the dead-letter queue


async def redis_fault_under_load(
    fault: Callable[[], Awaitable[object]],
    bodies: list[dict[str, Any]],
    *,
    worker: Worker,
    peer: RawPeer,
    settings: Settings,
    amqp_url: str,
) -> FailedClosed:
    """Strike with ``fault`` (Redis stopped, or its primary killed) under 40 requests/s once the
    worker is busy; wait for a reply to every request and for each one that failed closed to be
    dead-lettered; replay those (`LedgerUnavailable`) and wait until everything is answered."""
    async with SteadyLoad(peer.publish, bodies, per_s=40) as load:
        in_flight = await strike(load, fault,
                                 busy=lambda: len(peer.replies) >= 30 and len(worker.in_flight) >= 3,
                                 in_flight=lambda: len(worker.in_flight))  # fmt: skip
    await eventually(lambda: set(load.sent) <= {m.correlation_id for m in peer.replies},
                     timeout_s=90, what="a reply to every request")  # fmt: skip
    failed = sum(not is_final(result) for _, result in parsed(peer.replies))
    await eventually(lambda: depth_is(amqp_url, settings.bus.dead_letter_queue, failed),
                     what=f"the {failed} failed requests dead-lettered")  # fmt: skip
    async with DeadLetters.open(settings) as dlq:
        replay = await dlq.replay(reason="LedgerUnavailable")
    if await answered(load.sent, lambda: parsed(peer.replies)):
        await quiesce(worker, amqp_url, settings.bus.request_queue, peer.flush)
    return FailedClosed(load, in_flight, failed, len(replay.replayed))


def record(fault_reports: list[FaultReport], row: FaultReport, gaps: ReplyGaps) -> FaultReport:
    row.recover_s = gaps.longest
    fault_reports.append(row)
    return row


async def tally(fault: str, load: SteadyLoad, replies: list[Any], fake: Any, settings: Settings,
                in_flight: int) -> FaultReport:  # fmt: skip
    return FaultReport.tally(fault, load.sent, replies, provider_calls=fake.total_calls(),
                             ledger=await day_state(settings), in_flight=in_flight)  # fmt: skip
