"""Image URLs the operator allows (issue #16), against the real worker: the provider gets the
bytes, never the URL; a refused fetch is answered ``invalid`` naming the part; the default
configuration fetches nothing. The fetcher's own cases are in test_fetch.py."""

from __future__ import annotations

import base64
import json
from typing import Any

from tests.boundary.test_fetch import PNG, local_or_public, png, redirect
from tests.boundary.test_hostile import deployment, provider, results, with_part
from tests.support.peers import raw_peer
from tests.support.queues import drain_queue
from tests.support.tls import LocalCA, RawTLSServer, StaticResolver, answer
from worker.boundary.fetch import NETWORK_FAILURE, ImageFetcher
from worker.boundary.urls import public_address
from worker.messages import LLMResult, Status
from worker.settings import Settings

GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==")  # 1x1


def image(url: str, **fields: Any) -> dict[str, Any]:
    return with_part({"type": "image_url", "image_url": {"url": url, "detail": "high"}}, **fields)


def allowing(make_settings: Any, server: RawTLSServer, ca: LocalCA, **llm: Any) -> Settings:
    hosts = [f"images.test:{server.port}", f"private.test:{server.port}"]
    return make_settings(remote_images={"hosts": hosts, "ca_file": str(ca.ca_file), "max_bytes": 4096}, **llm)


def fetcher(settings: Settings, *, policy: Any = local_or_public) -> ImageFetcher:
    dns = {
        "images.test": ["127.0.0.1"],
        "evil.test": ["127.0.0.1"],
        "private.test": ["10.0.0.1"],
        "loop.test": ["127.0.0.1"],
    }
    return ImageFetcher(settings.llm.remote_images, resolver=StaticResolver(dns), address_allowed=policy)


async def test_an_allowed_image_url_reaches_the_provider_as_the_bytes_fetched(
    make_settings, start_worker, amqp_url, names, ca, server
):
    """Anthropic: litellm would download the URL itself. The provider gets base64 of exactly the
    bytes served; token counting (``detail: high``) fetches nothing more; the cache key follows
    the bytes, so the same URL serving another image is asked again."""
    server.routes["/a.png"] = png()
    url = server.url("images.test", "/a.png")
    async with provider("anthropic") as claude:
        settings = allowing(
            make_settings, server, ca, default_model="anthropic", models=[deployment("anthropic", claude)]
        )
        async with (
            start_worker(settings, image_fetcher=fetcher(settings)),
            raw_peer(amqp_url, names.request_queue) as peer,
        ):
            first = await peer.publish(image(url))
            await peer.wait_replies(1)
            again = await peer.publish(image(url))  # same bytes: a cache hit
            await peer.wait_replies(2)
            server.routes["/a.png"] = answer(
                200, {"Content-Type": "image/gif", "Content-Length": str(len(GIF))}, GIF
            )
            changed = await peer.publish(image(url))
            answered = results(await peer.wait_replies(3))
    assert answered[first].status is Status.ok, answered[first].error
    assert answered[again].status is Status.ok and answered[again].cached
    assert answered[changed].status is Status.ok and not answered[changed].cached
    assert server.connections == 3  # one fetch per request, none by token counting
    assert claude.calls == 2
    sent = [json.dumps(r.body) for r in claude.requests]
    assert base64.b64encode(PNG).decode() in sent[0] and base64.b64encode(GIF).decode() in sent[1]
    assert not any("images.test" in body for body in sent)  # the provider never sees the URL


async def test_refused_fetches_are_answered_invalid_naming_the_part(
    make_settings, start_worker, amqp_url, names, ca, server, fake
):
    """Each case as a sender would try it; the provider is never called; each refusal is
    dead-lettered as InvalidRequest like any other refused part."""
    p = server.port
    big = PNG + b"\0" * 5000
    server.routes.update(
        {
            "/a.png": png(),
            "/to-evil": redirect(f"https://evil.test:{p}/a.png"),
            "/to-private": redirect(f"https://private.test:{p}/a.png"),
            "/big": png(big),
            "/big-chunks": answer(200, {"Content-Type": "image/png"}, big),
            "/page": answer(200, {"Content-Type": "text/html", "Content-Length": "5"}, b"<b>x</b>"[:5]),
            "/reset": answer(200, {"Content-Type": "image/png", "Content-Length": "999"}, PNG),
        }
    )
    where = "messages.0.content.1: image_url.url: "
    cases = {
        f"https://evil.test:{p}/a.png": f"host 'evil.test:{p}' is not in llm.remote_images.hosts",
        f"http://images.test:{p}/a.png": "only https URLs of allowed hosts are fetched, http: URL",
        f"https://images.test:{p}/to-evil": "redirected to a URL not fetched: host 'evil.test",
        f"https://images.test:{p}/to-private": "host 'private.test' resolves to a non-public address",
        f"https://private.test:{p}/a.png": "host 'private.test' resolves to a non-public address",
        f"https://images.test:{p}/big": f"{len(big)} bytes (Content-Length) exceeds the limit of 4096",
        f"https://images.test:{p}/big-chunks": "the body exceeds the limit of 4096 bytes",
        f"https://images.test:{p}/page": "content type 'text/html' is not one of",
        f"https://images.test:{p}/reset": NETWORK_FAILURE,
    }
    settings = allowing(make_settings, server, ca)
    async with (
        start_worker(settings, image_fetcher=fetcher(settings)),
        raw_peer(amqp_url, names.request_queue) as peer,
    ):
        sent = {await peer.publish(image(url)): reason for url, reason in cases.items()}
        answered = results(await peer.wait_replies(len(sent)))
    for cid, reason in sent.items():
        result = answered[cid]
        assert result.status is Status.invalid and result.error is not None, result
        assert result.error.message.startswith(where + reason), result.error.message
    assert fake.total_calls() == 0
    assert "/a.png" not in server.paths  # not via evil.test, not via private.test
    dead = await drain_queue(amqp_url, names.dead_letter_queue)
    assert {m.headers["x-dlq-reason"] for m in dead} == {"InvalidRequest"} and len(dead) == len(cases)


async def test_names_resolving_to_loopback_private_or_metadata_addresses_are_never_connected_to(
    make_settings, start_worker, amqp_url, names, ca, server, fake
):
    """The worker's default address policy, with a DNS that answers what an attacker's would:
    the server listens on 127.0.0.1 (which ``::ffff:127.0.0.1`` also reaches) and sees nothing."""
    addresses = ["127.0.0.1", "::ffff:127.0.0.1", "::1", "10.0.0.1", "169.254.169.254", "fd00:ec2::254"]
    hosts = [f"h{i}.cdn.test:{server.port}" for i in range(len(addresses))]
    settings = make_settings(remote_images={"hosts": hosts, "ca_file": str(ca.ca_file)})
    dns = {host.split(":")[0]: [address] for host, address in zip(hosts, addresses, strict=True)}
    fetch = ImageFetcher(
        settings.llm.remote_images, resolver=StaticResolver(dns), address_allowed=public_address
    )
    server.routes["/a.png"] = png()
    async with start_worker(settings, image_fetcher=fetch), raw_peer(amqp_url, names.request_queue) as peer:
        sent = {await peer.publish(image(f"https://{h}/a.png")): h.split(":")[0] for h in hosts}
        answered = results(await peer.wait_replies(len(sent)))
    for cid, host in sent.items():
        message = answered[cid].error.message  # type: ignore[union-attr]
        assert (
            message == f"messages.0.content.1: image_url.url: host {host!r} resolves to a non-public address"
        )
    assert server.connections == 0 and fake.total_calls() == 0


async def test_the_default_configuration_refuses_every_remote_url_and_connects_nowhere(
    make_settings, start_worker, amqp_url, names, ca, server, fake
):
    server.routes["/a.png"] = png()
    settings = make_settings()
    assert settings.llm.remote_images.hosts == []
    async with start_worker(settings), raw_peer(amqp_url, names.request_queue) as peer:
        cid = await peer.publish(image(server.url("images.test", "/a.png")))
        ok = await peer.publish(image("data:image/png;base64," + base64.b64encode(PNG).decode()))
        answered = results(await peer.wait_replies(2))
    refused = answered[cid]
    assert refused.status is Status.invalid and refused.error is not None
    assert refused.error.message.startswith("messages.0.content.1: image_url.url: only inline data")
    assert LLMResult.model_validate(answered[ok]).status is Status.ok
    assert server.connections == 0 and fake.total_calls() == 1


async def test_a_worker_with_hosts_listed_builds_its_own_fetcher(
    make_settings, start_worker, amqp_url, names, fake
):
    """No test resolver: the system's, which cannot resolve a reserved name; the answer says
    only that the image could not be fetched."""
    settings = make_settings(remote_images={"hosts": ["images.invalid"], "timeout_s": 2})
    async with start_worker(settings), raw_peer(amqp_url, names.request_queue) as peer:
        await peer.publish(image("https://images.invalid/a.png"))
        [reply] = await peer.wait_replies(1)
    result = LLMResult.model_validate_json(reply.body)
    assert result.error is not None
    assert result.error.message == f"messages.0.content.1: image_url.url: {NETWORK_FAILURE}"
    assert fake.total_calls() == 0
