"""Anthropic's Messages API, as https://docs.anthropic.com/en/api/messages documents it.

- ``POST {api_base}/v1/messages``; auth by ``x-api-key``; an ``anthropic-version`` header is
  required (``2023-06-01``).
- Body: ``model``, ``max_tokens`` (required), ``messages`` with roles ``user``/``assistant``
  only (the system prompt is the top-level ``system``), ``temperature`` in 0..1.
- Tools: ``tools: [{"name", "description", "input_schema"}]``; a call is a ``{"type": "tool_use",
  "id", "name", "input"}`` content block with ``stop_reason: "tool_use"``, answered by a user
  message holding ``{"type": "tool_result", "tool_use_id", "content"}`` (the id must be a
  ``tool_use`` of the message before, else 400). A cut-off answer: ``"max_tokens"``.
- Extended thinking (``thinking: {"type": "enabled", "budget_tokens"}``, below ``max_tokens``,
  with temperature 1): the answer starts with a signed ``{"type": "thinking", "thinking",
  "signature"}`` block, and an assistant turn that called a tool must come back starting with it.
- Answer: ``{"type": "message", "content": [{"type": "text", ...}], "stop_reason", "usage":
  {"input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"}}``.
- Streaming (``stream: true``, https://docs.anthropic.com/en/docs/build-with-claude/streaming):
  server-sent events ``message_start`` (the message with empty content and the input usage),
  per block ``content_block_start`` / ``content_block_delta`` (``text_delta``, or
  ``input_json_delta`` pieces of a tool call's input) / ``content_block_stop``, ``ping``s, then
  ``message_delta`` (``stop_reason`` and the output usage) and ``message_stop``.
- Errors (https://docs.anthropic.com/en/api/errors): ``{"type": "error", "error": {"type",
  "message"}, "request_id"}``; 429 ``rate_limit_error`` with ``retry-after`` (seconds) and
  ``anthropic-ratelimit-*`` headers, 529 ``overloaded_error``, 500 ``api_error``, 401
  ``authentication_error``, 400 ``invalid_request_error``.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from aiohttp import web

from tests.fakes.base import ProviderFake, Received, pieces, request_id

API_VERSION = "2023-06-01"


class FakeAnthropic(ProviderFake):
    name = "anthropic"
    ERRORS: ClassVar[dict[str, tuple[int, dict[str, str]]]] = {
        "rate_limit": (
            429,
            {
                "retry-after": "0",
                "anthropic-ratelimit-requests-limit": "50",
                "anthropic-ratelimit-requests-remaining": "0",
                "anthropic-ratelimit-requests-reset": "2026-01-01T00:00:00Z",
            },
        ),
        "overloaded": (529, {}),
        "server_error": (500, {}),
        "auth": (401, {}),
    }
    _TYPES: ClassVar[dict[str, tuple[str, str]]] = {
        "rate_limit": (
            "rate_limit_error",
            "This request would exceed the rate limit for your organization of 50 requests per minute. "
            "For details, refer to: https://docs.claude.com/en/api/rate-limits.",
        ),
        "overloaded": ("overloaded_error", "Overloaded"),
        "server_error": ("api_error", "Internal server error"),
        "auth": ("authentication_error", "invalid x-api-key"),
    }

    retry_after_s = 0  # the retry-after header of a 429, in whole seconds as Anthropic sends it
    # Prompt tokens beside input_tokens (Anthropic counts them apart): written to and read from its cache.
    cache_creation_tokens = 0
    cache_read_tokens = 0

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.signatures: list[str] = []  # of the thinking blocks sent: only those may come back

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/messages", self._messages)]

    def error(self, kind: str) -> web.Response:
        response = super().error(kind)
        if kind == "rate_limit":
            response.headers["retry-after"] = str(self.retry_after_s)
        return response

    def authorised(self, received: Received) -> bool:
        return received.headers.get("x-api-key") == self.api_key

    def invalid(self, received: Received) -> str | None:
        body = received.body
        if received.headers.get("anthropic-version") != API_VERSION:
            return "anthropic-version: header is required"
        if not isinstance(body.get("model"), str):
            return "model: Field required"
        if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
            return "max_tokens: Field required"
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "messages: Field required"
        for i, message in enumerate(messages):
            if message.get("role") not in ("user", "assistant"):
                return (
                    f'messages.{i}.role: Unexpected role "{message.get("role")}". The Messages API accepts '
                    'a top-level `system` parameter, not "system" as an input message role.'
                )
        problem = _tool_problem(messages, body.get("tools")) or self._thinking_problem(body)
        if problem is not None:
            return problem
        temperature = body.get("temperature", 1.0)
        if not 0 <= temperature <= 1:
            return "temperature: range: 0..1"
        return None

    def _thinking_problem(self, body: dict[str, Any]) -> str | None:
        """With thinking on: temperature 1 only, a budget below max_tokens, and an assistant turn
        that called a tool must start with the (signed, unaltered) thinking block it came with."""
        if not _thinking(body):
            return None
        if body.get("temperature", 1) != 1:
            return "`temperature` may only be set to 1 when thinking is enabled."
        if not 1024 <= body["thinking"].get("budget_tokens", 0) < body["max_tokens"]:
            return "`max_tokens` must be greater than `thinking.budget_tokens` (at least 1024)."
        for i, message in enumerate(body["messages"]):
            content = message["content"] if isinstance(message["content"], list) else []
            if message["role"] != "assistant" or not any(p.get("type") == "tool_use" for p in content):
                continue
            first = content[0]
            if first.get("type") not in ("thinking", "redacted_thinking"):
                return (
                    f"messages.{i}.content.0.type: Expected `thinking` or `redacted_thinking`, but found "
                    f"`{first.get('type')}`. When `thinking` is enabled, a final `assistant` message must "
                    "start with a thinking block."
                )
            if first.get("signature") not in self.signatures:
                return f"messages.{i}.content.0: Invalid `signature` in `thinking` block"
        return None

    def error_body(self, kind: str, status: int) -> dict[str, Any]:
        error_type, message = self._TYPES[kind]
        return {
            "type": "error",
            "error": {"type": error_type, "message": message},
            "request_id": request_id("req_"),
        }

    def bad_request(self, problem: str) -> web.Response:
        body = {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": problem},
            "request_id": request_id("req_"),
        }
        return web.json_response(body, status=400)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        received, failure = await self.receive(request)
        if failure is not None:
            return failure
        last = received.body["messages"][-1]["content"]
        prompt = last if isinstance(last, str) else " ".join(part.get("text", "") for part in last)
        results = [p for p in last if p.get("type") == "tool_result"] if isinstance(last, list) else []
        tool_result = _text(results[0].get("content")) if results else None
        call = self.calls_tool(bool(received.body.get("tools")), tool_result)
        sent = self.answer_tool_result(tool_result) if tool_result is not None else self.answer(prompt)
        content: list[dict[str, Any]] = [{"type": "text", "text": sent.text}]
        stop = "max_tokens" if self.cut_off else "end_turn"
        if call is not None:
            name, arguments = call
            content = [{"type": "tool_use", "id": request_id("toolu_"), "name": name, "input": arguments}]
            stop = "tool_use"
        if _thinking(received.body):
            signature = request_id("sig_")
            self.signatures.append(signature)
            content = [
                {"type": "thinking", "thinking": "The user wants queues.", "signature": signature},
                *content,
            ]
        payload = {
            "id": request_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": received.body["model"],
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {
                "input_tokens": sent.prompt_tokens,
                "output_tokens": sent.completion_tokens,
                "cache_creation_input_tokens": self.cache_creation_tokens,
                "cache_read_input_tokens": self.cache_read_tokens,
                "service_tier": "standard",
            },
        }
        if received.body.get("stream") is True:
            return await self.sse(request, _events(payload))
        return web.json_response(payload, headers={"request-id": request_id("req_")})


_Event = tuple[str, dict[str, Any], bool]


def _events(payload: dict[str, Any]) -> list[_Event]:
    """``payload`` (a whole message) as the Messages API streams it."""
    usage = payload["usage"]
    start = {**payload, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    events: list[_Event] = [("message_start", {"type": "message_start", "message": start}, False)]
    events.append(("ping", {"type": "ping"}, False))
    for index, block in enumerate(payload["content"]):
        events += _block_events(index, block)
    delta = {"stop_reason": payload["stop_reason"], "stop_sequence": None}
    events.append(
        (
            "message_delta",
            {"type": "message_delta", "delta": delta, "usage": {"output_tokens": usage["output_tokens"]}},
            False,
        )
    )
    events.append(("message_stop", {"type": "message_stop"}, False))
    return events


def _block_events(index: int, block: dict[str, Any]) -> list[_Event]:
    kind = block["type"]
    if kind == "text":
        opening, deltas = (
            {"type": "text", "text": ""},
            [{"type": "text_delta", "text": p} for p in pieces(block["text"])],
        )
    elif kind == "tool_use":
        opening = {**block, "input": {}}
        deltas = [{"type": "input_json_delta", "partial_json": p} for p in pieces(json.dumps(block["input"]))]
    else:  # thinking: the text, then its signature
        opening = {"type": "thinking", "thinking": ""}
        deltas = [{"type": "thinking_delta", "thinking": block["thinking"]}]
        deltas.append({"type": "signature_delta", "signature": block["signature"]})
    return [
        (
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": opening},
            False,
        ),
        *[
            (
                "content_block_delta",
                {"type": "content_block_delta", "index": index, "delta": d},
                kind != "thinking",
            )
            for d in deltas
        ],
        ("content_block_stop", {"type": "content_block_stop", "index": index}, False),
    ]


def _thinking(body: dict[str, Any]) -> bool:
    return isinstance(body.get("thinking"), dict) and body["thinking"].get("type") == "enabled"


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return " ".join(part.get("text", "") for part in content or [])


def _tool_problem(messages: list[dict[str, Any]], tools: Any) -> str | None:
    """What the Messages API refuses of tools: a tool without ``name``/``input_schema``, a
    ``tool_result`` whose ``tool_use_id`` is not a ``tool_use`` of the message just before it."""
    for i, tool in enumerate(tools or []):
        if not isinstance(tool.get("name"), str) or not isinstance(tool.get("input_schema"), dict):
            return f"tools.{i}.custom.input_schema: Field required"
    for i, message in enumerate(messages):
        content = message["content"] if isinstance(message["content"], list) else []
        for part in content:
            if part.get("type") != "tool_result":
                continue
            before = (
                messages[i - 1]["content"] if i > 0 and isinstance(messages[i - 1]["content"], list) else []
            )
            uses = {p.get("id") for p in before if p.get("type") == "tool_use"}
            if part.get("tool_use_id") not in uses:
                return (
                    f"messages.{i}.content.0: unexpected `tool_use_id` found in `tool_result` blocks: "
                    f"{part.get('tool_use_id')}. Each `tool_result` block must have a corresponding "
                    "`tool_use` block in the previous message."
                )
    return None
