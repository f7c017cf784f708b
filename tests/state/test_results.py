"""The result store and single flight (issue #3): a redelivered request is answered from the
store, two copies in flight make one provider call."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.bodies import request_body
from tests.support.ledger import day_state
from tests.support.peers import raw_peer
from tests.support.queues import drain_queue
from worker.messages import Status


async def test_redelivered_request_is_answered_from_the_result_store(
    make_settings, start_worker, amqp_url, names, fake
):
    body = request_body("only once", use_cache=False)
    async with start_worker(make_settings()), raw_peer(amqp_url, names.request_queue) as peer:
        await peer.publish(body)
        await peer.wait_replies(1)
        await peer.publish(body)  # the same request_id again, e.g. re-published after a lost confirm
        await peer.wait_replies(2)

    first, second = peer.results()
    assert fake.calls["m-writer"] == 1
    assert first.status is Status.ok and second.model_dump() == first.model_dump()


async def test_two_copies_in_flight_make_one_provider_call(
    make_settings, start_worker, amqp_url, names, fake
):
    fake.latency_s = 0.3
    body = request_body("concurrent twins", use_cache=False)
    async with start_worker(make_settings()), raw_peer(amqp_url, names.request_queue) as peer:
        await asyncio.gather(peer.publish(body), peer.publish(body))
        await peer.wait_replies(2)

    assert fake.calls["m-writer"] == 1
    assert {r.status for r in peer.results()} == {Status.ok}


async def test_two_callers_with_one_request_id_get_their_own_answers(
    make_settings, start_worker, amqp_url, names, fake
):
    # Issue #15: critic re-used writer's request_id and received writer's answer.
    settings = make_settings()
    async with start_worker(settings), raw_peer(amqp_url, names.request_queue) as peer:
        await peer.publish(
            request_body("writer's secret", request_id="shared", agent="writer", use_cache=False)
        )
        await peer.wait_replies(1)
        await peer.publish(request_body("critic's own", request_id="shared", agent="critic", use_cache=False))
        await peer.wait_replies(2)

    writer, critic = peer.results()
    assert (writer.status, writer.agent, writer.content) == (
        Status.ok,
        "writer",
        "[m-writer] writer's secret",
    )
    assert (critic.status, critic.agent, critic.content) == (Status.ok, "critic", "[m-critic] critic's own")
    assert fake.calls == {"m-writer": 1, "m-critic": 1}
    assert (await day_state(settings)).calls == 2  # each charged for its own


@pytest.mark.parametrize(
    "changed",
    [
        {"messages": [{"role": "user", "content": "a new prompt"}]},
        {"task_id": "another-task"},
        {"model": "m-critic"},
        {"temperature": 1.5},
        {"max_tokens": 5},
    ],
    ids=["messages", "task", "model", "parameters", "max_tokens"],
)
async def test_a_request_id_reused_for_another_request_is_a_conflict_not_the_old_answer(
    changed, make_settings, start_worker, amqp_url, names, fake
):
    settings = make_settings()
    first = request_body("the original", request_id="once", use_cache=False)
    async with start_worker(settings), raw_peer(amqp_url, names.request_queue) as peer:
        await peer.publish(first)
        await peer.wait_replies(1)
        await peer.publish({**first, **changed})
        await peer.wait_replies(2)
        retry = {**first, "trace_id": "0" * 32, "deadline": "2099-01-01T00:00:00Z", "priority": "batch"}
        await peer.publish(retry)  # the same request, re-sent with a new trace, deadline and priority
        await peer.wait_replies(3)

    original, reused, again = peer.results()
    assert reused.status is Status.conflict and reused.content is None
    assert reused.error is not None and reused.error.type == "RequestIdReused" and not reused.error.retryable
    assert "request_id once was already used by this caller for a different request" in reused.error.message
    assert again.model_dump() == original.model_dump()  # still answered from the store
    assert fake.total_calls() == 1
    assert (await day_state(settings)).calls == 1  # the conflict is charged nothing
    assert await drain_queue(amqp_url, names.dead_letter_queue) == []


async def test_a_reuse_while_the_first_is_in_flight_is_a_conflict_at_once(
    make_settings, start_worker, amqp_url, names, fake
):
    fake.latency_s = 1.0
    first = request_body("slow original", request_id="busy", use_cache=False)
    async with start_worker(make_settings()), raw_peer(amqp_url, names.request_queue) as peer:
        await peer.publish(first)
        await fake.wait_until(lambda f: f.total_calls() == 1)
        await peer.publish({**first, "messages": [{"role": "user", "content": "sneaked in"}]})
        await peer.wait_replies(2)

    reused_result, original = peer.results()  # the conflict first: it did not wait for the original
    assert reused_result.status is Status.conflict and original.status is Status.ok
    assert original.content == "[m-writer] slow original"
    assert fake.total_calls() == 1
