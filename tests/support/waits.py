"""The one way the tests wait for a condition: poll it with a bound, never sleep for a result."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def eventually(
    check: Callable[[], Awaitable[bool] | bool],
    *,
    timeout_s: float = 30,
    what: str,
    interval_s: float = 0.05,
) -> None:
    """Poll ``check`` (sync or async) until it holds; fail naming ``what`` after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = check()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for: {what}")
        await asyncio.sleep(interval_s)
