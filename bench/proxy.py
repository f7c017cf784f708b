"""The LiteLLM proxy as the bench's peer (issue #21): its own venv, one uvicorn worker, no database.

The proxy is what a user would run instead of this project, so the bench measures it beside the
worker. It is never a project dependency: ``bench/proxy-requirements.lock`` (the same litellm
1.82.6 and, through ``-c requirements.lock``, the same openai, httpx, aiohttp and pydantic as the
worker, so that the comparison is of the serving path, not of SDK versions) plus py-spy for
``bench/hotspots.py`` are installed hash-checked into ``bench/.venv-proxy`` the first time a bench
needs them. Recompile the lock after changing ``bench/proxy-requirements.in``::

    .venv/bin/uv pip compile bench/proxy-requirements.in --generate-hashes --python-version 3.11 \\
        -c requirements.lock -o bench/proxy-requirements.lock
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.sizing import stop

BENCH = Path(__file__).resolve().parent
LOCK = BENCH / "proxy-requirements.lock"
VENV = BENCH / ".venv-proxy"
INSTALLED = VENV / ".installed"


def ensure_venv() -> Path:
    """The bench venv's bin folder, created from the lock when missing or older than it."""
    if not (INSTALLED.exists() and INSTALLED.stat().st_mtime >= LOCK.stat().st_mtime):
        print(f"# installing {LOCK.name} into {VENV.relative_to(BENCH.parent)} (hash-checked)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        pip = subprocess.run(
            [VENV / "bin" / "pip", "install", "--quiet", "--disable-pip-version-check", "--require-hashes",
             "--no-deps", "-r", str(LOCK)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if pip.returncode != 0:  # its warnings only when it failed: the index mirrors are noisy
            raise RuntimeError(f"installing {LOCK.name} failed:\n{pip.stderr[-3000:]}")
        INSTALLED.touch()
    return VENV / "bin"


def write_proxy_config(folder: Path, base_url: str, fake_models: dict[str, str]) -> Path:
    """A proxy config naming each of ``fake_models`` (proxy model name -> the fake's model name),
    with the same call parameters as the worker's bench config and no database, cache or callbacks."""
    config = {
        "model_list": [
            {
                "model_name": name,
                "litellm_params": {
                    "model": f"openai/{fake}",
                    "api_base": base_url,
                    "api_key": "sk-bench-not-a-key",
                },
                "model_info": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6},
            }
            for name, fake in fake_models.items()
        ],
        "litellm_settings": {"num_retries": 0, "request_timeout": 30},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class Proxy:
    url: str  # the proxy's OpenAI-compatible base, ".../v1"
    pid: int  # the one process that serves (uvicorn runs in the litellm CLI's own process)
    ready_s: float


def _alive(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextlib.asynccontextmanager
async def running_proxy(config: Path, port: int, timeout_s: float = 120) -> AsyncIterator[Proxy]:
    """``litellm --config ... --num_workers 1`` from the bench venv; stopped (SIGTERM) at the end."""
    bin_dir = ensure_venv()
    log = (config.parent / "proxy.log").open("wb")
    without_database = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    spawned = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        str(bin_dir / "litellm"), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
        "--num_workers", "1",
        cwd=config.parent, stdout=log, stderr=subprocess.STDOUT,
        env={**without_database, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    )  # fmt: skip
    try:
        health = f"http://127.0.0.1:{port}/health/liveliness"
        while not await asyncio.to_thread(_alive, health):
            if proc.returncode is not None or time.monotonic() - spawned > timeout_s:
                tail = (config.parent / "proxy.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the LiteLLM proxy did not start; its log ends:\n{tail}")
            await asyncio.sleep(0.2)
        yield Proxy(f"http://127.0.0.1:{port}/v1", proc.pid, time.monotonic() - spawned)
    finally:
        await stop(proc)
        log.close()
