"""What an uncached request's Redis steps cost the worker: CPU of this process per request.

    python bench/request_state.py [--requests 2000] [--concurrency 50] [--rounds 5]

The steps the pipeline takes for a request that goes straight to the provider, against a real
Redis, measured the two ways in alternating rounds of the same run:

three scripts   result-store claim (single flight), ledger reserve, ledger settle with the answer
two scripts     claim and reserve in one script (``BudgetLedger.claiming``), then the settle (#21)

CPU is this process's (``time.process_time``): what the worker's event loop pays for redis-py,
asyncio and our wrappers per request, which is what issue #21 counts. Redis's own time is not in it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis.asyncio as aioredis

from bench.ledger import close
from bench.machine import describe
from worker.settings import Budget
from worker.state.flight import SingleFlight
from worker.state.ledger import BudgetLedger, to_nano
from worker.state.results import ResultStore, request_key


async def run(args: argparse.Namespace) -> None:
    client = aioredis.Redis.from_url(args.redis, max_connections=args.concurrency * 2)
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    budget = Budget(max_cost_per_task=1e6, max_cost_per_day=1e9, max_cost_per_agent_day={"writer": 1e7})
    ledger = BudgetLedger(client, prefix, budget, reservation_ttl_s=180)
    results = ResultStore(SingleFlight(client, prefix, "bench-worker"), prefix)
    answer = "abcd|" + '{"status":"ok","content":"' + "x" * 400 + '"}'
    worst, cost = to_nano(0.002), to_nano(0.0013)

    async def three(key: str) -> None:
        claim = await results.claim_or_wait(key, "fp", ttl_s=120, wait_until=time.monotonic() + 5)
        reservation = await ledger.reserve(key, worst, ledger.scopes("writer", "t"))
        await ledger.settle(reservation, cost_nano=cost, model="m", result_json=answer)
        results.forget(claim)

    async def two(key: str) -> None:
        first = ledger.claiming(key, worst, ledger.scopes("writer", "t"))
        wait_until = time.monotonic() + 5
        claim = await results.claim_or_wait(key, "fp", ttl_s=120, wait_until=wait_until, first=first)
        assert first.reservation is not None
        await ledger.settle(first.reservation, cost_nano=cost, model="m", result_json=answer)
        results.forget(claim)

    async def window(step, tag: str) -> float:
        sem = asyncio.Semaphore(args.concurrency)

        async def bounded(i: int) -> None:
            async with sem:
                await step(request_key("bench", "writer", f"{tag}-{i}"))

        cpu = time.process_time()
        await asyncio.gather(*(bounded(i) for i in range(args.requests)))
        return 1e6 * (time.process_time() - cpu) / args.requests

    print(describe())
    print(f"# {args.requests} requests per window at {args.concurrency} concurrent, {args.rounds} rounds")
    ways = {"three scripts": three, "two scripts": two}
    cpu_us: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for name, step in ways.items():  # warm-up: scripts loaded, connections open
            await window(step, f"warm-{name}")
        for turn in range(args.rounds):
            for name in list(ways)[turn % 2 :] + list(ways)[: turn % 2]:
                cpu_us[name].append(await window(ways[name], f"{turn}-{name}"))
        for name, values in cpu_us.items():
            print(
                f"{name:14s} {statistics.median(values):6.0f} us CPU/request (median of "
                f"{len(values)} rounds, {min(values):.0f}-{max(values):.0f})"
            )
        ratios = [b / a for a, b in zip(cpu_us["three scripts"], cpu_us["two scripts"], strict=True)]
        saved = statistics.median(cpu_us["three scripts"]) - statistics.median(cpu_us["two scripts"])
        print(
            f"two / three    x{statistics.median(ratios):.2f} per round "
            f"({min(ratios):.2f}-{max(ratios):.2f}): {saved:.0f} us CPU saved per request"
        )
    finally:
        await close(client, prefix)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
