"""Request bodies as an agent sends them, and malformed ones of every kind a worker must survive."""

from __future__ import annotations

import json
import random
import uuid
from typing import Any

MAX_BODY = 8192  # the bus.max_body_bytes that malformed_bodies() is built against


def request_body(prompt: str = "hello", *, agent: str = "writer", **fields: Any) -> dict[str, Any]:
    return {
        "request_id": fields.pop("request_id", uuid.uuid4().hex),
        "agent": agent,
        "messages": [{"role": "user", "content": prompt}],
        **fields,
    }


def malformed_bodies(rng: random.Random) -> list[tuple[bytes, str | None]]:
    """Bad bodies of every kind the issue names, and what the invalid reply must say first
    (None: randomly damaged, so either invalid or, by chance, still a valid request)."""
    valid = json.dumps(request_body("fine")).encode()
    cases: list[tuple[bytes, str]] = [
        (b"", "body: not valid JSON"),
        (b"\x00" * 64, "body: not valid JSON"),
        (b"{not json", "body: not valid JSON"),
        (valid[: rng.randrange(1, len(valid) - 1)], "body: not valid JSON"),  # truncated
        (b"\xff\xfe" + valid, "body: not UTF-8"),
        ("é".encode("latin-1") + valid, "body: not UTF-8"),
        (b"x" * (MAX_BODY + 1), f"body: {MAX_BODY + 1} bytes exceeds the limit of {MAX_BODY}"),
        (b"[" * (MAX_BODY - 1), "body: not valid JSON"),  # nested past every decoder's limit
        (b"[]", "body: Input should be an object"),
        (b"null", "body: Input should be an object"),
        (json.dumps({**request_body("x"), "prompt": "old"}).encode(), "prompt: unknown field"),
        (json.dumps({**request_body("x"), "temperature": "hot"}).encode(), "temperature:"),
        (json.dumps({**request_body("x"), "agent": "Not An Agent!"}).encode(), "agent:"),
        (json.dumps({**request_body("x"), "deadline": "tomorrow"}).encode(), "deadline:"),
        (json.dumps({**request_body("x"), "messages": []}).encode(), "messages:"),
        (json.dumps({**request_body("x"), "messages": [{"role": "wizard"}]}).encode(), "messages.0.role:"),
        (json.dumps({**request_body("x"), "schema_version": 2}).encode(), "schema_version:"),
        # Lax types (issue #16): the contract says number, boolean, RFC 3339; no coercion.
        (json.dumps({**request_body("x"), "temperature": "1.5"}).encode(), "temperature: Input should be a"),
        (json.dumps({**request_body("x"), "temperature": True}).encode(), "temperature: Input should be a"),
        (json.dumps({**request_body("x"), "max_tokens": "64"}).encode(), "max_tokens: Input should be a"),
        (json.dumps({**request_body("x"), "use_cache": "false"}).encode(), "use_cache: Input should be a"),
        (json.dumps({**request_body("x"), "top_p": "0.5"}).encode(), "top_p: Input should be a"),
        (json.dumps({**request_body("x"), "seed": 7.0}).encode(), "seed: Input should be a"),
        (json.dumps({**request_body("x"), "logprobs": "true"}).encode(), "logprobs: Input should be a"),
        (json.dumps({**request_body("x"), "deadline": "1700000000"}).encode(), "deadline: Value error"),
        (json.dumps({**request_body("x"), "deadline": 1700000000}).encode(), "deadline: Value error"),
        (json.dumps(request_body("x"))[:-1].encode() + b', "agent": "x"}', "body: key 'agent' appears twice"),
    ]
    for field in ("request_id", "agent", "messages"):
        body = request_body("x")
        del body[field]
        cases.append((json.dumps(body).encode(), f"{field}: required field is missing"))
    for _ in range(25):  # random byte damage to a valid body: mostly invalid, sometimes still valid
        damaged = bytearray(json.dumps(request_body("to be damaged")).encode())
        for _ in range(rng.randrange(1, 6)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        cases.append((bytes(damaged), None))
    return cases
