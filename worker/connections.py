"""The one place connections are opened: Redis pools and AMQP connections.

``app`` (the worker) and the CLI's tools (``budget``, ``dlq``) both open theirs here, so a
time-out, a retry policy or a failover rule is written once. This module imports neither
litellm nor the pipeline: the tools start without paying litellm's import.

- **Redis**: one server by URL, or the primary Redis Sentinel names (issue #20). With Sentinel,
  redis-py's ``SentinelConnectionPool`` asks the Sentinels for the primary's address each time it
  opens a connection, and drops idle connections when that address changes. A connection to a
  primary that was demoted answers writes with ``READONLY``; redis-py's
  ``SentinelManagedConnection`` turns that into a ``ConnectionError`` after disconnecting, and the
  client's retry then reconnects through the Sentinels to the promoted replica. Until the
  Sentinels agree on a new primary (``down-after-milliseconds`` plus an election, a few seconds),
  the ledger fails closed, as for a Redis restart.
- **AMQP**: the worker's robust connections go round every broker of ``bus.url``
  (:mod:`worker.broker_failover`); a one-shot tool connects plainly to the first.
"""

from __future__ import annotations

from typing import Any

import aio_pika
import aiormq
import redis.asyncio as aioredis
from aio_pika.abc import AbstractConnection, AbstractRobustConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.broker_failover import connect_failover, failover_order
from worker.endpoints import sentinel_address
from worker.errors import BrokerUnreachable
from worker.secrets import redact_url
from worker.settings import BusSettings, RedisSettings, Settings

# -- Redis -------------------------------------------------------------------------------------


class SentinelRedis(aioredis.Redis):
    """A client of the Sentinel-named primary that also closes its connections to the Sentinels."""

    sentinels: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinels is not None:
            await self.sentinels.aclose()


def redis(
    settings: Settings, url: str | None = None, *, max_connections: int | None = None
) -> aioredis.Redis:
    """A pooled client that rides out a blip (two quick retries) and then fails fast.

    ``url`` (e.g. ``cache_url``) names a plain Redis; without it, the configured one: Sentinel's
    primary when ``redis.sentinel`` is set, else ``redis.url``. ``max_connections``: a pool smaller
    than the pipeline's (the metrics endpoint's, which must never take one the pipeline needs).
    Retrying is safe because every write the worker makes is idempotent: ledger steps are keyed
    by reservation, flight claims by a token of their own.
    """
    r = settings.redis
    options: dict[str, Any] = {
        "socket_timeout": r.socket_timeout_s,
        "socket_connect_timeout": r.connect_timeout_s,
        "health_check_interval": 15,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        "max_connections": max_connections or max(64, settings.bus.prefetch * 2),
    }
    if url is not None or not r.sentinel:
        target = url or (r.url.get_secret_value() if r.url else "")
        return aioredis.Redis.from_url(target, **options)
    return _sentinel_primary(r, options)


def _sentinel_primary(r: RedisSettings, options: dict[str, Any]) -> aioredis.Redis:
    assert r.sentinel_service is not None  # endpoints.check_redis
    lent = aioredis.connection.parse_url(r.url.get_secret_value()) if r.url else {}
    sentinel_options: dict[str, Any] = {
        "socket_timeout": r.socket_timeout_s,
        "socket_connect_timeout": r.connect_timeout_s,
    }
    if r.sentinel_password is not None:
        sentinel_options["password"] = r.sentinel_password.get_secret_value()
    sentinels = Sentinel(  # type: ignore[no-untyped-call]
        [sentinel_address(entry) for entry in r.sentinel], sentinel_kwargs=sentinel_options
    )
    options.update({k: v for k, v in lent.items() if k in ("username", "password", "db")})
    client: SentinelRedis = sentinels.master_for(r.sentinel_service, redis_class=SentinelRedis, **options)
    client.sentinels = sentinels
    return client


def cache_redis(settings: Settings, ledger_redis: aioredis.Redis) -> aioredis.Redis:
    """The cache's client: its own pool on ``redis.cache_url``, else the ledger's client."""
    if settings.redis.cache_url is None:
        return ledger_redis
    return redis(settings, settings.redis.cache_url.get_secret_value())


def describe_redis(r: RedisSettings) -> str:
    """For logs: the URL without its password, or the Sentinels and the service."""
    if r.sentinel:
        return f"sentinel {r.sentinel_service} via {','.join(r.sentinel)}"
    return redact_url(r.url.get_secret_value()) if r.url else "-"


# -- AMQP --------------------------------------------------------------------------------------


def broker_order(settings: BusSettings) -> list[str]:
    """The brokers in the order this process tries them (``bus.failover``)."""
    return failover_order([u.get_secret_value() for u in settings.urls], settings.failover)


def describe_brokers(settings: BusSettings) -> str:
    return ";".join(redact_url(u.get_secret_value()) for u in settings.urls)


async def amqp_robust(settings: BusSettings, urls: list[str], *, name: str) -> AbstractRobustConnection:
    """A connection that reconnects by itself, to the next of ``urls`` when its node is gone, and
    restores its channels, QoS and consumers. Raises :class:`BrokerUnreachable` naming the fix
    when no broker of ``urls`` takes the connection at start-up."""
    try:
        return await connect_failover(urls, heartbeat=settings.heartbeat_s, connection_name=name)
    except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as exc:
        raise BrokerUnreachable(_unreachable(urls[0], exc)) from None


async def amqp_plain(settings: BusSettings, *, name: str) -> AbstractConnection:
    """A plain connection for a short-lived tool: if it drops, the broker requeues whatever the
    tool holds, and the operator runs it again. Raises :class:`BrokerUnreachable` naming the fix."""
    url = settings.url.get_secret_value()
    try:
        return await aio_pika.connect(url, client_properties={"connection_name": name})
    except (aiormq.exceptions.AMQPError, OSError) as exc:
        raise BrokerUnreachable(_unreachable(url, exc)) from None


def login_user(connection: object) -> str | None:
    """The broker user ``connection`` logged in as, which RabbitMQ requires in the AMQP ``user_id``
    of whatever it publishes (validated user-ID): with PLAIN login the URL's user, ``guest`` when
    it names none (as aiormq logs in). ``None`` with another mechanism (EXTERNAL: the user is the
    certificate's, not known here) or no connection."""
    if not isinstance(connection, aio_pika.Connection):
        return None
    url = connection.url  # the broker in use: FailoverConnection moves it on
    if url.query.get("auth", "plain").upper() != "PLAIN":
        return None
    return url.user or "guest"


def _unreachable(url: str, exc: BaseException) -> str:
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return (
            f"the broker at {redact_url(url)} refused the login (ACCESS_REFUSED); "
            "check the user and password in bus.url in bus.yaml, AMQP_URL or the file "
            "AMQP_PASSWORD_FILE names"
        )
    return (
        f"cannot reach the broker at {redact_url(url)} ({type(exc).__name__}: {exc}); "
        "check bus.url in bus.yaml or AMQP_URL"
    )
