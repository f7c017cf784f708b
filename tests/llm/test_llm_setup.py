"""litellm's work per call that the worker moves or skips (issue #21): its set-up on the event loop
instead of its thread pool (worker/llm_setup.py), for which calls, and nothing else moved off the
threads; its cost calculation, which the worker never reads."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import litellm
import pytest

from tests.support.config import deployment
from worker import llm_setup
from worker.messages import LLMResult, Status

MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture
def set_up_threads(monkeypatch) -> list[int]:
    """The thread each litellm completion/embedding set-up ran on, in call order."""
    seen: list[int] = []

    def recorded(original: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            seen.append(threading.get_ident())
            if kwargs.get("user") == "boom":
                raise RuntimeError("boom in the set-up")
            return original(*args, **kwargs)

        return run

    monkeypatch.setattr(litellm.main, "completion", recorded(litellm.main.completion))
    monkeypatch.setattr(litellm.main, "embedding", recorded(litellm.main.embedding))
    return seen


async def test_the_set_up_runs_on_the_loop_only_inside_inline(set_up_threads):
    llm_setup.install(asyncio.get_running_loop())
    loop_thread = threading.get_ident()
    await litellm.acompletion(model="openai/x", messages=MESSAGES, mock_response="ok")
    with llm_setup.inline():
        await litellm.acompletion(model="openai/x", messages=MESSAGES, mock_response="ok")
    with llm_setup.inline(False):
        await litellm.acompletion(model="openai/x", messages=MESSAGES, mock_response="ok")
    assert set_up_threads[1] == loop_thread
    assert set_up_threads[0] != loop_thread and set_up_threads[2] != loop_thread


async def test_a_set_up_that_raises_raises_from_the_call_as_it_does_from_a_thread(set_up_threads):
    llm_setup.install(asyncio.get_running_loop())
    raised = []
    for on in (False, True):
        with llm_setup.inline(on), pytest.raises(Exception, match="boom in the set-up") as error:
            await litellm.acompletion(model="openai/x", messages=MESSAGES, mock_response="ok", user="boom")
        raised.append(type(error.value))
    assert raised[0] is raised[1]


async def test_other_work_on_the_default_executor_stays_on_threads():
    """A large prompt's token count (asyncio.to_thread) and name lookups would block the loop."""
    loop = asyncio.get_running_loop()
    llm_setup.install(loop)
    with llm_setup.inline():
        assert await asyncio.to_thread(threading.get_ident) != threading.get_ident()
        assert await loop.getaddrinfo("127.0.0.1", 5672)
        assert await loop.run_in_executor(None, threading.get_ident) != threading.get_ident()


async def test_through_the_worker_known_providers_set_up_on_the_loop_others_in_threads(
    set_up_threads, make_settings, start_worker, client, fake
):
    """deepseek/ is not in PURE_SETUP (its set-up was not read for I/O): it stays in a thread."""
    other = deployment("other", "ok", fake.base_url)
    other["litellm_params"]["model"] = "deepseek/ok"
    settings = make_settings(models=[deployment("primary", "ok", fake.base_url), other])
    async with start_worker(settings):
        loop_thread = threading.get_ident()
        known = await client.complete("on the loop", agent="writer", model="primary", use_cache=False)
        set_up_on = list(set_up_threads)
        unknown = await client.complete("in a thread", agent="writer", model="other", use_cache=False)

    assert known.status is Status.ok and unknown.status is Status.ok, unknown.error
    assert set_up_on[-1] == loop_thread
    assert set_up_threads[-1] != loop_thread


async def test_litellm_works_out_no_cost_of_its_own_while_the_worker_charges_exactly(
    monkeypatch, make_settings, start_worker, client, fake
):
    calculated = []
    original = litellm.cost_calculator.completion_cost
    monkeypatch.setattr(
        litellm.cost_calculator,
        "completion_cost",
        lambda *args, **kwargs: calculated.append(1) or original(*args, **kwargs),
    )
    settings = make_settings(models=[deployment("primary", "ok", fake.base_url, price=(1e-6, 2e-6))])
    async with start_worker(settings):
        result = await client.complete("what does it cost", agent="writer", use_cache=False)
        streamed = [item async for item in client.stream("and streamed", agent="writer", use_cache=False)][-1]

    for answer in (result, streamed):
        assert isinstance(answer, LLMResult)
        assert answer.status is Status.ok and answer.tokens.prompt > 0
        assert answer.cost_usd == pytest.approx(answer.tokens.prompt * 1e-6 + answer.tokens.completion * 2e-6)
    assert calculated == []
