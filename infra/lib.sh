# Shared helpers for the infra scripts. Source it; do not run it.
# shellcheck shell=bash
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VAR="$ROOT/var"
TOOLS="$ROOT/.tools"
mkdir -p "$VAR"

say()  { printf '\033[1;34m[cloudlet]\033[0m %s\n' "$*" >&2; }
warn() { printf '\033[1;33m[cloudlet] warning:\033[0m %s\n' "$*" >&2; }
die()  { printf '\033[1;31m[cloudlet] error:\033[0m %s\n' "$*" >&2; exit 1; }

# Install the Debian packages given as arguments that are not installed yet (one apt-get update per run).
ensure_packages() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "Debian packages missing: ${missing[*]}; run as root or install them with apt-get"
  say "installing Debian packages: ${missing[*]}"
  if [ -z "${CLOUDLET_APT_UPDATED:-}" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed"
    export CLOUDLET_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
    || die "apt-get install ${missing[*]} failed"
}

# Wait until "$@" succeeds, for at most $WAIT_SECONDS (default 60) seconds.
wait_for() {
  local deadline=$(( $(date +%s) + ${WAIT_SECONDS:-60} ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}
