"""The one bytes-to-str conversion (Redis replies and AMQP header values arrive as either), and
the one way text that others chose reaches a terminal (:func:`printable`)."""

from __future__ import annotations

import re


def as_text(value: object) -> str:
    """``value`` as text: bytes decoded as UTF-8 (undecodable bytes replaced), anything else ``str()``."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


# What a terminal acts on instead of showing: C0 (ESC, CR, BEL...), DEL and C1 (0x80-0x9f, where
# 0x9b is a one-byte CSI), plus the bidirectional overrides and isolates that reorder a line.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")


_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    if named := _NAMED.get(match.group()):
        return named
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(value: object, keep: str = "") -> str:
    """``value`` as text a terminal shows as it is: every control character (and ``\\n``, so
    that one record stays one line) escaped as ``\\x1b``/``\\u202e``; ``keep`` names the ones
    left alone (``"\\n\\t"`` for an answer meant to be read as text)."""
    text = as_text(value)
    if keep:
        return _UNPRINTABLE.sub(lambda m: m.group() if m.group() in keep else _escape(m), text)
    return _UNPRINTABLE.sub(_escape, text)


def json_printable(text: str) -> str:
    """JSON (from ``json.dumps(..., ensure_ascii=False)``) with what ``json.dumps`` leaves raw,
    C1 and the bidirectional controls, escaped as ``\\u....``: still valid JSON, and readable."""
    return _UNPRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
