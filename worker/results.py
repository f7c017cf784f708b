"""Idempotency: answers kept by ``request_id``, so a redelivered or re-published request is
answered from Redis without a second provider call.

Answers are written by :meth:`BudgetLedger.settle` in the same atomic step that charges for
them; this module only reads. Only ``ok`` answers are kept: a failed request replayed from the
dead-letter queue must be tried again, not answered with its old failure.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from worker.messages import LLMResult


class ResultStore:
    def __init__(self, redis: aioredis.Redis, prefix: str):
        self.redis, self.prefix = redis, prefix

    def key(self, request_id: str) -> str:
        return f"{self.prefix}result:{request_id}"

    async def get(self, request_id: str) -> LLMResult | None:
        raw = await self.redis.get(self.key(request_id))
        return LLMResult.model_validate_json(raw) if raw is not None else None
