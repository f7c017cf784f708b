"""Fixtures of the provider tests: each provider's fake, started on demand."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.fakes.base import ProviderFake
from tests.providers.catalogue import Provider


@pytest.fixture
async def edge() -> AsyncIterator[Callable[[Provider], Awaitable[ProviderFake]]]:
    """``await edge(provider)`` starts that provider's fake; every fake is stopped at the end."""
    started: list[ProviderFake] = []

    async def start(provider: Provider) -> ProviderFake:
        fake = await provider.fake().start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        await fake.stop()
