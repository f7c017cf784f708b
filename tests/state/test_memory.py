"""A Redis that fills up (issue #22): new calls are refused with a reason naming Redis memory
before Redis refuses the settle of a call already paid for; nothing is lost or charged twice;
service resumes by itself when memory is freed."""

from __future__ import annotations

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml

from tests.support.bodies import request_body
from tests.support.config import llm_section, write_config
from tests.support.ledger import day_state
from tests.support.peers import raw_peer
from tests.support.services import PrivateRedis
from tests.support.waits import eventually
from worker.app import running_worker
from worker.deadletters import DeadLetters
from worker.errors import ConfigError
from worker.messages import Status
from worker.settings import load_settings
from worker.state.results import read_stored

MAXMEMORY = 16 * 1024 * 1024
JUNK = b"x" * 65536


@pytest.fixture
async def small_redis():
    redis = await PrivateRedis(
        args=("--maxmemory", str(MAXMEMORY), "--maxmemory-policy", "noeviction")
    ).start()
    client = aioredis.Redis.from_url(redis.url)
    yield redis, client
    await client.aclose()
    await redis.destroy()


async def used_ratio(client: aioredis.Redis) -> float:
    info = await client.info("memory")
    return int(info["used_memory"]) / int(info["maxmemory"])


async def fill_to(client: aioredis.Redis, ratio: float) -> int:
    """Write junk keys (not the worker's) until Redis holds ``ratio`` of maxmemory; how many."""
    count = 0
    while await used_ratio(client) < ratio:
        await client.set(f"junk:{count}", JUNK)
        count += 1
    return count


async def push_past_maxmemory(client: aioredis.Redis, margin_bytes: int = 1024 * 1024) -> None:
    """Lower maxmemory to ``margin_bytes`` below what Redis holds: past it by more than its buffers
    move (filling up to Redis's own refusal leaves it at the edge, where the query buffer freed
    after the refused write lets the next small writes in)."""
    await fill_to(client, 0.5)
    used = int((await client.info("memory"))["used_memory"])
    await client.config_set("maxmemory", used - margin_bytes)


async def ready_status(port: int) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as response:
        return response.status


async def metric(port: int, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    [line] = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.split()[1])


async def test_a_filling_redis_refuses_new_calls_naming_memory_and_resumes_by_itself(
    small_redis, config, names, fake, amqp_url
):
    redis, client = small_redis
    settings = load_settings(config(redis=redis.url, cache_ttl=0), environ={})
    async with running_worker(settings) as worker, raw_peer(amqp_url, names.request_queue) as peer:
        port = worker.http_port
        assert port is not None
        for i in range(5):
            await peer.publish(request_body(f"before {i}", use_cache=False))
        await peer.wait_replies(5)

        junk = await fill_to(client, 0.93)  # above the refuse mark, below maxmemory
        await eventually(lambda: worker.pipeline.ledger.memory.full, what="the guard sees Redis full")
        assert await ready_status(port) == 503
        assert await metric(port, "llm_worker_redis_memory_full") == 1.0
        for i in range(5):
            await peer.publish(request_body(f"while full {i}", use_cache=False))
        await peer.wait_replies(10)
        # answered and acked, not crashed and requeued
        await eventually(lambda: worker.handled == 10, what="all ten acked")
        refused = peer.results()[5:]
        for result in refused:
            assert result.status is Status.failed and result.error is not None
            assert result.error.type == "LedgerFull" and result.error.retryable
            assert "Redis memory is at" in result.error.message and "maxmemory" in result.error.message
        assert fake.total_calls() == 5  # nothing sent to a provider while full

        await client.delete(*[f"junk:{i}" for i in range(junk)])
        await eventually(lambda: not worker.pipeline.ledger.memory.full, what="the guard resumes")
        assert await ready_status(port) == 200
        async with DeadLetters.open(settings) as dlq:
            report = await dlq.replay(reason="LedgerFull")
        assert len(report.replayed) == 5  # every refused request was kept for the operator
        await peer.wait_replies(15)

    results = peer.results()
    assert [r.status for r in results[10:]] == [Status.ok] * 5
    assert fake.total_calls() == 10  # each request called once: none twice, none lost
    state = await day_state(settings)
    ok = [r for r in results if r.status is Status.ok]
    assert state.calls == 10 and state.reserved_usd == 0
    assert state.spent_usd == pytest.approx(sum(r.cost_usd for r in ok), abs=10e-6)


async def test_calls_in_flight_when_redis_fills_are_still_charged(small_redis, config, names, fake, amqp_url):
    # The room between the refuse mark and maxmemory is what the settles of calls in flight use:
    # before, a full Redis refused the settle script and the paid call was never charged.
    redis, client = small_redis
    fake.latency_s = 1.5
    settings = load_settings(config(redis=redis.url, cache_ttl=0), environ={})
    async with running_worker(settings) as worker, raw_peer(amqp_url, names.request_queue) as peer:
        for i in range(8):
            await peer.publish(request_body(f"in flight {i}", use_cache=False))
        await fake.wait_until(lambda f: f.in_flight == 8)
        await fill_to(client, 0.95)
        await eventually(lambda: worker.pipeline.ledger.memory.full, what="the guard sees Redis full")
        await peer.wait_replies(8)
        await peer.publish(request_body("after it filled", use_cache=False))
        await peer.wait_replies(9)

    results = peer.results()
    assert [r.status for r in results[:8]] == [Status.ok] * 8
    assert results[8].error is not None and results[8].error.type == "LedgerFull"
    state = await day_state(settings)
    assert state.calls == 8 and state.reserved_usd == 0  # all eight charged, nothing left reserved
    assert state.spent_usd == pytest.approx(sum(r.cost_usd for r in results[:8]), abs=10e-6)


async def test_a_cache_on_the_ledgers_redis_stops_storing_before_the_ledger_needs_the_room(
    small_redis, config, names, fake, amqp_url
):
    redis, client = small_redis
    settings = load_settings(config(redis=redis.url, cache_ttl=600), environ={})
    async with running_worker(settings) as worker, raw_peer(amqp_url, names.request_queue) as peer:
        await fill_to(client, 0.80)  # between cache_stop_at (0.75) and the refuse mark (0.90)
        await worker.pipeline.ledger.memory.refresh()
        await peer.publish(request_body("cache me if you can"))
        await peer.wait_replies(1)
        cached_keys = [k async for k in client.scan_iter(match=f"{names.prefix}cache:*")]

    assert peer.results()[0].status is Status.ok  # the request is served...
    assert cached_keys == [] and worker.pipeline.cache.skipped == 1  # ...but its answer is not cached


async def test_redis_over_maxmemory_is_an_answered_failure_naming_memory(
    small_redis, config, names, fake, amqp_url
):
    # Past maxmemory (another client filled it faster than the guard reads) Redis itself refuses
    # the first write, the request_id claim, before the guard is asked: answered and
    # dead-lettered for replay, not a crash loop.
    redis, client = small_redis
    settings = load_settings(config(redis=redis.url, cache_ttl=0), environ={})
    async with running_worker(settings) as worker, raw_peer(amqp_url, names.request_queue) as peer:
        await push_past_maxmemory(client)
        await peer.publish(request_body("over the top", use_cache=False))
        await peer.wait_replies(1)
        await eventually(lambda: worker.handled == 1, what="answered and acked, not requeued")
        [refused] = peer.results()
        assert fake.total_calls() == 0

        await client.config_set("maxmemory", MAXMEMORY)
        await eventually(lambda: not worker.pipeline.ledger.memory.full, what="the guard resumes")
        async with DeadLetters.open(settings) as dlq:
            report = await dlq.replay(reason="LedgerUnavailable")
        assert len(report.replayed) == 1  # kept for the operator, not lost
        await peer.wait_replies(2)

    assert refused.status is Status.failed and refused.error is not None and refused.error.retryable
    assert refused.error.type == "LedgerUnavailable"
    # The first write refused: the claim, or (cache off, since #21) the claim and reservation in one
    assert refused.error.message.startswith("budget ledger: Redis is out of memory")
    assert "maxmemory" in refused.error.message
    assert peer.results()[1].status is Status.ok and fake.total_calls() == 1


async def test_a_call_in_flight_when_redis_goes_past_maxmemory_is_charged_and_answered_at_once(
    small_redis, config, names, fake, amqp_url
):
    # The settle may write past maxmemory (allow-oom): before, Redis refused it, the answer waited
    # the settle's 60 s of retries and went out with its cost missing from the ledger.
    redis, client = small_redis
    fake.latency_s = 1.5
    settings = load_settings(config(redis=redis.url, cache_ttl=0), environ={})
    async with running_worker(settings), raw_peer(amqp_url, names.request_queue) as peer:
        for i in range(3):
            await peer.publish(request_body(f"paid for {i}", use_cache=False))
        await fake.wait_until(lambda f: f.in_flight == 3)
        await push_past_maxmemory(client)
        await peer.wait_replies(3, timeout_s=20)  # the settle's retries took 60 s

    results = peer.results()
    assert [r.status for r in results] == [Status.ok] * 3
    assert await used_ratio(client) > 1  # still past maxmemory: the settles did not wait for room
    state = await day_state(settings)
    assert state.calls == 3 and state.reserved_usd == 0
    assert state.spent_usd == pytest.approx(sum(r.cost_usd for r in results), abs=10e-6)


async def test_answers_are_kept_for_the_retention_and_settled_markers_only_past_the_reservation(
    make_settings, start_worker, client, redis_client, names
):
    settings = make_settings()  # result_ttl_s 3600 in the test config
    async with start_worker(settings):
        result = await client.complete("keep me", agent="writer", use_cache=False)
    assert result.status is Status.ok
    [result_key] = [k async for k in redis_client.scan_iter(match=f"{names.prefix}result:*")]
    [settled_key] = [k async for k in redis_client.scan_iter(match=f"{names.prefix}settled:*")]
    assert 3500 < await redis_client.ttl(result_key) <= 3600
    reservation_ttl_s = settings.llm.deadline_s + 60  # deadline + the settle's retries
    assert 0 < await redis_client.ttl(settled_key) <= reservation_ttl_s + 60  # not the answer's 3600 s
    stored = (await redis_client.get(result_key)).decode()
    assert '"cached"' not in stored and '"error"' not in stored  # defaults and nulls left out
    assert read_stored(stored.encode()).result == result  # ...and put back when read


def test_a_retention_shorter_than_the_redelivery_window_is_a_config_error(
    tmp_path, names, amqp_url, redis_url
):
    folder = write_config(tmp_path / "cfg", names, amqp_url, redis_url, llm_section("http://127.0.0.1:9/v1"))
    data = yaml.safe_load((folder / "redis.yaml").read_text())
    data["redis"]["result_ttl_s"] = 30  # deadline_s 10 x delivery_limit 5 = 50 s
    (folder / "redis.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as caught:
        load_settings(folder, environ={})
    assert caught.value.key == "redis.result_ttl_s"
    assert "redelivery window" in caught.value.problem and "at least 50" in caught.value.problem
