"""Bytes off the bus -> a validated :class:`~worker.messages.LLMRequest`, or an ``invalid`` answer.

Nothing here touches Redis, the broker or a provider, so parsing is tested on its own with
arbitrary input (tests' property-based fuzzer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from worker.boundary import content
from worker.boundary.urls import HostAllowlist
from worker.messages import EmbeddingRequest, LLMRequest
from worker.outcome import Delivery, Outcome, invalid
from worker.tracing import TraceParent

_PEEK_LIMIT_BYTES = 4 * 1_048_576
_MAX_REQUEST_ID_CHARS = 128


@dataclass(frozen=True)
class RequestPeek:
    """The identifiers of a request body, read without validating it (it may be anything)."""

    request_id: str | None = None
    agent: str | None = None
    trace_id: str | None = None


def peek_request(body: bytes) -> RequestPeek:
    """Best effort, never raising: the ids a body claims, each cut to 200 characters."""
    if len(body) > _PEEK_LIMIT_BYTES:
        return RequestPeek()
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past Python's limit
        return RequestPeek()
    if not isinstance(data, dict):
        return RequestPeek()

    def text(key: str) -> str | None:
        value = data.get(key)
        return value[:200] if isinstance(value, str) else None

    return RequestPeek(text("request_id"), text("agent"), text("trace_id"))


def parse(
    delivery: Delivery, *, max_body_bytes: int, remote_images: HostAllowlist | None = None
) -> LLMRequest | Outcome:
    """Validate the body, or an ``invalid`` outcome naming the field and the problem; image URLs
    are allowed only where ``remote_images`` lists their host (they are fetched later).

    A request without a ``trace_id`` of its own joins the trace of its ``traceparent`` header;
    its ids are bound to every log line written while it is handled (issue #7).
    """
    return _delivered(_validate(delivery, max_body_bytes, remote_images), delivery)


_Request = TypeVar("_Request", LLMRequest, EmbeddingRequest)

# An input that litellm reads as something other than text: Cohere embeds a `data:` base64 string
# as an image; Gemini sends a `data:` URI inline and fetches a `files/` name from Google with our key.
_NOT_TEXT = ("data:", "files/", "gs://")


def parse_embedding(delivery: Delivery, *, max_body_bytes: int) -> EmbeddingRequest | Outcome:
    """As :func:`parse`, for an embedding request (AMQP type ``EmbeddingRequest.v1``); each input
    must be text, not what litellm would send as an image or a file reference."""
    request = validate_body(delivery, max_body_bytes, EmbeddingRequest)
    if not isinstance(request, Outcome):
        for i, text in enumerate(request.input):
            if text.startswith(_NOT_TEXT):
                return invalid(
                    request.request_id,
                    f"input.{i}",
                    f"begins with {text[:6]!r}, which litellm sends as an image or a file reference, "
                    "not as text: embed text only (put any other character first)",
                    request=request,
                )
    return _delivered(request, delivery)


def _delivered(parsed: _Request | Outcome, delivery: Delivery) -> _Request | Outcome:
    """The trace, the queue and the log context of a parsed request (or of its ``invalid`` answer)."""
    parent = delivery.trace_parent
    if isinstance(parsed, Outcome):
        if parsed.result.trace_id is None and parent is not None:
            parsed.result.trace_id = parent.trace_id
        return parsed
    if delivery.batch and parsed.priority != "batch":  # the queue it came by decides
        parsed = parsed.model_copy(update={"priority": "batch"})
    return _join_trace(parsed, parent)


def _validate(
    delivery: Delivery, max_body_bytes: int, remote_images: HostAllowlist | None
) -> LLMRequest | Outcome:
    request = validate_body(delivery, max_body_bytes, LLMRequest)
    if isinstance(request, Outcome):
        return request
    refused_part = content.refusal(request.messages, remote_images)
    if refused_part is not None:
        return invalid(request.request_id, *refused_part, request=request)
    return request


def validate_body(delivery: Delivery, max_body_bytes: int, kind: type[_Request]) -> _Request | Outcome:
    """The body as a ``kind`` (a chat or an embedding request), or the ``invalid`` answer naming
    the field: size, UTF-8, schema, and no key twice in one object."""
    embedding = kind is EmbeddingRequest  # the answer to an embedding request is an EmbeddingResult
    request_id = delivery.correlation_id or delivery.message_id
    if len(delivery.body) > max_body_bytes:
        return invalid(
            request_id,
            "body",
            f"{len(delivery.body)} bytes exceeds the limit of {max_body_bytes}",
            embedding=embedding,
        )
    try:
        text = delivery.body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return invalid(
            request_id, "body", f"not UTF-8 ({exc.reason} at byte {exc.start})", embedding=embedding
        )
    try:
        request = kind.model_validate_json(text)
    except ValidationError as exc:
        error = _most_specific(exc.errors())
        where = ".".join(str(p) for p in error["loc"] if not _is_union_tag(p)) or "body"
        problem = "required field is missing" if error["type"] == "missing" else error["msg"]
        if error["type"] == "extra_forbidden":
            problem = f"unknown field (not part of {kind.__name__} schema_version 1)"
        if error["type"] == "json_invalid":
            where, problem = "body", f"not valid JSON ({error['msg']})"
        claimed = peek_request(delivery.body).request_id
        if claimed is not None and 0 < len(claimed) <= _MAX_REQUEST_ID_CHARS:
            request_id = claimed
        return invalid(request_id, where, problem, embedding=embedding)
    repeated = _repeated_key(text)
    if repeated is not None:  # JSON parsers disagree on which one wins: refuse, do not guess
        return invalid(
            request.request_id,
            "body",
            f"key {repeated[:40]!r} appears twice in one object",
            embedding=embedding,
        )
    return request


class _Repeated(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _Repeated(key)
        seen[key] = value
    return seen


def _repeated_key(text: str) -> str | None:
    """The first key that appears twice in one object of ``text`` (already valid JSON), or None.
    pydantic's parser keeps the last of them silently (issue #16)."""
    try:
        json.loads(text, object_pairs_hook=_unique_keys)
    except _Repeated as exc:
        return str(exc)
    except (ValueError, RecursionError):  # deeper than Python's decoder goes: jiter read it whole
        return None
    return None


def _is_union_tag(part: str | int) -> bool:
    """pydantic names the member of a union it tried (``constrained-str``, ``list[...]``)."""
    return isinstance(part, str) and not part.replace("_", "a").isalnum()


def _most_specific(errors: list[ErrorDetails]) -> ErrorDetails:
    """The first error, or, where it is one member of a union the value failed (a content part
    that is neither text nor a part), the deepest error of that union: the part, not the string."""
    first = errors[0]
    tags = [i for i, part in enumerate(first["loc"]) if _is_union_tag(part)]
    if not tags:
        return first
    union = first["loc"][: tags[0]]
    return max((e for e in errors if e["loc"][: tags[0]] == union), key=lambda e: len(e["loc"]))


def _join_trace(request: _Request, parent: TraceParent | None) -> _Request:
    if parent is not None and "trace_id" not in request.model_fields_set:
        request = request.model_copy(update={"trace_id": parent.trace_id})
    structlog.contextvars.bind_contextvars(
        request_id=request.request_id, trace_id=request.trace_id, agent=request.agent, task_id=request.task_id
    )
    return request
