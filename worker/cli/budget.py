"""``budget show``: spend, reservations and limits of every scope the ledger holds, read from it.

Every scope that holds money is listed, configured or not: tasks, agents (one an operator never
configured is charged all the same) and the day, so the agents of a day add up to the day.
``--task``, ``--agent`` and ``--kind`` narrow the list; ``--json`` prints one object per scope.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from typing import Any

from worker.app import ledger_tool
from worker.cli.common import iso_day, run_async, settings_of
from worker.cli.render import columns
from worker.state.ledger import BudgetLedger, Scope, ScopeState

KINDS = ("task", "agent", "day")


async def _budget_show(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    configured = sorted(settings.llm.budget.max_cost_per_agent_day)
    async with ledger_tool(settings) as ledger:
        day = args.day or ledger.today()
        scopes = _chosen(await _every_scope(ledger, day, configured), args)
        if args.task is not None and args.kind in (None, "task") and f"task:{args.task}" not in scopes:
            scopes = {f"task:{args.task}": ledger.task_scope(args.task), **scopes}  # asked for: shown
        states = [await ledger.state(scope) for scope in scopes.values()]
    # A scope found only by its key (not configured, not asked for) is shown while it holds money.
    kept = {f"task:{args.task}", f"agent:{args.agent}:{day.isoformat()}"}
    kept |= {ledger.agent_scope(agent, day).name for agent in configured}
    states = [
        s for s in states if s.name.startswith("day:") or s.name in kept or s.spent_usd or s.reserved_usd
    ]
    if args.json:
        for state in states:
            print(json.dumps(_record(state)))
        return 0
    _print_table(states)
    agents = [s.spent_usd for s in states if s.name.startswith("agent:")]
    days = [s.spent_usd for s in states if s.name.startswith("day:")]
    if agents and days and args.agent is None:
        print(f"\nagents of {day.isoformat()} spent {sum(agents):.6f} of the day's {days[0]:.6f}")
    return 0


async def _every_scope(ledger: BudgetLedger, day: date, configured_agents: list[str]) -> dict[str, Scope]:
    """By name: the tasks and the agents of ``day`` the ledger holds keys for, the configured
    agents, and the day's scope; tasks first, then agents, then the day."""
    held = await ledger.held_scopes()
    of_day = f":{day.isoformat()}"
    agents = {s.name: s for s in held if s.name.startswith("agent:") and s.name.endswith(of_day)}
    agents.update({(s := ledger.agent_scope(a, day)).name: s for a in configured_agents})
    day_scope = ledger.day_scope(day)
    return {
        **{s.name: s for s in held if s.name.startswith("task:")},
        **{name: agents[name] for name in sorted(agents)},
        day_scope.name: day_scope,
    }


def _chosen(scopes: dict[str, Scope], args: argparse.Namespace) -> dict[str, Scope]:
    """``--kind``; ``--task`` / ``--agent``: that task / agent only, and no tasks for ``--agent``
    alone (a task is not an agent's)."""

    def wanted(name: str) -> bool:
        kind = name.split(":", 1)[0]
        if args.kind is not None and kind != args.kind:
            return False
        if kind == "task" and (args.task is not None or args.agent is not None):
            return bool(name == f"task:{args.task}")
        if kind == "agent" and args.agent is not None:
            return bool(name.split(":")[1] == args.agent)
        return True

    return {name: scope for name, scope in scopes.items() if wanted(name)}


def _print_table(states: list[ScopeState]) -> None:
    rows: list[tuple[str, ...]] = [("scope", "spent_usd", "reserved_usd", "limit_usd", "calls", "hits")]
    for state in states:
        limit = f"{state.limit_usd:.4f}" if state.limit_usd is not None else "-"
        rows.append(
            (
                state.name,
                f"{state.spent_usd:.6f}",
                f"{state.reserved_usd:.6f}",
                limit,
                str(state.calls),
                str(state.cache_hits),
            )
        )
        rows += [
            (f"  {model}", f"{usd:.6f}", "", "", "", "") for model, usd in sorted(state.by_model_usd.items())
        ]
    print("\n".join(columns(rows)))


def _record(state: ScopeState) -> dict[str, Any]:
    return {
        "scope": state.name,
        "kind": state.name.split(":", 1)[0],
        "spent_usd": state.spent_usd,
        "reserved_usd": state.reserved_usd,
        "limit_usd": state.limit_usd,
        "calls": state.calls,
        "cache_hits": state.cache_hits,
        "by_model_usd": state.by_model_usd,
    }


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    budget = sub.add_parser("budget", help="budget ledger", parents=[common])
    budget_sub = budget.add_subparsers(dest="budget_command", required=True)
    show = budget_sub.add_parser(
        "show", help="spend, reserved and limit of every scope that holds money", parents=[common]
    )
    show.add_argument("--task", default=None, help="only this task among the task scopes")
    show.add_argument("--agent", default=None, help="only this agent among the agent scopes")
    show.add_argument("--kind", choices=KINDS, default=None, help="only scopes of this kind")
    show.add_argument(
        "--day", type=iso_day, default=None, help="YYYY-MM-DD (default: today in the budget's timezone)"
    )
    show.add_argument("--json", action="store_true", help="one JSON object per scope and line, for scripts")
    show.set_defaults(func=run_async(_budget_show))
