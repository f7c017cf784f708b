"""Size worker replicas by measurement: requests/s, CPU and memory of real worker processes.

Starts the fake OpenAI provider as its own process (every answer after ``--latency-ms``), then
for each scenario N worker processes (``python -m worker run``, exactly what the image runs)
on a private queue of the shared RabbitMQ and Redis, and a closed-loop load generator that
keeps ``in_flight`` requests outstanding through ``LLMClient`` for ``--duration-s``. It prints
the machine, then one line per scenario:

    .venv/bin/python bench/sizing.py                       # the README's table (about 3 minutes)
    .venv/bin/python bench/sizing.py --scenarios 1x256,2x512 --duration-s 30

Scenario ``NxC``: N worker processes, C requests in flight in total. CPU is each worker's own
CPU time over the measured window (``/proc/<pid>/stat``), RSS its resident memory at the end
(``VmRSS``) and peak (``VmHWM``). Cache off, distinct prompts: every request is a provider call.
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
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import yaml

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import describe  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.processes import LineHandler, WorkerProcess  # noqa: E402
from worker.client import LLMClient  # noqa: E402
from worker.messages import Status  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- processes ----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def machine_busy_seconds() -> float:
    """CPU seconds spent by the whole machine (all cores, every process) outside idle and iowait."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / CLOCK_TICKS


def memory_mib(pid: int) -> tuple[float, float]:
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


async def start_fake(port: int, latency_ms: float) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.fakes.openai_server",
        "--port",
        str(port),
        "--latency-ms",
        str(latency_ms),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    await asyncio.wait_for(proc.stdout.readline(), 30)  # "fake openai listening on ..."
    return proc


async def stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL after a minute: the fake provider's process."""
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()


# -- configuration ------------------------------------------------------------------------------


def write_config(
    folder: Path, tag: str, base_url: str, prefetch: int, amqp: str, redis: str, slow_ms: tuple[int, ...] = ()
) -> Path:
    """A worker config on private queues and keys. The default model ``bench`` answers at the fake's
    latency; each of ``slow_ms`` adds a model ``slow<MS>`` that answers after MS milliseconds."""
    agents = ("writer", "critic", "editor", "researcher", "fact-checker")
    llm = {
        "default_model": "bench",
        "fallback_models": [],
        "temperature": 0.5,
        "max_tokens": 64,
        "timeout": 30,
        "deadline_s": 60,
        "num_retries": 0,
        "cache_ttl": 0,
        "agent_models": {},
        "budget": {
            "max_cost_per_task": 1000.0,
            "max_cost_per_day": 100000.0,
            "max_cost_per_agent_day": dict.fromkeys(agents, 100000.0),
        },
        "models": [
            {
                "model_name": name,
                "litellm_params": {
                    "model": f"openai/{fake_model}",
                    "api_base": base_url,
                    "api_key": "sk-bench-not-a-key",
                },
                "model_info": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6},
            }
            for name, fake_model in [("bench", "ok"), *((f"slow{ms}", f"slow{ms}") for ms in slow_ms)]
        ],
    }
    bus = {
        "url": amqp,
        "request_queue": f"bench.{tag}.requests",
        "results_exchange": f"bench.{tag}.results",
        "dead_letter_exchange": f"bench.{tag}.dlx",
        "dead_letter_queue": f"bench.{tag}.dlq",
        "prefetch": prefetch,
        "delivery_limit": 5,
        "drain_timeout_s": 60,
    }
    red = {
        "url": redis,
        "key_prefix": f"bench:{tag}:",
        "socket_timeout_s": 5.0,
        "connect_timeout_s": 2.0,
        "result_ttl_s": 600,
    }
    observe = {"host": "127.0.0.1", "port": 0}  # replicas must not fight over one port
    callers = {"mode": "development"}  # the bench's load client connects as the broker's guest
    folder.mkdir(parents=True, exist_ok=True)
    sections = (("llm", llm), ("bus", bus), ("redis", red), ("observe", observe), ("callers", callers))
    for name, section in sections:
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({name: section}))
    return folder


async def cleanup(amqp: str, redis_url: str, tag: str) -> None:
    import aio_pika
    import redis.asyncio as aioredis

    connection = await aio_pika.connect(amqp)
    async with connection:
        channel = await connection.channel()
        for queue in (f"bench.{tag}.requests", f"bench.{tag}.dlq"):
            await channel.queue_delete(queue)
        for exchange in (f"bench.{tag}.results", f"bench.{tag}.dlx"):
            await channel.exchange_delete(exchange)
    client = aioredis.Redis.from_url(redis_url)
    async with client:
        keys = [k async for k in client.scan_iter(match=f"bench:{tag}:*", count=1000)]
        for i in range(0, len(keys), 500):
            await client.delete(*keys[i : i + 500])


# -- load ---------------------------------------------------------------------------------------


@dataclass
class Figures:
    workers: int
    in_flight: int
    requests: int
    failed: int
    wall_s: float
    p50_ms: float
    p95_ms: float
    cpu_pct: list[float]
    rss_mib: list[float]
    peak_mib: list[float]
    generator_cpu_pct: float
    fake_cpu_pct: float
    machine_busy_pct: float

    def line(self) -> str:
        rate = self.requests / self.wall_s
        cpu_ms = sum(self.cpu_pct) * 10 * self.wall_s / max(self.requests, 1)
        cpus = "+".join(f"{c:.0f}" for c in self.cpu_pct)
        rss = "+".join(f"{r:.0f}" for r in self.rss_mib)
        peak = "+".join(f"{r:.0f}" for r in self.peak_mib)
        return (
            f"workers={self.workers} in_flight={self.in_flight:4d}  {rate:7.1f} req/s "
            f"({rate / self.workers:6.1f} per worker)  latency p50 {self.p50_ms:6.0f} ms p95 "
            f"{self.p95_ms:6.0f} ms  worker cpu {cpus} %  cpu/request {cpu_ms:5.2f} ms  "
            f"rss {rss} MiB (peak {peak})  load generator cpu {self.generator_cpu_pct:.0f} %  "
            f"fake provider cpu {self.fake_cpu_pct:.0f} %  machine busy {self.machine_busy_pct:.0f} % "
            f"of {os.cpu_count()} cpus  failed {self.failed}"
        )


@dataclass
class Loop:
    """What closed-loop lanes did: the latency of each ok answer, the failures, the wall time."""

    latencies_ms: list[float] = field(default_factory=list)
    failed: int = 0
    wall_s: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)


L = TypeVar("L", bound=Loop)


async def lanes(count: int, duration_s: float, call: Callable[[int], Awaitable[bool]], into: L) -> L:
    """``count`` lanes, each calling ``call(lane)`` again as soon as it returns (True: an ok
    answer), until ``duration_s`` has passed; counted into ``into``."""
    stop_at = time.monotonic() + duration_s

    async def lane(lane_id: int) -> None:
        while time.monotonic() < stop_at:
            started = time.monotonic()
            if await call(lane_id):
                into.latencies_ms.append(1000 * (time.monotonic() - started))
            else:
                into.failed += 1

    started = time.monotonic()
    await asyncio.gather(*(lane(i) for i in range(count)))
    into.wall_s = time.monotonic() - started
    return into


async def closed_loop(client: LLMClient, in_flight: int, duration_s: float) -> Loop:
    """``in_flight`` lanes of requests through ``client``, each sent as soon as the last is answered."""

    async def call(lane_id: int) -> bool:
        result = await client.complete(
            f"sizing lane {lane_id} {uuid.uuid4().hex}", agent="writer", use_cache=False, timeout_s=120
        )
        return result.status is Status.ok

    return await lanes(in_flight, duration_s, call, Loop())


@contextlib.asynccontextmanager
async def workers(
    config: Path, count: int, on_line: LineHandler | None = None
) -> AsyncIterator[list[WorkerProcess]]:
    """``count`` worker processes at the production log level, started one after another; each
    JSON log line after ready goes to ``on_line`` (one ``request.done`` per request), and none is
    kept: a run writes one a request."""
    started: list[WorkerProcess] = []
    try:
        for _ in range(count):
            worker = WorkerProcess(config, keep_lines=False, on_line=on_line)
            started.append(await worker.start(timeout_s=120))
        yield started
    finally:
        for w in started:
            await w.terminate(timeout_s=60)


async def scenario(
    config: Path, queue: str, amqp: str, fake_pid: int, count: int, in_flight: int, duration_s: float
) -> Figures:
    async with workers(config, count) as procs, LLMClient(amqp, request_queue=queue) as client:
        # warm-up: the first calls build litellm's and the broker's connection pools
        await asyncio.gather(
            *(
                client.complete(f"warm {uuid.uuid4().hex}", agent="writer", use_cache=False, timeout_s=180)
                for _ in range(count * 20)
            )
        )
        pids = [w.proc.pid for w in procs]
        cpu0 = [cpu_seconds(pid) for pid in pids]
        fake0, busy0 = cpu_seconds(fake_pid), machine_busy_seconds()
        gen0, t0 = time.process_time(), time.monotonic()
        loop = await closed_loop(client, in_flight, duration_s)
        latencies, failed, wall = loop.latencies_ms, loop.failed, loop.wall_s
        elapsed = time.monotonic() - t0
        cpu_pct = [100 * (cpu_seconds(pid) - c0) / elapsed for pid, c0 in zip(pids, cpu0, strict=True)]
        memory = [memory_mib(pid) for pid in pids]
        generator = 100 * (time.process_time() - gen0) / elapsed
        fake = 100 * (cpu_seconds(fake_pid) - fake0) / elapsed
        busy = 100 * (machine_busy_seconds() - busy0) / elapsed / (os.cpu_count() or 1)
    quantiles = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else [0.0] * 19
    return Figures(
        workers=count,
        in_flight=in_flight,
        requests=len(latencies),
        failed=failed,
        wall_s=wall,
        p50_ms=statistics.median(latencies) if latencies else 0.0,
        p95_ms=quantiles[18],
        cpu_pct=cpu_pct,
        rss_mib=[m[0] for m in memory],
        peak_mib=[m[1] for m in memory],
        generator_cpu_pct=generator,
        fake_cpu_pct=fake,
        machine_busy_pct=busy,
    )


@dataclass
class Services:
    """The shared broker and Redis, a fake provider process, and a tag naming private queues and keys."""

    amqp: str
    redis: str
    fake: asyncio.subprocess.Process
    base_url: str
    tag: str
    folder: Path


@contextlib.asynccontextmanager
async def services(latency_ms: float) -> AsyncIterator[Services]:
    """Start the fake provider; at the end stop it and delete the run's queues and Redis keys."""
    amqp = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    port = free_port()
    fake = await start_fake(port, latency_ms)
    tag = uuid.uuid4().hex[:8]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            yield Services(amqp, redis_url, fake, f"http://127.0.0.1:{port}/v1", tag, Path(tmp))
    finally:
        await stop(fake)
        await cleanup(amqp, redis_url, tag)


async def main(args: argparse.Namespace) -> None:
    print(describe())
    print(
        f"# fake provider latency {args.latency_ms:g} ms, prefetch {args.prefetch} per worker, "
        f"{args.duration_s:g} s per scenario, closed loop (each lane sends again on its reply)"
    )
    async with services(args.latency_ms) as env:
        config = write_config(env.folder, env.tag, env.base_url, args.prefetch, env.amqp, env.redis)
        for spec in args.scenarios.split(","):
            count, in_flight = (int(x) for x in spec.split("x"))
            figures = await scenario(
                config, f"bench.{env.tag}.requests", env.amqp, env.fake.pid, count, in_flight, args.duration_s
            )
            print(figures.line(), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--latency-ms", type=float, default=1000)
    parser.add_argument("--prefetch", type=int, default=256, help="bus.prefetch of each worker")
    parser.add_argument("--duration-s", type=float, default=20)
    parser.add_argument(
        "--scenarios",
        default="1x16,1x64,1x256,2x256,2x512",
        help="comma-separated NxC: N worker processes, C requests in flight in total",
    )
    return parser.parse_args()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(parse_args()))
