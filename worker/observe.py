"""Logging set-up: structlog, configured once, JSON in production and readable in a terminal.

Every log line passes through :func:`scrub_secrets`, so a credential that slips into an event
(a URL with a password, an API key in a provider's error text) is redacted before it is written.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from worker.errors import scrub
from worker.settings import redact_url


def scrub_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = scrub(redact_url(value), limit=2000)
    return event


def configure_logging(*, json: bool | None = None, level: str = "info") -> None:
    """JSON lines when not on a terminal (or when ``json`` says so), coloured key=value otherwise."""
    as_json = (not sys.stderr.isatty()) if json is None else json
    renderer: Any = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            scrub_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
