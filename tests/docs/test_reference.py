"""docs/configuration.md and docs/metrics.md cannot drift from the code (issue #24).

The generated sections match the code (the test command also runs ``python -m worker.reference
--check``); every key of the shipped YAML files is documented; every documented key is a field
of the settings models; ``config/`` names every key, optional ones at least in a comment.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from tests.support.paths import ROOT
from worker import reference
from worker.settings import SECTIONS

SHIPPED = [*sorted((ROOT / "config").glob("*.yaml")), *sorted((ROOT / "config" / "offline").glob("*.yaml"))]


def documented() -> dict[str, str]:
    """key -> type, as docs/configuration.md lists them."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    return dict(re.findall(r"^\| `([a-z_.\[\]]+)` \| ([^|]+?) \|", text, re.M))


def shipped_keys(node: Any, path: str, docs: dict[str, str]) -> Iterator[str]:
    """Every key path under ``path`` in a YAML tree. Mappings the docs list as free-form (agent
    or model names as keys, litellm's own parameters) are leaves."""
    kind = docs.get(path, "mapping")
    items: list[tuple[str, Any]] = []
    if isinstance(node, dict) and kind == "mapping":
        items = [(f"{path}.{key}", value) for key, value in node.items()]
    elif isinstance(node, list) and kind == "list of mappings":
        items = [(f"{path}[].{key}", value) for entry in node for key, value in entry.items()]
    for key, value in items:
        yield key
        yield from shipped_keys(value, key, docs)


def field_exists(key: str) -> bool:
    """Resolve ``llm.models[].model_info.input_cost_per_token`` through the models' fields."""
    top, *parts = key.split(".")
    model: Any = SECTIONS.get(top)
    for part in parts:
        name = part.removesuffix("[]")
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or name not in model.model_fields:
            return False
        model = model.model_fields[name].annotation
        optional = [a for a in get_args(model) if a is not type(None)]
        if type(None) in get_args(model) and len(optional) == 1:  # an optional section (`embedding`)
            model = optional[0]
        if part.endswith("[]"):
            if get_origin(model) is not list:
                return False
            model = get_args(model)[0]
    return model is not None


def test_generated_sections_match_the_code():
    assert reference.stale() == [], "run: python -m worker.reference"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_key_is_documented(path: Path):
    docs = documented()
    data = yaml.safe_load(path.read_text())
    [(top, section)] = data.items()
    missing = [key for key in shipped_keys(section, top, docs) if key not in docs]
    assert not missing, f"{path.relative_to(ROOT)}: not in docs/configuration.md: {missing}"


def test_every_documented_key_exists_in_the_settings():
    docs = documented()
    assert len(docs) > 40
    assert [key for key in docs if not field_exists(key)] == []


def test_the_production_config_names_every_key():
    """An optional key is at least a commented line, so reading config/ shows what can be set."""
    missing = []
    for key in documented():
        section, *_, name = key.replace("[]", "").split(".")
        text = (ROOT / "config" / f"{section}.yaml").read_text()
        if not re.search(rf"(^|[\s{{,#-]){re.escape(name)}:", text, re.M):
            missing.append(key)
    assert missing == []


def test_a_field_without_a_description_is_refused():
    from pydantic import Field

    class Bad(BaseModel):
        documented: int = Field(default=1, description="Fine.")
        undocumented: int = 2

    with pytest.raises(ValueError, match="undocumented"):
        reference.config_rows(Bad, "x")


def test_the_check_fails_on_a_stale_page(tmp_path: Path):
    for name in reference.TARGETS:
        (tmp_path / name).write_text((ROOT / "docs" / name).read_text())
    assert reference.main(["--check", "--docs", str(tmp_path)]) == 0
    page = tmp_path / "metrics.md"
    page.write_text(page.read_text().replace("llm_worker_ledger_read_errors_total", "llm_worker_gone_total"))
    assert reference.main(["--check", "--docs", str(tmp_path)]) == 1
    assert reference.main(["--docs", str(tmp_path)]) == 0
    assert reference.stale(tmp_path) == []
    assert "llm_worker_ledger_read_errors_total" in page.read_text()
