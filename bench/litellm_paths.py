"""Where litellm's own per-call CPU goes, and what makes it cheaper (issue #9).

    python bench/litellm_paths.py [--calls 2000] [--concurrency 20]

Runs each way of making the same call against the local fake OpenAI server (a separate process,
zero latency) in one run, and prints requests/s and this process's CPU per call, plus the ratio
to the first line. Paths:

- router: ``Router.acompletion`` as the worker makes it (num_retries=0, per-call timeout)
- router, no success logging: the same with litellm's success logging skipped
- direct: ``litellm.acompletion`` with the deployment's params (no Router)
- direct, no success logging
- direct, no success logging, set-up inline: litellm's synchronous per-call set-up on the event
  loop instead of its default thread pool (``worker/llm_setup.py``)
- the same without litellm's own cost calculation (``configure_litellm``): what the worker does
- direct, aiohttp_openai/: the ``aiohttp_openai/`` provider prefix instead of ``openai/`` (it skips
  the openai SDK; in litellm 1.82.6 it returns zero usage and reports every HTTP error as a
  connection error, so the worker refuses it at start-up: the line shows what that costs)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import describe  # noqa: E402


async def drive(call: Callable[[], Awaitable[object]], calls: int, concurrency: int) -> tuple[float, float]:
    remaining = calls

    async def lane() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return time.perf_counter() - t0, time.process_time() - cpu0


async def main(calls: int, concurrency: int, port: int, rounds: int) -> None:
    import litellm

    from worker import llm_setup

    llm_setup.install(asyncio.get_running_loop())
    litellm.suppress_debug_info = True
    params = {"model": "openai/ok", "api_base": f"http://127.0.0.1:{port}/v1", "api_key": "sk-fake"}
    router = litellm.Router(
        model_list=[
            {
                "model_name": "chat",
                "litellm_params": params,
                "model_info": {"id": "chat#0", "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6},
            }
        ],
        num_retries=0,
    )
    messages = [{"role": "user", "content": "hello there general kenobi"}]
    common = {"messages": messages, "temperature": 0.5, "max_tokens": 16, "timeout": 30}

    async def inlined() -> object:
        with llm_setup.inline():
            return await litellm.acompletion(
                **params, max_retries=0, _is_litellm_internal_call=True, **common
            )

    paths: dict[str, Callable[[], Awaitable[object]]] = {
        "router": lambda: router.acompletion(model="chat", num_retries=0, **common),
        "router, no success logging": lambda: router.acompletion(
            model="chat", num_retries=0, _is_litellm_internal_call=True, **common
        ),
        "direct": lambda: litellm.acompletion(**params, max_retries=0, **common),
        "direct, no success logging": lambda: litellm.acompletion(
            **params, max_retries=0, _is_litellm_internal_call=True, **common
        ),
        "direct, no logging, inline": lambda: inlined(),
        "the same, no litellm cost": lambda: inlined(),
        # the same server through litellm's aiohttp provider, which skips the openai SDK
        "direct, aiohttp_openai/": lambda: litellm.acompletion(
            **{**params, "model": "aiohttp_openai/ok"}, max_retries=0, **common
        ),
    }
    print(describe())
    print(f"# {calls} calls per path per round, concurrency {concurrency}, {rounds} rounds (interleaved)")
    litellm_cost = litellm.response_cost_calculator

    def cost_for(name: str) -> None:
        litellm.response_cost_calculator = _no_cost if "no litellm cost" in name else litellm_cost

    for name, fn in paths.items():
        cost_for(name)
        await drive(fn, 200, concurrency)  # warm-up
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            cost_for(name)
            wall, cpu = await drive(fn, calls, concurrency)
            results[name].append((calls / wall, 1000 * cpu / calls))
    cost_for("")
    base = None
    for name, runs in results.items():
        rate = sorted(r for r, _ in runs)[len(runs) // 2]
        cpu = sorted(c for _, c in runs)[len(runs) // 2]
        base = base or cpu
        print(f"{name:28s} {rate:7.1f} req/s   cpu/call {cpu:5.2f} ms   cpu vs router {cpu / base:4.2f}")


def _no_cost(**_: object) -> None:
    return None


@contextlib.contextmanager
def fake_provider(port: int) -> Iterator[None]:
    """The fake OpenAI server in its own process on ``port``, from its first line to the end."""
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.openai_server", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        server.stdout.readline()  # "listening on ..."
        yield
    finally:
        server.terminate()
        server.wait()


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=18941)
    args = parser.parse_args()
    with fake_provider(args.port):
        asyncio.run(main(args.calls, args.concurrency, args.port, args.rounds))


if __name__ == "__main__":
    cli()
