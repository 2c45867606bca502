"""MoE tuning and the benchmark's mark in Chromium, against `step-station up --demo` (the
simulator as engine).

vLLM's tuner needs a GPU: it is replaced at its one seam, and the engine as the tuner sees it is
a Step-3.7 checkpoint on a GB300 (the demo's engine is a process, which tuning refuses): both in
tests/browser/fake_tuner/sitecustomize.py, in the appliance's own process. Everything else is
real: the Tune button goes through the service's TuneRunner, which stops the demo engine and
installs vLLM's file with its record; the Model tab reads the folder as vLLM does. The benchmark
is the service's BenchRunner running the `vllm` stand-in of tests/fixtures/bench_kit.py against
the simulator, started from a terminal (`step-station bench`), as an owner would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fixtures.appliance import Appliance
from fixtures.bench_kit import FAKE_VLLM, REAL
from fixtures.tune_kit import STEP37_FILE
from playwright.sync_api import expect

FAKE_TUNER = Path(__file__).with_name("fake_tuner")
DEADLINE_MS = 90_000  # the loaded 2-core machine: an engine stop, six tuner chunks, polls


def tuner_env(mode: str = "1") -> dict[str, str]:
    return {"PYTHONPATH": str(FAKE_TUNER), "STEP_FAKE_TUNER": mode}


def engine_state(app: Appliance) -> str:
    return str((app.health() or {}).get("engine"))


def open_tab(page: Any, app: Appliance, name: str) -> None:
    page.goto(app.url)
    page.get_by_role("tab", name=name).click()


def test_tune_asks_before_the_engine_stops_then_the_line_says_tuned(
    appliance: Any, page: Any
) -> None:
    app = appliance(env=tuner_env())
    open_tab(page, app, "Model")
    line = page.locator("#ss-tune-line")
    expect(line).to_contain_text("Not tuned for NVIDIA GB300", timeout=DEADLINE_MS)
    button = page.locator("#ss-tune-button")
    expect(button).to_be_enabled()
    confirm = page.locator("#ss-tune-confirm")
    expect(confirm).to_be_hidden()

    # The first click only asks: what stops, and for how long.
    button.click()
    expect(confirm).to_be_visible()
    expect(confirm).to_contain_text("The engine will be stopped.")
    expect(confirm).to_contain_text("18 batch sizes")  # the estimate for the default run
    expect(confirm).to_contain_text("Chat and the API are unavailable")
    assert engine_state(app) == "ready"
    page.locator("#ss-tune-back").click()
    expect(confirm).to_be_hidden()
    assert engine_state(app) == "ready"
    expect(page.locator("#ss-tune-progress")).not_to_contain_text("Tuning")

    # The second step tunes: the engine stops, vLLM's file is installed, the line follows.
    button.click()
    expect(confirm).to_be_visible()
    page.locator("#ss-tune-go").click()
    expect(confirm).to_be_hidden()
    expect(line).to_contain_text(
        "Tuned for NVIDIA GB300 with this engine image", timeout=DEADLINE_MS
    )
    expect(line).to_contain_text(STEP37_FILE)
    expect(line).to_contain_text("18 batch sizes")
    expect(page.locator("#ss-tune-progress")).to_contain_text("Tuning finished")
    expect(page.locator("#ss-tune-progress")).to_contain_text(STEP37_FILE)
    assert engine_state(app) == "stopped"  # stopped for the tuner, left stopped after it
    assert (app.home / "data" / "moe-configs" / STEP37_FILE).is_file()


def test_tuning_progress_and_cancel_from_the_tab(appliance: Any, page: Any) -> None:
    app = appliance(env=tuner_env("hold"))  # the tuner holds after its first batch size
    open_tab(page, app, "Model")
    expect(page.locator("#ss-tune-button")).to_be_enabled(timeout=DEADLINE_MS)
    page.locator("#ss-tune-button").click()
    page.locator("#ss-tune-go").click()
    progress = page.locator("#ss-tune-progress")
    expect(progress).to_contain_text(
        "Tuning MoE kernels: 1/18 batch sizes done", timeout=DEADLINE_MS
    )
    expect(progress).to_contain_text("left")  # the time left, from the run's own rate
    expect(page.locator("#ss-tune-button")).to_be_disabled()
    cancel = page.locator("#ss-tune-cancel")
    expect(cancel).to_be_enabled()
    cancel.click()
    expect(progress).to_contain_text(
        "Tuning cancelled; nothing was installed.", timeout=DEADLINE_MS
    )
    expect(page.locator("#ss-tune-line")).to_contain_text("Not tuned")
    expect(page.locator("#ss-tune-button")).to_be_enabled()
    assert not (app.home / "data" / "moe-configs" / STEP37_FILE).exists()


@pytest.fixture
def bench_env(tmp_path: Path) -> dict[str, str]:
    """The `vllm` stand-in first on the appliance's PATH: it sends one request per prompt to
    the engine (the simulator), with a pause between them, drawing vLLM's progress frames."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    program = bin_dir / "vllm"
    program.write_text(FAKE_VLLM.format(python=sys.executable))
    program.chmod(0o755)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FAKE_LOG": str(tmp_path / "fake-vllm.json"),
        "FAKE_RESULT": str(REAL),
        "FAKE_DELAY": "0.5",
    }


def test_dashboard_marks_a_running_benchmark_and_tuning_is_off_on_a_process_engine(
    appliance: Any, page: Any, bench_env: dict[str, str]
) -> None:
    app = appliance(env=bench_env)
    open_tab(page, app, "Dashboard")
    expect(page.locator("#ss-current")).to_contain_text("Engine", timeout=DEADLINE_MS)
    activity = page.locator("#ss-activity")
    expect(activity).not_to_contain_text("running")

    bench = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "appliance", "bench", "--num-prompts", "20", "--json"],
        env=app.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        expect(activity).to_contain_text(
            re.compile(r"Benchmark running: \d+/20 requests"), timeout=DEADLINE_MS
        )
        expect(activity).to_contain_text("GPU and engine numbers include its load")
        bench.wait(timeout=DEADLINE_MS / 1000)
    finally:
        if bench.poll() is None:
            bench.terminate()
            bench.wait(timeout=30)
    # The run is over (the stand-in's empty requests may fail: the mark is what is tested).
    expect(activity).not_to_contain_text("Benchmark running", timeout=DEADLINE_MS)

    # This engine is a process (the pip route): the tuner runs only in the engine image.
    page.get_by_role("tab", name="Model").click()
    expect(page.locator("#ss-tune-line")).to_contain_text("cannot tell", timeout=DEADLINE_MS)
    expect(page.locator("#ss-tune-line")).to_contain_text("this engine runs as a process")
    expect(page.locator("#ss-tune-note")).to_contain_text("Tuning is unavailable here")
    expect(page.locator("#ss-tune-button")).to_be_disabled()
    assert engine_state(app) == "ready"  # nothing stopped it
