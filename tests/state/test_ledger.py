"""The budget ledger (issue #4): hard limits across replicas, idempotent, fail closed."""

from __future__ import annotations

import asyncio
import math
import signal
import subprocess
import sys

import pytest

from tests.support.bodies import request_body
from tests.support.config import (
    COST,
    deployment,
    exact_llm,
    llm_section,
    write_config,
)
from tests.support.paths import ROOT
from tests.support.peers import raw_peer
from tests.support.processes import WorkerProcess, start_replicas
from tests.support.queues import drain_queue
from tests.support.services import PrivateRedis
from worker.errors import BudgetExceeded
from worker.messages import Status
from worker.settings import Budget
from worker.state.ledger import NANO, BudgetLedger, to_nano


def budget(**overrides) -> Budget:
    return Budget(
        **{"max_cost_per_task": 1.0, "max_cost_per_day": 10.0, "max_cost_per_agent_day": {}, **overrides}
    )


def test_money_is_integer_nano_dollars_rounded_up():
    assert to_nano(0.0007) == 700_000
    assert to_nano(1e-10) == 1  # a limit is never undershot
    assert to_nano(2.5) == 2_500_000_000


async def test_concurrent_replicas_never_overrun_a_task_budget(
    tmp_path, names, amqp_url, redis_url, fake, worker_processes, redis_client
):
    fake.latency_s = 0.2
    admitted = 12
    llm = exact_llm(
        fake.base_url,
        budget={
            "max_cost_per_task": admitted * COST + COST / 2,
            "max_cost_per_day": 100.0,
            "max_cost_per_agent_day": {"writer": 100.0},
        },
    )
    config = write_config(tmp_path / "cfg", names, amqp_url, redis_url, llm, bus={"prefetch": 16})
    await start_replicas(config, 3, worker_processes)

    sent = 45
    async with raw_peer(amqp_url, names.request_queue) as peer:
        for i in range(sent):
            await peer.publish(request_body(f"spend {i}", task_id="tight", use_cache=False))
        await peer.wait_replies(sent, timeout_s=60)

    results = peer.results()
    statuses = [r.status for r in results]
    print(
        {
            (r.status, r.error.type if r.error else None, r.error.message[:200] if r.error else None)
            for r in results
        }
    )
    assert statuses.count(Status.ok) == admitted
    assert statuses.count(Status.budget_exceeded) == sent - admitted
    assert fake.calls["primary"] == admitted  # a rejected request never reaches a provider
    rejected = next(r for r in results if r.status is Status.budget_exceeded)
    assert rejected.error is not None and "task:tight" in rejected.error.message
    assert f"limit ${admitted * COST + COST / 2:.6f}" in rejected.error.message

    ledger = BudgetLedger(redis_client, names.prefix, budget(), reservation_ttl_s=60)
    state = await ledger.state(ledger.task_scope("tight"))
    assert state.spent_usd == pytest.approx(admitted * COST)
    assert state.spent_usd <= admitted * COST + COST / 2
    assert state.spent_usd == pytest.approx(sum(r.cost_usd for r in results))
    assert state.reserved_usd == 0
    assert state.by_model_usd == {"primary": pytest.approx(admitted * COST)}
    assert {line["event"] for p in worker_processes for line in p.lines} >= {"worker.ready", "request.done"}
    assert all(sum(1 for _ in p.events("request.done")) > 0 for p in worker_processes)  # all three worked


async def test_agent_and_day_caps_name_their_scope(make_settings, start_worker, client, fake):
    settings = make_settings(
        **{
            **exact_llm(fake.base_url),
            "budget": {
                "max_cost_per_task": 10.0,
                "max_cost_per_day": 3 * COST,
                "max_cost_per_agent_day": {"critic": COST, "writer": 10.0},
            },
        }
    )
    async with start_worker(settings):
        first = await client.complete("one", agent="critic", use_cache=False)
        second = await client.complete("two", agent="critic", use_cache=False)
        others = [await client.complete(f"w{i}", agent="writer", use_cache=False) for i in range(3)]

    assert first.status is Status.ok and first.cost_usd == pytest.approx(COST)
    assert second.status is Status.budget_exceeded
    assert second.error is not None and second.error.message.startswith("budget agent:critic:")
    assert [r.status for r in others] == [Status.ok, Status.ok, Status.budget_exceeded]
    assert others[2].error is not None and "budget day:" in others[2].error.message
    assert fake.total_calls() == 3


async def test_reservation_covers_the_dearest_model_of_the_fallback_chain(
    make_settings, start_worker, client, fake
):
    import litellm

    models = [
        deployment("primary", "primary", fake.base_url, price=(1e-6, 2e-6)),
        deployment("dear", "dear", fake.base_url, price=(5e-5, 9e-5)),
    ]
    settings = make_settings(
        models=models,
        fallback_models=["dear"],
        max_tokens=100,
        budget={
            "max_cost_per_task": 1e-6,
            "max_cost_per_day": 10.0,
            "max_cost_per_agent_day": {"writer": 10.0},
        },
    )
    messages = [{"role": "user", "content": "how much could this cost"}]
    async with start_worker(settings):
        result = await client.complete(messages, agent="writer", task_id="t", use_cache=False)

    tokens = math.ceil(litellm.token_counter(model="openai/primary", messages=messages) * 1.2)
    worst_nano = tokens * 50_000 + 100 * 90_000  # 5e-5 and 9e-5 USD per token, in nano-dollars
    assert result.status is Status.budget_exceeded
    assert result.error is not None and f"needs up to ${worst_nano / NANO:.6f}" in result.error.message
    assert fake.total_calls() == 0


async def test_settle_is_idempotent_and_release_frees_the_reservation(redis_client, names):
    ledger = BudgetLedger(redis_client, names.prefix, budget(max_cost_per_task=1.0), reservation_ttl_s=60)
    scopes = ledger.scopes("writer", "t1")
    reservation = await ledger.reserve("r1", to_nano(0.4), scopes)
    assert (await ledger.state(scopes[0])).reserved_usd == pytest.approx(0.4)

    assert await ledger.settle(reservation, cost_nano=to_nano(0.1), model="m", result_json="{}")
    assert not await ledger.settle(
        reservation, cost_nano=to_nano(0.1), model="m", result_json="{}"
    )  # a retried settle
    state = await ledger.state(scopes[0])
    assert state.spent_usd == pytest.approx(0.1) and state.reserved_usd == 0

    failed = await ledger.reserve("r2", to_nano(0.5), scopes)
    assert await ledger.release(failed)
    state = await ledger.state(scopes[0])
    assert state.spent_usd == pytest.approx(0.1) and state.reserved_usd == 0 and state.calls == 1


async def test_a_redelivered_request_adopts_its_reservation_instead_of_adding_one(redis_client, names):
    ledger = BudgetLedger(redis_client, names.prefix, budget(max_cost_per_task=0.5), reservation_ttl_s=60)
    scopes = ledger.scopes("writer", "t1")
    first = await ledger.reserve("same", to_nano(0.4), scopes)
    again = await ledger.reserve("same", to_nano(0.4), scopes)  # a second worker took the request over
    assert again.adopted and again.member == first.member
    assert (await ledger.state(scopes[0])).reserved_usd == pytest.approx(0.4)
    await ledger.settle(again, cost_nano=to_nano(0.3), model="m")
    assert not await ledger.settle(
        first, cost_nano=to_nano(0.3), model="m"
    )  # the first worker woke up: no double charge
    assert (await ledger.state(scopes[0])).spent_usd == pytest.approx(0.3)


async def test_expired_reservations_are_released(redis_client, names):
    ledger = BudgetLedger(redis_client, names.prefix, budget(max_cost_per_task=1.0), reservation_ttl_s=0.3)
    scopes = ledger.scopes("writer", "t1")
    await ledger.reserve("dead-worker", to_nano(0.8), scopes)  # never settled: its worker died
    with pytest.raises(BudgetExceeded):
        await ledger.reserve("blocked", to_nano(0.5), scopes)
    await asyncio.sleep(0.4)  # let the reservation's TTL pass
    assert (await ledger.state(scopes[0])).reserved_usd == 0
    reservation = await ledger.reserve("after", to_nano(0.5), scopes)  # the sweep released the dead one
    assert not reservation.adopted
    raw = await redis_client.hget(f"{names.prefix}budget:{scopes[0].name}", "reserved")
    assert int(raw) == to_nano(0.5)


async def test_daily_keys_expire_after_the_day(redis_client, names):
    ledger = BudgetLedger(redis_client, names.prefix, budget(), reservation_ttl_s=60)
    scopes = ledger.scopes("writer", None)
    await ledger.reserve("r", to_nano(0.01), scopes)
    for scope in scopes:
        ttl = await redis_client.ttl(f"{names.prefix}budget:{scope.name}")
        assert 2 * 86400 < ttl <= 3 * 86400  # the rest of today, then two days for `budget show`


async def test_kill_mid_call_then_redelivery_charges_once(
    tmp_path, names, amqp_url, redis_url, fake, worker_processes, redis_client
):
    fake.latency_s = 1.5
    config = write_config(tmp_path / "cfg", names, amqp_url, redis_url, exact_llm(fake.base_url))
    victim = await WorkerProcess(config).start()
    worker_processes.append(victim)
    sent = 10
    async with raw_peer(amqp_url, names.request_queue) as peer:
        for i in range(sent):
            await peer.publish(request_body(f"kill {i}", task_id="k", use_cache=False))
        await fake.wait_until(lambda f: f.in_flight == sent, timeout_s=20)
        victim.signal(signal.SIGKILL)  # every call is at the provider, none settled
        await victim.wait()
        worker_processes.append(await WorkerProcess(config).start())
        await peer.wait_replies(sent, timeout_s=60)

    results = peer.results()
    assert sorted(r.request_id for r in results) == sorted({r.request_id for r in results})
    assert all(r.status is Status.ok for r in results)
    ledger = BudgetLedger(redis_client, names.prefix, budget(), reservation_ttl_s=60)
    state = await ledger.state(ledger.task_scope("k"))
    assert state.spent_usd == pytest.approx(sent * COST)  # once per request, not once per provider call
    assert state.reserved_usd == 0
    assert fake.calls["primary"] == 2 * sent  # the provider was called again: the first calls were lost


async def test_redis_stopped_mid_run_fails_closed_and_recovers(
    tmp_path, names, amqp_url, fake, worker_processes
):
    redis = await PrivateRedis().start()
    try:
        config = write_config(tmp_path / "cfg", names, amqp_url, redis.url, exact_llm(fake.base_url))
        worker = await WorkerProcess(config).start()
        worker_processes.append(worker)
        async with raw_peer(amqp_url, names.request_queue) as peer:
            await peer.publish(request_body("before", use_cache=False))
            await peer.wait_replies(1)
            await redis.stop()
            for i in range(3):
                await peer.publish(request_body(f"during {i}", use_cache=False))
            await peer.wait_replies(4)
            await redis.start()
            await peer.publish(request_body("after", use_cache=False))
            await peer.wait_replies(5, timeout_s=30)

        before, *during, after = peer.results()
        assert before.status is Status.ok and after.status is Status.ok
        for result in during:
            assert result.status is Status.failed
            assert (
                result.error is not None
                and result.error.type == "LedgerUnavailable"
                and result.error.retryable
            )
        assert fake.calls["primary"] == 2  # nothing was sent to the provider while the ledger was away
        assert worker.proc is not None and worker.proc.returncode is None  # it kept running
    finally:
        await redis.stop()


async def test_budget_show_prints_spend_reserved_and_limit(
    tmp_path, names, amqp_url, redis_url, redis_client
):
    llm = llm_section(
        "http://127.0.0.1:9/v1",
        budget={
            "max_cost_per_task": 2.0,
            "max_cost_per_day": 50.0,
            "max_cost_per_agent_day": {"writer": 5.0},
        },
    )
    config = write_config(tmp_path / "cfg", names, amqp_url, redis_url, llm)
    ledger = BudgetLedger(
        redis_client, names.prefix, budget(max_cost_per_agent_day={"writer": 5.0}), reservation_ttl_s=60
    )
    settled = await ledger.reserve("a", to_nano(0.25), ledger.scopes("writer", "t-9"))
    await ledger.settle(settled, cost_nano=to_nano(0.125), model="primary")
    await ledger.reserve("b", to_nano(0.5), ledger.scopes("writer", "t-9"))

    proc = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "worker",
            "--config",
            str(config),
            "budget",
            "show",
            "--task",
            "t-9",
            "--agent",
            "writer",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.strip()}
    assert lines["task:t-9"][1:4] == ["0.125000", "0.500000", "2.0000"]
    today = ledger.today().isoformat()
    assert lines[f"agent:writer:{today}"][1:4] == ["0.125000", "0.500000", "5.0000"]
    assert lines[f"day:{today}"][3] == "50.0000"
    assert lines["primary"][1] == "0.125000"  # spend per model


async def test_a_redis_error_inside_a_ledger_step_is_an_answered_failure_not_a_crash_loop(
    make_settings, start_worker, client, fake, names, amqp_url, redis_client
):
    # A key of the wrong type where the day's budget hash belongs: Redis answers WRONGTYPE, which
    # is not a lost connection. It used to escape as a crash, be requeued to the delivery limit
    # and be dead-lettered as WorkerCrashed with no answer (issue #14).
    settings = make_settings()
    ledger = BudgetLedger(redis_client, names.prefix, settings.llm.budget, reservation_ttl_s=60)
    await redis_client.set(f"{names.prefix}budget:day:{ledger.today().isoformat()}", "not a hash")
    async with start_worker(settings):
        result = await client.complete("hello", agent="writer")

    assert result.status is Status.failed
    assert result.error is not None and result.error.type == "LedgerUnavailable" and result.error.retryable
    assert "refused the step (ResponseError: WRONGTYPE" in result.error.message
    assert fake.calls.get("primary", 0) == 0  # never sent to a provider
    dead = await drain_queue(amqp_url, names.dead_letter_queue)
    assert [m.headers["x-dlq-reason"] for m in dead] == ["LedgerUnavailable"]


async def test_daily_keys_expire_two_days_after_their_own_day_whichever_day_came_before(redis_client, names):
    """_keep_until keeps the last day's answer: a request of the next day (or of an earlier one,
    a clock stepped back) gets its own day's expiry, in the ledger's timezone."""
    from datetime import date, datetime, timedelta
    from zoneinfo import ZoneInfo

    ledger = BudgetLedger(redis_client, names.prefix, budget(timezone="Europe/Paris"), reservation_ttl_s=60)
    paris = ZoneInfo("Europe/Paris")

    def expected(day: date) -> int:
        return int(datetime.combine(day + timedelta(days=3), datetime.min.time(), paris).timestamp())

    # Paris moves to summer time on 2026-03-29: the 26th's keys expire then, the 27th's a day later
    days = [date(2026, 3, 26), date(2026, 3, 26), date(2026, 3, 27), date(2026, 3, 25)]
    for day in days:
        [agent, whole] = ledger.scopes("writer", None, day)
        assert agent.expire_at == whole.expire_at == expected(day), day
    assert expected(days[2]) - expected(days[0]) == 23 * 3600  # that day is an hour short
