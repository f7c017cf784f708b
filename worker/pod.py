"""``run --processes N``: N worker processes under one parent, for all the cores of a pod (issue #21).

One worker process uses one core (asyncio and litellm's CPU run on one thread). A pod with more
cores runs N of them, as the LiteLLM proxy's ``--num_workers`` does: the parent starts each child
as ``python -m worker run`` (each a whole worker with its own connections and worker id), then

- **one HTTP endpoint for the pod**, on the configured ``observe`` port: ``/metrics`` is every
  child's series, each sample labelled ``process="<i>"`` (sum over it in PromQL), plus
  ``llm_worker_pod_processes``; ``/readyz`` is ready when every child is; ``/livez`` is live while
  every child runs. The children listen on loopback ports of their own;
- **signals forwarded**: SIGTERM or SIGINT is passed to every child, each drains what it holds
  (``bus.drain_timeout_s``), and the parent exits once all have; a second signal kills them (exit
  130, the broker redelivers their unacked work);
- **fail together**: a child that exits on its own (its consumer lost for good, a crash) stops the
  others the same way and the parent exits with the child's code, so that the orchestrator
  restarts the pod, as it would a single worker. The parent does not restart children itself.
  A parent killed outright takes its children with it: on Linux each child gets SIGTERM when its
  parent dies, and drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from worker.observe.http import ObserveServer
from worker.observe.metrics import Metrics
from worker.settings import Settings

log = structlog.get_logger("worker.pod")

CHILD_READY_TIMEOUT_S = 120.0  # litellm's import alone takes seconds on a loaded node
SCRAPE_TIMEOUT_S = 5.0
EXIT_KILLED = 130
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with(parent: int) -> Callable[[], None] | None:
    """For the child, before it runs: SIGTERM (hence a drain) when the parent dies, however it
    dies (Linux's ``PR_SET_PDEATHSIG``), so that a parent killed alone (the OOM killer, SIGKILL)
    leaves no orphan consuming unseen. Elsewhere, ``None``: children outlive a killed parent."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def arm() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the line above: nobody would tell us
            os._exit(1)

    return arm


def _exit_code(returncode: int | None) -> int:
    """A child's exit as a shell reports it: killed by signal N is 128 + N."""
    if returncode is None:
        return 1
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class Child:
    index: int
    port: int
    proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class _Relabelled(Collector):
    """The children's scraped families, merged by name, each sample labelled with its process."""

    def __init__(self, scrapes: Sequence[tuple[int, str]]):
        self.scrapes = scrapes

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for index, text in self.scrapes:
            for family in text_string_to_metric_families(text):
                into = merged.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type, family.unit)
                )
                into.samples.extend(
                    s._replace(labels={**s.labels, "process": str(index)}) for s in family.samples
                )
        yield from merged.values()


@dataclass
class Pod:
    """The parent: ``await Pod(settings, n, child_args).run()`` returns the exit code."""

    settings: Settings
    processes: int
    child_args: Sequence[str] = ()
    children: list[Child] = field(default_factory=list)
    stopping: bool = False
    _session: aiohttp.ClientSession | None = None

    async def run(self) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if stop.is_set():
                log.warning("pod.killed", signal=signal.Signals(signum).name)
                self._kill_all()
                os._exit(EXIT_KILLED)
            log.info("pod.stopping", signal=signal.Signals(signum).name)
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S))
        server: ObserveServer | None = None
        try:
            server, port = await self._listen()
            started = time.monotonic()
            await self._spawn_all()
            if not await self._all_ready(stop):
                return await self._stop_all(exit_code=1, why="a child did not become ready")
            log.info(
                "pod.ready",
                processes=self.processes,
                pids=[c.proc.pid for c in self.children if c.proc is not None],
                http=f"http://{self.settings.observe.host}:{port}/metrics",
                http_port=port,
                startup_s=round(time.monotonic() - started, 3),
            )
            exited = [asyncio.ensure_future(c.proc.wait()) for c in self.children if c.proc is not None]
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({stopped, *exited}, return_when=asyncio.FIRST_COMPLETED)
            for waiter in (stopped, *exited):  # _stop_all waits on the processes itself
                waiter.cancel()
            if stop.is_set():
                return await self._stop_all(exit_code=0, why="signal")
            first = next(c for c in self.children if not c.running)
            code = _exit_code(first.proc.returncode if first.proc is not None else None)
            log.error("pod.child_exited", process=first.index, exit_code=code)
            return await self._stop_all(exit_code=code or 1, why=f"process {first.index} exited")
        finally:
            self._kill_all()
            if server is not None:
                await server.stop()
            await self._session.close()

    # -- children ----------------------------------------------------------------------------

    async def _spawn_all(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "OBSERVE_PORT"}
        for index in range(self.processes):
            child = Child(index, free_loopback_port())
            child.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "worker",
                "--config",
                str(self.settings.config_dir),
                "run",
                *self.child_args,
                env={**env, "OBSERVE_HOST": "127.0.0.1", "OBSERVE_PORT": str(child.port)},
                preexec_fn=_die_with(os.getpid()),
            )  # stdout and stderr are the parent's: the children's log lines pass straight through
            self.children.append(child)

    async def _all_ready(self, stop: asyncio.Event) -> bool:
        deadline = time.monotonic() + CHILD_READY_TIMEOUT_S
        while time.monotonic() < deadline and not stop.is_set():
            if any(not c.running for c in self.children):
                return False
            if all(await asyncio.gather(*(self._ready(c) for c in self.children))):
                return True
            await asyncio.sleep(0.2)
        return stop.is_set()  # a signal during start-up is an orderly stop, not a failure

    async def _stop_all(self, *, exit_code: int, why: str) -> int:
        """SIGTERM every child still running and wait while each drains."""
        self.stopping = True
        for child in self.children:
            if child.running and child.proc is not None:
                child.proc.send_signal(signal.SIGTERM)
        codes = [_exit_code(await c.proc.wait()) for c in self.children if c.proc is not None]
        log.info("pod.stopped", why=why, exit_codes=codes)
        return exit_code if exit_code else max(codes, default=0)

    def _kill_all(self) -> None:
        for child in self.children:
            if child.running and child.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()

    # -- the pod's HTTP endpoint --------------------------------------------------------------

    async def _listen(self) -> tuple[ObserveServer, int]:
        """The pod's endpoint, with the worker's own guards (connection cap, header time-out)."""
        server = ObserveServer(Metrics())
        server.routes = {"/metrics": self._metrics, "/livez": self._livez, "/readyz": self._readyz}
        return server, await server.start(self.settings.observe.host, self.settings.observe.port)

    async def _get(self, child: Child, path: str) -> tuple[int, str] | None:
        assert self._session is not None
        try:
            async with self._session.get(child.url + path) as response:
                return response.status, await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def _ready(self, child: Child) -> bool:
        answer = await self._get(child, "/readyz")
        return answer is not None and answer[0] == 200

    async def _metrics(self, _: web.BaseRequest) -> web.Response:
        scraped = await asyncio.gather(*(self._get(c, "/metrics") for c in self.children))
        scrapes = [(c.index, a[1]) for c, a in zip(self.children, scraped, strict=True) if a and a[0] == 200]
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Relabelled(scrapes))
        Gauge("llm_worker_pod_processes", "Worker processes of this pod running now.", registry=registry).set(
            sum(c.running for c in self.children)
        )
        Gauge(
            "llm_worker_pod_scrape_failures",
            "Children whose /metrics did not answer this scrape (their series are missing from it).",
            registry=registry,
        ).set(len(self.children) - len(scrapes))
        return web.Response(body=generate_latest(registry), content_type="text/plain", charset="utf-8")

    async def _livez(self, _: web.BaseRequest) -> web.Response:
        live = bool(self.children) and all(c.running for c in self.children)
        return web.json_response({"live": live}, status=200 if live else 503)

    async def _readyz(self, _: web.BaseRequest) -> web.Response:
        ready = await asyncio.gather(*(self._ready(c) for c in self.children))
        checks = {f"process_{c.index}": r for c, r in zip(self.children, ready, strict=True)}
        ok = bool(checks) and all(checks.values()) and not self.stopping
        return web.json_response({"ready": ok, **checks}, status=200 if ok else 503)
