"""The composition root: the only place collaborators are built, wired and closed.

``running_worker`` builds a worker (the LLM, Redis clients, the state stores, the pipeline, the
bus, the consumer, the HTTP endpoint), starts it, and closes everything in reverse order through
one ``AsyncExitStack``; ``serve`` runs one until SIGTERM. ``ledger_tool`` builds what the CLI's
budget tool needs from the same settings without importing litellm (the LLM is imported only
where a worker is built).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
import structlog

from worker import connections
from worker.boundary.identity import Callers
from worker.bus import Bus
from worker.consumer import Worker
from worker.embeddings import EmbeddingPipeline
from worker.observe.http import ObserveServer
from worker.observe.metrics import Metrics
from worker.pipeline import SETTLE_TIMEOUT_S, Pipeline, PipelineLimits
from worker.secrets import Redactor
from worker.settings import Settings, known_secrets
from worker.state.cache import CachedEmbedding, ResponseCache
from worker.state.flight import Heartbeat, SingleFlight
from worker.state.ledger import BudgetLedger
from worker.state.memory import MemoryGuard, Watermarks
from worker.state.ratelimit import RateLimits
from worker.state.redis import check_version
from worker.state.results import ResultStore, read_stored_embedding, result_key
from worker.throttle import Throttle

if TYPE_CHECKING:
    from worker.boundary.fetch import ImageFetcher
    from worker.llm import LLM

log = structlog.get_logger("worker.app")

EXIT_CONSUMER_LOST = 1
METRICS_REDIS_CONNECTIONS = 2


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def build_ledger(
    settings: Settings, redis: aioredis.Redis, memory: MemoryGuard | None = None
) -> BudgetLedger:
    """The budget ledger of ``settings``, on ``redis``; answers are stored beside each charge."""
    prefix = settings.redis.key_prefix
    return BudgetLedger(
        redis,
        prefix,
        settings.llm.budget,
        # a reservation lives through the call and then through the settle's retries
        reservation_ttl_s=settings.llm.deadline_s + SETTLE_TIMEOUT_S,
        result_key=functools.partial(result_key, prefix),
        memory=memory,
        settle_wait=(settings.redis.settle_wait_replicas, settings.redis.settle_wait_timeout_ms),
    )


def build_memory_guard(settings: Settings, redis: aioredis.Redis) -> MemoryGuard:
    r = settings.redis
    return MemoryGuard(
        redis,
        marks=Watermarks(
            refuse_at=r.memory_refuse_at, resume_at=r.memory_resume_at, cache_stop_at=r.cache_stop_at
        ),
    )


def build_pipeline(
    settings: Settings,
    llm: LLM,
    redis: aioredis.Redis,
    cache_redis: aioredis.Redis,
    worker_id: str,
    memory: MemoryGuard | None = None,
    images: ImageFetcher | None = None,
) -> Pipeline:
    """Wire the pipeline's collaborators: result store, cache, ledger (and the image fetcher,
    entered by the caller, when ``llm.remote_images.hosts`` lists any)."""
    prefix = settings.redis.key_prefix
    results = ResultStore(SingleFlight(redis, prefix, worker_id), prefix)
    # A cache on the ledger's own Redis stops storing before the ledger needs the room; one on a
    # Redis of its own (cache_url, allkeys-lru) evicts instead.
    shares_memory = memory is not None and cache_redis is redis
    cache = ResponseCache(
        SingleFlight(cache_redis, prefix, worker_id),
        prefix,
        default_ttl_s=settings.llm.cache_ttl,
        namespace=settings.llm.cache_namespace,
        may_store=(lambda: memory.cache_may_store) if shares_memory and memory else (lambda: True),
    )
    limits = PipelineLimits(
        deadline_s=settings.llm.deadline_s,
        result_ttl_s=settings.redis.result_ttl_s,
        max_body_bytes=settings.bus.max_body_bytes,
        settle_timeout_s=SETTLE_TIMEOUT_S,
    )
    callers = Callers(settings.callers)
    ledger = build_ledger(settings, redis, memory)
    return Pipeline(llm, ledger, cache, results, limits, callers, images)


def build_embedding_pipeline(pipeline: Pipeline) -> EmbeddingPipeline:
    """The embedding requests' pipeline: the chat pipeline's ledger, limits and identity, and a cache
    and a result store on the same Redis and key prefix that read embedding answers."""
    chat_cache, chat_results = pipeline.cache, pipeline.results
    cache = ResponseCache(
        chat_cache.flight,
        chat_cache.prefix,
        default_ttl_s=chat_cache.default_ttl_s,
        namespace=chat_cache.namespace,
        may_store=chat_cache.may_store,
        answer_type=CachedEmbedding,
    )
    results = ResultStore(chat_results.flight, chat_results.prefix, decode=read_stored_embedding)
    return EmbeddingPipeline(pipeline.llm, pipeline.ledger, cache, results, pipeline.limits, pipeline.callers)


@contextlib.asynccontextmanager
async def ledger_tool(settings: Settings) -> AsyncIterator[BudgetLedger]:
    """The ledger for an operator's tool (``budget show``), closed on exit."""
    redis = connections.redis(settings)
    try:
        yield build_ledger(settings, redis)
    finally:
        await redis.aclose()


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings,
    *,
    worker_id: str | None = None,
    freeze_heap: bool = False,
    image_fetcher: ImageFetcher | None = None,
) -> AsyncIterator[Worker]:
    """Build, connect and start a worker; on exit stop consuming, drain, and close in reverse order.

    ``image_fetcher`` replaces the one built from ``llm.remote_images`` (tests give theirs a
    resolver that maps a listed name to a local server); it is entered and closed here.

    ``freeze_heap`` (for the process that runs only this worker): once built, move every object
    alive to the garbage collector's permanent generation. litellm's import leaves ~300,000 of
    them, which each full collection walked again: measured with a 64-in-flight load, full
    collections went from 92 to 58 ms each and worker CPU per request fell 5-8 % (bench/).
    """
    from worker import llm_setup
    from worker.llm import LLM  # litellm's import (~2 s) is paid only where a worker is built

    worker_id = worker_id or new_worker_id()
    started = time.monotonic()
    metrics = Metrics(agents={*settings.llm.agent_models, *settings.llm.budget.max_cost_per_agent_day})
    async with contextlib.AsyncExitStack() as stack:
        http = ObserveServer(metrics)
        http_port = await http.start(settings.observe.host, settings.observe.port)
        stack.push_async_callback(http.stop)
        redis = connections.redis(settings)
        stack.push_async_callback(redis.aclose)
        await check_version(redis)
        cache_redis = connections.cache_redis(settings, redis)
        if cache_redis is not redis:
            stack.push_async_callback(cache_redis.aclose)
        heartbeat = Heartbeat(
            [redis] if cache_redis is redis else [redis, cache_redis], settings.redis.key_prefix, worker_id
        )
        heartbeat.start()
        stack.push_async_callback(heartbeat.stop)
        throttle = Throttle(settings.llm, RateLimits(redis, settings.redis.key_prefix), events=metrics)
        redactor = Redactor(known_secrets(settings))
        llm_setup.install(asyncio.get_running_loop())  # litellm's per-call set-up on the loop
        llm = LLM.build(settings.llm, events=metrics, redactor=redactor, throttle=throttle)
        await llm.warm_up()
        memory = build_memory_guard(settings, redis)
        await memory.start()
        stack.push_async_callback(memory.stop)
        metrics.watch_redis_memory(memory)
        if image_fetcher is None and settings.llm.remote_images.hosts:
            from worker.boundary.fetch import ImageFetcher  # aiohttp, only where images are fetched

            image_fetcher = ImageFetcher(settings.llm.remote_images)
        if image_fetcher is not None:
            await stack.enter_async_context(image_fetcher)
        pipeline = build_pipeline(settings, llm, redis, cache_redis, worker_id, memory, image_fetcher)
        pipeline.cache.on_error = metrics.cache_error
        embeddings = build_embedding_pipeline(pipeline)
        embeddings.cache.on_error = metrics.cache_error
        bus = Bus(settings.bus, name=f"llm-worker:{worker_id}")
        await bus.connect()
        stack.push_async_callback(bus.close)
        worker = Worker(
            settings,
            bus=bus,
            pipeline=pipeline,
            worker_id=worker_id,
            metrics=metrics,
            redactor=redactor,
            embeddings=embeddings,
        )
        worker.http_port = http_port
        metrics.in_flight.set_function(lambda: len(worker.in_flight))
        http.ready = lambda: {
            "connected": bus.connected,
            "consuming": bus.consuming,
            "redis_memory_ok": not memory.full,
        }
        # /metrics reads the ledger on a pool of its own: a scrape storm cannot take a connection
        # a request needs (and reads at most every LEDGER_READ_INTERVAL_S anyway).
        scrape_redis = connections.redis(settings, max_connections=METRICS_REDIS_CONNECTIONS)
        stack.push_async_callback(scrape_redis.aclose)
        scrape_ledger = build_ledger(settings, scrape_redis)
        http.before_scrape = lambda: metrics.read_ledger(scrape_ledger)
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
            broker=connections.describe_brokers(settings.bus),
            redis=connections.describe_redis(settings.redis),
            models=sorted(settings.llm.model_names),
            event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
            http=f"http://{settings.observe.host}:{http_port}/metrics",
            http_port=http_port,
            startup_s=round(time.monotonic() - started, 3),
            frozen_objects=gc.get_freeze_count(),
            identity="enforced" if pipeline.callers.enforced else "NOT ENFORCED (development)",
        )
        pipeline.callers.announce()
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
