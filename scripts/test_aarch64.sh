#!/usr/bin/env bash
# Step Station on aarch64 (the DGX Station's Grace CPU), emulated on this x86-64 machine with
# qemu-user-static: an arm64 Debian root made by debootstrap, then the slow tests that use it
# (tests/integration/test_aarch64_*.py):
#   - installer/install.sh --demo installs in the arm64 root, `step-station up --demo` answers
#     /healthz and a chat through the gateway (official openai SDK, with a key) returns text;
#   - docker/Dockerfile builds for linux/arm64 and the image starts `up --demo`;
#   - the engine pull refuses an image that has no build for the host's platform.
#
#   scripts/test_aarch64.sh [pytest args...]
#
# Runs as root (or with sudo) on Debian: installs qemu-user-static, binfmt-support and debootstrap
# when missing, mounts binfmt_misc and enables qemu-aarch64, starts the Docker harness
# (scripts/harness.sh up). The arm64 root is built once (~5 min) and kept as a tarball and an
# image keyed on its inputs under $STEP_STATION_ARM64_CACHE (default ~/.cache/step-station/
# arm64-root); pip's downloads are kept beside it, so a rerun skips both.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${STEP_STATION_ARM64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/step-station/arm64-root}
SUITE=bookworm
# python3-venv: ensurepip for install.sh's venv and the Dockerfile's; ca-certificates: the folder
# the host's CA bundle is copied into (pip reaches PyPI through a proxy only the host trusts).
INCLUDE=python3,python3-venv,ca-certificates
KEY=$(printf '%s\n' "v1 $SUITE arm64 minbase $INCLUDE" | sha256sum | cut -c1-12)
TARBALL=$CACHE/$SUITE-arm64-$KEY.tar
BASE_IMAGE=step-station/debian-python-arm64:$KEY

log() { printf '[aarch64 %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; elif have sudo; then sudo "$@"; else "$@"; fi; }

ensure_emulation() {
  local missing=()
  [ -x /usr/bin/qemu-aarch64-static ] || missing+=(qemu-user-static)
  have update-binfmts || missing+=(binfmt-support)
  have debootstrap || missing+=(debootstrap)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    mkdir -p "$CACHE"
    export DEBIAN_FRONTEND=noninteractive
    if ! sudo_ apt-get install -y -q "${missing[@]}" >"$CACHE/apt.log" 2>&1; then
      sudo_ apt-get update -q >>"$CACHE/apt.log" 2>&1 || die "apt-get update failed; see $CACHE/apt.log"
      sudo_ apt-get install -y -q "${missing[@]}" >>"$CACHE/apt.log" 2>&1 \
        || die "apt-get install ${missing[*]} failed; see $CACHE/apt.log"
    fi
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
    sudo_ mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
      || die "could not mount binfmt_misc (a container needs --privileged for this)"
  fi
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || sudo_ update-binfmts --enable qemu-aarch64 \
    || die "update-binfmts --enable qemu-aarch64 failed"
  # F (fix binary): the kernel holds the interpreter open, so chroots and containers need no copy.
  grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
    || die "qemu-aarch64 is registered without the F flag; containers cannot run arm64 programs"
}

build_root() {
  [ -s "$TARBALL" ] && return 0
  local rootfs
  mkdir -p "$CACHE"
  rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  log "building the arm64 $SUITE root with debootstrap (~5 min under emulation; log: $CACHE/debootstrap.log)"
  sudo_ debootstrap --arch=arm64 --variant=minbase --include="$INCLUDE" "$SUITE" "$rootfs" \
    >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; sudo_ rm -rf "$rootfs"; die "debootstrap failed; see $CACHE/debootstrap.log"; }
  [ "$(sudo_ chroot "$rootfs" uname -m)" = aarch64 ] || die "the new root does not run as aarch64"
  sudo_ rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  sudo_ tar -C "$rootfs" -cf "$TARBALL.part" .
  mv "$TARBALL.part" "$TARBALL"
  sudo_ rm -rf "$rootfs"
}

# The root as an arm64 image (FROM scratch + the tarball, built for linux/arm64 so its metadata
# says arm64): the tests' base and docker/Dockerfile's BASE_IMAGE. Tagged by the same key.
ensure_base_image() {
  [ "$(docker image inspect --format '{{.Architecture}}' "$BASE_IMAGE" 2>/dev/null)" = arm64 ] && return 0
  local context
  context=$(mktemp -d)
  ln "$TARBALL" "$context/rootfs.tar" 2>/dev/null || cp "$TARBALL" "$context/rootfs.tar"
  cat >"$context/Dockerfile" <<'DOCKERFILE'
FROM scratch
ADD rootfs.tar /
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
LABEL io.step-station.arm64-base="1"
CMD ["python3"]
DOCKERFILE
  log "importing the arm64 root as $BASE_IMAGE"
  DOCKER_BUILDKIT=0 docker build -q --platform linux/arm64 -t "$BASE_IMAGE" "$context" >/dev/null \
    || { rm -rf "$context"; die "docker build of $BASE_IMAGE failed"; }
  rm -rf "$context"
  [ "$(docker image inspect --format '{{.Architecture}}' "$BASE_IMAGE")" = arm64 ] \
    || die "$BASE_IMAGE is not marked arm64"
}

case ${1:-} in
  --root-only) ensure_emulation; build_root; exit 0 ;;
  -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
esac

started=$(date +%s)
ensure_emulation
build_root
scripts/harness.sh up
ensure_base_image
log "arm64 root ready ($(($(date +%s) - started)) s); running tests/integration/test_aarch64_install.py"
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
export STEP_STATION_ARM64_BASE=$BASE_IMAGE
export STEP_STATION_ARM64_PIP_CACHE=$CACHE/pip-cache
rc=0
"$PY" -m pytest -p no:randomly -s tests/integration/test_aarch64_install.py "$@" || rc=$?
log "done in $(($(date +%s) - started)) s (exit $rc)"
exit $rc
