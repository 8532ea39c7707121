#!/usr/bin/env bash
# Builds the cloudlet test guest from Debian packages only, into var/guest/ of the repo:
#   vmlinuz      Debian cloud kernel (linux-image-cloud-amd64 -> its versioned linux-image-*-cloud-amd64)
#   initrd.img   busybox-static initramfs: /init, the stateful HTTP application, the needed kernel modules
#   disk.raw     small raw ext4 disk (the application's persistent data), built without mounting
#   manifest.json  what the above are, how to boot them, and the digest of the inputs they were built from
#
# Idempotent and cached: the inputs digest covers the guest files in infra/guest, the exact versions of
# the Debian packages used (guest and host tools) and the build parameters; when it matches the
# manifest and the outputs are intact, nothing is rebuilt. Packages are fetched with `apt-get download`
# into var/cache/guest/ and extracted with `dpkg-deb -x` (nothing is installed on the host).
# Everything is deterministic: building twice gives the same bytes.
#
# Usage: bash infra/guest/build.sh [--force]
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

GUEST_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$GUEST_DIR/../.." && pwd)"
OUT="$ROOT/var/guest"
CACHE="$ROOT/var/cache/guest"
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1

# Build parameters (part of the inputs digest).
BUILD_FORMAT=1
KERNEL_META=linux-image-cloud-amd64
BUSYBOX_PKG=busybox-static
DISK_MIB=64
DISK_UUID=6c6f7564-6c65-7421-8000-000000000001   # fixed: the same bytes on every build
DISK_HASH_SEED=6c6f7564-6c65-7421-8000-000000000002
DISK_LABEL=cloudlet-data
EPOCH=1700000000                                  # every timestamp in the initrd and the disk
APP_PORT=8080
READY_LINE="CLOUDLET-GUEST-READY"
NET_LINE="CLOUDLET-GUEST-NET-UP"
CMDLINE="console=ttyS0 nokaslr init_on_free=1 quiet panic=-1 rdinit=/init"
# Kernel modules the guest loads (with their dependencies from modules.dep); others are built in.
MODULES=(virtio_pci virtio_blk virtio_net virtio_balloon vmxnet3)

say() { printf '\033[1;34m[guest]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[guest] error:\033[0m %s\n' "$*" >&2; exit 1; }

for tool in apt-get apt-cache dpkg-deb dpkg-query depmod mkfs.ext4 debugfs cpio gzip sha256sum flock truncate; do
  command -v "$tool" >/dev/null || die "$tool not found; install the Debian packages listed in infra/guest/host-packages.txt (bash infra/setup.sh does it)"
done

mkdir -p "$OUT" "$CACHE/debs"
# One build at a time (tests of several engineers call this script from beforeAll).
exec 9>"$CACHE/.lock"
flock 9

# --- 1. Resolve the exact package versions -------------------------------------------------------
# One apt-cache call (it is slow): the candidate of the kernel meta-package pins the versioned kernel
# package exactly ("Depends: linux-image-X-cloud-amd64 (= V)"), plus busybox-static's candidate.
PKG_INFO="$(apt-cache show --no-all-versions "$KERNEL_META" "$BUSYBOX_PKG" 2>/dev/null || true)"
if ! printf '%s\n' "$PKG_INFO" | grep -q "^Package: $KERNEL_META\$" && [ "$(id -u)" = 0 ]; then
  # Package lists removed (as container images do) or never fetched: fetch them once.
  say "apt knows no $KERNEL_META: running apt-get update"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed; check the apt sources and the connection to the Debian mirror"
  PKG_INFO="$(apt-cache show --no-all-versions "$KERNEL_META" "$BUSYBOX_PKG" 2>/dev/null || true)"
fi
read -r KERNEL_PKG KERNEL_PKG_VERSION < <(printf '%s\n' "$PKG_INFO" | awk -v p="$KERNEL_META" '
  /^Package: / { pkg = $2 }
  pkg == p && /^Depends: / { if (match($0, /linux-image-[^ ,]*-cloud-amd64 \(= [^)]*\)/)) {
    d = substr($0, RSTART, RLENGTH); gsub(/[()=]/, "", d); print d; exit } }') || true
BUSYBOX_VERSION="$(printf '%s\n' "$PKG_INFO" | awk -v p="$BUSYBOX_PKG" '/^Package: / { pkg = $2 } pkg == p && /^Version: / { print $2; exit }')"
[ -n "${KERNEL_PKG:-}" ] && [ -n "${KERNEL_PKG_VERSION:-}" ] || die "cannot resolve $KERNEL_META to an exact versioned kernel package; run apt-get update (is the Debian archive in the apt sources?)"
[ -n "$BUSYBOX_VERSION" ] || die "no installable version of $BUSYBOX_PKG; run apt-get update"
host_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo none; }

# --- 2. Inputs digest --------------------------------------------------------------------------------
inputs_description() {
  echo "format=$BUILD_FORMAT"
  echo "kernel=$KERNEL_PKG=$KERNEL_PKG_VERSION"
  echo "busybox=$BUSYBOX_PKG=$BUSYBOX_VERSION"
  echo "host:e2fsprogs=$(host_version e2fsprogs) kmod=$(host_version kmod) cpio=$(host_version cpio) gzip=$(host_version gzip)"
  echo "disk=$DISK_MIB $DISK_UUID $DISK_HASH_SEED $DISK_LABEL epoch=$EPOCH"
  echo "port=$APP_PORT ready=$READY_LINE cmdline=$CMDLINE modules=${MODULES[*]}"
  # The guest files: everything in infra/guest except docs and TypeScript; of the mode, only whether
  # the file is executable counts (as in git), the copies are normalized (see normalize_modes).
  (cd "$GUEST_DIR" && find . -type f ! -name '*.ts' ! -name '*.md' | LC_ALL=C sort | while read -r f; do
    printf '%s %s %s\n' "$([ -x "$f" ] && echo x || echo -)" "$(sha256sum < "$f" | cut -d' ' -f1)" "$f"
  done)
}
INPUTS_DIGEST="$(inputs_description | sha256sum | cut -d' ' -f1)"

# Directories 755, files 755 if executable else 644, whatever the checkout's umask was.
normalize_modes() {
  find "$1" -type d -exec chmod 0755 {} +
  find "$1" -type f -perm /111 -exec chmod 0755 {} +
  find "$1" -type f ! -perm /111 -exec chmod 0644 {} +
}

# --- 3. Up to date? -----------------------------------------------------------------------------------
manifest_field() { sed -n "s/^  \"$1\": \"\\([^\"]*\\)\".*/\\1/p" "$OUT/manifest.json"; }
outputs_intact() {
  local f want
  for f in vmlinuz initrd.img disk.raw; do
    [ -f "$OUT/$f" ] || return 1
    want="$(sed -n "s/.*\"$f\": { \"sha256\": \"\\([0-9a-f]*\\)\".*/\\1/p" "$OUT/manifest.json")"
    [ "$(sha256sum < "$OUT/$f" | cut -d' ' -f1)" = "$want" ] || { say "$f changed since it was built"; return 1; }
  done
}
if [ "$FORCE" = 0 ] && [ -f "$OUT/manifest.json" ] && [ "$(manifest_field inputsDigest)" = "$INPUTS_DIGEST" ] && outputs_intact; then
  say "test guest is up to date in $OUT (inputs ${INPUTS_DIGEST:0:12}; $KERNEL_PKG $KERNEL_PKG_VERSION, $BUSYBOX_PKG $BUSYBOX_VERSION)"
  exit 0
fi
START=$(date +%s.%N)
say "building the test guest into $OUT (inputs ${INPUTS_DIGEST:0:12})"

# --- 4. Fetch and extract the Debian packages ------------------------------------------------------
fetch_deb() { # name version -> path of the .deb in the cache (one directory per package version)
  local name="$1" version="$2" dir deb
  dir="$CACHE/debs/$name/$version"
  deb="$(ls "$dir"/*.deb 2>/dev/null | head -n1 || true)"
  if [ -z "$deb" ]; then
    say "apt-get download $name=$version"
    mkdir -p "$dir"
    (cd "$dir" && apt-get download -q -o APT::Sandbox::User=root "$name=$version" >&2) \
      || die "apt-get download $name=$version failed; check the apt sources and the connection to the Debian mirror"
    deb="$(ls "$dir"/*.deb 2>/dev/null | head -n1 || true)"
    [ -n "$deb" ] || die "apt-get download $name=$version left no .deb in $dir"
  else
    say "using cached $(basename "$deb")"
  fi
  [ "$(dpkg-deb -f "$deb" Version)" = "$version" ] || die "$deb is not version $version of $name; delete $dir and retry"
  echo "$deb"
}
KERNEL_DEB="$(fetch_deb "$KERNEL_PKG" "$KERNEL_PKG_VERSION")"
BUSYBOX_DEB="$(fetch_deb "$BUSYBOX_PKG" "$BUSYBOX_VERSION")"

WORK="$(mktemp -d "$CACHE/build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
say "extracting $(basename "$KERNEL_DEB") and $(basename "$BUSYBOX_DEB") with dpkg-deb -x"
dpkg-deb -x "$KERNEL_DEB" "$WORK/kernel"
dpkg-deb -x "$BUSYBOX_DEB" "$WORK/busybox"
KVER="$(ls "$WORK/kernel/lib/modules" | head -n1)"
[ -n "$KVER" ] && [ -f "$WORK/kernel/boot/vmlinuz-$KVER" ] || die "$(basename "$KERNEL_DEB") has no /boot/vmlinuz-* with matching /lib/modules"
MODDIR="$WORK/kernel/lib/modules/$KVER"
# The package ships no modules.dep (its postinst runs depmod); make it in the extracted tree.
depmod -b "$WORK/kernel" "$KVER" || die "depmod failed on the extracted $KERNEL_PKG"

# --- 5. Initramfs --------------------------------------------------------------------------------------
ROOTFS="$WORK/rootfs"
say "assembling the initramfs (busybox $BUSYBOX_VERSION, kernel modules of $KVER)"
mkdir -p "$ROOTFS"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,run,tmp,data,root,etc/guest,lib/modules/"$KVER"}
cp -a "$GUEST_DIR/rootfs/." "$ROOTFS/"
normalize_modes "$ROOTFS"
install -m 0755 "$WORK/busybox/bin/busybox" "$ROOTFS/bin/busybox"
# Applet links, created here so the image needs no `busybox --install` at boot.
"$ROOTFS/bin/busybox" --list-full | while read -r applet; do
  [ -e "$ROOTFS/$applet" ] || ln -s /bin/busybox "$ROOTFS/$applet"
done

# Kernel modules with their dependencies, in load order (dependencies first), from modules.dep.
declare -A SEEN=()
ORDER=()
add_module() { # path relative to $MODDIR, e.g. kernel/drivers/net/virtio_net.ko
  local rel="$1" deps dep
  [ -n "${SEEN[$rel]:-}" ] && return 0
  SEEN[$rel]=1
  deps="$(awk -v m="$rel:" '$1 == m { $1 = ""; print; exit }' "$MODDIR/modules.dep")"
  for dep in $deps; do add_module "$dep"; done
  ORDER+=("$rel")
}
for m in "${MODULES[@]}"; do
  rel="$(awk -v m="/$m.ko:" 'index($1, m) && substr($1, length($1) - length(m) + 1) == m { sub(/:$/, "", $1); print $1; exit }' "$MODDIR/modules.dep")"
  if [ -z "$rel" ]; then
    grep -q "/$m.ko$" "$MODDIR/modules.builtin" || die "kernel module $m is neither in modules.dep nor built into $KVER"
    continue
  fi
  add_module "$rel"
done
: > "$ROOTFS/etc/guest/modules"
for rel in "${ORDER[@]}"; do
  install -D -m 0644 "$MODDIR/$rel" "$ROOTFS/lib/modules/$KVER/$rel"
  echo "/lib/modules/$KVER/$rel" >> "$ROOTFS/etc/guest/modules"
done
say "modules: $(for rel in "${ORDER[@]}"; do basename "$rel" .ko; done | tr '\n' ' ')"
cat > "$ROOTFS/etc/guest/config" <<EOF
APP_PORT=$APP_PORT
READY_LINE=$READY_LINE
NET_LINE=$NET_LINE
KERNEL_VERSION=$KVER
EOF
find "$ROOTFS" -exec touch -h -d "@$EPOCH" {} +
(cd "$ROOTFS" && find . -mindepth 1 | LC_ALL=C sort \
  | cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -9 -n > "$WORK/initrd.img"

# --- 6. Disk (ext4, built from a directory without mounting) ----------------------------------------
say "making the ${DISK_MIB} MiB ext4 disk with mkfs.ext4 -d (fixed UUID, hash seed and time)"
DISKDIR="$WORK/disk"
mkdir -p "$DISKDIR"
cp -a "$GUEST_DIR/disk/." "$DISKDIR/"
normalize_modes "$DISKDIR"
find "$DISKDIR" -exec touch -h -d "@$EPOCH" {} +
truncate -s "${DISK_MIB}M" "$WORK/disk.raw"
E2FSPROGS_FAKE_TIME=$EPOCH mkfs.ext4 -q -F -t ext4 -b 4096 -L "$DISK_LABEL" -U "$DISK_UUID" -m 0 \
  -E "hash_seed=$DISK_HASH_SEED,root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0,nodiscard" \
  -d "$DISKDIR" "$WORK/disk.raw" >&2
# mkfs.ext4 -d copies each source file's ctime, which cannot be set on the host: pin them with debugfs.
(cd "$DISKDIR" && find . | LC_ALL=C sort | while read -r f; do
  f="${f#.}"; echo "set_inode_field ${f:-/} ctime @$EPOCH"
done) > "$WORK/pin-ctime.debugfs"
E2FSPROGS_FAKE_TIME=$EPOCH debugfs -w -f "$WORK/pin-ctime.debugfs" "$WORK/disk.raw" >/dev/null 2>"$WORK/debugfs.log" \
  || { cat "$WORK/debugfs.log" >&2; die "debugfs could not pin the ctimes of the disk's files"; }

# --- 7. Install the outputs and the manifest ------------------------------------------------------------
cp "$WORK/kernel/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
sha() { sha256sum < "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }
for f in vmlinuz initrd.img disk.raw; do chmod 0644 "$WORK/$f"; done
cat > "$WORK/manifest.json" <<EOF
{
  "format": $BUILD_FORMAT,
  "kernel": "vmlinuz",
  "initrd": "initrd.img",
  "disk": "disk.raw",
  "diskFormat": "raw",
  "diskFilesystem": "ext4",
  "diskSizeBytes": $(size "$WORK/disk.raw"),
  "cmdline": "$CMDLINE",
  "inputsDigest": "$INPUTS_DIGEST",
  "kernelVersion": "$KVER",
  "kernelPackage": "$KERNEL_PKG",
  "kernelPackageVersion": "$KERNEL_PKG_VERSION",
  "busyboxPackage": "$BUSYBOX_PKG",
  "busyboxVersion": "$BUSYBOX_VERSION",
  "readyLine": "$READY_LINE",
  "netUpLine": "$NET_LINE",
  "appPort": $APP_PORT,
  "guestIp": "10.0.2.15",
  "guestGateway": "10.0.2.2",
  "defaultMemoryMiB": 256,
  "testedMemoryMiB": [128, 256, 512],
  "files": {
    "vmlinuz": { "sha256": "$(sha "$WORK/vmlinuz")", "size": $(size "$WORK/vmlinuz") },
    "initrd.img": { "sha256": "$(sha "$WORK/initrd.img")", "size": $(size "$WORK/initrd.img") },
    "disk.raw": { "sha256": "$(sha "$WORK/disk.raw")", "size": $(size "$WORK/disk.raw") }
  }
}
EOF
for f in vmlinuz initrd.img disk.raw manifest.json; do mv -f "$WORK/$f" "$OUT/$f"; done
END=$(date +%s.%N)
say "built in $(awk -v a="$START" -v b="$END" 'BEGIN { printf "%.1f", b - a }') s: vmlinuz $(size "$OUT/vmlinuz") B, initrd.img $(size "$OUT/initrd.img") B, disk.raw $(size "$OUT/disk.raw") B ($(du -k "$OUT/disk.raw" | cut -f1) KiB allocated)"
