"""A self-hosted OpenAI-compatible server, as vLLM's ``vllm serve`` speaks it.

- ``POST /v1/chat/completions`` in OpenAI's format. A key is optional: started with
  ``--api-key`` the server wants ``Authorization: Bearer <key>`` and answers 401
  ``{"error": "Unauthorized"}`` otherwise; started without, it accepts anything (litellm's
  ``hosted_vllm/`` then sends ``Bearer fake-api-key``). Ollama's ``/v1`` endpoint behaves the
  same way without a key.
- Answer: OpenAI's, plus vLLM's own top-level fields (``prompt_logprobs``,
  ``kv_transfer_params``).
- Errors: vLLM's ``ErrorResponse``, ``{"error": {"message", "type", "param", "code": <int>}}``.
  The server itself does not rate-limit; a 429 comes from a limiting proxy in front of it,
  and a 503 when the engine cannot take work (Ollama answers 503 "server busy" when its queue
  is full).
"""

from __future__ import annotations

from typing import Any, ClassVar

from aiohttp import web

from tests.fakes.base import Received
from tests.fakes.openai_api import OpenAIChatFake


class FakeVLLM(OpenAIChatFake):
    name = "vllm"
    ERRORS: ClassVar[dict[str, tuple[int, dict[str, str]]]] = {
        "rate_limit": (429, {"retry-after": "0"}),
        "overloaded": (503, {}),
        "server_error": (500, {}),
        "auth": (401, {}),
    }
    _TYPES: ClassVar[dict[str, tuple[str, str]]] = {
        "rate_limit": ("TooManyRequests", "Too many requests"),
        "overloaded": (
            "ServiceUnavailableError",
            "server busy, please try again. maximum pending requests exceeded",
        ),
        "server_error": ("InternalServerError", "EngineCore encountered an issue."),
    }

    def __init__(self, *, require_key: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.require_key = require_key

    def authorised(self, received: Received) -> bool:
        return not self.require_key or super().authorised(received)

    def extra_fields(self) -> dict[str, Any]:
        return {"prompt_logprobs": None, "kv_transfer_params": None, "system_fingerprint": None}

    def error_body(self, kind: str, status: int) -> dict[str, Any]:
        if kind == "auth":
            return {"error": "Unauthorized"}
        error_type, message = self._TYPES[kind]
        return {"error": {"message": message, "type": error_type, "param": None, "code": status}}

    def bad_request(self, problem: str) -> web.Response:
        error = {"message": problem, "type": "BadRequestError", "param": None, "code": 400}
        return web.json_response({"error": error}, status=400)
