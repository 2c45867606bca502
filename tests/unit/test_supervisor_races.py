"""The supervisor's races, driven step by step with a fake runtime and a fake clock.

Each test holds the engine at one step (the image pull, the model load, the SIGTERM of a stop)
through `fixtures.fake_runtime`, makes the racing call, then lets the step go on, so the order
of events is the test's, not the scheduler's. The supervisor is the real one (its threads, locks
and the inter-process engine lock); its engine answers /health on the real Unix socket. No
Docker, no vLLM: all of these together run in a few seconds.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.fake_runtime import WAIT_S, FakeClock, FakeEngine, FakeRuntime
from fixtures.tune_kit import TARGET, FakeTuner

from appliance import endpoint
from appliance import settings as st
from appliance.bench.errors import TunedConfigError
from appliance.bench.tuning import TuneRequest, TuneRunner
from appliance.engine import EngineState, EngineStatus, LaunchSpec, Supervisor
from appliance.engine.launch import launch_spec_for
from appliance.engine.lock import EngineLock
from appliance.engine.supervisor import replace_settings
from appliance.errors import EngineError

attach_module = importlib.import_module("appliance.engine.attach")  # where attach() takes the lock

pytestmark = pytest.mark.timeout(60)

NAME = "race-engine"
OOM_LINE = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."
INIT_FAILED_LINES = (
    "ERROR 12-01 10:00:05 [core.py:866] EngineCore failed to start.",
    "RuntimeError: Engine core initialization failed. See root cause above. "
    "Failed core proc(s): {}",
)


@pytest.fixture
def settings() -> st.Settings:
    return replace_settings(st.Settings(), runtime="process", container_name=NAME)


@pytest.fixture
def fake() -> Iterator[FakeRuntime]:
    runtime = FakeRuntime()
    yield runtime
    runtime.close_all()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_supervisor(
    settings: st.Settings, fake: FakeRuntime, clock: FakeClock
) -> Iterator[Callable[..., Supervisor]]:
    made: list[Supervisor] = []

    def make(with_settings: st.Settings | None = None, **kwargs: Any) -> Supervisor:
        options: dict[str, Any] = {
            "runtime": fake,
            "demo": True,  # the simulator's spec: no flag check against an image
            "download_weights": False,
            "clock": clock,
            "poll_interval_s": 0.01,
            "monitor_interval_s": 0.02,
            "outside_poll_s": 0,
            "lock_timeout_s": WAIT_S,
        }
        sup = Supervisor(with_settings or settings, **(options | kwargs))
        made.append(sup)
        return sup

    yield make
    fake.release_pull()
    fake.release_stops()
    for sup in made:
        sup.close()


def wait_status(
    sup: Supervisor, predicate: Callable[[EngineStatus], bool], what: str
) -> EngineStatus:
    """The supervisor's status once `predicate` holds; fails after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    status = sup.status()
    while not predicate(status):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"not {what} within {WAIT_S} s: {status.state} {status.message}")
        status = sup.wait_for_change(status.version, min(remaining, 0.1))
    return status


def record_states(sup: Supervisor) -> list[EngineStatus]:
    seen: list[EngineStatus] = []
    sup.add_listener(seen.append)
    return seen


class Call:
    """`fn()` on its own thread; `result()` joins it (deadline) and returns or re-raises."""

    def __init__(
        self, fn: Callable[[], Any], *, after: threading.Barrier | None = None, name: str = "call"
    ) -> None:
        self._value: Any = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                if after is not None:
                    after.wait(WAIT_S)
                self._value = fn()
            except BaseException as err:  # noqa: BLE001 - handed to result()
                self._error = err

        self.thread = threading.Thread(target=run, name=name, daemon=True)
        self.thread.start()

    def done(self) -> bool:
        return not self.thread.is_alive()

    def result(self) -> Any:
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "the call did not return"
        if self._error is not None:
            raise self._error
        return self._value


def launched(sup: Supervisor, fake: FakeRuntime, count: int = 1) -> FakeEngine:
    engine = fake.wait_launched(count)
    wait_status(sup, lambda s: s.container_id == engine.handle.id, f"watching launch #{count}")
    return engine


# ------------------------------------------------------------------------ 1. two starts at once


def test_two_starts_at_once_launch_one_engine_and_both_callers_see_it_ready(
    fake: FakeRuntime, make_supervisor: Callable[..., Supervisor]
) -> None:
    fake.image_cached = False  # the pull holds the start while both calls come in
    sup = make_supervisor()
    both = threading.Barrier(2)

    def caller() -> tuple[bool, EngineStatus]:
        started = sup.try_start()  # what start() does, saying whether this call started it
        return started, sup.wait_ready(WAIT_S)

    calls = [Call(caller, after=both) for _ in range(2)]
    fake.wait_for(lambda: fake.pulls_started == 1, "the pull")
    wait_status(sup, lambda s: s.state == EngineState.PULLING_IMAGE, "pulling")
    fake.release_pull()
    engine = launched(sup, fake)
    engine.become_ready()

    results = [call.result() for call in calls]
    assert sorted(started for started, _ in results) == [False, True]  # one started, one told
    assert [status.state for _, status in results] == [EngineState.READY, EngineState.READY]
    assert {status.container_id for _, status in results} == {engine.handle.id}
    assert len(fake.engines) == 1
    assert fake.pulls_started == 1
    assert sup.try_start() is False  # a start while ready does nothing either
    assert len(fake.engines) == 1


# --------------------------------------------------------------------------- 2. stop during pull


def test_stop_during_the_pull_launches_nothing_and_a_later_start_works(
    fake: FakeRuntime, make_supervisor: Callable[..., Supervisor]
) -> None:
    fake.image_cached = False
    sup = make_supervisor()
    sup.start()
    wait_status(
        sup,
        lambda s: s.state == EngineState.PULLING_IMAGE and bool(s.progress and s.progress[0]),
        "pulling with progress",
    )
    waiter = Call(lambda: sup.wait_ready(WAIT_S))

    stopped = sup.stop()  # the pull is still running: nothing released it

    assert stopped.state == EngineState.STOPPED, stopped.message
    assert fake.pull_cancelled.is_set()  # the pull itself was cut short
    assert fake.engines == []  # and nothing was launched after it
    assert not endpoint.socket_answers(endpoint.socket_path(NAME))
    with pytest.raises(EngineError):
        waiter.result()  # someone waiting for the start is told, not left hanging
    assert sup.status().state == EngineState.STOPPED

    # Nothing is left half-done: the next start pulls again and serves.
    assert sup.try_start() is True
    fake.wait_for(lambda: fake.pulls_started == 2, "the second pull")
    fake.release_pull()
    launched(sup, fake).become_ready()
    assert sup.wait_ready(WAIT_S).state == EngineState.READY
    assert len(fake.engines) == 1


# ----------------------------------------------------------------------- 3. crash during load


def test_a_crash_while_loading_fails_with_its_exit_code_and_is_not_retried(
    fake: FakeRuntime, make_supervisor: Callable[..., Supervisor]
) -> None:
    sup = make_supervisor()
    sup.start()
    engine = launched(sup, fake)

    engine.crash(1, *INIT_FAILED_LINES)

    failed = wait_status(sup, lambda s: s.state == EngineState.FAILED, "failed")
    assert failed.exit_code == 1
    assert "exited while starting (exit code 1)" in failed.message
    assert "EngineCore failed to start" in failed.message  # the log line that says why
    assert INIT_FAILED_LINES[1] in failed.log_tail
    with pytest.raises(EngineError, match=r"exit code 1"):
        sup.wait_ready(WAIT_S)
    # stop() joins the start's thread first: once it returns no start is left to retry.
    assert sup.stop().state == EngineState.STOPPED
    assert len(fake.engines) == 1
    assert engine.removed


def test_out_of_memory_while_loading_is_retried_once_then_fails(
    fake: FakeRuntime, make_supervisor: Callable[..., Supervisor]
) -> None:
    sup = make_supervisor()
    sup.start()
    first = launched(sup, fake)
    first.crash(1, OOM_LINE)

    second = launched(sup, fake, 2)  # the one retry, with less memory asked for
    assert first.removed
    assert first.spec.arg_value("--gpu-memory-utilization") == "0.95"
    assert second.spec.arg_value("--gpu-memory-utilization") == "0.90"
    second.crash(1, OOM_LINE)

    failed = wait_status(sup, lambda s: s.state == EngineState.FAILED, "failed")
    assert failed.oom
    assert failed.exit_code == 1
    assert "failed again after a retry with --gpu-memory-utilization 0.90" in failed.message
    assert sup.stop().state == EngineState.STOPPED
    assert len(fake.engines) == 2  # two launches, never a third


def test_an_engine_that_never_gets_ready_is_stopped_at_its_deadline_and_not_retried(
    fake: FakeRuntime,
    make_supervisor: Callable[..., Supervisor],
    clock: FakeClock,
    settings: st.Settings,
) -> None:
    sup = make_supervisor()
    sup.start()
    engine = launched(sup, fake)
    fake.wait_for(lambda: engine.inspections > 0, "the start watching the engine")  # deadline set

    clock.advance(settings.engine.start_timeout_s + 1)

    failed = wait_status(sup, lambda s: s.state == EngineState.FAILED, "failed")
    assert f"not ready after {settings.engine.start_timeout_s} s" in failed.message
    assert engine.stop_asked.is_set()
    assert not engine.running
    assert sup.stop().state == EngineState.STOPPED
    assert len(fake.engines) == 1


# --------------------------------------------------------------------- 4. adoption during stop


@pytest.mark.parametrize("answers", [True, False], ids=["health-answers", "health-closed"])
def test_a_second_supervisor_does_not_adopt_an_engine_that_is_being_stopped(
    fake: FakeRuntime,
    make_supervisor: Callable[..., Supervisor],
    monkeypatch: pytest.MonkeyPatch,
    answers: bool,
) -> None:
    """The CLI (or a restarted appliance) attaches while the service stops the engine: the
    engine has had its SIGTERM and still runs; `answers` is whether its /health still answers.
    The stop holds the engine lock from SIGTERM to removal, so the attach must decide after it:
    no engine, not a READY one that is about to vanish, nor a "crash" it never had."""
    first = make_supervisor()
    first.start()
    engine = launched(first, fake)
    engine.become_ready()
    first.wait_ready(WAIT_S)

    fake.answers_while_dying = answers
    fake.hold_stops()
    stopping = Call(first.stop)
    fake.wait_for(lambda: fake.stops_entered == 1, "SIGTERM")
    assert first.status().state == EngineState.STOPPING
    assert engine.running  # dying, not gone

    waits_for_lock = threading.Event()

    class ObservedLock(EngineLock):
        def acquire(self) -> None:
            if threading.current_thread().name == "attach":
                waits_for_lock.set()
            super().acquire()

    monkeypatch.setattr(attach_module, "EngineLock", ObservedLock)
    second = make_supervisor()
    seen = record_states(second)
    attach = Call(second.attach, name="attach")
    # The attach either decides at once (it looked without the lock) or waits for the stop.
    fake.wait_for(lambda: attach.done() or waits_for_lock.is_set(), "the attach to decide or wait")
    fake.release_stops()

    assert stopping.result().state == EngineState.STOPPED
    found = attach.result()
    assert found.state == EngineState.ABSENT, found.message
    final = wait_status(second, lambda s: not s.state.busy, "settled")
    assert final.state == EngineState.ABSENT, final.message
    assert not any(s.state in (EngineState.READY, EngineState.FAILED) for s in seen), [
        (s.state.value, s.message) for s in seen
    ]
    assert fake.running() == []
    assert len(fake.engines) == 1


# ------------------------------------------------------------------- 5. settings change mid-start


def test_settings_changed_while_loading_ask_for_a_restart_once_ready(
    fake: FakeRuntime, make_supervisor: Callable[..., Supervisor], settings: st.Settings
) -> None:
    sup = make_supervisor()
    seen = record_states(sup)
    sup.start()
    engine = launched(sup, fake)

    sup.apply_settings(replace_settings(settings, max_model_len=8192))

    assert sup.status().state == EngineState.STARTING  # the start goes on undisturbed
    engine.become_ready()
    ready = sup.wait_ready(WAIT_S)
    assert ready.restart_needed
    assert "restart it to apply them" in ready.message
    assert engine.running
    assert not engine.stop_asked.is_set()
    assert len(fake.engines) == 1
    assert engine.spec.arg_value("--max-model-len") is None  # it runs the settings it started with
    flags = [s.restart_needed for s in seen]
    assert flags[flags.index(True) :] == [True] * (len(flags) - flags.index(True))  # set, then kept

    # The restart applies them.
    sup.restart()
    launched(sup, fake, 2).become_ready()
    again = sup.wait_ready(WAIT_S)
    assert not again.restart_needed
    assert fake.engines[1].spec.arg_value("--max-model-len") == "8192"


def test_settings_changed_while_the_start_builds_its_spec_ask_for_a_restart_once_ready(
    fake: FakeRuntime, make_supervisor: Callable[..., Supervisor], settings: st.Settings
) -> None:
    """A start reads the settings first (the planner may take a while): settings applied in that
    window are not what the engine launches with, and once ready it must say so."""
    built = threading.Event()
    go_on = threading.Event()

    def builder(sup: Supervisor, profile: str | None) -> LaunchSpec:
        spec = launch_spec_for(
            sup.settings, profile=profile, runtime="process", demo=True, download_weights=False
        )
        if threading.current_thread().name == "engine-supervisor" and not built.is_set():
            built.set()  # the start's spec, from the settings of before
            go_on.wait(WAIT_S)
        return spec

    sup = make_supervisor(spec_builder=builder)
    sup.start()
    assert built.wait(WAIT_S)
    sup.apply_settings(replace_settings(settings, max_model_len=8192))
    go_on.set()
    engine = launched(sup, fake)
    engine.become_ready()

    ready = sup.wait_ready(WAIT_S)
    assert engine.spec.arg_value("--max-model-len") is None
    assert ready.restart_needed
    assert len(fake.engines) == 1


# ------------------------------------------------------ an engine another process launched first


def test_an_engine_launched_elsewhere_during_the_pull_is_adopted_without_holding_the_lock(
    fake: FakeRuntime, make_supervisor: Callable[..., Supervisor], settings: st.Settings
) -> None:
    """Another step-station launches the engine while this start pulls: the start adopts it
    and watches it load, and the engine lock is free meanwhile: another look (an attach, a start)
    gets an answer instead of waiting for the lock until it gives up."""
    fake.image_cached = False
    sup = make_supervisor()
    sup.start()
    fake.wait_for(lambda: fake.pulls_started == 1, "the pull")
    other = fake.launch_elsewhere(
        launch_spec_for(settings, runtime="process", demo=True, download_weights=False)
    )
    fake.release_pull()
    adopted = wait_status(sup, lambda s: s.container_id == other.handle.id, "adopting")
    assert adopted.state == EngineState.STARTING
    fake.wait_for(lambda: other.inspections > 1, "the start watching the adopted engine")

    looker = make_supervisor()  # `step-station status` without the service: attach
    assert looker.attach().state == EngineState.STARTING  # not "another operation in progress"
    starter = make_supervisor()  # `step-station start` elsewhere: its start looks under the lock
    starter.start()
    wait_status(starter, lambda s: s.container_id == other.handle.id, "the other start adopting")
    other.become_ready()
    for each in (sup, looker, starter):
        assert each.wait_ready(WAIT_S).state == EngineState.READY
    assert len(fake.engines) == 1  # adopted three times, launched once


# ----------------------------------------------------------------- stop during the weights download


def test_stop_during_the_weights_download_launches_nothing_and_a_later_start_works(
    fake: FakeRuntime, make_supervisor: Callable[..., Supervisor]
) -> None:
    sup = make_supervisor(download_weights=True, weights_fetcher=fake.weights)
    sup.start()
    wait_status(
        sup,
        lambda s: s.state == EngineState.DOWNLOADING_WEIGHTS and bool(s.progress and s.progress[0]),
        "downloading with progress",
    )

    stopped = sup.stop()  # the download is still running: nothing released it

    assert stopped.state == EngineState.STOPPED, stopped.message
    assert fake.weights.cancelled.is_set()  # the download itself was cut short
    assert fake.engines == []  # and nothing was launched after it

    fake.weights.release()
    assert sup.try_start() is True
    launched(sup, fake).become_ready()
    assert sup.wait_ready(WAIT_S).state == EngineState.READY
    assert fake.weights.started == 2
    assert len(fake.engines) == 1


# ------------------------------------------------------------------ the monitor of a serving engine


def serving(sup: Supervisor, fake: FakeRuntime) -> FakeEngine:
    sup.start()
    engine = launched(sup, fake)
    engine.become_ready()
    assert sup.wait_ready(WAIT_S).state == EngineState.READY
    return engine


def test_a_crash_while_serving_fails_with_its_exit_code_and_is_not_restarted(
    fake: FakeRuntime, make_supervisor: Callable[..., Supervisor]
) -> None:
    sup = make_supervisor()
    sup.exit_settle_s = 0.2  # how long an exit may wait for its removal by another process
    engine = serving(sup, fake)
    line = "ERROR 12-01 10:05:00 [core.py:900] EngineCore encountered a fatal error."

    engine.crash(0, line)  # vLLM's API server exits 0 when its engine core dies

    failed = wait_status(sup, lambda s: s.state == EngineState.FAILED, "failed")
    assert failed.exit_code == 0
    assert "crashed: it exited unexpectedly (exit code 0)" in failed.message
    assert line in failed.log_tail
    assert len(fake.engines) == 1  # reported, never relaunched behind the user's back


def test_an_engine_stopped_and_removed_elsewhere_while_serving_is_stopped_not_crashed(
    fake: FakeRuntime, make_supervisor: Callable[..., Supervisor]
) -> None:
    """Another step-station stops the engine: it exits (SIGTERM) a moment before that process
    removes it. The monitor sees the exit first and must wait for the removal, not call it a
    crash."""
    sup = make_supervisor()
    engine = serving(sup, fake)
    seen = record_states(sup)

    engine.exit(0)
    looked = engine.inspections
    fake.wait_for(lambda: engine.inspections >= looked + 2, "the monitor seeing the exit")
    fake.remove(engine.handle)  # the other process's removal, after the exit was seen

    final = wait_status(sup, lambda s: s.state == EngineState.STOPPED, "stopped")
    assert "stopped and removed by another step-station" in final.message
    assert not any(s.state == EngineState.FAILED for s in seen), [s.message for s in seen]
    assert len(fake.engines) == 1


# ---------------------------------------------------------------- idle sleep against a browser chat

IDLE_S = 60.0


def test_a_chat_that_begins_while_idle_sleep_decides_waits_then_wakes_the_engine(
    fake: FakeRuntime,
    make_supervisor: Callable[..., Supervisor],
    clock: FakeClock,
    settings: st.Settings,
) -> None:
    """vLLM's POST /sleep aborts every running request, so a chat may not begin between the
    decision to sleep and the sleep: it waits for the sleep, then wakes the engine."""
    sleepy = replace_settings(settings, sleep_mode=True)
    sup = make_supervisor(with_settings=sleepy, idle_sleep_s=IDLE_S)
    engine = serving(sup, fake)
    engine.hold_metrics()

    clock.advance(IDLE_S + 1)  # idle time is up: the monitor's next round decides
    fake.wait_for(lambda: engine.metrics_reads == 1, "the idle sleep's look at the gauges")
    chat = Call(sup.begin_use, name="chat")  # while the decision holds its last look
    engine.release_metrics()

    chat.result()
    assert engine.calls == ["sleep", "wake_up"]  # slept first, then woken for the chat
    assert sup.status().state == EngineState.READY


def test_an_open_chat_keeps_the_engine_awake_past_the_idle_time(
    fake: FakeRuntime,
    make_supervisor: Callable[..., Supervisor],
    clock: FakeClock,
    settings: st.Settings,
) -> None:
    sleepy = replace_settings(settings, sleep_mode=True)
    sup = make_supervisor(with_settings=sleepy, idle_sleep_s=IDLE_S)
    engine = serving(sup, fake)
    sup.begin_use()

    clock.advance(IDLE_S + 1)
    fake.wait_for(lambda: sup.idle_s() < IDLE_S, "the monitor restarting the idle clock")
    assert engine.calls == []  # the open chat kept it awake
    assert engine.metrics_reads == 0  # without even asking the engine

    sup.end_use()
    clock.advance(IDLE_S + 1)
    wait_status(sup, lambda s: s.state == EngineState.SLEEPING, "asleep once the chat ended")
    assert engine.calls == ["sleep"]


# ------------------------------------------------------------- MoE tuning holds the GPU for hours


def test_tuning_stops_a_start_in_progress_and_no_door_starts_the_engine_until_it_ends(
    fake: FakeRuntime, make_supervisor: Callable[..., Supervisor], tmp_path: Path
) -> None:
    """The tuner and an engine cannot share the GPU. A start already pulling when tuning begins
    is stopped; while the tuner runs, every start (the control socket's, the Model tab's, the
    gateway's start on request all end in `try_start`) is refused with the reason; after a
    cancel the engine starts again."""
    fake.image_cached = False
    sup = make_supervisor()
    tuner = FakeTuner(hold=True)
    runner = TuneRunner(
        launcher_for=lambda target: tuner,
        folder=tmp_path / "moe-configs",
        work_root=tmp_path / "work",
    )
    remove_guard = sup.add_start_guard(runner.start_refusal)
    sup.start()
    wait_status(sup, lambda s: s.state == EngineState.PULLING_IMAGE, "pulling")

    tuning = Call(
        lambda: runner.run(TuneRequest(batch_sizes=(1, 2)), TARGET, lambda m: sup.stop()),
        name="tune",
    )
    fake.wait_for(lambda: bool(tuner.processes), "the tuner's launch")
    assert sup.status().state == EngineState.STOPPED  # the pulling start was stopped first
    assert fake.engines == []
    with pytest.raises(TunedConfigError, match="MoE tuning is running"):
        sup.try_start()
    with pytest.raises(TunedConfigError, match="MoE tuning is running"):
        sup.start()
    assert sup.status().state == EngineState.STOPPED
    assert fake.pulls_started == 1  # nothing began behind the refusals

    assert runner.cancel()
    assert tuning.result().state == "cancelled"
    assert sup.try_start() is True  # the GPU is free again
    fake.wait_for(lambda: fake.pulls_started == 2, "the next start's pull")
    fake.release_pull()
    launched(sup, fake).become_ready()
    assert sup.wait_ready(WAIT_S).state == EngineState.READY
    remove_guard()
