"""OpenAI's Chat Completions API, as https://platform.openai.com/docs/api-reference/chat documents it.

(``openai_server.py`` beside this is the harness's behaviour-by-model-name server; this one is
the faithful wire format, with scripted failures, for the provider tests.)

- ``POST /v1/chat/completions``; auth by ``Authorization: Bearer <key>``.
- Body: ``model`` and ``messages`` (roles ``system``/``developer``/``user``/``assistant``/
  ``tool``) are required.
- Answer: ``{"object": "chat.completion", "choices": [{"message": {"role": "assistant",
  "content"}, "finish_reason"}], "usage": {"prompt_tokens", "completion_tokens",
  "total_tokens", "prompt_tokens_details", "completion_tokens_details"}}`` with ``x-request-id``.
- Errors (https://platform.openai.com/docs/guides/error-codes): ``{"error": {"message", "type",
  "param", "code"}}``; 429 ``rate_limit_exceeded`` with ``x-ratelimit-*`` headers, 503 "The
  engine is currently overloaded", 500 ``server_error``, 401 ``invalid_api_key``.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

from aiohttp import web

from tests.fakes.base import ProviderFake, Received, request_id

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
        return None

    def extra_usage(self) -> dict[str, Any]:
        return {}

    def extra_fields(self) -> dict[str, Any]:
        return {}

    async def _chat(self, request: web.Request) -> web.Response:
        received, failure = await self.receive(request)
        if failure is not None:
            return failure
        last = received.body["messages"][-1].get("content") or ""
        prompt = last if isinstance(last, str) else " ".join(part.get("text", "") for part in last)
        sent = self.answer(prompt)
        payload = {
            "id": request_id("chatcmpl-"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": received.body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": sent.text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
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
        return web.json_response(payload, headers={"x-request-id": request_id("req_")})


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

    def extra_usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
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
