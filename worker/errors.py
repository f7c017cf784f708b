"""The one exception tree, sorted by what the consumer does next.

::

    WorkerError
    ├── ConfigError            start-up stops with one line naming the file and key
    ├── InvalidRequest         reply `invalid`, dead-letter at once (retrying cannot help)
    ├── DeadlineExpired        reply `expired`, no provider call
    ├── StillInFlight          another worker holds the same request_id past our deadline:
    │                          reply `failed` (retryable), dead-letter
    ├── BudgetExceeded         reply `budget_exceeded` naming the scope, its limit and spend
    ├── RequestIdReused        the caller sent another request under a request_id it had used:
    │                          reply `conflict`, never the other request's answer
    ├── Forbidden              no user_id, or its broker user may not act as the agent or name
    │   │                      the model: reply `forbidden`, nothing claimed, charged or sent
    │   └── ReplyToRefused     reply_to names a queue its caller does not own: no reply at all,
    │                          dead-letter with the reason
    ├── StoreUnavailable       Redis did not answer or refused the step (state/redis.py maps
    │   │                      every redis-py error here, once)
    │   ├── LedgerUnavailable  budgets, results, claims: fail closed, reply `failed` (retryable)
    │   │   └── LedgerFull     its Redis is near maxmemory: new calls refused until memory is freed
    │   └── CacheUnavailable   the response cache: fail open, the request goes on without it
    ├── ProviderError          the LLM call failed after retries and fallbacks: reply `failed`,
    │   │                      dead-letter for replay; ``kind`` and ``retryable`` say why
    │   └── StreamBroken       a streamed answer failed after its first chunk: no retry, no
    │                          fallback; reply `failed` with what it wrote, charged for that
    ├── BrokerUnreachable      a tool (dlq) could not connect to RabbitMQ: one line naming the URL
    └── DeadLetterError        the dead-letter queue could not be read or a replay published

Each error that ends a request carries what its answer says: ``kind`` (the stable name in
``ErrorInfo.type``) and ``retryable``; :mod:`worker.outcome` turns one into a result.
litellm's exceptions are translated here, once, by :func:`from_litellm` (httpx does the same
with ``map_httpcore_exceptions``). Messages never carry a key or a stack trace: they are built
from the exception's class and status, plus the provider's message with secrets scrubbed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from worker.secrets import scrub

if TYPE_CHECKING:
    from worker.llm import Completion


class WorkerError(Exception):
    """Base of every error this package raises on purpose."""

    retryable = False

    @property
    def kind(self) -> str:
        """The stable name an answer carries in ``ErrorInfo.type``."""
        return type(self).__name__


class ConfigError(WorkerError):
    """A configuration file is missing, malformed or inconsistent."""

    def __init__(self, file: str, key: str, problem: str):
        self.file, self.key, self.problem = file, key, problem
        super().__init__(f"{file}: {key}: {problem}")


class InvalidRequest(WorkerError):
    """The request cannot be served as sent; ``field`` names what to fix."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{field}: {problem}" if field else problem)


class DeadlineExpired(WorkerError):
    """The request's deadline passed before a provider was called."""


class StillInFlight(WorkerError):
    """Another worker is still producing the answer to this ``request_id``; ours is not wanted."""

    retryable = True

    @property
    def kind(self) -> str:
        return "DeadlineExceeded"  # the name answers have carried since 0.1.0


class BudgetExceeded(WorkerError):
    """Reserving this request's worst-case cost would take a budget scope over its limit."""

    def __init__(
        self, scope: str, limit_usd: float, spent_usd: float, reserved_usd: float, needed_usd: float
    ):
        self.scope, self.limit_usd, self.spent_usd = scope, limit_usd, spent_usd
        self.reserved_usd, self.needed_usd = reserved_usd, needed_usd
        super().__init__(
            f"budget {scope} would be exceeded: limit ${limit_usd:.6f}, spent ${spent_usd:.6f}, "
            f"reserved ${reserved_usd:.6f}, this request needs up to ${needed_usd:.6f}"
        )


class RequestIdReused(WorkerError):
    """This caller already used this ``request_id`` for a request that differs from this one."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        super().__init__(
            f"request_id {request_id} was already used by this caller for a different request "
            "(agent, task, model, messages or parameters differ): send it with a new request_id"
        )


class Forbidden(WorkerError):
    """The publisher's broker user may not make this request (``boundary/identity.py``)."""


class ReplyToRefused(Forbidden):
    """``reply_to`` names a queue that is not the caller's: nothing is published there."""


class StoreUnavailable(WorkerError):
    """Redis did not answer, or refused a step (out of memory, read-only replica, wrong type)."""

    retryable = True


class LedgerUnavailable(StoreUnavailable):
    """The ledger's Redis (budgets, results, claims) failed a step; budgeted calls are refused
    (fail closed)."""


class LedgerFull(LedgerUnavailable):
    """The ledger's Redis is near ``maxmemory``: new calls are refused, so that calls in flight
    can still be charged, until memory is freed (:mod:`worker.state.memory`)."""


class CacheUnavailable(StoreUnavailable):
    """The cache's Redis failed a step; the request goes on without the cache (fail open)."""


class BrokerUnreachable(WorkerError):
    """A connection to RabbitMQ could not be opened; the message names the (redacted) URL."""


class DeadLetterError(WorkerError):
    """The dead-letter queue could not be read or a replay could not be published."""


class ProviderError(WorkerError):
    """An LLM call failed. ``kind`` is a stable name; ``retryable`` says whether trying later may help."""

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        retryable: bool,
        status_code: int | None = None,
        retry_after_s: float | None = None,
    ):
        self._kind, self.retryable, self.status_code = kind, retryable, status_code
        self.retry_after_s = retry_after_s
        self.attempts = 0  # set by the caller that gave up: how many provider calls were made
        self.model: str | None = None  # the last model tried
        self.billed_nano = 0  # what the provider charged for an answer that could not be used
        super().__init__(scrub(message))

    @property
    def kind(self) -> str:
        return self._kind


class StreamBroken(ProviderError):
    """A streamed answer failed after its first piece went out: it is not retried nor continued by
    another model (the caller has part of this model's answer). ``partial`` is what was written,
    priced at the provider's usage if it sent one, else at an estimate of the text (issue #18)."""

    def __init__(self, error: ProviderError, partial: Completion, how_far: str):
        super().__init__(
            error.kind,
            f"the answer broke off after {how_far} from {partial.model}: {error}",
            retryable=error.retryable,
            status_code=error.status_code,
        )
        self.partial = partial


# litellm class name -> (our kind, retryable). Order matters: subclasses before bases.
_LITELLM_KINDS: tuple[tuple[str, str, bool], ...] = (
    # litellm's Router cooled every deployment of the group down (worker.routing raises its own
    # NoHealthyDeployment now; kept for a Router in front of litellm, e.g. a proxy's): try later.
    ("RouterRateLimitError", "NoHealthyDeployment", True),
    ("RouterRateLimitErrorBasic", "NoHealthyDeployment", True),
    ("ContextWindowExceededError", "ContextWindowExceeded", False),
    ("ContentPolicyViolationError", "ContentPolicyViolation", False),
    ("RateLimitError", "RateLimited", True),
    ("Timeout", "Timeout", True),
    ("APIConnectionError", "ConnectionError", True),
    ("ServiceUnavailableError", "ServiceUnavailable", True),
    ("BadGatewayError", "ServerError", True),
    ("InternalServerError", "ServerError", True),
    ("AuthenticationError", "AuthenticationFailed", False),
    ("PermissionDeniedError", "PermissionDenied", False),
    ("NotFoundError", "NotFound", False),
    ("UnprocessableEntityError", "BadRequest", False),
    ("UnsupportedParamsError", "BadRequest", False),
    ("BadRequestError", "BadRequest", False),
)


# A 429 that waiting does not cure: the account is out of credit (OpenAI's error code
# `insufficient_quota`). Retrying it only burns the deadline. Matched on the code, not on the
# text "exceeded your current quota", which Gemini also uses for its per-minute limits.
_NO_RETRY_CODES = frozenset({"insufficient_quota"})


def _error_codes(*errors: BaseException | None) -> set[str]:
    """The provider's error ``code``/``type`` values, from the exception or its parsed body."""
    codes: set[str] = set()
    for error in errors:
        body = getattr(error, "body", None)
        details = body.get("error", body) if isinstance(body, dict) else {}
        for value in (getattr(error, "code", None), *(details.get(k) for k in ("code", "type"))):
            if isinstance(value, str):
                codes.add(value)
    return codes


def _retry_after_s(exc: BaseException, message: str = "") -> float | None:
    """The provider's wait hint in seconds: a ``Retry-After`` header, else Gemini's ``RetryInfo``.

    Gemini sends no header; its 429 body carries ``{"@type": ".../google.rpc.RetryInfo",
    "retryDelay": "7s"}`` (https://ai.google.dev/gemini-api/docs/rate-limits), which litellm
    leaves in the message.
    """
    cooldown = getattr(exc, "cooldown_time", None)
    if isinstance(cooldown, int | float):
        return float(cooldown)
    headers: Any = getattr(exc, "litellm_response_headers", None)
    if headers is None:
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
    value = headers.get("retry-after") if headers is not None else None
    if value is None and (delay := _RETRY_DELAY.search(message)):
        value = delay.group(1)
    try:
        return max(0.0, float(value)) if value is not None else None
    except (TypeError, ValueError):
        return None


def _provider_answer(exc: BaseException) -> BaseException | None:
    """The provider's own HTTP error under litellm's exception, if it kept one in the chain.

    litellm raises its catch-all ``APIConnectionError`` for answers it has no rule for (Cohere's
    429 in 1.82.6), and reports Anthropic's 529 as a 500: the provider's exception, with the
    real status and headers, is still the ``__cause__``/``__context__`` below it.
    """
    seen: set[int] = set()
    cause = exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        status = getattr(cause, "status_code", None)
        if isinstance(status, int) and 200 <= status <= 599:
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def _by_status(status: int) -> tuple[str, bool]:
    """(kind, retryable) for an HTTP status, as the OpenAI SDK decides retries."""
    if status < 400:  # a 2xx carrying a failed run (Perplexity's status "failed"): the provider's fault
        return "ServerError", True
    if status == 429:
        return "RateLimited", True
    if status in (408, 504):
        return "Timeout", True
    if status >= 500:
        return ("ServiceUnavailable" if status == 503 else "ServerError"), True
    return _CLIENT_KINDS.get(status, ("ProviderError", status == 409))


_CLIENT_KINDS: dict[int, tuple[str, bool]] = {
    400: ("BadRequest", False),
    401: ("AuthenticationFailed", False),
    403: ("PermissionDenied", False),
    404: ("NotFound", False),
    422: ("BadRequest", False),
}
_RETRY_DELAY = re.compile(r'"retryDelay":\s*"(\d+(?:\.\d+)?)s"')


# Where litellm starts appending what is not the provider's message: the whole prompt (Anthropic's
# "Received Messages=[...]"), a Python traceback (its catch-all APIConnectionError), the Router's
# model groups; and the class names it puts first ("litellm.RateLimitError: RateLimitError:
# OpenAIException - "), which the answer's kind already says.
_NOT_THE_PROVIDERS = re.compile(
    r"\s*(?:\|\s*)?(?:Received Messages=|Traceback \(most recent call last\)|Received Model Group=)"
)
_LITELLM_PREFIX = re.compile(r"^litellm\.\w+:\s*(?:\w+Error:\s*)?(?:\w+Exception\s*-\s*)?")
_STACK_FRAME = re.compile(r'^\s*File "[^"]*", line \d+.*$', re.MULTILINE)


def provider_message(text: str) -> str:
    """The provider's own error message out of litellm's text: no prompt, no traceback, one line."""
    cut = _NOT_THE_PROVIDERS.search(text)
    if cut is not None:
        text = text[: cut.start()]
    text = _LITELLM_PREFIX.sub("", _STACK_FRAME.sub("", text).strip())
    return " ".join(text.split())


def from_litellm(exc: BaseException, *, redact: Callable[[str], str] | None = None) -> ProviderError:
    """Translate any exception raised by a litellm call into a :class:`ProviderError`.

    litellm's class decides the kind; where litellm had no rule and fell back to its catch-all
    (``APIConnectionError`` over an HTTP answer) or to a bare ``APIError``, the provider's HTTP
    status decides instead. ``status_code`` is the provider's own status where it is known.
    """
    names = {cls.__name__ for cls in type(exc).__mro__}
    status = getattr(exc, "status_code", None)
    status = status if isinstance(status, int) else None
    message = provider_message(str(getattr(exc, "message", "") or exc)) or type(exc).__name__
    if redact is not None:  # the worker's own keys, by value: a provider may echo the key it got
        message = redact(message)
    answer = _provider_answer(exc)
    if answer is not None:
        status = getattr(answer, "status_code", status)
    if status == 429 and _error_codes(exc, answer) & _NO_RETRY_CODES:
        return ProviderError("QuotaExhausted", message, retryable=False, status_code=status)
    retry_after = _retry_after_s(answer if answer is not None else exc, message)
    if retry_after is None and answer is not None:
        retry_after = _retry_after_s(exc, message)
    for name, kind, retryable in _LITELLM_KINDS:
        if name in names:
            if kind == "ConnectionError" and answer is not None and status is not None:
                break  # not a connection error: the provider answered, and litellm had no rule for it
            return ProviderError(
                kind, message, retryable=retryable, status_code=status, retry_after_s=retry_after
            )
    if status is not None:
        kind, retryable = _by_status(status)
        return ProviderError(
            kind, message, retryable=retryable, status_code=status, retry_after_s=retry_after
        )
    return ProviderError("ProviderError", f"{type(exc).__name__}: {message}", retryable=False)
