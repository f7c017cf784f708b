"""Worker configuration for tests: unique names per test, Router deployments served by the fake
provider, and the four YAML files the worker reads, written to a folder."""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import redis.asyncio as aioredis
import yaml

from tests.support.paths import ROOT


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
    callers: dict[str, Any] | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    # Tests publish as guest, mostly without user_id: identity is the concern of tests/boundary/.
    (folder / "callers.yaml").write_text(yaml.safe_dump({"callers": callers or {"mode": "development"}}))
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


# With the input price at 0 and max_tokens equal to the fake's 7 completion tokens, the worst
# case reserved before a call equals its actual cost, so the number of calls a budget admits is
# exact, whatever the interleaving.
PRICE_OUT = 1e-4
COST = 7 * PRICE_OUT


def exact_llm(base_url: str, **overrides: Any) -> dict[str, Any]:
    models = [deployment("primary", "primary", base_url, price=(0.0, PRICE_OUT))]
    return llm_section(base_url, max_tokens=7, models=models, **overrides)


def offline_config(folder: Path, names: Names) -> Path:
    """A copy of the shipped ``config/offline/`` in ``folder``, on this test's queues and Redis prefix."""
    shutil.copytree(ROOT / "config" / "offline", folder)
    bus = yaml.safe_load((folder / "bus.yaml").read_text())
    bus["bus"].update(
        request_queue=names.request_queue,
        results_exchange=names.results_exchange,
        dead_letter_exchange=names.dead_letter_exchange,
        dead_letter_queue=names.dead_letter_queue,
    )
    (folder / "bus.yaml").write_text(yaml.safe_dump(bus))
    redis = yaml.safe_load((folder / "redis.yaml").read_text())
    redis["redis"]["key_prefix"] = names.prefix
    (folder / "redis.yaml").write_text(yaml.safe_dump(redis))
    return folder


async def remove_names(n: Names, amqp_url: str, redis_url: str) -> None:
    """Delete a test's queues, exchanges and Redis keys."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:  # RabbitMQ deletes what does not exist without complaint
        channel = await connection.channel()
        for queue in (n.request_queue, f"{n.request_queue}.batch", n.dead_letter_queue):
            await channel.queue_delete(queue)
        for exchange in (n.results_exchange, n.dead_letter_exchange):
            await channel.exchange_delete(exchange)
    client = aioredis.Redis.from_url(redis_url)
    async with client:
        keys = [k async for k in client.scan_iter(match=f"{n.prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
