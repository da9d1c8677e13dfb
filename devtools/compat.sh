#!/usr/bin/env bash
# The whole suite in a Debian chroot with another release's ejabberd (make test-compat).
#
#   devtools/compat.sh DIST [MAKE_TARGET]     DIST: bookworm-backports | trixie | sid
#   devtools/compat.sh DIST build             only make the chroot (.ci/run, beforehand)
#
# The chroot is made once with debootstrap (Debian's mirror) and cached in
# $PYMOD_PUSH_COMPAT_CACHE (default /var/cache/pymod_push-compat/DIST), with ejabberd,
# Erlang's headers, python3-venv, PostgreSQL and Prometheus from that release (a package
# added to PACKAGES since is installed into the cached chroot at the next run). Each run copies the
# checkout to /srv/pymod_push in the chroot (the ejabberd user must reach the venv; /root
# is 0700), keeping the chroot's own .venv, and runs 'make MAKE_TARGET' (default: test) there.
# Mounts and the processes left in the chroot are cleaned up on exit, whatever the outcome.
set -euo pipefail

DIST=${1:-}
TARGET=${2:-test}
SRC=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${PYMOD_PUSH_COMPAT_CACHE:-/var/cache/pymod_push-compat}
# Debian's mirror: the one this machine's apt uses, unless DEBIAN_MIRROR says otherwise.
# shellcheck source=devtools/debian_mirror.sh
. "$SRC/devtools/debian_mirror.sh"
MIRROR=${DEBIAN_MIRROR:-$(apt_mirror)}
PACKAGES="ejabberd erlang-dev python3-venv postgresql prometheus"
ENV_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

die() { echo "compat: $*" >&2; exit 2; }
say() { echo "compat[$DIST]: $*" >&2; }

case $DIST in
  bookworm-backports) SUITE=bookworm; APT_TARGET="-t bookworm-backports" ;;
  trixie|sid) SUITE=$DIST; APT_TARGET="" ;;
  *) die "usage: make test-compat DIST=bookworm-backports|trixie|sid" ;;
esac
[ -n "$MIRROR" ] || die "no Debian mirror in /etc/apt/sources* (set DEBIAN_MIRROR)"
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mount)"
if ! command -v debootstrap >/dev/null; then
  echo "compat: installing debootstrap with apt-get" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

ROOTFS=$CACHE/$DIST
mkdir -p "$CACHE"
exec 9>"$CACHE/$DIST.lock"
flock -n 9 || die "another run uses $ROOTFS (lock $CACHE/$DIST.lock)"

# ----------------------------------------------------------------- mounts, processes
ACTIVE=""  # the root being used now, for the cleanup

mount_all() {
  local root=$1
  ACTIVE=$root
  mount -t proc proc "$root/proc"
  mount --bind /sys "$root/sys"
  mount --bind /dev "$root/dev"
  mount --bind /dev/pts "$root/dev/pts"
  mount --bind /dev/shm "$root/dev/shm"
  cp /etc/resolv.conf /etc/hosts "$root/etc/"
}

# Processes whose root directory is the chroot (ejabberd, epmd, postgres, pytest...):
# TERM, then KILL those still there after 10 s.
kill_chrooted() {
  local root=$1 signal pid pids tries
  for signal in TERM KILL; do
    pids=""
    for pid in /proc/[0-9]*; do
      [ "$(readlink "$pid/root" 2>/dev/null)" = "$root" ] && pids="$pids ${pid#/proc/}"
    done
    [ -z "$pids" ] && return 0
    say "sending $signal to processes left in the chroot:$pids"
    # shellcheck disable=SC2086
    kill -s "$signal" $pids 2>/dev/null || true
    for tries in $(seq 100); do
      local alive=""
      for pid in $pids; do [ -e "/proc/$pid" ] && alive=1; done
      [ -z "$alive" ] && return 0
      sleep 0.1
    done
  done
}

cleanup() {
  local status=$? root=$ACTIVE mountpoint
  [ -n "$root" ] || exit "$status"
  kill_chrooted "$root"
  # Everything mounted under the root, deepest first.
  for mountpoint in $(awk -v r="$root/" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r); do
    umount "$mountpoint" 2>/dev/null || umount -l "$mountpoint"
  done
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A clean environment: the host's PIP_FIND_LINKS etc. mean nothing in there. In the
# background, waited for: bash runs a trap only once the foreground command is done, and
# 'wait' lets an INT or TERM through at once (the cleanup then stops what runs inside).
in_chroot() {
  chroot "$ACTIVE" /usr/bin/env -i HOME=/root PATH=$ENV_PATH LANG=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive TERM="${TERM:-dumb}" bash -c "$1" &
  wait $!
}

# ----------------------------------------------------------------- the cached chroot
build() {
  local root=$ROOTFS.new
  rm -rf "$root"
  say "debootstrap $SUITE from $MIRROR into $root"
  debootstrap --variant=minbase --include=ca-certificates,make "$SUITE" "$root" "$MIRROR" \
    >"$CACHE/$DIST.debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/$DIST.debootstrap.log"; die "debootstrap failed"; }
  # Packages must not start services in the chroot.
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
  chmod 755 "$root/usr/sbin/policy-rc.d"
  if [ "$DIST" = bookworm-backports ]; then
    echo "deb $MIRROR bookworm-backports main" >"$root/etc/apt/sources.list.d/backports.list"
  fi
  # sid's Release file on the mirror may have expired.
  echo 'Acquire::Check-Valid-Until "false";' >"$root/etc/apt/apt.conf.d/99pymod-push"
  # The CA certificates the host trusts (package registries are reached through them).
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  fi
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$root/etc/pip.conf"
  mount_all "$root"
  in_chroot "update-ca-certificates >/dev/null && apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends $APT_TARGET $PACKAGES >/dev/null"
  kill_chrooted "$root"
  # A process that has just been killed may still hold its mount a moment ("target is
  # busy", seen for proc): detached then, as the cleanup does.
  for mountpoint in dev/shm dev/pts dev sys proc; do
    umount "$root/$mountpoint" 2>/dev/null || umount -l "$root/$mountpoint"
  done
  ACTIVE=""
  touch "$root/.pymod_push-ready"
  rm -rf "$ROOTFS"
  mv "$root" "$ROOTFS"
}

if [ ! -e "$ROOTFS/.pymod_push-ready" ]; then
  started=$(date +%s)
  build
  say "chroot built in $(( $(date +%s) - started )) s"
fi
[ "$TARGET" = build ] && exit 0

# ----------------------------------------------------------------- the run
# The checkout, without its host-built artefacts; the chroot's .venv and run/ stay
# (the Makefile remakes the venv when pyproject.toml changes).
DEST=$ROOTFS/srv/pymod_push
mkdir -p "$DEST"
find "$DEST" -mindepth 1 -maxdepth 1 ! -name .venv ! -name run -exec rm -rf {} +
tar -C "$SRC" --exclude=./.venv --exclude=./run --exclude=./.git --exclude=./build \
  --exclude='*.egg-info' --exclude=__pycache__ --exclude=./.pytest_cache \
  --exclude=./.mypy_cache --exclude=./.ruff_cache --exclude=./.hypothesis -cf - . \
  | tar -C "$DEST" -xf -
chmod 755 "$ROOTFS/srv" "$DEST"
rm -rf "$ROOTFS"/tmp/pymod_push-*  # what an interrupted run's tests left

mount_all "$ROOTFS"
# A chroot cached before a package joined PACKAGES (prometheus): installed now, not rebuilt.
in_chroot "missing=\$(for p in $PACKAGES; do dpkg-query -W -f='\${Status}' \$p 2>/dev/null \
    | grep -q ' installed' || echo \$p; done); [ -z \"\$missing\" ] || { \
  echo compat[$DIST]: installing \$missing >&2; apt-get update -qq \
  && apt-get install -y -qq --no-install-recommends $APT_TARGET \$missing >/dev/null; }"
in_chroot 'echo "ejabberd $(dpkg-query -W -f "\${Version}" ejabberd)," \
  "OTP $(erl -noshell -eval "io:put_chars(erlang:system_info(otp_release)), halt().")," \
  "$(python3 --version)"' | sed "s/^/compat[$DIST]: /" >&2
started=$(date +%s)
status=0
in_chroot "cd /srv/pymod_push && make $TARGET" || status=$?
say "make $TARGET exited with $status after $(( $(date +%s) - started )) s"
exit $status
