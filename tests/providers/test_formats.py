"""Every provider in the design through the whole worker (issue #10), without keys or network.

Each provider is a fake at the network edge speaking that provider's documented wire format
(``tests/fakes/<provider>.py``), so litellm's real provider code runs: the request crosses the
broker, the ledger and litellm, and the test checks what the provider received (path, auth,
body shape), what the agent got back (content, tokens, cost at the configured price)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from tests.fakes.embeddings import FakeCohereEmbeddings, FakeGeminiEmbeddings, FakeOpenAIEmbeddings
from tests.providers.catalogue import (
    MAX_TOKENS,
    PROMPT,
    PROVIDERS,
    ROUND_TRIP,
    messages,
)
from tests.support.config import (
    write_config,
)
from tests.support.paths import ROOT
from worker.messages import Status
from worker.settings import load_settings


@pytest.mark.parametrize("name", ROUND_TRIP)
async def test_request_reaches_the_provider_in_its_format_and_is_charged_at_its_price(
    name, edge, make_settings, start_worker, client
):
    provider = PROVIDERS[name]
    fake = await edge(provider)
    settings = make_settings(default_model=name, models=[provider.deployment(fake)])
    async with start_worker(settings):
        result = await client.complete(messages(), agent="writer", temperature=0.5, max_tokens=MAX_TOKENS)

    assert result.status is Status.ok, result.error
    assert fake.calls == 1
    provider.shape(fake.requests[0], provider.model_id, provider.key)
    assert "_is_litellm_internal_call" not in str(fake.requests[0])  # litellm's private flag stays litellm's
    sent = fake.sent[-1]
    assert result.content == sent.text == f"{fake.name} answers: {PROMPT}"
    completion = sent.completion_tokens + provider.extra_completion_tokens
    assert (result.tokens.prompt, result.tokens.completion) == (sent.prompt_tokens, completion)
    assert result.tokens.total == sent.prompt_tokens + completion
    expected_cost = sent.prompt_tokens * provider.price[0] + completion * provider.price[1]
    assert result.cost_usd == pytest.approx(expected_cost, rel=1e-9)
    assert result.model == name and result.attempts == 1 and not result.fallback_used


async def test_perplexity_model_slug_with_web_search(edge, make_settings, start_worker, client):
    """The README's alternative to a preset: a model slug (prefix written twice) plus web search."""
    perplexity = PROVIDERS["perplexity"]
    fake = await edge(perplexity)
    deployment = perplexity.deployment(fake)
    deployment["litellm_params"].update(
        model="perplexity/responses/perplexity/perplexity/sonar", web_search_options={}
    )
    settings = make_settings(default_model="perplexity", models=[deployment])
    async with start_worker(settings):
        result = await client.complete(messages(), agent="writer", max_tokens=MAX_TOKENS)

    assert result.status is Status.ok, result.error
    body = fake.requests[0].body
    assert body["model"] == "perplexity/sonar" and "preset" not in body
    assert body["tools"] == [{"type": "web_search"}]
    assert result.content == fake.sent[-1].text


async def test_production_config_reaches_every_provider_current_api(
    tmp_path: Path, monkeypatch, names, amqp_url, redis_url, edge, start_worker, client
):
    """config/llm.yaml's model strings, unchanged, with only api_base pointed at the fakes (the
    embedding models at the same providers' embedding endpoints)."""
    fakes = {
        "openai": await edge(replace(PROVIDERS["openai"], fake=FakeOpenAIEmbeddings)),
        "anthropic": await edge(PROVIDERS["anthropic"]),
        "gemini": await edge(replace(PROVIDERS["gemini"], fake=FakeGeminiEmbeddings)),
        "cohere_chat": await edge(PROVIDERS["cohere"]),
        "perplexity": await edge(PROVIDERS["perplexity"]),
        "cohere": await edge(replace(PROVIDERS["cohere"], fake=FakeCohereEmbeddings)),
    }
    llm = yaml.safe_load((ROOT / "config" / "llm.yaml").read_text())["llm"]
    environ = {}
    for deployment in llm["models"]:
        params = deployment["litellm_params"]
        fake = fakes[params["model"].split("/", 1)[0]]
        params["api_base"] = getattr(fake, "embed_base", fake.api_base)
        environ[params["api_key"].removeprefix("os.environ/")] = fake.api_key
    for variable, value in environ.items():
        monkeypatch.setenv(variable, value)  # the worker resolves os.environ/NAME at start-up
    llm.update(timeout=5, deadline_s=10, retry_initial_delay_s=0.01, retry_max_delay_s=0.05)
    settings = load_settings(
        write_config(tmp_path / "prod", names, amqp_url, redis_url, llm), environ=environ
    )

    async with start_worker(settings):
        results = {
            d["model_name"]: await client.complete(messages(), agent="writer", model=d["model_name"])
            for d in llm["models"]
            if d["model_info"].get("mode") != "embedding"
        }
        results |= {
            d["model_name"]: await client.embed([PROMPT], agent="researcher", model=d["model_name"])
            for d in llm["models"]
            if d["model_info"].get("mode") == "embedding"
        }

    for model_name, result in results.items():
        assert result.status is Status.ok, (model_name, result.error)
        assert result.model == model_name and not result.fallback_used
    seen = {(name, r.path) for name, fake in fakes.items() for r in fake.requests}
    assert seen == {
        ("openai", "/v1/chat/completions"),
        ("anthropic", "/v1/messages"),
        ("gemini", "/v1beta/models/gemini-2.5-flash:generateContent"),
        ("gemini", "/v1beta/models/gemini-2.5-pro:generateContent"),
        ("cohere_chat", "/v2/chat"),
        ("perplexity", "/v1/responses"),
        ("openai", "/v1/embeddings"),
        ("gemini", "/v1beta/models/gemini-embedding-001:batchEmbedContents"),
        ("cohere", "/v2/embed"),
    }
    assert sum(fake.calls for fake in fakes.values()) == len(llm["models"])
