"""Free ports for private services and whether something listens on one."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid

from tests.support.waits import eventually

# RabbitMQ's distribution (Erlang) port: a private node listens on ``port + DIST_OFFSET`` too.
DIST_OFFSET = 20000


def free_port(low: int = 20000, high: int = 40000) -> int:
    """A port that is free now, with ``port + DIST_OFFSET`` free too (RabbitMQ's distribution port).

    Random in a range rather than the kernel's pick of an ephemeral port, so that the pair stays
    below 65536 and two helpers starting services at once rarely draw the same one.
    """
    for _ in range(200):
        port = low + (uuid.uuid4().int % (high - low))
        if all(_is_free(p) for p in (port, port + DIST_OFFSET)):
            return port
    raise RuntimeError(f"no free port pair found in {low}-{high}")


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def accepts(port: int) -> bool:
    """Something accepts TCP connections on ``127.0.0.1:port`` now."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def wait_for_port(port: int, *, up: bool, timeout_s: float = 60.0) -> None:
    """Poll until ``127.0.0.1:port`` accepts connections (``up``) or refuses them."""

    async def reached() -> bool:
        return await accepts(port) == up

    await eventually(
        reached, timeout_s=timeout_s, interval_s=0.1, what=f"port {port} {'open' if up else 'closed'}"
    )
