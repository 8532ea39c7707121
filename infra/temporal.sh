#!/usr/bin/env bash
# The Temporal dev server (SQLite, Web UI) for the embedded defaults.
#   infra/temporal.sh install   build the Temporal CLI from its Go module into .tools/ (once)
#   infra/temporal.sh start     start `temporal server start-dev` unless it already answers, and
#                               make sure the clusters' namespaces exist (CLOUDLET_CLUSTER_NAMESPACES)
#   infra/temporal.sh stop | status
# CLOUDLET_TEMPORAL_ADDRESS, CLOUDLET_TEMPORAL_UI_PORT and CLOUDLET_TEMPORAL_STATE choose another
# server (address, Web UI port, state directory); stop stops the one started with that state.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

CLI_VERSION=v1.5.1 # later releases carry replace directives and cannot be go-installed
TEMPORAL="$TOOLS/temporal"
ADDRESS="${CLOUDLET_TEMPORAL_ADDRESS:-127.0.0.1:7233}"
HOST="${ADDRESS%:*}"; PORT="${ADDRESS##*:}"
UI_PORT="${CLOUDLET_TEMPORAL_UI_PORT:-8233}"
# Another state directory runs a second, separate server (the fault tests restart their own).
STATE="${CLOUDLET_TEMPORAL_STATE:-$VAR/temporal}"
# Search attributes the workflows set (operators filter runs by them in the Web UI).
# Namespaces of the two clusters that `npm start` and the handoff tests run on this machine ("east"
# and "west": handoff crosses clusters, and each cluster has its own namespace).
CLUSTER_NAMESPACES="${CLOUDLET_CLUSTER_NAMESPACES:-east west}"
SEARCH_ATTRIBUTES=(CloudletHost=Keyword CloudletBaseId=Keyword CloudletOverlayId=Keyword CloudletOperation=Keyword CloudletStatus=Keyword)

install() {
  if [ -x "$TEMPORAL" ] && [ "$(cat "$TOOLS/temporal.version" 2>/dev/null)" = "$CLI_VERSION" ]; then
    return 0
  fi
  command -v go >/dev/null || die "the Go toolchain is needed to build the Temporal CLI; install Go >= 1.25 (https://go.dev/doc/install) and retry"
  say "building the Temporal CLI $CLI_VERSION from its Go module with $(go version | cut -d' ' -f3) (first time: several minutes)"
  mkdir -p "$TOOLS"
  # The CLI's go.mod needs Go >= 1.25; GOTOOLCHAIN=auto lets an older local Go (>= 1.21) fetch that
  # toolchain instead of failing, and uses the local one when it is new enough.
  GOTOOLCHAIN=auto GOBIN="$TOOLS" GOFLAGS=-buildvcs=false go install "github.com/temporalio/cli/cmd/temporal@$CLI_VERSION" \
    || die "go install of the Temporal CLI failed (see above); check that the Go module proxy is reachable"
  echo "$CLI_VERSION" > "$TOOLS/temporal.version"
}

healthy() { "$TEMPORAL" operator cluster health --address "$ADDRESS" 2>/dev/null | grep -q SERVING; }

# A namespace with the search attributes, usable (a new namespace reaches every server part after
# its cache refreshes: wait until a list query in it answers).
ensure_namespace() {
  local ns="$1" sa
  if ! "$TEMPORAL" operator namespace describe --namespace "$ns" --address "$ADDRESS" >/dev/null 2>&1; then
    say "creating the Temporal namespace $ns"
    "$TEMPORAL" operator namespace create --namespace "$ns" --retention 72h --address "$ADDRESS" >/dev/null \
      || die "could not create the Temporal namespace $ns on $ADDRESS (see the error above)"
  fi
  local have; have="$("$TEMPORAL" operator search-attribute list --namespace "$ns" --address "$ADDRESS" 2>/dev/null || true)"
  for sa in "${SEARCH_ATTRIBUTES[@]}"; do
    grep -qw "${sa%=*}" <<<"$have" && continue
    say "registering the search attribute ${sa%=*} in namespace $ns"
    WAIT_SECONDS=60 wait_for "$TEMPORAL" operator search-attribute create --namespace "$ns" --name "${sa%=*}" --type "${sa#*=}" --address "$ADDRESS" \
      || die "could not register the search attribute ${sa%=*} in namespace $ns"
  done
  WAIT_SECONDS=60 wait_for "$TEMPORAL" workflow list --namespace "$ns" --address "$ADDRESS" --limit 1 --query "CloudletStatus = 'running'" \
    || die "the Temporal namespace $ns does not answer list queries within 60 s; see $STATE/server.log"
}

ensure_namespaces() {
  local ns; for ns in $CLUSTER_NAMESPACES; do ensure_namespace "$ns"; done
}

start() {
  install
  if healthy; then say "Temporal server already answers on $ADDRESS"; ensure_namespaces; return 0; fi
  mkdir -p "$STATE"
  local args=(server start-dev --ip "$HOST" --port "$PORT" --ui-port "$UI_PORT"
    --db-filename "$STATE/temporal.db" --log-level warn
    # Write-ahead log, fsync at checkpoints: each workflow transition waits for one write, not for
    # several fsyncs (a crash of this machine may lose the last transitions; see docs/production.md).
    --sqlite-pragma journal_mode=wal --sqlite-pragma synchronous=normal
    # An activity scheduled on the queue of the worker that completes the workflow task goes
    # straight back to that worker, without a trip through the queue (host operations run their
    # workflow on the host's queue; see src/workers/host-worker.ts).
    --dynamic-config-value system.enableActivityEagerExecution=true)
  local sa; for sa in "${SEARCH_ATTRIBUTES[@]}"; do args+=(--search-attribute "$sa"); done
  say "starting the Temporal dev server on $ADDRESS (Web UI http://$HOST:$UI_PORT, state $STATE/temporal.db)"
  setsid nohup "$TEMPORAL" "${args[@]}" >>"$STATE/server.log" 2>&1 < /dev/null &
  echo $! > "$STATE/server.pid"
  WAIT_SECONDS=90 wait_for healthy || die "the Temporal server did not answer on $ADDRESS within 90 s; see $STATE/server.log (is the port taken?)"
  say "Temporal server is up"
  ensure_namespaces
}

stop() {
  if [ -f "$STATE/server.pid" ] && kill -0 "$(cat "$STATE/server.pid")" 2>/dev/null; then
    local pid; pid="$(cat "$STATE/server.pid")"
    say "stopping the Temporal dev server (pid $pid)"
    kill "$pid"
    WAIT_SECONDS=30 wait_for bash -c "! kill -0 $pid" || { warn "it did not stop within 30 s; killing it"; kill -9 "$pid" 2>/dev/null; }
    rm -f "$STATE/server.pid"
  else
    say "no Temporal dev server started from this checkout is running"
  fi
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) healthy && say "Temporal server answers on $ADDRESS" || { say "Temporal server is not answering on $ADDRESS"; exit 1; } ;;
  *) die "usage: infra/temporal.sh install|start|stop|status" ;;
esac
