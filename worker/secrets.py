"""Keeping credentials out of everything that leaves the process: replies, dead letters, logs.

:class:`Redactor` removes the worker's own secrets by value (every key and URL password it holds,
literal or referenced: :func:`worker.settings.known_secrets` collects them), URL passwords, and
anything shaped like a credential (:func:`scrub`). The error translation (``llm``), the log chain
(``observe.logs``) and the dead-letter headers all use one redactor built once by ``app``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_SECRETS = re.compile(
    r"(sk-[A-Za-z0-9_-]{6,}|AIza[0-9A-Za-z_-]{10,}|(?i:bearer)\s+[A-Za-z0-9._-]{8,}"
    r"|(?i:api[_-]?key)[\"'=: ]+[A-Za-z0-9._-]{8,}|key=[A-Za-z0-9._-]{8,})"
)
# The password runs to the *last* "@" of the URL: an unescaped "@" in it (p@ss) left "ss" behind.
_URL_PASSWORD = re.compile(r"://([^:/@\s]*):[^\s;,]*@")
MIN_SECRET_CHARS = 6  # a shorter value would redact ordinary words


def scrub(text: str, limit: int = 500) -> str:
    """Remove anything that looks like a credential, and bound the length."""
    return _SECRETS.sub("[redacted]", text)[:limit]


def redact_url(url: str) -> str:
    """``amqp://user:secret@host/`` -> ``amqp://user:***@host/``, for logs."""
    return _URL_PASSWORD.sub(r"://\1:***@", url)


class Redactor:
    """Removes known secret values (longest first, so a key containing another goes whole),
    URL passwords and credential-shaped strings from text."""

    def __init__(self, secrets: Iterable[str] = ()):
        self.secrets = sorted({s for s in secrets if len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True)

    def values(self, text: str) -> str:
        """Only the known values: cheap enough for every provider error."""
        for secret in self.secrets:
            text = text.replace(secret, "[redacted]")
        return text

    def text(self, text: str, limit: int = 2000) -> str:
        return scrub(redact_url(self.values(text)), limit=limit)
