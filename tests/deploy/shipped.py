"""deploy/ and config/ as shipped, for the deploy tests: paths, ports, how config/ names its
secrets, and how the compose files load the broker's definitions (deploy/rabbitmq/)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tests.support.paths import ROOT

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
CONFIG_FILES = ("llm.yaml", "bus.yaml", "redis.yaml", "callers.yaml")
HEALTH_PORT = 9464  # /livez, /readyz, /metrics
ENV_REF = "os.environ/"
BROKER_DIR = DEPLOY / "rabbitmq"
DEFINITIONS = BROKER_DIR / "definitions.json"
ENTRYPOINT = BROKER_DIR / "entrypoint.sh"
WORKER_USER = "llm-worker"


def broker_users() -> list[str]:
    """Every user deploy/rabbitmq/definitions.json creates."""
    return [user["name"] for user in json.loads(DEFINITIONS.read_text())["users"]]


def container_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """A compose service's bind mounts: container path -> the file or folder in the repository."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts[target] = (DEPLOY / source).resolve()
    return mounts


def in_repository(container_path: str, mounts: dict[str, Path]) -> Path:
    """Where a path inside a container comes from, through the service's bind mounts."""
    for target, source in mounts.items():
        if container_path == target or container_path.startswith(target + "/"):
            return source / container_path[len(target) :].lstrip("/")
    raise AssertionError(f"{container_path} is not mounted from the repository")


def definitions_path(conf: str) -> str:
    """The file a rabbitmq.conf has the node import at boot."""
    [path] = re.findall(r"^definitions\.local\.path\s*=\s*(\S+)$", conf, re.MULTILINE)
    assert re.search(r"^definitions\.import_backend\s*=\s*local_filesystem$", conf, re.MULTILINE)
    return str(path)


def check_broker_loads_the_definitions(name: str, service: dict[str, Any], compose: dict[str, Any]) -> None:
    """A RabbitMQ service of a compose file: started by entrypoint.sh, the shipped rabbitmq.conf
    in conf.d/ importing the shipped definitions, and a password secret for every user in them."""
    mounts = container_mounts(service)
    confs = [in_repository(t, mounts) for t in mounts if t.startswith("/etc/rabbitmq/conf.d/")]
    assert DEPLOY / "rabbitmq.conf" in confs, f"{name}: deploy/rabbitmq.conf in conf.d/"
    definitions = definitions_path((DEPLOY / "rabbitmq.conf").read_text())
    assert in_repository(definitions, mounts) == DEFINITIONS, (
        f"{name}: definitions.local.path is the shipped file"
    )
    [entrypoint] = service["entrypoint"]
    assert in_repository(entrypoint, mounts) == ENTRYPOINT, f"{name}: started by entrypoint.sh"
    assert sorted(service["secrets"]) == sorted(broker_users()), f"{name}: a password for every user"
    for user in broker_users():
        assert (DEPLOY / compose["secrets"][user]["file"]).resolve() == DEPLOY / "secrets" / user
    marker = re.search(r"PASSWORDS_MARKER:-([^}]+)}", ENTRYPOINT.read_text())
    assert marker is not None and f"test -e {marker[1]} &&" in service["healthcheck"]["test"][1], (
        f"{name}: healthy only once every password is set"
    )


def env_refs(value: Any) -> set[str]:
    """Every ``os.environ/NAME`` reference in a parsed YAML value."""
    if isinstance(value, str):
        return {value[len(ENV_REF) :]} if value.startswith(ENV_REF) else set()
    if isinstance(value, dict):
        return set().union(*(env_refs(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(env_refs(v) for v in value))
    return set()


def seconds(duration: str | int) -> float:
    """Compose durations: ``120s``, ``2m``, ``1m30s``."""
    if isinstance(duration, int):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    """Instructions (KEYWORD, arguments) per build stage, continuation lines joined."""
    stages: list[list[tuple[str, str]]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword.upper(), args.strip()))
    return stages
