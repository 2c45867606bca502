#!/usr/bin/env bash
# Flake hunt: N consecutive runs of CI (`.ci/run`, the README's test command) on fresh clones of
# this checkout's HEAD, each beside a one-core CPU hog that this script starts and stops, so the
# suite's waits meet a loaded machine. Stops at the first red run and keeps its log.
# Usage: scripts/soak.sh [runs=5] [log folder=/tmp/step-soak]
# Prints one line per run (result and minutes) and appends it to <log folder>/summary.txt.
set -uo pipefail
runs="${1:-5}"
logs="${2:-/tmp/step-soak}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$logs"

hog_pid=""
stop_hog() { [ -n "$hog_pid" ] && kill "$hog_pid" 2>/dev/null; wait "$hog_pid" 2>/dev/null; hog_pid=""; }
trap stop_hog EXIT

for i in $(seq 1 "$runs"); do
    clone="$logs/clone-$i"
    rm -rf "$clone"
    git clone -q "$repo" "$clone"
    head="$(git -C "$clone" rev-parse --short HEAD)"  # each run tests the HEAD of its moment
    # The hog: one busy process, nice 0, as a competing build or indexer would be.
    python3 -c 'while True: pass' &
    hog_pid=$!
    start=$(date +%s)
    (cd "$clone" && CI=true bash .ci/run) >"$logs/run-$i.log" 2>&1
    rc=$?
    stop_hog
    minutes=$(( ($(date +%s) - start + 30) / 60 ))
    tail_line="$(grep -E '^[0-9]+ (passed|failed)|passed|failed' "$logs/run-$i.log" | tail -1)"
    line="run $i/$runs of $head: rc=$rc, ${minutes} min, hog on: $tail_line"
    echo "$line" | tee -a "$logs/summary.txt"
    rm -rf "$clone"
    [ "$rc" -eq 0 ] || exit "$rc"
done
