"""The embedding endpoints of OpenAI, Gemini and Cohere, each beside that provider's chat fake.

Each class extends the provider's chat fake (same auth, errors and failure script) with the
embedding endpoint as the provider's API reference documents it:

- OpenAI (https://platform.openai.com/docs/api-reference/embeddings): ``POST /v1/embeddings``
  ``{"model", "input": string | [string], "encoding_format": "float" | "base64", "dimensions"}``
  (at most 2048 inputs; ``dimensions`` only for ``text-embedding-3-*``) ->
  ``{"object": "list", "data": [{"object": "embedding", "index", "embedding"}], "model",
  "usage": {"prompt_tokens", "total_tokens"}}``. ``base64`` is the little-endian float32 array
  (the openai SDK asks for it when its caller names no format, and decodes it).
- Gemini (https://ai.google.dev/api/embeddings): ``POST /v1beta/models/{model}:batchEmbedContents``
  ``{"requests": [{"model": "models/{model}", "content": {"parts": [{"text"}]},
  "outputDimensionality"}]}`` (at most 100 requests, each naming the model of the URL) ->
  ``{"embeddings": [{"values": [...]}]}``, without a usage block.
- Cohere (https://docs.cohere.com/reference/embed): ``POST /v2/embed`` ``{"model", "texts",
  "input_type", "embedding_types", "output_dimension"}`` (at most 96 texts; ``input_type`` is
  required) -> ``{"id", "embeddings": {"float": [[...]]}, "texts", "meta": {"billed_units":
  {"input_tokens"}}, "response_type": "embeddings_by_type"}``.

Vectors are deterministic (:func:`vector`), with values a float32 holds exactly, so a test can
compare what the agent got with what the fake sent. Tokens: one per word of each text
(:func:`tokens`); Gemini reports none (litellm counts them itself).
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Any, ClassVar

from aiohttp import web

from tests.fakes.base import Received, request_id
from tests.fakes.cohere import FakeCohere
from tests.fakes.gemini import FakeGemini
from tests.fakes.openai_api import FakeOpenAIPlatform

DEFAULT_DIMENSIONS = 8


def vector(text: str, dimensions: int = DEFAULT_DIMENSIONS) -> list[float]:
    """The fake's vector of ``text``: values k/128 in [-1, 1), exact in float32."""
    digest = hashlib.sha256(text.encode()).digest() * (dimensions // 32 + 1)
    return [(digest[i] - 128) / 128 for i in range(dimensions)]


def tokens(texts: list[str]) -> int:
    return sum(len(text.split()) for text in texts)


class _Embeds:
    """What the three fakes record: the batches they embedded, and the dimensions they answer.

    ``fake.short_by = 1`` answers one vector fewer than asked (a broken provider, still billed)."""

    embedded: list[list[str]]
    native_dimensions: int = DEFAULT_DIMENSIONS
    short_by: int = 0

    def _vectors(self, texts: list[str], dimensions: int | None) -> list[list[float]]:
        self.embedded.append(texts)
        vectors = [vector(text, dimensions or self.native_dimensions) for text in texts]
        return vectors[: len(vectors) - self.short_by]


class FakeOpenAIEmbeddings(FakeOpenAIPlatform, _Embeds):
    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.embedded = []

    def routes(self) -> list[web.RouteDef]:
        return [*super().routes(), web.post("/v1/embeddings", self._embeddings)]

    def invalid(self, received: Received) -> str | None:
        if received.path != "/v1/embeddings":
            return super().invalid(received)
        body = received.body
        if not isinstance(body.get("model"), str):
            return "you must provide a model parameter"
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            return "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference."
        if len(texts) > 2048:
            return f"'$.input' is too long: {len(texts)} items; the limit is 2048"
        if body.get("encoding_format") not in (None, "float", "base64"):  # null: the default, float
            return "Invalid value for 'encoding_format': expected 'float' or 'base64'."
        if "dimensions" in body and not body["model"].startswith("text-embedding-3"):
            return "This model does not support specifying dimensions."
        return None

    async def _embeddings(self, request: web.Request) -> web.Response:
        received, failure = await self.receive(request)
        if failure is not None:
            return failure
        body = received.body
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        vectors = self._vectors(texts, body.get("dimensions"))
        as_base64 = body.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": _base64(v) if as_base64 else v,
            }
            for i, v in enumerate(vectors)
        ]
        used = tokens(texts)
        payload = {
            "object": "list",
            "data": data,
            "model": body["model"],
            "usage": {"prompt_tokens": used, "total_tokens": used},
        }
        return web.json_response(payload, headers={"x-request-id": request_id("req_")})


def _base64(values: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


class FakeGeminiEmbeddings(FakeGemini, _Embeds):
    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.embedded = []

    async def _generate(self, request: web.Request) -> web.Response:
        method = request.match_info["model_and_method"].partition(":")[2]
        if method != "batchEmbedContents":
            return await super()._generate(request)
        received, failure = await self.receive(request)
        if failure is not None:
            return failure
        requests = received.body["requests"]
        texts = [" ".join(p["text"] for p in r["content"]["parts"]) for r in requests]
        dimensions = requests[0].get("outputDimensionality")
        return web.json_response({"embeddings": [{"values": v} for v in self._vectors(texts, dimensions)]})

    def invalid(self, received: Received) -> str | None:
        if not received.path.endswith(":batchEmbedContents"):
            return super().invalid(received)
        model = received.path.rsplit("/", 1)[1].partition(":")[0]
        requests = received.body.get("requests")
        if not isinstance(requests, list) or not requests:
            return "* BatchEmbedContentsRequest.requests: requests is not specified"
        if len(requests) > 100:
            return "* BatchEmbedContentsRequest.requests: at most 100 requests can be in one batch"
        for i, r in enumerate(requests):
            unknown = set(r) - {"model", "content", "taskType", "title", "outputDimensionality"}
            if unknown:
                return (
                    f"Invalid JSON payload received. Unknown name \"{sorted(unknown)[0]}\" at 'requests[{i}]'"
                )
            if r.get("model") != f"models/{model}":
                return f"* BatchEmbedContentsRequest.requests[{i}].model: the model must be models/{model}"
            parts = (r.get("content") or {}).get("parts")
            if not isinstance(parts, list) or not all(isinstance(p.get("text"), str) for p in parts):
                return f"* BatchEmbedContentsRequest.requests[{i}].content: text parts are required"
        return None


class FakeCohereEmbeddings(FakeCohere, _Embeds):
    INPUT_TYPES: ClassVar[set[str]] = {"search_document", "search_query", "classification", "clustering"}

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.embedded = []

    @property
    def embed_base(self) -> str:
        """The deployment's ``api_base`` for embeddings: litellm sends it as the whole URL."""
        return f"{self.root}/v2/embed"

    def routes(self) -> list[web.RouteDef]:
        return [*super().routes(), web.post("/v2/embed", self._embed)]

    def invalid(self, received: Received) -> str | None:
        if received.path != "/v2/embed":
            return super().invalid(received)
        body = received.body
        if not isinstance(body.get("model"), str):
            return "invalid request: model is required"
        texts = body.get("texts")
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            return "invalid request: texts must be a non-empty list of strings"
        if len(texts) > 96:
            return f"invalid request: texts can have at most 96 elements, but got {len(texts)}"
        if body.get("input_type") not in self.INPUT_TYPES:
            return "invalid request: input_type is required for embed v3 models and newer"
        if body.get("embedding_types", ["float"]) != ["float"]:
            return "this fake answers float embeddings only"
        return None

    async def _embed(self, request: web.Request) -> web.Response:
        received, failure = await self.receive(request)
        if failure is not None:
            return failure
        texts = received.body["texts"]
        payload = {
            "id": request_id(""),
            "embeddings": {"float": self._vectors(texts, received.body.get("output_dimension"))},
            "texts": texts,
            "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": tokens(texts)}},
            "response_type": "embeddings_by_type",
        }
        return web.json_response(payload)
