"""The worker's lifespan: build everything once, wire it, consume, drain on SIGTERM, close.

Only this module constructs collaborators; everything else receives them. Resources are closed
in reverse order by one ``AsyncExitStack``.
"""

from __future__ import annotations

import asyncio
import contextlib
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

from worker import tracing
from worker.bus import Bus
from worker.cache import ResponseCache
from worker.flight import Heartbeat, SingleFlight
from worker.ledger import BudgetLedger
from worker.llm import LLM
from worker.observe import Metrics, ObserveServer, payload_fields
from worker.pipeline import Delivery, Outcome, Pipeline, PipelineLimits
from worker.results import ResultStore
from worker.settings import Settings, redact_url

log = structlog.get_logger("worker.app")


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def make_redis(settings: Settings) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        settings.redis.url.get_secret_value(),
        socket_timeout=settings.redis.socket_timeout_s,
        socket_connect_timeout=settings.redis.connect_timeout_s,
        health_check_interval=15,
        retry_on_timeout=False,
        max_connections=max(64, settings.bus.prefetch * 2),
    )


class Worker:
    """Consumes requests, runs each through the pipeline, replies, dead-letters, acks."""

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
        self.in_flight: set[asyncio.Task[Any]] = set()
        self.handled = 0
        self.http_port: int | None = None  # of /metrics, /livez, /readyz

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.in_flight.add(task)
        try:
            await self._handle(message)
        finally:
            self.in_flight.discard(task)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
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
        except Exception:
            log.exception("request.crashed", message_id=message.message_id, redelivered=message.redelivered)
            await message.reject(requeue=True)
            return
        self.metrics.observe(outcome)
        # Reply, dead-letter and ack must all happen or none: shield them from cancellation.
        await asyncio.shield(self._finish(message, outcome))

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
        except Exception as exc:  # noqa: BLE001 - broker trouble: leave unacked, the broker redelivers
            log.warning(
                "request.not_acked", request_id=result.request_id, error=f"{type(exc).__name__}: {exc}"
            )
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
            "delivery-count": (message.headers or {}).get("x-delivery-count"),
        }

    async def drain(self, timeout_s: float) -> bool:
        """Wait for calls in flight; True when all finished within ``timeout_s``."""
        if not self.in_flight:
            return True
        log.info("worker.draining", in_flight=len(self.in_flight), timeout_s=timeout_s)
        _, pending = await asyncio.wait(set(self.in_flight), timeout=timeout_s)
        return not pending


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, *, worker_id: str | None = None) -> AsyncIterator[Worker]:
    """Build, connect and start a worker; on exit stop consuming, drain, and close in reverse order."""
    worker_id = worker_id or new_worker_id()
    started = time.monotonic()
    metrics = Metrics(agents={*settings.llm.agent_models, *settings.llm.budget.max_cost_per_agent_day})
    llm = LLM.build(settings.llm, events=metrics)
    async with contextlib.AsyncExitStack() as stack:
        http = ObserveServer(metrics)
        http_port = await http.start(settings.observe.host, settings.observe.port)
        stack.push_async_callback(http.stop)
        redis = make_redis(settings)
        stack.push_async_callback(redis.aclose)
        prefix = settings.redis.key_prefix
        heartbeat = Heartbeat(redis, prefix, worker_id)
        heartbeat.start()
        stack.push_async_callback(heartbeat.stop)
        ledger = BudgetLedger(
            redis, prefix, settings.llm.budget, reservation_ttl_s=settings.llm.deadline_s + 60
        )
        cache = ResponseCache(
            redis, prefix, default_ttl_s=settings.llm.cache_ttl, namespace=settings.llm.cache_namespace
        )
        pipeline = Pipeline(
            llm,
            ledger,
            cache,
            ResultStore(redis, prefix),
            SingleFlight(redis, prefix, worker_id),
            PipelineLimits(
                deadline_s=settings.llm.deadline_s,
                result_ttl_s=settings.redis.result_ttl_s,
                max_body_bytes=settings.bus.max_body_bytes,
            ),
        )
        bus = Bus(settings.bus, name=f"llm-worker:{worker_id}")
        await bus.connect()
        stack.push_async_callback(bus.close)
        worker = Worker(settings, bus=bus, pipeline=pipeline, worker_id=worker_id, metrics=metrics)
        worker.http_port = http_port
        metrics.in_flight.set_function(lambda: len(worker.in_flight))
        http.ready = lambda: {"connected": bus.connected, "consuming": bus.consuming}
        http.before_scrape = lambda: metrics.read_ledger(ledger)
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
        )
        try:
            yield worker
        finally:
            await bus.stop_consuming()
            drained = await worker.drain(settings.bus.drain_timeout_s)
            log.info("worker.stopped", worker_id=worker_id, handled=worker.handled, drained=drained)


async def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; a second signal exits at once (the broker redelivers)."""
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
    async with running_worker(settings):
        await stop.wait()
    return 0
