"""How fast the worker is, as ratios within one run against one local fake provider (issue #9).

    .venv/bin/python bench/performance.py                 # every figure of the README (about 4 minutes)
    .venv/bin/python bench/performance.py --only slow     # one section: ratio, latency, slow, memory, scaling

The fake OpenAI server runs as its own process; workers are real ``python -m worker run``
processes (what the image runs) on private queues and Redis keys of the shared RabbitMQ and
Redis; load comes from :class:`LLMClient` in this process. Cache off and a distinct prompt per
request: every request is a full path (result-store claim, ledger reserve and settle, provider
call through litellm, reply with a publisher confirm, ack). Sections:

ratio    one worker's throughput vs raw ``litellm.acompletion`` calls from one process, both at
         the same concurrency against the zero-latency fake
latency  added latency at a steady open-loop load: the client's end-to-end time minus the time
         the worker spent in the provider call (its ``request.done`` line), p50 and p99
slow     a provider answering in 1 s: requests/s and calls held in flight by one worker, and
         the fake's peak of concurrent calls (a saturated HTTP pool would hold it below the worker's)
memory   the same with a provider answering in 10 s, so that one worker holds 500 calls at once:
         its resident memory idle and with them in flight
scaling  two and four replicas vs one, each kept full (``--per-replica`` in flight = its prefetch),
         with the 50 ms provider (CPU-bound) and the 1 s one (prefetch-bound)
start-up is measured on every worker started: spawn to its ``worker.ready`` line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import describe  # noqa: E402
from bench.sizing import (  # noqa: E402
    Loop,
    cpu_seconds,
    lanes,
    machine_busy_seconds,
    memory_mib,
    services,
    workers,
    write_config,
)
from tests.support.processes import LineHandler, WorkerProcess  # noqa: E402
from worker.client import LLMClient  # noqa: E402
from worker.messages import LLMResult, Status, Tokens  # noqa: E402

SLOW_MS = 1000  # the slow provider
MEMORY_MS = 10_000  # slow enough that one worker holds --slow-in-flight calls at once
LATENCY_MS = 50  # the provider of the latency section and the CPU-bound scaling


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))] if ordered else 0.0


def http_json(url: str, data: bytes | None = None) -> Any:
    with urllib.request.urlopen(url, data=data, timeout=5) as response:
        return json.loads(response.read())


def scrape_gauge(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise LookupError(name)


@dataclass
class Run(Loop):
    """One measured window: the lanes' answers, and the CPU of the processes involved."""

    worker_cpu_s: list[float] = field(default_factory=list)
    busy_pct: float = 0.0

    @property
    def rate(self) -> float:
        return self.ok / self.wall_s if self.wall_s else 0.0

    def cpu_ms_per_request(self) -> float:
        return 1000 * sum(self.worker_cpu_s) / max(self.ok, 1)

    def others(self) -> str:
        """Where the rest of the machine went: the load generator, RabbitMQ, Redis, the fake, other jobs."""
        cpus = os.cpu_count() or 1
        measured = 100 * sum(self.worker_cpu_s) / self.wall_s
        return (
            f"machine busy {self.busy_pct:.0f} % of {cpus} cpus (measured processes {measured:.0f} %, "
            f"everything else {self.busy_pct * cpus - measured:.0f} % of one cpu)"
        )


class Measure:
    """CPU of some processes and of the whole machine over a window."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.cpu0 = [cpu_seconds(pid) for pid in pids]
        self.busy0, self.t0 = machine_busy_seconds(), time.monotonic()

    def into(self, run: Run) -> Run:
        run.wall_s = time.monotonic() - self.t0
        run.worker_cpu_s = [cpu_seconds(pid) - c for pid, c in zip(self.pids, self.cpu0, strict=True)]
        run.busy_pct = 100 * (machine_busy_seconds() - self.busy0) / run.wall_s / (os.cpu_count() or 1)
        return run


async def open_loop(
    client: LLMClient, rate: float, duration_s: float, model: str | None = None
) -> dict[str, float]:
    """One request every ``1 / rate`` s whatever the answers do; end-to-end ms by request_id."""
    end_to_end: dict[str, float] = {}

    async def one() -> None:
        request_id = uuid.uuid4().hex
        started = time.monotonic()
        result = await client.complete(
            f"latency {request_id}", agent="writer", model=model, use_cache=False, timeout_s=60,
            request_id=request_id,
        )  # fmt: skip
        if result.status is Status.ok:
            end_to_end[request_id] = 1000 * (time.monotonic() - started)

    tasks = []
    for _ in range(int(rate * duration_s)):
        tasks.append(asyncio.create_task(one()))
        await asyncio.sleep(1 / rate)
    await asyncio.gather(*tasks)
    return end_to_end


@contextlib.asynccontextmanager
async def echo_service(amqp: str, queue: str) -> AsyncIterator[str]:
    """The floor under the worker: a quorum queue like the worker's and a consumer that answers
    every request at once with a fixed ok result (reply, then ack, as the worker does)."""
    connection = await aio_pika.connect(amqp)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=256)
        declared = await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})

        async def answer(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            request = json.loads(message.body)
            result = LLMResult(
                request_id=request["request_id"],
                trace_id=uuid.uuid4().hex,
                agent=request["agent"],
                status=Status.ok,
                content="echo",
                model="echo",
                tokens=Tokens(prompt=1, completion=1, total=2),
                cost_usd=0.0,
                cached=False,
                attempts=1,
                fallback_used=False,
                latency_ms=0.0,
            )
            reply = aio_pika.Message(result.model_dump_json().encode(), correlation_id=message.correlation_id)
            await channel.default_exchange.publish(reply, routing_key=message.reply_to or "")
            await message.ack()

        tag = await declared.consume(answer)
        try:
            yield queue
        finally:
            await declared.cancel(tag)
            await declared.delete(if_unused=False, if_empty=False)


def via(client: LLMClient, model: str | None = None) -> Callable[[int], Awaitable[bool]]:
    async def call(lane_id: int) -> bool:
        result = await client.complete(
            f"perf {lane_id} {uuid.uuid4().hex}", agent="writer", model=model, use_cache=False, timeout_s=120
        )
        return result.status is Status.ok

    return call


def raw_litellm(base_url: str, model: str = "openai/ok") -> Callable[[int], Awaitable[bool]]:
    """One ``litellm.acompletion`` in this process, with the call parameters of the bench config."""
    import litellm

    litellm.suppress_debug_info = True
    params = {"model": model, "api_base": base_url, "api_key": "sk-bench-not-a-key"}

    async def call(lane_id: int) -> bool:
        messages = [{"role": "user", "content": f"perf {lane_id} {uuid.uuid4().hex}"}]
        await litellm.acompletion(
            **params, messages=messages, temperature=0.5, max_tokens=64, timeout=30, max_retries=0
        )
        return True

    return call


async def warm(client: LLMClient, count: int, model: str | None = None) -> None:
    await asyncio.gather(*(via(client, model)(i) for i in range(count)))


@dataclass
class Bench:
    amqp: str
    redis: str
    base_url: str
    tag: str
    folder: Path
    duration_s: float
    started: list[float] = field(default_factory=list)

    @property
    def queue(self) -> str:
        return f"bench.{self.tag}.requests"

    def config(self, prefetch: int) -> Path:
        return write_config(
            self.folder / f"p{prefetch}", self.tag, self.base_url, prefetch, self.amqp, self.redis,
            slow_ms=(LATENCY_MS, SLOW_MS, MEMORY_MS),
        )  # fmt: skip

    @contextlib.asynccontextmanager
    async def replicas(
        self, count: int, prefetch: int, on_line: LineHandler | None = None
    ) -> AsyncIterator[list[WorkerProcess]]:
        async with workers(self.config(prefetch), count, on_line) as procs:
            self.started += [p.ready_s for p in procs]
            yield procs

    def client(self) -> LLMClient:
        return LLMClient(self.amqp, request_queue=self.queue)

    # -- sections ---------------------------------------------------------------------------

    async def ratio(self, concurrency: int) -> None:
        raw = raw_litellm(self.base_url)
        await lanes(concurrency, 3, raw, Loop())  # warm-up: imports, the HTTP pool
        measure = Measure([os.getpid()])
        direct = measure.into(await lanes(concurrency, self.duration_s, raw, Run()))
        async with self.replicas(1, concurrency) as procs, self.client() as client:
            await warm(client, 100)
            measure = Measure([procs[0].proc.pid])
            served = measure.into(await lanes(concurrency, self.duration_s, via(client), Run()))
        print(
            f"ratio    raw litellm.acompletion, 1 process, {concurrency} concurrent: "
            f"{direct.rate:7.1f} req/s, {direct.cpu_ms_per_request():.2f} ms CPU/call, {direct.others()}"
        )
        print(
            f"ratio    one worker, prefetch {concurrency}, {concurrency} in flight:        "
            f"{served.rate:7.1f} req/s, {served.cpu_ms_per_request():.2f} ms CPU/request, {served.others()}, "
            f"p50 {pct(served.latencies_ms, 50):.1f} ms, failed {served.failed}"
        )
        print(f"ratio    worker / raw litellm = {served.rate / direct.rate:.2f}   (target >= 0.8)")

    async def latency(self, rate: float) -> None:
        provider_ms: dict[str, float] = {}
        in_worker_ms: dict[str, float] = {}  # pickup to answer, as the worker measured it

        def on_line(line: dict[str, Any]) -> None:
            if line.get("event") == "request.done" and line.get("outcome") == "ok":
                provider_ms[line["request_id"]] = float(line["provider_latency_ms"])
                in_worker_ms[line["request_id"]] = float(line["latency_ms"])

        model = f"slow{LATENCY_MS}"
        async with self.replicas(1, 256, on_line) as procs, self.client() as client:
            await warm(client, 50, model)
            measure = Measure([procs[0].proc.pid])
            end_to_end = await open_loop(client, rate, self.duration_s, model)
            run = measure.into(Run(latencies_ms=list(end_to_end.values())))
            await asyncio.sleep(0.5)  # the last request.done lines
        async with (
            echo_service(self.amqp, f"bench.{self.tag}.echo") as queue,
            LLMClient(self.amqp, request_queue=queue) as client,
        ):
            await warm(client, 50)
            floor = list((await open_loop(client, rate, self.duration_s)).values())
        added = [end_to_end[r] - provider_ms[r] for r in end_to_end if r in provider_ms]
        worker_part = [in_worker_ms[r] - provider_ms[r] for r in end_to_end if r in provider_ms]
        transit = [end_to_end[r] - in_worker_ms[r] for r in end_to_end if r in in_worker_ms]
        beyond_fake = [ms - LATENCY_MS for ms in end_to_end.values()]
        in_provider = list(provider_ms.values())
        print(
            f"latency  {rate:g} req/s open loop for {self.duration_s:g} s, provider {LATENCY_MS} ms: "
            f"{len(end_to_end)} answered, {run.others()}"
        )
        print(
            f"latency  added (end-to-end minus the worker's provider time): p50 {pct(added, 50):.1f} ms, "
            f"p99 {pct(added, 99):.1f} ms   (target p50 <= 5, p99 <= 25)"
        )
        print(
            f"latency  the bus alone (the same client and queue type, a consumer that replies at once): "
            f"p50 {pct(floor, 50):.1f} ms, p99 {pct(floor, 99):.1f} ms"
        )
        print(
            f"latency  of which in the worker outside the provider call: p50 {pct(worker_part, 50):.1f} ms, "
            f"p99 {pct(worker_part, 99):.1f} ms; before pickup and after the reply (client, broker): "
            f"p50 {pct(transit, 50):.1f} ms, p99 {pct(transit, 99):.1f} ms"
        )
        print(
            f"latency  provider time as the worker saw it (litellm + HTTP + {LATENCY_MS} ms): "
            f"p50 {pct(in_provider, 50):.1f} ms, p99 {pct(in_provider, 99):.1f} ms; end-to-end minus the "
            f"fake's {LATENCY_MS} ms: p50 {pct(beyond_fake, 50):.1f} ms, p99 {pct(beyond_fake, 99):.1f} ms"
        )

    async def slow(self, in_flight: int, provider_ms: int, section: str) -> None:
        """``in_flight`` closed-loop lanes against a provider answering after ``provider_ms``."""
        model = f"slow{provider_ms}"
        async with self.replicas(1, in_flight) as procs, self.client() as client:
            worker = procs[0]
            await warm(client, 50, model)
            idle_rss = memory_mib(worker.proc.pid)[0]
            http_json(self.base_url.removesuffix("/v1") + "/reset", b"")
            samples: list[tuple[float, float]] = []  # (calls in flight, RSS MiB)

            async def sample() -> None:
                while True:
                    await asyncio.sleep(0.5)
                    gauge = await asyncio.to_thread(scrape_gauge, worker.http_port, "llm_worker_in_flight")
                    samples.append((gauge, memory_mib(worker.proc.pid)[0]))

            sampler = asyncio.create_task(sample())
            measure = Measure([worker.proc.pid])
            run = measure.into(await lanes(in_flight, self.duration_s, via(client, model), Run()))
            sampler.cancel()
            peak_rss = memory_mib(worker.proc.pid)[1]
            peak_at_fake = http_json(self.base_url.removesuffix("/v1") + "/stats")["max_in_flight"]
        held = [n for n, _ in samples[2:-2] or samples]
        most, rss_then = max(samples)
        label = f"{section:8s} provider {provider_ms} ms"
        print(
            f"{label}, one worker, prefetch {in_flight}, {in_flight} lanes: {run.rate:6.1f} req/s, "
            f"latency p50 {pct(run.latencies_ms, 50):.0f} ms p99 {pct(run.latencies_ms, 99):.0f} ms, "
            f"failed {run.failed}"
        )
        cpu_pct = 100 * run.worker_cpu_s[0] / run.wall_s
        print(
            f"{label}: in flight in the worker mean {statistics.fmean(held):.0f}, max {most:.0f}; peak "
            f"concurrent calls at the provider {peak_at_fake}; worker CPU {cpu_pct:.0f} % "
            f"({run.cpu_ms_per_request():.2f} ms/request), {run.others()}"
        )
        print(
            f"{label}: worker RSS {idle_rss:.0f} MiB idle, {rss_then:.0f} MiB with {most:.0f} in flight "
            f"(peak {peak_rss:.0f} MiB)"
        )

    async def scaling(self, per_replica: int, counts: tuple[int, ...], provider_ms: int) -> None:
        """Replicas of prefetch ``per_replica``, each kept full: the CPU-bound case with a fast
        provider, the prefetch-bound case (usual for LLM calls) with a slow one."""
        model = f"slow{provider_ms}"
        rates: dict[int, Run] = {}
        for count in counts:
            async with self.replicas(count, per_replica) as procs, self.client() as client:
                await warm(client, 50 * count, model)
                measure = Measure([p.proc.pid for p in procs])
                run = await lanes(per_replica * count, self.duration_s, via(client, model), Run())
                rates[count] = measure.into(run)
        base = rates[counts[0]].rate
        for count, run in rates.items():
            print(
                f"scaling  {count} replica(s), {per_replica * count} in flight, provider {provider_ms} ms: "
                f"{run.rate:6.1f} req/s, x{run.rate / base:.2f} vs {counts[0]}, "
                f"{run.cpu_ms_per_request():.2f} ms CPU/request, {run.others()}, "
                f"p50 {pct(run.latencies_ms, 50):.0f} ms"
            )


async def main(args: argparse.Namespace) -> None:
    print(describe())
    print(
        f"# {args.duration_s:g} s per measured window; cache off, distinct prompts: every request is a "
        "provider call"
    )
    sections = args.only.split(",") if args.only else ["ratio", "latency", "slow", "memory", "scaling"]
    async with services(0) as env:
        bench = Bench(env.amqp, env.redis, env.base_url, env.tag, env.folder, args.duration_s)
        for section in sections:
            if section == "ratio":
                await bench.ratio(args.concurrency)
            elif section == "latency":
                await bench.latency(args.rate)
            elif section == "slow":  # target: >= 200 req/s from one worker
                await bench.slow(args.slow_in_flight, SLOW_MS, section)
            elif section == "memory":  # a provider slow enough for one worker to hold them all
                await bench.slow(args.slow_in_flight, MEMORY_MS, section)
            elif section == "scaling":
                await bench.scaling(args.per_replica, (1, 2, 4), LATENCY_MS)
                await bench.scaling(args.per_replica, (1, 2, 4), SLOW_MS)
            else:
                raise SystemExit(f"unknown section {section!r}: ratio, latency, slow, memory, scaling")
            sys.stdout.flush()
        starts = sorted(bench.started)
        print(
            f"start-up spawn to worker.ready over {len(starts)} workers: median "
            f"{statistics.median(starts):.2f} s, min {starts[0]:.2f} s, max {starts[-1]:.2f} s"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration-s", type=float, default=15)
    parser.add_argument("--concurrency", type=int, default=64, help="ratio: requests in flight")
    parser.add_argument("--rate", type=float, default=20, help="latency: requests per second")
    parser.add_argument("--slow-in-flight", type=int, default=500, help="slow: requests in flight")
    parser.add_argument("--per-replica", type=int, default=64, help="scaling: requests in flight per replica")
    parser.add_argument("--only", default="", help="comma-separated sections")
    return parser.parse_args()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(parse_args()))
