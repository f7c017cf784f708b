"""The consumer: one message's lifecycle, from delivery to ack.

:class:`Worker` hands each delivery to the pipeline in a task of its own, then replies,
dead-letters and acks, all three or none; a crash is requeued until the queue's last allowed
delivery, then dead-lettered. Shutdown drains what is in flight. It builds nothing: ``app``
gives it the bus, the pipeline and the metrics.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from aio_pika.abc import AbstractIncomingMessage

from worker import tracing
from worker.boundary.identity import REPLAY_CALLER
from worker.boundary.parse import peek_request
from worker.bus import PUBLISH_TIMEOUT_S, Bus
from worker.chunks import ChunkStream
from worker.messages import EMBEDDING_REQUEST_TYPE, RESULT_TYPE, STREAM_RESULT_TYPE, LLMResult, Status
from worker.observe.logs import payload_fields
from worker.observe.metrics import Metrics
from worker.outcome import Delivery, Outcome
from worker.pipeline import Pipeline
from worker.secrets import Redactor
from worker.settings import Settings

log = structlog.get_logger("worker.consumer")

# After the drain deadline, cancelled calls get this long to release their reservations.
CANCEL_GRACE_S = 5.0


class Worker:
    """Consumes requests, runs each through the pipeline, replies, dead-letters, acks.

    Shutdown (``begin_shutdown`` then ``drain``): deliveries that arrive afterwards go back to the
    queue unstarted; calls in flight get until the drain deadline, then are cancelled, which
    releases their budget reservation and requeues their message. Replies being published when
    the deadline passes are allowed to finish (their publish has its own timeout).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        bus: Bus,
        pipeline: Pipeline,
        worker_id: str,
        metrics: Metrics | None = None,
        redactor: Redactor | None = None,
        embeddings: Pipeline | None = None,
    ):
        """``redactor``: the secrets a crash's text may not carry into a dead-letter header;
        ``embeddings``: the pipeline of embedding requests (AMQP type ``EmbeddingRequest.v1``)."""
        self.settings, self.bus, self.pipeline, self.worker_id = settings, bus, pipeline, worker_id
        self.embeddings = embeddings
        self.redactor = redactor or Redactor()
        self.metrics = metrics or Metrics()
        self.in_flight: set[asyncio.Task[Any]] = set()  # running the pipeline
        self.finishing: set[asyncio.Future[Any]] = set()  # publishing, dead-lettering, acking
        self.stopping = False
        self.handled = 0
        self.http_port: int | None = None  # of /metrics, /livez, /readyz

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        if self.stopping:  # delivered after the stop: not started, so back to the queue
            await self.bus.give_back(message, reason="shutting down")
            return
        # A task of our own, shielded from the consumer's: aiormq cancels its consumer tasks when
        # the channel closes (a dropped connection, a broker restart), which would throw away a
        # paid LLM call in flight. Finished anyway, its answer is stored, and the redelivery after
        # the reconnect is answered from the store without a second call.
        work = asyncio.ensure_future(self._process(message))
        self.in_flight.add(work)  # now, so that a drain starting before its first step waits for it
        await asyncio.shield(work)

    async def _process(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        try:
            outcome = await self._outcome(message)
        except asyncio.CancelledError:
            # Cancelled by the drain deadline: the pipeline has released the reservation;
            # requeue now so another worker answers it (idempotency makes that safe).
            await self.bus.give_back(message, reason="drain deadline")
            raise
        finally:
            self.in_flight.discard(task)
        if outcome is None:
            return
        # Reply, dead-letter and ack must all happen or none. Out of in_flight, this task is one
        # the drain waits for but never cancels (on_message's shield keeps aiormq's cancel away):
        # no task of their own needed (issue #21).
        assert task is not None
        self.finishing.add(task)
        try:
            await self._finish(message, outcome)
        finally:
            self.finishing.discard(task)

    async def _outcome(self, message: AbstractIncomingMessage) -> Outcome | None:
        # This task's trace context and log context (the pipeline binds the request's ids).
        span = tracing.receive(message.headers)
        structlog.contextvars.clear_contextvars()
        if span.incoming is not None:
            structlog.contextvars.bind_contextvars(trace_id=span.incoming.trace_id)
        delivery = Delivery(
            body=message.body,
            correlation_id=message.correlation_id,
            message_id=message.message_id,
            redelivered=bool(message.redelivered),
            trace_parent=span.incoming,
            batch=message.routing_key == self.settings.bus.batch_queue_name,
            type=message.type,
            user_id=message.user_id,
            replay_caller=(message.headers or {}).get(REPLAY_CALLER),
            reply_to=message.reply_to,
            open_stream=self._stream_opener(message),
        )
        pipeline = self.pipeline
        if delivery.type == EMBEDDING_REQUEST_TYPE and self.embeddings is not None:
            pipeline = self.embeddings
        try:
            outcome = await pipeline.handle(delivery)
        except Exception as exc:  # noqa: BLE001 - any bug: logged with its traceback in _crashed
            await self._crashed(message, exc)
            return None
        self.metrics.observe(outcome)
        return outcome

    def _stream_opener(self, message: AbstractIncomingMessage) -> Callable[[str], ChunkStream] | None:
        """How a streamed request's chunks reach its ``reply_to`` (None: it has none)."""
        reply_to = message.reply_to
        if reply_to is None:
            return None
        publish = functools.partial(
            self.bus.chunk,
            reply_to=reply_to,
            correlation_id=message.correlation_id,
            headers={"x-worker-id": self.worker_id},
        )
        interval_s = self.settings.bus.stream_interval_ms / 1000
        return lambda request_id: ChunkStream(request_id, publish, interval_s=interval_s)

    async def _end_stream(self, outcome: Outcome) -> str:
        """Send a streamed answer's last chunks (a whole answer from the cache or the result store
        as one) and put their number in the result; the AMQP type of the result."""
        chunks, result = outcome.chunks, outcome.result
        if chunks is None or not isinstance(result, LLMResult):  # embeddings do not stream
            return RESULT_TYPE
        if chunks.sent == 0 and result.status is Status.ok:
            chunks.add_whole(result)
        result.chunks = await chunks.close(PUBLISH_TIMEOUT_S)
        self.metrics.streamed(result.model, result.chunks, chunks.first_chunk_s, chunks.first_chunk_lag_s)
        return STREAM_RESULT_TYPE

    async def _crashed(self, message: AbstractIncomingMessage, exc: Exception) -> None:
        """A bug or an unforeseen error: requeue (it may be transient) until the last delivery the
        queue allows, then dead-letter it with the exception as the reason. A message that kills
        the whole process never gets here: the broker dead-letters it (``delivery_limit``)."""
        count = delivery_count(message)
        limit = self.settings.bus.delivery_limit
        log.exception(
            "request.crashed", message_id=message.message_id, delivery_count=count, delivery_limit=limit
        )
        try:
            if count < limit:
                await message.reject(requeue=True)
                return
            peek = peek_request(message.body)
            await self.bus.dead_letter(
                message,
                {
                    "reason": "WorkerCrashed",
                    "message": crash_message(exc, self.redactor),
                    "retryable": True,
                    "attempts": count + 1,
                    "at": datetime.now(UTC).isoformat(),
                    "worker": self.worker_id,
                    "agent": peek.agent,
                    "request-id": peek.request_id or message.correlation_id,
                    "delivery-count": count,
                },
            )
            await message.ack()
        except Exception as broker_exc:  # noqa: BLE001 - broker trouble: it redelivers the message
            log.warning("request.not_acked", error=f"{type(broker_exc).__name__}: {broker_exc}")
            await self.bus.give_back(message, reason="crash handling failed")

    async def _finish(self, message: AbstractIncomingMessage, outcome: Outcome) -> None:
        result = outcome.result
        try:
            delivered = "withheld"  # reply_to is not the caller's (ReplyToRefused): dead-lettered only
            if outcome.reply:
                message_type = await self._end_stream(outcome)
                delivered = await self.bus.reply(
                    result,
                    reply_to=message.reply_to,
                    correlation_id=message.correlation_id,
                    headers={"x-worker-id": self.worker_id, **tracing.reply_headers(result.trace_id)},
                    message_type=message_type,
                )
            # An answer nobody received and nobody can look up is kept where an operator finds
            # it; a refused reply is never retried by requeueing (that called the provider again).
            kept = outcome.stored or outcome.duplicate  # a duplicate was answered from the store
            lost = delivered == "refused" or (delivered == "unroutable" and not kept)
            if outcome.dead_letter or lost:
                reason = self._reason(outcome, message, delivered)
                await self.bus.dead_letter(message, reason)
                self.metrics.dead_lettered.labels(reason["reason"]).inc()
            await message.ack()
        except Exception as exc:  # noqa: BLE001 - broker trouble: requeue; a redelivery is answered again
            log.warning(
                "request.not_acked", request_id=result.request_id, error=f"{type(exc).__name__}: {exc}"
            )
            await self.bus.give_back(message, reason="reply, dead letter or ack failed")
            return
        self.handled += 1
        log.info(
            "request.done",
            request_id=result.request_id,
            trace_id=result.trace_id,
            agent=result.agent,
            task_id=result.task_id,
            model=result.model,
            outcome=result.status.value,
            attempts=result.attempts,
            fallback=result.fallback_used,
            tokens=result.tokens.total,
            prompt_tokens=result.tokens.prompt,
            completion_tokens=result.tokens.completion,
            cost_usd=result.cost_usd,
            cached=result.cached,
            latency_ms=result.latency_ms,
            provider_latency_ms=round(outcome.provider_latency_ms, 3),
            reply=delivered,
            dead_lettered=outcome.dead_letter,
            duplicate=outcome.duplicate,
            chunks=getattr(result, "chunks", None),
            first_chunk_ms=_ms(outcome.chunks.first_chunk_s) if outcome.chunks is not None else None,
            budget_scope=outcome.budget_scope,
            error=result.error.type if result.error else None,
            **payload_fields(message.body, result, enabled=self.settings.observe.log_prompts_and_responses),
        )

    def _reason(self, outcome: Outcome, message: AbstractIncomingMessage, delivered: str) -> dict[str, Any]:
        result = outcome.result
        error = result.error
        reason, detail = (error.type, error.message[:500]) if error else ("unknown", None)
        if delivered == "refused":
            reason = "ReplyRefused"
            detail = (
                f"the broker refused the reply to {message.reply_to or 'the results exchange'} (a full "
                f"queue?); the answer was {result.status.value}"
                + (f" ({error.type}: {error.message[:300]})" if error else "")
                + ("; it is in the result store" if outcome.stored else "")
            )
        elif error is None and delivered == "unroutable":
            reason, detail = "ReplyUnroutable", f"no queue took the {result.status.value} answer"
        return {
            "reason": reason,
            "message": detail,
            "reply": delivered,
            "status": result.status.value,
            "retryable": error.retryable if error else None,
            "attempts": outcome.result.attempts,
            "at": datetime.now(UTC).isoformat(),
            "worker": self.worker_id,
            "agent": outcome.result.agent,
            "request-id": outcome.result.request_id,
            "trace-id": outcome.result.trace_id,
            "delivery-count": delivery_count(message),
        }

    def begin_shutdown(self) -> None:
        """From now on, deliveries go back to the queue without being started."""
        self.stopping = True

    async def drain(self, timeout_s: float) -> bool:
        """Let calls in flight finish within ``timeout_s``, then cancel the rest (their reservations
        are released, their messages requeued). True when everything finished in time."""
        self.begin_shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if self.in_flight or self.finishing:
            log.info("worker.draining", in_flight=len(self.in_flight), timeout_s=timeout_s)
        while (pending := self.in_flight | self.finishing) and loop.time() < deadline:
            await asyncio.wait(pending, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED)
        late = set(self.in_flight)
        for task in late:
            task.cancel()
        if late:
            log.warning("worker.drain_deadline", cancelled=len(late), timeout_s=timeout_s)
            await asyncio.wait(late, timeout=CANCEL_GRACE_S)
        if self.finishing:  # bounded by the publish timeout
            await asyncio.wait(set(self.finishing), timeout=PUBLISH_TIMEOUT_S + 1)
        return not late


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000, 3) if seconds is not None else None


def crash_message(exc: BaseException, redactor: Redactor) -> str:
    """One line for a dead letter: the exception's type and first line, without secrets (its
    traceback goes to the log line, where the log chain scrubs it)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return redactor.text(f"{type(exc).__name__}: {first}" if first else type(exc).__name__, limit=500)


def delivery_count(message: AbstractIncomingMessage) -> int:
    """Earlier failed deliveries of ``message``: the quorum queue's ``x-delivery-count``, read only
    on a redelivery. A first delivery carries whatever the publisher put in that header (the
    broker writes it from the first return on), and a publisher-set 99 dead-lettered a request
    at once (issue #16)."""
    if not message.redelivered:
        return 0
    value = (message.headers or {}).get("x-delivery-count")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
