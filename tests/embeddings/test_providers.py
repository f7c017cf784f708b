"""An embedding batch per provider (issue #18): the agent's texts cross the broker, the ledger and
the Router to each provider's wire-format fake, and come back as one vector per text, in order,
with the tokens the provider reported and their cost, which the ledger has charged."""

from __future__ import annotations

import pytest

from tests.embeddings.catalogue import EMBEDDERS, embedding_llm
from tests.fakes.base import TEST_KEY
from tests.fakes.embeddings import tokens, vector
from tests.support.ledger import day_state
from worker.messages import Status

TEXTS = ["queues hold messages", "a worker answers once", "budgets are reserved before the call"]


@pytest.mark.parametrize("name", list(EMBEDDERS))
async def test_a_batch_is_embedded_in_the_providers_format_and_charged(
    name, edge, make_settings, start_worker, client
):
    provider = EMBEDDERS[name]
    fake = await edge(provider)
    settings = make_settings(**embedding_llm(provider.deployment(fake)))
    async with start_worker(settings):
        result = await client.embed(TEXTS, agent="researcher", dimensions=4)  # the fakes: 8 unless told

    assert result.status is Status.ok, result.error
    assert fake.calls == 1 and fake.requests[0].path == provider.path
    assert any(TEST_KEY in value for value in fake.requests[0].headers.values())
    assert not fake.requests[0].query  # the key in a header, never in the URL
    assert fake.embedded == [TEXTS]  # one call for the whole batch
    if name == "openai-embed":  # one base64 string per vector, not 1,536 JSON numbers each
        assert fake.requests[0].body["encoding_format"] == "base64"
    assert [e.index for e in result.embeddings] == [0, 1, 2]
    assert [e.embedding for e in result.embeddings] == [vector(t, 4) for t in TEXTS]
    assert result.dimensions == 4 and result.model == name and result.attempts == 1
    if name != "gemini-embed":  # Gemini reports no usage: litellm counts the tokens itself
        assert result.tokens.prompt == tokens(TEXTS)
    assert result.tokens.completion == 0 and result.tokens.total == result.tokens.prompt > 0
    assert result.cost_nano_usd == pytest.approx(result.tokens.prompt * provider.price * 1e9, abs=1)
    day = await day_state(settings)
    assert day.calls == 1 and day.reserved_usd == 0
    assert day.spent_usd == pytest.approx(result.cost_usd) and day.by_model_usd == {
        name: pytest.approx(result.cost_usd)
    }
