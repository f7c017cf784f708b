"""Interactive requests ahead of a batch backlog (issue #19).

One worker process (interactive prefetch ``--prefetch``, batch prefetch ``--batch-prefetch``),
the fake provider answering in ``--latency-ms``; ``--batch`` requests published to the batch
queue at once, then ``--interactive`` requests one after another on the interactive queue while
the backlog is worked off. Prints each interactive request's wait before the worker started it
(end-to-end minus the worker's own time, which includes the provider call) as p50/p99, and how
many batch requests were answered meanwhile (the share batch work keeps).

Run: ``python bench/priority.py [--batch 1000] [--interactive 40]`` (about a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import describe
from tests.fakes.openai_server import FakeOpenAI
from tests.support.bodies import request_body
from tests.support.config import Names, llm_section, remove_names, write_config
from tests.support.peers import raw_peer
from tests.support.processes import WorkerProcess
from worker.client import LLMClient


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def main(args: argparse.Namespace) -> None:
    print(describe())
    print(
        f"# one worker: prefetch {args.prefetch} interactive + {args.batch_prefetch} batch; provider "
        f"{args.latency_ms:g} ms; {args.batch} batch requests queued, then {args.interactive} interactive"
    )
    amqp = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    fake = await FakeOpenAI(latency_s=args.latency_ms / 1000).start()
    names = Names()
    worker: WorkerProcess | None = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            bus = {"prefetch": args.prefetch, "batch_prefetch": args.batch_prefetch}
            llm = llm_section(fake.base_url, cache_ttl=0, deadline_s=600, timeout=60)
            config = write_config(Path(tmp) / "cfg", names, amqp, redis_url, llm, bus)
            worker = await WorkerProcess(config, keep_lines=False).start()
            async with (
                raw_peer(amqp, f"{names.request_queue}.batch") as batch,
                LLMClient(amqp, request_queue=names.request_queue, default_timeout_s=120) as client,
            ):
                for i in range(args.batch):
                    await batch.publish(request_body(f"summary {i} {uuid.uuid4().hex[:6]}", use_cache=False))
                await fake.wait_until(lambda f: f.in_flight >= args.batch_prefetch, timeout_s=60)
                waits: list[float] = []
                started = time.monotonic()
                before = len(batch.replies)
                for i in range(args.interactive):
                    sent = time.monotonic()
                    result = await client.complete(f"a person waits {i}", agent="writer", use_cache=False)
                    assert result.status.value == "ok", result.error
                    waits.append((time.monotonic() - sent) * 1000 - result.latency_ms)
                    await asyncio.sleep(max(0.0, 0.5 - (time.monotonic() - sent)))
                window_s = time.monotonic() - started
                batch_done = len(batch.replies) - before
        print(
            f"interactive wait before start: p50 {statistics.median(waits):.1f} ms, "
            f"p99 {percentile(waits, 0.99):.1f} ms, max {max(waits):.1f} ms ({len(waits)} requests)"
        )
        print(
            f"batch meanwhile: {batch_done} answered in {window_s:.1f} s ({batch_done / window_s:.1f}/s; "
            f"interactive {len(waits) / window_s:.1f}/s); {args.batch - before - batch_done} still queued"
        )
    finally:
        if worker is not None:
            await worker.stop()
        await fake.stop()
        await remove_names(names, amqp, redis_url)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--interactive", type=int, default=40)
    parser.add_argument("--prefetch", type=int, default=64)
    parser.add_argument("--batch-prefetch", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=1000)
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
