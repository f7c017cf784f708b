"""``run --processes N`` (issue #21): N worker processes under one parent, one endpoint for the
pod, signals forwarded and every child drained, a child's death taking the pod down."""

from __future__ import annotations

import os
import signal

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.support.bodies import request_body
from tests.support.peers import raw_peer
from tests.support.processes import WorkerProcess, run_cli
from tests.support.waits import eventually
from worker.messages import LLMResult, Status


async def start_pod(config_dir, worker_processes, processes: int = 2) -> tuple[WorkerProcess, dict]:
    # The pod's own pod.ready, not a child's worker.ready: two children starting together write to
    # one stream, and a torn line made the wait miss both (a CI failure).
    pod = WorkerProcess(config_dir, args=("--processes", str(processes)), ready_event="pod.ready")
    worker_processes.append(pod)
    await pod.start(timeout_s=90)
    return pod, pod.events("pod.ready")[0]


def requests_by_process(text: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "llm_worker_requests_total":
                process = sample.labels["process"]
                counts[process] = counts.get(process, 0) + sample.value
    return counts


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_a_pod_of_two_processes_shares_the_queue_and_answers_on_one_endpoint(
    config, names, amqp_url, fake, worker_processes
):
    fake.latency_s = 0.05
    _, ready = await start_pod(config(bus={"prefetch": 8}), worker_processes)
    base = f"http://127.0.0.1:{ready['http_port']}"

    async with raw_peer(amqp_url, names.request_queue) as peer:
        ids = [await peer.publish(request_body(f"pod {i}", use_cache=False)) for i in range(40)]
        replies = await peer.wait_replies(40)

    assert sorted(r.correlation_id for r in peer.replies) == sorted(ids)
    assert len({r.headers["x-worker-id"] for r in replies}) == 2  # both processes took work
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/metrics") as response:
            assert response.status == 200
            text = await response.text()
        async with http.get(f"{base}/readyz") as response:
            assert response.status == 200
            assert await response.json() == {"ready": True, "process_0": True, "process_1": True}
    by_process = requests_by_process(text)
    assert set(by_process) == {"0", "1"} and sum(by_process.values()) == 40
    assert "llm_worker_pod_processes 2.0" in text
    assert text.count("# TYPE llm_worker_requests_total counter") == 1  # one family, not one per child


async def test_sigterm_drains_every_process_then_the_pod_exits_0(
    config, names, amqp_url, fake, worker_processes
):
    fake.latency_s = 1.0
    pod, ready = await start_pod(config(bus={"prefetch": 8}), worker_processes)
    async with raw_peer(amqp_url, names.request_queue) as peer:
        ids = [await peer.publish(request_body(f"drain {i}", use_cache=False)) for i in range(10)]
        await fake.wait_until(lambda f: f.in_flight == 10)  # all ten in flight, in both children
        pod.signal(signal.SIGTERM)
        assert await pod.wait(60) == 0
        replies = await peer.wait_replies(10)

    assert sorted(r.correlation_id for r in peer.replies) == sorted(ids)
    assert {LLMResult.model_validate_json(r.body).status for r in replies} == {Status.ok}
    assert not any(alive(pid) for pid in ready["pids"])
    [stopped] = pod.events("pod.stopped")
    assert stopped["exit_codes"] == [0, 0]


async def test_a_child_that_dies_takes_the_pod_down_with_its_code(config, fake, worker_processes):
    pod, ready = await start_pod(config(), worker_processes)
    first, second = ready["pids"]
    os.kill(first, signal.SIGKILL)
    assert await pod.wait(60) == 128 + signal.SIGKILL  # for the orchestrator to restart the pod
    [exited] = pod.events("pod.child_exited")
    assert exited["process"] == 0
    await eventually(lambda: not alive(second), what="the other process stopped")


async def test_a_bad_process_count_is_one_line_naming_the_range(config):
    for bad in ("0", "abc", "1000"):
        run = await run_cli(config(), "run", "--processes", bad)
        assert run.code == 2
        assert "a whole number from 1 to 64" in run.err and "Traceback" not in run.err


def test_a_pods_children_run_on_the_loop_the_pod_was_given():
    from worker.cli import build_parser
    from worker.cli.run import _child_args

    for given, loop in (([], "uvloop"), (["--loop", "asyncio"], "asyncio")):
        args = build_parser().parse_args(["run", "--processes", "2", *given])
        child = _child_args(args)
        assert child[child.index("--loop") + 1] == loop
