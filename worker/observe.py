"""Observability: structured logs, Prometheus metrics, and the health endpoint.

- **Logs** (:func:`configure_logging`, called once by the CLI): structlog, JSON lines when not on
  a terminal, key=value otherwise; the standard library's loggers (aio-pika, aiohttp) go through
  the same chain. Every line passes through :class:`SecretScrubber`, which removes the configured
  secrets by value (API keys, URL passwords) and anything that looks like a credential. Prompts
  and answers are logged only with ``observe.log_prompts_and_responses``.
- **Metrics** (:class:`Metrics`): one ``CollectorRegistry`` per worker, not the process-global
  one, so several workers in one process (the tests) do not collide. Everything about a request
  is counted from its :class:`~worker.pipeline.Outcome` in :meth:`Metrics.observe`; retries and
  fallbacks, which the outcome does not itemise, are reported by ``llm`` as they happen.
- **HTTP** (:class:`ObserveServer`): ``GET /metrics``, ``/livez`` and ``/readyz`` on one port.

Trace propagation lives in :mod:`worker.tracing` (the client needs it without these imports).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from redis.exceptions import RedisError

from worker.errors import ConfigError, LedgerUnavailable, scrub
from worker.messages import LLMResult, Status
from worker.settings import Settings, redact_url, resolve_secrets

if TYPE_CHECKING:
    from worker.ledger import BudgetLedger
    from worker.pipeline import Outcome

log = structlog.get_logger("worker.observe")

# -- logs --------------------------------------------------------------------------------------

_SECRET_PARAM = re.compile(r"key|token|secret|password|credential", re.IGNORECASE)
_MIN_SECRET_CHARS = 8  # shorter values would redact ordinary words


def known_secrets(settings: Settings, environ: Mapping[str, str] = os.environ) -> list[str]:
    """The secret values this worker holds: deployments' keys and tokens, URL passwords."""
    values: list[str] = []
    for deployment in settings.llm.models:
        params = resolve_secrets(deployment.litellm_params, environ)
        values += [v for k, v in params.items() if isinstance(v, str) and _SECRET_PARAM.search(k)]
    for url in (settings.bus.url, settings.redis.url):
        password = urlsplit(url.get_secret_value()).password
        values += [password] if password else []
    return values


class SecretScrubber:
    """A structlog processor: no credential reaches a log line, however deeply it is nested."""

    def __init__(self, secrets: Iterable[str] = ()):
        self.secrets = sorted({s for s in secrets if len(s) >= _MIN_SECRET_CHARS}, key=len, reverse=True)

    def text(self, value: str, limit: int = 2000) -> str:
        for secret in self.secrets:
            value = value.replace(secret, "[redacted]")
        return scrub(redact_url(value), limit=limit)

    def clean(self, value: Any, limit: int = 2000) -> Any:
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, Mapping):
            return {str(k): self.clean(v, limit) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.clean(v, limit) for v in value]
        return self.text(value if isinstance(value, str) else str(value), limit)

    def __call__(self, _: Any, __: str, event: Any) -> Any:
        for key, value in event.items():
            event[key] = self.clean(value, 20_000 if key == "exception" else 2000)
        return event


_HANDLER_NAME = "llm-worker"


def configure_logging(*, json: bool | None = None, level: str = "info", secrets: Iterable[str] = ()) -> None:
    """Set up logging for the process (once, in ``main``): structlog's and the standard library's.

    JSON lines when not on a terminal (or when ``json`` says so), coloured key=value otherwise.
    ``secrets`` are redacted by value from every line (see :func:`known_secrets`).
    """
    as_json = (not sys.stderr.isatty()) if json is None else json
    renderer: Any = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    scrubber = SecretScrubber(secrets)
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.format_exc_info,  # a traceback becomes text, so it is scrubbed too
            scrubber,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries log through the standard library (aio-pika's reconnect warnings, aiohttp's errors):
    # same format, same scrubbing, warnings and up.
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                timestamper,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                scrubber,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if h.get_name() != _HANDLER_NAME] + [handler]
    root.setLevel(logging.WARNING)


def payload_fields(body: bytes, result: LLMResult, *, enabled: bool) -> dict[str, Any]:
    """The prompt and the answer for ``request.done``; nothing unless logging them is ``enabled``."""
    if not enabled:
        return {}
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    return {"prompt": data.get("messages") if isinstance(data, dict) else None, "response": result.content}


# -- metrics -----------------------------------------------------------------------------------

# LLM calls take from tens of milliseconds (cache hits) to minutes (long generations).
LATENCY_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class Metrics:
    """The worker's Prometheus metrics. Label values are bounded: an agent that is not configured
    is counted as ``other``, so a caller inventing agent names cannot grow the series forever."""

    def __init__(self, agents: Iterable[str] = ()):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.agents = frozenset(agents)
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
        # The ledger is shared by all replicas: each one reports the same figures (aggregate with max).
        today = "today, all replicas (read from the ledger at each scrape)"
        self.budget_spent = Gauge("llm_worker_budget_spent_usd", f"Spent {today}.", scope, registry=r)
        self.budget_reserved = Gauge(
            "llm_worker_budget_reserved_usd", f"Reserved {today}.", scope, registry=r
        )
        self.budget_limit = Gauge("llm_worker_budget_limit_usd", "The configured limit.", scope, registry=r)
        self.ledger_read_errors = Counter(
            "llm_worker_ledger_read_errors", "Scrapes that could not read the ledger.", registry=r
        )

    def _agent(self, agent: str | None) -> str:
        if agent is None:
            return "none"
        return agent if agent in self.agents else "other"

    def observe(self, outcome: Outcome) -> None:
        """Count one answered request: the single place where outcomes become metrics."""
        result = outcome.result
        agent = self._agent(result.agent)
        if outcome.extra.get("duplicate"):
            self.duplicates.labels(agent).inc()
            return
        model = result.model or "none"
        self.requests.labels(agent, model, result.status.value).inc()
        self.latency.labels(agent, model).observe(result.latency_ms / 1000)
        if outcome.provider_latency_ms > 0:
            self.provider_latency.labels(model).observe(outcome.provider_latency_ms / 1000)
        cache = "hit" if result.cached else outcome.extra.get("cache")
        if cache is not None:
            self.cache.labels(agent, cache).inc()
        if result.status is Status.budget_exceeded:
            scope = str(outcome.extra.get("scope") or "unknown").split(":", 1)[0]  # task, agent, day
            self.budget_rejections.labels(agent, scope).inc()
        if not result.cached and (result.tokens.total or result.cost_usd):
            self.tokens.labels(agent, model, "prompt").inc(result.tokens.prompt)
            self.tokens.labels(agent, model, "completion").inc(result.tokens.completion)
            self.cost.labels(agent, model).inc(result.cost_usd)

    # LLMEvents (worker.llm): called as retries and fallbacks happen.
    def retry(self, model: str, error: str) -> None:
        self.retries.labels(model, error).inc()

    def fallback(self, from_model: str, to_model: str, error: str) -> None:
        self.fallbacks.labels(from_model, to_model, error).inc()

    async def read_ledger(self, ledger: BudgetLedger, timeout_s: float = 2.0) -> None:
        """Refresh the budget gauges from Redis (before a scrape); a failure keeps the last values."""
        day = ledger.today()
        scopes = [("day", "", ledger.day_scope(day))]
        scopes += [
            ("agent", a, ledger.agent_scope(a, day)) for a in sorted(ledger.budget.max_cost_per_agent_day)
        ]
        try:
            async with asyncio.timeout(timeout_s):
                states = await asyncio.gather(*(ledger.state(scope) for _, _, scope in scopes))
        except (LedgerUnavailable, RedisError, TimeoutError) as exc:
            self.ledger_read_errors.inc()
            log.warning("metrics.ledger_unreadable", error=f"{type(exc).__name__}: {exc}")
            return
        for (kind, agent, _), state in zip(scopes, states, strict=True):
            self.budget_spent.labels(kind, agent).set(state.spent_usd)
            self.budget_reserved.labels(kind, agent).set(state.reserved_usd)
            if state.limit_usd is not None:
                self.budget_limit.labels(kind, agent).set(state.limit_usd)


# -- HTTP: /metrics, /livez, /readyz -----------------------------------------------------------


def _not_yet() -> dict[str, bool]:
    return {"started": False}


class ObserveServer:
    """``/metrics`` (Prometheus), ``/livez`` and ``/readyz`` (Kubernetes probes) on one port.

    Liveness says the event loop answers; it does not depend on the broker, so a broker outage
    does not get the pod restarted. Readiness is ``ready()``: every check must be true (the
    worker sets it to "connected to the broker and consuming").
    """

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.ready: Callable[[], Mapping[str, bool]] = _not_yet
        self.before_scrape: Callable[[], Awaitable[None]] | None = None
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port); returns the port."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ConfigError(
                "observe.yaml",
                "observe.port",
                f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose a free port "
                "(or 0 for any), e.g. with OBSERVE_PORT",
            ) from None
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.before_scrape is not None:
            await self.before_scrape()
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(self.metrics.registry), headers={"Content-Type": content_type})

    async def _livez(self, _: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def _readyz(self, _: web.Request) -> web.Response:
        checks = dict(self.ready())
        ready = bool(checks) and all(checks.values())
        return web.json_response({"ready": ready, **checks}, status=200 if ready else 503)
