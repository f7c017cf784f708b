"""Loading and validating ``config/*.yaml`` once, at start-up.

Five files, each with one top key: ``llm.yaml`` (``llm:``), ``redis.yaml`` (``redis:``),
``bus.yaml`` (``bus:``), ``observe.yaml`` (``observe:``) and ``callers.yaml`` (``callers:``).
``--config DIR`` or ``WORKER_CONFIG_DIR`` picks the folder; ``AMQP_URL`` and ``REDIS_URL``
override the files' URLs (``AMQP_URL`` may list a cluster's brokers joined by ``;``; with
Sentinel, ``REDIS_URL`` lends the primary's password and database), ``AMQP_PASSWORD_FILE`` gives
the brokers' password from a file (a mounted secret),
``OBSERVE_PORT`` and ``OBSERVE_HOST`` the HTTP endpoint. Every problem becomes a :class:`ConfigError` naming
the file, the key and what was expected, so the process stops with one clear line.

Secrets are never held here: a value ``os.environ/NAME`` stays a reference, is checked to exist
at load time, and is resolved only where it is used (:func:`resolve_secrets`).
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from worker.boundary.urls import parse_host_entry
from worker.endpoints import PASSWORD_FILE_VAR, broker_url_list, check_bus, check_redis, with_broker_password
from worker.errors import ConfigError
from worker.messages import MAX_EMBEDDING_INPUTS

ENV_PREFIX = "os.environ/"
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
_Strict = ConfigDict(extra="forbid")


class ModelInfo(BaseModel):
    """Per-deployment metadata; the two prices (USD per token) are required."""

    model_config = ConfigDict(extra="allow")

    input_cost_per_token: float = Field(
        ge=0, description="USD per prompt token; the ledger charges and reserves with it, never a guess."
    )
    output_cost_per_token: float = Field(
        ge=0, description="USD per completion token (thinking tokens too, unless priced below)."
    )
    cache_read_input_token_cost: float | None = Field(
        default=None,
        ge=0,
        description="USD per prompt token read from the provider's cache; unset: input price.",
    )
    cache_creation_input_token_cost: float | None = Field(
        default=None,
        ge=0,
        description="USD per prompt token written to the provider's cache; unset: input price.",
    )
    output_cost_per_reasoning_token: float | None = Field(
        default=None, ge=0, description="USD per thinking token; unset: output price."
    )
    supports_response_schema: bool | None = Field(
        default=None,
        description="Whether `json_schema` requests may use this deployment; unset: litellm's model map.",
    )
    mode: Literal["chat", "embedding"] = Field(
        default="chat",
        description="`embedding` for an embedding model (named only in `llm.embedding`; its output price "
        "is 0), `chat` for every other.",
    )


class Deployment(BaseModel):
    """One deployment of a model group (an entry of litellm Router's ``model_list``, in its form)."""

    model_config = _Strict

    model_name: str = Field(
        min_length=1, description="The name requests, `agent_models` and the fallback lists use."
    )
    litellm_params: dict[str, Any] = Field(
        description="litellm's call parameters: `model` (provider-prefixed, required), `api_key` "
        "(`os.environ/NAME`), `api_base`, `mock_response` (only with `llm.offline: true`)."
    )
    model_info: ModelInfo = Field(description="This deployment's prices.")

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
    """Hard limits in USD. ``max_cost_per_agent_day`` caps each named agent's daily spend; an agent
    not named there is refused unless ``max_cost_per_unconfigured_agent_day`` gives it a cap."""

    model_config = _Strict

    max_cost_per_task: float = Field(gt=0, description="USD per `task_id`, all of that task's requests.")
    max_cost_per_day: float = Field(gt=0, description="USD per day, every agent together.")
    max_cost_per_agent_day: dict[str, float] = Field(
        description="USD per day for each agent named here; an agent not listed is refused (`forbidden`) "
        "unless `max_cost_per_unconfigured_agent_day` is set."
    )
    max_cost_per_unconfigured_agent_day: float | None = Field(
        default=None,
        gt=0,
        description="USD per day for each agent not in `max_cost_per_agent_day`; unset: such agents "
        "are refused.",
    )
    require_task_id: list[str] = Field(
        default=[],
        description="Agents (`*` for all) whose requests must carry a `task_id`, so that no request of "
        "theirs escapes the task budget; one without is answered `invalid`.",
    )
    timezone: str = Field(default="UTC", description="IANA time zone in which a budget day starts.")
    task_ttl_s: int = Field(default=30 * 86400, gt=0, description="How long a task's spend is kept.")
    prompt_token_margin: float = Field(
        default=1.2,
        ge=1.0,
        description="Reserved prompt tokens = counted tokens x this, since providers' tokenizers differ.",
    )


def _host_entry(entry: str) -> str:
    parse_host_entry(entry)  # ValueError saying what an entry looks like
    return entry


ImageType = Literal["image/png", "image/jpeg", "image/gif", "image/webp"]


class RemoteImageSettings(BaseModel):
    """Image URLs the worker fetches itself and inlines as ``data:`` URIs (worker/boundary/fetch.py);
    with no ``hosts`` (the default), every remote URL is refused."""

    model_config = _Strict

    hosts: list[Annotated[str, AfterValidator(_host_entry)]] = Field(
        default=[],
        description="https hosts image URLs may name: `images.example.com` (that name), "
        "`*.example.com` (any name under it, not itself), each optionally `:PORT` (default 443). "
        "Host names only, lower case, IDN in xn-- form. Empty: every remote URL is answered `invalid`.",
    )
    max_bytes: int = Field(
        default=4_194_304,
        gt=0,
        le=20_971_520,
        description="Bytes one image may have; a larger Content-Length, or body, is refused.",
    )
    timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=60,
        description="Seconds for all of one request's fetches together (every redirect, connection "
        "and byte); the request's own deadline cuts it shorter.",
    )
    max_redirects: int = Field(
        default=3, ge=0, le=10, description="Redirects followed per image, each one checked like the URL."
    )
    max_per_request: int = Field(default=4, gt=0, le=16, description="Image URLs one request may hold.")
    content_types: list[ImageType] = Field(
        default=["image/png", "image/jpeg", "image/gif", "image/webp"],
        min_length=1,
        description="Content-Type values accepted; the body's first bytes must match its type.",
    )
    ca_file: str | None = Field(
        default=None,
        min_length=1,
        description="A PEM file of the CAs that image hosts' certificates are verified against, "
        "instead of the system's (a private CA); unset: the system's.",
    )

    @field_validator("ca_file")
    @classmethod
    def _loadable(cls, path: str | None) -> str | None:
        if path is not None:
            try:
                ssl.create_default_context(cafile=path)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"cannot load CA certificates from {path!r}: {exc}") from None
        return path


class EmbeddingSettings(BaseModel):
    """Embedding requests (``EmbeddingRequest``): which models, and how large a batch may be."""

    model_config = _Strict

    default_model: str = Field(description="The embedding model of a request that names none.")
    fallback_models: list[str] = Field(
        default=[], description="Embedding models tried in order once the request's model has failed."
    )
    agent_models: dict[str, str] = Field(
        default={}, description="Agent -> the embedding model its requests use by default."
    )
    max_inputs: int = Field(
        default=96,
        ge=1,
        le=MAX_EMBEDDING_INPUTS,
        description="Texts per request (Cohere takes 96 per call, Gemini 100, OpenAI 2048).",
    )
    max_input_tokens: int = Field(
        default=8192, gt=0, description="Tokens per text, as counted (OpenAI's per-input limit)."
    )
    max_total_tokens: int = Field(
        default=300_000, gt=0, description="Tokens per request, all texts together (OpenAI's limit)."
    )

    def chain_for(self, model: str) -> list[str]:
        """The model and its fallbacks, in order, without repeats."""
        return list(dict.fromkeys([model, *self.fallback_models]))


class LLMSettings(BaseModel):
    model_config = _Strict

    default_model: str = Field(description="The model of a request that names none and whose agent has none.")
    fallback_models: list[str] = Field(
        description="Tried in order once the request's model has failed (after its retries)."
    )
    context_window_fallbacks: dict[str, list[str]] = Field(
        default={}, description="Model -> models with larger windows, tried first on a context-window error."
    )
    content_policy_fallbacks: dict[str, list[str]] = Field(
        default={}, description="Model -> models tried first when a provider refuses on content policy."
    )
    temperature: float = Field(ge=0, le=2, description="Used when the request sets none.")
    max_tokens: int = Field(
        gt=0, description="Completion limit when the request sets none; the budget reserves for it."
    )
    timeout: float = Field(gt=0, description="Seconds per provider attempt.")
    deadline_s: float = Field(default=120, gt=0, description="Total seconds per request, all attempts.")
    num_retries: int = Field(
        ge=0, le=10, description="Retries of retryable errors (429, 408/409, 5xx, timeouts) per model."
    )
    retry_initial_delay_s: float = Field(
        default=0.5, ge=0, description="First backoff; it doubles per retry, with jitter, unless Retry-After."
    )
    retry_max_delay_s: float = Field(default=8.0, ge=0, description="Longest backoff between two attempts.")
    cache_ttl: int = Field(ge=0, description="Seconds; 0 disables the response cache.")
    cache_namespace: Literal["agent", "shared"] = Field(
        default="agent", description="`agent` keeps each agent's cached answers apart; `shared` pools them."
    )
    agent_models: dict[str, str] = Field(description="Agent -> the model its requests use by default.")
    budget: Budget = Field(description="Hard limits, enforced across every replica before each call.")
    offline: bool = Field(default=False, description="Allow litellm mock responses (the offline profile).")
    batch_rate_share: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="Of a rate-limited deployment's rpm/tpm, the part batch calls may use; the rest "
        "is kept for interactive calls.",
    )
    models: list[Deployment] = Field(
        min_length=1, description="One entry per deployment, in the form of litellm Router's `model_list`."
    )
    remote_images: RemoteImageSettings = Field(
        default=RemoteImageSettings(),
        description="Image URLs the worker may fetch itself (none by default); see below.",
    )
    embedding: EmbeddingSettings | None = Field(
        default=None,
        description="Embedding requests; unset: they are answered `invalid` (no embedding model).",
    )

    @property
    def model_names(self) -> set[str]:
        return {d.model_name for d in self.models}

    def names_of_mode(self, mode: str) -> set[str]:
        """The model groups of ``mode`` (``chat`` or ``embedding``)."""
        return {d.model_name for d in self.models if d.model_info.mode == mode}

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
    """One Redis by ``url``, or the primary that Sentinel names (``sentinel`` + ``sentinel_service``;
    then ``url``, if given, only lends its password and database number)."""

    model_config = _Strict

    url: SecretStr | None = Field(
        default=None,
        description="The Redis of the ledger, the result store and the cache; `REDIS_URL` overrides it. "
        "With Sentinel, it lends only its password and database.",
    )
    sentinel: list[str] = Field(
        default=[], description="Sentinel addresses, host:port; the worker follows the primary they name."
    )
    sentinel_service: str | None = Field(default=None, min_length=1, description="Sentinel's master name.")
    sentinel_password: SecretStr | None = Field(default=None, description="The Sentinels' own password.")
    cache_url: SecretStr | None = Field(
        default=None, description="A separate Redis for the response cache (default: url)."
    )
    key_prefix: str = Field(
        min_length=1, description="Prefix of every key; on Redis Cluster a hash tag such as `{llmw}:`."
    )
    socket_timeout_s: float = Field(gt=0, description="Seconds a command may take before it fails.")
    connect_timeout_s: float = Field(gt=0, description="Seconds to open a connection before it fails.")
    result_ttl_s: int = Field(
        default=3600,
        gt=0,
        description="How long answers are kept for idempotency: at least the redelivery window "
        "(llm.deadline_s x bus.delivery_limit), plus the time a client may re-publish after a time-out.",
    )
    memory_refuse_at: float = Field(
        default=0.90, gt=0, le=1, description="Fraction of maxmemory from which new calls are refused."
    )
    memory_resume_at: float = Field(
        default=0.85, gt=0, le=1, description="Fraction of maxmemory below which calls are accepted again."
    )
    cache_stop_at: float = Field(
        default=0.75,
        gt=0,
        le=1,
        description="Fraction of maxmemory from which answers are no longer cached in the ledger's Redis.",
    )

    settle_wait_replicas: int = Field(
        default=0, ge=0, le=5, description="WAIT for this many replicas after each settle (0: do not wait)."
    )
    settle_wait_timeout_ms: int = Field(
        default=100, gt=0, le=10_000, description="The longest a settle's WAIT holds the reply, in ms."
    )

    @model_validator(mode="after")
    def _ordered_watermarks(self) -> RedisSettings:
        if not self.cache_stop_at <= self.memory_resume_at < self.memory_refuse_at:
            raise ValueError("expected cache_stop_at <= memory_resume_at < memory_refuse_at")
        return self


class BusSettings(BaseModel):
    """``url`` is one broker, or a list of a cluster's nodes (``AMQP_URL``: several joined by ``;``),
    tried in the order ``failover`` says when the one in use is lost (worker/broker_failover.py)."""

    model_config = _Strict

    url: SecretStr = Field(
        description="The broker, or a list of the cluster's brokers (the first is what one-shot commands "
        "use); `AMQP_URL` overrides it, several joined by `;`."
    )
    urls: list[SecretStr] = Field(default=[], description="Every broker; filled from url.")
    failover: Literal["shuffle", "in_order"] = Field(
        default="shuffle",
        description="Which broker a worker tries first: a random one (then round the list), or the first.",
    )
    request_queue: str = Field(min_length=1, description="Quorum queue that agents publish requests to.")
    results_exchange: str = Field(
        min_length=1, description="Topic exchange for results of requests without `reply_to` (key: agent)."
    )
    dead_letter_exchange: str = Field(
        min_length=1, description="Fanout exchange bound to the dead-letter queue."
    )
    dead_letter_queue: str = Field(min_length=1, description="Quorum queue of dead letters (`dlq` commands).")
    prefetch: int = Field(gt=0, le=2000, description="Deliveries in flight per worker = its concurrency.")
    batch_queue: str | None = Field(
        default=None,
        min_length=1,
        description="The queue of batch requests (default: request_queue + '.batch'), served beside the "
        "interactive request_queue with a prefetch of its own, so batch work never delays a person.",
    )
    batch_prefetch: int = Field(
        default=16, gt=0, le=2000, description="Batch deliveries in flight per worker (beside prefetch)."
    )
    delivery_limit: int = Field(gt=0, description="Deliveries before the broker dead-letters a message.")
    heartbeat_s: int = Field(default=30, gt=0, description="AMQP heartbeat interval, seconds.")
    stream_interval_ms: int = Field(
        default=30,
        ge=0,
        le=1000,
        description="A streamed answer's pieces are gathered this long between two chunk messages "
        "(the first goes at once).",
    )
    drain_timeout_s: float = Field(
        default=30,
        gt=0,
        description="Seconds SIGTERM waits for calls in flight; keep it above `llm.deadline_s`.",
    )
    consumer_recovery_s: float = Field(
        default=60,
        gt=0,
        description="Seconds the consumer may stay cancelled while connected before the worker exits 1.",
    )
    max_body_bytes: int = Field(
        default=1_048_576, gt=0, description="Larger requests are answered `invalid`."
    )

    @model_validator(mode="after")
    def _every_broker(self) -> BusSettings:
        if not self.urls:  # one broker (bus.url a string): the list of one
            self.urls = [self.url]
        return self

    @property
    def batch_queue_name(self) -> str:
        return self.batch_queue or f"{self.request_queue}.batch"


class ObserveSettings(BaseModel):
    """The HTTP endpoint (``/metrics``, ``/livez``, ``/readyz``) and what logs may contain."""

    model_config = _Strict

    host: str = Field(
        min_length=1,
        description="Interface to listen on; 0.0.0.0 for Kubernetes probes. `OBSERVE_HOST` overrides it.",
    )
    port: int = Field(
        ge=0,
        le=65535,
        description="0 picks a free port (logged in worker.ready); `OBSERVE_PORT` overrides it.",
    )
    log_prompts_and_responses: bool = Field(
        default=False, description="Put prompts and answers in the request.done line (debugging only)."
    )


class CallerGrant(BaseModel):
    """What one broker user may do."""

    model_config = _Strict

    agents: list[str] = Field(
        min_length=1, description="The agents this user may act as (a request's `agent`); `*` for any."
    )
    models: list[str] = Field(
        default=[],
        description="The models it may name in a request's `model`; `*` for any. Without `model`, a "
        "request gets its agent's configured model, which needs no grant.",
    )


class CallersSettings(BaseModel):
    """Who may call: broker users (the AMQP `user_id` RabbitMQ validated) and what each may do."""

    model_config = _Strict

    mode: Literal["enforce", "development"] = Field(
        default="enforce",
        description="`development`: any publisher may act as any agent and name any model (the "
        "offline profile; logged loudly at start-up). `enforce`: only the grants below.",
    )
    users: dict[str, CallerGrant] = Field(
        default={},
        description="Broker user name (no `.`, which would let one user's reply prefix cover "
        "another's queues) -> its grant; a user not listed may do nothing.",
    )
    reply_queue_prefix: str = Field(
        default="llm.reply.{user}.",
        pattern=r"\{user\}",
        description="`reply_to` may name Direct Reply-To (`amq.rabbitmq.reply-to...`) or a queue whose "
        "name starts with this, `{user}` being the publisher's broker user (the queues LLMClient "
        "declares); any other `reply_to` is refused and dead-lettered (`ReplyToRefused`).",
    )

    workers: list[str] = Field(
        default=[],
        description="The broker users workers publish as. A dead letter published by one of them "
        "(its AMQP `user_id`, validated by RabbitMQ) names the request's caller in `x-dlq-user-id`, "
        "and `dlq replay` sends the request again on that caller's behalf; a dead letter anyone "
        "else put in the queue is replayed as its own publisher.",
    )
    replayers: list[str] = Field(
        default=[],
        description="The broker users whose replays (`dlq replay`) are served as the request's "
        "original caller (header `x-replay-caller`): its grant, its reply queue, its idempotency. "
        "From any other publisher that header is ignored.",
    )

    @model_validator(mode="after")
    def _replayers_are_callers(self) -> CallersSettings:
        if self.mode != "enforce" or not self.replayers:
            return self
        missing = [user for user in self.replayers if user not in self.users]
        if missing:
            raise ValueError(f"replayers {missing}: each must also be a user here (users.{missing[0]})")
        if not self.workers:
            raise ValueError(
                "replayers is set but workers is not: name the workers' broker users (workers: "
                "[llm-worker]), or a replay of their dead letters would be served as the worker"
            )
        return self

    @field_validator("users")
    @classmethod
    def _no_dot_in_user_names(cls, users: dict[str, CallerGrant]) -> dict[str, CallerGrant]:
        for name in users:
            if "." in name or "{" in name or "}" in name:
                raise ValueError(f"user {name!r}: a broker user name here may not hold '.', '{{' or '}}'")
        return users


class Settings(BaseModel):
    model_config = _Strict

    llm: LLMSettings
    redis: RedisSettings
    bus: BusSettings
    observe: ObserveSettings
    callers: CallersSettings
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
    _check_modes(file, llm, references)
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


def _check_modes(file: Path, llm: LLMSettings, chat_references: list[tuple[str, str]]) -> None:
    """Chat settings name chat models, ``llm.embedding`` names embedding models: a chat request sent
    to an embedding model (or the reverse) fails at the provider, after its budget was reserved."""
    embedding = llm.embedding
    references = [(key, name, "chat") for key, name in chat_references]
    if embedding is not None:
        references.append(("llm.embedding.default_model", embedding.default_model, "embedding"))
        references += [
            (f"llm.embedding.fallback_models.{i}", name, "embedding")
            for i, name in enumerate(embedding.fallback_models)
        ]
        references += [
            (f"llm.embedding.agent_models.{agent}", name, "embedding")
            for agent, name in embedding.agent_models.items()
        ]
    for key, name, mode in references:
        of_mode = llm.names_of_mode(mode)
        if name not in of_mode:
            known = ", ".join(sorted(of_mode)) or "none"
            raise ConfigError(
                str(file),
                key,
                f"'{name}' is not a {mode} model (model_info.mode: {mode}; {mode} models: {known})",
            )


# The five files and their models, in load order (also what worker.reference documents).
SECTIONS: dict[str, type[BaseModel]] = {
    "llm": LLMSettings,
    "redis": RedisSettings,
    "bus": BusSettings,
    "observe": ObserveSettings,
    "callers": CallersSettings,
}


def load_settings(config_dir: Path | str | None = None, environ: Mapping[str, str] = os.environ) -> Settings:
    """Read and validate the config files; raise :class:`ConfigError` on the first problem."""
    folder = Path(config_dir or environ.get("WORKER_CONFIG_DIR") or DEFAULT_CONFIG_DIR)
    sections: dict[str, Any] = {}
    for name in SECTIONS:
        path = folder / f"{name}.yaml"
        raw = _read(path, name)
        if name == "redis" and environ.get("REDIS_URL"):
            raw = {**raw, "url": environ["REDIS_URL"]}
        if name == "bus" and environ.get("AMQP_URL"):
            raw = {k: v for k, v in raw.items() if k != "urls"} | {"url": environ["AMQP_URL"]}
        if name == "bus":
            raw = broker_url_list(str(path), raw)
        if name == "bus" and environ.get(PASSWORD_FILE_VAR):
            raw = with_broker_password(raw, environ[PASSWORD_FILE_VAR])
        if name == "observe" and environ.get("OBSERVE_PORT"):
            raw = {**raw, "port": environ["OBSERVE_PORT"]}
        if name == "observe" and environ.get("OBSERVE_HOST"):
            raw = {**raw, "host": environ["OBSERVE_HOST"]}
        model = SECTIONS[name]
        try:
            sections[name] = model.model_validate(raw)
        except ValidationError as exc:
            raise _validation_error(path, name, exc) from None
    _check_llm(folder / "llm.yaml", sections["llm"], environ)
    check_bus(str(folder / "bus.yaml"), sections["bus"])
    check_redis(str(folder / "redis.yaml"), sections["redis"])
    _check_retention(folder / "redis.yaml", sections["redis"], sections["llm"], sections["bus"])
    return Settings(config_dir=folder, **sections)


def _check_retention(file: Path, redis: RedisSettings, llm: LLMSettings, bus: BusSettings) -> None:
    """An answer must outlive every redelivery of its request, or a redelivery is called (and
    charged) again (issue #22)."""
    window_s = llm.deadline_s * bus.delivery_limit
    if redis.result_ttl_s < window_s:
        raise ConfigError(
            str(file),
            "redis.result_ttl_s",
            f"{redis.result_ttl_s} s is shorter than the redelivery window (llm.deadline_s "
            f"{llm.deadline_s:g} x bus.delivery_limit {bus.delivery_limit} = {window_s:g} s); "
            f"raise it to at least {window_s:g}",
        )


_SECRET_PARAM = re.compile(r"key|token|secret|password|credential", re.IGNORECASE)


def known_secrets(settings: Settings, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Every secret value this worker holds: each deployment's keys and tokens, whether written
    in ``llm.yaml`` or referenced as ``os.environ/NAME``, every referenced variable's value, and
    the passwords in every broker and Redis URL and the Sentinels' password. The one list the
    redactor is built from."""
    values: list[str] = []
    for deployment in settings.llm.models:
        params = resolve_secrets(deployment.litellm_params, environ)
        values += [v for k, v in params.items() if isinstance(v, str) and _SECRET_PARAM.search(k)]
        values += env_secret_values(deployment.litellm_params, environ)
    r = settings.redis
    urls = [settings.bus.url, *settings.bus.urls, *(u for u in (r.url, r.cache_url) if u is not None)]
    for url in urls:
        password = urlsplit(url.get_secret_value()).password
        # as written in the URL and as sent to the server (AMQP_PASSWORD_FILE's are percent-encoded)
        values += list({password, unquote(password)}) if password else []
    if r.sentinel_password is not None:
        values.append(r.sentinel_password.get_secret_value())
    return values
