"""Image URLs the operator allows (issue #16): the fetcher, against a local https server that
answers as a hostile image host would. The real worker's side is in test_fetch_worker.py.

The test server listens on 127.0.0.1, which the address policy refuses; the fetchers here get a
resolver mapping the test names to it and, where a test needs a connection to succeed, a policy
that lets that one address through. The default policy is what the tests of refused addresses
use, unchanged."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.abc import ResolveResult
from hypothesis import given
from hypothesis import settings as examples
from hypothesis import strategies as st
from yarl import URL

from tests.support.tls import LocalCA, RawTLSServer, StaticResolver, answer, make_ca, response
from worker.boundary.fetch import NETWORK_FAILURE, FetchRefused, ImageFetcher
from worker.boundary.urls import METADATA_ADDRESSES, HostAllowlist, IPAddress, public_address
from worker.errors import ConfigError, InvalidRequest
from worker.messages import LLMRequest
from worker.settings import RemoteImageSettings

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
IMAGES = {  # the first bytes of each type, then filler
    "image/png": PNG,
    "image/jpeg": b"\xff\xd8\xff\xe0" + b"j" * 60,
    "image/gif": b"GIF89a" + b"g" * 60,
    "image/webp": b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"w" * 60,
}
LOCAL = ipaddress.ip_address("127.0.0.1")


def local_or_public(address: IPAddress) -> bool:
    """The default policy plus the test server's one address."""
    return address == LOCAL or public_address(address)


def png(body: bytes = PNG, **headers: str) -> Callable[..., Any]:
    return answer(200, {"Content-Type": "image/png", "Content-Length": str(len(body)), **headers}, body)


def fetcher(
    ca: LocalCA,
    server: RawTLSServer,
    *,
    names: dict[str, list[str]] | None = None,
    allowed: Callable[[IPAddress], bool] = local_or_public,
    resolver: Any = None,
    **settings: Any,
) -> ImageFetcher:
    hosts = [f"images.test:{server.port}", f"*.cdn.test:{server.port}", f"private.test:{server.port}"]
    config = RemoteImageSettings(hosts=settings.pop("hosts", hosts), ca_file=str(ca.ca_file), **settings)
    dns = {"images.test": ["127.0.0.1"], "a.cdn.test": ["127.0.0.1"], "evil.test": ["127.0.0.1"]}
    return ImageFetcher(config, resolver=resolver or StaticResolver(names or dns), address_allowed=allowed)


async def fetched(fetch: ImageFetcher, url: str) -> bytes | str:
    """The bytes of the data: URI fetched, or the reason it was refused."""
    async with fetch:
        try:
            uri = await fetch.fetch(url)
        except FetchRefused as exc:
            return str(exc)
    media, _, data = uri.partition(";base64,")
    assert media.startswith("data:image/")
    return base64.b64decode(data)


@pytest.mark.parametrize("media", list(IMAGES))
async def test_an_allowed_image_comes_back_as_a_data_uri_of_its_exact_bytes(ca, server, media):
    body = IMAGES[media]
    server.routes["/i"] = answer(
        200, {"Content-Type": f"{media}; q=1", "Content-Length": str(len(body))}, body
    )
    async with fetcher(ca, server) as fetch:
        uri = await fetch.fetch(server.url("images.test", "/i"))
        suffix = await fetch.fetch(server.url("a.cdn.test", "/i"))  # *.cdn.test
    assert uri == f"data:{media};base64,{base64.b64encode(body).decode()}" == suffix


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://images.test:{port}/a.png", "only https URLs of allowed hosts are fetched, http: URL"),
        ("https://evil.test:{port}/a.png", "host 'evil.test:{port}' is not in llm.remote_images.hosts"),
        ("https://images.test/a.png", "host 'images.test' is not in"),  # port 443 is not listed
        ("https://cdn.test:{port}/a.png", "host 'cdn.test:{port}' is not in"),  # *. is not the apex
        ("https://images.test.:{port}/a.png", "host 'images.test.:{port}' is not in"),
        ("https://imagesXtest:{port}/a.png", "host 'imagesxtest:{port}' is not in"),
        ("https://127.0.0.1:{port}/a.png", "host '127.0.0.1:{port}' is not in"),
        ("https://[::1]:{port}/a.png", "host '::1:{port}' is not in"),
        ("https://u:p@images.test:{port}/a.png", "a URL with user info is not fetched"),
        ("https://images.test:{port}\\@evil.test/", "not a valid URL"),
        ("file:///etc/passwd", "only https URLs"),
    ],
)
async def test_a_url_off_the_list_is_refused_before_any_connection(ca, server, url, reason):
    server.routes["/a.png"] = png()
    url, reason = url.format(port=server.port), reason.format(port=server.port)
    result = await fetched(fetcher(ca, server), url)
    assert isinstance(result, str) and result.startswith(reason), result
    assert server.connections == 0  # evil.test resolves to the server: only the list stopped it


NON_PUBLIC = [
    "127.0.0.1",
    "127.8.9.10",
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "100.100.100.200",
    "0.0.0.0",
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
    "198.18.0.1",
    "192.0.2.1",
    "::1",
    "::",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "::ffff:10.1.2.3",
    "fe80::1",
    "fd00:ec2::254",
    "fc00::1",
    "ff02::1",
    "64:ff9b::a00:1",
    "2002:7f00:1::1",
    "2001::1",
    "2001:db8::1",
]


@pytest.mark.parametrize("address", NON_PUBLIC)
def test_the_default_policy_refuses_every_non_public_address(address):
    assert not public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8"])
def test_the_default_policy_allows_public_addresses(address):
    assert public_address(ipaddress.ip_address(address))


def test_every_metadata_address_is_refused():
    assert not any(public_address(address) for address in METADATA_ADDRESSES)


@pytest.mark.parametrize(
    "addresses",
    [
        ["127.0.0.1"],
        ["::ffff:127.0.0.1"],
        ["::1"],
        ["10.0.0.1"],
        ["169.254.169.254"],
        ["8.8.8.8", "127.0.0.1"],
    ],
)
async def test_a_listed_name_resolving_to_a_non_public_address_is_refused_before_connecting(
    ca, server, addresses
):
    """The default policy: a listed name that resolves to loopback (where the server listens;
    ``::ffff:127.0.0.1`` reaches it too), private or metadata addresses. One bad address of
    several refuses the name: the connector would try them all."""
    server.routes["/a.png"] = png()
    fetch = fetcher(ca, server, names={"images.test": addresses}, allowed=public_address)
    result = await fetched(fetch, server.url("images.test", "/a.png"))
    assert result == "host 'images.test' resolves to a non-public address"
    assert server.connections == 0


def redirect(location: str) -> Callable[..., Any]:
    return answer(302, {"Location": location, "Content-Length": "0"})


async def test_every_redirect_is_checked_like_the_url(ca, server):
    p = server.port
    server.routes.update(
        {
            "/a.png": png(),
            "/to-evil": redirect(f"https://evil.test:{p}/a.png"),
            "/to-private": redirect(f"https://private.test:{p}/a.png"),
            "/to-ip": redirect(f"https://127.0.0.1:{p}/a.png"),
            "/to-http": redirect(f"http://images.test:{p}/a.png"),
            "/to-file": redirect("file:///etc/passwd"),
            "/relative": redirect("/a.png"),
            "/loop": redirect("/loop"),
        }
    )
    dns = {"images.test": ["127.0.0.1"], "evil.test": ["127.0.0.1"], "private.test": ["10.0.0.1"]}
    expected = {
        "/to-evil": f"redirected to a URL not fetched: host 'evil.test:{p}' is not in",
        "/to-private": "host 'private.test' resolves to a non-public address",
        "/to-ip": f"redirected to a URL not fetched: host '127.0.0.1:{p}' is not in",
        "/to-http": "redirected to a URL not fetched: only https URLs",
        "/to-file": "redirected to a URL not fetched: only https URLs",
        "/loop": "more than 3 redirects (llm.remote_images.max_redirects)",
    }
    async with fetcher(ca, server, names=dns) as fetch:
        for path, reason in expected.items():
            with pytest.raises(FetchRefused) as refused:
                await fetch.fetch(server.url("images.test", path))
            assert str(refused.value).startswith(reason), (path, refused.value)
        assert await fetch.fetch(server.url("images.test", "/relative")) == await fetch.fetch(
            server.url("images.test", "/a.png")
        )
    assert server.paths.count("/a.png") == 2  # only the two fetches that were allowed there
    assert server.paths.count("/loop") == 4  # the URL and 3 redirects


async def test_the_address_checked_is_the_address_connected_to_and_every_hop_looks_again(ca, server):
    """DNS rebinding: the name answers 127.0.0.1 (allowed here) once, then 10.0.0.1. The first
    hop connects to what was checked, with one lookup; the redirect's hop looks again and is
    refused."""

    class Rebinding(StaticResolver):
        async def resolve(self, host: str, port: int = 0, family: Any = 0) -> list[ResolveResult]:
            answers = await super().resolve(host, port, family)
            self.names[host] = ["10.0.0.1"]
            return answers

    server.routes.update({"/a.png": png(), "/again": redirect("/a.png")})
    resolver = Rebinding({"rebind.test": ["127.0.0.1"]})
    hosts = [f"rebind.test:{server.port}"]
    async with fetcher(ca, server, resolver=resolver, hosts=hosts) as fetch:
        assert await fetch.fetch(server.url("rebind.test", "/a.png"))
        assert resolver.lookups == 1 and server.connections == 1
        resolver.names["rebind.test"] = ["127.0.0.1"]
        with pytest.raises(FetchRefused, match="resolves to a non-public address"):
            await fetch.fetch(server.url("rebind.test", "/again"))
    assert resolver.lookups == 3 and server.paths == ["/a.png", "/again"]


def drip(headers: dict[str, str], first: bytes, *, pause_s: float = 0.05) -> Callable[..., Any]:
    """Headers, ``first``, then one byte every ``pause_s`` until the client goes away."""

    async def handle(writer: asyncio.StreamWriter) -> None:
        writer.write(response(200, headers, first))
        while True:
            await writer.drain()
            await asyncio.sleep(pause_s)
            writer.write(b"x")

    return handle


async def test_bodies_over_the_size_cap_are_refused_whatever_the_headers_say(ca, server):
    cap = 1000
    big = PNG + b"\0" * 4000
    server.routes.update(
        {
            "/declared": png(big),  # Content-Length says 4000+: refused before the body is read
            "/undeclared": answer(200, {"Content-Type": "image/png"}, big),  # no length, read to EOF
            "/chunked": answer(
                200,
                {"Content-Type": "image/png", "Transfer-Encoding": "chunked"},
                b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (big[:600], big[600:])) + b"0\r\n\r\n",
            ),
            "/endless": drip({"Content-Type": "image/png"}, PNG + b"\0" * 900, pause_s=0),
        }
    )
    async with fetcher(ca, server, max_bytes=cap) as fetch:
        for path in ("/declared",):
            with pytest.raises(FetchRefused, match=f"bytes \\(Content-Length\\) exceeds the limit of {cap}"):
                await fetch.fetch(server.url("images.test", path))
        for path in ("/undeclared", "/chunked", "/endless"):
            with pytest.raises(FetchRefused, match=f"the body exceeds the limit of {cap} bytes"):
                await fetch.fetch(server.url("images.test", path))


async def test_a_lying_content_length_never_gets_more_than_it_declared(ca, server):
    """Understated: at most the declared bytes are read (aiohttp refuses the answer when it sees
    data after them, as it does here); overstated: the body ends early. Either way the cap holds."""
    server.routes.update(
        {
            "/under": answer(
                200, {"Content-Type": "image/png", "Content-Length": "20"}, PNG + b"\0" * 100_000
            ),
            "/over": answer(200, {"Content-Type": "image/png", "Content-Length": "900"}, PNG),
        }
    )
    fetch = fetcher(ca, server, max_bytes=1000)
    assert await fetched(fetch, server.url("images.test", "/under")) in (NETWORK_FAILURE, PNG[:20])
    assert await fetched(fetch, server.url("images.test", "/over")) == NETWORK_FAILURE


def request_with(urls: list[str]) -> LLMRequest:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return LLMRequest.model_validate(
        {"request_id": "r", "agent": "writer", "messages": [{"role": "user", "content": parts}]}
    )


async def test_a_slow_server_is_cut_at_the_time_cap_for_all_of_a_requests_fetches(ca, server):
    server.routes.update(
        {
            "/a.png": png(),
            "/slow": drip({"Content-Type": "image/png", "Content-Length": "100000"}, PNG),
            "/silent": lambda writer: asyncio.sleep(30),
        }
    )
    async with fetcher(ca, server, timeout_s=1.0) as fetch:
        for path in ("/slow", "/silent"):
            started = time.monotonic()
            request = request_with([server.url("images.test", "/a.png"), server.url("images.test", path)])
            with pytest.raises(InvalidRequest) as refused:
                await fetch.inline(request, deadline=time.monotonic() + 60)
            elapsed = time.monotonic() - started
            assert 0.9 < elapsed < 3.0, elapsed
            assert str(refused.value) == f"messages.0.content.1: image_url.url: {NETWORK_FAILURE}"
        # the request's own deadline cuts shorter than timeout_s
        started = time.monotonic()
        with pytest.raises(InvalidRequest):
            await fetch.inline(request_with([server.url("images.test", "/slow")]), time.monotonic() + 0.2)
        assert time.monotonic() - started < 0.9


async def test_only_images_of_the_listed_types_whose_bytes_agree_are_passed_on(ca, server):
    html = b"<html><script>alert(1)</script></html>"
    server.routes.update(
        {
            "/html": answer(200, {"Content-Type": "text/html", "Content-Length": str(len(html))}, html),
            "/disguised": png(html),
            "/svg": answer(200, {"Content-Type": "image/svg+xml", "Content-Length": "5"}, b"<svg>"),
            "/none": answer(200, {"Content-Length": str(len(PNG))}, PNG),
            "/gzip": png(Content_Encoding="gzip"),
            "/gif": answer(200, {"Content-Type": "image/gif"}, IMAGES["image/gif"]),
            "/404": answer(404, {"Content-Length": "0"}),
        }
    )
    server.routes["/gzip"] = answer(
        200, {"Content-Type": "image/png", "Content-Encoding": "gzip", "Content-Length": str(len(PNG))}, PNG
    )
    expected = {
        "/html": "content type 'text/html' is not one of image/png, image/jpeg",
        "/disguised": "the body is not a image/png image",
        "/svg": "content type 'image/svg+xml' is not one of",
        "/none": "content type '' is not one of",
        "/gzip": "the server sent a compressed body",
        "/gif": "content type 'image/gif' is not one of image/png, image/jpeg",  # not listed here
        "/404": "the server answered HTTP 404",
    }
    async with fetcher(ca, server, content_types=["image/png", "image/jpeg"]) as fetch:
        for path, reason in expected.items():
            with pytest.raises(FetchRefused) as refused:
                await fetch.fetch(server.url("images.test", path))
            assert str(refused.value).startswith(reason), (path, refused.value)


async def test_every_network_failure_reads_the_same(ca, server, tmp_path):
    """Nothing listening, a reset, a certificate for another name, a CA not trusted: one text,
    so that an answer does not tell an open port from a closed one."""

    async def reset(writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()

    server.routes["/reset"] = reset
    closed = RawTLSServer(server.ca)
    async with closed:
        closed_port = closed.port  # nothing listens there once this block ends
    other_ca = make_ca(tmp_path / "other", ["images.test"])
    hosts = [f"images.test:{server.port}", f"images.test:{closed_port}", f"wrong.test:{server.port}"]
    dns = {"images.test": ["127.0.0.1"], "wrong.test": ["127.0.0.1"]}
    urls = [
        f"https://images.test:{closed_port}/a.png",
        server.url("images.test", "/reset"),
        server.url("wrong.test", "/a.png"),  # the certificate does not name it
    ]
    async with fetcher(ca, server, names=dns, hosts=hosts) as fetch:
        for url in urls:
            with pytest.raises(FetchRefused) as refused:
                await fetch.fetch(url)
            assert str(refused.value) == NETWORK_FAILURE, url
    untrusted = fetcher(other_ca, server, names=dns, hosts=hosts)
    assert await fetched(untrusted, server.url("images.test", "/a.png")) == NETWORK_FAILURE


async def test_inline_replaces_each_url_by_its_data_uri_and_keeps_the_rest(ca, server):
    server.routes["/a.png"] = png()
    url = server.url("images.test", "/a.png")
    parts = [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": url, "detail": "high"}},
        {"type": "image_url", "image_url": {"url": "data:image/gif;base64,R0lGODlh"}},
    ]
    request = LLMRequest.model_validate(
        {
            "request_id": "r",
            "agent": "writer",
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": parts}],
        }
    )
    async with fetcher(ca, server) as fetch:
        inlined = await fetch.inline(request, time.monotonic() + 10)
        with pytest.raises(InvalidRequest, match=r"messages\.0\.content\.4: image_url\.url: more than 4"):
            await fetch.inline(request_with([url] * 5), time.monotonic() + 10)
    data = f"data:image/png;base64,{base64.b64encode(PNG).decode()}"
    assert inlined.messages[1].content == [
        parts[0],
        {**parts[1], "image_url": {"url": data, "detail": "high"}},
        parts[2],
    ]
    assert inlined.messages[0] == request.messages[0] and request.messages[1].content == parts  # a copy
    assert server.connections == 1  # the refused request of 5 fetched nothing


# -- the allowlist and its configuration --------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("Images.test", "expected a lower-case host name"),
        ("images", "expected a lower-case host name"),  # one label
        ("*.test", "expected a lower-case host name"),  # a suffix of one label
        ("*", "expected a lower-case host name"),
        ("https://images.test", "expected a lower-case host name"),
        ("images.test/a", "expected a lower-case host name"),
        ("10.0.0.1", "an IP address"),
        ("[::1]", "expected a lower-case host name"),
        ("images.test:0", "out of range"),
        ("images.test:70000", "out of range"),
        ("-bad.test", "expected a lower-case host name"),
    ],
)
def test_a_hosts_entry_that_is_not_a_host_name_stops_the_worker_at_start_up(make_settings, entry, problem):
    with pytest.raises(ConfigError) as error:
        make_settings(remote_images={"hosts": ["good.example.com", entry]})
    assert "llm.yaml: llm.remote_images.hosts.1:" in str(error.value) and problem in str(error.value)


def test_a_ca_file_that_cannot_be_read_stops_the_worker_at_start_up(make_settings, tmp_path: Path):
    (tmp_path / "junk.pem").write_text("not a certificate")
    for path, problem in ((tmp_path / "missing.pem", "No such file"), (tmp_path / "junk.pem", "cannot load")):
        with pytest.raises(ConfigError) as error:
            make_settings(remote_images={"hosts": ["images.test"], "ca_file": str(path)})
        assert "llm.remote_images.ca_file" in str(error.value) and problem in str(error.value)


def test_the_default_configuration_lists_no_host(make_settings):
    settings = make_settings()
    assert settings.llm.remote_images.hosts == []
    assert not HostAllowlist(settings.llm.remote_images.hosts)


LISTED = HostAllowlist(["images.test", "*.cdn.test", "ports.test:8443"])
_hosts = st.sampled_from(
    ["images.test", "IMAGES.test", "images.test.", "images.test.evil", "evilimages.test", "a.cdn.test",
     "cdn.test", "x.a.cdn.test", "acdn.test", "ports.test", "127.0.0.1", "[::1]", "%69mages.test",
     "images.test@evil.test", "evil.test#@images.test", "ima\u0261es.test", ""]
)  # fmt: skip
_urls = st.builds(
    "{}{}{}{}{}".format,
    st.sampled_from(["https://", "http://", "HTTPS://", "https:/", "https:\\\\", "//", "ftp://", "data:"]),
    st.sampled_from(["", "u@", "u:p@", ":@"]),
    _hosts,
    st.sampled_from(["", ":443", ":8443", ":0", ":99999", ":80"]),
    st.sampled_from(["", "/", "/a.png", "/a?b=c", "/%2e%2e/", "\\x", "/#frag", " /a"]),
)


@examples(max_examples=600, deadline=None)
@given(url=_urls | st.text(max_size=80))
def test_a_url_is_allowed_only_if_it_connects_to_a_listed_host_and_port(url):
    """Whatever the URL, the one allowed is https, without user info, to a listed name and port,
    read as aiohttp reads it (yarl: the host checked is the host connected to)."""
    if LISTED.refusal(url) is not None:
        return
    parsed = URL(url)
    assert parsed.scheme == "https" and parsed.user is None and parsed.password is None
    host, port = parsed.raw_host, parsed.port
    assert (host, port) in {("images.test", 443), ("ports.test", 8443)} or (
        port == 443 and host is not None and host.endswith(".cdn.test")
    ), url


async def test_the_system_resolver_is_checked_too():
    """What a worker builds without a test's resolver: the system's, through the same check."""
    import aiohttp

    from worker.boundary.fetch import AddressRefused, CheckingResolver

    resolver = CheckingResolver(aiohttp.ThreadedResolver(), public_address)
    with pytest.raises(AddressRefused):
        await resolver.resolve("localhost", 443, 0)  # type: ignore[arg-type]
    await resolver.close()
