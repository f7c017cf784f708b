"""Measure litellm's own per-call cost, to choose the pinned version by measurement.

Runs in whatever venv invokes it (so: once per candidate version) against the local fake
OpenAI server started as a separate process, and prints one line per path:

    python bench/litellm_versions.py --calls 3000 --concurrency 20

Paths: a bare ``litellm.acompletion`` and ``Router.acompletion`` (retries off), both against
the fake server over loopback. CPU per call is this process's CPU time divided by calls.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The same closed-loop driver and fake server as bench/litellm_paths.py: the two measure alike.
from bench.litellm_paths import drive, fake_provider  # noqa: E402


async def _main(calls: int, concurrency: int, port: int) -> None:
    import litellm

    litellm.suppress_debug_info = True
    api_base = f"http://127.0.0.1:{port}/v1"
    messages = [{"role": "user", "content": "hello there general kenobi"}]

    async def bare() -> object:
        return await litellm.acompletion(
            model="openai/ok", api_base=api_base, api_key="sk-fake", messages=messages, max_retries=0
        )

    router = litellm.Router(
        model_list=[
            {
                "model_name": "chat",
                "litellm_params": {"model": "openai/ok", "api_base": api_base, "api_key": "sk-fake"},
                "model_info": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6},
            }
        ],
        num_retries=0,
    )

    async def routed() -> object:
        return await router.acompletion(model="chat", messages=messages)

    version = getattr(litellm, "__version__", None) or _dist_version()
    print(
        f"# litellm {version} python {platform.python_version()} {platform.machine()} "
        f"cpus={os.cpu_count()} calls={calls} concurrency={concurrency}"
    )
    for name, fn in (("acompletion", bare), ("router", routed)):
        await drive(fn, 200, concurrency)  # warm-up
        wall, cpu = await drive(fn, calls, concurrency)
        print(f"{name:12s} {calls / wall:8.1f} req/s  cpu/call {1000 * cpu / calls:6.2f} ms")


def _dist_version() -> str:
    from importlib.metadata import version

    return version("litellm")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--port", type=int, default=18911)
    args = parser.parse_args()
    with fake_provider(args.port):
        asyncio.run(_main(args.calls, args.concurrency, args.port))


if __name__ == "__main__":
    main()
