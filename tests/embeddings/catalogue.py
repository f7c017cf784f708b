"""The three embedding providers as the tests see them: the fake, the Router deployment, the price."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.fakes.base import TEST_KEY, ProviderFake
from tests.fakes.embeddings import FakeCohereEmbeddings, FakeGeminiEmbeddings, FakeOpenAIEmbeddings
from tests.support.config import llm_section


@dataclass(frozen=True)
class EmbeddingProvider:
    name: str
    fake: Callable[[], ProviderFake]
    model: str  # litellm_params.model, as config/llm.yaml says it
    path: str  # where the provider must be reached
    price: float  # USD per input token

    def deployment(self, fake: ProviderFake, name: str | None = None) -> dict[str, Any]:
        api_base = getattr(fake, "embed_base", fake.api_base)
        return {
            "model_name": name or self.name,
            "litellm_params": {"model": self.model, "api_base": api_base, "api_key": TEST_KEY},
            "model_info": {
                "input_cost_per_token": self.price,
                "output_cost_per_token": 0,
                "mode": "embedding",
            },
        }


EMBEDDERS = {
    p.name: p
    for p in (
        EmbeddingProvider(
            "openai-embed",
            FakeOpenAIEmbeddings,
            "openai/text-embedding-3-small",
            "/v1/embeddings",
            2.0e-8,
        ),
        EmbeddingProvider(
            "gemini-embed",
            FakeGeminiEmbeddings,
            "gemini/gemini-embedding-001",
            "/v1beta/models/gemini-embedding-001:batchEmbedContents",
            1.5e-7,
        ),
        EmbeddingProvider("cohere-embed", FakeCohereEmbeddings, "cohere/embed-v4.0", "/v2/embed", 1.2e-7),
    )
}


def embedding_llm(
    *deployments: dict[str, Any],
    fallbacks: list[str] | None = None,
    chat_base: str = "http://127.0.0.1:9/v1",  # nothing listens: an embedding request never calls it
    **embedding: Any,
) -> dict[str, Any]:
    """``make_settings`` overrides: the harness's chat models (on ``chat_base``) plus these embedding
    deployments, the first of them the default embedding model."""
    chat = llm_section(chat_base)["models"]
    return {
        "models": [*chat, *deployments],
        "embedding": {
            "default_model": deployments[0]["model_name"],
            "fallback_models": fallbacks or [],
            **embedding,
        },
    }
