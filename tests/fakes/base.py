"""What every provider fake shares: an aiohttp server on 127.0.0.1, a record, scripted failures.

Each provider module (``anthropic.py``, ``gemini.py``, ``cohere.py``, ``perplexity.py``,
``openai_api.py``, ``vllm.py``) subclasses :class:`ProviderFake` and speaks that provider's
wire format as its public API reference documents it: the path, the auth header, the request
body it accepts, the success body with its usage block, and the error bodies and status codes.
A fake refuses what the real API refuses (a wrong key, a malformed body), so a test that
passes shows that litellm reached the provider the way the provider expects to be reached.

Failures are scripted per test rather than chosen by model name, so the deployments keep their
real model ids::

    fake.fail_next("rate_limit", "overloaded")   # the next two calls fail, then calls succeed
    fake.fail_every_call("overloaded")           # every call fails (to force a fallback)

Kinds every fake answers: ``rate_limit``, ``overloaded``, ``server_error``, ``auth`` (each
provider's own status and body; see the subclass's ``ERRORS``).

Tools and cut-offs, in each provider's own form::

    fake.tool_call = ("lookup", {"q": "x"})  # offered tools and no tool result yet: this call
    fake.cut_off = True                      # the answer stops at max_tokens (OpenAI's `length`)
    fake.reply = '{"score": 7}'              # the text of the next answers (a structured answer)

After a tool result the fake answers ``"<name> answers: tool said <the result's text>"``.

Streaming (a request that asks to stream) answers in the provider's own event format (OpenAI SSE,
Anthropic's event stream, Gemini's ``streamGenerateContent?alt=sse``), the text in word pieces::

    fake.first_token_delay_s = 0.2   # before the first text event (time to first token)
    fake.token_delay_s = 0.01        # between text events
    fake.break_after = 3             # drop the connection after this many text events
    fake.mid_stream_error = ("error", {...})  # or, at that point, send this event and end
    fake.stream_started              # set when the first text event is written
    fake.first_tokens                # when each stream's first text event was written (monotonic)
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from aiohttp import web
from multidict import CIMultiDict

TEST_KEY = "test-key-not-a-real-credential-0123456789"


async def listen(app: web.Application, port: int = 0, *, backlog: int = 128) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on 127.0.0.1 (``port`` 0: any free one); the runner and the port it got.

    ``handler_cancellation``: a hung answer ends when its client leaves, not 60 s into the stop.
    """
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=backlog)
    await site.start()
    server = site._server
    assert server is not None
    return runner, server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


@dataclass(frozen=True)
class Received:
    """One HTTP request as the fake saw it."""

    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    body: dict[str, Any]


@dataclass(frozen=True)
class Sent:
    """One successful answer: the text and the token counts the fake reported."""

    text: str
    prompt_tokens: int
    completion_tokens: int


class ProviderFake:
    """Base of the provider fakes: lifecycle, request record, failure script, auth check."""

    name: ClassVar[str] = "provider"
    #: kind -> (HTTP status, extra response headers); bodies come from :meth:`error_body`.
    ERRORS: ClassVar[dict[str, tuple[int, dict[str, str]]]] = {}

    def __init__(self, *, api_key: str = TEST_KEY, prompt_tokens: int = 11, completion_tokens: int = 7):
        self.api_key = api_key
        self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens
        self.requests: list[Received] = []
        self.sent: list[Sent] = []
        self.errors_sent: list[str] = []
        self._script: deque[str] = deque()
        self._always: str | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.tool_call: tuple[str, dict[str, Any]] | None = None
        self.cut_off = False
        self.reply: str | None = None
        self.first_token_delay_s = 0.0
        self.token_delay_s = 0.0
        self.break_after: int | None = None
        self.mid_stream_error: tuple[str, dict[str, Any]] | None = None  # sent at break_after instead
        self.stream_started = asyncio.Event()
        self.streams_broken = 0
        self.first_tokens: list[float] = []  # monotonic time each stream's first text event was written
        self.first_token_of: dict[str, float] = {}  # the same, by the prompt it answered (OpenAI)

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        """The value for the deployment's ``litellm_params.api_base``."""
        return self.root

    def routes(self) -> list[web.RouteDef]:
        raise NotImplementedError

    async def start(self) -> ProviderFake:
        app = web.Application()
        app.add_routes(self.routes())
        self._runner, self.port = await listen(app)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> ProviderFake:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    # -- scripting -----------------------------------------------------------------------------

    def fail_next(self, *kinds: str) -> None:
        """Answer the next ``len(kinds)`` calls with these errors, in order."""
        unknown = set(kinds) - set(self.ERRORS)
        assert not unknown, f"{self.name} fake has no error kind {unknown}; it has {sorted(self.ERRORS)}"
        self._script.extend(kinds)

    def fail_every_call(self, kind: str) -> None:
        assert kind in self.ERRORS, f"{self.name} fake has no error kind {kind!r}"
        self._always = kind

    @property
    def calls(self) -> int:
        return len(self.requests)

    # -- the request path ----------------------------------------------------------------------

    async def receive(self, request: web.Request) -> tuple[Received, web.Response | None]:
        """Record the request; return the error to answer with, if auth, script or shape says so."""
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            body = {}
        received = Received(
            request.method, request.path, dict(request.query), CIMultiDict(request.headers), body
        )
        self.requests.append(received)
        if not self.authorised(received):
            return received, self.error("auth")
        kind = self._script.popleft() if self._script else self._always
        if kind is not None:
            return received, self.error(kind)
        problem = self.invalid(received)
        if problem is not None:
            self.errors_sent.append("bad_request")
            return received, self.bad_request(problem)
        return received, None

    def authorised(self, received: Received) -> bool:
        raise NotImplementedError

    def invalid(self, received: Received) -> str | None:
        """Why the real API would refuse this body with a 400, or None."""
        return None

    def error(self, kind: str) -> web.Response:
        status, headers = self.ERRORS[kind]
        self.errors_sent.append(kind)
        return web.json_response(self.error_body(kind, status), status=status, headers=headers)

    def error_body(self, kind: str, status: int) -> dict[str, Any]:
        raise NotImplementedError

    def bad_request(self, problem: str) -> web.Response:
        raise NotImplementedError

    def answer(self, prompt: str) -> Sent:
        """Record and return the reply: it names the provider and echoes the last user text."""
        text = self.reply if self.reply is not None else f"{self.name} answers: {prompt[:200]}"
        sent = Sent(text, self.prompt_tokens, self.completion_tokens)
        self.sent.append(sent)
        return sent

    def calls_tool(self, offered: bool, tool_result: str | None) -> tuple[str, dict[str, Any]] | None:
        """The tool call to answer with: only when tools are offered and no result came back yet."""
        return self.tool_call if offered and tool_result is None else None

    def answer_tool_result(self, result: str) -> Sent:
        return self.answer(f"tool said {result}")

    async def sse(
        self,
        request: web.Request,
        events: Iterable[tuple[str | None, dict[str, Any] | str, bool]],
        prompt: str | None = None,
    ) -> web.StreamResponse:
        """Write ``(event name or None, data, is a text piece)`` as server-sent events, with the
        scripted delays; after ``break_after`` text pieces the connection is dropped mid-stream."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        pieces = 0
        for event, data, is_text in events:
            if is_text:
                if self.break_after is not None and pieces >= self.break_after:
                    self.streams_broken += 1
                    if self.mid_stream_error is not None:
                        name, error = self.mid_stream_error
                        await response.write(f"event: {name}\ndata: {json.dumps(error)}\n\n".encode())
                        await response.write_eof()
                        return response
                    assert request.transport is not None
                    request.transport.abort()  # mid-stream: no last chunk of the chunked encoding
                    return response
                await asyncio.sleep(self.first_token_delay_s if pieces == 0 else self.token_delay_s)
                pieces += 1
            text = data if isinstance(data, str) else json.dumps(data)
            await response.write(((f"event: {event}\n" if event else "") + f"data: {text}\n\n").encode())
            if is_text and pieces == 1:
                self.first_tokens.append(time.monotonic())
                if prompt is not None:
                    self.first_token_of[prompt] = self.first_tokens[-1]
                self.stream_started.set()
        await response.write_eof()
        return response


def pieces(text: str) -> list[str]:
    """``text`` in word-sized pieces (each word with the space after it), as models stream."""
    return re.findall(r"\S+\s*|\s+", text) or [""]


def request_id(prefix: str) -> str:
    return f"{prefix}{time.monotonic_ns():x}"
