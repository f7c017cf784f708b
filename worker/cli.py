"""``python -m worker`` (also ``llm-worker``): run a worker, ask one question, inspect budgets,
inspect and replay dead letters.

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


async def _dlq_list(args: argparse.Namespace) -> int:
    from worker.dlq import DeadLetters, table

    settings = _settings(args)
    async with DeadLetters.open(settings.bus) as dlq:
        total = await dlq.count()
        letters = await dlq.head(args.limit)
    print(f"{settings.bus.dead_letter_queue}: {total} dead letter(s)")
    if letters:
        print("\n".join(table(letters)))
    if total > len(letters):
        print(f"(first {len(letters)} shown; --limit N shows more)")
    return 0


async def _dlq_show(args: argparse.Namespace) -> int:
    from worker.dlq import DeadLetters, describe

    settings = _settings(args)
    async with DeadLetters.open(settings.bus) as dlq:
        letters = await dlq.find(args.request_id)
    if not letters:
        print(f"no dead letter with request_id {args.request_id} in {settings.bus.dead_letter_queue}")
        return 1
    for i, letter in enumerate(letters):
        if i:
            print("-" * 72)
        print("\n".join(describe(letter)))
    return 0


async def _dlq_replay(args: argparse.Namespace) -> int:
    from worker.dlq import DeadLetters, table

    settings = _settings(args)
    async with DeadLetters.open(settings.bus) as dlq:
        report = await dlq.replay(
            reason=args.reason,
            agent=args.agent,
            limit=args.limit,
            dry_run=args.dry_run,
            max_replays=args.max_replays,
        )
    verb = "would replay" if report.dry_run else "replayed"
    print(f"{verb} {len(report.replayed)} dead letter(s) to {settings.bus.request_queue}")
    if report.replayed:
        print("\n".join(table(report.replayed)))
    if report.capped:
        print(
            f"left {len(report.capped)} in place: already replayed {args.max_replays} time(s) "
            "(--max-replays N to allow more)"
        )
    for letter, error in report.failed:
        print(f"not replayed (left in place): {letter.request_id}: {error}", file=sys.stderr)
    return 1 if report.failed else 0


async def _dlq_purge(args: argparse.Namespace) -> int:
    from worker.dlq import DeadLetters

    settings = _settings(args)
    queue = settings.bus.dead_letter_queue
    async with DeadLetters.open(settings.bus) as dlq:
        total = await dlq.count()
        if total == 0:
            print(f"{queue} is empty")
            return 0
        question = f"Delete all {total} dead letter(s) in {queue}? This cannot be undone. [y/N] "
        if not args.yes and not await asyncio.to_thread(_confirm, question):
            print("nothing deleted (pass --yes to skip this question in scripts)")
            return 1
        purged = await dlq.purge()
    print(f"deleted {purged} dead letter(s) from {queue}")
    return 0


def _confirm(question: str) -> bool:
    try:
        answer = input(question)
    except EOFError:  # no terminal and nothing piped in: not a yes
        return False
    return answer.strip().lower() in ("y", "yes")


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

    _add_dlq(sub)

    schemas = sub.add_parser("schemas", help="write the JSON Schema and AsyncAPI files")
    schemas.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "schemas"))
    schemas.add_argument("--check", action="store_true", help="exit 1 when the files differ from the models")
    schemas.set_defaults(func=cmd_schemas)
    return parser


def _add_dlq(sub: Any) -> None:
    from worker.dlq import DEFAULT_MAX_REPLAYS

    dlq = sub.add_parser("dlq", help="dead letters: list, show, replay, purge")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    listing = dlq_sub.add_parser("list", help="how many, and why (reason, agent, age, request_id)")
    listing.add_argument("--limit", type=_positive, default=50, help="rows to show (default 50)")
    listing.set_defaults(func=_async(_dlq_list))
    show = dlq_sub.add_parser("show", help="headers, reason and body of one request's dead letters")
    show.add_argument("request_id")
    show.set_defaults(func=_async(_dlq_show))
    replay = dlq_sub.add_parser(
        "replay", help="republish to the request queue (confirmed), then remove from the DLQ"
    )
    replay.add_argument("--reason", default=None, help="only this reason (e.g. ServerError, delivery_limit)")
    replay.add_argument("--agent", default=None, help="only this agent's requests")
    replay.add_argument("--limit", type=_positive, default=None, help="at most N messages")
    replay.add_argument("--dry-run", action="store_true", help="show what would be replayed; change nothing")
    replay.add_argument(
        "--max-replays",
        type=_positive,
        default=DEFAULT_MAX_REPLAYS,
        help=f"skip messages already replayed this many times (default {DEFAULT_MAX_REPLAYS})",
    )
    replay.set_defaults(func=_async(_dlq_replay))
    purge = dlq_sub.add_parser("purge", help="delete every dead letter (asks first)")
    purge.add_argument("--yes", action="store_true", help="do not ask (for scripts)")
    purge.set_defaults(func=_async(_dlq_purge))


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


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
