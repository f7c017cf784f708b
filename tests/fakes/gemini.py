"""The Gemini API (Google AI Studio), as https://ai.google.dev/api/generate-content documents it.

- ``POST {root}/v1beta/models/{model}:generateContent``; the key goes in the ``x-goog-api-key``
  header or the ``?key=`` query parameter (both documented; a wrong key is a 400
  ``API_KEY_INVALID``, a missing one a 403 ``PERMISSION_DENIED``).
- Body: ``contents`` (roles ``user``/``model``, ``parts: [{"text"}]``), ``systemInstruction``,
  ``generationConfig`` (``temperature`` 0..2, ``maxOutputTokens``...). Google's JSON parser takes
  both the lowerCamel JSON names and the proto field names (``system_instruction``,
  ``max_output_tokens``), and refuses unknown fields with a 400 ``INVALID_ARGUMENT``.
- Tools: ``tools: [{"functionDeclarations": [{"name", "description", "parameters"}]}]``; a call is
  a ``{"functionCall": {"name", "args"}}`` part (``finishReason`` stays ``STOP``), answered by a
  ``{"functionResponse": {"name", "response"}}`` part. Structured output: ``generationConfig.
  responseMimeType: application/json`` with ``responseSchema``/``responseJsonSchema``. A cut-off
  answer: ``MAX_TOKENS``.
- Answer: ``candidates[0].content.parts[].text``, ``finishReason``, and ``usageMetadata`` with
  ``promptTokenCount``, ``candidatesTokenCount``, ``thoughtsTokenCount`` (thinking tokens, billed
  as output; 2.5 models think by default) and ``totalTokenCount`` (the sum of the three).
- Streaming: ``POST .../models/{model}:streamGenerateContent?alt=sse``: server-sent events, each
  ``data:`` a ``GenerateContentResponse`` holding the next piece of the parts, each with the
  ``usageMetadata`` so far; the last carries ``finishReason`` and the final counts.
- Errors (https://ai.google.dev/gemini-api/docs/troubleshooting): a ``google.rpc.Status``
  ``{"error": {"code", "message", "status", "details"}}``; 429 ``RESOURCE_EXHAUSTED`` carrying a
  ``RetryInfo`` detail (no Retry-After header), 503 ``UNAVAILABLE`` ("The model is overloaded"),
  500 ``INTERNAL``.

The fake's ``api_base`` is ``{root}/v1beta``: litellm appends ``/models/{model}:generateContent``
to a configured ``api_base`` (and sends the key as ``x-goog-api-key``).
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar

from aiohttp import web

from tests.fakes.base import ProviderFake, Received, pieces

_TOP_LEVEL = {
    "contents",
    "tools",
    "toolConfig",
    "safetySettings",
    "systemInstruction",
    "generationConfig",
    "cachedContent",
}
_GENERATION_CONFIG = {
    "stopSequences",
    "responseMimeType",
    "responseSchema",
    "responseJsonSchema",
    "responseModalities",
    "candidateCount",
    "maxOutputTokens",
    "temperature",
    "topP",
    "topK",
    "seed",
    "presencePenalty",
    "frequencyPenalty",
    "responseLogprobs",
    "logprobs",
    "thinkingConfig",
    "mediaResolution",
    "speechConfig",
}


def _camel(name: str) -> str:
    """Proto field name -> JSON name, as Google's parser maps them (max_output_tokens -> maxOutputTokens)."""
    return re.sub(r"_([a-z])", lambda m: m.group(1).upper(), name)


class FakeGemini(ProviderFake):
    name = "gemini"
    ERRORS: ClassVar[dict[str, tuple[int, dict[str, str]]]] = {
        "rate_limit": (429, {}),
        "overloaded": (503, {}),
        "server_error": (500, {}),
        "auth": (400, {}),
    }

    def __init__(self, *, thoughts_tokens: int = 0, retry_delay_s: float = 0.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.thoughts_tokens = thoughts_tokens
        self.retry_delay_s = retry_delay_s

    @property
    def api_base(self) -> str:
        return f"{self.root}/v1beta"

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1beta/models/{model_and_method}", self._generate)]

    def authorised(self, received: Received) -> bool:
        return self.api_key in (received.headers.get("x-goog-api-key"), received.query.get("key"))

    def invalid(self, received: Received) -> str | None:
        body = received.body
        unknown = {_camel(k) for k in body} - _TOP_LEVEL
        if unknown:
            return f'Invalid JSON payload received. Unknown name "{sorted(unknown)[0]}": Cannot find field.'
        config = body.get("generationConfig", body.get("generation_config", {}))
        unknown = {_camel(k) for k in config} - _GENERATION_CONFIG
        if unknown:
            return (
                f'Invalid JSON payload received. Unknown name "{sorted(unknown)[0]}" at '
                "'generation_config': Cannot find field."
            )
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            return "* GenerateContentRequest.contents: contents is not specified"
        if any(c.get("role") not in ("user", "model") for c in contents):
            return "Please use a valid role: user, model."
        for i, tool in enumerate(body.get("tools") or []):
            unknown = {_camel(k) for k in tool} - {"functionDeclarations", "googleSearch", "codeExecution"}
            if unknown:
                return f"Invalid JSON payload received. Unknown name \"{sorted(unknown)[0]}\" at 'tools[{i}]'"
        if not 0 <= config.get("temperature", 1.0) <= 2:
            return "* GenerateContentRequest.generation_config.temperature: must be in [0, 2]"
        return None

    def error_body(self, kind: str, status: int) -> dict[str, Any]:
        if kind == "rate_limit":
            return _status(
                429,
                "RESOURCE_EXHAUSTED",
                "You exceeded your current quota, please check your plan and billing details. For more "
                "information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.",
                [
                    {
                        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                        "violations": [
                            {
                                "quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
                                "quotaId": "GenerateRequestsPerMinutePerProjectPerModel",
                            }
                        ],
                    },
                    {
                        "@type": "type.googleapis.com/google.rpc.RetryInfo",
                        "retryDelay": f"{self.retry_delay_s:g}s",
                    },
                ],
            )
        if kind == "overloaded":
            return _status(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")
        if kind == "server_error":
            return _status(500, "INTERNAL", "An internal error has occurred. Please retry or report it.")
        return _status(
            400,
            "INVALID_ARGUMENT",
            "API key not valid. Please pass a valid API key.",
            [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}],
        )

    def bad_request(self, problem: str) -> web.Response:
        return web.json_response(_status(400, "INVALID_ARGUMENT", problem), status=400)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        model, _, method = request.match_info["model_and_method"].partition(":")
        streamed = method == "streamGenerateContent" and request.query.get("alt") == "sse"
        if method != "generateContent" and not streamed:
            await self.receive(request)
            return web.json_response(_status(404, "NOT_FOUND", f"Method {method} not found."), status=404)
        received, failure = await self.receive(request)
        if failure is not None:
            return failure
        last = received.body["contents"][-1]["parts"]
        responses = [p.get("functionResponse", p.get("function_response")) for p in last]
        responses = [r for r in responses if r is not None]
        tool_result = json.dumps(responses[0].get("response"), sort_keys=True) if responses else None
        call = self.calls_tool(bool(received.body.get("tools")), tool_result)
        if tool_result is not None:
            sent = self.answer_tool_result(tool_result)
        else:
            sent = self.answer(" ".join(part.get("text", "") for part in last))
        parts: list[dict[str, Any]] = [{"text": sent.text}]
        if call is not None:
            parts = [{"functionCall": {"name": call[0], "args": call[1]}}]
        usage = {
            "promptTokenCount": sent.prompt_tokens,
            "candidatesTokenCount": sent.completion_tokens,
            "totalTokenCount": sent.prompt_tokens + sent.completion_tokens + self.thoughts_tokens,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": sent.prompt_tokens}],
        }
        if self.thoughts_tokens:
            usage["thoughtsTokenCount"] = self.thoughts_tokens
        payload = {
            "candidates": [
                {
                    "content": {"parts": parts, "role": "model"},
                    "finishReason": "MAX_TOKENS" if self.cut_off else "STOP",
                    "index": 0,
                }
            ],
            "usageMetadata": usage,
            "modelVersion": model,
            "responseId": "fake-response-id",
        }
        if streamed:
            return await self.sse(request, _responses(payload))
        return web.json_response(payload)


def _responses(payload: dict[str, Any]) -> list[tuple[None, dict[str, Any], bool]]:
    """``payload`` as ``streamGenerateContent`` sends it: a response per piece of text (a function
    call whole, as Gemini sends it), the usage so far on each, the finish reason on the last."""
    candidate = payload["candidates"][0]
    parts: list[dict[str, Any]] = []
    for part in candidate["content"]["parts"]:
        parts += [{"text": p} for p in pieces(part["text"])] if "text" in part else [part]
    usage = payload["usageMetadata"]
    events = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        piece: dict[str, Any] = {"content": {"parts": [part], "role": "model"}, "index": 0}
        if last:
            piece["finishReason"] = candidate["finishReason"]
        so_far = (
            usage
            if last
            else {
                **usage,
                "candidatesTokenCount": i + 1,
                "totalTokenCount": usage["promptTokenCount"] + i + 1,
            }
        )
        so_far = {k: v for k, v in so_far.items() if last or k != "thoughtsTokenCount"}
        events.append((None, {**payload, "candidates": [piece], "usageMetadata": so_far}, True))
    return events


def _status(
    code: int, status: str, message: str, details: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return {"error": error}
