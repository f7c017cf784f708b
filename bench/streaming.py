"""Time to first chunk of a streamed answer (issue #18): how long after the provider's first token
does the agent see it?

One worker process (``python -m worker run``) against the OpenAI wire-format fake
(``tests/fakes/openai_api.py``) in this process, streaming server-sent events: the first token
after ``--first-token-ms``, then a piece every ``--token-ms``. The fake notes when it wrote each
stream's first token, the client when the first ``llm.chunk`` arrived (one clock, one process),
so the difference is everything the worker and the bus add: litellm's stream parser, the
worker's chunk publisher, RabbitMQ, the client. Prints, for ``--requests`` answers one after
another, that lag and the end-to-end time to first chunk (p50/p95), and the chunks per answer
against the pieces the provider sent (the time batching, ``bus.stream_interval_ms``); then the
time to first chunk with ``--concurrency`` streams at once.

Run: ``python bench/streaming.py [--requests 100] [--concurrency 20]`` (about a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import describe
from bench.priority import percentile
from tests.fakes.base import pieces
from tests.fakes.openai_api import FakeOpenAIPlatform
from tests.support.config import Names, llm_section, remove_names, write_config
from tests.support.processes import WorkerProcess
from worker.client import LLMClient
from worker.messages import LLMChunk, LLMResult

REPLY = " ".join(f"word{i}" for i in range(60))


async def one_answer(client: LLMClient, fake: FakeOpenAIPlatform, i: int) -> tuple[float, float, int]:
    """(sent, first chunk received, chunks) of one streamed answer; monotonic seconds."""
    sent = time.monotonic()
    first: float | None = None
    chunks = 0
    async for item in client.stream(f"stream {i}", agent="writer", use_cache=False, max_tokens=128):
        if isinstance(item, LLMChunk):
            first = first if first is not None else time.monotonic()
            chunks += 1
        elif isinstance(item, LLMResult):
            assert item.status.value == "ok", item.error
    assert first is not None
    return sent, first, chunks


def lag(fake: FakeOpenAIPlatform, i: int, first: float) -> float:
    """From the provider's first token of answer ``i`` to its first chunk at the client."""
    return first - fake.first_token_of[f"stream {i}"]


@contextlib.asynccontextmanager
async def one_worker(args: argparse.Namespace) -> AsyncIterator[tuple[FakeOpenAIPlatform, LLMClient]]:
    amqp = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    budget = {"max_cost_per_task": 1e6, "max_cost_per_day": 1e6, "max_cost_per_agent_day": {"writer": 1e6}}
    names = Names()
    async with contextlib.AsyncExitStack() as stack:
        fake = await FakeOpenAIPlatform().start()
        stack.push_async_callback(fake.stop)
        fake.reply, fake.first_token_delay_s, fake.token_delay_s = (
            REPLY,
            args.first_token_ms / 1000,
            args.token_ms / 1000,
        )
        stack.push_async_callback(remove_names, names, amqp, redis_url)
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        deployment = {
            "model_name": "openai",
            "litellm_params": {
                "model": "openai/gpt-4.1-mini",
                "api_base": fake.api_base,
                "api_key": fake.api_key,
            },
            "model_info": {"input_cost_per_token": 4e-7, "output_cost_per_token": 1.6e-6},
        }
        llm = llm_section(fake.api_base, models=[deployment], default_model="openai", cache_ttl=0,
                          deadline_s=120, timeout=60, budget=budget)  # fmt: skip
        config = write_config(Path(tmp) / "cfg", names, amqp, redis_url, llm, {"prefetch": 64})
        worker = WorkerProcess(config, keep_lines=False)
        stack.push_async_callback(worker.stop)
        await worker.start()
        client = await stack.enter_async_context(
            LLMClient(amqp, request_queue=names.request_queue, default_timeout_s=120)
        )
        yield fake, client


def ms(values: list[float]) -> str:
    return f"p50 {statistics.median(values) * 1000:.1f} ms, p95 {percentile(values, 0.95) * 1000:.1f} ms"


async def main(args: argparse.Namespace) -> None:
    print(describe())
    print(
        f"# one worker; provider: first token after {args.first_token_ms:g} ms, then a piece every "
        f"{args.token_ms:g} ms, {len(pieces(REPLY))} pieces; bus.stream_interval_ms 30"
    )
    async with one_worker(args) as (fake, client):
        for i in range(3):  # warm: litellm's first stream, the connections
            await one_answer(client, fake, -i)
        lags, ttfc, chunks = [], [], []
        for i in range(args.requests):
            sent, first, count = await one_answer(client, fake, i)
            lags.append(lag(fake, i, first))
            ttfc.append(first - sent)
            chunks.append(count)
        print(
            f"sequential   first chunk after the provider's first token: {ms(lags)} ({args.requests} answers)"
        )
        print(f"sequential   time to first chunk, end to end: {ms(ttfc)}")
        median = statistics.median(chunks)
        print(f"sequential   chunks per answer: median {median:g} for {len(pieces(REPLY))} pieces")
        ids = range(10_000, 10_000 + args.concurrency)
        answers = await asyncio.gather(*(one_answer(client, fake, i) for i in ids))
        together = ms([first - sent for sent, first, _ in answers])
        behind = ms([lag(fake, i, first) for i, (_, first, _) in zip(ids, answers, strict=True)])
        print(f"concurrent   {args.concurrency} streams at once, time to first chunk: {together}")
        print(f"concurrent   first chunk after the provider's first token: {behind}")


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default in (("--requests", 100), ("--concurrency", 20)):
        cli.add_argument(flag, type=int, default=default)
    for flag, default_ms in (("--first-token-ms", 200.0), ("--token-ms", 20.0)):
        cli.add_argument(flag, type=float, default=default_ms)
    asyncio.run(main(cli.parse_args()))
