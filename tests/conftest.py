"""Test harness: the real RabbitMQ and Redis, isolated per test; a fake provider at the network edge.

``AMQP_URL`` and ``REDIS_URL`` name the services (``.ci/run`` and the README's test command set
them). Without them, and with a Docker engine, testcontainers starts both; with neither, the
suite stops with a line saying what to set. Each test gets its own queue and exchange names and
its own Redis key prefix, and removes them afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import aio_pika
import pytest
import redis.asyncio as aioredis
import yaml

from tests.fakes.openai_server import FakeOpenAI
from tests.faults import FAULT_REPORTS, FaultReport, table
from tests.services import PrivateRabbit
from worker.app import running_worker
from worker.client import LLMClient
from worker.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]


# -- services --------------------------------------------------------------------------------


def _docker_available() -> bool:
    return (
        shutil.which("docker") is not None
        and subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0
    )


@pytest.fixture(scope="session")
def service_urls() -> Iterator[tuple[str, str]]:
    amqp, redis_url = os.environ.get("AMQP_URL"), os.environ.get("REDIS_URL")
    if amqp and redis_url:
        yield amqp, redis_url
        return
    if not _docker_available():
        pytest.exit(
            "set AMQP_URL and REDIS_URL (or run with a Docker engine for testcontainers)", returncode=2
        )
    from testcontainers.rabbitmq import RabbitMqContainer
    from testcontainers.redis import RedisContainer

    with RabbitMqContainer("rabbitmq:4.1-management") as rabbit, RedisContainer("redis:7") as red:
        amqp = amqp or (
            f"amqp://guest:guest@{rabbit.get_container_host_ip()}:{rabbit.get_exposed_port(5672)}/"
        )
        redis_url = redis_url or f"redis://{red.get_container_host_ip()}:{red.get_exposed_port(6379)}/0"
        os.environ["AMQP_URL"], os.environ["REDIS_URL"] = amqp, redis_url
        yield amqp, redis_url


@pytest.fixture
def amqp_url(service_urls: tuple[str, str]) -> str:
    return service_urls[0]


@pytest.fixture
def redis_url(service_urls: tuple[str, str]) -> str:
    return service_urls[1]


# -- per-test isolation ---------------------------------------------------------------------


@dataclass
class Names:
    """Unique broker names and Redis prefix for one test."""

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:10])

    @property
    def request_queue(self) -> str:
        return f"t.{self.tag}.requests"

    @property
    def results_exchange(self) -> str:
        return f"t.{self.tag}.results"

    @property
    def dead_letter_exchange(self) -> str:
        return f"t.{self.tag}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return f"t.{self.tag}.dlq"

    @property
    def prefix(self) -> str:
        return f"t:{self.tag}:"


@pytest.fixture
async def names(amqp_url: str, redis_url: str) -> AsyncIterator[Names]:
    n = Names()
    yield n
    connection = await aio_pika.connect(amqp_url)
    async with connection:  # RabbitMQ deletes what does not exist without complaint
        channel = await connection.channel()
        for queue in (n.request_queue, n.dead_letter_queue):
            await channel.queue_delete(queue)
        for exchange in (n.results_exchange, n.dead_letter_exchange):
            await channel.exchange_delete(exchange)
    client = aioredis.Redis.from_url(redis_url)
    async with client:
        keys = [k async for k in client.scan_iter(match=f"{n.prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)


@pytest.fixture(scope="module")
def rabbit() -> Iterator[PrivateRabbit]:
    """A RabbitMQ node of this module's own, for tests that restart or reconfigure the broker."""
    node = PrivateRabbit()
    asyncio.run(node.start())
    yield node
    asyncio.run(node.destroy())


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    server = await FakeOpenAI().start()
    yield server
    await server.stop()


# -- configuration --------------------------------------------------------------------------

AGENTS = ("writer", "critic", "editor", "researcher", "fact-checker")


def deployment(
    name: str, fake_model: str, base_url: str, *, price: tuple[float, float] = (1e-6, 2e-6)
) -> dict[str, Any]:
    """A Router deployment named ``name`` served by the fake provider's ``fake_model`` behaviour."""
    return {
        "model_name": name,
        "litellm_params": {
            "model": f"openai/{fake_model}",
            "api_base": base_url,
            "api_key": "sk-test-not-a-real-key",
        },
        "model_info": {"input_cost_per_token": price[0], "output_cost_per_token": price[1]},
    }


def llm_section(base_url: str, **overrides: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "default_model": "primary",
        "fallback_models": [],
        "temperature": 0.5,
        "max_tokens": 64,
        "timeout": 5,
        "deadline_s": 10,
        "num_retries": 2,
        "retry_initial_delay_s": 0.01,
        "retry_max_delay_s": 0.05,
        "cache_ttl": 60,
        "agent_models": {
            "writer": "m-writer",
            "critic": "m-critic",
            "editor": "m-editor",
            "researcher": "m-researcher",
            "fact-checker": "m-fact-checker",
        },
        "budget": {
            "max_cost_per_task": 10.0,
            "max_cost_per_day": 100.0,
            "max_cost_per_agent_day": dict.fromkeys(AGENTS, 50.0),
        },
        "models": [deployment("primary", "primary", base_url), deployment("backup", "backup", base_url)]
        + [deployment(f"m-{agent}", f"m-{agent}", base_url) for agent in AGENTS],
    }
    if "models" in overrides:  # custom deployments: every agent uses default_model unless told otherwise
        section["agent_models"] = {}
    section.update(overrides)
    return section


def write_config(
    folder: Path,
    names: Names,
    amqp_url: str,
    redis_url: str,
    llm: dict[str, Any],
    bus: dict[str, Any] | None = None,
    observe: dict[str, Any] | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "llm.yaml").write_text(yaml.safe_dump({"llm": llm}))
    (folder / "redis.yaml").write_text(
        yaml.safe_dump(
            {
                "redis": {
                    "url": redis_url,
                    "key_prefix": names.prefix,
                    "socket_timeout_s": 2.0,
                    "connect_timeout_s": 2.0,
                    "result_ttl_s": 3600,
                }
            }
        )
    )
    (folder / "bus.yaml").write_text(
        yaml.safe_dump(
            {
                "bus": {
                    "url": amqp_url,
                    "request_queue": names.request_queue,
                    "results_exchange": names.results_exchange,
                    "dead_letter_exchange": names.dead_letter_exchange,
                    "dead_letter_queue": names.dead_letter_queue,
                    "prefetch": 64,
                    "delivery_limit": 5,
                    "heartbeat_s": 10,
                    "drain_timeout_s": 10,
                    **(bus or {}),
                }
            }
        )
    )
    (folder / "observe.yaml").write_text(
        yaml.safe_dump({"observe": {"host": "127.0.0.1", "port": 0, **(observe or {})}})
    )
    return folder


@pytest.fixture
def config(tmp_path: Path, names: Names, amqp_url: str, redis_url: str, fake: FakeOpenAI):
    """``config(bus={...}, amqp=URL, redis=URL, **llm_overrides)`` -> a config folder, for worker
    processes and ``load_settings``; ``amqp`` and ``redis`` point it at private services."""

    def build(
        bus: dict[str, Any] | None = None, *, amqp: str | None = None, redis: str | None = None, **llm: Any
    ) -> Path:
        return write_config(tmp_path / uuid.uuid4().hex[:6], names, amqp or amqp_url, redis or redis_url,
                            llm_section(fake.base_url, **llm), bus)  # fmt: skip

    return build


@pytest.fixture
def make_settings(tmp_path: Path, names: Names, amqp_url: str, redis_url: str, fake: FakeOpenAI):
    """``make_settings(**llm_overrides, bus={...}, observe={...})`` -> Settings from real YAML files."""
    counter = iter(range(1000))

    def build(
        bus: dict[str, Any] | None = None, observe: dict[str, Any] | None = None, **overrides: Any
    ) -> Settings:
        folder = write_config(
            tmp_path / f"config{next(counter)}",
            names,
            amqp_url,
            redis_url,
            llm_section(fake.base_url, **overrides),
            bus,
            observe,
        )
        return load_settings(folder, environ={})

    return build


@pytest.fixture
async def client(amqp_url: str, names: Names) -> AsyncIterator[LLMClient]:
    async with LLMClient(amqp_url, request_queue=names.request_queue, default_timeout_s=20) as llm:
        yield llm


@pytest.fixture
def start_worker():
    """``async with start_worker(settings) as worker:`` runs a worker in this event loop."""
    return running_worker


# -- worker processes -------------------------------------------------------------------------


class WorkerProcess:
    """``python -m worker run`` as a child process, for replicas, kills and signals."""

    def __init__(self, config_dir: Path, *, env: dict[str, str] | None = None, args: tuple[str, ...] = ()):
        self.config_dir, self.args = config_dir, args
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
        self._reader: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self, *, timeout_s: float = 60) -> WorkerProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker",
            "--config",
            str(self.config_dir),
            "run",
            "--json-logs",
            *self.args,
            cwd=ROOT,
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
            raise RuntimeError(f"worker did not become ready; it logged: {self.lines[-5:]}")
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            try:
                line = json.loads(raw)
            except ValueError:
                line = {"event": "raw", "text": raw.decode(errors="replace").rstrip()}
            self.lines.append(line)
            if line.get("event") == "worker.ready":
                self._ready.set()

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

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()


async def start_replicas(config: Path, count: int, procs: list[WorkerProcess]) -> list[WorkerProcess]:
    """Start ``count`` worker processes on ``config`` at once; they are added to ``procs``."""
    started = await asyncio.gather(*(WorkerProcess(config).start() for _ in range(count)))
    procs.extend(started)
    return list(started)


@pytest.fixture
async def worker_processes() -> AsyncIterator[list[WorkerProcess]]:
    """A list to append started :class:`WorkerProcess` objects to; all are killed at the end."""
    procs: list[WorkerProcess] = []
    yield procs
    for proc in procs:
        await proc.stop()


# -- the fault suite's table (tests/test_chaos.py) -------------------------------------------


@pytest.fixture(scope="session")
def fault_reports(request: pytest.FixtureRequest) -> list[FaultReport]:
    """Each fault test appends its row, before asserting on it, so a failed target shows too."""
    return request.config.stash.setdefault(FAULT_REPORTS, [])


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    reports = config.stash.get(FAULT_REPORTS, [])
    if reports:
        terminalreporter.section("fault suite (tests/test_chaos.py)")
        for line in table(reports):
            terminalreporter.write_line(line)
