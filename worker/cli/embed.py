"""``embed``: one embedding request over the bus, one JSON line per vector printed."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from worker.cli.common import over_the_bus, positive, run_async
from worker.text import printable


async def _embed(args: argparse.Namespace) -> int:
    result = await over_the_bus(
        args,
        lambda llm: llm.embed(
            args.texts,
            agent=args.agent,
            model=args.model,
            task_id=args.task,
            dimensions=args.dimensions,
            use_cache=not args.no_cache,
            timeout_s=args.timeout,
        ),
    )
    for item in result.embeddings or []:  # numbers only: nothing in them to render safe
        print(json.dumps({"index": item.index, "embedding": item.embedding}))
    status = (
        f"[{result.status.value}] model={result.model} dimensions={result.dimensions} "
        f"tokens={result.tokens.prompt} cost_usd={result.cost_usd:.6f} cached={result.cached} "
        f"attempts={result.attempts} fallback={result.fallback_used} latency_ms={result.latency_ms:.0f} "
        f"trace_id={result.trace_id}"
    )
    print(printable(status), file=sys.stderr)
    if result.error is not None:
        print(printable(f"error: {result.error.type}: {result.error.message}"), file=sys.stderr)
    return 0 if result.status.value == "ok" else 1


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    embed = sub.add_parser(
        "embed", help="embed texts over the bus; one JSON line per vector", parents=[common]
    )
    embed.add_argument("texts", nargs="+", metavar="TEXT")
    embed.add_argument("--agent", default="researcher")
    embed.add_argument("--model", default=None, help="a configured embedding model (llm.embedding)")
    embed.add_argument("--task", default=None)
    embed.add_argument("--dimensions", type=positive, default=None, help="shorten each vector")
    embed.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the reply")
    embed.add_argument("--no-cache", action="store_true")
    embed.set_defaults(func=run_async(_embed))
