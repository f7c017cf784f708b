"""Fixtures of the boundary tests: a test CA and a local https image server (tests/support/tls.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.tls import LocalCA, RawTLSServer, make_ca

# The names the test certificate holds: listed ones, a suffix pattern, and ones never connected to.
CERT_NAMES = ["images.test", "*.cdn.test", "evil.test", "private.test", "rebind.test"]


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return make_ca(tmp_path_factory.mktemp("ca"), CERT_NAMES)


@pytest.fixture
async def server(ca: LocalCA) -> AsyncIterator[RawTLSServer]:
    async with RawTLSServer(ca) as running:
        yield running
