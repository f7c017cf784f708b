"""Small requests while large ones arrive (issue #16): does one large request stall the rest?

One worker process, the fake provider answering at once. First ``--small`` one-word requests one
after another on an idle worker (the idle figure), then the same while ``--large`` requests of
~1 MiB (five messages of 199,000 characters) are published at once. Prints each phase's
end-to-end latency p50/p99/max of the small requests, and the ratio of the loaded p99 to the
idle one.

Run: ``python bench/large_requests.py [--large 60] [--small 40]`` (about a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import string
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import describe
from bench.priority import percentile
from tests.fakes.openai_server import FakeOpenAI
from tests.support.bodies import request_body
from tests.support.config import Names, llm_section, remove_names, write_config
from tests.support.peers import raw_peer
from tests.support.processes import WorkerProcess
from worker.client import LLMClient


def large_body(rng: random.Random) -> dict[str, object]:
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(5000)]
    text = " ".join(rng.choices(words, k=40_000))[:199_000]
    body = request_body(use_cache=False, max_tokens=16)
    body["messages"] = [{"role": "user", "content": text}] * 5
    return body


async def small_latencies(client: LLMClient, count: int) -> list[float]:
    latencies: list[float] = []
    for i in range(count):
        sent = time.monotonic()
        result = await client.complete(f"ping {i}", agent="writer", use_cache=False, max_tokens=16)
        assert result.status.value == "ok", result.error
        latencies.append((time.monotonic() - sent) * 1000)
        await asyncio.sleep(0.05)
    return latencies


def summary(name: str, values: list[float]) -> str:
    return (
        f"{name}: p50 {statistics.median(values):.1f} ms, p99 {percentile(values, 0.99):.1f} ms, "
        f"max {max(values):.1f} ms ({len(values)} requests)"
    )


@contextlib.asynccontextmanager
async def one_worker(prefetch: int) -> AsyncIterator[tuple[Names, str]]:
    """A worker process on its own names against the fake provider; (names, AMQP URL)."""
    amqp = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    budget = {"max_cost_per_task": 1e6, "max_cost_per_day": 1e6, "max_cost_per_agent_day": {}}
    names = Names()
    async with contextlib.AsyncExitStack() as stack:
        fake = await FakeOpenAI().start()
        stack.push_async_callback(fake.stop)
        stack.push_async_callback(remove_names, names, amqp, redis_url)
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        llm = llm_section(fake.base_url, cache_ttl=0, deadline_s=600, timeout=60, budget=budget)
        bus = {"prefetch": prefetch, "max_body_bytes": 2 * 1_048_576}
        config = write_config(Path(tmp) / "cfg", names, amqp, redis_url, llm, bus)
        worker = WorkerProcess(config, keep_lines=False)
        stack.push_async_callback(worker.stop)
        await worker.start()
        yield names, amqp


async def main(args: argparse.Namespace) -> None:
    print(describe())
    print(f"# one worker, prefetch {args.prefetch}; {args.large} requests of ~1 MiB, {args.small} small ones")
    rng = random.Random(16)
    bodies = [large_body(rng) for _ in range(args.large)]
    async with (
        one_worker(args.prefetch) as (names, amqp),
        raw_peer(amqp, names.request_queue) as peer,
        LLMClient(amqp, request_queue=names.request_queue, default_timeout_s=300) as client,
    ):
        await small_latencies(client, 5)  # warm
        idle = await small_latencies(client, args.small)
        for body in bodies:
            await peer.publish(body)
        loaded = await small_latencies(client, args.small)
        await peer.wait_replies(args.large, timeout_s=600)
    print(summary("small, idle worker", idle))
    print(summary(f"small, while {args.large} large arrive", loaded))
    print(f"p99 loaded / idle: {percentile(loaded, 0.99) / percentile(idle, 0.99):.1f}x")


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default in (("--large", 60), ("--small", 40), ("--prefetch", 64)):
        cli.add_argument(flag, type=int, default=default)
    asyncio.run(main(cli.parse_args()))
