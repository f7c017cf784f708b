"""What the budget ledger costs per request: one reserve and one settle, against a real Redis.

    python bench/ledger.py [--requests 3000] [--concurrency 64] [--redis redis://127.0.0.1:6379/0]

Compares, in the same run, with the naive after-the-fact counter most gateways use (one
INCRBYFLOAT per call after the provider answered), which cannot stop an overrun. Figures are
wall time per request (latency added to each request) and requests per second through the ledger,
and Redis's own CPU time per ledger step (``INFO commandstats``, ``evalsha``): Redis runs scripts
on one core, so 1 s / that time is how many steps one Redis, or one Redis Cluster slot, can take
(README, "Running on a cluster").
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis.asyncio as aioredis

from bench.machine import describe
from worker.settings import Budget
from worker.state.ledger import BudgetLedger, to_nano


async def run(redis_url: str, requests: int, concurrency: int) -> None:
    client = aioredis.Redis.from_url(redis_url, max_connections=concurrency * 2)
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    budget = Budget(max_cost_per_task=1e6, max_cost_per_day=1e9, max_cost_per_agent_day={"writer": 1e7})
    ledger = BudgetLedger(client, prefix, budget, reservation_ttl_s=180)
    result_json = '{"status":"ok","content":"' + "x" * 400 + '"}'

    async def reserve_settle(i: int) -> float:
        started = time.perf_counter()
        reservation = await ledger.reserve(f"r{i}", to_nano(0.002), ledger.scopes("writer", f"task-{i % 50}"))
        await ledger.settle(
            reservation, cost_nano=to_nano(0.0013), model="gpt-4.1-mini", result_json=result_json
        )
        return time.perf_counter() - started

    async def naive(i: int) -> float:
        started = time.perf_counter()
        await client.incrbyfloat(f"{prefix}naive:task-{i % 50}", 0.0013)
        return time.perf_counter() - started

    await client.config_resetstat()
    print(describe())
    print(
        f"# {requests} requests, concurrency 1 and {concurrency}; 3 scopes per request (task, agent-day, day)"
    )
    try:
        for name, step in (("ledger reserve+settle", reserve_settle), ("naive INCRBYFLOAT", naive)):
            for _ in range(200):  # warm-up: scripts loaded, connections open
                await step(0)
            latencies = sorted([await step(i) for i in range(requests)])
            p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
            sem = asyncio.Semaphore(concurrency)

            async def bounded(i: int, step=step, sem=sem) -> float:
                async with sem:
                    return await step(i)

            started = time.perf_counter()
            await asyncio.gather(*(bounded(i) for i in range(requests, 2 * requests)))
            rate = requests / (time.perf_counter() - started)
            print(
                f"{name:24s} sequential p50 {p50 * 1e6:7.0f} us  p99 {p99 * 1e6:7.0f} us   "
                f"concurrent {rate:8.0f} req/s"
            )
        stats = await client.info("commandstats")
        evalsha = stats.get("cmdstat_evalsha", {})
        if evalsha:
            per_step = float(evalsha["usec_per_call"])
            print(
                f"redis CPU per ledger step (reserve or settle, 3 scopes) {per_step:.1f} us over "
                f"{evalsha['calls']} steps: one Redis core takes {1e6 / per_step:,.0f} steps/s = "
                f"{1e6 / per_step / 2:,.0f} requests/s (reserve + settle)"
            )
    finally:
        await close(client, prefix)


async def close(client: aioredis.Redis, prefix: str) -> None:
    """Delete the run's keys (under ``prefix``), then close ``client``."""
    keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
    for i in range(0, len(keys), 500):
        await client.delete(*keys[i : i + 500])
    await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    asyncio.run(run(args.redis, args.requests, args.concurrency))


if __name__ == "__main__":
    main()
