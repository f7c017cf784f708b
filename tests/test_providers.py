"""Every provider in the design through the whole worker (issue #10), without keys or network.

Each provider is a fake at the network edge speaking that provider's documented wire format
(``tests/fakes/<provider>.py``), so litellm's real provider code runs: the request crosses the
broker, the ledger and the Router, and the test checks what the provider received (path, auth,
body shape), what the agent got back (content, tokens, cost at the configured price), and that
the provider's own rate-limit and overload errors are retried and then fall back to another
provider.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from tests.conftest import ROOT, write_config
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.base import TEST_KEY, ProviderFake, Received
from tests.fakes.cohere import FakeCohere
from tests.fakes.gemini import FakeGemini
from tests.fakes.openai_api import FakeOpenAIPlatform
from tests.fakes.perplexity import FakePerplexity
from tests.fakes.vllm import FakeVLLM
from worker.messages import Status
from worker.settings import load_settings

SYSTEM = "You are terse."
PROMPT = "Name three queues"
MAX_TOKENS = 64


def _text(parts: Any) -> str:
    """The text of a message's content, whether a string or a list of text parts."""
    return parts if isinstance(parts, str) else " ".join(p.get("text", "") for p in parts)


# -- what each provider must receive ------------------------------------------------------------


def _openai_shape(r: Received, model_id: str, key: str | None) -> None:
    assert r.path == "/v1/chat/completions"
    assert r.headers["Authorization"] == f"Bearer {key or 'fake-api-key'}"
    assert r.body["model"] == model_id
    assert [(m["role"], _text(m["content"])) for m in r.body["messages"]] == [
        ("system", SYSTEM),
        ("user", PROMPT),
    ]
    assert r.body["max_tokens"] == MAX_TOKENS and r.body["temperature"] == 0.5


def _anthropic_shape(r: Received, model_id: str, key: str | None) -> None:
    assert r.path == "/v1/messages"
    assert r.headers["x-api-key"] == key and r.headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in r.headers
    assert r.body["model"] == model_id and r.body["max_tokens"] == MAX_TOKENS
    assert _text(r.body["system"]) == SYSTEM  # the system prompt is top-level, not a message
    assert [(m["role"], _text(m["content"])) for m in r.body["messages"]] == [("user", PROMPT)]


def _gemini_shape(r: Received, model_id: str, key: str | None) -> None:
    assert r.path == f"/v1beta/models/{model_id}:generateContent"
    assert r.headers["x-goog-api-key"] == key and "key" not in r.query  # the key stays out of the URL
    assert r.body["contents"] == [{"role": "user", "parts": [{"text": PROMPT}]}]
    system = r.body.get("system_instruction") or r.body["systemInstruction"]
    assert _text(system["parts"]) == SYSTEM
    config = r.body.get("generationConfig") or r.body["generation_config"]
    assert config.get("max_output_tokens", config.get("maxOutputTokens")) == MAX_TOKENS


def _cohere_shape(r: Received, model_id: str, key: str | None) -> None:
    assert r.path == "/v2/chat"
    assert r.headers["Authorization"] == f"Bearer {key}"
    assert r.body["model"] == model_id and r.body["max_tokens"] == MAX_TOKENS
    assert [(m["role"], _text(m["content"])) for m in r.body["messages"]] == [
        ("system", SYSTEM),
        ("user", PROMPT),
    ]


def _perplexity_shape(r: Received, model_id: str, key: str | None) -> None:
    assert r.path in ("/v1/agent", "/v1/responses")  # /v1/responses is the documented alias
    assert r.headers["Authorization"] == f"Bearer {key}"
    assert r.body["preset"] == model_id and "model" not in r.body
    assert r.body["instructions"] == SYSTEM
    assert [(i["role"], _text(i["content"])) for i in r.body["input"]] == [("user", PROMPT)]
    assert r.body["max_output_tokens"] == MAX_TOKENS


@dataclass(frozen=True)
class Provider:
    """One provider as the worker is configured for it, and what its API must receive."""

    name: str
    fake: Callable[[], ProviderFake]
    model: str  # litellm_params.model, as config/llm.yaml would say it
    model_id: str  # the id the provider itself sees
    price: tuple[float, float]  # USD per input token, per output token
    overload: str  # the fake's error kind for "the provider is overloaded"
    shape: Callable[[Received, str, str | None], None]
    key: str | None = TEST_KEY  # None: no api_key configured
    extra_completion_tokens: int = 0  # billed output tokens the provider reports beside the text

    def deployment(self, fake: ProviderFake) -> dict[str, Any]:
        params: dict[str, Any] = {"model": self.model, "api_base": fake.api_base}
        if self.key is not None:
            params["api_key"] = self.key
        return {
            "model_name": self.name,
            "litellm_params": params,
            "model_info": {"input_cost_per_token": self.price[0], "output_cost_per_token": self.price[1]},
        }


PROVIDERS = {
    p.name: p
    for p in (
        Provider(
            "openai",
            lambda: FakeOpenAIPlatform(prompt_tokens=13, completion_tokens=5),
            "openai/gpt-4.1-mini",
            "gpt-4.1-mini",
            (4.0e-7, 1.6e-6),
            "overloaded",
            _openai_shape,
        ),
        Provider(
            "anthropic",
            lambda: FakeAnthropic(prompt_tokens=17, completion_tokens=9),
            "anthropic/claude-sonnet-4-6",
            "claude-sonnet-4-6",
            (3.0e-6, 1.5e-5),
            "overloaded",  # 529 overloaded_error
            _anthropic_shape,
        ),
        Provider(
            "gemini",
            lambda: FakeGemini(prompt_tokens=12, completion_tokens=6, thoughts_tokens=20),
            "gemini/gemini-2.5-flash",
            "gemini-2.5-flash",
            (3.0e-7, 2.5e-6),
            "overloaded",  # 503 UNAVAILABLE
            _gemini_shape,
            extra_completion_tokens=20,  # thinking tokens are billed as output
        ),
        Provider(
            "cohere",
            # litellm 1.82.6 reads usage.tokens (71: the prompt with Cohere's template), not
            # usage.billed_units (5: what Cohere charges), so the worker over-charges the prompt.
            lambda: FakeCohere(prompt_tokens=71, completion_tokens=8, billed_input_tokens=5),
            "cohere_chat/command-a-03-2025",
            "command-a-03-2025",
            (2.5e-6, 1.0e-5),
            "server_error",  # Cohere documents no overload status; its 5xx is a 500
            _cohere_shape,
        ),
        Provider(
            "perplexity",
            # Tokens at the configured prices; the search fee in usage.cost.tool_calls_cost is not
            # charged (the worker prices tokens only).
            lambda: FakePerplexity(prompt_tokens=30, completion_tokens=11),
            "perplexity/responses/preset/low",
            "low",
            (3.0e-6, 1.5e-5),
            "bad_gateway",
            _perplexity_shape,
        ),
        Provider(
            "vllm",
            lambda: FakeVLLM(prompt_tokens=19, completion_tokens=4),
            "hosted_vllm/Qwen/Qwen3-8B",
            "Qwen/Qwen3-8B",
            (1.0e-7, 1.0e-7),
            "overloaded",
            _openai_shape,
            key=None,  # a self-hosted server without --api-key: no key configured
        ),
        Provider(
            "vllm-with-key",
            lambda: FakeVLLM(prompt_tokens=19, completion_tokens=4, require_key=True),
            "hosted_vllm/Qwen/Qwen3-8B",
            "Qwen/Qwen3-8B",
            (1.0e-7, 1.0e-7),
            "overloaded",
            _openai_shape,
        ),
    )
}
ROUND_TRIP = list(PROVIDERS)
MAIN = [name for name in PROVIDERS if name != "vllm-with-key"]


@pytest.fixture
async def edge() -> AsyncIterator[Callable[[Provider], Awaitable[ProviderFake]]]:
    """``await edge(provider)`` starts that provider's fake; every fake is stopped at the end."""
    started: list[ProviderFake] = []

    async def start(provider: Provider) -> ProviderFake:
        fake = await provider.fake().start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        await fake.stop()


def messages() -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]


# -- one request, each provider ------------------------------------------------------------------


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
    sent = fake.sent[-1]
    assert result.content == sent.text == f"{fake.name} answers: {PROMPT}"
    completion = sent.completion_tokens + provider.extra_completion_tokens
    assert (result.tokens.prompt, result.tokens.completion) == (sent.prompt_tokens, completion)
    assert result.tokens.total == sent.prompt_tokens + completion
    expected_cost = sent.prompt_tokens * provider.price[0] + completion * provider.price[1]
    assert result.cost_usd == pytest.approx(expected_cost, rel=1e-9)
    assert result.model == name and result.attempts == 1 and not result.fallback_used


# -- rate limits and overloads: retried, then another provider ------------------------------------


def _backup_for(name: str) -> Provider:
    return PROVIDERS["anthropic" if name == "openai" else "openai"]


@pytest.mark.parametrize("name", MAIN)
async def test_rate_limit_is_retried_on_the_same_provider(name, edge, make_settings, start_worker, client):
    provider = PROVIDERS[name]
    fake = await edge(provider)
    fake.fail_next("rate_limit", "rate_limit")
    settings = make_settings(default_model=name, models=[provider.deployment(fake)])
    async with start_worker(settings):
        result = await client.complete(messages(), agent="writer", max_tokens=MAX_TOKENS)

    assert result.status is Status.ok, result.error
    assert fake.errors_sent == ["rate_limit", "rate_limit"] and fake.calls == 3
    assert result.attempts == 3 and result.model == name and not result.fallback_used
    assert result.content == fake.sent[-1].text


@pytest.mark.parametrize("kind", ["rate_limit", "overload"])
@pytest.mark.parametrize("name", MAIN)
async def test_persistent_rate_limit_or_overload_falls_back_to_another_provider(
    name, kind, edge, make_settings, start_worker, client
):
    provider, backup = PROVIDERS[name], _backup_for(name)
    fake, backup_fake = await edge(provider), await edge(backup)
    fake.fail_every_call(provider.overload if kind == "overload" else "rate_limit")
    settings = make_settings(
        default_model=name,
        fallback_models=[backup.name],
        models=[provider.deployment(fake), backup.deployment(backup_fake)],
    )
    async with start_worker(settings):
        result = await client.complete(messages(), agent="writer", max_tokens=MAX_TOKENS, use_cache=False)

    assert result.status is Status.ok, result.error
    assert fake.calls == 3  # 1 + num_retries: the error was retryable
    assert backup_fake.calls == 1
    assert result.model == backup.name and result.fallback_used and result.attempts == 4
    sent = backup_fake.sent[-1]
    assert result.content == sent.text
    assert result.cost_usd == pytest.approx(
        sent.prompt_tokens * backup.price[0] + sent.completion_tokens * backup.price[1], rel=1e-9
    )


async def test_fallback_chain_crosses_providers_openai_anthropic_gemini(
    edge, make_settings, start_worker, client
):
    openai, anthropic, gemini = PROVIDERS["openai"], PROVIDERS["anthropic"], PROVIDERS["gemini"]
    openai_fake, anthropic_fake, gemini_fake = await edge(openai), await edge(anthropic), await edge(gemini)
    openai_fake.fail_every_call("rate_limit")
    anthropic_fake.fail_every_call("overloaded")
    settings = make_settings(
        default_model="openai",
        fallback_models=["anthropic", "gemini"],
        models=[
            openai.deployment(openai_fake),
            anthropic.deployment(anthropic_fake),
            gemini.deployment(gemini_fake),
        ],
    )
    async with start_worker(settings):
        result = await client.complete(messages(), agent="writer", max_tokens=MAX_TOKENS)

    assert result.status is Status.ok, result.error
    assert (openai_fake.calls, anthropic_fake.calls, gemini_fake.calls) == (3, 3, 1)
    assert result.model == "gemini" and result.fallback_used and result.attempts == 7
    gemini.shape(gemini_fake.requests[0], gemini.model_id, gemini.key)  # the same request, re-shaped
    sent = gemini_fake.sent[-1]
    assert result.content == sent.text
    completion = sent.completion_tokens + gemini.extra_completion_tokens
    assert result.cost_usd == pytest.approx(sent.prompt_tokens * 3.0e-7 + completion * 2.5e-6, rel=1e-9)


# -- error translation: what litellm 1.82.6 gets wrong, worker/errors.py puts right ---------------


async def test_cohere_rate_limit_is_reported_as_rate_limited_not_a_connection_error(
    edge, make_settings, start_worker, client
):
    """litellm has no rule for Cohere's 429 and raises its catch-all APIConnectionError."""
    cohere = PROVIDERS["cohere"]
    fake = await edge(cohere)
    fake.fail_every_call("rate_limit")
    settings = make_settings(default_model="cohere", models=[cohere.deployment(fake)])
    async with start_worker(settings):
        result = await client.complete(messages(), agent="writer", max_tokens=MAX_TOKENS)

    assert result.status is Status.failed and fake.calls == 3
    assert result.error is not None and result.error.type == "RateLimited" and result.error.retryable


async def test_anthropic_overloaded_529_is_retryable_and_the_last_error_says_so(
    edge, make_settings, start_worker, client
):
    anthropic = PROVIDERS["anthropic"]
    fake = await edge(anthropic)
    fake.fail_every_call("overloaded")
    settings = make_settings(default_model="anthropic", models=[anthropic.deployment(fake)])
    with capture_logs() as logs:
        async with start_worker(settings):
            result = await client.complete(messages(), agent="writer", max_tokens=MAX_TOKENS)

    assert result.status is Status.failed and fake.calls == 3
    assert result.error is not None and result.error.retryable
    assert result.error.type == "ServerError" and "overloaded_error" in result.error.message
    # litellm reports the 529 as a 500; the worker logs the status Anthropic sent.
    failed = [e for e in logs if e["event"] == "llm.attempt_failed"]
    assert [e["status_code"] for e in failed] == [529, 529, 529]


async def test_perplexity_run_failed_inside_a_200_is_a_retryable_server_error_and_falls_back(
    edge, make_settings, start_worker, client
):
    """The Agent API answers HTTP 200 with ``status: "failed"`` when the model fails.

    litellm raises an ``APIError`` with status 200, which the worker used to call a
    non-retryable ``ProviderError``. (The retry itself is then refused by litellm's Router:
    status 200 is not one ``litellm._should_retry`` knows, so it cools the deployment down at
    once; the request moves to the fallback.)
    """
    perplexity, backup = PROVIDERS["perplexity"], PROVIDERS["openai"]
    fake, backup_fake = await edge(perplexity), await edge(backup)
    fake.fail_every_call("failed_run")
    settings = make_settings(
        default_model="perplexity",
        fallback_models=["openai"],
        models=[perplexity.deployment(fake), backup.deployment(backup_fake)],
    )
    with capture_logs() as logs:
        async with start_worker(settings):
            result = await client.complete(messages(), agent="writer", max_tokens=MAX_TOKENS)

    assert result.status is Status.ok, result.error
    assert result.model == "openai" and result.fallback_used and result.content == backup_fake.sent[-1].text
    assert fake.errors_sent[0] == "failed_run"
    first = next(e for e in logs if e["event"] == "llm.attempt_failed")
    assert (first["model"], first["error"], first["retryable"]) == ("perplexity", "ServerError", True)


@pytest.mark.parametrize(("name", "wait_s"), [("anthropic", 1), ("gemini", 0.4)])
async def test_the_provider_wait_hint_is_honoured(name, wait_s, edge, make_settings, start_worker, client):
    """Anthropic sends ``retry-after`` in whole seconds; Gemini sends no header, its 429 body
    carries ``google.rpc.RetryInfo.retryDelay``."""
    provider = PROVIDERS[name]
    fake = await edge(provider)
    if isinstance(fake, FakeGemini):
        fake.retry_delay_s = wait_s
    elif isinstance(fake, FakeAnthropic):
        fake.retry_after_s = int(wait_s)
    fake.fail_next("rate_limit")
    settings = make_settings(default_model=name, models=[provider.deployment(fake)])
    async with start_worker(settings):
        started = time.monotonic()
        result = await client.complete(messages(), agent="writer", max_tokens=MAX_TOKENS)
        elapsed = time.monotonic() - started

    assert result.status is Status.ok and result.attempts == 2
    assert elapsed >= wait_s  # the configured backoff is 0.01 s: the wait came from the provider


async def test_anthropic_refuses_a_temperature_above_one_and_it_is_not_retried(
    edge, make_settings, start_worker, client
):
    """The contract allows 0..2 (OpenAI's range); Anthropic's is 0..1 and litellm passes the value on."""
    anthropic = PROVIDERS["anthropic"]
    fake = await edge(anthropic)
    settings = make_settings(default_model="anthropic", models=[anthropic.deployment(fake)])
    async with start_worker(settings):
        result = await client.complete(messages(), agent="writer", temperature=1.5, max_tokens=MAX_TOKENS)

    assert fake.calls == 1 and fake.errors_sent == ["bad_request"]
    assert fake.requests[0].body["temperature"] == 1.5
    assert result.status is Status.failed
    assert result.error is not None and result.error.type == "BadRequest" and not result.error.retryable


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


@pytest.mark.parametrize("name", MAIN)
async def test_wrong_key_is_not_retried(name, edge, make_settings, start_worker, client):
    provider = PROVIDERS[name if name != "vllm" else "vllm-with-key"]
    fake = await edge(provider)
    deployment = provider.deployment(fake)
    deployment["litellm_params"]["api_key"] = "wrong-key"
    settings = make_settings(default_model=provider.name, models=[deployment])
    async with start_worker(settings):
        result = await client.complete(messages(), agent="writer", max_tokens=MAX_TOKENS)

    assert fake.calls == 1 and fake.errors_sent == ["auth"]
    assert result.status is Status.failed
    assert result.error is not None and result.error.type == "AuthenticationFailed"
    assert not result.error.retryable and "wrong-key" not in result.error.message


# -- the shipped production config reaches each provider's current API ---------------------------


async def test_production_config_reaches_every_provider_current_api(
    tmp_path: Path, monkeypatch, names, amqp_url, redis_url, edge, start_worker, client
):
    """config/llm.yaml's model strings, unchanged, with only api_base pointed at the fakes."""
    fakes = {
        "openai": await edge(PROVIDERS["openai"]),
        "anthropic": await edge(PROVIDERS["anthropic"]),
        "gemini": await edge(PROVIDERS["gemini"]),
        "cohere_chat": await edge(PROVIDERS["cohere"]),
        "perplexity": await edge(PROVIDERS["perplexity"]),
    }
    llm = yaml.safe_load((ROOT / "config" / "llm.yaml").read_text())["llm"]
    environ = {}
    for deployment in llm["models"]:
        params = deployment["litellm_params"]
        fake = fakes[params["model"].split("/", 1)[0]]
        params["api_base"] = fake.api_base
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
    }
    assert sum(fake.calls for fake in fakes.values()) == len(llm["models"])


async def test_exhausted_quota_is_not_retried_and_falls_back_at_once(
    edge, make_settings, start_worker, client
):
    """OpenAI's `insufficient_quota` 429 does not cure with time: one call, then the next provider."""
    openai, anthropic = PROVIDERS["openai"], PROVIDERS["anthropic"]
    openai_fake, anthropic_fake = await edge(openai), await edge(anthropic)
    openai_fake.fail_every_call("quota")
    settings = make_settings(
        default_model="openai",
        fallback_models=["anthropic"],
        models=[openai.deployment(openai_fake), anthropic.deployment(anthropic_fake)],
    )
    async with start_worker(settings):
        result = await client.complete(messages(), agent="writer", max_tokens=MAX_TOKENS, use_cache=False)

    assert openai_fake.calls == 1
    assert result.status is Status.ok and result.model == "anthropic" and result.attempts == 2
