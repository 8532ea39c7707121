#!/usr/bin/env bash
# libvirtd on a host without systemd (this sandbox; see docs/hypervisor.md), idempotently.
#   infra/libvirt.sh start    install missing Debian packages, configure qemu.conf (marked block),
#                             start libvirtd under a child subreaper (tini -s) unless it answers
#   infra/libvirt.sh stop     stop the libvirtd this script started
#   infra/libvirt.sh status   exit 0 iff libvirtd answers on qemu:///system
#
# Two things make libvirt slow here and are fixed below (measured figures in docs/hypervisor.md):
#  1. QEMU capabilities must stay cached: libvirt re-probes QEMU (~2 s per probe) whenever it
#     thinks KVM usability changed; it checks /dev/kvm as the configured qemu user. Running QEMU
#     as root makes that check stable (and the cache in /var/cache/libvirt/qemu/capabilities valid).
#  2. Orphans must be reaped quickly: libvirt daemonizes QEMU (probes and domains), so QEMU
#     processes are re-parented; libvirt waits for each killed QEMU to vanish (destroy, save,
#     capability probes). PID 1 of this sandbox reaps slowly; `tini -s` reaps at once.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

URI=qemu:///system
STATE="$VAR/libvirt"
PIDFILE="$STATE/libvirtd.pid"   # the tini process that supervises libvirtd
LOG="$STATE/libvirtd.log"
QEMU_CONF=/etc/libvirt/qemu.conf
MARK_BEGIN="# BEGIN cloudlet (infra/libvirt.sh) -- edited by the project, do not change by hand"
MARK_END="# END cloudlet (infra/libvirt.sh)"
PACKAGES=(qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev tini)

answers() { virsh -c "$URI" version >/dev/null 2>&1; }

# The settings we need in qemu.conf, one per line.
qemu_conf_block() {
  cat <<EOF
$MARK_BEGIN
# Run QEMU as root: libvirt then checks /dev/kvm as root, its verdict never flips, and the
# QEMU capabilities cache stays valid (no ~2 s re-probe on domain start/restore).
user = "root"
group = "root"
# No SELinux/AppArmor confinement and no chown of images (we own the files as root anyway).
security_driver = "none"
dynamic_ownership = 0
remember_owner = 0
# QEMU stdout/stderr straight to /var/log/libvirt/qemu/<domain>.log, no virtlogd needed.
stdio_handler = "file"
# No cgroups and no per-domain mount namespace inside a container: less work per start.
cgroup_controllers = [ ]
namespaces = [ ]
# Guest RAM that is a shared file (handoffs read it and hand it over without a memory stream,
# docs/handoff.md) lives in memory, not on disk: no writeback of guest RAM.
memory_backing_dir = "/dev/shm/cloudlet-libvirt-ram"
$MARK_END
EOF
}

configure() {
  [ -f "$QEMU_CONF" ] || die "$QEMU_CONF is missing although libvirt-daemon-system is installed; reinstall it (apt-get install --reinstall libvirt-daemon-system)"
  local current wanted
  current="$(awk -v b="$MARK_BEGIN" -v e="$MARK_END" '$0==b{on=1} on{print} $0==e{on=0}' "$QEMU_CONF")"
  wanted="$(qemu_conf_block)"
  if [ "$current" = "$wanted" ]; then
    say "$QEMU_CONF already holds the cloudlet settings"
    return 1
  fi
  say "writing the cloudlet settings into $QEMU_CONF (user/group root, security_driver none, stdio_handler file, no cgroups/namespaces)"
  local tmp; tmp="$(mktemp "$QEMU_CONF.XXXXXX")"
  awk -v b="$MARK_BEGIN" -v e="$MARK_END" '$0==b{skip=1} !skip{print} $0==e{skip=0}' "$QEMU_CONF" > "$tmp"
  printf '%s\n' "$wanted" >> "$tmp"
  chmod --reference="$QEMU_CONF" "$tmp"
  mv "$tmp" "$QEMU_CONF"
  return 0
}

# Is process $1 alive (a zombie is not: PID 1 here reaps slowly)?
alive() {
  local st
  st="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  st="${st##*) }"
  [ "${st%% *}" != Z ]
}

our_pid() {
  [ -f "$PIDFILE" ] && alive "$(cat "$PIDFILE")" && cat "$PIDFILE"
}

# The pid of a live libvirtd from its own pid file (not a stale file or a reused pid).
libvirtd_pid() {
  local pid
  pid="$(cat /run/libvirtd.pid 2>/dev/null)" || return 1
  alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = libvirtd ] && echo "$pid"
}

# Domains a libvirtd died while starting (docs/hypervisor.md, "libvirtd killed while it starts a
# domain"): libvirt 9.0 writes a domain's status (pid 0, its async "start" job) before QEMU runs;
# if libvirtd dies before it records QEMU's pid, the next libvirtd loads that status, skips the
# domain when it reconnects (pid 0: "inactive") and keeps the job forever. The domain then lists
# as "paused (starting up)" and every call on it, destroy included, times out on its state change
# lock. With no libvirtd running, such a status names a start that can never finish: drop it, and
# stop a QEMU that started for it (it has no libvirt owner).
sweep_unstarted_domains() {
  local dir=/run/libvirt/qemu f name pid
  [ -d "$dir" ] || return 0
  for f in "$dir"/*.xml; do
    [ -f "$f" ] || continue
    grep -q "<domstatus [^>]*pid='0'" "$f" || continue
    name="$(basename "$f" .xml)"
    # QEMU processes (by their exact command name) whose arguments name this domain, compared as
    # fixed text (a domain name may hold regex characters).
    for pid in $(pgrep -x qemu-system-x86 || true); do
      tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "guest=$name," || continue
      warn "stopping QEMU (pid $pid) of domain $name, which a libvirtd that died was starting"
      kill -9 "$pid" 2>/dev/null || true
    done
    warn "dropping the status of domain $name, which a libvirtd that died left half-started (pid 0, its start job pending)"
    rm -f "$f" "$dir/$name.pid"
  done
}

start() {
  [ "$(id -u)" = 0 ] || die "libvirtd for qemu:///system must run as root; rerun as root"
  local p fresh=0
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || fresh=1
  done
  ensure_packages "${PACKAGES[@]}"
  local changed=0
  configure && changed=1
  local other
  if answers && ! our_pid >/dev/null && [ "$fresh" = 1 ] && other="$(libvirtd_pid)"; then
    # The package's init script started a libvirtd of its own (not under a subreaper): replace it.
    say "stopping the libvirtd the package installation started (pid $other), to run it under tini"
    kill "$other"
    WAIT_SECONDS=30 wait_for bash -c '! virsh -c qemu:///system version' || die "the libvirtd started by the package did not stop; kill it and retry"
  fi
  if answers; then
    if ! our_pid >/dev/null; then
      warn "this libvirtd was not started by infra/libvirt.sh, so it may not run under a child subreaper (slow destroy/save); to switch: kill \$(cat /run/libvirtd.pid) && bash infra/libvirt.sh start"
    fi
    if [ "$changed" = 1 ] && our_pid >/dev/null && [ -z "$(virsh -c "$URI" list --name 2>/dev/null | tr -d '[:space:]')" ]; then
      say "qemu.conf changed and no domain runs: restarting libvirtd to apply it"
      stop
    else
      if [ "$changed" = 1 ]; then
        warn "libvirtd already runs with the old qemu.conf; restart it to apply: bash infra/libvirt.sh stop && bash infra/libvirt.sh start"
      fi
      say "libvirtd already answers on $URI; nothing to do"
      return 0
    fi
  fi
  mkdir -p "$STATE"
  # A libvirtd that does not answer but holds the pid file would block the new one.
  if other="$(libvirtd_pid)"; then
    die "a libvirtd (pid $other) runs but does not answer on $URI; see $LOG, stop it (kill $other) and retry"
  fi
  sweep_unstarted_domains
  local caps=/var/cache/libvirt/qemu/capabilities
  if compgen -G "$caps/*.xml" >/dev/null; then
    say "QEMU capabilities cache present in $caps (libvirtd reuses it if QEMU, libvirt and /dev/kvm are unchanged)"
  else
    say "no QEMU capabilities cache yet in $caps: this first start probes QEMU (several seconds)"
  fi
  say "starting libvirtd under tini -s (child subreaper), log $LOG"
  local t0; t0=$(date +%s%N)
  setsid nohup tini -s -- libvirtd >>"$LOG" 2>&1 < /dev/null &
  echo $! > "$PIDFILE"
  WAIT_SECONDS=90 wait_for answers || die "libvirtd did not answer on $URI within 90 s; see $LOG"
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  # A capability file newer than our start means libvirtd (re-)probed QEMU; later starts and
  # restores must not do it again (see docs/hypervisor.md).
  local marker="$STATE/.started"; touch -d "@$(( t0 / 1000000000 - 1 ))" "$marker"
  if [ -n "$(find "$caps" -name '*.xml' -newer "$marker" 2>/dev/null | head -1)" ]; then
    say "libvirtd probed QEMU's capabilities and cached them in $caps"
  else
    say "libvirtd reused the cached QEMU capabilities (no probe)"
  fi
  say "libvirtd answers on $URI after ${ms} ms (tini pid $(cat "$PIDFILE")): $(virsh -c "$URI" version 2>/dev/null | grep -i 'running hypervisor' | sed 's/^ *//')"
}

stop() {
  local pid
  if pid="$(our_pid)"; then
    say "stopping libvirtd (tini pid $pid; running domains keep running)"
    kill -TERM "$pid"
    local deadline=$(( $(date +%s) + 30 ))
    while alive "$pid"; do
      [ "$(date +%s)" -lt "$deadline" ] || die "libvirtd (tini pid $pid) did not stop within 30 s"
      sleep 0.1
    done
    rm -f "$PIDFILE"
    say "libvirtd stopped"
  elif answers; then
    warn "libvirtd answers on $URI but was not started by this script (no live $PIDFILE); leaving it alone"
  else
    say "libvirtd is not running"
  fi
}

status() {
  if answers; then
    local how="not started by this script"
    our_pid >/dev/null && how="under tini, pid $(cat "$PIDFILE")"
    say "libvirtd answers on $URI ($how)"
  else
    say "libvirtd does not answer on $URI; start it with: bash infra/libvirt.sh start"
    return 1
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: infra/libvirt.sh start|stop|status" ;;
esac
