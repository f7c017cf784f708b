"""The worker process as the image runs it (issue #3): replicas sharing one queue, the offline
profile answering `ask`, the start-up heap frozen."""

from __future__ import annotations

import asyncio

from tests.support.bodies import request_body
from tests.support.config import offline_config
from tests.support.peers import raw_peer
from tests.support.processes import WorkerProcess, run_cli, start_replicas
from worker.messages import LLMResult, Status


async def test_two_replicas_share_one_queue_and_answer_each_request_once(
    config, names, amqp_url, fake, worker_processes
):

    fake.latency_s = 0.05
    await start_replicas(config(bus={"prefetch": 8}), 2, worker_processes)

    async with raw_peer(amqp_url, names.request_queue) as peer:
        ids = [await peer.publish(request_body(f"share {i}", use_cache=False)) for i in range(80)]
        replies = await peer.wait_replies(80)
        await asyncio.sleep(0.5)  # a duplicate would arrive now

    assert sorted(r.correlation_id for r in peer.replies) == sorted(ids)  # each answered exactly once
    by_worker = {r.headers["x-worker-id"] for r in replies}
    assert len(by_worker) == 2  # both replicas took work
    assert fake.calls["m-writer"] == 80


async def test_offline_profile_answers_ask_over_the_bus(
    tmp_path, names, amqp_url, redis_url, worker_processes
):
    """The README's path for a newcomer without keys: run the offline profile, then `ask`."""
    config = offline_config(tmp_path / "offline", names)
    worker = await WorkerProcess(config).start()
    worker_processes.append(worker)
    assert "OFFLINE" in worker.events("worker.ready")[0]["profile"]

    run = await run_cli(config, "ask", "--agent", "writer", "Write a haiku about queues")
    assert run.code == 0, run.err
    assert "queue" in run.out
    summary = run.err
    assert "[ok] model=claude-sonnet-4-6" in summary and "trace_id=" in summary
    assert "cost_usd=0.000330" in summary  # the mock's 10 + 20 tokens at the configured prices


async def test_the_worker_process_freezes_its_start_up_heap_and_still_answers(
    config, amqp_url, names, fake, worker_processes
):
    """`python -m worker run` moves litellm's ~300,000 start-up objects out of the garbage
    collector's reach before consuming (full collections stop walking them)."""
    worker = await WorkerProcess(config()).start()
    worker_processes.append(worker)
    [ready] = worker.events("worker.ready")
    assert ready["frozen_objects"] > 100_000
    async with raw_peer(amqp_url, names.request_queue) as peer:
        await peer.publish(request_body("after the freeze", use_cache=False))
        [reply] = await peer.wait_replies(1)
    assert LLMResult.model_validate_json(reply.body).status is Status.ok


async def test_the_worker_runs_on_uvloop_unless_told_asyncio(config, amqp_url, names, fake, worker_processes):
    """`run` starts on uvloop (less CPU per request, issue #21); `--loop asyncio` on Python's own
    loop; each answers a request end to end."""
    for flag, loop in (((), "uvloop"), (("--loop", "asyncio"), "asyncio")):
        worker = await WorkerProcess(config(), args=flag).start()
        worker_processes.append(worker)
        [ready] = worker.events("worker.ready")
        assert ready["event_loop"] == loop
        async with raw_peer(amqp_url, names.request_queue) as peer:
            await peer.publish(request_body(f"on {loop}", use_cache=False))
            [reply] = await peer.wait_replies(1)
        assert LLMResult.model_validate_json(reply.body).status is Status.ok
        await worker.stop()
