"""Metrics: the worker's Prometheus series, counted from each request's typed outcome.

One ``CollectorRegistry`` per worker, not the process-global one, so several workers in one
process (the tests) do not collide. Everything about a request is counted from its
:class:`~worker.outcome.Outcome` in :meth:`Metrics.observe`; retries and fallbacks, which the
outcome does not itemise, are reported by ``llm`` as they happen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from worker.errors import LedgerUnavailable
from worker.messages import Status
from worker.outcome import Outcome
from worker.state.ledger import BudgetLedger
from worker.state.memory import MemoryGuard

log = structlog.get_logger("worker.observe")

# The budget gauges are read from the ledger at most this often, however often /metrics is
# scraped (scrapes in between show the last reading): 500 concurrent scrapes cost one read.
LEDGER_READ_INTERVAL_S = 5.0
# LLM calls take from tens of milliseconds (cache hits) to minutes (long generations).
LATENCY_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class Metrics:
    """The worker's Prometheus metrics. Label values are bounded: an agent that is not configured
    is counted as ``other``, so a caller inventing agent names cannot grow the series forever."""

    def __init__(self, agents: Iterable[str] = ()):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.agents = frozenset(agents)
        # The series each answer counts in, by metric and label values (bounded as the labels are):
        # prometheus_client's labels() takes a lock and re-checks every value per call (issue #21).
        self._series: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._ledger_lock = asyncio.Lock()
        self._ledger_read_at = -LEDGER_READ_INTERVAL_S
        agent_model, scope = ("agent", "model"), ("scope", "agent")
        buckets = LATENCY_BUCKETS_S
        # prometheus_client appends _total to counters.
        self.requests = Counter(
            "llm_worker_requests",
            "Requests served (duplicates excluded).",
            (*agent_model, "status"),
            registry=r,
        )
        self.duplicates = Counter(
            "llm_worker_duplicate_requests",
            "Requests answered again from the result store (redelivered, re-published): no call, no charge.",
            ("agent",),
            registry=r,
        )
        self.latency = Histogram(
            "llm_worker_request_duration_seconds",
            "From pickup to answer, every step included.",
            agent_model,
            buckets=buckets,
            registry=r,
        )
        self.provider_latency = Histogram(
            "llm_worker_provider_duration_seconds",
            "Time in provider calls of one answered request, all attempts (model: the one that answered).",
            ("model",),
            buckets=buckets,
            registry=r,
        )
        self.tokens = Counter(
            "llm_worker_tokens", "Tokens billed (cache hits excluded).", (*agent_model, "kind"), registry=r
        )
        self.cost = Counter(
            "llm_worker_cost_usd", "USD charged for provider answers.", agent_model, registry=r
        )
        self.cache = Counter(
            "llm_worker_cache_lookups", "Response cache hits and misses.", ("agent", "result"), registry=r
        )
        self.budget_rejections = Counter(
            "llm_worker_budget_rejections",
            "budget_exceeded answers, by the full scope (task, agent, day).",
            ("agent", "scope"),
            registry=r,
        )
        self.retries = Counter(
            "llm_worker_retries",
            "Attempts retried on the same model, by error.",
            ("model", "error"),
            registry=r,
        )
        self.fallbacks = Counter(
            "llm_worker_fallbacks",
            "Moves to the next model, by error.",
            ("from_model", "to_model", "error"),
            registry=r,
        )
        self.dead_lettered = Counter(
            "llm_worker_dead_lettered",
            "Requests sent to the dead-letter queue, by reason.",
            ("reason",),
            registry=r,
        )
        self.in_flight = Gauge("llm_worker_in_flight", "Requests being handled now.", registry=r)
        self.asyncio_tasks = Gauge(
            "llm_worker_asyncio_tasks",
            "Tasks alive in the worker's event loop (a leak shows here).",
            registry=r,
        )
        self.asyncio_tasks.set_function(_tasks_alive)
        # The ledger is shared by all replicas: each one reports the same figures (aggregate with max).
        today = f"today, all replicas (read from the ledger at most every {LEDGER_READ_INTERVAL_S:g} s)"
        self.budget_spent = Gauge("llm_worker_budget_spent_usd", f"Spent {today}.", scope, registry=r)
        self.budget_reserved = Gauge(
            "llm_worker_budget_reserved_usd", f"Reserved {today}.", scope, registry=r
        )
        self.budget_limit = Gauge("llm_worker_budget_limit_usd", "The configured limit.", scope, registry=r)
        self.redis_memory_ratio = Gauge(
            "llm_worker_redis_memory_used_ratio",
            "The ledger Redis's used_memory / maxmemory (0 without maxmemory), as last read.",
            registry=r,
        )
        self.redis_memory_full = Gauge(
            "llm_worker_redis_memory_full",
            "1 while new calls are refused for Redis memory (LedgerFull), else 0.",
            registry=r,
        )
        self.rate_limit_waiting = Gauge(
            "llm_worker_rate_limit_waiting",
            "Calls waiting for room under a provider rate limit (rpm/tpm) now.",
            registry=r,
        )
        self.rate_limit_wait = Histogram(
            "llm_worker_rate_limit_wait_seconds",
            "Time calls waited for room under a provider rate limit.",
            ("model",),
            buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120),
            registry=r,
        )
        self.rate_limit_left = Gauge(
            "llm_worker_rate_limit_remaining",
            "Room left in the last minute on a rate-limited deployment, as this replica last saw it.",
            ("deployment", "kind"),
            registry=r,
        )
        self.stream_first_chunk = Histogram(
            "llm_worker_stream_first_chunk_seconds",
            "Streamed answers: from pickup to the first chunk published (time to first chunk).",
            ("model",),
            buckets=buckets,
            registry=r,
        )
        self.stream_first_chunk_lag = Histogram(
            "llm_worker_stream_first_chunk_lag_seconds",
            "Streamed answers: from the model's first piece to its chunk published.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
            registry=r,
        )
        self.stream_chunks = Counter(
            "llm_worker_stream_chunks", "Chunk messages published for streamed answers.", registry=r
        )
        self.ledger_read_errors = Counter(
            "llm_worker_ledger_read_errors", "Scrapes that could not read the ledger.", registry=r
        )
        self.cache_errors = Counter(
            "llm_worker_cache_errors",
            "Cache operations that could not reach its Redis (the request went on without the cache).",
            ("op",),
            registry=r,
        )

    def _agent(self, agent: str | None) -> str:
        if agent is None:
            return "none"
        return agent if agent in self.agents else "other"

    def _at(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once per label set."""
        key = (id(metric), labels)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = metric.labels(*labels)
        return series

    def observe(self, outcome: Outcome) -> None:
        """Count one answered request: the single place where outcomes become metrics."""
        result = outcome.result
        agent = self._agent(result.agent)
        at = self._at
        if outcome.duplicate:
            at(self.duplicates, agent).inc()
            return
        model = result.model or "none"
        at(self.requests, agent, model, result.status.value).inc()
        at(self.latency, agent, model).observe(result.latency_ms / 1000)
        if outcome.provider_latency_ms > 0:
            at(self.provider_latency, model).observe(outcome.provider_latency_ms / 1000)
        cache = "hit" if result.cached else outcome.cache
        if cache is not None:
            at(self.cache, agent, cache).inc()
        if result.status is Status.budget_exceeded:
            scope = (outcome.budget_scope or "unknown").split(":", 1)[0]  # task, agent, day
            at(self.budget_rejections, agent, scope).inc()
        if not result.cached and (result.tokens.total or result.cost_usd):
            at(self.tokens, agent, model, "prompt").inc(result.tokens.prompt)
            at(self.tokens, agent, model, "completion").inc(result.tokens.completion)
            at(self.cost, agent, model).inc(result.cost_usd)

    def streamed(
        self, model: str | None, chunks: int, first_chunk_s: float | None, lag_s: float | None
    ) -> None:
        """Count one streamed answer: its chunks, and (when any went out) its time to first chunk
        and the part of it the worker added after the model's first piece."""
        self.stream_chunks.inc(chunks)
        if first_chunk_s is not None:
            self.stream_first_chunk.labels(model or "none").observe(first_chunk_s)
        if lag_s is not None:
            self.stream_first_chunk_lag.observe(lag_s)

    def watch_redis_memory(self, memory: MemoryGuard) -> None:
        """Report the guard's last reading at each scrape (it reads Redis on its own schedule)."""
        self.redis_memory_ratio.set_function(lambda: memory.ratio)
        self.redis_memory_full.set_function(lambda: float(memory.full))

    # ThrottleEvents (worker.throttle): waits for room under provider rate limits.
    def waiting(self, delta: int) -> None:
        self.rate_limit_waiting.inc(delta)

    def waited(self, group: str, seconds: float) -> None:
        self.rate_limit_wait.labels(group).observe(seconds)

    def left(self, deployment: str, rpm: int | None, tpm: int | None) -> None:
        for kind, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None:
                self.rate_limit_left.labels(deployment, kind).set(value)

    # LLMEvents (worker.llm): called as retries and fallbacks happen.
    def retry(self, model: str, error: str) -> None:
        self.retries.labels(model, error).inc()

    def fallback(self, from_model: str, to_model: str, error: str) -> None:
        self.fallbacks.labels(from_model, to_model, error).inc()

    def cache_error(self, op: str) -> None:
        """``ResponseCache.on_error``: a lookup, release or put that could not reach Redis."""
        self.cache_errors.labels(op).inc()

    async def read_ledger(
        self, ledger: BudgetLedger, timeout_s: float = 2.0, interval_s: float = LEDGER_READ_INTERVAL_S
    ) -> None:
        """Refresh the budget gauges from Redis (before a scrape), at most once per ``interval_s``
        (a failed read counts too, so a Redis outage is not hammered); concurrent scrapes wait for
        the one read in progress instead of starting their own. A failure keeps the last values.

        The scopes are read one after another: ``ledger`` should be on a small pool of its own
        (``app`` gives it two connections), never the pipeline's.
        """
        async with self._ledger_lock:
            if time.monotonic() - self._ledger_read_at < interval_s:
                return
            try:
                await self._read_ledger(ledger, timeout_s)
            finally:
                self._ledger_read_at = time.monotonic()

    async def _read_ledger(self, ledger: BudgetLedger, timeout_s: float) -> None:
        day = ledger.today()
        scopes = [("day", "", ledger.day_scope(day))]
        scopes += [
            ("agent", a, ledger.agent_scope(a, day)) for a in sorted(ledger.budget.max_cost_per_agent_day)
        ]
        try:
            async with asyncio.timeout(timeout_s):
                states = [await ledger.state(scope) for _, _, scope in scopes]
        except (LedgerUnavailable, TimeoutError) as exc:
            self.ledger_read_errors.inc()
            log.warning("metrics.ledger_unreadable", error=f"{type(exc).__name__}: {exc}")
            return
        for (kind, agent, _), state in zip(scopes, states, strict=True):
            self.budget_spent.labels(kind, agent).set(state.spent_usd)
            self.budget_reserved.labels(kind, agent).set(state.reserved_usd)
            if state.limit_usd is not None:
                self.budget_limit.labels(kind, agent).set(state.limit_usd)


def _tasks_alive() -> int:
    """Tasks in the running loop; 0 when the registry is read outside one (a test collecting it)."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return 0
