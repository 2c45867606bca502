"""Members of a fleet and the fleet key.

Members live in the settings (`fleet.members`, "name=url,name=url": every settings value is a TOML
scalar) so that they change through `SettingsStore.update` like any other setting. The fleet key
is a secret, so it is not a setting (`config show` prints settings): it is a private file under
the data folder, 0600, shared by every Station of one fleet. A Station that holds it serves
requests carrying it with its own engine (never its router), which is what makes it a member; a
front that has members also sends it, in place of its clients' keys, to every member.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from appliance import settings as st
from appliance.errors import SettingsError

KEY_PREFIX = "sk-fleet-"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
RELOAD_S = 1.0


@dataclass(frozen=True)
class Member:
    name: str
    url: str  # the member Station's gateway, http://host:port (no path)


def key_path() -> Path:
    return st.data_dir() / "fleet.key"


def validate_member(name: str, url: str) -> Member:
    """A member with a checked name and a normalised URL, or SettingsError naming the fix."""
    name = name.strip()
    if not _NAME.match(name):
        raise SettingsError(
            f"Fleet member name {name!r} is not usable.",
            hint="Use 1-40 lower-case letters, digits, '-' or '_', starting with a letter or "
            "digit, e.g. station-2.",
        )
    parts = urlsplit(url.strip())
    if parts.scheme != "http" or not parts.hostname or parts.path.strip("/") not in ("", "v1"):
        raise SettingsError(
            f"Fleet member URL {url!r} is not a Station gateway address.",
            hint="Give the member's API address as http://HOST:PORT (the URL its Sharing tab "
            "shows, with or without /v1), e.g. http://192.168.1.20:8000.",
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise SettingsError(
            f"Fleet member URL {url!r} carries a query, fragment or user name.",
            hint="Give only http://HOST:PORT.",
        )
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    return Member(name=name, url=f"http://{host}:{parts.port or 80}")


def parse_members(text: str) -> tuple[Member, ...]:
    members: list[Member] = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, sep, url = item.partition("=")
        if not sep:
            raise SettingsError(
                f"fleet.members entry {item!r} is not NAME=URL.",
                hint="Change members with `step-station fleet add NAME URL` / `fleet remove NAME`.",
            )
        members.append(validate_member(name, url))
    return tuple(members)


def format_members(members: tuple[Member, ...] | list[Member]) -> str:
    return ",".join(f"{m.name}={m.url}" for m in members)


def with_member(text: str, name: str, url: str) -> str:
    members = list(parse_members(text))
    new = validate_member(name, url)
    if any(m.name == new.name for m in members):
        raise SettingsError(
            f"The fleet already has a member named {new.name!r}.",
            hint=f"Remove it first (`step-station fleet remove {new.name}`) or pick another name.",
        )
    if any(m.url == new.url for m in members):
        raise SettingsError(
            f"{new.url} is already in the fleet.", hint="`step-station fleet list` shows members."
        )
    return format_members([*members, new])


def without_member(text: str, name: str) -> str:
    members = list(parse_members(text))
    kept = [m for m in members if m.name != name]
    if len(kept) == len(members):
        known = ", ".join(m.name for m in members) or "none"
        raise SettingsError(f"The fleet has no member named {name!r}.", hint=f"Members: {known}.")
    return format_members(kept)


# ------------------------------------------------------------------------------- fleet key


def read_key(path: Path | None = None) -> str:
    try:
        return (path or key_path()).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return ""


def ensure_key(path: Path | None = None) -> str:
    """The fleet key, made (and stored 0600) when there is none yet."""
    path = path or key_path()
    key = read_key(path)
    if not key:
        st.private_dir(path.parent)
        key = KEY_PREFIX + secrets.token_urlsafe(24)
        st.write_private(path, key + "\n")
    return key


def store_key(key: str, path: Path | None = None) -> str:
    """Keep `key` (given by a front, `fleet join`) as this Station's fleet key."""
    key = key.strip()
    if not key.startswith(KEY_PREFIX) or len(key) < len(KEY_PREFIX) + 24 or not key.isprintable():
        raise SettingsError(
            "That is not a fleet key.",
            hint="Copy the key that `step-station fleet key` prints on the front Station "
            f"(it starts with {KEY_PREFIX}).",
        )
    path = path or key_path()
    st.private_dir(path.parent)
    st.write_private(path, key + "\n")
    return key


class FleetKey:
    """The fleet key as the gateway sees it: re-read at most once a second (so `fleet join` or
    a new key takes effect without a restart), compared in constant time."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or key_path()
        self._lock = threading.Lock()
        self._value = ""
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0

    def value(self) -> str:
        now = time.monotonic()
        if now - self._checked < RELOAD_S:
            return self._value
        with self._lock:
            self._checked = now
            try:
                info = os.stat(self.path)
                stamp = (info.st_mtime_ns, info.st_size)
            except FileNotFoundError:
                self._value, self._stamp = "", None
                return ""
            if stamp != self._stamp:
                self._value, self._stamp = read_key(self.path), stamp
            return self._value

    def reload(self) -> None:
        """Read the file again at the next use (this process just wrote it)."""
        self._checked = 0.0

    def accepts(self, presented: str) -> bool:
        key = self.value()
        return bool(key) and hmac.compare_digest(presented.encode(), key.encode())
