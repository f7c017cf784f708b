"""The ledger needs Redis 7.0 (its settle script runs with the allow-oom flag): an older server
is a start-up error naming the fix, not a worker that can never charge a call."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis

from worker.errors import ConfigError
from worker.state.redis import check_version


class _Server:
    def __init__(self, version: str):
        self.version = version

    async def info(self, section: str) -> dict[str, Any]:
        assert section == "server"
        return {"redis_version": self.version}


async def test_the_shared_redis_is_new_enough(redis_url):
    client = aioredis.Redis.from_url(redis_url)
    try:
        version = await check_version(client)
    finally:
        await client.aclose()
    assert version is not None and int(version.split(".")[0]) >= 7


@pytest.mark.parametrize("version", ["6.2.14", "5.0.7", "garbage"])
async def test_an_older_redis_is_refused_naming_the_fix(version):
    with pytest.raises(ConfigError, match=r"needs Redis 7\.0 or later"):
        await check_version(_Server(version))  # type: ignore[arg-type]


@pytest.mark.parametrize("version", ["7.0.15", "7.2.4", "8.0.0"])
async def test_seven_and_later_pass(version):
    assert await check_version(_Server(version)) == version  # type: ignore[arg-type]


async def test_an_unreachable_redis_does_not_stop_the_start():
    client = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    try:
        assert await check_version(client) is None  # fails closed per request until it answers
    finally:
        await client.aclose()
