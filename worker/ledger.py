"""Budget ledger in Redis: reserve the worst case before a call, settle the actual cost after.

Limits hold across any number of replicas because the check and the reservation are one Lua
script (``ledger.lua``) over every scope that applies: the task, the agent's day and the whole
day. Money is integer micro-dollars. A reservation carries a TTL longer than the request
deadline; one whose worker died is swept (released) by the next reservation in that scope, so
leaks never block a budget for good. Settlement is keyed by the reservation, so a retried or
redelivered settle never charges twice; it also stores the request's result in the same step,
which is what makes a redelivery after a crash answer from the store instead of calling again.

When Redis cannot be reached, :class:`LedgerUnavailable` is raised: budgeted calls fail closed.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.errors import BudgetExceeded, LedgerUnavailable
from worker.settings import Budget

MICRO = 1_000_000
_SCRIPT = (Path(__file__).parent / "ledger.lua").read_text()
_T = TypeVar("_T")


def to_micro(usd: float) -> int:
    """USD -> integer micro-dollars, rounded up so a reservation never undershoots."""
    micro = usd * MICRO
    return int(micro) + (1 if micro > int(micro) else 0)


@dataclass(frozen=True)
class Scope:
    """One budget that a request counts against."""

    name: str  # e.g. "task:t-42", "agent:writer:2026-11-25", "day:2026-11-25"
    limit_micro: int  # -1: tracked, not limited
    expire_at: int  # unix seconds; 0: keep the key's TTL


@dataclass
class Reservation:
    request_id: str
    member: str
    scopes: list[Scope]
    adopted: bool = False

    @property
    def amount_micro(self) -> int:
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
    ):
        """``result_key(request_id)`` names where :meth:`settle` stores the answer (the result store's)."""
        self.redis = redis
        self.prefix = prefix
        self.result_key = result_key or (lambda request_id: f"{prefix}result:{request_id}")
        self.budget = budget
        self.reservation_ttl_ms = int(reservation_ttl_s * 1000)
        self._tz = ZoneInfo(budget.timezone)
        self._script = redis.register_script(_SCRIPT)

    # -- scopes ------------------------------------------------------------------------------

    def today(self) -> date:
        return datetime.now(self._tz).date()

    def scopes(self, agent: str, task_id: str | None, day: date | None = None) -> list[Scope]:
        """The scopes a request by ``agent`` for ``task_id`` counts against, on ``day``."""
        day = day or self.today()
        scopes = [self.task_scope(task_id)] if task_id is not None else []
        return [*scopes, self.agent_scope(agent, day), self.day_scope(day)]

    def task_scope(self, task_id: str) -> Scope:
        expire = int(datetime.now(UTC).timestamp()) + self.budget.task_ttl_s
        return Scope(f"task:{task_id}", to_micro(self.budget.max_cost_per_task), expire)

    def agent_scope(self, agent: str, day: date) -> Scope:
        cap = self.budget.max_cost_per_agent_day.get(agent)
        return Scope(
            f"agent:{agent}:{day.isoformat()}",
            to_micro(cap) if cap is not None else -1,
            self._keep_until(day),
        )

    def day_scope(self, day: date) -> Scope:
        return Scope(f"day:{day.isoformat()}", to_micro(self.budget.max_cost_per_day), self._keep_until(day))

    def _keep_until(self, day: date) -> int:
        """Daily keys outlive their day by two days (for `budget show`), then expire."""
        day_end = datetime.combine(day + timedelta(days=1), datetime.min.time(), self._tz)
        return int((day_end + timedelta(days=2)).timestamp())

    def _keys(self, request_id: str, token: str, scopes: list[Scope]) -> list[str]:
        p = self.prefix
        keys = [f"{p}resv:{request_id}", f"{p}settled:{request_id}:{token}", self.result_key(request_id)]
        for scope in scopes:
            keys += [f"{p}budget:{scope.name}", f"{p}budget:{scope.name}:resv"]
        return keys

    # -- reserve / settle ----------------------------------------------------------------------

    async def reserve(self, request_id: str, amount_usd: float, scopes: list[Scope]) -> Reservation:
        """Reserve ``amount_usd`` in every scope, or raise :class:`BudgetExceeded` reserving nothing."""
        token = uuid.uuid4().hex[:12]
        amount = to_micro(amount_usd)
        args: list[str | int] = ["reserve", request_id, token, amount, self.reservation_ttl_ms, len(scopes)]
        for scope in scopes:
            args += [scope.limit_micro, scope.expire_at]
        reply = await self._run(lambda: self._script(keys=self._keys(request_id, token, scopes), args=args))
        outcome = _text(reply[0])
        if outcome == "exceeded":
            scope = scopes[int(reply[1]) - 1]
            raise BudgetExceeded(
                scope.name,
                scope.limit_micro / MICRO,
                int(reply[2]) / MICRO,
                int(reply[3]) / MICRO,
                amount / MICRO,
            )
        return Reservation(request_id, _text(reply[1]), scopes, adopted=outcome == "adopted")

    async def settle(
        self,
        reservation: Reservation,
        *,
        cost_usd: float,
        model: str,
        result_json: str = "",
        result_ttl_s: int = 86400,
        cached: bool = False,
    ) -> bool:
        """Replace the reservation by the actual cost, and store the result, in one step.

        Returns False when this reservation was already settled (nothing is charged again).
        """
        return await self._finish(
            reservation,
            cost_micro=to_micro(cost_usd) if cost_usd > 0 else 0,
            model=model,
            result_json=result_json,
            result_ttl_s=result_ttl_s,
            cached=cached,
        )

    async def release(self, reservation: Reservation) -> bool:
        """Drop the reservation of a call that cost nothing (it failed before any provider billed it)."""
        return await self._finish(
            reservation, cost_micro=0, model="", result_json="", result_ttl_s=1, cached=False
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
            cost_usd=0.0,
            model=model,
            result_json=result_json,
            result_ttl_s=result_ttl_s,
            cached=True,
        )

    async def _finish(
        self,
        reservation: Reservation,
        *,
        cost_micro: int,
        model: str,
        result_json: str,
        result_ttl_s: int,
        cached: bool,
    ) -> bool:
        token = reservation.member.split("|")[1]
        settled_ttl_s = max(result_ttl_s, self.reservation_ttl_ms // 1000 + 60)
        args: list[str | int] = [
            "settle",
            reservation.member,
            cost_micro,
            model,
            result_json,
            result_ttl_s,
            settled_ttl_s,
            len(reservation.scopes),
            "1" if cached else "0",
        ]
        keys = self._keys(reservation.request_id, token, reservation.scopes)
        reply = await self._run(lambda: self._script(keys=keys, args=args))
        return _text(reply) == "settled"

    # -- reading -------------------------------------------------------------------------------

    async def state(self, scope: Scope) -> ScopeState:
        """Spend, reservations (after sweeping expired ones) and limit of one scope."""
        key = f"{self.prefix}budget:{scope.name}"
        fields: dict[Any, Any] = await self._run(lambda: self.redis.hgetall(key))
        now_ms = int(datetime.now(UTC).timestamp() * 1000)
        live = await self._run(lambda: self.redis.zrangebyscore(f"{key}:resv", now_ms, "+inf"))
        values = {_text(k): int(v) for k, v in fields.items()}
        return ScopeState(
            name=scope.name,
            spent_usd=values.get("spent", 0) / MICRO,
            reserved_usd=sum(int(_text(m).rsplit("|", 1)[1]) for m in live) / MICRO,
            limit_usd=scope.limit_micro / MICRO if scope.limit_micro >= 0 else None,
            calls=values.get("calls", 0),
            cache_hits=values.get("cache_hits", 0),
            by_model_usd={k[2:]: v / MICRO for k, v in values.items() if k.startswith("m:")},
        )

    async def _run(self, op: Callable[[], Awaitable[_T]]) -> _T:
        try:
            return await op()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise LedgerUnavailable(
                f"budget ledger unreachable ({type(exc).__name__}); "
                "budgeted calls are refused until Redis answers"
            ) from exc


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
