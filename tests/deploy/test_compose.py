"""deploy/compose.yaml (issue #8): the Compose specification schema, and a topology that matches
config/."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.deploy.shipped import DEPLOY, WORKER_USER, check_broker_loads_the_definitions, seconds
from tests.support.paths import ROOT
from worker.settings import load_settings


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ``${NAME}`` / ``${NAME:-default}`` / ``${NAME:?error}`` substitution, for the
    forms the compose files use."""
    if isinstance(value, str):
        return re.sub(r"\$\{(\w+)(?::([-?])([^}]*))?\}", lambda m: _substitute(m, env), value)
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    return value


def _substitute(match: re.Match[str], env: dict[str, str]) -> str:
    name, form, text = match.groups()
    if env.get(name):
        return env[name]
    if form == "?":
        raise KeyError(f"compose would stop: {name} is required ({text})")
    return text or ""


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    loaded: dict[str, Any] = interpolate(yaml.safe_load((DEPLOY / "compose.yaml").read_text()), env or {})
    return loaded


def test_compose_file_matches_the_compose_specification():
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(DEPLOY / "compose.yaml"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_runs_rabbitmq_4_and_redis_7_with_health_checks_before_the_workers():
    services = compose()["services"]
    rabbit, redis, worker = services["rabbitmq"], services["redis"], services["worker"]
    assert re.fullmatch(r"rabbitmq:4(\.\d+)*-management", rabbit["image"])
    assert rabbit["healthcheck"]["test"][0] == "CMD-SHELL"
    assert rabbit["healthcheck"]["test"][1].endswith("&& rabbitmq-diagnostics -q ping")
    assert re.fullmatch(r"redis:7(\.\d+)*(-\w+)?", redis["image"])
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert worker["depends_on"] == {
        "rabbitmq": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
    }
    assert (DEPLOY / worker["build"]["context"] / worker["build"]["dockerfile"]).resolve() == (
        DEPLOY / "Dockerfile"
    )


def test_compose_worker_can_be_scaled():
    worker = compose()["services"]["worker"]
    assert "container_name" not in worker, "a fixed container name forbids --scale worker=N"
    assert "ports" not in worker, "a published host port forbids --scale worker=N"


def test_compose_points_the_workers_at_its_broker_and_redis():
    services = compose()["services"]
    env = services["worker"]["environment"]
    amqp, redis = urlsplit(env["AMQP_URL"]), urlsplit(env["REDIS_URL"])
    assert (amqp.scheme, amqp.hostname, amqp.port) == ("amqp", "rabbitmq", 5672)
    assert (redis.scheme, redis.hostname, redis.port) == ("redis", "redis", 6379)
    assert {"rabbitmq", "redis"} <= set(services)


def test_compose_broker_loads_the_definitions_with_a_password_secret_per_user():
    check_broker_loads_the_definitions("rabbitmq", compose()["services"]["rabbitmq"], compose())


def test_compose_worker_logs_in_as_its_broker_user_with_the_password_from_its_secret(tmp_path, secret_names):
    """No password in the file: the URL names the user, AMQP_PASSWORD_FILE the secret's mount."""
    worker = compose()["services"]["worker"]
    env = worker["environment"]
    amqp = urlsplit(env["AMQP_URL"])
    assert (amqp.username, amqp.password) == (WORKER_USER, None)
    assert env["AMQP_PASSWORD_FILE"] == f"/run/secrets/{WORKER_USER}" and worker["secrets"] == [WORKER_USER]
    password = tmp_path / WORKER_USER
    password.write_text("from-the-secret\n")
    environ = {
        **dict.fromkeys(secret_names, "x"),
        "AMQP_URL": env["AMQP_URL"],
        "AMQP_PASSWORD_FILE": str(password),
    }
    bus = load_settings(ROOT / "config", environ=environ).bus
    assert urlsplit(bus.url.get_secret_value()).password == "from-the-secret"


def test_no_broker_password_is_in_the_repository():
    assert "deploy/secrets/" in (ROOT / ".gitignore").read_text().splitlines()
    tracked = subprocess.run(["git", "ls-files", "deploy/secrets"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    assert tracked == ""
    for name in ("compose.yaml", "compose.cluster.yaml"):
        assert "RABBITMQ_DEFAULT_PASS" not in (DEPLOY / name).read_text(), name


@pytest.mark.parametrize("profile", ["", "offline"])
def test_compose_mounts_the_config_folder_the_worker_reads(profile, secret_names):
    worker = compose({"WORKER_PROFILE": profile})["services"]["worker"]
    [mount] = worker["volumes"]
    source, target, mode = mount.split(":")
    assert (DEPLOY / source).resolve() == ROOT / "config" and mode == "ro"
    config_dir = Path(worker["environment"]["WORKER_CONFIG_DIR"])
    relative = config_dir.relative_to(target)
    environ = dict.fromkeys(secret_names, "placeholder")
    settings = load_settings(ROOT / "config" / relative, environ=environ)  # what the container loads
    assert settings.offline is (profile == "offline")


def test_compose_passes_exactly_the_provider_keys_config_reads(secret_names):
    env = compose()["services"]["worker"]["environment"]
    passed_through = {name for name, value in env.items() if value is None}
    assert passed_through == secret_names
    assert not {name for name, value in env.items() if "KEY" in name and value}, "no key in the file"


def test_compose_gives_workers_time_to_drain_and_the_broker_a_consumer_timeout(settings):
    worker = compose()["services"]["worker"]
    assert seconds(worker["stop_grace_period"]) > settings.bus.drain_timeout_s
    conf = (DEPLOY / "rabbitmq.conf").read_text()
    [timeout_ms] = re.findall(r"^consumer_timeout\s*=\s*(\d+)", conf, re.MULTILINE)
    assert int(timeout_ms) >= 300_000, "RabbitMQ advises against consumer timeouts under 5 minutes"
    assert int(timeout_ms) > 2 * settings.llm.deadline_s * 1000, "a request may be unacked this long"
    rabbit_volumes = compose()["services"]["rabbitmq"]["volumes"]
    assert any(v.startswith("./rabbitmq.conf:/etc/rabbitmq/conf.d/") for v in rabbit_volumes)
