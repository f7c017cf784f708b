"""Every CLI error is one line naming the fix, with the documented exit code (issue #23): bad
request fields, a broker that is down or refuses the login, a day that does not exist, and a
reader that goes away (``dlq list | head -1``)."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
from yarl import URL

from tests.support.config import llm_section, write_config
from tests.support.paths import ROOT
from tests.support.ports import free_port
from tests.support.processes import run_cli
from tests.support.queues import declare_topology, publish_dead_letters


def one_line(text: str) -> str:
    assert "Traceback" not in text, text
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--agent", "Not An Agent!"), "invalid request: agent: String should match pattern"),
        (("--temperature", "9"), "invalid request: temperature: Input should be less than or equal to 2"),
        (("--max-tokens", "-3"), "invalid request: max_tokens: Input should be greater than or equal to 1"),
        (("--timeout", "nan"), "invalid request: timeout_s: expected seconds above 0"),
    ],
)
async def test_ask_with_a_bad_field_names_it_and_sends_nothing(make_settings, args, expected):
    settings = make_settings()
    asked = await run_cli(settings.config_dir, "ask", "hi", *args)
    assert asked.code == 2 and one_line(asked.err).startswith(expected)


async def test_ask_and_run_say_the_broker_is_down_or_refused_the_login(
    tmp_path, names, amqp_url, redis_url, fake
):
    down = f"amqp://guest:secret@127.0.0.1:{free_port()}/"
    wrong = str(URL(amqp_url).with_password("not-the-password"))
    for url, fix in (
        (down, "check the URL, and that RabbitMQ is up"),
        (wrong, "check the user and password"),
    ):
        config = write_config(tmp_path / f"cfg-{len(url)}", names, url, redis_url, llm_section(fake.base_url))
        asked = await run_cli(config, "ask", "hi", env={"AMQP_URL": url})
        assert asked.code == 1 and fix in one_line(asked.err)
        assert "secret" not in asked.err and "not-the-password" not in asked.err
    ran = await run_cli(config, "run", "--json-logs", env={"AMQP_URL": wrong, "OBSERVE_PORT": "0"})
    last = ran.err.strip().splitlines()[-1]
    assert ran.code == 1 and "Traceback" not in ran.err, ran.err
    assert last.startswith("error: the broker at amqp://guest:***@") and "refused the login" in last


async def test_budget_show_refuses_a_day_that_does_not_exist(make_settings):
    shown = await run_cli(make_settings().config_dir, "budget", "show", "--day", "2026-13-45")
    assert shown.code == 2 and "Traceback" not in shown.err
    assert "argument --day: expected a day as YYYY-MM-DD, got '2026-13-45'" in shown.err


async def test_dlq_list_into_head_stops_quietly(make_settings):
    settings = make_settings()
    await declare_topology(settings)
    await publish_dead_letters(settings, 1500)  # ~150 kB of rows: more than a pipe holds
    command = (
        f"{sys.executable} -m worker --config {settings.config_dir} dlq list --limit 1500 | head -1;"
        " echo exit=${PIPESTATUS[0]} >&2"
    )
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", command, cwd=ROOT, env=os.environ.copy(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert out.decode() == f"{settings.bus.dead_letter_queue}: 1500 dead letter(s)\n"
    assert err.decode() == "exit=141\n"  # nothing else: no BrokenPipeError, no traceback
