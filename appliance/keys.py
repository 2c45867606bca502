"""API keys for the LAN gateway, and the owner login for "UI on LAN".

Keys look like `sk-step-<id><secret>`: `id` is 8 public hex characters that name the record (so a
request costs one lookup and one hash, not a scan), `secret` is 32 random url-safe characters
(192 bits). Only `sha256(salt || secret)` with a per-key random salt is stored; with that much
entropy a slow hash buys nothing, and the comparison is constant-time. A key is shown once, at
creation, and never again.

The file is `data_dir()/keys.json`, mode 0600, written atomically under an `fcntl` lock so the CLI
(`step-station keys create`) and a running appliance (which adds usage counts) never lose each
other's writes. The appliance keeps usage in memory and merges it into the file at most every few
seconds (`flush()`); a running appliance notices keys created or revoked by the CLI on the next
request (the file's mtime changes).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from appliance import settings as st
from appliance.errors import BadInputError, SettingsError

KEY_PREFIX = "sk-step-"
_ID_LEN = 8
_SECRET_BYTES = 24  # token_urlsafe(24) -> 32 characters
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,63}$")
_FILE_VERSION = 1


class KeyStoreError(SettingsError):
    """The keys file cannot be read or written."""


def keys_path() -> Path:
    return st.data_dir() / "keys.json"


@dataclass
class ApiKey:
    """One key's record. Holds no secret: only the salt and the digest of the secret."""

    id: str
    name: str
    salt: str
    digest: str
    created: float
    last_used: float | None = None
    last_address: str = ""
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    revoked: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked is None

    @property
    def display(self) -> str:
        """What may be shown anywhere: the prefix and the public id, never the secret."""
        return f"{KEY_PREFIX}{self.id}…"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_public(cls, data: Mapping[str, Any]) -> ApiKey:
        """A record from `public_dict()` (the service's answer to the CLI). It has no salt or
        digest, so it can show a key but never verify one."""
        return cls(
            id=str(data["id"]),
            name=str(data["name"]),
            salt="",
            digest="",
            created=float(data["created"]),
            last_used=None if data.get("last_used") is None else float(data["last_used"]),
            last_address=str(data.get("last_address") or ""),
            requests=int(data.get("requests") or 0),
            prompt_tokens=int(data.get("prompt_tokens") or 0),
            completion_tokens=int(data.get("completion_tokens") or 0),
            revoked=None if data.get("revoked") is None else float(data["revoked"]),
        )

    def public_dict(self) -> dict[str, Any]:
        """JSON for `keys list --json` and the UI: everything but the salt and digest."""
        return {
            "id": self.id,
            "name": self.name,
            "display": self.display,
            "created": self.created,
            "last_used": self.last_used,
            "last_address": self.last_address,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "revoked": self.revoked,
            "active": self.active,
        }


@dataclass
class NewKey:
    """The result of `create`: the record and the one and only copy of the full key."""

    record: ApiKey
    secret: str  # the full `sk-step-...` key; shown once


@dataclass
class _Pending:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    last_used: float | None = None
    last_address: str = ""


@dataclass
class _Loaded:
    mtime_ns: int = -1
    size: int = -1
    keys: dict[str, ApiKey] = field(default_factory=dict)


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode("utf-8")).hexdigest()


def validate_name(name: str) -> str:
    name = name.strip()
    if not _NAME_RE.match(name):
        raise BadInputError(
            f"Key name {name!r} is not usable.",
            hint="Use 1-64 letters, digits, spaces or . _ @ - (for example `alice-laptop`).",
        )
    return name


class KeyStore:
    """Named, hashed, revocable API keys with per-key usage counts."""

    def __init__(self, path: Path | None = None, *, clock: Any = time.time) -> None:
        self.path = path or keys_path()
        self._clock = clock
        self._lock = threading.RLock()
        self._loaded = _Loaded()
        self._pending: dict[str, _Pending] = {}
        self._dummy_salt = secrets.token_hex(16)

    # ------------------------------------------------------------------------------- file I/O

    @property
    def _lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _read_file(self) -> dict[str, ApiKey]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as err:
            raise KeyStoreError(
                f"Cannot read the API keys file {self.path} ({err.strerror}).",
                hint="Check its owner and permissions (it should be 0600 and yours).",
            ) from err
        try:
            data = json.loads(text)
            known = {f.name for f in fields(ApiKey)}
            records = [
                ApiKey(**{k: v for k, v in item.items() if k in known}) for item in data["keys"]
            ]
        except (ValueError, KeyError, TypeError) as err:
            raise KeyStoreError(
                f"The API keys file {self.path} is damaged ({err}); no key is accepted until it "
                "is fixed.",
                hint="Restore it from a backup, or move it aside and create new keys with "
                "`step-station keys create NAME`.",
            ) from err
        return {r.id: r for r in records}

    def _write_file(self, keys: dict[str, ApiKey]) -> None:
        payload = {"version": _FILE_VERSION, "keys": [asdict(k) for k in keys.values()]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".keys.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(payload, handle, indent=1)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _refresh(self) -> dict[str, ApiKey]:
        """The records as on disk; re-read only when the file changed (one stat per call)."""
        try:
            stat = os.stat(self.path)
            sig = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            sig = (-2, -2)
        if sig != (self._loaded.mtime_ns, self._loaded.size):
            keys = self._read_file()
            self._loaded = _Loaded(sig[0], sig[1], keys)
        return self._loaded.keys

    @contextlib.contextmanager
    def _edit(self) -> Iterator[dict[str, ApiKey]]:
        """Read-modify-write under the file lock, merging this process's pending usage."""
        with self._lock, self._file_lock():
            keys = self._read_file()
            self._merge_pending(keys)
            yield keys
            self._write_file(keys)
            self._pending.clear()  # only once the counts are safely on disk
            self._loaded = _Loaded(keys={})  # force a re-read (mtime granularity)

    def _merge_pending(self, keys: dict[str, ApiKey]) -> None:
        for key_id, pend in self._pending.items():
            rec = keys.get(key_id)
            if rec is None:
                continue
            rec.requests += pend.requests
            rec.prompt_tokens += pend.prompt_tokens
            rec.completion_tokens += pend.completion_tokens
            if pend.last_used is not None and (rec.last_used or 0) < pend.last_used:
                rec.last_used = pend.last_used
                rec.last_address = pend.last_address

    # ----------------------------------------------------------------------------- public API

    def create(self, name: str) -> NewKey:
        """Make a key named `name` (unique among active keys); the secret is returned once."""
        name = validate_name(name)
        with self._edit() as keys:
            if any(k.active and k.name == name for k in keys.values()):
                raise BadInputError(
                    f"An active key named {name!r} already exists.",
                    hint="Choose another name, or revoke the old key first "
                    f"(`step-station keys revoke {name}`).",
                )
            key_id = secrets.token_hex(_ID_LEN // 2)
            while key_id in keys:
                key_id = secrets.token_hex(_ID_LEN // 2)
            secret = secrets.token_urlsafe(_SECRET_BYTES)
            salt = secrets.token_hex(16)
            record = ApiKey(
                id=key_id, name=name, salt=salt, digest=_digest(salt, secret), created=self._clock()
            )
            keys[key_id] = record
        return NewKey(record=replace(record), secret=f"{KEY_PREFIX}{key_id}{secret}")

    def revoke(self, name_or_id: str) -> ApiKey:
        """Revoke the active key with this name or id (a `sk-step-xxxxxxxx…` display works too)."""
        wanted = name_or_id.strip().rstrip("…")
        if wanted.startswith(KEY_PREFIX):
            wanted = wanted[len(KEY_PREFIX) : len(KEY_PREFIX) + _ID_LEN]
        with self._edit() as keys:
            matches = [k for k in keys.values() if k.active and wanted in (k.id, k.name)]
            if not matches:
                known = ", ".join(sorted(k.name for k in keys.values() if k.active)) or "none"
                raise BadInputError(
                    f"No active key is named or has the id {name_or_id!r}.",
                    hint=f"Active keys: {known}. `step-station keys list` shows names and ids.",
                )
            if len(matches) > 1:
                raise BadInputError(
                    f"{name_or_id!r} matches more than one key.",
                    hint="Revoke by id instead (`step-station keys list` shows the ids).",
                )
            matches[0].revoked = self._clock()
            return replace(matches[0])

    def list(self) -> list[ApiKey]:
        """Every key (active and revoked), oldest first, with usage including unflushed counts."""
        with self._lock:
            keys = {k: replace(v) for k, v in self._refresh().items()}
            self._merge_pending(keys)
        return sorted(keys.values(), key=lambda k: k.created)

    def active_count(self) -> int:
        with self._lock:
            return sum(1 for k in self._refresh().values() if k.active)

    def verify(self, presented: str) -> ApiKey | None:
        """The active key matching `presented`, or None. Constant-time in the secret."""
        with self._lock:
            keys = self._refresh()
        body = presented[len(KEY_PREFIX) :] if presented.startswith(KEY_PREFIX) else ""
        record = keys.get(body[:_ID_LEN]) if len(body) > _ID_LEN else None
        salt = record.salt if record is not None else self._dummy_salt
        candidate = _digest(salt, body[_ID_LEN:])
        expected = record.digest if record is not None else "0" * 64
        if hmac.compare_digest(candidate, expected) and record is not None and record.active:
            return record
        return None

    def record_usage(
        self,
        key_id: str,
        *,
        address: str = "",
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        requests: int = 1,
    ) -> None:
        """Count one request (and its tokens) for a key; kept in memory until `flush()`."""
        with self._lock:
            pend = self._pending.setdefault(key_id, _Pending())
            pend.requests += requests
            pend.prompt_tokens += max(0, int(prompt_tokens))
            pend.completion_tokens += max(0, int(completion_tokens))
            pend.last_used = self._clock()
            pend.last_address = address

    def has_pending(self) -> bool:
        with self._lock:
            return bool(self._pending)

    def flush(self) -> None:
        """Merge the in-memory usage counts into the file."""
        with self._lock:
            if not self._pending:
                return
            with self._edit():
                pass


# ------------------------------------------------------------------------------- owner login

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def hash_login(username: str, password: str) -> str:
    """`scrypt$N$r$p$<username hex>$<salt hex>$<hash hex>` for the secrets file."""
    if not username.strip() or len(password) < 8:
        raise BadInputError(
            "The owner login needs a user name and a password of at least 8 characters.",
            hint="Choose a longer password.",
        )
    salt = secrets.token_bytes(16)
    user = username.strip()
    digest = hashlib.scrypt(
        f"{user}\0{password}".encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P
    )
    params = f"{_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}"
    return f"scrypt${params}${user.encode().hex()}${salt.hex()}${digest.hex()}"


def verify_login(stored: str, username: str, password: str) -> bool:
    """True when the user name and password match the stored hash (constant-time compare)."""
    try:
        scheme, n, r, p, user_hex, salt_hex, digest_hex = stored.split("$")
        if scheme != "scrypt":
            return False
        user = bytes.fromhex(user_hex).decode()
        digest = hashlib.scrypt(
            f"{username.strip()}\0{password}".encode(),
            salt=bytes.fromhex(salt_hex),
            n=int(n),
            r=int(r),
            p=int(p),
        )
    except ValueError:
        return False
    same_user = hmac.compare_digest(user.encode(), username.strip().encode())
    return hmac.compare_digest(digest.hex(), digest_hex) and same_user


def login_user(stored: str) -> str:
    """The user name recorded in a stored login hash ("" when none is set)."""
    try:
        return bytes.fromhex(stored.split("$")[4]).decode()
    except (IndexError, ValueError):
        return ""


# One scrypt check at a time, on a thread of its own: hashlib.scrypt releases the GIL,
# so a check costs the event loop nothing, and a burst of logins queues here instead of filling the
# loop's default executor that the rest of the appliance uses (`asyncio.to_thread`).
_LOGIN_CHECKERS = 1
_checker_lock = threading.Lock()
_checker: concurrent.futures.ThreadPoolExecutor | None = None


def _login_executor() -> concurrent.futures.ThreadPoolExecutor:
    global _checker
    with _checker_lock:
        if _checker is None:
            _checker = concurrent.futures.ThreadPoolExecutor(
                _LOGIN_CHECKERS, thread_name_prefix="step-station-login"
            )
        return _checker


class OwnerLogin:
    """The owner login for the UI on the LAN: set on first use, stored hashed in the secrets.

    Once a login exists, changing it needs the current password (`set(..., current=...)`); so
    does turning "UI on LAN" on (`appliance.gateway.sharing.Sharing.set_ui_lan`). The one other way
    to change it is editing the owner's own 0600 secrets file, which whoever can do is the owner.
    """

    def is_set(self) -> bool:
        return bool(st.load_secrets().ui_login_hash)

    def username(self) -> str:
        return login_user(st.load_secrets().ui_login_hash)

    def fingerprint(self) -> str:
        """Changes whenever the login is set or changed (sessions from before then end)."""
        stored = st.load_secrets().ui_login_hash
        return hashlib.sha256(stored.encode()).hexdigest()[:16] if stored else ""

    def set(self, username: str, password: str, *, current: str = "") -> None:
        """Set the login; when one exists, `current` must be its password."""
        secrets_ = st.load_secrets()
        stored = secrets_.ui_login_hash
        if stored and not verify_login(stored, login_user(stored), current):
            raise BadInputError(
                "Changing the owner login needs the current owner password.",
                hint="Enter the current password too. Forgot it? On this machine, in your own "
                "account, delete the `ui_login_hash` line of the secrets file (`step-station "
                "config path` shows where) and set a new login.",
            )
        secrets_.ui_login_hash = hash_login(username, password)
        st.save_secrets(secrets_)

    def check_password(self, password: str) -> bool:
        """True when `password` is the current owner password (any user name)."""
        stored = st.load_secrets().ui_login_hash
        return bool(stored) and verify_login(stored, login_user(stored), password)

    def check(self, username: str, password: str) -> bool:
        """True when the login matches; False when none is set. Slow (scrypt): not on a loop."""
        stored = st.load_secrets().ui_login_hash
        return bool(stored) and verify_login(stored, username, password)

    async def check_async(self, username: str, password: str) -> bool:
        """Gradio's `auth=` callable: `check` on a login thread, never on the event loop.

        Gradio's POST /login awaits a coroutine function and calls anything else inline, in the
        event loop (gradio/routes.py, `login`); a slow hash there stalled every chat stream.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_login_executor(), self.check, username, password)


def ui_lan_active(settings: st.Settings) -> bool:
    """True when the UI listens beyond loopback: "UI on LAN" is on and an owner login is set."""
    return settings.ui.lan and OwnerLogin().is_set()


def ui_bind_host(settings: st.Settings) -> str:
    """Where the UI listens: `ui.host`, or with "UI on LAN" every interface (or `ui.host` when it
    names a specific non-loopback address)."""
    if not ui_lan_active(settings):
        return settings.ui.host
    return "0.0.0.0" if settings.ui.host in ("127.0.0.1", "localhost", "") else settings.ui.host  # noqa: S104
