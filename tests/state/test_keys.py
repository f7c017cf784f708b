"""Ledger keys cannot collide whatever a caller's task_id, agent or request_id holds (issue #15)."""

from __future__ import annotations

from datetime import date
from urllib.parse import unquote

import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from worker.messages import Status
from worker.settings import Budget
from worker.state.keys import part
from worker.state.ledger import BudgetLedger

# Separators, escapes, hash tags and control characters are drawn often; any other text too.
_NASTY = st.sampled_from([":", "%", "{", "}", "|", "\n", "\x00", "resv", "3A", "V", "é"])
names_ = st.lists(st.one_of(_NASTY, st.text(max_size=4)), max_size=6).map("".join)


def _ledger() -> BudgetLedger:
    budget = Budget(max_cost_per_task=1.0, max_cost_per_day=10.0, max_cost_per_agent_day={})
    return BudgetLedger(aioredis.Redis(), "p:", budget, reservation_ttl_s=60)  # names keys, never connects


def _roles(ledger: BudgetLedger, rid: str, agent: str, task: str) -> dict[str, tuple[str, str]]:
    """Every key one reserve/settle step touches -> (what it is, whose it is)."""
    keys = ledger._keys(rid, "tok", ledger.scopes(agent, task, day=date(2026, 12, 2)))
    owners = [("resv", rid), ("settled", rid), ("result", rid)]
    owners += [("task", task), ("task-set", task), ("agent", agent), ("agent-set", agent)]
    owners += [("day", ""), ("day-set", "")]
    return dict(zip(keys, owners, strict=True))


@given(names_)
def test_a_part_is_reversible_and_holds_no_separator(value):
    encoded = part(value)
    assert unquote(encoded) == value
    assert not set(encoded) & {":", "{", "}"} and encoded.isprintable()


@given(names_, names_, names_, names_, names_, names_)
def test_two_requests_share_a_key_only_for_the_same_scope_and_owner(rid1, agent1, task1, rid2, agent2, task2):
    ledger = _ledger()
    first, second = _roles(ledger, rid1, agent1, task1), _roles(ledger, rid2, agent2, task2)
    for key in first.keys() & second.keys():
        assert first[key] == second[key], key


def test_the_resv_suffix_is_not_another_tasks_reservation_set():
    ledger = _ledger()
    hostile, victim = _roles(ledger, "r1", "writer", "V:resv"), _roles(ledger, "r2", "writer", "V")
    assert not {k for k, (role, _) in hostile.items() if role.startswith("task")} & victim.keys()


async def test_a_task_id_ending_in_resv_leaves_task_v_servable(make_settings, start_worker, client, fake):
    # Before #15, task "V:resv"'s budget hash was task V's reservation set: task V's next reserve
    # met WRONGTYPE and was refused for the 30 days the key lives.
    async with start_worker(make_settings()):
        hostile = await client.complete("first", agent="writer", task_id="V:resv", use_cache=False)
        victim = await client.complete("second", agent="writer", task_id="V", use_cache=False)

    assert hostile.status is Status.ok
    assert victim.status is Status.ok, victim.error
    assert fake.total_calls() == 2
