#!/usr/bin/env bash
# `npm start`: install and start what is missing, then run the main job end to end.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
bash infra/setup.sh
say "running the self-test workflow on the local host"
exec node_modules/.bin/tsx src/start.ts
