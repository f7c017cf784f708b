"""Cohere's Chat API v2, as https://docs.cohere.com/reference/chat documents it.

- ``POST /v2/chat``; auth by ``Authorization: Bearer <key>``.
- Body: ``model`` and ``messages`` (roles ``system``/``user``/``assistant``/``tool``) are
  required; the v1 fields ``message``/``chat_history``/``preamble`` do not exist in v2.
- Tools: ``tools: [{"type": "function", "function": {"name", "parameters"}}]``; a call comes back
  as ``message.tool_calls`` (with a ``tool_plan``) and ``finish_reason: "TOOL_CALL"``, answered by a
  ``tool`` message whose ``tool_call_id`` names it. A cut-off answer: ``MAX_TOKENS``.
- Answer: ``{"id", "finish_reason": "COMPLETE", "message": {"role": "assistant", "content":
  [{"type": "text", "text"}]}, "usage": {"billed_units": {"input_tokens", "output_tokens"},
  "tokens": {"input_tokens", "output_tokens"}}}``. ``billed_units`` is what Cohere charges;
  ``tokens`` counts the whole prompt the model saw (its template included), so it is larger.
- Errors (https://docs.cohere.com/reference/errors): ``{"message": string}``; 429 when past the
  rate limit, 401 ``invalid api token``, 500 internal server error. The error reference lists no
  overload status, so this fake has no ``overloaded`` kind.

litellm sends a configured ``api_base`` as the complete URL for Cohere (it appends nothing), so
the fake's ``api_base`` is ``{root}/v2/chat``.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from aiohttp import web

from tests.fakes.base import ProviderFake, Received, request_id


class FakeCohere(ProviderFake):
    name = "cohere"
    ERRORS: ClassVar[dict[str, tuple[int, dict[str, str]]]] = {
        "rate_limit": (429, {}),
        "server_error": (500, {}),
        "auth": (401, {}),
    }
    _MESSAGES: ClassVar[dict[str, str]] = {
        "rate_limit": "You are past the per minute request limit, please wait and try again later.",
        "server_error": "internal server error, this has been reported to our developers.",
        "auth": "invalid api token",
    }

    def __init__(self, *, billed_input_tokens: int = 4, **kwargs: Any):
        super().__init__(**kwargs)
        self.billed_input_tokens = billed_input_tokens

    @property
    def api_base(self) -> str:
        return f"{self.root}/v2/chat"

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v2/chat", self._chat)]

    def authorised(self, received: Received) -> bool:
        return received.headers.get("Authorization") == f"Bearer {self.api_key}"

    def invalid(self, received: Received) -> str | None:
        body = received.body
        for v1_field in ("message", "chat_history", "preamble"):
            if v1_field in body:
                return f"invalid request: {v1_field} is not a valid field in the v2 API; use messages"
        if not isinstance(body.get("model"), str):
            return "invalid request: model is required"
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "invalid request: messages must not be empty"
        if any(m.get("role") not in ("system", "user", "assistant", "tool") for m in messages):
            return "invalid request: role must be one of system, user, assistant, tool"
        called = {c.get("id") for m in messages for c in m.get("tool_calls") or []}
        if any(m["role"] == "tool" and m.get("tool_call_id") not in called for m in messages):
            return "invalid request: tool message's tool_call_id does not match any tool call"
        for tool in body.get("tools") or []:
            if tool.get("type") != "function" or "name" not in tool.get("function", {}):
                return "invalid request: tools must be of type function with a function name"
        return None

    def error_body(self, kind: str, status: int) -> dict[str, Any]:
        return {"id": request_id(""), "message": self._MESSAGES[kind]}

    def bad_request(self, problem: str) -> web.Response:
        return web.json_response({"id": request_id(""), "message": problem}, status=400)

    async def _chat(self, request: web.Request) -> web.Response:
        received, failure = await self.receive(request)
        if failure is not None:
            return failure
        last_message = received.body["messages"][-1]
        last = last_message.get("content", "")
        prompt = last if isinstance(last, str) else " ".join(_part_text(part) for part in last)
        tool_result = prompt if last_message["role"] == "tool" else None
        call = self.calls_tool(bool(received.body.get("tools")), tool_result)
        sent = self.answer_tool_result(prompt) if tool_result is not None else self.answer(prompt)
        message: dict[str, Any] = {"role": "assistant", "content": [{"type": "text", "text": sent.text}]}
        finish = "MAX_TOKENS" if self.cut_off else "COMPLETE"
        if call is not None:
            function = {"name": call[0], "arguments": json.dumps(call[1])}
            message = {
                "role": "assistant",
                "tool_plan": f"I will call {call[0]}.",
                "tool_calls": [{"id": request_id(f"{call[0]}_"), "type": "function", "function": function}],
            }
            finish = "TOOL_CALL"
        payload = {
            "id": request_id(""),
            "finish_reason": finish,
            "message": message,
            "usage": {
                "billed_units": {
                    "input_tokens": self.billed_input_tokens,
                    "output_tokens": sent.completion_tokens,
                },
                "tokens": {"input_tokens": sent.prompt_tokens, "output_tokens": sent.completion_tokens},
            },
        }
        return web.json_response(payload)


def _part_text(part: dict[str, Any]) -> str:
    """A content part's text: a ``text`` part, or a tool result's ``document`` part."""
    if part.get("type") == "document":
        data = part.get("document", {}).get("data", "")
        return data if isinstance(data, str) else json.dumps(data)
    return str(part.get("text", ""))
