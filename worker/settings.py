"""Loading and validating ``config/*.yaml`` once, at start-up.

Four files, each with one top key: ``llm.yaml`` (``llm:``), ``redis.yaml`` (``redis:``),
``bus.yaml`` (``bus:``) and ``observe.yaml`` (``observe:``). ``--config DIR`` or
``WORKER_CONFIG_DIR`` picks the folder; ``AMQP_URL`` and ``REDIS_URL`` override the files' URLs,
``OBSERVE_PORT`` the HTTP port. Every problem becomes a :class:`ConfigError` naming
the file, the key and what was expected, so the process stops with one clear line.

Secrets are never held here: a value ``os.environ/NAME`` stays a reference, is checked to exist
at load time, and is resolved only where it is used (:func:`resolve_secrets`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from worker.errors import ConfigError

ENV_PREFIX = "os.environ/"
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
_Strict = ConfigDict(extra="forbid")


class ModelInfo(BaseModel):
    """Per-deployment metadata; the two prices (USD per token) are required."""

    model_config = ConfigDict(extra="allow")

    input_cost_per_token: float = Field(ge=0)
    output_cost_per_token: float = Field(ge=0)


class Deployment(BaseModel):
    """One entry of litellm Router's ``model_list``."""

    model_config = _Strict

    model_name: str = Field(min_length=1)
    litellm_params: dict[str, Any]
    model_info: ModelInfo

    @model_validator(mode="after")
    def _has_model(self) -> Deployment:
        if not isinstance(self.litellm_params.get("model"), str):
            raise ValueError(
                "litellm_params.model is required (a provider-prefixed name, e.g. openai/gpt-4o)"
            )
        return self

    @property
    def is_mock(self) -> bool:
        return "mock_response" in self.litellm_params


class Budget(BaseModel):
    """Hard limits in USD. ``max_cost_per_agent_day`` caps each named agent's daily spend."""

    model_config = _Strict

    max_cost_per_task: float = Field(gt=0)
    max_cost_per_day: float = Field(gt=0)
    max_cost_per_agent_day: dict[str, float]
    timezone: str = "UTC"
    task_ttl_s: int = Field(default=30 * 86400, gt=0, description="How long a task's spend is kept.")
    prompt_token_margin: float = Field(
        default=1.2,
        ge=1.0,
        description="Reserved prompt tokens = counted tokens x this, since providers' tokenizers differ.",
    )


class LLMSettings(BaseModel):
    model_config = _Strict

    default_model: str
    fallback_models: list[str]
    context_window_fallbacks: dict[str, list[str]] = {}
    content_policy_fallbacks: dict[str, list[str]] = {}
    temperature: float = Field(ge=0, le=2)
    max_tokens: int = Field(gt=0)
    timeout: float = Field(gt=0, description="Seconds per provider attempt.")
    deadline_s: float = Field(default=120, gt=0, description="Total seconds per request, all attempts.")
    num_retries: int = Field(ge=0, le=10)
    retry_initial_delay_s: float = Field(default=0.5, ge=0)
    retry_max_delay_s: float = Field(default=8.0, ge=0)
    cache_ttl: int = Field(ge=0, description="Seconds; 0 disables the response cache.")
    cache_namespace: Literal["agent", "shared"] = "agent"
    agent_models: dict[str, str]
    budget: Budget
    offline: bool = Field(default=False, description="Allow litellm mock responses (the offline profile).")
    models: list[Deployment] = Field(min_length=1)

    @property
    def model_names(self) -> set[str]:
        return {d.model_name for d in self.models}

    def chain_for(self, model: str) -> list[str]:
        """The model and its general fallbacks, in order, without repeats."""
        return list(dict.fromkeys([model, *self.fallback_models]))

    def reachable_models(self, model: str) -> list[str]:
        """Every model a request for ``model`` may end up calling, fallbacks of all kinds included."""
        chain = self.chain_for(model)
        for name in list(chain):
            chain += self.context_window_fallbacks.get(name, []) + self.content_policy_fallbacks.get(name, [])
        return list(dict.fromkeys(chain))


class RedisSettings(BaseModel):
    model_config = _Strict

    url: SecretStr
    cache_url: SecretStr | None = Field(
        default=None, description="A separate Redis for the response cache (default: url)."
    )
    key_prefix: str = Field(min_length=1)
    socket_timeout_s: float = Field(gt=0)
    connect_timeout_s: float = Field(gt=0)
    result_ttl_s: int = Field(default=86400, gt=0, description="How long answers are kept for idempotency.")


class BusSettings(BaseModel):
    model_config = _Strict

    url: SecretStr
    request_queue: str = Field(min_length=1)
    results_exchange: str = Field(min_length=1)
    dead_letter_exchange: str = Field(min_length=1)
    dead_letter_queue: str = Field(min_length=1)
    prefetch: int = Field(gt=0, le=2000, description="Deliveries in flight per worker = its concurrency.")
    delivery_limit: int = Field(gt=0, description="Deliveries before the broker dead-letters a message.")
    heartbeat_s: int = Field(default=30, gt=0)
    drain_timeout_s: float = Field(default=30, gt=0)
    consumer_recovery_s: float = Field(
        default=60,
        gt=0,
        description="Seconds the consumer may stay cancelled while connected before the worker exits 1.",
    )
    max_body_bytes: int = Field(default=1_048_576, gt=0)


class ObserveSettings(BaseModel):
    """The HTTP endpoint (``/metrics``, ``/livez``, ``/readyz``) and what logs may contain."""

    model_config = _Strict

    host: str = Field(min_length=1, description="Interface to listen on; 0.0.0.0 for Kubernetes probes.")
    port: int = Field(ge=0, le=65535, description="0 picks a free port (logged in worker.ready).")
    log_prompts_and_responses: bool = Field(
        default=False, description="Put prompts and answers in the request.done line (debugging only)."
    )


class Settings(BaseModel):
    model_config = _Strict

    llm: LLMSettings
    redis: RedisSettings
    bus: BusSettings
    observe: ObserveSettings
    config_dir: Path

    @property
    def offline(self) -> bool:
        return self.llm.offline


def _read(path: Path, top_key: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(str(path), top_key, "file not found (pass --config DIR or set WORKER_CONFIG_DIR)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), top_key, f"not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get(top_key), dict):
        raise ConfigError(str(path), top_key, f"expected a mapping under the top key '{top_key}:'")
    extra = set(data) - {top_key}
    if extra:
        raise ConfigError(str(path), sorted(extra)[0], f"unknown top key (only '{top_key}:' belongs here)")
    section: dict[str, Any] = data[top_key]
    return section


def _env_refs(value: Any) -> list[str]:
    """Every ``os.environ/NAME`` reference inside a nested value."""
    if isinstance(value, str) and value.startswith(ENV_PREFIX):
        return [value[len(ENV_PREFIX) :]]
    if isinstance(value, Mapping):
        return [ref for v in value.values() for ref in _env_refs(v)]
    if isinstance(value, list):
        return [ref for v in value for ref in _env_refs(v)]
    return []


def env_secret_values(value: Any, environ: Mapping[str, str] = os.environ) -> list[str]:
    """The values of every ``os.environ/NAME`` reference inside ``value``: the secrets it holds."""
    return [environ[ref] for ref in _env_refs(value) if ref in environ]


def resolve_secrets(value: Any, environ: Mapping[str, str] = os.environ) -> Any:
    """Replace every ``os.environ/NAME`` inside ``value`` by the variable's value."""
    if isinstance(value, str) and value.startswith(ENV_PREFIX):
        return environ[value[len(ENV_PREFIX) :]]
    if isinstance(value, Mapping):
        return {k: resolve_secrets(v, environ) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_secrets(v, environ) for v in value]
    return value


def _validation_error(file: Path, top_key: str, exc: ValidationError) -> ConfigError:
    first = exc.errors()[0]
    key = ".".join([top_key, *(str(p) for p in first["loc"])])
    problem = first["msg"]
    if first["type"] == "missing":
        problem = "required key is missing"
    elif "input" in first and first["type"] not in ("extra_forbidden",):
        problem = f"{problem} (got {first['input']!r})"[:300]
    if len(exc.errors()) > 1:
        problem += f" (and {len(exc.errors()) - 1} more problem(s) in this file)"
    return ConfigError(str(file), key, problem)


def _check_llm(file: Path, llm: LLMSettings, environ: Mapping[str, str]) -> None:
    """Cross-field rules: every model named anywhere exists; mocks only offline; secrets are set."""
    names = llm.model_names
    references = [("llm.default_model", llm.default_model)]
    references += [(f"llm.fallback_models.{i}", name) for i, name in enumerate(llm.fallback_models)]
    references += [(f"llm.agent_models.{agent}", name) for agent, name in llm.agent_models.items()]
    for field in ("context_window_fallbacks", "content_policy_fallbacks"):
        for src, targets in getattr(llm, field).items():
            references += [(f"llm.{field}.{src}", name) for name in [src, *targets]]
    for key, name in references:
        if name not in names:
            raise ConfigError(
                str(file), key, f"'{name}' is not among llm.models (known: {', '.join(sorted(names))})"
            )
    for i, deployment in enumerate(llm.models):
        key = f"llm.models.{i}.litellm_params"
        if deployment.is_mock and not llm.offline:
            raise ConfigError(
                str(file), f"{key}.mock_response", "mock responses are only allowed with 'offline: true'"
            )
        missing = [ref for ref in _env_refs(deployment.litellm_params) if ref not in environ]
        if missing:
            raise ConfigError(
                str(file),
                key,
                f"environment variable {missing[0]} is not set (read as os.environ/{missing[0]})",
            )


_SECTIONS: dict[str, type[BaseModel]] = {
    "llm": LLMSettings,
    "redis": RedisSettings,
    "bus": BusSettings,
    "observe": ObserveSettings,
}


def load_settings(config_dir: Path | str | None = None, environ: Mapping[str, str] = os.environ) -> Settings:
    """Read and validate the config files; raise :class:`ConfigError` on the first problem."""
    folder = Path(config_dir or environ.get("WORKER_CONFIG_DIR") or DEFAULT_CONFIG_DIR)
    sections: dict[str, Any] = {}
    for name in _SECTIONS:
        path = folder / f"{name}.yaml"
        raw = _read(path, name)
        if name == "redis" and environ.get("REDIS_URL"):
            raw = {**raw, "url": environ["REDIS_URL"]}
        if name == "bus" and environ.get("AMQP_URL"):
            raw = {**raw, "url": environ["AMQP_URL"]}
        if name == "observe" and environ.get("OBSERVE_PORT"):
            raw = {**raw, "port": environ["OBSERVE_PORT"]}
        model = _SECTIONS[name]
        try:
            sections[name] = model.model_validate(raw)
        except ValidationError as exc:
            raise _validation_error(path, name, exc) from None
    _check_llm(folder / "llm.yaml", sections["llm"], environ)
    return Settings(config_dir=folder, **sections)


def redact_url(url: str) -> str:
    """``amqp://user:secret@host/`` -> ``amqp://user:***@host/``, for logs."""
    return re.sub(r"://([^:/@]*):[^@]*@", r"://\1:***@", url)
