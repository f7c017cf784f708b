"""The wire contract (issue #2): the models, and the files in schemas/ generated from them."""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from tests.support.paths import ROOT
from worker import contract
from worker.messages import MAX_CONTENT_CHARS, MAX_MESSAGES, LLMRequest, LLMResult, Status

MINIMAL = {"request_id": "r-1", "agent": "writer", "messages": [{"role": "user", "content": "hi"}]}


def test_schema_files_match_the_models():
    assert contract.check_schemas(ROOT / "schemas") == [], (
        "run `python -m worker schemas` and commit schemas/"
    )


def test_check_detects_drift(tmp_path):
    contract.write_schemas(tmp_path)
    (tmp_path / "llm_result.schema.json").write_text("{}")
    assert contract.check_schemas(tmp_path) == ["llm_result.schema.json"]


def test_asyncapi_channels_match_the_shipped_bus_config():
    bus = yaml.safe_load((ROOT / "config" / "bus.yaml").read_text())["bus"]
    assert bus["request_queue"] == contract.REQUEST_QUEUE
    assert bus["results_exchange"] == contract.RESULTS_EXCHANGE
    assert bus["dead_letter_exchange"] == contract.DEAD_LETTER_EXCHANGE
    assert bus["dead_letter_queue"] == contract.DEAD_LETTER_QUEUE
    doc = yaml.safe_load((ROOT / "schemas" / "asyncapi.yaml").read_text())
    assert doc["asyncapi"] == "3.0.0"
    assert doc["channels"]["requests"]["address"] == contract.REQUEST_QUEUE
    assert doc["operations"]["receiveRequest"]["reply"]["address"]["location"] == "$message.header#/reply_to"
    assert set(doc["components"]["schemas"]) >= {"LLMRequest", "LLMResult", "ChatMessage", "ErrorInfo"}


def test_json_schema_accepts_what_the_model_accepts_and_rejects_unknown_fields():
    schema = json.loads((ROOT / "schemas" / "llm_request.schema.json").read_text())
    jsonschema.validate(MINIMAL, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**MINIMAL, "prompt": "x"}, schema)
    result = LLMResult(request_id="r-1", status=Status.ok, content="x")
    jsonschema.validate(
        json.loads(result.model_dump_json()),
        json.loads((ROOT / "schemas" / "llm_result.schema.json").read_text()),
    )


def test_trace_id_is_generated_and_uuid_form_is_normalized():
    generated = LLMRequest.model_validate(MINIMAL)
    assert len(generated.trace_id) == 32 and int(generated.trace_id, 16) >= 0
    dashed = LLMRequest.model_validate({**MINIMAL, "trace_id": "4BF92F35-77B3-4DA6-A3CE-929D0E0E4736"})
    assert dashed.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_zero_is_a_real_temperature():
    assert LLMRequest.model_validate({**MINIMAL, "temperature": 0}).temperature == 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"prompt": "x"}, "prompt"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1)}, "messages"),
        ({"messages": [{"role": "user", "content": "x" * (MAX_CONTENT_CHARS + 1)}]}, "messages.0.content"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"agent": "Writer!"}, "agent"),
        ({"temperature": 3}, "temperature"),
        ({"deadline": "2026-01-01T00:00:00"}, "deadline"),  # no offset: ambiguous, rejected
        ({"schema_version": 2}, "schema_version"),
        ({"stream": "true"}, "stream"),  # a flag is a JSON boolean (issue #16), streaming too
        ({"stream": 1}, "stream"),
    ],
)
def test_invalid_requests_are_rejected_naming_the_field(change, field):
    with pytest.raises(ValidationError) as caught:
        LLMRequest.model_validate({**MINIMAL, **change})
    locations = {".".join(str(p) for p in e["loc"]) for e in caught.value.errors()}
    assert any(loc.startswith(field) for loc in locations), locations


def test_stream_does_not_change_a_requests_fingerprint():
    """Asking the same again streamed (or not) under its request_id gets the stored answer, not `conflict`."""
    from worker.state.results import fingerprint

    plain = LLMRequest.model_validate(MINIMAL)
    assert fingerprint(plain) == fingerprint(plain.model_copy(update={"stream": True}))


@pytest.mark.parametrize(
    ("field", "lax", "strict"),
    [
        ("top_p", "0.5", 0.5),
        ("top_p", True, 1),
        ("seed", "7", 7),
        ("seed", 7.0, 7),
        ("presence_penalty", "0.5", 0.5),
        ("frequency_penalty", False, 0),
        ("top_logprobs", "3", 3),
        ("logprobs", "true", True),
        ("logprobs", 1, True),
        ("parallel_tool_calls", "false", False),
        ("logit_bias", {"50256": "-100"}, {"50256": -100}),
        (
            "thinking",
            {"type": "enabled", "budget_tokens": "2048"},
            {"type": "enabled", "budget_tokens": 2048},
        ),
    ],
)
def test_numbers_and_flags_are_not_coerced_on_the_wire(field, lax, strict):
    """A string, a boolean for a number or a float for an integer is refused, as JSON Schema would."""
    extra = {
        "top_logprobs": {"logprobs": True},
        "parallel_tool_calls": {"tools": [{"type": "function", "function": {"name": "look_up"}}]},
    }.get(field, {})
    assert (
        getattr(LLMRequest.model_validate_json(json.dumps({**MINIMAL, **extra, field: strict})), field)
        is not None
    )
    with pytest.raises(ValidationError) as caught:
        LLMRequest.model_validate_json(json.dumps({**MINIMAL, **extra, field: lax}))
    assert {str(e["loc"][0]) for e in caught.value.errors()} == {field}
