"""``python -m worker`` (also ``llm-worker``): run a worker, ask one question, inspect budgets.

Configuration errors end the process with exit code 2 and one line naming the file and key.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from datetime import date
from pathlib import Path
from typing import Any

from worker.errors import ConfigError, WorkerError
from worker.settings import Settings, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def cmd_run(args: argparse.Namespace) -> int:
    from worker.app import serve
    from worker.observe import configure_logging, known_secrets

    settings = _settings(args)
    configure_logging(json=args.json_logs, level=args.log_level, secrets=known_secrets(settings))
    return asyncio.run(serve(settings))


async def _ask(args: argparse.Namespace) -> int:
    from worker.client import LLMClient

    settings = _settings(args)
    async with LLMClient(
        settings.bus.url.get_secret_value(), request_queue=settings.bus.request_queue
    ) as llm:
        result = await llm.complete(
            args.prompt,
            agent=args.agent,
            model=args.model,
            task_id=args.task,
            use_cache=not args.no_cache,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            timeout_s=args.timeout,
        )
    if result.content is not None:
        print(result.content)
    tokens = result.tokens
    print(
        f"\n[{result.status.value}] model={result.model} tokens={tokens.prompt}+{tokens.completion}"
        f"={tokens.total} cost_usd={result.cost_usd:.6f} cached={result.cached} attempts={result.attempts}"
        f" fallback={result.fallback_used} latency_ms={result.latency_ms:.0f} trace_id={result.trace_id}",
        file=sys.stderr,
    )
    if result.error is not None:
        print(f"error: {result.error.type}: {result.error.message}", file=sys.stderr)
    return 0 if result.status.value == "ok" else 1


async def _budget_show(args: argparse.Namespace) -> int:
    from worker.app import make_redis
    from worker.ledger import BudgetLedger

    settings = _settings(args)
    redis = make_redis(settings)
    try:
        ledger = BudgetLedger(
            redis,
            settings.redis.key_prefix,
            settings.llm.budget,
            reservation_ttl_s=settings.llm.deadline_s + 60,
        )
        day = date.fromisoformat(args.day) if args.day else ledger.today()
        agents = [args.agent] if args.agent else sorted(settings.llm.budget.max_cost_per_agent_day)
        scopes = [ledger.task_scope(args.task)] if args.task else []
        scopes += [ledger.agent_scope(agent, day) for agent in agents] + [ledger.day_scope(day)]
        header = ("scope", "spent_usd", "reserved_usd", "limit_usd", "calls", "hits")
        print("{:40s} {:>12s} {:>13s} {:>10s} {:>6s} {:>5s}".format(*header))
        for scope in scopes:
            state = await ledger.state(scope)
            limit = f"{state.limit_usd:.4f}" if state.limit_usd is not None else "-"
            print(
                f"{state.name:40s} {state.spent_usd:12.6f} {state.reserved_usd:13.6f} {limit:>10s} "
                f"{state.calls:6d} {state.cache_hits:5d}"
            )
            for model, usd in sorted(state.by_model_usd.items()):
                print(f"  {model:38s} {usd:12.6f}")
    finally:
        await redis.aclose()
    return 0


def cmd_schemas(args: argparse.Namespace) -> int:
    from worker.contract import check_schemas, write_schemas

    folder = Path(args.out)
    if args.check:
        stale = check_schemas(folder)
        for name in stale:
            print(
                f"{folder / name} is out of date: run 'python -m worker schemas' and commit it",
                file=sys.stderr,
            )
        return 1 if stale else 0
    for path in write_schemas(folder):
        print(f"wrote {path}")
    return 0


def _async(
    fn: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
) -> Callable[[argparse.Namespace], int]:
    return lambda args: asyncio.run(fn(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-worker", description="LLM calls for agents over RabbitMQ.")
    parser.add_argument(
        "--config", type=Path, default=None, help="config folder (default: $WORKER_CONFIG_DIR, else ./config)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start one worker")
    run.add_argument(
        "--json-logs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="JSON log lines (default: when stderr is not a terminal)",
    )
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.set_defaults(func=cmd_run)

    ask = sub.add_parser("ask", help="send one request over the bus and print the reply")
    ask.add_argument("prompt")
    ask.add_argument("--agent", default="writer")
    ask.add_argument("--model", default=None)
    ask.add_argument("--task", default=None)
    ask.add_argument("--temperature", type=float, default=None)
    ask.add_argument("--max-tokens", type=int, default=None)
    ask.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the reply")
    ask.add_argument("--no-cache", action="store_true")
    ask.set_defaults(func=_async(_ask))

    budget = sub.add_parser("budget", help="budget ledger")
    budget_sub = budget.add_subparsers(dest="budget_command", required=True)
    show = budget_sub.add_parser("show", help="spend, reserved and limit per scope")
    show.add_argument("--task", default=None)
    show.add_argument("--agent", default=None)
    show.add_argument("--day", default=None, help="YYYY-MM-DD (default: today in the budget's timezone)")
    show.set_defaults(func=_async(_budget_show))

    schemas = sub.add_parser("schemas", help="write the JSON Schema and AsyncAPI files")
    schemas.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "schemas"))
    schemas.add_argument("--check", action="store_true", help="exit 1 when the files differ from the models")
    schemas.set_defaults(func=cmd_schemas)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except WorkerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
