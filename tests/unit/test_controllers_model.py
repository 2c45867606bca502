"""The model tab's decisions, without a browser: what the one button does, which profiles are
offered, what the panel shows and when it is left as it is."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import pytest

from appliance import hardware
from appliance.controllers import model
from appliance.engine.state import EngineState, EngineStatus
from appliance.errors import HardwareError
from appliance.settings import Settings


class FakeEngine:
    """The supervisor's side the tab uses (model.EngineControl), recording what it was asked."""

    def __init__(self, state: EngineState = EngineState.ABSENT, *, wins: bool = True) -> None:
        self.current = EngineStatus(state=state, version=1)
        self.wins = wins  # whether try_start gets there before another page's click
        self.started: list[str | None] = []
        self.stops = 0

    def status(self) -> EngineStatus:
        return self.current

    def try_start(self, profile: str | None = None) -> bool:
        self.started.append(profile)
        return self.wins

    def stop(self, timeout_s: float | None = None) -> EngineStatus:
        self.stops += 1
        return self.current


class FakeStore:
    """The settings store's update(): applies "section.field" keys to a new snapshot."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.updates: list[dict[str, Any]] = []

    def update(self, changes: Mapping[str, Any]) -> Settings:
        self.updates.append(dict(changes))
        for key, value in changes.items():
            section, name = key.split(".")
            part = dataclasses.replace(getattr(self.settings, section), **{name: value})
            self.settings = dataclasses.replace(self.settings, **{section: part})
        return self.settings


def controller(engine: FakeEngine, store: FakeStore) -> model.ModelController:
    return model.ModelController(engine, store)


# ------------------------------------------------------------------------------------ the button


def test_start_saves_the_choice_then_starts_that_profile() -> None:
    engine, store = FakeEngine(), FakeStore(Settings())
    notice = controller(engine, store).press(model.START, "nvfp4-tp1", mtp=False, sleep=True)
    assert notice is None
    assert store.updates == [
        {"engine.profile": "nvfp4-tp1", "engine.mtp": False, "engine.sleep_mode": True}
    ]
    assert engine.started == ["nvfp4-tp1"]


def test_start_when_no_profile_fits_says_so_and_starts_nothing() -> None:
    engine, store = FakeEngine(), FakeStore(Settings())
    with pytest.raises(HardwareError, match="No launch profile fits this machine"):
        controller(engine, store).press(model.START, None, mtp=False, sleep=False)
    assert engine.started == []
    assert store.updates == []


@pytest.mark.parametrize("state", [EngineState.STARTING, EngineState.READY, EngineState.STOPPING])
def test_start_on_a_page_behind_another_never_stops_or_restarts(state: EngineState) -> None:
    engine, store = FakeEngine(state), FakeStore(Settings())
    notice = controller(engine, store).press(model.START, "fp8-tp1", mtp=False, sleep=False)
    assert notice == model.ALREADY_STARTED
    assert (engine.started, engine.stops, store.updates) == ([], 0, [])


def test_start_that_another_click_won_tells_the_user() -> None:
    engine, store = FakeEngine(wins=False), FakeStore(Settings())
    notice = controller(engine, store).press(model.START, "fp8-tp1", mtp=False, sleep=False)
    assert notice == model.ALREADY_STARTED
    assert engine.started == ["fp8-tp1"]


def test_stop_stops_a_running_engine_and_ignores_a_stopped_one() -> None:
    running, store = FakeEngine(EngineState.READY), FakeStore(Settings())
    assert controller(running, store).press(model.STOP, "fp8-tp1", False, False) is None
    assert running.stops == 1
    stopped = FakeEngine(EngineState.STOPPED)
    controller(stopped, store).press(model.STOP, "fp8-tp1", False, False)
    assert (stopped.stops, stopped.started) == (0, [])  # a Stop seen late never starts it


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (EngineState.ABSENT, model.Button("Start", "primary", True)),
        (EngineState.FAILED, model.Button("Start", "primary", True)),
        (EngineState.READY, model.Button("Stop", "stop", True)),
        (EngineState.PULLING_IMAGE, model.Button("Stop", "stop", True)),
        (EngineState.STOPPING, model.Button("Stopping…", "secondary", False)),
    ],
)
def test_the_button_follows_the_engine(state: EngineState, expected: model.Button) -> None:
    assert model.button_for(EngineStatus(state=state)) == expected


# ------------------------------------------------------------------------------------ the panel


def test_the_panel_is_left_alone_until_the_engine_moves() -> None:
    engine = FakeEngine(EngineState.READY)
    ctl = controller(engine, FakeStore(Settings()))
    first = ctl.view(-1)
    assert first is not None
    assert first.version == 1
    assert first.log is not None
    assert first.effective is not None
    assert ctl.view(1) is None  # same version, not busy: nothing to redraw
    engine.current = dataclasses.replace(engine.current, version=2)
    assert ctl.view(1) is not None


def test_a_busy_engine_redraws_the_timeline_but_keeps_the_rest() -> None:
    engine = FakeEngine(EngineState.STARTING)
    view = controller(engine, FakeStore(Settings())).view(1)  # elapsed times move
    assert view is not None
    assert 'data-state="starting"' in view.timeline
    assert (view.failure, view.effective, view.log) == (None, None, None)


def test_a_failure_shows_what_happened_and_the_log_tail() -> None:
    engine = FakeEngine(EngineState.FAILED)
    engine.current = dataclasses.replace(
        engine.current, message="CUDA out of memory <x>", log_tail=["boom"], oom=True
    )
    view = controller(engine, FakeStore(Settings())).view(0)
    assert view is not None
    assert view.failure is not None
    assert 'id="ss-failure-box"' in view.failure
    assert "&lt;x&gt;" in view.failure  # escaped
    assert "boom" in view.failure


# ------------------------------------------------------------------------------------ the picker


def test_demo_offers_every_profile_and_lists_what_would_not_fit() -> None:
    h200 = hardware.PRESETS["h200"]
    choices = model.profile_choices(Settings(), demo=True, detect=lambda: h200)
    assert choices.offered == list(model.profiles.PROFILES)
    assert choices.default == model.FALLBACK_PROFILE  # "auto" is no profile name
    assert "fp8-tp1" in choices.unfit
    assert model.unfit_markdown(choices).startswith("The engine runs without a GPU here")


def test_a_gpu_machine_offers_only_what_fits_and_defaults_to_the_plan() -> None:
    gb300 = hardware.PRESETS["gb300"]
    choices = model.profile_choices(Settings(), demo=False, detect=lambda: gb300)
    assert "fp8-tp1" in choices.offered
    assert "fp8-tp8" not in choices.offered  # eight GPUs' worth
    assert "fp8-tp8" in choices.unfit
    assert choices.default in choices.offered


def test_nothing_fits_offers_nothing() -> None:
    h200 = hardware.PRESETS["h200"]
    choices = model.profile_choices(Settings(), demo=False, detect=lambda: h200)
    assert choices.offered == []
    assert not choices.default  # so Start says "No launch profile fits"
    assert model.unfit_markdown(choices).startswith("Not offered on this machine:")


def test_switches_follow_what_the_profile_allows() -> None:
    mtp, sleep = model.switches("nvfp4-tp1", mtp=True, sleep=True)
    assert mtp == model.Switch(False, False, "this checkpoint has no MTP weights")
    assert sleep == model.Switch(True, True, "sleep when idle, wake on use")
    mtp, _ = model.switches("fp8-tp1", mtp=True, sleep=False)
    assert mtp == model.Switch(True, True, "MTP-3 speculative decoding")
    assert model.switches(None, mtp=True, sleep=True) == (
        model.Switch(None, False),
        model.Switch(None, False),
    )
