"""A call to a model group with retries, fallbacks and a total deadline, through ``litellm.acompletion``.

Why our own retry loop around ``litellm.acompletion(num_retries=0)`` rather than litellm's Router:
the Router's ``timeout`` is per attempt and its backoff sleeps ignore any overall deadline, so a
hung provider costs ``retries x timeout`` before a fallback (failoverbench measured ~96 s), and a
cancelled call cannot say how many attempts it made. Here every attempt is bounded by the time
left, backoff never sleeps past the deadline, Retry-After is honoured, and the result counts
attempts and fallbacks exactly. The pick of a deployment within a group and its cooldowns are
:mod:`worker.routing`'s (the Router's layers cost 0.24 ms of CPU per call, issue #21); litellm
owns provider translation. The provider SDK's own retries are off (``max_retries=0``: with them
on, a bare ``num_retries=3`` on a 429 was measured at 7 upstream calls, since litellm's retries
stack on the SDK's; CHANGELOG 0.1.0).

litellm's process-wide settings are set once, here, in :func:`configure_litellm`.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import importlib
import logging
import math
import os
import random
import sys
import time
from array import array
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import Any, Protocol

# Before litellm's import: otherwise it fetches its price map from the network at import.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm
import structlog

from worker import llm_setup, openai_body, tracing
from worker.errors import ConfigError, InvalidRequest, ProviderError, StreamBroken, from_litellm
from worker.llm_stream import STREAM_KWARGS, DeltaSink, StreamProgress, assemble, read_stream
from worker.messages import EmbeddingRequest, JSONSchemaFormat, LLMRequest, ThinkingBlock, Tokens, ToolCall
from worker.routing import Routes, Target
from worker.secrets import Redactor
from worker.settings import Deployment, LLMSettings, resolve_secrets
from worker.throttle import Admission, Throttle, no_room_error

log = structlog.get_logger("worker.llm")

# Providers whose litellm 1.82.6 implementation cannot be billed: measured by bench/litellm_paths.py,
# aiohttp_openai/ costs half the CPU of openai/ per call but returns no usage (every call would cost
# 0 and escape the budgets) and turns every HTTP error into a retryable connection error.
_UNBILLABLE_PROVIDERS = {
    "aiohttp_openai": "returns no token usage in this litellm release (calls would cost 0 and escape "
    "the budgets) and reports 4xx errors as connection errors: use openai/ with the same api_base",
}
_FORBIDDEN_PARAMS = ("num_retries", "max_retries", "fallbacks")
# litellm's and the provider SDK's retries are off: ours decide. _is_litellm_internal_call skips
# litellm's success-logging task and failure handlers (we register no callbacks; they cost 0.09 ms
# of CPU per call, bench/litellm_paths.py). It is private to litellm 1.82.6 (utils.py pops it in
# its async wrapper); tests/llm/test_routing.py checks no provider ever receives it.
_ONE_TRY = {"num_retries": 0, "max_retries": 0, "_is_litellm_internal_call": True}


def configure_litellm() -> None:
    """litellm's global state, set once: no callbacks, no stdout noise, no retries of its own."""
    litellm.suppress_debug_info = True
    litellm.num_retries = None
    litellm.success_callback = []
    litellm.failure_callback = []
    litellm.callbacks = []
    litellm.cache = None
    # OpenAI embeddings read `max_retries or litellm.DEFAULT_MAX_RETRIES` (llms/openai/openai.py in
    # 1.82.6), so max_retries=0 became the SDK's 2 retries: one 429 was two upstream
    # calls inside one attempt of ours (tests/embeddings/test_path.py).
    litellm.DEFAULT_MAX_RETRIES = 0
    # Every call is priced from the configured prices (Price); the cost litellm works out for each
    # response's _hidden_params (its one caller of response_cost_calculator, in 1.82.6) is never
    # read. 5.5 % of a loaded worker's py-spy samples, but 0.06 ms of CPU per call measured alone
    # (bench/litellm_paths.py: 2.95 -> 2.89 ms).
    litellm.response_cost_calculator = _no_litellm_cost
    # The openai SDK's walk of each chat body, skipped for plain JSON bodies it would return as
    # they are: 1.60 -> 1.33 ms of litellm's CPU per call (worker/openai_body.py).
    openai_body.install()
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "litellm"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _no_litellm_cost(**_: Any) -> None:
    return None


PICO_PER_NANO = 1000


def pico_per_token(usd: float) -> int:
    """A configured USD-per-token price as integer pico-dollars (1e-12 USD) per token, rounded up.

    Exact for every price written with at most 12 decimals (``2.5e-06`` -> 2_500_000), which a
    float multiplication is not: the configured text is what is converted, not its binary value.
    """
    return int((Decimal(repr(usd)) * 10**12).to_integral_value(ROUND_CEILING))


@dataclass(frozen=True)
class Price:
    """Integer pico-dollars per token, by kind of token."""

    input: int
    output: int
    cache_read: int
    cache_write: int
    reasoning: int

    @classmethod
    def of(cls, deployment: Deployment) -> Price:
        info = deployment.model_info

        def or_(value: float | None, default: float) -> int:
            return pico_per_token(default if value is None else value)

        return cls(
            input=pico_per_token(info.input_cost_per_token),
            output=pico_per_token(info.output_cost_per_token),
            cache_read=or_(info.cache_read_input_token_cost, info.input_cost_per_token),
            cache_write=or_(info.cache_creation_input_token_cost, info.input_cost_per_token),
            reasoning=or_(info.output_cost_per_reasoning_token, info.output_cost_per_token),
        )

    def most(self, other: Price) -> Price:
        """The higher of each price."""
        return Price(*(max(a, b) for a, b in zip(self.astuple(), other.astuple(), strict=True)))

    def astuple(self) -> tuple[int, int, int, int, int]:
        return (self.input, self.output, self.cache_read, self.cache_write, self.reasoning)

    def worst_nano(self, prompt_tokens: int, completion_tokens: int) -> int:
        """The most these tokens can cost, in nano-dollars: every prompt token at the dearest prompt
        price (a cache write usually costs more than plain input), every completion token at the
        dearest completion price."""
        pico = prompt_tokens * max(self.input, self.cache_read, self.cache_write)
        pico += completion_tokens * max(self.output, self.reasoning)
        return -(-pico // PICO_PER_NANO)

    def cost_nano(self, tokens: Tokens) -> int:
        """The exact cost of ``tokens`` in nano-dollars, rounded up once (at the end)."""
        plain_prompt = max(tokens.prompt - tokens.cached_prompt - tokens.cache_write, 0)
        plain_completion = max(tokens.completion - tokens.reasoning, 0)
        pico = (
            plain_prompt * self.input
            + tokens.cached_prompt * self.cache_read
            + tokens.cache_write * self.cache_write
            + plain_completion * self.output
            + tokens.reasoning * self.reasoning
        )
        return -(-pico // PICO_PER_NANO)


_NO_PRICE = Price(0, 0, 0, 0, 0)


@dataclass(frozen=True)
class Completion:
    """What one successful LLM call produced."""

    content: str | None
    model: str
    tokens: Tokens
    cost_nano: int
    attempts: int
    fallback_used: bool
    provider_latency_ms: float
    finish_reason: str | None = None
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = None
    thinking_blocks: list[ThinkingBlock] | None = None
    logprobs: dict[str, Any] | None = None


@dataclass(frozen=True)
class Embedded:
    """What one successful embedding call produced: one vector per input, in input order."""

    vectors: list[list[float]]
    model: str
    tokens: Tokens
    cost_nano: int
    attempts: int
    fallback_used: bool
    provider_latency_ms: float


class LLMEvents(Protocol):
    """Told of retries and fallbacks as they happen (``observe.Metrics`` counts them)."""

    def retry(self, model: str, error: str) -> None: ...

    def fallback(self, from_model: str, to_model: str, error: str) -> None: ...


class _NoEvents:
    def retry(self, model: str, error: str) -> None:
        pass

    def fallback(self, from_model: str, to_model: str, error: str) -> None:
        pass


@dataclass
class _Attempts:
    count: int = 0
    last_error: ProviderError | None = None
    provider_ms: float = 0.0
    tokens: int = 0  # the estimate a rate-limited deployment counts before the call
    share: float = 1.0  # of a rate limit's room this call may take (batch: less)
    sink: DeltaSink | None = None  # a streamed call: where its pieces go
    progress: StreamProgress | None = None  # of the last attempt's stream
    deployment: str | None = None  # the last attempt's deployment id (the one that answered: its price)

    @property
    def streamed(self) -> bool:
        """A piece of the answer went out: from now on no retry and no fallback."""
        return self.progress is not None and self.progress.pieces > 0


class LLM:
    """Chooses the model for a request and calls it within the request's deadline."""

    def __init__(
        self,
        settings: LLMSettings,
        routes: Routes,
        *,
        sleep: Any = asyncio.sleep,
        events: LLMEvents | None = None,
        redactor: Redactor | None = None,
        throttle: Throttle | None = None,
    ):
        """``redactor``: the values no error message may carry (a provider may quote the key it got);
        ``throttle``: provider rate limits shared by every replica (groups with rpm/tpm)."""
        self.settings = settings
        self.throttle = throttle
        self._redactor = redactor or Redactor()
        self.routes = routes
        self._sleep = sleep
        self.events: LLMEvents = events or _NoEvents()
        self._counting = asyncio.Semaphore(1)  # large prompts counted off the loop, one at a time
        self._prices = {f"{d.model_name}#{i}": Price.of(d) for i, d in enumerate(settings.models)}
        self._group_prices: dict[str, Price] = {}
        self._litellm_model: dict[str, str] = {}
        self._deployments: dict[str, list[Deployment]] = {}
        for i, d in enumerate(settings.models):
            price = self._prices[f"{d.model_name}#{i}"]
            self._group_prices[d.model_name] = self._group_prices.get(d.model_name, _NO_PRICE).most(price)
            self._litellm_model.setdefault(d.model_name, d.litellm_params["model"])
            self._deployments.setdefault(d.model_name, []).append(d)
        # Deployments whose litellm set-up runs on the event loop, not in a thread (worker/llm_setup.py).
        pure = llm_setup.PURE_SETUP
        self._set_up_inline = {
            f"{d.model_name}#{i}" for i, d in enumerate(settings.models) if _route(d)[1] in pure
        }
        # Groups answered by litellm's mock_response (the offline profile): no provider, no stream to cut.
        self._mocked = {
            g for g, ds in self._deployments.items() if all("mock_response" in d.litellm_params for d in ds)
        }

    @classmethod
    def build(
        cls,
        settings: LLMSettings,
        environ: Mapping[str, str] = os.environ,
        *,
        events: LLMEvents | None = None,
        redactor: Redactor | None = None,
        throttle: Throttle | None = None,
    ) -> LLM:
        """The routes of ``settings.models``, secrets resolved; :class:`ConfigError` on a bad deployment."""
        configure_litellm()
        targets = []
        for i, d in enumerate(settings.models):
            params = d.litellm_params
            for forbidden in _FORBIDDEN_PARAMS:
                if forbidden in params:
                    raise ConfigError(
                        "llm.yaml",
                        f"llm.models.{i}.litellm_params.{forbidden}",
                        "retries and fallbacks are set by llm.num_retries and llm.fallback_models",
                    )
            try:
                route = litellm.get_llm_provider(params["model"], params.get("custom_llm_provider"))
            except Exception as exc:  # noqa: BLE001 - litellm raises assorted types for an unknown provider
                raise ConfigError(
                    "llm.yaml",
                    f"llm.models.{i}.litellm_params.model",
                    f"litellm cannot route '{params['model']}' (use a provider prefix such as "
                    f"openai/, anthropic/, gemini/, cohere_chat/, perplexity/): {exc}",
                ) from None
            provider = route[1]
            if provider in _UNBILLABLE_PROVIDERS:
                raise ConfigError(
                    "llm.yaml",
                    f"llm.models.{i}.litellm_params.model",
                    f"'{provider}/' {_UNBILLABLE_PROVIDERS[provider]}",
                )
            targets.append(Target(f"{d.model_name}#{i}", d.model_name, resolve_secrets(params, environ)))
        return cls(settings, Routes(targets), events=events, redactor=redactor, throttle=throttle)

    async def warm_up(self) -> None:
        """Pay litellm's first-call costs before consuming: lazy imports, tokenizer loads.

        Measured on the 2-core machine: the first litellm call blocked the event loop ~1 s and the
        first token count ~0.5 s, long enough for Redis reads in flight to time out on a fresh
        replica. A mock response goes through litellm's real code path without any network.
        """
        # The openai SDK imports its resources (~450 modules) on a client's first real call; a mock
        # never makes one. Measured: the first OpenAI embedding through a worker took 426 ms, then 15.
        importlib.import_module("openai.resources")
        messages = [{"role": "user", "content": "warm-up"}]
        for model in dict.fromkeys(self._litellm_model.values()):
            litellm.token_counter(model=model, messages=messages)
        params = self.routes.first(self.settings.default_model).params
        await litellm.acompletion(**{**params, "mock_response": "ok"}, messages=messages, **_ONE_TRY)

    # -- model choice and prices -------------------------------------------------------------

    def choose_model(self, request: LLMRequest) -> str:
        """The request's ``model``, else the agent's configured model, else ``default_model``."""
        if request.model is not None:
            if request.model not in self.settings.names_of_mode("chat"):
                known = ", ".join(sorted(self.settings.names_of_mode("chat")))
                raise InvalidRequest(
                    "model", f"'{request.model}' is not a configured model (one of: {known})"
                )
            return request.model
        return self.settings.agent_models.get(request.agent, self.settings.default_model)

    def worst_price(self, model: str) -> Price:
        """The highest price of each kind among every model a call to ``model`` may use."""
        worst = _NO_PRICE
        for name in self.settings.reachable_models(model):
            worst = worst.most(self._group_prices[name])
        return worst

    def worst_embedding_price(self, model: str) -> Price:
        """The highest price of each kind among ``model`` and its embedding fallbacks."""
        assert self.settings.embedding is not None
        worst = _NO_PRICE
        for name in self.settings.embedding.chain_for(model):
            worst = worst.most(self._group_prices[name])
        return worst

    async def prompt_tokens(self, model: str, request: LLMRequest) -> int:
        """:meth:`count_prompt_tokens`, off the event loop for a large prompt, one at a time.

        Counting 1 MiB of text takes ~400 ms of CPU (measured on the 2-core machine): on the loop,
        60 such requests delayed a one-word request by 19 s (issue #16). In a thread the loop
        keeps serving small requests between the GIL's switches; one thread at a time, so that
        large requests queue behind each other rather than take every core from small ones.
        """
        if _prompt_chars(request) <= _INLINE_COUNT_CHARS:
            return self.count_prompt_tokens(model, request)
        async with self._counting:
            return await asyncio.to_thread(self.count_prompt_tokens, model, request)

    def count_prompt_tokens(self, model: str, request: LLMRequest) -> int:
        """Prompt tokens (the tools' definitions included) by litellm's token counter for the
        model's tokenizer.

        Images count at litellm's default size: asked for their real size, the counter downloads
        an image URL (or parses a crafted data: URI) on the event loop (issue #16). Content the
        counter cannot read is the request's fault: :class:`InvalidRequest`, not a crash.
        """
        messages = [m.model_dump(exclude_none=True) for m in request.messages]
        tools = request.chat_params().get("tools")
        try:
            counted = litellm.token_counter(
                model=self._litellm_model[model],
                messages=messages,
                tools=tools,
                use_default_image_token_count=True,
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise InvalidRequest("messages", f"tokens cannot be counted ({type(exc).__name__})") from None
        return int(counted)

    # -- parameters each provider takes ----------------------------------------------------------

    def unsupported(self, group: str, request: LLMRequest) -> list[str]:
        """The request's parameters that some deployment of ``group`` cannot take.

        By litellm's per-provider list (``get_supported_openai_params``); a deployment whose
        ``litellm_params.drop_params`` is true takes them all (litellm drops what it cannot send).
        ``json_schema`` needs a model with response-schema support (``model_info.supports_response_schema``,
        else litellm's model map).
        """
        wanted = list(request.chat_params())
        if not wanted:
            return []
        refused: list[str] = []
        for deployment in self._deployments.get(group, []):
            if deployment.litellm_params.get("drop_params") is True:
                continue
            model, provider = _route(deployment)
            supported = _supported_params(model, provider)
            refused += [p for p in wanted if p not in supported]
            if isinstance(request.response_format, JSONSchemaFormat) and not _takes_schema(
                deployment, model, provider
            ):
                refused.append("response_format.json_schema")
        return list(dict.fromkeys(refused))

    def plan(self, request: LLMRequest, model: str) -> list[str]:
        """The model groups a request may use, in order: ``model`` and its fallbacks, less those that
        cannot take its parameters. Raises :class:`InvalidRequest` naming the parameter when none can."""
        chain = self.settings.chain_for(model)
        usable = [group for group in chain if not self.unsupported(group, request)]
        if not usable:
            refused = self.unsupported(model, request)
            provider = _route(self._deployments[model][0])[1]
            raise InvalidRequest(
                refused[0],
                f"model '{model}' ({provider}) does not support {', '.join(refused)}, nor does any "
                "fallback: remove it, pick another model, or set litellm_params.drop_params: true "
                "on the deployment to drop it",
            )
        return usable

    def max_tokens(self, request: LLMRequest) -> int:
        return request.max_tokens if request.max_tokens is not None else self.settings.max_tokens

    # -- the call ------------------------------------------------------------------------------

    async def complete(
        self,
        request: LLMRequest,
        model: str,
        deadline: float,
        *,
        batch: bool = False,
        on_delta: DeltaSink | None = None,
    ) -> Completion:
        """Call ``model`` (then its fallbacks) until one answers or ``deadline`` (monotonic) passes.

        ``batch`` calls take only ``llm.batch_rate_share`` of a rate-limited deployment's room.
        ``on_delta``: stream the answer, each piece to ``on_delta`` as it comes; a failure before
        the first piece is retried and falls back as any other, one after it raises
        :class:`StreamBroken`. Raises :class:`ProviderError` with the last error when every option
        is exhausted.
        """
        plan = deque(self.plan(request, model))
        tried: list[str] = []
        attempts = _Attempts(share=self.settings.batch_rate_share if batch else 1.0, sink=on_delta)
        if self.throttle is not None and any(self.throttle.throttles(m) for m in plan):
            attempts.tokens = await self.prompt_tokens(model, request) + self.max_tokens(request)
        kwargs = self._call_kwargs(request) | (STREAM_KWARGS if on_delta is not None else {})
        while plan:
            group = plan.popleft()
            if group in tried or self.unsupported(group, request):
                continue
            tried.append(group)
            response = await self._try_group(group, kwargs, deadline, attempts, request.trace_id)
            if response is not None:
                return self._completion(response, group, model, attempts)
            error = attempts.last_error
            assert error is not None
            if attempts.streamed:
                raise self._broken(error, group, model, attempts, kwargs["messages"])
            if error.kind == "DeadlineExceeded":
                break
            special = {
                "ContextWindowExceeded": self.settings.context_window_fallbacks,
                "ContentPolicyViolation": self.settings.content_policy_fallbacks,
            }.get(error.kind, {})
            plan.extendleft(reversed(special.get(group, [])))
            if plan:
                log.info("llm.fallback", from_model=group, to_model=plan[0], error=error.kind)
                self.events.fallback(group, plan[0], error.kind)
        error = attempts.last_error
        assert error is not None
        error.attempts, error.model = attempts.count, tried[-1] if tried else model
        raise error

    def _call_kwargs(self, request: LLMRequest) -> dict[str, Any]:
        temperature = request.temperature if request.temperature is not None else self.settings.temperature
        return {
            # JSON's own types (a role as "user", not Role.user): what the openai SDK's walk is
            # skipped for (worker/openai_body.py)
            "messages": [m.model_dump(mode="json", exclude_none=True) for m in request.messages],
            "temperature": temperature,
            "max_tokens": self.max_tokens(request),
            **request.chat_params(),
        }

    async def _try_group(
        self, group: str, kwargs: dict[str, Any], deadline: float, attempts: _Attempts, trace_id: str
    ) -> Any | None:
        """Up to ``1 + num_retries`` attempts on one model group; None when it gave up."""
        for retry in range(self.settings.num_retries + 1):
            if deadline - time.monotonic() <= 0.001:
                attempts.last_error = _deadline_error(attempts.last_error)
                return None
            admission: Admission | None = None
            if self.throttle is not None and self.throttle.throttles(group):
                admission = await self.throttle.admit(
                    group, tokens=attempts.tokens, share=attempts.share, deadline=deadline
                )
                if admission is None:  # no room before the deadline: fall back
                    attempts.last_error = no_room_error(group)
                    return None
            outcome = await self._attempt(group, admission, kwargs, deadline, attempts, trace_id)
            if not isinstance(outcome, ProviderError):
                return outcome
            if (
                attempts.streamed
                or outcome.kind == "DeadlineExceeded"
                or not outcome.retryable
                or retry == self.settings.num_retries
            ):
                return None
            if admission is not None and outcome.kind == "RateLimited":
                continue  # the deployment is cooled down for every replica: the next admission waits
            delay = self._backoff(retry, outcome)
            if time.monotonic() + delay >= deadline:
                return None  # waiting would spend the rest of the deadline: fall back now
            self.events.retry(group, outcome.kind)
            await self._sleep(delay)
        return None

    async def _attempt(
        self,
        group: str,
        admission: Admission | None,
        kwargs: dict[str, Any],
        deadline: float,
        attempts: _Attempts,
        trace_id: str,
    ) -> Any:
        """One provider call: the response, or the :class:`ProviderError` it ended with (also
        kept as ``attempts.last_error``)."""
        remaining = deadline - time.monotonic()
        attempts.count += 1
        started = time.monotonic()
        bound = asyncio.timeout(remaining)
        target: Target | None = None
        with tracing.provider_span(trace_id, model=group, attempt=attempts.count) as span:
            try:
                target = self.routes.pick(group, admission.deployment if admission else None)
                attempts.deployment = target.id
                call = litellm.aembedding if "input" in kwargs else litellm.acompletion
                # timeout stays one value: litellm caches an SDK client per timeout, so the time left
                # (bound) as the timeout would make a new client, and connection, per call.
                arguments = {**target.params, **kwargs, "timeout": self.settings.timeout, **_ONE_TRY}
                async with bound:
                    with llm_setup.inline(target.id in self._set_up_inline):
                        response = await call(**arguments)
                    if attempts.sink is not None:
                        attempts.progress = StreamProgress()
                        response = await read_stream(
                            response,
                            attempts.sink,
                            attempts.progress,
                            kwargs["messages"],
                            networked=group not in self._mocked,
                        )
                self.routes.answered(target)
                span.answered(*_usage(response))
                if admission is not None and self.throttle is not None:
                    await self.throttle.answered(admission, sum(_usage(response)))
                return response
            except Exception as exc:  # noqa: BLE001 - every provider failure is translated, once, here
                if bound.expired():
                    attempts.last_error = _deadline_error(attempts.last_error, mid_answer=attempts.streamed)
                    span.failed("DeadlineExceeded")
                    return attempts.last_error
                error = (
                    exc
                    if isinstance(exc, ProviderError)
                    else from_litellm(
                        exc,
                        redact=lambda text: self._redactor.values(_without_prompt(text, _prompt_of(kwargs))),
                    )
                )
                if target is not None:
                    self.routes.failed(target, error)
                span.failed(error.kind, error.status_code)
                if admission is not None and self.throttle is not None:
                    await self.throttle.refused(admission, error)
            finally:
                attempts.provider_ms += (time.monotonic() - started) * 1000
        attempts.last_error = error
        log.info(
            "llm.attempt_failed",
            model=group,
            attempt=attempts.count,
            error=error.kind,
            status_code=error.status_code,
            retryable=error.retryable,
            message=str(error)[:300],  # scrubbed of credentials by ProviderError and the log chain
        )
        return error

    def _backoff(self, retry: int, error: ProviderError) -> float:
        """Retry-After when the provider sent a sane one, else exponential backoff with jitter."""
        if error.retry_after_s is not None and error.retry_after_s <= 60:
            return error.retry_after_s
        base = min(self.settings.retry_initial_delay_s * 2.0**retry, self.settings.retry_max_delay_s)
        return base * (0.5 + random.random() / 2)

    def _broken(
        self,
        error: ProviderError,
        group: str,
        requested: str,
        attempts: _Attempts,
        messages: list[dict[str, Any]],
    ) -> StreamBroken:
        """The error for a stream that failed after its first piece, with what it had written."""
        assert attempts.progress is not None
        response = assemble(attempts.progress, messages)
        text = "".join(_texts(response))
        written = litellm.token_counter(model=self._litellm_model[group], text=text) if text else 0
        partial = self._completion(response, group, requested, attempts, least_completion=written)
        broken = StreamBroken(error, partial, attempts.progress.describe())
        broken.attempts, broken.model = attempts.count, group
        return broken

    def _completion(
        self, response: Any, group: str, requested: str, attempts: _Attempts, *, least_completion: int = 0
    ) -> Completion:
        """``least_completion``: the completion tokens to charge at least (a broken stream's text,
        which a provider that reports output usage only at the end never counted)."""
        price = self._prices.get(attempts.deployment or "") or self._group_prices[group]
        tokens = _tokens(response)
        if tokens.completion < least_completion:
            tokens = tokens.model_copy(
                update={"completion": least_completion, "total": tokens.prompt + least_completion}
            )
        choices = getattr(response, "choices", None) or []
        choice = choices[0] if choices else None
        message = getattr(choice, "message", None)
        logprobs = getattr(choice, "logprobs", None)
        tool_calls = _tool_calls(message)
        blocks = getattr(message, "thinking_blocks", None)
        finish_reason = getattr(choice, "finish_reason", None)
        if tool_calls and finish_reason in (None, "stop"):
            # litellm 1.82.6 leaves Cohere v2's TOOL_CALL as "stop": OpenAI says tool_calls.
            finish_reason = "tool_calls"
        return Completion(
            content=getattr(message, "content", None),
            model=group,
            tokens=tokens,
            cost_nano=price.cost_nano(tokens),
            attempts=attempts.count,
            fallback_used=group != requested,
            provider_latency_ms=attempts.provider_ms,
            finish_reason=finish_reason,
            tool_calls=tool_calls,
            reasoning_content=getattr(message, "reasoning_content", None) or None,
            thinking_blocks=[ThinkingBlock.model_validate(_plain(b)) for b in blocks] if blocks else None,
            logprobs=_plain(logprobs) if logprobs else None,
        )

    # -- embeddings ----------------------------------------------------------------------------

    def choose_embedding_model(self, request: EmbeddingRequest) -> str:
        """The request's ``model``, else the agent's embedding model, else ``embedding.default_model``."""
        embedding = self.settings.embedding
        if embedding is None:
            raise InvalidRequest(
                "body", "this worker has no embedding model: configure llm.embedding in llm.yaml"
            )
        if request.model is not None:
            known = self.settings.names_of_mode("embedding")
            if request.model not in known:
                raise InvalidRequest(
                    "model",
                    f"'{request.model}' is not a configured embedding model "
                    f"(one of: {', '.join(sorted(known)) or 'none'})",
                )
            return request.model
        return embedding.agent_models.get(request.agent, embedding.default_model)

    async def input_tokens(self, model: str, texts: list[str]) -> list[int]:
        """:meth:`count_input_tokens`, off the event loop for a large batch (as :meth:`prompt_tokens`)."""
        if sum(map(len, texts)) <= _INLINE_COUNT_CHARS:
            return self.count_input_tokens(model, texts)
        async with self._counting:
            return await asyncio.to_thread(self.count_input_tokens, model, texts)

    def count_input_tokens(self, model: str, texts: list[str]) -> list[int]:
        """Each text's tokens by litellm's counter for the model's tokenizer (cl100k where it has none)."""
        return [int(litellm.token_counter(model=self._litellm_model[model], text=text)) for text in texts]

    async def embed(
        self,
        request: EmbeddingRequest,
        model: str,
        deadline: float,
        *,
        input_tokens: int,
        batch: bool = False,
    ) -> Embedded:
        """Embed ``request.input`` with ``model``, then its embedding fallbacks, within ``deadline``
        (monotonic): the same retries, backoff, rate limits and deadline as :meth:`complete`.

        ``input_tokens``: the counted tokens, for rate-limited deployments and a provider that reports
        no usage. Raises :class:`ProviderError` with the last error when every model failed.
        """
        assert self.settings.embedding is not None  # choose_embedding_model refused the request
        plan = self.settings.embedding.chain_for(model)
        attempts = _Attempts(share=self.settings.batch_rate_share if batch else 1.0, tokens=input_tokens)
        for i, group in enumerate(plan):
            kwargs = self._embedding_kwargs(group, request)
            response = await self._try_group(group, kwargs, deadline, attempts, request.trace_id)
            if response is not None:
                try:
                    return self._embedded(response, group, model, attempts, request, input_tokens)
                except ProviderError as exc:
                    exc.attempts = attempts.count
                    raise
            error = attempts.last_error
            assert error is not None
            if error.kind == "DeadlineExceeded" or i + 1 == len(plan):
                error.attempts, error.model = attempts.count, group
                raise error
            log.info("llm.fallback", from_model=group, to_model=plan[i + 1], error=error.kind)
            self.events.fallback(group, plan[i + 1], error.kind)
        raise AssertionError("unreachable: the last model's error is raised in the loop")

    def _embedding_kwargs(self, group: str, request: EmbeddingRequest) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"input": list(request.input)}
        if request.dimensions is not None:
            kwargs["dimensions"] = request.dimensions
        if all(_route(d)[1] == "openai" for d in self._deployments[group]):
            # As floats in JSON, the openai SDK builds each number through its model constructor:
            # 1.6 s of CPU for 96 vectors of 1,536 (measured). base64, what the SDK asks for by
            # default, is one string per vector, decoded by _vectors: the same float32 values.
            kwargs["encoding_format"] = "base64"
        return kwargs

    def _embedded(
        self,
        response: Any,
        group: str,
        requested: str,
        attempts: _Attempts,
        request: EmbeddingRequest,
        input_tokens: int,
    ) -> Embedded:
        # A provider that reports no usage is charged by our count: never a free call.
        prompt = _usage(response)[0] or input_tokens
        tokens = Tokens(prompt=prompt, total=prompt)
        price = self._prices.get(attempts.deployment or "") or self._group_prices[group]
        try:
            vectors = _vectors(response, len(request.input), group)
            if request.dimensions is not None and any(len(v) != request.dimensions for v in vectors):
                raise _bad_answer(
                    group, f"vectors of {len(vectors[0])} dimensions, not the {request.dimensions} asked for"
                )
        except ProviderError as exc:  # answered, so billed: the charge is kept though the answer is not
            exc.billed_nano = price.cost_nano(tokens)
            raise
        return Embedded(
            vectors=vectors,
            model=group,
            tokens=tokens,
            cost_nano=price.cost_nano(tokens),
            attempts=attempts.count,
            fallback_used=group != requested,
            provider_latency_ms=attempts.provider_ms,
        )


def _vectors(response: Any, count: int, group: str) -> list[list[float]]:
    """The response's vectors in input order, checked: one per input, finite numbers, one length.

    By ``index`` when the indices are exactly 0..count-1; otherwise in the order received, which is
    input order for every provider (litellm 1.82.6 gives each of Gemini's vectors the index 0). A
    base64 vector (asked of OpenAI, :meth:`LLM._embedding_kwargs`) is little-endian float32.
    """
    data = list(getattr(response, "data", None) or [])

    def field(item: Any, name: str) -> Any:
        return item.get(name) if isinstance(item, dict) else getattr(item, name, None)

    if len(data) != count:
        raise _bad_answer(group, f"{len(data)} vectors for {count} inputs")
    indices = [field(item, "index") for item in data]
    if all(type(i) is int for i in indices) and sorted(indices) == list(range(count)):
        data.sort(key=lambda item: field(item, "index"))
    vectors = [_floats(field(item, "embedding")) for item in data]
    for vector in vectors:
        try:  # math.isfinite refuses what is not a number: no isinstance per element
            finite = isinstance(vector, list) and bool(vector) and all(map(math.isfinite, vector))
        except TypeError:
            finite = False
        if not finite or len(vector) != len(vectors[0]):
            raise _bad_answer(group, "a vector that is not a list of finite numbers of one length")
    return vectors


def _floats(vector: Any) -> Any:
    """A base64 vector decoded (little-endian float32, OpenAI's form); anything else as it is."""
    if not isinstance(vector, str):
        return vector
    try:
        raw = base64.b64decode(vector, validate=True)
    except ValueError:
        return None
    if len(raw) % 4:
        return None
    values = array("f", raw)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


def _bad_answer(group: str, what: str) -> ProviderError:
    error = ProviderError("ProviderError", f"model '{group}' returned {what}", retryable=False)
    error.model = group
    return error


def _prompt_of(kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """The call's texts as messages (an embedding's inputs too), for :func:`_without_prompt`."""
    return kwargs.get("messages") or [{"content": text} for text in kwargs.get("input", [])]


def _texts(response: Any) -> list[str]:
    """The answer's text and its tool calls' arguments."""
    choices = getattr(response, "choices", None) or []
    message = getattr(choices[0], "message", None) if choices else None
    calls = getattr(message, "tool_calls", None) or []
    return [getattr(message, "content", None) or ""] + [c.function.arguments or "" for c in calls]


def _usage(response: Any) -> tuple[int, int]:
    """Prompt and completion tokens from the provider's usage block (0 when it sent none)."""
    usage = getattr(response, "usage", None)
    return int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0)


_INLINE_COUNT_CHARS = 16_384  # ~7 ms to count: below this a thread hop costs more than it saves


def _prompt_chars(request: LLMRequest) -> int:
    """The prompt's size in characters, its content parts by their serialized length."""
    return sum(
        len(m.content) if isinstance(m.content, str) else len(str(m.content or "")) for m in request.messages
    )


_QUOTED_PROMPT_CHARS = 16  # a shorter message text would redact ordinary words


def _without_prompt(text: str, messages: list[dict[str, Any]]) -> str:
    """``text`` with every message text of the prompt that it quotes removed: a provider (or
    litellm) may quote the prompt back, and prompts are not logged unless asked for."""
    for message in messages:
        content = message.get("content")
        parts = content if isinstance(content, list) else [{"text": content}]
        for part in parts:
            piece = part.get("text") if isinstance(part, dict) else None
            if isinstance(piece, str) and len(piece) >= _QUOTED_PROMPT_CHARS and piece in text:
                text = text.replace(piece, "[prompt]")
    return text


def _tokens(response: Any) -> Tokens:
    """The usage block, split: litellm counts cached reads and cache writes inside ``prompt_tokens``
    (Anthropic's ``input_tokens`` + ``cache_read_input_tokens`` + ``cache_creation_input_tokens``)
    and thinking inside ``completion_tokens``."""
    usage = getattr(response, "usage", None)
    prompt, completion = _usage(response)
    prompt_details = getattr(usage, "prompt_tokens_details", None)
    completion_details = getattr(usage, "completion_tokens_details", None)
    return Tokens(
        prompt=prompt,
        completion=completion,
        total=prompt + completion,
        cached_prompt=int(getattr(prompt_details, "cached_tokens", 0) or 0),
        cache_write=int(getattr(usage, "cache_creation_input_tokens", 0) or 0),
        reasoning=int(getattr(completion_details, "reasoning_tokens", 0) or 0),
    )


def _tool_calls(message: Any) -> list[ToolCall] | None:
    calls = getattr(message, "tool_calls", None)
    if not calls:
        return None
    return [
        ToolCall.model_validate(
            {
                "id": call.id,
                "function": {"name": call.function.name, "arguments": call.function.arguments or "{}"},
            }
        )
        for call in calls
    ]


def _plain(value: Any) -> dict[str, Any]:
    dumped = value.model_dump() if hasattr(value, "model_dump") else value
    return dict(dumped) if isinstance(dumped, dict) else {"content": dumped}


@functools.cache
def _supported_params(model: str, provider: str) -> frozenset[str]:
    return frozenset(litellm.get_supported_openai_params(model=model, custom_llm_provider=provider) or [])


def _route(deployment: Deployment) -> tuple[str, str]:
    """The deployment's model id and litellm provider name."""
    params = deployment.litellm_params
    model, provider, *_ = litellm.get_llm_provider(params["model"], params.get("custom_llm_provider"))
    return str(model), str(provider)


def _takes_schema(deployment: Deployment, model: str, provider: str) -> bool:
    declared = deployment.model_info.supports_response_schema
    if declared is not None:
        return declared
    return bool(litellm.supports_response_schema(model=model, custom_llm_provider=provider))


def _deadline_error(last: ProviderError | None, *, mid_answer: bool = False) -> ProviderError:
    if mid_answer:  # a stream the deadline cut (StreamBroken says how far it got)
        return ProviderError("DeadlineExceeded", "the request deadline passed mid-answer", retryable=True)
    detail = f" (last error: {last.kind}: {last})" if last is not None else ""
    return ProviderError(
        "DeadlineExceeded", f"request deadline reached before any model answered{detail}", retryable=True
    )
