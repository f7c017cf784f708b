"""Test fixtures: the real RabbitMQ and Redis, isolated per test; a fake provider at the network edge.

``AMQP_URL`` and ``REDIS_URL`` name the services (``.ci/run`` and the README's test command set
them). Without them, and with a Docker engine, testcontainers starts both; with neither, the
suite stops with a line saying what to set. Each test gets its own queue and exchange names and
its own Redis key prefix, and removes them afterwards.

Only fixtures (and the fault table's summary hook) live here; what tests share besides
fixtures is in tests/support/, and no test imports this file.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import pytest
import redis.asyncio as aioredis
from hypothesis import settings as hypothesis_settings

from tests.fakes.openai_server import FakeOpenAI
from tests.support.config import Names, llm_section, remove_names, write_config
from tests.support.faults import FAULT_REPORTS, FIGURES, FaultReport, table
from tests.support.paths import ROOT
from tests.support.processes import WorkerProcess
from tests.support.services import PrivateRabbit
from worker.app import running_worker
from worker.client import LLMClient
from worker.settings import Settings, load_settings

# Property tests: no per-example deadline (two shared cores make any one example slow now and
# then), and under CI (.ci/run sets CI=true) the same examples every run, so a red CI names a
# change and not the luck of a draw. Run without CI to explore new examples.
hypothesis_settings.register_profile("dev", deadline=None, print_blob=True)
hypothesis_settings.register_profile("ci", parent=hypothesis_settings.get_profile("dev"), derandomize=True)
hypothesis_settings.load_profile("ci" if os.environ.get("CI") else "dev")

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


@pytest.fixture
async def names(amqp_url: str, redis_url: str) -> AsyncIterator[Names]:
    n = Names()
    yield n
    await remove_names(n, amqp_url, redis_url)


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
def config_copy(tmp_path: Path) -> Path:
    """A copy of the shipped production config/ (without offline/), to edit."""
    folder = tmp_path / "config"
    shutil.copytree(ROOT / "config", folder, ignore=shutil.ignore_patterns("offline"))
    return folder


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


@pytest.fixture
async def worker_processes() -> AsyncIterator[list[WorkerProcess]]:
    """A list to append started :class:`WorkerProcess` objects to; all are killed at the end."""
    procs: list[WorkerProcess] = []
    yield procs
    for proc in procs:
        await proc.stop()


# -- the fault suite's table (tests/chaos/) -------------------------------------------


@pytest.fixture(scope="session")
def figures(request: pytest.FixtureRequest) -> list[str]:
    """Measured lines (with the machine line first) to print after the fault table."""
    from bench.machine import describe

    lines = request.config.stash.setdefault(FIGURES, [])
    if not lines:
        lines.append(describe())
    return lines


@pytest.fixture(scope="session")
def fault_reports(request: pytest.FixtureRequest) -> list[FaultReport]:
    """Each fault test appends its row, before asserting on it, so a failed target shows too."""
    return request.config.stash.setdefault(FAULT_REPORTS, [])


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    reports = config.stash.get(FAULT_REPORTS, [])
    if reports:
        terminalreporter.section("fault suite (tests/chaos/)")
        for line in table(reports):
            terminalreporter.write_line(line)
    for line in config.stash.get(FIGURES, []):
        terminalreporter.write_line(line)
