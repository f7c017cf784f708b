"""deploy/rabbitmq/import_definitions.py (issue #15), what deploy/k8s/broker-job.yaml runs: the
definitions imported through the management API of a broker these manifests do not run (here a
private node with an administrator of its own), each user's password hashed from its file; and
the ``--out`` file a broker loads at boot (the Cluster Operator's way, docs/deploy.md).
test_kubernetes.py checks that the Job runs this script on these files."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import aiormq
import pytest

from tests.deploy.shipped import BROKER_DIR, DEFINITIONS, broker_users
from tests.support.ports import free_port, wait_for_port
from tests.support.services import PrivateRabbit

SCRIPT = BROKER_DIR / "import_definitions.py"
ADMIN_PASSWORD = f"admin-{uuid.uuid4().hex}"


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env}, check=False)  # fmt: skip


def password_files(folder: Path, *, without: tuple[str, ...] = ()) -> Path:
    folder.mkdir()
    for user in broker_users():
        if user not in without:
            (folder / user).write_text(f"{user}-{uuid.uuid4().hex}\n")
    return folder


async def logs_in(port: int, user: str, password: str) -> bool:
    try:
        connection = await aio_pika.connect(f"amqp://{user}:{password}@127.0.0.1:{port}/")
    except aiormq.exceptions.ProbableAuthenticationError:
        return False
    await connection.close()
    return True


@pytest.fixture(scope="module")
def external() -> Iterator[tuple[PrivateRabbit, str]]:
    """A broker with its own administrator and the management plugin; its management URL."""
    management = free_port()
    conf = f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {management}\n"
    node = PrivateRabbit(user="admin", password=ADMIN_PASSWORD, plugins=["rabbitmq_management"], conf=conf)

    async def start() -> None:
        await node.start()
        await wait_for_port(management, up=True, timeout_s=60)

    asyncio.run(start())
    yield node, f"http://127.0.0.1:{management}/"
    asyncio.run(node.destroy())


def admin_env(url: str, tmp_path: Path, password: str = ADMIN_PASSWORD) -> dict[str, str]:
    (tmp_path / "admin-password").write_text(password + "\n")
    return {"RABBITMQ_MANAGEMENT_URL": url, "RABBITMQ_ADMIN_USERNAME": "admin",
            "RABBITMQ_ADMIN_PASSWORD_FILE": str(tmp_path / "admin-password")}  # fmt: skip


async def test_the_job_imports_every_user_with_its_password_and_leaves_the_rest(external, tmp_path):
    node, url = external
    incomplete = password_files(tmp_path / "incomplete", without=("agent-editor",))
    refused = run(str(DEFINITIONS), str(incomplete), **admin_env(url, tmp_path))
    assert refused.returncode == 1
    assert f"broker user 'agent-editor' has no password: write one to {incomplete / 'agent-editor'}" in (
        refused.stderr
    )
    assert "nothing was imported" in refused.stderr
    (incomplete / "agent-editor").write_text("one\ntwo\n")
    two_lines = run(str(DEFINITIONS), str(incomplete), **admin_env(url, tmp_path))
    assert two_lines.returncode == 1 and "agent-editor holds more than one line" in two_lines.stderr
    assert node.ctl("--silent", "list_users").split("\t")[0] == "admin", "all or nothing"

    passwords = password_files(tmp_path / "passwords")
    done = run(str(DEFINITIONS), str(passwords), **admin_env(url, tmp_path))
    assert done.returncode == 0, done.stderr
    for user in broker_users():
        password = (passwords / user).read_text().strip()
        assert password not in done.stdout + done.stderr
        assert await logs_in(node.port, user, password), user
        assert not await logs_in(node.port, user, "wrong"), user
    assert await logs_in(node.port, "admin", ADMIN_PASSWORD), "the broker's own users stay"
    topic = node.ctl("--silent", "list_user_topic_permissions", "agent-writer")
    assert topic.split() == ["/", "llm.results", "^$", "^writer$"]

    again = run(str(DEFINITIONS), str(passwords), **admin_env(url, tmp_path))  # the Job re-run
    writer = (passwords / "agent-writer").read_text().strip()
    assert again.returncode == 0 and await logs_in(node.port, "agent-writer", writer)


def test_a_refused_or_unreachable_management_api_is_one_line_naming_the_fix(external, tmp_path):
    _, url = external
    passwords = password_files(tmp_path / "passwords")
    wrong = run(str(DEFINITIONS), str(passwords), **admin_env(url, tmp_path, password="not-it"))
    assert wrong.returncode == 1
    assert (
        wrong.stderr.strip().endswith("(an administrator of the broker)")
        and "refused the login" in wrong.stderr
    )
    gone = run(str(DEFINITIONS), str(passwords), **admin_env(f"http://127.0.0.1:{free_port()}/", tmp_path))
    assert gone.returncode == 1 and "check RABBITMQ_MANAGEMENT_URL" in gone.stderr
    assert len(gone.stderr.strip().splitlines()) == 1


def readable_copy(file: Path) -> Path:
    """A folder holding a copy of ``file`` that the node's rabbitmq user can read (tmp_path is 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="definitions-"))
    folder.chmod(0o755)
    shutil.copy(file, folder / file.name)
    (folder / file.name).chmod(0o644)
    return folder


async def test_the_rendered_file_loaded_at_boot_needs_no_password_step(tmp_path):
    """--out: the hashes in the definitions, for a broker that loads them at boot."""
    passwords = password_files(tmp_path / "passwords")
    rendered = tmp_path / "definitions.json"
    done = run(str(DEFINITIONS), str(passwords), "--out", str(rendered))
    assert done.returncode == 0, done.stderr
    assert rendered.stat().st_mode & 0o077 == 0, "hashes are secrets too"
    assert all((passwords / u).read_text().strip() not in rendered.read_text() for u in broker_users())
    readable = readable_copy(rendered)
    node = PrivateRabbit(conf=f"load_definitions = {readable / rendered.name}\n")
    try:
        await node.start()
        for user in broker_users():
            assert await logs_in(node.port, user, (passwords / user).read_text().strip()), user
    finally:
        await node.destroy()
        shutil.rmtree(readable)
