"""Budget ledger in Redis: reserve the worst case before a call, settle the actual cost after.

Limits hold across any number of replicas because the check and the reservation are one Lua
script (``ledger.lua``) over every scope that applies: the task, the agent's day and the whole
day. Money is integer nano-dollars (1e-9 USD: a call to the cheapest models costs well under a
micro-dollar; Redis's Lua numbers are exact to 2**53, about 9 million USD per scope).
A reservation carries a TTL longer than the request
deadline; one whose worker died is swept (released) by the next reservation in that scope, so
leaks never block a budget for good. Settlement is keyed by the reservation, so a retried or
redelivered settle never charges twice; it also stores the request's result in the same step,
which is what makes a redelivery after a crash answer from the store instead of calling again.

When a Redis step fails (unreachable, out of memory, a key of the wrong type...),
:class:`LedgerUnavailable` is raised: budgeted calls fail closed (:mod:`worker.state.redis`).
"""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote
from zoneinfo import ZoneInfo

import redis.asyncio as aioredis
import structlog
from redis.commands.core import AsyncScript

from worker.errors import BudgetExceeded, Forbidden, InvalidRequest, LedgerUnavailable
from worker.settings import Budget
from worker.state import results
from worker.state.keys import part
from worker.state.memory import MemoryGuard
from worker.state.redis import mapped
from worker.text import as_text

log = structlog.get_logger("worker.ledger")

NANO = 1_000_000_000
_SCRIPT = (Path(__file__).parent / "ledger.lua").read_text()
# The settle of a paid call (and a release, which only frees room) runs with Redis 7's allow-oom
# flag: a Redis filled past maxmemory faster than the guard reads (another client) refused it, the
# answer waited out the settle's retries and went out uncharged. It writes past the limit by what
# the calls in flight store; new calls stay refused (the claim by Redis, the reserve by the guard).
# https://redis.io/docs/latest/develop/interact/programmability/eval-intro/#eval-flags
_PAID_SCRIPT = "#!lua flags=allow-oom\n" + _SCRIPT
_T = TypeVar("_T")


@functools.lru_cache(maxsize=256)  # configured limits, converted for every request's scopes
def to_nano(usd: float) -> int:
    """USD (a configured limit) -> integer nano-dollars, rounded up so a limit is never undershot."""
    return int((Decimal(repr(usd)) * NANO).to_integral_value(ROUND_CEILING))


@dataclass(frozen=True)
class Scope:
    """One budget that a request counts against."""

    name: str  # e.g. "task:t-42", "agent:writer:2026-11-25", "day:2026-11-25"; callers' parts escaped
    limit_nano: int  # -1: tracked, not limited
    expire_at: int  # unix seconds; 0: keep the key's TTL


@dataclass
class Reservation:
    request_id: str
    member: str
    scopes: list[Scope]
    adopted: bool = False

    @property
    def amount_nano(self) -> int:
        return int(self.member.rsplit("|", 1)[1])


@dataclass(frozen=True)
class ScopeState:
    name: str
    spent_usd: float
    reserved_usd: float
    limit_usd: float | None
    calls: int
    cache_hits: int
    by_model_usd: dict[str, float] = field(default_factory=dict)


class BudgetLedger:
    """Reserve/settle against every budget scope of a request, atomically, in Redis."""

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        budget: Budget,
        *,
        reservation_ttl_s: float,
        result_key: Callable[[str], str] | None = None,
        memory: MemoryGuard | None = None,
        settle_wait: tuple[int, int] = (0, 0),
    ):
        """``request_id`` here is a request's idempotency key (the pipeline's is the caller's name and
        the ``request_id``, :func:`~worker.state.results.request_key`).
        ``result_key(request_id)`` names where :meth:`settle` stores the answer (the result store's);
        ``memory``, when given, refuses new reservations while Redis is near ``maxmemory``;
        ``settle_wait`` = (replicas, timeout ms): after each settle, ``WAIT`` until that many replicas
        have it (``redis.settle_wait_replicas``); (0, 0) does not wait."""
        self.redis = redis
        self.prefix = prefix
        self.result_key = result_key or functools.partial(results.result_key, prefix)
        self.budget = budget
        self.memory = memory
        self.reservation_ttl_ms = int(reservation_ttl_s * 1000)
        self._tz = ZoneInfo(budget.timezone)
        self._kept: tuple[date, int] | None = None  # the last day's _keep_until, reused all day
        self._script = redis.register_script(_SCRIPT)
        self._paid_script = redis.register_script(_PAID_SCRIPT)
        self.settle_wait = settle_wait

    # -- scopes ------------------------------------------------------------------------------

    def today(self) -> date:
        return datetime.now(self._tz).date()

    def scopes(self, agent: str, task_id: str | None, day: date | None = None) -> list[Scope]:
        """The scopes a request by ``agent`` for ``task_id`` counts against, on ``day``."""
        day = day or self.today()
        scopes = [self.task_scope(task_id)] if task_id is not None else []
        return [*scopes, self.agent_scope(agent, day), self.day_scope(day)]

    def admit(self, agent: str, task_id: str | None) -> None:
        """Refuse (no Redis round trip) a request no budget holds: an agent without a cap, or one
        that must name its task and did not."""
        if (
            agent not in self.budget.max_cost_per_agent_day
            and self.budget.max_cost_per_unconfigured_agent_day is None
        ):
            raise Forbidden(
                f"agent {agent!r} has no budget: add it to llm.budget.max_cost_per_agent_day "
                "(or set llm.budget.max_cost_per_unconfigured_agent_day)"
            )
        required = self.budget.require_task_id
        if task_id is None and ("*" in required or agent in required):
            raise InvalidRequest("task_id", f"required for agent {agent} (llm.budget.require_task_id)")

    def task_scope(self, task_id: str) -> Scope:
        expire = int(datetime.now(UTC).timestamp()) + self.budget.task_ttl_s
        return Scope(f"task:{part(task_id)}", to_nano(self.budget.max_cost_per_task), expire)

    def agent_scope(self, agent: str, day: date) -> Scope:
        cap = self.budget.max_cost_per_agent_day.get(agent, self.budget.max_cost_per_unconfigured_agent_day)
        return Scope(
            f"agent:{part(agent)}:{day.isoformat()}",
            to_nano(cap) if cap is not None else -1,
            self._keep_until(day),
        )

    def day_scope(self, day: date) -> Scope:
        return Scope(f"day:{day.isoformat()}", to_nano(self.budget.max_cost_per_day), self._keep_until(day))

    def _keep_until(self, day: date) -> int:
        """Daily keys outlive their day by two days (for `budget show`), then expire."""
        if self._kept is not None and self._kept[0] == day:
            return self._kept[1]
        day_end = datetime.combine(day + timedelta(days=1), datetime.min.time(), self._tz)
        keep = int((day_end + timedelta(days=2)).timestamp())
        self._kept = (day, keep)
        return keep

    def _keys(self, request_id: str, token: str, scopes: list[Scope]) -> list[str]:
        p = self.prefix
        rid = part(request_id)
        keys = [f"{p}resv:{rid}", f"{p}settled:{rid}:{token}", self.result_key(request_id)]
        for scope in scopes:
            keys += [f"{p}budget:{scope.name}", f"{p}budget:{scope.name}:resv"]
        return keys

    # -- reserve / settle ----------------------------------------------------------------------

    async def reserve(self, request_id: str, amount_nano: int, scopes: list[Scope]) -> Reservation:
        """Reserve ``amount_nano`` (nano-dollars) in every scope, or raise :class:`BudgetExceeded`
        reserving nothing.

        Raises :class:`LedgerFull` (no Redis round trip) while Redis is near ``maxmemory``: the room
        left is kept for the settles of calls already in flight.
        """
        if self.memory is not None:
            self.memory.check()
        keys, args = self._reserve_call("reserve", request_id, amount_nano, scopes)
        reply = await self._run(lambda: self._script(keys=keys, args=args))
        return self._reservation(reply, request_id, amount_nano, scopes)

    def claiming(self, request_id: str, amount_nano: int, scopes: list[Scope]) -> ClaimingReserve:
        """A first claim attempt for a request's single flight that also reserves its budget, in one
        Redis script (:class:`ClaimingReserve`). Raises :class:`LedgerFull` as :meth:`reserve` does."""
        if self.memory is not None:
            self.memory.check()
        return ClaimingReserve(self, request_id, amount_nano, scopes)

    def _reserve_call(
        self, op: str, request_id: str, amount_nano: int, scopes: list[Scope]
    ) -> tuple[list[str], list[str | int]]:
        token = uuid.uuid4().hex[:12]
        args: list[str | int] = [op, request_id, token, amount_nano, self.reservation_ttl_ms, len(scopes)]
        for scope in scopes:
            args += [scope.limit_nano, scope.expire_at]
        return self._keys(request_id, token, scopes), args

    def _reservation(self, reply: Any, request_id: str, amount: int, scopes: list[Scope]) -> Reservation:
        """The script's reply to a reservation, or :class:`BudgetExceeded` naming the full scope."""
        outcome = as_text(reply[0])
        if outcome == "exceeded":
            scope = scopes[int(reply[1]) - 1]
            raise BudgetExceeded(
                scope.name,
                scope.limit_nano / NANO,
                int(reply[2]) / NANO,
                int(reply[3]) / NANO,
                amount / NANO,
            )
        return Reservation(request_id, as_text(reply[1]), scopes, adopted=outcome == "adopted")

    async def settle(
        self,
        reservation: Reservation,
        *,
        cost_nano: int,
        model: str,
        result_json: str = "",
        result_ttl_s: int = 86400,
        cached: bool = False,
    ) -> bool:
        """Replace the reservation by the actual cost (nano-dollars), and store the result, in one step.

        Returns False when this reservation was already settled (nothing is charged again). A
        paid call's settle is written even past ``maxmemory``; a cache hit's (``cached``) is not.
        """
        return await self._finish(
            reservation,
            cost_nano=cost_nano,
            model=model,
            result_json=result_json,
            result_ttl_s=result_ttl_s,
            cached=cached,
        )

    async def release(self, reservation: Reservation) -> bool:
        """Drop the reservation of a call that cost nothing (it failed before any provider billed it)."""
        return await self._finish(
            reservation, cost_nano=0, model="", result_json="", result_ttl_s=1, cached=False
        )

    async def record_cache_hit(
        self,
        request_id: str,
        agent: str,
        task_id: str | None,
        model: str,
        result_json: str,
        result_ttl_s: int,
    ) -> None:
        """Count a cache hit at zero cost, and store its result like any other answer."""
        reservation = Reservation(
            request_id, f"{request_id}|hit{uuid.uuid4().hex[:8]}|0", self.scopes(agent, task_id)
        )
        await self.settle(
            reservation,
            cost_nano=0,
            model=model,
            result_json=result_json,
            result_ttl_s=result_ttl_s,
            cached=True,
        )

    async def _finish(
        self,
        reservation: Reservation,
        *,
        cost_nano: int,
        model: str,
        result_json: str,
        result_ttl_s: int,
        cached: bool,
    ) -> bool:
        token = reservation.member.split("|")[1]
        # The marker only stops a second settle of this reservation, which cannot come after the
        # reservation itself has expired: it need not live as long as the answer (issue #22).
        settled_ttl_s = self.reservation_ttl_ms // 1000 + 60
        args: list[str | int] = [
            "settle",
            reservation.member,
            cost_nano,
            model,
            result_json,
            result_ttl_s,
            settled_ttl_s,
            len(reservation.scopes),
            "1" if cached else "0",
        ]
        keys = self._keys(reservation.request_id, token, reservation.scopes)
        # a cache hit cost nothing: past maxmemory it goes unrecorded rather than take the room
        script = self._script if cached else self._paid_script
        reply = await self._run(lambda: self._settle_replicated(script, keys, args))
        return as_text(reply) == "settled"

    async def _settle_replicated(self, script: AsyncScript, keys: list[str], args: list[str | int]) -> Any:
        """The settle script, then (``settle_wait``) ``WAIT`` for replicas: on the same connection,
        hence one pipeline, since ``WAIT`` counts the writes of the connection that sends it.
        Replication is asynchronous: without the wait, a primary that dies right after a settle can
        take the charge and the stored answer with it (README, "Running on a cluster")."""
        replicas, timeout_ms = self.settle_wait
        if replicas == 0:
            return await script(keys=keys, args=args)
        async with self.redis.pipeline(transaction=False) as pipe:
            await script(keys=keys, args=args, client=pipe)
            pipe.wait(replicas, timeout_ms)
            reply, acked = await pipe.execute()
        if int(acked) < replicas:
            # Settled on the primary only: the answer is sent anyway, and the gap is logged.
            log.warning(
                "ledger.settle_unreplicated", replicas=int(acked), wanted=replicas, timeout_ms=timeout_ms
            )
        return reply

    # -- reading -------------------------------------------------------------------------------

    async def state(self, scope: Scope) -> ScopeState:
        """Spend, reservations (after sweeping expired ones) and limit of one scope."""
        key = f"{self.prefix}budget:{scope.name}"
        fields: dict[Any, Any] = await self._run(lambda: self.redis.hgetall(key))
        now_ms = int(datetime.now(UTC).timestamp() * 1000)
        live = await self._run(lambda: self.redis.zrangebyscore(f"{key}:resv", now_ms, "+inf"))
        values = {as_text(k): int(v) for k, v in fields.items()}
        return ScopeState(
            name=scope.name,
            spent_usd=values.get("spent", 0) / NANO,
            reserved_usd=sum(int(as_text(m).rsplit("|", 1)[1]) for m in live) / NANO,
            limit_usd=scope.limit_nano / NANO if scope.limit_nano >= 0 else None,
            calls=values.get("calls", 0),
            cache_hits=values.get("cache_hits", 0),
            by_model_usd={k[2:]: v / NANO for k, v in values.items() if k.startswith("m:")},
        )

    async def held_scopes(self) -> list[Scope]:
        """Every scope the ledger holds a key for (spend or reservations), configured or not:
        tasks, agents and days, by name. One ``SCAN`` of this prefix's budget keys."""
        budget = f"{self.prefix}budget:"
        match = re.sub(r"([*?\[\]\\])", r"\\\1", budget) + "*"  # the prefix is matched literally
        names: set[str] = set()

        async def scan() -> None:
            async for key in self.redis.scan_iter(match=match, count=1000):
                name = as_text(key)[len(budget) :]
                names.add(name.removesuffix(":resv"))

        await self._run(scan)
        return [scope for scope in map(self._scope_named, sorted(names)) if scope is not None]

    def _scope_named(self, name: str) -> Scope | None:
        kind, _, rest = name.partition(":")
        if kind == "task":
            return self.task_scope(unquote(rest))  # the key holds the id encoded (state/keys.py)
        agent, _, day = rest.rpartition(":")
        agent = unquote(agent)
        try:
            when = date.fromisoformat(day if kind == "agent" else rest)
        except ValueError:
            return None
        if kind == "agent" and agent:
            return self.agent_scope(agent, when)
        return self.day_scope(when) if kind == "day" else None

    async def _run(self, op: Callable[[], Awaitable[_T]]) -> _T:
        with mapped(LedgerUnavailable, "budget ledger"):
            return await op()


class ClaimingReserve:
    """The first try of :meth:`SingleFlight.claim_or_wait <worker.state.flight.SingleFlight.claim_or_wait>`
    (its ``first``) that also reserves: one script reads the stored answer, or takes the claim and
    reserves the budget (issue #21: two round trips were one). Answers like the flight's claim
    script (``found``, ``held`` or ``owned``); once owned, :attr:`reservation` holds the
    reservation. Over budget it raises :class:`BudgetExceeded`, the claim given back in the same
    step. The flight's claims must live in the ledger's Redis.
    """

    def __init__(self, ledger: BudgetLedger, request_id: str, amount_nano: int, scopes: list[Scope]):
        self.ledger, self.request_id, self.amount_nano, self.scopes = ledger, request_id, amount_nano, scopes
        self.reservation: Reservation | None = None

    async def __call__(self, *, keys: list[str], args: list[str | int]) -> list[Any]:
        """``keys``: the flight key and the answer key; ``args``: the claim's token and TTL (ms)."""
        ledger = self.ledger
        own_keys, own_args = ledger._reserve_call(
            "claim-reserve", self.request_id, self.amount_nano, self.scopes
        )
        reply = await ledger._run(lambda: ledger._script(keys=own_keys + keys, args=own_args + args))
        if as_text(reply[0]) in ("found", "held"):
            return list(reply)
        self.reservation = ledger._reservation(reply, self.request_id, self.amount_nano, self.scopes)
        return ["owned", ""]
