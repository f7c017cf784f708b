"""Trace propagation: the W3C ``traceparent`` header, and OpenTelemetry spans when it is installed.

An agent that sends ``traceparent: 00-<trace-id>-<parent-id>-<flags>`` in a request's AMQP
headers gets its trace continued by the worker: a request without its own ``trace_id`` takes the
header's trace id, the result's ``trace_id`` is that trace id, and the reply carries a
``traceparent`` with the same trace id and the worker's span id (https://www.w3.org/TR/trace-context/).

OpenTelemetry is optional (the ``otel`` extra) and imported lazily, on first use: without it, or
without a tracer provider configured, the worker runs unchanged and pays nothing for spans. With
one, each provider attempt is a span (``chat <model>``, kind CLIENT,
GenAI semantic-convention attributes) whose parent is the agent's span, so the LLM calls appear
inside the agent's trace. Spans never record exception texts: a provider's error may echo a key.

This module imports only the standard library, so :mod:`worker.client` can use it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

HEADER = "traceparent"
STATE_HEADER = "tracestate"

# version-traceid-parentid-flags; a future version may append fields after a dash.
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


def new_span_id() -> str:
    """A W3C parent-id / span id: 16 lowercase hex digits, never all zeros."""
    while (span_id := secrets.token_hex(8)) == "0" * 16:
        pass
    return span_id


@dataclass(frozen=True)
class TraceParent:
    """A parsed ``traceparent``: the trace, the sender's span, and the flags (``01`` = sampled)."""

    trace_id: str
    parent_id: str
    flags: str = "01"

    @classmethod
    def parse(cls, value: object) -> TraceParent | None:
        """The header's value, or None when it is absent or invalid (the spec says: ignore it)."""
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        if not isinstance(value, str):
            return None
        match = _TRACEPARENT.match(value.strip())
        if match is None:
            return None
        version, trace_id, parent_id, flags, rest = match.groups()
        if version == "ff" or (version == "00" and rest) or set(trace_id) == {"0"} or set(parent_id) == {"0"}:
            return None
        return cls(trace_id, parent_id, flags)

    @classmethod
    def from_headers(cls, headers: Mapping[str, Any] | None) -> TraceParent | None:
        return cls.parse((headers or {}).get(HEADER))

    @property
    def sampled(self) -> bool:
        return bool(int(self.flags, 16) & 1)

    def header(self) -> str:
        return f"00-{self.trace_id}-{self.parent_id}-{self.flags}"


# -- the worker's side of one request ----------------------------------------------------------


@dataclass(frozen=True)
class ServerSpan:
    """The worker's place in the trace of the request being handled (set per message task)."""

    incoming: TraceParent | None
    tracestate: str | None = None
    span_id: str = field(default_factory=new_span_id)

    @property
    def flags(self) -> str:
        return self.incoming.flags if self.incoming is not None else "01"

    def parent_for(self, trace_id: str) -> TraceParent:
        """The span a provider call hangs below: the agent's when the trace ids agree, else ours."""
        if self.incoming is not None and self.incoming.trace_id == trace_id:
            return self.incoming
        return TraceParent(trace_id, self.span_id, self.flags)

    def reply_headers(self, trace_id: str | None) -> dict[str, str]:
        """``traceparent`` (and ``tracestate``, passed through) for the reply to this request."""
        trace_id = trace_id or (self.incoming.trace_id if self.incoming is not None else None)
        if trace_id is None:
            return {}
        headers = {HEADER: TraceParent(trace_id, self.span_id, self.flags).header()}
        if self.tracestate:
            headers[STATE_HEADER] = self.tracestate
        return headers


_current: contextvars.ContextVar[ServerSpan | None] = contextvars.ContextVar("llm_worker_span", default=None)


def receive(headers: Mapping[str, Any] | None) -> ServerSpan:
    """Start the worker's span for a message with these AMQP headers; current in this task."""
    state = (headers or {}).get(STATE_HEADER)
    if isinstance(state, bytes):
        state = state.decode("ascii", "replace")
    span = ServerSpan(TraceParent.from_headers(headers), state if isinstance(state, str) else None)
    _current.set(span)
    return span


def current() -> ServerSpan | None:
    return _current.get()


def reply_headers(trace_id: str | None) -> dict[str, str]:
    """The trace headers for the reply to the message this task is handling."""
    span = current()
    return span.reply_headers(trace_id) if span is not None else {}


# -- OpenTelemetry, when installed -------------------------------------------------------------


@functools.cache
def _otel() -> Any:
    """The ``opentelemetry.trace`` module, or None when the ``otel`` extra is not installed."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    return trace


class ProviderSpan:
    """One provider attempt's span; every method is a no-op without OpenTelemetry."""

    def __init__(self, span: Any = None):
        self._span = span

    @property
    def recording(self) -> bool:
        return self._span is not None and bool(self._span.is_recording())

    def answered(self, prompt_tokens: int, completion_tokens: int) -> None:
        if self._span is not None:
            self._span.set_attribute("gen_ai.usage.input_tokens", prompt_tokens)
            self._span.set_attribute("gen_ai.usage.output_tokens", completion_tokens)

    def failed(self, kind: str, status_code: int | None = None) -> None:
        if self._span is None:
            return
        trace = _otel()
        self._span.set_attribute("error.type", kind)
        if status_code is not None:
            self._span.set_attribute("http.response.status_code", status_code)
        self._span.set_status(trace.Status(trace.StatusCode.ERROR, kind))


@contextlib.contextmanager
def provider_span(trace_id: str, *, model: str, attempt: int) -> Iterator[ProviderSpan]:
    """A CLIENT span around one provider call, below the caller's span in trace ``trace_id``."""
    trace = _otel()
    if trace is None or isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        yield ProviderSpan()  # not installed, or no SDK configured: spans would go nowhere
        return
    server = current() or ServerSpan(None)
    parent = server.parent_for(trace_id)
    remote = trace.NonRecordingSpan(
        trace.SpanContext(
            trace_id=int(parent.trace_id, 16),
            span_id=int(parent.parent_id, 16),
            is_remote=True,
            trace_flags=trace.TraceFlags(int(parent.flags, 16)),
        )
    )
    tracer = trace.get_tracer("llm-worker")
    with tracer.start_as_current_span(
        f"chat {model}",
        context=trace.set_span_in_context(remote),
        kind=trace.SpanKind.CLIENT,
        attributes={
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": model,
            "llm_worker.attempt": attempt,
            "llm_worker.worker_span_id": server.span_id,
        },
        record_exception=False,  # exception texts may carry what a provider echoed back
        set_status_on_exception=False,
    ) as span:
        yield ProviderSpan(span)


def client_parent() -> TraceParent | None:
    """The agent's current OpenTelemetry span as a parent, when OpenTelemetry has one."""
    trace = _otel()
    if trace is None:
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return TraceParent(
        f"{context.trace_id:032x}", f"{context.span_id:016x}", f"{int(context.trace_flags):02x}"
    )
