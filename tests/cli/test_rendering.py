"""What the operator's tools print is safe to print (issue #23): an agent-chosen id, agent name,
header or error text cannot move the cursor, retitle the window or forge a row of a table."""

from __future__ import annotations

import json
import re

import aio_pika
import structlog

from tests.support.config import deployment
from tests.support.processes import run_cli
from tests.support.queues import declare_topology, publish_dead_letters
from worker.observe.logs import configure_logging

# Every way the issue names to act on a terminal: OSC title, clear screen, C1 CSI, carriage
# return plus erase-line, a newline that starts a forged row, a bidi override.
HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x9b31m\r\x1b[2K\nServerError  writer  1s  0  forged\u202e"
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


async def _publish_hostile_letter(settings) -> None:
    body = json.dumps({"request_id": HOSTILE, "agent": HOSTILE, "messages": HOSTILE}).encode()
    connection = await aio_pika.connect(settings.bus.url.get_secret_value())
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.default_exchange.publish(
            aio_pika.Message(
                body=body,
                correlation_id=HOSTILE,
                headers={"x-dlq-reason": HOSTILE, "x-dlq-message": HOSTILE, f"x-{HOSTILE}": HOSTILE},
            ),
            routing_key=settings.bus.dead_letter_queue,
        )


async def test_dlq_list_and_show_escape_every_control_character(make_settings, names):
    settings = make_settings()
    await declare_topology(settings)
    await publish_dead_letters(settings, 2)
    await _publish_hostile_letter(settings)

    listing = await run_cli(settings.config_dir, "dlq", "list")
    assert listing.code == 0, listing.err
    assert not RAW.search(listing.out), listing.out
    lines = listing.out.splitlines()
    assert len(lines) == 2 + 3  # the count, the header, one line per letter: no forged row
    assert r"\x1b]0;pwned\x07" in listing.out and r"\x9b31m\r\x1b[2K\nServerError" in listing.out

    shown = await run_cli(settings.config_dir, "dlq", "show", HOSTILE)
    assert shown.code == 0, shown.err
    assert not RAW.search(shown.out), shown.out
    assert r"\u202e" in shown.out  # in the body too, which stays valid JSON text

    as_json = await run_cli(settings.config_dir, "dlq", "list", "--json")
    assert as_json.code == 0, as_json.err
    records = [json.loads(line) for line in as_json.out.splitlines()]
    assert len(records) == 3 and not RAW.search(as_json.out)
    assert {r["reason"] for r in records} == {"ServerError", HOSTILE}  # the text itself, decoded

    detailed = await run_cli(settings.config_dir, "dlq", "show", HOSTILE, "--json")
    [full] = [json.loads(line) for line in detailed.out.splitlines()]
    assert full["headers"][f"x-{HOSTILE}"] == HOSTILE and full["body"]["agent"] == HOSTILE


async def test_ask_prints_the_answer_as_text_not_as_terminal_commands(make_settings, start_worker, fake):
    settings = make_settings(models=[deployment("primary", "ok", fake.base_url)])
    async with start_worker(settings):
        asked = await run_cli(settings.config_dir, "ask", f"line one\n{HOSTILE}", "--no-cache")
    assert asked.code == 0, asked.err
    assert "line one\n" in asked.out  # an answer's own lines stay lines
    assert not RAW.search(asked.out) and r"\x1b]0;pwned\x07" in asked.out


def test_console_log_lines_escape_what_they_quote(capsys):
    configure_logging(json=False, level="info")
    try:
        structlog.get_logger("t").warning("request.invalid", request_id=HOSTILE, **{HOSTILE: "x"})
    finally:
        structlog.reset_defaults()
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and not RAW.search(line), line
    assert r"\x1b]0;pwned\x07" in line
