"""Health over HTTP (issue #7): readiness follows the broker, the port is a config error when
taken, observe.yaml is required."""

from __future__ import annotations

import json
import secrets
import shutil
import socket
from collections.abc import AsyncIterator

import pytest

from tests.support.bodies import request_body
from tests.support.config import (
    llm_section,
    write_config,
)
from tests.support.http import http_get
from tests.support.paths import ROOT
from tests.support.peers import raw_peer
from tests.support.processes import WorkerProcess
from tests.support.services import PrivateRabbit
from tests.support.waits import eventually
from worker.errors import ConfigError
from worker.messages import LLMResult, Status
from worker.settings import load_settings


@pytest.fixture
async def private_rabbitmq() -> AsyncIterator[PrivateRabbit]:
    """A broker of this test's own to stop and start, with a user and password of its own."""
    broker = PrivateRabbit(user="obs", password="pw-" + secrets.token_hex(12))
    try:
        yield broker
    finally:
        await broker.destroy()


async def test_readiness_follows_the_broker_and_its_password_is_never_logged(
    tmp_path, names, redis_url, fake, private_rabbitmq, worker_processes
):
    broker = private_rabbitmq
    await broker.start()
    config = write_config(tmp_path / "cfg", names, broker.url, redis_url, llm_section(fake.base_url))
    worker = await WorkerProcess(config, env={"AMQP_URL": broker.url}).start()
    worker_processes.append(worker)
    base = f"http://127.0.0.1:{worker.http_port}"

    async def ready_is(expected: int) -> bool:
        return (await http_get(f"{base}/readyz"))[0] == expected

    assert await ready_is(200)
    await broker.stop_app()
    await eventually(lambda: ready_is(503), timeout_s=30, what="/readyz answers 503 once the broker is gone")
    assert json.loads((await http_get(f"{base}/readyz"))[1])["connected"] is False
    assert (await http_get(f"{base}/livez"))[0] == 200  # a broker outage must not get the pod killed

    await broker.start_app()  # durable queues come back
    await eventually(lambda: ready_is(200), timeout_s=60, what="/readyz answers 200 after the broker is back")
    async with raw_peer(broker.url, names.request_queue) as peer:  # ready means really consuming
        await peer.publish(request_body("after the outage"))
        [reply] = await peer.wait_replies(1)
    assert LLMResult.model_validate_json(reply.body).status is Status.ok

    password = broker.url.split(":")[2].split("@")[0]
    assert password not in "\n".join(json.dumps(line) for line in worker.lines)
    assert "obs:***@127.0.0.1" in worker.events("worker.ready")[0]["broker"]


async def test_port_in_use_is_a_config_error_naming_the_key(make_settings, start_worker):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"observe.port: cannot listen on 127.0.0.1:{port}"):
            async with start_worker(make_settings(observe={"port": port})):
                pass


def test_observe_yaml_is_required_and_port_can_come_from_the_environment(tmp_path):
    folder = tmp_path / "cfg"
    shutil.copytree(ROOT / "config" / "offline", folder)
    assert load_settings(folder, environ={"OBSERVE_PORT": "9999"}).observe.port == 9999
    (folder / "observe.yaml").unlink()
    with pytest.raises(ConfigError, match=r"observe\.yaml: observe: file not found"):
        load_settings(folder, environ={})
