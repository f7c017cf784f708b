"""What a request's OpenAI parameters may hold (issue #17): bounds, and the hostile cases, answered
``invalid`` by the worker naming the field, before any provider call or charge."""

from __future__ import annotations

from typing import Any

from tests.support.bodies import request_body
from tests.support.peers import raw_peer
from worker.messages import MAX_SCHEMA_CHARS, MAX_TOOLS, Status


def _tool(name: str = "lookup", parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters or {"type": "object"}}}


HOSTILE: list[tuple[dict[str, Any], str]] = [
    ({"tools": [_tool(f"t{i}") for i in range(MAX_TOOLS + 1)]}, "tools"),
    ({"tools": []}, "tools"),
    ({"tools": [_tool("../../etc/passwd")]}, "tools.0.function.name"),
    ({"tools": [_tool("llmw:budget:day:2026-12-02")]}, "tools.0.function.name"),  # a Redis key's shape
    ({"tools": [_tool("x" * 65)]}, "tools.0.function.name"),
    ({"tools": [_tool(parameters={"description": "x" * MAX_SCHEMA_CHARS})]}, "tools.0.function.parameters"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"tools": [_tool()], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [_tool()], "tool_choice": "sometimes"}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "v"}}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "http://evil/", "schema": {}}}},
        "response_format",
    ),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": ["x" * 257]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"top_p": 1.5}, "top_p"),
    ({"seed": 2**63}, "seed"),
    ({"presence_penalty": -2.5}, "presence_penalty"),
    ({"frequency_penalty": 9}, "frequency_penalty"),
    ({"logit_bias": {"not-a-token": 1}}, "logit_bias"),
    ({"logit_bias": {"50256": 101}}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
    ({"top_logprobs": 5}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"user": "u" * 257}, "user"),
    ({"reasoning_effort": "maximum"}, "reasoning_effort"),
]


async def test_hostile_parameters_are_answered_invalid_naming_the_field(
    make_settings, start_worker, amqp_url, names, fake
):
    async with start_worker(make_settings()), raw_peer(amqp_url, names.request_queue) as peer:
        for i, (fields, _) in enumerate(HOSTILE):
            await peer.publish(request_body("x", request_id=f"hostile-{i}", **fields))
        await peer.wait_replies(len(HOSTILE))

    results = peer.results()
    assert len(results) == len(HOSTILE)
    for result, (fields, where) in zip(sorted(results, key=_order), HOSTILE, strict=True):
        assert result.status is Status.invalid, fields
        assert result.error is not None and result.error.message.startswith(where), (where, result.error)
        assert len(result.error.message) < 400  # one line, not the hostile input quoted back
    assert fake.total_calls() == 0


def _order(result: Any) -> int:
    return int(result.request_id.rsplit("-", 1)[1])
