#!/usr/bin/env bash
# Installs Step Station for this user: its own virtual environment, a systemd user service that
# starts at login, a desktop entry that opens the UI, then runs `step-station doctor`.
#
#   installer/install.sh [--demo] [--dry-run] [--wheel FILE] [--python PY] [--ui-port N]
#                        [--api-port N] [--weights-dir DIR] [--linger|--no-linger]
#                        [--no-service] [--no-desktop] [--no-start]
#
# Nothing outside the user's home changes (no sudo, no system Python packages). Run it again to
# upgrade in place: the environment is reused, settings, keys, history and weights are kept.
# installer/uninstall.sh removes it.
set -euo pipefail

APP=step-station
UNIT=step-station.service
INSTALLER_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SOURCE_DIR=$(dirname "$INSTALLER_DIR")

DATA_HOME=${XDG_DATA_HOME:-$HOME/.local/share}
CONFIG_HOME=${XDG_CONFIG_HOME:-$HOME/.config}
CACHE_HOME=${XDG_CACHE_HOME:-$HOME/.cache}
APP_DATA=$DATA_HOME/$APP
VENV=$APP_DATA/venv
LOG=$APP_DATA/install.log
BIN_LINK=$HOME/.local/bin/$APP
UNIT_DIR=$CONFIG_HOME/systemd/user
UNIT_FILE=$UNIT_DIR/$UNIT
DESKTOP_FILE=$DATA_HOME/applications/$APP.desktop
ICON_FILE=$DATA_HOME/icons/hicolor/scalable/apps/$APP.svg
SETTINGS_FILE=$CONFIG_HOME/$APP/settings.toml

# What the real engine needs: Step-3.7-Flash FP8 weights (~213 GB) and the vLLM image (~20 GB).
WEIGHTS_GB=213
IMAGE_GB=20
VENV_GB=2

DEMO=0 DRY_RUN=0 WHEEL="" PYTHON_ARG="" UI_PORT="" API_PORT="" WEIGHTS_DIR=""
LINGER=ask WANT_SERVICE=1 WANT_DESKTOP=1 WANT_START=1

usage() {
  cat <<EOF
Usage: installer/install.sh [options]

Installs Step Station into $VENV (its own virtual environment),
a systemd user service ($UNIT, starts at login) and a desktop entry that opens the UI.
Run it again to upgrade in place; settings, API keys, history and weights are kept.

  --demo            install for a machine without GPU or Docker: the service runs
                    \`step-station up --demo\` (the built-in simulator stands in for the model);
                    the checks only the real engine needs become warnings
  --dry-run         run the checks and print what would be done; change nothing
  --wheel FILE      install this wheel instead of the source checkout around this script
  --python PY       the Python (3.10 or newer) for the environment (default: newest python3.x)
  --ui-port N       serve the UI on port N (setting ui.port; default 7860)
  --api-port N      serve the OpenAI endpoint on port N (setting gateway.port; default 8000)
  --weights-dir DIR keep model weights in DIR (setting engine.hf_cache_dir)
  --linger          also start the service at boot, before login (loginctl enable-linger)
  --no-linger       do not ask about starting at boot
  --no-service      no systemd unit (run \`step-station up\` yourself)
  --no-desktop      no desktop entry
  --no-start        write the service but do not (re)start it now
  -h, --help        this help
EOF
}

# ------------------------------------------------------------------------------------- output

if [ -t 1 ]; then
  C_OK=$'\e[32m' C_WARN=$'\e[33m' C_FAIL=$'\e[31m' C_DIM=$'\e[2m' C_OFF=$'\e[0m'
else
  C_OK="" C_WARN="" C_FAIL="" C_DIM="" C_OFF=""
fi
FAILS=0 WARNS=0

say() { printf '%s\n' "$*"; }
step() { printf '\n== %s\n' "$*"; }
pass() { printf '[%sok%s  ] %-15s %s\n' "$C_OK" "$C_OFF" "$1" "$2"; }
warn() {
  WARNS=$((WARNS + 1))
  printf '[%swarn%s] %-15s %s\n' "$C_WARN" "$C_OFF" "$1" "$2"
  [ -z "${3:-}" ] || printf '       %-15s fix: %s\n' "" "$3"
}
fail() {
  FAILS=$((FAILS + 1))
  printf '[%sFAIL%s] %-15s %s\n' "$C_FAIL" "$C_OFF" "$1" "$2"
  [ -z "${3:-}" ] || printf '       %-15s fix: %s\n' "" "$3"
}
# A check only the real engine needs: a failure without --demo, a warning with it.
engine_fail() {
  if [ "$DEMO" = 1 ]; then
    warn "$1" "$2 (needed for the real engine; --demo runs without it)" "${3:-}"
  else
    fail "$1" "$2" "${3:-}"
  fi
}
die() { printf '%sinstall.sh: %s%s\n' "$C_FAIL" "$*" "$C_OFF" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

# Every change goes through act/write_file, so --dry-run can print it instead.
act() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '%swould run:%s %s\n' "$C_DIM" "$C_OFF" "$*"
    return 0
  fi
  "$@"
}
write_file() { # write_file DEST MODE < content
  local dest=$1 mode=$2 tmp
  if [ "$DRY_RUN" = 1 ]; then
    printf '%swould write:%s %s\n' "$C_DIM" "$C_OFF" "$dest"
    case $dest in
      *.service | *.desktop) sed 's/^/    | /' ;;
      *) cat >/dev/null ;;
    esac
    return 0
  fi
  mkdir -p "$(dirname "$dest")"
  tmp=$(mktemp "$dest.XXXXXX")
  cat >"$tmp"
  chmod "$mode" "$tmp"
  mv -f "$tmp" "$dest"
}

# ----------------------------------------------------------------------------------- arguments

need_value() { if [ $# -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value (see --help)"; fi; }
is_port() { [[ $1 =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le 65535 ]; }

while [ $# -gt 0 ]; do
  case $1 in
    --demo) DEMO=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --wheel) need_value "$@"; WHEEL=$2; shift ;;
    --python) need_value "$@"; PYTHON_ARG=$2; shift ;;
    --ui-port) need_value "$@"; UI_PORT=$2; shift ;;
    --api-port) need_value "$@"; API_PORT=$2; shift ;;
    --weights-dir) need_value "$@"; WEIGHTS_DIR=$2; shift ;;
    --linger) LINGER=yes ;;
    --no-linger) LINGER=no ;;
    --no-service) WANT_SERVICE=0 ;;
    --no-desktop) WANT_DESKTOP=0 ;;
    --no-start) WANT_START=0 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done
[ -z "$UI_PORT" ] || is_port "$UI_PORT" || die "--ui-port $UI_PORT is not a port (1-65535)"
[ -z "$API_PORT" ] || is_port "$API_PORT" || die "--api-port $API_PORT is not a port (1-65535)"
if [ -n "$WHEEL" ]; then
  [ -f "$WHEEL" ] || die "--wheel $WHEEL: no such file"
  WHEEL=$(cd "$(dirname "$WHEEL")" && pwd)/$(basename "$WHEEL")
fi
if [ -n "$WEIGHTS_DIR" ]; then
  case $WEIGHTS_DIR in /*) ;; *) WEIGHTS_DIR=$PWD/$WEIGHTS_DIR ;; esac
fi
[ "$(id -u)" != 0 ] || say "note: installing for root; Step Station is meant to run as the desktop user."

# -------------------------------------------------------------------------------------- checks

PY=""
SYSTEMD_USER=0

pick_python() {
  local candidate
  if [ -n "$PYTHON_ARG" ]; then
    printf '%s\n' "$PYTHON_ARG"
    return
  fi
  for candidate in python3.13 python3.12 python3.11 python3.10 python3; do
    # sys.executable: the interpreter itself, not a pyenv shim or wrapper in front of it.
    if have "$candidate" && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      "$candidate" -c 'import sys; print(sys.executable)'
      return
    fi
  done
  have python3 && command -v python3
}

check_os() {
  local os
  os=$(uname -s)
  if [ "$os" = Linux ]; then
    pass linux "$(uname -sr) $(uname -m)"
  else
    fail linux "this is $os; Step Station runs on Linux (DGX OS / Ubuntu)" \
      "run it on the DGX Station itself"
  fi
}

check_python() {
  PY=$(pick_python || true)
  if [ -z "$PY" ] || ! have "$PY"; then
    fail python "no python3 found" "sudo apt-get install python3 python3-venv"
    PY=""
    return
  fi
  local version
  version=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo "?")
  if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    fail python "$PY is Python $version; Step Station needs 3.10 or newer" \
      "sudo apt-get install python3.12 python3.12-venv (then --python python3.12)"
    PY=""
    return
  fi
  if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    fail python-venv "$PY cannot create virtual environments (no ensurepip)" \
      "sudo apt-get install python$version-venv"
    return
  fi
  pass python "$PY (Python $version, venv available)"
}

# One small Python probe asks the Docker socket directly (the appliance uses the API, not the CLI).
DOCKER_STATE="" DOCKER_DETAIL="" DOCKER_RUNTIMES="" DOCKER_CDI_DIRS="" DOCKER_ROOT=""
probe_docker() {
  local out
  out=$("${PY:-python3}" - 2>/dev/null <<'PYEOF' || true
import http.client, json, os, socket
host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
if not host.startswith("unix://"):
    print("remote\t" + host)
    raise SystemExit
path = host[len("unix://"):]
if not os.path.exists(path):
    print("missing\t" + path)
    raise SystemExit
class Conn(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
try:
    conn = Conn("localhost", timeout=10)
    conn.request("GET", "/info")
    resp = conn.getresponse()
    info = json.loads(resp.read() or b"{}")
except PermissionError:
    print("denied\t" + path)
except OSError as err:
    print("down\t%s (%s)" % (path, err.strerror or err))
else:
    if resp.status != 200:
        print("down\t%s answered HTTP %d" % (path, resp.status))
    else:
        print("ok\t" + str(info.get("ServerVersion", "?")))
        print("runtimes\t" + " ".join(sorted(info.get("Runtimes") or {})))
        print("cdi\t" + " ".join(info.get("CDISpecDirs") or []))
        print("root\t" + str(info.get("DockerRootDir", "")))
PYEOF
  )
  DOCKER_STATE=$(printf '%s\n' "$out" | head -1 | cut -f1)
  DOCKER_DETAIL=$(printf '%s\n' "$out" | head -1 | cut -f2-)
  DOCKER_RUNTIMES=$(printf '%s\n' "$out" | sed -n 's/^runtimes\t//p')
  DOCKER_CDI_DIRS=$(printf '%s\n' "$out" | sed -n 's/^cdi\t//p')
  DOCKER_ROOT=$(printf '%s\n' "$out" | sed -n 's/^root\t//p')
}

check_docker() {
  probe_docker
  case $DOCKER_STATE in
    ok) pass docker "Docker $DOCKER_DETAIL reachable by $(id -un)" ;;
    remote) pass docker "DOCKER_HOST=$DOCKER_DETAIL (not checked from here)" ;;
    denied)
      engine_fail docker "$DOCKER_DETAIL exists but $(id -un) may not use it" \
        "sudo usermod -aG docker $(id -un)   (then log out and back in)" ;;
    missing)
      if have dockerd || have docker; then
        engine_fail docker "Docker is installed but not running (no $DOCKER_DETAIL)" \
          "sudo systemctl enable --now docker"
      else
        engine_fail docker "Docker is not installed" \
          "sudo apt-get install docker.io && sudo systemctl enable --now docker"
      fi ;;
    down) engine_fail docker "Docker does not answer: $DOCKER_DETAIL" "sudo systemctl restart docker" ;;
    *) engine_fail docker "could not ask Docker (no Python to probe it)" "docker info" ;;
  esac
}

check_nvidia_runtime() {
  local toolkit_fix dir spec found=""
  if have nvidia-ctk; then
    toolkit_fix="sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker"
  else
    toolkit_fix="sudo apt-get install nvidia-container-toolkit && sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker"
  fi
  case " $DOCKER_RUNTIMES " in
    *" nvidia "*) pass nvidia-runtime "Docker has the NVIDIA runtime registered"; return ;;
  esac
  for dir in /etc/cdi /var/run/cdi $DOCKER_CDI_DIRS; do
    for spec in "$dir"/*.yaml "$dir"/*.yml "$dir"/*.json; do
      [ -f "$spec" ] && grep -q 'nvidia.com' "$spec" 2>/dev/null && found=$spec && break 2
    done
  done
  if [ -n "$found" ]; then
    pass nvidia-runtime "CDI spec for NVIDIA GPUs: $found"
  elif have nvidia-container-runtime-hook; then
    pass nvidia-runtime "NVIDIA Container Toolkit hook: $(command -v nvidia-container-runtime-hook)"
  else
    engine_fail nvidia-runtime "no NVIDIA container runtime or CDI spec: Docker cannot give the engine the GPU" \
      "$toolkit_fix"
  fi
}

check_gpu() {
  local out
  out=$("${PY:-python3}" - 2>&1 <<'PYEOF' || true
import ctypes
try:
    nvml = ctypes.CDLL("libnvidia-ml.so.1")
except OSError as err:
    print("nolib\t%s" % err)
    raise SystemExit
if nvml.nvmlInit_v2() != 0:
    print("noinit\tnvmlInit failed (driver not loaded?)")
    raise SystemExit
count = ctypes.c_uint(0)
nvml.nvmlDeviceGetCount_v2(ctypes.byref(count))
names = []
for i in range(count.value):
    handle = ctypes.c_void_p()
    name = ctypes.create_string_buffer(96)
    if nvml.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(handle)) == 0:
        nvml.nvmlDeviceGetName(handle, name, 96)
        names.append(name.value.decode(errors="replace"))
nvml.nvmlShutdown()
print("ok\t%d\t%s" % (count.value, ", ".join(names)))
PYEOF
  )
  case $out in
    ok*)
      local count names
      count=$(printf '%s' "$out" | cut -f2)
      names=$(printf '%s' "$out" | cut -f3)
      if [ "$count" -gt 0 ]; then
        pass gpu "NVML sees $count GPU(s): $names"
      else
        engine_fail gpu "NVML works but sees no GPU" "nvidia-smi"
      fi ;;
    nolib*)
      engine_fail gpu "no NVIDIA driver (libnvidia-ml.so.1 not found)" \
        "sudo ubuntu-drivers install && sudo reboot   (then: nvidia-smi)" ;;
    *)
      engine_fail gpu "NVML did not start: $(printf '%s' "$out" | cut -f2 | head -1)" \
        "nvidia-smi   (reinstall or reload the driver: sudo ubuntu-drivers install && sudo reboot)" ;;
  esac
}

# Free GB on the file system holding PATH (or its nearest existing parent).
free_gb() {
  local probe=$1
  while [ ! -e "$probe" ] && [ "$probe" != / ]; do probe=$(dirname "$probe"); done
  df -Pk "$probe" 2>/dev/null | awk 'NR == 2 { printf "%d", $4 / 1048576 }'
}

# A value from settings.toml ("section", "key"); empty when unset.
setting() {
  [ -f "$SETTINGS_FILE" ] && [ -n "$PY" ] || return 0
  "$PY" - "$SETTINGS_FILE" "$1" "$2" 2>/dev/null <<'PYEOF' || true
import sys
try:
    import tomllib
except ImportError:
    raise SystemExit
with open(sys.argv[1], "rb") as fh:
    value = tomllib.load(fh).get(sys.argv[2], {}).get(sys.argv[3], "")
print(value)
PYEOF
}

weights_dir() {
  local configured
  if [ -n "$WEIGHTS_DIR" ]; then printf '%s\n' "$WEIGHTS_DIR"; return; fi
  configured=$(setting engine hf_cache_dir)
  if [ -n "$configured" ]; then printf '%s\n' "${configured/#\~/$HOME}"; return; fi
  printf '%s\n' "${HF_HOME:-$CACHE_HOME/huggingface}"
}

check_disk() {
  local free weights free_w need
  free=$(free_gb "$APP_DATA")
  if [ -z "$free" ]; then
    warn disk "could not read free space at $APP_DATA"
  elif [ "$free" -lt "$VENV_GB" ]; then
    fail disk "${free} GB free at $APP_DATA; the program needs about $VENV_GB GB" \
      "free some space there, or set XDG_DATA_HOME to a folder on a larger disk"
  else
    pass disk "${free} GB free at $APP_DATA for the program (~$VENV_GB GB)"
  fi
  weights=$(weights_dir)
  free_w=$(free_gb "$weights")
  need=$WEIGHTS_GB
  # The image goes to Docker's root dir; count it here when that is the same file system.
  if [ -z "$DOCKER_ROOT" ] || [ "$(free_gb "$DOCKER_ROOT")" = "$free_w" ]; then
    need=$((WEIGHTS_GB + IMAGE_GB))
  fi
  if [ -z "$free_w" ]; then
    warn disk-weights "could not read free space at $weights"
  elif [ "$free_w" -lt "$need" ]; then
    engine_fail disk-weights "${free_w} GB free at $weights; the FP8 weights and image need ~$need GB (less if already downloaded)" \
      "installer/install.sh --weights-dir /path/on/a/disk/with/${need}GB/free"
  else
    pass disk-weights "${free_w} GB free at $weights for weights and image (~$need GB)"
  fi
}

service_active() {
  [ "$SYSTEMD_USER" = 1 ] && systemctl --user is-active --quiet "$UNIT" 2>/dev/null
}

port_problem() { # port_problem PORT -> "" when 127.0.0.1:PORT can be bound
  "${PY:-python3}" - "$1" 2>/dev/null <<'PYEOF' || echo "could not be checked"
import errno, socket, sys
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    sock.bind(("127.0.0.1", int(sys.argv[1])))
except OSError as err:
    print("in use" if err.errno == errno.EADDRINUSE else (err.strerror or str(err)))
PYEOF
}

check_ports() {
  local ui api engine label key port flag problem
  ui=${UI_PORT:-$(setting ui port)}
  api=${API_PORT:-$(setting gateway port)}
  engine=$(setting engine port)
  for entry in "ui ui.port ${ui:-7860} --ui-port" "gateway gateway.port ${api:-8000} --api-port"; do
    read -r label key port flag <<<"$entry"
    problem=$(port_problem "$port")
    if [ -z "$problem" ]; then
      pass "port-$label" "127.0.0.1:$port is free ($key)"
    elif service_active; then
      pass "port-$label" "127.0.0.1:$port is held by the running $UNIT, which this install restarts"
    else
      fail "port-$label" "127.0.0.1:$port ($key) is $problem" \
        "ss -ltnp 'sport = :$port' shows who holds it; or install with $flag $((port + 10))"
    fi
  done
  # A running engine container holds its port on purpose; the appliance adopts it.
  port=${engine:-8001}
  problem=$(port_problem "$port")
  if [ -z "$problem" ]; then
    pass port-engine "127.0.0.1:$port is free (engine.port)"
  else
    warn port-engine "127.0.0.1:$port (engine.port) is $problem (expected while the Step Station engine runs)" \
      "ss -ltnp 'sport = :$port' shows who holds it; after installing: step-station config set engine.port $((port + 10))"
  fi
}

check_systemd() {
  if [ "$WANT_SERVICE" = 0 ]; then
    pass systemd "not used (--no-service)"
  elif ! have systemctl; then
    warn systemd "no systemctl: the service file is written but nothing will start it" \
      "run \`step-station up\` yourself"
  elif systemctl --user show-environment >/dev/null 2>&1; then
    SYSTEMD_USER=1
    pass systemd "user service manager reachable"
  else
    warn systemd "no user service manager in this session (no login session or bus): the service is enabled for the next login but not started now" \
      "log in on the desktop, or: sudo loginctl enable-linger $(id -un)"
  fi
}

check_source() {
  if [ -n "$WHEEL" ]; then
    pass source "wheel $WHEEL"
  elif [ -f "$SOURCE_DIR/pyproject.toml" ] && grep -q '^name = "step-station"' "$SOURCE_DIR/pyproject.toml"; then
    pass source "checkout $SOURCE_DIR"
  else
    fail source "$SOURCE_DIR is not a Step Station checkout" \
      "run installer/install.sh from the checkout, or pass --wheel step_station-*.whl"
  fi
}

# ------------------------------------------------------------------------------------- actions

render() { # render TEMPLATE KEY VALUE [KEY VALUE...] -> stdout
  local text key value
  text=$(cat "$1")
  shift
  while [ $# -ge 2 ]; do
    key=$1 value=$2
    text=${text//"@$key@"/"$value"}
    shift 2
  done
  printf '%s\n' "$text"
}

# The ExecStart path, quoted for systemd when it holds spaces; % is systemd's specifier sign.
systemd_path() {
  local path=${1//%/%%}
  case $path in *[[:space:]]*) printf '"%s"' "$path" ;; *) printf '%s' "$path" ;; esac
}

create_venv() {
  if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    say "reusing $VENV (upgrade in place)"
    return
  fi
  if [ -e "$VENV" ]; then
    say "$VENV is broken (its Python is gone); recreating it"
    act rm -rf "$VENV"
  fi
  act mkdir -p "$APP_DATA"
  act "$PY" -m venv "$VENV"
}

pip_install() {
  local target build_dir=""
  if [ -n "$WHEEL" ]; then
    target=$WHEEL
  else
    # Build from a copy: the checkout may be read-only and stays free of build/ and egg-info.
    if [ "$DRY_RUN" = 1 ]; then
      target="<copy of $SOURCE_DIR>"
    else
      build_dir=$(mktemp -d)
      # shellcheck disable=SC2064  # expand now: build_dir is local
      trap "rm -rf '$build_dir'" EXIT
      local parts=(pyproject.toml README.md appliance ui) extra
      for extra in LICENSE LICENSE.txt LICENSE.md NOTICE; do
        [ ! -f "$SOURCE_DIR/$extra" ] || parts+=("$extra")
      done
      (cd "$SOURCE_DIR" && tar -c --exclude=__pycache__ --exclude='*.pyc' "${parts[@]}") \
        | tar -x -C "$build_dir"
      target=$build_dir
    fi
  fi
  say "installing Step Station and its dependencies (a minute or two the first time; log: $LOG)"
  if [ "$DRY_RUN" = 1 ]; then
    act "$VENV/bin/python" -m pip install --upgrade "$target"
    return
  fi
  mkdir -p "$(dirname "$LOG")"
  # --upgrade reinstalls the package itself every run; dependencies move only when they must.
  # --prefer-binary: an older release with a wheel for this machine beats a newer one to compile.
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade --prefer-binary \
    --upgrade-strategy only-if-needed "$target" >"$LOG" 2>&1; then
    tail -25 "$LOG" >&2
    explain_pip_failure
    die "pip install failed; the full log is $LOG"
  fi
  local built
  built=$(built_from_source)
  if [ -n "$built" ]; then
    say "note: built from source, no wheel for $(wheel_platform): $built"
  fi
  say "installed $("$VENV/bin/step-station" --version)"
}

# "linux-aarch64, Python 3.11": the platform pip looked for wheels for.
wheel_platform() {
  "$VENV/bin/python" -c 'import sys, sysconfig; print("%s, Python %d.%d" % ((sysconfig.get_platform(),) + sys.version_info[:2]))' 2>/dev/null \
    || uname -m
}

# The dependencies pip had to build (no wheel for this machine on the index); never Step Station
# itself, which always installs from its sources.
built_from_source() {
  sed -n 's/^ *Building wheel for \([A-Za-z0-9._-]*\) .*/\1/p' "$LOG" 2>/dev/null \
    | { grep -vix 'step[-_.]station' || true; } | sort -u | tr '\n' ' ' | sed 's/ $//'
}

# Which package broke the install and why, in words: on aarch64 (the DGX Station's Grace CPU) the
# usual cause is a dependency with no aarch64 wheel whose source build needs tools that are absent.
explain_pip_failure() {
  local platform failed missing why fix
  platform=$(wheel_platform)
  failed=$(sed -n -e 's/^ *ERROR: Failed building wheel for \([A-Za-z0-9._-]*\).*/\1/p' \
    -e 's/^Failed to build \(.*\)$/\1/p' "$LOG" | tr ' ' '\n' | { grep -v '^$' || true; } | sort -u | tr '\n' ' ' | sed 's/ $//')
  missing=$(sed -n 's/.*No matching distribution found for \([A-Za-z0-9._-]*\).*/\1/p' "$LOG" | sort -u | tr '\n' ' ' | sed 's/ $//')
  if [ -n "$missing" ]; then
    fail wheels "no release of $missing can be installed on $platform (the package index has no wheel for it and no source)" \
      "check the index is reachable (pip's proxy/certificate settings), or install a Python that $missing supports"
  fi
  [ -n "$failed" ] || return 0
  if grep -qiE "(cargo|rustc).*(not found|No such file)|can't find Rust compiler|Rust compiler" "$LOG"; then
    why="its source build needs a Rust toolchain, and there is none"
    fix="sudo apt-get install cargo rustc build-essential python3-dev, then run this installer again"
  elif grep -qiE "(gcc|cc|g\+\+|c\+\+)'? failed|command '[^']*gcc' failed|unable to execute '[^']*gcc'|gcc: (not found|No such file)|No such file or directory: '[^']*gcc'|error: command .*(gcc|cc).* failed" "$LOG"; then
    why="its source build needs a C compiler, and there is none"
    fix="sudo apt-get install build-essential python3-dev, then run this installer again"
  elif grep -qiE "Python\.h: No such file" "$LOG"; then
    why="its source build needs Python's headers, and they are not installed"
    fix="sudo apt-get install python3-dev, then run this installer again"
  else
    why="its source build failed (see the log)"
    fix="the lines above say what the build lacked; install it and run this installer again"
  fi
  fail wheels "no wheel of $failed for $platform on the package index, so pip built it from source: $why" "$fix"
}

apply_settings() {
  local cli=$VENV/bin/step-station
  [ -z "$UI_PORT" ] || act "$cli" config set ui.port "$UI_PORT"
  [ -z "$API_PORT" ] || act "$cli" config set gateway.port "$API_PORT"
  [ -z "$WEIGHTS_DIR" ] || act "$cli" config set engine.hf_cache_dir "$WEIGHTS_DIR"
  return 0
}

link_command() {
  act mkdir -p "$(dirname "$BIN_LINK")"
  act ln -sfn "$VENV/bin/step-station" "$BIN_LINK"
  case ":$PATH:" in
    *":$(dirname "$BIN_LINK"):"*) ;;
    *) say "note: $(dirname "$BIN_LINK") is not on your PATH; add it, or call $BIN_LINK" ;;
  esac
}

ui_url() {
  local port
  port=${UI_PORT:-$(setting ui port)}
  printf 'http://127.0.0.1:%s\n' "${port:-7860}"
}

write_unit() {
  local exec_start
  exec_start="$(systemd_path "$VENV/bin/step-station") up --no-browser"
  [ "$DEMO" = 0 ] || exec_start="$exec_start --demo"
  render "$INSTALLER_DIR/step-station.service.in" EXEC_START "$exec_start" | write_file "$UNIT_FILE" 644
  say "service: $UNIT_FILE (ExecStart=$exec_start)"
  if [ "$SYSTEMD_USER" = 1 ]; then
    act systemctl --user daemon-reload
    act systemctl --user enable "$UNIT"
  else
    # What `systemctl --user enable` does, for when no user manager runs in this session.
    act mkdir -p "$UNIT_DIR/default.target.wants"
    act ln -sfn "$UNIT_FILE" "$UNIT_DIR/default.target.wants/$UNIT"
  fi
}

write_desktop_entry() {
  # `step-station open` carries the UI's per-install secret (the UI on loopback asks for it).
  local port exec_line
  port=${UI_PORT:-$(setting ui port)}
  exec_line="\"$VENV/bin/step-station\" open --port ${port:-7860}"
  render "$INSTALLER_DIR/step-station.desktop.in" EXEC "$exec_line" | write_file "$DESKTOP_FILE" 644
  write_file "$ICON_FILE" 644 <"$INSTALLER_DIR/step-station.svg"
  say "desktop entry: $DESKTOP_FILE (opens $(ui_url) with \`step-station open\`)"
  if have update-desktop-database; then
    act update-desktop-database -q "$(dirname "$DESKTOP_FILE")" || true
  fi
  if have gtk-update-icon-cache && [ -f "$DATA_HOME/icons/hicolor/index.theme" ]; then
    act gtk-update-icon-cache -q "$DATA_HOME/icons/hicolor" || true
  fi
}

offer_linger() {
  local user answer state
  user=$(id -un)
  have loginctl || return 0
  state=$(loginctl show-user "$user" --property=Linger --value 2>/dev/null || true)
  if [ "$state" = yes ]; then
    say "start at boot: on (lingering is enabled for $user)"
    return
  fi
  case $LINGER in
    no) return ;;
    ask)
      if [ -t 0 ] && [ "$DRY_RUN" = 0 ]; then
        read -r -p "Start Step Station at boot, before anyone logs in (loginctl enable-linger $user)? [y/N] " answer || answer=""
        case $answer in [yY]*) ;; *) say "start at boot: off; later: loginctl enable-linger $user"; return ;; esac
      else
        say "start at boot: off (it starts at login); for boot: loginctl enable-linger $user"
        return
      fi ;;
  esac
  act loginctl enable-linger "$user" \
    || say "could not enable lingering; try: sudo loginctl enable-linger $user"
}

run_doctor() {
  step "step-station doctor"
  [ "$DEMO" = 0 ] || say "(what the real engine still needs; the --demo service runs without it)"
  if [ "$DRY_RUN" = 1 ]; then
    act "$VENV/bin/step-station" doctor
    return
  fi
  if ! "$VENV/bin/step-station" doctor; then
    DOCTOR_FAILED=1
  fi
}

wait_healthy() {
  local url=$1
  "$VENV/bin/python" - "$url/healthz" <<'PYEOF'
import sys, time, urllib.request
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=2) as resp:
            if resp.status == 200:
                raise SystemExit(0)
    except OSError:
        pass
    time.sleep(1)
raise SystemExit(1)
PYEOF
}

start_service() {
  local url
  url=$(ui_url)
  if [ "$WANT_SERVICE" = 0 ]; then
    say "start it with: step-station up$([ "$DEMO" = 1 ] && echo " --demo")"
    return
  fi
  if [ "$SYSTEMD_USER" = 0 ]; then
    say "the service starts at your next login; now: step-station up$([ "$DEMO" = 1 ] && echo " --demo")"
    return
  fi
  if [ "$WANT_START" = 0 ]; then
    say "not started (--no-start); start with: systemctl --user start $UNIT"
    return
  fi
  act systemctl --user restart "$UNIT"
  [ "$DRY_RUN" = 0 ] || return 0
  say "waiting for $url/healthz"
  if wait_healthy "$url"; then
    say "service is up"
  else
    warn service "$UNIT did not answer at $url/healthz within 120 s" \
      "journalctl --user -u $UNIT -n 50"
  fi
}

# ----------------------------------------------------------------------------------------- main

DOCTOR_FAILED=0
say "Step Station installer$([ "$DEMO" = 1 ] && echo " (demo)")$([ "$DRY_RUN" = 1 ] && echo " — dry run: nothing is changed")"
step "checks"
check_os
check_python
check_source
check_systemd
check_docker
check_nvidia_runtime
check_gpu
check_disk
check_ports
if [ "$FAILS" -gt 0 ]; then
  say ""
  say "$FAILS check(s) failed: run the fix shown under each, then this installer again."
  if [ "$DEMO" = 0 ]; then
    say "To try Step Station now without a GPU or Docker: $0 --demo"
  fi
  exit 1
fi

step "install"
create_venv
pip_install
apply_settings
link_command
if [ "$WANT_SERVICE" = 1 ]; then
  # Stop the old version before doctor checks the ports; it comes back below.
  if service_active; then act systemctl --user stop "$UNIT"; fi
  write_unit
fi
[ "$WANT_DESKTOP" = 0 ] || write_desktop_entry
run_doctor
if [ "$WANT_SERVICE" = 1 ]; then
  step "service"
  start_service
  offer_linger
fi

step "done"
if [ "$DRY_RUN" = 1 ]; then
  say "dry run: nothing was changed. Without --dry-run this installs into $VENV."
  exit 0
fi
say "Step Station is installed: open $(ui_url)"
say "  command:   $BIN_LINK (step-station --help)"
[ "$WANT_SERVICE" = 0 ] || say "  service:   systemctl --user status $UNIT; logs: journalctl --user -u $UNIT -f"
say "  settings:  step-station config path; uninstall: $INSTALLER_DIR/uninstall.sh"
if [ "$DOCTOR_FAILED" = 1 ] && [ "$DEMO" = 0 ]; then
  say "doctor found something that would stop the model from starting: see its fix lines above."
fi
