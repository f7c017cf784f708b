"""Poison messages (issue #6): whatever arrives, the worker answers or dead-letters it at once and
keeps serving; a message that keeps killing workers is dead-lettered by the broker."""

from __future__ import annotations

import json
import random
import signal
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import WorkerProcess, deployment, llm_section, write_config
from tests.helpers import drain_queue, queue_depth, raw_peer, request_body
from tests.ops import eventually, run_cli
from worker.app import running_worker
from worker.messages import LLMRequest, LLMResult, Status
from worker.pipeline import Delivery, Outcome, Pipeline, PipelineLimits
from worker.settings import load_settings

MAX_BODY = 8192


# -- parse: a property over arbitrary input ----------------------------------------------------


@pytest.fixture(scope="module")
def parser() -> Pipeline:
    # parse() reads nothing but the limits; the collaborators are never touched.
    return Pipeline(None, None, None, None, PipelineLimits(10, 60, MAX_BODY))  # type: ignore[arg-type]


def check_parsed(parsed: LLMRequest | Outcome) -> str | None:
    """A request, or an ``invalid`` outcome to dead-letter whose message is ``field: problem``."""
    if isinstance(parsed, LLMRequest):
        return None
    result = parsed.result
    assert parsed.dead_letter and result.status is Status.invalid
    assert result.error is not None and result.error.type == "InvalidRequest" and not result.error.retryable
    where, _, problem = result.error.message.partition(": ")
    assert where and problem, result.error.message
    return where


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
FIELDS = ["request_id", "agent", "messages", "trace_id", "task_id", "model", "temperature", "max_tokens",
          "use_cache", "cache_ttl", "deadline", "schema_version"]  # fmt: skip


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=2 * MAX_BODY))
def test_parse_never_raises_on_arbitrary_bytes(parser, body):
    check_parsed(parser.parse(Delivery(body=body, correlation_id="c")))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=json_values)
def test_parse_never_raises_on_arbitrary_json(parser, value):
    check_parsed(parser.parse(Delivery(body=json.dumps(value).encode(), correlation_id="c")))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from([*FIELDS, "prompt"]), value=json_values, drop=st.booleans())
def test_a_broken_field_is_named_in_the_invalid_reply(parser, field, value, drop):
    body = request_body("x")
    if drop:
        body.pop(field, None)
    else:
        body[field] = value
    where = check_parsed(parser.parse(Delivery(body=json.dumps(body).encode(), correlation_id="c")))
    if where is not None:
        assert where.split(".")[0] == field  # the field we broke, or a part of it (messages.0.role)


def test_parse_survives_nesting_deeper_than_pythons_json_decoder(parser):
    for body in (b"[" * 100_000, b'{"a":' * 5000 + b"1" + b"}" * 5000, b'{"messages":' + b"[" * 3000):
        assert check_parsed(parser.parse(Delivery(body=body))) == "body"


# -- the real worker: malformed messages between valid ones -------------------------------------


def malformed_bodies(rng: random.Random) -> list[tuple[bytes, str | None]]:
    """Bad bodies of every kind the issue names, and what the invalid reply must say first
    (None: randomly damaged, so either invalid or, by chance, still a valid request)."""
    valid = json.dumps(request_body("fine")).encode()
    cases: list[tuple[bytes, str]] = [
        (b"", "body: not valid JSON"),
        (b"\x00" * 64, "body: not valid JSON"),
        (b"{not json", "body: not valid JSON"),
        (valid[: rng.randrange(1, len(valid) - 1)], "body: not valid JSON"),  # truncated
        (b"\xff\xfe" + valid, "body: not UTF-8"),
        ("é".encode("latin-1") + valid, "body: not UTF-8"),
        (b"x" * (MAX_BODY + 1), f"body: {MAX_BODY + 1} bytes exceeds the limit of {MAX_BODY}"),
        (b"[" * (MAX_BODY - 1), "body: not valid JSON"),  # nested past every decoder's limit
        (b"[]", "body: Input should be an object"),
        (b"null", "body: Input should be an object"),
        (json.dumps({**request_body("x"), "prompt": "old"}).encode(), "prompt: unknown field"),
        (json.dumps({**request_body("x"), "temperature": "hot"}).encode(), "temperature:"),
        (json.dumps({**request_body("x"), "agent": "Not An Agent!"}).encode(), "agent:"),
        (json.dumps({**request_body("x"), "deadline": "tomorrow"}).encode(), "deadline:"),
        (json.dumps({**request_body("x"), "messages": []}).encode(), "messages:"),
        (json.dumps({**request_body("x"), "messages": [{"role": "wizard"}]}).encode(), "messages.0.role:"),
        (json.dumps({**request_body("x"), "schema_version": 2}).encode(), "schema_version:"),
    ]
    for field in ("request_id", "agent", "messages"):
        body = request_body("x")
        del body[field]
        cases.append((json.dumps(body).encode(), f"{field}: required field is missing"))
    for _ in range(25):  # random byte damage to a valid body: mostly invalid, sometimes still valid
        damaged = bytearray(json.dumps(request_body("to be damaged")).encode())
        for _ in range(rng.randrange(1, 6)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        cases.append((bytes(damaged), None))
    return cases


async def test_a_fuzzed_stream_of_malformed_messages_never_stalls_the_worker(
    make_settings, start_worker, amqp_url, names, fake
):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    stream: list[tuple[bytes, str | None, bool]] = []  # body, expected error (None: valid), reply?
    for body, expected in malformed_bodies(rng):
        # Damaged bodies always ask for a reply, so that each one's fate is known.
        stream.append((body, expected or "", expected is None or rng.random() < 0.7))
    for i in range(30):
        stream.append((json.dumps(request_body(f"valid {i} {uuid.uuid4().hex}")).encode(), None, True))
    rng.shuffle(stream)

    settings = make_settings(bus={"max_body_bytes": MAX_BODY, "prefetch": 16})
    async with start_worker(settings), raw_peer(amqp_url, names.request_queue) as peer:
        sent = {}
        for body, expected, reply in stream:
            sent[await peer.publish(body, reply=reply)] = (body, expected, reply)
        replies = await peer.wait_replies(sum(reply for *_, reply in stream), timeout_s=60)
        answered = {r.correlation_id: peer_result(r) for r in replies}
        invalid = {cid for cid, result in answered.items() if result.status is Status.invalid}
        silent_bad = {cid for cid, (_, expected, reply) in sent.items() if expected is not None and not reply}
        await eventually(
            lambda: _depth_at_least(amqp_url, names.dead_letter_queue, len(invalid | silent_bad)),
            what=f"every malformed message dead-lettered (seed {seed})",
        )
        assert await queue_depth(amqp_url, names.request_queue) == 0

    for cid, (_, expected, reply) in sent.items():
        if expected is None:
            assert answered[cid].status is Status.ok, f"a valid request was not answered (seed {seed})"
        elif expected and reply:
            error = answered[cid].error
            assert answered[cid].status is Status.invalid and error is not None, f"seed {seed}"
            assert error.message.startswith(expected), (seed, error.message)
        elif reply:  # damaged: invalid, or still a valid request by chance
            assert answered[cid].status in (Status.invalid, Status.ok), f"seed {seed}"
    dead = await drain_queue(amqp_url, names.dead_letter_queue, keep=True)
    assert {m.correlation_id for m in dead} == invalid | silent_bad, f"seed {seed}"
    assert all(m.headers["x-dlq-reason"] == "InvalidRequest" for m in dead)
    assert all(m.body == sent[m.correlation_id][0] for m in dead)  # kept byte for byte


def peer_result(message: Any) -> LLMResult:
    return LLMResult.model_validate_json(message.body)


async def _depth_at_least(amqp_url: str, queue: str, count: int) -> bool:
    return await queue_depth(amqp_url, queue) >= count


async def _depth_is(amqp_url: str, queue: str, count: int) -> bool:
    return await queue_depth(amqp_url, queue) == count


# -- crashes --------------------------------------------------------------------------------


async def test_a_request_that_crashes_the_pipeline_is_retried_then_dead_lettered_with_the_error(
    make_settings, start_worker, amqp_url, names, fake, monkeypatch
):
    # A bug in our own code stands in for whatever unforeseen error a request may trigger.
    handle = Pipeline.handle
    deliveries: list[int] = []

    async def buggy(self: Pipeline, delivery: Delivery) -> Outcome:
        if b"crash me" in delivery.body:
            deliveries.append(1)
            raise RuntimeError("simulated bug in the pipeline")
        return await handle(self, delivery)

    monkeypatch.setattr(Pipeline, "handle", buggy)
    settings = make_settings(bus={"delivery_limit": 2})
    async with start_worker(settings), raw_peer(amqp_url, names.request_queue) as peer:
        crash = request_body("crash me", agent="critic")
        await peer.publish(crash)
        await eventually(
            lambda: _depth_at_least(amqp_url, names.dead_letter_queue, 1), what="the crasher dead-lettered"
        )
        await peer.publish(request_body("and now something normal"))
        [reply] = await peer.wait_replies(1)

    assert peer_result(reply).status is Status.ok  # the worker kept serving
    assert len(deliveries) == 3  # first delivery + delivery_limit redeliveries, then no more
    [dead] = await drain_queue(amqp_url, names.dead_letter_queue, keep=True)
    assert dead.body == json.dumps(crash).encode()
    assert dead.headers["x-dlq-reason"] == "WorkerCrashed"
    assert dead.headers["x-dlq-message"] == "RuntimeError: simulated bug in the pipeline"
    assert dead.headers["x-dlq-attempts"] == 3 and dead.headers["x-dlq-agent"] == "critic"
    assert dead.headers["x-dlq-request-id"] == crash["request_id"]


async def test_a_message_that_keeps_killing_workers_is_dead_lettered_by_the_broker(
    tmp_path, names, amqp_url, redis_url, fake, worker_processes
):
    """Each worker process dies (SIGKILL) while it holds the poison message. For the broker that
    is exactly what a request that crashes the process (a native-library segfault, an OOM kill)
    looks like: a connection that dies with the delivery unacked. With ``delivery_limit: 1`` the
    second death sends it to the dead-letter queue instead of a third worker."""
    llm = llm_section(
        fake.base_url,
        deadline_s=60,
        timeout=60,
        models=[deployment("primary", "ok", fake.base_url), deployment("poison", "slow3000", fake.base_url)],
    )
    config = write_config(tmp_path / "cfg", names, amqp_url, redis_url, llm, bus={"delivery_limit": 1})
    poison = request_body("this one never comes back", agent="writer", model="poison")

    async with raw_peer(amqp_url, names.request_queue) as peer:
        first = await WorkerProcess(config).start()
        worker_processes.append(first)
        await peer.publish(poison)
        await eventually(lambda: fake.calls["slow3000"] == 1, what="the first worker calls with it")
        first.signal(signal.SIGKILL)
        assert await first.wait() == -signal.SIGKILL
        await eventually(lambda: _depth_is(amqp_url, names.request_queue, 1), what="the broker requeues it")

        second = await WorkerProcess(config).start()
        worker_processes.append(second)
        await eventually(
            lambda: _depth_is(amqp_url, names.request_queue, 0), what="the second worker takes it"
        )
        second.signal(signal.SIGKILL)
        assert await second.wait() == -signal.SIGKILL
        await eventually(
            lambda: _depth_at_least(amqp_url, names.dead_letter_queue, 1), what="the broker dead-letters it"
        )

        async with running_worker(load_settings(config, environ={})):  # a survivor, in this process
            await peer.publish(request_body("business as usual"))
            [reply] = await peer.wait_replies(1)

    assert peer_result(reply).status is Status.ok
    assert await queue_depth(amqp_url, names.request_queue) == 0  # no third worker was given the poison
    assert fake.calls["slow3000"] <= 2
    [dead] = await drain_queue(amqp_url, names.dead_letter_queue, keep=True)
    assert dead.body == json.dumps(poison).encode()
    assert dead.headers["x-first-death-reason"] == "delivery_limit"
    listing = await run_cli(config, "dlq", "list")
    assert "delivery_limit" in listing.out and poison["request_id"] in listing.out
