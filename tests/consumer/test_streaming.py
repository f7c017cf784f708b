"""A streamed answer's life on the bus (issue #18): pieces batched by time, a worker killed
mid-stream, a stream request with nowhere to stream to, time to first chunk as a metric."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import uuid

import aio_pika
import pytest

from tests.fakes.openai_api import FakeOpenAIPlatform
from tests.providers.catalogue import PROVIDERS
from tests.support.ledger import day_state
from tests.support.processes import WorkerProcess
from tests.support.waits import eventually
from worker.app import running_worker
from worker.chunks import ChunkStream, Delta
from worker.client import LLMClient, LLMClientError
from worker.messages import LLMChunk, LLMResult, Status, ToolCallDelta
from worker.settings import load_settings

OPENAI = PROVIDERS["openai"]


@pytest.fixture
async def platform():
    fake = await FakeOpenAIPlatform(prompt_tokens=13, completion_tokens=5).start()
    yield fake
    await fake.stop()


async def test_a_fast_model_is_sent_in_few_chunks_not_one_per_token(platform, make_settings, client):
    platform.reply = " ".join(f"word{i}" for i in range(400))  # 400 pieces, written at once
    settings = make_settings(default_model="openai", models=[OPENAI.deployment(platform)])
    async with running_worker(settings) as worker:
        items = [item async for item in client.stream("go", agent="writer")]
        sample = worker.metrics.registry.get_sample_value

        chunks, result = items[:-1], items[-1]
        assert isinstance(result, LLMResult) and result.status is Status.ok
        assert "".join(c.content or "" for c in chunks if isinstance(c, LLMChunk)) == platform.reply
        assert 1 <= len(chunks) < 40, len(chunks)  # gathered every bus.stream_interval_ms (30)
        assert result.chunks == len(chunks)
        assert sample("llm_worker_stream_chunks_total") == len(chunks)
        assert sample("llm_worker_stream_first_chunk_seconds_count", {"model": "openai"}) == 1
        assert sample("llm_worker_stream_first_chunk_lag_seconds_count") == 1


async def test_a_stream_request_without_reply_to_is_refused_invalid(platform, make_settings, amqp_url, names):
    settings = make_settings(default_model="openai", models=[OPENAI.deployment(platform)])
    connection = await aio_pika.connect(amqp_url)
    async with connection, running_worker(settings):
        channel = await connection.channel()
        results = await channel.declare_queue(exclusive=True)
        await results.bind(names.results_exchange, routing_key="writer")
        body = {
            "request_id": uuid.uuid4().hex,
            "agent": "writer",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
        }
        await channel.default_exchange.publish(
            aio_pika.Message(json.dumps(body).encode()), routing_key=names.request_queue
        )
        async with results.iterator(timeout=20) as replies:
            message = await anext(aiter(replies))
        result = LLMResult.model_validate_json(message.body)

    assert result.status is Status.invalid and result.error is not None
    assert result.error.message.startswith("stream: ") and "reply_to" in result.error.message
    assert message.type == "LLMResult.v1" and platform.calls == 0


async def test_a_stream_to_direct_reply_to_arrives_whole(platform, make_settings, amqp_url, names):
    platform.token_delay_s = 0.05
    settings = make_settings(default_model="openai", models=[OPENAI.deployment(platform)])
    connection = await aio_pika.connect(amqp_url)
    async with connection, running_worker(settings):
        channel = await connection.channel()
        direct = await channel.get_queue("amq.rabbitmq.reply-to", ensure=False)
        replies: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        await direct.consume(replies.put, no_ack=True)
        body = {
            "request_id": uuid.uuid4().hex,
            "agent": "writer",
            "messages": [{"role": "user", "content": "hi"}],
        }
        body["stream"] = True
        message = aio_pika.Message(json.dumps(body).encode(), reply_to="amq.rabbitmq.reply-to")
        await channel.default_exchange.publish(message, routing_key=names.request_queue)
        got = [await asyncio.wait_for(replies.get(), 20)]
        while got[-1].type != "llm.result":
            got.append(await asyncio.wait_for(replies.get(), 20))

    chunks = [LLMChunk.model_validate_json(m.body) for m in got[:-1]]
    result = LLMResult.model_validate_json(got[-1].body)
    assert {m.type for m in got[:-1]} == {"llm.chunk"} and len(chunks) == result.chunks >= 2
    assert all(m.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT for m in got[:-1])
    assert all(m.correlation_id == body["request_id"] for m in got)
    assert "".join(c.content or "" for c in chunks) == result.content == platform.sent[-1].text


async def test_closing_the_client_ends_a_stream_in_progress_with_its_error(
    platform, make_settings, amqp_url, names
):
    platform.token_delay_s = 1.0
    settings = make_settings(default_model="openai", models=[OPENAI.deployment(platform)])
    async with running_worker(settings):
        llm = await LLMClient(amqp_url, request_queue=names.request_queue).__aenter__()
        stream = llm.stream("hi", agent="writer", timeout_s=60)
        first = await anext(stream)
        await llm.__aexit__(None, None, None)
        with pytest.raises(LLMClientError, match="closed while this answer was streaming"):
            await asyncio.wait_for(anext(stream), 5)  # at once, not after timeout_s

    assert isinstance(first, LLMChunk) and first.seq == 0


async def test_a_stream_over_budget_gets_no_chunk_and_calls_no_provider(platform, make_settings, client):
    budget = {
        "max_cost_per_task": 1e-9,
        "max_cost_per_day": 100.0,
        "max_cost_per_agent_day": {"writer": 50.0},
    }
    settings = make_settings(default_model="openai", models=[OPENAI.deployment(platform)], budget=budget)
    async with running_worker(settings):
        items = [item async for item in client.stream("hi", agent="writer", task_id="tight")]

    [result] = items  # the reservation comes before the first chunk
    assert isinstance(result, LLMResult) and result.status is Status.budget_exceeded
    assert result.chunks == 0 and platform.calls == 0


async def test_a_worker_killed_mid_stream_leaves_one_correct_result_charged_once(
    platform, config, client, worker_processes
):
    """The victim streams two chunks and is SIGKILLed; the redelivery streams again from seq 0 on
    a successor, the client drops the chunks it has, and the one result is charged once."""
    words = [f"piece{i} " for i in range(8)]
    platform.reply = "".join(words)
    platform.token_delay_s = 0.25
    # deadline_s: the successor first waits for the victim's heartbeat to lapse before taking over.
    folder = config(default_model="openai", models=[OPENAI.deployment(platform)], deadline_s=40)
    settings = load_settings(folder, environ={})
    victim = await WorkerProcess(folder).start()
    worker_processes.append(victim)

    seen: list[LLMChunk] = []
    result: LLMResult | None = None
    successor = None
    async with contextlib.AsyncExitStack() as stack:
        async for item in client.stream("go", agent="writer", timeout_s=60):
            if isinstance(item, LLMResult):
                result = item
                break
            seen.append(item)
            if item.seq == 1 and successor is None:
                victim.signal(signal.SIGKILL)
                assert await victim.wait() == -signal.SIGKILL
                successor = await stack.enter_async_context(running_worker(settings))
        spent = await day_state(settings)

    assert result is not None and result.status is Status.ok, result
    assert result.content == platform.reply
    assert [c.seq for c in seen] == list(range(len(seen))) and len(seen) == result.chunks
    assert "".join(c.content or "" for c in seen) == platform.reply  # the fake answers alike twice
    assert platform.calls == 2  # the provider was called again: the victim died before settling
    # Charged once: the victim's reservation is not a charge (it expires by itself).
    assert spent.calls == 1 and spent.spent_usd == pytest.approx(result.cost_usd)


async def test_chunk_stream_sends_the_first_piece_at_once_then_gathers_and_survives_a_lost_publish():
    """worker.chunks alone: the publish is the bus's; here a list that fails once."""
    published: list[LLMChunk] = []
    fail = {1}  # the second publish fails (a channel closing): dropped, its seq not reused

    async def publish(chunk: LLMChunk) -> None:
        if chunk.seq in fail:
            raise ConnectionError("channel closed")
        published.append(chunk)

    stream = ChunkStream("r1", publish, interval_s=1.0)
    stream.add(Delta(content="a"))
    await eventually(
        lambda: len(published) == 1, what="the first piece, at once", timeout_s=0.15, interval_s=0.01
    )
    for piece in "bcd":  # within one interval: gathered into one chunk (the one that is lost)
        stream.add(Delta(content=piece))
    await eventually(lambda: stream.dropped == 1, what="b, c and d gathered, sent once, lost", timeout_s=5)
    stream.add(Delta(tool_calls=[ToolCallDelta(index=0, id="c1", name="f", arguments='{"q"')]))
    stream.add(Delta(tool_calls=[ToolCallDelta(index=0, arguments=": 1}")]))
    sent = await stream.close(timeout_s=5)

    assert sent == 3 and stream.dropped == 1
    assert [(c.seq, c.content) for c in published] == [(0, "a"), (2, None)]
    assert published[1].tool_calls == [ToolCallDelta(index=0, id="c1", name="f", arguments='{"q": 1}')]
    assert stream.first_chunk_s is not None and stream.first_chunk_lag_s is not None
