"""A burst against a provider account with a requests-per-minute limit, with and without the
worker's shared rate limits (issue #19).

Three worker processes share one queue; the fake provider answers 429 past ``--rpm`` requests
in any sliding minute to the primary model (the account's limit); a pricier backup model is not
limited. With the limit configured (``rpm`` on the primary deployment) the replicas share one
window in Redis and wait for room; without it, each replica calls until the provider says 429,
retries, and falls back to the backup. Prints, per run: 429s the provider sent, requests
answered, by which model, fallbacks, and the time the burst took.

Run: ``python bench/ratelimit.py [--rpm 60] [--requests 100]`` (about three minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import describe
from tests.fakes.openai_server import FakeOpenAI
from tests.support.bodies import request_body
from tests.support.config import Names, deployment, llm_section, remove_names, write_config
from tests.support.peers import raw_peer
from tests.support.processes import WorkerProcess, start_replicas


@dataclass
class Row:
    label: str
    sent: int
    ok: int = 0
    rate_limited: int = 0  # 429s the provider sent
    fallbacks: int = 0
    models: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0

    def line(self) -> str:
        models = ", ".join(f"{m} {n}" for m, n in sorted(self.models.items()))
        return (
            f"{self.label:24s} sent {self.sent:4d}  ok {self.ok:4d}  provider 429s {self.rate_limited:4d}  "
            f"fallbacks {self.fallbacks:4d}  by model: {models:24s} {self.elapsed_s:6.1f} s"
        )


def burst_config(
    folder: Path, names: Names, amqp_url: str, redis_url: str, base_url: str, rpm: int | None
) -> Path:
    """Primary (``rpm`` on its deployment when given) and a pricier, unlimited backup."""
    primary = deployment("primary", "primary", base_url, price=(1e-6, 2e-6))
    if rpm is not None:
        primary["litellm_params"]["rpm"] = rpm
    backup = deployment("backup", "backup", base_url, price=(1e-5, 2e-5))  # ten times the price
    llm = llm_section(
        base_url,
        models=[primary, backup],
        default_model="primary",
        agent_models={},
        fallback_models=["backup"],
        deadline_s=150,
        timeout=10,
        num_retries=3,
        cache_ttl=0,
    )
    return write_config(folder, names, amqp_url, redis_url, llm, {"delivery_limit": 5})


async def burst(
    make_config: Callable[[int | None], Path],
    fake: FakeOpenAI,
    amqp_url: str,
    request_queue: str,
    procs: list[WorkerProcess],
    *,
    limited_rpm: int | None,
    requests: int,
    replicas: int = 3,
    label: str = "",
) -> Row:
    """``requests`` at once into ``replicas`` workers; the fake's own limit must be set by the caller."""
    config = make_config(limited_rpm)
    started_procs = await start_replicas(config, replicas, procs)
    fake.reset()
    fake.rate_limited = 0
    row = Row(label or ("limits configured" if limited_rpm else "no limits configured"), requests)
    started = time.monotonic()
    async with raw_peer(amqp_url, request_queue) as peer:
        for i in range(requests):
            await peer.publish(request_body(f"burst {i} {uuid.uuid4().hex[:6]}", use_cache=False))
        await peer.wait_replies(requests, timeout_s=400)
    row.elapsed_s = time.monotonic() - started
    for result in peer.results():
        row.ok += result.status.value == "ok"
        row.fallbacks += result.fallback_used
        row.models[result.model or "none"] += 1
    row.rate_limited = fake.rate_limited
    for proc in started_procs:
        await proc.terminate()
    return row


async def main(args: argparse.Namespace) -> None:
    print(describe())
    print(f"# {args.requests} requests at once into 3 replicas; the provider allows {args.rpm}/min")
    amqp = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    fake = await FakeOpenAI().start()
    fake.rpm_limit, fake.rpm_model = args.rpm, "primary"
    try:
        for rpm in (args.rpm, None):
            names, procs = Names(), []
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp) / "cfg"
                try:
                    row = await burst(
                        lambda limited: burst_config(folder, names, amqp, redis_url, fake.base_url, limited),  # noqa: B023
                        fake,
                        amqp,
                        names.request_queue,
                        procs,
                        limited_rpm=rpm,
                        requests=args.requests,
                    )
                finally:
                    for proc in procs:
                        await proc.stop()
                    await remove_names(names, amqp, redis_url)
            print(row.line(), flush=True)
            if rpm:
                await asyncio.sleep(61)  # the provider's window empties before the next run
    finally:
        await fake.stop()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rpm", type=int, default=60)
    parser.add_argument("--requests", type=int, default=100)
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
