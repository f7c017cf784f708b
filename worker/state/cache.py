"""Response cache: identical requests do not spend money twice.

The key is a SHA-256 of the normalized request: the model group, the messages, every parameter
that changes the answer (temperature, max_tokens and every OpenAI parameter the request sets:
tools, tool_choice, response_format, stop, seed, top_p, penalties, logit_bias, logprobs, user,
reasoning_effort), and a namespace (the agent, unless ``cache_namespace: shared``). Only
successful answers are stored. A burst of identical requests makes one provider call: the first
claims the key (:class:`~worker.flight.SingleFlight`), the others wait for its answer.

The cache fails open: a lookup that cannot reach Redis raises :class:`CacheUnavailable`, which
the pipeline treats as "no cache for this request"; a store that fails is skipped.
:attr:`ResponseCache.errors` counts both, and :attr:`ResponseCache.on_error` reports each (the
worker counts them in ``llm_worker_cache_errors_total``); a request never fails for them.
The cache may live on a Redis of its own (``redis.cache_url``, e.g. with ``allkeys-lru``),
apart from the ledger's, which must never evict.

litellm's own cache is not used: its key ignores the tenant, and a hit crashes in some releases
(litellm's ``get_cache_key`` hashes the OpenAI parameters only, without the caller).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import structlog
from pydantic import BaseModel

from worker.errors import CacheUnavailable
from worker.messages import Embedding, EmbeddingRequest, LLMRequest, ThinkingBlock, Tokens, ToolCall
from worker.state.flight import Claim, SingleFlight
from worker.state.redis import mapped

log = structlog.get_logger("worker.cache")
_WHAT = "response cache"


class CachedAnswer(BaseModel):
    """What a hit replays: the original answer, tokens and answering model."""

    content: str | None
    model: str
    tokens: Tokens
    finish_reason: str | None = None
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = None
    thinking_blocks: list[ThinkingBlock] | None = None
    logprobs: dict[str, Any] | None = None


class CachedEmbedding(BaseModel):
    """What an embedding hit replays: the vectors, their length, tokens and answering model."""

    embeddings: list[Embedding]
    dimensions: int
    model: str
    tokens: Tokens


class ResponseCache:
    def __init__(
        self,
        flight: SingleFlight,
        prefix: str,
        *,
        default_ttl_s: int,
        namespace: str,
        may_store: Callable[[], bool] = lambda: True,
        answer_type: type[BaseModel] = CachedAnswer,
    ):
        """``may_store()`` false skips storing answers: a cache sharing the ledger's Redis stops
        filling it before the ledger needs the room (:class:`~worker.state.memory.MemoryGuard`)."""
        self.flight, self.redis, self.prefix = flight, flight.redis, prefix
        self.default_ttl_s, self.namespace = default_ttl_s, namespace
        self.may_store = may_store
        self.answer_type = answer_type  # what a hit decodes to (CachedEmbedding for embeddings)
        self.errors = 0
        self.on_error: Callable[[str], None] = lambda op: None
        self.skipped = 0  # answers not stored for lack of memory

    def ttl_s(self, request: LLMRequest | EmbeddingRequest) -> int:
        """0 means: do not use the cache for this request."""
        if not request.use_cache:
            return 0
        return request.cache_ttl if request.cache_ttl is not None else self.default_ttl_s

    def key(self, request: LLMRequest, model: str, temperature: float, max_tokens: int) -> str:
        normalized: dict[str, Any] = {
            "ns": request.agent if self.namespace == "agent" else "shared",
            "model": model,
            "messages": [m.model_dump(mode="json", exclude_none=True) for m in request.messages],
            "temperature": temperature,
            "max_tokens": max_tokens,
            **request.chat_params(),  # tools, response_format, stop, seed...: each changes the answer
        }
        digest = hashlib.sha256(json.dumps(normalized, sort_keys=True, separators=(",", ":")).encode())
        return f"{self.prefix}cache:{digest.hexdigest()}"

    async def claim_or_wait(self, key: str, *, ttl_s: float, wait_until: float) -> Claim[Any]:
        """A stored answer, the claim to produce one, or a time-out.

        Raises :class:`CacheUnavailable` when the cache's Redis does not answer.
        """
        try:
            with mapped(CacheUnavailable, _WHAT):
                return await self.flight.claim_or_wait(
                    key,
                    answer_key=key,
                    decode=self.answer_type.model_validate_json,
                    ttl_s=ttl_s,
                    wait_until=wait_until,
                )
        except CacheUnavailable as exc:
            self.failed("lookup", exc)
            raise

    async def release(self, key: str, claim: Claim[Any]) -> None:
        try:
            with mapped(CacheUnavailable, _WHAT):
                await self.flight.release(key, claim)
        except CacheUnavailable as exc:  # the claim expires by itself
            self.failed("release", exc)

    async def put(self, key: str, answer: BaseModel, ttl_s: int) -> None:
        if not self.may_store():
            self.skipped += 1
            return
        try:
            with mapped(CacheUnavailable, _WHAT):
                await self.redis.set(key, answer.model_dump_json(), ex=ttl_s)
        except CacheUnavailable as exc:
            self.failed("put", exc)

    def failed(self, op: str, exc: CacheUnavailable) -> None:
        """Count and log a cache operation that Redis failed."""
        self.errors += 1
        self.on_error(op)
        log.warning("cache.unavailable", op=op, error=str(exc))
