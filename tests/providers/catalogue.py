"""Every provider in the design (issue #10) as the tests see it: its fake at the network edge, its
Router deployment, its price, and what its wire format must look like on arrival."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.base import TEST_KEY, ProviderFake, Received
from tests.fakes.cohere import FakeCohere
from tests.fakes.gemini import FakeGemini
from tests.fakes.openai_api import FakeOpenAIPlatform
from tests.fakes.perplexity import FakePerplexity
from tests.fakes.vllm import FakeVLLM

SYSTEM = "You are terse."
PROMPT = "Name three queues"
MAX_TOKENS = 64
#: A tool in OpenAI's chat-completions form, offered to every provider.
LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look a word up.",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
    },
}


def _text(parts: Any) -> str:
    """The text of a message's content, whether a string or a list of text parts."""
    return parts if isinstance(parts, str) else " ".join(p.get("text", "") for p in parts)


def _openai_shape(r: Received, model_id: str, key: str | None) -> None:
    assert r.path == "/v1/chat/completions"
    assert r.headers["Authorization"] == f"Bearer {key or 'fake-api-key'}"
    assert r.body["model"] == model_id
    assert [(m["role"], _text(m["content"])) for m in r.body["messages"]] == [
        ("system", SYSTEM),
        ("user", PROMPT),
    ]
    assert r.body["max_tokens"] == MAX_TOKENS and r.body["temperature"] == 0.5


def _anthropic_shape(r: Received, model_id: str, key: str | None) -> None:
    assert r.path == "/v1/messages"
    assert r.headers["x-api-key"] == key and r.headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in r.headers
    assert r.body["model"] == model_id and r.body["max_tokens"] == MAX_TOKENS
    assert _text(r.body["system"]) == SYSTEM  # the system prompt is top-level, not a message
    assert [(m["role"], _text(m["content"])) for m in r.body["messages"]] == [("user", PROMPT)]


def _gemini_shape(r: Received, model_id: str, key: str | None) -> None:
    assert r.path == f"/v1beta/models/{model_id}:generateContent"
    assert r.headers["x-goog-api-key"] == key and "key" not in r.query  # the key stays out of the URL
    assert r.body["contents"] == [{"role": "user", "parts": [{"text": PROMPT}]}]
    system = r.body.get("system_instruction") or r.body["systemInstruction"]
    assert _text(system["parts"]) == SYSTEM
    config = r.body.get("generationConfig") or r.body["generation_config"]
    assert config.get("max_output_tokens", config.get("maxOutputTokens")) == MAX_TOKENS


def _cohere_shape(r: Received, model_id: str, key: str | None) -> None:
    assert r.path == "/v2/chat"
    assert r.headers["Authorization"] == f"Bearer {key}"
    assert r.body["model"] == model_id and r.body["max_tokens"] == MAX_TOKENS
    assert [(m["role"], _text(m["content"])) for m in r.body["messages"]] == [
        ("system", SYSTEM),
        ("user", PROMPT),
    ]


def _perplexity_shape(r: Received, model_id: str, key: str | None) -> None:
    assert r.path in ("/v1/agent", "/v1/responses")  # /v1/responses is the documented alias
    assert r.headers["Authorization"] == f"Bearer {key}"
    assert r.body["preset"] == model_id and "model" not in r.body
    assert r.body["instructions"] == SYSTEM
    assert [(i["role"], _text(i["content"])) for i in r.body["input"]] == [("user", PROMPT)]
    assert r.body["max_output_tokens"] == MAX_TOKENS


@dataclass(frozen=True)
class Provider:
    """One provider as the worker is configured for it, and what its API must receive."""

    name: str
    fake: Callable[[], ProviderFake]
    model: str  # litellm_params.model, as config/llm.yaml would say it
    model_id: str  # the id the provider itself sees
    price: tuple[float, float]  # USD per input token, per output token
    overload: str  # the fake's error kind for "the provider is overloaded"
    shape: Callable[[Received, str, str | None], None]
    key: str | None = TEST_KEY  # None: no api_key configured
    extra_completion_tokens: int = 0  # billed output tokens the provider reports beside the text

    def deployment(self, fake: ProviderFake) -> dict[str, Any]:
        params: dict[str, Any] = {"model": self.model, "api_base": fake.api_base}
        if self.key is not None:
            params["api_key"] = self.key
        return {
            "model_name": self.name,
            "litellm_params": params,
            "model_info": {"input_cost_per_token": self.price[0], "output_cost_per_token": self.price[1]},
        }


PROVIDERS = {
    p.name: p
    for p in (
        Provider(
            "openai",
            lambda: FakeOpenAIPlatform(prompt_tokens=13, completion_tokens=5),
            "openai/gpt-4.1-mini",
            "gpt-4.1-mini",
            (4.0e-7, 1.6e-6),
            "overloaded",
            _openai_shape,
        ),
        Provider(
            "anthropic",
            lambda: FakeAnthropic(prompt_tokens=17, completion_tokens=9),
            "anthropic/claude-sonnet-4-6",
            "claude-sonnet-4-6",
            (3.0e-6, 1.5e-5),
            "overloaded",  # 529 overloaded_error
            _anthropic_shape,
        ),
        Provider(
            "gemini",
            lambda: FakeGemini(prompt_tokens=12, completion_tokens=6, thoughts_tokens=20),
            "gemini/gemini-2.5-flash",
            "gemini-2.5-flash",
            (3.0e-7, 2.5e-6),
            "overloaded",  # 503 UNAVAILABLE
            _gemini_shape,
            extra_completion_tokens=20,  # thinking tokens are billed as output
        ),
        Provider(
            "cohere",
            # litellm 1.82.6 reads usage.tokens (71: the prompt with Cohere's template), not
            # usage.billed_units (5: what Cohere charges), so the worker over-charges the prompt.
            lambda: FakeCohere(prompt_tokens=71, completion_tokens=8, billed_input_tokens=5),
            "cohere_chat/command-a-03-2025",
            "command-a-03-2025",
            (2.5e-6, 1.0e-5),
            "server_error",  # Cohere documents no overload status; its 5xx is a 500
            _cohere_shape,
        ),
        Provider(
            "perplexity",
            # Tokens at the configured prices; the search fee in usage.cost.tool_calls_cost is not
            # charged (the worker prices tokens only).
            lambda: FakePerplexity(prompt_tokens=30, completion_tokens=11),
            "perplexity/responses/preset/low",
            "low",
            (3.0e-6, 1.5e-5),
            "bad_gateway",
            _perplexity_shape,
        ),
        Provider(
            "vllm",
            lambda: FakeVLLM(prompt_tokens=19, completion_tokens=4),
            "hosted_vllm/Qwen/Qwen3-8B",
            "Qwen/Qwen3-8B",
            (1.0e-7, 1.0e-7),
            "overloaded",
            _openai_shape,
            key=None,  # a self-hosted server without --api-key: no key configured
        ),
        Provider(
            "vllm-with-key",
            lambda: FakeVLLM(prompt_tokens=19, completion_tokens=4, require_key=True),
            "hosted_vllm/Qwen/Qwen3-8B",
            "Qwen/Qwen3-8B",
            (1.0e-7, 1.0e-7),
            "overloaded",
            _openai_shape,
        ),
    )
}


ROUND_TRIP = list(PROVIDERS)
MAIN = [name for name in PROVIDERS if name != "vllm-with-key"]


def messages() -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]


def _backup_for(name: str) -> Provider:
    return PROVIDERS["anthropic" if name == "openai" else "openai"]
