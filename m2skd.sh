#!/usr/bin/env bash
# One entry for a fresh machine: sets up .venv (idempotent; seconds when already done), then
#   ./m2skd.sh demo [options]      runs the whole pipeline on the embedded synthetic default
#   ./m2skd.sh test [pytest args]  runs the test suite
#   ./m2skd.sh bench [options]     runs the benchmarks
#   ./m2skd.sh <subcommand> ...    any other m2skd sub-command
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$ROOT/scripts/setup_env.sh"
VENV="${M2SKD_VENV:-$ROOT/.venv}"
cmd="${1:-demo}"; [[ $# -gt 0 ]] && shift
case "$cmd" in
  test) cd "$ROOT" && exec "$VENV/bin/python" -m pytest "$@" ;;
  *) exec "$VENV/bin/m2skd" "$cmd" "$@" ;;
esac
