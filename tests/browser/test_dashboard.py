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


# Counts the writes the live stream makes into the cards (ui/live.py pushes, the page writes).
COUNT_WRITES_JS = """() => {
  window.__ssWrites = 0;
  new MutationObserver((records) => {
    if (records.some(r => r.target.closest && r.target.closest('#ss-current-live')))
      window.__ssWrites++;
  }).observe(document.body, {childList: true, subtree: true});
}"""


def writes(page) -> int:
    return int(page.evaluate("() => window.__ssWrites"))


class Polls:
    """Counts the page's event requests (Gradio queue joins) by dependency id, and the live
    streams it opens (EventSource requests to /ss-live/dashboard)."""

    def __init__(self, page) -> None:
        self.fn_ids: list[int] = []
        self.streams = 0
        page.on("request", self._on_request)

    def _on_request(self, request) -> None:
        if "/ss-live/dashboard" in request.url:
            self.streams += 1
        if "queue/join" in request.url and request.post_data:
            match = re.search(r'"fn_index":\s*(\d+)', request.post_data)
            if match:
                self.fn_ids.append(int(match.group(1)))

    def count(self, ids: set[int]) -> int:
        return sum(1 for fn in self.fn_ids if fn in ids)


QUIET_WINDOW_MS = 3000  # over two poll periods: how long "no polls" is watched for


def settled_count(page, polls: Polls, ids: set[int], timeout_s: float = 15) -> int:
    """The poll count once a poll that was already under way has landed (no new one for a
    second), so the quiet window that follows starts clean."""
    deadline = time.monotonic() + timeout_s
    last = polls.count(ids)
    while time.monotonic() < deadline:
        page.wait_for_timeout(1000)
        now = polls.count(ids)
        if now == last:
            return now
        last = now
    raise AssertionError(f"the dashboard kept polling for {timeout_s} s after it was hidden")


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
    """The current values are pushed (one live stream per visible page, ui/live.py), the plots
    polled every 5 s; neither while the tab or the browser tab is hidden."""
    app = appliance(env=FAKE_GPU_ENV, sim={"tokens_per_s": 120, "output_tokens": 2400})
    polls = Polls(page)
    page.goto(app.url)
    assert page.evaluate(TICK_IDS_JS, "ss-current") == []  # pushed, not polled
    plots_tick = set(page.evaluate(TICK_IDS_JS, "ss-plot-memory"))
    assert plots_tick
    dashboard = plots_tick
    page.evaluate(COUNT_WRITES_JS)

    # The chat tab is in front: the dashboard never polls and opens no stream (watched for more
    # than two poll periods: a window in which nothing may happen, not a wait for something).
    page.wait_for_timeout(QUIET_WINDOW_MS)
    assert polls.count(dashboard) == 0
    assert polls.streams == 0
    assert writes(page) == 0

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
    with_traffic = polls.count(plots_tick)  # one more plot refresh with the traffic in it
    page_wait_until(page, lambda: polls.count(plots_tick) > with_traffic, timeout_s=30)
    screenshot(page, "dashboard.png", full_page=True)
    load.join(60)
    expect(field(page, "time-to-first-token")).to_contain_text(" ms", timeout=10_000)
    expect(field(page, "requests-running")).to_have_text("0", timeout=20_000)

    assert polls.streams == 1  # one stream for the whole visit, whatever it showed

    # Another tab in front: the polls stop, the stream is closed, nothing is written.
    page.get_by_role("tab", name="Chat").click()
    page_wait_until(page, lambda: live_state(page) == "closed", timeout_s=15)
    stopped_at = settled_count(page, polls, dashboard)
    written = writes(page)
    page.wait_for_timeout(QUIET_WINDOW_MS)
    assert polls.count(dashboard) == stopped_at
    assert writes(page) == written

    # Back on the dashboard they resume: a new stream, new values written.
    page.get_by_role("tab", name="Dashboard").click()
    page_wait_until(page, lambda: polls.count(dashboard) > stopped_at, timeout_s=15)
    page_wait_until(page, lambda: writes(page) > written, timeout_s=15)
    assert polls.streams == 2

    # The browser tab in the background: nothing either.
    page.evaluate(HIDE_JS, "hidden")
    page_wait_until(page, lambda: live_state(page) == "closed", timeout_s=15)
    hidden_at = settled_count(page, polls, dashboard)
    written = writes(page)
    page.wait_for_timeout(QUIET_WINDOW_MS)
    assert polls.count(dashboard) == hidden_at
    assert writes(page) == written
    page.evaluate(HIDE_JS, "visible")
    page_wait_until(page, lambda: polls.count(dashboard) > hidden_at, timeout_s=15)
    page_wait_until(page, lambda: writes(page) > written, timeout_s=15)


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
