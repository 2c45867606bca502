"""The owner login's guard on the UI listener: throttled logins, sessions that end, POST logout.

Gradio's own login (`auth=` on mount, used while "UI on LAN" is on) keeps every session until the
process ends (its `access-token-*` cookies have no lifetime and its token table is never pruned),
logs out on a GET (a link on any page could end the owner's session) and lets one address try
passwords as fast as it can send them (gradio/routes.py: `login`, `logout`). This ASGI wrapper
sits in front of the whole UI app and, without touching Gradio:

- `POST /login`: refused with 429 and Retry-After while the address is locked out by the gateway's
  failure throttle (`appliance.gateway.limits.FailureThrottle`: 10 failures a minute lock it out for
  a minute), or while that address already has a login being checked (which counts as a failure),
  or too many are being checked at once; a 400 (wrong login) counts a failure, a 200 clears them
  and starts a session;
- sessions: a session lives `session_seconds()` (12 h; `STEP_STATION_UI_SESSION_S`), and ends
  when the owner login changes; a request carrying an ended or unknown session's cookie reaches
  Gradio without it (so Gradio asks for the login again). The cookies get a Max-Age to match;
- `GET /logout` is refused (405); `POST /logout` ends the session and clears its cookies.

The password check itself runs off the event loop (`OwnerLogin.check_async`).
"""

from __future__ import annotations

import os
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import settings as st
from appliance.errors import SettingsError
from appliance.gateway.limits import FailureThrottle
from appliance.keys import OwnerLogin
from appliance.web_guard import send_json

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SESSION_S_DEFAULT = 12 * 3600
COOKIE_PREFIX = "access-token-"  # Gradio's `access-token-<id>` and `access-token-unsecure-<id>`
MAX_CHECKS_IN_FLIGHT = 8  # logins being checked at once, every address together
_MAX_SESSIONS = 1024
_LOGIN_PATHS = ("/login", "/login/")
_LOGOUT_PATHS = ("/logout", "/logout/")
# Gradio serves these without its login check (a heartbeat stream a stranger could hold open,
# the app's startup events); with the owner login on they need a live session too.
_SESSION_ONLY = ("/gradio_api/heartbeat/", "/gradio_api/startup-events")


def session_seconds() -> int:
    """How long an owner session lives: 12 h, or `STEP_STATION_UI_SESSION_S` seconds."""
    raw = os.environ.get("STEP_STATION_UI_SESSION_S", "").strip()
    if not raw:
        return SESSION_S_DEFAULT
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise SettingsError(
            f"STEP_STATION_UI_SESSION_S={raw!r} is not a number of seconds.",
            hint="Set it to a whole number of seconds above 0, or unset it (12 hours).",
        )
    return value


@dataclass(frozen=True)
class _Session:
    issued: float
    login: str  # OwnerLogin.fingerprint() when it was issued


def _cookies(scope: Scope) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for name, value in scope.get("headers", []):
        if name == b"cookie":
            for part in value.decode("latin-1").split(";"):
                key, sep, val = part.strip().partition("=")
                if sep:
                    pairs.append((key.strip(), val.strip()))
    return pairs


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else ""


async def _reply(
    send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """FastAPI's error shape (`{"detail": ...}`), as Gradio's own /login answers."""
    await send_json(send, status, {"detail": message}, headers or ())


class LoginGuard:
    """ASGI wrapper for the UI app (see the module's docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        session_s: int | None = None,
        throttle: FailureThrottle | None = None,
        login: OwnerLogin | None = None,
        clock: Callable[[], float] = time.monotonic,
        require_session: bool = False,
    ) -> None:
        """`require_session`: the owner login guards the UI ("UI on LAN"), so the routes Gradio
        leaves open need a live session as well."""
        self.app = app
        self.require_session = require_session
        self.session_s = session_s or session_seconds()
        self.throttle = throttle or FailureThrottle(clock=clock)
        self.login = login or OwnerLogin()
        self._clock = clock
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._checking: dict[str, int] = {}
        self._login_sig: tuple[int, int] | None = None
        self._login_fp = ""

    # ------------------------------------------------------------------------------- ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if path in _LOGOUT_PATHS:
            if method == "POST":
                await self._logout(scope, send)
            else:
                await _reply(
                    send,
                    405,
                    "Log out with POST /logout (the Log out button in the Sharing tab); "
                    "a GET never ends a session.",
                    [(b"allow", b"POST")],
                )
            return
        if path in _LOGIN_PATHS and method == "POST":
            await self._login(scope, receive, send)
            return
        scope = self._without_ended_sessions(scope)
        if (
            self.require_session
            and path.startswith(_SESSION_ONLY)
            and not any(name.startswith(COOKIE_PREFIX) for name, _ in _cookies(scope))
        ):
            await _reply(send, 401, "Sign in with the owner login first.")
            return
        await self.app(scope, receive, send)

    # ---------------------------------------------------------------------------- sessions

    def _fingerprint(self) -> str:
        """The owner login's fingerprint, re-read only when the secrets file changed."""
        try:
            stat = st.secrets_path().stat()
            sig = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            sig = (-1, -1)
        if sig != self._login_sig:
            self._login_fp = self.login.fingerprint()
            self._login_sig = sig
        return self._login_fp

    def session_live(self, token: str) -> bool:
        session = self._sessions.get(token)
        if session is None:
            return False
        if self._clock() - session.issued >= self.session_s or session.login != self._fingerprint():
            del self._sessions[token]
            return False
        return True

    def _without_ended_sessions(self, scope: Scope) -> Scope:
        cookies = _cookies(scope)
        stale = [
            name
            for name, value in cookies
            if name.startswith(COOKIE_PREFIX) and not self.session_live(value)
        ]
        if not stale:
            return scope
        kept = "; ".join(f"{k}={v}" for k, v in cookies if k not in stale)
        headers = [(k, v) for k, v in scope.get("headers", []) if k != b"cookie"]
        if kept:
            headers.append((b"cookie", kept.encode("latin-1")))
        return {**scope, "headers": headers}

    def _start_session(self, token: str) -> None:
        self._sessions[token] = _Session(self._clock(), self._fingerprint())
        self._sessions.move_to_end(token)
        while len(self._sessions) > _MAX_SESSIONS:
            self._sessions.popitem(last=False)

    # ------------------------------------------------------------------------------- login

    def _login_refusal(self, address: str) -> tuple[str, int] | None:
        refusal = self.throttle.check(address)
        if refusal is not None:
            return (
                f"Too many wrong owner logins from {address}; try again in "
                f"{refusal.retry_after_s} s.",
                refusal.retry_after_s,
            )
        if self._checking.get(address, 0) >= 1:
            # One at a time per address; trying more at once counts as failing (a password
            # guesser sends them in parallel, a person does not).
            self.throttle.failed(address)
            return (f"A login from {address} is already being checked; wait for its answer.", 1)
        if sum(self._checking.values()) >= MAX_CHECKS_IN_FLIGHT:
            return ("Too many logins are being checked right now; try again in a moment.", 1)
        return None

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        address = _client(scope)
        refused = self._login_refusal(address)
        if refused is not None:
            message, retry = refused
            await _reply(send, 429, message, [(b"retry-after", str(max(1, retry)).encode())])
            return
        self._checking[address] = self._checking.get(address, 0) + 1
        status = 0

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if status == 200:
                    message["headers"] = self._session_cookies(list(message.get("headers", [])))
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            left = self._checking.get(address, 0) - 1
            if left > 0:
                self._checking[address] = left
            else:
                self._checking.pop(address, None)
            if status == 200:
                self.throttle.succeeded(address)
            elif status in (400, 401, 422) or status == 0:
                self.throttle.failed(address)  # a wrong login, a malformed one, or a hang-up

    def _session_cookies(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """Record the session Gradio just issued; its cookies get the session's lifetime."""
        out: list[tuple[bytes, bytes]] = []
        for name, value in headers:
            if name.lower() == b"set-cookie":
                text = value.decode("latin-1")
                cookie, _, _ = text.partition(";")
                key, _, token = cookie.partition("=")
                if key.strip().startswith(COOKIE_PREFIX) and token:
                    self._start_session(token.strip().strip('"'))
                    value = f"{text}; Max-Age={self.session_s}".encode("latin-1")
            out.append((name, value))
        return out

    # ------------------------------------------------------------------------------ logout

    async def _logout(self, scope: Scope, send: Send) -> None:
        headers: list[tuple[bytes, bytes]] = [(b"location", b"/"), (b"cache-control", b"no-store")]
        for name, value in _cookies(scope):
            if name.startswith(COOKIE_PREFIX):
                self._sessions.pop(value, None)
                headers.append(
                    (b"set-cookie", f"{name}=; Max-Age=0; Path=/; HttpOnly".encode("latin-1"))
                )
        await send({"type": "http.response.start", "status": 303, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


# ------------------------------------------------------------------------------------------ TLS


def tls_options(settings: st.Settings) -> dict[str, str]:
    """uvicorn's `ssl_certfile`/`ssl_keyfile` from `ui.tls_cert`/`ui.tls_key` (both or neither),
    checked here so a bad pair is a clear error before anything starts."""
    cert = str(getattr(settings.ui, "tls_cert", "") or "").strip()
    key = str(getattr(settings.ui, "tls_key", "") or "").strip()
    if not cert and not key:
        return {}
    if not cert or not key:
        raise SettingsError(
            "TLS for the UI needs both ui.tls_cert and ui.tls_key.",
            hint="`step-station config set ui.tls_cert /path/cert.pem` and `step-station config "
            "set ui.tls_key /path/key.pem` (PEM files), or clear both for plain HTTP.",
        )
    for setting, path in (("ui.tls_cert", cert), ("ui.tls_key", key)):
        if not Path(path).expanduser().is_file():
            raise SettingsError(
                f"{setting} names {path}, which is not a readable file.",
                hint=f"Point {setting} at a PEM file, or clear it (`step-station config set "
                f'{setting} ""`).',
            )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(Path(cert).expanduser()), str(Path(key).expanduser()))
    except (ssl.SSLError, OSError) as err:
        raise SettingsError(
            f"The UI's TLS certificate {cert} and key {key} cannot be used ({err}).",
            hint="Both must be PEM, the key unencrypted and matching the certificate.",
        ) from err
    return {
        "ssl_certfile": str(Path(cert).expanduser()),
        "ssl_keyfile": str(Path(key).expanduser()),
    }
