"""Provider rate limits held across every replica (issue #19).

A provider account has one limit, however many replicas call it. Each deployment with ``rpm``
and/or ``tpm`` in its ``litellm_params`` (litellm's own keys) gets a sliding one-minute log in
Redis; one atomic script step per call lets it through or says how long until there is room
(``ratelimit.lua``). Tokens are counted before the call from the request's estimate (prompt
tokens + ``max_tokens``) and corrected after from the provider's usage. A 429 the provider still
sends (its limit is shared with other clients of the account) cools the deployment down for every
replica for its ``Retry-After`` (or ``x-ratelimit-reset-*``) time.

``share`` lets batch work take only part of a limit, leaving the rest to interactive calls.
Redis failures fail open here (the call goes ahead, as it would without limits): the provider's
own 429 and the cooldown still protect the account, and the budget ledger fails closed anyway.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis
import structlog

from worker.state.redis import REDIS_ERRORS
from worker.text import as_text

log = structlog.get_logger("worker.state.ratelimit")
_SCRIPT = (Path(__file__).parent / "ratelimit.lua").read_text()
# A minute and a second, and a call counts from when its answer came (``correct``): measured with
# a window of exactly 60 s counted from admission, a burst of 100 at 60 rpm met 12 429s, since a
# call may reach the provider seconds after we let it through.
WINDOW_MS = 61_000


@dataclass(frozen=True)
class Limit:
    """A deployment's limits per minute; None: not limited."""

    rpm: int | None = None
    tpm: int | None = None


@dataclass(frozen=True)
class Ticket:
    """The answer to :meth:`RateLimits.take`: let through (``call_id``), or wait ``wait_s``
    (``None``: this call can never fit, e.g. more tokens than the whole tpm)."""

    taken: bool
    call_id: str = ""
    tokens: int = 0
    wait_s: float | None = 0.0
    cooling: bool = False
    rpm_left: int | None = None
    tpm_left: int | None = None


class RateLimits:
    def __init__(self, redis: aioredis.Redis, prefix: str):
        self.redis, self.prefix = redis, prefix
        self._script = redis.register_script(_SCRIPT)

    def _keys(self, deployment: str) -> list[str]:
        return [f"{self.prefix}rl:{deployment}", f"{self.prefix}rl:{deployment}:cool"]

    async def take(self, deployment: str, limit: Limit, *, tokens: int, share: float = 1.0) -> Ticket:
        """Let one call of ``tokens`` (estimated) through ``deployment``'s limits, or say when to retry."""
        call_id = uuid.uuid4().hex[:12]
        args: list[str | int | float] = [
            "take",
            call_id,
            tokens,
            -1 if limit.rpm is None else limit.rpm,
            -1 if limit.tpm is None else limit.tpm,
            share,
            WINDOW_MS,
        ]
        try:
            reply = await self._script(keys=self._keys(deployment), args=args)
        except REDIS_ERRORS as exc:  # fail open: the provider's own 429 still protects the account
            log.warning("ratelimit.unavailable", deployment=deployment, error=type(exc).__name__)
            return Ticket(taken=True, call_id="", tokens=tokens)
        outcome = as_text(reply[0])
        if outcome == "taken":
            rpm_left, tpm_left = int(reply[1]), int(reply[2])
            return Ticket(
                taken=True,
                call_id=call_id,
                tokens=tokens,
                rpm_left=rpm_left if rpm_left >= 0 else None,
                tpm_left=tpm_left if tpm_left >= 0 else None,
            )
        wait_ms = int(reply[1])
        return Ticket(
            taken=False, wait_s=None if wait_ms < 0 else wait_ms / 1000, cooling=outcome == "cooling"
        )

    async def correct(self, deployment: str, ticket: Ticket, actual_tokens: int) -> None:
        """The call was answered: its estimated tokens become the provider's usage, and it counts
        from now (the provider saw it no later than this)."""
        if not ticket.call_id:
            return
        args: list[str | int] = ["correct", ticket.call_id, ticket.tokens, actual_tokens, WINDOW_MS]
        try:
            await self._script(keys=self._keys(deployment), args=args)
        except REDIS_ERRORS as exc:
            log.warning("ratelimit.unavailable", deployment=deployment, error=type(exc).__name__)

    async def cool_down(self, deployment: str, seconds: float) -> None:
        """No replica calls ``deployment`` for ``seconds`` (a 429 the provider sent)."""
        try:
            await self._script(keys=self._keys(deployment), args=["cool", max(1, int(seconds * 1000))])
        except REDIS_ERRORS as exc:
            log.warning("ratelimit.unavailable", deployment=deployment, error=type(exc).__name__)
