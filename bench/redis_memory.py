"""What each answered request leaves in Redis, per kind of key, measured with MEMORY USAGE (#22).

One worker process against the shared broker and Redis (a private prefix), the fake provider
answering at once: N requests with one-line answers and N with long ones, the response cache on
(each request asks for ``cache_ttl``). Then every key under the run's prefix is sized with
``MEMORY USAGE`` and grouped by kind; the figures feed the sizing formula in docs:

    memory = rate x (result_ttl_s x (result + settled) + cache_ttl x cache entry) + ledger scopes

Run: ``python bench/redis_memory.py [--requests 200] [--long-chars 2000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import redis.asyncio as aioredis
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import describe
from bench.sizing import services, write_config
from tests.support.processes import WorkerProcess
from worker.client import LLMClient
from worker.messages import Status

KINDS = ("result", "settled", "cache", "resv", "budget", "flight", "worker")


def kind_of(key: str, prefix: str) -> str:
    rest = key[len(prefix) :]
    head = rest.split(":", 1)[0]
    if head == "budget":
        return "budget (scope set)" if rest.endswith(":resv") else "budget (scope hash)"
    return head if head in KINDS else "other"


async def sizes(redis: aioredis.Redis, prefix: str) -> dict[str, int]:
    """Bytes of every key under ``prefix``."""
    found: dict[str, int] = {}
    async for raw in redis.scan_iter(match=f"{prefix}*", count=1000):
        usage = await redis.memory_usage(raw, samples=0)
        if usage is not None:
            found[raw.decode()] = int(usage)
    return found


def by_kind(keys: dict[str, int], prefix: str) -> dict[str, list[int]]:
    grouped: dict[str, list[int]] = defaultdict(list)
    for key, usage in keys.items():
        grouped[kind_of(key, prefix)].append(usage)
    return grouped


async def send(client: LLMClient, count: int, model: str, tag: str) -> None:
    async def one(i: int) -> None:
        result = await client.complete(
            f"{tag} request {i}: a distinct prompt", agent="writer", model=model, cache_ttl=600, timeout_s=60
        )
        assert result.status is Status.ok, result.error

    for start in range(0, count, 50):
        await asyncio.gather(*(one(i) for i in range(start, min(count, start + 50))))


async def main(args: argparse.Namespace) -> None:
    print(describe())
    print(f"# {args.requests} requests per answer size, cache on (cache_ttl 600 s), MEMORY USAGE samples=0")
    async with services(latency_ms=0) as env:
        config = write_config(env.folder, env.tag, env.base_url, 64, env.amqp, env.redis)
        llm = yaml.safe_load((config / "llm.yaml").read_text())
        model = dict(llm["llm"]["models"][0], model_name="long")
        model["litellm_params"] = {**model["litellm_params"], "model": f"openai/long{args.long_chars}"}
        llm["llm"]["models"].append(model)
        llm["llm"]["max_tokens"] = 1024
        (config / "llm.yaml").write_text(yaml.safe_dump(llm))
        prefix = f"bench:{env.tag}:"
        redis = aioredis.Redis.from_url(env.redis)
        worker = await WorkerProcess(config, keep_lines=False).start()
        try:
            async with LLMClient(env.amqp, request_queue=f"bench.{env.tag}.requests") as client:
                rows = []
                for label, name in (("one-line answer", "bench"), (f"{args.long_chars}-char answer", "long")):
                    before = await sizes(redis, prefix)
                    await send(client, args.requests, name, label)
                    after = await sizes(redis, prefix)
                    # new keys, and the shared ones (budget scopes, heartbeat) as they are now
                    grouped = by_kind({k: v for k, v in after.items() if k not in before}, prefix)
                    shared = by_kind({k: v for k, v in after.items() if k in before}, prefix)
                    for kind in sorted({*grouped, *shared}):
                        values = grouped.get(kind) or shared[kind]
                        rows.append((label, kind, len(values), statistics.median(values), sum(values)))
        finally:
            await worker.terminate()
            await redis.aclose()
    print(f"{'answers':22s} {'kind':22s} {'new keys':>8s} {'median B/key':>13s} {'total B':>10s}")
    for label, kind, keys, median, total in rows:
        print(f"{label:22s} {kind:22s} {keys:8d} {median:13.0f} {total:10d}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--long-chars", type=int, default=2000)
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
