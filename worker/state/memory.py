"""Redis memory as a limit the worker respects before Redis enforces it (issue #22).

The ledger's Redis runs with ``maxmemory-policy noeviction``: evicting a budget hash would
forget money. Once full, Redis refuses every script that may write (``OOM command not allowed``)
but the settle of a paid call, which runs with the ``allow-oom`` flag (:mod:`worker.state.ledger`)
and so writes past the limit. The guard keeps headroom for the settles: it reads ``INFO memory``
every ``interval_s`` and, at or above ``refuse_at`` of ``maxmemory``, the pipeline refuses *new*
calls (:class:`~worker.errors.LedgerFull`, answered ``failed``, dead-lettered for replay) while
calls in flight still settle into the room left. Below ``resume_at`` it accepts again, by itself.
Response-cache stores on the same Redis stop earlier (``cache_stop_at``), so a filling cache never
blocks the ledger.

A Redis without ``maxmemory`` (0) is never refused here; Redis's own OOM answers still become
:class:`~worker.errors.LedgerUnavailable` naming the cause (:mod:`worker.state.redis`).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog

from worker.errors import LedgerFull
from worker.state.redis import REDIS_ERRORS

log = structlog.get_logger("worker.state.memory")


@dataclass(frozen=True)
class Watermarks:
    """Fractions of ``maxmemory``."""

    refuse_at: float = 0.90
    resume_at: float = 0.85
    cache_stop_at: float = 0.75


class MemoryGuard:
    """Watches one Redis's memory; ``check()`` raises :class:`LedgerFull` while it is too full."""

    def __init__(self, redis: aioredis.Redis, *, marks: Watermarks | None = None, interval_s: float = 1.0):
        self.redis, self.marks, self.interval_s = redis, marks or Watermarks(), interval_s
        self.used_bytes = 0
        self.max_bytes = 0  # 0: no maxmemory configured, nothing to guard
        self.full = False
        self.refusals = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def ratio(self) -> float:
        """used / maxmemory; 0 when Redis has no maxmemory."""
        return self.used_bytes / self.max_bytes if self.max_bytes else 0.0

    @property
    def cache_may_store(self) -> bool:
        return self.ratio < self.marks.cache_stop_at

    def check(self) -> None:
        """Raise :class:`LedgerFull` while new calls must wait for memory (no Redis round trip)."""
        if self.full:
            self.refusals += 1
            raise LedgerFull(
                f"Redis memory is at {self.ratio:.0%} of maxmemory ({self.used_bytes} of {self.max_bytes} "
                f"bytes; new calls are refused from {self.marks.refuse_at:.0%} until it is below "
                f"{self.marks.resume_at:.0%}): free memory, raise maxmemory or shorten result_ttl_s"
            )

    async def refresh(self) -> None:
        """Read ``INFO memory`` once; an unreachable Redis keeps the last reading (its steps fail anyway)."""
        try:
            info = await self.redis.info("memory")
        except REDIS_ERRORS as exc:
            log.debug("redis_memory.unreadable", error=type(exc).__name__)
            return
        self.used_bytes, self.max_bytes = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
        was_full = self.full
        if self.max_bytes == 0:
            self.full = False
        elif self.ratio >= self.marks.refuse_at:
            self.full = True
        elif self.ratio < self.marks.resume_at:
            self.full = False
        if self.full != was_full:
            event = "redis_memory.full" if self.full else "redis_memory.resumed"
            (log.error if self.full else log.info)(
                event, used_bytes=self.used_bytes, max_bytes=self.max_bytes, ratio=round(self.ratio, 3)
            )

    async def _run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.interval_s)

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._run(), name="redis-memory-guard")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
