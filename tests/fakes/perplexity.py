"""Perplexity's Agent API, the successor of Sonar chat completions.

Perplexity supported Sonar chat completions (``POST /chat/completions``) until 27 September
2026 and points every caller to the Agent API (docs.perplexity.ai/docs/agent-api/
migrate-from-sonar); this fake therefore serves only the Agent API, as Perplexity's reference
and its migration guide (github.com/perplexityai/api-platform-developers, skill
``migrate-sonar-to-agent-api``) document it:

- ``POST /v1/agent``, with ``POST /v1/responses`` as the documented alias the OpenAI SDK uses;
  auth by ``Authorization: Bearer <key>``.
- Body in OpenAI Responses form: ``input`` (items ``{type: "message", role, content}``),
  ``instructions``, one of ``model`` (provider-prefixed, e.g. ``perplexity/sonar``), ``preset``
  (``fast``/``low``/``medium``/``high``/``xhigh``) or ``models``, ``max_output_tokens``,
  ``temperature``... The API is strict: any unknown field is a 400 ``invalid_request`` naming it.
- Answer: ``{"object": "response", "status": "completed", "model", "output": [{"type":
  "search_results", ...}, {"type": "message", "content": [{"type": "output_text", "text"}]}],
  "usage": {"input_tokens", "output_tokens", "total_tokens", "cost": {"input_cost",
  "output_cost", "tool_calls_cost", "total_cost", "currency"}}}``.
- Errors: ``{"error": {"message", "type", "code"}}`` with the HTTP status equal to ``code``; 429
  ``request_rate_limit_exceeded`` with ``X-RateLimit-*`` headers, 500 ``internal_error``, 502
  ``bad_gateway``, 401 ``forbidden``. A run that fails inside the model answers HTTP 200 with
  ``status: "failed"`` and an ``error`` (kind ``failed_run``).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

from aiohttp import web

from tests.fakes.base import ProviderFake, Received, request_id

_FIELDS = {
    "input",
    "instructions",
    "model",
    "preset",
    "models",
    "max_output_tokens",
    "temperature",
    "top_p",
    "stream",
    "stream_options",
    "reasoning",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "language_preference",
    "max_steps",
    "max_tool_calls",
    "previous_response_id",
    "background",
    "metadata",
    "store",
    "truncation",
}
PRESETS = ("fast", "low", "medium", "high", "xhigh", "fast-search", "pro-search", "deep-research")


class FakePerplexity(ProviderFake):
    name = "perplexity"
    ERRORS: ClassVar[dict[str, tuple[int, dict[str, str]]]] = {
        "rate_limit": (
            429,
            {"X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1"},
        ),
        "server_error": (500, {}),
        "bad_gateway": (502, {}),
        "auth": (401, {}),
        "failed_run": (200, {}),
    }
    _TYPES: ClassVar[dict[str, tuple[str, str]]] = {
        "rate_limit": ("request_rate_limit_exceeded", "Rate limit exceeded. Please retry with backoff."),
        "server_error": ("internal_error", "Internal server error."),
        "bad_gateway": ("bad_gateway", "Bad gateway."),
        "auth": ("forbidden", "Invalid API key."),
        "failed_run": ("internal_error", "The model failed to produce a response."),
    }

    def __init__(
        self,
        *,
        resolved_model: str = "perplexity/sonar",
        tool_calls_cost_usd: float = 0.005,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.resolved_model = resolved_model
        self.tool_calls_cost_usd = tool_calls_cost_usd

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/agent", self._agent), web.post("/v1/responses", self._agent)]

    def authorised(self, received: Received) -> bool:
        return received.headers.get("Authorization") == f"Bearer {self.api_key}"

    def invalid(self, received: Received) -> str | None:
        body = received.body
        unknown = sorted(set(body) - _FIELDS)
        if unknown:
            return f'invalid request body: json: unknown field "{unknown[0]}"'
        if "input" not in body:
            return "input is required"
        if not any(k in body for k in ("model", "preset", "models")):
            return "one of model, preset or models is required"
        if "preset" in body and body["preset"] not in PRESETS:
            return f"unknown preset {body['preset']!r}"
        if "model" in body and "/" not in body["model"]:
            return (
                f"invalid model {body['model']!r}: model slugs are provider-prefixed (e.g. perplexity/sonar)"
            )
        return None

    def error(self, kind: str) -> web.Response:
        if kind != "failed_run":
            return super().error(kind)
        self.errors_sent.append(kind)
        error_type, message = self._TYPES[kind]
        body = self._response(status="failed", output=[], usage=None)
        body["error"] = {"message": message, "type": error_type, "code": 500}
        return web.json_response(body)

    def error_body(self, kind: str, status: int) -> dict[str, Any]:
        error_type, message = self._TYPES[kind]
        return {"error": {"message": message, "type": error_type, "code": status}}

    def bad_request(self, problem: str) -> web.Response:
        param = problem.split('"')[1] if '"' in problem else None
        error = {"message": problem, "type": "invalid_request", "code": 400, "param": param}
        return web.json_response({"error": error}, status=400)

    def _response(
        self, *, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None
    ) -> dict[str, Any]:
        now = int(time.time())
        return {
            "id": request_id("resp_"),
            "object": "response",
            "created_at": now,
            "completed_at": now,
            "status": status,
            "model": self.resolved_model,
            "output": output,
            "usage": usage,
            "error": None,
        }

    async def _agent(self, request: web.Request) -> web.Response:
        received, failure = await self.receive(request)
        if failure is not None:
            return failure
        sent = self.answer(_last_text(received.body["input"]))
        input_cost, output_cost = sent.prompt_tokens * 1e-6, sent.completion_tokens * 1e-6
        output = [
            {
                "type": "search_results",
                "queries": [sent.text[:40]],
                "results": [
                    {
                        "id": 1,
                        "url": "https://example.org/source",
                        "title": "A source",
                        "snippet": "What the page says.",
                        "date": "2026-11-01",
                        "last_updated": "2026-11-20",
                        "source": "web",
                    }
                ],
            },
            {
                "id": request_id("msg_"),
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": sent.text, "annotations": []}],
            },
        ]
        usage = {
            "input_tokens": sent.prompt_tokens,
            "output_tokens": sent.completion_tokens,
            "total_tokens": sent.prompt_tokens + sent.completion_tokens,
            "tool_calls_details": {"search_web": {"invocation": 1}},
            "cost": {
                "currency": "USD",
                "input_cost": input_cost,
                "output_cost": output_cost,
                "tool_calls_cost": self.tool_calls_cost_usd,
                "total_cost": input_cost + output_cost + self.tool_calls_cost_usd,
            },
        }
        return web.json_response(self._response(status="completed", output=output, usage=usage))


def _last_text(items: Any) -> str:
    if isinstance(items, str):
        return items
    content = items[-1].get("content", "")
    if isinstance(content, str):
        return content
    return " ".join(part.get("text", "") for part in content)
