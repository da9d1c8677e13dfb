# shellcheck shell=bash
# Sourced by devtools/compat.sh and devtools/container_base.sh.
#
# Debian's mirror: the one this machine's apt uses (its deb822 or one-line sources), printed
# without a trailing slash (empty when there is none); no host is named in the project.
apt_mirror() {
  local files=(/etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list)
  local uri
  uri=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) print $i}' "${files[@]}" 2>/dev/null \
          | grep -E '/debian/?$' | head -n 1 || true)
  [ -n "$uri" ] || uri=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; break}}' \
          "${files[@]}" 2>/dev/null | grep -E '/debian/?$' | head -n 1 || true)
  echo "${uri%/}"
}
