#!/usr/bin/env bash
# Removes what installer/install.sh put in place: the service, the desktop entry, the command link
# and the virtual environment. Settings, API keys, chat history, caches and downloaded weights are
# the owner's: they go only when the owner says so (asked on a terminal, or --purge).
#
#   installer/uninstall.sh [--yes] [--purge] [--dry-run]
set -euo pipefail

APP=step-station
UNIT=step-station.service

DATA_HOME=${XDG_DATA_HOME:-$HOME/.local/share}
CONFIG_HOME=${XDG_CONFIG_HOME:-$HOME/.config}
CACHE_HOME=${XDG_CACHE_HOME:-$HOME/.cache}
APP_DATA=$DATA_HOME/$APP
VENV=$APP_DATA/venv
BIN_LINK=$HOME/.local/bin/$APP
UNIT_DIR=$CONFIG_HOME/systemd/user
UNIT_FILE=$UNIT_DIR/$UNIT
DESKTOP_FILE=$DATA_HOME/applications/$APP.desktop
ICON_FILE=$DATA_HOME/icons/hicolor/scalable/apps/$APP.svg

ASSUME=ask DRY_RUN=0

usage() {
  cat <<EOF
Usage: installer/uninstall.sh [--yes] [--purge] [--dry-run]

Stops and removes the Step Station service ($UNIT), its desktop entry and the
program ($VENV). Then, for your settings and API keys, your chat
history, the caches and the downloaded model weights, it asks before deleting each.

  --yes       do not ask: remove the program, keep settings, keys, history and weights
  --purge     do not ask: remove the program and delete settings, keys, history, caches,
              downloaded weights and the engine image too
  --dry-run   print what would be removed; remove nothing
  -h, --help  this help
EOF
}

while [ $# -gt 0 ]; do
  case $1 in
    --yes | -y) [ "$ASSUME" = purge ] || ASSUME=keep ;;
    --purge) ASSUME=purge ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) printf 'uninstall.sh: unknown option %s (see --help)\n' "$1" >&2; exit 1 ;;
  esac
  shift
done

say() { printf '%s\n' "$*"; }
have() { command -v "$1" >/dev/null 2>&1; }
act() {
  if [ "$DRY_RUN" = 1 ]; then
    printf 'would run: %s\n' "$*"
    return 0
  fi
  "$@"
}
remove() { # remove PATH...: only what exists, said aloud
  local path
  for path in "$@"; do
    if [ -e "$path" ] || [ -L "$path" ]; then
      act rm -rf -- "$path"
      [ "$DRY_RUN" = 1 ] || say "removed $path"
    fi
  done
}
# ask QUESTION -> 0 for yes. --purge says yes, --yes (and no terminal) say no.
ask() {
  local answer
  case $ASSUME in
    purge) return 0 ;;
    keep) return 1 ;;
  esac
  if [ ! -t 0 ]; then
    return 1
  fi
  read -r -p "$1 [y/N] " answer || return 1
  case $answer in [yY]*) return 0 ;; *) return 1 ;; esac
}

# --------------------------------------------------------------------- where the owner's data is

# Ask the installed appliance (it knows STEP_STATION_HOME, settings and the profiles); fall back to
# the XDG defaults when the environment is already gone.
CONFIG_DIR=$CONFIG_HOME/$APP
DATA_DIR=$APP_DATA
CACHE_DIR=$CACHE_HOME/$APP
HF_ROOT=${HF_HOME:-$CACHE_HOME/huggingface}
IMAGE=vllm/vllm-openai:stepfun37
CHECKPOINTS="stepfun-ai/Step-3.7-Flash stepfun-ai/Step-3.7-Flash-FP8 stepfun-ai/Step-3.7-Flash-NVFP4"
if [ -x "$VENV/bin/python" ]; then
  if paths=$("$VENV/bin/python" - 2>/dev/null <<'PYEOF'
from appliance import profiles
from appliance import settings as st
settings = st.load_settings().settings
print(st.config_dir())
print(st.data_dir())
print(st.cache_dir())
print(profiles.hf_cache_path(settings.engine))
print(settings.engine.image)
print(" ".join(sorted({p.checkpoint for p in profiles.PROFILES.values()})))
PYEOF
  ); then
    {
      read -r CONFIG_DIR
      read -r DATA_DIR
      read -r CACHE_DIR
      read -r HF_ROOT
      read -r IMAGE
      read -r CHECKPOINTS
    } <<<"$paths"
  fi
fi

# ------------------------------------------------------------------------------- the program

say "Step Station uninstaller$([ "$DRY_RUN" = 1 ] && echo " (dry run: nothing is removed)")"

# The model keeps running in its container after the appliance stops; free the GPU first.
if [ -x "$VENV/bin/step-station" ]; then
  say "stopping the engine if it runs (step-station stop)"
  if [ "$DRY_RUN" = 1 ]; then
    act "$VENV/bin/step-station" stop
  else
    timeout 120 "$VENV/bin/step-station" stop >/dev/null 2>&1 || true
  fi
fi

if have systemctl && systemctl --user show-environment >/dev/null 2>&1; then
  if systemctl --user cat "$UNIT" >/dev/null 2>&1; then
    act systemctl --user disable --now "$UNIT" || true
  fi
  remove "$UNIT_DIR/default.target.wants/$UNIT" "$UNIT_FILE"
  act systemctl --user daemon-reload || true
  act systemctl --user reset-failed "$UNIT" 2>/dev/null || true
else
  # No user manager in this session: undo by hand what `systemctl --user enable` did.
  remove "$UNIT_DIR/default.target.wants/$UNIT" "$UNIT_FILE"
fi

remove "$DESKTOP_FILE" "$ICON_FILE"
if have update-desktop-database && [ -d "$(dirname "$DESKTOP_FILE")" ]; then
  act update-desktop-database -q "$(dirname "$DESKTOP_FILE")" || true
fi

# Folders the installer made and nothing else uses now (rmdir leaves any that still hold files).
if [ "$DRY_RUN" = 0 ]; then
  apps=$(dirname "$DESKTOP_FILE")
  if [ -d "$apps" ] && ! ls "$apps"/*.desktop >/dev/null 2>&1; then
    rm -f "$apps/mimeinfo.cache"  # update-desktop-database's index of an empty folder
  fi
  for dir in "$UNIT_DIR/default.target.wants" "$UNIT_DIR" "$(dirname "$ICON_FILE")" \
    "$DATA_HOME/icons/hicolor/scalable" "$DATA_HOME/icons/hicolor" "$DATA_HOME/icons" "$apps"; do
    [ ! -d "$dir" ] || rmdir "$dir" 2>/dev/null || true
  done
fi

# The command link, only when it is ours (points into our environment).
if [ -L "$BIN_LINK" ] && [ "$(readlink "$BIN_LINK")" = "$VENV/bin/$APP" ]; then
  remove "$BIN_LINK"
fi
remove "$VENV" "$APP_DATA/install.log"

# ---------------------------------------------------------------------------- the owner's data

kept=()
if [ -d "$CONFIG_DIR" ]; then
  if ask "Delete your settings and API keys ($CONFIG_DIR)?"; then
    remove "$CONFIG_DIR"
  else
    kept+=("settings and keys: $CONFIG_DIR")
  fi
fi
if [ -d "$DATA_DIR" ] && [ -n "$(ls -A "$DATA_DIR" 2>/dev/null)" ]; then
  if ask "Delete your chat history and other data ($DATA_DIR)?"; then
    remove "$DATA_DIR"
  else
    kept+=("chat history and data: $DATA_DIR")
  fi
elif [ -d "$DATA_DIR" ]; then
  act rmdir "$DATA_DIR" 2>/dev/null || true
fi
# With STEP_STATION_HOME the data lives elsewhere; the folder that held the environment may be empty.
if [ "$APP_DATA" != "$DATA_DIR" ] && [ -d "$APP_DATA" ] && [ -z "$(ls -A "$APP_DATA")" ]; then
  act rmdir "$APP_DATA"
fi
if [ -d "$CACHE_DIR" ]; then
  if ask "Delete caches and logs ($CACHE_DIR)?"; then
    remove "$CACHE_DIR"
  else
    kept+=("caches: $CACHE_DIR")
  fi
fi

# Only the Step-3.7-Flash checkpoints: the Hugging Face cache may hold other people's models.
weights=()
for repo in $CHECKPOINTS; do
  dir=$HF_ROOT/hub/models--${repo//\//--}
  [ ! -d "$dir" ] || weights+=("$dir")
done
if [ ${#weights[@]} -gt 0 ]; then
  size=$(du -sch "${weights[@]}" 2>/dev/null | tail -1 | cut -f1)
  if ask "Delete the downloaded model weights (${size:-?} in ${weights[*]})?"; then
    remove "${weights[@]}"
  else
    kept+=("weights: ${weights[*]}")
  fi
fi

if have docker && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  if ask "Delete the engine image $IMAGE?"; then
    act docker image rm "$IMAGE" >/dev/null && say "removed image $IMAGE"
  else
    kept+=("engine image: $IMAGE (docker image rm $IMAGE)")
  fi
fi

if have loginctl && [ "$(loginctl show-user "$(id -un)" --property=Linger --value 2>/dev/null)" = yes ]; then
  say "note: lingering stays enabled for $(id -un) (other services may use it); to turn it off: loginctl disable-linger $(id -un)"
fi

say ""
if [ "$DRY_RUN" = 1 ]; then
  say "dry run: nothing was removed."
elif [ ${#kept[@]} -eq 0 ]; then
  say "Step Station is uninstalled; nothing of it is left."
else
  say "Step Station is uninstalled. Kept (delete by hand, or run again with --purge):"
  printf '  %s\n' "${kept[@]}"
fi
