"""A bug in our own code, on demand: stands in for whatever unforeseen error a request may trigger."""

from __future__ import annotations

import pytest

from worker.outcome import Delivery, Outcome
from worker.pipeline import Pipeline


def crash_on(monkeypatch: pytest.MonkeyPatch, marker: bytes, error: str = "simulated bug") -> list[int]:
    """Make ``Pipeline.handle`` raise ``RuntimeError(error)`` for bodies holding ``marker``.

    Returns the list that grows by one per delivery that crashed, to count redeliveries.
    """
    handle = Pipeline.handle
    crashes: list[int] = []

    async def buggy(self: Pipeline, delivery: Delivery) -> Outcome:
        if marker in delivery.body:
            crashes.append(1)
            raise RuntimeError(error)
        return await handle(self, delivery)

    monkeypatch.setattr(Pipeline, "handle", buggy)
    return crashes
