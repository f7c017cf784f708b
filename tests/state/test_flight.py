"""Single flight (worker/state/flight.py) against the real Redis: the orderings a loaded event loop
produces, forced here so that each runs every time."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.support.config import Names
from worker.state.flight import SingleFlight


async def test_a_twin_that_reads_our_claim_before_we_see_it_waits(redis_client, names: Names):
    """Two copies of one request in one process: the first one's claim lands in Redis, but the
    event loop runs the twin (which finds the claim) before it hands the first its reply. The twin
    must take the claim for a live holder's and wait; it used to take the claim for a leftover of
    a dead incarnation, steal it, and make a second provider call (CI of 2026-12-02, under load)."""
    flight = SingleFlight(redis_client, names.prefix, "worker-a")
    claim_script = flight._claim
    first_landed = asyncio.Event()

    async def slow_to_hear_back(**kwargs: Any) -> Any:
        reply = await claim_script(**kwargs)
        if not first_landed.is_set():
            first_landed.set()
            await asyncio.sleep(0.3)  # the twin's whole claim runs in this gap
        return reply

    flight._claim = slow_to_hear_back  # type: ignore[method-assign]
    answer_key = f"{names.prefix}answer:twins"

    async def claim() -> Any:
        return await flight.claim_or_wait(
            "req:twins", answer_key=answer_key, decode=bytes, ttl_s=30, wait_until=time.monotonic() + 1.5
        )

    first = asyncio.ensure_future(claim())
    await first_landed.wait()
    twin = asyncio.ensure_future(claim())
    owner = await first
    assert owner.owned
    assert not twin.done(), "the twin took a claim its own process holds"
    await redis_client.set(answer_key, b"the answer")
    await flight.release("req:twins", owner)
    waited = await twin
    assert not waited.owned and waited.found == b"the answer"


async def test_a_claim_left_by_this_worker_before_a_restart_is_taken_over(redis_client, names: Names):
    """The other side of the same rule (issue #9): a claim naming this worker that no coroutine of
    this process holds is a leftover, taken over at once rather than waited on until the deadline."""
    await redis_client.set(f"{names.prefix}flight:req:left", "worker-a|deadbeef", px=30_000)
    flight = SingleFlight(redis_client, names.prefix, "worker-a")
    started = time.monotonic()
    claim = await flight.claim_or_wait(
        "req:left",
        answer_key=f"{names.prefix}answer:left",
        decode=bytes,
        ttl_s=30,
        wait_until=time.monotonic() + 10,
    )
    assert claim.owned and time.monotonic() - started < 2
    assert await redis_client.get(f"{names.prefix}flight:req:left") == claim.token.encode()
