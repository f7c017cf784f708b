"""A local server speaking OpenAI's chat-completions wire format, for tests and benchmarks.

It stands at the network edge so that litellm's real code path runs. The *model name* in
the request picks the behaviour, so one server serves every scenario at once:

==================  ==========================================================================
model               behaviour
==================  ==========================================================================
``ok`` (or any)     200 with a deterministic answer and usage
``e<NNN>``          HTTP status NNN with an OpenAI error body (429 carries ``retry-after``)
``ctx``             400 "maximum context length" (litellm maps it to ContextWindowExceeded)
``policy``          400 content-policy violation
``hang``            never answers (until the client gives up)
``slow<MS>``        sleeps MS milliseconds, then 200
``flaky<K>``        500 for the first K calls, then 200
``ratelimit<K>``    429 (``retry-after`` from :attr:`retry_after_s`) for K calls, then 200
``long<N>``         200 with an answer of N characters
==================  ==========================================================================

``rpm_limit`` makes the server an account with a requests-per-minute limit: past that many
requests in any sliding 60 s (every model together), it answers 429 with a ``retry-after`` of the
time until room comes back; ``rate_limited`` counts those 429s.

A request with ``stream: true`` is answered in OpenAI's server-sent events (the chunks of
``openai_api.py``), the whole answer in one text piece.

``latency_s`` adds a delay to every answer. ``calls`` counts requests per model; ``requests``
keeps the last bodies and headers so a test can check what the provider received.

Run standalone (for benchmarks and multi-process tests)::

    python -m tests.fakes.openai_server --port 8900 --latency-ms 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from aiohttp import web

from tests.fakes.base import listen
from tests.fakes.openai_api import sse_chunks

_STATUS = re.compile(r"^e(\d{3})$")
_SLOW = re.compile(r"^slow(\d+)$")
_FLAKY = re.compile(r"^(flaky|ratelimit)(\d+)$")
_LONG = re.compile(r"^long(\d+)$")


def count_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """A deterministic stand-in for a tokenizer: one token per whitespace-separated word, plus 3."""
    words = sum(len(str(m.get("content", "")).split()) for m in messages)
    return words + 3


class FakeOpenAI:
    """An OpenAI-compatible chat-completions endpoint on 127.0.0.1 with switchable failures."""

    def __init__(self, *, latency_s: float = 0.0, retry_after_s: float = 0.0, completion_tokens: int = 7):
        self.latency_s = latency_s
        self.retry_after_s = retry_after_s
        self.completion_tokens = completion_tokens
        self.calls: Counter[str] = Counter()
        self.rpm_limit: int | None = None
        self.rpm_model: str | None = None  # the one model the limit applies to (None: every model)
        self.rate_limited = 0
        self._admitted: deque[float] = deque()  # monotonic times of requests within rpm_limit
        self.requests: deque[dict[str, Any]] = deque(maxlen=200)
        self.in_flight = 0
        self.max_in_flight = 0
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Condition()
        self.port = 0

    @property
    def base_url(self) -> str:
        """The value for litellm's ``api_base``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/chat/completions", self._chat)
        app.router.add_get("/stats", self._stats)
        app.router.add_post("/reset", self._reset)
        return app

    async def start(self, port: int = 0) -> FakeOpenAI:
        self._runner, self.port = await listen(self.app(), port, backlog=4096)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def reset(self) -> None:
        self.calls.clear()
        self.requests.clear()
        self.max_in_flight = 0

    def total_calls(self) -> int:
        return sum(self.calls.values())

    async def wait_until(self, predicate: Callable[[FakeOpenAI], bool], timeout_s: float = 30) -> None:
        """Wait until ``predicate(self)`` holds (checked whenever a call starts or ends)."""

        async def check() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self))

        await asyncio.wait_for(check(), timeout_s)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _stats(self, _: web.Request) -> web.Response:
        return web.json_response({"calls": dict(self.calls), "max_in_flight": self.max_in_flight})

    async def _reset(self, _: web.Request) -> web.Response:
        self.reset()
        return web.json_response({})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = str(body.get("model", "ok"))
        self.calls[model] += 1
        n = self.calls[model]
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": body})
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await self._notify()
        try:
            answer = await self._answer(model, n, body)
            if body.get("stream") is True and isinstance(answer, _Completion):
                return await answer.streamed(request, body)
            return answer
        finally:
            self.in_flight -= 1
            await self._notify()

    def _over_rpm(self, model: str) -> float | None:
        """Seconds until room, when this request is past ``rpm_limit`` (None: let through)."""
        if self.rpm_limit is None or self.rpm_model not in (None, model):
            return None
        now = time.monotonic()
        while self._admitted and self._admitted[0] <= now - 60:
            self._admitted.popleft()
        if len(self._admitted) >= self.rpm_limit:
            self.rate_limited += 1
            return self._admitted[0] + 60 - now
        self._admitted.append(now)
        return None

    async def _answer(self, model: str, n: int, body: dict[str, Any]) -> web.StreamResponse:
        if (wait_s := self._over_rpm(model)) is not None:
            payload = {
                "error": {"message": "Rate limit reached for requests", "type": "requests", "code": None}
            }
            return web.json_response(payload, status=429, headers={"retry-after": f"{max(wait_s, 0.0):.3f}"})
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if status := _STATUS.match(model):
            return self._error(int(status.group(1)), f"fake error {status.group(1)}")
        if model == "ctx":
            return self._error(
                400,
                "This model's maximum context length is 8192 tokens. However, your messages resulted "
                "in 9000 tokens. Please reduce the length of the messages.",
                code="context_length_exceeded",
            )
        if model == "policy":
            return self._error(
                400,
                "Your request was rejected as a result of our safety system.",
                code="content_policy_violation",
            )
        if model == "hang":
            await asyncio.sleep(3600)
        if slow := _SLOW.match(model):
            await asyncio.sleep(int(slow.group(1)) / 1000)
        if flaky := _FLAKY.match(model):
            kind, k = flaky.group(1), int(flaky.group(2))
            if n <= k:
                return self._error(429 if kind == "ratelimit" else 500, f"{kind} call {n} of {k}")
        return self._completion(model, body)

    def _error(self, status: int, message: str, *, code: str | None = None) -> web.Response:
        headers = {"retry-after": f"{self.retry_after_s:g}"} if status == 429 else {}
        kind = (
            "rate_limit_error"
            if status == 429
            else "invalid_request_error"
            if status < 500
            else "server_error"
        )
        payload = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        return web.json_response(payload, status=status, headers=headers)

    def _completion(self, model: str, body: dict[str, Any]) -> web.Response:
        messages = body.get("messages") or []
        last = str(messages[-1].get("content", "")) if messages else ""
        prompt_tokens = count_prompt_tokens(messages)
        completion_tokens = self.completion_tokens
        payload = {
            "id": f"chatcmpl-{time.monotonic_ns()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": _content(model, last)},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        return _Completion(payload)


class _Completion(web.Response):
    """A successful answer, which a streamed request gets as server-sent events instead."""

    def __init__(self, payload: dict[str, Any]):
        super().__init__(text=json.dumps(payload), content_type="application/json")
        self.payload = payload

    async def streamed(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _, data, _ in sse_chunks(self.payload, body, whole=True):
            await response.write(f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode())
        await response.write_eof()
        return response


def _content(model: str, last: str) -> str:
    if long := _LONG.match(model):
        return ("lorem ipsum " * (int(long.group(1)) // 12 + 1))[: int(long.group(1))]
    return f"[{model}] {last[:200]}"


async def _serve(port: int, latency_ms: float) -> None:
    server = await FakeOpenAI(latency_s=latency_ms / 1000).start(port)
    print(f"fake openai listening on {server.base_url}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    asyncio.run(_serve(args.port, args.latency_ms))


if __name__ == "__main__":
    main()
