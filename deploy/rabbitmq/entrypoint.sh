#!/usr/bin/env bash
# The entrypoint of the RabbitMQ containers of deploy/compose*.yaml: the image's own entrypoint
# starts the node, which imports definitions.json (rabbitmq.conf: definitions.local.path); once it runs,
# set-passwords.sh gives every user its password from /run/secrets/<user>. The node imports the
# definitions again whenever the file changed, which leaves the users without a password again,
# and a password secret may have changed too: so this runs after every start, not once. Healthy (the compose healthcheck) only when every user has one:
# until then the workers are not started (depends_on: service_healthy).
#
# Environment (defaults for the container; the tests point them elsewhere):
#   PASSWORDS_DIR      /run/secrets                     one password file per broker user
#   PASSWORDS_MARKER   /tmp/llm-worker-passwords-set    exists once every password is set
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
secrets="${PASSWORDS_DIR:-/run/secrets}"
marker="${PASSWORDS_MARKER:-/tmp/llm-worker-passwords-set}"
rm -f "$marker"  # a restarted container keeps its /tmp

docker-entrypoint.sh rabbitmq-server &
broker=$!
# The broker shuts down cleanly on SIGTERM (docker stop); this shell only passes it on.
trap 'kill -TERM "$broker" 2>/dev/null || true' TERM INT

# As the broker's user (see set-passwords.sh): a CLI run as root before the node has written its
# Erlang cookie would write one the node cannot read.
running() {
  if [ "$(id -u)" = 0 ] && command -v gosu >/dev/null 2>&1; then
    gosu rabbitmq rabbitmq-diagnostics --quiet check_running
  else
    rabbitmq-diagnostics --quiet check_running
  fi
}

until running >/dev/null 2>&1; do
  if ! kill -0 "$broker" 2>/dev/null; then
    wait "$broker" || exit $?
    exit 1
  fi
  sleep 1
done
if "$here/set-passwords.sh" "$secrets"; then
  touch "$marker"
else
  echo "entrypoint: some broker users have no password (lines above); the node stays unhealthy" >&2
fi

set +e
wait "$broker"
status=$?
while kill -0 "$broker" 2>/dev/null; do  # a trapped signal ended the wait early: wait for the exit
  wait "$broker"
  status=$?
done
exit "$status"
