"""Which deployment of a model group may be called now, under limits shared by every replica.

For a model group with ``rpm``/``tpm`` on any deployment (litellm's own ``litellm_params`` keys),
:class:`Throttle` picks the deployment: the first, in a shuffled order, whose limits have room
(:mod:`worker.state.ratelimit` takes the room in one atomic step); when none has, the call waits
for the soonest room, bounded by the request's deadline, instead of calling and collecting a 429;
only a wait past the deadline gives up, and the caller falls back to the next model group. The
call is then pinned to that deployment (:meth:`worker.routing.Routes.pick` is given its id).
Groups without limits are left to the routes' own choice.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from worker.errors import ProviderError
from worker.settings import LLMSettings
from worker.state.ratelimit import Limit, RateLimits, Ticket

log = structlog.get_logger("worker.throttle")

# A 429 without a usable Retry-After still cools the deployment down this long for every replica.
DEFAULT_COOLDOWN_S = 1.0
_POLL_CAP_S = 1.0  # waiting for room re-checks at least this often (another replica may free some)


@dataclass(frozen=True)
class Admission:
    """A call let through ``deployment`` (``<model_name>#<index>``, as :mod:`worker.routing` names it)
    with its ticket."""

    deployment: str
    ticket: Ticket


class ThrottleEvents(Protocol):
    """Told of waits and of what is left (``observe.Metrics`` implements it)."""

    def waiting(self, delta: int) -> None: ...

    def waited(self, group: str, seconds: float) -> None: ...

    def left(self, deployment: str, rpm: int | None, tpm: int | None) -> None: ...


class _NoEvents:
    def waiting(self, delta: int) -> None:
        pass

    def waited(self, group: str, seconds: float) -> None:
        pass

    def left(self, deployment: str, rpm: int | None, tpm: int | None) -> None:
        pass


class Throttle:
    def __init__(
        self,
        settings: LLMSettings,
        limits: RateLimits,
        *,
        events: ThrottleEvents | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.limits, self._sleep = limits, sleep
        self.events: ThrottleEvents = events or _NoEvents()
        self.groups: dict[str, list[tuple[str, Limit]]] = {}
        for i, d in enumerate(settings.models):
            rpm, tpm = d.litellm_params.get("rpm"), d.litellm_params.get("tpm")
            entry = (f"{d.model_name}#{i}", Limit(_count(rpm), _count(tpm)))
            self.groups.setdefault(d.model_name, []).append(entry)
        # only groups where some deployment is limited are throttled
        self.groups = {
            group: entries
            for group, entries in self.groups.items()
            if any(limit.rpm is not None or limit.tpm is not None for _, limit in entries)
        }

    def throttles(self, group: str) -> bool:
        return group in self.groups

    async def admit(self, group: str, *, tokens: int, share: float, deadline: float) -> Admission | None:
        """Room on one of ``group``'s deployments, waiting for it up to ``deadline`` (monotonic);
        None when there is none in time (the caller falls back)."""
        started, counted = time.monotonic(), False
        try:
            while True:
                entries = list(self.groups[group])
                random.shuffle(entries)
                soonest: float | None = None
                for deployment, limit in entries:
                    ticket = await self.limits.take(deployment, limit, tokens=tokens, share=share)
                    if ticket.taken:
                        self.events.left(deployment, ticket.rpm_left, ticket.tpm_left)
                        return Admission(deployment, ticket)
                    if ticket.wait_s is not None:
                        soonest = ticket.wait_s if soonest is None else min(soonest, ticket.wait_s)
                if soonest is None or time.monotonic() + soonest >= deadline:
                    log.info("ratelimit.no_room", model=group, wait_s=soonest, tokens=tokens)
                    return None
                if not counted:
                    self.events.waiting(+1)
                    counted = True
                await self._sleep(min(soonest, _POLL_CAP_S))
        finally:
            if counted:
                self.events.waiting(-1)
                self.events.waited(group, time.monotonic() - started)

    async def answered(self, admission: Admission, actual_tokens: int) -> None:
        await self.limits.correct(admission.deployment, admission.ticket, actual_tokens)

    async def refused(self, admission: Admission, error: ProviderError) -> None:
        """The provider sent a 429 anyway: cool the deployment down for every replica."""
        if error.kind != "RateLimited":
            return
        seconds = error.retry_after_s if error.retry_after_s is not None else DEFAULT_COOLDOWN_S
        log.warning("ratelimit.provider_429", deployment=admission.deployment, cooldown_s=seconds)
        await self.limits.cool_down(admission.deployment, seconds)


def _count(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) and value >= 0 else None


def no_room_error(group: str) -> ProviderError:
    return ProviderError(
        "RateLimited",
        f"model {group}: every deployment is at its rpm/tpm limit until after the request's deadline",
        retryable=True,
    )
