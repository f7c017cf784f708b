"""The openai SDK's walk of chat bodies, skipped for plain bodies (worker/openai_body.py, issue #21):
the provider receives the same bytes' worth of JSON either way, and anything the skip cannot vouch
for still takes the SDK's walk."""

from __future__ import annotations

from typing import Any

import pytest
import typing_extensions as te
from openai import NOT_GIVEN, Omit
from openai._utils import PropertyInfo
from openai.resources.chat.completions import completions
from openai.types.chat import completion_create_params as params
from pydantic import BaseModel

from tests.providers.catalogue import LOOKUP, MAX_TOKENS, PROVIDERS
from worker import openai_body
from worker.messages import Status

PIXEL = "data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///ywAAAAAAQABAAACAUwAOw=="
ANSWER = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "schema": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]},
    },
}


def rich_messages() -> list[dict[str, Any]]:
    """Every part of a chat body the walk's annotations describe: parts, images, a tool turn."""
    return [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture, and what does 'ox' mean?"},
                {"type": "image_url", "image_url": {"url": PIXEL, "detail": "low"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": '{"q": "ox"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"meaning": "a bovine"}'},
    ]


def sdk_walk() -> Any:
    """The SDK's own walk, whether or not the skip is installed."""
    current = completions.async_maybe_transform
    return getattr(current, "__wrapped__", current)


async def test_a_plain_body_comes_back_as_the_sdks_walk_returns_it():
    assert openai_body.install()
    body = {
        "messages": rich_messages(),
        "model": "gpt-4o-mini",
        "tools": [LOOKUP],
        "response_format": ANSWER,
        "temperature": 0.5,
        "max_tokens": 16,
        "stream_options": {"include_usage": True},
        "logprobs": None,
        "n": NOT_GIVEN,
        "seed": Omit(),
        "metadata": {"agent": "writer"},
    }
    skipped = await completions.async_maybe_transform(dict(body), params.CompletionCreateParamsNonStreaming)
    walked = await sdk_walk()(dict(body), params.CompletionCreateParamsNonStreaming)
    assert skipped == walked
    assert "n" not in skipped and "seed" not in skipped and skipped["logprobs"] is None


async def test_what_is_not_plain_json_takes_the_sdks_walk():
    assert openai_body.install()

    class Part(BaseModel):
        type: str = "text"
        text: str

    body = {"messages": [{"role": "user", "content": [Part(text="hello")]}], "model": "m", "stop": ("a", "b")}
    out = await completions.async_maybe_transform(body, params.CompletionCreateParamsNonStreaming)
    # the SDK's walk dumped the model (its set fields) and listed the tuple; a skip would have
    # passed both through
    assert out["messages"][0]["content"] == [{"text": "hello"}] and out["stop"] == ["a", "b"]
    assert out == await sdk_walk()(body, params.CompletionCreateParamsNonStreaming)


@pytest.mark.parametrize(
    ("value", "plain"),
    [
        ({"a": [1, 2.5, "x", True, None, {"b": []}]}, True),
        ({"a": (1, 2)}, False),
        ({1: "int key"}, False),
        ({"a": {"b": b"bytes"}}, False),
        ({"a": NOT_GIVEN}, False),
        ([{"a": object()}], False),
    ],
)
def test_plain_means_json_types_only(value, plain):
    assert openai_body.is_plain(value) is plain


def test_a_body_nested_deeper_than_the_recursion_limit_is_checked_without_recursing():
    deep: Any = "bottom"
    for _ in range(100_000):
        deep = {"d": [deep]}
    assert openai_body.is_plain(deep)


class Card(te.TypedDict, total=False):
    card_id: te.Required[te.Annotated[str, PropertyInfo(alias="cardID")]]


class Dated(te.TypedDict, total=False):
    at: te.Annotated[str, PropertyInfo(format="iso8601")]


class Wallet(te.TypedDict, total=False):
    cards: list[Card | Dated]


class Plain(te.TypedDict, total=False):
    name: str
    tags: list[str]


def test_an_alias_or_a_format_at_any_depth_keeps_the_walk():
    found = openai_body.transform_changes_plain_bodies(Wallet, PropertyInfo)
    assert found is not None and ("cardID" in found or "iso8601" in found)
    assert openai_body.transform_changes_plain_bodies(Dated, PropertyInfo) is not None
    assert openai_body.transform_changes_plain_bodies(Plain, PropertyInfo) is None
    # the walk reaches the deep types of the real parameters (it reads typing_extensions' TypedDicts)
    reached = openai_body._annotations(params.CompletionCreateParamsBase)
    names = {getattr(hint, "__name__", "") for hint in reached}
    deep = {"ChatCompletionContentPartImageParam", "ImageURL", "ChatCompletionMessageFunctionToolCallParam"}
    assert deep <= names


def test_a_walk_that_would_change_a_body_is_kept(monkeypatch):
    monkeypatch.setattr(completions, "async_maybe_transform", sdk_walk())
    monkeypatch.setattr(openai_body, "transform_changes_plain_bodies", lambda *_: "PropertyInfo(alias='x')")
    assert openai_body.install() is False
    assert completions.async_maybe_transform is sdk_walk()


async def test_the_provider_receives_the_same_body_with_and_without_the_walk(
    edge, make_settings, start_worker, client, monkeypatch
):
    """Through the whole worker (broker, ledger, litellm, the SDK) against the OpenAI wire format:
    the same request, sent once with the skip and once with the SDK's walk, reaches the provider as
    the same JSON."""
    provider = PROVIDERS["openai"]
    fake = await edge(provider)
    settings = make_settings(default_model="openai", models=[provider.deployment(fake)])
    bodies, plain = [], []
    check = openai_body.is_plain
    monkeypatch.setattr(openai_body, "is_plain", lambda body: plain.append(check(body)) or plain[-1])
    async with start_worker(settings):
        assert getattr(completions.async_maybe_transform, "_worker_skips_plain", False)
        for walk in ("skipped", "sdk"):
            if walk == "sdk":
                monkeypatch.setattr(completions, "async_maybe_transform", sdk_walk())
            result = await client.complete(
                rich_messages(),
                agent="writer",
                temperature=0.5,
                max_tokens=MAX_TOKENS,
                tools=[LOOKUP],
                response_format=ANSWER,
                use_cache=False,
            )
            assert result.status is Status.ok, result.error
            bodies.append(fake.requests[-1].body)
    assert fake.calls == 2
    assert bodies[0] == bodies[1]
    assert bodies[0]["messages"][1]["content"][1]["image_url"] == {"url": PIXEL, "detail": "low"}
    assert bodies[0]["tools"] == [LOOKUP] and bodies[0]["response_format"] == ANSWER
