"""The agent client installs on its own (issue #24): ``client/`` builds ``llm-worker-client``, a
wheel of three modules depending on aio-pika and pydantic, and the README's client script runs
from a fresh virtual environment holding only that wheel and what those two need.

Offline and fast: the wheel is built with this environment's hatchling (no build isolation),
and the fresh environment gets its dependencies as links to this environment's copies of
exactly the declared dependencies and their own requirements, nothing else.
"""

from __future__ import annotations

import asyncio
import importlib.metadata as metadata
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.fakes.openai_server import FakeOpenAI
from tests.support.config import Names
from tests.support.markdown import blocks
from tests.support.paths import ROOT
from tests.support.processes import WorkerProcess

pytestmark = pytest.mark.timeout(180)


def _closure(requirements: list[str]) -> set[str]:
    """The distributions these requirements pull in, by their own metadata, extras left out."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = metadata.distribution(req.name).metadata["Name"]
        if name.lower() in seen:
            continue
        seen.add(name.lower())
        todo += [Requirement(r) for r in metadata.requires(name) or []]
    return seen


def _link_distributions(names: set[str], target: Path) -> None:
    """Symlink each distribution's top-level files (its packages and its .dist-info) into ``target``."""
    target.mkdir()
    for name in names:
        dist = metadata.distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            source = Path(str(dist.locate_file(top)))
            if source.exists() and not (target / top).exists() and top != "__pycache__":
                (target / top).symlink_to(source)


@pytest.fixture(scope="module")
def client_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the built wheel, the python of a fresh venv with it and its dependencies installed)."""
    tmp = tmp_path_factory.mktemp("client-dist")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", str(ROOT / "client")]
    subprocess.run([*build, "-w", str(tmp / "dist")], check=True, timeout=120)
    [wheel] = (tmp / "dist").glob("*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], check=True, timeout=60)
    python = tmp / "venv" / "bin" / "python"
    where = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(subprocess.check_output([python, "-c", where], text=True).strip())
    with zipfile.ZipFile(wheel) as archive:
        meta = archive.read(next(n for n in archive.namelist() if n.endswith("METADATA"))).decode()
    requires = [line.split(": ", 1)[1] for line in meta.splitlines() if line.startswith("Requires-Dist: ")]
    _link_distributions(_closure(requires), tmp / "deps")
    (site / "deps.pth").write_text(str(tmp / "deps") + "\n")
    install = [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(install, check=True, timeout=120)
    return wheel, python


def test_the_wheel_holds_the_three_client_modules_and_two_dependencies(client_env):
    wheel, _ = client_env
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        meta = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert sorted(n for n in names if not n.startswith("llm_worker_client-")) == [
        "worker/client.py",
        "worker/messages.py",
        "worker/tracing.py",
    ]
    requires = [line.split(": ", 1)[1] for line in meta.splitlines() if line.startswith("Requires-Dist: ")]
    assert [r for r in requires if "extra ==" not in r] == ["aio-pika>=10.2", "pydantic>=2.7"]
    for module in ("client", "messages", "tracing"):  # the very files of the worker, not copies
        assert archive_text(wheel, f"worker/{module}.py") == (ROOT / "worker" / f"{module}.py").read_text()
    worker_version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert f"Version: {worker_version}\n" in meta


def archive_text(wheel: Path, name: str) -> str:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(name).decode()


def test_the_client_imports_without_litellm_or_redis(client_env):
    _, python = client_env
    probe = (
        "import importlib.util, sys\n"
        "import worker.client, worker.messages\n"
        "missing = [m for m in ('litellm', 'redis', 'aiohttp', 'structlog', 'worker.app') "
        "if importlib.util.find_spec(m) is not None]\n"
        "print(worker.client.__file__, missing)\n"
        "assert missing == [], missing\n"
    )
    done = subprocess.run([python, "-I", "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert str(ROOT / "worker") not in done.stdout  # imported from the installed wheel


async def readme_script(client_env, config, names: Names, worker_processes, calls: str) -> list[str]:
    """The README's runnable Python block that calls ``calls``, run in the client-only
    environment against a worker; its output lines."""
    _, python = client_env
    [script] = [
        b.text
        for b in blocks(ROOT / "README.md")
        if b.lang == "python" and b.not_run is None and calls in b.text
    ]
    script = script.replace('"llm.requests"', f'"{names.request_queue}"')
    worker_processes.append(await WorkerProcess(config()).start())
    proc = await asyncio.create_subprocess_exec(
        str(python),
        "-I",
        "-c",
        script,
        cwd="/",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode()
    return out.decode().splitlines()


async def test_the_readme_script_runs_from_the_client_only_environment(
    client_env, config, names: Names, fake: FakeOpenAI, worker_processes
):
    answer, summary = (await readme_script(client_env, config, names, worker_processes, "llm.complete("))[:2]
    assert answer and summary.startswith("m-critic ")  # the critic's model in the test config
    assert fake.calls["m-critic"] == 1


async def test_the_readme_streaming_script_runs_from_the_client_only_environment(
    client_env, config, names: Names, fake: FakeOpenAI, worker_processes
):
    answer, summary = await readme_script(client_env, config, names, worker_processes, "llm.stream(")
    assert answer == "[m-critic] Critique: queues decouple agents."  # printed chunk by chunk
    assert summary.startswith("[ok] ") and summary.endswith(" USD")
    assert fake.requests[-1]["body"]["stream"] is True
