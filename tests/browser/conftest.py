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
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.appliance import FAST_SIM, START_TIMEOUT_S, Appliance, appliance

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
__all__ = ["FAST_SIM", "START_TIMEOUT_S", "Appliance", "appliance"]  # the appliance fixture


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
