"""The wire contract: what agents publish and what the worker answers.

These pydantic models are the single source of the contract; ``schemas/`` holds the JSON Schema
and AsyncAPI files generated from them (``python -m worker schemas``), and a test fails when the
files drift. This module imports nothing else of ours, so agents can depend on it alone.

A request is one JSON object (``LLMRequest``) in an AMQP message whose ``reply_to`` and
``correlation_id`` properties say where the answer (``LLMResult``) goes.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1
MAX_MESSAGES = 256
MAX_CONTENT_CHARS = 200_000
MAX_BODY_BYTES = 1_048_576

# Names are what operators grep for and what label metrics, so keep them tame.
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"

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


class ChatMessage(BaseModel):
    """One message in OpenAI chat form."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    content: Annotated[str, Field(max_length=MAX_CONTENT_CHARS)] | list[dict[str, Any]] | None = None
    name: Annotated[str, Field(max_length=128)] | None = None
    tool_call_id: Annotated[str, Field(max_length=128)] | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _bounded_parts(cls, value: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        if isinstance(value, list) and len(str(value)) > MAX_CONTENT_CHARS:
            raise ValueError(f"content parts exceed {MAX_CONTENT_CHARS} characters")
        return value


class LLMRequest(BaseModel):
    """An agent's request for one chat completion.

    ``request_id`` is the idempotency key: a request re-published or redelivered with the same
    ``request_id`` is answered once and charged once.
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
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    use_cache: bool = True
    cache_ttl: int | None = Field(default=None, ge=0, le=30 * 86400, description="Seconds.")
    deadline: AwareDatetime | None = Field(
        default=None, description="Absolute time (RFC 3339, with offset) after which no answer is wanted."
    )

    @field_validator("trace_id", mode="before")
    @classmethod
    def _normalize_trace_id(cls, value: Any) -> Any:
        # Agents often hold a UUID; accept its dashed form and keep the W3C shape on the wire.
        if isinstance(value, str) and len(value) == 36 and value.count("-") == 4:
            return value.replace("-", "").lower()
        return value


class Status(StrEnum):
    ok = "ok"
    failed = "failed"
    budget_exceeded = "budget_exceeded"
    invalid = "invalid"
    expired = "expired"


class Tokens(BaseModel):
    prompt: int = 0
    completion: int = 0
    total: int = 0


class ErrorInfo(BaseModel):
    type: str = Field(description="A stable error name, e.g. RateLimited, ContextWindowExceeded.")
    message: str
    retryable: bool


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
    model: str | None = Field(default=None, description="The configured model name that answered.")
    tokens: Tokens = Field(default_factory=Tokens)
    cost_usd: float = 0.0
    cached: bool = False
    attempts: int = 0
    fallback_used: bool = False
    latency_ms: float = 0.0
    error: ErrorInfo | None = None
    finished_at: datetime | None = None
