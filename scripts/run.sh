#!/usr/bin/env bash
# Runs the appliance from this checkout: creates .venv on first use, then `step-station ARGS`.
# With no command (or only options) it runs `step-station up`, e.g. `scripts/run.sh --demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
if [ $# -eq 0 ] || [ "${1#-}" != "$1" ]; then
  set -- up "$@"
fi
exec .venv/bin/step-station "$@"
