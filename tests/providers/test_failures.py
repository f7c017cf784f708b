"""Each provider's own errors through the whole worker (issue #10): rate limits and overloads
retried and then another provider, wait hints honoured, what is never retried."""

from __future__ import annotations

import time

import pytest
from structlog.testing import capture_logs

from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.gemini import FakeGemini
from tests.providers.catalogue import (
    MAIN,
    MAX_TOKENS,
    PROVIDERS,
    _backup_for,
    messages,
)
from worker.messages import Status


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
