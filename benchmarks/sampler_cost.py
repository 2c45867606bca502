"""What the dashboard costs, before and after issue 16, side by side in one run: the sampler's and
the appliance's CPU per second and resident memory with no page, one and five dashboard pages and
one chat page; a click's round trip; the dashboard's update latency.

    .venv/bin/python benchmarks/sampler_cost.py [--window 30] [--calls 40] [--real-nvml]

Two appliances run at once: "before" is the old wiring brought back by environment variables
(STEP_STATION_LIVE=poll: a Gradio timer event per page every second; STEP_STATION_QUEUE_POLL_MS=5:
Gradio's queue polls every 5 ms; STEP_STATION_SAMPLER_IDLE_S=1: the sampler samples every second
with no page), "after" the default (values pushed through ui/live.py's stream, the queue asleep
until an event comes, the sampler every 5 s while no page watches). Each scenario is measured on
both, one after the other, so the machine's load hits both alike; the load average is printed.

Runs `step-station up --demo` (the simulator as engine, ready, so the metrics scrape runs too) in
its own STEP_STATION_HOME on free ports. The GPU is the simulated GB300 of the browser tests
(tests/browser/fake_nvml) unless `--real-nvml` (on a machine with an NVIDIA GPU): the sampler's
work per sample is then the same as on a Station minus the ~50 µs of NVML calls measured on an
H200 (reference/vllm.md). Pages are headless Chromium contexts on the Dashboard tab.

Measured from outside the appliance process, side by side in one run:
- sampler thread CPU per second of wall time (the thread named `ss-sampler`, /proc/PID/task);
- appliance process CPU per second (all threads: sampler, UI server answering the polls);
- appliance resident memory (RSS) at the end of each window;
- a click's round trip: the history search event (benchmarks/ui_idle.py's), no page open;
- the dashboard's update latency: on one open page, the age of each new "Sampled at" value when
  it lands in the page (the sample's time is in its `data-at`), median and p90.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<name>.py`

from benchmarks.common import (  # noqa: E402
    CHROMIUM_ARGS,
    REPO,
    launch_demo,
    open_url,
    wait_demo_ready,
)
from benchmarks.ui_idle import SearchEvent  # noqa: E402

VARIANTS = {
    "before": {
        "STEP_STATION_LIVE": "poll",
        "STEP_STATION_QUEUE_POLL_MS": "5",
        "STEP_STATION_SAMPLER_IDLE_S": "1",
    },
    "after": {},
}
# Each new "Sampled at" value's age when it lands in the page (ms), collected in the page.
LATENCY_JS = """() => {
  window.__ssAges = []; let last = null;
  new MutationObserver(() => {
    const el = document.getElementById('ss-sampled-at');
    if (!el || el.dataset.at === last) return;
    last = el.dataset.at;
    window.__ssAges.push(Date.now() - 1000 * parseFloat(last));
  }).observe(document.body, {childList: true, subtree: true});
}"""

FAKE_NVML = REPO / "tests" / "browser" / "fake_nvml"
TICKS = os.sysconf("SC_CLK_TCK")


def thread_cpu_s(pid: int, name: str) -> float:
    """utime + stime of the process's threads called `name`, in seconds."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().strip() != name:
                continue
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        except (OSError, IndexError, ValueError):
            continue
    return total / TICKS


def process_cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def start_appliance(
    home: Path, real_nvml: bool, extra: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    env = {} if real_nvml else {"PYTHONPATH": str(FAKE_NVML), "STEP_FAKE_NVML": "gb300"}
    proc, url = launch_demo(home, {**env, **(extra or {})})
    wait_demo_ready(proc, url, home)
    return proc, open_url(home, url)


def measure(pid: int, window_s: float) -> dict[str, float]:
    proc = psutil.Process(pid)
    t0, s0, p0 = time.monotonic(), thread_cpu_s(pid, "ss-sampler"), process_cpu_s(proc)
    time.sleep(window_s)
    t1, s1, p1 = time.monotonic(), thread_cpu_s(pid, "ss-sampler"), process_cpu_s(proc)
    wall = t1 - t0
    return {
        "sampler_ms_per_s": 1000 * (s1 - s0) / wall,
        "process_ms_per_s": 1000 * (p1 - p0) / wall,
        "rss_mb": proc.memory_info().rss / 1e6,
        "load": os.getloadavg()[0],
    }


def open_chats(browser: Browser, url: str, count: int) -> list[BrowserContext]:
    contexts = []
    for _ in range(count):
        context = browser.new_context(viewport={"width": 1440, "height": 1000})
        context.set_default_timeout(120_000)
        page = context.new_page()
        page.goto(url)
        page.locator("body[data-chat-loaded]").wait_for(state="attached")
        contexts.append(context)
    return contexts


def with_pages(
    browser: Browser, url: str, scenario: str, pid: int, window_s: float
) -> tuple[dict[str, float], list[float] | None]:
    """Open the scenario's pages, measure, close them; the update ages of one dashboard page."""
    chat = scenario.endswith("chat page")
    count = int(scenario.split()[0])
    contexts = open_chats(browser, url, count) if chat else open_dashboards(browser, url, count)
    page = contexts[0].pages[0]
    timed = count == 1 and not chat
    if timed:
        page.evaluate(LATENCY_JS)
    time.sleep(6)  # one plot refresh in
    row = measure(pid, window_s)
    ages = page.evaluate("() => window.__ssAges") if timed else None
    for context in contexts:
        context.close()
    time.sleep(3)  # the closed pages' streams and sessions end
    return row, ages


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def open_dashboards(browser: Browser, url: str, count: int) -> list[BrowserContext]:
    contexts = []
    for _ in range(count):
        context = browser.new_context(viewport={"width": 1440, "height": 1000})
        context.set_default_timeout(120_000)
        page = context.new_page()
        page.goto(url)
        deadline = time.monotonic() + 120
        while not page.locator("#ss-dashboard-panel").is_visible():
            if time.monotonic() > deadline:
                raise SystemExit("the Dashboard tab could not be opened in 120 s")
            try:  # the page's load events may still cover it; try again until it opens
                page.get_by_role("tab", name="Dashboard").click(timeout=5000)
            except Exception:
                continue
        try:
            page.locator('#ss-current [data-gpu="0"], #ss-current [data-card="no-gpu"]').wait_for()
        except Exception:
            page.screenshot(path="/tmp/sampler-cost-failure.png", full_page=True)
            raise
        contexts.append(context)
    return contexts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window", type=float, default=30.0, help="seconds per measurement")
    parser.add_argument("--calls", type=int, default=40, help="click round trips per variant")
    parser.add_argument("--real-nvml", action="store_true", help="use this machine's GPUs")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    scenarios = ["no page open", "1 dashboard page", "5 dashboard pages", "1 chat page"]
    rows: dict[tuple[str, str], dict[str, float]] = {}
    trips: dict[str, list[float]] = {}
    ages: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="sampler-cost-") as tmp:
        running: dict[str, tuple[subprocess.Popen[bytes], str, Path]] = {}
        try:
            for name, extra in VARIANTS.items():
                home = Path(tmp) / name
                proc, url = start_appliance(home, args.real_nvml, extra)
                running[name] = (proc, url, home)
            time.sleep(5)  # the first samples, imports and caches settle
            for name, (proc, _, _) in running.items():
                rows[(scenarios[0], name)] = measure(proc.pid, args.window)
            for name, (_, url, home) in running.items():
                search = SearchEvent(url.split("?", 1)[0], home)
                search.round_trip_ms()  # the session's first event (not counted)
                trips[name] = [search.round_trip_ms() for _ in range(args.calls)]
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=os.environ.get("STEP_CHROMIUM", "/usr/bin/chromium"),
                    args=CHROMIUM_ARGS,
                )
                for scenario in scenarios[1:]:
                    for name, (proc, url, _) in running.items():
                        rows[(scenario, name)], got = with_pages(
                            browser, url, scenario, proc.pid, args.window
                        )
                        if got is not None:
                            ages[name] = got
                browser.close()
        finally:
            for proc, _, _ in running.values():
                proc.send_signal(signal.SIGTERM)
            for proc, _, _ in running.values():
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    print(
        f"window {args.window:.0f} s each, sampler interval 1 s, "
        f"{'real NVML' if args.real_nvml else 'simulated GB300 NVML'}, demo engine ready, "
        f"{os.cpu_count()} cores"
    )
    print(
        "| scenario | variant | appliance CPU | % of a core | after / before | sampler thread "
        "| RSS | load avg |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for scenario in scenarios:
        before = rows[(scenario, "before")]
        for name in VARIANTS:
            row = rows[(scenario, name)]
            ratio = row["process_ms_per_s"] / max(before["process_ms_per_s"], 1e-9)
            print(
                f"| {scenario} | {name} | {row['process_ms_per_s']:.1f} ms/s "
                f"| {row['process_ms_per_s'] / 10:.2f}% | {ratio:.2f}x "
                f"| {row['sampler_ms_per_s']:.2f} ms/s | {row['rss_mb']:.0f} MB "
                f"| {row['load']:.1f} |"
            )
    print()
    print("| variant | click round trip median | p90 | dashboard update age median | p90 | n |")
    print("|---|---|---|---|---|---|")
    for name in VARIANTS:
        got = ages.get(name) or [float("nan")]
        print(
            f"| {name} | {statistics.median(trips[name]):.1f} ms | {pct(trips[name], 90):.1f} ms "
            f"| {statistics.median(got):.0f} ms | {pct(got, 90):.0f} ms | {len(got)} |"
        )


if __name__ == "__main__":
    main()
