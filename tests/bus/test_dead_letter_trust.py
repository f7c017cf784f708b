"""Dead letters that lie (issue #23): identity comes from the validated body, the replay cap from
what our tool counted, a replay says which requests will only be answered ``expired``, and purge
removes what it counted, no more."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aio_pika

from tests.support.bodies import request_body
from tests.support.processes import run_cli
from tests.support.queues import declare_topology, depth_is, drain_queue, publish_dead_letters, queue_depth
from tests.support.waits import eventually
from worker.deadletters import DeadLetters


async def test_identity_comes_from_the_body_not_forged_headers(make_settings, amqp_url, names):
    settings = make_settings()
    await declare_topology(settings)
    # Straight to the DLQ, as anyone who may publish there can: a writer's request dressed as a critic's.
    [body] = await publish_dead_letters(
        settings, 1, agent="writer", **{"x-dlq-agent": "critic", "x-dlq-request-id": "forged-id"}
    )

    listing = await run_cli(settings.config_dir, "dlq", "list", "--json")
    [row] = [json.loads(line) for line in listing.out.splitlines()]
    assert (row["agent"], row["request_id"], row["validated"]) == ("writer", body["request_id"], True)
    missing = await run_cli(settings.config_dir, "dlq", "show", "forged-id")
    assert missing.code == 1
    as_critic = await run_cli(settings.config_dir, "dlq", "replay", "--agent", "critic")
    assert "replayed 0 dead letter(s)" in as_critic.out
    await eventually(lambda: depth_is(amqp_url, names.dead_letter_queue, 1), what="the letter stays")
    assert await queue_depth(amqp_url, names.request_queue) == 0


async def test_an_invalid_body_has_no_agent_to_filter_on(make_settings, amqp_url, names):
    settings = make_settings()
    await declare_topology(settings)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        claims = json.dumps({"request_id": "claimed", "agent": "critic"}).encode()  # no messages: invalid
        await channel.default_exchange.publish(
            aio_pika.Message(
                body=claims, headers={"x-dlq-reason": "InvalidRequest", "x-dlq-agent": "critic"}
            ),
            routing_key=names.dead_letter_queue,
        )
    [row] = [
        json.loads(x) for x in (await run_cli(settings.config_dir, "dlq", "list", "--json")).out.splitlines()
    ]
    assert (row["agent"], row["request_id"], row["validated"]) == (None, "claimed", False)
    assert "replayed 0" in (await run_cli(settings.config_dir, "dlq", "replay", "--agent", "critic")).out


async def test_a_forged_replay_count_does_not_lift_the_cap(make_settings, amqp_url, names):
    settings = make_settings()
    await declare_topology(settings)
    await publish_dead_letters(settings, 1, **{"x-replay-count": -1000})
    replays = 0
    for _ in range(4):
        done = await run_cli(settings.config_dir, "dlq", "replay", "--max-replays", "1")
        assert done.code == 0, done.err
        replays += int(done.out.split()[1])
        for message in await drain_queue(amqp_url, names.request_queue):  # dies again, header kept
            await _publish(settings, message.body, {**message.headers, "x-replay-count": -1000})
    assert replays == 1


async def test_replay_says_how_many_will_only_be_answered_expired(make_settings, amqp_url, names):
    settings = make_settings()
    await declare_topology(settings)
    past = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    for deadline in (past, past, future):
        await _publish(
            settings, json.dumps(request_body("x", deadline=deadline)).encode(), {"x-dlq-reason": "E"}
        )
    await publish_dead_letters(settings, 1)  # no deadline

    before = await run_cli(settings.config_dir, "dlq", "replay", "--dry-run")
    assert "would replay 4 dead letter(s)" in before.out
    assert (
        "2 of them will be answered 'expired' without a provider call: their deadline has passed"
        in before.out
    )
    after = await run_cli(settings.config_dir, "dlq", "replay")
    assert "replayed 4 dead letter(s)" in after.out and "2 of them are answered 'expired'" in after.out
    shown = await run_cli(settings.config_dir, "dlq", "list")
    assert shown.code == 0


async def test_purge_removes_what_it_counted_not_what_arrived_since(make_settings, amqp_url, names):
    settings = make_settings()
    await declare_topology(settings)
    await publish_dead_letters(settings, 300)
    async with DeadLetters.open(settings) as dlq:
        counted = await dlq.count()
        await publish_dead_letters(settings, 50)  # arriving while the operator reads the question
        report = await dlq.purge(at_most=counted)
    assert (counted, report.deleted) == (300, 300)
    await eventually(lambda: depth_is(amqp_url, names.dead_letter_queue, 50), what="the 50 newer stay")


async def test_purge_beside_a_running_reader_deletes_all_it_counted(make_settings, amqp_url, names):
    settings = make_settings()
    await declare_topology(settings)
    await publish_dead_letters(settings, 200)
    async with DeadLetters.open(settings) as purger:
        counted = await purger.count()
        async with holding(amqp_url, names.dead_letter_queue, 80):  # another `dlq list` under way
            purging = asyncio.create_task(purger.purge(at_most=counted))
            await asyncio.sleep(0.2)  # less than the scan's grace (SCAN_GRACE_S) for late letters
            assert not purging.done(), "purge finished while 80 letters it counted were out of sight"
        # The reader's connection closed (its listing done): its 80 are back, and purge takes them.
        report = await asyncio.wait_for(purging, 60)
    assert (counted, report.deleted, report.left) == (200, 200, 0)
    assert await queue_depth(amqp_url, names.dead_letter_queue) == 0


async def _publish(settings, body: bytes, headers: dict) -> None:
    connection = await aio_pika.connect(settings.bus.url.get_secret_value())
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.default_exchange.publish(
            aio_pika.Message(body=body, headers=headers), routing_key=settings.bus.dead_letter_queue
        )


async def test_list_beside_another_reader_says_its_count_is_a_floor(make_settings, amqp_url, names):
    settings = make_settings()
    await declare_topology(settings)
    await publish_dead_letters(settings, 30)
    async with holding(amqp_url, names.dead_letter_queue, 10):  # as a running `dlq show` does
        listing = await run_cli(settings.config_dir, "dlq", "list")
    header, *rows = listing.out.splitlines()[:1] + listing.out.splitlines()[2:]
    assert (
        header == f"{names.dead_letter_queue}: 20 dead letter(s) (at least: 1 other reader(s) hold some now)"
    )
    assert len(rows) == 20


@contextlib.asynccontextmanager
async def holding(amqp_url: str, queue_name: str, count: int) -> AsyncIterator[None]:
    """Another reader holding ``count`` of the queue's messages unacked until the block ends
    (its connection closes and the broker puts them back)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=count)
        queue = await channel.declare_queue(queue_name, passive=True)
        held: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        await queue.consume(held.put)
        await eventually(lambda: held.qsize() >= count, what=f"the other reader to hold {count}")
        yield
