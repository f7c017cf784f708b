"""What every command shares: loading the settings a command was pointed at."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from datetime import date
from typing import TYPE_CHECKING, Any, TypeVar

from worker.settings import Settings, load_settings

if TYPE_CHECKING:
    from worker.client import LLMClient

_R = TypeVar("_R")


def settings_of(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def run_async(
    fn: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
) -> Callable[[argparse.Namespace], int]:
    return lambda args: asyncio.run(fn(args))


def positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def iso_day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a day as YYYY-MM-DD, got {text!r}") from None


async def over_the_bus(args: argparse.Namespace, call: Callable[[LLMClient], Awaitable[_R]]) -> _R:
    """``call`` with an :class:`LLMClient` on the broker and request queue of ``args``' config."""
    from worker.client import LLMClient

    settings = settings_of(args)
    url, queue = settings.bus.url.get_secret_value(), settings.bus.request_queue
    # Answers only from the workers' broker users, where callers.yaml names them.
    async with LLMClient(url, request_queue=queue, worker_user=settings.callers.workers or None) as llm:
        return await call(llm)
