"""What one delivery comes to: the answer to send, and what else the consumer must do with it.

The pipeline returns an :class:`Outcome` for every delivery; the consumer (reply, dead-letter,
ack), the metrics and the ``request.done`` log line all read its typed fields. The result
builders here are the only place an :class:`~worker.messages.LLMResult` is assembled from a
request, a status and an error, so every answer carries the same ids.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from worker.errors import (
    BudgetExceeded,
    DeadlineExpired,
    Forbidden,
    InvalidRequest,
    ProviderError,
    ReplyToRefused,
    RequestIdReused,
    WorkerError,
)
from worker.messages import EmbeddingRequest, EmbeddingResult, ErrorInfo, LLMRequest, LLMResult, Status
from worker.tracing import TraceParent

if TYPE_CHECKING:
    from worker.chunks import ChunkStream

CacheLookup = Literal["hit", "miss"]
AnyRequest = LLMRequest | EmbeddingRequest
AnyResult = LLMResult | EmbeddingResult


@dataclass(frozen=True)
class Delivery:
    """The parts of an incoming message the pipeline reads (it knows nothing of AMQP)."""

    body: bytes
    correlation_id: str | None = None
    message_id: str | None = None
    redelivered: bool = False
    trace_parent: TraceParent | None = None  # the W3C traceparent header, when valid
    batch: bool = False  # it came from the batch queue
    type: str | None = None  # the AMQP type: EMBEDDING_REQUEST_TYPE for an embedding request
    user_id: str | None = None  # the AMQP user_id, which RabbitMQ validated against the publisher
    replay_caller: object = None  # the x-replay-caller header, whatever its type (identity.py judges)
    reply_to: str | None = None
    # open_stream(request_id): the chunks of a streamed answer to reply_to (None: no reply_to)
    open_stream: Callable[[str], ChunkStream] | None = None


@dataclass
class Outcome:
    """What to answer, and whether the request goes to the dead-letter queue (and why)."""

    result: AnyResult
    dead_letter: bool = False
    provider_latency_ms: float = 0.0
    stored: bool = False  # the answer is in the result store, where a duplicate will find it
    duplicate: bool = False  # answered again from the result store: no call, no charge
    cache: CacheLookup | None = None  # None: the request did not look in the response cache
    budget_scope: str | None = None  # the scope a budget_exceeded answer names
    reply: bool = True  # False: reply_to is not the caller's, so the answer is only dead-lettered
    chunks: ChunkStream | None = None  # a streamed request's chunks: closed before the llm.result

    @property
    def reason(self) -> str | None:
        return self.result.error.type if self.result.error else None


def answer(
    request: AnyRequest | None,
    started: float | None,
    status: Status,
    *,
    embedding: bool = False,
    **fields: Any,
) -> Outcome:
    """An outcome carrying ``request``'s ids, its latency since ``started`` (monotonic) and ``fields``:
    an :class:`EmbeddingResult` for an embedding request (or when ``embedding``), else an ``LLMResult``."""
    latency_ms = (time.monotonic() - started) * 1000 if started is not None else 0.0
    ids: dict[str, Any] = {"request_id": None}
    if request is not None:
        ids = {
            "request_id": request.request_id,
            "trace_id": request.trace_id,
            "agent": request.agent,
            "task_id": request.task_id,
        }
    kind = EmbeddingResult if embedding or isinstance(request, EmbeddingRequest) else LLMResult
    result = kind(
        status=status, latency_ms=round(latency_ms, 3), finished_at=datetime.now(UTC), **ids, **fields
    )
    return Outcome(result)


def invalid(
    request_id: str | None,
    where: str,
    problem: str,
    *,
    request: AnyRequest | None = None,
    embedding: bool = False,
) -> Outcome:
    """An ``invalid`` answer whose message is ``where: problem``; dead-lettered (retrying cannot help)."""
    outcome = answer(
        request,
        None,
        Status.invalid,
        embedding=embedding,
        error=ErrorInfo(type="InvalidRequest", message=f"{where}: {problem}", retryable=False),
    )
    outcome.result.request_id = request_id
    outcome.dead_letter = True
    return outcome


def refused(request: AnyRequest, started: float, error: WorkerError) -> Outcome:
    """The answer for a request that ``error`` ended before (or instead of) an answer.

    ``expired``, ``budget_exceeded``, ``conflict`` and ``forbidden`` are answers the caller acts
    on; ``invalid`` and ``failed`` answers are also dead-lettered, where an operator finds (and may
    replay) them.
    """
    info = ErrorInfo(type=error.kind, message=str(error), retryable=error.retryable)
    if isinstance(error, InvalidRequest):
        return invalid(request.request_id, error.field, error.problem, request=request)
    if isinstance(error, DeadlineExpired):
        return answer(request, started, Status.expired, error=info)
    if isinstance(error, BudgetExceeded):
        outcome = answer(request, started, Status.budget_exceeded, error=info)
        outcome.budget_scope = error.scope
        return outcome
    if isinstance(error, RequestIdReused):
        return answer(request, started, Status.conflict, error=info)
    if isinstance(error, ReplyToRefused):
        outcome = answer(request, started, Status.forbidden, error=info)
        outcome.dead_letter, outcome.reply = True, False
        return outcome
    if isinstance(error, Forbidden):
        return answer(request, started, Status.forbidden, error=info)
    outcome = answer(request, started, Status.failed, error=info)
    outcome.dead_letter = True
    return outcome


def call_failed(request: AnyRequest, started: float, error: ProviderError, model: str) -> Outcome:
    """The ``failed`` answer for a provider call to ``model`` (the first of its chain) that gave
    up: with the last model tried, how many calls were made and whether that was a fallback."""
    outcome = refused(request, started, error)
    outcome.result.model, outcome.result.attempts = error.model or model, error.attempts
    outcome.result.fallback_used = error.model not in (None, model)
    return outcome
