"""The benchmarks still run (issue #9): each script, in its shortest form, against the real broker
and Redis. No figure is checked here, only that every section printed its lines with nothing
failed; `bench/sizing.py` once stopped starting workers when a config file became required, and
nobody noticed until the next measurement."""

from __future__ import annotations

import asyncio
import os
import re
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(300)


async def run_bench(amqp_url: str, redis_url: str, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=ROOT,
        env={
            **os.environ,
            "AMQP_URL": amqp_url,
            "REDIS_URL": redis_url,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 240)
    assert proc.returncode == 0, err.decode()[-2000:]
    return out.decode()


async def test_performance_bench_prints_every_section(amqp_url, redis_url):
    out = await run_bench(
        amqp_url, redis_url, "bench/performance.py", "--only", "ratio,latency,slow",
        "--duration-s", "1", "--concurrency", "4", "--rate", "10", "--slow-in-flight", "8",
    )  # fmt: skip
    assert out.startswith("# machine: ")
    assert re.search(r"^ratio +worker / raw litellm = \d+\.\d\d", out, re.M)
    assert re.search(r"^latency +added .* p50 \d+\.\d ms, p99 \d+\.\d ms", out, re.M)
    assert re.search(r"^latency +the bus alone \(.*\): p50 \d+\.\d ms", out, re.M)
    assert re.search(r"^slow +provider 1000 ms, one worker, prefetch 8, 8 lanes: +\d+\.\d req/s", out, re.M)
    assert re.findall(r"failed (\d+)", out) == ["0", "0"]  # the ratio and slow windows
    assert re.search(r"^start-up spawn to worker.ready over 3 workers", out, re.M)


async def test_sizing_bench_runs_a_worker_under_load(amqp_url, redis_url):
    out = await run_bench(amqp_url, redis_url, "bench/sizing.py", "--scenarios", "1x4", "--duration-s", "1")
    line = out.splitlines()[-1]
    assert re.match(r"workers=1 in_flight= +4 +\d+\.\d req/s", line)
    assert line.endswith("failed 0")
