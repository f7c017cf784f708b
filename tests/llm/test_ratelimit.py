"""Provider rate limits held across every replica, and interactive work ahead of batch work
(issue #19)."""

from __future__ import annotations

import time

import pytest

from tests.support.bodies import request_body
from tests.support.config import deployment
from tests.support.peers import raw_peer
from worker.messages import Status
from worker.state.ratelimit import Limit, RateLimits


def limited(name: str, fake_model: str, base_url: str, **limits: int) -> dict:
    spec = deployment(name, fake_model, base_url)
    spec["litellm_params"].update(limits)
    return spec


# -- the shared window, on its own ---------------------------------------------------------------


async def test_the_window_lets_rpm_calls_through_then_says_when_there_is_room(redis_client, names):
    limits = RateLimits(redis_client, names.prefix)
    limit = Limit(rpm=3)
    tickets = [await limits.take("d#0", limit, tokens=10) for _ in range(4)]
    assert [t.taken for t in tickets] == [True, True, True, False]
    assert [t.rpm_left for t in tickets[:3]] == [2, 1, 0]
    assert 60 <= tickets[3].wait_s <= 61.01  # the oldest call leaves the window in a minute (and a second)


async def test_batch_calls_take_only_their_share_of_a_limit(redis_client, names):
    limits = RateLimits(redis_client, names.prefix)
    limit = Limit(rpm=10)
    batch = [await limits.take("d#0", limit, tokens=1, share=0.8) for _ in range(10)]
    assert sum(t.taken for t in batch) == 8  # two of ten left for interactive calls
    interactive = [await limits.take("d#0", limit, tokens=1) for _ in range(3)]
    assert [t.taken for t in interactive] == [True, True, False]


async def test_tokens_are_counted_before_and_corrected_after(redis_client, names):
    limits = RateLimits(redis_client, names.prefix)
    limit = Limit(tpm=1000)
    first = await limits.take("d#0", limit, tokens=900)
    assert first.taken and first.tpm_left == 100
    assert not (await limits.take("d#0", limit, tokens=200)).taken  # the estimate holds the room
    await limits.correct("d#0", first, 300)  # the provider's usage was smaller
    second = await limits.take("d#0", limit, tokens=200)
    assert second.taken and second.tpm_left == 500
    never = await limits.take("d#0", limit, tokens=5000)
    assert not never.taken and never.wait_s is None  # more than the whole limit: never fits


async def test_a_cooldown_holds_every_caller_off_a_deployment(redis_client, names):
    a, b = RateLimits(redis_client, names.prefix), RateLimits(redis_client, names.prefix)
    await a.cool_down("d#0", 2.0)
    ticket = await b.take("d#0", Limit(rpm=100), tokens=1)  # another replica's view
    assert not ticket.taken and ticket.cooling and 1.0 < ticket.wait_s <= 2.0
    assert (await b.take("d#1", Limit(rpm=100), tokens=1)).taken


# -- through the worker --------------------------------------------------------------------------


async def test_a_deployment_at_its_limit_is_skipped_for_one_with_room(
    make_settings, start_worker, fake, amqp_url, names
):
    models = [
        limited("primary", "a", fake.base_url, rpm=3),
        limited("primary", "b", fake.base_url, rpm=3),
        deployment("backup", "backup", fake.base_url),
    ]
    settings = make_settings(models=models, fallback_models=["backup"], cache_ttl=0)
    async with start_worker(settings), raw_peer(amqp_url, names.request_queue) as peer:
        for i in range(6):
            await peer.publish(request_body(f"burst {i}", model="primary", use_cache=False))
        await peer.wait_replies(6)
    results = peer.results()
    assert [r.status for r in results] == [Status.ok] * 6
    assert {r.model for r in results} == {"primary"} and not any(r.fallback_used for r in results)
    assert fake.calls["a"] == 3 and fake.calls["b"] == 3  # each deployment at its limit, none past it


async def test_no_room_before_the_deadline_falls_back_to_the_next_model(
    make_settings, start_worker, fake, client
):
    models = [limited("primary", "a", fake.base_url, rpm=1), deployment("backup", "backup", fake.base_url)]
    settings = make_settings(models=models, fallback_models=["backup"], cache_ttl=0, deadline_s=3)
    async with start_worker(settings):
        first = await client.complete("one", agent="writer", model="primary", use_cache=False)
        started = time.monotonic()
        second = await client.complete("two", agent="writer", model="primary", use_cache=False)
    assert first.model == "primary" and not first.fallback_used
    assert second.status is Status.ok and second.model == "backup" and second.fallback_used
    assert time.monotonic() - started < 2.5  # the wait for room (a minute) would pass the deadline: at once
    assert fake.calls["a"] == 1  # never called past its limit


async def test_a_429_the_provider_still_sends_cools_the_deployment_down_for_everyone(
    make_settings, start_worker, fake, amqp_url, names
):
    # The account's limit is shared with other clients: lower than what we were told (rpm 50).
    fake.rpm_limit = 2
    fake.retry_after_s = 0
    models = [limited("primary", "a", fake.base_url, rpm=50)]
    settings = make_settings(models=models, cache_ttl=0, deadline_s=8, num_retries=5)
    async with start_worker(settings), raw_peer(amqp_url, names.request_queue) as peer:
        for i in range(4):
            await peer.publish(request_body(f"shared account {i}", model="primary", use_cache=False))
        await peer.wait_replies(4, timeout_s=30)
    # Two answered; the others met the account's 429, whose Retry-After (~60 s) is past the deadline.
    results = peer.results()
    assert sum(r.status is Status.ok for r in results) == 2
    assert fake.rate_limited <= 2  # one 429 per waiting request, not a storm of retries
    for result in results:
        if result.status is not Status.ok:
            assert result.error is not None and result.error.type == "RateLimited"


# -- interactive ahead of batch -------------------------------------------------------------------


async def test_interactive_requests_start_at_once_while_batch_work_fills_the_worker(
    make_settings, start_worker, fake, amqp_url, names, client
):
    fake.latency_s = 0.5
    settings = make_settings(bus={"prefetch": 4, "batch_prefetch": 4}, cache_ttl=0)
    batch_queue = f"{names.request_queue}.batch"
    async with start_worker(settings), raw_peer(amqp_url, batch_queue) as peer:
        for i in range(200):  # 25 s of batch work for four slots
            await peer.publish(request_body(f"summary {i}", use_cache=False))
        await fake.wait_until(lambda f: f.in_flight >= 4)
        waits = []
        for i in range(5):
            started = time.monotonic()
            result = await client.complete(f"a person is waiting {i}", agent="writer", use_cache=False)
            assert result.status is Status.ok
            waits.append(time.monotonic() - started - 0.5)  # minus the provider's own time
        batch_done = len(peer.replies)
    assert max(waits) < 1.0, waits  # not behind 200 batch requests
    assert batch_done >= 4  # batch work went on meanwhile


@pytest.mark.chaos
@pytest.mark.timeout(300)
async def test_three_replicas_burst_past_a_60_rpm_account_without_a_429(
    tmp_path, fake, amqp_url, redis_url, names, worker_processes
):
    from bench.ratelimit import burst, burst_config  # the bench's scenario, asserted here

    fake.rpm_limit, fake.rpm_model = 60, "primary"
    row = await burst(
        lambda rpm: burst_config(tmp_path / "cfg", names, amqp_url, redis_url, fake.base_url, rpm),
        fake,
        amqp_url,
        names.request_queue,
        worker_processes,
        limited_rpm=60,
        requests=100,
    )
    print(row.line())
    assert row.rate_limited == 0, row.line()  # the provider never had to say 429
    assert row.ok == 100 and row.fallbacks == 0 and set(row.models) == {"primary"}, row.line()
    # 60 in the first minute, the other 40 as the oldest calls leave the window: ~60 s, not 100
    assert 55 <= row.elapsed_s <= 61 + 30, row.line()
