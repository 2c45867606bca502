"""Browser fixtures: one headless Chromium per session, a fresh page per test, real appliances.

    def test_x(appliance, page):
        app = appliance()                         # `step-station up --demo` on free ports
        app = appliance(sim={"tokens_per_s": 350}, settings={"chat": {"max_image_mb": 5}})
        page.goto(app.url)
        app.metrics()                             # the simulator's /metrics text
        app.kill(signal.SIGKILL); again = appliance(home=app.home)   # same data dir

Each appliance runs in its own process with its own STEP_STATION_HOME and free ports (UI, API,
engine). After the test: SIGTERM (a clean shutdown stops the demo engine), then SIGKILL, and any
demo engine left behind (after a kill -9) is stopped through its pid file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import tomllib
from fixtures.sim import free_port

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("STEP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Fast by default; a test that cares about speed passes its own knobs.
FAST_SIM = {"load_s": 0.5, "ttft_ms": 20, "tokens_per_s": 400}
START_TIMEOUT_S = 90


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/browser/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.browser)


# ------------------------------------------------------------------------------------ browser


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}; run scripts/harness.sh up")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        chromium.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


class _AssetWatch:
    """Tracks the page's loads. Chromium aborts requests in flight with ERR_NETWORK_CHANGED
    whenever Docker adds or removes a veth interface (other tests start containers), which can
    leave a Gradio page half-loaded (a component chunk, the config or the load event's stream
    lost). `goto`/`reload` below notice it and load the page again."""

    LONG_LIVED = ("/heartbeat/", "/queue/data")

    def __init__(self, page: Any) -> None:
        self.inflight: set[Any] = set()
        self.network_changed = False
        page.on("request", self._start)
        page.on("requestfinished", self._end)
        page.on("requestfailed", self._failed)

    def _start(self, request: Any) -> None:
        if not any(part in request.url for part in self.LONG_LIVED):
            self.inflight.add(request)

    def _end(self, request: Any) -> None:
        self.inflight.discard(request)

    def _failed(self, request: Any) -> None:
        self.inflight.discard(request)
        if "ERR_NETWORK_CHANGED" in (request.failure or ""):
            self.network_changed = True


def _robust(page: Any, watch: _AssetWatch, navigate: Callable[..., Any]) -> Callable[..., Any]:
    def load(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(4):
            watch.network_changed = False
            response = navigate(*args, **kwargs)
            deadline = time.monotonic() + 30
            quiet_since = None
            while time.monotonic() < deadline and not watch.network_changed:
                page.wait_for_timeout(100)
                if watch.inflight:
                    quiet_since = None
                elif quiet_since is None:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since > 1.0:
                    break
            if not watch.network_changed:
                return response
            print(f"page load hit ERR_NETWORK_CHANGED (attempt {attempt + 1}); loading again")
        return response

    return load


@pytest.fixture
def new_page(browser: Any, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """Factory: a page in a fresh browser context (its own storage), closed after the test."""
    opened: list[tuple[Any, list[str]]] = []

    def make() -> Any:
        context = browser.new_context(viewport={"width": 1440, "height": 1000})
        context.set_default_timeout(30_000)
        page = context.new_page()
        console: list[str] = []
        page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
        watch = _AssetWatch(page)
        page.goto = _robust(page, watch, page.goto)
        page.reload = _robust(page, watch, page.reload)
        opened.append((page, console))
        return page

    yield make
    report = getattr(request.node, "rep_call", None)
    for index, (page, console) in enumerate(opened):
        if report is not None and report.failed:
            # Leave evidence next to the test's files: what each page looked like and said.
            shot = tmp_path / f"failure-{index}.png"
            with contextlib.suppress(Exception):
                page.screenshot(path=str(shot))
            (tmp_path / f"console-{index}.log").write_text("\n".join(console))
            print(f"browser evidence: {shot}")
        page.context.close()


@pytest.fixture
def page(new_page: Callable[[], Any]) -> Any:
    """A page in a fresh browser context, 1440x1000, robust to Docker's network changes."""
    return new_page()


# ---------------------------------------------------------------------------------- appliance


@dataclass
class Appliance:
    """A running `step-station up --demo` process."""

    home: Path
    ui_port: int
    api_port: int
    engine_port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ui_port}/"

    @property
    def engine_url(self) -> str:
        return f"http://127.0.0.1:{self.engine_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(self.url + "healthz", timeout=2) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def metrics(self) -> str:
        with urllib.request.urlopen(self.engine_url + "/metrics", timeout=5) as response:
            return response.read().decode()

    def gauge(self, name: str = "vllm:num_requests_running") -> float:
        """Sum of a metric's samples in the engine's /metrics."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"step-station up exited with {self.proc.returncode}:\n{self.log()}")
            status = self.health()
            if status and status.get("engine") == "ready":
                return
            time.sleep(0.2)
        pytest.fail(f"appliance not ready after {timeout_s} s:\n{self.log()}")

    def engine_pid(self) -> int | None:
        for record in (self.home / "data").glob("*.process.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                return int(json.loads(record.read_text())["pid"])
        return None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=20)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
        if self.proc.poll() is None:
            self.kill(signal.SIGKILL)
        self._stop_leftover_engine()

    def _stop_leftover_engine(self) -> None:
        pid = self.engine_pid()
        if pid is None:
            return
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            # The pid file lives in this appliance's own data dir; check the pid was not reused.
            if "appliance.simulator" in " ".join(proc.cmdline()):
                proc.terminate()
                with contextlib.suppress(psutil.TimeoutExpired):
                    proc.wait(10)
                if proc.is_running():
                    proc.kill()


def _read_settings(home: Path) -> dict[str, dict[str, Any]]:
    path = home / "config" / "settings.toml"
    if not path.exists():
        return {}
    return tomllib.loads(path.read_text())


def _settings_toml(settings: dict[str, dict[str, Any]]) -> str:
    lines: list[str] = []
    for section, values in settings.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


@pytest.fixture
def appliance(tmp_path: Path) -> Iterator[Callable[..., Appliance]]:
    """Factory: start `step-station up --demo` on free ports; stopped after the test."""
    started: list[Appliance] = []

    def start(
        *,
        home: Path | None = None,
        sim: dict[str, Any] | None = None,
        settings: dict[str, dict[str, Any]] | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
        args: tuple[str, ...] = (),
        demo: bool = True,  # False: the engine settings decide (e.g. runtime=docker)
    ) -> Appliance:
        home = home or tmp_path / f"appliance-{len(started)}"
        ui_port, api_port = free_port(), free_port()
        # A restart on the same home keeps its settings, so it finds (adopts) the same engine.
        previous = _read_settings(home)
        engine_port = int(previous.get("engine", {}).get("port") or free_port())
        merged: dict[str, dict[str, Any]] = previous
        merged.setdefault("engine", {})["port"] = engine_port
        for section, values in (settings or {}).items():
            merged.setdefault(section, {}).update(values)
        config = home / "config"
        config.mkdir(parents=True, exist_ok=True)
        (config / "settings.toml").write_text(_settings_toml(merged))
        knobs = {**FAST_SIM, **(sim or {})}
        child_env = {
            **os.environ,
            "STEP_STATION_HOME": str(home),
            "GRADIO_ANALYTICS_ENABLED": "False",
            "PYTHONUNBUFFERED": "1",
            **{f"STEP_SIM_{k.upper()}": str(v) for k, v in knobs.items()},
            **(env or {}),
        }
        log_path = home / f"up-{len(started)}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "appliance",
                    "up",
                    *(["--demo"] if demo else []),
                    "--no-browser",
                    "--ui-port",
                    str(ui_port),
                    "--api-port",
                    str(api_port),
                    *args,
                ],
                cwd=REPO,
                env=child_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        app = Appliance(home, ui_port, api_port, engine_port, proc, log_path, child_env)
        started.append(app)
        if wait:
            app.wait_ready()
        return app

    yield start
    for app in reversed(started):
        app.stop()
