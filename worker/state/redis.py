"""The one boundary between redis-py and the rest of the worker (httpx's
``map_httpcore_exceptions`` does the same for httpcore).

Every Redis step of the state package runs inside :func:`mapped`, which turns any redis-py
error (unreachable, timed out, out of memory, read-only replica, wrong type of key, a script
error) or socket error into the package's own error for that store: the ledger's failures fail
closed (:class:`~worker.errors.LedgerUnavailable`), the cache's fail open
(:class:`~worker.errors.CacheUnavailable`). The message names the cause and, where there is one,
the fix; it never carries a key's contents.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from contextlib import contextmanager

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from worker.errors import ConfigError, StoreUnavailable

REDIS_ERRORS = (redis_errors.RedisError, OSError)


def describe(exc: BaseException) -> str:
    """What went wrong, in words an operator acts on."""
    name = type(exc).__name__
    if isinstance(exc, redis_errors.OutOfMemoryError):
        return f"Redis is out of memory ({name}: maxmemory reached); free memory or raise maxmemory"
    if isinstance(exc, redis_errors.ReadOnlyError):
        return f"Redis is a read-only replica ({name}); point the worker at the primary"
    if isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError | OSError):
        return f"unreachable ({name})"
    first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"refused the step ({name}: {first_line})"


@contextmanager
def mapped(error: type[StoreUnavailable], what: str) -> Iterator[None]:
    """Run Redis steps; any Redis or socket error leaves as ``error``, naming ``what`` failed."""
    try:
        yield
    except REDIS_ERRORS as exc:
        raise error(f"{what}: {describe(exc)}") from exc


MIN_REDIS = (7, 0)  # the settle of a paid call runs with the allow-oom script flag (ledger.py)


async def check_version(redis: Redis, *, timeout_s: float = 5.0) -> str | None:
    """The ledger's Redis version; raises :class:`ConfigError` under 7.0, where the settle script
    (``#!lua flags=allow-oom``) is refused and no call could ever be charged.

    ``None`` when Redis does not answer: the worker starts anyway and fails closed until it does.
    """
    try:
        info = await asyncio.wait_for(redis.info("server"), timeout_s)
    except (*REDIS_ERRORS, TimeoutError):
        return None
    version = str(info.get("redis_version", "0"))
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if numbers < MIN_REDIS:
        raise ConfigError(
            "redis.yaml",
            "url",
            f"Redis {version} is too old for the budget ledger: it needs Redis 7.0 or later "
            "(script flags); upgrade Redis, or point redis.url at a 7.x server",
        )
    return version
