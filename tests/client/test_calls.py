"""The client holds up against a careless or hostile peer (issue #23): a reply resolves its call
only when it is a valid result for that very request; one request_id is one call at a time; a
bad timeout is refused before anything is sent; a lost broker raises the client's own error."""

from __future__ import annotations

import asyncio
import math

import pytest
from yarl import URL

from tests.support.peers import fake_worker, result_for, send
from tests.support.ports import free_port
from tests.support.proxy import CuttableProxy
from tests.support.queues import queue_depth
from worker.client import BrokerUnavailable, InvalidRequest, LLMClient, LLMClientError, RequestInFlight


async def test_garbage_and_foreign_replies_do_not_resolve_the_call(amqp_url, names):
    async def hostile_then_real(message, exchange) -> None:
        rid, to = message.correlation_id, message.reply_to
        await send(exchange, to, rid, b"{not a result")  # garbage first
        await send(exchange, to, rid, result_for("someone-else", "forged"))  # another request's answer
        await asyncio.sleep(0.2)
        await send(exchange, to, rid, result_for(rid, "the real answer"))

    async with (
        fake_worker(amqp_url, names.request_queue, hostile_then_real),
        LLMClient(amqp_url, request_queue=names.request_queue) as llm,
    ):
        result = await llm.complete("hi", agent="writer", request_id="r-1", timeout_s=10)
    assert result.content == "the real answer" and result.request_id == "r-1"


async def test_two_calls_with_one_request_id_are_refused_not_crossed(amqp_url, names):
    async def slow(message, exchange) -> None:
        await asyncio.sleep(0.5)
        rid = message.correlation_id
        await send(exchange, message.reply_to, rid, result_for(rid, "one"))

    async with (
        fake_worker(amqp_url, names.request_queue, slow) as seen,
        LLMClient(amqp_url, request_queue=names.request_queue) as llm,
    ):
        first = asyncio.create_task(llm.complete("a", agent="writer", request_id="same", timeout_s=10))
        await asyncio.sleep(0.1)
        with pytest.raises(RequestInFlight, match="already waiting"):
            await llm.complete("b", agent="writer", request_id="same", timeout_s=10)
        assert (await first).content == "one"
        again = await llm.complete("c", agent="writer", request_id="same", timeout_s=10)  # after: fine
    assert again.content == "one" and seen == ["same", "same"]


@pytest.mark.parametrize("timeout_s", [-5, 0, math.inf, math.nan, 10**9])
async def test_a_bad_timeout_is_refused_before_anything_is_sent(amqp_url, names, timeout_s):
    async with fake_worker(amqp_url, names.request_queue, lambda *_: asyncio.sleep(0)):
        async with LLMClient(amqp_url, request_queue=names.request_queue) as llm:
            with pytest.raises(InvalidRequest, match="timeout_s: expected seconds above 0"):
                await llm.complete("hi", agent="writer", timeout_s=timeout_s)
        assert await queue_depth(amqp_url, names.request_queue) == 0


async def test_a_timeout_of_a_day_is_accepted(amqp_url, names):
    async def answer(message, exchange) -> None:
        rid = message.correlation_id
        await send(exchange, message.reply_to, rid, result_for(rid, "ok"))

    async with (
        fake_worker(amqp_url, names.request_queue, answer),
        LLMClient(amqp_url, request_queue=names.request_queue) as llm,
    ):
        assert (await llm.complete("hi", agent="writer", timeout_s=86_400)).content == "ok"


async def test_invalid_fields_are_one_line_naming_each_field(amqp_url, names):
    async with LLMClient(amqp_url, request_queue=names.request_queue) as llm:
        with pytest.raises(InvalidRequest) as caught:
            await llm.complete("hi", agent="Not An Agent!", temperature=9, max_tokens=-3)
    message = str(caught.value)
    assert "\n" not in message and isinstance(caught.value, ValueError)
    assert all(field in message for field in ("agent:", "temperature:", "max_tokens:"))


async def test_a_lost_broker_raises_the_clients_own_error(amqp_url):
    broker = URL(amqp_url)
    with pytest.raises(BrokerUnavailable, match="cannot reach the broker at amqp://guest:\\*\\*\\*@"):
        async with LLMClient(f"amqp://guest:secret@127.0.0.1:{free_port()}/"):
            pass
    with pytest.raises(BrokerUnavailable, match="check the user and password"):
        async with LLMClient(str(broker.with_password("wrong-password"))):
            pass

    proxy = CuttableProxy(broker.port or 5672, broker.host or "127.0.0.1")
    async with proxy, LLMClient(str(broker.with_host("127.0.0.1").with_port(proxy.port))) as llm:
        proxy.cut()
        await asyncio.sleep(0.5)
        with pytest.raises(LLMClientError) as caught:
            await llm.complete("hi", agent="writer", timeout_s=3)
    assert isinstance(caught.value, BrokerUnavailable) and "same request_id" in str(caught.value)
