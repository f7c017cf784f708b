"""Streamed answers (issue #18) from each provider's real streaming wire format, through the worker.

The fakes stream as the providers do (OpenAI server-sent ``chat.completion.chunk``s, Anthropic's
``message_start`` ... ``message_stop`` events, Gemini's ``streamGenerateContent?alt=sse``), so
litellm's real stream parsers run; the agent gets ``llm.chunk`` messages in order and one
``llm.result`` with the provider's own usage, charged once in the ledger.
"""

from __future__ import annotations

import pytest

from tests.providers.catalogue import MAX_TOKENS, PROMPT, PROVIDERS, messages
from tests.support.ledger import day_state
from worker.messages import LLMChunk, LLMResult, Status

STREAMING = ["openai", "anthropic", "gemini"]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    }
]


async def streamed(client, **options) -> tuple[list[LLMChunk], LLMResult]:
    chunks: list[LLMChunk] = []
    async for item in client.stream(messages(), agent="writer", max_tokens=MAX_TOKENS, **options):
        if isinstance(item, LLMResult):
            return chunks, item
        chunks.append(item)
    raise AssertionError("the stream ended without its result")


async def with_fallback(edge, make_settings, name: str, backup: str, **llm):
    """``name``'s fake, ``backup``'s fake (its fallback), and the settings of the pair."""
    fakes = await edge(PROVIDERS[name]), await edge(PROVIDERS[backup])
    deployments = [PROVIDERS[n].deployment(f) for n, f in zip((name, backup), fakes, strict=True)]
    settings = make_settings(default_model=name, fallback_models=[backup], models=deployments, **llm)
    return *fakes, settings


def _price(name: str, result: LLMResult) -> float:
    price = PROVIDERS[name].price
    return result.tokens.prompt * price[0] + result.tokens.completion * price[1]


@pytest.mark.parametrize("name", STREAMING)
async def test_streamed_answer_arrives_in_chunks_then_one_result_at_the_providers_usage(
    name, edge, make_settings, start_worker, client
):
    provider = PROVIDERS[name]
    fake = await edge(provider)
    fake.token_delay_s = 0.08  # slower than bus.stream_interval_ms: pieces go out apart
    settings = make_settings(default_model=name, models=[provider.deployment(fake)])
    async with start_worker(settings):
        chunks, result = await streamed(client)
        spent = await day_state(settings)

    assert result.status is Status.ok, result.error
    assert result.content == fake.sent[-1].text == f"{fake.name} answers: {PROMPT}"
    assert [c.seq for c in chunks] == list(range(len(chunks))) and len(chunks) >= 2
    assert "".join(c.content or "" for c in chunks) == result.content
    assert result.chunks == len(chunks)
    sent = fake.sent[-1]
    completion = sent.completion_tokens + provider.extra_completion_tokens
    assert (result.tokens.prompt, result.tokens.completion) == (sent.prompt_tokens, completion)
    assert result.cost_usd == pytest.approx(_price(name, result), rel=1e-9)
    assert spent.spent_usd == pytest.approx(result.cost_usd) and spent.calls == 1
    body = fake.requests[0]
    if name == "gemini":
        assert body.path.endswith(":streamGenerateContent") and body.query == {"alt": "sse"}
    else:
        assert body.body["stream"] is True
    if name == "openai":  # the usage chunk is only sent when asked for
        assert body.body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("name", STREAMING)
async def test_streamed_tool_call_pieces_join_into_the_results_call(
    name, edge, make_settings, start_worker, client
):
    provider = PROVIDERS[name]
    fake = await edge(provider)
    fake.tool_call = ("lookup", {"q": "queues"})
    settings = make_settings(default_model=name, models=[provider.deployment(fake)])
    async with start_worker(settings):
        chunks, result = await streamed(client, tools=TOOLS)

    assert result.status is Status.ok, result.error
    assert result.finish_reason == "tool_calls" and result.tool_calls is not None
    (call,) = result.tool_calls
    assert call.function.name == "lookup"
    pieces = [piece for chunk in chunks for piece in chunk.tool_calls or []]
    assert {p.index for p in pieces} == {0}
    assert [p.name for p in pieces if p.name] == ["lookup"] and pieces[0].id == call.id
    assert "".join(p.arguments or "" for p in pieces) == call.function.arguments


async def test_failure_before_the_first_chunk_is_retried_as_today(edge, make_settings, start_worker, client):
    provider = PROVIDERS["anthropic"]
    fake = await edge(provider)
    fake.fail_next("overloaded")
    settings = make_settings(default_model="anthropic", models=[provider.deployment(fake)])
    async with start_worker(settings):
        chunks, result = await streamed(client)

    assert result.status is Status.ok and result.attempts == 2
    assert "".join(c.content or "" for c in chunks) == result.content == fake.sent[-1].text


async def test_a_model_failing_before_the_first_chunk_falls_back_and_the_fallback_streams(
    edge, make_settings, start_worker, client
):
    down, spare, settings = await with_fallback(edge, make_settings, "openai", "anthropic", num_retries=0)
    down.fail_every_call("overloaded")
    async with start_worker(settings):
        chunks, result = await streamed(client)

    assert result.status is Status.ok and result.model == "anthropic" and result.fallback_used
    assert "".join(c.content or "" for c in chunks) == result.content == spare.sent[-1].text
    assert [c.seq for c in chunks] == list(range(len(chunks)))


@pytest.mark.parametrize("name", ["openai", "anthropic"])
async def test_stream_cut_mid_answer_ends_failed_saying_how_far_and_never_switches_model(
    name, edge, make_settings, start_worker, client
):
    """litellm 1.82.6 reads a dropped connection as the end of the answer (llm_stream.py): the
    worker sees that the provider never finished, answers `failed` with what was written,
    charges that, and neither retries nor lets the fallback continue the answer."""
    fake, spare, settings = await with_fallback(edge, make_settings, name, "gemini")
    fake.break_after = 2
    async with start_worker(settings):
        chunks, result = await streamed(client)
        spent = await day_state(settings)

    assert result.status is Status.failed and result.error is not None
    assert result.error.type == "StreamInterrupted"
    assert "broke off after 2 piece(s)" in result.error.message, result.error.message
    assert result.content == "".join(c.content or "" for c in chunks) == f"{fake.name} answers: "
    assert result.model == name and not result.fallback_used and result.attempts == 1
    assert fake.calls == 1 and spare.calls == 0
    assert result.cost_nano_usd > 0 and spent.spent_usd == pytest.approx(result.cost_usd)
    assert spent.reserved_usd == 0


async def test_an_error_event_mid_stream_ends_the_answer_failed_without_a_fallback(
    edge, make_settings, start_worker, client
):
    """Anthropic reports an overload after the answer began as an `error` event in the stream."""
    fake, spare, settings = await with_fallback(edge, make_settings, "anthropic", "openai")
    fake.break_after = 2
    overloaded = {"type": "overloaded_error", "message": "Overloaded"}
    fake.mid_stream_error = ("error", {"type": "error", "error": overloaded})
    async with start_worker(settings):
        chunks, result = await streamed(client)

    assert result.status is Status.failed and result.error is not None and result.error.retryable
    assert "broke off after 2 piece(s)" in result.error.message and "Overloaded" in result.error.message
    assert result.content == "".join(c.content or "" for c in chunks) == "anthropic answers: "
    assert fake.calls == 1 and spare.calls == 0 and not result.fallback_used


async def test_stream_cut_by_the_deadline_ends_failed_with_what_it_wrote(
    edge, make_settings, start_worker, client
):
    provider = PROVIDERS["openai"]
    fake = await edge(provider)
    fake.token_delay_s = 1.5  # the first piece at once, the next after the deadline
    settings = make_settings(default_model="openai", models=[provider.deployment(fake)])
    async with start_worker(settings):
        chunks, result = await streamed(client, timeout_s=1.0)
        spent = await day_state(settings)

    assert result.status is Status.failed and result.error is not None
    assert result.error.type == "DeadlineExceeded", result.error
    assert "broke off after 1 piece(s)" in result.error.message and "mid-answer" in result.error.message
    assert result.content == "".join(c.content or "" for c in chunks) == "openai "
    assert result.chunks == len(chunks) == 1
    assert spent.spent_usd == pytest.approx(result.cost_usd) and result.cost_nano_usd > 0
    assert spent.reserved_usd == 0


async def test_a_cache_hit_and_a_stored_answer_stream_as_one_chunk(edge, make_settings, start_worker, client):
    provider = PROVIDERS["openai"]
    fake = await edge(provider)
    settings = make_settings(default_model="openai", models=[provider.deployment(fake)])
    async with start_worker(settings):
        _, first = await streamed(client)
        hit_chunks, hit = await streamed(client)
        again_chunks, again = await streamed(client, request_id=first.request_id)

    assert first.status is Status.ok and fake.calls == 1
    for chunks, result in ((hit_chunks, hit), (again_chunks, again)):
        assert [(c.seq, c.content) for c in chunks] == [(0, first.content)]
        assert result.content == first.content and result.chunks == 1
    assert hit.cached


async def test_a_request_that_does_not_stream_is_answered_as_before(
    edge, make_settings, start_worker, client, amqp_url
):
    """One reply, AMQP type LLMResult.v1, no chunks: older agents see no change."""
    provider = PROVIDERS["openai"]
    fake = await edge(provider)
    settings = make_settings(default_model="openai", models=[provider.deployment(fake)])
    async with start_worker(settings):
        result = await client.complete(messages(), agent="writer")

    assert result.status is Status.ok and result.chunks is None
    assert "stream" not in fake.requests[0].body


@pytest.mark.parametrize("name", STREAMING)
async def test_llm_timeout_bounds_the_wait_for_each_piece_not_the_whole_stream(
    name, edge, make_settings, start_worker, client
):
    provider = PROVIDERS[name]
    fake = await edge(provider)
    fake.token_delay_s = 0.5  # five pieces: 2 s in all, each within llm.timeout
    settings = make_settings(default_model=name, models=[provider.deployment(fake)], timeout=1)
    async with start_worker(settings):
        chunks, result = await streamed(client)

    assert result.status is Status.ok, result.error
    assert result.attempts == 1 and len(chunks) == 5
