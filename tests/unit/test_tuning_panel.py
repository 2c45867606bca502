"""The Model tab's Tune button, the Benchmark tab's before/after section and the dashboard's mark
of a running benchmark or tuning, without a browser.

The runner is the real TuneRunner with vLLM's tuner replaced at its GPU seam (the fake of
tests/fixtures/tune_kit.py); the engine's stop is a callable that records when it was called."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from fixtures.bench_kit import DEADLINE_S, wait_for
from fixtures.tune_kit import STEP37_FILE, TARGET, FakeTuner

from appliance.bench.errors import BenchError, TunedConfigError
from appliance.bench.runner import BenchState
from appliance.bench.store import BenchStore, RunInfo
from appliance.bench.tuning import TuneRequest, TuneRunner, TuneState, TuneTarget
from appliance.controllers import dashboard
from appliance.controllers.tuning import (
    NO_RUN_AFTER,
    NOT_TUNED_YET,
    UNAVAILABLE,
    TargetCache,
    TunePanel,
    before_after_section,
    pair_headers,
    tuned_view_for,
    tuning_line,
)

REAL_RESULT = json.loads(
    (
        Path(__file__).resolve().parents[1] / "data" / "bench" / "result-0.32-spec-decode.json"
    ).read_text()
)
REQUEST = TuneRequest(batch_sizes=(1, 2, 4, 8), chunk_size=2)
NOT_FP8 = TunedConfigError(
    "The engine's checkpoint (stepfun-ai/Step-3.7-Flash-NVFP4) is not the FP8 one.",
    hint="Pick the fp8-tp1 profile.",
)


class Engine:
    """The engine's stop, as the service's `lambda message: supervisor.stop()`."""

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.messages: list[str] = []

    def stop(self, message: str) -> None:
        self.events.append("stop")
        self.messages.append(message)


def _panel(
    tmp_path: Path, tuner: FakeTuner, target: Any = TARGET, **kwargs: Any
) -> tuple[TunePanel, Engine]:
    events: list[str] = []
    tuner.events = events
    engine = Engine(events)
    runner = TuneRunner(
        launcher_for=lambda t: tuner,
        folder=tmp_path / "moe-configs",
        work_root=tmp_path / "work",
    )

    def make() -> TuneTarget:
        if isinstance(target, Exception):
            raise target
        return target  # type: ignore[no-any-return]

    return TunePanel(runner, make, engine.stop, request=REQUEST, **kwargs), engine


def test_the_button_asks_first_then_tunes_in_the_background_and_the_line_turns_tuned(
    tmp_path: Path,
) -> None:
    tuner = FakeTuner()
    panel, engine = _panel(tmp_path, tuner)
    before = panel.view()
    assert before.can_tune
    assert before.line.startswith("Not tuned for NVIDIA GB300")

    text = panel.confirm()
    assert "**The engine will be stopped.**" in text
    assert "4 batch sizes" in text  # the estimate for what this run tunes
    assert "Chat and the API are unavailable" in text
    assert engine.events == []  # asking stops nothing

    panel.start()
    assert panel.wait(DEADLINE_S)
    assert engine.events[:2] == ["stop", "launch"]  # the engine first, then the tuner
    assert "engine is stopped while tuning" in engine.messages[0]
    after = panel.view()
    assert after.line.startswith("Tuned for NVIDIA GB300 with this engine image")
    assert STEP37_FILE in after.line
    assert not after.running
    assert after.progress.startswith("Tuning finished")
    assert STEP37_FILE in after.progress
    assert "4 batch sizes" in after.progress


def test_progress_then_cancel_installs_nothing(tmp_path: Path) -> None:
    tuner = FakeTuner(hold=True)  # stops after its first batch size until terminated
    panel, _ = _panel(tmp_path, tuner)
    started = panel.start()
    assert started.error == ""
    wait_for(lambda: panel.view().progress.startswith("Tuning MoE kernels: 1/4"), "1/4 done")
    running = panel.view()
    assert running.running
    assert not running.can_tune
    assert running.fraction == pytest.approx(0.25)
    assert "left" in running.progress  # the run's own rate says the time left
    assert "already running" in panel.start().error  # a second click starts nothing
    panel.cancel()
    assert panel.wait(DEADLINE_S)
    view = panel.view()
    assert view.progress.startswith("Tuning cancelled; nothing was installed.")
    assert view.line.startswith("Not tuned")
    assert not (tmp_path / "moe-configs" / STEP37_FILE).exists()


def test_an_engine_that_cannot_be_tuned_disables_the_button_with_the_reason(
    tmp_path: Path,
) -> None:
    tuner = FakeTuner()
    panel, engine = _panel(tmp_path, tuner, target=NOT_FP8)
    view = panel.view()
    assert not view.can_tune
    assert "cannot tell" in view.line
    assert "not the FP8 one" in view.line
    assert view.why_not == UNAVAILABLE
    with pytest.raises(TunedConfigError, match="not the FP8 one"):
        panel.confirm()
    assert "not the FP8 one" in panel.start().error
    assert engine.events == []
    assert tuner.jobs == []


def test_a_running_benchmark_disables_the_button_and_refuses_before_anything_stops(
    tmp_path: Path,
) -> None:
    def busy() -> None:
        raise BenchError("A benchmark is running.", hint="Wait for it, or cancel it.")

    panel, engine = _panel(tmp_path, FakeTuner(), bench_idle=busy)
    view = panel.view()
    assert not view.can_tune
    assert "A benchmark is running" in view.why_not
    with pytest.raises(BenchError):
        panel.confirm()
    assert "A benchmark is running" in panel.start().error
    assert engine.events == []


def test_the_target_is_kept_for_a_while_and_read_again_on_demand() -> None:
    now = [0.0]
    calls: list[int] = []

    def make() -> TuneTarget:
        calls.append(1)
        return TARGET

    cache = TargetCache(make, ttl_s=15.0, clock=lambda: now[0])
    assert cache.get() == (TARGET, "")
    now[0] = 10.0
    cache.get()
    assert len(calls) == 1  # a page's 1 s poll does not read the checkpoint each time
    now[0] = 16.0
    cache.get()
    cache.get(fresh=True)
    assert len(calls) == 3


def test_tuning_line_says_done_of_all_and_time_left() -> None:
    state = TuneState("fp8", 1000.0, 18, done=3, remaining_s=900.0)
    line = tuning_line(state, now=1125.0)
    assert line.startswith("Tuning MoE kernels: 3/18 batch sizes done, 2 min 05 s, about 15 min")
    first = tuning_line(dataclasses.replace(state, done=0, remaining_s=None), now=1000.0)
    assert "time left known after the first batch size" in first
    cancelling = tuning_line(dataclasses.replace(state, cancelling=True), 1000.0)
    assert cancelling.startswith("Cancelling")


# ------------------------------------------------------------------------ before / after


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _store_runs(tmp_path: Path, times: list[tuple[float, str]]) -> list[Any]:
    clock = Clock()
    with BenchStore(tmp_path / "bench.sqlite3", clock=clock) as store:
        for at, preset in times:
            clock.now = at
            info = RunInfo(profile="fp8-tp1", preset=preset, gpu_name="NVIDIA GB300")
            throughput = 120.0 if at > 5000 else 100.0
            store.add(info, REAL_RESULT | {"output_throughput": throughput})
        return store.list_runs()


def _tuned(tmp_path: Path, installed_at: float | None) -> Any:
    view = tuned_view_for(tmp_path, TARGET)
    return dataclasses.replace(view, installed_at=installed_at)


def test_before_after_section_pairs_says_what_to_do_or_that_nothing_is_tuned(
    tmp_path: Path,
) -> None:
    runs = _store_runs(tmp_path, [(1000.0, "chat"), (2000.0, "seed")])
    nothing = before_after_section(runs, _tuned(tmp_path, None))
    assert nothing.text == NOT_TUNED_YET
    waiting = before_after_section(runs, _tuned(tmp_path, 5000.0))
    assert waiting.text.startswith(NO_RUN_AFTER)
    assert "(seed, as run 2 before tuning)" in waiting.text
    assert waiting.rows == []

    runs = _store_runs(tmp_path / "again", [(2000.0, "seed"), (6000.0, "seed")])
    pair = before_after_section(runs, _tuned(tmp_path, 5000.0))
    assert pair_headers(pair) == ["Metric", "Before (run 1)", "After (run 2)", "Change"]
    assert ["Output tokens/s", "100.00", "120.00", "+20.0% (better)"] in pair.rows


def test_before_after_section_cannot_tell_says_why(tmp_path: Path) -> None:
    view = tuned_view_for(tmp_path, None, "the checkpoint is not on this machine yet")
    section = before_after_section([], view)
    assert "cannot tell (the checkpoint is not on this machine yet)" in section.text


# ------------------------------------------------------------------------------ dashboard


class Watch:
    def __init__(self, state: Any) -> None:
        self.state = state

    def current(self) -> Any:
        return self.state


def test_the_dashboard_marks_a_running_benchmark_and_a_tuning() -> None:
    def ctl(bench: Any = None, tune: Any = None) -> dashboard.DashboardController:
        return dashboard.DashboardController(
            Watch(None),  # type: ignore[arg-type]
            dict,
            Watch(bench),
            Watch(tune),
        )

    assert ctl().activity() == ""
    line = ctl(bench=BenchState("seed", 0.0, done=12, total=20)).activity()
    assert 'data-run="bench"' in line
    assert "Benchmark running: 12/20 requests (seed)" in line
    assert "GPU and engine numbers include its load" in line
    starting = ctl(bench=BenchState("chat<x>", 0.0, through_gateway=True)).activity()
    assert "Benchmark running through the gateway: starting (chat&lt;x&gt;)" in starting
    tuning = ctl(tune=TuneState("fp8", 0.0, 18, done=3)).activity()
    assert "MoE tuning running: 3/18 batch sizes" in tuning
    assert "the engine is stopped" in tuning
