"""The Dockerfile (issue #8), checked without a container engine: hadolint, and the invariants
the image depends on (non-root, hash-locked install, exec-form entrypoint, health check, the
litellm price-map switch)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.deploy.shipped import DEPLOY, HEALTH_PORT, dockerfile_stages
from tests.support.paths import ROOT


def exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"shell form {args!r}: signals would go to /bin/sh, not the worker"
    command: list[str] = json.loads(args)
    return command


def env_of(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", args))
    return env


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    done = subprocess.run(
        [str(hadolint), "--no-color", str(DEPLOY / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_image_runs_the_worker_unprivileged_from_the_hash_locked_dependencies():
    stages = dockerfile_stages(DEPLOY / "Dockerfile")
    assert len(stages) >= 2, "multi-stage: build tools and caches stay out of the final image"
    everything = [instruction for stage in stages for instruction in stage]
    final = stages[-1]

    installs = [args for keyword, args in everything if keyword == "RUN" and "pip install" in args]
    assert any(
        "--require-hashes" in args and "--no-deps" in args and "-r /tmp/requirements.lock" in args
        for args in installs
    ), installs
    assert ("COPY", "requirements.lock /tmp/requirements.lock") in everything
    assert not any("requirements-dev.lock" in args for _, args in everything)

    [user] = [args for keyword, args in final if keyword == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: numeric and not root"
    assert final[-2:] == [("ENTRYPOINT", '["python", "-m", "worker"]'), ("CMD", '["run"]')]
    assert exec_form(final[-2][1]) + exec_form(final[-1][1]) == ["python", "-m", "worker", "run"]

    env = env_of(final)
    assert env["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"
    assert env["WORKER_CONFIG_DIR"] == "/app/config"
    assert ("COPY", "config/ /app/config/") in final


def test_image_health_check_probes_the_health_port():
    final = dockerfile_stages(DEPLOY / "Dockerfile")[-1]
    [check] = [args for keyword, args in final if keyword == "HEALTHCHECK"]
    options, _, command = check.partition("CMD ")
    assert "--start-period=" in options  # litellm's import takes seconds
    assert f"http://127.0.0.1:{HEALTH_PORT}/livez" in " ".join(exec_form(command))
    assert ("EXPOSE", str(HEALTH_PORT)) in final


def test_build_context_sends_what_the_dockerfile_copies():
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") :][0] == "*", "allow-list: everything else (.venv, .git) stays out"
    for stage in dockerfile_stages(DEPLOY / "Dockerfile"):
        for keyword, args in stage:
            if keyword != "COPY" or args.startswith("--from"):
                continue
            source = args.split()[0]
            assert (ROOT / source).exists(), source
            assert f"!{source}" in ignore, f"{source} is copied but excluded from the build context"
