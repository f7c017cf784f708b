"""``budget show`` on a bad day (issue #23): every scope that holds money is listed, configured
or not, so the agents of a day add up to the day; filters narrow it; ``--json`` for scripts."""

from __future__ import annotations

import json

from tests.support.processes import run_cli
from worker.app import build_ledger
from worker.state.keys import part
from worker.state.ledger import NANO


async def test_budget_show_lists_every_scope_holding_money(make_settings, redis_client):
    budget = {"max_cost_per_task": 1.0, "max_cost_per_day": 10.0, "max_cost_per_agent_day": {"writer": 5.0}}
    settings = make_settings(budget=budget)
    ledger = build_ledger(settings, redis_client)
    charges = [
        ("writer", None, 0.1),
        ("ghost", "t-9", 0.0477),
        ("visitor:x", None, 0.1),
    ]  # two not configured
    for i, (agent, task, usd) in enumerate(charges):
        if ":" in agent:  # not an agent name the worker accepts: stands for a key it did not write
            key = f"{settings.redis.key_prefix}budget:agent:{part(agent)}:2000-01-01"  # as keys are named
            await redis_client.hset(key, "spent", 5)
            continue
        reservation = await ledger.reserve(f"r-{i}", round(0.2 * NANO), ledger.scopes(agent, task))
        await ledger.settle(reservation, cost_nano=round(usd * NANO), model="primary")
    await ledger.reserve("r-held", round(0.01 * NANO), ledger.scopes("holder", None))  # held, not spent

    shown = await run_cli(settings.config_dir, "budget", "show", "--json")
    assert shown.code == 0, shown.err
    rows = {r["scope"]: r for r in map(json.loads, shown.out.splitlines())}
    day = ledger.today().isoformat()
    assert set(rows) == {
        "task:t-9",
        f"agent:ghost:{day}",
        f"agent:holder:{day}",
        f"agent:writer:{day}",
        f"day:{day}",
    }
    assert rows[f"agent:ghost:{day}"]["spent_usd"] == 0.0477 and rows["task:t-9"]["spent_usd"] == 0.0477
    assert rows[f"agent:holder:{day}"]["reserved_usd"] == 0.01
    assert rows[f"day:{day}"]["spent_usd"] == sum(
        rows[f"agent:{a}:{day}"]["spent_usd"] for a in ("writer", "ghost")
    )

    table = await run_cli(settings.config_dir, "budget", "show")
    assert f"agents of {day} spent 0.147700 of the day's 0.147700" in table.out

    only_ghost = await run_cli(
        settings.config_dir, "budget", "show", "--agent", "ghost", "--kind", "agent", "--json"
    )
    assert [json.loads(line)["scope"] for line in only_ghost.out.splitlines()] == [f"agent:ghost:{day}"]
    tasks = await run_cli(settings.config_dir, "budget", "show", "--kind", "task", "--json")
    assert [json.loads(line)["scope"] for line in tasks.out.splitlines()] == ["task:t-9"]
    other_day = await run_cli(settings.config_dir, "budget", "show", "--day", "2000-01-01", "--kind", "agent")
    assert "agent:visitor%3Ax:2000-01-01" in other_day.out  # found by its key, whatever wrote it


async def test_budget_show_filters_by_task_and_agent(make_settings, redis_client):
    budget = {"max_cost_per_task": 1.0, "max_cost_per_day": 10.0, "max_cost_per_agent_day": {"writer": 5.0}}
    settings = make_settings(budget=budget)
    ledger = build_ledger(settings, redis_client)
    for i, (agent, task) in enumerate((("ghost", "t-1"), ("writer", "t-2"))):
        reservation = await ledger.reserve(f"r-{i}", round(0.2 * NANO), ledger.scopes(agent, task))
        await ledger.settle(reservation, cost_nano=round(0.01 * NANO), model="primary")
    day = ledger.today().isoformat()

    async def scopes(*args: str) -> list[str]:
        shown = await run_cli(settings.config_dir, "budget", "show", "--json", *args)
        assert shown.code == 0, shown.err
        return [json.loads(line)["scope"] for line in shown.out.splitlines()]

    assert await scopes("--agent", "ghost") == [f"agent:ghost:{day}", f"day:{day}"]  # no tasks
    assert await scopes("--task", "t-2") == [
        "task:t-2",
        f"agent:ghost:{day}",
        f"agent:writer:{day}",
        f"day:{day}",
    ]
    assert await scopes("--task", "t-never", "--kind", "task") == ["task:t-never"]  # asked for: shown, empty
    assert await scopes("--kind", "day") == [f"day:{day}"]
