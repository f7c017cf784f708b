"""Metrics (issue #7): /metrics after a known sequence of requests, one registry per worker, a
bounded label set."""

from __future__ import annotations

import json

import pytest
from prometheus_client import REGISTRY

from tests.observe.scenario import scenario_models
from tests.support.http import Scrape, http_get
from worker.observe.metrics import Metrics


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
        assert status == 503 and json.loads(body) == {
            "ready": False,
            "connected": True,
            "consuming": False,
            "redis_memory_ok": True,  # the memory guard's check (#22)
        }
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
    # Ledger spend, read from Redis at scrape time (integer nano-dollars, each reply's cost_nano_usd).
    writer_nano = first.cost_nano_usd + fell_back.cost_nano_usd
    day_nano = writer_nano + critic.cost_nano_usd
    assert m.value("llm_worker_budget_spent_usd", scope="day", agent="") == pytest.approx(day_nano / 1e9)
    assert m.value("llm_worker_budget_spent_usd", scope="agent", agent="writer") == pytest.approx(
        writer_nano / 1e9
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
    budget = {"max_cost_per_task": 10.0, "max_cost_per_day": 100.0, "max_cost_per_agent_day": {},
              "max_cost_per_unconfigured_agent_day": 1.0}  # fmt: skip
    async with start_worker(make_settings(budget=budget)) as worker:
        for i in range(3):
            await client.complete("hi", agent=f"made-up-{i}", use_cache=False)
        _, text = await http_get(f"http://127.0.0.1:{worker.http_port}/metrics")
    assert Scrape(text).value("llm_worker_requests_total", agent="other", model="primary", status="ok") == 3
    assert "made-up" not in text
