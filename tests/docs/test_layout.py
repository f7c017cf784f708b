"""The package reads the way its docs say (issue #14): the module table and the exception tree
in the docs match the code, and the operator's Redis tools start without importing litellm."""

from __future__ import annotations

import re
import subprocess
import sys

import worker.errors
from tests.support.paths import ROOT


def _doc_with(heading: str) -> str:
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if path.exists() and heading in (text := path.read_text()):
            return text
    raise AssertionError(f"no doc has the heading {heading!r}")


def _tree(text: str) -> list[tuple[int, str]]:
    """(depth, class name) of each line of the first drawn tree that starts at WorkerError."""
    start = text.index("WorkerError\n")
    indent = start - (text.rfind("\n", 0, start) + 1)  # the tree's own indentation (a docstring's)
    lines = [line[indent:] for line in text[start:].splitlines()]
    tree = [(0, "WorkerError")]
    for line in lines[1:]:
        match = re.match(r"^([\s│]*)[├└]── (\w+)", line)
        if match:
            tree.append((len(match.group(1)) // 4 + 1, match.group(2)))
        elif not line.strip().startswith("│") and not line.startswith(" "):
            break
    return tree


def test_every_module_is_in_the_module_table_and_every_row_exists():
    doc = _doc_with("## The package")
    table = doc[doc.index("## The package") :].split("\n## ", 1)[0]
    named = set(re.findall(r"`(worker/[\w/]+(?:\.py)?)`", table))
    modules = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "worker").rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }
    folders = {n for n in named if n.endswith("/")}
    covered = {m for m in modules if any(m.startswith(f) for f in folders)}
    assert modules - covered - named == set(), "modules missing from the table"
    assert {n for n in named if not (ROOT / n).exists()} == set(), "rows naming no module"


def test_the_exception_tree_in_the_docs_is_the_one_in_the_code():
    drawn_in_code = _tree(worker.errors.__doc__ or "")
    assert _tree(_doc_with("WorkerError\n├──")) == drawn_in_code
    parents: list[type] = []
    for depth, name in drawn_in_code:
        cls = getattr(worker.errors, name)
        del parents[depth:]
        if parents:
            assert cls.__bases__ == (parents[-1],), f"{name} is drawn under {parents[-1].__name__}"
        parents.append(cls)
    drawn = {name for _, name in drawn_in_code}
    defined = {
        name
        for name, value in vars(worker.errors).items()
        if isinstance(value, type) and issubclass(value, worker.errors.WorkerError)
    }
    assert defined == drawn, "every error of the tree is drawn, and only those"


def test_the_operators_redis_and_broker_tools_start_without_litellm():
    probe = (
        "import sys, time; t = time.perf_counter(); import worker.cli; "
        "print('litellm' in sys.modules, round(time.perf_counter() - t, 3))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    print(f"import of the CLI (budget, dlq, ask): {out[1]} s")
    assert out[0] == "False"


def _ignored(name: str) -> bool:
    as_folder = name.rstrip("/") + "/"  # a pattern such as `bench/.venv-proxy/` matches folders only
    command = ["git", "check-ignore", "--no-index", name, as_folder]
    check = subprocess.run(command, cwd=ROOT, capture_output=True)
    return check.returncode == 0


def test_every_file_the_docs_name_exists():
    """A path in backquotes (`tests/state/test_cache.py`, `bench/soak.py`, `deploy/...`) names a
    file or folder of this repository: a moved test or bench must take its docs along. Only what
    the repository ignores (made on the machine: deploy/secrets/, bench/.venv-proxy) may be absent;
    CHANGELOG.md keeps the paths each release had."""
    roots = ("worker", "tests", "bench", "deploy", "config", "schemas", "docs", "client")
    pattern = re.compile(rf"`((?:{'|'.join(roots)})/[\w./-]*)")
    missing = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        for name in pattern.findall(path.read_text())
        if not (ROOT / name.rstrip(".")).exists() and "*" not in name and not _ignored(name)
    }
    assert missing == set()
