"""deploy/rabbitmq/ (issue #15): one broker user per agent, the worker's and the operator's, with
permissions that let an agent read only its own replies; loaded into a private RabbitMQ the way
deploy/compose.yaml loads it (the shipped rabbitmq.conf's ``definitions.local.path``, the node started
by the shipped entrypoint.sh, passwords from one secret file per user), then tried as an
attacker would. The static checks of the compose files and the manifests are beside this file:
test_compose.py, test_compose_cluster.py, test_kubernetes.py."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import aio_pika
import aiormq
import pytest
import yaml

from tests.deploy.shipped import (
    DEFINITIONS,
    DEPLOY,
    ENTRYPOINT,
    broker_users,
    container_mounts,
    definitions_path,
    in_repository,
)
from tests.support.paths import ROOT
from tests.support.services import PrivateRabbit
from tests.support.waits import eventually
from worker.bus import Bus
from worker.client import LLMClient
from worker.messages import LLMResult, Status
from worker.settings import Settings, load_settings

USERS = broker_users()
SHIPPED_BUS = yaml.safe_load((ROOT / "config" / "bus.yaml").read_text())["bus"]
REFUSED = pytest.raises(aiormq.exceptions.ChannelAccessRefused, match="ACCESS_REFUSED")


def shipped_conf() -> str:
    """deploy/rabbitmq.conf with its container paths pointed at the repository (as compose mounts them)."""
    conf = (DEPLOY / "rabbitmq.conf").read_text()
    broker = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["rabbitmq"]
    mounts = container_mounts(broker)
    return conf.replace(definitions_path(conf), str(in_repository(definitions_path(conf), mounts)))


def test_every_caller_in_callers_yaml_is_a_broker_user_and_back():
    users = json.loads(DEFINITIONS.read_text())["users"]
    callers = set(yaml.safe_load((ROOT / "config" / "callers.yaml").read_text())["callers"]["users"])
    assert {u["name"] for u in users} == callers | {"llm-worker"}
    assert all(u["password_hash"] == "" for u in users), "no password, nor its hash, in the repository"


def test_the_shipped_conf_loads_the_shipped_definitions():
    assert Path(definitions_path(shipped_conf())) == DEFINITIONS


@dataclass
class Broker:
    node: PrivateRabbit
    secrets: Path
    marker: Path
    gosu_log: Path  # what entrypoint.sh ran as the broker's user

    def url(self, user: str, password: str | None = None) -> str:
        password = (self.secrets / user).read_text().strip() if password is None else password
        return f"amqp://{user}:{quote(password, safe='')}@127.0.0.1:{self.node.port}/"

    async def booted(self) -> None:
        """Up, and every password set (what the compose healthcheck waits for)."""
        await eventually(self.marker.exists, timeout_s=90, interval_s=0.2, what="entrypoint.sh set passwords")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A private node started by deploy/rabbitmq/entrypoint.sh with the shipped rabbitmq.conf: it
    imports definitions.json at boot, then the script sets each user's password from its file."""
    base = tmp_path_factory.mktemp("broker")
    secrets = base / "secrets"
    secrets.mkdir()
    for user in USERS:
        (secrets / user).write_text(f"{user}-{uuid.uuid4().hex}\n")
    # characters an AMQP URL must escape: AMQP_PASSWORD_FILE has to quote them
    (secrets / "llm-worker").write_text(f"p@ss/w:rd%?#{uuid.uuid4().hex}\n")
    shim = base / "bin"  # the image's own: its entrypoint (here the server as it is) and gosu
    shim.mkdir()
    (shim / "docker-entrypoint.sh").write_text('#!/bin/sh\nexec "$@"\n')
    (shim / "gosu").write_text(
        '#!/bin/sh\n[ "$1" = rabbitmq ] || exit 64\necho "$2" >>"$GOSU_LOG"\nshift\nexec "$@"\n'
    )
    for tool in ("docker-entrypoint.sh", "gosu"):
        (shim / tool).chmod(0o755)
    env = {
        "PATH": f"{shim}:{os.environ['PATH']}",
        "PASSWORDS_DIR": str(secrets),
        "PASSWORDS_MARKER": str(base / "passwords-set"),
        "GOSU_LOG": str(base / "gosu.log"),
    }
    node = PrivateRabbit(command=[str(ENTRYPOINT)], env=env)
    # The broker runs as its own user, which may not read the checkout (a clean clone in a 0700
    # temporary directory): the node reads a copy of the shipped file from its own directory.
    node.base.mkdir(parents=True)
    shutil.copyfile(DEFINITIONS, node.base / "definitions.json")
    node.conf = shipped_conf().replace(str(DEFINITIONS), str(node.base / "definitions.json"))
    assert definitions_path(node.conf) == str(node.base / "definitions.json")
    deployed = Broker(node, secrets, base / "passwords-set", base / "gosu.log")

    async def start() -> None:
        await node.start()
        await deployed.booted()

    asyncio.run(start())
    yield deployed
    asyncio.run(node.destroy())


async def logs_in(url: str) -> bool:
    try:
        connection = await aio_pika.connect(url)
    except aiormq.exceptions.ProbableAuthenticationError:
        return False
    await connection.close()
    return True


async def test_the_broker_imports_the_definitions_and_every_user_logs_in_with_its_secret(broker):
    listed = broker.node.ctl("--silent", "list_users")
    assert sorted(line.split("\t")[0] for line in listed.splitlines()) == sorted(USERS)  # no guest
    for user in USERS:
        assert await logs_in(broker.url(user)), user
    assert not await logs_in(broker.url("agent-writer", "wrong"))
    assert not await logs_in(broker.url("agent-writer", ""))
    assert not await logs_in(broker.url("guest", "guest")), "no default user beside the definitions"
    # started as root, as in the image: every CLI call as the broker's user (its Erlang cookie)
    assert set(broker.gosu_log.read_text().split()) == {"rabbitmq-diagnostics", "rabbitmqctl"}


@pytest.fixture(scope="module")
def topology(broker: Broker) -> dict[str, str]:
    """The worker's own topology, declared by the worker's code as llm-worker (its password from
    AMQP_PASSWORD_FILE): the names of the shipped config/bus.yaml."""
    environ = {
        "AMQP_URL": f"amqp://llm-worker@127.0.0.1:{broker.node.port}/",
        "AMQP_PASSWORD_FILE": str(broker.secrets / "llm-worker"),
        **dict.fromkeys(("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"), "placeholder"),
        **dict.fromkeys(("COHERE_API_KEY", "PERPLEXITYAI_API_KEY"), "placeholder"),
    }
    settings = load_settings(ROOT / "config", environ=environ)

    async def declare() -> None:
        bus = Bus(settings.bus)
        await bus.connect()
        await bus.close()

    asyncio.run(declare())
    return {
        "requests": settings.bus.request_queue,
        "batch": settings.bus.batch_queue_name,
        "dlq": settings.bus.dead_letter_queue,
        "results": settings.bus.results_exchange,
    }


@pytest.fixture
def worker_folder(broker, topology, config) -> Path:
    """A worker's config on the private broker: the shipped queue names and callers.yaml (enforced),
    the test's fake provider and Redis prefix; the user in the URL, its password in the file."""
    bus = {key: SHIPPED_BUS[key] for key in ("request_queue", "results_exchange", "dead_letter_exchange",
                                             "dead_letter_queue")}  # fmt: skip
    folder: Path = config(bus=bus, amqp=f"amqp://llm-worker@127.0.0.1:{broker.node.port}/")
    (folder / "callers.yaml").write_text((ROOT / "config" / "callers.yaml").read_text())
    return folder


def worker_settings(broker: Broker, folder: Path) -> Settings:
    return load_settings(folder, environ={"AMQP_PASSWORD_FILE": str(broker.secrets / "llm-worker")})


async def test_the_worker_user_serves_an_agent_end_to_end(
    broker, topology, worker_folder, start_worker, fake
):
    """llm-worker consumes the request and publishes the reply; agent-writer publishes with its
    own user_id and reads its reply on its own llm.reply.agent-writer.* queue."""
    folder = worker_folder
    async with start_worker(worker_settings(broker, folder)):
        writer_url = broker.url("agent-writer")
        async with LLMClient(
            writer_url, request_queue=topology["requests"], worker_user="llm-worker"
        ) as writer:
            result = await writer.complete("hello", agent="writer", use_cache=False)
        async with LLMClient(broker.url("agent-critic"), request_queue=topology["requests"]) as critic:
            borrowed = await critic.complete("hello", agent="writer", use_cache=False)
        # the operator's tools, as docs/deploy.md shows them: the user in AMQP_URL, the password from its file
        operator = {"AMQP_URL": f"amqp://operator@127.0.0.1:{broker.node.port}/",
                    "AMQP_PASSWORD_FILE": str(broker.secrets / "operator")}  # fmt: skip
        asked = await cli(folder, operator, "ask", "--agent", "critic", "--no-cache", "hello")
        listed = await cli(folder, operator, "dlq", "list")
    assert result.status is Status.ok and result.content
    assert borrowed.status is Status.forbidden  # the shipped callers.yaml: critic is not writer
    assert asked.returncode == 0, asked.stderr
    assert listed.returncode == 0 and f"{topology['dlq']}: " in listed.stdout, listed.stderr
    assert fake.total_calls() == 2


async def test_an_agent_cannot_answer_in_the_workers_place(
    broker, topology, worker_folder, start_worker, fake
):
    """agent-critic may publish into a queue it knows through the default exchange (agents send
    their requests that way), here writer's reply queue, with its own user_id as the broker
    demands; writer's client takes only the answer signed by llm-worker."""
    fake.latency_s = 0.5  # the forgery lands while the call waits for the model
    rid = f"r-{uuid.uuid4().hex}"
    forged = LLMResult(request_id=rid, status=Status.ok, content="forged").model_dump_json().encode()
    async with (
        start_worker(worker_settings(broker, worker_folder)),
        LLMClient(
            broker.url("agent-writer"), request_queue=topology["requests"], worker_user="llm-worker"
        ) as writer,
        await aio_pika.connect(broker.url("agent-critic")) as critic,
    ):
        channel = await critic.channel(publisher_confirms=True)
        call = asyncio.create_task(writer.complete("hello", agent="writer", request_id=rid, use_cache=False))
        await eventually(lambda: rid in writer._pending, what="writer's call sent")
        message = aio_pika.Message(forged, correlation_id=rid, user_id="agent-critic")
        await channel.default_exchange.publish(message, routing_key=writer._reply_queue_name, mandatory=True)
        result = await call
        await eventually(lambda: writer.refused_replies == 1, what="the forged reply dropped")
    assert result.status is Status.ok and result.content and result.content != "forged"


async def test_the_operators_replay_is_served_as_the_agent(
    broker, topology, worker_folder, start_worker, fake
):
    """With the shipped callers.yaml (workers: llm-worker, replayers: operator): writer's request
    fails while its provider is down and is dead-lettered; the operator's `dlq replay` is served
    as agent-writer, so writer asking again gets the replayed answer from the result store."""
    rid, port = f"r-{uuid.uuid4().hex}", fake.port
    operator = {"AMQP_URL": f"amqp://operator@127.0.0.1:{broker.node.port}/",
                "AMQP_PASSWORD_FILE": str(broker.secrets / "operator")}  # fmt: skip
    async with (
        start_worker(worker_settings(broker, worker_folder)),
        LLMClient(
            broker.url("agent-writer"), request_queue=topology["requests"], worker_user="llm-worker"
        ) as writer,
    ):
        await fake.stop()
        failed = await writer.complete("hello", agent="writer", request_id=rid, use_cache=False)
        await fake.start(port)
        replayed = await cli(worker_folder, operator, "dlq", "replay")
        await eventually(lambda: fake.total_calls() == 1, what="the replay served")
        asked_again_at = datetime.now(UTC)
        again = await writer.complete("hello", agent="writer", request_id=rid, use_cache=False)
    assert failed.status is Status.failed
    assert replayed.returncode == 0 and replayed.stdout.startswith("replayed 1"), replayed.stderr
    assert again.status is Status.ok and again.content and again.finished_at < asked_again_at
    assert fake.total_calls() == 1


async def cli(folder: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m worker --config FOLDER ARGS`` with ``env`` added to this environment."""
    command = [sys.executable, "-m", "worker", "--config", str(folder), *args]
    return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=120,
                                   env={**os.environ, **env}, check=False, cwd=ROOT)  # fmt: skip


async def channel_of(url: str) -> tuple[aio_pika.abc.AbstractConnection, aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(url)
    return connection, await connection.channel()


async def test_an_agent_reads_its_own_replies_and_results_and_nothing_else(broker, topology):
    writer, w = await channel_of(broker.url("agent-writer"))
    critic, c = await channel_of(broker.url("agent-critic"))
    async with writer, critic:
        await c.declare_queue("llm.reply.agent-critic.inbox", auto_delete=True)
        own = await w.declare_queue("llm.reply.agent-writer.inbox", exclusive=True)
        await own.bind(topology["results"], routing_key="writer")  # its own results

        with REFUSED:  # configure: only llm.reply.agent-writer.*
            await (await writer.channel()).declare_queue("llm.reply.agent-critic.mine", exclusive=True)
        for queue in (
            "llm.reply.agent-critic.inbox",
            topology["requests"],
            topology["batch"],
            topology["dlq"],
        ):
            ch = await writer.channel()
            with REFUSED:  # read
                await (await ch.get_queue(queue, ensure=False)).consume(_never)
        for key in ("critic", "#", "*", "writer.#"):
            ch = await writer.channel()
            with REFUSED:  # topic permission: read ^writer$ on llm.results
                await (await ch.get_queue(own.name, ensure=False)).bind(topology["results"], routing_key=key)
        ch = await writer.channel()
        with REFUSED:  # configure on a queue that is not its own
            await ch.queue_delete(topology["requests"])


async def test_the_broker_refuses_a_message_published_as_another_user(broker, topology):
    """The validated user_id the worker trusts (worker/boundary/identity.py) is the broker's."""
    writer = await aio_pika.connect(broker.url("agent-writer"))
    async with writer:
        channel = await writer.channel()
        own = aio_pika.Message(b"{}", user_id="agent-writer")
        await channel.default_exchange.publish(own, routing_key=topology["requests"])  # confirmed
        for other in ("agent-critic", "llm-worker", "operator"):
            channel = await writer.channel()
            with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="user_id property set to"):
                await channel.default_exchange.publish(
                    aio_pika.Message(b"{}", user_id=other), routing_key=topology["requests"]
                )
        results = await (await writer.channel()).get_exchange(topology["results"], ensure=False)
        with REFUSED:  # write: an agent never publishes results, not even its own
            await results.publish(aio_pika.Message(b"{}", user_id="agent-writer"), routing_key="writer")


async def test_the_worker_publishes_each_agents_results_where_only_that_agent_reads(broker, topology):
    worker, w = await channel_of(broker.url("llm-worker"))
    writer, mine = await channel_of(broker.url("agent-writer"))
    critic, theirs = await channel_of(broker.url("agent-critic"))
    async with worker, writer, critic:
        inbox = {}
        for agent, channel in (("writer", mine), ("critic", theirs)):
            inbox[agent] = await channel.declare_queue(f"llm.reply.agent-{agent}.results", exclusive=True)
            await inbox[agent].bind(topology["results"], routing_key=agent)
        results = await w.get_exchange(topology["results"], ensure=False)
        await results.publish(aio_pika.Message(b"for writer", user_id="llm-worker"), routing_key="writer")
        await w.default_exchange.publish(aio_pika.Message(b"reply"), routing_key=inbox["writer"].name)

        got = [await inbox["writer"].get(timeout=5), await inbox["writer"].get(timeout=5)]
        assert sorted(m.body for m in got) == [b"for writer", b"reply"]
        assert await inbox["critic"].get(fail=False) is None


async def test_the_operator_reads_dead_letters_and_no_requests(broker, topology):
    operator, channel = await channel_of(broker.url("operator"))
    async with operator:
        await (await channel.get_queue(topology["dlq"], ensure=False)).get(fail=False)  # allowed
        with REFUSED:
            await (await (await operator.channel()).get_queue(topology["requests"], ensure=False)).consume(
                _never
            )


async def _never(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    raise AssertionError("a delivery the broker should have refused")


def test_a_user_without_a_password_file_is_named_and_the_others_are_still_set(broker, tmp_path):
    partial = tmp_path / "secrets"
    partial.mkdir()
    for user in USERS:
        if user != "agent-editor":
            (partial / user).write_text((broker.secrets / user).read_text())
    (partial / "agent-critic").write_text("")  # an empty file is no password either
    (partial / "agent-researcher").write_text("\nhidden-below-a-blank-line\n")  # rabbitmqctl: ""
    (partial / "operator").write_text("first\nsecond\n")
    done = subprocess.run(
        [str(DEPLOY / "rabbitmq" / "set-passwords.sh"), str(partial), "-n", broker.node.node],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    for user in ("agent-editor", "agent-critic", "agent-researcher"):
        assert f"broker user '{user}' has no password: write one to {partial / user}" in done.stderr
    assert f"{partial / 'operator'} holds more than one line" in done.stderr
    assert "password of 'agent-writer' set" in done.stderr
    assert not any(
        line.strip() in done.stderr for line in (broker.secrets / "agent-writer").read_text().splitlines()
    )


async def test_a_restart_with_the_definitions_unchanged_keeps_every_password(broker, tmp_path):
    """definitions.skip_if_unchanged: no import, so no user loses its password, even with no
    secret to set it from (entrypoint.sh finds none here, and the node stays unhealthy)."""
    broker.node.extra_env["PASSWORDS_DIR"] = str(tmp_path)  # empty
    try:
        await broker.node.restart()
        for user in USERS:
            await eventually(lambda u=user: logs_in(broker.url(u)), timeout_s=60, what=f"{user} logs in")
        assert not broker.marker.exists()
    finally:
        broker.node.extra_env["PASSWORDS_DIR"] = str(broker.secrets)


async def test_a_restarted_broker_reimports_the_definitions_and_gets_its_passwords_back(
    broker, topology, worker_folder, start_worker, fake
):
    """An import leaves every user without a password (here forced: the file's hash forgotten,
    as after a change); entrypoint.sh sets them again, and a worker that lost its broker
    meanwhile (logins refused for a while) serves again."""
    async with start_worker(worker_settings(broker, worker_folder)):
        assert "imported_definition_hash_value" in broker.node.ctl("list_global_parameters")
        broker.node.ctl("clear_global_parameter", "imported_definition_hash_value")
        await broker.node.restart()
        await broker.booted()
        for user in USERS:
            assert await logs_in(broker.url(user)), user
        async with LLMClient(broker.url("agent-writer"), request_queue=topology["requests"]) as writer:
            result = await writer.complete("after the restart", agent="writer", use_cache=False, timeout_s=60)
    assert result.status is Status.ok
