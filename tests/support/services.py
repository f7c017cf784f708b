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
import subprocess
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from tests.support.ports import DIST_OFFSET, accepts, free_port, wait_for_port
from tests.support.waits import eventually

READY_TIMEOUT_S = 60.0


class PrivateRabbit:
    """A RabbitMQ node of its own, in the foreground as a child process (``-detached`` does not work
    with these variables). ``user``/``password``: a default user other than guest, for tests that
    check a broker password never reaches the log."""

    def __init__(
        self,
        *,
        user: str = "guest",
        password: str = "guest",
        conf: str = "",
        command: Sequence[str] = ("rabbitmq-server",),
        env: Mapping[str, str] | None = None,
        plugins: Sequence[str] = (),
    ) -> None:
        """``conf``: more rabbitmq.conf lines; ``command`` and ``env``: what starts the node (a
        shipped entrypoint script, say) and more variables for it; ``plugins`` to enable."""
        if shutil.which("rabbitmq-server") is None or os.geteuid() != 0:
            pytest.skip("needs rabbitmq-server on PATH and root (the node runs as the rabbitmq user)")
        self.user, self.password = user, password
        self.conf, self.command, self.extra_env = conf, list(command), dict(env or {})
        self.plugins = list(plugins)
        self.tag = f"t{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.node = f"{self.tag}@localhost"
        self.base = Path(f"/tmp/rmq-{self.tag}")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://{self.user}:{self.password}@127.0.0.1:{self.port}/"

    def _prepare(self) -> None:
        for sub in ("mnesia", "log"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        (self.base / "plugins").write_text(f"[{','.join(self.plugins)}].\n")
        # guest may log in over 127.0.0.1 only, which is where the tests connect from.
        conf = f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
        if (self.user, self.password) != ("guest", "guest"):
            conf += f"default_user = {self.user}\ndefault_pass = {self.password}\n"
        (self.base / "rabbitmq.conf").write_text(conf + self.conf)
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(self.base)], check=True)

    def _env(self) -> dict[str, str]:
        b = self.base
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_DIST_PORT": str(self.port + DIST_OFFSET),
            "RABBITMQ_MNESIA_BASE": str(b / "mnesia"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(b / "ff"),
            "RABBITMQ_LOG_BASE": str(b / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(b / "plugins"),
            "RABBITMQ_CONFIG_FILE": str(b / "rabbitmq"),
            **self.extra_env,
        }

    async def start(self) -> PrivateRabbit:
        self._prepare()
        out = (self.base / "server.out").open("ab")
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - a long-running child, never waited on here
            self.command,
            env=self._env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: su, the shell and the Erlang VM
        )
        out.close()
        await eventually(self._up, timeout_s=READY_TIMEOUT_S, interval_s=0.1, what=f"RabbitMQ on {self.port}")
        return self

    async def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:  # fail now, not at the timeout
            raise AssertionError(f"rabbitmq-server exited with {self.proc.returncode}; see {self.base}/log")
        return await accepts(self.port)

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

    async def stop_app(self) -> None:
        """The broker goes away (every connection closed, the port shut); the Erlang node stays,
        so :meth:`start_app` takes a second or two instead of a whole boot."""
        await asyncio.to_thread(self.ctl, "stop_app")

    async def start_app(self) -> None:
        await asyncio.to_thread(self.ctl, "start_app")
        await wait_for_port(self.port, up=True, timeout_s=READY_TIMEOUT_S)

    async def stop(self) -> None:
        """Stop the node cleanly (durable queues and their messages survive a :meth:`start`)."""
        if self.proc is None:
            return
        await asyncio.to_thread(self.ctl, "stop")
        await asyncio.to_thread(self.proc.wait, 60)
        self.proc = None
        await wait_for_port(self.port, up=False, timeout_s=READY_TIMEOUT_S)

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def crash(self) -> None:
        """SIGKILL the node (its Erlang VM and all): a crash, not a shutdown."""
        await asyncio.to_thread(self._kill)
        await wait_for_port(self.port, up=False)

    async def destroy(self) -> None:
        if self.proc is not None:
            try:
                await self.stop()
            except (RuntimeError, subprocess.TimeoutExpired):
                self._kill()
        shutil.rmtree(self.base, ignore_errors=True)

    def _kill(self) -> None:
        # The Erlang VM runs in a session of its own (the server script switches to the rabbitmq
        # user), out of reach of the child's process group: find it by its node name.
        for pid in self._processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def _processes(self) -> list[int]:
        """Every process started for this node (its environment names it)."""
        marker = f"RABBITMQ_NODENAME={self.node}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if marker in (entry / "environ").read_bytes().split(b"\0"):
                        found.append(int(entry.name))
        return found


class PrivateRedis:
    """``redis-server`` on a free port. Without persistence a restart loses its data, like a Redis
    whose persistence is off; ``persistent=True`` keeps an append-only file fsynced at every write
    (what the README asks of production), so that even a crash loses nothing."""

    def __init__(self, *, persistent: bool = False, args: tuple[str, ...] = ()) -> None:
        """``args``: more ``redis-server`` options, e.g. ``("--maxmemory", "8mb")``."""
        self.args = args
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
            *self.args,
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
