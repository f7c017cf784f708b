"""Where the worker's CPU goes under load: py-spy samples of one worker process (issue #21).

    .venv/bin/python bench/hotspots.py                        # 20 s at 50 in flight, top 25 frames
    .venv/bin/python bench/hotspots.py --target proxy         # the LiteLLM proxy under the same load
    .venv/bin/python bench/hotspots.py --duration-s 2 --top 5 # the test suite's form

One fake provider answering at once, one ``python -m worker run`` process on private queues (cache
off, distinct prompts), ``--concurrency`` closed-loop lanes from this process (``sizing.lanes``),
and ``py-spy record`` (from the bench venv, ``bench/proxy.py``) sampling the worker without pausing
it. Printed: the worker's CPU per request over the sampled window (/proc), then the top frames by
self samples (the frame was running) and by inclusive samples (the frame was on the stack), each
with its share of the samples and that share of the CPU per request; then the samples by package
(self), and by the package that caused them: each sample goes to its innermost frame outside the
standard library, so ``json.dumps`` called from ``worker/`` counts as the worker's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe
from bench.performance import Measure, Run, raw_litellm, via
from bench.proxy import ensure_venv, running_proxy, write_proxy_config
from bench.sizing import CLOCK_TICKS, free_port, lanes, services, workers, write_config
from bench.three_way import over_http
from worker.client import LLMClient

FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*)\)$")
STDLIB = set(sys.stdlib_module_names)  # and "<frozen os>", "<string>"...


LIBRARY = re.compile(r"^.*/(?:site-packages|lib/python3\.\d+)/")
ROOT = str(Path(__file__).resolve().parents[1]) + "/"


def short(frame: str) -> str:
    """``func (/.../site-packages/litellm/main.py)`` as ``func (litellm/main.py)``: the file from its
    package down (py-spy's own shortening drops the package of deep files)."""
    match = FRAME.match(frame)
    if match is None:
        return frame
    return f"{match['function']} ({LIBRARY.sub('', match['file']).removeprefix(ROOT)})"


def package(frame: str) -> str:
    """``worker``, ``litellm``, ``asyncio``...: the first part of a (short) frame's file name."""
    match = FRAME.match(frame)
    name = match["file"] if match else frame
    return name.split("/", 1)[0].removesuffix(".py")


class Profile:
    """py-spy's collapsed stacks (``--format raw --nolineno``): one line per distinct stack and its count."""

    def __init__(self, text: str):
        self.stacks: list[tuple[list[str], int]] = []
        for line in text.splitlines():
            stack, _, count = line.rpartition(" ")
            if stack and count.isdigit():
                self.stacks.append(([short(f) for f in stack.split(";")], int(count)))
        self.samples = sum(count for _, count in self.stacks)

    def self_counts(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for frames, count in self.stacks:
            counts[frames[-1]] += count
        return counts

    def inclusive_counts(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for frames, count in self.stacks:
            for frame in set(frames):  # a recursive frame counts once per sample
                counts[frame] += count
        return counts

    def by_package(self, caused: bool) -> Counter[str]:
        """Self samples by package; with ``caused``, by the innermost package outside the stdlib."""
        counts: Counter[str] = Counter()
        for frames, count in self.stacks:
            owner = package(frames[-1])
            if caused:
                owner = next(
                    (p for p in map(package, reversed(frames)) if p not in STDLIB and p[:1] != "<"),
                    "event loop",
                )
            counts[owner] += count
        return counts

    def outside(self, name: str) -> int:
        """Samples with no frame of package ``name`` on the stack."""
        return sum(count for frames, count in self.stacks if all(package(f) != name for f in frames))


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each of the process's threads (/proc/<pid>/task), by thread id."""
    threads: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            threads[int(task.name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    return threads


def by_thread(pid: int, before: dict[int, float], after: dict[int, float]) -> dict[str, float]:
    """CPU seconds over a window of the event loop's thread and of all the others together
    (litellm hands its success logging to a thread pool)."""
    spent = {"event-loop thread": 0.0, "other threads": 0.0}
    for tid, seconds in after.items():
        spent["event-loop thread" if tid == pid else "other threads"] += seconds - before.get(tid, 0.0)
    return spent


def table(title: str, counts: Counter[str], samples: int, cpu_ms: float, top: int) -> None:
    print(f"{title}")
    print(f"{'share':>7} {'ms/req':>7}  frame")
    for frame, count in counts.most_common(top):
        share = count / samples
        print(f"{100 * share:6.1f}% {share * cpu_ms:7.3f}  {frame}")


async def main(args: argparse.Namespace) -> None:
    print(describe())
    bin_dir = ensure_venv()
    async with services(0) as env:
        proxy_config = write_proxy_config(env.folder / "proxy", env.base_url, {"bench": "ok"})
        worker_config = write_config(
            env.folder / "worker", env.tag, env.base_url, args.concurrency, env.amqp, env.redis
        )
        async with contextlib.AsyncExitStack() as stack:
            if args.target == "proxy":
                proxy = await stack.enter_async_context(running_proxy(proxy_config, free_port()))
                import aiohttp

                http = await stack.enter_async_context(
                    aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
                )
                pid, call = proxy.pid, over_http(http, proxy.url, "bench")
            else:
                procs = await stack.enter_async_context(workers(worker_config, 1))
                client = await stack.enter_async_context(
                    LLMClient(env.amqp, request_queue=f"bench.{env.tag}.requests")
                )
                pid, call = procs[0].proc.pid, via(client)
            await lanes(args.concurrency, 2, call, Run())  # warm-up
            raw = raw_litellm(env.base_url)
            await lanes(args.concurrency, 2, raw, Run())
            litellm_cpu = Measure([os.getpid()]).into(
                await lanes(args.concurrency, args.duration_s, raw, Run())
            )
            out = Path(tempfile.mkdtemp()) / "profile.txt"
            spy = await asyncio.create_subprocess_exec(
                str(bin_dir / "py-spy"), "record", "--pid", str(pid), "--duration", str(args.duration_s),
                "--rate", str(args.rate), "--format", "raw", "--nolineno", "--full-filenames",
                "--nonblocking", "--output", str(out),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            measure, threads0 = Measure([pid]), thread_cpu(pid)
            run = measure.into(await lanes(args.concurrency, args.duration_s + 0.5, call, Run()))
            threads = by_thread(pid, threads0, thread_cpu(pid))
            _, err = await spy.communicate()
            if spy.returncode != 0 or not out.exists():
                raise SystemExit(f"py-spy failed: {err.decode()[-1000:]}")
    if args.keep is not None:
        args.keep.write_text(out.read_text())
    profile = Profile(out.read_text())
    cpu_ms = run.cpu_ms_per_request()
    cpu_pct = 100 * run.worker_cpu_s[0] / run.wall_s
    print(
        f"# py-spy {args.rate} Hz for {args.duration_s:g} s on the {args.target} (pid {pid}) at "
        f"{args.concurrency} in flight, the fake answering at once: {profile.samples} samples "
        f"({100 * profile.samples / args.rate / args.duration_s:.0f} % of the window; the process's CPU "
        f"from /proc {cpu_pct:.0f} %)"
    )
    print(
        f"# {args.target}: {run.rate:.1f} req/s, {cpu_ms:.2f} ms CPU/request (ms/req below = share x this); "
        f"raw litellm in this process just before: {litellm_cpu.cpu_ms_per_request():.2f} ms CPU/call; "
        f"{run.others()}; failed {run.failed}"
    )
    print("# CPU by thread (/proc): " + ", ".join(
        f"{name} {1000 * seconds / max(run.ok, 1):.2f} ms/request" for name, seconds in threads.items()
    ))  # fmt: skip
    samples = max(profile.samples, 1)
    table(f"self: top {args.top} frames", profile.self_counts(), samples, cpu_ms, args.top)
    table(f"inclusive: top {args.top} frames", profile.inclusive_counts(), samples, cpu_ms, args.top)
    ours = Counter({f: n for f, n in profile.inclusive_counts().items() if package(f) == "worker"})
    table("our frames (worker/), inclusive", ours, samples, cpu_ms, args.top)
    table("self samples by package", profile.by_package(caused=False), samples, cpu_ms, args.top)
    table(
        "samples by the package that caused them (innermost non-stdlib frame)",
        profile.by_package(caused=True),
        samples,
        cpu_ms,
        args.top,
    )
    no_litellm = profile.outside("litellm")
    print(
        f"outside litellm (no litellm frame on the stack): {100 * no_litellm / samples:.1f}% of samples, "
        f"{no_litellm / samples * cpu_ms:.2f} ms/request"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", choices=("worker", "proxy"), default="worker")
    parser.add_argument(
        "--duration-s", type=int, default=20, help="seconds sampled (py-spy takes whole seconds)"
    )
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--keep", type=Path, help="also write py-spy's collapsed stacks to this file")
    return parser.parse_args()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(parse_args()))
