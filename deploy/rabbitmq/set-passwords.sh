#!/usr/bin/env bash
# Gives every user of a running RabbitMQ node its password from SECRETS_DIR/<user>, one file per
# user (Compose secrets: /run/secrets/<user>), the password on one line, surrounding whitespace
# not part of it (rabbitmqctl trims it; the worker's AMQP_PASSWORD_FILE reads it the same way).
#
#   set-passwords.sh SECRETS_DIR [rabbitmqctl options, e.g. -n rabbit@host]
#
# Why: deploy/rabbitmq/definitions.json names the users and their permissions but holds no
# password, and a node that imports it (rabbitmq.conf: definitions.local.path) leaves each user without
# one, unable to log in, until this runs. entrypoint.sh runs it after each boot. The password
# goes to rabbitmqctl on stdin, never on a command line (where `ps` would show it).
#
# Exit 1, after setting every other user's password, when a user has no file (or an empty
# one), with a line naming the file to write; that user stays unable to log in.
set -euo pipefail

secrets="${1:?usage: set-passwords.sh SECRETS_DIR [rabbitmqctl options]}"
shift

# In the image the container starts as root; the CLI runs as the broker's own user (gosu, as the
# image's entrypoint does), so that the Erlang cookie it may create at boot is the broker's. The
# password file is opened by this shell, so it may be readable by root only.
ctl() {
  if [ "$(id -u)" = 0 ] && command -v gosu >/dev/null 2>&1; then
    gosu rabbitmq rabbitmqctl "$@"
  else
    rabbitmqctl "$@"
  fi
}

users="$(ctl "$@" --silent list_users | cut -f1)"
missing=0
for user in $users; do
  file="$secrets/$user"
  # rabbitmqctl reads the first line: a blank one would be an empty password
  if [ ! -s "$file" ] || [ -z "$(head -n 1 "$file" | tr -d '[:space:]')" ]; then
    echo "set-passwords: broker user '$user' has no password: write one to $file (a secret); until then it cannot log in" >&2
    missing=1
    continue
  fi
  if [ "$(grep -c . "$file")" -gt 1 ]; then  # rabbitmqctl would read the first line only
    echo "set-passwords: $file holds more than one line: keep only the password of '$user'" >&2
    missing=1
    continue
  fi
  ctl "$@" --quiet change_password "$user" <"$file" >/dev/null
  echo "set-passwords: password of '$user' set from $file" >&2
done
exit "$missing"
