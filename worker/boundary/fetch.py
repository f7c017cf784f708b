"""The worker fetches an allowed image URL itself, and litellm sees only a ``data:`` URI (issue #16).

litellm, given an image URL, downloads it from the worker's host for Anthropic and Gemini with
no check of where it points. So a remote URL reaches no further than the boundary: by default
it is refused (:mod:`worker.boundary.content`); with ``llm.remote_images.hosts`` set, the
pipeline hands each remote image to :meth:`ImageFetcher.inline` before the cache key is made and
before tokens are counted (token counting never fetches), and every hop is checked:

- the URL (and every redirect's ``Location``, followed by hand up to ``max_redirects``): https,
  a listed host and port, no user info (:class:`~worker.boundary.urls.HostAllowlist`);
- every address the host resolves to (:func:`~worker.boundary.urls.public_address`), in the
  connector's own resolver, whose answer is the only one the connection uses: there is no
  second lookup a rebinding DNS server could answer differently. TLS is verified against the
  host name (SNI and ``Host`` stay the name);
- the answer: HTTP 200, no ``Content-Encoding``, a ``Content-Type`` among ``content_types``
  that the first bytes confirm, at most ``max_bytes`` (a larger ``Content-Length`` is refused
  before reading, a body is cut the moment it passes the cap), all of one request's fetches
  within ``timeout_s``.

Any refusal or failure answers the request ``invalid`` naming the part. Every network failure
(refused, reset, timed out, TLS) gets the same text, so an answer does not tell an open port
from a closed one. No cookie, proxy setting (``trust_env``) or connection is kept between
fetches.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from worker.boundary.urls import HostAllowlist, IPAddress, public_address
from worker.errors import InvalidRequest
from worker.messages import ChatMessage, LLMRequest
from worker.settings import RemoteImageSettings

NETWORK_FAILURE = "could not be fetched (no connection, no complete answer in time, or a TLS failure)"
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK_BYTES = 65_536
# The first bytes of each image type the worker passes on (WebP: RIFF....WEBP).
_MAGIC: dict[str, Callable[[bytes], bool]] = {
    "image/png": lambda b: b.startswith(b"\x89PNG\r\n\x1a\n"),
    "image/jpeg": lambda b: b.startswith(b"\xff\xd8\xff"),
    "image/gif": lambda b: b.startswith((b"GIF87a", b"GIF89a")),
    "image/webp": lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP",
}


class FetchRefused(Exception):
    """A fetch the policy or the answer stopped; the message is the reason the caller reads."""


class AddressRefused(OSError):
    """A host resolved to an address the worker does not connect to (raised in the resolver)."""


class CheckingResolver(AbstractResolver):
    """Resolves with ``inner`` and refuses the host if any address fails ``allowed``; the
    connector connects only to the addresses returned here, the ones checked."""

    def __init__(self, inner: AbstractResolver, allowed: Callable[[IPAddress], bool]):
        self.inner, self.allowed = inner, allowed

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        for result in results:
            try:
                address = ipaddress.ip_address(result["host"])
            except ValueError:
                raise AddressRefused(f"{host} resolved to {result['host']!r}") from None
            if not self.allowed(address):
                raise AddressRefused(f"{host} resolves to a non-public address")
        return results

    async def close(self) -> None:
        await self.inner.close()


class ImageFetcher:
    """Fetches the remote images of requests under ``llm.remote_images`` (an async context
    manager: the HTTP session lives between enter and exit).

    ``resolver`` (default: the system's, in a thread) and ``address_allowed`` (default:
    :func:`public_address`) are for tests, which map a listed name to a local server; no
    setting reaches them.
    """

    def __init__(
        self,
        settings: RemoteImageSettings,
        *,
        resolver: AbstractResolver | None = None,
        address_allowed: Callable[[IPAddress], bool] = public_address,
    ):
        self.settings = settings
        self.allowlist = HostAllowlist(settings.hosts)
        self._resolver, self._address_allowed = resolver, address_allowed
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ImageFetcher:
        context = ssl.create_default_context(cafile=self.settings.ca_file)
        resolver = CheckingResolver(self._resolver or aiohttp.ThreadedResolver(), self._address_allowed)
        connector = aiohttp.TCPConnector(
            resolver=resolver, ssl=context, use_dns_cache=False, force_close=True, family=socket.AF_UNSPEC
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,  # no HTTP(S)_PROXY: the connection goes where it was checked to go
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None),  # inline() bounds all of a request's fetches
            headers={"User-Agent": "llm-worker-image-fetch", "Accept-Encoding": "identity"},
        )
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def inline(self, request: LLMRequest, deadline: float) -> LLMRequest:
        """``request`` with every remote image URL replaced by a ``data:`` URI of its bytes.

        Raises :class:`InvalidRequest` naming the first part that could not be fetched.
        """
        places = remote_images(request.messages)
        if not places:
            return request
        if len(places) > self.settings.max_per_request:
            i, j, _ = places[self.settings.max_per_request]
            raise InvalidRequest(
                f"messages.{i}.content.{j}",
                f"image_url.url: more than {self.settings.max_per_request} image URLs in one request "
                "(llm.remote_images.max_per_request); send the rest inline as data: URIs",
            )
        contents: dict[int, list[dict[str, Any]]] = {}
        where = ""
        try:
            async with asyncio.timeout(min(self.settings.timeout_s, deadline - time.monotonic())):
                for i, j, url in places:
                    where = f"messages.{i}.content.{j}"
                    parts = contents.setdefault(i, list(_parts(request.messages[i])))
                    part = parts[j]
                    parts[j] = {**part, "image_url": {**part["image_url"], "url": await self.fetch(url)}}
        except FetchRefused as exc:
            raise InvalidRequest(where, f"image_url.url: {exc}") from None
        except TimeoutError:
            raise InvalidRequest(where, f"image_url.url: {NETWORK_FAILURE}") from None
        messages = [
            m.model_copy(update={"content": contents[i]}) if i in contents else m
            for i, m in enumerate(request.messages)
        ]
        return request.model_copy(update={"messages": messages})

    async def fetch(self, url: str) -> str:
        """The image at ``url`` as a ``data:`` URI; :class:`FetchRefused` saying why not."""
        if self._session is None:
            raise RuntimeError("ImageFetcher is used outside its 'async with'")
        current: str | URL = url
        for hop in range(self.settings.max_redirects + 1):
            refusal = self.allowlist.refusal(current)
            if refusal is not None:
                raise FetchRefused(refusal if hop == 0 else f"redirected to a URL not fetched: {refusal}")
            current = URL(current)  # as the allowlist read it
            try:
                async with self._session.get(current, allow_redirects=False) as response:
                    if response.status not in _REDIRECTS:
                        return await self._image(response)
                    current = current.join(URL(response.headers.get("Location", "")))
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, AddressRefused):
                    raise FetchRefused(
                        f"host {current.raw_host!r} resolves to a non-public address"
                    ) from None
                raise FetchRefused(NETWORK_FAILURE) from None
            except (aiohttp.ClientError, OSError, ValueError):  # reset, TLS, bad answer, bad Location
                raise FetchRefused(NETWORK_FAILURE) from None
        raise FetchRefused(
            f"more than {self.settings.max_redirects} redirects (llm.remote_images.max_redirects)"
        )

    async def _image(self, response: aiohttp.ClientResponse) -> str:
        if response.status != 200:
            raise FetchRefused(f"the server answered HTTP {response.status}")
        if response.headers.get("Content-Encoding", "identity").lower() != "identity":
            raise FetchRefused("the server sent a compressed body (Content-Encoding); images are sent as is")
        media = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        allowed = self.settings.content_types
        if media not in allowed:
            raise FetchRefused(f"content type {media[:60]!r} is not one of {', '.join(allowed)}")
        limit = self.settings.max_bytes
        if response.content_length is not None and response.content_length > limit:
            raise FetchRefused(
                f"{response.content_length} bytes (Content-Length) exceeds the limit of {limit}"
            )
        body = bytearray()
        async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
            body += chunk
            if len(body) > limit:
                raise FetchRefused(
                    f"the body exceeds the limit of {limit} bytes (llm.remote_images.max_bytes)"
                )
        if not _MAGIC[media](bytes(body[:16])):
            raise FetchRefused(f"the body is not a {media} image (its first bytes say otherwise)")
        return f"data:{media};base64,{base64.b64encode(body).decode()}"


def _parts(message: ChatMessage) -> list[dict[str, Any]]:
    return message.content if isinstance(message.content, list) else []


def remote_images(messages: list[ChatMessage]) -> list[tuple[int, int, str]]:
    """``(message, part, url)`` of every ``image_url`` part whose URL is not a ``data:`` URI."""
    found = []
    for i, message in enumerate(messages):
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            if part.get("type") != "image_url":
                continue
            url = part["image_url"]["url"]
            if url[:5].lower() != "data:":
                found.append((i, j, url))
    return found
