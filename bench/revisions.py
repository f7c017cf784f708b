"""Revisions of the worker side by side, interleaved in one run: what a change bought (issue #21).

    .venv/bin/python bench/revisions.py --rev d969a37 --rev HEAD        # before / after, ~4 minutes
    .venv/bin/python bench/revisions.py --rev HEAD~2 --rev HEAD~1 --rev HEAD --rounds 6

Each ``--rev`` is exported (``git archive``, no work tree of the repository is touched) into a
temporary folder, and one ``python -m worker run`` process is started from it on queues and keys
of its own, all against one fake provider answering at once (cache off, distinct prompts, the
same config as ``bench/three_way.py``'s worker). Raw ``litellm.acompletion`` in this process is
measured in the same rounds, as the baseline of litellm's own CPU per call. Each round measures
every system at ``--concurrency`` in flight in a rotated order, so a noisy minute of the shared
machine falls on all of them; compare the ratios, not the absolute figures. CPU per request is
the serving process's own (/proc); "own" is that minus raw litellm's per call.

With ``--rate R`` each window sends R requests/s whatever the answers do (open loop) instead of
keeping ``--concurrency`` in flight: every system then does the same work per second, so that its
CPU per request does not depend on how much of the shared CPU it was given (a process given less
batches fewer requests per event-loop turn, which costs more per request). Choose R below the
slowest system's throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe
from bench.performance import Measure, Run, raw_litellm, via
from bench.sizing import ROOT, cleanup, lanes, services, write_config
from bench.three_way import Call, Tally, interleave, rotated
from tests.support.processes import WorkerProcess
from worker.client import LLMClient


def export(rev: str, into: Path) -> str:
    """The tree of ``rev`` written under ``into``; returns its short commit."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    tree = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tree)) as archive:
        archive.extractall(into, filter="data")
    return commit


async def paced(rate: float, duration_s: float, call: Call) -> Run:
    """``rate`` calls per second for ``duration_s``, each in a task of its own; waits for all."""
    into, tasks = Run(), []

    async def one(i: int) -> None:
        started = time.monotonic()
        if await call(i):
            into.latencies_ms.append(1000 * (time.monotonic() - started))
        else:
            into.failed += 1

    started = time.monotonic()
    for i in range(int(rate * duration_s)):
        await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
        tasks.append(asyncio.ensure_future(one(i)))
    await asyncio.gather(*tasks)
    into.wall_s = time.monotonic() - started
    return into


async def windows(
    calls: dict[str, Call], pids: dict[str, list[int]], args: argparse.Namespace
) -> dict[str, Tally]:
    if args.rate is None:
        return await interleave(calls, pids, args.concurrency, args.duration_s, args.rounds)
    tallies = {name: Tally() for name in calls}
    for turn in range(args.rounds):
        for name in rotated(tuple(calls), turn):
            measure = Measure(pids[name])
            tallies[name].runs.append(measure.into(await paced(args.rate, args.duration_s, calls[name])))
    return tallies


async def main(args: argparse.Namespace) -> None:
    print(describe())
    load = f"{args.rate:g} requests/s (open loop)" if args.rate else f"{args.concurrency} in flight"
    print(
        f"# {args.rounds} interleaved rounds of {args.duration_s:g} s per system at {load}, "
        "the fake answering at once; cache off, distinct prompts"
    )
    async with services(0) as env, contextlib.AsyncExitStack() as stack:
        calls: dict[str, Call] = {"raw": raw_litellm(env.base_url)}
        pids: dict[str, list[int]] = {"raw": [os.getpid()]}
        for i, rev in enumerate(args.rev):
            tree = env.folder / f"tree{i}"
            name = f"{i}:{export(rev, tree)}"
            tag = f"{env.tag}r{i}"
            stack.push_async_callback(cleanup, env.amqp, env.redis, tag)  # after its worker stopped
            config = write_config(
                env.folder / f"config{i}", tag, env.base_url, args.concurrency, env.amqp, env.redis
            )
            proc = WorkerProcess(config, keep_lines=False, cwd=tree)
            await proc.start(timeout_s=120)
            stack.push_async_callback(proc.terminate, 60)
            client = await stack.enter_async_context(
                LLMClient(env.amqp, request_queue=f"bench.{tag}.requests")
            )
            calls[name], pids[name] = via(client), [proc.pid]
            print(f"# {name} ({rev}) ready in {proc.ready_s:.1f} s, pid {proc.pid}", flush=True)
        for call in calls.values():  # warm-up: imports, HTTP pools, the broker's channels
            await lanes(args.concurrency, 2, call, Run())
        tallies = await windows(calls, pids, args)
    raw = tallies["raw"]
    print(f"system  {raw.line('raw')}")
    first = next(name for name in tallies if name != "raw")
    for name, tally in tallies.items():
        if name == "raw":
            continue
        own = tally.cpu_ms - raw.cpu_ms
        vs_first = tally.cpu_ms / tallies[first].cpu_ms
        rounds = [
            w.cpu_ms_per_request() / b.cpu_ms_per_request()
            for w, b in zip(tally.runs, tallies[first].runs, strict=True)
        ]
        print(f"system  {tally.line(name)}")
        print(
            f"cpu     {name}: {tally.cpu_ms:.2f} ms/request, own {own:.2f} ms (minus raw litellm's "
            f"{raw.cpu_ms:.2f}); x{vs_first:.3f} of {first}'s CPU per request (per round: median "
            f"{statistics.median(rounds):.3f}, {min(rounds):.3f}-{max(rounds):.3f}); req/s "
            f"x{tally.rate / tallies[first].rate:.2f}",
            flush=True,
        )
    for name, tally in tallies.items():
        print(
            f"rounds  {name}: "
            + " ".join(f"{r.cpu_ms_per_request():.2f}" for r in tally.runs)
            + " ms CPU/request"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rev", action="append", required=True, help="a git revision (repeat)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration-s", type=float, default=10, help="each window")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rate", type=float, help="requests/s per window (open loop) instead")
    return parser.parse_args()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(parse_args()))
