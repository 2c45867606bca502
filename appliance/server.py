"""Composition root: build the services, the FastAPI app with the UI mounted, run the listeners.

`step-station up` calls `run()`. The UI listener is one uvicorn server on `ui.host:ui.port`
(loopback by default) serving `/healthz` and the Gradio UI at `/`. Ports are bound before
anything starts, so a taken port is a clear error naming the port and the setting to change, and
nothing is half-started. SIGINT and SIGTERM shut down cleanly: the listeners close, a demo
engine is stopped; a real engine keeps running and is adopted by the next start.

The UI itself (`ui/`) is imported lazily: `appliance/` never imports gradio at module level, and
the composition root is the one place that hands the services to `ui.app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import importlib
import logging
import os
import socket
import sys
import threading
import webbrowser
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from appliance import web_guard
from appliance.chat.history import History
from appliance.chat.service import ChatService, engine_view_from
from appliance.control import ControlServer
from appliance.errors import ApplianceError, PortInUseError
from appliance.keys import ui_lan_active
from appliance.login_guard import LoginGuard, tls_options
from appliance.services import Services
from appliance.settings import (
    Settings,
    SettingsStore,
    load_secrets,
    private_runtime,
    with_changes,
)
from appliance.uvicorn_server import QuietServer

if TYPE_CHECKING:
    from appliance.engine.supervisor import Supervisor

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5  # open streams get this long to finish on SIGTERM / Ctrl-C


# ------------------------------------------------------------------------------------- ports


@dataclass(frozen=True)
class Listener:
    """One port the appliance listens on and how the owner changes it."""

    host: str
    port: int
    setting: str  # e.g. "ui.port"
    flag: str  # e.g. "--ui-port"
    purpose: str  # e.g. "the browser UI"


def bind_port(listener: Listener) -> socket.socket:
    """Bind (not yet listen) the port, or raise PortInUseError naming it and its setting."""
    family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only when the listening
    # socket says TCP; without it Nagle held each small write (an event's SSE message) ~40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind((listener.host, listener.port))
    except OSError as err:
        sock.close()
        if err.errno in (errno.EADDRINUSE, errno.EACCES):
            why = "is in use by another program" if err.errno == errno.EADDRINUSE else "is reserved"
            raise PortInUseError(
                f"Port {listener.port} on {listener.host} ({listener.setting}, {listener.purpose}) "
                f"{why}.",
                hint=f"Stop the program using it, or pick another port: `step-station up "
                f"{listener.flag} N` for this run, or `step-station config set {listener.setting} "
                "N` to keep it.",
            ) from err
        raise PortInUseError(
            f"Cannot listen on {listener.host}:{listener.port} ({listener.setting}): "
            f"{err.strerror}.",
            hint=f"Check ui.host / {listener.setting} with `step-station config show`.",
        ) from err
    sock.setblocking(False)
    return sock


def ui_listener(settings: Settings) -> Listener:
    from appliance.keys import ui_bind_host  # "UI on LAN" (Sharing tab) needs the owner login

    host = ui_bind_host(settings)
    return Listener(host, settings.ui.port, "ui.port", "--ui-port", "the browser UI")


def gateway_listener(settings: Settings) -> Listener:
    from appliance.gateway.service import bind_host  # interface names resolve to addresses

    host = bind_host(settings.gateway)
    return Listener(
        host, settings.gateway.port, "gateway.port", "--api-port", "the OpenAI-compatible API"
    )


# ---------------------------------------------------------------------------------- services


def build_services(settings: Settings, *, demo: bool) -> Services:
    """Create every long-lived service (nothing is started here: see `lifespan`).

    `settings` become the store's first snapshot; every part that keeps settings of its own
    follows the store (subscribed here), so a change saved through `store.update` (the UI, or
    `step-station config set` over the control socket) reaches them at once."""
    from appliance.engine.supervisor import Supervisor  # heavy imports only when serving
    from appliance.gateway import Gateway
    from appliance.keys import KeyStore
    from appliance.monitoring.sampler import build_sampler
    from appliance.monitoring.timeline import ProgressRates

    store = SettingsStore(settings)
    secrets = load_secrets()
    history = History()
    # The service's supervisor looks at a serving engine every 5 s (inspect, /health, idle
    # sleep) and for engines started elsewhere every 10 s, not every 1 / 2 / 2 s: an engine's
    # exit ends its log stream, which wakes the monitor at once (EngineContext.tick), so the
    # looks are a safety net; each is a Docker API call (~1.2 ms of CPU, measured) or an HTTP
    # probe, and an idle appliance should cost nearly nothing (issue 16).
    make = Supervisor.for_demo if demo else functools.partial(Supervisor, secrets=secrets)
    supervisor = make(settings, monitor_interval_s=5.0, health_interval_s=5.0, outside_poll_s=10.0)
    chat = ChatService(
        settings,
        history,
        lambda: engine_view_from(supervisor),
        activity=supervisor,  # wakes a sleeping engine; no idle sleep mid-answer
    )
    # the model tab's and dashboard's sampler, and the start-up rates (pull / download)
    progress_rates = ProgressRates()
    supervisor.add_listener(progress_rates.observe)
    sampler = build_sampler(settings, supervisor)
    # the LAN API: API keys and the gateway (its own listener, started in `lifespan`)
    keys = KeyStore()
    gateway = Gateway(settings, keys, supervisor)
    _follow_store(store, supervisor, demo=demo)
    store.subscribe(gateway.apply_settings)  # limits at once; a new listener if its port moved

    def readers_follow(new: Settings) -> None:  # they read `.settings` at each use
        chat.settings = new
        sampler.settings = new

    store.subscribe(readers_follow)
    # the benchmark: beside whatever runtime the supervisor has at the moment of the run
    from appliance.bench.runner import BenchRunner
    from appliance.control import launcher_for

    bench = BenchRunner(
        launcher_for=lambda target: launcher_for(supervisor.runtime)(target), keys=keys
    )
    # MoE tuning: vLLM's tuner beside the engine's runtime; refused while a benchmark runs
    from appliance.bench.tuning import TuneRunner
    from appliance.control import tune_launcher_for

    tuner = TuneRunner(
        launcher_for=lambda target: tune_launcher_for(supervisor.runtime)(target),
        ensure_bench_idle=bench.ensure_idle,
    )
    # the tuner holds the whole GPU for hours: no door may start the engine beside it
    supervisor.add_start_guard(tuner.start_refusal)
    return Services(
        store=store,
        secrets=secrets,
        demo=demo,
        supervisor=supervisor,
        history=history,
        chat=chat,
        sampler=sampler,
        progress_rates=progress_rates,
        keys=keys,
        gateway=gateway,
        bench=bench,
        tune=tuner,
    )


def _follow_store(store: SettingsStore, supervisor: Supervisor, *, demo: bool) -> None:
    """The supervisor takes each new snapshot (a running engine launched with other settings
    then says it needs a restart). The demo's engine is the simulator whatever engine.runtime
    says (`Supervisor.for_demo`), so its snapshots keep the process runtime."""
    if demo:
        store.subscribe(
            lambda new: supervisor.apply_settings(with_changes(new, {"engine.runtime": "process"}))
        )
    else:
        store.subscribe(supervisor.apply_settings)


def _start_engine(services: Services) -> None:
    supervisor = services.supervisor
    status = supervisor.attach()  # adopt a running engine; never starts a second one
    if services.demo and not status.state.running and not status.state.busy:
        supervisor.start()  # returns at once; the UI shows the phases


def _stop_engine(services: Services) -> None:
    supervisor = services.supervisor
    if services.demo:
        supervisor.stop()  # the simulator belongs to this run
    supervisor.close()  # a real engine keeps serving and is adopted next time


def _start_control(services: Services) -> ControlServer | None:
    """The CLI's way in (appliance/control.py): from here on `step-station start/stop/status`
    drive this service's supervisor instead of running their own."""
    control = ControlServer(
        services.supervisor,
        services.store,
        keys=services.keys,
        bench=services.bench,
        tune=services.tune,
        gpu_name=lambda: _engine_gpu_name(services),
    )
    try:
        control.start()
    except ApplianceError as err:
        log.warning("the CLI cannot reach this service: %s", err)
        return None
    return control


def _engine_gpu_name(services: Services) -> str:
    """The engine's GPU as the sampler last saw it ("" before its first sample, or no GPU)."""
    sample = services.sampler.latest()
    gpu = sample.engine_gpu() if sample is not None else None
    return gpu.name if gpu is not None else ""


# ---- gateway: started after the UI's services, stopped before the engine (gateway owner) ----


def _start_gateway(services: Services) -> None:
    services.gateway.start()


def _stop_gateway(services: Services) -> None:
    services.gateway.stop()


# ----------------------------------------------------------------------------------- the app


def create_app(services: Services) -> FastAPI:
    """The UI listener's app: `/healthz`, then the Gradio UI mounted at `/`."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        del app
        services.history.open()
        await asyncio.to_thread(_start_engine, services)
        control = _start_control(services)
        services.sampler.start()
        _start_gateway(services)
        try:
            yield
        finally:
            if control is not None:
                await asyncio.to_thread(control.stop)
            _stop_gateway(services)
            services.sampler.stop()
            await services.chat.aclose()
            await asyncio.to_thread(_stop_engine, services)
            services.history.close()

    app = FastAPI(title="Step Station", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        status = services.supervisor.status()
        return JSONResponse({"ok": True, "demo": services.demo, "engine": status.state.value})

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    # Gradio's queue keeps the last 10,000 events' timings and, after every event, summarises
    # them with pandas (a DataFrame and a group-by, for its own /monitoring page, which the UI
    # guard does not serve): the most CPU of an open dashboard's events, growing with uptime.
    # One record, never summarised (gradio/queueing.py `compute_analytics_summary`).
    os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(2**62))
    ui_app: Any = importlib.import_module("ui.app")  # the one hand-off to the UI layer
    return ui_app.mount(app, services)  # type: ignore[no-any-return]


def guard_ui(app: Any, settings: Callable[[], Settings], bind_host: str) -> Any:
    """The UI listener's door (appliance/web_guard.py): Host and Origin checks and closed CORS
    outside, the route allowlist and the per-install secret (or the owner login) inside.
    `settings` gives the snapshot in force: extra names and origins apply as soon as they are
    saved; the port and "UI on LAN" are the ones this run started with."""
    from appliance.keys import ui_lan_active

    started = settings()
    token = None if ui_lan_active(started) else web_guard.ui_token()
    locked = web_guard.UiLock(app, started.ui.port, lambda: token)
    options = web_guard.GuardOptions(
        names=web_guard.HostNames(
            lambda: bind_host, lambda: web_guard.csv(settings().ui.allowed_hosts)
        ),
        what="the Step Station UI",
        setting="ui",
        extra_origins=lambda: web_guard.csv(settings().ui.allowed_origins),
        address_hint=lambda: f"http://127.0.0.1:{started.ui.port}/",
    )
    return web_guard.HostOriginGuard(locked, options)


# ------------------------------------------------------------------------------------ running


def run(
    settings: Settings,
    *,
    demo: bool = False,
    open_browser: bool = True,
    announce: Callable[[str], None] = lambda line: None,
) -> int:
    """Run until SIGINT/SIGTERM. Ports are checked (bound) before anything starts."""
    ui = ui_listener(settings)
    ui_sock = bind_port(ui)
    try:
        # umask 077, private folders, Gradio's temp dir private and empty: before gradio loads.
        private_runtime()
        services = build_services(settings, demo=demo)
        bind_port(gateway_listener(settings)).close()  # the gateway binds it itself
        app = guard_ui(
            LoginGuard(create_app(services), require_session=ui_lan_active(settings)),
            services.store.current,
            ui.host,
        )
        tls = tls_options(settings)  # ui.tls_cert / ui.tls_key: checked before anything runs
    except BaseException:
        ui_sock.close()
        raise
    config = uvicorn.Config(
        app,
        log_level="warning",
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        lifespan="on",
        ws="none",
        ssl_certfile=tls.get("ssl_certfile"),
        ssl_keyfile=tls.get("ssl_keyfile"),
    )
    server = QuietServer(config)
    url = f"{'https' if tls else 'http'}://{_url_host(ui.host)}:{ui.port}/"
    browser_url = web_guard.open_url(settings, _url_host(ui.host))  # carries the UI secret

    def when_started() -> None:
        while not server.started and not server.should_exit:
            threading.Event().wait(0.05)
        if server.started:
            announce(
                f"Step Station is up at {url}"
                + (" (demo: simulated engine)" if demo else "")
                + ". Open it with `step-station open`."
            )
            if _interactive():  # the owner's own terminal, as Jupyter does; never into a log
                announce(f"Or open this address (it carries the UI's secret): {browser_url}")
            if open_browser and _has_display():
                webbrowser.open(browser_url)

    threading.Thread(target=when_started, name="announce", daemon=True).start()
    server.run(sockets=[ui_sock])
    return 0


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _interactive() -> bool:
    """stdout is a terminal (not the journal of a service, not a file)."""
    try:
        return os.isatty(sys.stdout.fileno())
    except (OSError, ValueError):
        return False


def _has_display() -> bool:
    """Only open a browser where one can appear (never a text browser in a terminal)."""
    if sys.platform == "darwin":
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
