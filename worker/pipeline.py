"""One request, one way: parse -> identity -> dedupe -> expiry -> model -> images -> cache -> reserve
-> LLM -> settle.

The pipeline knows nothing of AMQP: it takes a :class:`~worker.outcome.Delivery` (bytes and a
few properties) and returns an :class:`~worker.outcome.Outcome` (the result to reply with, and
whether to dead-letter the request). A step that cannot go on raises an error of the one tree
(:mod:`worker.errors`), and :func:`~worker.outcome.refused` turns it into the answer. Replying,
acking and dead-lettering belong to the consumer; building the collaborators belongs to ``app``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from worker.boundary.identity import Callers
from worker.boundary.parse import parse
from worker.errors import (
    CacheUnavailable,
    DeadlineExpired,
    InvalidRequest,
    ProviderError,
    RequestIdReused,
    StillInFlight,
    StoreUnavailable,
    StreamBroken,
    WorkerError,
)
from worker.messages import ErrorInfo, LLMRequest, LLMResult, Status
from worker.outcome import AnyRequest, Delivery, Outcome, answer, call_failed, refused
from worker.state.cache import CachedAnswer, CachedEmbedding, ResponseCache
from worker.state.ledger import NANO, BudgetLedger, ClaimingReserve, Reservation
from worker.state.results import ResultStore, fingerprint, request_key, stored_form

if TYPE_CHECKING:  # the LLM brings litellm; the pipeline only calls it
    from worker.boundary.fetch import ImageFetcher
    from worker.chunks import ChunkStream
    from worker.llm import LLM, Completion, Embedded

log = structlog.get_logger("worker.pipeline")

# How long a finished call keeps trying to record its cost in an unreachable ledger. The provider
# has billed it, so a Redis restart (seconds) is waited out, not the charge dropped; the
# reservation outlives the wait (app: reservation TTL = deadline_s + SETTLE_TIMEOUT_S).
SETTLE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class _Served:
    """The request's idempotency key (caller and ``request_id``) and fingerprint, and where the
    pieces of a streamed answer go (None: not streamed)."""

    key: str
    fingerprint: str
    chunks: ChunkStream | None = None


@dataclass(frozen=True)
class PipelineLimits:
    deadline_s: float
    result_ttl_s: int
    max_body_bytes: int
    cache_wait_s: float = 30.0
    settle_timeout_s: float = SETTLE_TIMEOUT_S


class Pipeline:
    def __init__(
        self,
        llm: LLM,
        ledger: BudgetLedger,
        cache: ResponseCache,
        results: ResultStore,
        limits: PipelineLimits,
        callers: Callers,
        images: ImageFetcher | None = None,
    ):
        self.llm, self.ledger, self.cache, self.results = llm, ledger, cache, results
        self.limits, self.callers, self.images = limits, callers, images
        # The ledger reserves in the claim's script only when both live in one Redis.
        self._claims_in_ledger = ledger.redis is results.flight.redis

    async def handle(self, delivery: Delivery) -> Outcome:
        """The answer to ``delivery``. A streamed request (``stream: true``) gets its chunks from
        ``delivery.open_stream``, and the outcome hands them back (``Outcome.chunks``) for the
        consumer to close before the result."""
        started = time.monotonic()
        parsed = self._parse(delivery)
        if isinstance(parsed, Outcome):
            return parsed
        chunks: ChunkStream | None = None
        try:
            user = self.callers.admit(delivery.user_id, parsed, delivery.reply_to, delivery.replay_caller)
            self.ledger.admit(parsed.agent, parsed.task_id)
            if isinstance(parsed, LLMRequest) and parsed.stream:
                if delivery.reply_to is None or delivery.open_stream is None:
                    raise InvalidRequest(
                        "stream",
                        "a streamed answer goes to the request's reply_to, and it has none: set "
                        "reply_to (Direct Reply-To or your reply queue; LLMClient.stream does), or "
                        "leave stream out to get one result on the results exchange",
                    )
                chunks = delivery.open_stream(parsed.request_id)
            outcome = await self._dedupe(parsed, user, started, chunks)
        except WorkerError as exc:
            outcome = refused(parsed, started, exc)
        except BaseException:
            if chunks is not None:  # cancelled (the drain): the redelivery streams again from seq 0
                chunks.abort()
            raise
        outcome.chunks = chunks
        return outcome

    def _parse(self, delivery: Delivery) -> AnyRequest | Outcome:
        allowlist = self.images.allowlist if self.images is not None else None
        return parse(delivery, max_body_bytes=self.limits.max_body_bytes, remote_images=allowlist)

    # -- dedupe ------------------------------------------------------------------------------------

    async def _dedupe(
        self, request: AnyRequest, user: str, started: float, chunks: ChunkStream | None
    ) -> Outcome:
        """The stored answer to this ``request_id``, or the right to produce it (single flight)."""
        deadline = self._deadline(request, started)
        served = _Served(request_key(user, request.agent, request.request_id), fingerprint(request), chunks)
        reserving = await self._claiming_reserve(request, served, deadline)
        claim = await self.results.claim_or_wait(
            served.key,
            served.fingerprint,
            ttl_s=self.limits.deadline_s + 60,
            wait_until=deadline,
            first=reserving,
        )
        if claim.conflict or (claim.found is not None and claim.found.fingerprint != served.fingerprint):
            raise RequestIdReused(request.request_id)
        if claim.found is not None:
            log.info("request.duplicate_answered", request_id=request.request_id)
            return Outcome(claim.found.result, duplicate=True)
        if claim.timed_out:
            raise StillInFlight("the same request_id is still being processed by another worker")
        outcome: Outcome | None = None
        try:
            reserved = reserving.reservation if reserving is not None else None
            outcome = await self._serve_request(request, served, started, deadline, reserved)
            return outcome
        finally:
            if outcome is not None and outcome.stored:
                # A duplicate reads the stored answer before looking at the claim, which expires by
                # itself: no Redis round trip between the answer and its reply.
                self.results.forget(claim)
            else:
                await _quietly(self.results.release(served.key, claim))

    async def _claiming_reserve(
        self, request: AnyRequest, served: _Served, deadline: float
    ) -> ClaimingReserve | None:
        """For a request that goes straight to the provider (no response cache, not expired), its
        budget reservation taken in the claim's own Redis script: one round trip instead of two
        (issue #21). None where the plain claim must come first, as before: a request the cache
        serves, one refused on the way (its refusal then follows the claim, so a stored answer
        still wins), a ledger near ``maxmemory``, a ledger on another Redis than the claims, an
        embedding, and a worker that fetches remote images (the prompt is counted after they are
        inlined)."""
        if not isinstance(request, LLMRequest) or self.images is not None:
            return None
        if not self._claims_in_ledger or self.cache.ttl_s(request) > 0:
            return None
        if request.deadline is not None and deadline <= time.monotonic():
            return None
        try:
            model = self.llm.choose_model(request)
            self.llm.plan(request, model)
            worst = await self._worst_nano(request, model)
            return self.ledger.claiming(served.key, worst, self.ledger.scopes(request.agent, request.task_id))
        except WorkerError:
            return None

    def _deadline(self, request: AnyRequest, started: float) -> float:
        deadline = started + self.limits.deadline_s
        if request.deadline is not None:
            left = (request.deadline - datetime.now(UTC)).total_seconds()
            deadline = min(deadline, started + left)
        return deadline

    # -- serve -------------------------------------------------------------------------------------

    async def _serve_request(
        self,
        request: AnyRequest,
        served: _Served,
        started: float,
        deadline: float,
        reserved: Reservation | None = None,
    ) -> Outcome:
        """The request's own path: a chat completion here (embeddings: worker/embeddings.py).
        ``reserved``: the reservation the claim took (:meth:`_claiming_reserve`), after its checks."""
        assert isinstance(request, LLMRequest)  # _parse gives nothing else
        if reserved is not None:
            return await self._call(
                request, served, self.llm.choose_model(request), started, deadline, cache_key=None, ttl=0,
                reserved=reserved,
            )  # fmt: skip
        return await self._serve(request, served, started, deadline)

    async def _serve(self, request: LLMRequest, served: _Served, started: float, deadline: float) -> Outcome:
        if request.deadline is not None and deadline <= time.monotonic():
            raise DeadlineExpired(
                f"deadline {request.deadline.isoformat()} passed before the request was served"
            )
        model = self.llm.choose_model(request)
        self.llm.plan(request, model)  # a parameter no usable model takes is refused before the cache
        if self.images is not None:
            # Image URLs become data: URIs here: the cache key covers the bytes fetched (a URL's
            # image can change), token counting and litellm never see a URL. The idempotency
            # fingerprint (above) stays the request as sent.
            request = await self.images.inline(request, deadline)
        temperature = (
            request.temperature if request.temperature is not None else self.llm.settings.temperature
        )
        max_tokens = self.llm.max_tokens(request)
        ttl = self.cache.ttl_s(request)
        if ttl <= 0:
            return await self._call(request, served, model, started, deadline, cache_key=None, ttl=0)
        cache_key = self.cache.key(request, model, temperature, max_tokens)
        try:
            claim = await self.cache.claim_or_wait(
                cache_key,
                ttl_s=self.limits.deadline_s + 60,
                wait_until=min(deadline, time.monotonic() + self.limits.cache_wait_s),
            )
        except CacheUnavailable:  # fail open: no cache for this request
            return await self._call(request, served, model, started, deadline, cache_key=None, ttl=0)
        if claim.found is not None:
            return await self._cache_hit(request, served, claim.found, started)
        if not claim.owned:  # the holder is slow: do not wait past cache_wait_s, call ourselves
            return _missed(
                await self._call(request, served, model, started, deadline, cache_key=cache_key, ttl=ttl)
            )
        try:
            return _missed(
                await self._call(request, served, model, started, deadline, cache_key=cache_key, ttl=ttl)
            )
        finally:
            await self.cache.release(cache_key, claim)

    async def _cache_hit(
        self, request: AnyRequest, served: _Served, hit: CachedAnswer | CachedEmbedding, started: float
    ) -> Outcome:
        outcome = answer(request, started, Status.ok, cached=True, **dict(hit))  # content, model, tokens
        try:
            await self.ledger.record_cache_hit(
                served.key,
                request.agent,
                request.task_id,
                hit.model,
                stored_form(outcome.result, served.fingerprint),
                self.limits.result_ttl_s,
            )
        except StoreUnavailable as exc:  # a hit costs nothing: answering it cannot overspend
            log.warning("ledger.cache_hit_not_recorded", request_id=request.request_id, error=str(exc))
        else:
            outcome.stored = True
        return outcome

    async def _call(
        self,
        request: LLMRequest,
        served: _Served,
        model: str,
        started: float,
        deadline: float,
        *,
        cache_key: str | None,
        ttl: int,
        reserved: Reservation | None = None,
    ) -> Outcome:
        try:
            reservation = reserved or await self._reserve(request, served.key, model)
        except WorkerError as exc:  # over budget, or the ledger failed: answered, never called
            return refused(request, started, exc)
        try:
            completion = await self.llm.complete(
                request,
                model,
                deadline,
                batch=request.priority == "batch",
                on_delta=served.chunks.add if served.chunks is not None else None,
            )
        except StreamBroken as exc:  # part of the answer went out: it is charged, and says how far it got
            outcome = self._broken(request, exc, started)
            await asyncio.shield(
                self._settle(reservation, exc.partial, outcome, served.fingerprint, keep=False)
            )
            return outcome
        except ProviderError as exc:
            await _quietly(self.ledger.release(reservation))
            return call_failed(request, started, exc, model)
        except BaseException:
            await _quietly(self.ledger.release(reservation))  # cancelled mid-call: free the budget now
            raise
        outcome = self._completed(request, completion, started)
        # The provider has billed us: record it even if this task is being cancelled.
        await asyncio.shield(self._settle(reservation, completion, outcome, served.fingerprint))
        if cache_key is not None and completion.finish_reason != "length":  # a cut-off answer is not kept
            stored = CachedAnswer.model_validate(
                outcome.result.model_dump(include=set(CachedAnswer.model_fields))
            )
            await self.cache.put(cache_key, stored, ttl)
        return outcome

    async def _reserve(self, request: LLMRequest, key: str, model: str) -> Reservation:
        worst = await self._worst_nano(request, model)
        return await self.ledger.reserve(key, worst, self.ledger.scopes(request.agent, request.task_id))

    async def _worst_nano(self, request: LLMRequest, model: str) -> int:
        """What the call may cost at most (nano-dollars): its prompt, with the margin, and all of
        ``max_tokens``, at the highest price of every model it may fall back to."""
        prompt_tokens = math.ceil(
            await self.llm.prompt_tokens(model, request) * self.ledger.budget.prompt_token_margin
        )
        return self.llm.worst_price(model).worst_nano(prompt_tokens, self.llm.max_tokens(request))

    def _completed(
        self, request: LLMRequest, completion: Completion, started: float, status: Status = Status.ok
    ) -> Outcome:
        outcome = answer(
            request,
            started,
            status,
            content=completion.content,
            finish_reason=completion.finish_reason,
            tool_calls=completion.tool_calls,
            reasoning_content=completion.reasoning_content,
            thinking_blocks=completion.thinking_blocks,
            logprobs=completion.logprobs,
            **charged(completion),
        )
        outcome.provider_latency_ms = completion.provider_latency_ms
        return outcome

    def _broken(self, request: LLMRequest, error: StreamBroken, started: float) -> Outcome:
        """A ``failed`` answer holding what the broken stream wrote, its tokens and its cost."""
        outcome = self._completed(request, error.partial, started, Status.failed)
        assert isinstance(outcome.result, LLMResult)  # a chat answer: embeddings do not stream
        outcome.result.error = ErrorInfo(type=error.kind, message=str(error), retryable=error.retryable)
        outcome.result.finish_reason = None
        outcome.dead_letter = True
        return outcome

    async def _settle(
        self,
        reservation: Reservation,
        completion: Completion | Embedded,
        outcome: Outcome,
        fingerprint: str,
        *,
        keep: bool = True,
    ) -> None:
        """Charge the call and store its answer (unless not ``keep``: a failed one), retrying an
        unreachable ledger for up to ``settle_timeout_s``: the answer waits for its charge (issue #9:
        a Redis restart under load used to leave every call in flight answered, uncharged and its
        reservation held)."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.limits.settle_timeout_s
        delay_s = 0.2
        while True:
            try:
                await self.ledger.settle(
                    reservation,
                    cost_nano=completion.cost_nano,
                    model=completion.model,
                    result_json=stored_form(outcome.result, fingerprint) if keep else "",
                    result_ttl_s=self.limits.result_ttl_s,
                )
                outcome.stored = keep
                return
            except StoreUnavailable:
                if loop.time() + delay_s > give_up_at:
                    break
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 2.0)
        log.error(
            "ledger.settle_failed",
            request_id=reservation.request_id,
            cost_nano_usd=completion.cost_nano,
            note="the answer is sent; its cost is missing from the ledger and its reservation will expire",
        )


def _missed(outcome: Outcome) -> Outcome:
    """Mark an answer that looked in the response cache and did not find it (for metrics)."""
    outcome.cache = outcome.cache or "miss"
    return outcome


def charged(call: Completion | Embedded) -> dict[str, Any]:
    """The result fields of a call that was made and charged: model, tokens, cost, attempts."""
    return {
        "model": call.model,
        "tokens": call.tokens,
        "cost_usd": call.cost_nano / NANO,
        "cost_nano_usd": call.cost_nano,
        "attempts": call.attempts,
        "fallback_used": call.fallback_used,
    }


async def _quietly(step: Awaitable[object]) -> None:
    """Run a clean-up step whose failure must not replace the answer (it expires by itself)."""
    try:
        await step
    except StoreUnavailable as exc:
        log.warning("cleanup.failed", error=str(exc))
