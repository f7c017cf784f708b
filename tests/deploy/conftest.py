"""Fixtures of the deploy tests: config/ as the worker reads it."""

from __future__ import annotations

import pytest
import yaml

from tests.deploy.shipped import env_refs
from tests.support.paths import ROOT
from worker.settings import Settings, load_settings


@pytest.fixture(scope="module")
def secret_names() -> set[str]:
    """The provider-key variables config/llm.yaml reads."""
    return env_refs(yaml.safe_load((ROOT / "config" / "llm.yaml").read_text()))


@pytest.fixture(scope="module")
def settings(secret_names: set[str]) -> Settings:
    """config/ validated by the worker's own loader, with placeholder keys."""
    return load_settings(ROOT / "config", environ=dict.fromkeys(secret_names, "placeholder"))
