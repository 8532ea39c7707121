#!/usr/bin/env bash
# Builds the Debian 12 guest of the realistic base VM from Debian's packages, into var/debian/:
#   vmlinuz, initrd.img  the cloud kernel and its initramfs (direct kernel boot; virtio drivers are modules)
#   disk.raw             a sparse ext4 root file system (DISK_GIB GiB, ~0.4 GB of data), made without mounting
#   dpkg-status          the guest's /var/lib/dpkg/status (what recipes' packages are resolved against)
#   manifest.json        what the above are, how to boot them, and the digest of the inputs
#
# The root file system is made by mmdebstrap (minbase + systemd, udev, the cloud kernel, iproute2,
# python3, qemu-guest-agent, procps), then the files of infra/debian/rootfs are laid over it
# (networkd on every NIC, the ready unit, volatile journal, dpkg/apt settings; docs/debian-base.md).
#
# Cached: when the inputs digest (build parameters, the guest files, the exact candidate versions of
# the included packages, the host's mmdebstrap and e2fsprogs) matches the manifest and the outputs
# are intact, nothing is rebuilt. Not bit-for-bit reproducible (mmdebstrap stamps times and keys).
#
# Usage: bash infra/debian/build.sh [--force]
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="${CLOUDLET_VAR:-$ROOT/var}/debian"
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1

BUILD_FORMAT=1
SUITE=bookworm
INCLUDE=(systemd-sysv udev linux-image-cloud-amd64 iproute2 python3 qemu-guest-agent procps)
DISK_GIB=4
DISK_LABEL=cloudlet-root
MEMORY_MIB=1024
READY_LINE="CLOUDLET-GUEST-READY"
CMDLINE="root=/dev/vda rw console=ttyS0 nokaslr init_on_free=1 quiet net.ifnames=0"
SOURCES=/etc/apt/sources.list.d/debian.sources

say() { printf '\033[1;34m[debian]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[debian] error:\033[0m %s\n' "$*" >&2; exit 1; }

for tool in mmdebstrap mkfs.ext4 apt-cache sha256sum flock truncate; do
  command -v "$tool" >/dev/null || die "$tool not found; install the Debian packages listed in infra/debian/host-packages.txt (bash infra/setup.sh does it)"
done
[ "$(id -u)" = 0 ] || die "the Debian guest is built as root (mmdebstrap --mode=root); run as root"
if [ ! -f "$SOURCES" ]; then
  SOURCES=/etc/apt/sources.list
  [ -f "$SOURCES" ] || die "no apt sources on this host (/etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list); mmdebstrap uses the host's Debian mirror"
fi

mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9

# --- Inputs digest ------------------------------------------------------------------------------
candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2; exit }'; }
if [ -z "$(candidate linux-image-cloud-amd64)" ] || [ "$(candidate linux-image-cloud-amd64)" = "(none)" ]; then
  say "apt knows no linux-image-cloud-amd64: running apt-get update"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed; check the apt sources"
fi
host_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo none; }
inputs_description() {
  echo "format=$BUILD_FORMAT suite=$SUITE disk=${DISK_GIB}G label=$DISK_LABEL memory=$MEMORY_MIB"
  echo "cmdline=$CMDLINE ready=$READY_LINE"
  # One apt-cache call for all (each call reads the whole package cache).
  apt-cache policy "${INCLUDE[@]}" 2>/dev/null | awk '/^[^ ].*:$/ { p = $1 } /Candidate:/ { print "pkg " p " " $2 }'
  # The versioned kernel the meta-package points at.
  apt-cache show --no-all-versions linux-image-cloud-amd64 2>/dev/null | sed -n 's/^Depends: //p' | head -n1
  echo "host mmdebstrap=$(host_version mmdebstrap) e2fsprogs=$(host_version e2fsprogs)"
  sed -n '/^URIs:\|^Suites:\|^Components:\|^deb /p' "$SOURCES"
  (cd "$HERE" && find . -type f ! -name '*.md' ! -name 'build.sh' | LC_ALL=C sort | while read -r f; do
    printf '%s %s %s\n' "$([ -x "$f" ] && echo x || echo -)" "$(sha256sum < "$f" | cut -d' ' -f1)" "$f"
  done)
  sha256sum < "$HERE/build.sh" | cut -d' ' -f1
}
INPUTS_DIGEST="$(inputs_description | sha256sum | cut -d' ' -f1)"

manifest_field() { sed -n "s/^  \"$1\": \"\\([^\"]*\\)\".*/\\1/p" "$OUT/manifest.json"; }
outputs_intact() {
  local f want
  for f in vmlinuz initrd.img dpkg-status; do
    [ -f "$OUT/$f" ] || return 1
    want="$(sed -n "s/.*\"$f\": { \"sha256\": \"\\([0-9a-f]*\\)\".*/\\1/p" "$OUT/manifest.json")"
    [ "$(sha256sum < "$OUT/$f" | cut -d' ' -f1)" = "$want" ] || { say "$f changed since it was built"; return 1; }
  done
  # The disk is large: its size and the stamp written with it (a full hash is the base builder's job).
  [ -f "$OUT/disk.raw" ] && [ "$(stat -c %s "$OUT/disk.raw")" = "$((DISK_GIB * 1024 * 1024 * 1024))" ] \
    && [ "$(cat "$OUT/disk.raw.stamp" 2>/dev/null)" = "$(stat -c %Y "$OUT/disk.raw")" ]
}
if [ "$FORCE" = 0 ] && [ -f "$OUT/manifest.json" ] && [ "$(manifest_field inputsDigest)" = "$INPUTS_DIGEST" ] && outputs_intact; then
  say "Debian guest is up to date in $OUT (inputs ${INPUTS_DIGEST:0:12})"
  exit 0
fi

START=$(date +%s.%N)
WORK="$(mktemp -d "$OUT/build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
say "building the Debian $SUITE guest into $OUT (inputs ${INPUTS_DIGEST:0:12}); mmdebstrap takes about a minute"

# --- 1. Root file system --------------------------------------------------------------------------
INCLUDE_CSV="$(IFS=,; echo "${INCLUDE[*]}")"
mmdebstrap --mode=root --variant=minbase --include="$INCLUDE_CSV" \
  --customize-hook='sync-in '"$HERE/rootfs"' /' \
  --customize-hook='chroot "$1" systemctl enable systemd-networkd.service cloudlet-ready.service' \
  --customize-hook='chroot "$1" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer systemd-timesyncd.service' \
  --customize-hook='chroot "$1" passwd -d root' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/log/*.log' \
  --customize-hook='cp "$1"/var/lib/dpkg/status '"$WORK/dpkg-status" \
  --customize-hook='cp "$1"/boot/vmlinuz-* '"$WORK/vmlinuz"' && cp "$1"/boot/initrd.img-* '"$WORK/initrd.img" \
  --customize-hook='ls "$1"/lib/modules > '"$WORK/kernel-version" \
  "$SUITE" "$WORK/root" "$SOURCES" >&2 \
  || die "mmdebstrap failed (see its output above); check the apt sources and the connection to the Debian mirror"
chmod 0755 "$WORK/root"

# --- 2. Disk --------------------------------------------------------------------------------------
say "making the ${DISK_GIB} GiB sparse ext4 root disk with mkfs.ext4 -d"
truncate -s "${DISK_GIB}G" "$WORK/disk.raw"
mkfs.ext4 -q -F -t ext4 -b 4096 -L "$DISK_LABEL" -m 0 \
  -E "lazy_itable_init=0,lazy_journal_init=0,nodiscard" -d "$WORK/root" "$WORK/disk.raw" >&2 \
  || die "mkfs.ext4 -d could not build the root disk"

# --- 3. Outputs -----------------------------------------------------------------------------------
KVER="$(head -n1 "$WORK/kernel-version")"
sha() { sha256sum < "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }
cat > "$WORK/manifest.json" <<EOF
{
  "format": $BUILD_FORMAT,
  "kind": "debian",
  "kernel": "vmlinuz",
  "initrd": "initrd.img",
  "disk": "disk.raw",
  "diskFormat": "raw",
  "diskFilesystem": "ext4",
  "diskSizeBytes": $(size "$WORK/disk.raw"),
  "cmdline": "$CMDLINE",
  "inputsDigest": "$INPUTS_DIGEST",
  "kernelVersion": "$KVER",
  "suite": "$SUITE",
  "packages": "$INCLUDE_CSV",
  "readyLine": "$READY_LINE",
  "appPort": 0,
  "guestAgent": true,
  "guestIp": "10.0.2.15",
  "guestGateway": "10.0.2.2",
  "defaultMemoryMiB": $MEMORY_MIB,
  "files": {
    "vmlinuz": { "sha256": "$(sha "$WORK/vmlinuz")", "size": $(size "$WORK/vmlinuz") },
    "initrd.img": { "sha256": "$(sha "$WORK/initrd.img")", "size": $(size "$WORK/initrd.img") },
    "dpkg-status": { "sha256": "$(sha "$WORK/dpkg-status")", "size": $(size "$WORK/dpkg-status") }
  }
}
EOF
for f in vmlinuz initrd.img dpkg-status disk.raw manifest.json; do mv -f "$WORK/$f" "$OUT/$f"; done
stat -c %Y "$OUT/disk.raw" > "$OUT/disk.raw.stamp"
END=$(date +%s.%N)
say "built in $(awk -v a="$START" -v b="$END" 'BEGIN { printf "%.1f", b - a }') s: kernel $KVER, disk.raw $(du -k "$OUT/disk.raw" | cut -f1) KiB allocated of ${DISK_GIB} GiB"
