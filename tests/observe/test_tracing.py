"""Tracing (issue #7): W3C traceparent through the worker and the client, OpenTelemetry spans
when the SDK is there, no-ops when it is not."""

from __future__ import annotations

import asyncio
import sys
import uuid

import aio_pika
import pytest

from tests.observe.scenario import PARENT_ID, TRACE_ID
from tests.support.bodies import request_body
from tests.support.config import (
    deployment,
)
from tests.support.peers import raw_peer
from tests.support.waits import eventually
from worker import tracing
from worker.messages import LLMResult, Status


async def test_traceparent_round_trip(make_settings, start_worker, amqp_url, names):
    incoming = f"00-{TRACE_ID}-{PARENT_ID}-01"
    other_trace = uuid.uuid4().hex
    async with start_worker(make_settings()), raw_peer(amqp_url, names.request_queue) as peer:
        # no trace_id in the body: the request joins the header's trace
        await peer.publish(request_body("a"), headers={"traceparent": incoming, "tracestate": "vendor=x"})
        # both: the body's trace_id is the contract, the reply's header follows it
        await peer.publish(request_body("b", trace_id=other_trace), headers={"traceparent": incoming})
        # a malformed header (upper case) is ignored, as the W3C spec says
        await peer.publish(request_body("c"), headers={"traceparent": incoming.upper()})
        # an invalid body still answers in the caller's trace
        await peer.publish(b"{not json", headers={"traceparent": incoming})
        replies = await peer.wait_replies(4)

    by_content = {}
    for reply in replies:
        result = LLMResult.model_validate_json(reply.body)
        header = tracing.TraceParent.parse(reply.headers["traceparent"])
        assert header is not None and header.trace_id == result.trace_id  # header and body agree
        assert header.parent_id != PARENT_ID  # the worker's own span, not the agent's
        by_content[result.content or result.status.value] = (result, reply.headers)
    a, a_headers = by_content["[m-writer] a"]
    assert a.trace_id == TRACE_ID and a_headers["tracestate"] == "vendor=x"
    assert by_content["[m-writer] b"][0].trace_id == other_trace
    c = by_content["[m-writer] c"][0]
    assert c.trace_id not in (None, TRACE_ID) and len(c.trace_id) == 32
    assert by_content["invalid"][0].trace_id == TRACE_ID


async def test_client_sends_a_traceparent_for_its_trace_id(amqp_url, names, client):
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(names.request_queue, durable=True)  # no worker behind it
        call = asyncio.create_task(client.complete("hi", agent="writer", trace_id=TRACE_ID, timeout_s=20))
        got: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def arrived() -> bool:
            message = await queue.get(fail=False)
            got.extend([message] if message is not None else [])
            return bool(got)

        await eventually(arrived, timeout_s=10, what="the client's request in the queue")
        message = got[0]
        await message.ack()
        header = tracing.TraceParent.parse(message.headers["traceparent"])
        assert header is not None and header.trace_id == TRACE_ID and header.sampled
        # Answer like a worker would, so the call completes.
        result = LLMResult(
            request_id=message.correlation_id, trace_id=TRACE_ID, status=Status.ok, content="x"
        )
        await channel.default_exchange.publish(
            aio_pika.Message(result.model_dump_json().encode(), correlation_id=message.correlation_id),
            routing_key=message.reply_to,
        )
        assert (await call).content == "x"


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (f"00-{TRACE_ID}-{PARENT_ID}-01", (TRACE_ID, PARENT_ID, "01")),
        (f"00-{TRACE_ID}-{PARENT_ID}-00".encode(), (TRACE_ID, PARENT_ID, "00")),  # AMQP may give bytes
        (f"01-{TRACE_ID}-{PARENT_ID}-01-future-field", (TRACE_ID, PARENT_ID, "01")),
        (f"00-{TRACE_ID}-{PARENT_ID}-01-extra", None),  # version 00 has exactly four fields
        (f"ff-{TRACE_ID}-{PARENT_ID}-01", None),
        (f"00-{'0' * 32}-{PARENT_ID}-01", None),
        (f"00-{TRACE_ID}-{'0' * 16}-01", None),
        (f"00-{TRACE_ID.upper()}-{PARENT_ID}-01", None),
        ("garbage", None),
        (None, None),
    ],
)
def test_traceparent_parsing_follows_the_w3c_rules(value, parsed):
    result = tracing.TraceParent.parse(value)
    assert (result.trace_id, result.parent_id, result.flags) == parsed if parsed else result is None


@pytest.fixture
def otel_spans():
    """An SDK tracer provider with an in-memory exporter, for this test only.

    OpenTelemetry lets a process set its provider once; the reset afterwards is what its own
    test utilities do (opentelemetry-test-utils ``reset_trace_globals``), so that later tests
    run without an SDK, as a worker without the ``otel`` extra does.
    """
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.util._once import Once

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


async def test_provider_attempts_are_spans_in_the_agents_trace(
    otel_spans, make_settings, start_worker, amqp_url, names, fake
):
    from opentelemetry.trace import StatusCode

    settings = make_settings(models=[deployment("primary", "flaky1", fake.base_url)])
    async with start_worker(settings), raw_peer(amqp_url, names.request_queue) as peer:
        await peer.publish(
            request_body("traced call"), headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
        )
        [reply] = await peer.wait_replies(1)

    assert LLMResult.model_validate_json(reply.body).attempts == 2
    spans = sorted(otel_spans.get_finished_spans(), key=lambda s: s.start_time)
    assert [s.name for s in spans] == ["chat primary", "chat primary"]
    for span in spans:
        assert f"{span.context.trace_id:032x}" == TRACE_ID
        assert f"{span.parent.span_id:016x}" == PARENT_ID  # a child of the agent's span
        assert span.attributes["gen_ai.request.model"] == "primary"
        assert not span.events  # no exception text (a provider error may echo a key)
    failed, answered = spans
    assert failed.status.status_code is StatusCode.ERROR and failed.attributes["error.type"] == "ServerError"
    assert answered.attributes["gen_ai.usage.output_tokens"] == 7
    assert answered.status.status_code is StatusCode.UNSET


async def test_client_joins_the_agents_current_span(otel_spans, make_settings, start_worker, client):
    from opentelemetry import trace

    async with start_worker(make_settings()):
        with trace.get_tracer("agent").start_as_current_span("agent step") as step:
            result = await client.complete("inside a span", agent="writer")
    assert result.trace_id == f"{step.get_span_context().trace_id:032x}"
    provider_span = next(
        s for s in otel_spans.get_finished_spans() if s.context.trace_id == int(result.trace_id, 16)
    )
    assert provider_span.parent.span_id == step.get_span_context().span_id


def test_without_opentelemetry_spans_are_no_ops(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # makes the import fail
    tracing._otel.cache_clear()
    try:
        with tracing.provider_span(TRACE_ID, model="m", attempt=1) as span:
            span.failed("ServerError", 500)
            span.answered(1, 2)
        assert not span.recording and tracing.client_parent() is None
    finally:
        tracing._otel.cache_clear()
