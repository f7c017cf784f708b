"""``run`` (one worker until SIGTERM) and ``ask`` (one request over the bus, the reply printed)."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from worker.cli.common import run_async, settings_of
from worker.messages import LLMChunk, LLMResult
from worker.text import printable


def cmd_run(args: argparse.Namespace) -> int:
    from worker.app import serve  # imports litellm: only this command pays for it
    from worker.observe.logs import configure_logging
    from worker.pod import Pod
    from worker.settings import known_secrets

    settings = settings_of(args)
    configure_logging(json=args.json_logs, level=args.log_level, secrets=known_secrets(settings))
    with asyncio.Runner(loop_factory=event_loop(args.loop)) as runner:
        if args.processes > 1:
            return runner.run(Pod(settings, args.processes, _child_args(args)).run())
        return runner.run(serve(settings))


def event_loop(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory of the event loop ``--loop`` names (None: asyncio's own).

    uvloop (libuv) is the default: the same worker spent 3-6 % less CPU per request on it
    (bench/revisions.py; docs/benchmarks.md), and the LiteLLM proxy runs on it too (uvicorn's
    default). ``--loop asyncio`` is there for a platform uvloop does not build on, or to rule
    uvloop out when chasing a bug.
    """
    if name == "asyncio":
        return None
    import uvloop

    return uvloop.new_event_loop


def _child_args(args: argparse.Namespace) -> list[str]:
    """What each process of a pod is started with: the parent's log and loop options."""
    logs = [] if args.json_logs is None else ["--json-logs" if args.json_logs else "--no-json-logs"]
    return [*logs, "--log-level", args.log_level, "--loop", args.loop]


def _processes(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number from 1 to 64 (one per core)")
    return n


def _json_schema(path: str) -> dict[str, Any]:
    """``--json-schema FILE``: the file's JSON Schema as an OpenAI ``response_format`` (strict),
    named after the file (``verdict.json`` -> ``verdict``)."""
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"{path}: not JSON ({exc})") from None
    if not isinstance(schema, dict):
        raise argparse.ArgumentTypeError(f"{path}: a JSON Schema is an object, not {type(schema).__name__}")
    name = re.sub(r"[^A-Za-z0-9_-]", "_", Path(path).stem)[:64] or "answer"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


async def _ask(args: argparse.Namespace) -> int:
    from worker.client import LLMClient

    settings = settings_of(args)
    options: dict[str, Any] = {
        "agent": args.agent,
        "model": args.model,
        "task_id": args.task,
        "use_cache": not args.no_cache,
        "temperature": args.temperature,
        "max_tokens": args.max_tokens,
        "timeout_s": args.timeout,
        "response_format": args.json_schema,
    }
    async with LLMClient(
        settings.bus.url.get_secret_value(),
        request_queue=settings.bus.request_queue,
        worker_user=settings.callers.workers or None,  # answers only from the workers' broker users
    ) as llm:
        if not args.stream:
            result = await llm.complete(args.prompt, **options)
            if result.content is not None:
                print(printable(result.content, keep="\n\t"))  # an answer is text to read, not to obey
        else:
            result = await _print_stream(llm.stream(args.prompt, **options))
    tokens = result.tokens
    status = (
        f"[{result.status.value}] model={result.model} tokens={tokens.prompt}+{tokens.completion}"
        f"={tokens.total} cost_usd={result.cost_usd:.6f} cached={result.cached} attempts={result.attempts}"
        f" fallback={result.fallback_used} latency_ms={result.latency_ms:.0f} trace_id={result.trace_id}"
    )
    print(f"\n{printable(status)}", file=sys.stderr)
    if result.error is not None:
        print(printable(f"error: {result.error.type}: {result.error.message}"), file=sys.stderr)
    return 0 if result.status.value == "ok" else 1


async def _print_stream(stream: AsyncIterator[LLMChunk | LLMResult]) -> LLMResult:
    """Print each chunk's text as it arrives; the result at the end."""
    async for item in stream:
        if isinstance(item, LLMResult):
            print()
            return item
        print(printable(item.content or "", keep="\n\t"), end="", flush=True)
    raise AssertionError("a stream ends with its result")  # LLMClient.stream ends with it or raises


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    run = sub.add_parser("run", help="start one worker", parents=[common])
    run.add_argument(
        "--json-logs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="JSON log lines (default: when stderr is not a terminal)",
    )
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument(
        "--processes",
        type=_processes,
        default=1,
        metavar="N",
        help="N worker processes under this one (one per core of the pod); one endpoint, signals forwarded",
    )
    run.add_argument(
        "--loop",
        choices=["uvloop", "asyncio"],
        default="uvloop",
        help="the event loop (default uvloop: less CPU per request; asyncio: Python's own)",
    )
    run.set_defaults(func=cmd_run)

    ask = sub.add_parser("ask", help="send one request over the bus and print the reply", parents=[common])
    ask.add_argument("prompt")
    ask.add_argument("--agent", default="writer")
    ask.add_argument("--model", default=None)
    ask.add_argument("--task", default=None)
    ask.add_argument("--temperature", type=float, default=None)
    ask.add_argument("--max-tokens", type=int, default=None)
    ask.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the reply")
    ask.add_argument("--no-cache", action="store_true")
    ask.add_argument("--stream", action="store_true", help="print the answer as it is written")
    ask.add_argument(
        "--json-schema",
        type=_json_schema,
        default=None,
        metavar="FILE",
        help="answer as JSON valid against this JSON Schema (OpenAI's response_format json_schema, strict)",
    )
    ask.set_defaults(func=run_async(_ask))
