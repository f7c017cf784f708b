"""Soak: a steady load on two worker processes for many minutes, sampling what could grow (#22).

A provider answering in ~1 s, an open-loop load at ``--rate`` requests/s spread over both
workers, the cache off, answers kept for ``--result-ttl-s`` (short, so that the result store
reaches its plateau inside the run). Every ``--every-s`` it prints, per worker, RSS, open file
descriptors and asyncio tasks (from ``/metrics``), and Redis ``used_memory``, the run's keys by
kind and the request queue's depth. Flat lines, or growth that stops where the sizing formula
says (results: rate x result_ttl_s keys), mean nothing leaks.

Run: ``python bench/soak.py [--minutes 10] [--rate 40]`` (not part of the test suite).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import aio_pika
import aiohttp
import redis.asyncio as aioredis
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import describe
from bench.redis_memory import kind_of
from bench.sizing import memory_mib, services, write_config
from tests.support.processes import WorkerProcess
from worker.client import LLMClient, LLMClientError
from worker.messages import Status


async def metric(port: int, name: str) -> float:
    """One gauge from a worker's /metrics; NaN when the scrape fails (printed, not fatal)."""
    try:
        timeout = aiohttp.ClientTimeout(total=10)
        url = f"http://127.0.0.1:{port}/metrics"
        async with aiohttp.ClientSession(timeout=timeout) as http, http.get(url) as response:
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError):
        return float("nan")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


async def keys_by_kind(redis: aioredis.Redis, prefix: str) -> Counter[str]:
    kinds: Counter[str] = Counter()
    async for raw in redis.scan_iter(match=f"{prefix}*", count=5000):
        kinds[kind_of(raw.decode(), prefix)] += 1
    return kinds


async def main(args: argparse.Namespace) -> None:
    print(describe())
    print(
        f"# {args.minutes:g} min, {args.rate:g} req/s open loop over 2 workers, "
        f"provider {args.latency_ms:g} ms, result_ttl_s {args.result_ttl_s}, cache off; "
        f"a sample every {args.every_s:g} s"
    )
    async with services(latency_ms=args.latency_ms) as env:
        config = write_config(env.folder, env.tag, env.base_url, 256, env.amqp, env.redis)
        for name, key, value in (("redis", "result_ttl_s", args.result_ttl_s), ("llm", "deadline_s", 20)):
            data = yaml.safe_load((config / f"{name}.yaml").read_text())
            data[name][key] = value
            (config / f"{name}.yaml").write_text(yaml.safe_dump(data))
        prefix, queue = f"bench:{env.tag}:", f"bench.{env.tag}.requests"
        workers = [await WorkerProcess(config, keep_lines=False).start() for _ in range(2)]
        redis = aioredis.Redis.from_url(env.redis)
        connection = await aio_pika.connect(env.amqp)
        channel = await connection.channel()
        sent = answered = failed = 0
        pending: set[asyncio.Task[None]] = set()
        try:
            async with LLMClient(env.amqp, request_queue=queue, default_timeout_s=60) as client:

                async def one() -> None:
                    nonlocal answered, failed
                    prompt = f"soak {uuid.uuid4().hex}"
                    try:
                        result = await client.complete(prompt, agent="writer", use_cache=False)
                    except LLMClientError:  # a time-out: counted, the soak goes on
                        failed += 1
                        return
                    answered += result.status is Status.ok
                    failed += result.status is not Status.ok

                header = (
                    "t_s  sent  ok  failed  rss_mib(w1,w2)  fds(w1,w2)  tasks(w1,w2)  redis_used_mib  "
                    "results  settled  flight  other_keys  queue_depth"
                )
                print(header)
                started = time.monotonic()
                next_sample = started
                end = started + args.minutes * 60
                while (now := time.monotonic()) < end:
                    while sent < (now - started) * args.rate:
                        task = asyncio.create_task(one())
                        pending.add(task)
                        task.add_done_callback(pending.discard)
                        sent += 1
                    if now >= next_sample:
                        next_sample += args.every_s
                        pids = [w.pid for w in workers]
                        rss = [memory_mib(pid)[0] for pid in pids]
                        fds = [len(os.listdir(f"/proc/{pid}/fd")) for pid in pids]
                        tasks = [await metric(w.http_port, "llm_worker_asyncio_tasks") for w in workers]
                        used = int((await redis.info("memory"))["used_memory"]) / 2**20
                        kinds = await keys_by_kind(redis, prefix)
                        depth = (
                            await channel.declare_queue(queue, passive=True)
                        ).declaration_result.message_count
                        other = sum(v for k, v in kinds.items() if k not in ("result", "settled", "flight"))
                        print(
                            f"{now - started:5.0f} {sent:6d} {answered:6d} {failed:4d}  "
                            f"{rss[0]:6.1f},{rss[1]:6.1f}  {fds[0]:4d},{fds[1]:4d}  "
                            f"{tasks[0]:5.0f},{tasks[1]:5.0f}  {used:8.1f}  {kinds['result']:7d}  "
                            f"{kinds['settled']:7d}  {kinds['flight']:6d}  {other:6d}  {depth:6d}",
                            flush=True,
                        )
                    await asyncio.sleep(0.01)
                await asyncio.gather(*pending)
        finally:
            await connection.close()
            await redis.aclose()
            for worker in workers:
                await worker.terminate()
    predicted = args.rate * args.result_ttl_s
    print(f"# formula: results plateau at rate x result_ttl_s = {predicted:.0f} keys")
    print(f"# sent {sent}, ok {answered}, not ok or timed out {failed}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate", type=float, default=40, help="requests per second, both workers together")
    parser.add_argument("--latency-ms", type=float, default=1000)
    parser.add_argument("--result-ttl-s", type=int, default=120)
    parser.add_argument("--every-s", type=float, default=30)
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
