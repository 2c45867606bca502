#!/usr/bin/env bash
# Retake the README's screenshots (docs/img/*.png) with the browser tests that show those moments.
# The test command never writes into docs/img; this one does, on purpose (STEP_SCREENSHOTS).
# Usage: scripts/screenshots.sh   (sets up what the tests need first, like scripts/test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --dev
scripts/harness.sh up
export PATH="$PWD/.venv/bin:$PATH"
export STEP_SCREENSHOTS="$PWD/docs/img"
exec pytest -q -p no:randomly \
  "tests/browser/test_chat.py::test_images_and_level_high_thinking_collapses_with_its_duration" \
  "tests/browser/test_dashboard.py::test_dashboard_shows_the_engine_gpu_metrics_and_polls_only_while_visible" \
  "tests/browser/test_model_tab.py::test_start_from_the_page_walks_the_timeline_then_stop" \
  "tests/browser/test_model_tab.py::test_forced_failure_shows_reason_what_to_do_and_log_tail"
