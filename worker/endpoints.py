"""Where the services are: the broker list and the Redis endpoint (a URL or Sentinel), checked
at start-up so that a mistake stops the worker with one line naming the file and the key.

``bus.url`` takes one broker or a list of a cluster's nodes; ``AMQP_URL`` may hold several joined
by ``;`` (as kombu accepts them), and ``AMQP_PASSWORD_FILE`` names a file (a Compose or Kubernetes
secret) holding the password of every one, so that no URL in the environment carries it.
``redis`` takes ``url``, or ``sentinel`` (``host:port`` list) with ``sentinel_service``; with
Sentinel, ``url`` (``REDIS_URL``) only lends the primary's password and database number. Used by
worker/settings.py; nothing here opens a connection.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from worker.errors import ConfigError

if TYPE_CHECKING:
    from worker.settings import BusSettings, RedisSettings

AMQP_SCHEMES = ("amqp", "amqps")
REDIS_SCHEMES = ("redis", "rediss", "unix")


def broker_url_list(file: str, data: dict[str, Any]) -> dict[str, Any]:
    """``bus:`` as written -> ``url`` the first broker, ``urls`` all of them. Raised here, not by
    pydantic, whose messages would quote the whole section, passwords and all."""
    raw = data.get("url")
    if "urls" in data:
        raise ConfigError(file, "bus.urls", "list several brokers under url: [amqp://a, amqp://b]")
    if isinstance(raw, str) and ";" in raw:
        raw = [part.strip() for part in raw.split(";") if part.strip()]
    if isinstance(raw, list):
        if not raw:
            raise ConfigError(file, "bus.url", "an empty list: name at least one broker")
        return {**data, "url": raw[0], "urls": raw}
    return data


PASSWORD_FILE_VAR = "AMQP_PASSWORD_FILE"  # noqa: S105 - a variable's name


def with_broker_password(data: dict[str, Any], password_file: str) -> dict[str, Any]:
    """``bus:`` (after :func:`broker_url_list`) with the password read from ``password_file``
    written, percent-encoded, into every broker URL. Each URL must name its user and no password:
    two sources of one password would drift apart (issue #15, deploy/rabbitmq/). The file holds
    one line, surrounding whitespace not part of it: what ``rabbitmqctl change_password`` reads."""
    try:
        lines = Path(password_file).read_text(encoding="utf-8").strip().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(PASSWORD_FILE_VAR, password_file, f"cannot read it ({reason}): mount the secret "
                          f"there, or unset {PASSWORD_FILE_VAR}") from None  # fmt: skip
    if len(lines) > 1:  # rabbitmqctl would take the first line only (deploy/rabbitmq/set-passwords.sh)
        raise ConfigError(
            PASSWORD_FILE_VAR, password_file, "the file holds more than one line: keep only the password"
        )
    password = lines[0].strip() if lines else ""
    if not password:
        raise ConfigError(
            PASSWORD_FILE_VAR, password_file, "the file is empty: write the broker password in it"
        )
    urls = data.get("urls") or [data.get("url")]
    if not all(isinstance(url, str) for url in urls):
        return data  # not a URL: the model's validation names it
    filled = [_with_password(url, password, i if len(urls) > 1 else None) for i, url in enumerate(urls)]
    return {**data, "url": filled[0], **({"urls": filled} if "urls" in data else {})}


def _with_password(url: str, password: str, index: int | None) -> str:
    parts = urlsplit(url)
    key = "bus.url" if index is None else f"bus.url.{index}"
    if parts.password is not None:
        raise ConfigError(PASSWORD_FILE_VAR, key, "this URL holds a password too: drop it from the URL "
                          "(amqp://USER@host:5672/), the file gives it")  # fmt: skip
    if not parts.username:
        raise ConfigError(PASSWORD_FILE_VAR, key, "this URL names no user: write amqp://USER@host:5672/")
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username}:{quote(password, safe='')}@{host}").geturl()


def check_bus(file: str, bus: BusSettings) -> None:
    for i, url in enumerate(bus.urls):
        scheme = urlsplit(url.get_secret_value()).scheme
        if scheme not in AMQP_SCHEMES:
            key = f"bus.url.{i}" if len(bus.urls) > 1 else "bus.url"
            raise ConfigError(file, key, f"expected an amqp:// or amqps:// URL (got scheme {scheme!r})")
    if len({u.get_secret_value() for u in bus.urls}) < len(bus.urls):
        raise ConfigError(file, "bus.url", "the same broker is listed twice")


def sentinel_address(entry: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``; ValueError saying what is wrong."""
    host, sep, port = entry.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, e.g. sentinel-0:26379 (got {entry!r})")
    return host.strip("[]"), int(port)


def check_redis(file: str, redis: RedisSettings) -> None:
    for i, entry in enumerate(redis.sentinel):
        try:
            sentinel_address(entry)
        except ValueError as exc:
            raise ConfigError(file, f"redis.sentinel.{i}", str(exc)) from None
    if redis.sentinel and redis.sentinel_service is None:
        raise ConfigError(file, "redis.sentinel_service", "required with redis.sentinel (its master name)")
    if redis.sentinel_service is not None and not redis.sentinel:
        raise ConfigError(file, "redis.sentinel", "required with redis.sentinel_service (host:port list)")
    if redis.sentinel_password is not None and not redis.sentinel:
        raise ConfigError(file, "redis.sentinel_password", "only used with redis.sentinel")
    if redis.url is None and not redis.sentinel:
        raise ConfigError(file, "redis.url", "required key is missing (or give redis.sentinel)")
    for key in ("url", "cache_url"):
        value = getattr(redis, key)
        scheme = urlsplit(value.get_secret_value()).scheme if value is not None else "redis"
        if scheme not in REDIS_SCHEMES:
            raise ConfigError(file, f"redis.{key}", f"expected a redis:// or rediss:// URL (got {scheme!r})")
