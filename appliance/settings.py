"""Typed settings stored as TOML under platformdirs' config dir.

`STEP_STATION_HOME` moves every file (settings, secrets, data, caches) under one folder; tests set
it to a temporary directory. Writes are atomic (temp file + fsync + rename). Everything the
appliance keeps is private to its user (folders 0700, files 0600, whatever the umask: see
`private_dir`, `write_private` and `private_runtime`); secrets are never printed. A corrupt
settings file is moved aside to a timestamped backup and defaults are used; the caller gets a
warning naming the file and the reason.

Settings are immutable snapshots (frozen dataclasses). A running service holds one
`SettingsStore`: `update({"section.field": value})` validates, saves and swaps in a new snapshot,
then tells its subscribers (the supervisor, the gateway, ...). Nobody changes a snapshot in place,
so a reader never sees half of an update; `with_changes` makes a validated copy without saving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import platformdirs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the Station runs 3.12
    import tomli as tomllib

from appliance.errors import SettingsError

APP_NAME = "step-station"

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- paths


def config_dir() -> Path:
    """Folder holding settings.toml and secrets.toml."""
    home = os.environ.get("STEP_STATION_HOME")
    if home:
        return Path(home) / "config"
    return Path(platformdirs.user_config_dir(APP_NAME))


def data_dir() -> Path:
    """Folder holding history, keys and other state the appliance owns."""
    home = os.environ.get("STEP_STATION_HOME")
    if home:
        return Path(home) / "data"
    return Path(platformdirs.user_data_dir(APP_NAME))


def cache_dir() -> Path:
    """Folder for caches the appliance may lose without harm (compile caches, logs)."""
    home = os.environ.get("STEP_STATION_HOME")
    if home:
        return Path(home) / "cache"
    return Path(platformdirs.user_cache_dir(APP_NAME))


def gradio_temp_dir() -> Path:
    """Gradio's temporary folder (uploads, its file cache): private, never the shared /tmp/gradio.

    Gradio reads GRADIO_TEMP_DIR at import (gradio/route_utils.py DEFAULT_TEMP_DIR) and when the
    UI is built (gradio/utils.py get_upload_folder, each Block's GRADIO_CACHE), so
    `private_runtime` sets it before the UI is imported."""
    return cache_dir() / "gradio"


def settings_path() -> Path:
    return config_dir() / "settings.toml"


def secrets_path() -> Path:
    return config_dir() / "secrets.toml"


# ------------------------------------------------------------------------------------ sections


@dataclass(frozen=True)
class EngineSettings:
    """How the engine is launched. Changing any of these while it runs asks for a restart."""

    profile: str = "auto"  # a profile name from appliance.profiles, or "auto" (the planner picks)
    runtime: str = "docker"  # "docker" or "process" (pip-installed vllm, or the simulator)
    image: str = "vllm/vllm-openai:stepfun37"
    container_name: str = "step-station-engine"
    # "socket": vLLM serves on a Unix socket only the appliance's user can open (the default);
    # "tcp": on host:port, where any local account can reach its routes outside /v1 (see
    # appliance/endpoint.py and docs/security.md)
    listen: str = "socket"
    host: str = "127.0.0.1"  # with listen = "tcp": loopback only; the gateway faces the LAN
    port: int = 8001  # with listen = "tcp"
    gpu_uuid: str = ""  # empty: the planner picks the largest / Blackwell GPU
    request_gpu: bool = True  # tests on machines without the NVIDIA runtime turn this off
    gpu_memory_utilization: float = 0.0  # 0: the profile's value
    max_model_len: int = 0  # 0: the model's own (256K)
    max_images_per_prompt: int = 8
    mtp: bool = False  # MTP-3 speculative decoding, where the profile allows it
    sleep_mode: bool = False
    idle_sleep_minutes: float = 0.0  # 0: never sleep on idle; fractions allowed (0.5: 30 s)
    hf_cache_dir: str = ""  # empty: ~/.cache/huggingface
    model_override: str = ""  # a local path or repo id used instead of the profile's checkpoint
    start_timeout_s: int = 3600
    stop_timeout_s: int = 60


@dataclass(frozen=True)
class UISettings:
    host: str = "127.0.0.1"
    port: int = 7860
    lan: bool = False  # UI on the LAN needs an owner login
    tls_cert: str = ""  # PEM certificate for HTTPS on the UI (with tls_key); empty: plain HTTP
    tls_key: str = ""
    # Comma-separated extra names / origins the UI answers to (a reverse proxy's); see web_guard
    allowed_hosts: str = ""
    allowed_origins: str = ""


@dataclass(frozen=True)
class GatewaySettings:
    port: int = 8000
    share_lan: bool = False
    interface: str = ""  # empty: every interface when shared
    require_key_on_loopback: bool = False
    max_body_mb: int = 64
    per_key_concurrency: int = 32
    per_key_requests_per_minute: int = 600
    max_connections_per_address: int = 64  # open sockets one client address may hold
    header_timeout_s: float = 10.0  # a connection whose request head is slower is closed
    start_on_request: bool = False
    # Comma-separated extra names / origins the API answers to (a reverse proxy, a web client)
    allowed_hosts: str = ""
    allowed_origins: str = ""


@dataclass(frozen=True)
class ChatSettings:
    reasoning_level: str = "medium"
    max_image_mb: int = 20
    stream_interval_ms: int = 50
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 0  # 0: let the engine decide
    system_prompt: str = ""


@dataclass(frozen=True)
class SamplerSettings:
    interval_s: float = 1.0
    history_s: int = 900


@dataclass(frozen=True)
class FleetSettings:
    """Other Stations this one fronts through vLLM's router (appliance/fleet, docs/fleet.md)."""

    members: str = ""  # "name=http://host:port,name2=..." (each a member Station's gateway)
    policy: str = "cache_aware"  # vllm-router's --policy
    router_port: int = 0  # the router's loopback port; 0: a free one at each start


@dataclass(frozen=True)
class Settings:
    engine: EngineSettings = field(default_factory=EngineSettings)
    ui: UISettings = field(default_factory=UISettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    chat: ChatSettings = field(default_factory=ChatSettings)
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    fleet: FleetSettings = field(default_factory=FleetSettings)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def get(self, key: str) -> Any:  # noqa: ANN401 - a setting is any of the TOML scalar types
        """Value of a dotted key such as `engine.port`."""
        section, name = _split_key(key)
        return getattr(getattr(self, section), name)


@dataclass
class Secrets:
    """Secrets: never logged, stored 0600."""

    hf_token: str = ""
    ui_login_hash: str = ""  # hashed owner login for "UI on LAN"


@dataclass
class LoadResult:
    settings: Settings
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------- helpers


def _split_key(key: str) -> tuple[str, str]:
    parts = key.split(".")
    sections = {f.name for f in fields(Settings)}
    if len(parts) != 2 or parts[0] not in sections:
        raise SettingsError(
            f"Unknown setting {key!r}.",
            hint=f"Settings are SECTION.NAME with SECTION one of {', '.join(sorted(sections))}; "
            "`step-station config show` lists them all.",
        )
    section_obj = getattr(Settings(), parts[0])
    if parts[1] not in {f.name for f in fields(section_obj)}:
        raise SettingsError(
            f"Unknown setting {key!r}.",
            hint="`step-station config show` lists every setting.",
        )
    return parts[0], parts[1]


def _field_type(section_obj: object, name: str) -> type:
    default = getattr(type(section_obj)(), name)
    return type(default)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(key: str, value: Any, typ: type) -> Any:  # noqa: ANN401
    if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            if typ is bool:
                if text.lower() in _TRUE:
                    return True
                if text.lower() in _FALSE:
                    return False
            elif typ is int:
                return int(text)
            elif typ is float:
                return float(text)
            elif typ is str:
                return value
        except ValueError:
            pass
    raise SettingsError(
        f"Setting {key!r} must be of type {typ.__name__}, got {value!r}.",
        hint=f"Set it with `step-station config set {key} VALUE` using a {typ.__name__}.",
    )


def with_changes(settings: Settings, changes: Mapping[str, Any]) -> Settings:
    """A copy of `settings` with `{"section.field": value}` changes, each value converted to the
    field's type as `config set` does (strings too). Raises SettingsError naming the first bad
    key; `settings` itself never changes. No I/O."""
    by_section: dict[str, dict[str, Any]] = {}
    for key, value in changes.items():
        section, name = _split_key(key)
        target = getattr(settings, section)
        by_section.setdefault(section, {})[name] = _coerce(key, value, _field_type(target, name))
    if not by_section:
        return settings
    sections = {
        section: dataclasses.replace(getattr(settings, section), **values)
        for section, values in by_section.items()
    }
    return dataclasses.replace(settings, **sections)


def from_dict(data: Mapping[str, Any]) -> Settings:
    """Settings from `Settings.to_dict()`'s shape (or a settings file's tables), validated."""
    return _from_mapping(dict(data))


def _from_mapping(data: dict[str, Any]) -> Settings:
    changes: dict[str, Any] = {}
    for section, values in data.items():
        if section not in {f.name for f in fields(Settings)}:
            raise SettingsError(f"Unknown settings section [{section}].")
        if not isinstance(values, dict):
            raise SettingsError(f"Settings section [{section}] must be a table.")
        changes.update({f"{section}.{name}": value for name, value in values.items()})
    return with_changes(Settings(), changes)


# ------------------------------------------------------------------------- private files

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
PRIVATE_UMASK = 0o077
# Under the cache: big trees a container may have written (model weights, compile caches).
# Their top folder is made private; their contents are not walked at every start.
# Not walked at the top of a tree: big trees of weights and compile caches, and the installer's
# virtual environment (data_dir()/venv, thousands of files, its programs must stay executable).
# engine-sockets: the socket folders are setgid on purpose (appliance/endpoint.py).
_NOT_WALKED = ("huggingface", "compile", "venv", "engine-sockets")


def _tighten(path: Path, mode: int) -> None:
    """chmod a folder or regular file of ours that allows more than `mode`; never follows a
    symlink and leaves files of other users (e.g. root-owned ones a container wrote) alone."""
    with contextlib.suppress(OSError):
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid():
            return
        if stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode):
            if stat.S_IMODE(info.st_mode) & ~mode:
                os.chmod(path, stat.S_IMODE(info.st_mode) & mode)


def private_dir(path: Path) -> Path:
    """Create `path` and any missing parents as 0700 folders (whatever the umask); an existing
    `path` of ours is tightened to 0700. Parents that already existed are left as they are."""
    missing: list[Path] = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=PRIVATE_DIR_MODE)
        _tighten(folder, PRIVATE_DIR_MODE)
    _tighten(path, PRIVATE_DIR_MODE)
    return path


def write_private(path: Path, data: str | bytes) -> Path:
    """Write a file only its owner can read (0600), atomically, in a private folder."""
    _atomic_write(path, data, mode=PRIVATE_FILE_MODE)
    return path


def create_private_file(path: Path) -> Path:
    """Make sure `path` exists as a 0600 file (created empty if missing; tightened if ours)."""
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE_FILE_MODE)
    os.close(fd)
    _tighten(path, PRIVATE_FILE_MODE)
    return path


def tighten_file(path: Path) -> None:
    """A file of ours that exists is made 0600 (nothing happens to a missing one)."""
    _tighten(path, PRIVATE_FILE_MODE)


def secure_tree(root: Path) -> None:
    """Tighten every folder (0700) and regular file (0600) of ours under `root`, for homes made
    by an older version or another tool. Symlinks are not followed."""
    if not root.is_dir() or root.is_symlink():
        return
    _tighten(root, PRIVATE_DIR_MODE)
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        if here == root:
            dirs[:] = [d for d in dirs if d not in _NOT_WALKED]
        for name in dirs:
            _tighten(here / name, PRIVATE_DIR_MODE)
        for name in files:
            # group and other bits go; the owner's own bits stay (a program stays runnable)
            _tighten(here / name, PRIVATE_DIR_MODE)


def clear_folder(folder: Path) -> None:
    """Delete what is inside `folder` (not the folder): stale uploads from an earlier run."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for entry in folder.iterdir():
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink()


def private_runtime() -> Path:
    """Make a serving process's files private before it writes any: umask 077, the config /
    data / cache folders 0700 with their files 0600, and Gradio's temporary folder private,
    emptied of an earlier run's uploads and named in GRADIO_TEMP_DIR (set before gradio is
    imported). Returns Gradio's folder."""
    os.umask(PRIVATE_UMASK)
    for folder in (config_dir(), data_dir(), cache_dir()):
        private_dir(folder)
        secure_tree(folder)
    temp = private_dir(gradio_temp_dir())
    clear_folder(temp)
    os.environ["GRADIO_TEMP_DIR"] = str(temp)
    return temp


def _atomic_write(path: Path, text: str | bytes, mode: int = PRIVATE_FILE_MODE) -> None:
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8") if isinstance(text, str) else text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _toml_value(value: Any) -> str:  # noqa: ANN401
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def dumps(data: dict[str, dict[str, Any]]) -> str:
    """TOML text for a two-level mapping of scalars (all our files are that shape)."""
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines.extend(f"{name} = {_toml_value(value)}" for name, value in values.items())
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- public API


def load_settings(path: Path | None = None) -> LoadResult:
    """Read settings; a missing file gives defaults, a corrupt one is backed up and replaced."""
    path = path or settings_path()
    if not path.exists():
        return LoadResult(Settings())
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        return LoadResult(_from_mapping(data))
    except (tomllib.TOMLDecodeError, SettingsError, UnicodeDecodeError) as err:
        backup = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, backup)
        reason = str(err)
        return LoadResult(
            Settings(),
            [
                f"Settings file {path} could not be used ({reason}); it was moved to {backup} and "
                "defaults are in effect. Fix it and move it back, or set values again with "
                "`step-station config set`."
            ],
        )


def save_settings(settings: Settings, path: Path | None = None) -> Path:
    """Write only the values that differ from the defaults, atomically."""
    path = path or settings_path()
    defaults = Settings().to_dict()
    current = settings.to_dict()
    changed = {
        section: {k: v for k, v in values.items() if defaults[section][k] != v}
        for section, values in current.items()
    }
    _atomic_write(path, dumps({s: v for s, v in changed.items() if v}))
    return path


def load_secrets(path: Path | None = None) -> Secrets:
    path = path or secrets_path()
    if not path.exists():
        return Secrets()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8")).get("secrets", {})
    except tomllib.TOMLDecodeError as err:
        raise SettingsError(
            f"Secrets file {path} is not valid TOML ({err}).",
            hint="Fix or delete it, then set the secrets again (`step-station config set-secret`).",
        ) from err
    known = {f.name for f in fields(Secrets)}
    return Secrets(**{k: str(v) for k, v in data.items() if k in known})


def save_secrets(secrets: Secrets, path: Path | None = None) -> Path:
    path = path or secrets_path()
    _atomic_write(path, dumps({"secrets": dataclasses.asdict(secrets)}), mode=0o600)
    return path


def hf_token() -> str:
    """The Hugging Face token: the secrets file first, then HF_TOKEN from the environment."""
    return load_secrets().hf_token or os.environ.get("HF_TOKEN", "")


# --------------------------------------------------------------------------------- the store


class SettingsStore:
    """The one owner of a running service's settings: hands out immutable snapshots and changes
    them only through `update`, which validates, saves and then tells every subscriber."""

    def __init__(self, settings: Settings, path: Path | None = None) -> None:
        self.path = path or settings_path()
        self._settings = settings
        self._lock = threading.Lock()  # one update at a time: validate, save, swap
        self._listeners: list[Callable[[Settings], object]] = []
        # Notifications run outside `_lock` (a slow subscriber must not hold up the next save),
        # so two updates from two threads could tell subscribers in the wrong order. Each
        # snapshot gets a number; an older one is not delivered once a newer one was, so every
        # subscriber ends on the snapshot in force.
        self._notify_lock = threading.RLock()  # re-entrant: a subscriber may call update()
        self._version = 0
        self._delivered = 0

    def current(self) -> Settings:
        """The frozen snapshot now in force."""
        return self._settings

    def subscribe(self, listener: Callable[[Settings], object]) -> None:
        """Call `listener(new_snapshot)` after each update that changed something."""
        with self._lock:
            self._listeners.append(listener)

    def update(self, changes: Mapping[str, Any]) -> Settings:
        """Apply `{"section.field": value}` changes (as `config set` takes them): validated
        first (SettingsError, nothing saved), saved atomically, swapped in, then every
        subscriber is called with the new snapshot. Changing nothing saves and tells nothing.
        Only the changed keys are written (see `_save`)."""
        with self._lock:
            old = self._settings
            new = with_changes(old, changes)
            if new == old:
                return old
            self._save(changes)
            self._settings = new
            self._version += 1
            version = self._version
            listeners = list(self._listeners)
        self._notify(listeners, new, version)
        return new

    def _save(self, changes: Mapping[str, Any]) -> None:
        """Write the changes onto what the file holds, not the whole snapshot: values given for
        this run only (`up --ui-port N`) stay out of the file."""
        on_disk = load_settings(self.path)
        for warning in on_disk.warnings:
            log.warning("%s", warning)
        save_settings(with_changes(on_disk.settings, changes), self.path)

    def _notify(
        self, listeners: list[Callable[[Settings], object]], snapshot: Settings, version: int
    ) -> None:
        with self._notify_lock:
            if version < self._delivered:
                return  # a newer snapshot (which includes these changes) was already delivered
            self._delivered = version
            for listener in listeners:
                try:
                    listener(snapshot)
                except Exception:  # noqa: BLE001 - one broken subscriber must not stop the rest
                    log.exception("a settings subscriber failed: %r", listener)
