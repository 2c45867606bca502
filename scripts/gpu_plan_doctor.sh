#!/usr/bin/env bash
# On the GPU machine: what `plan` and `doctor` say about the detected GPU, for the issue note,
# then the GPU tests that compare it with the preset.
#   scripts/gpu_plan_doctor.sh            (PYTHON=... to pick the interpreter)
# Needs: psutil, platformdirs, nvidia-ml-py, pytest. Wheels in .whl/ are installed offline when a
# module is missing (the GPU machine has no package registry).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && .venv/bin/python -c "import sys" 2>/dev/null; then PY=${PYTHON:-.venv/bin/python}; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export STEP_STATION_HOME=${STEP_STATION_HOME:-$(mktemp -d)}

missing=$("$PY" - <<'PY'
import importlib.util
print(" ".join(m for m in ("psutil", "platformdirs", "pynvml", "pytest", "docker")
               if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ] && [ -d .whl ]; then
    echo "== installing from .whl/: $missing"
    # shellcheck disable=SC2086 # a list of module names, split on purpose
    "$PY" -m pip install -q --no-index --find-links .whl $missing || true
fi

# `step-station CMD ...`; when the full CLI cannot import here (the other commands need httpx,
# fastapi, ... which this machine may lack), plan and doctor run on their own.
ss() {
    "$PY" - "$@" <<'PY'
import argparse, sys
try:
    from appliance.cli import main
    main_argv = sys.argv[1:]
    sys.exit(main(main_argv))
except ModuleNotFoundError as err:
    print(f"(full CLI unavailable here: {err}; running plan/doctor alone)", file=sys.stderr)
from appliance.commands import doctor, plan
parser = argparse.ArgumentParser(prog="step-station")
sub = parser.add_subparsers()
plan.register(sub)
doctor.register(sub)
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
PY
}

section() { printf '\n===== %s\n' "$*"; }
section "nvidia-smi"
nvidia-smi --query-gpu=index,uuid,name,compute_cap,memory.total,memory.used,driver_version --format=csv || true
section "step-station plan"
ss plan
section "step-station plan --json"
ss plan --json
section "step-station plan --hardware h200 --json (the preset, to compare)"
ss plan --hardware h200 --json
section "step-station plan --print-command fp8-tp1"
ss plan --print-command fp8-tp1
section "step-station doctor --json"
ss doctor --json
echo "(doctor exit code: $?)"
section "pytest tests/gpu/test_hardware_gpu.py"
"$PY" -m pytest -q -s -m gpu -p no:cacheprovider tests/gpu/test_hardware_gpu.py
