"""The HTTP endpoint: ``GET /metrics`` (Prometheus), ``/livez`` and ``/readyz`` on one port.

The port is reachable by anything on the pod's network, so it holds up against clients that
misbehave: at most ``max_connections`` at once (one more is closed as it is accepted, so idle
connections cannot exhaust the worker's file descriptors), each must send a complete request
head every ``header_timeout_s`` or be closed (a slow or silent client holds nothing), and a
request aiohttp cannot parse (an over-long request line, garbage) is answered 400 and logged as
one line, without a traceback.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client.exposition import choose_encoder

from worker.errors import ConfigError
from worker.observe.metrics import Metrics

log = structlog.get_logger("worker.observe")

MAX_CONNECTIONS = 256
HEADER_TIMEOUT_S = 5.0


def _not_yet() -> dict[str, bool]:
    return {"started": False}


class _Handler(web.RequestHandler):
    """aiohttp's connection handler, with a request it cannot parse logged as one line."""

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            log.warning(
                "http.bad_request", status=exc.code, error=f"{type(exc).__name__}: {exc.message}"[:200]
            )
        else:
            super().log_exception(*args, **kw)


class _Refuse(asyncio.Protocol):
    """What a connection past the cap gets instead of a handler: closed at once, nothing logged."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).abort()


class _GuardedServer(web.Server):
    """aiohttp's low-level server with a cap on connections and a deadline on request heads.

    aiohttp has neither (its keep-alive time-out stops at the first byte of a request), and it
    builds its handler in ``__call__`` from its own ``_loop`` and ``_kwargs``. The deadline reads
    the handler's ``_request_count`` (heads parsed) and ``_current_request`` (one being served):
    aiohttp is pinned, and tests/observe/test_http_guard.py fails if either changes meaning.
    """

    def __init__(self, handler: Any, *, max_connections: int, header_timeout_s: float, **kwargs: Any):
        super().__init__(handler, **kwargs)
        self.max_connections, self.header_timeout_s = max_connections, header_timeout_s
        self.refused = 0
        # Handlers made but not yet connected (asyncio connects them a moment later); weak, so
        # one whose connection never came is not counted for ever.
        self._starting: weakref.WeakSet[web.RequestHandler] = weakref.WeakSet()

    def __call__(self) -> Any:  # the protocol factory: a handler, or a refusal past the cap
        if len(self.connections) + len(self._starting) >= self.max_connections:
            self.refused += 1
            return _Refuse()
        handler = _Handler(self, loop=self._loop, **self._kwargs)
        self._starting.add(handler)
        return handler

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        self._starting.discard(handler)
        super().connection_made(handler, transport)
        self._arm(handler, transport, heads=0)

    def _arm(self, handler: web.RequestHandler, transport: asyncio.Transport, heads: int) -> None:
        self._loop.call_later(self.header_timeout_s, self._check, handler, transport, heads)

    def _check(self, handler: web.RequestHandler, transport: asyncio.Transport, heads: int) -> None:
        if transport.is_closing():
            return
        if handler._request_count == heads and handler._current_request is None:
            transport.abort()  # no complete request head in the time, and none being served
            return
        self._arm(handler, transport, handler._request_count)


class ObserveServer:
    """``/metrics`` (Prometheus), ``/livez`` and ``/readyz`` (Kubernetes probes) on one port.

    Liveness says the event loop answers; it does not depend on the broker, so a broker outage
    does not get the pod restarted. Readiness is ``ready()``: every check must be true (the
    worker sets it to "connected to the broker and consuming").
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        max_connections: int = MAX_CONNECTIONS,
        header_timeout_s: float = HEADER_TIMEOUT_S,
    ):
        self.metrics = metrics
        self.ready: Callable[[], Mapping[str, bool]] = _not_yet
        self.before_scrape: Callable[[], Awaitable[None]] | None = None
        self.port: int | None = None
        self.max_connections, self.header_timeout_s = max_connections, header_timeout_s
        self.server: _GuardedServer | None = None
        self._runner: web.ServerRunner | None = None
        # What each path answers; ``worker.pod`` puts the pod's own handlers here.
        self.routes: dict[str, Callable[[web.BaseRequest], Awaitable[web.Response]]] = {
            "/metrics": self._metrics,
            "/livez": self._livez,
            "/readyz": self._readyz,
        }

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port); returns the port."""
        self.server = _GuardedServer(
            self._dispatch,
            max_connections=self.max_connections,
            header_timeout_s=self.header_timeout_s,
            access_log=None,
            keepalive_timeout=self.header_timeout_s,
        )
        self._runner = web.ServerRunner(self.server, handle_signals=False)
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

    async def _dispatch(self, request: web.BaseRequest) -> web.Response:
        route = self.routes.get(request.path)
        if route is None:
            return web.Response(status=404, text="not found: /metrics, /livez, /readyz\n")
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, headers={"Allow": "GET, HEAD"})
        return await route(request)

    async def _metrics(self, request: web.BaseRequest) -> web.Response:
        if self.before_scrape is not None:
            await self.before_scrape()
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(self.metrics.registry), headers={"Content-Type": content_type})

    async def _livez(self, _: web.BaseRequest) -> web.Response:
        return web.json_response({"live": True})

    async def _readyz(self, _: web.BaseRequest) -> web.Response:
        checks = dict(self.ready())
        ready = bool(checks) and all(checks.values())
        return web.json_response({"ready": ready, **checks}, status=200 if ready else 503)
