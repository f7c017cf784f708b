"""Hostile embedding bodies (issue #18): whatever arrives with the type EmbeddingRequest.v1 is
answered with an EmbeddingResult naming the field, and never reaches a provider."""

from __future__ import annotations

import json
import uuid

import aio_pika
import pytest

from tests.embeddings.catalogue import EMBEDDERS, embedding_llm
from worker.messages import EMBEDDING_REQUEST_TYPE, EMBEDDING_RESULT_TYPE, EmbeddingResult, Status

OPENAI = EMBEDDERS["openai-embed"]


def body(**fields: object) -> bytes:
    return json.dumps(
        {"request_id": uuid.uuid4().hex, "agent": "researcher", "input": ["x"], **fields}
    ).encode()


BODIES = [
    (b"not json", "body: not valid JSON"),
    (
        b'{"request_id": "a", "agent": "researcher", "input": ["x"], "input": ["y"]}',
        "body: key 'input' appears twice",
    ),
    (
        body(messages=[{"role": "user", "content": "hi"}]),
        "messages: unknown field (not part of EmbeddingRequest",
    ),
    (body(input=[1, 2]), "input.0: Input should be a valid string"),
    (body(input=[]), "input: List should have at least 1 item"),
    (body(input=[""]), "input.0: String should have at least 1 character"),
    (body(input=["x"] * 2049), "input: List should have at most 2048 items"),
    (body(dimensions="8"), "dimensions: Input should be a valid integer"),
    (body(dimensions=True), "dimensions: Input should be a valid integer"),
    (body(model="../../etc"), "model: String should match pattern"),
    (body(deadline=1700000000), "deadline: Value error, an RFC 3339 date-time"),
]


@pytest.mark.parametrize(
    ("raw", "expected"), BODIES, ids=[e.split(":")[0] + str(i) for i, (_, e) in enumerate(BODIES)]
)
async def test_a_hostile_embedding_body_is_invalid_naming_the_field(
    raw, expected, edge, make_settings, start_worker, amqp_url, names
):
    fake = await edge(OPENAI)
    settings = make_settings(**embedding_llm(OPENAI.deployment(fake)))
    async with start_worker(settings):
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            replies = await channel.declare_queue(f"t.reply.{uuid.uuid4().hex}", exclusive=True)
            await channel.default_exchange.publish(
                aio_pika.Message(
                    raw, type=EMBEDDING_REQUEST_TYPE, reply_to=replies.name, correlation_id="c-1"
                ),
                routing_key=names.request_queue,
            )
            message = await _next(replies)

    assert message.type == EMBEDDING_RESULT_TYPE
    result = EmbeddingResult.model_validate_json(message.body)
    assert result.status is Status.invalid and result.embeddings is None
    assert result.error is not None and result.error.message.startswith(expected), result.error.message
    assert fake.calls == 0


async def _next(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage:
    async with queue.iterator(timeout=20) as inbox:
        async for message in inbox:
            return message
    raise AssertionError("no reply")
