"""``LLMClient``: how agents call the LLM service over the bus.

::

    async with LLMClient("amqp://guest:guest@127.0.0.1:5672/") as llm:
        result = await llm.complete([{"role": "user", "content": "Hi"}], agent="writer")
        print(result.content, result.model, result.tokens.total, result.cost_usd, result.trace_id)

One connection, one exclusive reply queue, any number of concurrent calls: replies are matched
to calls by ``correlation_id``. Each request carries a W3C ``traceparent`` header (the agent's
current OpenTelemetry span when it has one), so the worker continues the agent's trace. This
module imports neither litellm nor redis.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from worker import tracing
from worker.messages import ChatMessage, LLMRequest, LLMResult, Role

DEFAULT_TIMEOUT_S = 120.0
# complete() waits this much past the deadline it sends, so that the worker's own answer at the
# deadline (`failed: DeadlineExceeded` or `expired`) reaches the caller instead of a bare timeout.
REPLY_GRACE_S = 2.0


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


class LLMClient:
    """An agent's handle on the LLM service. Use as an async context manager."""

    def __init__(
        self,
        amqp_url: str,
        *,
        request_queue: str = "llm.requests",
        default_timeout_s: float = DEFAULT_TIMEOUT_S,
    ):
        self.amqp_url, self.request_queue, self.default_timeout_s = amqp_url, request_queue, default_timeout_s
        self._reply_queue_name = f"llm.reply.{uuid.uuid4().hex}"
        self._pending: dict[str, asyncio.Future[LLMResult]] = {}
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._reply_queue: AbstractQueue | None = None

    async def __aenter__(self) -> LLMClient:
        self._connection = await aio_pika.connect_robust(
            self.amqp_url, client_properties={"connection_name": "llm-client"}
        )
        self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        # A name of our own (not server-named) so that a reconnect re-declares the same queue
        # and replies to calls made before the reconnect still arrive.
        self._reply_queue = await self._channel.declare_queue(
            self._reply_queue_name, exclusive=True, auto_delete=True, arguments={"x-expires": 3_600_000}
        )
        await self._reply_queue.consume(self._on_reply, no_ack=True)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for future in self._pending.values():
            future.cancel()
        if self._connection is not None:
            await self._connection.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(LLMResult.model_validate_json(message.body))

    async def complete(
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
    ) -> LLMResult:
        """Ask for one chat completion and wait for the worker's result (whatever its status).

        ``timeout_s`` also becomes the request's ``deadline`` (the client waits ``REPLY_GRACE_S``
        longer for the worker's answer at that deadline): a worker that picks it up later
        answers ``expired`` instead of paying for an answer nobody waits for. Without
        ``trace_id``, the request joins the agent's current OpenTelemetry trace, if any.
        """
        timeout_s = timeout_s if timeout_s is not None else self.default_timeout_s
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
        }
        if trace_id is None and (parent := tracing.client_parent()) is not None:
            trace_id = parent.trace_id
        if trace_id is not None:
            fields["trace_id"] = trace_id
        return await self.send(LLMRequest(**fields), timeout_s=timeout_s + REPLY_GRACE_S)

    async def send(
        self, request: LLMRequest, *, timeout_s: float | None = None, headers: dict[str, Any] | None = None
    ) -> LLMResult:
        """Publish a prepared request (with confirm) and wait for its result.

        A ``traceparent`` header naming the request's ``trace_id`` is added unless ``headers``
        has one.
        """
        if self._channel is None:
            raise LLMClientError("use LLMClient as 'async with LLMClient(url) as llm:'")
        timeout_s = timeout_s if timeout_s is not None else self.default_timeout_s
        future: asyncio.Future[LLMResult] = asyncio.get_running_loop().create_future()
        self._pending[request.request_id] = future
        try:
            await self._channel.default_exchange.publish(
                aio_pika.Message(
                    body=request.model_dump_json(exclude_none=True).encode(),
                    content_type="application/json",
                    type="LLMRequest.v1",
                    correlation_id=request.request_id,
                    message_id=request.request_id,
                    reply_to=self._reply_queue_name,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    headers={**_trace_headers(request.trace_id), **(headers or {})},
                ),
                routing_key=self.request_queue,
                timeout=timeout_s,
            )
            return await asyncio.wait_for(future, timeout_s)
        except aio_pika.exceptions.PublishError as exc:
            raise NoWorkerQueue(
                f"queue '{self.request_queue}' does not exist: start a worker "
                "(python -m worker run) before sending requests"
            ) from exc
        except TimeoutError:
            raise LLMTimeout(request.request_id, timeout_s) from None
        except aiormq.exceptions.DeliveryError as exc:
            raise LLMClientError(f"the broker refused request {request.request_id}: {exc}") from exc
        finally:
            self._pending.pop(request.request_id, None)
