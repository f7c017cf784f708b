"""Single flight across replicas: one holder per key does the work, the others wait for its answer.

Used twice: per ``request_id`` (two copies of one request in flight make one provider call) and
per cache key (a burst of identical requests makes one provider call). A claim is a Redis key
``flight:<key>`` holding the holder's worker id. Every worker keeps ``worker:<id>`` alive with a
short TTL (:class:`Heartbeat`); a waiter that finds the holder's heartbeat gone takes the claim
over, so a worker killed mid-call delays its duplicates by seconds, not by the request deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

_T = TypeVar("_T")
log = structlog.get_logger("worker.flight")

# Take over a claim only if it still names the dead holder (compare-and-set).
_STEAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
# Release only our own claim.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Heartbeat:
    """Keeps ``<prefix>worker:<id>`` alive while this worker runs."""

    def __init__(self, redis: aioredis.Redis, prefix: str, worker_id: str, *, ttl_s: float = 10.0):
        self.redis, self.key, self.ttl_s = redis, f"{prefix}worker:{worker_id}", ttl_s
        self._task: asyncio.Task[None] | None = None

    async def beat(self) -> None:
        await self.redis.set(self.key, "1", px=int(self.ttl_s * 1000))

    async def _run(self) -> None:
        while True:
            try:
                await self.beat()
            except (RedisError, OSError) as exc:  # the next beat retries; meanwhile others see us as dead
                log.warning("heartbeat.failed", error=type(exc).__name__)
            await asyncio.sleep(self.ttl_s / 3)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="heartbeat")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(RedisError, OSError):  # shutting down: the key expires by itself
            await self.redis.delete(self.key)


@dataclass
class Claim(Generic[_T]):
    """The outcome of :meth:`SingleFlight.claim_or_wait`: either we own the key, or someone's answer."""

    owned: bool
    found: _T | None = None
    timed_out: bool = False
    token: str = ""


class SingleFlight:
    def __init__(self, redis: aioredis.Redis, prefix: str, worker_id: str):
        self.redis, self.prefix, self.worker_id = redis, prefix, worker_id
        self._steal = redis.register_script(_STEAL)
        self._release = redis.register_script(_RELEASE)

    def _key(self, key: str) -> str:
        return f"{self.prefix}flight:{key}"

    async def release(self, key: str, claim: Claim[Any]) -> None:
        """Give up an owned claim (only ours: a claim taken over meanwhile is left alone)."""
        await self._release(keys=[self._key(key)], args=[claim.token])

    async def _claim(self, flight_key: str, token: str, ttl_ms: int) -> bool:
        if await self.redis.set(flight_key, token, nx=True, px=ttl_ms):
            return True
        holder = await self.redis.get(flight_key)
        return holder is not None and _text(holder) == token

    async def claim_or_wait(
        self,
        key: str,
        fetch: Callable[[], Awaitable[_T | None]],
        *,
        ttl_s: float,
        wait_until: float,
    ) -> Claim[_T]:
        """Return the answer ``fetch`` finds, or own ``key``, or time out at ``wait_until`` (monotonic).

        The caller that gets ``owned=True`` must do the work and then :meth:`release` the key.
        """
        delay = 0.005
        flight_key, ttl_ms = self._key(key), int(ttl_s * 1000)
        # A token per claim: a retried SET whose first try landed still recognises its own claim.
        token = f"{self.worker_id}|{uuid.uuid4().hex[:8]}"
        while True:
            found = await fetch()
            if found is not None:
                return Claim(owned=False, found=found)
            if await self._claim(flight_key, token, ttl_ms):
                # The holder may have finished between our fetch and our claim: look once more.
                found = await fetch()
                if found is not None:
                    await self._release(keys=[flight_key], args=[token])
                    return Claim(owned=False, found=found)
                return Claim(owned=True, token=token)
            if await self._take_over_from_dead(flight_key, token, ttl_ms):
                return Claim(owned=True, token=token)
            if time.monotonic() >= wait_until:
                return Claim(owned=False, timed_out=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def _take_over_from_dead(self, flight_key: str, token: str, ttl_ms: int) -> bool:
        holder = await self.redis.get(flight_key)
        if holder is None or await self._alive(_text(holder)):
            return False
        return bool(await self._steal(keys=[flight_key], args=[holder, token, ttl_ms]))

    async def _alive(self, holder: str) -> bool:
        holder_id = holder.split("|", 1)[0]
        if holder_id == self.worker_id:
            return True
        return bool(await self.redis.exists(f"{self.prefix}worker:{holder_id}"))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
