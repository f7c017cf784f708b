"""The benchmarks still run (issue #9): each script, in its shortest form, against the real broker
and Redis. No figure is checked here, only that every section printed its lines with nothing
failed; `bench/sizing.py` once stopped starting workers when a config file became required, and
nobody noticed until the next measurement."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys

import pytest

from tests.support.paths import ROOT

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


async def test_three_way_bench_measures_the_proxy_raw_litellm_and_the_worker(amqp_url, redis_url):
    """The LiteLLM proxy in its own venv (bench/proxy.py; about 30 s to install with a warm pip
    cache, once), beside raw litellm and a worker, each section with nothing failed."""
    out = await run_bench(
        amqp_url, redis_url, "bench/three_way.py", "--rounds", "1", "--duration-s", "1",
        "--latency-s", "1", "--concurrency", "4", "--slow-in-flight", "8",
    )  # fmt: skip
    assert out.startswith("# machine: ")
    for section in ("throughput", "slow"):
        for system in ("raw", "proxy", "worker"):
            assert re.search(rf"^{section} +{system} +\d+\.\d req/s .* failed 0$", out, re.M), (
                section,
                system,
            )
    for pair in ("worker / proxy", "worker / raw", "proxy / raw"):
        assert re.search(rf"^ratio +{pair} += \d+\.\d\d", out, re.M), pair
    for system in ("raw", "proxy", "worker"):
        assert re.search(rf"^latency +{system} +added p50 +-?\d+\.\d\d ms, p99 .* failed 0\)$", out, re.M)
    assert re.search(
        r"^cpu +own CPU per request: worker \d+\.\d\d - litellm \d+\.\d\d = -?\d+\.\d\d ms", out, re.M
    )


async def test_hotspots_bench_prints_the_top_frames_of_a_loaded_worker(amqp_url, redis_url):
    out = await run_bench(
        amqp_url, redis_url, "bench/hotspots.py", "--duration-s", "2", "--top", "5", "--concurrency", "4"
    )
    assert re.search(r"^# py-spy 100 Hz for 2 s on the worker .*: \d+ samples", out, re.M)
    assert re.search(r"^# worker: \d+\.\d req/s, \d+\.\d\d ms CPU/request.*failed 0$", out, re.M)
    self_table = out.split("self: top 5 frames\n", 1)[1].split("inclusive:", 1)[0]
    assert len(re.findall(r"^ +\d+\.\d% +\d+\.\d{3}  \S", self_table, re.M)) == 5
    inclusive = out.split("inclusive: top 5 frames\n", 1)[1]
    assert "(worker/" in inclusive.split("self samples by package", 1)[0]  # our frames are on the stack


async def test_revisions_bench_runs_two_revisions_side_by_side(amqp_url, redis_url):
    """Each revision's worker from its own exported tree (both HEAD here), closed and open loop."""
    for load in (("--concurrency", "4"), ("--rate", "10")):
        out = await run_bench(
            amqp_url, redis_url, "bench/revisions.py", "--rev", "HEAD", "--rev", "HEAD",
            "--rounds", "1", "--duration-s", "1", *load,
        )  # fmt: skip
        assert re.search(r"^system +raw +\d+\.\d req/s .* failed 0$", out, re.M)
        assert len(re.findall(r"^system +\d:[0-9a-f]+ +\d+\.\d req/s .* failed 0$", out, re.M)) == 2
        own = r"^cpu +1:[0-9a-f]+: \d+\.\d\d ms/request, own -?\d+\.\d\d ms .* x\d\.\d{3} of 0:"
        assert re.search(own, out, re.M)


async def test_request_state_bench_compares_three_scripts_with_two(amqp_url, redis_url):
    out = await run_bench(
        amqp_url, redis_url, "bench/request_state.py", "--requests", "50", "--rounds", "2",
        "--redis", redis_url,
    )  # fmt: skip
    assert re.search(r"^three scripts +\d+ us CPU/request", out, re.M)
    assert re.search(r"^two scripts +\d+ us CPU/request", out, re.M)
    assert re.search(r"^two / three +x\d\.\d\d per round", out, re.M)


async def test_log_line_bench_prints_the_cpu_of_one_line(amqp_url, redis_url):
    out = await run_bench(amqp_url, redis_url, "bench/log_line.py", "--lines", "200")
    assert re.search(r"^request.done \d+\.\d us CPU/line", out, re.M)


async def test_streaming_bench_measures_the_first_chunk(amqp_url, redis_url):
    out = await run_bench(amqp_url, redis_url, "bench/streaming.py", "--requests", "3", "--concurrency", "2")
    assert out.startswith("# machine: ")
    assert re.search(r"^sequential +first chunk after the provider's first token: p50 \d+\.\d ms", out, re.M)
    assert re.search(r"^concurrent +2 streams at once, time to first chunk: p50 \d+\.\d ms", out, re.M)


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (Debian: strace)")
async def test_syscalls_bench_counts_a_loaded_workers_calls_per_request(amqp_url, redis_url):
    out = await run_bench(amqp_url, redis_url, "bench/syscalls.py", "--in-flight", "2", "--duration-s", "1")
    assert out.startswith("# machine: ")
    assert re.search(r"^in flight 2: [1-9]\d* answered, failed 0$", out, re.M)
    # a worker that answers sends: sendto on asyncio's loop, write on uvloop's (libuv)
    assert re.search(r"^  (sendto|write) +\d+\.\d\d per request$", out, re.M)
