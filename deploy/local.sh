#!/usr/bin/env bash
# Local set-up in one command each, on a fresh machine:
#
#   deploy/local.sh run  [worker args]   start one worker (the offline profile unless WORKER_CONFIG_DIR is set)
#   deploy/local.sh test [pytest args]   lint, type checks, drift checks, then every test but the fault suite
#   deploy/local.sh ask "a prompt"       send one request over the bus to a running worker
#   deploy/local.sh budget|dlq ...       the operator's tools, on the same config folder as run
#   deploy/local.sh secrets              a random password file per broker user for deploy/compose*.yaml
#
# Both create .venv/ from the hash-locked requirements-dev.lock when it is missing or older than
# the lock, and start RabbitMQ and Redis on this machine when they are not answering (only for
# localhost URLs). AMQP_URL and REDIS_URL choose other services.
set -euo pipefail
cd "$(dirname "$0")/.."

export LITELLM_LOCAL_MODEL_COST_MAP=True   # litellm must not fetch its price map at import
export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"

say() { printf '[local] %s\n' "$*" >&2; }

ensure_venv() {
  if [ -x .venv/bin/python ] && [ .venv/.installed -nt requirements-dev.lock ] && [ .venv/.installed -nt pyproject.toml ]; then
    return
  fi
  say "creating .venv from requirements-dev.lock (hash-checked; takes a minute the first time)"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements-dev.lock
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
  touch .venv/.installed
}

is_local() { [[ "$1" == *"127.0.0.1"* || "$1" == *"localhost"* ]]; }

ensure_redis() {
  is_local "$REDIS_URL" || return 0
  redis-cli -u "$REDIS_URL" ping >/dev/null 2>&1 && return 0
  say "starting redis-server"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
  for _ in $(seq 1 50); do redis-cli -u "$REDIS_URL" ping >/dev/null 2>&1 && return 0; sleep 0.2; done
  say "redis did not answer at $REDIS_URL"; exit 1
}

ensure_rabbitmq() {
  is_local "$AMQP_URL" || return 0
  rabbitmq-diagnostics -q ping >/dev/null 2>&1 && return 0
  say "starting rabbitmq-server (takes several seconds)"
  rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 90); do
    if rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
      rabbitmq-diagnostics -q check_port_connectivity >/dev/null 2>&1 && return 0
    fi
    sleep 1
  done
  say "rabbitmq did not answer (rabbitmq-diagnostics -q ping)"; exit 1
}

# deploy/secrets/<user> for every user of deploy/rabbitmq/definitions.json that has none yet:
# the Compose secrets the broker sets the passwords from and the worker logs in with. Hex, so
# that it goes into an AMQP URL unescaped. The folder is 0700; the files 0644, because Compose
# bind-mounts them as they are and the worker's unprivileged user must read its own.
write_secrets() {
  local dir=deploy/secrets user
  mkdir -p deploy/secrets && chmod 700 "$dir"
  for user in $(python3 -c 'import json; print(*(u["name"] for u in json.load(open("deploy/rabbitmq/definitions.json"))["users"]))'); do
    [ -s "$dir/$user" ] && continue
    python3 -c 'import secrets; print(secrets.token_hex(24))' >"$dir/$user"
    chmod 644 "$dir/$user"
    say "wrote $dir/$user"
  done
}

command="${1:-}"
shift || true
case "$command" in
  run)
    ensure_venv; ensure_redis; ensure_rabbitmq
    exec .venv/bin/python -m worker --config "${WORKER_CONFIG_DIR:-config/offline}" run "$@"
    ;;
  ask|budget|dlq)
    ensure_venv
    exec .venv/bin/python -m worker --config "${WORKER_CONFIG_DIR:-config/offline}" "$command" "$@"
    ;;
  secrets)
    write_secrets
    ;;
  test)
    ensure_venv; ensure_redis; ensure_rabbitmq
    say "ruff"; .venv/bin/ruff check worker tests bench; .venv/bin/ruff format --check worker tests bench
    say "mypy --strict"; .venv/bin/mypy
    say "contract (schemas/ matches the models)"; .venv/bin/python -m worker schemas --check
    say "reference (docs/ tables match the code)"; .venv/bin/python -m worker.reference --check
    say "pytest"; exec .venv/bin/pytest "$@"
    ;;
  *)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2
    ;;
esac
