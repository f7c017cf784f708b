"""Idempotency: answers kept by caller and ``request_id``, so a redelivered or re-published request
is answered from Redis without a second provider call, and two copies in flight make one call.

A ``request_id`` is the caller's: the store's key is the caller's broker user, its agent and the
``request_id`` (:func:`request_key`), so another caller re-using it gets an answer of its own. Each answer and
each claim carries the request's :func:`fingerprint`: the same caller sending a different request
under a ``request_id`` it used is refused (``conflict``), never answered with the other request's
result; the fingerprint travels with the answer, so this costs no extra Redis round trip.

Answers are written by :meth:`BudgetLedger.settle` in the same atomic step that charges for
them (at :meth:`ResultStore.key`). Only ``ok`` answers are kept: a failed request replayed from
the dead-letter queue must be tried again, not answered with its old failure.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

from worker.errors import LedgerUnavailable
from worker.messages import EmbeddingResult, LLMResult
from worker.state.flight import Claim, ClaimScript, SingleFlight
from worker.state.keys import part
from worker.state.redis import mapped

_WHAT = "result store"
# What may differ between two copies of one request: its ids and when and how it travels.
_NOT_THE_REQUEST = {"request_id", "trace_id", "deadline", "priority", "stream"}


def fingerprint(request: BaseModel) -> str:
    """What makes two requests under one ``request_id`` the same request: everything they ask for
    (agent, task, model, messages, parameters), not their trace, deadline or queue."""
    asked = request.model_dump_json(exclude=_NOT_THE_REQUEST)
    return hashlib.sha256(asked.encode()).hexdigest()[:32]


def request_key(user: str, agent: str, request_id: str) -> str:
    """The idempotency key of ``request_id`` sent by broker ``user`` as ``agent``: the parts
    escaped, so that no caller's ``request_id`` can name another caller's."""
    return f"{part(user)}:{part(agent)}:{part(request_id)}"


@dataclass(frozen=True)
class StoredAnswer:
    fingerprint: str
    result: LLMResult | EmbeddingResult


def stored_form(result: LLMResult | EmbeddingResult, fingerprint: str) -> str:
    """The answer as kept for duplicates, after its request's fingerprint: defaults and nulls left
    out (the duplicate's parse puts them back), a third of a one-line answer's bytes (issue #22)."""
    return f"{fingerprint}|{result.model_dump_json(exclude_none=True, exclude_defaults=True)}"


def read_stored(raw: bytes) -> StoredAnswer:
    fp, _, body = raw.partition(b"|")
    return StoredAnswer(fp.decode(), LLMResult.model_validate_json(body))


def read_stored_embedding(raw: bytes) -> StoredAnswer:
    fp, _, body = raw.partition(b"|")
    return StoredAnswer(fp.decode(), EmbeddingResult.model_validate_json(body))


def result_key(prefix: str, key: str) -> str:
    """Where the answer under the idempotency ``key`` lives (written by the ledger's settle step)."""
    return f"{prefix}result:{part(key)}"


class ResultStore:
    def __init__(
        self, flight: SingleFlight, prefix: str, *, decode: Callable[[bytes], StoredAnswer] = read_stored
    ):
        """``decode``: how a stored answer is read (:func:`read_stored_embedding` for embeddings)."""
        self.flight, self.prefix, self.decode = flight, prefix, decode

    def key(self, key: str) -> str:
        return result_key(self.prefix, key)

    async def claim_or_wait(
        self, key: str, fingerprint: str, *, ttl_s: float, wait_until: float, first: ClaimScript | None = None
    ) -> Claim[StoredAnswer]:
        """The stored answer, or the right to produce it, or a time-out (another worker still has
        it), or a conflict (the claim's holder works on a request of another fingerprint).

        ``first``: the first try (:meth:`SingleFlight.claim_or_wait`), e.g. one that also reserves.
        Raises :class:`LedgerUnavailable` when Redis fails the step (idempotency fails closed).
        """
        with mapped(LedgerUnavailable, _WHAT):
            return await self.flight.claim_or_wait(
                f"req:{part(key)}",
                answer_key=self.key(key),
                decode=self.decode,
                ttl_s=ttl_s,
                wait_until=wait_until,
                tag=fingerprint,
                first=first,
            )

    async def release(self, key: str, claim: Claim[StoredAnswer]) -> None:
        with mapped(LedgerUnavailable, _WHAT):
            await self.flight.release(f"req:{part(key)}", claim)

    def forget(self, claim: Claim[StoredAnswer]) -> None:
        """Done with a claim whose answer is stored: it is left to expire in Redis."""
        self.flight.forget(claim)
