"""Dead letters (issue #6): every one says why, and `python -m worker dlq` lists, shows, replays
and purges them without losing or duplicating any."""

from __future__ import annotations

import asyncio
import signal
import sys

import aio_pika

from tests.support.bodies import request_body
from tests.support.config import (
    deployment,
    llm_section,
    write_config,
)
from tests.support.paths import ROOT
from tests.support.peers import raw_peer
from tests.support.ports import free_port
from tests.support.processes import run_cli
from tests.support.queues import (
    body_of,
    declare_topology,
    depth_at_least,
    depth_is,
    drain_queue,
    publish_dead_letters,
    queue_depth,
)
from tests.support.waits import eventually
from worker.deadletters import DeadLetters
from worker.messages import Status


async def reject_until_dead(amqp_url: str, names, correlation_id: str) -> int:
    """Play a worker that dies on every delivery of one message: reject it back until the
    broker dead-letters it (the request queue's x-delivery-limit). Returns the deliveries seen."""
    deliveries = 0
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        q = await channel.declare_queue(names.request_queue, passive=True)
        deadline = asyncio.get_running_loop().time() + 20
        while asyncio.get_running_loop().time() < deadline:
            if await queue_depth(amqp_url, names.dead_letter_queue) >= 3:
                return deliveries
            message = await q.get(fail=False)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            assert message.correlation_id == correlation_id
            deliveries += 1
            await message.reject(requeue=True)
    raise AssertionError("the broker never dead-lettered the message")


async def test_every_dead_letter_says_why_and_list_shows_them(
    make_settings, start_worker, amqp_url, names, fake
):
    settings = make_settings(
        bus={"delivery_limit": 2},
        models=[deployment("primary", "ok", fake.base_url), deployment("broken", "e500", fake.base_url)],
    )
    async with start_worker(settings), raw_peer(amqp_url, names.request_queue) as peer:
        await peer.publish(b"{not json", correlation_id="bad-json")
        await peer.publish(request_body("boom", agent="editor", model="broken", request_id="fails-1"))
        await peer.wait_replies(2)
    # A message that kept killing workers: the broker itself dead-letters it at the delivery limit.
    async with raw_peer(amqp_url, names.request_queue) as peer:
        await peer.publish(request_body("poison", agent="critic", request_id="kills-1"))
    assert await reject_until_dead(amqp_url, names, "kills-1") == 3  # limit 2: 3 deliveries

    listing = await run_cli(settings.config_dir, "dlq", "list")
    assert listing.code == 0, listing.err
    lines = listing.out.splitlines()
    assert lines[0] == f"{names.dead_letter_queue}: 3 dead letter(s)"
    assert lines[1].split() == ["reason", "agent", "age", "replays", "request_id"]
    rows = {tuple(line.split()[i] for i in (0, 1, 4)) for line in lines[2:5]}
    assert rows == {
        ("InvalidRequest", "-", "bad-json"),
        ("ServerError", "editor", "fails-1"),
        ("delivery_limit", "critic", "kills-1"),
    }

    messages = {m.correlation_id: m for m in await drain_queue(amqp_url, names.dead_letter_queue, keep=True)}
    assert messages["bad-json"].body == b"{not json"  # the body is kept as it arrived
    assert messages["bad-json"].headers["x-dlq-message"].startswith("body: not valid JSON")
    failed = messages["fails-1"].headers
    assert failed["x-dlq-reason"] == "ServerError" and failed["x-dlq-attempts"] == 3
    assert failed["x-dlq-worker"] and failed["x-dlq-at"]
    assert failed["x-dlq-agent"] == "editor" and len(failed["x-dlq-trace-id"]) == 32
    killed = messages["kills-1"].headers
    assert killed["x-first-death-reason"] == "delivery_limit"
    assert killed["x-death"][0]["queue"] == names.request_queue


async def test_show_prints_the_reason_headers_and_body(make_settings, amqp_url, names):
    settings = make_settings()
    await declare_topology(settings)
    [body] = await publish_dead_letters(settings, 1, reason="ContextWindowExceeded", agent="researcher")

    shown = await run_cli(settings.config_dir, "dlq", "show", body["request_id"])
    assert shown.code == 0, shown.err
    assert f"request_id:   {body['request_id']}" in shown.out
    assert f"trace_id:     {body['trace_id']}" in shown.out
    assert "reason:       ContextWindowExceeded" in shown.out and "agent:        researcher" in shown.out
    assert '"content": "dead 0"' in shown.out  # the body, pretty-printed

    missing = await run_cli(settings.config_dir, "dlq", "show", "no-such-request")
    assert missing.code == 1 and "no dead letter with request_id no-such-request" in missing.out
    await eventually(lambda: depth_is(amqp_url, names.dead_letter_queue, 1), what="looking changed nothing")


async def test_replaying_n_delivers_exactly_n_keeping_ids_and_dry_run_changes_nothing(
    make_settings, amqp_url, names
):
    settings = make_settings()
    await declare_topology(settings)
    bodies = await publish_dead_letters(settings, 120, reason="ServerError")

    dry = await run_cli(settings.config_dir, "dlq", "replay", "--dry-run")
    assert dry.code == 0, dry.err
    assert dry.out.startswith(f"would replay 120 dead letter(s) to {names.request_queue}")
    assert await queue_depth(amqp_url, names.request_queue) == 0
    await eventually(lambda: depth_is(amqp_url, names.dead_letter_queue, 120), what="all 120 still there")

    done = await run_cli(settings.config_dir, "dlq", "replay")
    assert done.code == 0, done.err
    assert done.out.startswith("replayed 120 dead letter(s)")
    assert await queue_depth(amqp_url, names.dead_letter_queue) == 0
    replayed = await drain_queue(amqp_url, names.request_queue)
    assert sorted(body_of(m)["request_id"] for m in replayed) == sorted(b["request_id"] for b in bodies)
    by_id = {b["request_id"]: b for b in bodies}
    for message in replayed:
        assert body_of(message) == by_id[message.correlation_id]  # body unchanged: request_id, trace_id
        assert message.headers["x-replay-count"] == 1
        assert message.reply_to == "t.nobody.listens"
        assert not any(k.startswith("x-dlq-") for k in message.headers)


async def test_replay_filters_by_reason_agent_and_limit_and_leaves_the_rest(make_settings, amqp_url, names):
    settings = make_settings()
    await declare_topology(settings)
    await publish_dead_letters(settings, 4, reason="ServerError", agent="writer")
    critic = await publish_dead_letters(settings, 3, reason="ServerError", agent="critic")
    await publish_dead_letters(settings, 2, reason="InvalidRequest", agent="critic")

    async with DeadLetters.open(settings) as dlq:
        report = await dlq.replay(reason="ServerError", agent="critic")
        assert sorted(d.request_id for d in report.replayed) == sorted(b["request_id"] for b in critic)
        limited = await dlq.replay(reason="ServerError", limit=3)
        assert len(limited.replayed) == 3
    # One writer ServerError and both InvalidRequest stay (requeued: counted again once the
    # quorum queue has applied the nacks).
    await eventually(lambda: depth_is(amqp_url, names.dead_letter_queue, 3), what="3 left in the DLQ")
    assert await queue_depth(amqp_url, names.request_queue) == 6


async def test_replay_count_is_capped(make_settings, amqp_url, names):
    settings = make_settings()
    await declare_topology(settings)
    bodies = await publish_dead_letters(settings, 2)

    done = await run_cli(settings.config_dir, "dlq", "replay")
    assert done.code == 0, done.err
    assert "replayed 2 dead letter(s)" in done.out
    for _ in range(2):  # they fail again, twice more (as a worker would send them back)
        await die_again(settings, await drain_queue(amqp_url, names.request_queue))
        assert "replayed 2" in (await run_cli(settings.config_dir, "dlq", "replay")).out
    await die_again(settings, await drain_queue(amqp_url, names.request_queue))
    capped = await run_cli(settings.config_dir, "dlq", "replay")
    assert "replayed 0 dead letter(s)" in capped.out
    assert "left 2 in place: already replayed 3 time(s)" in capped.out
    await eventually(lambda: depth_is(amqp_url, names.dead_letter_queue, 2), what="the capped two stay")

    forced = await run_cli(settings.config_dir, "dlq", "replay", "--max-replays", "4")
    assert "replayed 2 dead letter(s)" in forced.out
    replayed = await drain_queue(amqp_url, names.request_queue)
    assert sorted(m.correlation_id for m in replayed) == sorted(b["request_id"] for b in bodies)
    assert all(m.headers["x-replay-count"] == 4 for m in replayed)  # written for information


async def die_again(settings, messages) -> None:
    """Put replayed requests back into the dead-letter queue, body and headers as they were."""
    connection = await aio_pika.connect(settings.bus.url.get_secret_value())
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        for m in messages:
            await channel.default_exchange.publish(
                aio_pika.Message(
                    body=m.body,
                    correlation_id=m.correlation_id,
                    headers={**m.headers, "x-dlq-reason": "ServerError"},
                ),
                routing_key=settings.bus.dead_letter_queue,
            )


async def test_a_replay_killed_midway_loses_nothing(make_settings, amqp_url, names):
    settings = make_settings()
    await declare_topology(settings)
    ids = {b["request_id"] for b in await publish_dead_letters(settings, 1500)}

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "--config",
        str(settings.config_dir),
        "dlq",
        "replay",
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await eventually(
        lambda: depth_at_least(amqp_url, names.request_queue, 50), what="the replay to be under way"
    )
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    # What the killed process held unacked goes back to the DLQ once the broker sees it gone.
    await eventually(
        lambda: _total_at_least(amqp_url, names, 1500), what="every message back in one queue or the other"
    )

    replayed = await drain_queue(amqp_url, names.request_queue)
    remaining = await drain_queue(amqp_url, names.dead_letter_queue)
    assert 0 < len(replayed) < 1500, "the kill came too late to test anything"
    seen = {m.correlation_id for m in replayed} | {m.correlation_id for m in remaining}
    assert seen == ids  # each one is in the request queue, still in the DLQ, or (at most) both
    assert len(replayed) + len(remaining) - len(ids) <= 50  # duplicates: only the window in flight


async def _total_at_least(amqp_url: str, names, count: int) -> bool:
    depths = [await queue_depth(amqp_url, q) for q in (names.request_queue, names.dead_letter_queue)]
    return sum(depths) >= count


async def test_a_replayed_request_is_answered_and_a_double_replay_is_harmless(
    make_settings, start_worker, amqp_url, names, fake
):
    failing = make_settings(models=[deployment("primary", "e500", fake.base_url)], num_retries=0)
    body = request_body("try me again", use_cache=False, trace_id="ab" * 16)
    async with start_worker(failing), raw_peer(amqp_url, names.request_queue) as peer:
        # The same failed request dead-lettered twice, e.g. re-published by an impatient agent.
        await peer.publish(body)
        await peer.publish(body)
        await peer.wait_replies(2)
        assert {r.status for r in peer.results()} == {Status.failed}
        await eventually(
            lambda: depth_at_least(amqp_url, names.dead_letter_queue, 2), what="both copies in the DLQ"
        )
    fake.reset()

    healed = make_settings(models=[deployment("primary", "ok", fake.base_url)])
    async with raw_peer(amqp_url, names.request_queue) as peer, start_worker(healed) as worker:
        async with DeadLetters.open(healed) as dlq:
            report = await dlq.replay()
        assert len(report.replayed) == 2
        # The replays' reply_to is gone with the first peer; they are answered all the same
        # (the answer is stored), so asking once more returns it.
        await eventually(lambda: worker.handled >= 2, what="both replays served")
        await peer.publish(body)
        await peer.wait_replies(1)

    [result] = peer.results()
    assert result.status is Status.ok and result.request_id == body["request_id"]
    assert result.trace_id == "ab" * 16  # kept across dead-lettering and replay
    assert fake.total_calls() == 1  # two replays and one more ask: one provider call


async def test_purge_asks_first(make_settings, amqp_url, names):
    settings = make_settings()
    await declare_topology(settings)
    await publish_dead_letters(settings, 5)

    refused = await run_cli(settings.config_dir, "dlq", "purge", stdin=b"n\n")
    assert refused.code == 1 and "nothing deleted" in refused.out
    silent = await run_cli(settings.config_dir, "dlq", "purge", stdin=b"")
    assert silent.code == 1
    assert await queue_depth(amqp_url, names.dead_letter_queue) == 5

    confirmed = await run_cli(settings.config_dir, "dlq", "purge", stdin=b"y\n")
    assert confirmed.code == 0 and f"deleted 5 dead letter(s) from {names.dead_letter_queue}" in confirmed.out
    await publish_dead_letters(settings, 2)
    scripted = await run_cli(settings.config_dir, "dlq", "purge", "--yes")
    assert scripted.code == 0 and "deleted 2" in scripted.out
    assert await queue_depth(amqp_url, names.dead_letter_queue) == 0


async def test_dlq_commands_name_the_fix_when_the_queue_does_not_exist(make_settings):
    settings = make_settings()  # no worker ever started with these names
    run = await run_cli(settings.config_dir, "dlq", "list")
    assert run.code == 1
    assert "does not exist on this broker: start a worker with this config" in run.err


async def test_dlq_commands_name_the_broker_they_cannot_reach(tmp_path, names, redis_url, fake):

    url = f"amqp://guest:secret@127.0.0.1:{free_port()}/"
    config = write_config(tmp_path / "cfg", names, url, redis_url, llm_section(fake.base_url))
    run = await run_cli(config, "dlq", "list", env={"AMQP_URL": url})
    assert run.code == 1 and "cannot reach the broker at amqp://guest:***@127.0.0.1:" in run.err
    assert "secret" not in run.err and "Traceback" not in run.err
