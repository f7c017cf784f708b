"""System calls per request of one loaded worker (issue #21): how many sends, receives and loop
wake-ups an answered request costs.

    .venv/bin/python bench/syscalls.py                 # about 30 s; needs strace (Debian: strace)

One ``python -m worker run`` process (the config of ``bench/three_way.py``'s worker, the fake
answering at once, cache off) is loaded by ``--in-flight`` lanes at a time; ``strace -c -f``
counts its calls (every thread) for ``--duration-s`` per load, and each count is divided by the
requests answered meanwhile. strace slows the worker many times over: the counts per request
hold, the rates do not. Calls made fewer than 0.1 times per request are left out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe
from bench.performance import Run, via
from bench.sizing import lanes, services, workers, write_config
from worker.client import LLMClient

# strace -c's table: % time, seconds, usecs/call, calls, [errors], syscall
ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(?P<calls>\d+)\s+(?:\d+\s+)?(?P<name>\w+)\s*$")


def counts(table: str) -> dict[str, int]:
    """strace -c's table as {syscall: calls}, its total line left out."""
    rows = (ROW.match(line) for line in table.splitlines())
    return {m["name"]: int(m["calls"]) for m in rows if m and m["name"] != "total"}


async def counted(
    pid: int, in_flight: int, duration_s: float, call: Callable[[int], Awaitable[bool]], out: Path
) -> tuple[Run, dict[str, int]]:
    tracer = await asyncio.create_subprocess_exec(
        "strace", "-c", "-f", "-p", str(pid), "-o", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await asyncio.sleep(1)  # attached to every thread
    run = await lanes(in_flight, duration_s, call, Run())
    tracer.send_signal(signal.SIGINT)
    await tracer.wait()
    return run, counts(await asyncio.to_thread(out.read_text))


async def main(args: argparse.Namespace) -> None:
    if shutil.which("strace") is None:
        raise SystemExit("strace is not installed: apt-get install strace")
    print(describe())
    print(f"# strace -c -f for {args.duration_s:g} s per load; the fake answering at once, cache off")
    async with services(0) as env:
        config = write_config(env.folder / "worker", env.tag, env.base_url, 50, env.amqp, env.redis)
        async with contextlib.AsyncExitStack() as stack:
            procs = await stack.enter_async_context(workers(config, 1))
            client = await stack.enter_async_context(
                LLMClient(env.amqp, request_queue=f"bench.{env.tag}.requests")
            )
            pid, call = procs[0].proc.pid, via(client)
            await lanes(4, 2, call, Run())  # warm-up
            folder = Path(tempfile.mkdtemp())
            for in_flight in args.in_flight:
                run, calls = await counted(pid, in_flight, args.duration_s, call, folder / f"{in_flight}.txt")
                answered = max(run.ok, 1)
                print(f"in flight {in_flight}: {run.ok} answered, failed {run.failed}")
                for name, n in sorted(calls.items(), key=lambda kv: -kv[1]):
                    if n / answered >= 0.1:
                        print(f"  {name:16s} {n / answered:7.2f} per request")
                print(f"  {'all':16s} {sum(calls.values()) / answered:7.2f} per request")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--duration-s", type=float, default=10)
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
