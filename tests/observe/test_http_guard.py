"""The HTTP port on a bad day (issue #23): a scrape storm cannot break requests, idle or slow
connections cannot exhaust the worker's file descriptors, and a bad request is one log line."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time

import aiohttp
import pytest
import redis.asyncio as aioredis
import structlog

from tests.support.config import deployment
from tests.support.http import Scrape
from worker.app import build_ledger
from worker.messages import Status
from worker.observe.http import ObserveServer
from worker.observe.metrics import Metrics
from worker.state.ledger import NANO


async def test_a_scrape_storm_does_not_break_requests(make_settings, start_worker, client, fake):
    settings = make_settings(models=[deployment("primary", "ok", fake.base_url)])
    async with start_worker(settings) as worker:
        url = f"http://127.0.0.1:{worker.http_port}/metrics"
        storming = True

        async def scraper(session: aiohttp.ClientSession) -> int:
            scrapes = 0
            while storming:
                async with session.get(url) as response:
                    assert response.status == 200
                    await response.read()
                    scrapes += 1
            return scrapes

        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            scrapers = [asyncio.create_task(scraper(session)) for _ in range(200)]
            results = await asyncio.gather(
                *(client.complete(f"q {i}", agent="writer", use_cache=False) for i in range(120))
            )
            storming = False
            scrapes = sum(await asyncio.gather(*scrapers))
            last = Scrape(await (await session.get(url)).text())
    assert scrapes > 200, "the storm was too weak to test anything"
    assert [r.status for r in results] == [Status.ok] * 120
    assert last.value("llm_worker_ledger_read_errors_total") == 0


async def test_the_ledger_is_read_at_most_once_per_interval(make_settings, redis_url):
    settings = make_settings()
    redis = aioredis.Redis.from_url(redis_url)
    ledger = build_ledger(settings, redis)
    metrics = Metrics()
    day_key = f"{settings.redis.key_prefix}budget:{ledger.day_scope(ledger.today()).name}"
    try:
        await redis.hset(day_key, "spent", NANO)
        await asyncio.gather(*(metrics.read_ledger(ledger, interval_s=1.0) for _ in range(500)))
        assert metrics.budget_spent.labels("day", "")._value.get() == 1.0
        await redis.hset(day_key, "spent", 2 * NANO)
        await metrics.read_ledger(ledger, interval_s=1.0)
        assert metrics.budget_spent.labels("day", "")._value.get() == 1.0  # within the interval
        await asyncio.sleep(1.05)
        await metrics.read_ledger(ledger, interval_s=1.0)
        assert metrics.budget_spent.labels("day", "")._value.get() == 2.0
    finally:
        await redis.delete(day_key)
        await redis.aclose()


@pytest.fixture
async def guarded():
    server = ObserveServer(Metrics(), max_connections=20, header_timeout_s=1.0)
    server.ready = lambda: {"ok": True}
    await server.start("127.0.0.1", 0)
    yield server
    await server.stop()


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), seconds) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


async def test_connections_past_the_cap_are_closed_and_idle_ones_time_out(guarded):
    loop, errors = asyncio.get_running_loop(), []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    held = [await _connect(guarded.port) for _ in range(60)]
    closed = await asyncio.gather(*(_closed_within(r, 0.5) for r, _ in held))
    assert closed.count(True) == 40  # the cap is 20: every one past it closed at once
    assert len(guarded.server.connections) == 20

    started = time.monotonic()
    still_open = [reader for (reader, _), was_closed in zip(held, closed, strict=True) if not was_closed]
    assert all(await asyncio.gather(*(_closed_within(reader, 3.0) for reader in still_open)))
    assert time.monotonic() - started < 2.5  # a silent connection lives at most two header timeouts
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{guarded.port}/livez") as r:
        assert r.status == 200  # and the port answers again
    for _, writer in held:
        writer.close()
    gc.collect()  # a task that died unseen reports here
    assert errors == []  # a refused connection logs nothing
    loop.set_exception_handler(None)


async def test_a_slow_request_head_is_cut_off(guarded):
    reader, writer = await _connect(guarded.port)
    started = time.monotonic()
    writer.write(b"GET /livez HTTP/1.1\r\nHost: x\r\n")  # ... and the rest never comes
    with contextlib.suppress(OSError):  # a byte now and then does not keep it alive
        while not reader.at_eof() and time.monotonic() - started < 5:
            writer.write(b"X")
            await writer.drain()
            await _closed_within(reader, 0.3)
    assert time.monotonic() - started < 2.5, "the trickling connection was not cut off"
    writer.close()


async def test_a_bad_request_is_answered_400_and_logged_as_one_line(guarded, caplog):
    reader, writer = await _connect(guarded.port)
    with structlog.testing.capture_logs() as logs, caplog.at_level(logging.DEBUG, logger="aiohttp"):
        writer.write(b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        response = await asyncio.wait_for(reader.read(), 5)
    assert response.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")
    assert [entry["event"] for entry in logs] == ["http.bad_request"]
    assert logs[0]["status"] == 400 and "\n" not in logs[0]["error"]
    assert not [r for r in caplog.records if r.exc_info]  # no traceback anywhere
    writer.close()
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{guarded.port}/readyz") as r,
    ):
        assert r.status == 200
