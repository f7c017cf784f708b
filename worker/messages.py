"""The wire contract: what agents publish and what the worker answers.

These pydantic models are the single source of the contract; ``schemas/`` holds the JSON Schema
and AsyncAPI files generated from them (``python -m worker schemas``), and a test fails when the
files drift. This module imports nothing else of ours, so agents can depend on it alone.

A request is one JSON object (``LLMRequest``) in an AMQP message whose ``reply_to`` and
``correlation_id`` properties say where the answer (``LLMResult``) goes.

A request with ``stream: true`` is answered on its ``reply_to`` by ``LLMChunk`` messages (AMQP
``type`` :data:`CHUNK_TYPE`, ``seq`` 0, 1, ...) and then one ``LLMResult`` (``type``
:data:`STREAM_RESULT_TYPE`); a request without ``stream`` is answered as before (``type``
:data:`RESULT_TYPE`).
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

SCHEMA_VERSION = 1
#: AMQP ``type`` of the one answer to a request that did not ask to stream (unchanged since 0.1).
RESULT_TYPE = "LLMResult.v1"
#: AMQP ``type`` of a streamed answer's pieces, and of its final result.
CHUNK_TYPE = "llm.chunk"
STREAM_RESULT_TYPE = "llm.result"
MAX_MESSAGES = 256
MAX_CONTENT_CHARS = 200_000
MAX_BODY_BYTES = 1_048_576
MAX_TOOLS = 128  # OpenAI's limit on `tools`
MAX_SCHEMA_CHARS = 100_000  # one tool's parameters or one response schema, as JSON

# Names are what operators grep for and what label metrics, so keep them tame.
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"

_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")

Name = Annotated[str, Field(min_length=1, max_length=128, pattern=_NAME)]


def new_trace_id() -> str:
    """A W3C trace-context trace id: 32 lowercase hex digits."""
    return uuid.uuid4().hex


class Role(StrEnum):
    system = "system"
    developer = "developer"
    user = "user"
    assistant = "assistant"
    tool = "tool"


class ThinkingBlock(BaseModel):
    """One block of a model's thinking, with the signature the provider checks when it comes back."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["thinking", "redacted_thinking"]
    thinking: Annotated[str, Field(max_length=MAX_CONTENT_CHARS)] | None = None
    signature: Annotated[str, Field(max_length=MAX_CONTENT_CHARS)] | None = None
    data: Annotated[str, Field(max_length=MAX_CONTENT_CHARS)] | None = None  # redacted_thinking


class CacheControl(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["ephemeral"] = "ephemeral"
    ttl: Literal["5m", "1h"] | None = None


class ThinkingConfig(BaseModel):
    """Extended thinking (Anthropic's ``thinking``): ``budget_tokens`` of thinking before the answer."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["enabled", "disabled"]
    budget_tokens: int | None = Field(default=None, ge=1024, le=1_000_000, strict=True)


class ChatMessage(BaseModel):
    """One message in OpenAI chat form."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    content: Annotated[str, Field(max_length=MAX_CONTENT_CHARS)] | list[dict[str, Any]] | None = None
    name: Annotated[str, Field(max_length=128)] | None = None
    tool_call_id: Annotated[str, Field(max_length=128)] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    thinking_blocks: list[ThinkingBlock] | None = Field(
        default=None,
        max_length=64,
        description="An assistant turn's thinking (Anthropic), sent back as the result gave it so a "
        "tool loop with extended thinking can go on.",
    )
    cache_control: CacheControl | None = Field(default=None, description="Anthropic prompt caching.")

    @field_validator("content")
    @classmethod
    def _bounded_parts(cls, value: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        if isinstance(value, list) and len(str(value)) > MAX_CONTENT_CHARS:
            raise ValueError(f"content parts exceed {MAX_CONTENT_CHARS} characters")
        return value


_Strict = ConfigDict(extra="forbid")
_FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"


def _bounded_schema(value: dict[str, Any]) -> dict[str, Any]:
    if len(json.dumps(value)) > MAX_SCHEMA_CHARS:
        raise ValueError(f"schema exceeds {MAX_SCHEMA_CHARS} characters as JSON")
    return value


JSONSchema = Annotated[dict[str, Any], AfterValidator(_bounded_schema)]


class FunctionDefinition(BaseModel):
    model_config = _Strict

    name: str = Field(pattern=_FUNCTION_NAME)
    description: str | None = Field(default=None, max_length=4096)
    parameters: JSONSchema | None = Field(default=None, description="A JSON Schema object.")
    strict: bool | None = Field(default=None, strict=True)


class _FunctionTyped(BaseModel):
    model_config = _Strict

    type: Literal["function"] = "function"


class Tool(_FunctionTyped):
    """A function the model may call (OpenAI ``tools[]``)."""

    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = _Strict

    name: str = Field(pattern=_FUNCTION_NAME)


class NamedToolChoice(_FunctionTyped):
    """Force a call of this function."""

    function: FunctionName


class TextFormat(BaseModel):
    model_config = _Strict

    type: Literal["text"]


class JSONObjectFormat(BaseModel):
    model_config = _Strict

    type: Literal["json_object"]


class JSONSchemaSpec(BaseModel):
    # `schema` on the wire (OpenAI's name); `schema_` here, since BaseModel has a `schema` method.
    model_config = ConfigDict(
        extra="forbid", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True
    )

    name: str = Field(pattern=_FUNCTION_NAME)
    description: str | None = Field(default=None, max_length=4096)
    schema_: JSONSchema = Field(alias="schema", description="A JSON Schema object.")
    strict: bool | None = Field(default=None, strict=True)


class JSONSchemaFormat(BaseModel):
    model_config = _Strict

    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaFormat, Field(discriminator="type")]
StopSequence = Annotated[str, Field(min_length=1, max_length=256)]
TokenId = Annotated[str, Field(pattern=r"^[0-9]{1,10}$")]

#: The optional OpenAI chat-completions parameters a request may carry, passed to the provider as they
#: are (``tools`` ... ``thinking``), in the order litellm's supported-parameter lists use.
CHAT_PARAMS = (
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "stop",
    "top_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "user",
    "reasoning_effort",
    "thinking",
)


class LLMRequest(BaseModel):
    """An agent's request for one chat completion.

    ``request_id`` is the idempotency key: a request re-published or redelivered with the same
    ``request_id`` is answered once and charged once. Types are strict: numbers and booleans are
    JSON numbers and booleans (never strings), and a key appears at most once in any object.
    """

    model_config = ConfigDict(extra="forbid", title="LLMRequest")

    schema_version: Literal[1] = 1
    request_id: Name = Field(description="Idempotency key, unique per logical request.")
    agent: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$")] = Field(
        description="The calling agent (writer, critic, ...); picks the model and the agent budget."
    )
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    trace_id: str = Field(
        default_factory=new_trace_id,
        pattern=r"^[0-9a-f]{32}$",
        description="W3C trace id (32 lowercase hex digits); generated when absent.",
    )
    task_id: Name | None = Field(default=None, description="Groups requests under one task budget.")
    model: Name | None = Field(default=None, description="A configured model name; overrides the agent's.")
    # strict: on the wire a number is a number and a flag a boolean ("1.5", true, "5" and 5.0
    # were coerced), and the deadline an RFC 3339 string (issue #16).
    temperature: float | None = Field(default=None, ge=0, le=2, strict=True)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000, strict=True)
    tools: list[Tool] | None = Field(default=None, min_length=1, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = Field(default=None, strict=True)
    response_format: ResponseFormat | None = None
    stop: StopSequence | list[StopSequence] | None = Field(default=None, description="Up to 4 sequences.")
    top_p: float | None = Field(default=None, ge=0, le=1, strict=True)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1, strict=True)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, strict=True)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, strict=True)
    logit_bias: dict[TokenId, Annotated[int, Field(ge=-100, le=100, strict=True)]] | None = Field(
        default=None, max_length=1024, description="Token id -> bias in -100..100."
    )
    logprobs: bool | None = Field(default=None, strict=True)
    top_logprobs: int | None = Field(
        default=None, ge=0, le=20, strict=True, description="Needs `logprobs: true`."
    )
    user: str | None = Field(
        default=None, min_length=1, max_length=256, description="The end user, for the provider."
    )
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    thinking: ThinkingConfig | None = None
    use_cache: bool = Field(default=True, strict=True)
    cache_ttl: int | None = Field(default=None, ge=0, le=30 * 86400, strict=True, description="Seconds.")
    deadline: AwareDatetime | None = Field(
        default=None,
        json_schema_extra={"pattern": _RFC3339.pattern},
        description="Absolute time (RFC 3339, with offset) after which no answer is wanted.",
    )
    stream: bool = Field(
        default=False,
        strict=True,
        description="Answer in LLMChunk messages (AMQP type llm.chunk) as the model writes, then one "
        "LLMResult (type llm.result). Needs a reply_to (Direct Reply-To or the caller's reply queue).",
    )
    priority: Literal["interactive", "batch"] = Field(
        default="interactive",
        description="batch: served from the batch queue beside interactive work, and given only part of "
        "a provider's rate limit. A request in the batch queue is batch whatever it says.",
    )

    @field_validator("deadline", mode="before")
    @classmethod
    def _rfc3339(cls, value: Any) -> Any:
        # pydantic also reads 1700000000 and "1700000000" as Unix times; the contract says RFC 3339.
        if value is None or isinstance(value, datetime) or (isinstance(value, str) and _RFC3339.match(value)):
            return value
        raise ValueError("an RFC 3339 date-time string with an offset, e.g. 2026-01-31T12:00:00Z")

    @field_validator("trace_id", mode="before")
    @classmethod
    def _normalize_trace_id(cls, value: Any) -> Any:
        # Agents often hold a UUID; accept its dashed form and keep the W3C shape on the wire.
        if isinstance(value, str) and len(value) == 36 and value.count("-") == 4:
            return value.replace("-", "").lower()
        return value

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and not 1 <= len(value) <= 4:
            raise ValueError("stop takes 1 to 4 sequences")
        return value

    @field_validator("tool_choice", "parallel_tool_calls")
    @classmethod
    def _needs_tools(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None or "tools" not in info.data:  # tools itself invalid: named there
            return value
        tools: list[Tool] | None = info.data["tools"]
        if tools is None:
            raise ValueError(f"{info.field_name} needs tools")
        if isinstance(value, NamedToolChoice) and value.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"names '{value.function.name}', which is not in tools")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def chat_params(self) -> dict[str, Any]:
        """The OpenAI parameters this request sets (of :data:`CHAT_PARAMS`), in their wire form."""
        return {
            name: self.model_dump(mode="json", by_alias=True, include={name}, exclude_none=True)[name]
            for name in CHAT_PARAMS
            if getattr(self, name) is not None
        }


class Status(StrEnum):
    ok = "ok"
    failed = "failed"
    budget_exceeded = "budget_exceeded"
    invalid = "invalid"
    expired = "expired"
    conflict = "conflict"  # the request_id was already used by this caller for another request
    forbidden = "forbidden"  # the publisher's broker user may not act as this agent or name this model


class Tokens(BaseModel):
    prompt: int = 0
    completion: int = 0
    total: int = 0
    cached_prompt: int = Field(default=0, description="Of `prompt`: read from the provider's prompt cache.")
    cache_write: int = Field(default=0, description="Of `prompt`: written to the provider's prompt cache.")
    reasoning: int = Field(default=0, description="Of `completion`: thinking tokens.")


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="The arguments as the model wrote them: a JSON text, unchecked.")


class ToolCall(BaseModel):
    """One call the model asks for (OpenAI ``tool_calls[]``); answer it with a ``tool`` message."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(BaseModel):
    """A piece of a tool call being written: ``id`` and ``name`` with its first piece, then pieces
    of ``arguments`` to append (OpenAI's ``delta.tool_calls[]``)."""

    index: int = Field(ge=0, description="Which tool call of the answer this piece belongs to.")
    id: str | None = None
    name: str | None = None
    arguments: str | None = Field(default=None, description="Text to append to the call's arguments.")


class LLMChunk(BaseModel):
    """A piece of a streamed answer: what the model wrote since the previous chunk.

    Chunks are transient and may be lost or (after a worker crash) sent again from ``seq`` 0: keep
    the highest ``seq`` seen and drop the rest. The final ``LLMResult`` holds the whole answer.
    """

    model_config = ConfigDict(title="LLMChunk")

    schema_version: Literal[1] = 1
    request_id: str
    seq: int = Field(ge=0, description="0, 1, 2 ... within one answer.")
    content: str | None = Field(default=None, description="Text to append to the answer.")
    reasoning_content: str | None = Field(default=None, description="Thinking to append, where streamed.")
    tool_calls: list[ToolCallDelta] | None = None


class ErrorInfo(BaseModel):
    type: str = Field(description="A stable error name, e.g. RateLimited, ContextWindowExceeded.")
    message: str
    retryable: bool


#: The AMQP ``type`` of an embedding request and of its answer; a request without it is a chat request.
EMBEDDING_REQUEST_TYPE = "EmbeddingRequest.v1"
EMBEDDING_RESULT_TYPE = "EmbeddingResult.v1"
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit per request; llm.embedding.max_inputs is usually lower
MAX_EMBEDDING_INPUT_CHARS = 100_000  # a bound before counting; llm.embedding.max_input_tokens decides

EmbeddingInput = Annotated[str, Field(min_length=1, max_length=MAX_EMBEDDING_INPUT_CHARS)]


class EmbeddingRequest(BaseModel):
    """An agent's request for the embedding vectors of a batch of texts (AMQP ``type``
    ``EmbeddingRequest.v1``, on the request queue beside chat requests).

    The same rules as :class:`LLMRequest`: ``request_id`` is the idempotency key, types are strict,
    ``agent`` picks the embedding model (``llm.embedding.agent_models``) and the agent budget.
    """

    model_config = ConfigDict(extra="forbid", title="EmbeddingRequest")

    schema_version: Literal[1] = 1
    request_id: Name = Field(description="Idempotency key, unique per logical request.")
    agent: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$")] = Field(
        description="The calling agent; picks the embedding model and the agent budget."
    )
    input: list[EmbeddingInput] = Field(
        min_length=1,
        max_length=MAX_EMBEDDING_INPUTS,
        description="The texts to embed, one vector each, in this order. The worker's limits "
        "(llm.embedding.max_inputs, max_input_tokens, max_total_tokens) may be lower.",
    )
    trace_id: str = Field(
        default_factory=new_trace_id,
        pattern=r"^[0-9a-f]{32}$",
        description="W3C trace id (32 lowercase hex digits); generated when absent.",
    )
    task_id: Name | None = Field(default=None, description="Groups requests under one task budget.")
    model: Name | None = Field(
        default=None, description="A configured embedding model name; overrides the agent's."
    )
    dimensions: int | None = Field(
        default=None,
        ge=1,
        le=65_536,
        strict=True,
        description="Length of each vector, for models that can shorten theirs (OpenAI text-embedding-3, "
        "Gemini, Cohere embed-v4).",
    )
    use_cache: bool = Field(default=True, strict=True)
    cache_ttl: int | None = Field(default=None, ge=0, le=30 * 86400, strict=True, description="Seconds.")
    deadline: AwareDatetime | None = Field(
        default=None,
        json_schema_extra={"pattern": _RFC3339.pattern},
        description="Absolute time (RFC 3339, with offset) after which no answer is wanted.",
    )
    priority: Literal["interactive", "batch"] = Field(
        default="interactive", description="As LLMRequest.priority (indexing is usually batch)."
    )

    @field_validator("deadline", mode="before")
    @classmethod
    def _rfc3339(cls, value: Any) -> Any:
        return LLMRequest._rfc3339(value)  # the same rules as a chat request's

    @field_validator("trace_id", mode="before")
    @classmethod
    def _normalize_trace_id(cls, value: Any) -> Any:
        return LLMRequest._normalize_trace_id(value)


class Embedding(BaseModel):
    """One input's vector (OpenAI ``data[]``)."""

    index: int = Field(description="The position of its text in the request's `input`.")
    embedding: list[float]


class EmbeddingResult(BaseModel):
    """The worker's answer to one embedding request, whatever happened (AMQP ``type``
    ``EmbeddingResult.v1``). Tokens are all prompt tokens; an embedding has no completion."""

    model_config = ConfigDict(title="EmbeddingResult")

    schema_version: Literal[1] = 1
    request_id: str | None
    trace_id: str | None = None
    agent: str | None = None
    task_id: str | None = None
    status: Status
    embeddings: list[Embedding] | None = Field(default=None, description="One per input, in input order.")
    dimensions: int | None = Field(default=None, description="The length of every vector.")
    model: str | None = Field(default=None, description="The configured model name that answered.")
    tokens: Tokens = Field(default_factory=Tokens)
    cost_usd: float = Field(default=0.0, description="cost_nano_usd / 1e9.")
    cost_nano_usd: int = Field(
        default=0, description="The exact charge, in nano-dollars (1e-9 USD), as the ledger has it."
    )
    cached: bool = False
    attempts: int = 0
    fallback_used: bool = False
    latency_ms: float = 0.0
    error: ErrorInfo | None = None
    finished_at: datetime | None = None


class LLMResult(BaseModel):
    """The worker's answer to one request, whatever happened."""

    model_config = ConfigDict(title="LLMResult")

    schema_version: Literal[1] = 1
    request_id: str | None
    trace_id: str | None = None
    agent: str | None = None
    task_id: str | None = None
    status: Status
    content: str | None = None
    finish_reason: str | None = Field(
        default=None, description="stop, length (cut off at max_tokens), tool_calls, content_filter."
    )
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = Field(default=None, description="The model's thinking, where returned.")
    thinking_blocks: list[ThinkingBlock] | None = Field(
        default=None, description="Send back on the assistant message of the next turn (Anthropic)."
    )
    logprobs: dict[str, Any] | None = Field(default=None, description="OpenAI's choice.logprobs, when asked.")
    model: str | None = Field(default=None, description="The configured model name that answered.")
    tokens: Tokens = Field(default_factory=Tokens)
    cost_usd: float = Field(default=0.0, description="cost_nano_usd / 1e9.")
    cost_nano_usd: int = Field(
        default=0, description="The exact charge, in nano-dollars (1e-9 USD), as the ledger has it."
    )
    cached: bool = False
    attempts: int = 0
    fallback_used: bool = False
    latency_ms: float = 0.0
    error: ErrorInfo | None = None
    finished_at: datetime | None = None
    chunks: int | None = Field(
        default=None,
        description="Streamed answers: the number of llm.chunk messages sent before this result "
        "(seq 0 .. chunks-1).",
    )
