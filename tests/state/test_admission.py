"""Budgets that hold (issue #15): an agent no budget names is refused unless the config gives
unconfigured agents a cap, and agents may be required to name their task."""

from __future__ import annotations

import pytest

from tests.support.config import COST, exact_llm
from tests.support.ledger import day_state
from tests.support.queues import drain_queue
from worker.messages import Status

BUDGET = {"max_cost_per_task": 10.0, "max_cost_per_day": 100.0, "max_cost_per_agent_day": {"writer": 10.0}}


async def test_an_agent_no_budget_names_is_refused_and_never_charged(
    make_settings, start_worker, client, fake
):
    settings = make_settings(budget=BUDGET)
    async with start_worker(settings):
        stranger = await client.complete("spend someone's money", agent="stranger", use_cache=False)
        writer = await client.complete("mine", agent="writer", use_cache=False)

    assert stranger.status is Status.forbidden and stranger.error is not None
    assert stranger.error.message == (
        "agent 'stranger' has no budget: add it to llm.budget.max_cost_per_agent_day "
        "(or set llm.budget.max_cost_per_unconfigured_agent_day)"
    )
    assert writer.status is Status.ok
    assert fake.total_calls() == 1
    assert (await day_state(settings)).calls == 1


async def test_a_cap_for_unconfigured_agents_holds_for_each_of_them(
    make_settings, start_worker, client, fake
):
    budget = {**BUDGET, "max_cost_per_unconfigured_agent_day": COST * 1.5}
    settings = make_settings(**{**exact_llm(fake.base_url), "budget": budget})
    async with start_worker(settings):
        first = await client.complete("one", agent="stranger", use_cache=False)
        second = await client.complete("two", agent="stranger", use_cache=False)
        other = await client.complete("three", agent="another", use_cache=False)

    assert first.status is Status.ok and other.status is Status.ok  # each has a cap of its own
    assert second.status is Status.budget_exceeded and second.error is not None
    assert second.error.message.startswith("budget agent:stranger:")
    assert fake.total_calls() == 2


@pytest.mark.parametrize("required", [["writer"], ["*"]])
async def test_an_agent_required_to_name_its_task_is_refused_without_one(
    required, make_settings, start_worker, client, fake, amqp_url, names
):
    settings = make_settings(budget={**BUDGET, "max_cost_per_agent_day": {"writer": 10.0, "critic": 10.0},
                                     "require_task_id": required})  # fmt: skip
    async with start_worker(settings):
        untasked = await client.complete("no task", agent="writer", use_cache=False)
        tasked = await client.complete("a task", agent="writer", task_id="t-1", use_cache=False)
        critic = await client.complete("critic, no task", agent="critic", use_cache=False)

    assert untasked.status is Status.invalid and untasked.error is not None
    assert untasked.error.message == "task_id: required for agent writer (llm.budget.require_task_id)"
    assert tasked.status is Status.ok
    assert critic.status is (Status.invalid if required == ["*"] else Status.ok)
    assert fake.total_calls() == (1 if required == ["*"] else 2)
    dead = await drain_queue(amqp_url, names.dead_letter_queue)
    assert len(dead) == (2 if required == ["*"] else 1)
