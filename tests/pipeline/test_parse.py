"""Parsing a delivery (issue #6): a property over arbitrary input; the parser never raises and
names the broken field in its ``invalid`` reply."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from tests.support.bodies import MAX_BODY, request_body
from worker.boundary.fetch import remote_images
from worker.boundary.parse import parse
from worker.boundary.urls import HostAllowlist
from worker.messages import LLMRequest, Status
from worker.outcome import Delivery, Outcome


@pytest.fixture(scope="module")
def parser() -> Callable[[Delivery], LLMRequest | Outcome]:
    # parsing is a step of its own: no Redis, broker or provider behind it
    return functools.partial(parse, max_body_bytes=MAX_BODY)


def check_parsed(parsed: LLMRequest | Outcome) -> str | None:
    """A request, or an ``invalid`` outcome to dead-letter whose message is ``field: problem``."""
    if isinstance(parsed, LLMRequest):
        return None
    result = parsed.result
    assert parsed.dead_letter and result.status is Status.invalid
    assert result.error is not None and result.error.type == "InvalidRequest" and not result.error.retryable
    where, _, problem = result.error.message.partition(": ")
    assert where and problem, result.error.message
    return where


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


FIELDS = ["request_id", "agent", "messages", "trace_id", "task_id", "model", "temperature", "max_tokens",
          "use_cache", "cache_ttl", "deadline", "schema_version"]  # fmt: skip


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=2 * MAX_BODY))
def test_parse_never_raises_on_arbitrary_bytes(parser, body):
    check_parsed(parser(Delivery(body=body, correlation_id="c")))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=json_values)
def test_parse_never_raises_on_arbitrary_json(parser, value):
    check_parsed(parser(Delivery(body=json.dumps(value).encode(), correlation_id="c")))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from([*FIELDS, "prompt"]), value=json_values, drop=st.booleans())
def test_a_broken_field_is_named_in_the_invalid_reply(parser, field, value, drop):
    body = request_body("x")
    if drop:
        body.pop(field, None)
    else:
        body[field] = value
    where = check_parsed(parser(Delivery(body=json.dumps(body).encode(), correlation_id="c")))
    if where is not None:
        assert where.split(".")[0] == field  # the field we broke, or a part of it (messages.0.role)


def test_parse_survives_nesting_deeper_than_pythons_json_decoder(parser):
    for body in (b"[" * 100_000, b'{"a":' * 5000 + b"1" + b"}" * 5000, b'{"messages":' + b"[" * 3000):
        assert check_parsed(parser(Delivery(body=body))) == "body"


_URLS = [
    "http://127.0.0.1:1/a.png",
    "https://169.254.169.254/latest",
    "file:///etc/passwd",
    "gs://b/o",
    "data:image/png;base64,iVBORw0KGgo=",
    "data:image/png;base64,!!",
    "data:text/html;base64,PGI+",
    "",
]
_part_values = st.sampled_from(_URLS) | json_values
content_parts = json_values | st.dictionaries(
    st.sampled_from(["type", "text", "image_url", "file", "input_audio", "cache_control", "x"]),
    st.sampled_from(["text", "image_url", "file", "input_audio", "bogus"])
    | st.dictionaries(
        st.sampled_from(["url", "detail", "format", "file_id", "file_data", "filename", "data"]),
        _part_values | st.sampled_from(["high", "low", "wav", "image/png"]),
        max_size=3,
    )
    | _part_values,
    max_size=3,
)


def parsed_part(parser: Callable[[Delivery], LLMRequest | Outcome], part: Any) -> LLMRequest | None:
    """The request holding ``part`` as parsed, or None when its refusal names that part."""
    body = request_body("x")
    body["messages"] = [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]
    parsed = parser(Delivery(body=json.dumps(body).encode(), correlation_id="c"))
    where = check_parsed(parsed)
    if where is not None:
        assert where == "messages.0.content.1", where
        return None
    assert isinstance(parsed, LLMRequest)
    return parsed


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(part=content_parts)
def test_a_content_part_is_refused_by_name_or_safe_to_count(parser, part):
    """A part either is refused naming it, or holds no URL but a data: URI and its tokens can be
    counted (issue #16: malformed parts crashed token counting; remote URLs were fetched)."""
    import litellm

    parsed = parsed_part(parser, part)
    if parsed is None:
        return
    urls = [u for u in _URLS if u and not u.startswith("data:image/png;base64,iVBOR")]
    # a text part's text is prose (it may quote a URL: nothing fetches it); anything else holds none
    fetchable = part
    if isinstance(part, dict) and part.get("type") == "text":
        fetchable = {key: value for key, value in part.items() if key != "text"}
    assert not any(url in json.dumps(fetchable) for url in urls)
    messages = [m.model_dump(exclude_none=True) for m in parsed.messages]
    assert litellm.token_counter(model="gpt-4o", messages=messages, use_default_image_token_count=True) > 0


LISTED = ["images.test", "*.cdn.test"]
_REMOTE = [
    "https://images.test/a.png",
    "https://x.cdn.test/a.png",
    "https://cdn.test/a.png",
    "https://images.test:8443/a.png",
    "https://u@images.test/a.png",
    "https://images.test.evil.test/a.png",
    "http://images.test/a.png",
    "https://127.0.0.1/a.png",
]
remote_parts = st.dictionaries(
    st.sampled_from(["type", "image_url", "file", "cache_control", "x"]),
    st.sampled_from(["image_url", "file", "text"])
    | st.dictionaries(
        st.sampled_from(["url", "detail", "file_id", "file_data"]),
        st.sampled_from(_REMOTE + _URLS) | json_values,
        max_size=3,
    ),
    max_size=3,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(part=content_parts | remote_parts)
def test_with_hosts_listed_a_part_holds_no_url_but_a_listed_https_one(part):
    """With ``llm.remote_images.hosts`` set, a part is refused naming it, or every URL it holds
    is a data: URI or an https URL of a listed host and port, in an ``image_url`` (issue #16)."""
    parse_listed = functools.partial(parse, max_body_bytes=MAX_BODY, remote_images=HostAllowlist(LISTED))
    parsed = parsed_part(parse_listed, part)
    if parsed is None:
        return
    for _, _, url in remote_images(parsed.messages):
        parsed_url = URL(url)
        host = parsed_url.raw_host or ""
        assert parsed_url.scheme == "https" and parsed_url.port == 443 and parsed_url.user is None, url
        assert host == "images.test" or host.endswith(".cdn.test"), url
    leftover = [
        u for u in _REMOTE + _URLS if u and not u.startswith(("data:image/png;base64,iVBOR", "https://"))
    ]
    assert not any(url in json.dumps(part) for url in leftover)
