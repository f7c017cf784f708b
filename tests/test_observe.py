"""Observability (issue #7): the request.done line, no secret or prompt in logs, metrics after a
known sequence, readiness following the broker, W3C traceparent through the worker, OTel spans."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
import structlog
from aiohttp import web
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, WorkerProcess, deployment, llm_section, write_config
from tests.fakes.openai_server import FakeOpenAI
from tests.helpers import raw_peer, request_body
from worker import tracing
from worker.client import LLMClient
from worker.errors import ConfigError
from worker.ledger import to_micro
from worker.messages import LLMResult, Status
from worker.observe import Metrics, SecretScrubber
from worker.settings import load_settings

CANONICAL = {
    "request_id", "trace_id", "agent", "task_id", "model", "attempts", "fallback", "tokens",
    "cost_usd", "cached", "latency_ms", "outcome",
}  # fmt: skip
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


# -- helpers ---------------------------------------------------------------------------------


async def http_get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


async def wait_for(condition: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        await asyncio.sleep(0.1)


def has(line: dict[str, Any], **expected: Any) -> bool:
    """``line`` holds every expected field with its value (pytest shows the difference)."""
    assert {k: line.get(k) for k in expected} == expected
    return True


class Scrape:
    """One /metrics scrape, parsed: ``value(name, **labels)`` of a sample (0 when absent)."""

    def __init__(self, text: str):
        self.samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)


def scenario_models(base_url: str) -> dict[str, Any]:
    """ok on primary/backup; `broken` answers 500; `toolong` a context-window error -> backup."""
    return {
        "models": [
            deployment("primary", "primary", base_url),
            deployment("backup", "backup", base_url),
            deployment("broken", "e500", base_url),
            deployment("toolong", "ctx", base_url),
        ],
        "context_window_fallbacks": {"toolong": ["backup"]},
        "budget": {
            # 64 max tokens fit; max_tokens=5000 (worst case $0.01) does not.
            "max_cost_per_task": 0.005,
            "max_cost_per_day": 100.0,
            "max_cost_per_agent_day": {"writer": 50.0, "critic": 50.0},
        },
    }


class KeyEchoingProvider(FakeOpenAI):
    """Model ``echokey`` answers 401 quoting the API key it was sent, as some providers do."""

    async def _answer(self, model: str, n: int, body: dict[str, Any]) -> web.StreamResponse:
        if model == "echokey":
            key = self.requests[-1]["headers"].get("Authorization", "").removeprefix("Bearer ")
            return self._error(401, f"Incorrect API key provided: {key}. Find your key in the dashboard.")
        return await super()._answer(model, n, body)


# -- the request.done line -------------------------------------------------------------------


async def test_request_done_line_for_ok_cached_failed_and_budget_outcomes(
    make_settings, start_worker, client, fake
):
    settings = make_settings(**scenario_models(fake.base_url))
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with start_worker(settings):
            ok = await client.complete("one two three", agent="writer", task_id="t-1", trace_id=TRACE_ID)
            cached = await client.complete("one two three", agent="writer", task_id="t-1")
            failed = await client.complete("boom", agent="writer", model="broken")
            budget = await client.complete("pricey", agent="critic", task_id="t-1", max_tokens=5000)
            fell_back = await client.complete("long words", agent="writer", model="toolong")

    done = {e["request_id"]: e for e in logs if e["event"] == "request.done"}
    for result in (ok, cached, failed, budget, fell_back):
        line = done[result.request_id]
        assert set(line) >= CANONICAL, CANONICAL - set(line)
        assert line["trace_id"] == result.trace_id and line["outcome"] == result.status.value
        assert line["latency_ms"] > 0

    assert has(
        done[ok.request_id], trace_id=TRACE_ID, agent="writer", task_id="t-1", model="primary", outcome="ok",
        attempts=1, fallback=False, tokens=13, cost_usd=pytest.approx(6e-6 + 7 * 2e-6), cached=False,
    )  # fmt: skip
    assert has(done[cached.request_id], outcome="ok", cached=True, cost_usd=0.0, attempts=0, model="primary")
    assert has(
        done[failed.request_id], outcome="failed", model="broken", attempts=3, error="ServerError",
        dead_lettered=True, cost_usd=0.0,
    )  # fmt: skip
    assert has(
        done[budget.request_id], outcome="budget_exceeded", agent="critic", task_id="t-1",
        budget_scope="task:t-1", attempts=0, cost_usd=0.0,
    )  # fmt: skip
    assert has(done[fell_back.request_id], outcome="ok", model="backup", fallback=True, attempts=2)

    # Retries and fallbacks are logged as they happen, carrying the request's ids (contextvars).
    attempts = [e for e in logs if e["event"] == "llm.attempt_failed" and e["model"] == "broken"]
    assert [e["attempt"] for e in attempts] == [1, 2, 3]
    assert {(e["request_id"], e["trace_id"], e["agent"]) for e in attempts} == {
        (failed.request_id, failed.trace_id, "writer")
    }
    [fallback] = [e for e in logs if e["event"] == "llm.fallback"]
    assert has(
        fallback, request_id=fell_back.request_id, trace_id=fell_back.trace_id,
        from_model="toolong", to_model="backup", error="ContextWindowExceeded",
    )  # fmt: skip
    # Off by default: no prompt, no answer.
    assert not any("prompt" in e or "response" in e for e in logs)


async def test_prompts_and_responses_are_logged_only_when_switched_on(make_settings, start_worker, client):
    settings = make_settings(observe={"log_prompts_and_responses": True})
    with structlog.testing.capture_logs() as logs:
        async with start_worker(settings):
            result = await client.complete("tell me a secret plan", agent="writer")

    [line] = [e for e in logs if e["event"] == "request.done"]
    assert line["prompt"] == [{"role": "user", "content": "tell me a secret plan"}]
    assert line["response"] == result.content == "[m-writer] tell me a secret plan"


async def test_no_api_key_url_password_or_prompt_reaches_the_log(tmp_path, names, amqp_url, redis_url):
    """The real process and its JSON log chain, at debug level, with a provider that echoes the key.

    The key has no well-known prefix (no ``sk-``), so only redaction by value can catch it.
    """
    key = "zq" + secrets.token_hex(19)
    prompt = f"PROMPT-{uuid.uuid4().hex} please keep this private"
    provider = await KeyEchoingProvider().start()
    key_ref = "os.environ/OBS_TEST_PROVIDER_KEY"
    models = [
        deployment("primary", "primary", provider.base_url),
        deployment("leaky", "echokey", provider.base_url),
    ]
    for model in models:
        model["litellm_params"]["api_key"] = key_ref
    config = write_config(
        tmp_path / "cfg", names, amqp_url, redis_url, llm_section(provider.base_url, models=models)
    )
    worker = WorkerProcess(config, env={"OBS_TEST_PROVIDER_KEY": key}, args=("--log-level", "debug"))
    try:
        await worker.start()
        async with LLMClient(amqp_url, request_queue=names.request_queue, default_timeout_s=30) as llm:
            ok = await llm.complete(prompt, agent="writer", model="primary")
            failed = await llm.complete(prompt, agent="writer", model="leaky")
        worker.signal(signal.SIGTERM)
        assert await worker.wait() == 0
    finally:
        await worker.stop()
        await provider.stop()

    assert ok.status is Status.ok and failed.status is Status.failed
    # Nor in what the agent receives (and the dead-letter copy's x-dlq-message, built from it).
    assert failed.error is not None and key not in failed.error.message
    assert "[redacted]" in failed.error.message
    assert provider.requests[-1]["headers"]["Authorization"] == f"Bearer {key}"  # the key was really sent
    text = "\n".join(json.dumps(line) for line in worker.lines)
    assert key not in text and key[:16] not in text
    assert "PROMPT-" not in text and "keep this private" not in text
    # The provider's echo reached the log chain and was redacted there, not silently dropped.
    [echo] = [line for line in worker.events("llm.attempt_failed") if line["model"] == "leaky"]
    assert "Incorrect API key provided: [redacted]" in echo["message"]
    assert echo["request_id"] == failed.request_id and echo["trace_id"] == failed.trace_id
    done = {line["request_id"]: line for line in worker.events("request.done")}
    assert set(done[failed.request_id]) >= CANONICAL and done[failed.request_id]["outcome"] == "failed"


def test_scrubber_redacts_nested_values_urls_and_exception_texts():
    scrubber = SecretScrubber(["cohere-live-0123456789abcdef", "short"])
    event = {
        "event": "x",
        "broker": "amqp://worker:hunter2hunter2@rabbit:5672/",
        "error": ValueError("401 from provider: key cohere-live-0123456789abcdef rejected"),
        "nested": {"calls": [{"auth": "Bearer abcdefghijklmnop"}, 3]},
        "exception": "Traceback ...\nAuthenticationError: api_key=sk-proj-abcdefghijkl",
        "count": 3,
    }
    out = json.dumps(scrubber(None, "info", event))
    for secret in (
        "hunter2hunter2",
        "cohere-live-0123456789abcdef",
        "abcdefghijklmnop",
        "sk-proj-abcdefghijkl",
    ):
        assert secret not in out
    assert "amqp://worker:***@rabbit:5672/" in out and '"count": 3' in out
    assert scrubber.secrets == ["cohere-live-0123456789abcdef"]  # too short to redact by value safely


# -- metrics ---------------------------------------------------------------------------------


async def test_metrics_after_a_known_sequence_of_requests(make_settings, start_worker, client, fake):
    settings = make_settings(**scenario_models(fake.base_url))
    async with start_worker(settings) as worker:
        base = f"http://127.0.0.1:{worker.http_port}"
        first = await client.complete("one two three", agent="writer", task_id="t-1")  # 6 + 7 tokens
        await client.complete("one two three", agent="writer", task_id="t-1")  # cache hit
        critic = await client.complete("four five", agent="critic")  # 5 + 7 tokens
        await client.complete("boom", agent="writer", model="broken")  # 3 attempts: 2 retries, DLQ
        fell_back = await client.complete("long words", agent="writer", model="toolong")  # ctx->backup 5+7
        await client.complete("pricey", agent="writer", task_id="t-1", max_tokens=5000)  # task budget
        await client.complete("four five", agent="critic", request_id=critic.request_id)  # duplicate
        status, text = await http_get(f"{base}/metrics")
        assert status == 200

        # Readiness follows consumption: stopping (as a drain does) makes the worker unready.
        assert (await http_get(f"{base}/readyz"))[0] == 200
        await worker.bus.stop_consuming()
        status, body = await http_get(f"{base}/readyz")
        assert status == 503 and json.loads(body) == {"ready": False, "connected": True, "consuming": False}
        assert (await http_get(f"{base}/livez"))[0] == 200

    m = Scrape(text)
    requests = {
        ("writer", "primary", "ok"): 2,
        ("critic", "primary", "ok"): 1,
        ("writer", "broken", "failed"): 1,
        ("writer", "backup", "ok"): 1,
        ("writer", "none", "budget_exceeded"): 1,
    }
    for (agent, model, status), count in requests.items():
        assert m.value("llm_worker_requests_total", agent=agent, model=model, status=status) == count
    assert sum(v for (name, _), v in m.samples.items() if name == "llm_worker_requests_total") == 6
    assert m.value("llm_worker_duplicate_requests_total", agent="critic") == 1
    assert m.value("llm_worker_request_duration_seconds_count", agent="writer", model="primary") == 2
    assert m.value("llm_worker_provider_duration_seconds_count", model="primary") == 2
    assert m.value("llm_worker_provider_duration_seconds_count", model="backup") == 1
    assert m.value("llm_worker_provider_duration_seconds_sum", model="primary") > 0

    tokens = {("writer", "primary"): (6, 7), ("critic", "primary"): (5, 7), ("writer", "backup"): (5, 7)}
    for (agent, model), (prompt, completion) in tokens.items():
        assert m.value("llm_worker_tokens_total", agent=agent, model=model, kind="prompt") == prompt
        assert m.value("llm_worker_tokens_total", agent=agent, model=model, kind="completion") == completion
        cost = prompt * 1e-6 + completion * 2e-6
        assert m.value("llm_worker_cost_usd_total", agent=agent, model=model) == pytest.approx(cost)
    assert first.cost_usd == pytest.approx(6e-6 + 14e-6)

    assert m.value("llm_worker_cache_lookups_total", agent="writer", result="hit") == 1
    assert m.value("llm_worker_cache_lookups_total", agent="writer", result="miss") == 4
    assert m.value("llm_worker_cache_lookups_total", agent="critic", result="miss") == 1
    assert m.value("llm_worker_budget_rejections_total", agent="writer", scope="task") == 1
    assert m.value("llm_worker_retries_total", model="broken", error="ServerError") == 2
    assert (
        m.value(
            "llm_worker_fallbacks_total",
            from_model="toolong",
            to_model="backup",
            error="ContextWindowExceeded",
        )
        == 1
    )
    assert m.value("llm_worker_dead_lettered_total", reason="ServerError") == 1
    assert m.value("llm_worker_in_flight") == 0
    # Ledger spend, read from Redis at scrape time (integer micro-dollars, rounded up per charge).
    writer_micro = to_micro(first.cost_usd) + to_micro(fell_back.cost_usd)
    day_micro = writer_micro + to_micro(critic.cost_usd)
    assert m.value("llm_worker_budget_spent_usd", scope="day", agent="") == pytest.approx(day_micro / 1e6)
    assert m.value("llm_worker_budget_spent_usd", scope="agent", agent="writer") == pytest.approx(
        writer_micro / 1e6
    )
    assert m.value("llm_worker_budget_limit_usd", scope="agent", agent="critic") == 50.0
    assert m.value("llm_worker_budget_reserved_usd", scope="day", agent="") == 0


def test_each_worker_owns_its_registry():
    one, two = Metrics(agents=["writer"]), Metrics(agents=["writer"])  # no "Duplicated timeseries"
    one.retry("primary", "RateLimited")
    assert (
        one.registry.get_sample_value(
            "llm_worker_retries_total", {"model": "primary", "error": "RateLimited"}
        )
        == 1
    )
    assert (
        two.registry.get_sample_value(
            "llm_worker_retries_total", {"model": "primary", "error": "RateLimited"}
        )
        is None
    )
    assert (
        REGISTRY.get_sample_value("llm_worker_retries_total", {"model": "primary", "error": "RateLimited"})
        is None
    )


async def test_unconfigured_agent_names_do_not_grow_the_label_set(make_settings, start_worker, client):
    async with start_worker(make_settings()) as worker:
        for i in range(3):
            await client.complete("hi", agent=f"made-up-{i}", use_cache=False)
        _, text = await http_get(f"http://127.0.0.1:{worker.http_port}/metrics")
    assert Scrape(text).value("llm_worker_requests_total", agent="other", model="primary", status="ok") == 3
    assert "made-up" not in text


# -- health ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRabbitMQ:
    """A RabbitMQ node of this test's own, to stop and start (never the shared one)."""

    def __init__(self, user: str, password: str):
        self.tag = f"obs{uuid.uuid4().hex[:8]}"
        self.node = f"{self.tag}@localhost"
        self.port, self.dist_port = _free_port(), _free_port()
        self.base = Path(f"/tmp/rmq-{self.tag}")
        self.url = f"amqp://{user}:{password}@127.0.0.1:{self.port}/"
        self.proc: asyncio.subprocess.Process | None = None
        (self.base / "mnesia").mkdir(parents=True)
        (self.base / "log").mkdir()
        (self.base / "plugins").write_text("[].\n")
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            f"default_user = {user}\ndefault_pass = {password}\n"
        )
        shutil.chown(self.base, "rabbitmq", "rabbitmq")
        for path in self.base.rglob("*"):
            shutil.chown(path, "rabbitmq", "rabbitmq")

    async def _accepts(self) -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        writer.close()
        return True

    async def start(self) -> None:
        b = self.base
        env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": f"{b}/mnesia",
            "RABBITMQ_FEATURE_FLAGS_FILE": f"{b}/ff",
            "RABBITMQ_LOG_BASE": f"{b}/log",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{b}/plugins",
            "RABBITMQ_CONFIG_FILE": f"{b}/rabbitmq",
        }
        self.proc = await asyncio.create_subprocess_exec(
            "rabbitmq-server", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

        async def up() -> bool:
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise AssertionError(f"rabbitmq-server exited with {self.proc.returncode}; see {b}/log")
            return await self._accepts()

        await wait_for(up, 60, f"private RabbitMQ on port {self.port}")

    async def _ctl(self, command: str) -> None:
        ctl = await asyncio.create_subprocess_exec(
            "rabbitmqctl", "-n", self.node, command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        assert await asyncio.wait_for(ctl.wait(), 60) == 0, f"rabbitmqctl {command} failed"

    async def stop_app(self) -> None:
        """The broker goes away (every connection closed, the port shut); the Erlang node stays,
        so :meth:`start_app` takes a second or two instead of a whole boot."""
        await self._ctl("stop_app")

    async def start_app(self) -> None:
        await self._ctl("start_app")
        await wait_for(self._accepts, 60, f"private RabbitMQ back on port {self.port}")

    async def stop(self) -> None:
        await self._ctl("stop")
        if self.proc is not None:
            await asyncio.wait_for(self.proc.wait(), 30)

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            await self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
async def private_rabbitmq() -> AsyncIterator[PrivateRabbitMQ]:
    if shutil.which("rabbitmq-server") is None or os.geteuid() != 0:
        pytest.skip("needs rabbitmq-server and root (the node runs as the rabbitmq user)")
    broker = PrivateRabbitMQ("obs", "pw-" + secrets.token_hex(12))
    try:
        yield broker
    finally:
        await broker.close()


async def test_readiness_follows_the_broker_and_its_password_is_never_logged(
    tmp_path, names, redis_url, fake, private_rabbitmq, worker_processes
):
    broker = private_rabbitmq
    await broker.start()
    config = write_config(tmp_path / "cfg", names, broker.url, redis_url, llm_section(fake.base_url))
    worker = await WorkerProcess(config, env={"AMQP_URL": broker.url}).start()
    worker_processes.append(worker)
    base = f"http://127.0.0.1:{worker.events('worker.ready')[0]['http_port']}"

    async def ready_is(expected: int) -> bool:
        return (await http_get(f"{base}/readyz"))[0] == expected

    assert await ready_is(200)
    await broker.stop_app()
    await wait_for(lambda: ready_is(503), 30, "/readyz answers 503 once the broker is gone")
    assert json.loads((await http_get(f"{base}/readyz"))[1])["connected"] is False
    assert (await http_get(f"{base}/livez"))[0] == 200  # a broker outage must not get the pod killed

    await broker.start_app()  # durable queues come back
    await wait_for(lambda: ready_is(200), 60, "/readyz answers 200 after the broker is back")
    async with raw_peer(broker.url, names.request_queue) as peer:  # ready means really consuming
        await peer.publish(request_body("after the outage"))
        [reply] = await peer.wait_replies(1)
    assert LLMResult.model_validate_json(reply.body).status is Status.ok

    password = broker.url.split(":")[2].split("@")[0]
    assert password not in "\n".join(json.dumps(line) for line in worker.lines)
    assert "obs:***@127.0.0.1" in worker.events("worker.ready")[0]["broker"]


async def test_port_in_use_is_a_config_error_naming_the_key(make_settings, start_worker):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"observe.port: cannot listen on 127.0.0.1:{port}"):
            async with start_worker(make_settings(observe={"port": port})):
                pass


def test_observe_yaml_is_required_and_port_can_come_from_the_environment(tmp_path):
    folder = tmp_path / "cfg"
    shutil.copytree(ROOT / "config" / "offline", folder)
    assert load_settings(folder, environ={"OBSERVE_PORT": "9999"}).observe.port == 9999
    (folder / "observe.yaml").unlink()
    with pytest.raises(ConfigError, match=r"observe\.yaml: observe: file not found"):
        load_settings(folder, environ={})


# -- trace propagation -----------------------------------------------------------------------


async def test_traceparent_round_trip(make_settings, start_worker, amqp_url, names):
    incoming = f"00-{TRACE_ID}-{PARENT_ID}-01"
    other_trace = uuid.uuid4().hex
    async with start_worker(make_settings()), raw_peer(amqp_url, names.request_queue) as peer:
        # no trace_id in the body: the request joins the header's trace
        await peer.publish(request_body("a"), headers={"traceparent": incoming, "tracestate": "vendor=x"})
        # both: the body's trace_id is the contract, the reply's header follows it
        await peer.publish(request_body("b", trace_id=other_trace), headers={"traceparent": incoming})
        # a malformed header (upper case) is ignored, as the W3C spec says
        await peer.publish(request_body("c"), headers={"traceparent": incoming.upper()})
        # an invalid body still answers in the caller's trace
        await peer.publish(b"{not json", headers={"traceparent": incoming})
        replies = await peer.wait_replies(4)

    by_content = {}
    for reply in replies:
        result = LLMResult.model_validate_json(reply.body)
        header = tracing.TraceParent.parse(reply.headers["traceparent"])
        assert header is not None and header.trace_id == result.trace_id  # header and body agree
        assert header.parent_id != PARENT_ID  # the worker's own span, not the agent's
        by_content[result.content or result.status.value] = (result, reply.headers)
    a, a_headers = by_content["[m-writer] a"]
    assert a.trace_id == TRACE_ID and a_headers["tracestate"] == "vendor=x"
    assert by_content["[m-writer] b"][0].trace_id == other_trace
    c = by_content["[m-writer] c"][0]
    assert c.trace_id not in (None, TRACE_ID) and len(c.trace_id) == 32
    assert by_content["invalid"][0].trace_id == TRACE_ID


async def test_client_sends_a_traceparent_for_its_trace_id(amqp_url, names, client):
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(names.request_queue, durable=True)  # no worker behind it
        call = asyncio.create_task(client.complete("hi", agent="writer", trace_id=TRACE_ID, timeout_s=20))
        got: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def arrived() -> bool:
            message = await queue.get(fail=False)
            got.extend([message] if message is not None else [])
            return bool(got)

        await wait_for(arrived, 10, "the client's request in the queue")
        message = got[0]
        await message.ack()
        header = tracing.TraceParent.parse(message.headers["traceparent"])
        assert header is not None and header.trace_id == TRACE_ID and header.sampled
        # Answer like a worker would, so the call completes.
        result = LLMResult(
            request_id=message.correlation_id, trace_id=TRACE_ID, status=Status.ok, content="x"
        )
        await channel.default_exchange.publish(
            aio_pika.Message(result.model_dump_json().encode(), correlation_id=message.correlation_id),
            routing_key=message.reply_to,
        )
        assert (await call).content == "x"


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (f"00-{TRACE_ID}-{PARENT_ID}-01", (TRACE_ID, PARENT_ID, "01")),
        (f"00-{TRACE_ID}-{PARENT_ID}-00".encode(), (TRACE_ID, PARENT_ID, "00")),  # AMQP may give bytes
        (f"01-{TRACE_ID}-{PARENT_ID}-01-future-field", (TRACE_ID, PARENT_ID, "01")),
        (f"00-{TRACE_ID}-{PARENT_ID}-01-extra", None),  # version 00 has exactly four fields
        (f"ff-{TRACE_ID}-{PARENT_ID}-01", None),
        (f"00-{'0' * 32}-{PARENT_ID}-01", None),
        (f"00-{TRACE_ID}-{'0' * 16}-01", None),
        (f"00-{TRACE_ID.upper()}-{PARENT_ID}-01", None),
        ("garbage", None),
        (None, None),
    ],
)
def test_traceparent_parsing_follows_the_w3c_rules(value, parsed):
    result = tracing.TraceParent.parse(value)
    assert (result.trace_id, result.parent_id, result.flags) == parsed if parsed else result is None


# -- OpenTelemetry ---------------------------------------------------------------------------


@pytest.fixture
def otel_spans():
    """An SDK tracer provider with an in-memory exporter, for this test only.

    OpenTelemetry lets a process set its provider once; the reset afterwards is what its own
    test utilities do (opentelemetry-test-utils ``reset_trace_globals``), so that later tests
    run without an SDK, as a worker without the ``otel`` extra does.
    """
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.util._once import Once

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


async def test_provider_attempts_are_spans_in_the_agents_trace(
    otel_spans, make_settings, start_worker, amqp_url, names, fake
):
    from opentelemetry.trace import StatusCode

    settings = make_settings(models=[deployment("primary", "flaky1", fake.base_url)])
    async with start_worker(settings), raw_peer(amqp_url, names.request_queue) as peer:
        await peer.publish(
            request_body("traced call"), headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
        )
        [reply] = await peer.wait_replies(1)

    assert LLMResult.model_validate_json(reply.body).attempts == 2
    spans = sorted(otel_spans.get_finished_spans(), key=lambda s: s.start_time)
    assert [s.name for s in spans] == ["chat primary", "chat primary"]
    for span in spans:
        assert f"{span.context.trace_id:032x}" == TRACE_ID
        assert f"{span.parent.span_id:016x}" == PARENT_ID  # a child of the agent's span
        assert span.attributes["gen_ai.request.model"] == "primary"
        assert not span.events  # no exception text (a provider error may echo a key)
    failed, answered = spans
    assert failed.status.status_code is StatusCode.ERROR and failed.attributes["error.type"] == "ServerError"
    assert answered.attributes["gen_ai.usage.output_tokens"] == 7
    assert answered.status.status_code is StatusCode.UNSET


async def test_client_joins_the_agents_current_span(otel_spans, make_settings, start_worker, client):
    from opentelemetry import trace

    async with start_worker(make_settings()):
        with trace.get_tracer("agent").start_as_current_span("agent step") as step:
            result = await client.complete("inside a span", agent="writer")
    assert result.trace_id == f"{step.get_span_context().trace_id:032x}"
    provider_span = next(
        s for s in otel_spans.get_finished_spans() if s.context.trace_id == int(result.trace_id, 16)
    )
    assert provider_span.parent.span_id == step.get_span_context().span_id


def test_without_opentelemetry_spans_are_no_ops(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # makes the import fail
    tracing._otel.cache_clear()
    try:
        with tracing.provider_span(TRACE_ID, model="m", attempt=1) as span:
            span.failed("ServerError", 500)
            span.answered(1, 2)
        assert not span.recording and tracing.client_parent() is None
    finally:
        tracing._otel.cache_clear()
