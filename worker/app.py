"""The worker's lifespan: build everything once, wire it, consume, drain on SIGTERM, close.

Only this module constructs collaborators; everything else receives them. Resources are closed
in reverse order by one ``AsyncExitStack``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
import structlog
from aio_pika.abc import AbstractIncomingMessage
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker import tracing
from worker.bus import PUBLISH_TIMEOUT_S, Bus
from worker.cache import ResponseCache
from worker.dlq import peek_request
from worker.flight import Heartbeat, SingleFlight
from worker.ledger import BudgetLedger
from worker.llm import LLM
from worker.observe import Metrics, ObserveServer, payload_fields
from worker.pipeline import Delivery, Outcome, Pipeline, PipelineLimits
from worker.results import ResultStore
from worker.settings import Settings, redact_url

log = structlog.get_logger("worker.app")

# After the drain deadline, cancelled calls get this long to release their reservations.
CANCEL_GRACE_S = 5.0
EXIT_CONSUMER_LOST = 1


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def make_redis(settings: Settings, url: str | None = None) -> aioredis.Redis:
    """A pooled client that rides out a blip (two quick retries) and then fails fast.

    Retrying is safe because every write the worker makes is idempotent: ledger steps are keyed by
    reservation, flight claims by a token of their own.
    """
    return aioredis.Redis.from_url(
        url or settings.redis.url.get_secret_value(),
        socket_timeout=settings.redis.socket_timeout_s,
        socket_connect_timeout=settings.redis.connect_timeout_s,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        max_connections=max(64, settings.bus.prefetch * 2),
    )


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
    ):
        self.settings, self.bus, self.pipeline, self.worker_id = settings, bus, pipeline, worker_id
        self.metrics = metrics or Metrics()
        self.in_flight: set[asyncio.Task[Any]] = set()  # running the pipeline
        self.finishing: set[asyncio.Future[None]] = set()  # publishing, dead-lettering, acking
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
        # Reply, dead-letter and ack must all happen or none: shield them from cancellation.
        finish = asyncio.ensure_future(self._finish(message, outcome))
        self.finishing.add(finish)
        finish.add_done_callback(self.finishing.discard)
        await asyncio.shield(finish)

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
        )
        try:
            outcome = await self.pipeline.handle(delivery)
        except Exception as exc:  # noqa: BLE001 - any bug: logged with its traceback in _crashed
            await self._crashed(message, exc)
            return None
        self.metrics.observe(outcome)
        return outcome

    async def _crashed(self, message: AbstractIncomingMessage, exc: Exception) -> None:
        """A bug or an unforeseen error: requeue (it may be transient) until the last delivery the
        queue allows, then dead-letter it with the exception as the reason. A message that kills
        the whole process never gets here: the broker dead-letters it (``delivery_limit``)."""
        count = _delivery_count(message)
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
                    "message": f"{type(exc).__name__}: {exc}"[:500],
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
            delivered = await self.bus.reply(
                result,
                reply_to=message.reply_to,
                correlation_id=message.correlation_id,
                headers={"x-worker-id": self.worker_id, **tracing.reply_headers(result.trace_id)},
            )
            if outcome.dead_letter:
                await self.bus.dead_letter(message, self._reason(outcome, message))
                self.metrics.dead_lettered.labels(outcome.reason or "unknown").inc()
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
            duplicate=bool(outcome.extra.get("duplicate")),
            budget_scope=outcome.extra.get("scope"),
            error=result.error.type if result.error else None,
            **payload_fields(message.body, result, enabled=self.settings.observe.log_prompts_and_responses),
        )

    def _reason(self, outcome: Outcome, message: AbstractIncomingMessage) -> dict[str, Any]:
        error = outcome.result.error
        return {
            "reason": error.type if error else "unknown",
            "message": error.message[:500] if error else None,
            "retryable": error.retryable if error else None,
            "attempts": outcome.result.attempts,
            "at": datetime.now(UTC).isoformat(),
            "worker": self.worker_id,
            "agent": outcome.result.agent,
            "request-id": outcome.result.request_id,
            "trace-id": outcome.result.trace_id,
            "delivery-count": (message.headers or {}).get("x-delivery-count"),
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


def _delivery_count(message: AbstractIncomingMessage) -> int:
    """Earlier failed deliveries of ``message`` (quorum queues' ``x-delivery-count``; 0 if absent)."""
    value = (message.headers or {}).get("x-delivery-count")
    return value if isinstance(value, int) else 0


def build_pipeline(
    settings: Settings, llm: LLM, redis: aioredis.Redis, cache_redis: aioredis.Redis, worker_id: str
) -> Pipeline:
    """Wire the pipeline's collaborators: result store, cache, ledger."""
    prefix = settings.redis.key_prefix
    results = ResultStore(SingleFlight(redis, prefix, worker_id), prefix)
    cache = ResponseCache(
        SingleFlight(cache_redis, prefix, worker_id),
        prefix,
        default_ttl_s=settings.llm.cache_ttl,
        namespace=settings.llm.cache_namespace,
    )
    limits = PipelineLimits(
        deadline_s=settings.llm.deadline_s,
        result_ttl_s=settings.redis.result_ttl_s,
        max_body_bytes=settings.bus.max_body_bytes,
    )
    ledger = BudgetLedger(
        redis,
        prefix,
        settings.llm.budget,
        # a reservation lives through the call and then through the settle's retries
        reservation_ttl_s=settings.llm.deadline_s + limits.settle_timeout_s,
        result_key=results.key,
    )
    return Pipeline(llm, ledger, cache, results, limits)


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings, *, worker_id: str | None = None, freeze_heap: bool = False
) -> AsyncIterator[Worker]:
    """Build, connect and start a worker; on exit stop consuming, drain, and close in reverse order.

    ``freeze_heap`` (for the process that runs only this worker): once built, move every object
    alive to the garbage collector's permanent generation. litellm's import leaves ~300,000 of
    them, which each full collection walked again: measured with a 64-in-flight load, full
    collections went from 92 to 58 ms each and worker CPU per request fell 5-8 % (bench/).
    """
    worker_id = worker_id or new_worker_id()
    started = time.monotonic()
    metrics = Metrics(agents={*settings.llm.agent_models, *settings.llm.budget.max_cost_per_agent_day})
    llm = LLM.build(settings.llm, events=metrics)
    await llm.warm_up()
    async with contextlib.AsyncExitStack() as stack:
        http = ObserveServer(metrics)
        http_port = await http.start(settings.observe.host, settings.observe.port)
        stack.push_async_callback(http.stop)
        redis = make_redis(settings)
        stack.push_async_callback(redis.aclose)
        prefix = settings.redis.key_prefix
        cache_redis = redis
        if settings.redis.cache_url is not None:
            cache_redis = make_redis(settings, settings.redis.cache_url.get_secret_value())
            stack.push_async_callback(cache_redis.aclose)
        heartbeat = Heartbeat([redis] if cache_redis is redis else [redis, cache_redis], prefix, worker_id)
        heartbeat.start()
        stack.push_async_callback(heartbeat.stop)
        pipeline = build_pipeline(settings, llm, redis, cache_redis, worker_id)
        bus = Bus(settings.bus, name=f"llm-worker:{worker_id}")
        await bus.connect()
        stack.push_async_callback(bus.close)
        worker = Worker(settings, bus=bus, pipeline=pipeline, worker_id=worker_id, metrics=metrics)
        worker.http_port = http_port
        metrics.in_flight.set_function(lambda: len(worker.in_flight))
        http.ready = lambda: {"connected": bus.connected, "consuming": bus.consuming}
        http.before_scrape = lambda: metrics.read_ledger(pipeline.ledger)
        if freeze_heap:
            gc.collect()
            gc.freeze()
        await bus.start_consuming(worker.on_message)
        log.info(
            "worker.ready",
            worker_id=worker_id,
            profile="OFFLINE (litellm mock responses, no provider is called)"
            if settings.offline
            else "production",
            config=str(settings.config_dir),
            queue=settings.bus.request_queue,
            prefetch=settings.bus.prefetch,
            broker=redact_url(settings.bus.url.get_secret_value()),
            redis=redact_url(settings.redis.url.get_secret_value()),
            models=sorted(settings.llm.model_names),
            http=f"http://{settings.observe.host}:{http_port}/metrics",
            http_port=http_port,
            startup_s=round(time.monotonic() - started, 3),
            frozen_objects=gc.get_freeze_count(),
        )
        try:
            yield worker
        finally:
            worker.begin_shutdown()
            await bus.stop_consuming()
            drained = await worker.drain(settings.bus.drain_timeout_s)
            log.info("worker.stopped", worker_id=worker_id, handled=worker.handled, drained=drained)


async def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT, then drain and exit 0; a second signal exits at once (130; the
    broker redelivers). Exits 1 when the consumer is lost for good (:meth:`Bus.watch_consumer`)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("worker.killed", signal=signal.Signals(signum).name)
            os._exit(130)
        log.info("worker.stopping", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    async with running_worker(settings, freeze_heap=True) as worker:
        waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(worker.bus.consumer_lost.wait())}
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for waiter in pending:
            waiter.cancel()
    return EXIT_CONSUMER_LOST if worker.bus.consumer_lost.is_set() and not stop.is_set() else 0
