#!/usr/bin/env bash
# The real-Docker test harness: a Docker engine, a local registry on 127.0.0.1:5000, the simulator
# image pushed as localhost:5000/vllm/vllm-openai:stepfun37, and Chromium for the browser tests.
#
#   scripts/harness.sh up       idempotent; seconds when everything is already up
#   scripts/harness.sh down     stops the registry and the dockerd this harness started
#   scripts/harness.sh purge    down, then removes the images, the registry data and the base
#   scripts/harness.sh status
#
# Runs as root on a fresh Debian machine (CI): installs docker.io, docker-registry, debootstrap and
# chromium when missing. Without a pullable python:3.12-slim it builds a Debian + Python base with
# debootstrap once and keeps it. State (logs, registry config and storage) lives in .harness/.
# Overrides: HARNESS_DIR, HARNESS_REGISTRY (host:port), HARNESS_IMAGE, HARNESS_BASE_IMAGE,
# HARNESS_LOCAL_BASE, HARNESS_TRY_PULL=1 (try docker pull python:3.12-slim first).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
H=${HARNESS_DIR:-$ROOT/.harness}
# The registry's storage outlives a checkout (like Docker's own image store): a second clone on
# the same machine (CI) finds the images already pushed and skips building and pushing them.
if [ -n "${HARNESS_REGISTRY_DATA:-}" ]; then
  REGISTRY_DATA=$HARNESS_REGISTRY_DATA
elif [ "$(id -u)" = 0 ]; then
  REGISTRY_DATA=/var/lib/step-station-harness/registry
else
  REGISTRY_DATA=$H/registry/data
fi
REGISTRY=${HARNESS_REGISTRY:-127.0.0.1:5000}
IMAGE=${HARNESS_IMAGE:-localhost:${REGISTRY##*:}/vllm/vllm-openai:stepfun37}
LOCAL_BASE=${HARNESS_LOCAL_BASE:-step-station/debian-python:bookworm}
HUB_BASE=python:3.12-slim
SOCK=/var/run/docker.sock
mkdir -p "$H"

log() { printf '[harness %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; elif have sudo; then sudo "$@"; else "$@"; fi; }

ensure_packages() {
  local missing=()
  have dockerd || missing+=(docker.io)
  have docker-registry || missing+=(docker-registry)
  have debootstrap || missing+=(debootstrap)
  have chromium || missing+=(chromium)
  have curl || missing+=(curl ca-certificates)
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Update the package lists only when an install fails without it (fresh images ship none).
  # Recommends stay on: the verified recipe (reference/machines.md) installs them, and dockerd,
  # debootstrap (keyring) and chromium (fonts) lean on them.
  if ! sudo_ apt-get install -y -q "${missing[@]}" >"$H/apt.log" 2>&1; then
    sudo_ apt-get update -q >>"$H/apt.log" 2>&1 || die "apt-get update failed; see $H/apt.log"
    sudo_ apt-get install -y -q "${missing[@]}" >>"$H/apt.log" 2>&1 \
      || die "apt-get install ${missing[*]} failed; see $H/apt.log"
  fi
}

docker_up() { curl -fsS --max-time 2 --unix-socket "$SOCK" http://localhost/_ping >/dev/null 2>&1; }

ensure_dockerd() {
  docker_up && return 0
  have dockerd || die "dockerd is missing; install docker.io"
  log "starting dockerd (log: $H/dockerd.log)"
  # setsid: the engine outlives this script and the test run that started it.
  if [ "$(id -u)" = 0 ]; then
    setsid dockerd >"$H/dockerd.log" 2>&1 </dev/null &
  else
    # shellcheck disable=SC2024  # the log belongs to the caller
    sudo setsid dockerd >"$H/dockerd.log" 2>&1 </dev/null &
  fi
  echo $! >"$H/dockerd.pid"
  for _ in $(seq 1 120); do
    docker_up && return 0
    sleep 0.5
  done
  tail -20 "$H/dockerd.log" >&2 || true
  die "dockerd did not answer on $SOCK within 60 s; see $H/dockerd.log"
}

registry_up() { curl -fsS --max-time 2 "http://$REGISTRY/v2/" >/dev/null 2>&1; }

ensure_registry() {
  registry_up && return 0
  have docker-registry || die "docker-registry is missing; install docker-registry"
  mkdir -p "$REGISTRY_DATA" "$H/registry"
  cat >"$H/registry/config.yml" <<YML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $REGISTRY_DATA
  delete:
    enabled: true
http:
  addr: $REGISTRY
YML
  log "starting docker-registry on $REGISTRY (log: $H/registry.log)"
  setsid docker-registry serve "$H/registry/config.yml" >"$H/registry.log" 2>&1 < /dev/null &
  echo $! >"$H/registry.pid"
  for _ in $(seq 1 60); do
    registry_up && return 0
    sleep 0.5
  done
  tail -20 "$H/registry.log" >&2 || true
  die "the registry did not answer on $REGISTRY within 30 s; see $H/registry.log"
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

pick_base() {
  if [ -n "${HARNESS_BASE_IMAGE:-}" ]; then echo "$HARNESS_BASE_IMAGE"; return; fi
  if image_exists "$HUB_BASE"; then echo "$HUB_BASE"; return; fi
  if image_exists "$LOCAL_BASE"; then echo "$LOCAL_BASE"; return; fi
  if [ "${HARNESS_TRY_PULL:-0}" = 1 ] && timeout 60 docker pull -q "$HUB_BASE" >/dev/null 2>&1; then
    echo "$HUB_BASE"; return
  fi
  build_local_base
  echo "$LOCAL_BASE"
}

build_local_base() {
  have debootstrap || die "debootstrap is missing; install debootstrap"
  local rootfs="$H/rootfs"
  log "building $LOCAL_BASE with debootstrap (about a minute; log: $H/debootstrap.log)"
  sudo_ rm -rf "$rootfs"
  sudo_ debootstrap --variant=minbase --include=python3 bookworm "$rootfs" >"$H/debootstrap.log" 2>&1 \
    || { tail -20 "$H/debootstrap.log" >&2; die "debootstrap failed; see $H/debootstrap.log"; }
  sudo_ rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  sudo_ tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' - "$LOCAL_BASE" >/dev/null \
    || die "docker import of the Debian base failed"
  sudo_ rm -rf "$rootfs"
}

sources_hash() {
  { cat docker/simulator/Dockerfile
    find appliance/simulator -name '*.py' -type f | LC_ALL=C sort | xargs cat
    docker image inspect --format '{{.Id}}' "$1"; } | sha256sum | cut -c1-16
}

ensure_image() {
  local base hash current
  base=$(pick_base) || exit 1
  hash=$(sources_hash "$base") || exit 1
  current=$(docker image inspect --format '{{ index .Config.Labels "io.step-station.sim-hash" }}' \
    "$IMAGE" 2>/dev/null || true)
  if [ "$current" != "$hash" ]; then
    log "building $IMAGE from $base"
    tar -c --exclude=__pycache__ docker/simulator/Dockerfile appliance/simulator \
      | docker build -f docker/simulator/Dockerfile --build-arg "BASE_IMAGE=$base" \
          --label "io.step-station.sim-hash=$hash" -t "$IMAGE" - >"$H/build.log" 2>&1 \
      || { tail -20 "$H/build.log" >&2; die "building $IMAGE failed; see $H/build.log"; }
    # Earlier builds lose their tag; drop them unless a container still uses one.
    docker image prune -f --filter label=io.step-station.simulator=1 >/dev/null 2>&1 || true
  fi
  local repo=${IMAGE#*/} id pushed
  repo=${repo%:*}
  id=$(docker image inspect --format '{{.Id}}' "$IMAGE")
  pushed=$(curl -fsS --max-time 5 \
    -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
    "http://$REGISTRY/v2/$repo/manifests/${IMAGE##*:}" 2>/dev/null \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["config"]["digest"])' 2>/dev/null || true)
  if [ "$pushed" != "$id" ]; then
    log "pushing $IMAGE"
    docker push "$IMAGE" >"$H/push.log" 2>&1 \
      || { tail -20 "$H/push.log" >&2; die "pushing $IMAGE failed; see $H/push.log"; }
  fi
}

stop_pidfile() {
  local file=$1 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    sudo_ kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  fi
  rm -f "$file"
}

cmd_up() {
  local t0=$SECONDS
  ensure_packages
  ensure_dockerd
  ensure_registry
  ensure_image
  log "up in $((SECONDS - t0)) s: registry http://$REGISTRY, image $IMAGE"
}

cmd_down() {
  stop_pidfile "$H/registry.pid"
  stop_pidfile "$H/dockerd.pid"
  log "down"
}

cmd_purge() {
  if docker_up; then
    docker image rm -f "$IMAGE" "$LOCAL_BASE" >/dev/null 2>&1 || true
  fi
  cmd_down
  rm -rf "$H/registry" "$H/rootfs"
  log "purged images and registry data"
}

cmd_status() {
  docker_up && echo "dockerd: up" || echo "dockerd: down"
  registry_up && echo "registry: up on $REGISTRY" || echo "registry: down"
  if docker_up && image_exists "$IMAGE"; then echo "image: $IMAGE present"; else echo "image: missing"; fi
}

case "${1:-up}" in
  up) cmd_up ;;
  down) cmd_down ;;
  purge) cmd_purge ;;
  status) cmd_status ;;
  *) die "usage: scripts/harness.sh up|down|purge|status" ;;
esac
