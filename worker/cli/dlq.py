"""``dlq list|show|replay|purge``: the dead-letter queue for operators."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from worker.cli.common import positive, run_async, settings_of
from worker.cli.render import describe, record, table
from worker.deadletters import DEFAULT_MAX_REPLAYS, DeadLetters
from worker.text import printable

JSON_HELP = "one JSON object per dead letter and line, for scripts"


async def _dlq_list(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    async with DeadLetters.open(settings) as dlq:
        total, readers = await dlq.count(), await dlq.readers()
        letters = await dlq.head(args.limit)
    if args.json:
        for letter in letters:
            print(record(letter))
        return 0
    # Another reader's unacked messages are not in the count, and may come back while we list.
    total = max(total, len(letters))
    estimate = f" (at least: {readers} other reader(s) hold some now)" if readers else ""
    print(f"{settings.bus.dead_letter_queue}: {total} dead letter(s){estimate}")
    if letters:
        print("\n".join(table(letters)))
    if total > len(letters):
        print(f"(first {len(letters)} shown; --limit N shows more)")
    return 0


async def _dlq_show(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    async with DeadLetters.open(settings) as dlq:
        letters = await dlq.find(args.request_id)
    if not letters:
        print(
            printable(f"no dead letter with request_id {args.request_id} in {settings.bus.dead_letter_queue}")
        )
        return 1
    if args.json:
        for letter in letters:
            print(record(letter, full=True))
        return 0
    for i, letter in enumerate(letters):
        if i:
            print("-" * 72)
        print("\n".join(describe(letter)))
    return 0


async def _dlq_replay(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    async with DeadLetters.open(settings) as dlq:
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
    if report.expired:
        tense = "will be" if report.dry_run else "are"
        print(
            f"{len(report.expired)} of them {tense} answered 'expired' without a provider call: their "
            "deadline has passed, so their callers stopped waiting (agents get an answer by asking "
            "again; those that stopped waiting are not charged)"
        )
    for letter, error in report.failed:
        print(printable(f"not replayed (left in place): {letter.request_id}: {error}"), file=sys.stderr)
    return 1 if report.failed else 0


async def _dlq_purge(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    queue = settings.bus.dead_letter_queue
    async with DeadLetters.open(settings) as dlq:
        total = await dlq.count()
        if total == 0:
            print(f"{queue} is empty")
            return 0
        question = (
            f"Delete the {total} dead letter(s) in {queue} (not any that arrive meanwhile)? "
            "This cannot be undone. [y/N] "
        )
        if not args.yes and not await asyncio.to_thread(_confirm, question):
            print("nothing deleted (pass --yes to skip this question in scripts)")
            return 1
        purged = await dlq.purge(at_most=total)
    print(f"deleted {purged.deleted} dead letter(s) from {queue}; {purged.left} left")
    if purged.deleted < total:
        print(
            f"{total - purged.deleted} of the {total} counted were held by another reader (a dlq "
            "command still running?) and stay: run purge again once it is done"
        )
        return 1
    return 0


def _confirm(question: str) -> bool:
    try:
        answer = input(question)
    except EOFError:  # no terminal and nothing piped in: not a yes
        return False
    return answer.strip().lower() in ("y", "yes")


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    dlq = sub.add_parser("dlq", help="dead letters: list, show, replay, purge", parents=[common])
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    listing = dlq_sub.add_parser(
        "list", help="how many, and why (reason, agent, age, request_id)", parents=[common]
    )
    listing.add_argument("--limit", type=positive, default=50, help="rows to show (default 50)")
    listing.add_argument("--json", action="store_true", help=JSON_HELP)
    listing.set_defaults(func=run_async(_dlq_list))
    show = dlq_sub.add_parser(
        "show", help="headers, reason and body of one request's dead letters", parents=[common]
    )
    show.add_argument("request_id")
    show.add_argument("--json", action="store_true", help=JSON_HELP + ", with headers and body")
    show.set_defaults(func=run_async(_dlq_show))
    replay = dlq_sub.add_parser(
        "replay",
        help="republish to the request queue (confirmed), then remove from the DLQ",
        parents=[common],
    )
    replay.add_argument("--reason", default=None, help="only this reason (e.g. ServerError, delivery_limit)")
    replay.add_argument("--agent", default=None, help="only this agent's requests")
    replay.add_argument("--limit", type=positive, default=None, help="at most N messages")
    replay.add_argument("--dry-run", action="store_true", help="show what would be replayed; change nothing")
    replay.add_argument(
        "--max-replays",
        type=positive,
        default=DEFAULT_MAX_REPLAYS,
        help=f"skip messages already replayed this many times (default {DEFAULT_MAX_REPLAYS})",
    )
    replay.set_defaults(func=run_async(_dlq_replay))
    purge = dlq_sub.add_parser("purge", help="delete every dead letter (asks first)", parents=[common])
    purge.add_argument("--yes", action="store_true", help="do not ask (for scripts)")
    purge.set_defaults(func=run_async(_dlq_purge))
