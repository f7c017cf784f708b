"""Import definitions.json into a running RabbitMQ through its management API, each user's
password given as a salted SHA-256 hash computed here from PASSWORDS_DIR/<user> (issue #15).

    python import_definitions.py DEFINITIONS PASSWORDS_DIR            # import (the Kubernetes Job)
    python import_definitions.py DEFINITIONS PASSWORDS_DIR --out FILE # only write the result

Import: ``POST $RABBITMQ_MANAGEMENT_URL/api/definitions`` as ``$RABBITMQ_ADMIN_USERNAME`` with the
password in the file ``$RABBITMQ_ADMIN_PASSWORD_FILE``. The broker merges what it receives: the
users, vhosts and permissions named here are created or updated (passwords included), the rest
of the broker is left alone; running it again changes nothing but the salts.

``--out``: the definitions with the hashes, for a broker that loads them at boot
(``load_definitions`` or ``definitions.local.path``, e.g. the RabbitMQ Cluster Operator,
docs/deploy.md); the file is written
0600, and belongs in a Secret, never in the repository.

One file per user (``deploy/k8s``: the keys of the Secret llm-worker-rabbitmq-users), the
password on one line, surrounding whitespace not part of it. A user without one (or with an
empty one) stops the run with a line naming the file, before anything is sent. Standard library
only: it runs in the worker's image. Exit 0 done, 1 refused or unreachable (one line naming what
to fix), 2 bad usage.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

HASHING = "rabbit_password_hashing_sha256"  # RabbitMQ's default since 3.6


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's stored form: base64(salt + sha256(salt + password)), a 4-byte random salt."""
    salt = os.urandom(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode("utf-8")).digest()).decode()


def read_secret(path: Path) -> str:
    """The password in a file: one line, surrounding whitespace not part of it (as rabbitmqctl
    and the worker's AMQP_PASSWORD_FILE read it); SystemExit for a file of several lines."""
    lines = path.read_text(encoding="utf-8").strip().splitlines()
    if len(lines) > 1:
        raise SystemExit(f"{path} holds more than one line: keep only the password")
    return lines[0].strip() if lines else ""


def with_passwords(definitions: dict[str, Any], passwords_dir: Path) -> dict[str, Any]:
    """``definitions`` with every user's ``password_hash`` from its file; SystemExit naming each
    missing file."""
    users, missing = [], []
    for user in definitions.get("users", []):
        path = passwords_dir / user["name"]
        password = read_secret(path) if path.is_file() else ""
        if not password:
            missing.append(f"broker user '{user['name']}' has no password: write one to {path}")
            continue
        users.append({**user, "password_hash": password_hash(password), "hashing_algorithm": HASHING})
    if missing:
        raise SystemExit("\n".join(missing) + "\nnothing was imported")
    return {**definitions, "users": users}


def post(url: str, username: str, password: str, definitions: dict[str, Any]) -> None:
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise SystemExit(f"RABBITMQ_MANAGEMENT_URL must be an http:// or https:// URL (got {url!r})")
    endpoint = url.rstrip("/") + "/api/definitions"
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    request = urllib.request.Request(  # noqa: S310 - http(s) only, checked above
        endpoint,
        data=json.dumps(definitions).encode(),
        method="POST",
        headers={"content-type": "application/json", "authorization": f"Basic {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30):  # noqa: S310 - http(s) only, checked above
            pass
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise SystemExit(
                f"{endpoint} refused the login of '{username}': check RABBITMQ_ADMIN_USERNAME and the "
                "password in RABBITMQ_ADMIN_PASSWORD_FILE (an administrator of the broker)"
            ) from None
        detail = exc.read(300).decode("utf-8", "replace")
        raise SystemExit(f"{endpoint} answered {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SystemExit(f"cannot reach {endpoint} ({reason}): check RABBITMQ_MANAGEMENT_URL") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("definitions", type=Path)
    parser.add_argument("passwords_dir", type=Path, help="one file per user, named after it")
    parser.add_argument(
        "--out", type=Path, help="write the definitions with hashes here instead of importing"
    )
    args = parser.parse_args(argv)
    rendered = with_passwords(json.loads(args.definitions.read_text()), args.passwords_dir)
    names = ", ".join(user["name"] for user in rendered["users"])
    if args.out is not None:
        args.out.touch(mode=0o600)
        args.out.write_text(json.dumps(rendered, indent=2) + "\n")
        sys.stderr.write(f"wrote {args.out} with the passwords of {names}\n")
        return 0
    url, username = os.environ.get("RABBITMQ_MANAGEMENT_URL"), os.environ.get("RABBITMQ_ADMIN_USERNAME")
    password_file = os.environ.get("RABBITMQ_ADMIN_PASSWORD_FILE")
    if not (url and username and password_file):
        parser.error("set RABBITMQ_MANAGEMENT_URL, RABBITMQ_ADMIN_USERNAME and RABBITMQ_ADMIN_PASSWORD_FILE")
    try:
        admin_password = read_secret(Path(password_file))
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(
            f"cannot read RABBITMQ_ADMIN_PASSWORD_FILE {password_file} ({exc}): mount it"
        ) from None
    post(url, username, admin_password, rendered)
    sys.stderr.write(f"imported {args.definitions.name} into {url}: users {names}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
