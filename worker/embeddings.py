"""Embedding requests, one way: parse -> identity -> dedupe -> expiry -> model -> limits -> cache ->
reserve -> embed -> settle.

An ``EmbeddingRequest`` (AMQP ``type`` ``EmbeddingRequest.v1``) arrives on the request queue beside
chat requests; the consumer hands it here. It shares the chat pipeline's steps (identity, the
result store and its single flight, the response cache, the ledger, the settle that survives a
Redis restart) and differs only in what it asks the provider and what it answers with: vectors,
never text. The budget reserved is every counted input token (with ``prompt_token_margin``) at the
dearest input price of the model and its fallbacks; an embedding has no output tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from typing import TYPE_CHECKING

from worker.boundary.parse import parse_embedding
from worker.errors import CacheUnavailable, DeadlineExpired, InvalidRequest, ProviderError, WorkerError
from worker.messages import EmbeddingRequest, Status
from worker.outcome import AnyRequest, Delivery, Outcome, answer, call_failed, refused
from worker.pipeline import Pipeline, _missed, _quietly, _Served, charged
from worker.settings import EmbeddingSettings
from worker.state.cache import CachedEmbedding
from worker.state.ledger import Reservation

if TYPE_CHECKING:
    from worker.llm import Embedded


class EmbeddingPipeline(Pipeline):
    """The chat :class:`~worker.pipeline.Pipeline`'s steps, for embedding requests.

    ``cache`` is a response cache of :class:`CachedEmbedding` answers and ``results`` a result
    store that reads :class:`EmbeddingResult` answers (``app.build_embedding_pipeline`` wires both).
    """

    def _parse(self, delivery: Delivery) -> AnyRequest | Outcome:
        return parse_embedding(delivery, max_body_bytes=self.limits.max_body_bytes)

    async def _serve_request(
        self,
        request: AnyRequest,
        served: _Served,
        started: float,
        deadline: float,
        reserved: Reservation | None = None,  # never taken with the claim for an embedding
    ) -> Outcome:
        assert isinstance(request, EmbeddingRequest) and reserved is None  # _parse gives nothing else
        if request.deadline is not None and deadline <= time.monotonic():
            raise DeadlineExpired(
                f"deadline {request.deadline.isoformat()} passed before the request was served"
            )
        model = self.llm.choose_embedding_model(request)
        limits = self.llm.settings.embedding
        assert limits is not None  # choose_embedding_model checked it
        if len(request.input) > limits.max_inputs:  # before counting 2,048 texts for nothing
            raise InvalidRequest(
                "input",
                f"{len(request.input)} texts exceeds llm.embedding.max_inputs ({limits.max_inputs}): "
                "split the batch",
            )
        counted = await self.llm.input_tokens(model, request.input)
        check_tokens(counted, limits)
        ttl = self.cache.ttl_s(request)
        if ttl <= 0:
            return await self._embed(request, served, model, counted, started, deadline, None, 0)
        key = self.cache_key(request, model)
        try:
            claim = await self.cache.claim_or_wait(
                key,
                ttl_s=self.limits.deadline_s + 60,
                wait_until=min(deadline, time.monotonic() + self.limits.cache_wait_s),
            )
        except CacheUnavailable:  # fail open: no cache for this request
            return await self._embed(request, served, model, counted, started, deadline, None, 0)
        if claim.found is not None:
            return await self._cache_hit(request, served, claim.found, started)
        try:
            return _missed(await self._embed(request, served, model, counted, started, deadline, key, ttl))
        finally:
            if claim.owned:
                await self.cache.release(key, claim)

    def cache_key(self, request: EmbeddingRequest, model: str) -> str:
        """The same texts embedded by the same model at the same length are the same vectors."""
        normalized = {
            "kind": "embedding",  # never the key of a chat answer
            "ns": request.agent if self.cache.namespace == "agent" else "shared",
            "model": model,
            "input": request.input,
            "dimensions": request.dimensions,
        }
        digest = hashlib.sha256(json.dumps(normalized, sort_keys=True, separators=(",", ":")).encode())
        return f"{self.cache.prefix}cache:{digest.hexdigest()}"

    async def _embed(
        self,
        request: EmbeddingRequest,
        served: _Served,
        model: str,
        counted: list[int],
        started: float,
        deadline: float,
        cache_key: str | None,
        ttl: int,
    ) -> Outcome:
        input_tokens = sum(counted)
        price = self.llm.worst_embedding_price(model)
        worst = price.worst_nano(math.ceil(input_tokens * self.ledger.budget.prompt_token_margin), 0)
        try:
            reservation = await self.ledger.reserve(
                served.key, worst, self.ledger.scopes(request.agent, request.task_id)
            )
        except WorkerError as exc:  # over budget, or the ledger failed: answered, never called
            return refused(request, started, exc)
        try:
            embedded = await self.llm.embed(
                request, model, deadline, input_tokens=input_tokens, batch=request.priority == "batch"
            )
        except ProviderError as exc:
            if exc.billed_nano:  # a 200 with unusable vectors: the provider charged for it
                await asyncio.shield(
                    _quietly(
                        self.ledger.settle(reservation, cost_nano=exc.billed_nano, model=exc.model or model)
                    )
                )
            else:
                await _quietly(self.ledger.release(reservation))
            return call_failed(request, started, exc, model)
        except BaseException:
            await _quietly(self.ledger.release(reservation))  # cancelled mid-call: free the budget now
            raise
        outcome = _answered(request, embedded, started)
        # The provider has billed us: record it even if this task is being cancelled.
        await asyncio.shield(self._settle(reservation, embedded, outcome, served.fingerprint))
        if cache_key is not None:
            stored = CachedEmbedding.model_validate(
                outcome.result.model_dump(include=set(CachedEmbedding.model_fields))
            )
            await self.cache.put(cache_key, stored, ttl)
        return outcome


def _answered(request: EmbeddingRequest, embedded: Embedded, started: float) -> Outcome:
    outcome = answer(
        request,
        started,
        Status.ok,
        embeddings=[{"index": i, "embedding": vector} for i, vector in enumerate(embedded.vectors)],
        dimensions=len(embedded.vectors[0]),
        **charged(embedded),
    )
    outcome.provider_latency_ms = embedded.provider_latency_ms
    return outcome


def check_tokens(counted: list[int], limits: EmbeddingSettings) -> None:
    """Raise :class:`InvalidRequest` naming the first token limit of ``llm.embedding`` the batch passes."""
    for i, tokens in enumerate(counted):
        if tokens > limits.max_input_tokens:
            raise InvalidRequest(
                f"input.{i}",
                f"{tokens} tokens exceeds llm.embedding.max_input_tokens ({limits.max_input_tokens}): "
                "split the text",
            )
    if sum(counted) > limits.max_total_tokens:
        raise InvalidRequest(
            "input",
            f"{sum(counted)} tokens in all exceeds llm.embedding.max_total_tokens "
            f"({limits.max_total_tokens}): split the batch",
        )
