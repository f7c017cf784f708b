"""Replies say who sent them: the worker publishes its results and chunks with AMQP ``user_id``
set to its broker user, which RabbitMQ validates, and ``LLMClient(worker_user=...)`` takes only
those. Without it, any agent that learns a reply queue's name can answer in the worker's place
through the default exchange (left open by #15, closed here)."""

from __future__ import annotations

import asyncio
import json
import logging

import aio_pika
import aiormq
import pytest
from yarl import URL

from tests.support.bodies import request_body
from tests.support.peers import fake_worker, raw_peer, result_for, send
from worker.bus import Bus
from worker.client import InvalidRequest, LLMClient
from worker.messages import CHUNK_TYPE, LLMChunk, LLMResult, Status

GUEST = "guest"  # the shared broker's one user: the fake worker's, the real worker's and the forger's


def _chunk(rid: str, seq: int, text: str) -> bytes:
    return LLMChunk(request_id=rid, seq=seq, content=text).model_dump_json().encode()


async def _forged_then_signed(message, exchange) -> None:
    """A forger's answer and chunk (no user_id, as another agent's connection would have to send
    them), then the worker's own, signed with its user."""
    rid, to = message.correlation_id, message.reply_to
    stream = json.loads(message.body).get("stream", False)
    if stream:
        await send(exchange, to, rid, _chunk(rid, 0, "forged "), user_id=None, kind=CHUNK_TYPE)
    await send(exchange, to, rid, result_for(rid, "forged"), user_id=None)
    await asyncio.sleep(0.2)
    if stream:
        await send(exchange, to, rid, _chunk(rid, 0, "real "), user_id=GUEST, kind=CHUNK_TYPE)
    await send(exchange, to, rid, result_for(rid, "the real answer"), user_id=GUEST)


@pytest.mark.parametrize("worker_user", [GUEST, None, ("llm-worker", GUEST)])
async def test_only_replies_from_the_workers_broker_user_resolve_a_call(amqp_url, names, worker_user, caplog):
    async with (
        fake_worker(amqp_url, names.request_queue, _forged_then_signed),
        LLMClient(amqp_url, request_queue=names.request_queue, worker_user=worker_user) as llm,
    ):
        with caplog.at_level(logging.WARNING, logger="worker.client"):
            result = await llm.complete("hi", agent="writer", request_id="r-signed", timeout_s=10)
    if worker_user is None:  # the hole this closes: the first valid-looking answer wins
        assert result.content == "forged" and llm.refused_replies == 0
        return
    assert result.content == "the real answer" and llm.refused_replies == 1
    assert "published by broker user '', not the worker's 'guest'" in caplog.text
    assert "forged" not in caplog.text  # what it said stays out of the log


@pytest.mark.parametrize("worker_user", [GUEST, None])
async def test_a_forged_chunk_does_not_enter_a_stream(amqp_url, names, worker_user):
    async with (
        fake_worker(amqp_url, names.request_queue, _forged_then_signed),
        LLMClient(amqp_url, request_queue=names.request_queue, worker_user=worker_user) as llm,
    ):
        items = [item async for item in llm.stream("hi", agent="writer", timeout_s=10)]
    pieces = [item.content for item in items if isinstance(item, LLMChunk)]
    final = items[-1]
    assert isinstance(final, LLMResult)
    if worker_user is None:
        assert pieces == ["forged "] and final.content == "forged"
    else:
        assert pieces == ["real "] and final.content == "the real answer" and llm.refused_replies == 2


def test_an_empty_worker_user_is_refused():
    with pytest.raises(InvalidRequest, match="worker_user: a broker user name"):
        LLMClient("amqp://guest:guest@127.0.0.1/", worker_user=["llm-worker", ""])


async def test_the_broker_refuses_a_user_id_that_is_not_the_publishers(amqp_url, names):
    """What the check rests on: as guest, a message claiming to be from `llm-worker` is refused
    (RabbitMQ's validated user-ID closes the channel with PRECONDITION_FAILED)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(names.request_queue, auto_delete=True)
        message = aio_pika.Message(body=b"{}", user_id="llm-worker")
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="user_id"):
            await channel.default_exchange.publish(message, routing_key=queue.name, timeout=5)
        assert channel.is_closed


async def test_a_real_worker_signs_its_answers_and_chunks(make_settings, start_worker, amqp_url, names):
    async with start_worker(make_settings()):
        async with LLMClient(amqp_url, request_queue=names.request_queue, worker_user=GUEST) as llm:
            answer = await llm.complete("hello", agent="writer", timeout_s=20)
            streamed = [item async for item in llm.stream("hello again", agent="writer", timeout_s=20)]
        assert answer.status is Status.ok and llm.refused_replies == 0
        assert any(isinstance(item, LLMChunk) for item in streamed)
        assert isinstance(streamed[-1], LLMResult) and streamed[-1].status is Status.ok
        async with raw_peer(amqp_url, names.request_queue) as peer:
            await peer.publish(json.dumps(request_body("who answers?")).encode())
            (reply,) = await peer.wait_replies(1)
        assert reply.user_id == GUEST


@pytest.mark.parametrize(
    ("url", "signed"),
    [
        ("amqp://llm-worker:pw@broker:5672/", "llm-worker"),
        ("amqp://agent%2Dx:pw@broker/", "agent-x"),  # percent-encoded in the URL, plain on the wire
        ("amqp://broker/", "guest"),  # no user in the URL: aiormq logs in as guest
        ("amqps://broker/?auth=external", None),  # the certificate's user: not known here, not set
    ],
)
async def test_the_user_id_is_the_user_the_worker_logs_in_as(url, signed):  # the connection wants a loop
    bus = Bus.__new__(Bus)
    bus._publish_conn = aio_pika.RobustConnection(URL(url))  # not connected: only its URL is read
    assert bus._signed_by() == signed
