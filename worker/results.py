"""Idempotency: answers kept by ``request_id``, so a redelivered or re-published request is
answered from Redis without a second provider call, and two copies in flight make one call.

Answers are written by :meth:`BudgetLedger.settle` in the same atomic step that charges for
them (at :meth:`ResultStore.key`). Only ``ok`` answers are kept: a failed request replayed from
the dead-letter queue must be tried again, not answered with its old failure.
"""

from __future__ import annotations

from worker.flight import Claim, SingleFlight
from worker.messages import LLMResult


class ResultStore:
    def __init__(self, flight: SingleFlight, prefix: str):
        self.flight, self.prefix = flight, prefix

    def key(self, request_id: str) -> str:
        return f"{self.prefix}result:{request_id}"

    async def claim_or_wait(self, request_id: str, *, ttl_s: float, wait_until: float) -> Claim[LLMResult]:
        """The stored answer, or the right to produce it, or a time-out (another worker still has it)."""
        return await self.flight.claim_or_wait(
            f"req:{request_id}",
            answer_key=self.key(request_id),
            decode=LLMResult.model_validate_json,
            ttl_s=ttl_s,
            wait_until=wait_until,
        )

    async def release(self, request_id: str, claim: Claim[LLMResult]) -> None:
        await self.flight.release(f"req:{request_id}", claim)

    def forget(self, claim: Claim[LLMResult]) -> None:
        """Done with a claim whose answer is stored: it is left to expire in Redis."""
        self.flight.forget(claim)
