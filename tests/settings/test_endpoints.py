"""Cluster endpoints in the config (issue #20): a list of brokers, Redis through Sentinel, each
mistake one line naming the file and key; a worker starts while its first broker is down, and
never logs a broker's password; every key one ledger step touches shares one Redis Cluster slot.

The faults themselves (nodes stopped under load) are in tests/chaos/test_cluster.py and
tests/test_redis_ha.py (``-m chaos``).
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from redis.cluster import key_slot

from tests.settings.test_settings import KEYS, edit
from tests.support.bodies import request_body
from tests.support.peers import raw_peer
from tests.support.ports import free_port
from tests.support.processes import WorkerProcess
from worker.connections import describe_redis
from worker.errors import ConfigError
from worker.messages import LLMResult, Status
from worker.settings import Budget, known_secrets, load_settings
from worker.state.flight import SingleFlight
from worker.state.ledger import BudgetLedger
from worker.state.results import ResultStore

BROKERS = ["amqp://u:p@rabbit-0:5672/", "amqp://u:p@rabbit-1:5672/", "amqp://u:p@rabbit-2:5672/"]


def test_bus_url_takes_a_list_of_brokers(config_copy):
    edit(config_copy, "bus.yaml", lambda d: d["bus"].update(url=BROKERS, failover="in_order"))
    bus = load_settings(config_copy, environ=KEYS).bus
    assert [u.get_secret_value() for u in bus.urls] == BROKERS
    assert bus.url.get_secret_value() == BROKERS[0] and bus.failover == "in_order"


def test_amqp_url_may_list_brokers_and_replaces_the_files(config_copy):
    edit(config_copy, "bus.yaml", lambda d: d["bus"].update(url=BROKERS))
    settings = load_settings(config_copy, environ={**KEYS, "AMQP_URL": "amqp://a:5672/; amqp://b:5672/"})
    assert [u.get_secret_value() for u in settings.bus.urls] == ["amqp://a:5672/", "amqp://b:5672/"]
    assert settings.bus.failover == "shuffle"  # the default: a fleet spreads over the nodes


def test_amqp_password_file_gives_every_broker_its_password_escaped(config_copy, tmp_path):
    """Compose and Kubernetes mount the broker user's password as a file (deploy/rabbitmq/):
    a URL needs ``@``, ``/``, ``:``, ``%`` and ``#`` escaped, and the trailing newline is not part of it."""
    secret = tmp_path / "llm-worker"
    secret.write_text("p@ss/w:rd%#\n")
    environ = {**KEYS, "AMQP_URL": "amqp://llm-worker@a:5672/;amqp://llm-worker@b:5672/vh",
               "AMQP_PASSWORD_FILE": str(secret)}  # fmt: skip
    bus = load_settings(config_copy, environ=environ).bus
    assert [u.get_secret_value() for u in bus.urls] == [
        "amqp://llm-worker:p%40ss%2Fw%3Ard%25%23@a:5672/",
        "amqp://llm-worker:p%40ss%2Fw%3Ard%25%23@b:5672/vh",
    ]
    assert [urlsplit(u.get_secret_value()).hostname for u in bus.urls] == ["a", "b"]
    secret.write_text("  p@ss/w:rd%#  \r\n\n")  # as rabbitmqctl reads it: surrounding whitespace dropped
    one = load_settings(config_copy, environ={**environ, "AMQP_URL": "amqp://llm-worker@a:5672/"})
    assert one.bus.url.get_secret_value() == "amqp://llm-worker:p%40ss%2Fw%3Ard%25%23@a:5672/"
    # redacted from every log line both as escaped in the URL and as the broker receives it
    assert {"p@ss/w:rd%#", "p%40ss%2Fw%3Ard%25%23"} <= set(known_secrets(one, environ))


@pytest.mark.parametrize(
    ("amqp_url", "content", "key", "expected"),
    [
        (
            "amqp://llm-worker@a/",
            None,
            "{file}",
            "cannot read it (No such file or directory): mount the secret",
        ),
        ("amqp://llm-worker@a/", "\n", "{file}", "the file is empty"),
        ("amqp://llm-worker@a/", "pw\nsecond\n", "{file}", "more than one line: keep only the password"),
        ("amqp://llm-worker:s3cr3tpw@a/", "pw", "bus.url", "holds a password too: drop it"),
        ("amqp://u@a/;amqp://u:s3cr3tpw@b/", "pw", "bus.url.1", "holds a password too"),
        ("amqp://a/", "pw", "bus.url", "names no user: write amqp://USER@host:5672/"),
    ],
)
def test_amqp_password_file_mistakes_name_the_variable_and_the_fix(config_copy, tmp_path, amqp_url, content,
                                                                   key, expected):  # fmt: skip
    secret = tmp_path / "pw"
    if content is not None:
        secret.write_text(content)
    environ = {**KEYS, "AMQP_URL": amqp_url, "AMQP_PASSWORD_FILE": str(secret)}
    with pytest.raises(ConfigError) as caught:
        load_settings(config_copy, environ=environ)
    assert (caught.value.file, caught.value.key) == ("AMQP_PASSWORD_FILE", key.format(file=secret))
    assert expected in caught.value.problem
    assert "s3cr3tpw" not in str(caught.value)


def test_redis_through_sentinel(config_copy):
    edit(config_copy, "redis.yaml", lambda d: d["redis"].pop("url"))
    edit(config_copy, "redis.yaml", lambda d: d["redis"].update(sentinel=["s0:26379", "s1:26379"],
                                                                 sentinel_service="llmw"))  # fmt: skip
    settings = load_settings(config_copy, environ={**KEYS, "REDIS_URL": "redis://:hunter2hunter2@llmw/2"})
    assert settings.redis.sentinel == ["s0:26379", "s1:26379"]
    assert describe_redis(settings.redis) == "sentinel llmw via s0:26379,s1:26379"
    assert "hunter2" not in repr(settings)


@pytest.mark.parametrize(
    ("file", "change", "key", "expected"),
    [
        ("bus.yaml", lambda d: d["bus"].update(url=[BROKERS[0], "http://x/"]), "bus.url.1", "amqp://"),
        ("bus.yaml", lambda d: d["bus"].update(url=[BROKERS[0], BROKERS[0]]), "bus.url", "listed twice"),
        ("bus.yaml", lambda d: d["bus"].update(urls=BROKERS), "bus.urls", "under url:"),
        ("bus.yaml", lambda d: d["bus"].update(failover="random"), "bus.failover", "shuffle"),
        (
            "redis.yaml",
            lambda d: d["redis"].update(sentinel=["s0"], sentinel_service="m"),
            "redis.sentinel.0",
            "host:port",
        ),
        (
            "redis.yaml",
            lambda d: d["redis"].update(sentinel=["s0:26379"]),
            "redis.sentinel_service",
            "required",
        ),
        ("redis.yaml", lambda d: d["redis"].update(sentinel_service="m"), "redis.sentinel", "required"),
        ("redis.yaml", lambda d: d["redis"].pop("url"), "redis.url", "required key is missing"),
        ("redis.yaml", lambda d: d["redis"].update(url="amqp://x/"), "redis.url", "redis://"),
        (
            "redis.yaml",
            lambda d: d["redis"].update(settle_wait_replicas=-1),
            "redis.settle_wait_replicas",
            "0",
        ),
    ],
)
def test_endpoint_mistakes_name_the_file_and_key(config_copy, file, change, key, expected):
    edit(config_copy, file, change)
    with pytest.raises(ConfigError) as caught:
        load_settings(config_copy, environ=KEYS)
    assert caught.value.file.endswith(file)
    assert (caught.value.key, expected in caught.value.problem) == (key, True), caught.value


def test_a_config_error_never_quotes_a_broker_password(config_copy):
    edit(config_copy, "bus.yaml", lambda d: d["bus"].update(url=BROKERS, urls=BROKERS, prefetch="x"))
    with pytest.raises(ConfigError) as caught:
        load_settings(config_copy, environ=KEYS)
    assert ":p@" not in str(caught.value)
    edit(config_copy, "bus.yaml", lambda d: (d["bus"].pop("urls"), d["bus"].update(url=[*BROKERS, 7])))
    with pytest.raises(ConfigError) as caught:
        load_settings(config_copy, environ=KEYS)
    assert ":p@" not in str(caught.value)


def test_every_key_of_a_ledger_step_shares_the_prefix_slot():
    """With the shipped advice (a hash tag in the prefix), the reserve/settle script's keys, the
    answer it stores and the claim read with it all hash to one Redis Cluster slot; without a
    tag they spread, which Redis Cluster refuses for one script (CROSSSLOT)."""

    def keys(prefix: str) -> list[str]:
        client = aioredis.Redis()  # never connected: the objects only name their keys
        results = ResultStore(SingleFlight(client, prefix, "w"), prefix)
        budget = Budget(max_cost_per_task=1, max_cost_per_day=1, max_cost_per_agent_day={})
        ledger = BudgetLedger(client, prefix, budget, reservation_ttl_s=60, result_key=results.key)
        step = ledger._keys("r1", "tok", ledger.scopes("writer", "task-1"))
        return [*step, f"{prefix}flight:req:r1", f"{prefix}worker:w"]  # the claim and heartbeat

    assert len({key_slot(k.encode()) for k in keys("{llmw}:")}) == 1
    assert len({key_slot(k.encode()) for k in keys("llmw:")}) > 1


async def test_worker_starts_when_its_first_broker_is_down_and_never_logs_its_password(
    config, amqp_url, names, fake
):
    dead = f"amqp://llmw:dead-node-secret-4821@127.0.0.1:{free_port()}/"
    folder = config(bus={"url": [dead, amqp_url], "failover": "in_order"})
    worker = await WorkerProcess(folder).start()
    try:
        async with raw_peer(amqp_url, names.request_queue) as peer:
            await peer.publish(request_body("through the second broker"))
            [reply] = await peer.wait_replies(1)
        assert LLMResult.model_validate_json(reply.body).status is Status.ok
    finally:
        await worker.stop()
    logged = "\n".join(json.dumps(line) for line in worker.lines)
    assert worker.events("broker.unreachable"), logged[-2000:]
    assert "dead-node-secret-4821" not in logged
