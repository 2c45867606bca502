"""The gateway listener: its own event loop thread, rebound live when sharing is switched.

`Gateway.start()` binds the socket itself (so a taken port is a `PortInUseError` naming it, raised
in the caller), then serves it with uvicorn on a loop thread of its own, apart from the UI's.
`apply_settings()` moves the listener between 127.0.0.1, every interface and one chosen interface
without touching the appliance or the engine: the old listening socket is closed first (a socket
on 0.0.0.0 cannot share the port with one on 127.0.0.1), the new one is bound, and if that fails
the old one is bound again and the error raised. Requests already running on the old listener
finish when the change widens access; when sharing is switched off they are cut at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import ipaddress
import logging
import socket
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio.to_thread
import psutil
import uvicorn

from appliance import settings as st
from appliance import web_guard
from appliance.engine.protocol import EngineOwner
from appliance.errors import PortInUseError, SettingsError
from appliance.fleet.router import Fleet
from appliance.gateway.access import AccessLog, AccessRecord
from appliance.gateway.app import GatewayApp, GatewayConfig
from appliance.gateway.engine_gate import EngineGate
from appliance.gateway.limits import (
    MAX_OUTPUT_TOKENS,
    BodyCaps,
    ConnectionGuard,
    guarded_protocol,
    raise_open_file_limit,
)
from appliance.keys import KeyStore
from appliance.uvicorn_server import QuietServer

log = logging.getLogger("step_station.gateway")

LOOPBACK = "127.0.0.1"
EVERY_INTERFACE = "0.0.0.0"  # noqa: S104 - only when the owner switches sharing on
FLUSH_EVERY_S = 5.0
DRAIN_S = 300.0  # how long requests on a replaced listener may run on (widening only)
STOP_GRACE_S = 5.0
T = TypeVar("T")


def bind_host(gateway: st.GatewaySettings) -> str:
    """The address the gateway listens on for these settings."""
    if not gateway.share_lan:
        return LOOPBACK
    choice = gateway.interface.strip()
    if not choice:
        return EVERY_INTERFACE
    with contextlib.suppress(ValueError):
        return str(ipaddress.IPv4Address(choice))
    for name, addresses in psutil.net_if_addrs().items():
        if name == choice:
            for addr in addresses:
                if addr.family == socket.AF_INET:
                    return str(addr.address)
            break
    known = ", ".join(sorted(psutil.net_if_addrs())) or "none"
    raise SettingsError(
        f"gateway.interface is {choice!r}, which is not an interface with an IPv4 address here.",
        hint=f"Interfaces: {known}. Set an interface name or one of its addresses, or leave it "
        "empty for every interface (`step-station config set gateway.interface ''`).",
    )


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def config_for(gateway: st.GatewaySettings, host: str, engine_api_key: str = "") -> GatewayConfig:
    return GatewayConfig(
        # Sharing always needs keys, even on an interface that happens to be loopback.
        require_key=gateway.share_lan or not is_loopback(host) or gateway.require_key_on_loopback,
        max_body_bytes=max(1, gateway.max_body_mb) << 20,
        per_key_concurrency=gateway.per_key_concurrency,
        per_key_requests_per_minute=gateway.per_key_requests_per_minute,
        engine_api_key=engine_api_key,
    )


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port, or a clear error naming the port."""
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only when the listening
    # socket says TCP; with proto 0 every stream pays Nagle + delayed ACK (~40 ms) per token.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise PortInUseError(
                f"Port {port} is already in use on {host}, so the API gateway cannot listen.",
                hint=f"Stop the program using it (`ss -ltnp 'sport = :{port}'` shows it) or "
                "choose another port: `step-station config set gateway.port N`.",
            ) from err
        if err.errno == errno.EADDRNOTAVAIL:
            raise SettingsError(
                f"Address {host} is not on this machine, so the gateway cannot listen on it.",
                hint="Pick one of the addresses shown in the Sharing tab, or leave "
                "gateway.interface empty.",
            ) from err
        raise PortInUseError(
            f"The gateway cannot listen on {host}:{port} ({err.strerror}).",
            hint="Choose another port: `step-station config set gateway.port N`.",
        ) from err
    sock.set_inheritable(True)
    return sock


@dataclass
class _Listener:
    host: str
    port: int
    server: uvicorn.Server
    task: asyncio.Task[None]
    shared: bool = False  # listening for the LAN: its clients are cut when that ends


class Gateway:
    """The LAN endpoint: `start()`, `stop()`, `apply_settings(settings)`."""

    def __init__(
        self,
        settings: st.Settings,
        keys: KeyStore,
        engine: EngineOwner,
        *,
        engine_api_key: str = "",
        access: AccessLog | None = None,
        access_log_file: bool = True,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self._engine_api_key = engine_api_key  # fixed (an engine the appliance does not run)
        self.access = access or AccessLog()
        self._log_file = access_log_file
        self.gate = EngineGate(
            engine,
            start_on_request=lambda: self.settings.gateway.start_on_request,
            wake_on_request=lambda: self.settings.engine.idle_sleep_minutes > 0,
        )
        self.app = GatewayApp(
            keys=keys,
            gate=self.gate,
            config=config_for(settings.gateway, LOOPBACK, engine_api_key),
            access=self.access,
        )
        self._lock = threading.RLock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._listener: _Listener | None = None
        self._draining: list[_Listener] = []
        self._flusher: asyncio.Task[None] | None = None
        # per-address connection cap and header read timeout, at accept (see limits.py)
        self.connections = ConnectionGuard()
        # vLLM's router in front of this Station's engine and its fleet's (appliance/fleet)
        self.fleet = Fleet()
        self.app.fleet = self.fleet
        # the engine's key is new on every start: follow it
        engine.add_listener(lambda status: self._follow_engine_key())

    @property
    def engine_api_key(self) -> str:
        """The key the engine requires on /v1: the supervisor's current one (fresh on every
        engine start, set before the engine runs), else the fixed one given."""
        return self.gate.engine.engine_api_key or self._engine_api_key

    def _follow_engine_key(self) -> None:
        key = self.engine_api_key
        if self.app.config.engine_api_key != key:
            self.app.config = dataclasses.replace(self.app.config, engine_api_key=key)

    # ------------------------------------------------------------------------------ state

    @property
    def running(self) -> bool:
        return self._listener is not None

    @property
    def host(self) -> str:
        return self._listener.host if self._listener else ""

    @property
    def port(self) -> int:
        return self._listener.port if self._listener else 0

    @property
    def shared(self) -> bool:
        """Listening for the LAN (sharing on, or bound beyond loopback)."""
        listener = self._listener
        if listener is None:
            return False
        return self.settings.gateway.share_lan or not is_loopback(listener.host)

    @property
    def require_key(self) -> bool:
        return self.app.config.require_key

    @property
    def local_url(self) -> str:
        """A base URL that reaches the gateway from this machine."""
        host = LOOPBACK if self.host in ("", EVERY_INTERFACE) else self.host
        return f"http://{host}:{self.port}/v1"

    def recent(self, limit: int = 50) -> list[AccessRecord]:
        return self.access.recent(limit)

    # -------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Listen as the settings say. Raises PortInUseError (naming the port) or SettingsError."""
        with self._lock:
            if self._listener is not None:
                return
            host = bind_host(self.settings.gateway)
            sock = bind_socket(host, self.settings.gateway.port)
            self._ensure_loop()
            if self._log_file:
                self.access.attach_file(st.data_dir() / "logs" / "gateway-access.log")
            self.app.config = config_for(self.settings.gateway, host, self.engine_api_key)
            _apply_limits(self, self.settings)
            self._listener = self._call(self._serve(sock, host))
            self._listener.shared = self.settings.gateway.share_lan or not is_loopback(host)
            self._flusher = self._call(self._start_flusher())
            log.info("gateway listening on %s:%d", host, self._listener.port)
            self.fleet.sync(self.settings, self.local_url.removesuffix("/v1"))

    def stop(self) -> None:
        """Stop listening, let running requests end for a few seconds, save usage counts."""
        with self._lock:
            if self._loop is None:
                return
            listeners = [x for x in [self._listener, *self._draining] if x is not None]
            self._listener = None
            self._draining = []
            with contextlib.suppress(Exception):
                self._call(self._shutdown(listeners, STOP_GRACE_S), timeout=STOP_GRACE_S + 10)
            loop, self._loop = self._loop, None
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._thread = None
            loop.close()
            self.access.detach_file()
        self.fleet.close()
        self.keys.flush()

    def apply_settings(self, settings: st.Settings) -> None:
        """Adopt new settings now: limits at once, and a new listener if host or port changed."""
        with self._lock:
            host = bind_host(settings.gateway)
            port = settings.gateway.port
            old = self._listener
            self.gate.invalidate()
            if old is None or (old.host, old.port) == (host, port):
                self.settings = settings
                self.app.config = config_for(settings.gateway, host, self.engine_api_key)
                _apply_limits(self, settings)
                self.fleet.sync(settings, self.local_url.removesuffix("/v1"))
                return
            # Requests on a loopback-only listener may finish; a LAN listener's are cut at once,
            # since whatever replaces it no longer admits them (sharing off, other interface).
            cut = old.shared
            self._call(self._close_listening(old))
            try:
                sock = bind_socket(host, port)
            except BaseException:
                self._listener = self._call(self._serve(bind_socket(old.host, old.port), old.host))
                self._listener.shared = old.shared
                self._call(self._shutdown([old], DRAIN_S), timeout=None, wait=False)
                raise
            self.settings = settings
            self.app.config = config_for(settings.gateway, host, self.engine_api_key)
            _apply_limits(self, settings)
            self._listener = self._call(self._serve(sock, host))
            self._listener.shared = settings.gateway.share_lan or not is_loopback(host)
            self._draining.append(old)
            grace = 0.0 if cut else DRAIN_S
            self._call(self._retire(old, grace), wait=False)
            log.info("gateway moved from %s:%d to %s:%d", old.host, old.port, host, port)
            self.fleet.sync(settings, self.local_url.removesuffix("/v1"))

    # ------------------------------------------------------------------------ loop thread

    def _ensure_loop(self) -> None:
        if self._loop is not None:
            return
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="step-station-gateway", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread

    def _call(
        self, coro: Coroutine[Any, Any, T], timeout: float | None = 30.0, *, wait: bool = True
    ) -> T:
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        if not wait:
            return None  # type: ignore[return-value]
        return future.result(timeout)

    async def _serve(self, sock: socket.socket, host: str) -> _Listener:
        guarded = web_guard.HostOriginGuard(  # Host/Origin checks, no CORS grants: web_guard.py
            self.app,
            web_guard.GuardOptions(
                names=web_guard.HostNames(
                    lambda: host, lambda: web_guard.csv(self.settings.gateway.allowed_hosts)
                ),
                what="the Step Station API",
                setting="gateway",
                extra_origins=lambda: web_guard.csv(self.settings.gateway.allowed_origins),
                address_hint=lambda: f"http://127.0.0.1:{self.settings.gateway.port}/v1",
            ),
        )
        config = uvicorn.Config(
            guarded,
            lifespan="off",
            # httptools (C parser; h11 costs several times more CPU per streamed event), with a
            # header read timeout and a per-address connection cap (limits.guarded_protocol)
            http=guarded_protocol(self.connections),
            access_log=False,
            log_config=None,
            log_level="warning",
            proxy_headers=False,  # the client address must be the peer's, never a header's
            server_header=False,
            timeout_keep_alive=30,
            timeout_graceful_shutdown=int(DRAIN_S),
        )
        server = QuietServer(config)
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()  # raises what stopped it
                raise PortInUseError(f"The gateway could not start on {host}.")
            await asyncio.sleep(0.01)
        return _Listener(host, sock.getsockname()[1], server, task)

    async def _close_listening(self, listener: _Listener) -> None:
        for server in getattr(listener.server, "servers", []):
            server.close()

    async def _retire(self, listener: _Listener, grace: float) -> None:
        await self._shutdown([listener], grace)
        with contextlib.suppress(ValueError):
            self._draining.remove(listener)

    async def _shutdown(self, listeners: list[_Listener], grace: float) -> None:
        for listener in listeners:
            listener.server.should_exit = True
            if grace <= 0:
                _cut_connections(listener.server)
        for listener in listeners:
            try:
                await asyncio.wait_for(asyncio.shield(listener.task), timeout=grace + 1.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                listener.server.force_exit = True
                _cut_connections(listener.server)
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(listener.task, timeout=5.0)
        if self._listener is None and not self._draining:
            if self._flusher is not None:
                self._flusher.cancel()
            await self.app.aclose()

    async def _start_flusher(self) -> asyncio.Task[None]:
        async def flush_forever() -> None:
            while True:
                await asyncio.sleep(FLUSH_EVERY_S)
                self.app.sweep_idle()
                if self.keys.has_pending():
                    try:
                        await anyio.to_thread.run_sync(self.keys.flush)
                    except Exception:  # noqa: BLE001 - counts stay pending; retried next time
                        log.exception("saving API key usage failed")

        return asyncio.get_running_loop().create_task(flush_forever())


def _apply_limits(gateway: Gateway, settings: st.Settings) -> None:
    """The body caps that follow the engine's settings, and the connection guard's limits."""
    caps = BodyCaps(
        max_output_tokens=settings.engine.max_model_len or MAX_OUTPUT_TOKENS,
        max_images=max(1, settings.engine.max_images_per_prompt),
    )
    if gateway.app.config.caps != caps:
        gateway.app.config = dataclasses.replace(gateway.app.config, caps=caps)
    guard = gateway.connections
    guard.configure(settings.gateway.max_connections_per_address, settings.gateway.header_timeout_s)
    # every connection is a file descriptor of the process the UI shares: room for the cap
    guard.total = max(64, min(4096, raise_open_file_limit() // 2))


def _cut_connections(server: uvicorn.Server) -> None:
    """Close every open connection of a listener (sharing switched off: LAN clients are cut)."""
    for connection in list(server.server_state.connections):
        transport = getattr(connection, "transport", None)
        if transport is not None:
            transport.close()
