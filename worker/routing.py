"""Which deployment of a model group a call goes to, and which deployments are cooled down.

This replaces litellm's ``Router`` in front of ``litellm.acompletion`` (issue #21). The worker runs
its own retries, fallbacks and deadline (:mod:`worker.llm`), so what it used of the Router was the
deployment list, the pick within a group and the cooldowns; the Router's layers around them cost
0.24 ms of CPU per call on the 2-core VM (``bench/litellm_paths.py``, quiet machine: 2.17 ms per
``Router.acompletion`` against 1.93 ms for ``litellm.acompletion`` with the same parameters).

The behaviour is the Router's of litellm 1.82.6 as the worker configured it (``simple-shuffle``,
``allowed_fails`` at litellm's default, ``cooldown_time`` 30 s; ``router_utils/cooldown_handlers.py``
and ``router_strategy/simple_shuffle.py``):

- the pick is random among the group's healthy deployments (of the lowest ``order`` when some set
  one), weighted by ``weight``, else ``rpm``, else ``tpm`` when the first of them sets it;
- a 401 or 404 cools a deployment down at once; a 429 does when its group has another deployment;
  so does more than half of its calls failing in the current minute (five calls at least), when
  its group has another; a single deployment otherwise only after 1,000 failed calls in a minute
  and none answered. Other 4xx, connection errors and the worker's own deadline never do;
- a call pinned to one deployment (the :class:`~worker.throttle.Throttle` chose it) goes there.

Cooldowns are this process's, as the Router's were without a Redis of its own; provider rate
limits shared by every replica are the throttle's.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from worker.errors import ProviderError

COOLDOWN_S = 30.0
_RATE_CALLS = 5  # calls in a minute before the failure rate may cool a deployment down
_RATE = 0.5
_SINGLE_CALLS = 1000  # a group's only deployment: every call of the minute failed, this many at least
_COOLING_4XX = frozenset({401, 404, 408, 429})
_NOT_RETRIED = frozenset({401, 404})  # cooled down at the first failure
_WEIGHTS = ("weight", "rpm", "tpm")


@dataclass
class Target:
    """One deployment: its id (``<model_name>#<index>``, as prices and rate limits name it), group
    and the litellm parameters of a call to it, secrets resolved."""

    id: str
    group: str
    params: dict[str, Any]
    cooled_until: float = 0.0
    _minute: int = -1
    _answered: int = 0
    _failed: int = 0
    _reason: str = field(default="", repr=False)

    def count(self, now: float, *, failed: bool) -> tuple[int, int]:
        """Count a call in the current minute; the minute's (answered, failed)."""
        minute = int(now // 60)
        if minute != self._minute:
            self._minute, self._answered, self._failed = minute, 0, 0
        if failed:
            self._failed += 1
        else:
            self._answered += 1
        return self._answered, self._failed


class Routes:
    """The deployments of every model group, the pick among them and their cooldowns."""

    def __init__(
        self,
        targets: Iterable[Target],
        *,
        cooldown_s: float = COOLDOWN_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._by_id = {t.id: t for t in targets}
        self._groups: dict[str, list[Target]] = {}
        for target in self._by_id.values():
            self._groups.setdefault(target.group, []).append(target)
        self._cooldown_s, self._clock = cooldown_s, clock

    @property
    def groups(self) -> list[str]:
        return list(self._groups)

    def first(self, group: str) -> Target:
        return self._groups[group][0]

    def pick(self, group: str, pinned: str | None = None) -> Target:
        """A healthy deployment of ``group`` (``pinned``: that one); raises the retryable
        ``NoHealthyDeployment`` with the wait until the first comes back when all are cooled down."""
        if pinned is not None:
            return self._by_id[pinned]
        now = self._clock()
        targets = self._groups[group]
        healthy = [t for t in targets if t.cooled_until <= now]
        if not healthy:
            back = min(targets, key=lambda t: t.cooled_until)
            wait = back.cooled_until - now
            return_in = max(1, round(wait))
            raise ProviderError(
                "NoHealthyDeployment",
                f"every deployment of model '{group}' is cooled down after failing "
                f"({back._reason}); it is tried again in {return_in} s",
                retryable=True,
                retry_after_s=wait,
            )
        if len(healthy) == 1:
            return healthy[0]
        orders = [t.params["order"] for t in healthy if isinstance(t.params.get("order"), int)]
        if orders:  # as litellm: only the lowest order, those without one left out
            healthy = [t for t in healthy if t.params.get("order") == min(orders)]
        for key in _WEIGHTS:
            if healthy[0].params.get(key) is not None:
                weights = [_number(t.params.get(key)) for t in healthy]
                if sum(weights) > 0:
                    return random.choices(healthy, weights=weights)[0]
                break
        return random.choice(healthy)

    def answered(self, target: Target) -> None:
        target.count(self._clock(), failed=False)

    def failed(self, target: Target, error: ProviderError) -> None:
        """Count a failed call; cool ``target`` down when the policy above says so."""
        now = self._clock()
        answered, failed = target.count(now, failed=True)
        status = error.status_code
        if error.kind == "ConnectionError" or status is None:
            return
        if 400 <= status < 500 and status not in _COOLING_4XX:
            return
        shared = len(self._groups[target.group]) > 1
        calls = answered + failed
        if (
            status in _NOT_RETRIED
            or (status == 429 and shared)
            or (shared and calls >= _RATE_CALLS and failed / calls > _RATE)
            or (answered == 0 and failed >= _SINGLE_CALLS)
        ):
            target.cooled_until = now + self._cooldown_s
            target._reason = f"{error.kind}, status {status}"


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and value > 0 else 0.0
