#!/usr/bin/env bash
# `npm run stop`: stop the services this checkout started (VMs of this project, Temporal, libvirtd).
set -uo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
if command -v virsh >/dev/null && virsh -c qemu:///system version >/dev/null 2>&1; then
  for d in $(virsh -c qemu:///system list --all --name | grep -E '^cl-' || true); do
    say "removing VM $d"; virsh -c qemu:///system destroy "$d" >/dev/null 2>&1; virsh -c qemu:///system undefine "$d" >/dev/null 2>&1
  done
fi
# The API (and dashboard) `npm start` left running.
if [ -f "$VAR/run/api.pid" ]; then
  pid="$(cat "$VAR/run/api.pid")"
  grep -q "api/main.ts" "/proc/$pid/cmdline" 2>/dev/null && kill "$pid" && say "stopped the API (dashboard)"
  rm -f "$VAR/run/api.pid"
fi
bash infra/temporal.sh stop
[ -f infra/libvirt.sh ] && bash infra/libvirt.sh stop
exit 0
