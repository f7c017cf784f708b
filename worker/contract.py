"""Generate ``schemas/`` from the pydantic models: JSON Schema per message, and AsyncAPI 3.0.

``python -m worker schemas`` writes the files; ``--check`` (run by the test suite) fails when they
drift from the models. Channel names are those of the shipped ``config/bus.yaml``; a test holds
the two together.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from worker.messages import (
    CHUNK_TYPE,
    EMBEDDING_REQUEST_TYPE,
    EMBEDDING_RESULT_TYPE,
    RESULT_TYPE,
    STREAM_RESULT_TYPE,
    EmbeddingRequest,
    EmbeddingResult,
    LLMChunk,
    LLMRequest,
    LLMResult,
)

VERSION = "0.1.0"
REQUEST_QUEUE = "llm.requests"
BATCH_QUEUE = "llm.requests.batch"
RESULTS_EXCHANGE = "llm.results"
DEAD_LETTER_EXCHANGE = "llm.dlx"
DEAD_LETTER_QUEUE = "llm.requests.dlq"

_CORRELATION = {
    "description": "Set by the caller; the reply carries the same value.",
    "location": "$message.header#/correlation_id",
}
_AMQP_MESSAGE = {"amqp": {"contentEncoding": "utf-8", "bindingVersion": "0.3.0"}}


_REQUESTS = {
    "LLMRequest": {"$ref": "#/components/messages/LLMRequest"},
    "EmbeddingRequest": {"$ref": "#/components/messages/EmbeddingRequest"},
}
_RESULTS = {
    "LLMResult": {"$ref": "#/components/messages/LLMResult"},
    "EmbeddingResult": {"$ref": "#/components/messages/EmbeddingResult"},
}


def _embedding_messages() -> dict[str, Any]:
    """The embedding request and result, told apart from chat messages by their AMQP ``type``."""
    return {
        name: {
            "name": name,
            "contentType": "application/json",
            "correlationId": _CORRELATION,
            "payload": {"$ref": f"#/components/schemas/{name}"},
            "bindings": {"amqp": {**_AMQP_MESSAGE["amqp"], "messageType": amqp_type}},
        }
        for name, amqp_type in (
            ("EmbeddingRequest", EMBEDDING_REQUEST_TYPE),
            ("EmbeddingResult", EMBEDDING_RESULT_TYPE),
        )
    }


def _receive(channel: str, request: str, summary: str, *, streams: bool = False) -> dict[str, Any]:
    """A receive operation of ``channel`` for ``request``, answered on the reply_to queue (with
    ``LLMChunk`` messages first where the request may stream)."""
    result = request.replace("Request", "Result")
    chunks = [{"$ref": "#/channels/replies/messages/LLMChunk"}] if streams else []
    return {
        "action": "receive",
        "channel": {"$ref": f"#/channels/{channel}"},
        "summary": summary,
        "messages": [{"$ref": f"#/channels/{channel}/messages/{request}"}],
        "reply": {
            "address": {"location": "$message.header#/reply_to"},
            "channel": {"$ref": "#/channels/replies"},
            "messages": [{"$ref": f"#/channels/replies/messages/{result}"}, *chunks],
        },
    }


def json_schemas() -> dict[str, dict[str, Any]]:
    """One standalone JSON Schema (draft 2020-12) per message."""
    out = {}
    pairs: tuple[tuple[str, type[BaseModel], JsonSchemaMode], ...] = (
        ("llm_request", LLMRequest, "validation"),
        ("llm_result", LLMResult, "serialization"),
        ("llm_chunk", LLMChunk, "serialization"),
        ("embedding_request", EmbeddingRequest, "validation"),
        ("embedding_result", EmbeddingResult, "serialization"),
    )
    for name, model, mode in pairs:
        schema = model.model_json_schema(mode=mode)
        out[f"{name}.schema.json"] = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://llm-worker.local/schemas/{name}.schema.json",
            **schema,
        }
    return out


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0 document: the worker's view of queues, exchanges and messages."""
    _, defs = models_json_schema(
        [
            (LLMRequest, "validation"),
            (LLMResult, "serialization"),
            (LLMChunk, "serialization"),
            (EmbeddingRequest, "validation"),
            (EmbeddingResult, "serialization"),
        ],
        ref_template="#/components/schemas/{model}",
    )

    def queue(name: str) -> dict[str, Any]:
        return {
            "is": "queue",
            "queue": {"name": name, "durable": True, "exclusive": False, "autoDelete": False, "vhost": "/"},
            "bindingVersion": "0.3.0",
        }

    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "LLM worker",
            "version": VERSION,
            "description": (
                "Agents publish LLMRequest messages to the request queue; a worker answers each with one "
                "LLMResult on the request's reply_to queue (or on the results exchange, routing key = agent, "
                "when there is no reply_to). request_id is the idempotency key. A request with stream: true "
                "(reply_to required) is answered by LLMChunk messages (AMQP type llm.chunk, seq 0, 1, ...) "
                "and then one LLMResult (type llm.result); other results have type LLMResult.v1. An "
                f"EmbeddingRequest (AMQP type {EMBEDDING_REQUEST_TYPE}) on the same queues is answered "
                f"with an EmbeddingResult (type {EMBEDDING_RESULT_TYPE}) the same way."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {"rabbitmq": {"host": "localhost:5672", "protocol": "amqp", "protocolVersion": "0.9.1"}},
        "channels": {
            "requests": {
                "address": REQUEST_QUEUE,
                "description": "Quorum queue with a dead-letter exchange and a delivery limit.",
                "messages": _REQUESTS,
                "bindings": {"amqp": queue(REQUEST_QUEUE)},
            },
            "batchRequests": {
                "address": BATCH_QUEUE,
                "description": "Batch work: the same contract, served beside the interactive queue with a "
                "prefetch of its own (bus.batch_prefetch) and a share of provider rate limits "
                "(llm.batch_rate_share); every request here is treated as priority batch.",
                "messages": _REQUESTS,
                "bindings": {"amqp": queue(BATCH_QUEUE)},
            },
            "replies": {
                "address": None,
                "description": "The queue named by the request's reply_to property: one LLMResult (or "
                "EmbeddingResult), or for a streamed request its LLMChunks in seq order and then its "
                "LLMResult.",
                "messages": {**_RESULTS, "LLMChunk": {"$ref": "#/components/messages/LLMChunk"}},
            },
            "results": {
                "address": "{agent}",
                "description": f"Topic exchange {RESULTS_EXCHANGE} for results of requests without reply_to.",
                "parameters": {"agent": {"description": "The request's agent."}},
                "messages": _RESULTS,
                "bindings": {
                    "amqp": {
                        "is": "routingKey",
                        "exchange": {
                            "name": RESULTS_EXCHANGE,
                            "type": "topic",
                            "durable": True,
                            "autoDelete": False,
                            "vhost": "/",
                        },
                        "bindingVersion": "0.3.0",
                    }
                },
            },
            "deadLetters": {
                "address": DEAD_LETTER_QUEUE,
                "description": f"Requests that failed or could not be parsed, via fanout exchange "
                f"{DEAD_LETTER_EXCHANGE}; x-dlq-* headers say why. Replay with `worker dlq replay`.",
                "messages": _REQUESTS,
            },
        },
        "operations": {
            "receiveRequest": _receive(
                "requests",
                "LLMRequest",
                "Serve one chat completion; ack only after the reply is confirmed.",
                streams=True,
            ),
            "receiveEmbeddingRequest": _receive(
                "requests",
                "EmbeddingRequest",
                "Embed a batch of texts (either queue); the same identity, budgets, cache, "
                "idempotency, retries and fallbacks as a chat request.",
            ),
            "receiveBatchRequest": _receive(
                "batchRequests",
                "LLMRequest",
                "As receiveRequest, after interactive work (its own prefetch and rate share).",
            ),
            "receiveBatchEmbeddingRequest": _receive(
                "batchRequests",
                "EmbeddingRequest",
                "As receiveEmbeddingRequest, after interactive work (indexing is batch work).",
            ),
            "publishResult": {
                "action": "send",
                "channel": {"$ref": "#/channels/results"},
                "messages": [
                    {"$ref": "#/channels/results/messages/LLMResult"},
                    {"$ref": "#/channels/results/messages/EmbeddingResult"},
                ],
            },
            "deadLetter": {
                "action": "send",
                "channel": {"$ref": "#/channels/deadLetters"},
                "messages": [{"$ref": "#/channels/deadLetters/messages/LLMRequest"}],
            },
        },
        "components": {
            "messages": {
                "LLMRequest": {
                    "name": "LLMRequest",
                    "contentType": "application/json",
                    "correlationId": _CORRELATION,
                    "payload": {"$ref": "#/components/schemas/LLMRequest"},
                    "bindings": _AMQP_MESSAGE,
                },
                "LLMResult": {
                    "name": "LLMResult",
                    "contentType": "application/json",
                    "correlationId": _CORRELATION,
                    "payload": {"$ref": "#/components/schemas/LLMResult"},
                    "description": f"AMQP type {RESULT_TYPE}; {STREAM_RESULT_TYPE} when it ends a stream. "
                    "Persistent, confirmed.",
                    "bindings": _AMQP_MESSAGE,
                },
                "LLMChunk": {
                    "name": "LLMChunk",
                    "contentType": "application/json",
                    "correlationId": _CORRELATION,
                    "payload": {"$ref": "#/components/schemas/LLMChunk"},
                    "description": f"AMQP type {CHUNK_TYPE}: a piece of a streamed answer. Transient; may "
                    "be lost, and is sent again from seq 0 when a crashed worker's request is redelivered.",
                    "bindings": _AMQP_MESSAGE,
                },
                **_embedding_messages(),
            },
            "schemas": defs["$defs"],
        },
    }


def rendered() -> dict[str, str]:
    files = {
        name: json.dumps(schema, indent=2, sort_keys=True) + "\n" for name, schema in json_schemas().items()
    }
    files["asyncapi.yaml"] = yaml.safe_dump(asyncapi(), sort_keys=False, width=100)
    return files


def write_schemas(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in rendered().items():
        (folder / name).write_text(text)
        written.append(folder / name)
    return written


def check_schemas(folder: Path) -> list[str]:
    """Names of files in ``folder`` that differ from what the models generate."""
    return [
        name
        for name, text in rendered().items()
        if not (folder / name).is_file() or (folder / name).read_text() != text
    ]
