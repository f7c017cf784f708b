"""``LLMClient``: how agents call the LLM service over the bus.

::

    async with LLMClient("amqp://guest:guest@127.0.0.1:5672/") as llm:
        result = await llm.complete([{"role": "user", "content": "Hi"}], agent="writer")
        print(result.content, result.model, result.tokens.total, result.cost_usd, result.trace_id)

Streamed, the answer arrives as it is written (:meth:`LLMClient.stream`)::

    async for item in llm.stream("Write a haiku", agent="writer"):
        if isinstance(item, LLMChunk):
            print(item.content or "", end="", flush=True)
        else:  # the last item: the LLMResult, with tokens and cost
            print(f"\n{item.status} {item.cost_usd}")

One connection, one exclusive reply queue, any number of concurrent calls: a reply resolves the
call whose ``request_id`` it names in both its ``correlation_id`` and its body, and only once it
validates as an ``LLMResult`` (anything else on the reply queue is ignored, and the call goes on
waiting for its answer). One client holds one call per ``request_id`` at a time. Errors are the
client's own (:class:`LLMClientError` and below), never the broker library's. Each request
carries a W3C ``traceparent`` header (the agent's current OpenTelemetry span when it has one), so
the worker continues the agent's trace. This
module imports neither litellm nor redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from pydantic import BaseModel, ValidationError
from yarl import URL

from worker import tracing
from worker.messages import (
    CHUNK_TYPE,
    EMBEDDING_REQUEST_TYPE,
    ChatMessage,
    EmbeddingRequest,
    EmbeddingResult,
    LLMChunk,
    LLMRequest,
    LLMResult,
    Role,
    Status,
    Tool,
)

DEFAULT_TIMEOUT_S = 120.0
# complete() waits this much past the deadline it sends, so that the worker's own answer at the
# deadline (`failed: DeadlineExceeded` or `expired`) reaches the caller instead of a bare timeout.
REPLY_GRACE_S = 2.0
MAX_TIMEOUT_S = 86_400.0  # a day: longer is a mistake (and past a datetime's range, an error)

log = logging.getLogger("worker.client")
_Shape = TypeVar("_Shape", bound=BaseModel)


class LLMClientError(Exception):
    """Base of the client's errors."""


class LLMTimeout(LLMClientError):
    """No reply arrived in time. The request may still be served: call again with the same
    ``request_id`` to get its answer without paying twice."""

    def __init__(self, request_id: str, timeout_s: float):
        self.request_id, self.timeout_s = request_id, timeout_s
        super().__init__(
            f"no reply to request {request_id} within {timeout_s:g}s; retry with the same "
            "request_id to get its answer without a second charge"
        )


class NoWorkerQueue(LLMClientError):
    """The request queue does not exist: no worker has ever started against this broker."""


class InvalidRequest(LLMClientError, ValueError):
    """The request would be refused as it is (a bad agent name, temperature, ``timeout_s``...):
    nothing was sent. The message names each field and the problem, on one line."""


class RequestInFlight(LLMClientError):
    """This client is already waiting for a call with this ``request_id``: await that one (the
    worker answers a ``request_id`` once), or give the new call an id of its own."""


class BrokerUnavailable(LLMClientError):
    """The broker could not be reached, refused the login, or the connection was lost while
    publishing. The request may or may not have been sent: calling again with the same
    ``request_id`` is safe (answered and charged once)."""


def _redacted(url: str) -> str:
    try:
        parsed = URL(url)
    except ValueError:
        return "the configured URL"
    return str(parsed.with_password("***")) if parsed.password else str(parsed)


def _check_timeout(timeout_s: float, name: str = "timeout_s", grace_s: float = 0.0) -> float:
    """``timeout_s`` if it is a number of seconds above 0 and at most a day (plus ``grace_s``)."""
    number = isinstance(timeout_s, int | float) and not isinstance(timeout_s, bool)
    if not number or not math.isfinite(timeout_s) or not 0 < timeout_s <= MAX_TIMEOUT_S + grace_s:
        raise InvalidRequest(
            f"{name}: expected seconds above 0 and at most {MAX_TIMEOUT_S:g}, got {timeout_s!r}"
        )
    return float(timeout_s)


def _one_line(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in error['loc']) or 'request'}: {error['msg']}" for error in exc.errors()
    )


class StructuredAnswerError(LLMClientError):
    """:meth:`LLMClient.complete_as` got no answer of the asked shape; ``result`` is what came back."""

    def __init__(self, message: str, result: LLMResult):
        self.result = result
        super().__init__(message)


def _messages(messages: str | Sequence[ChatMessage | dict[str, Any]]) -> list[ChatMessage]:
    if isinstance(messages, str):
        return [ChatMessage(role=Role.user, content=messages)]
    return [m if isinstance(m, ChatMessage) else ChatMessage.model_validate(m) for m in messages]


def _trace_headers(trace_id: str) -> dict[str, str]:
    """``traceparent`` for a request: the agent's current span as parent when it is in this trace."""
    parent = tracing.client_parent()
    if parent is None or parent.trace_id != trace_id:
        parent = tracing.TraceParent(trace_id, tracing.new_span_id())
    return {tracing.HEADER: parent.header()}


@dataclass
class _Stream:
    """A streamed call waiting for its chunks and result, and the next ``seq`` it wants."""

    items: asyncio.Queue[LLMChunk | LLMResult | LLMClientError] = field(default_factory=asyncio.Queue)
    next_seq: int = 0


class LLMClient:
    """An agent's handle on the LLM service. Use as an async context manager."""

    def __init__(
        self,
        amqp_url: str,
        *,
        request_queue: str = "llm.requests",
        batch_queue: str | None = None,
        default_timeout_s: float = DEFAULT_TIMEOUT_S,
        worker_user: str | Sequence[str] | None = None,
    ):
        """``batch_queue``: where ``priority="batch"`` requests go (default: ``request_queue + ".batch"``,
        the worker's default ``bus.batch_queue``).

        ``worker_user``: the broker user the worker publishes as (``llm-worker`` in the shipped
        definitions), or several. Set, a reply or chunk is taken only when its AMQP ``user_id`` is one;
        RabbitMQ checks ``user_id`` against the publishing connection's user, so another agent
        that learns this client's reply queue cannot slip in an answer. ``None`` takes any valid
        reply naming the request, from whoever can publish into the reply queue."""
        self.amqp_url, self.request_queue = amqp_url, request_queue
        self.worker_user = worker_user
        self._signers = frozenset([worker_user] if isinstance(worker_user, str) else worker_user or [])
        if "" in self._signers:
            raise InvalidRequest("worker_user: a broker user name, not ''")
        self.refused_replies = 0  # replies and chunks dropped for not coming from worker_user
        self.default_timeout_s = _check_timeout(default_timeout_s, "default_timeout_s")
        self.batch_queue = batch_queue or f"{request_queue}.batch"
        self._reply_queue_name = ""
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._expected: dict[str, type[LLMResult] | type[EmbeddingResult]] = {}  # by request_id
        self._streams: dict[str, _Stream] = {}
        self._connection: AbstractRobustConnection | None = None
        self._user_id = ""
        self._channel: AbstractChannel | None = None
        self._reply_queue: AbstractQueue | None = None

    async def __aenter__(self) -> LLMClient:
        try:
            self._connection = await aio_pika.connect_robust(
                self.amqp_url, client_properties={"connection_name": "llm-client"}
            )
            # RabbitMQ checks user_id against this connection's user: the worker's proof of who we are.
            self._user_id = self._connection.url.user or "guest"
            # Named after our user: the worker replies only to a queue its caller owns (callers.yaml).
            self._reply_queue_name = f"llm.reply.{self._user_id}.{uuid.uuid4().hex}"
            self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            # A name of our own (not server-named) so that a reconnect re-declares the same queue
            # and replies to calls made before the reconnect still arrive.
            self._reply_queue = await self._channel.declare_queue(
                self._reply_queue_name, exclusive=True, auto_delete=True, arguments={"x-expires": 3_600_000}
            )
            await self._reply_queue.consume(self._on_reply, no_ack=True)
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as exc:
            if self._connection is not None:
                await self._connection.close()
            fix = "check the URL, and that RabbitMQ is up"
            if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
                fix = "check the user and password in the URL"
            raise BrokerUnavailable(
                f"cannot reach the broker at {_redacted(self.amqp_url)} ({type(exc).__name__}); {fix}"
            ) from None
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for future in self._pending.values():
            future.cancel()
        for stream in self._streams.values():
            stream.items.put_nowait(LLMClientError("the client was closed while this answer was streaming"))
        if self._connection is not None:
            await self._connection.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        request_id = message.correlation_id or ""
        if self._signers and message.user_id not in self._signers:
            self.refused_replies += 1
            signers = " or ".join(map(repr, sorted(self._signers)))
            log.warning(  # what it claimed to be, never its body
                "reply for request %r dropped: published by broker user %r, not the worker's %s",
                request_id[:128], (message.user_id or "")[:128], signers,
            )  # fmt: skip
            return
        stream = self._streams.get(request_id)
        if stream is not None:
            self._on_stream_reply(request_id, stream, message)
            return
        future = self._pending.get(request_id)
        if future is None or future.done() or message.type == CHUNK_TYPE:
            return
        kind = self._expected.get(request_id, LLMResult)
        result: LLMResult | EmbeddingResult | None = (
            _reply_of(EmbeddingResult, request_id, message.body)
            if kind is EmbeddingResult
            else _reply_of(LLMResult, request_id, message.body)
        )
        if result is None:
            return
        del self._pending[request_id]
        self._expected.pop(request_id, None)
        future.set_result(result)

    @staticmethod
    def _on_stream_reply(request_id: str, stream: _Stream, message: AbstractIncomingMessage) -> None:
        """A chunk past the last one seen, or the result; a chunk seen already (a redelivered
        request streams again from seq 0) is dropped."""
        item: LLMChunk | LLMResult | None
        if message.type == CHUNK_TYPE:
            item = _reply_of(LLMChunk, request_id, message.body)
            if item is None or item.seq < stream.next_seq:
                return
            stream.next_seq = item.seq + 1
        else:
            item = _reply_of(LLMResult, request_id, message.body)
            if item is None:
                return
        stream.items.put_nowait(item)

    async def complete(
        self, messages: str | Sequence[ChatMessage | dict[str, Any]], **options: Any
    ) -> LLMResult:
        """Ask for one chat completion and wait for the worker's result (whatever its status).

        Options (keyword arguments) as :meth:`prepare`.
        """
        request, timeout_s = self.prepare(messages, **options)
        return await self.send(request, timeout_s=timeout_s)

    async def stream(
        self, messages: str | Sequence[ChatMessage | dict[str, Any]], **options: Any
    ) -> AsyncIterator[LLMChunk | LLMResult]:
        """Ask for one chat completion, streamed: yield each :class:`LLMChunk` as the worker sends
        it (``content`` to append; ``tool_calls`` pieces to join by ``index``), then the
        :class:`LLMResult` (whatever its status; the whole answer, tokens and cost) as the last item.

        Options (keyword arguments) as :meth:`prepare`. A chunk that was lost on the way (they
        are transient) is skipped; after a worker crash the request is redelivered and streams
        again from ``seq`` 0, and the chunks already seen are dropped. The result's ``content``
        is the answer; a UI that shows the chunks should show the result's text at the end.
        """
        request, timeout_s = self.prepare(messages, stream=True, **options)
        async for item in self.send_stream(request, timeout_s=timeout_s):
            yield item

    def prepare(
        self,
        messages: str | Sequence[ChatMessage | dict[str, Any]],
        *,
        agent: str,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        trace_id: str | None = None,
        task_id: str | None = None,
        use_cache: bool = True,
        cache_ttl: int | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
        priority: Literal["interactive", "batch"] = "interactive",
        tools: Sequence[Tool | dict[str, Any]] | None = None,
        response_format: dict[str, Any] | None = None,
        stream: bool = False,
    ) -> tuple[LLMRequest, float]:
        """The request :meth:`complete` and :meth:`stream` send, and how long to wait for its answer.

        ``tools`` and ``response_format`` take OpenAI's chat-completions form; a model's tool calls
        come back in ``result.tool_calls`` (see :meth:`complete_as` for a parsed structured answer).

        ``timeout_s`` also becomes the request's ``deadline`` (the client waits ``REPLY_GRACE_S``
        longer for the worker's answer at that deadline): a worker that picks it up later
        answers ``expired`` instead of paying for an answer nobody waits for. Without
        ``trace_id``, the request joins the agent's current OpenTelemetry trace, if any.
        """
        timeout_s = _check_timeout(timeout_s) if timeout_s is not None else self.default_timeout_s
        fields: dict[str, Any] = {
            "request_id": request_id or uuid.uuid4().hex,
            "agent": agent,
            "messages": _messages(messages),
            "model": model,
            "temperature": temperature,
            "max_tokens": max_tokens,
            "task_id": task_id,
            "use_cache": use_cache,
            "cache_ttl": cache_ttl,
            "deadline": datetime.now(UTC) + timedelta(seconds=timeout_s),
            "priority": priority,
            "tools": tools,
            "response_format": response_format,
            "stream": stream,
        }
        if trace_id is None and (parent := tracing.client_parent()) is not None:
            trace_id = parent.trace_id
        if trace_id is not None:
            fields["trace_id"] = trace_id
        try:
            request = LLMRequest(**fields)
        except ValidationError as exc:
            raise InvalidRequest(_one_line(exc)) from None
        return request, timeout_s + REPLY_GRACE_S

    async def complete_as(
        self, shape: type[_Shape], messages: str | Sequence[ChatMessage | dict[str, Any]], **options: Any
    ) -> _Shape:
        """Ask for an answer shaped as the pydantic model ``shape`` (its JSON schema is sent as a
        ``json_schema`` response format) and return it parsed; ``options`` as :meth:`complete`.

        Raises :class:`StructuredAnswerError` naming the field when the model's JSON does not fit
        ``shape``, or naming the status when there was no answer.
        """
        name = re.sub(r"[^A-Za-z0-9_-]", "_", shape.__name__)[:64]
        schema = {"name": name, "schema": shape.model_json_schema()}
        result = await self.complete(
            messages, response_format={"type": "json_schema", "json_schema": schema}, **options
        )
        if result.status is not Status.ok:
            kind = result.error.type if result.error else "no error"
            raise StructuredAnswerError(f"no {name} answer: {result.status.value} ({kind})", result)
        try:
            return shape.model_validate_json(result.content or "")
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(part) for part in first["loc"]) or "(the whole answer)"
            raise StructuredAnswerError(
                f"the model's answer does not fit {name}: {field}: {first['msg']}", result
            ) from None

    async def embed(
        self,
        texts: Sequence[str],
        *,
        agent: str,
        model: str | None = None,
        dimensions: int | None = None,
        trace_id: str | None = None,
        task_id: str | None = None,
        use_cache: bool = True,
        cache_ttl: int | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
        priority: Literal["interactive", "batch"] = "interactive",
    ) -> EmbeddingResult:
        """Ask for one vector per text and wait for the worker's result (whatever its status):
        ``result.embeddings[i].embedding`` is the vector of ``texts[i]``, with tokens and cost.

        ``dimensions`` shortens the vectors, for models that can; ``timeout_s``, ``trace_id`` and
        ``request_id`` as :meth:`complete`.
        """
        timeout_s = _check_timeout(timeout_s) if timeout_s is not None else self.default_timeout_s
        if trace_id is None and (parent := tracing.client_parent()) is not None:
            trace_id = parent.trace_id
        fields: dict[str, Any] = {
            "request_id": request_id or uuid.uuid4().hex,
            "agent": agent,
            "input": list(texts) if not isinstance(texts, str) else [texts],
            "model": model,
            "dimensions": dimensions,
            "task_id": task_id,
            "use_cache": use_cache,
            "cache_ttl": cache_ttl,
            "deadline": datetime.now(UTC) + timedelta(seconds=timeout_s),
            "priority": priority,
            **({"trace_id": trace_id} if trace_id is not None else {}),
        }
        try:
            request = EmbeddingRequest(**fields)
        except ValidationError as exc:
            raise InvalidRequest(_one_line(exc)) from None
        return await self.send(request, timeout_s=timeout_s + REPLY_GRACE_S)

    @overload
    async def send(
        self, request: LLMRequest, *, timeout_s: float | None = None, headers: dict[str, Any] | None = None
    ) -> LLMResult: ...

    @overload
    async def send(
        self,
        request: EmbeddingRequest,
        *,
        timeout_s: float | None = None,
        headers: dict[str, Any] | None = None,
    ) -> EmbeddingResult: ...

    async def send(
        self,
        request: LLMRequest | EmbeddingRequest,
        *,
        timeout_s: float | None = None,
        headers: dict[str, Any] | None = None,
    ) -> LLMResult | EmbeddingResult:
        """Publish a prepared request (with confirm) and wait for its result (an
        :class:`EmbeddingResult` for an :class:`EmbeddingRequest`).

        A ``traceparent`` header naming the request's ``trace_id`` is added unless ``headers``
        has one.
        """
        timeout_s = self._waiting(request, timeout_s)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request.request_id] = future
        self._expected[request.request_id] = (
            EmbeddingResult if isinstance(request, EmbeddingRequest) else LLMResult
        )
        try:
            async with _translated(request.request_id, self.request_queue, timeout_s):
                await self._publish(request, timeout_s, headers)
                return await asyncio.wait_for(future, timeout_s)
        finally:
            if self._pending.get(request.request_id) is future:
                del self._pending[request.request_id]
                self._expected.pop(request.request_id, None)

    async def send_stream(
        self, request: LLMRequest, *, timeout_s: float | None = None, headers: dict[str, Any] | None = None
    ) -> AsyncIterator[LLMChunk | LLMResult]:
        """:meth:`send` for a request with ``stream: true``: its chunks, then its result.
        ``timeout_s`` bounds the whole answer, not each chunk."""
        if not request.stream:
            raise InvalidRequest("stream: send_stream takes a request with stream: true (or use send)")
        timeout_s = self._waiting(request, timeout_s)
        stream = _Stream()
        self._streams[request.request_id] = stream
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + timeout_s
        try:
            async with _translated(request.request_id, self.request_queue, timeout_s):
                await self._publish(request, timeout_s, headers)
            while True:
                async with _translated(request.request_id, self.request_queue, timeout_s):
                    item = await asyncio.wait_for(stream.items.get(), max(give_up_at - loop.time(), 0))
                if isinstance(item, LLMClientError):
                    raise item
                yield item
                if isinstance(item, LLMResult):
                    return
        finally:
            if self._streams.get(request.request_id) is stream:
                del self._streams[request.request_id]

    def _waiting(self, request: LLMRequest | EmbeddingRequest, timeout_s: float | None) -> float:
        """The checked wait for ``request``'s answer; refuses a second call of one ``request_id``."""
        if self._channel is None:
            raise LLMClientError("use LLMClient as 'async with LLMClient(url) as llm:'")
        if request.request_id in self._pending or request.request_id in self._streams:
            raise RequestInFlight(
                f"a call with request_id {request.request_id} is already waiting in this client: await "
                "that call, or give this one a request_id of its own"
            )
        # prepare() adds REPLY_GRACE_S to the timeout it checked
        if timeout_s is None:
            return self.default_timeout_s
        return _check_timeout(timeout_s, grace_s=REPLY_GRACE_S)

    async def _publish(
        self, request: LLMRequest | EmbeddingRequest, timeout_s: float, headers: dict[str, Any] | None
    ) -> None:
        assert self._channel is not None
        embedding = isinstance(request, EmbeddingRequest)
        await self._channel.default_exchange.publish(
            aio_pika.Message(
                body=request.model_dump_json(exclude_none=True).encode(),
                content_type="application/json",
                type=EMBEDDING_REQUEST_TYPE if embedding else "LLMRequest.v1",
                correlation_id=request.request_id,
                message_id=request.request_id,
                reply_to=self._reply_queue_name,
                user_id=self._user_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers={**_trace_headers(request.trace_id), **(headers or {})},
            ),
            routing_key=self.batch_queue if request.priority == "batch" else self.request_queue,
            timeout=timeout_s,
        )


_Reply = TypeVar("_Reply", LLMResult, LLMChunk, EmbeddingResult)


def _reply_of(shape: type[_Reply], request_id: str, body: bytes) -> _Reply | None:
    """``body`` as ``shape`` when it is one and names ``request_id``; else None (logged)."""
    try:
        reply = shape.model_validate_json(body)
    except ValidationError as exc:
        log.warning(
            "reply for %r ignored: not an %s (%d error(s))", request_id, shape.__name__, exc.error_count()
        )
        return None
    if reply.request_id != request_id:
        log.warning("reply for %r ignored: its body names another request", request_id)
        return None
    return reply


@contextlib.asynccontextmanager
async def _translated(request_id: str, request_queue: str, timeout_s: float) -> AsyncIterator[None]:
    """The broker library's errors while sending ``request_id`` and waiting, as the client's own."""
    try:
        yield
    except aio_pika.exceptions.PublishError as exc:
        raise NoWorkerQueue(
            f"queue '{request_queue}' does not exist: start a worker "
            "(python -m worker run) before sending requests"
        ) from exc
    except TimeoutError:
        raise LLMTimeout(request_id, timeout_s) from None
    except aiormq.exceptions.DeliveryError as exc:
        raise LLMClientError(f"the broker refused request {request_id}: {exc}") from exc
    except (aiormq.exceptions.AMQPError, aio_pika.exceptions.ChannelInvalidStateError, OSError) as exc:
        raise BrokerUnavailable(
            f"lost the broker while sending request {request_id} ({type(exc).__name__}); "
            "call again with the same request_id once it is back (answered and charged once)"
        ) from None
