#!/usr/bin/env bash
# Build an ejabberd image with mod_push_py from this checkout:
#
#   contrib/container/build.sh [options] [-- extra arguments for 'podman build']
#     --tag NAME            image name (default localhost/pymod_push-ejabberd:latest)
#     --file FILE           Containerfile (default) or Containerfile.official
#     --base IMAGE          the Debian image to start from (Containerfile's BASE; default
#                           debian:bookworm-slim; CI: devtools/container_base.sh's)
#     --python-version X.Y  the image's Python (default 3.11, bookworm's): the dependencies'
#                           wheels are made with PYTHON (default: the checkout's .venv), which
#                           must be that version (Containerfile.official: only this package's
#                           wheel, pip fetches the dependencies for Alpine in the build)
#     --engine podman|docker (default: podman if installed)
#
# The build context is a temporary folder holding the Containerfile's files and wheels/:
# the wheel of this checkout and the wheels of its dependencies (made with this machine's
# pip and its configuration), so that the Debian image's build needs no package index.
# Debian's mirror: DEBIAN_MIRROR, passed as a build argument when set.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TAG=localhost/pymod_push-ejabberd:latest
FILE=Containerfile
BASE=""
PYVER=3.11
ENGINE=$(command -v podman >/dev/null && echo podman || echo docker)
while [ $# -gt 0 ]; do
  case $1 in
    --tag) TAG=$2; shift 2 ;;
    --file) FILE=$2; shift 2 ;;
    --base) BASE=$2; shift 2 ;;
    --python-version) PYVER=$2; shift 2 ;;
    --engine) ENGINE=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "build.sh: unknown option $1 (see the head of $0)" >&2; exit 2 ;;
  esac
done
[ "$FILE" = Containerfile.official ] && PYVER=""
# The checkout's venv (it has setuptools to build the wheel without an index), else python3.
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3

CONTEXT=$(mktemp -d "${TMPDIR:-/tmp}/pymod_push-image.XXXXXX")
trap 'rm -rf "$CONTEXT"' EXIT
cp "$HERE"/Containerfile* "$HERE"/entrypoint.sh "$HERE"/erlc.sh "$HERE"/ejabberd.yml "$HERE"/mod_push_py.yml \
  "$CONTEXT/"
mkdir "$CONTEXT/wheels"
build_isolation=--no-build-isolation
"$PYTHON" -c 'import setuptools' 2>/dev/null || build_isolation=""
"$PYTHON" -m pip wheel -q --no-deps $build_isolation -w "$CONTEXT/wheels" "$ROOT"
wheel=$(ls "$CONTEXT"/wheels/pymod_push-*.whl)
if [ -n "$PYVER" ]; then
  # The dependencies' wheels as this machine's pip finds or builds them: for its own Python,
  # which must be the image's (cryptography, PyYAML, asyncpg are compiled; glibc x86_64 or
  # aarch64 like the host).
  have=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  [ "$have" = "$PYVER" ] || { echo "build.sh: $PYTHON is Python $have, the image has $PYVER:" \
    "set PYTHON to a Python $PYVER (or --python-version)" >&2; exit 2; }
  "$PYTHON" -m pip wheel -q -w "$CONTEXT/wheels" "$wheel[postgresql]"
fi

args=(build --tag "$TAG" --file "$CONTEXT/$FILE")
[ -n "$BASE" ] && args+=(--build-arg "BASE=$BASE")
[ -n "${DEBIAN_MIRROR:-}" ] && args+=(--build-arg "DEBIAN_MIRROR=$DEBIAN_MIRROR")
# podman on hybrid cgroups: crun fails where runc works.
[ "$ENGINE" = podman ] && command -v runc >/dev/null && args+=(--runtime runc)
"$ENGINE" "${args[@]}" "$@" "$CONTEXT"
# The module stages of earlier builds (only the image's own layers are kept for the next).
"$ENGINE" image prune --force --filter label=org.pymod_push.stage=module >/dev/null 2>&1 || true
