"""Redis key naming that callers' strings cannot collide with.

A key is fixed words joined by ``:`` around parts a caller chose (a ``task_id``, an agent, a
``request_id``). Were a caller's part used as sent, ``task_id: "V:resv"`` would name task ``V``'s
reservation set as its own budget hash (issue #15: ``WRONGTYPE`` for task ``V`` for 30 days).
:func:`part` percent-encodes every character outside ``[A-Za-z0-9._~-]``, so a part never holds
``:`` (the separator), ``{`` or ``}`` (a Redis Cluster hash tag) or a control character, and,
since ``%`` is encoded too, two different values never give the same part.
"""

from __future__ import annotations

from urllib.parse import quote


def part(value: str) -> str:
    """``value`` as one segment of a Redis key: injective, free of ``:``, ``{``, ``}`` and control
    characters (``%`` appears only as the start of an escape)."""
    return quote(value, safe="._-")
