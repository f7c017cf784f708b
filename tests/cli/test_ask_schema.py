"""``ask --json-schema FILE`` (issue #17): the file's schema reaches the provider as OpenAI's
``response_format``; a file that is not a JSON Schema object is one line, exit 2, nothing sent."""

from __future__ import annotations

import json

import pytest

from tests.support.config import deployment
from tests.support.processes import WorkerProcess, run_cli


async def test_ask_sends_the_files_schema_as_a_strict_response_format(
    config, tmp_path, fake, worker_processes
):
    capable = deployment("m-schema", "ok", fake.base_url)
    capable["model_info"]["supports_response_schema"] = True
    folder = config(models=[capable], default_model="m-schema")
    worker_processes.append(await WorkerProcess(folder).start())
    schema = {"type": "object", "properties": {"score": {"type": "integer"}}, "required": ["score"]}
    path = tmp_path / "critic verdict.json"
    path.write_text(json.dumps(schema))

    asked = await run_cli(folder, "ask", "--no-cache", "--json-schema", str(path), "Rate it")

    assert asked.code == 0, asked.err
    [sent] = [r["body"] for r in fake.requests]
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "critic_verdict", "schema": schema, "strict": True},
    }


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "No such file"), ("{not json", "not JSON"), ("[1, 2]", "a JSON Schema is an object, not list")],
)
async def test_a_bad_schema_file_is_one_line_and_sends_nothing(config, tmp_path, fake, content, expected):
    path = tmp_path / "schema.json"
    if content is not None:
        path.write_text(content)
    asked = await run_cli(config(), "ask", "--json-schema", str(path), "hi")
    assert asked.code == 2 and expected in asked.err and "Traceback" not in asked.err
    assert fake.total_calls() == 0
