#!/usr/bin/env bash
# Everything that needs a real NVIDIA GPU, in one run on the device machine:
#   plan and doctor on the detected GPU, then the GPU tests (hardware probe, sampler vs torch).
# The device machine has no package registry: wheels carried in .whl/ fill the gaps.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export STEP_STATION_HOME=${STEP_STATION_HOME:-$(mktemp -d)}
export PYTHONUNBUFFERED=1
bash scripts/gpu_plan_doctor.sh 2>&1 | sed '/^===== pytest/,$d'
echo; echo "===== pytest tests/gpu (both files)"
python3 -m pytest -q -s -m gpu -p no:cacheprovider --noconftest -o addopts="" tests/gpu
