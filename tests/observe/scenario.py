"""What the observability tests share: W3C trace ids and a set of models whose outcomes differ."""

from __future__ import annotations

from typing import Any

from tests.support.config import deployment

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def scenario_models(base_url: str) -> dict[str, Any]:
    """ok on primary/backup; `broken` answers 500; `toolong` a context-window error -> backup."""
    return {
        "models": [
            deployment("primary", "primary", base_url),
            deployment("backup", "backup", base_url),
            deployment("broken", "e500", base_url),
            deployment("toolong", "ctx", base_url),
        ],
        "context_window_fallbacks": {"toolong": ["backup"]},
        "budget": {
            # 64 max tokens fit; max_tokens=5000 (worst case $0.01) does not.
            "max_cost_per_task": 0.005,
            "max_cost_per_day": 100.0,
            "max_cost_per_agent_day": {"writer": 50.0, "critic": 50.0},
        },
    }
