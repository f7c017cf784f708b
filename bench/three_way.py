"""The worker beside the LiteLLM proxy and raw litellm, interleaved in one run (issue #21).

    .venv/bin/python bench/three_way.py                      # the README's table (about 5 minutes)
    .venv/bin/python bench/three_way.py --rounds 1 --duration-s 1 --latency-s 1 --slow-in-flight 8

One fake provider in its own process; three ways of serving the same call, each measured by the
same closed-loop driver (``sizing.lanes``) in this process:

raw      ``litellm.acompletion`` in this process (the ceiling: no serving hop at all)
proxy    the LiteLLM proxy 1.82.6 (``bench/proxy.py``: its own venv, one uvicorn worker, no
         database), over HTTP from an aiohttp session here
worker   one ``python -m worker run`` process, its whole path (durable queue, result store,
         ledger, publisher confirms), cache off, through ``LLMClient``

Each round measures all three in a rotated order, so a noisy minute of the shared machine falls on
all of them. Sections: throughput at ``--concurrency`` in flight against the fake answering at
once; added latency at 1 in flight (a system's percentile of end-to-end time minus the same
percentile of this client's direct round trip to the fake, measured in the same rounds); a 1 s
provider at ``--slow-in-flight``. CPU per request is the serving process's own CPU from /proc (for
raw, this process's). Our own CPU per request is the worker's minus raw litellm's per call.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe
from bench.performance import Measure, Run, pct, raw_litellm, via
from bench.proxy import running_proxy, write_proxy_config
from bench.sizing import free_port, lanes, services, workers, write_config
from worker.client import LLMClient

SLOW_MS = 1000
SYSTEMS = ("raw", "proxy", "worker")
Call = Callable[[int], Awaitable[bool]]


def over_http(session: aiohttp.ClientSession, base_url: str, model: str) -> Call:
    """One OpenAI chat completion posted to ``base_url`` (the proxy, or the fake itself)."""

    async def call(lane_id: int) -> bool:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"perf {lane_id} {uuid.uuid4().hex}"}],
            "temperature": 0.5,
            "max_tokens": 64,
        }
        async with session.post(f"{base_url}/chat/completions", json=body) as response:
            await response.read()
            return response.status == 200

    return call


@dataclass
class Tally:
    """One system's windows of one section, summed over the rounds."""

    runs: list[Run] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return sum(r.ok for r in self.runs) / sum(r.wall_s for r in self.runs)

    @property
    def cpu_ms(self) -> float:
        return 1000 * sum(sum(r.worker_cpu_s) for r in self.runs) / max(sum(r.ok for r in self.runs), 1)

    @property
    def failed(self) -> int:
        return sum(r.failed for r in self.runs)

    @property
    def latencies(self) -> list[float]:
        return [ms for r in self.runs for ms in r.latencies_ms]

    def line(self, name: str) -> str:
        rates = [r.rate for r in self.runs]
        busy = [r.busy_pct for r in self.runs]
        return (
            f"{name:7s} {self.rate:7.1f} req/s (rounds {min(rates):.1f}-{max(rates):.1f}), "
            f"{self.cpu_ms:5.2f} ms CPU/request of the serving process, "
            f"p50 {pct(self.latencies, 50):.1f} ms, "
            f"machine busy {min(busy):.0f}-{max(busy):.0f} %, failed {self.failed}"
        )


def verdict(value: float, target: float, at_least: bool, unit: str = "") -> str:
    """'met', or by how much it is missed."""
    if (value >= target) if at_least else (value <= target):
        return f"met ({'>=' if at_least else '<='} {target:.3g}{unit})"
    if at_least:
        short = f"short by {target - value:.2f}{unit} ({100 * (1 - value / target):.0f} %)"
        return f"NOT met: target >= {target:.3g}{unit}, {short}"
    return f"NOT met: target <= {target:.3g}{unit}, over by {value - target:.2f}{unit}"


def rotated(names: tuple[str, ...], turn: int) -> list[str]:
    return [names[(turn + i) % len(names)] for i in range(len(names))]


async def interleave(
    calls: dict[str, Call], pids: dict[str, list[int]], count: int, duration_s: float, rounds: int
) -> dict[str, Tally]:
    """``rounds`` rounds of one window per system at ``count`` lanes, in a rotated order."""
    tallies = {name: Tally() for name in calls}
    for turn in range(rounds):
        for name in rotated(tuple(calls), turn):
            measure = Measure(pids[name])
            tallies[name].runs.append(measure.into(await lanes(count, duration_s, calls[name], Run())))
    return tallies


async def main(args: argparse.Namespace) -> None:
    print(describe())
    print(
        f"# {args.rounds} interleaved rounds; throughput {args.duration_s:g} s per window at "
        f"{args.concurrency} in flight; latency {args.latency_s:g} s per window at 1 in flight; "
        "cache off, distinct prompts"
    )
    slow = f"slow{SLOW_MS}"
    async with services(0) as env:
        worker_config = write_config(
            env.folder / "worker", env.tag, env.base_url, max(args.slow_in_flight, args.concurrency),
            env.amqp, env.redis, slow_ms=(SLOW_MS,),
        )  # fmt: skip
        proxy_config = write_proxy_config(env.folder / "proxy", env.base_url, {"bench": "ok", slow: slow})
        async with (
            running_proxy(proxy_config, free_port()) as proxy,
            workers(worker_config, 1) as procs,
            LLMClient(env.amqp, request_queue=f"bench.{env.tag}.requests") as client,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
        ):
            print(
                f"# proxy ready in {proxy.ready_s:.1f} s (pid {proxy.pid}), worker in "
                f"{procs[0].ready_s:.1f} s (pid {procs[0].proc.pid})",
                flush=True,
            )
            pids = {"raw": [os.getpid()], "proxy": [proxy.pid], "worker": [procs[0].proc.pid], "direct": []}
            fast = {
                "raw": raw_litellm(env.base_url),
                "proxy": over_http(http, proxy.url, "bench"),
                "worker": via(client),
            }
            for call in fast.values():  # warm-up: imports, HTTP pools, the broker's channels
                await lanes(args.concurrency, 2, call, Run())
            report_throughput(
                args, await interleave(fast, pids, args.concurrency, args.duration_s, args.rounds)
            )
            direct = over_http(http, env.base_url, "ok")
            report_latency(await interleave({"direct": direct, **fast}, pids, 1, args.latency_s, args.rounds))
            slow_calls = {
                "raw": raw_litellm(env.base_url, f"openai/{slow}"),
                "proxy": over_http(http, proxy.url, slow),
                "worker": via(client, slow),
            }
            for call in slow_calls.values():
                await asyncio.gather(*(call(i) for i in range(args.slow_in_flight)))
            report_slow(
                args, await interleave(slow_calls, pids, args.slow_in_flight, args.duration_s, args.rounds)
            )


def report_throughput(args: argparse.Namespace, throughput: dict[str, Tally]) -> None:
    print(f"throughput  {args.concurrency} in flight, the fake answering at once:")
    for name in SYSTEMS:
        print(f"throughput  {throughput[name].line(name)}")
    rate = {name: throughput[name].rate for name in SYSTEMS}

    def spread(a: str, b: str) -> str:
        ratios = [x.rate / y.rate for x, y in zip(throughput[a].runs, throughput[b].runs, strict=True)]
        return f"rounds {min(ratios):.2f}-{max(ratios):.2f}"

    print(f"ratio       worker / proxy = {rate['worker'] / rate['proxy']:.2f} ({spread('worker', 'proxy')}): "
          f"{verdict(rate['worker'] / rate['proxy'], 1.25, True)}")  # fmt: skip
    print(f"ratio       worker / raw   = {rate['worker'] / rate['raw']:.2f} ({spread('worker', 'raw')}): "
          f"{verdict(rate['worker'] / rate['raw'], 0.8, True)}")  # fmt: skip
    print(f"ratio       proxy / raw    = {rate['proxy'] / rate['raw']:.2f} ({spread('proxy', 'raw')})")
    # On a machine shared with other jobs, req/s follows the CPU each process was given; the CPU
    # each request cost is steadier. 1000 / (ms per request) is what one full core would serve.
    core = {name: 1000 / throughput[name].cpu_ms for name in SYSTEMS}
    print(
        f"per core    1000 / CPU ms per request: raw {core['raw']:.0f}, proxy {core['proxy']:.0f}, worker "
        f"{core['worker']:.0f} req/s; worker / proxy = {core['worker'] / core['proxy']:.2f} "
        f"({verdict(core['worker'] / core['proxy'], 1.25, True)}), worker / raw = "
        f"{core['worker'] / core['raw']:.2f} ({verdict(core['worker'] / core['raw'], 0.8, True)})"
    )
    own = throughput["worker"].cpu_ms - throughput["raw"].cpu_ms
    proxy_own = throughput["proxy"].cpu_ms - throughput["raw"].cpu_ms
    print(
        f"cpu         own CPU per request: worker {throughput['worker'].cpu_ms:.2f} - litellm "
        f"{throughput['raw'].cpu_ms:.2f} = {own:.2f} ms: {verdict(own, 1.0, False, ' ms')}"
    )
    print(
        f"cpu         the proxy's own, the same way: {throughput['proxy'].cpu_ms:.2f} - "
        f"{throughput['raw'].cpu_ms:.2f} = {proxy_own:.2f} ms",
        flush=True,
    )


def report_latency(latency: dict[str, Tally]) -> None:
    direct = latency["direct"].latencies
    d50, d99 = pct(direct, 50), pct(direct, 99)
    print(
        f"latency     1 in flight; the client's direct round trip to the fake: p50 {d50:.2f} ms, "
        f"p99 {d99:.2f} ms"
    )
    added: dict[str, tuple[float, float]] = {}
    for name in SYSTEMS:
        ms = latency[name].latencies
        added[name] = (pct(ms, 50) - d50, pct(ms, 99) - d99)
        print(
            f"latency     {name:7s} added p50 {added[name][0]:5.2f} ms, p99 {added[name][1]:5.2f} ms "
            f"({len(ms)} requests, end-to-end p50 {pct(ms, 50):.2f} ms, p99 {pct(ms, 99):.2f} ms, "
            f"{latency[name].cpu_ms:.2f} ms CPU/request, failed {latency[name].failed})"
        )
    p50_verdict = verdict(added["worker"][0], added["proxy"][0], False, " ms")
    print(f"latency     worker added p50 vs the proxy's: {p50_verdict}")
    print(f"latency     worker added p99: {verdict(added['worker'][1], 25, False, ' ms')}", flush=True)


def report_slow(args: argparse.Namespace, slowed: dict[str, Tally]) -> None:
    print(f"slow        provider {SLOW_MS} ms, {args.slow_in_flight} in flight:")
    for name in SYSTEMS:
        print(f"slow        {slowed[name].line(name)}")
    print(f"slow        worker: {verdict(slowed['worker'].rate, 200, True, ' req/s')}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=10, help="each throughput and slow window")
    parser.add_argument("--latency-s", type=float, default=8, help="each 1-in-flight window")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--slow-in-flight", type=int, default=500)
    return parser.parse_args()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(parse_args()))
