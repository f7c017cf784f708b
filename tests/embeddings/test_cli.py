"""``python -m worker embed``: the vectors on stdout, one JSON line each, the status on stderr."""

from __future__ import annotations

import json

from tests.embeddings.catalogue import EMBEDDERS, embedding_llm
from tests.fakes.embeddings import vector
from tests.support.processes import run_cli

OPENAI = EMBEDDERS["openai-embed"]


async def test_embed_prints_one_json_line_per_vector(edge, make_settings, start_worker):
    fake = await edge(OPENAI)
    settings = make_settings(**embedding_llm(OPENAI.deployment(fake)))
    async with start_worker(settings):
        done = await run_cli(
            settings.config_dir, "embed", "queues hold work", "workers answer", "--dimensions", "4"
        )
        bad = await run_cli(settings.config_dir, "embed", "x", "--agent", "Not An Agent!")

    assert done.code == 0, done.err
    lines = [json.loads(line) for line in done.out.splitlines()]
    assert lines == [
        {"index": 0, "embedding": vector("queues hold work", 4)},
        {"index": 1, "embedding": vector("workers answer", 4)},
    ]
    assert done.err.startswith("[ok] model=openai-embed dimensions=4 tokens=5 ")
    assert bad.code == 2 and bad.err.startswith("invalid request: agent: String should match pattern")
    assert fake.calls == 1
