"""The one litellm Router, and a call through it with retries, fallbacks and a total deadline.

Why our own retry loop around ``Router.acompletion(num_retries=0)`` rather than the Router's:
the Router's ``timeout`` is per attempt and its backoff sleeps ignore any overall deadline, so a
hung provider costs ``retries x timeout`` before a fallback (failoverbench measured ~96 s), and a
cancelled call cannot say how many attempts it made. Here every attempt gets
``min(timeout, time left)``, backoff never sleeps past the deadline, Retry-After is honoured,
and the result counts attempts and fallbacks exactly. The Router still owns what it is good at:
the deployment list, provider translation, load balancing and cooldowns within a model group.
The provider SDK's own retries are off (the Router pins ``max_retries=0``; see
shared/research/litellm.md, claim 1).

litellm's process-wide settings are set once, here, in :func:`configure_litellm`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

# Before litellm's import: otherwise it fetches its price map from the network at import.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm
import structlog

from worker import tracing
from worker.errors import ConfigError, InvalidRequest, ProviderError, from_litellm
from worker.messages import LLMRequest
from worker.settings import LLMSettings, env_secret_values, resolve_secrets

log = structlog.get_logger("worker.llm")

# Providers whose litellm 1.82.6 implementation cannot be billed: measured by bench/litellm_paths.py,
# aiohttp_openai/ costs half the CPU of openai/ per call but returns no usage (every call would cost
# 0 and escape the budgets) and turns every HTTP error into a retryable connection error.
_UNBILLABLE_PROVIDERS = {
    "aiohttp_openai": "returns no token usage in this litellm release (calls would cost 0 and escape "
    "the budgets) and reports 4xx errors as connection errors: use openai/ with the same api_base",
}
_FORBIDDEN_PARAMS = ("num_retries", "max_retries", "fallbacks")


def configure_litellm() -> None:
    """litellm's global state, set once: no callbacks, no stdout noise, no retries of its own."""
    litellm.suppress_debug_info = True
    litellm.num_retries = None
    litellm.success_callback = []
    litellm.failure_callback = []
    litellm.callbacks = []
    litellm.cache = None
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "litellm"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


@dataclass(frozen=True)
class Price:
    """USD per token."""

    input: float
    output: float


@dataclass(frozen=True)
class Completion:
    """What one successful LLM call produced."""

    content: str | None
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
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


class LLM:
    """Chooses the model for a request and calls it within the request's deadline."""

    def __init__(
        self,
        settings: LLMSettings,
        router: litellm.Router,
        *,
        sleep: Any = asyncio.sleep,
        events: LLMEvents | None = None,
        secrets: Iterable[str] = (),
    ):
        """``secrets``: values no error message may carry (a provider may quote the key it got)."""
        self.settings = settings
        self._secrets = sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True)
        self.router = router
        self._sleep = sleep
        self.events: LLMEvents = events or _NoEvents()
        self._prices = {
            f"{d.model_name}#{i}": Price(
                d.model_info.input_cost_per_token, d.model_info.output_cost_per_token
            )
            for i, d in enumerate(settings.models)
        }
        self._group_prices: dict[str, Price] = {}
        self._litellm_model: dict[str, str] = {}
        for i, d in enumerate(settings.models):
            price = self._prices[f"{d.model_name}#{i}"]
            worst = self._group_prices.get(d.model_name, Price(0.0, 0.0))
            self._group_prices[d.model_name] = Price(
                max(worst.input, price.input), max(worst.output, price.output)
            )
            self._litellm_model.setdefault(d.model_name, d.litellm_params["model"])

    @classmethod
    def build(
        cls,
        settings: LLMSettings,
        environ: Mapping[str, str] = os.environ,
        *,
        events: LLMEvents | None = None,
        **router_kwargs: Any,
    ) -> LLM:
        """Build the Router from ``settings.models``; raise :class:`ConfigError` on a bad deployment."""
        configure_litellm()
        model_list = []
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
            model_info = {**d.model_info.model_dump(), "id": f"{d.model_name}#{i}"}
            model_list.append(
                {
                    "model_name": d.model_name,
                    "litellm_params": resolve_secrets(params, environ),
                    "model_info": model_info,
                }
            )
        secrets = [v for d in settings.models for v in env_secret_values(d.litellm_params, environ)]
        router = litellm.Router(
            model_list=model_list,
            num_retries=0,
            timeout=settings.timeout,
            **{"allowed_fails": 3, "cooldown_time": 30, **router_kwargs},
        )
        return cls(settings, router, events=events, secrets=secrets)

    async def warm_up(self) -> None:
        """Pay litellm's first-call costs before consuming: lazy imports, tokenizer loads.

        Measured on the 2-core machine: the first Router call blocked the event loop ~1 s and the
        first token count ~0.5 s, long enough for Redis reads in flight to time out on a fresh
        replica. A mock response goes through the Router's real code path without any network.
        """
        messages = [{"role": "user", "content": "warm-up"}]
        for model in dict.fromkeys(self._litellm_model.values()):
            litellm.token_counter(model=model, messages=messages)
        group = self.settings.default_model
        await self.router.acompletion(model=group, messages=messages, mock_response="ok", num_retries=0)

    # -- model choice and prices -------------------------------------------------------------

    def choose_model(self, request: LLMRequest) -> str:
        """The request's ``model``, else the agent's configured model, else ``default_model``."""
        if request.model is not None:
            if request.model not in self._group_prices:
                known = ", ".join(sorted(self._group_prices))
                raise InvalidRequest(
                    "model", f"'{request.model}' is not a configured model (one of: {known})"
                )
            return request.model
        return self.settings.agent_models.get(request.agent, self.settings.default_model)

    def worst_price(self, model: str) -> Price:
        """The highest input and output price among every model a call to ``model`` may use."""
        prices = [self._group_prices[m] for m in self.settings.reachable_models(model)]
        return Price(max(p.input for p in prices), max(p.output for p in prices))

    def count_prompt_tokens(self, model: str, request: LLMRequest) -> int:
        """Prompt tokens by litellm's token counter for the model's tokenizer."""
        messages = [m.model_dump(exclude_none=True) for m in request.messages]
        return int(litellm.token_counter(model=self._litellm_model[model], messages=messages))

    def max_tokens(self, request: LLMRequest) -> int:
        return request.max_tokens if request.max_tokens is not None else self.settings.max_tokens

    # -- the call ------------------------------------------------------------------------------

    async def complete(self, request: LLMRequest, model: str, deadline: float) -> Completion:
        """Call ``model`` (then its fallbacks) until one answers or ``deadline`` (monotonic) passes.

        Raises :class:`ProviderError` with the last error when every option is exhausted.
        """
        plan = deque(self.settings.chain_for(model))
        tried: list[str] = []
        attempts = _Attempts()
        kwargs = self._call_kwargs(request)
        while plan:
            group = plan.popleft()
            if group in tried:
                continue
            tried.append(group)
            response = await self._try_group(group, kwargs, deadline, attempts, request.trace_id)
            if response is not None:
                return self._completion(response, group, model, attempts)
            error = attempts.last_error
            assert error is not None
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
            "messages": [m.model_dump(exclude_none=True) for m in request.messages],
            "temperature": temperature,
            "max_tokens": self.max_tokens(request),
        }

    async def _try_group(
        self, group: str, kwargs: dict[str, Any], deadline: float, attempts: _Attempts, trace_id: str
    ) -> Any | None:
        """Up to ``1 + num_retries`` attempts on one model group; None when it gave up."""
        for retry in range(self.settings.num_retries + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0.001:
                attempts.last_error = _deadline_error(attempts.last_error)
                return None
            attempts.count += 1
            started = time.monotonic()
            bound = asyncio.timeout(remaining)
            with tracing.provider_span(trace_id, model=group, attempt=attempts.count) as span:
                try:
                    async with bound:
                        response = await self.router.acompletion(
                            model=group,
                            timeout=min(self.settings.timeout, remaining),
                            num_retries=0,
                            **kwargs,
                        )
                    span.answered(*_usage(response))
                    return response
                except Exception as exc:  # noqa: BLE001 - every provider failure is translated, once, here
                    if bound.expired():
                        attempts.last_error = _deadline_error(attempts.last_error)
                        span.failed("DeadlineExceeded")
                        return None
                    error = from_litellm(exc, redact=self._redact)
                    span.failed(error.kind, error.status_code)
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
            if not error.retryable or retry == self.settings.num_retries:
                return None
            delay = self._backoff(retry, error)
            if time.monotonic() + delay >= deadline:
                return None  # waiting would spend the rest of the deadline: fall back now
            self.events.retry(group, error.kind)
            await self._sleep(delay)
        return None

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text

    def _backoff(self, retry: int, error: ProviderError) -> float:
        """Retry-After when the provider sent a sane one, else exponential backoff with jitter."""
        if error.retry_after_s is not None and error.retry_after_s <= 60:
            return error.retry_after_s
        base = min(self.settings.retry_initial_delay_s * 2.0**retry, self.settings.retry_max_delay_s)
        return base * (0.5 + random.random() / 2)

    def _completion(self, response: Any, group: str, requested: str, attempts: _Attempts) -> Completion:
        prompt, completion = _usage(response)
        model_id = (getattr(response, "_hidden_params", None) or {}).get("model_id")
        price = self._prices.get(str(model_id)) or self._group_prices[group]
        choices = getattr(response, "choices", None) or []
        content = choices[0].message.content if choices else None
        return Completion(
            content=content,
            model=group,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost_usd=prompt * price.input + completion * price.output,
            attempts=attempts.count,
            fallback_used=group != requested,
            provider_latency_ms=attempts.provider_ms,
        )


def _usage(response: Any) -> tuple[int, int]:
    """Prompt and completion tokens from the provider's usage block (0 when it sent none)."""
    usage = getattr(response, "usage", None)
    return int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0)


def _deadline_error(last: ProviderError | None) -> ProviderError:
    detail = f" (last error: {last.kind}: {last})" if last is not None else ""
    return ProviderError(
        "DeadlineExceeded", f"request deadline reached before any model answered{detail}", retryable=True
    )
