"""The dashboard tab in Chromium against `step-station up --demo` (the simulator as engine).

The GPU is a simulated GB300 (tests/browser/fake_nvml: NVML is the one seam that cannot run
without a GPU; tests/gpu/ runs the same sampler on a real H200). Everything else is real: the
demo engine's host PID is found through the process runtime and labelled as the engine, its
metrics are scraped from the simulator's /metrics while chat requests run through the OpenAI SDK.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from chat_page import screenshot
from openai import OpenAI
from playwright.sync_api import expect

from appliance import endpoint

REPO = Path(__file__).resolve().parents[2]
FAKE_NVML = Path(__file__).with_name("fake_nvml")
FAKE_GPU_ENV = {"PYTHONPATH": str(FAKE_NVML), "STEP_FAKE_NVML": "gb300"}

TICK_IDS_JS = """(elemId) => {
  const config = window.gradio_config;
  const target = config.components.find(c => c.props && c.props.elem_id === elemId);
  if (!target) return [];
  return config.dependencies
    .filter(d => d.targets.some(t => t[1] === 'tick') && d.outputs.includes(target.id))
    .map(d => d.id);
}"""

HIDE_JS = """(state) => {
  Object.defineProperty(document, 'visibilityState', {value: state, configurable: true});
  document.dispatchEvent(new Event('visibilitychange'));
}"""


# Counts the writes the live stream makes into the cards and into the plots (ui/live.py pushes,
# the page writes).
COUNT_WRITES_JS = """() => {
  window.__ssWrites = 0; window.__ssPlotWrites = 0;
  new MutationObserver((records) => {
    const into = (id) => records.some(r => r.target.closest && r.target.closest('#' + id));
    if (into('ss-current-live')) window.__ssWrites++;
    if (into('ss-plots-live')) window.__ssPlotWrites++;
  }).observe(document.body, {childList: true, subtree: true});
}"""


def writes(page) -> int:
    return int(page.evaluate("() => window.__ssWrites"))


def plot_writes(page) -> int:
    return int(page.evaluate("() => window.__ssPlotWrites"))


def newest_generation(page) -> float:
    """The newest point of the tokens plot's generation line (0 while it is not drawn)."""
    line = page.locator('#ss-plot-tokens polyline[data-series="generation"]')
    return float(line.get_attribute("data-last") or 0) if line.count() else 0.0


class Polls:
    """Counts the page's Gradio events (queue joins) and the live streams it opens (EventSource
    requests to /ss-live/dashboard)."""

    def __init__(self, page) -> None:
        self.events = 0
        self.streams = 0
        page.on("request", self._on_request)

    def _on_request(self, request) -> None:
        if "/ss-live/dashboard" in request.url:
            self.streams += 1
        if "queue/join" in request.url:
            self.events += 1


QUIET_WINDOW_MS = 3000  # over two value periods: how long "nothing written" is watched for
PLOTS_QUIET_MS = 6000  # over one plot period (PLOT_EVERY_S)


def page_wait_until(page, predicate, timeout_s: float) -> None:
    """Poll `predicate` until true, letting the page run in between (Playwright's sync API
    handles the page's events only inside its own calls: a plain sleep would hold them back, and
    the poll counter would never move)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        page.wait_for_timeout(100)


def chat_load(
    engine_url: str, api_key: str, requests: int = 2, max_tokens: int = 700
) -> threading.Thread:
    def run() -> None:
        client = OpenAI(**endpoint.openai_kwargs(engine_url), api_key=api_key)  # its socket

        def one() -> None:
            stream = client.chat.completions.create(
                model="step3p7-flash",
                messages=[{"role": "user", "content": "Tell me a long story about GPUs."}],
                max_tokens=max_tokens,
                stream=True,
                extra_body={"reasoning_effort": "low"},
            )
            for _ in stream:
                pass

        workers = [threading.Thread(target=one) for _ in range(requests)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def field(page, name: str):
    return page.locator(f'#ss-current [data-field="{name}"]')


def live_state(page) -> str | None:
    return page.evaluate("() => document.body.dataset.ssDashboardLive || null")


def test_dashboard_shows_the_engine_gpu_metrics_and_polls_only_while_visible(appliance, page):
    """The current values and the plots are pushed (one live stream per visible page, ui/live.py;
    the plots are server-drawn SVG every 5 s): no Gradio event at all, and nothing while the tab
    or the browser tab is hidden."""
    app = appliance(env=FAKE_GPU_ENV, sim={"tokens_per_s": 120, "output_tokens": 2400})
    polls = Polls(page)
    page.goto(app.url)
    for elem_id in ("ss-current", "ss-breakdown", "ss-plots"):
        assert page.evaluate(TICK_IDS_JS, elem_id) == []  # pushed, not polled
    page.evaluate(COUNT_WRITES_JS)

    # The chat tab is in front: the dashboard opens no stream and nothing is written into it
    # (watched for longer than the values' period: a window in which nothing may happen).
    page.wait_for_timeout(QUIET_WINDOW_MS)
    assert polls.streams == 0
    assert writes(page) == 0
    assert plot_writes(page) == 0

    page.get_by_role("tab", name="Dashboard").click()
    gpu = page.locator('#ss-current [data-gpu="0"]')
    expect(gpu).to_contain_text("NVIDIA GB300")
    expect(gpu.locator('[data-field="memory"]')).to_contain_text("of 250.7 GiB")  # 256,703 MiB
    engine_row = gpu.locator("tr.ss-engine")
    expect(engine_row).to_contain_text("Step-3.7-Flash engine")
    assert engine_row.get_attribute("data-pid") == str(app.engine_pid())
    expect(gpu.locator('tr[data-pid="4242"]')).not_to_have_class("ss-engine")
    expect(field(page, "cpu")).to_contain_text("%")
    expect(field(page, "disk")).to_contain_text("iB")
    expect(field(page, "sleep-state")).to_have_text("awake")
    expect(page.locator("#ss-plot-memory svg")).to_be_visible()

    # On the dashboard the page sends no Gradio event at all: values and plots are pushed.
    events = polls.events
    page.wait_for_timeout(PLOTS_QUIET_MS)
    assert polls.events == events
    assert plot_writes(page) >= 2  # the first drawing, and the one 5 s later

    # Memory breakdown: weights and the KV-cache pool from the engine's own log lines.
    breakdown = page.locator("#ss-breakdown")
    expect(breakdown.locator('[data-part="Weights"]')).to_contain_text("198.3 GiB")
    expect(breakdown.locator('[data-part="KV cache reserved, free"]')).to_be_visible()
    expect(breakdown.locator('[data-part="Other processes"]')).to_contain_text("1.2 GiB")
    expect(breakdown).to_contain_text("vLLM reserves most of the GPU when it starts")

    # Traffic: the engine numbers and the plots follow it.
    # the engine's per-start key, from the appliance's private key file (engine_key.py)
    (key_file,) = (app.home / "data" / "engine-keys").glob("*/*/engine-key")
    load = chat_load(app.engine_url, key_file.read_text().strip())
    expect(field(page, "requests-running")).to_have_text("2", timeout=20_000)
    expect(field(page, "generation")).not_to_have_text(re.compile(r"^(0\.0 tokens/s|n/a)$"))
    expect(page.locator("#ss-plot-tokens")).to_be_visible(timeout=15_000)
    expect(page.locator("#ss-plot-kv")).to_be_visible()
    expect(page.locator("#ss-plot-memory")).to_be_visible()
    page_wait_until(page, lambda: newest_generation(page) > 0, timeout_s=30)  # redrawn with it
    screenshot(page, "dashboard.png", full_page=True)
    load.join(60)
    expect(field(page, "time-to-first-token")).to_contain_text(" ms", timeout=10_000)
    expect(field(page, "requests-running")).to_have_text("0", timeout=20_000)

    assert polls.streams == 1  # one stream for the whole visit, whatever it showed

    # Another tab in front: the stream is closed, nothing is written.
    page.get_by_role("tab", name="Chat").click()
    page_wait_until(page, lambda: live_state(page) == "closed", timeout_s=15)
    written, plotted = writes(page), plot_writes(page)
    page.wait_for_timeout(PLOTS_QUIET_MS)
    assert (writes(page), plot_writes(page)) == (written, plotted)

    # Back on the dashboard: a new stream, whose first message brings values and plots.
    page.get_by_role("tab", name="Dashboard").click()
    page_wait_until(page, lambda: writes(page) > written, timeout_s=15)
    page_wait_until(page, lambda: plot_writes(page) > plotted, timeout_s=15)
    assert polls.streams == 2

    # The browser tab in the background: nothing either.
    page.evaluate(HIDE_JS, "hidden")
    page_wait_until(page, lambda: live_state(page) == "closed", timeout_s=15)
    written, plotted = writes(page), plot_writes(page)
    page.wait_for_timeout(PLOTS_QUIET_MS)
    assert (writes(page), plot_writes(page)) == (written, plotted)
    page.evaluate(HIDE_JS, "visible")
    page_wait_until(page, lambda: writes(page) > written, timeout_s=15)
    page_wait_until(page, lambda: plot_writes(page) > plotted, timeout_s=15)
    assert polls.streams == 3


def test_dashboard_without_a_gpu_says_why(appliance, page):
    """This machine has no NVIDIA driver: the real NVML path answers, and the page says so."""
    app = appliance()
    page.goto(app.url)
    page.get_by_role("tab", name="Dashboard").click()
    expect(page.locator('#ss-current [data-card="no-gpu"]')).to_contain_text("NVML unavailable")
    expect(field(page, "host-memory")).to_contain_text("iB of ")
    expect(page.locator("#ss-breakdown")).to_contain_text("No GPU memory reading")
    expect(page.locator("#ss-plot-memory")).to_be_hidden()
    expect(page.locator("#ss-plot-kv")).to_be_visible(timeout=15_000)
