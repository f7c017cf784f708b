"""A request's single-flight claim and its budget reservation in one Redis script (issue #21):
every outcome of the claim and of the reservation, as each step alone gives it."""

from __future__ import annotations

import time

import pytest
import redis.asyncio as aioredis

from tests.support.bodies import request_body
from tests.support.config import COST, exact_llm, write_config
from tests.support.peers import raw_peer
from tests.support.services import PrivateRedis
from worker.app import running_worker
from worker.errors import BudgetExceeded
from worker.messages import Status
from worker.settings import Budget, load_settings
from worker.state.flight import Claim, SingleFlight
from worker.state.ledger import BudgetLedger, ClaimingReserve, to_nano


@pytest.fixture
def ledger(redis_client, names) -> BudgetLedger:
    budget = Budget(max_cost_per_task=1.0, max_cost_per_day=10.0, max_cost_per_agent_day={})
    return BudgetLedger(redis_client, names.prefix, budget, reservation_ttl_s=60)


async def claim(flight: SingleFlight, names, first: ClaimingReserve, wait_s: float = 0.3) -> Claim[bytes]:
    return await flight.claim_or_wait(
        "req:r1",
        answer_key=f"{names.prefix}answer:r1",
        decode=bytes,
        ttl_s=30,
        wait_until=time.monotonic() + wait_s,
        first=first,
    )


async def test_an_owned_claim_carries_its_reservation(redis_client, names, ledger):
    flight = SingleFlight(redis_client, names.prefix, "worker-a")
    scopes = ledger.scopes("writer", "t1")
    first = ledger.claiming("r1", to_nano(0.4), scopes)
    owned = await claim(flight, names, first)
    assert owned.owned and first.reservation is not None and not first.reservation.adopted
    assert await redis_client.get(f"{names.prefix}flight:req:r1") == owned.token.encode()
    assert (await ledger.state(scopes[0])).reserved_usd == pytest.approx(0.4)
    assert await ledger.settle(first.reservation, cost_nano=to_nano(0.1), model="m")
    state = await ledger.state(scopes[0])
    assert state.spent_usd == pytest.approx(0.1) and state.reserved_usd == 0


async def test_a_stored_answer_is_found_and_nothing_is_reserved(redis_client, names, ledger):
    await redis_client.set(f"{names.prefix}answer:r1", b"the answer")
    flight = SingleFlight(redis_client, names.prefix, "worker-a")
    scopes = ledger.scopes("writer", "t1")
    first = ledger.claiming("r1", to_nano(0.4), scopes)
    found = await claim(flight, names, first)
    assert not found.owned and found.found == b"the answer" and first.reservation is None
    assert (await ledger.state(scopes[0])).reserved_usd == 0
    assert await redis_client.exists(f"{names.prefix}flight:req:r1") == 0


async def test_a_claim_held_by_a_live_worker_is_waited_for_and_nothing_is_reserved(
    redis_client, names, ledger
):
    await redis_client.set(f"{names.prefix}worker:worker-b", "1", px=30_000)
    await redis_client.set(f"{names.prefix}flight:req:r1", "worker-b|abcd", px=30_000)
    flight = SingleFlight(redis_client, names.prefix, "worker-a")
    scopes = ledger.scopes("writer", "t1")
    first = ledger.claiming("r1", to_nano(0.4), scopes)
    waited = await claim(flight, names, first)
    assert waited.timed_out and first.reservation is None
    assert (await ledger.state(scopes[0])).reserved_usd == 0


async def test_over_budget_raises_and_leaves_no_claim_behind(redis_client, names, ledger):
    flight = SingleFlight(redis_client, names.prefix, "worker-a")
    scopes = ledger.scopes("writer", "t1")
    with pytest.raises(BudgetExceeded, match="task:t1"):
        await claim(flight, names, ledger.claiming("r1", to_nano(1.5), scopes))
    assert await redis_client.exists(f"{names.prefix}flight:req:r1") == 0  # a retry may claim at once
    assert (await ledger.state(scopes[0])).reserved_usd == 0
    again = ledger.claiming("r1", to_nano(0.5), scopes)
    assert (await claim(flight, names, again)).owned and again.reservation is not None


async def test_a_redelivered_request_adopts_its_reservation(redis_client, names, ledger):
    scopes = ledger.scopes("writer", "t1")
    earlier = await ledger.reserve("r1", to_nano(0.4), scopes)  # its worker died after reserving
    flight = SingleFlight(redis_client, names.prefix, "worker-a")
    first = ledger.claiming("r1", to_nano(0.4), scopes)
    assert (await claim(flight, names, first)).owned
    assert first.reservation is not None and first.reservation.adopted
    assert first.reservation.member == earlier.member
    assert (await ledger.state(scopes[0])).reserved_usd == pytest.approx(0.4)


async def evalsha_calls(client) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_an_uncached_request_costs_two_redis_scripts(tmp_path, names, amqp_url, fake):
    """Claim and reserve in one script, settle with the stored answer in another; over budget, one
    script and no release. Counted by a Redis of this test's own (the shared one serves others)."""
    redis = await PrivateRedis().start()
    try:
        llm = exact_llm(fake.base_url, budget={"max_cost_per_task": COST * 1.5, "max_cost_per_day": 100.0,
                                               "max_cost_per_agent_day": {"writer": 100.0}})  # fmt: skip
        settings = load_settings(write_config(tmp_path / "cfg", names, amqp_url, redis.url, llm), environ={})
        client = aioredis.Redis.from_url(redis.url)
        async with running_worker(settings), raw_peer(amqp_url, names.request_queue) as peer:
            await peer.publish(request_body("warm-up", use_cache=False))  # loads the scripts
            await peer.wait_replies(1)
            before = await evalsha_calls(client)
            await peer.publish(request_body("counted", task_id="t", use_cache=False))
            await peer.wait_replies(2)
            after_ok = await evalsha_calls(client)
            await peer.publish(request_body("over budget", task_id="t", use_cache=False))
            await peer.wait_replies(3)
            after_refused = await evalsha_calls(client)
        await client.aclose()
    finally:
        await redis.stop()
    statuses = [r.status for r in peer.results()]
    assert statuses == [Status.ok, Status.ok, Status.budget_exceeded]
    assert after_ok - before == 2
    assert after_refused - after_ok == 1
