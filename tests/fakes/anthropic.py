"""Anthropic's Messages API, as https://docs.anthropic.com/en/api/messages documents it.

- ``POST {api_base}/v1/messages``; auth by ``x-api-key``; an ``anthropic-version`` header is
  required (``2023-06-01``).
- Body: ``model``, ``max_tokens`` (required), ``messages`` with roles ``user``/``assistant``
  only (the system prompt is the top-level ``system``), ``temperature`` in 0..1.
- Answer: ``{"type": "message", "content": [{"type": "text", ...}], "stop_reason", "usage":
  {"input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"}}``.
- Errors (https://docs.anthropic.com/en/api/errors): ``{"type": "error", "error": {"type",
  "message"}, "request_id"}``; 429 ``rate_limit_error`` with ``retry-after`` (seconds) and
  ``anthropic-ratelimit-*`` headers, 529 ``overloaded_error``, 500 ``api_error``, 401
  ``authentication_error``, 400 ``invalid_request_error``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from aiohttp import web

from tests.fakes.base import ProviderFake, Received, request_id

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
        temperature = body.get("temperature", 1.0)
        if not 0 <= temperature <= 1:
            return "temperature: range: 0..1"
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

    async def _messages(self, request: web.Request) -> web.Response:
        received, failure = await self.receive(request)
        if failure is not None:
            return failure
        last = received.body["messages"][-1]["content"]
        prompt = last if isinstance(last, str) else " ".join(part.get("text", "") for part in last)
        sent = self.answer(prompt)
        payload = {
            "id": request_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": received.body["model"],
            "content": [{"type": "text", "text": sent.text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": sent.prompt_tokens,
                "output_tokens": sent.completion_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "service_tier": "standard",
            },
        }
        return web.json_response(payload, headers={"request-id": request_id("req_")})
