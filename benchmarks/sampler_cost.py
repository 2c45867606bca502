"""What the dashboard costs: the sampler's CPU per second, the appliance's CPU and resident memory,
with no page, one page and five pages showing the dashboard.

    .venv/bin/python benchmarks/sampler_cost.py [--window 30] [--real-nvml]

Runs `step-station up --demo` (the simulator as engine, ready, so the metrics scrape runs too) in
its own STEP_STATION_HOME on free ports. The GPU is the simulated GB300 of the browser tests
(tests/browser/fake_nvml) unless `--real-nvml` (on a machine with an NVIDIA GPU): the sampler's
work per sample is then the same as on a Station minus the ~50 µs of NVML calls measured on an
H200 (reference/vllm.md). Pages are headless Chromium contexts on the Dashboard tab.

Measured from outside the appliance process, side by side in one run:
- sampler thread CPU per second of wall time (the thread named `ss-sampler`, /proc/PID/task);
- appliance process CPU per second (all threads: sampler, UI server answering the polls);
- appliance resident memory (RSS) at the end of each window.
"""

from __future__ import annotations

import argparse
import os
import signal
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


def start_appliance(home: Path, real_nvml: bool) -> tuple[subprocess.Popen[bytes], str]:
    env = {} if real_nvml else {"PYTHONPATH": str(FAKE_NVML), "STEP_FAKE_NVML": "gb300"}
    proc, url = launch_demo(home, env)
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
    }


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
    parser.add_argument("--real-nvml", action="store_true", help="use this machine's GPUs")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="sampler-cost-") as tmp:
        proc, url = start_appliance(Path(tmp) / "home", args.real_nvml)
        rows: list[tuple[str, dict[str, float]]] = []
        try:
            time.sleep(5)  # the first samples, imports and caches settle
            rows.append(("no page open", measure(proc.pid, args.window)))
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=os.environ.get("STEP_CHROMIUM", "/usr/bin/chromium"),
                    args=CHROMIUM_ARGS,
                )
                for count in (1, 5):
                    contexts = open_dashboards(browser, url, count)
                    time.sleep(6)  # one plot refresh in
                    rows.append((f"{count} dashboard page(s)", measure(proc.pid, args.window)))
                    for context in contexts:
                        context.close()
                browser.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    base = rows[0][1]
    print(
        f"window {args.window:.0f} s each, sampler interval 1 s, "
        f"{'real NVML' if args.real_nvml else 'simulated GB300 NVML'}, demo engine ready"
    )
    print(
        f"{'':<22}{'sampler CPU':>14}{'% of a core':>13}{'appliance CPU':>16}"
        f"{'x no page':>11}{'RSS':>10}{'x no page':>11}"
    )
    for name, row in rows:
        print(
            f"{name:<22}{row['sampler_ms_per_s']:>10.2f} ms/s"
            f"{row['sampler_ms_per_s'] / 10:>12.2f}%"
            f"{row['process_ms_per_s']:>12.1f} ms/s"
            f"{row['process_ms_per_s'] / max(base['process_ms_per_s'], 1e-9):>10.2f}x"
            f"{row['rss_mb']:>7.0f} MB"
            f"{row['rss_mb'] / base['rss_mb']:>10.2f}x"
        )


if __name__ == "__main__":
    main()
