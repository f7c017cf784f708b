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

from worker.messages import LLMRequest, LLMResult

VERSION = "0.1.0"
REQUEST_QUEUE = "llm.requests"
RESULTS_EXCHANGE = "llm.results"
DEAD_LETTER_EXCHANGE = "llm.dlx"
DEAD_LETTER_QUEUE = "llm.requests.dlq"

_CORRELATION = {
    "description": "Set by the caller; the reply carries the same value.",
    "location": "$message.header#/correlation_id",
}
_AMQP_MESSAGE = {"amqp": {"contentEncoding": "utf-8", "bindingVersion": "0.3.0"}}


def json_schemas() -> dict[str, dict[str, Any]]:
    """One standalone JSON Schema (draft 2020-12) per message."""
    out = {}
    pairs: tuple[tuple[str, type[BaseModel], JsonSchemaMode], ...] = (
        ("llm_request", LLMRequest, "validation"),
        ("llm_result", LLMResult, "serialization"),
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
        [(LLMRequest, "validation"), (LLMResult, "serialization")],
        ref_template="#/components/schemas/{model}",
    )
    queue = {
        "is": "queue",
        "queue": {
            "name": REQUEST_QUEUE,
            "durable": True,
            "exclusive": False,
            "autoDelete": False,
            "vhost": "/",
        },
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
                "when there is no reply_to). request_id is the idempotency key."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {"rabbitmq": {"host": "localhost:5672", "protocol": "amqp", "protocolVersion": "0.9.1"}},
        "channels": {
            "requests": {
                "address": REQUEST_QUEUE,
                "description": "Quorum queue with a dead-letter exchange and a delivery limit.",
                "messages": {"LLMRequest": {"$ref": "#/components/messages/LLMRequest"}},
                "bindings": {"amqp": queue},
            },
            "replies": {
                "address": None,
                "description": "The queue named by the request's reply_to property.",
                "messages": {"LLMResult": {"$ref": "#/components/messages/LLMResult"}},
            },
            "results": {
                "address": "{agent}",
                "description": f"Topic exchange {RESULTS_EXCHANGE} for results of requests without reply_to.",
                "parameters": {"agent": {"description": "The request's agent."}},
                "messages": {"LLMResult": {"$ref": "#/components/messages/LLMResult"}},
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
                "messages": {"LLMRequest": {"$ref": "#/components/messages/LLMRequest"}},
            },
        },
        "operations": {
            "receiveRequest": {
                "action": "receive",
                "channel": {"$ref": "#/channels/requests"},
                "summary": "Serve one chat completion; ack only after the reply is confirmed.",
                "messages": [{"$ref": "#/channels/requests/messages/LLMRequest"}],
                "reply": {
                    "address": {"location": "$message.header#/reply_to"},
                    "channel": {"$ref": "#/channels/replies"},
                    "messages": [{"$ref": "#/channels/replies/messages/LLMResult"}],
                },
            },
            "publishResult": {
                "action": "send",
                "channel": {"$ref": "#/channels/results"},
                "messages": [{"$ref": "#/channels/results/messages/LLMResult"}],
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
                    "bindings": _AMQP_MESSAGE,
                },
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
