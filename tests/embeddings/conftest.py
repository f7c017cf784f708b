"""Fixtures of the embedding tests: each provider's fake, started on demand, by the provider
tests' own ``edge`` fixture (an embedding provider has a ``fake()`` as a chat provider does)."""

from __future__ import annotations

from tests.providers.conftest import edge

__all__ = ["edge"]
