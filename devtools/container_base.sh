#!/usr/bin/env bash
# A Debian base image made locally, for machines that reach no container registry (CI):
#
#   devtools/container_base.sh [SUITE]     prints the image's name (default suite: bookworm)
#
# `debootstrap --variant=minbase SUITE` from this machine's Debian mirror (DEBIAN_MIRROR
# overrides), then `podman import` as localhost/pymod_push-base:SUITE. Kept in podman's store
# and made again when missing or older than PYMOD_PUSH_BASE_MAX_AGE days (default 7), so
# that Debian's updates come in. contrib/container/build.sh builds the image on top of it
# with --base. Needs root (debootstrap) and podman.
set -euo pipefail

SUITE=${1:-bookworm}
SRC=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=localhost/pymod_push-base:$SUITE
MAX_AGE_DAYS=${PYMOD_PUSH_BASE_MAX_AGE:-7}
CACHE=${PYMOD_PUSH_CONTAINER_CACHE:-/var/cache/pymod_push-container}
# shellcheck source=devtools/debian_mirror.sh
. "$SRC/devtools/debian_mirror.sh"
MIRROR=${DEBIAN_MIRROR:-$(apt_mirror)}

die() { echo "container_base: $*" >&2; exit 2; }
say() { echo "container_base[$SUITE]: $*" >&2; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap)"
command -v podman >/dev/null || die "podman is not installed"
[ -n "$MIRROR" ] || die "no Debian mirror in /etc/apt/sources* (set DEBIAN_MIRROR)"
if ! command -v debootstrap >/dev/null; then
  say "installing debootstrap with apt-get"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/base-$SUITE.lock"
flock -w 600 9 || die "another run is making $IMAGE (lock $CACHE/base-$SUITE.lock)"

built=$(podman image inspect --format '{{ index .Labels "org.pymod_push.built" }}' "$IMAGE" \
          2>/dev/null || true)
if [ -n "$built" ] && [ "$(( ($(date +%s) - built) / 86400 ))" -lt "$MAX_AGE_DAYS" ]; then
  echo "$IMAGE"
  exit 0
fi

started=$(date +%s)
ROOTFS=$(mktemp -d "$CACHE/rootfs-$SUITE.XXXXXX")
trap 'rm -rf "$ROOTFS"' EXIT
say "debootstrap $SUITE from $MIRROR"
debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$ROOTFS" "$MIRROR" \
  >"$CACHE/base-$SUITE.debootstrap.log" 2>&1 \
  || { tail -20 "$CACHE/base-$SUITE.debootstrap.log" >&2; die "debootstrap failed"; }
# An https mirror is reached through the CA certificates this machine trusts.
case $MIRROR in
  https:*)
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
      cp /usr/local/share/ca-certificates/*.crt "$ROOTFS/usr/local/share/ca-certificates/"
      chroot "$ROOTFS" update-ca-certificates >/dev/null
    fi ;;
esac
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
podman rmi --force "$IMAGE" >/dev/null 2>&1 || true
tar -C "$ROOTFS" --numeric-owner -cf - . \
  | podman import --quiet --change 'CMD ["/bin/bash"]' \
      --change "LABEL org.pymod_push.built=$(date +%s)" - "$IMAGE" >/dev/null
say "made $IMAGE in $(( $(date +%s) - started )) s"
echo "$IMAGE"
