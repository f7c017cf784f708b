"""The response cache (issue #5): per-request control, isolation, single flight, fail open."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.bodies import request_body
from tests.support.config import (
    deployment,
    llm_section,
    write_config,
)
from tests.support.peers import raw_peer
from tests.support.processes import WorkerProcess, start_replicas
from tests.support.services import PrivateRedis
from worker.messages import Status
from worker.settings import Budget
from worker.state.ledger import BudgetLedger


async def test_hit_replays_the_original_answer_at_zero_cost(
    make_settings, start_worker, client, fake, names, redis_client
):
    async with start_worker(make_settings()):
        first = await client.complete("what is a queue", agent="writer", task_id="t")
        second = await client.complete("what is a queue", agent="writer", task_id="t", trace_id="ab" * 16)

    assert fake.calls["m-writer"] == 1
    assert first.status is Status.ok and not first.cached and first.cost_usd > 0
    assert second.status is Status.ok and second.cached
    assert second.cost_usd == 0
    assert second.content == first.content and second.model == first.model == "m-writer"
    assert second.tokens == first.tokens  # the original usage, for the record
    assert second.request_id != first.request_id and second.trace_id == "ab" * 16  # its own ids
    assert second.attempts == 0

    # The hit is in the ledger at zero cost.
    ledger = BudgetLedger(
        redis_client,
        names.prefix,
        Budget(max_cost_per_task=1, max_cost_per_day=1, max_cost_per_agent_day={}),
        reservation_ttl_s=60,
    )
    state = await ledger.state(ledger.task_scope("t"))
    assert state.calls == 2 and state.cache_hits == 1
    assert state.spent_usd == pytest.approx(first.cost_usd)


async def test_ttl_from_config_and_per_request_override(
    make_settings, start_worker, client, fake, names, redis_client
):
    async with start_worker(make_settings(cache_ttl=120)):
        await client.complete("config ttl", agent="writer")
        await client.complete("short ttl", agent="writer", cache_ttl=1)
        ttls = sorted(
            [
                await redis_client.ttl(key)
                async for key in redis_client.scan_iter(match=f"{names.prefix}cache:*")
            ]
        )
        assert len(ttls) == 2 and ttls[0] <= 1 and 118 <= ttls[1] <= 120
        await asyncio.sleep(1.2)  # let the short entry expire
        again = await client.complete("short ttl", agent="writer", cache_ttl=1)
        kept = await client.complete("config ttl", agent="writer")

    assert not again.cached and kept.cached
    assert fake.calls["m-writer"] == 3


async def test_use_cache_false_skips_lookup_and_store(
    make_settings, start_worker, client, fake, names, redis_client
):
    async with start_worker(make_settings()):
        await client.complete("fresh please", agent="writer")  # stored
        bypass = await client.complete("fresh please", agent="writer", use_cache=False)  # not looked up
        await client.complete("never stored", agent="writer", use_cache=False)
        later = await client.complete("never stored", agent="writer")

    assert not bypass.cached and not later.cached
    assert fake.calls["m-writer"] == 4


async def test_keys_keep_agents_and_parameters_apart(make_settings, start_worker, client, fake):
    async with start_worker(make_settings()):
        base = await client.complete("same words", agent="writer", model="primary", temperature=0.2)
        variants = [
            await client.complete("same words", agent="critic", model="primary", temperature=0.2),
            await client.complete("same words", agent="writer", model="primary", temperature=0.3),
            await client.complete(
                "same words", agent="writer", model="primary", temperature=0.2, max_tokens=9
            ),
            await client.complete("same words", agent="writer", model="backup", temperature=0.2),
            await client.complete(
                [{"role": "system", "content": "be brief"}, {"role": "user", "content": "same words"}],
                agent="writer",
                model="primary",
                temperature=0.2,
            ),
        ]
        repeat = await client.complete("same words", agent="writer", model="primary", temperature=0.2)

    assert not base.cached and repeat.cached
    assert [v.cached for v in variants] == [False] * 5
    assert fake.total_calls() == 6


async def test_shared_namespace_pools_agents(make_settings, start_worker, client, fake):
    async with start_worker(make_settings(cache_namespace="shared")):
        await client.complete("pooled", agent="writer", model="primary")
        other = await client.complete("pooled", agent="critic", model="primary")
    assert other.cached and fake.calls["primary"] == 1


async def test_only_successful_answers_are_cached(make_settings, start_worker, client, fake):
    settings = make_settings(models=[deployment("primary", "flaky3", fake.base_url)], num_retries=1)
    async with start_worker(settings):
        failed = await client.complete("flaky", agent="writer")  # 2 calls, both 500
        ok = await client.complete("flaky", agent="writer")  # call 3 fails, call 4 succeeds
        hit = await client.complete("flaky", agent="writer")

    assert failed.status is Status.failed
    assert ok.status is Status.ok and not ok.cached
    assert hit.cached and fake.calls["flaky3"] == 4


async def test_burst_of_identical_requests_over_two_replicas_makes_one_provider_call(
    config, names, amqp_url, fake, worker_processes
):
    fake.latency_s = 0.5
    await start_replicas(config(bus={"prefetch": 32}), 2, worker_processes)

    async with raw_peer(amqp_url, names.request_queue) as peer:
        await asyncio.gather(*(peer.publish(request_body("the same burst")) for _ in range(50)))
        replies = await peer.wait_replies(50, timeout_s=60)

    results = peer.results()
    assert fake.calls["m-writer"] == 1
    assert all(r.status is Status.ok for r in results)
    assert sum(not r.cached for r in results) == 1
    assert len({r.request_id for r in results}) == 50
    assert {r.headers["x-worker-id"] for r in replies} == {
        p.events("worker.ready")[0]["worker_id"] for p in worker_processes
    }  # both replicas served


async def test_cache_redis_down_is_skipped_not_an_error(
    tmp_path, names, amqp_url, redis_url, fake, worker_processes
):
    cache = await PrivateRedis().start()
    try:
        config = write_config(tmp_path / "cfg", names, amqp_url, redis_url, llm_section(fake.base_url))
        redis_yaml = (
            (config / "redis.yaml").read_text().replace("redis:\n", f"redis:\n  cache_url: {cache.url}\n")
        )
        (config / "redis.yaml").write_text(redis_yaml)
        worker = await WorkerProcess(config).start()
        worker_processes.append(worker)
        async with raw_peer(amqp_url, names.request_queue) as peer:
            await peer.publish(request_body("cache me"))
            await peer.publish(request_body("cache me"))
            await peer.wait_replies(2)
            await cache.stop()
            for _ in range(3):
                await peer.publish(request_body("cache me"))
            await peer.wait_replies(5)

        first, hit, *during = peer.results()
        assert not first.cached and hit.cached
        assert all(r.status is Status.ok and not r.cached for r in during)
        assert fake.calls["m-writer"] == 1 + 3
        assert worker.events("cache.unavailable")  # counted and logged, never the request's error
        port = worker.events("worker.ready")[0]["http_port"]
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as response:
            scraped = await response.text()
        [errors] = [f for f in text_string_to_metric_families(scraped) if f.name == "llm_worker_cache_errors"]
        assert {s.labels["op"]: s.value for s in errors.samples if s.name.endswith("_total")}["lookup"] == 3
    finally:
        await cache.stop()
