#!/bin/sh
# The image's entrypoint (contrib/container/Containerfile): `ejabberdctl foreground` as
# user ejabberd, after what ejabberd needs that no image layer can hold.
#
#   (no argument) | foreground     run ejabberd; SIGTERM (podman/docker stop) stops it
#                                  cleanly with `ejabberdctl stop`
#   anything else                  an ejabberdctl command, e.g. `status`
#
# XMPP_HOST (default localhost): the virtual host of the image's own ejabberd.yml (the
# macro XMPP_HOST, defined in /run/ejabberd/environment.yml, which that file includes).
set -eu

HOST=${XMPP_HOST:-localhost}
case $HOST in
  *[!A-Za-z0-9.-]*|"") echo "entrypoint: XMPP_HOST=$HOST is not a host name" >&2; exit 2 ;;
esac

if [ "$(id -u)" = 0 ]; then
  # /run is not in the image's layers as ejabberd wants it (the pid file, the included
  # environment file); the volume may be new, or a host folder owned by root.
  install -d -o ejabberd -g ejabberd -m 750 /run/ejabberd
  chown ejabberd:ejabberd /var/lib/ejabberd /var/log/ejabberd
  as_ejabberd() { runuser -u ejabberd -- env HOME=/var/lib/ejabberd "$@"; }
else
  # Started as the ejabberd user (Kubernetes' runAsUser): /run/ejabberd must be
  # writable, e.g. an emptyDir mounted there.
  mkdir -p /run/ejabberd
  as_ejabberd() { env HOME=/var/lib/ejabberd "$@"; }
fi
printf 'define_macro:\n  XMPP_HOST: "%s"\n' "$HOST" >/run/ejabberd/environment.yml

[ $# -eq 0 ] && set -- foreground
if [ "$1" != foreground ]; then
  [ "$(id -u)" = 0 ] && exec runuser -u ejabberd -- env HOME=/var/lib/ejabberd ejabberdctl "$@"
  exec env HOME=/var/lib/ejabberd ejabberdctl "$@"
fi

# Debian's ejabberdctl does not exec the VM in foreground mode: the signal to stop
# arrives here (from the container's init) and is passed on as `ejabberdctl stop`.
as_ejabberd ejabberdctl foreground &
vm=$!
stopped=""
stopping() {
  stopped=yes
  echo "entrypoint: stopping ejabberd" >&2
  as_ejabberd ejabberdctl stop >/dev/null 2>&1 || kill -TERM "$vm" 2>/dev/null || true
}
trap stopping TERM INT
status=0
wait "$vm" || status=$?
# A trapped signal ends the first wait early: the VM's own exit status is the second's.
if [ -n "$stopped" ]; then
  status=0
  wait "$vm" || status=$?
fi
exit "$status"
