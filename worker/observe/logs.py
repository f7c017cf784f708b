"""Logs: structlog configured once for the process, every line scrubbed of secrets.

JSON lines when not on a terminal, key=value otherwise; the standard library's loggers (aio-pika,
aiohttp) go through the same chain. Every line passes through :class:`SecretScrubber`, which
removes the configured secrets by value (API keys, URL passwords: :func:`worker.settings.known_secrets`)
and anything that looks like a credential. Prompts and answers are logged only with
``observe.log_prompts_and_responses``.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import structlog

from worker.messages import EmbeddingResult, LLMResult
from worker.secrets import Redactor
from worker.text import printable


class SecretScrubber:
    """A structlog processor: no credential reaches a log line, however deeply it is nested."""

    def __init__(self, secrets: Iterable[str] = ()):
        self.redactor = Redactor(secrets)
        # Most strings of a line recur from line to line (agent, model, outcome, event): each is
        # scrubbed once, not on every line (issue #21: the scrubbing was half of a line's cost).
        self._recurring = functools.lru_cache(maxsize=4096)(self.redactor.text)

    @property
    def secrets(self) -> list[str]:
        """The values redacted by value (those long enough to be told from ordinary words)."""
        return self.redactor.secrets

    def text(self, value: str, limit: int = 2000) -> str:
        return self.redactor.text(value, limit)

    def clean(self, value: Any, limit: int = 2000) -> Any:
        if type(value) is str:
            short = len(value) <= _RECURRING_CHARS
            return self._recurring(value, limit) if short else self.text(value, limit)
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, Mapping):
            return {str(k): self.clean(v, limit) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.clean(v, limit) for v in value]
        return self.text(value if isinstance(value, str) else str(value), limit)

    def __call__(self, _: Any, __: str, event: Any) -> Any:
        for key, value in event.items():
            event[key] = self.clean(value, 20_000 if key == "exception" else 2000)
        return event


_RECURRING_CHARS = 256  # longer strings (tracebacks, provider errors) are rarely seen twice
_HANDLER_NAME = "llm-worker"


def configure_logging(*, json: bool | None = None, level: str = "info", secrets: Iterable[str] = ()) -> None:
    """Set up logging for the process (once, in ``main``): structlog's and the standard library's.

    JSON lines when not on a terminal (or when ``json`` says so), coloured key=value otherwise.
    ``secrets`` are redacted by value from every line (see :func:`worker.settings.known_secrets`).
    """
    as_json = (not sys.stderr.isatty()) if json is None else json
    renderer: Any = structlog.processors.JSONRenderer() if as_json else _console_renderer()
    scrubber = SecretScrubber(secrets)
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.format_exc_info,  # a traceback becomes text, so it is scrubbed too
            scrubber,
            # Ours, never a secret: added after the scrubbing, which need not read them (issue #21).
            structlog.processors.add_log_level,
            timestamper,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries log through the standard library (aio-pika's reconnect warnings, aiohttp's errors):
    # same format, same scrubbing, warnings and up.
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                timestamper,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                scrubber,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if h.get_name() != _HANDLER_NAME] + [handler]
    root.setLevel(logging.WARNING)


def _console_renderer() -> Any:
    """key=value lines for a terminal: every string printable first (a request id or a
    provider's error text cannot move the cursor or retitle the window, nor start a line that
    looks like another record); JSON lines need no such step, ``json.dumps`` escapes them."""
    console = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())

    def render(logger: Any, name: str, event: Any) -> Any:
        return console(logger, name, {printable(k): _printable(k, v) for k, v in event.items()})

    return render


def _printable(key: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    # A traceback keeps its lines; everything else is one line.
    return printable(value, keep="\n") if key in ("exception", "stack") else printable(value)


def payload_fields(body: bytes, result: LLMResult | EmbeddingResult, *, enabled: bool) -> dict[str, Any]:
    """The prompt and the answer for ``request.done``; nothing unless logging them is ``enabled``."""
    if not enabled:
        return {}
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(result, EmbeddingResult):  # the texts, not the vectors (numbers nobody reads in a log)
        return {"prompt": data.get("input") if isinstance(data, dict) else None}
    return {"prompt": data.get("messages") if isinstance(data, dict) else None, "response": result.content}
