"""Private RabbitMQ and Redis instances for tests that stop, restart or reconfigure a service.

The shared services on 5672/6379 serve every test run on the machine at once and must never go
down, so an outage test starts its own: a second RabbitMQ node (its own node name, ports and
data folder, run as the ``rabbitmq`` user like the system node) or a ``redis-server`` on a free
port. Both keep their data across :meth:`restart`, like a real service restart.

Both need the server binaries on this machine; without them the test is skipped with a line
saying what is missing (there is no other way to take a service down under a test).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

READY_TIMEOUT_S = 60.0


def free_port(low: int = 20000, high: int = 40000) -> int:
    """A port that is free now, with ``port + 20000`` free too (RabbitMQ's distribution port)."""
    for _ in range(200):
        port = low + (uuid.uuid4().int % (high - low))
        if all(_is_free(p) for p in (port, port + 20000)):
            return port
    raise RuntimeError(f"no free port pair found in {low}-{high}")


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def wait_for_port(port: int, *, up: bool, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll until ``127.0.0.1:port`` accepts connections (``up``) or refuses them."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            accepting = False
        else:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            accepting = True
        if accepting == up:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"port {port} still {'closed' if up else 'open'} after {timeout_s:g}s")
        await asyncio.sleep(0.1)


class PrivateRabbit:
    """A RabbitMQ node of its own, in the foreground as a child process (``-detached`` does not work
    with these variables)."""

    def __init__(self) -> None:
        if shutil.which("rabbitmq-server") is None or os.geteuid() != 0:
            pytest.skip("needs rabbitmq-server on PATH and root (the node runs as the rabbitmq user)")
        self.tag = f"t{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.node = f"{self.tag}@localhost"
        self.base = Path(f"/tmp/rmq-{self.tag}")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _prepare(self) -> None:
        for sub in ("mnesia", "log"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        (self.base / "plugins").write_text("[].\n")
        # guest may log in over 127.0.0.1 only, which is where the tests connect from.
        (self.base / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\n")
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(self.base)], check=True)

    def _env(self) -> dict[str, str]:
        b = self.base
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_DIST_PORT": str(self.port + 20000),
            "RABBITMQ_MNESIA_BASE": str(b / "mnesia"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(b / "ff"),
            "RABBITMQ_LOG_BASE": str(b / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(b / "plugins"),
            "RABBITMQ_CONFIG_FILE": str(b / "rabbitmq"),
        }

    async def start(self) -> PrivateRabbit:
        self._prepare()
        out = (self.base / "server.out").open("ab")
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - a long-running child, never waited on here
            ["rabbitmq-server"],
            env=self._env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: su, the shell and the Erlang VM
        )
        out.close()
        await wait_for_port(self.port, up=True)
        return self

    def ctl(self, *args: str, timeout_s: float = 60) -> str:
        """``rabbitmqctl -n <this node> ARGS``; its output."""
        done = subprocess.run(
            ["rabbitmqctl", "-n", self.node, *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()[-500:]}")
        return done.stdout

    async def stop(self) -> None:
        """Stop the node cleanly (durable queues and their messages survive a :meth:`start`)."""
        if self.proc is None:
            return
        await asyncio.to_thread(self.ctl, "stop")
        await asyncio.to_thread(self.proc.wait, 60)
        self.proc = None
        await wait_for_port(self.port, up=False)

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def destroy(self) -> None:
        if self.proc is not None:
            try:
                await self.stop()
            except (RuntimeError, subprocess.TimeoutExpired):
                self._kill()
        shutil.rmtree(self.base, ignore_errors=True)

    def _kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None


class PrivateRedis:
    """``redis-server`` on a free port. Without persistence a restart loses its data, like a Redis
    whose persistence is off; ``persistent=True`` keeps an append-only file fsynced at every write
    (what the README asks of production), so that even a crash loses nothing."""

    def __init__(self, *, persistent: bool = False) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("needs redis-server on PATH")
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None
        self.data_dir = Path(tempfile.mkdtemp(prefix="redis-")) if persistent else None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> PrivateRedis:
        self.proc = await asyncio.create_subprocess_exec(
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            *self._persistence(),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await wait_for_port(self.port, up=True, timeout_s=20)
        return self

    async def stop(self) -> None:
        """Kill it (SIGKILL: a crash, not a clean shutdown)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self.proc = None
        await wait_for_port(self.port, up=False, timeout_s=20)

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def destroy(self) -> None:
        await self.stop()
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _persistence(self) -> list[str]:
        if self.data_dir is None:
            return ["--appendonly", "no"]
        return ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.data_dir)]
