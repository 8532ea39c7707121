#!/usr/bin/env bash
# Installs and starts everything the project needs, idempotently, and says what it does:
# Debian packages (Prometheus among them), npm dependencies, the Temporal CLI (built from its Go module), libvirtd,
# the Temporal dev server, the test guest and the Debian guest. A second run finds everything in place.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

# 1. Debian packages: hypervisor, native-addon toolchain, compression tools, the guest build's needs.
# iproute2: ip and tc for the emulated edge links (docs/links.md).
# prometheus: scrapes the workers' and the API's metrics in the tests (docs/observability.md); not started as a service.
# chromium: the browser tests drive it through the dashboard and the Temporal Web UI (docs/dashboard.md).
# postgresql: the cluster catalog's PostgreSQL implementation is tested against a server of the test's own (docs/security.md); the package's own cluster is not used.
PACKAGES=(qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev tini
  xdelta3 xz-utils zstd build-essential python3 pkg-config curl ca-certificates iproute2 prometheus chromium
  postgresql)
for list in infra/guest/host-packages.txt infra/debian/host-packages.txt; do
  [ -f "$list" ] || continue
  while read -r p; do [ -n "$p" ] && [ "${p#\#}" = "$p" ] && PACKAGES+=("$p"); done < "$list"
done
ensure_packages "${PACKAGES[@]}"

# 2. npm dependencies (native addons are compiled against this Node's own headers).
command -v node >/dev/null || die "Node.js is needed (>= 20.18.1, with npm and its headers, e.g. from NodeSource); install it and retry"
node -e 'const [a,b,c]=process.versions.node.split(".").map(Number); process.exit(a>20||(a===20&&(b>18||(b===18&&c>=1)))?0:1)' \
  || die "Node.js $(node -v) is too old: the tool chain (eslint, typescript-eslint, Temporal, undici) needs >= 20.18.1; install a newer Node and retry"
NODE_PREFIX="$(dirname "$(dirname "$(node -p process.execPath)")")"
[ -f "$NODE_PREFIX/include/node/node.h" ] || die "Node's headers are not at $NODE_PREFIX/include/node; native addons cannot be built (install Node with its headers)"
export npm_config_nodedir="$NODE_PREFIX"
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ] \
   || [ package.json -nt node_modules/.package-lock.json ]; then
  say "installing npm dependencies (native addons built against $NODE_PREFIX/include/node)"
  npm install --no-audit --no-fund 2>&1 | grep -v 'Unknown user config "nodedir"' >&2
  touch node_modules/.package-lock.json
fi

# 3. Temporal CLI and dev server.
bash infra/temporal.sh start

# 4. libvirtd (without systemd) and the test guest.
[ -f infra/libvirt.sh ] && bash infra/libvirt.sh start
[ -f infra/guest/build.sh ] && bash infra/guest/build.sh
# The Debian 12 guest of the realistic base VM (docs/debian-base.md); cached like the test guest.
[ -f infra/debian/build.sh ] && bash infra/debian/build.sh

say "setup complete: Temporal on ${CLOUDLET_TEMPORAL_ADDRESS:-127.0.0.1:7233} (Web UI http://127.0.0.1:${CLOUDLET_TEMPORAL_UI_PORT:-8233}), libvirt on qemu:///system"
