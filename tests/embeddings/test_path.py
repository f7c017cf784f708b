"""An embedding request through the same steps as a chat request (issue #18): cache, idempotency,
retries and fallbacks, budgets, identity, and the limits on a batch, each answered with the
status a caller acts on. Real broker and Redis, litellm's real code, wire-format fakes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
import yaml

from tests.embeddings.catalogue import EMBEDDERS, embedding_llm
from tests.fakes.embeddings import tokens, vector
from tests.support.config import offline_config
from tests.support.ledger import day_state
from tests.support.processes import run_cli
from tests.support.waits import eventually
from worker.client import LLMClient
from worker.errors import ConfigError
from worker.messages import Status
from worker.settings import load_settings

OPENAI, COHERE = EMBEDDERS["openai-embed"], EMBEDDERS["cohere-embed"]
TEXTS = ["one text to index", "and another"]


async def test_the_same_texts_are_served_from_the_cache_at_no_cost(edge, make_settings, start_worker, client):
    fake = await edge(OPENAI)
    settings = make_settings(**embedding_llm(OPENAI.deployment(fake)))
    async with start_worker(settings):
        first = await client.embed(TEXTS, agent="researcher")
        again = await client.embed(TEXTS, agent="researcher")
        shorter = await client.embed(TEXTS, agent="researcher", dimensions=4)  # other vectors: no hit

    assert (first.status, again.status, shorter.status) == (Status.ok, Status.ok, Status.ok)
    assert not first.cached and again.cached and not shorter.cached
    assert again.embeddings == first.embeddings and again.cost_nano_usd == 0
    assert again.tokens == first.tokens  # what the answer took, though nothing was paid now
    assert len(fake.embedded) == 2
    day = await day_state(settings)
    assert day.calls == 3 and day.cache_hits == 1  # a hit is counted, at no cost
    assert day.spent_usd == pytest.approx(first.cost_usd + shorter.cost_usd)


async def test_a_request_id_is_answered_once_and_never_with_another_requests_vectors(
    edge, make_settings, start_worker, client
):
    fake = await edge(OPENAI)
    settings = make_settings(**embedding_llm(OPENAI.deployment(fake)))
    request_id = f"index-{uuid.uuid4().hex}"
    async with start_worker(settings):
        first = await client.embed(TEXTS, agent="researcher", request_id=request_id, use_cache=False)
        repeat = await client.embed(TEXTS, agent="researcher", request_id=request_id, use_cache=False)
        other = await client.embed(["other"], agent="researcher", request_id=request_id, use_cache=False)

    assert first.status is Status.ok and repeat.status is Status.ok
    assert repeat.embeddings == first.embeddings and repeat.cost_nano_usd == first.cost_nano_usd
    assert other.status is Status.conflict and other.embeddings is None
    assert len(fake.embedded) == 1
    assert (await day_state(settings)).calls == 1  # charged once


async def test_a_failing_model_is_retried_then_falls_back_and_only_the_answer_is_charged(
    edge, make_settings, start_worker, client
):
    openai, cohere = await edge(OPENAI), await edge(COHERE)
    settings = make_settings(
        **embedding_llm(OPENAI.deployment(openai), COHERE.deployment(cohere), fallbacks=[COHERE.name])
    )
    async with start_worker(settings):
        openai.fail_next("rate_limit")
        retried = await client.embed(TEXTS, agent="researcher", use_cache=False)
        openai.fail_every_call("server_error")
        fell_back = await client.embed(TEXTS, agent="researcher", use_cache=False)

    assert retried.status is Status.ok and retried.attempts == 2 and retried.model == OPENAI.name
    assert fell_back.status is Status.ok and fell_back.fallback_used and fell_back.model == COHERE.name
    assert fell_back.attempts == 3 + 1  # num_retries 2 on OpenAI, then Cohere
    assert fell_back.embeddings == retried.embeddings  # the fakes' vectors depend on the text only
    # One upstream call per attempt: the OpenAI SDK's own retries are off (litellm.DEFAULT_MAX_RETRIES).
    assert (openai.calls, cohere.calls) == (2 + 3, 1)
    day = await day_state(settings)
    assert day.calls == 2 and day.reserved_usd == 0
    assert day.by_model_usd == {
        OPENAI.name: pytest.approx(retried.cost_usd),
        COHERE.name: pytest.approx(fell_back.cost_usd),
    }


@pytest.mark.parametrize(
    ("limits", "texts", "field", "limit"),
    [
        ({"max_inputs": 2}, ["a", "b", "c"], "input", "llm.embedding.max_inputs (2)"),
        ({"max_input_tokens": 3}, ["short", "one two three four five"], "input.1", "max_input_tokens (3)"),
        ({"max_total_tokens": 5}, ["one two three", "four five six"], "input", "max_total_tokens (5)"),
    ],
)
async def test_a_batch_past_a_limit_is_invalid_naming_the_limit(
    limits, texts, field, limit, edge, make_settings, start_worker, client
):
    fake = await edge(OPENAI)
    settings = make_settings(**embedding_llm(OPENAI.deployment(fake), **limits))
    async with start_worker(settings):
        result = await client.embed(texts, agent="researcher")

    assert result.status is Status.invalid and result.error is not None
    assert result.error.message.startswith(f"{field}: ") and limit in result.error.message
    assert fake.calls == 0 and (await day_state(settings)).calls == 0


@pytest.mark.parametrize("text", ["files/abc123", "gs://bucket/a.png", "data:image/png;base64,iVBORw0KGgo="])
async def test_an_input_litellm_would_send_as_a_file_or_image_is_refused(
    text, edge, make_settings, start_worker, client
):
    """Gemini's litellm code fetches a `files/` name from Google with the worker's key, and sends
    `gs://` and `data:` inputs as media; Cohere's embeds a `data:` string as an image."""
    fake = await edge(EMBEDDERS["gemini-embed"])
    settings = make_settings(**embedding_llm(EMBEDDERS["gemini-embed"].deployment(fake)))
    async with start_worker(settings):
        result = await client.embed(["fine", text], agent="researcher")

    assert result.status is Status.invalid and result.error is not None
    assert result.error.message.startswith("input.1: begins with")
    assert fake.calls == 0


async def test_an_embedding_past_the_budget_is_refused_before_the_call(
    edge, make_settings, start_worker, client
):
    fake = await edge(OPENAI)
    llm = embedding_llm(
        OPENAI.deployment(fake)
        | {"model_info": {"input_cost_per_token": 0.01, "mode": "embedding", "output_cost_per_token": 0}}
    )
    settings = make_settings(**llm)
    async with start_worker(settings):
        result = await client.embed(["many words " * 500], agent="researcher", task_id="index-1")

    assert result.status is Status.budget_exceeded and result.error is not None
    assert fake.calls == 0
    day = await day_state(settings)
    assert day.calls == 0 and day.reserved_usd == 0


async def test_models_of_one_kind_are_not_used_for_the_other(edge, make_settings, start_worker, client):
    fake = await edge(OPENAI)
    settings = make_settings(**embedding_llm(OPENAI.deployment(fake)))
    async with start_worker(settings):
        chat = await client.complete("hi", agent="writer", model=OPENAI.name)
        embedding = await client.embed(["hi"], agent="researcher", model="primary")

    assert chat.status is Status.invalid and "not a configured model" in chat.error.message
    assert embedding.status is Status.invalid and embedding.error.message.startswith(
        "model: 'primary' is not a configured embedding model"
    )
    assert fake.calls == 0


async def test_without_embedding_models_an_embedding_request_is_invalid_naming_the_fix(
    make_settings, start_worker, client
):
    async with start_worker(make_settings()):
        result = await client.embed(["hi"], agent="researcher")
    assert result.status is Status.invalid and "configure llm.embedding" in result.error.message


async def test_a_chat_setting_naming_an_embedding_model_stops_the_worker(make_settings):
    with pytest.raises(ConfigError, match=r"llm.default_model: 'openai-embed' is not a chat model"):
        make_settings(**embedding_llm(OPENAI.deployment(fake_base())), default_model=OPENAI.name)
    with pytest.raises(ConfigError, match=r"llm.embedding.default_model: 'primary' is not an? embedding"):
        make_settings(
            **embedding_llm(OPENAI.deployment(fake_base()) | {"model_name": "x"})
            | {"embedding": {"default_model": "primary"}}
        )


def fake_base():
    class _Unstarted:
        api_base = "http://127.0.0.1:9/v1"

    return _Unstarted()


async def test_identity_grants_embedding_models_as_chat_models(
    edge, make_settings, start_worker, amqp_url, names
):
    """The client publishes as guest (the broker validates its user_id): guest may act as the
    researcher, and name no model."""
    fake = await edge(OPENAI)
    folder = make_settings(**embedding_llm(OPENAI.deployment(fake))).config_dir
    grants = {"mode": "enforce", "users": {"guest": {"agents": ["researcher"]}}}
    (folder / "callers.yaml").write_text(yaml.safe_dump({"callers": grants}))
    settings = load_settings(folder, environ={})
    async with start_worker(settings), LLMClient(amqp_url, request_queue=names.request_queue) as client:
        served = await client.embed(["hi"], agent="researcher")
        named = await client.embed(["hi"], agent="researcher", model=OPENAI.name)
        other_agent = await client.embed(["hi"], agent="writer")

    assert served.status is Status.ok
    assert named.status is Status.forbidden and "may not name model 'openai-embed'" in named.error.message
    assert (
        other_agent.status is Status.forbidden
        and "may not act as agent 'writer'" in other_agent.error.message
    )
    assert fake.calls == 1


async def test_the_offline_profile_embeds_one_text_with_litellms_mock(tmp_path, names, start_worker, client):
    settings = load_settings(offline_config(tmp_path / "offline", names), environ={})
    async with start_worker(settings):
        result = await client.embed(["offline"], agent="researcher")
    assert result.status is Status.ok, result.error
    assert result.embeddings[0].embedding == [0.25, -0.5, 0.125, 1.0] and result.cost_nano_usd > 0


async def test_a_request_id_used_for_a_chat_request_is_a_conflict_for_an_embedding(
    edge, make_settings, start_worker, client, fake
):
    """One idempotency key space per caller: an embedding never answers with a chat result, nor
    the reverse."""
    embedder = await edge(OPENAI)
    settings = make_settings(**embedding_llm(OPENAI.deployment(embedder), chat_base=fake.base_url))
    request_id = f"shared-{uuid.uuid4().hex}"
    async with start_worker(settings):
        chat = await client.complete("hello", agent="writer", request_id=request_id)
        embedding = await client.embed(["hello"], agent="writer", request_id=request_id)
        again = await client.complete("hello", agent="writer", request_id=request_id)

    assert chat.status is Status.ok and again.status is Status.ok and again.content == chat.content
    assert embedding.status is Status.conflict and embedder.calls == 0


async def test_an_answer_without_a_vector_per_text_is_failed_and_still_charged(
    edge, make_settings, start_worker, client
):
    """The provider answered (and billed) but one vector is missing: the agent gets `failed`, never
    vectors matched to the wrong texts, and the ledger keeps the charge."""
    fake = await edge(OPENAI)
    settings = make_settings(**embedding_llm(OPENAI.deployment(fake)))
    fake.short_by = 1
    async with start_worker(settings):
        result = await client.embed(TEXTS, agent="researcher")

    assert result.status is Status.failed and result.embeddings is None
    assert result.error is not None and "returned 1 vectors for 2 inputs" in result.error.message
    assert fake.calls == 1
    day = await day_state(settings)
    assert day.reserved_usd == 0 and day.spent_usd == pytest.approx(tokens(TEXTS) * OPENAI.price)


async def test_a_dead_lettered_embedding_is_replayed_as_an_embedding(
    edge, make_settings, start_worker, client
):
    """The dead letter keeps the AMQP type, so `dlq replay` serves it as an embedding again, and the
    agent asking again gets the replayed vectors without a second provider call."""
    fake = await edge(OPENAI)
    settings = make_settings(**embedding_llm(OPENAI.deployment(fake)))
    request_id = f"replay-{uuid.uuid4().hex}"
    async with start_worker(settings):
        fake.fail_next("server_error", "server_error", "server_error")  # every attempt (2 retries)
        failed = await client.embed(TEXTS, agent="researcher", request_id=request_id)
        replayed = await run_cli(settings.config_dir, "dlq", "replay")
        await eventually(lambda: len(fake.embedded) == 1, what="the replayed embedding served")
        asked_again_at = datetime.now(UTC)
        again = await client.embed(TEXTS, agent="researcher", request_id=request_id)

    assert failed.status is Status.failed and failed.error.type == "ServerError"
    assert replayed.code == 0 and replayed.out.startswith("replayed 1 dead letter(s)")
    assert again.status is Status.ok and [e.embedding for e in again.embeddings] == [vector(t) for t in TEXTS]
    # The replay is served as the agent's own caller (x-replay-caller), so the agent's second ask
    # finds the replayed answer in the result store: the very answer, not a cache hit.
    assert len(fake.embedded) == 1 and not again.cached
    assert again.finished_at < asked_again_at  # the replay's answer, finished before the ask
