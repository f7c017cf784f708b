"""Single flight across replicas: one holder per key does the work, the others wait for its answer.

Used twice: per ``request_id`` (two copies of one request in flight make one provider call) and
per cache key (a burst of identical requests makes one provider call). A claim is a Redis key
``flight:<key>`` holding ``<worker id>|<token>[|<tag>]``; the answer lives at a key of its own (the
result store's or the cache's), and one Lua call reads the answer or takes the claim, so the common case
costs one round trip. Every worker keeps ``worker:<id>`` alive with a short TTL
(:class:`Heartbeat`); a waiter that finds the holder's heartbeat gone takes the claim over, so a
worker killed mid-call delays its duplicates by seconds, not by the request deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
import structlog

from worker.state.redis import REDIS_ERRORS
from worker.text import as_text

_T = TypeVar("_T")
# A claim attempt: called with ``keys=[flight key, answer key]``, ``args=[token, ttl_ms]``; answers
# ``[outcome, value]`` as :data:`_CLAIM` does.
ClaimScript = Callable[..., Awaitable[Any]]
log = structlog.get_logger("worker.flight")

# Read the answer, or claim the key, or say who holds it. KEYS: flight key, answer key.
# ARGV: token, ttl_ms. A retried call whose first try landed finds its own token and owns it.
_CLAIM = """
local answer = redis.call('GET', KEYS[2])
if answer then return {'found', answer} end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'owned', ''} end
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return {'owned', ''} end
return {'held', holder or ''}
"""
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
    """Keeps ``<prefix>worker:<id>`` alive in each Redis that holds this worker's claims."""

    def __init__(
        self, clients: Sequence[aioredis.Redis], prefix: str, worker_id: str, *, ttl_s: float = 10.0
    ):
        self.clients, self.key, self.ttl_s = list(clients), f"{prefix}worker:{worker_id}", ttl_s
        self._task: asyncio.Task[None] | None = None

    async def beat(self) -> None:
        for client in self.clients:
            try:
                await client.set(self.key, "1", px=int(self.ttl_s * 1000))
            except REDIS_ERRORS as exc:  # the next beat retries; meanwhile others see us as dead
                log.warning("heartbeat.failed", error=type(exc).__name__)

    async def _run(self) -> None:
        while True:
            await self.beat()
            await asyncio.sleep(self.ttl_s / 3)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="heartbeat")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for client in self.clients:
            with contextlib.suppress(*REDIS_ERRORS):  # shutting down: the key expires by itself
                await client.delete(self.key)


@dataclass
class Claim(Generic[_T]):
    """The outcome of :meth:`SingleFlight.claim_or_wait`: either we own the key, or someone's answer."""

    owned: bool
    found: _T | None = None
    timed_out: bool = False
    token: str = ""
    conflict: bool = False  # held by a claim of another tag: not the same work


class SingleFlight:
    """Claims on one Redis; the answers it waits for must be in the same Redis."""

    def __init__(self, redis: aioredis.Redis, prefix: str, worker_id: str):
        self.redis, self.prefix, self.worker_id = redis, prefix, worker_id
        self._held: set[str] = set()  # tokens of the claims this process holds and works on
        self._claim = redis.register_script(_CLAIM)
        self._steal = redis.register_script(_STEAL)
        self._release = redis.register_script(_RELEASE)

    def _key(self, key: str) -> str:
        return f"{self.prefix}flight:{key}"

    async def release(self, key: str, claim: Claim[_T]) -> None:
        """Give up an owned claim (only ours: a claim taken over meanwhile is left alone)."""
        self.forget(claim)  # done with it, even if Redis does not hear of it
        await self._release(keys=[self._key(key)], args=[claim.token])

    def forget(self, claim: Claim[_T]) -> None:
        """Done with a claim, leaving its key to expire: only for a key whose answer is stored,
        since :data:`_CLAIM` reads the answer before it looks at the claim."""
        self._held.discard(claim.token)

    async def claim_or_wait(
        self,
        key: str,
        *,
        answer_key: str,
        decode: Callable[[bytes], _T],
        ttl_s: float,
        wait_until: float,
        tag: str = "",
        first: ClaimScript | None = None,
    ) -> Claim[_T]:
        """The answer stored at ``answer_key``, or ownership of ``key``, or a time-out at ``wait_until``.

        ``wait_until`` is monotonic time. The caller that gets ``owned=True`` must do the work, store
        its answer at ``answer_key``, then :meth:`release` the claim. A ``tag`` names the work: a
        claim held with another tag is answered ``conflict`` at once instead of waited for.
        ``first`` replaces :data:`_CLAIM` for the first try, called like it and answering like it,
        on the same Redis (the ledger's :class:`~worker.state.ledger.ClaimingReserve` reserves in
        the same step); the tries after it use :data:`_CLAIM`.
        """
        delay = 0.005
        flight_key, ttl_ms = self._key(key), int(ttl_s * 1000)
        token = f"{self.worker_id}|{uuid.uuid4().hex[:8]}" + (f"|{tag}" if tag else "")
        # Held from before Redis can name it: a twin in this process that reads the claim before
        # our own reply is processed must see a live holder, not a leftover to take over.
        self._held.add(token)
        owned = False
        try:
            while True:
                script, first = first or self._claim, None
                outcome, value = await script(keys=[flight_key, answer_key], args=[token, ttl_ms])
                outcome = as_text(outcome)
                if outcome == "found":
                    return Claim(owned=False, found=decode(value))
                if outcome == "owned":
                    owned = True
                    return Claim(owned=True, token=token)
                holder = as_text(value)
                if tag and holder and holder.split("|")[2:] != [tag]:
                    return Claim(owned=False, conflict=True)
                if holder and not await self._alive(holder):
                    if await self._steal(keys=[flight_key], args=[holder, token, ttl_ms]):
                        owned = True
                        return Claim(owned=True, token=token)
                    continue
                if time.monotonic() >= wait_until:
                    return Claim(owned=False, timed_out=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.1)
        finally:
            if not owned:
                self._held.discard(token)

    async def _alive(self, holder: str) -> bool:
        """Whether the claim's holder may still be working on it: its worker's heartbeat is alive.
        A claim naming this worker is alive only while this process holds it: one whose release
        could not reach Redis is left behind, and a persistent Redis keeps it past a restart
        (issue #9: the replay of such a request waited for itself until its deadline)."""
        holder_id = holder.split("|", 1)[0]
        if holder_id == self.worker_id:
            return holder in self._held
        return bool(await self.redis.exists(f"{self.prefix}worker:{holder_id}"))
