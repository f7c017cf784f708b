"""One request through parse -> dedupe -> expiry -> model -> cache -> reserve -> LLM -> settle.

The pipeline knows nothing of AMQP: it takes a :class:`Delivery` (bytes and a few properties)
and returns an :class:`Outcome` (the result to reply with, and whether to dead-letter the
request). Publishing, acking and dead-lettering belong to ``bus``; building the collaborators
belongs to ``app``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from pydantic import ValidationError
from redis.exceptions import RedisError

from worker.cache import CachedAnswer, CacheUnavailable, ResponseCache
from worker.errors import BudgetExceeded, InvalidRequest, LedgerUnavailable, ProviderError
from worker.ledger import BudgetLedger, Reservation
from worker.llm import LLM, Completion
from worker.messages import ErrorInfo, LLMRequest, LLMResult, Status, Tokens
from worker.results import ResultStore
from worker.tracing import TraceParent

log = structlog.get_logger("worker.pipeline")


@dataclass(frozen=True)
class Delivery:
    """The parts of an incoming message the pipeline reads."""

    body: bytes
    correlation_id: str | None = None
    message_id: str | None = None
    redelivered: bool = False
    trace_parent: TraceParent | None = None  # the W3C traceparent header, when valid


@dataclass
class Outcome:
    """What to answer, and whether the request goes to the dead-letter queue (and why)."""

    result: LLMResult
    dead_letter: bool = False
    provider_latency_ms: float = 0.0
    stored: bool = False  # the answer is in the result store, where a duplicate will find it
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def reason(self) -> str | None:
        return self.result.error.type if self.result.error else None


@dataclass(frozen=True)
class PipelineLimits:
    deadline_s: float
    result_ttl_s: int
    max_body_bytes: int
    cache_wait_s: float = 30.0
    # How long a finished call keeps trying to record its cost in an unreachable ledger. The
    # provider has billed it, so a Redis restart (seconds) is waited out, not the charge dropped;
    # the reservation outlives the wait (app: reservation TTL = deadline_s + settle_timeout_s).
    settle_timeout_s: float = 60.0


class Pipeline:
    def __init__(
        self,
        llm: LLM,
        ledger: BudgetLedger,
        cache: ResponseCache,
        results: ResultStore,
        limits: PipelineLimits,
    ):
        self.llm, self.ledger, self.cache, self.results = llm, ledger, cache, results
        self.limits = limits

    async def handle(self, delivery: Delivery) -> Outcome:
        started = time.monotonic()
        parsed = self.parse(delivery)
        if isinstance(parsed, Outcome):
            return parsed
        request = parsed
        deadline = self._deadline(request, started)
        try:
            claim = await self.results.claim_or_wait(
                request.request_id, ttl_s=self.limits.deadline_s + 60, wait_until=deadline
            )
        except (RedisError, OSError) as exc:
            return _failed(
                request,
                started,
                "LedgerUnavailable",
                f"Redis unreachable ({type(exc).__name__})",
                retryable=True,
            )
        if claim.found is not None:
            log.info("request.duplicate_answered", request_id=request.request_id)
            return Outcome(claim.found, extra={"duplicate": True})
        if claim.timed_out:
            return _failed(
                request,
                started,
                "DeadlineExceeded",
                "the same request_id is still being processed by another worker",
                retryable=True,
            )
        outcome: Outcome | None = None
        try:
            outcome = await self._serve(request, started, deadline)
            return outcome
        finally:
            if outcome is not None and outcome.stored:
                # A duplicate reads the stored answer before looking at the claim, which expires by
                # itself: no Redis round trip between the answer and its reply.
                self.results.forget(claim)
            else:
                await _quietly(self.results.release(request.request_id, claim))

    # -- parse ---------------------------------------------------------------------------------

    def parse(self, delivery: Delivery) -> LLMRequest | Outcome:
        """Validate the body, or an ``invalid`` outcome naming the field and the problem."""
        return _join_trace(self._validate(delivery), delivery.trace_parent)

    def _validate(self, delivery: Delivery) -> LLMRequest | Outcome:
        request_id = delivery.correlation_id or delivery.message_id
        if len(delivery.body) > self.limits.max_body_bytes:
            return _invalid(
                request_id,
                "body",
                f"{len(delivery.body)} bytes exceeds the limit of {self.limits.max_body_bytes}",
            )
        try:
            text = delivery.body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return _invalid(request_id, "body", f"not UTF-8 ({exc.reason} at byte {exc.start})")
        try:
            return LLMRequest.model_validate_json(text)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(p) for p in error["loc"]) or "body"
            problem = "required field is missing" if error["type"] == "missing" else error["msg"]
            if error["type"] == "extra_forbidden":
                problem = "unknown field (not part of LLMRequest schema_version 1)"
            if error["type"] == "json_invalid":
                where, problem = "body", f"not valid JSON ({error['msg']})"
            return _invalid(_request_id_from(text) or request_id, where, problem)

    def _deadline(self, request: LLMRequest, started: float) -> float:
        deadline = started + self.limits.deadline_s
        if request.deadline is not None:
            left = (request.deadline - datetime.now(UTC)).total_seconds()
            deadline = min(deadline, started + left)
        return deadline

    # -- serve ---------------------------------------------------------------------------------

    async def _serve(self, request: LLMRequest, started: float, deadline: float) -> Outcome:
        if request.deadline is not None and deadline <= time.monotonic():
            return _outcome(
                request,
                started,
                Status.expired,
                error=ErrorInfo(
                    type="DeadlineExpired",
                    retryable=False,
                    message=f"deadline {request.deadline.isoformat()} passed before the request was served",
                ),
            )
        try:
            model = self.llm.choose_model(request)
        except InvalidRequest as exc:
            return _invalid(request.request_id, exc.field, exc.problem, request=request)
        temperature = (
            request.temperature if request.temperature is not None else self.llm.settings.temperature
        )
        max_tokens = self.llm.max_tokens(request)
        ttl = self.cache.ttl_s(request)
        if ttl <= 0:
            return await self._call(request, model, started, deadline, cache_key=None, ttl=0)
        cache_key = self.cache.key(request, model, temperature, max_tokens)
        try:
            claim = await self.cache.claim_or_wait(
                cache_key,
                ttl_s=self.limits.deadline_s + 60,
                wait_until=min(deadline, time.monotonic() + self.limits.cache_wait_s),
            )
        except CacheUnavailable:  # fail open: no cache for this request
            return await self._call(request, model, started, deadline, cache_key=None, ttl=0)
        if claim.found is not None:
            return await self._cache_hit(request, claim.found, started)
        if not claim.owned:  # the holder is slow: do not wait past cache_wait_s, call ourselves
            return _missed(await self._call(request, model, started, deadline, cache_key=cache_key, ttl=ttl))
        try:
            return _missed(await self._call(request, model, started, deadline, cache_key=cache_key, ttl=ttl))
        finally:
            await self.cache.release(cache_key, claim)

    async def _cache_hit(self, request: LLMRequest, answer: CachedAnswer, started: float) -> Outcome:
        outcome = _outcome(
            request,
            started,
            Status.ok,
            content=answer.content,
            model=answer.model,
            tokens=answer.tokens,
            cached=True,
        )
        try:
            await self.ledger.record_cache_hit(
                request.request_id,
                request.agent,
                request.task_id,
                answer.model,
                outcome.result.model_dump_json(),
                self.limits.result_ttl_s,
            )
        except LedgerUnavailable as exc:  # a hit costs nothing: answering it cannot overspend
            log.warning("ledger.cache_hit_not_recorded", request_id=request.request_id, error=str(exc))
        else:
            outcome.stored = True
        return outcome

    async def _call(
        self,
        request: LLMRequest,
        model: str,
        started: float,
        deadline: float,
        *,
        cache_key: str | None,
        ttl: int,
    ) -> Outcome:
        try:
            reservation = await self._reserve(request, model)
        except BudgetExceeded as exc:
            return _outcome(
                request,
                started,
                Status.budget_exceeded,
                error=ErrorInfo(type="BudgetExceeded", message=str(exc), retryable=False),
                extra={"scope": exc.scope},
            )
        except LedgerUnavailable as exc:
            return _failed(request, started, "LedgerUnavailable", str(exc), retryable=True)
        try:
            completion = await self.llm.complete(request, model, deadline)
        except ProviderError as exc:
            await _quietly(self.ledger.release(reservation))
            outcome = _failed(request, started, exc.kind, str(exc), retryable=exc.retryable)
            outcome.result.model, outcome.result.attempts = exc.model or model, exc.attempts
            outcome.result.fallback_used = exc.model not in (None, model)
            return outcome
        except BaseException:
            await _quietly(self.ledger.release(reservation))  # cancelled mid-call: free the budget now
            raise
        outcome = self._completed(request, completion, started)
        # The provider has billed us: record it even if this task is being cancelled.
        await asyncio.shield(self._settle(reservation, completion, outcome))
        if cache_key is not None:
            answer = CachedAnswer(
                content=completion.content, model=completion.model, tokens=outcome.result.tokens
            )
            await self.cache.put(cache_key, answer, ttl)
        return outcome

    async def _reserve(self, request: LLMRequest, model: str) -> Reservation:
        price = self.llm.worst_price(model)
        prompt_tokens = self.llm.count_prompt_tokens(model, request)
        worst = prompt_tokens * self.ledger.budget.prompt_token_margin * price.input
        worst += self.llm.max_tokens(request) * price.output
        return await self.ledger.reserve(
            request.request_id, worst, self.ledger.scopes(request.agent, request.task_id)
        )

    def _completed(self, request: LLMRequest, completion: Completion, started: float) -> Outcome:
        tokens = Tokens(
            prompt=completion.prompt_tokens,
            completion=completion.completion_tokens,
            total=completion.prompt_tokens + completion.completion_tokens,
        )
        outcome = _outcome(
            request,
            started,
            Status.ok,
            content=completion.content,
            model=completion.model,
            tokens=tokens,
            cost_usd=completion.cost_usd,
            attempts=completion.attempts,
            fallback_used=completion.fallback_used,
        )
        outcome.provider_latency_ms = completion.provider_latency_ms
        return outcome

    async def _settle(self, reservation: Reservation, completion: Completion, outcome: Outcome) -> None:
        """Charge the call and store its answer, retrying an unreachable ledger for up to
        ``settle_timeout_s``: the answer waits for its charge (issue #9: a Redis restart under
        load used to leave every call in flight answered, uncharged and its reservation held)."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.limits.settle_timeout_s
        delay_s = 0.2
        while True:
            try:
                await self.ledger.settle(
                    reservation,
                    cost_usd=completion.cost_usd,
                    model=completion.model,
                    result_json=outcome.result.model_dump_json(),
                    result_ttl_s=self.limits.result_ttl_s,
                )
                outcome.stored = True
                return
            except LedgerUnavailable:
                if loop.time() + delay_s > give_up_at:
                    break
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 2.0)
        log.error(
            "ledger.settle_failed",
            request_id=reservation.request_id,
            cost_usd=completion.cost_usd,
            note="the answer is sent; its cost is missing from the ledger and its reservation will expire",
        )


def _join_trace(parsed: LLMRequest | Outcome, parent: TraceParent | None) -> LLMRequest | Outcome:
    """A request without a ``trace_id`` of its own joins the trace of its ``traceparent`` header;
    its ids are bound to every log line written while it is handled (issue #7)."""
    if isinstance(parsed, Outcome):
        if parsed.result.trace_id is None and parent is not None:
            parsed.result.trace_id = parent.trace_id
        return parsed
    request = parsed
    if parent is not None and "trace_id" not in request.model_fields_set:
        request = request.model_copy(update={"trace_id": parent.trace_id})
    structlog.contextvars.bind_contextvars(
        request_id=request.request_id, trace_id=request.trace_id, agent=request.agent, task_id=request.task_id
    )
    return request


def _missed(outcome: Outcome) -> Outcome:
    """Mark an answer that looked in the response cache and did not find it (for metrics)."""
    outcome.extra.setdefault("cache", "miss")
    return outcome


def _request_id_from(text: str) -> str | None:
    """Best effort: the request_id of a body that failed validation, to address the reply."""
    import json

    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's JSON decoder goes
        return None
    value = data.get("request_id") if isinstance(data, dict) else None
    return value if isinstance(value, str) and 0 < len(value) <= 128 else None


def _outcome(
    request: LLMRequest | None,
    started: float | None,
    status: Status,
    *,
    extra: dict[str, Any] | None = None,
    **fields: Any,
) -> Outcome:
    latency_ms = (time.monotonic() - started) * 1000 if started is not None else 0.0
    ids = (
        {
            "request_id": request.request_id,
            "trace_id": request.trace_id,
            "agent": request.agent,
            "task_id": request.task_id,
        }
        if request is not None
        else {"request_id": None}
    )
    result = LLMResult(
        status=status, latency_ms=round(latency_ms, 3), finished_at=datetime.now(UTC), **ids, **fields
    )
    return Outcome(result, extra=extra or {})


def _invalid(
    request_id: str | None, where: str, problem: str, *, request: LLMRequest | None = None
) -> Outcome:
    outcome = _outcome(
        request,
        None,
        Status.invalid,
        error=ErrorInfo(type="InvalidRequest", message=f"{where}: {problem}", retryable=False),
    )
    outcome.result.request_id = request_id
    outcome.dead_letter = True
    return outcome


def _failed(request: LLMRequest, started: float, kind: str, message: str, *, retryable: bool) -> Outcome:
    outcome = _outcome(
        request, started, Status.failed, error=ErrorInfo(type=kind, message=message, retryable=retryable)
    )
    outcome.dead_letter = True
    return outcome


async def _quietly(step: Any) -> None:
    """Run a clean-up step whose failure must not replace the answer (it expires by itself)."""
    try:
        await step
    except (RedisError, OSError, LedgerUnavailable) as exc:
        log.warning("cleanup.failed", error=type(exc).__name__)
