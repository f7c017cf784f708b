"""OpenAI's Chat Completions API, as https://platform.openai.com/docs/api-reference/chat documents it.

(``openai_server.py`` beside this is the harness's behaviour-by-model-name server; this one is
the faithful wire format, with scripted failures, for the provider tests.)

- ``POST /v1/chat/completions``; auth by ``Authorization: Bearer <key>``.
- Body: ``model`` and ``messages`` (roles ``system``/``developer``/``user``/``assistant``/
  ``tool``) are required.
- Tools: ``tools: [{"type": "function", "function": {"name", "parameters"}}]``; a call comes back as
  ``message.tool_calls: [{"id", "type": "function", "function": {"name", "arguments": <JSON
  text>}}]`` with ``finish_reason: "tool_calls"``; its answer is a ``tool`` message whose
  ``tool_call_id`` must name a preceding call (else 400). A cut-off answer: ``"length"``.
- Answer: ``{"object": "chat.completion", "choices": [{"message": {"role": "assistant",
  "content"}, "finish_reason"}], "usage": {"prompt_tokens", "completion_tokens",
  "total_tokens", "prompt_tokens_details", "completion_tokens_details"}}`` with ``x-request-id``.
- Streaming (``stream: true``): server-sent events, each ``data:`` a ``chat.completion.chunk`` whose
  ``choices[0].delta`` holds a piece (``role`` first, then ``content`` or ``tool_calls[].function.
  arguments`` pieces), the last with ``finish_reason``; with ``stream_options.include_usage`` one
  more chunk with empty ``choices`` and the ``usage``; then ``data: [DONE]``.
- Errors (https://platform.openai.com/docs/guides/error-codes): ``{"error": {"message", "type",
  "param", "code"}}``; 429 ``rate_limit_exceeded`` with ``x-ratelimit-*`` headers, 503 "The
  engine is currently overloaded", 500 ``server_error``, 401 ``invalid_api_key``.
"""

from __future__ import annotations

import json
import time
from typing import Any, ClassVar

from aiohttp import web

from tests.fakes.base import ProviderFake, Received, pieces, request_id

ROLES = ("system", "developer", "user", "assistant", "tool")


class OpenAIChatFake(ProviderFake):
    """Chat Completions plumbing shared by OpenAI and the OpenAI-compatible servers."""

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/chat/completions", self._chat)]

    @property
    def api_base(self) -> str:
        return f"{self.root}/v1"

    def authorised(self, received: Received) -> bool:
        return received.headers.get("Authorization") == f"Bearer {self.api_key}"

    def invalid(self, received: Received) -> str | None:
        body = received.body
        if not isinstance(body.get("model"), str):
            return "you must provide a model parameter"
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "[] is too short - 'messages'"
        bad = [m.get("role") for m in messages if m.get("role") not in ROLES]
        if bad:
            return f"Invalid value: '{bad[0]}'. Supported values are: {', '.join(ROLES)}."
        called = {c["id"] for m in messages for c in m.get("tool_calls") or []}
        for i, m in enumerate(messages):
            if m["role"] == "tool" and m.get("tool_call_id") not in called:
                return (
                    f"Invalid parameter: messages with role 'tool' must be a response to a preceeding "
                    f"message with 'tool_calls' (messages.[{i}].tool_call_id)."
                )
        for i, tool in enumerate(body.get("tools") or []):
            if tool.get("type") != "function" or not isinstance(tool.get("function", {}).get("name"), str):
                return f"Missing required parameter: 'tools[{i}].function.name'."
        return None

    def extra_usage(self) -> dict[str, Any]:
        return {}

    def extra_fields(self) -> dict[str, Any]:
        return {}

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        received, failure = await self.receive(request)
        if failure is not None:
            return failure
        last_message = received.body["messages"][-1]
        last = last_message.get("content") or ""
        prompt = last if isinstance(last, str) else " ".join(part.get("text", "") for part in last)
        tool_result = prompt if last_message["role"] == "tool" else None
        call = self.calls_tool(bool(received.body.get("tools")), tool_result)
        sent = self.answer_tool_result(prompt) if tool_result is not None else self.answer(prompt)
        message: dict[str, Any] = {"role": "assistant", "content": sent.text, "refusal": None}
        finish = "length" if self.cut_off else "stop"
        if call is not None:
            name, arguments = call
            function = {"name": name, "arguments": json.dumps(arguments)}
            message = {
                **message,
                "content": None,
                "tool_calls": [{"id": request_id("call_"), "type": "function", "function": function}],
            }
            finish = "tool_calls"
        payload = {
            "id": request_id("chatcmpl-"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": received.body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": _logprobs(sent.text, received.body)
                    if received.body.get("logprobs")
                    else None,
                    "finish_reason": finish,
                }
            ],
            "usage": {
                "prompt_tokens": sent.prompt_tokens,
                "completion_tokens": sent.completion_tokens,
                "total_tokens": sent.prompt_tokens + sent.completion_tokens,
                **self.extra_usage(),
            },
            **self.extra_fields(),
        }
        if received.body.get("stream") is True:
            return await self.sse(request, sse_chunks(payload, received.body), prompt)
        return web.json_response(payload, headers={"x-request-id": request_id("req_")})


def sse_chunks(
    payload: dict[str, Any], body: dict[str, Any], *, whole: bool = False
) -> list[tuple[None, dict[str, Any] | str, bool]]:
    """``payload`` (a whole completion) as the chunks OpenAI streams it in (``whole``: its text in
    one piece)."""
    head = {k: payload[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    choice = payload["choices"][0]
    message = choice["message"]

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    events: list[tuple[None, dict[str, Any] | str, bool]] = [
        (None, chunk({"role": "assistant", "content": "", "refusal": None}), False)
    ]
    for call in message.get("tool_calls") or []:
        function = call["function"]
        opening = {
            "index": 0,
            "id": call["id"],
            "type": "function",
            "function": {"name": function["name"], "arguments": ""},
        }
        events.append((None, chunk({"tool_calls": [opening]}), False))
        for piece in pieces(function["arguments"]):
            events.append(
                (None, chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}), True)
            )
    if message.get("content"):
        texts = [message["content"]] if whole else pieces(message["content"])
        events += [(None, chunk({"content": piece}), True) for piece in texts]
    events.append((None, chunk({}, choice["finish_reason"]), False))
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append((None, {**head, "choices": [], "usage": payload["usage"]}, False))
    events.append((None, "[DONE]", False))
    return events


def _logprobs(text: str | None, body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's ``choice.logprobs``: one entry per (here: whitespace) token, with ``top_logprobs``."""
    top = body.get("top_logprobs") or 0

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [
            {**entry(token, -0.25), "top_logprobs": [entry(token, -0.25)] * top}
            for token in (text or "").split()
        ],
        "refusal": None,
    }


class FakeOpenAIPlatform(OpenAIChatFake):
    name = "openai"
    ERRORS: ClassVar[dict[str, tuple[int, dict[str, str]]]] = {
        "rate_limit": (
            429,
            {
                "x-ratelimit-limit-requests": "500",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "120ms",
            },
        ),
        "overloaded": (503, {}),
        "server_error": (500, {}),
        "auth": (401, {}),
        "quota": (429, {}),
    }
    _ERRORS: ClassVar[dict[str, tuple[str, str | None, str]]] = {
        "rate_limit": (
            "requests",
            "rate_limit_exceeded",
            "Rate limit reached for requests per min (RPM): Limit 500, Used 500, Requested 1. "
            "Please try again in 120ms.",
        ),
        "overloaded": ("server_error", None, "The engine is currently overloaded, please try again later."),
        "server_error": (
            "server_error",
            None,
            "The server had an error while processing your request. Sorry about that!",
        ),
        "auth": ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
        # A 429 that waiting does not cure (OpenAI's error-code guide: "do not retry").
        "quota": (
            "insufficient_quota",
            "insufficient_quota",
            "You exceeded your current quota, please check your plan and billing details.",
        ),
    }

    cached_tokens = 0  # of the prompt tokens, read from OpenAI's prompt cache

    def extra_usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def extra_fields(self) -> dict[str, Any]:
        return {"service_tier": "default", "system_fingerprint": "fp_fake"}

    def error_body(self, kind: str, status: int) -> dict[str, Any]:
        error_type, code, message = self._ERRORS[kind]
        return {"error": {"message": message, "type": error_type, "param": None, "code": code}}

    def bad_request(self, problem: str) -> web.Response:
        error = {"message": problem, "type": "invalid_request_error", "param": None, "code": None}
        return web.json_response({"error": error}, status=400)
