#!/usr/bin/env bash
# Can the ejabberd user reach this checkout? ejabberd runs the port program, the
# checkout's .venv/bin/python, as that user: every directory above it must let it through.
# Run first by 'make test' and 'make run'; says which directory is in the way and what to do.
set -euo pipefail
DIR=$(cd "${1:-$(dirname "$0")/..}" && pwd -P)
USER_NAME=ejabberd

# The first directory, from / down to DIR, that the user cannot enter.
blocking=""
if id -u "$USER_NAME" >/dev/null 2>&1; then
  path=""
  for part in $(tr '/' ' ' <<<"$DIR"); do
    path="$path/$part"
    if ! runuser -u "$USER_NAME" -- test -x "$path"; then blocking=$path; break; fi
  done
else
  # Not installed yet ('make deps' will add it): a new system user enters what others may.
  path=""
  for part in $(tr '/' ' ' <<<"$DIR"); do
    path="$path/$part"
    if [ $(( 0$(stat -c %a "$path") & 1 )) = 0 ]; then blocking=$path; break; fi
  done
fi
[ -z "$blocking" ] && exit 0

cat >&2 <<EOF
The checkout $DIR cannot be reached by the user '$USER_NAME':
it cannot enter $blocking (mode $(stat -c %A "$blocking"), owner $(stat -c %U "$blocking")).
ejabberd runs the port program, $DIR/.venv/bin/python, as '$USER_NAME',
so every test against ejabberd would fail with "Permission denied".
Either put the checkout where it can go, e.g.
    git clone $DIR /srv/pymod_push && cd /srv/pymod_push
or let it through (execute permission only, no listing):
    chmod o+x $blocking
EOF
exit 1
