"""Hostile input (issue #16), each case as an attacker sends it, against the real worker: no URL
is fetched, malformed parts are answered, nothing leaks, nothing is lost."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import threading
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import aio_pika
import litellm
import pytest
import structlog
from aiohttp import web
from hypothesis import given
from hypothesis import settings as examples
from hypothesis import strategies as st

from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.base import ProviderFake
from tests.fakes.gemini import FakeGemini
from tests.fakes.openai_server import FakeOpenAI
from tests.support.bodies import request_body
from tests.support.config import deployment as openai_deployment
from tests.support.crash import crash_on
from tests.support.peers import RawPeer, raw_peer
from tests.support.queues import depth_at_least, drain_queue, queue_depth
from tests.support.waits import eventually
from worker import tracing
from worker.bus import DEAD_LETTER_PREFIX_BYTES
from worker.consumer import delivery_count
from worker.errors import from_litellm
from worker.messages import LLMResult, Status

# A 1x1 PNG: what a listener would serve if the worker fetched from it.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
DATA_PNG = "data:image/png;base64," + base64.b64encode(PNG).decode()

PROVIDERS: dict[str, tuple[type[ProviderFake], str]] = {
    "anthropic": (FakeAnthropic, "anthropic/claude-sonnet-4-6"),
    "gemini": (FakeGemini, "gemini/gemini-2.5-flash"),
}


class _Counting(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.server.connections += 1  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(PNG)))
        self.end_headers()
        self.wfile.write(PNG)

    def log_message(self, *args: Any) -> None:
        pass


class Listener(http.server.ThreadingHTTPServer):
    """A local HTTP server, in a thread of its own (litellm's token counter fetches synchronously,
    on the worker's event loop), that counts every request made to it: it must see none."""

    connections = 0

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.server_address[1]}/{path}"


@contextmanager
def listener() -> Iterator[Listener]:
    target = Listener(("127.0.0.1", 0), _Counting)
    thread = threading.Thread(target=target.serve_forever, daemon=True)
    thread.start()
    try:
        yield target
    finally:
        target.shutdown()
        target.server_close()


@asynccontextmanager
async def provider(name: str) -> AsyncIterator[ProviderFake]:
    fake_class, _ = PROVIDERS[name]
    fake = await fake_class().start()
    try:
        yield fake
    finally:
        await fake.stop()


def deployment(name: str, fake: ProviderFake, **params: Any) -> dict[str, Any]:
    return {
        "model_name": name,
        "litellm_params": {
            "model": PROVIDERS[name][1],
            "api_base": fake.api_base,
            "api_key": fake.api_key,
            **params,
        },
        "model_info": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6},
    }


def with_part(part: Any, **fields: Any) -> dict[str, Any]:
    body = request_body(**fields)
    body["messages"] = [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, part]}]
    return body


def results(replies: list[Any]) -> dict[str, LLMResult]:
    return {r.correlation_id: LLMResult.model_validate_json(r.body) for r in replies}


def remote_parts(target: Listener) -> list[tuple[dict[str, Any], str]]:
    """Parts that would make litellm fetch from ``target`` (or read a local file), and the refusal."""
    image = "messages.0.content.1: image_url.url: only inline data"
    return [
        ({"type": "image_url", "image_url": {"url": target.url("a.png")}}, image),
        ({"type": "image_url", "image_url": {"url": target.url("a.png"), "detail": "high"}}, image),
        ({"type": "image_url", "image_url": {"url": target.url("a.png", "https")}}, image),
        ({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, image),
        ({"type": "image_url", "image_url": {"url": "data:text/html;base64,PGI+"}}, image),
        ({"type": "file", "file": {"file_id": target.url("doc.pdf")}}, "messages.0.content.1: file.file_id:"),
        ({"type": "file", "file": {"file_id": "gs://bucket/doc.pdf"}}, "messages.0.content.1: file.file_id:"),
        (
            {"type": "file", "file": {"file_data": target.url("doc.pdf")}},
            "messages.0.content.1: file.file_data:",
        ),
    ]


@pytest.mark.parametrize("name", list(PROVIDERS))
async def test_remote_urls_in_content_parts_are_refused_and_never_fetched(
    name, make_settings, start_worker, amqp_url, names
):
    with listener() as target:
        async with provider(name) as fake:
            cases = remote_parts(target)
            settings = make_settings(default_model=name, models=[deployment(name, fake)])
            async with start_worker(settings), raw_peer(amqp_url, names.request_queue) as peer:
                sent = {await peer.publish(with_part(part)): expected for part, expected in cases}
                answered = results(await peer.wait_replies(len(cases)))
            assert target.connections == 0  # not one fetch: not by the call, not by token counting
    assert fake.calls == 0
    for cid, expected in sent.items():
        result = answered[cid]
        assert result.status is Status.invalid and result.error is not None
        assert result.error.message.startswith(expected), result.error.message
        assert "Traceback" not in result.error.message


@pytest.mark.parametrize("name", list(PROVIDERS))
async def test_an_inline_image_reaches_the_provider(name, make_settings, start_worker, amqp_url, names):
    async with provider(name) as fake:
        settings = make_settings(default_model=name, models=[deployment(name, fake)])
        async with start_worker(settings), raw_peer(amqp_url, names.request_queue) as peer:
            part = {"type": "image_url", "image_url": {"url": DATA_PNG, "detail": "high"}}
            await peer.publish(with_part(part))
            [reply] = await peer.wait_replies(1)
    result = LLMResult.model_validate_json(reply.body)
    assert result.status is Status.ok, result.error
    assert fake.calls == 1
    assert base64.b64encode(PNG).decode() in json.dumps(fake.requests[-1].body)  # inlined as sent


MALFORMED_PARTS: list[tuple[Any, str]] = [
    ({"type": "bogus"}, "unknown content part type 'bogus'"),
    ({"text": "hi"}, "'type' is missing"),
    ({"type": "image_url"}, "image_url: required field is missing"),
    ({"type": "image_url", "image_url": {}}, "image_url.url: required field is missing"),
    ({"type": "image_url", "image_url": "data:image/png;base64,AAAA"}, "image_url: an object"),
    (
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}},
        "image_url.url: not valid base64",
    ),
    ({"type": "image_url", "image_url": {"url": DATA_PNG, "detail": "max"}}, "image_url.detail:"),
    ({"type": "text", "text": 7}, "text: a string"),
    ({"type": "text", "text": "hi", "extra": 1}, "'extra': unknown field"),
    ({"type": "file", "file": {}}, "file: exactly one of"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "ogg"}}, "input_audio.format:"),
    ({"type": None}, "'type' is missing"),
    ({"type": ["text"]}, "unknown content part type ['text']"),
]


async def test_malformed_content_parts_are_answered_invalid_and_never_crash_the_worker(
    make_settings, start_worker, amqp_url, names, fake
):
    settings = make_settings(bus={"delivery_limit": 1})
    async with start_worker(settings), raw_peer(amqp_url, names.request_queue) as peer:
        sent = {await peer.publish(with_part(part)): expected for part, expected in MALFORMED_PARTS}
        answered = results(await peer.wait_replies(len(sent)))
    for cid, expected in sent.items():
        result = answered[cid]
        assert result.status is Status.invalid and result.error is not None, result
        assert result.error.message.startswith("messages.0.content.1: "), result.error.message
        assert expected in result.error.message, result.error.message
    dead = await drain_queue(amqp_url, names.dead_letter_queue, keep=True)
    assert {m.headers["x-dlq-reason"] for m in dead} == {"InvalidRequest"}  # never WorkerCrashed
    assert fake.total_calls() == 0


class Echoing(FakeOpenAI):
    """Model ``echo`` answers 401 quoting the key it was sent and the prompt, as some providers do."""

    async def _answer(self, model: str, n: int, body: dict[str, Any]) -> web.StreamResponse:
        if model == "echo":
            key = self.requests[-1]["headers"].get("Authorization", "").removeprefix("Bearer ")
            prompt = body["messages"][-1]["content"]
            return self._error(401, f"Incorrect API key provided: {key}. Request was: {prompt}")
        return await super()._answer(model, n, body)


async def test_no_prompt_traceback_or_literal_key_leaves_the_worker(
    make_settings, start_worker, amqp_url, names
):
    """A key written in llm.yaml itself (no os.environ/ reference, no well-known prefix), quoted
    by a provider; the prompt quoted by the provider and by litellm ("Received Messages=")."""
    key = "zq" + uuid.uuid4().hex + uuid.uuid4().hex[:6]
    prompt = f"PROMPT-{uuid.uuid4().hex} keep this private"
    echoing = await Echoing().start()
    async with provider("anthropic") as claude:
        leaky = openai_deployment("leaky", "echo", echoing.base_url)
        leaky["litellm_params"]["api_key"] = key
        settings = make_settings(default_model="leaky", models=[leaky, deployment("anthropic", claude)])
        with structlog.testing.capture_logs() as logs:
            async with start_worker(settings), raw_peer(amqp_url, names.request_queue) as peer:
                quoted = await peer.publish(request_body(prompt))
                # A tool message without its tool_call_id: litellm's Anthropic code raises and
                # appends the whole prompt to the error.
                body = request_body(model="anthropic")
                body["messages"] = [{"role": "user", "content": prompt}, {"role": "tool", "content": prompt}]
                received = await peer.publish(body)
                answered = results(await peer.wait_replies(2))
    await echoing.stop()

    assert echoing.requests[-1]["headers"]["Authorization"] == f"Bearer {key}"  # the key was sent
    dead = {m.correlation_id: m for m in await drain_queue(amqp_url, names.dead_letter_queue)}
    for cid in (quoted, received):
        result = answered[cid]
        assert result.status is Status.failed and result.error is not None
        header = dead[cid].headers["x-dlq-message"]
        for text in (result.error.message, header):
            assert key not in text and "PROMPT-" not in text and "keep this private" not in text, text
            assert "Received Messages" not in text and "Traceback" not in text, text
    assert answered[quoted].error.message.startswith("Incorrect API key provided: [redacted]")
    assert answered[received].error.type == "BadRequest"
    lines = json.dumps([e for e in logs if e.get("event") != "request.done"], default=str)
    assert key not in lines and "PROMPT-" not in lines and "Received Messages" not in lines
    assert any(e.get("event") == "llm.attempt_failed" for e in logs)


def test_a_litellm_traceback_and_prompt_are_cut_from_the_error_text():
    try:
        raise KeyError("image_url")
    except KeyError:
        text = f"connection failed\n{traceback.format_exc()}"
    exc = litellm.APIConnectionError(message=text, llm_provider="anthropic", model="claude")
    error = from_litellm(exc)
    assert error.kind == "ConnectionError" and "Traceback" not in str(error) and 'File "' not in str(error)
    assert str(error) == "connection failed"
    asked = litellm.BadRequestError(
        message="AnthropicException - 'tool_call_id'\nReceived Messages=[{'role': 'user', 'content': 'p'}]",
        model="claude",
        llm_provider="anthropic",
    )
    assert str(from_litellm(asked)) == "'tool_call_id'"


async def publish(peer: RawPeer, body: dict[str, Any], *, reply_to: str) -> None:
    raw = json.dumps(body).encode()
    message = aio_pika.Message(raw, correlation_id=body["request_id"], reply_to=reply_to)
    await peer.channel.default_exchange.publish(message, routing_key=peer.request_queue)


async def test_answers_to_a_reply_queue_that_does_not_exist_are_dead_lettered_with_a_reason(
    make_settings, start_worker, amqp_url, names, fake
):
    budget = {
        "max_cost_per_task": 1e-9,
        "max_cost_per_day": 100.0,
        "max_cost_per_agent_day": {"writer": 100.0},
    }
    settings = make_settings(budget=budget)
    bodies = {
        "BudgetExceeded": request_body("pricey", task_id="t-1"),
        "DeadlineExpired": request_body("late", deadline="2000-01-01T00:00:00Z"),
    }
    answered = request_body("answered, so stored")  # in the result store: found there, not lost
    with structlog.testing.capture_logs() as logs:
        async with start_worker(settings), raw_peer(amqp_url, names.request_queue) as peer:
            for body in (*bodies.values(), answered, answered):  # the second copy is a duplicate
                await publish(peer, body, reply_to=f"t.gone.{uuid.uuid4().hex}")

            ours = {body["request_id"] for body in (*bodies.values(), answered)}

            def done() -> list[dict[str, Any]]:  # this test's: a worker of an earlier test may log too
                return [e for e in logs if e.get("event") == "request.done" and e.get("request_id") in ours]

            await eventually(lambda: len(done()) == 4, what="all four handled")
    assert {(e["request_id"], e["reply"]) for e in done()} == {
        (body["request_id"], "unroutable") for body in (*bodies.values(), answered)
    }
    dead = {m.correlation_id: m for m in await drain_queue(amqp_url, names.dead_letter_queue)}
    assert set(dead) == {body["request_id"] for body in bodies.values()}
    for reason, body in bodies.items():
        headers = dead[body["request_id"]].headers
        assert headers["x-dlq-reason"] == reason and headers["x-dlq-reply"] == "unroutable"
        assert headers["x-dlq-message"]
    assert fake.total_calls() == 1  # the answered one, once


async def test_a_reply_the_broker_refuses_is_dead_lettered_and_the_provider_called_once(
    make_settings, start_worker, amqp_url, names, fake
):
    settings = make_settings(
        models=[
            openai_deployment("primary", "ok", fake.base_url),
            openai_deployment("broken", "e500", fake.base_url),
        ]
    )
    async with start_worker(settings), raw_peer(amqp_url, names.request_queue) as peer:
        full = await peer.channel.declare_queue(
            f"t.full.{uuid.uuid4().hex}",
            exclusive=True,
            arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
        )
        bodies = [request_body("answered", use_cache=False), request_body("failing", model="broken")]
        for body in bodies:
            await peer.channel.default_exchange.publish(
                aio_pika.Message(
                    json.dumps(body).encode(), correlation_id=body["request_id"], reply_to=full.name
                ),
                routing_key=names.request_queue,
            )
        await eventually(
            lambda: depth_at_least(amqp_url, names.dead_letter_queue, 2), what="both requests dead-lettered"
        )
        assert await queue_depth(amqp_url, names.request_queue) == 0  # acked, not requeued
    assert fake.calls["ok"] == 1 and fake.calls["e500"] == 3  # one call (and its retries) each
    dead = {m.correlation_id: m for m in await drain_queue(amqp_url, names.dead_letter_queue)}
    ok, failed = (dead[body["request_id"]].headers for body in bodies)
    assert ok["x-dlq-reason"] == failed["x-dlq-reason"] == "ReplyRefused"
    assert ok["x-dlq-reply"] == "refused" and ok["x-dlq-status"] == "ok"
    assert "in the result store" in ok["x-dlq-message"]
    assert failed["x-dlq-status"] == "failed" and "ServerError" in failed["x-dlq-message"]


async def test_a_publisher_set_delivery_count_is_not_trusted(
    make_settings, start_worker, amqp_url, names, fake, monkeypatch
):
    deliveries = crash_on(monkeypatch, b"crash me", "simulated bug")
    settings = make_settings(bus={"delivery_limit": 2})
    async with start_worker(settings), raw_peer(amqp_url, names.request_queue) as peer:
        await peer.publish(request_body("crash me"), headers={"x-delivery-count": 99})
        await eventually(
            lambda: depth_at_least(amqp_url, names.dead_letter_queue, 1), what="the crasher dead-lettered"
        )
    assert len(deliveries) == 3  # the first delivery and delivery_limit redeliveries, as for anyone
    [dead] = await drain_queue(amqp_url, names.dead_letter_queue)
    assert dead.headers["x-dlq-reason"] == "WorkerCrashed" and dead.headers["x-dlq-delivery-count"] == 2


async def test_an_oversized_body_is_dead_lettered_as_a_bounded_prefix_with_its_size_and_hash(
    make_settings, start_worker, amqp_url, names, fake
):
    body = json.dumps(request_body("x" * 2_000_000)).encode()
    settings = make_settings(bus={"max_body_bytes": 8192})
    async with start_worker(settings), raw_peer(amqp_url, names.request_queue) as peer:
        await peer.publish(body)
        [reply] = await peer.wait_replies(1)
    result = LLMResult.model_validate_json(reply.body)
    assert result.status is Status.invalid and result.error is not None
    assert result.error.message == f"body: {len(body)} bytes exceeds the limit of 8192"
    [dead] = await drain_queue(amqp_url, names.dead_letter_queue)
    assert dead.body == body[:DEAD_LETTER_PREFIX_BYTES]
    assert dead.headers["x-dlq-body-bytes"] == len(body) and dead.headers["x-dlq-body-truncated"] is True
    assert dead.headers["x-dlq-body-sha256"] == hashlib.sha256(body).hexdigest()


@dataclass
class Headers:
    """What the consumer reads of a delivery's headers (a property test needs no broker)."""

    headers: dict[str, Any]
    redelivered: bool


header_values = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=60) | st.binary(max_size=60)
)


@examples(max_examples=300, deadline=None)
@given(
    headers=st.dictionaries(
        st.sampled_from(["x-delivery-count", "traceparent", "tracestate", "x-death", "x-other"]),
        header_values,
    ),
    redelivered=st.booleans(),
)
def test_any_header_value_is_read_without_raising_and_only_the_brokers_count_counts(headers, redelivered):
    tracing.receive(headers)
    count = delivery_count(Headers(headers, redelivered))  # type: ignore[arg-type]
    assert count >= 0 and isinstance(count, int)
    if not redelivered:
        assert count == 0  # a first delivery's x-delivery-count is the publisher's, not the broker's
