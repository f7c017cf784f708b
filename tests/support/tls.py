"""A test certificate authority and a local https server that answers with raw bytes, so that a
test can send what a hostile image host would: lying lengths, slow drips, redirects."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp.abc import AbstractResolver, ResolveResult

Handler = Callable[[asyncio.StreamWriter], Awaitable[None]]


@dataclass(frozen=True)
class LocalCA:
    """A CA (``ca.pem``) and one server certificate it signed for ``names``."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def make_ca(folder: Path, names: Iterable[str]) -> LocalCA:
    """Create the CA and a server certificate for ``names`` (DNS SANs) with the openssl CLI."""
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca = ["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test CA", *ca)
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=images.test")
    (folder / "server.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
        f"subjectAltName={','.join(f'DNS:{n}' for n in names)}\n"
    )
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "server.ext")  # fmt: skip
    return LocalCA(folder / "ca.pem", folder / "server.pem", folder / "server.key")


def response(status: int, headers: dict[str, str], body: bytes = b"") -> bytes:
    """An HTTP/1.1 response as bytes, headers exactly as given (a test may lie in them)."""
    lines = [f"HTTP/1.1 {status} X", *(f"{k}: {v}" for k, v in headers.items()), "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def answer(status: int, headers: dict[str, str], body: bytes = b"") -> Handler:
    async def handle(writer: asyncio.StreamWriter) -> None:
        writer.write(response(status, headers, body))
        await writer.drain()

    return handle


@dataclass
class RawTLSServer:
    """https on 127.0.0.1 with the CA's certificate; ``routes`` maps a path to a handler.

    ``connections`` counts TCP connections accepted, before any TLS: a fetch that the worker
    refused before connecting leaves it at 0. ``paths`` lists the paths asked for, in order.
    """

    ca: LocalCA
    routes: dict[str, Handler] = field(default_factory=dict)
    connections: int = 0
    paths: list[str] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None

    async def __aenter__(self) -> RawTLSServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def url(self, host: str, path: str, scheme: str = "https") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await writer.start_tls(self.ca.server_context())
            request = await reader.readuntil(b"\r\n\r\n")
            path = request.split(b" ", 2)[1].decode()
            self.paths.append(path)
            handler = self.routes.get(path, answer(404, {"Content-Length": "0"}))
            await handler(writer)
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away or refused us: what some tests want
        finally:
            writer.close()


class StaticResolver(AbstractResolver):
    """Answers each name with the addresses a test gave it (its DNS); counts the lookups."""

    def __init__(self, names: dict[str, list[str]]):
        self.names, self.lookups = names, 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups += 1
        if host not in self.names:
            raise OSError(f"{host}: no such name")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self.names[host]
        ]

    async def close(self) -> None:
        pass
