"""Reading a streamed answer from litellm: each piece handed on as it comes, the whole answer at the end.

The whole answer is litellm's own ``stream_chunk_builder`` over the chunks, so the rest of the call
(tokens, price, tool calls, finish reason) reads it as it reads an answer that was not streamed.
Its usage is the provider's final usage: OpenAI-style APIs send it only when asked
(``stream_options.include_usage``, which :data:`STREAM_KWARGS` always sets), Anthropic in
``message_delta``, Gemini on every response (the last one counts).

A stream cut by the network is not an answer. litellm 1.82.6's aiohttp transport ends a stream
whose connection dropped as if it had finished ("Transfer incomplete, but continuing",
``litellm/llms/custom_httpx/aiohttp_transport.py``), and its stream wrapper then makes up a
``finish_reason: stop`` and an estimated usage. :func:`read_stream` refuses such a stream: the
provider never said it finished (no finish reason of its own). For Gemini litellm reports a finish
reason for every response, so a cut Gemini stream is not detected in this release.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import litellm

from worker.chunks import Delta
from worker.errors import ProviderError
from worker.messages import ToolCallDelta

#: What a streamed call adds to the call's keyword arguments.
STREAM_KWARGS: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}


DeltaSink = Callable[[Delta], None]


@dataclass
class StreamProgress:
    """How far one attempt's stream got: the provider chunks read and the pieces handed on."""

    chunks: list[Any] = field(default_factory=list)
    pieces: int = 0
    chars: int = 0

    def describe(self) -> str:
        return f"{self.pieces} piece(s), {self.chars} character(s)"


async def read_stream(
    stream: Any,
    sink: DeltaSink,
    progress: StreamProgress,
    messages: list[dict[str, Any]],
    *,
    networked: bool = True,
) -> Any:
    """Hand each piece of ``stream`` to ``sink`` as it arrives; return the whole answer (a litellm
    ``ModelResponse``). Raises :class:`ProviderError` (``StreamInterrupted``) for a cut stream;
    not ``networked`` (litellm's ``mock_response``, the offline profile): no finish reason to read."""
    async for chunk in stream:
        progress.chunks.append(chunk)
        delta = _delta(chunk)
        if delta:
            progress.pieces += 1
            progress.chars += len(delta.content) + len(delta.reasoning_content)
            progress.chars += sum(len(t.arguments or "") for t in delta.tool_calls)
            sink(delta)
    if networked and _cut(stream):
        raise ProviderError(
            "StreamInterrupted",
            f"the provider's stream ended without finishing (connection cut) after {progress.describe()}",
            retryable=True,
        )
    return assemble(progress, messages)


def assemble(progress: StreamProgress, messages: list[dict[str, Any]]) -> Any:
    """The chunks read so far as one ``ModelResponse`` (usage: the provider's, else litellm's estimate)."""
    return litellm.stream_chunk_builder(progress.chunks, messages=messages)


def _cut(stream: Any) -> bool:
    """The provider never sent a finish reason (see the module docstring)."""
    received = getattr(stream, "received_finish_reason", None)
    intermittent = getattr(stream, "intermittent_finish_reason", None)
    return received is None and intermittent is None and hasattr(stream, "received_finish_reason")


def _delta(chunk: Any) -> Delta:
    choices = getattr(chunk, "choices", None) or []
    delta = getattr(choices[0], "delta", None) if choices else None
    if delta is None:
        return Delta()
    calls = [
        ToolCallDelta(
            index=max(int(getattr(call, "index", 0) or 0), 0),
            id=getattr(call, "id", None),
            name=getattr(getattr(call, "function", None), "name", None),
            arguments=getattr(getattr(call, "function", None), "arguments", None) or None,
        )
        for call in getattr(delta, "tool_calls", None) or []
    ]
    return Delta(
        content=getattr(delta, "content", None) or "",
        reasoning_content=getattr(delta, "reasoning_content", None) or "",
        tool_calls=[c for c in calls if c.id or c.name or c.arguments],
    )
