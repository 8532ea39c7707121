#!/usr/bin/env bash
# `npm run bench -- <name>`: run bench/<name>.ts after making sure the environment is up.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
name="${1:-}"
[ -n "$name" ] && [ -f "bench/$name.ts" ] || die "usage: npm run bench -- <name>; available: $(ls bench 2>/dev/null | sed -n 's/\.ts$//p' | tr '\n' ' ')"
shift
bash infra/setup.sh >&2
exec node_modules/.bin/tsx "bench/$name.ts" "$@"
