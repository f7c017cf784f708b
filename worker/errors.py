"""The one exception tree, sorted by what the consumer does next.

::

    WorkerError
    ├── ConfigError           start-up stops with one line naming the file and key
    ├── InvalidRequest        reply `invalid`, dead-letter at once (retrying cannot help)
    ├── DeadlineExpired       reply `expired`, no provider call
    ├── BudgetExceeded        reply `budget_exceeded` naming the scope, its limit and spend
    ├── LedgerUnavailable     Redis unreachable: fail closed, reply `failed` (retryable)
    └── ProviderError         the LLM call failed after retries and fallbacks: reply `failed`,
                              dead-letter for replay; ``kind`` and ``retryable`` say why

litellm's exceptions are translated here, once, by :func:`from_litellm` (httpx does the same
with ``map_httpcore_exceptions``). Messages never carry a key or a stack trace: they are built
from the exception's class and status, plus the provider's message with secrets scrubbed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

_SECRETS = re.compile(
    r"(sk-[A-Za-z0-9_-]{6,}|AIza[0-9A-Za-z_-]{10,}|(?i:bearer)\s+[A-Za-z0-9._-]{8,}"
    r"|(?i:api[_-]?key)[\"'=: ]+[A-Za-z0-9._-]{8,}|key=[A-Za-z0-9._-]{8,})"
)


def scrub(text: str, limit: int = 500) -> str:
    """Remove anything that looks like a credential, and bound the length."""
    return _SECRETS.sub("[redacted]", text)[:limit]


class WorkerError(Exception):
    """Base of every error this package raises on purpose."""


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


class LedgerUnavailable(WorkerError):
    """The budget ledger (Redis) cannot be reached; budgeted calls are refused (fail closed)."""


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
        self.kind, self.retryable, self.status_code = kind, retryable, status_code
        self.retry_after_s = retry_after_s
        self.attempts = 0  # set by the caller that gave up: how many provider calls were made
        self.model: str | None = None  # the last model tried
        super().__init__(scrub(message))


# litellm class name -> (our kind, retryable). Order matters: subclasses before bases.
_LITELLM_KINDS: tuple[tuple[str, str, bool], ...] = (
    # The Router cooled every deployment of the group down (after a 401/404, or repeated failures):
    # try later or elsewhere. Its cooldown_time becomes the wait hint.
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


def from_litellm(exc: BaseException, *, redact: Callable[[str], str] | None = None) -> ProviderError:
    """Translate any exception raised by a litellm call into a :class:`ProviderError`.

    litellm's class decides the kind; where litellm had no rule and fell back to its catch-all
    (``APIConnectionError`` over an HTTP answer) or to a bare ``APIError``, the provider's HTTP
    status decides instead. ``status_code`` is the provider's own status where it is known.
    """
    names = {cls.__name__ for cls in type(exc).__mro__}
    status = getattr(exc, "status_code", None)
    status = status if isinstance(status, int) else None
    message = str(getattr(exc, "message", "") or exc) or type(exc).__name__
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
