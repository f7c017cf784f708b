"""A streamed answer on its way to the caller: the model's pieces batched by time into ``LLMChunk``s.

The model's reading never waits for the broker: :meth:`ChunkStream.add` only gathers the piece,
and one sender task per stream publishes in order. The first piece goes out at once (time to
first chunk); after each publish the sender gathers for ``interval_s`` (``bus.stream_interval_ms``),
so a fast model sends one message per interval, not one per token; a publish still in flight
also gathers what comes meanwhile. :meth:`ChunkStream.close` sends what is left and says how many
chunks went out, which the final result carries (``LLMResult.chunks``). A chunk that cannot be
published is dropped (the final result holds the whole answer); its ``seq`` is not reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from worker.messages import LLMChunk, LLMResult, ToolCallDelta

log = structlog.get_logger("worker.chunks")

Publish = Callable[[LLMChunk], Awaitable[None]]


@dataclass
class Delta:
    """What the model wrote in one provider chunk (or, merged, in several)."""

    content: str = ""
    reasoning_content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning_content or self.tool_calls)

    def add(self, other: Delta) -> None:
        """Append ``other``: texts joined, a tool call's argument pieces joined while consecutive."""
        self.content += other.content
        self.reasoning_content += other.reasoning_content
        for piece in other.tool_calls:
            last = self.tool_calls[-1] if self.tool_calls else None
            if last is not None and last.index == piece.index and piece.id is None and piece.name is None:
                last.arguments = (last.arguments or "") + (piece.arguments or "")
            else:
                self.tool_calls.append(piece.model_copy())


class ChunkStream:
    """The chunks of one answer. ``opened_at``, ``first_piece_at`` (the model's first piece) and
    ``first_sent_at`` (its chunk published) are monotonic times."""

    def __init__(self, request_id: str, publish: Publish, *, interval_s: float):
        self.request_id, self._publish, self.interval_s = request_id, publish, interval_s
        self._pending = Delta()
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self.sent = 0
        self.dropped = 0
        self.opened_at = time.monotonic()
        self.first_piece_at: float | None = None
        self.first_sent_at: float | None = None

    def add(self, delta: Delta) -> None:
        """Gather ``delta`` for the next chunk (never blocks)."""
        if not delta:
            return
        if self.first_piece_at is None:
            self.first_piece_at = time.monotonic()
        self._pending.add(delta)
        self._wake.set()
        if self._sender is None:
            self._sender = asyncio.ensure_future(self._send_all())

    def add_whole(self, result: LLMResult) -> None:
        """A whole answer (a cache hit, a stored answer) as one piece."""
        calls = [
            ToolCallDelta(index=i, id=call.id, name=call.function.name, arguments=call.function.arguments)
            for i, call in enumerate(result.tool_calls or [])
        ]
        self.add(Delta(result.content or "", result.reasoning_content or "", calls))

    async def close(self, timeout_s: float) -> int:
        """Send what is gathered, wait up to ``timeout_s`` for the sender; the number of chunks sent."""
        self._closing.set()
        self._wake.set()
        if self._sender is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._sender), timeout_s)
            except TimeoutError:
                self._sender.cancel()
                log.warning("stream.close_timed_out", request_id=self.request_id, sent=self.sent)
        return self.sent

    @property
    def first_chunk_s(self) -> float | None:
        """Time to first chunk: from the stream's opening (the request's pickup) to its first publish."""
        return None if self.first_sent_at is None else self.first_sent_at - self.opened_at

    @property
    def first_chunk_lag_s(self) -> float | None:
        """What the worker added to the time to first chunk after the model's first piece."""
        if self.first_sent_at is None or self.first_piece_at is None:
            return None
        return self.first_sent_at - self.first_piece_at

    def abort(self) -> None:
        """Stop sending (the request was cancelled: its redelivery streams again from seq 0)."""
        if self._sender is not None:
            self._sender.cancel()

    async def _send_all(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._pending:
                piece, self._pending = self._pending, Delta()
                await self._send(piece)
            if self._closing.is_set() and not self._pending:
                return
            with contextlib.suppress(TimeoutError):  # gather for interval_s, unless closing
                await asyncio.wait_for(self._closing.wait(), self.interval_s)

    async def _send(self, piece: Delta) -> None:
        seq, self.sent = self.sent, self.sent + 1
        try:
            chunk = LLMChunk(
                request_id=self.request_id,
                seq=seq,
                content=piece.content or None,
                reasoning_content=piece.reasoning_content or None,
                tool_calls=piece.tool_calls or None,
            )
            await self._publish(chunk)
        except Exception as exc:  # noqa: BLE001 - a lost chunk is not a lost answer: the result has it all
            self.dropped += 1
            log.info("stream.chunk_dropped", request_id=self.request_id, seq=seq, error=type(exc).__name__)
            return
        if self.first_sent_at is None:
            self.first_sent_at = time.monotonic()
