"""deploy/compose.cluster.yaml (issue #20), checked offline like deploy/compose.yaml: the
Compose schema, and a topology that the worker's config really points at: three RabbitMQ nodes
that form one cluster, Redis with a replica and three Sentinels, workers that know them all.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.deploy.shipped import DEPLOY, WORKER_USER, check_broker_loads_the_definitions, env_refs
from tests.deploy.test_compose import interpolate
from tests.support.paths import ROOT
from worker.settings import Settings, load_settings

COOKIE = {"RABBITMQ_ERLANG_COOKIE": "test-cookie"}
NODES = ("rabbitmq-0", "rabbitmq-1", "rabbitmq-2")
SENTINELS = ("sentinel-0", "sentinel-1", "sentinel-2")


def services() -> dict[str, Any]:
    loaded = interpolate(yaml.safe_load((DEPLOY / "compose.cluster.yaml").read_text()), COOKIE)
    found: dict[str, Any] = loaded["services"]
    return found


@pytest.fixture
def worker_settings(tmp_path: Path) -> Settings:
    """What a worker container loads: config/ with the mounted redis.yaml, and its environment."""
    worker = services()["worker"]
    folder = tmp_path / "config"
    shutil.copytree(ROOT / "config", folder, ignore=shutil.ignore_patterns("offline"))
    for mount in worker["volumes"]:
        source, target, _ = mount.split(":")
        if target == "/app/config/redis.yaml":
            shutil.copy(DEPLOY / source, folder / "redis.yaml")
    secret_names = env_refs(yaml.safe_load((ROOT / "config" / "llm.yaml").read_text()))
    password = tmp_path / WORKER_USER  # the secret the worker's AMQP_PASSWORD_FILE names
    password.write_text("from-the-secret\n")
    assert worker["environment"]["AMQP_PASSWORD_FILE"] == f"/run/secrets/{WORKER_USER}"
    assert worker["secrets"] == [WORKER_USER]
    environ = {**dict.fromkeys(secret_names, "placeholder"), "AMQP_URL": worker["environment"]["AMQP_URL"],
               "AMQP_PASSWORD_FILE": str(password)}  # fmt: skip
    return load_settings(folder, environ=environ)


def test_compose_cluster_file_matches_the_compose_specification():
    done = subprocess.run(
        [str(Path(sys.executable).parent / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
         str(DEPLOY / "compose.cluster.yaml")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_three_rabbitmq_nodes_form_one_cluster():
    found = services()
    conf = (DEPLOY / "cluster" / "rabbitmq-cluster.conf").read_text()
    listed = re.findall(r"^cluster_formation\.classic_config\.nodes\.\d+\s*=\s*rabbit@(\S+)", conf, re.M)
    assert tuple(listed) == NODES
    cookies = set()
    for name in NODES:
        node = found[name]
        assert node["hostname"] == name, "the node name rabbit@<hostname> is what the others look for"
        assert any(v.endswith(":/etc/rabbitmq/conf.d/20-cluster.conf:ro") for v in node["volumes"])
        assert any(v.startswith("./rabbitmq.conf:") for v in node["volumes"]), "consumer_timeout too"
        cookies.add(node["environment"]["RABBITMQ_ERLANG_COOKIE"])
    assert cookies == {"test-cookie"}, "one shared Erlang cookie"


def test_workers_know_every_broker_and_log_in_as_the_brokers_user(worker_settings):
    urls = [urlsplit(u.get_secret_value()) for u in worker_settings.bus.urls]
    assert [u.hostname for u in urls] == list(NODES)
    assert {(u.username, u.password) for u in urls} == {(WORKER_USER, "from-the-secret")}
    assert worker_settings.bus.failover == "shuffle"  # a fleet spreads over the three


def test_every_node_loads_the_definitions_with_a_password_secret_per_user():
    loaded = interpolate(yaml.safe_load((DEPLOY / "compose.cluster.yaml").read_text()), COOKIE)
    for name in NODES:
        check_broker_loads_the_definitions(name, loaded["services"][name], loaded)


def test_workers_find_the_redis_primary_through_the_sentinels_compose_runs(worker_settings):
    found = services()
    redis = worker_settings.redis
    assert redis.url is None and redis.settle_wait_replicas == 1
    assert {entry.split(":")[0] for entry in redis.sentinel} == set(SENTINELS)
    for name in SENTINELS:
        script = found[name]["command"][-1]
        [(service, host, quorum)] = re.findall(r"sentinel monitor (\S+) (\S+) 6379 (\d)", script)
        assert (service, int(quorum)) == (redis.sentinel_service, 2), "two of three Sentinels agree"
        assert host in found and "redis-server" in found[host]["command"]
    replica = found["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1] == "redis-primary"
    needs = services()["worker"]["depends_on"]
    assert set(needs) == {*NODES, *SENTINELS, "redis-replica"}
    assert {v["condition"] for v in needs.values()} == {"service_healthy"}


def test_the_erlang_cookie_must_be_chosen():
    with pytest.raises(KeyError, match="RABBITMQ_ERLANG_COOKIE is required"):
        interpolate(yaml.safe_load((DEPLOY / "compose.cluster.yaml").read_text()), {})


def test_the_offline_profile_gets_the_sentinel_config_too():
    mounts = {m.split(":")[1]: m.split(":")[0] for m in services()["worker"]["volumes"]}
    assert mounts["/app/config/redis.yaml"] == mounts["/app/config/offline/redis.yaml"]
