#!/usr/bin/env bash
# The one test command: installs what the tests need (venv, Docker engine, local registry,
# simulator image, Chromium, a real vLLM for the CPU with the tiny models it serves), then runs
# lint, types and the whole suite.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --dev
scripts/harness.sh up
scripts/realvllm.sh up
scripts/realvllm_image.sh up
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"; ruff check . && ruff format --check .
echo "== mypy"; mypy
echo "== pytest"; exec pytest -q "$@"
