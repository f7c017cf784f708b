"""The chat interface agents need (issue #17), through the whole worker, against each provider's
wire format: a two-turn tool loop, a structured (JSON-schema) answer, a cut-off answer, and a
bill with cached prompt tokens checked to the nano-dollar against the ledger."""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

import pytest
from pydantic import BaseModel

from tests.providers.catalogue import LOOKUP, MAX_TOKENS, PROVIDERS, messages
from worker.client import StructuredAnswerError
from worker.llm import LLM
from worker.messages import LLMRequest, Status
from worker.settings import Settings
from worker.state.ledger import BudgetLedger


def _offered(name: str, body: dict[str, Any]) -> list[str]:
    """The tool names the provider received, read from its own wire format."""
    if name == "anthropic":
        assert all("input_schema" in t for t in body["tools"])
        return [t["name"] for t in body["tools"]]
    if name == "gemini":
        return [
            f["name"]
            for t in body["tools"]
            for f in t.get("functionDeclarations", t.get("function_declarations", []))
        ]
    return [t["function"]["name"] for t in body["tools"]]  # OpenAI and Cohere v2


def _tool_result_sent(name: str, body: dict[str, Any]) -> str:
    """The second turn's tool result as the provider received it."""
    if name == "anthropic":
        (part,) = [p for p in body["messages"][-1]["content"] if p["type"] == "tool_result"]
        content = part["content"]
        return content if isinstance(content, str) else " ".join(p["text"] for p in content)
    if name == "gemini":
        parts = [p.get("functionResponse", p.get("function_response")) for p in body["contents"][-1]["parts"]]
        (response,) = [p for p in parts if p is not None]
        assert response["name"] == "lookup"
        return json.dumps(response["response"])
    last = body["messages"][-1]
    assert last["role"] == "tool"
    content = last["content"]
    return content if isinstance(content, str) else json.dumps(content)


@pytest.mark.parametrize("name", ["openai", "anthropic", "gemini", "cohere"])
async def test_a_two_turn_tool_loop_through_the_worker(name, edge, make_settings, start_worker, client):
    fake, settings = await _served_by(name, edge, make_settings)
    fake.tool_call = ("lookup", {"q": "queues"})
    async with start_worker(settings):
        first = await client.complete(messages(), agent="researcher", tools=[LOOKUP], max_tokens=MAX_TOKENS)
        assert first.status is Status.ok, first.error
        assert first.finish_reason == "tool_calls"
        assert first.tool_calls is not None and len(first.tool_calls) == 1
        call = first.tool_calls[0]
        assert call.function.name == "lookup" and json.loads(call.function.arguments) == {"q": "queues"}
        assert _offered(name, fake.requests[0].body) == ["lookup"]

        turn = [
            *messages(),
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "three: a, b, c"},
        ]
        second = await client.complete(turn, agent="researcher", tools=[LOOKUP], max_tokens=MAX_TOKENS)

    assert second.status is Status.ok, second.error
    assert second.finish_reason == "stop" and second.tool_calls is None
    assert "three: a, b, c" in _tool_result_sent(name, fake.requests[1].body)
    assert second.content == fake.sent[-1].text and "tool said" in second.content
    assert "three: a, b, c" in second.content


VERDICT = {
    "type": "json_schema",
    "json_schema": {
        "name": "verdict",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"score": {"type": "integer"}, "why": {"type": "string"}},
            "required": ["score", "why"],
            "additionalProperties": False,
        },
    },
}


async def test_a_json_schema_request_reaches_openai_and_gemini_in_their_forms(
    edge, make_settings, start_worker, client
):
    openai, gemini = await edge(PROVIDERS["openai"]), await edge(PROVIDERS["gemini"])
    for fake in (openai, gemini):
        fake.reply = '{"score": 7, "why": "terse"}'
    models = [PROVIDERS["openai"].deployment(openai), PROVIDERS["gemini"].deployment(gemini)]
    settings = make_settings(default_model="openai", models=models)
    async with start_worker(settings):
        by_openai = await client.complete(messages(), agent="critic", response_format=VERDICT)
        by_gemini = await client.complete(messages(), agent="critic", model="gemini", response_format=VERDICT)

    for result in (by_openai, by_gemini):
        assert result.status is Status.ok, result.error
        assert json.loads(result.content or "") == {"score": 7, "why": "terse"}
    assert openai.requests[0].body["response_format"] == VERDICT  # OpenAI's own form, unchanged
    config = gemini.requests[0].body.get("generationConfig") or gemini.requests[0].body["generation_config"]
    assert config.get("responseMimeType", config.get("response_mime_type")) == "application/json"
    schema = config.get("response_json_schema", config.get("responseJsonSchema"))  # litellm 1.82.6's pick
    assert set(schema["properties"]) == {"score", "why"}


@pytest.mark.parametrize("name", ["openai", "anthropic", "gemini"])
async def test_a_cut_off_answer_says_length_and_is_not_cached(
    name, edge, make_settings, start_worker, client
):
    fake, settings = await _served_by(name, edge, make_settings)
    fake.cut_off = True
    async with start_worker(settings):
        first = await client.complete(messages(), agent="editor", max_tokens=MAX_TOKENS)
        again = await client.complete(messages(), agent="editor", max_tokens=MAX_TOKENS)

    assert first.status is again.status is Status.ok, first.error
    assert first.finish_reason == again.finish_reason == "length"
    assert not again.cached and fake.calls == 2  # a cut-off draft is asked again, not replayed


async def test_requests_differing_only_in_tools_or_parameters_never_share_an_answer(
    edge, make_settings, start_worker, client
):
    fake, settings = await _served_by("openai", edge, make_settings)
    other = {**LOOKUP, "function": {**LOOKUP["function"], "name": "search"}}
    async with start_worker(settings):
        plain = await client.complete(messages(), agent="researcher")
        with_tools = await client.complete(messages(), agent="researcher", tools=[LOOKUP])
        other_tools = await client.complete(messages(), agent="researcher", tools=[other])
        with_schema = await client.complete(messages(), agent="researcher", response_format=VERDICT)
        same_tools = await client.complete(messages(), agent="researcher", tools=[LOOKUP])

    assert [r.cached for r in (plain, with_tools, other_tools, with_schema)] == [False] * 4
    assert same_tools.cached and fake.calls == 4


async def test_a_parameter_the_provider_does_not_take_is_refused_naming_it_unless_dropped(
    edge, make_settings, start_worker, client
):
    provider = PROVIDERS["anthropic"]
    fake = await edge(provider)
    strict = provider.deployment(fake)
    dropping = {**provider.deployment(fake), "model_name": "anthropic-dropping"}
    dropping["litellm_params"] = {**dropping["litellm_params"], "drop_params": True}
    settings = make_settings(default_model="anthropic", models=[strict, dropping])
    request = {"agent": "writer", "max_tokens": MAX_TOKENS}
    async with start_worker(settings):
        refused = await client.send(_request(seed=7, logit_bias={"50256": -100}, **request))
        dropped = await client.send(_request(seed=7, model="anthropic-dropping", **request))

    assert refused.status is Status.invalid and refused.error is not None
    assert refused.error.message.startswith(
        "seed: model 'anthropic' (anthropic) does not support seed, logit_bias"
    )
    assert "drop_params" in refused.error.message
    assert dropped.status is Status.ok, dropped.error
    assert fake.calls == 1 and "seed" not in fake.requests[0].body


async def test_a_json_schema_request_skips_a_model_without_schema_support(
    edge, make_settings, start_worker, client
):
    provider = PROVIDERS["openai"]
    fake = await edge(provider)
    plain = {**provider.deployment(fake), "model_name": "plain"}
    plain["model_info"] = {**plain["model_info"], "supports_response_schema": False}
    capable = {**provider.deployment(fake), "model_name": "capable"}
    settings = make_settings(default_model="plain", fallback_models=["capable"], models=[plain, capable])
    alone = make_settings(default_model="plain", models=[plain])
    async with start_worker(settings):
        skipped = await client.complete(messages(), agent="critic", response_format=VERDICT)
    async with start_worker(alone):
        none_left = await client.complete(messages(), agent="critic", response_format=VERDICT)

    assert skipped.status is Status.ok, skipped.error
    assert skipped.model == "capable" and skipped.fallback_used
    assert none_left.status is Status.invalid and none_left.error is not None
    assert "response_format.json_schema" in none_left.error.message
    assert fake.calls == 1


async def _served_by(name: str, edge: Any, make_settings: Any, **prices: float) -> tuple[Any, Settings]:
    """Provider ``name``'s fake, and settings whose one deployment is it (``prices``: extra model_info)."""
    provider = PROVIDERS[name]
    fake = await edge(provider)
    deployment = provider.deployment(fake)
    deployment["model_info"] |= prices
    return fake, make_settings(default_model=name, models=[deployment])


def _request(turn: list[dict[str, Any]] | None = None, **fields: Any) -> LLMRequest:
    return LLMRequest(request_id=uuid.uuid4().hex, messages=turn or messages(), **fields)


async def test_a_cached_token_bill_is_exact_to_the_nano_dollar_in_reply_and_ledger(
    edge, make_settings, start_worker, client, redis_client
):
    """Anthropic's cache reads cost a tenth of input and cache writes 1.25x: billed as such, in
    integers, and the ledger holds the very number the reply carries."""
    fake, settings = await _served_by(
        "anthropic",
        edge,
        make_settings,
        cache_read_input_token_cost=3e-7,
        cache_creation_input_token_cost=3.75e-6,
    )
    fake.cache_read_tokens, fake.cache_creation_tokens = 1000, 200  # beside input_tokens=17
    async with start_worker(settings):
        result = await client.complete(messages(), agent="writer", max_tokens=MAX_TOKENS, use_cache=False)

    assert result.status is Status.ok, result.error
    tokens = result.tokens
    assert (tokens.prompt, tokens.cached_prompt, tokens.cache_write, tokens.completion) == (
        1217,
        1000,
        200,
        9,
    )
    # pico-dollars: 17 x 3_000_000 + 1000 x 300_000 + 200 x 3_750_000 + 9 x 15_000_000
    expected_nano = (17 * 3_000_000 + 1000 * 300_000 + 200 * 3_750_000 + 9 * 15_000_000) // 1000
    assert result.cost_nano_usd == expected_nano == 1_236_000
    assert result.cost_usd == expected_nano / 1e9
    ledger = BudgetLedger(redis_client, settings.redis.key_prefix, settings.llm.budget, reservation_ttl_s=60)
    day = ledger.day_scope(ledger.today()).name
    raw = await redis_client.hgetall(f"{settings.redis.key_prefix}budget:{day}")
    spent = {k.decode() if isinstance(k, bytes) else k: int(v) for k, v in raw.items()}
    assert spent["spent"] == spent["m:anthropic"] == expected_nano


class Verdict(BaseModel):
    score: int
    why: str


async def test_complete_as_returns_the_parsed_object_or_names_the_field(
    edge, make_settings, start_worker, client
):
    fake, settings = await _served_by("openai", edge, make_settings)
    async with start_worker(settings):
        fake.reply = '{"score": 7, "why": "terse"}'
        verdict = await client.complete_as(Verdict, "Score this", agent="critic")
        fake.reply = '{"score": "high", "why": "terse"}'
        with pytest.raises(
            StructuredAnswerError, match=r"does not fit Verdict: score: Input should be a valid integer"
        ):
            await client.complete_as(Verdict, "Score that", agent="critic")

    assert verdict == Verdict(score=7, why="terse")
    sent = fake.requests[0].body["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["name"] == "Verdict"
    assert sent["json_schema"]["schema"] == Verdict.model_json_schema()


async def test_logprobs_come_back_when_asked(edge, make_settings, start_worker, client):
    fake, settings = await _served_by("openai", edge, make_settings)
    async with start_worker(settings):
        asked = await client.send(_request(agent="critic", logprobs=True, top_logprobs=2))
        plain = await client.send(_request(agent="critic"))

    assert asked.status is plain.status is Status.ok, asked.error
    assert fake.requests[0].body["logprobs"] is True and fake.requests[0].body["top_logprobs"] == 2
    tokens = asked.logprobs["content"] if asked.logprobs else []
    assert [t["token"] for t in tokens] == (asked.content or "").split()
    assert len(tokens[0]["top_logprobs"]) == 2
    assert plain.logprobs is None and not plain.cached  # logprobs are part of the cache key


async def test_the_reservation_prices_every_prompt_token_as_a_cache_write(
    edge, make_settings, start_worker, client
):
    """Cache writes cost 1.25x input at Anthropic: a budget that covers the prompt at the input
    price but not at the cache-write price refuses the call before it is made."""
    provider = PROVIDERS["anthropic"]
    fake = await edge(provider)
    deployment = provider.deployment(fake)  # 3e-6 input, 1.5e-5 output
    deployment["model_info"]["cache_creation_input_token_cost"] = 3e-5
    worker = make_settings(default_model="anthropic", models=[deployment])
    tokens = LLM.build(worker.llm).count_prompt_tokens("anthropic", _request(agent="writer"))
    prompt = math.ceil(tokens * worker.llm.budget.prompt_token_margin)
    at_input, at_write = prompt * 3e-6 + 10 * 1.5e-5, prompt * 3e-5 + 10 * 1.5e-5
    limit = (at_input + at_write) / 2
    budget = {
        "max_cost_per_task": limit,
        "max_cost_per_day": 10.0,
        "max_cost_per_agent_day": {"writer": 10.0},
    }
    settings = make_settings(default_model="anthropic", models=[deployment], budget=budget)
    async with start_worker(settings):
        result = await client.send(_request(agent="writer", task_id="t1", max_tokens=10, use_cache=False))

    assert result.status is Status.budget_exceeded, result.error
    assert result.error is not None and f"needs up to ${at_write:.6f}" in result.error.message
    assert fake.calls == 0


async def test_thinking_tokens_are_billed_at_the_reasoning_price(edge, make_settings, start_worker, client):
    # 12 prompt, 6 answer and 20 thinking tokens; 3e-7 input, 2.5e-6 output
    _, settings = await _served_by("gemini", edge, make_settings, output_cost_per_reasoning_token=3.5e-6)
    async with start_worker(settings):
        result = await client.complete(messages(), agent="writer", max_tokens=MAX_TOKENS)

    assert result.status is Status.ok, result.error
    assert (result.tokens.completion, result.tokens.reasoning) == (26, 20)
    assert result.cost_nano_usd == (12 * 300_000 + 6 * 2_500_000 + 20 * 3_500_000) // 1000 == 88_600


async def test_a_tool_loop_with_extended_thinking_sends_the_signed_thinking_back(
    edge, make_settings, start_worker, client
):
    fake, settings = await _served_by("anthropic", edge, make_settings)
    fake.tool_call = ("lookup", {"q": "queues"})
    ask = {"agent": "researcher", "temperature": 1.0, "max_tokens": 2048, "tools": [LOOKUP]}
    thinking = {"type": "enabled", "budget_tokens": 1024}
    async with start_worker(settings):
        first = await client.send(_request(thinking=thinking, **ask))
        assert first.status is Status.ok, first.error
        assert first.reasoning_content == "The user wants queues."
        assert first.thinking_blocks is not None and first.thinking_blocks[0].signature == fake.signatures[0]
        assert first.tool_calls is not None
        call = first.tool_calls[0]
        assistant = {
            "role": "assistant",
            "tool_calls": [call.model_dump()],
            "thinking_blocks": [b.model_dump(exclude_none=True) for b in first.thinking_blocks],
        }
        tool = {"role": "tool", "tool_call_id": call.id, "content": "three: a, b, c"}
        second = await client.send(_request([*messages(), assistant, tool], thinking=thinking, **ask))
        bare = {k: v for k, v in assistant.items() if k != "thinking_blocks"}
        without = await client.send(_request([*messages(), bare, tool], thinking=thinking, **ask))

    assert second.status is Status.ok, second.error
    assert "three: a, b, c" in (second.content or "")
    sent_back = fake.requests[1].body["messages"][-2]["content"][0]
    assert sent_back["type"] == "thinking" and sent_back["signature"] == fake.signatures[0]
    # Without its thinking blocks the same turn is what Anthropic refuses.
    assert without.status is Status.failed and without.error is not None
    assert without.error.type == "BadRequest" and "must start with a thinking block" in without.error.message


async def test_cache_control_on_a_message_reaches_anthropic_on_its_block(
    edge, make_settings, start_worker, client
):
    fake, settings = await _served_by("anthropic", edge, make_settings)
    long_context = {
        "role": "user",
        "content": "A long shared context.",
        "cache_control": {"type": "ephemeral"},
    }
    async with start_worker(settings):
        result = await client.send(_request([long_context], agent="writer", max_tokens=MAX_TOKENS))

    assert result.status is Status.ok, result.error
    [block] = fake.requests[0].body["messages"][0]["content"]
    assert block["text"] == "A long shared context." and block["cache_control"] == {"type": "ephemeral"}
