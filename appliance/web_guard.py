"""The door of every listener: Host and Origin checks, closed CORS, and the UI's own locks.

An ASGI wrapper in front of the UI listener (before Gradio or any route) and of each gateway
listener. It stops, in this order:

- **DNS rebinding.** A web page the owner opens can point its own name at 127.0.0.1 and then talk
  to a loopback listener as a same-origin page; its requests then carry `Host: evil.example`. Only
  names this listener legitimately serves pass: loopback names and addresses always, this
  machine's hostnames and interface addresses when the listener is reachable beyond loopback, and
  names the owner adds (`ui.allowed_hosts`, `gateway.allowed_hosts`, e.g. a reverse proxy's).
- **Cross-origin requests.** A page on another origin can send requests to 127.0.0.1 directly
  (forms, `fetch` with `no-cors`). Browsers mark them with `Origin`; a request whose Origin is not
  this listener's own (same host and port as its Host header) or an owner-added origin is refused,
  whatever its method: Gradio returns results on GET (`/gradio_api/queue/data`).
- **Reflected CORS.** Gradio answers some origins with `Access-Control-Allow-Origin` and
  credentials; every `Access-Control-Allow-*` header is removed from every response. Same-origin
  pages need none.

For the UI listener (`UiLock`) also:

- **Only the routes the page uses.** Every Gradio event is also a public API route
  (`/gradio_api/call/<name>`, `/run/`, `/api/`, `/info`, `/openapi.json`, MCP, run history); the
  page itself uses only the queue (`queue/join` by fn_index, `queue/data`), uploads, files and
  its assets. Everything else is a 404 here.
- **Another local user.** On loopback the UI asks for a per-install secret, as Jupyter does:
  `step-station open` and the desktop entry open `/?token=...`, which sets an HttpOnly,
  SameSite=Strict cookie and redirects to `/`; a browser without it gets a page saying how to open
  the UI. With "UI on LAN" on, the owner login (Gradio's `auth`) guards every route instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import html
import ipaddress
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import psutil

from appliance import settings as st
from appliance.keys import ui_lan_active

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LAN_NAMES_TTL_S = 30.0  # interfaces change rarely; a new address is learnt within this
TOKEN_FILE = "ui-token"
TOKEN_QUERY = "token"


# ------------------------------------------------------------------------------ host names


def csv(value: str) -> tuple[str, ...]:
    """A comma-separated setting as its items."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


def split_host(value: str) -> tuple[str, str]:
    """`Host` header -> (hostname lower-cased without a trailing dot, port or "")."""
    value = value.strip().lower()
    if value.startswith("["):  # [v6]:port
        end = value.find("]")
        if end < 0:
            return "", ""
        name, rest = value[1:end], value[end + 1 :]
        return name, rest[1:] if rest.startswith(":") else ""
    name, _, port = value.partition(":")
    return name.rstrip("."), port


def is_loopback_name(name: str) -> bool:
    """localhost, *.localhost (browsers resolve them to loopback themselves), 127/8, ::1."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass
class HostNames:
    """The names one listener legitimately serves.

    `bind_host()` is where the listener listens now (a gateway's sharing can change while it
    runs). On loopback: loopback names only; beyond it: also this machine's hostnames and the
    addresses of its interfaces (or just the one address it is bound to).
    """

    bind_host: Callable[[], str]
    extra: Callable[[], Iterable[str]] = tuple
    clock: Callable[[], float] = time.monotonic
    _cached: frozenset[str] = field(default=frozenset(), init=False)
    _cached_at: float = field(default=-1e9, init=False)

    def allows(self, name: str) -> bool:
        if not name:
            return False
        if is_loopback_name(name):
            return True
        if name in {n.strip().lower().rstrip(".") for n in self.extra()}:
            return True
        bound = self.bind_host()
        if is_loopback_name(bound):
            return False
        return name in self._lan_names(bound)

    def _lan_names(self, bound: str) -> frozenset[str]:
        now = self.clock()
        if now - self._cached_at > LAN_NAMES_TTL_S:
            self._cached = frozenset(machine_names())
            self._cached_at = now
        if bound in ("0.0.0.0", "::"):  # noqa: S104 - comparing, not binding
            return self._cached
        hostnames = {n for n in self._cached if not _is_address(n)}
        return frozenset({bound.lower(), *hostnames})


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def machine_names() -> set[str]:
    """This machine's hostnames (short, FQDN, mDNS `.local`) and interface addresses."""
    names: set[str] = set()
    host = socket.gethostname().lower().rstrip(".")
    if host:
        short = host.split(".", 1)[0]
        names |= {host, short, f"{short}.local"}
        with contextlib.suppress(OSError):
            names.add(socket.getfqdn(host).lower().rstrip("."))
    try:
        interfaces = psutil.net_if_addrs()
    except OSError:  # e.g. an emulator without the ioctl: hostnames still work
        interfaces = {}
    for addresses in interfaces.values():
        for addr in addresses:
            if addr.family in (socket.AF_INET, socket.AF_INET6):
                names.add(str(addr.address).split("%", 1)[0].lower())
    return names


# ---------------------------------------------------------------------------- the guard


def _first_upper(text: str) -> str:
    return text[:1].upper() + text[1:]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


async def send_json(
    send: Send, status: int, payload: dict[str, Any], headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """A whole JSON response, never cached."""
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def refuse(send: Send, status: int, code: str, message: str, **extra: Any) -> None:
    """An OpenAI-shaped JSON error (the gateway's shape; the UI's API clients read it too)."""
    error = {"message": message, "type": "forbidden", "code": code, **extra}
    await send_json(send, status, {"error": error})


def strip_cors(send: Send) -> Send:
    """A `send` that drops every Access-Control-Allow-* header from the response."""

    async def sender(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [
                (k, v)
                for k, v in message.get("headers") or ()
                if not bytes(k).lower().startswith(b"access-control-allow-")
            ]
        await sender_inner(message)

    sender_inner = send
    return sender


@dataclass
class GuardOptions:
    """What one listener accepts. `what` names it in messages ("the UI", "the API")."""

    names: HostNames
    what: str
    setting: str  # "ui" or "gateway": the settings section of allowed_hosts / allowed_origins
    extra_origins: Callable[[], Iterable[str]] = tuple
    address_hint: Callable[[], str] = lambda: "http://127.0.0.1"


class HostOriginGuard:
    """Refuses foreign Host and Origin headers; removes CORS grants from every response."""

    def __init__(self, app: ASGIApp, options: GuardOptions) -> None:
        self.app = app
        self.options = options

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        problem = self.check(scope)
        if problem is not None:
            code, message = problem
            log.info("refused %s %s: %s", scope.get("method", ""), scope.get("path", ""), code)
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await refuse(send, 403, code, message)
            return
        await self.app(scope, receive, strip_cors(send))

    def check(self, scope: Scope) -> tuple[str, str] | None:
        opts = self.options
        host_header = _header(scope, b"host")
        if not host_header:
            return (
                "missing_host",
                f"The request has no Host header; {opts.what} answers only requests that name "
                "it (HTTP/1.1).",
            )
        name, _ = split_host(host_header)
        if not opts.names.allows(name):
            return (
                "foreign_host",
                f"{_first_upper(opts.what)} does not answer to the name {name!r} (a page that "
                "points its own name at this machine is refused). Open it by this machine's "
                f"address, e.g. {opts.address_hint()}, or add the name with `step-station config "
                f"set {opts.setting}.allowed_hosts {name}` (comma-separated names: a reverse "
                "proxy's).",
            )
        origin = _header(scope, b"origin")
        if origin is not None and not self._own_origin(origin, host_header):
            return (
                "foreign_origin",
                f"{_first_upper(opts.what)} refuses requests sent by another site's page "
                f"(Origin {origin!r}). Open {opts.what} itself, or allow that origin with "
                f"`step-station config set {opts.setting}.allowed_origins {origin}`.",
            )
        return None

    def _own_origin(self, origin: str, host_header: str) -> bool:
        origin = origin.strip().lower().rstrip("/")
        if origin in {o.strip().lower().rstrip("/") for o in self.options.extra_origins()}:
            return True
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False  # "null" (sandboxed frames, file:) and anything odd
        return parts.netloc == host_header.strip().lower()


# --------------------------------------------------------------------------- the UI lock

# What the Gradio page itself uses (Gradio 6): its HTML, config and assets, the queue, uploads,
# files, heartbeats, login. The named-API routes (call/run/api/info/openapi/mcp/runs) are not here.
UI_GET_EXACT = frozenset(
    {
        "/",
        "/config",
        "/config/",
        "/theme.css",
        "/favicon.ico",
        "/robots.txt",
        "/manifest.json",
        "/pwa_icon",
        "/healthz",
        "/gradio_api/deep_link",
        "/gradio_api/startup-events",
        "/gradio_api/upload_progress",
        "/gradio_api/queue/data",
        "/gradio_api/login_check",
        "/gradio_api/login_check/",
        "/gradio_api/app_id",
        "/gradio_api/app_id/",
        "/ss-live/dashboard",  # the dashboard's live values (ui/live.py)
    }
)
UI_GET_PREFIXES = (
    "/assets/",
    "/static/",
    "/svelte/",
    "/pwa_icon/",
    "/gradio_api/heartbeat/",
    "/gradio_api/file=",
    "/gradio_api/file/",
)
UI_POST_EXACT = frozenset(
    {
        "/gradio_api/queue/join",
        # events with queue=False (ui/polling.py's timer switches, the model tab's switches):
        # the page posts them here by fn_index, the same power as queue/join
        "/gradio_api/run/predict",
        "/gradio_api/upload",
        "/gradio_api/cancel",
        "/gradio_api/reset",
        "/gradio_api/reset/",
        "/login",
        "/login/",
        "/logout",
        "/logout/",
    }
)
# Without the token (or a login) only these answer: enough for a health check.
UI_OPEN_PATHS = frozenset({"/healthz", "/favicon.ico", "/robots.txt"})


def ui_route_allowed(method: str, path: str) -> bool:
    if method in ("GET", "HEAD"):
        return path in UI_GET_EXACT or path.startswith(UI_GET_PREFIXES) or path == "/logout"
    if method == "POST":
        return path in UI_POST_EXACT
    return False


def token_path() -> Path:
    return st.config_dir() / TOKEN_FILE


def ui_token(create: bool = True) -> str:
    """The per-install UI secret (config/ui-token, 0600); made on first use."""
    path = token_path()
    exists = True
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token, exists = "", False
    if len(token) >= 32:
        return token
    if not create:
        return ""
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    if exists:  # unreadable as a secret (empty, cut short): replaced
        os.replace(temp, path)
        return token
    try:
        os.link(temp, path)  # never replaces: a secret made at the same moment by another run wins
    except FileExistsError:
        return ui_token(create=False) or token
    finally:
        temp.unlink()
    return token


def open_url(settings: st.Settings, host: str | None = None) -> str:
    """The address that opens the UI in a browser, token included."""
    where = host or "127.0.0.1"
    tls = bool(settings.ui.tls_cert.strip() and settings.ui.tls_key.strip())
    base = f"{'https' if tls else 'http'}://{where}:{settings.ui.port}/"
    if ui_lan_active(settings):
        return base  # the owner login guards the UI then
    return f"{base}?{urlencode({TOKEN_QUERY: ui_token()})}"


def cookie_name(port: int) -> str:
    return f"step-station-ui-{port}"  # cookies ignore ports: one per listener port


def cookie_value(token: str) -> str:
    """What the browser keeps: derived from the token, not the token itself."""
    return hmac.new(token.encode(), b"step-station ui cookie", hashlib.sha256).hexdigest()


LOCKED_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>Step Station: open it from this computer's account</title>
<style>body{{font-family:system-ui,sans-serif;max-width:38rem;margin:4rem auto;line-height:1.5;
padding:0 1rem}}code{{background:#eee;padding:.1rem .3rem;border-radius:.2rem}}</style></head>
<body><h1>Step Station is locked to its owner</h1>
<p>This page needs the install's secret, which only the owner's account can read.</p>
<p>Open Step Station from the <b>Step Station</b> entry in the desktop menu, or run
<code>step-station open</code> in a terminal (<code>step-station open --print</code> prints the
address to paste into a browser).</p>
<p>{detail}</p></body></html>"""


# Sent with every UI response. No page of another site may frame the UI (clickjacking: a page that
# lays the owner's UI under its own buttons); `frame-ancestors` works only as a header, not in the
# page's <meta> CSP (ui/chat.py's, which keeps images and media on the UI's own origin; repeated
# here so a response Gradio renders without that head is covered too). No Referer leaves the UI.
UI_SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (
        b"content-security-policy",
        b"frame-ancestors 'none'; img-src 'self' data: blob:; media-src 'self' data: blob:",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)


def with_headers(send: Send, extra: tuple[tuple[bytes, bytes], ...]) -> Send:
    """A `send` that sets `extra` on the response (replacing headers of the same names)."""
    names = {name for name, _ in extra}

    async def sender(message: Message) -> None:
        if message["type"] == "http.response.start":
            kept = [
                (k, v) for k, v in message.get("headers") or () if bytes(k).lower() not in names
            ]
            message["headers"] = [*kept, *extra]
        await send(message)

    return sender


class UiLock:
    """The UI listener's routes and per-install token (inside the Host/Origin guard); every
    response carries UI_SECURITY_HEADERS."""

    def __init__(
        self,
        app: ASGIApp,
        port: int,
        token: Callable[[], str | None],
    ) -> None:
        """`token()` is the secret a loopback browser must show, or None when the owner login
        guards the UI instead ("UI on LAN")."""
        self.app = app
        self.port = port
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = with_headers(send, UI_SECURITY_HEADERS)
        method, path = scope.get("method", "GET"), scope.get("path", "/")
        if not ui_route_allowed(method, path):
            await refuse(
                send,
                404,
                "not_found",
                f"{method} {path} is not part of Step Station's UI. Programs use the "
                "OpenAI-compatible API on the gateway port instead.",
            )
            return
        token = self.token()
        if token is None or path in UI_OPEN_PATHS or self._has_cookie(scope, token):
            await self.app(scope, receive, send)
            return
        query = dict(parse_qsl(bytes(scope.get("query_string") or b"").decode("latin-1")))
        given = query.get(TOKEN_QUERY)
        if method == "GET" and given is not None and hmac.compare_digest(given, token):
            await self._redirect_with_cookie(send, path, query, token)
            return
        detail = (
            "The address you used carries an old or wrong secret."
            if given is not None
            else "This browser has not been given it yet."
        )
        accept = _header(scope, b"accept") or ""
        if method == "GET" and "text/html" in accept:
            page = LOCKED_PAGE.format(detail=html.escape(detail)).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [
                        (b"content-type", b"text/html; charset=utf-8"),
                        (b"content-length", str(len(page)).encode()),
                        (b"cache-control", b"no-store"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": page})
            return
        await refuse(
            send,
            401,
            "ui_token_required",
            "Step Station's UI needs its per-install secret: open it with `step-station open` "
            "or the desktop menu entry. " + detail,
        )

    def _has_cookie(self, scope: Scope, token: str) -> bool:
        raw = _header(scope, b"cookie")
        if not raw:
            return False
        wanted = cookie_value(token)
        name = cookie_name(self.port)
        for part in raw.split(";"):
            key, _, value = part.strip().partition("=")
            if key == name and hmac.compare_digest(value.strip(), wanted):
                return True
        return False

    async def _redirect_with_cookie(
        self, send: Send, path: str, query: dict[str, str], token: str
    ) -> None:
        query.pop(TOKEN_QUERY, None)
        location = path + (f"?{urlencode(query)}" if query else "")
        cookie = (
            f"{cookie_name(self.port)}={cookie_value(token)}; Path=/; HttpOnly; "
            "SameSite=Strict; Max-Age=31536000"
        )
        await send(
            {
                "type": "http.response.start",
                "status": 303,
                "headers": [
                    (b"location", location.encode("latin-1")),
                    (b"set-cookie", cookie.encode("latin-1")),
                    (b"content-length", b"0"),
                    (b"cache-control", b"no-store"),
                    (b"referrer-policy", b"no-referrer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})
