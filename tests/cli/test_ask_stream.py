"""``ask --stream`` (issue #18): the answer is printed as it arrives, made safe to print, and the
status line follows it."""

from __future__ import annotations

import asyncio
import os
import sys

from tests.fakes.openai_api import FakeOpenAIPlatform
from tests.providers.catalogue import PROVIDERS
from tests.support.paths import ROOT
from worker.app import running_worker
from worker.settings import load_settings


async def test_ask_stream_prints_the_first_words_while_the_model_is_still_writing(config):
    fake = await FakeOpenAIPlatform().start()
    fake.reply = "first \x1b[31mred\x1b[0m then the rest"
    fake.token_delay_s = 0.4  # five pieces: two seconds from the first to the last
    folder = config(default_model="openai", models=[PROVIDERS["openai"].deployment(fake)])
    try:
        async with running_worker(load_settings(folder, environ={})):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "worker", "--config", str(folder), "ask", "--stream", "hi",
                cwd=ROOT, env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert proc.stdout is not None
            first = await asyncio.wait_for(proc.stdout.read(6), 60)
            still_writing = len(fake.sent) == 1 and proc.returncode is None
            out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await fake.stop()

    assert first == b"first " and still_writing, err
    text = (first + out).decode()
    assert text.startswith("first \\x1b[31mred\\x1b[0m then the rest")  # escapes shown, not obeyed
    assert "\x1b" not in text
    assert proc.returncode == 0, err
    assert "[ok] model=openai" in err.decode()
