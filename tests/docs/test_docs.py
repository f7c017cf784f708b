"""The README's and docs' examples work as written (issue #24): an example that stops working
fails here, not in a newcomer's terminal.

One worker process serves this module, on a copy of the shipped ``config/offline/`` with queue
names and a Redis prefix of its own; every runnable block (tests/support/markdown.py) then runs as a
user would type it, from the repository root, with ``config/offline`` in it naming that copy
and the client's ``"llm.requests"`` its queue. One dead letter is in place first, with the
``request_id`` docs/operations.md shows, so that the ``dlq`` examples have something to show.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.config import Names, offline_config, remove_names
from tests.support.markdown import DOC_FILES, LANGUAGES, Block, all_blocks, anchors, runnable
from tests.support.paths import ROOT
from tests.support.peers import raw_peer
from worker.client import LLMClient
from worker.settings import Deployment

DEAD_REQUEST_ID = "67990a791f094b34821ea1650ca0b8c7"  # the one docs/operations.md lists and shows
# What a user would look for in an example's output, by a piece of the example's text.
EXPECTED = {
    "deploy/local.sh ask --agent writer": "Messages wait in line",  # the offline writer's answer
    "LLMClient(": "(offline mock reply from gpt-4.1)",  # the critic's model, offline
}


@dataclass
class DocsWorker:
    config: Path
    names: Names
    port: int
    env: dict[str, str]

    def localize(self, script: str) -> str:
        script = script.replace("config/offline", str(self.config))
        return script.replace('"llm.requests"', f'"{self.names.request_queue}"')


def _start(config: Path, env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "--config", str(config), "run", "--json-logs"],
            cwd=ROOT,
            env={**env, "OBSERVE_PORT": "0"},
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        for raw in log.read_text().splitlines():
            line = json.loads(raw) if raw.startswith("{") else {}
            if line.get("event") == "worker.ready":
                return proc, int(line["http_port"])
        time.sleep(0.2)  # polling a log file, bounded by the deadline
    proc.kill()
    raise RuntimeError(f"the worker did not become ready; it logged:\n{log.read_text()[-3000:]}")


async def _dead_letter(amqp_url: str, queue: str) -> None:
    """A request the worker answers `invalid` and dead-letters (an unknown field, no messages)."""
    async with raw_peer(amqp_url, queue) as peer:
        await peer.publish({"request_id": DEAD_REQUEST_ID, "agent": "writer", "prompt": "hi"})
        await peer.wait_replies(1)


@pytest.fixture(scope="module")
def docs_worker(
    tmp_path_factory: pytest.TempPathFactory, service_urls: tuple[str, str]
) -> Iterator[DocsWorker]:
    amqp_url, redis_url = service_urls
    names = Names()
    folder = tmp_path_factory.mktemp("docs")
    config = offline_config(folder / "offline", names)
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "WORKER_CONFIG_DIR": str(config)}
    proc, port = _start(config, env, folder / "worker.log")
    try:
        asyncio.run(_dead_letter(amqp_url, names.request_queue))
        yield DocsWorker(config, names, port, env)
    finally:
        proc.terminate()
        proc.wait(60)
        asyncio.run(remove_names(names, amqp_url, redis_url))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("block", runnable(), ids=lambda b: b.id)
def test_example_runs_as_written(block: Block, docs_worker: DocsWorker) -> None:
    script = docs_worker.localize(block.script())
    argv = (
        [sys.executable, "-c", script]
        if block.lang == "python"
        else ["bash", "-euo", "pipefail", "-c", script]
    )
    done = subprocess.run(argv, cwd=ROOT, env=docs_worker.env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, (
        f"{block.id} exited {done.returncode}:\n{script}\n{done.stdout}\n{done.stderr}"
    )
    assert done.stdout.strip(), f"{block.id} printed nothing"
    for piece, expected in EXPECTED.items():
        if piece in block.text:
            assert expected in done.stdout, f"{block.id}: {expected!r} not in\n{done.stdout}"


def test_the_newcomer_path_is_covered() -> None:
    """The README's ask, client script and CLI examples are among the blocks that run."""
    readme = [b for b in runnable() if b.path.name == "README.md"]
    assert {b.lang for b in readme} == {"python", "sh", "console"}
    assert any("budget show" in b.text for b in readme) and any("dlq list" in b.text for b in readme)


def test_every_block_names_its_language_and_why_it_is_not_run() -> None:
    for block in all_blocks():
        assert block.lang in LANGUAGES, f"{block.id}: fence language {block.lang!r}; use one of {LANGUAGES}"
        if block.lang in ("yaml", "text"):
            continue
        assert block.not_run is None or len(block.not_run) > 10, f"{block.id}: say why it is not run"


def test_yaml_examples_are_valid() -> None:
    for block in all_blocks():
        if block.lang != "yaml" or block.not_run is not None:
            continue
        data = yaml.safe_load(block.text)
        if block.path.name == "providers.md":  # a deployment to paste into llm.models
            [entry] = data
            Deployment.model_validate(entry)


def test_relative_links_resolve() -> None:
    for path in DOC_FILES:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            assert resolved.exists(), f"{path.name}: link to {target}: no such file"
            if anchor and resolved.suffix == ".md":
                assert anchor in anchors(resolved), f"{path.name}: link to {target}: no such heading"


async def _ask(amqp_url: str, queue: str) -> None:
    async with LLMClient(amqp_url, request_queue=queue) as llm:
        assert (await llm.complete("count me", agent="editor", timeout_s=30)).status == "ok"


def test_every_exposed_metric_is_documented(docs_worker: DocsWorker, amqp_url: str) -> None:
    import urllib.request

    asyncio.run(_ask(amqp_url, docs_worker.names.request_queue))
    with urllib.request.urlopen(f"http://127.0.0.1:{docs_worker.port}/metrics", timeout=10) as response:
        families = {f.name for f in text_string_to_metric_families(response.read().decode())}
    documented = set(
        re.findall(r"^\| `(llm_worker_\w+?)(?:_total)?` \|", (ROOT / "docs/metrics.md").read_text(), re.M)
    )
    # prometheus_client adds a `_created` timestamp beside each counter and histogram
    ours = {name.removesuffix("_created") for name in families if name.startswith("llm_worker_")}
    assert "llm_worker_requests" in ours  # the request above was counted
    assert ours <= documented, f"exposed but not in docs/metrics.md: {sorted(ours - documented)}"


def test_config_may_follow_the_subcommand(docs_worker: DocsWorker) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "worker", "dlq", "list", "--config", str(docs_worker.config)],
        cwd=ROOT, env=docs_worker.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
