"""Response cache: identical requests do not spend money twice.

The key is a SHA-256 of the normalized request: the model group, the messages, every parameter
that changes the answer, and a namespace (the agent, unless ``cache_namespace: shared``). Only
successful answers are stored. A burst of identical requests makes one provider call: the first
claims the key (:class:`~worker.flight.SingleFlight`), the others wait for its answer.

The cache fails open: a lookup that cannot reach Redis raises :class:`CacheUnavailable`, which
the pipeline treats as "no cache for this request"; a store that fails is skipped.
:attr:`ResponseCache.errors` counts both; a request never fails for them.
The cache may live on a Redis of its own (``redis.cache_url``, e.g. with ``allkeys-lru``),
apart from the ledger's, which must never evict.

litellm's own cache is not used: its key ignores the tenant, and a hit crashes in some releases
(shared/research/litellm.md, section 7 and claim 4).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import structlog
from pydantic import BaseModel
from redis.exceptions import RedisError

from worker.flight import Claim, SingleFlight
from worker.messages import LLMRequest, Tokens

log = structlog.get_logger("worker.cache")


class CacheUnavailable(Exception):
    """The cache's Redis did not answer; the request goes on without the cache."""


class CachedAnswer(BaseModel):
    """What a hit replays: the original answer, tokens and answering model."""

    content: str | None
    model: str
    tokens: Tokens


class ResponseCache:
    def __init__(self, flight: SingleFlight, prefix: str, *, default_ttl_s: int, namespace: str):
        self.flight, self.redis, self.prefix = flight, flight.redis, prefix
        self.default_ttl_s, self.namespace = default_ttl_s, namespace
        self.errors = 0

    def ttl_s(self, request: LLMRequest) -> int:
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
        }
        digest = hashlib.sha256(json.dumps(normalized, sort_keys=True, separators=(",", ":")).encode())
        return f"{self.prefix}cache:{digest.hexdigest()}"

    async def claim_or_wait(self, key: str, *, ttl_s: float, wait_until: float) -> Claim[CachedAnswer]:
        """A stored answer, the claim to produce one, or a time-out.

        Raises :class:`CacheUnavailable` when the cache's Redis does not answer.
        """
        try:
            return await self.flight.claim_or_wait(
                key,
                answer_key=key,
                decode=CachedAnswer.model_validate_json,
                ttl_s=ttl_s,
                wait_until=wait_until,
            )
        except (RedisError, OSError) as exc:
            self.failed("lookup", exc)
            raise CacheUnavailable(str(exc)) from exc

    async def release(self, key: str, claim: Claim[CachedAnswer]) -> None:
        try:
            await self.flight.release(key, claim)
        except (RedisError, OSError) as exc:  # the claim expires by itself
            self.failed("release", exc)

    async def put(self, key: str, answer: CachedAnswer, ttl_s: int) -> None:
        try:
            await self.redis.set(key, answer.model_dump_json(), ex=ttl_s)
        except (RedisError, OSError) as exc:
            self.failed("put", exc)

    def failed(self, op: str, exc: BaseException) -> None:
        """Count and log a cache operation that could not reach Redis."""
        self.errors += 1
        log.warning("cache.unavailable", op=op, error=type(exc).__name__)
