"""The worker as a child process, exactly what the image runs: ``python -m worker run`` for
replicas, kills and signals (tests and ``bench/``), and the CLI's other commands (:func:`run_cli`).

No pytest here: ``bench/sizing.py`` and ``bench/performance.py`` start their workers with
:class:`WorkerProcess` too, outside any test run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.paths import ROOT

LineHandler = Callable[[dict[str, Any]], None]


class WorkerProcess:
    """``python -m worker --config DIR run --json-logs ARGS`` with its log read line by line.

    Until ``worker.ready`` every line is kept in :attr:`lines`; after it too unless
    ``keep_lines=False`` (a benchmark writes one line per request and must not hold them, nor
    spend its CPU parsing them when nobody asked). ``on_line`` gets each line after ready.
    """

    def __init__(
        self,
        config_dir: Path,
        *,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        keep_lines: bool = True,
        on_line: LineHandler | None = None,
        cwd: Path = ROOT,
        ready_event: str = "worker.ready",
    ):
        """``cwd``: the source tree whose ``worker`` package runs (``bench/revisions.py`` runs
        another revision's); ``ready_event``: the log line :meth:`start` waits for (a pod's is
        ``pod.ready``: its children's lines share one stream and may be torn by each other)."""
        self.config_dir, self.args, self.cwd = config_dir, args, cwd
        self.ready_event = ready_event
        self.keep_lines, self.on_line = keep_lines, on_line
        # The config folder names the services; the environment's URLs would override it.
        inherited = {k: v for k, v in os.environ.items() if k not in ("AMQP_URL", "REDIS_URL")}
        self.env = {
            **inherited,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "PYTHONUNBUFFERED": "1",
            "OBSERVE_PORT": "0",  # replicas and copies of config/ must not fight over one port
            **(env or {}),
        }
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[dict[str, Any]] = []
        self.ready_s = 0.0  # spawn to the worker.ready line, as this process saw it
        self._ready_line: dict[str, Any] | None = None
        self._spawned = 0.0
        self._reader: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self, *, timeout_s: float = 60) -> WorkerProcess:
        """Spawn it and return once it logged ``worker.ready``; kill it if it does not."""
        self._spawned = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker",
            "--config",
            str(self.config_dir),
            "run",
            "--json-logs",
            *self.args,
            cwd=self.cwd,
            env=self.env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read())
        ready = asyncio.create_task(self._ready.wait())
        exited = asyncio.create_task(self.proc.wait())
        done, _ = await asyncio.wait({ready, exited}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        exited.cancel()
        if ready not in done:
            await self.stop()  # a caller that never got the object back could not stop it
            raise RuntimeError(f"worker did not become ready; it logged: {self.lines[-5:]}")
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            if self._ready.is_set() and not self.keep_lines:
                if self.on_line is not None:  # parse only for someone who reads it
                    self._hand_on(_parse(raw))
                continue
            line = _parse(raw)
            self.lines.append(line)
            if self._ready.is_set():
                self._hand_on(line)
            elif line.get("event") == self.ready_event:
                self.ready_s = time.monotonic() - self._spawned
                self._ready_line = line
                self._ready.set()

    def _hand_on(self, line: dict[str, Any]) -> None:
        if self.on_line is not None and line.get("event") != "raw":
            self.on_line(line)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def http_port(self) -> int:
        """Where its /metrics, /livez and /readyz answer (the port it bound, from worker.ready)."""
        assert self._ready_line is not None, "not ready yet"
        return int(self._ready_line["http_port"])

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == name]

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait(self, timeout_s: float = 30) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout_s)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)
        return code

    async def terminate(self, timeout_s: float = 60) -> None:
        """SIGTERM (the worker drains), then SIGKILL after ``timeout_s``."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), timeout_s)
        await self.stop()

    async def stop(self) -> None:
        """SIGKILL if it still runs (a crash, not a drain), and stop reading its log."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        line: dict[str, Any] = json.loads(raw)
    except ValueError:
        return {"event": "raw", "text": raw.decode(errors="replace").rstrip()}
    return line


async def start_replicas(config: Path, count: int, procs: list[WorkerProcess]) -> list[WorkerProcess]:
    """Start ``count`` worker processes on ``config`` at once; they are added to ``procs``."""
    started = await asyncio.gather(*(WorkerProcess(config).start() for _ in range(count)))
    procs.extend(started)
    return list(started)


@dataclass
class CliRun:
    code: int
    out: str
    err: str


async def run_cli(
    config_dir: Path, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> CliRun:
    """``python -m worker --config DIR ARGS`` as a user would run it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "--config",
        str(config_dir),
        *args,
        cwd=ROOT,
        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", **(env or {})},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return CliRun(proc.returncode, out.decode(), err.decode())
