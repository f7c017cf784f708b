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


def _retry_after_s(exc: BaseException) -> float | None:
    headers: Any = getattr(exc, "litellm_response_headers", None)
    if headers is None:
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
    if headers is None:
        return None
    try:
        value = headers.get("retry-after")
        return max(0.0, float(value)) if value is not None else None
    except (TypeError, ValueError):
        return None


def from_litellm(exc: BaseException) -> ProviderError:
    """Translate any exception raised by a litellm call into a :class:`ProviderError`."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    status = getattr(exc, "status_code", None)
    status = status if isinstance(status, int) else None
    message = str(getattr(exc, "message", "") or exc) or type(exc).__name__
    for name, kind, retryable in _LITELLM_KINDS:
        if name in names:
            return ProviderError(
                kind, message, retryable=retryable, status_code=status, retry_after_s=_retry_after_s(exc)
            )
    if status is not None:  # APIError and friends: decide by status, as the OpenAI SDK does
        retryable = status in (408, 409, 429) or status >= 500
        return ProviderError(
            "ServerError" if status >= 500 else "ProviderError",
            message,
            retryable=retryable,
            status_code=status,
            retry_after_s=_retry_after_s(exc),
        )
    return ProviderError("ProviderError", f"{type(exc).__name__}: {message}", retryable=False)
