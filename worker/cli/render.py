"""What the dead-letter tools print: tables, descriptions and JSON records of dead letters.

Everything in a dead letter was chosen by whoever published it (a request id, an agent name, a
header, a provider's error text), so every string passes through :func:`~worker.text.printable`
before it reaches a terminal: a control character is shown as ``\\x1b``, never acted on, and a
row of a table is one line that no cell can end or overwrite. ``--json`` prints one JSON object
per line instead (:func:`record`), for scripts.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from worker.deadletters import DeadLetter
from worker.text import json_printable, printable


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def columns(rows: Sequence[tuple[str, ...]]) -> list[str]:
    """Rows as aligned columns; every cell made printable first, so each row is one line."""
    cells = [tuple(printable(cell) for cell in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in cells]


def table(letters: list[DeadLetter], now: datetime | None = None) -> list[str]:
    """One line per dead letter: reason, agent, age, replays, request_id."""
    rows = [("reason", "agent", "age", "replays", "request_id")]
    rows += [
        (d.reason, d.agent or "-", format_age(d.age_s(now)), str(d.replays), d.request_id or "-")
        for d in letters
    ]
    return columns(rows)


def describe(letter: DeadLetter, now: datetime | None = None) -> list[str]:
    """Everything an operator needs to decide about one dead letter."""
    m = letter.message
    lines = [
        f"request_id:   {letter.request_id or '-'}",
        f"trace_id:     {letter.trace_id or '-'}",
        f"agent:        {letter.agent or '-'}",
        f"reason:       {letter.reason}",
        f"message:      {letter.detail or '-'}",
        f"dead since:   {letter.dead_at.isoformat() if letter.dead_at else '-'}"
        f" ({format_age(letter.age_s(now))} ago)",
        f"replays:      {letter.replays} (by this tool, counted in Redis)",
        f"deadline:     {letter.deadline.isoformat() if letter.deadline else '-'}"
        f"{' (passed: a replay is answered expired)' if letter.expired(now) else ''}",
        f"validated:    {'yes' if letter.validated else 'no (not a valid request: its ids are claims)'}",
        f"reply_to:     {m.reply_to or '-'}   correlation_id: {m.correlation_id or '-'}",
    ]
    lines = [printable(line) for line in lines]
    lines.append("headers:")
    lines += [f"  {printable(k)}: {printable(_render(v))}" for k, v in sorted(_shown(letter).items())]
    lines += ["body:", *_body(m.body)]
    return lines


def record(letter: DeadLetter, *, full: bool = False, now: datetime | None = None) -> str:
    """One dead letter as one line of JSON (``--json``); ``full`` adds its headers and body."""
    data: dict[str, Any] = {
        "request_id": letter.request_id,
        "agent": letter.agent,
        "reason": letter.reason,
        "age_s": letter.age_s(now),
        "replays": letter.replays,
        "trace_id": letter.trace_id,
        "dead_at": letter.dead_at.isoformat() if letter.dead_at else None,
        "message": letter.detail,
        "validated": letter.validated,
        "deadline": letter.deadline.isoformat() if letter.deadline else None,
    }
    if full:
        data["reply_to"] = letter.message.reply_to
        data["correlation_id"] = letter.message.correlation_id
        data["headers"] = {str(k): _plain(v) for k, v in _shown(letter).items()}
        try:
            data["body"] = json.loads(letter.message.body)
        except (ValueError, RecursionError):
            data["body_base64"] = base64.b64encode(letter.message.body).decode()
    return json.dumps(data, default=str)  # ensure_ascii: no control character survives


def _shown(letter: DeadLetter) -> dict[str, Any]:
    # x-delivery-count here is the dead-letter queue's own, raised by every listing: noise.
    return {k: v for k, v in letter.headers.items() if k != "x-delivery-count"}


def _body(body: bytes) -> list[str]:
    try:
        text = json.dumps(json.loads(body), indent=2, ensure_ascii=False)
    except (ValueError, RecursionError):
        shown = repr(body[:2000])  # a bytes repr is ASCII, every control character escaped
        return [f"  ({len(body)} bytes, not JSON) {shown}{' ...' if len(body) > 2000 else ''}"]
    return [json_printable(line) for line in text.splitlines()]


def _render(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_render(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def _plain(value: Any) -> Any:
    """An AMQP header value as JSON can hold it."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value
