"""The engine's state machine: from nothing to serving and back, telling the truth at every step.

The truth is the runtime (Docker): the engine carries `io.step-station.*` labels, so a restarted
appliance re-derives the state and adopts a running engine instead of starting a second one.
Operations that create or remove the engine hold an inter-process lock (`lock.py`), so the UI,
the CLI and the gateway never race. Every wait has a deadline and ends early when the engine
exits; waits sleep on an event that `stop()` (and tests) can set.

Threads: `start()` returns at once; one worker thread runs the start and then watches the engine
until it stops; one log thread per engine feeds the phase tracker. `status()` returns a copy.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from appliance import endpoint
from appliance import settings as st
from appliance.engine import compat, engine_key, health, phases
from appliance.engine.lock import EngineLock
from appliance.engine.process_runtime import ProcessRuntime
from appliance.engine.runtime import EngineExit, EngineHandle, LogLine, Runtime
from appliance.engine.spec import (
    LABEL_PROFILE,
    LABEL_SERVED_NAME,
    LABEL_SETTINGS_HASH,
    LaunchSpec,
    safer_spec,
)
from appliance.engine.state import EngineState, EngineStatus, PhaseRecord
from appliance.errors import ApplianceError, DockerUnavailableError, EngineError, SettingsError
from appliance.profiles import VLLM_DEFAULT_GPU_MEMORY_UTILIZATION

log = logging.getLogger(__name__)

TAIL_LINES = 200
RETRYABLE = phases.RETRYABLE_FAILURES
_RETRY_REASON = {
    phases.CUDA_OOM: "Out of GPU memory",
    phases.MAX_LEN_TOO_LARGE: "The context length did not fit in the KV cache",
    phases.MEMORY_IN_USE: "Less free memory than the engine asked for",
}
# vLLM's start-up memory check, GPU (`v1/worker/utils.py`) and CPU (`v1/worker/cpu_worker.py`):
# "Free memory on device D (F/T GiB) on startup is less than desired GPU memory utilization (U, R
# GiB)" / "Available memory on node N (F/T GiB) on startup is less than desired CPU memory ...".
_FREE_MEMORY = re.compile(r"\(([\d.]+)/([\d.]+) GiB\) on startup is less than desired")
_FREE_MARGIN = 0.05  # of the total, left to other programs when the retry follows the free memory
KEY_LOST_NOTE = (
    "The running engine's key file is gone (the data folder was cleared?), so the appliance "
    "cannot use it: restart the engine (`step-station restart`) to give it a new key."
)
PULLING = "Pulling image"
DOWNLOADING = "Downloading weights"

SpecBuilder = Callable[["Supervisor", "str | None"], LaunchSpec]
WeightsFetcher = Callable[..., object]
Listener = Callable[[EngineStatus], None]


@dataclass
class _Outcome:
    ready: bool = False
    cancelled: bool = False
    failure: str | None = None  # a phases.* failure kind from the log
    exit: EngineExit | None = None
    message: str = ""


@dataclass
class _Engine:
    """The engine being watched, with its log reader."""

    handle: EngineHandle
    tracker: phases.PhaseTracker
    stop_logs: threading.Event
    logs_done: threading.Event
    spec: LaunchSpec | None = None
    last_at: float | None = None  # wall time of the last log line (Docker's timestamps)


class Supervisor:
    """One engine, one state machine. Thread-safe; all public methods may be called from any
    thread (UI callbacks, CLI, gateway)."""

    def __init__(
        self,
        settings: st.Settings,
        *,
        secrets: st.Secrets | None = None,
        runtime: Runtime | None = None,
        demo: bool = False,
        download_weights: bool | None = None,
        weights_fetcher: WeightsFetcher | None = None,
        spec_builder: SpecBuilder | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        poll_interval_s: float = 0.25,
        monitor_interval_s: float = 1.0,
        lock_timeout_s: float = 30.0,
        outside_poll_s: float = 2.0,
        health_interval_s: float = 2.0,
        idle_sleep_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.demo = demo
        self.download_weights = (not demo) if download_weights is None else download_weights
        self._secrets = secrets
        self._runtime = runtime
        self._weights_fetcher = weights_fetcher
        self._spec_builder = spec_builder
        self._clock = clock
        self._wall = wall
        self.poll_interval_s = poll_interval_s
        self.monitor_interval_s = monitor_interval_s
        self.lock_timeout_s = lock_timeout_s
        self.outside_poll_s = outside_poll_s
        self.exit_settle_s = 2.0  # see _settle_exit
        self.health_interval_s = health_interval_s
        self.idle_sleep_s = idle_sleep_s  # None: engine.idle_sleep_minutes
        self._lock = threading.RLock()
        self._decide = threading.RLock()  # start() vs adopting: one decision at a time
        self._closed = threading.Event()
        self._wake_lock = threading.Lock()
        self._outside: threading.Thread | None = None
        self._changed = threading.Condition(self._lock)
        self._status = EngineStatus(engine_url=self._url(), container_name=self._name())
        self._listeners: list[Listener] = []
        self._worker: threading.Thread | None = None
        self._cancel = threading.Event()
        self._tick = threading.Event()
        self._engine: _Engine | None = None
        self._pre_phases: list[PhaseRecord] = []
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._desired_hash = ""
        self._last_activity = clock()
        # Idle sleep: vLLM's POST /sleep aborts every running request, so the decision to sleep
        # and a browser chat's start exclude each other (see _maybe_idle_sleep, begin_use).
        self._sleep_gate = threading.Lock()
        self._in_use = 0  # browser chat streams open now
        self._engine_was_busy = False  # the engine's gauges showed requests at the last look
        self.dead_exit_grace_s = 8.0  # see _dead_engine
        self._engine_key = ""  # this start's engine key (engine_key.py); "" for none

    @classmethod
    def for_demo(cls, settings: st.Settings, **kwargs: Any) -> Supervisor:
        """A supervisor that runs the simulator as a local process (`step-station up --demo`)."""
        demo_settings = copy.deepcopy(settings)
        demo_settings.engine.runtime = "process"
        kwargs.setdefault("runtime", ProcessRuntime())
        return cls(demo_settings, demo=True, **kwargs)

    # -------------------------------------------------------------------------------- reading

    @property
    def engine_url(self) -> str:
        return self._url()

    @property
    def engine_api_key(self) -> str:
        """The running engine's key, which vLLM requires on /v1 (the gateway and the chat send
        it); a fresh one on every start, recovered from its private file on adoption."""
        return self._engine_key

    @property
    def served_model_name(self) -> str:
        with self._lock:
            if self._status.served_model_name:
                return self._status.served_model_name
        from appliance.engine.launch import served_name_for  # local: avoids a start-up cycle

        return served_name_for(self.settings)

    @property
    def version(self) -> int:
        with self._lock:
            return self._status.version

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            self._runtime = _make_runtime(self.settings.engine.runtime)
        return self._runtime

    def status(self) -> EngineStatus:
        """A snapshot (a copy): open phases show their elapsed time up to now."""
        with self._lock:
            snap = copy.deepcopy(self._status)
            log_phases = self._engine.tracker.phases if self._engine else []
            snap.phases = copy.deepcopy(self._pre_phases + log_phases)
            snap.log_tail = list(self._tail)[-50:]
            if self._engine is not None:
                snap.effective = {**snap.effective, **self._engine.tracker.facts}
        now = self._wall()
        for phase in snap.phases:
            if not phase.done:
                phase.elapsed_s = max(0.0, now - phase.started_at)
        snap.phase = _phase_name(snap)
        return snap

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(status)` after every state change; returns the function that removes it.
        Listeners run on the supervisor's threads and must return quickly."""
        with self._lock:
            self._listeners.append(listener)

        def remove() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return remove

    subscribe = add_listener

    def wait_for_change(self, since_version: int, timeout_s: float) -> EngineStatus:
        """Block until the version moves past `since_version` or `timeout_s` passes."""
        deadline = self._clock() + timeout_s
        with self._changed:
            while self._status.version <= since_version:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                self._changed.wait(min(remaining, 0.5))
        return self.status()

    def wait_ready(self, timeout_s: float | None = None) -> EngineStatus:
        """Block until ready; EngineError with the reason when it fails, stops or times out."""
        timeout = self.settings.engine.start_timeout_s + 60 if timeout_s is None else timeout_s
        deadline = self._clock() + timeout
        with self._changed:
            while True:
                state = self._status.state
                if state in (EngineState.READY, EngineState.SLEEPING):
                    break
                if state == EngineState.FAILED:
                    raise EngineError(self._status.message or "The engine failed to start.")
                if state in (EngineState.STOPPED, EngineState.ABSENT) and not self._busy():
                    raise EngineError(
                        "The engine is not starting.", hint="Start it with `step-station start`."
                    )
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise EngineError(
                        f"The engine was not ready after {timeout:.0f} s (state: {state.value}).",
                        hint="`step-station status` shows where it is.",
                    )
                self._changed.wait(min(remaining, 0.5))
        return self.status()

    # ------------------------------------------------------------------------------ operations

    def attach(self) -> EngineStatus:
        """Derive the state from the runtime and adopt a running engine (appliance start-up, CLI).

        Never starts anything. A healthy engine is READY as soon as this returns. Afterwards a
        light watcher (every `outside_poll_s`) adopts an engine that another step-station
        process (the CLI) starts while this one is idle.
        """
        status = self._attach_once()
        self._watch_outside()
        return status

    def _attach_once(self) -> EngineStatus:
        # Under the engine lock, like a start's own look (_find_running): a stop holds it from
        # SIGTERM to removal, so an engine on its way out is never adopted (READY, then gone).
        with self._decide, EngineLock(self.lock_timeout_s):
            with self._lock:
                if self._busy() or self._engine is not None:
                    return self.status()
            handle = self.runtime.find(self._name())
            self._refresh_desired_hash()
            if handle is None:
                with self._lock:
                    state = self._status.state
                if state not in (EngineState.STOPPED, EngineState.FAILED):
                    self._update(state=EngineState.ABSENT, container_id="", message="")
                return self.status()
            info = self.runtime.inspect(handle)
            if not info.running:
                with self._lock:
                    known = self._status.container_id == handle.id
                if not known:
                    self._report_exited(handle, info)
                return self.status()
            self._adopt(handle, spec=None)
            if health.probe_health(self._url()) == 200:
                self._mark_ready(adopted=True)
            self._spawn(self._watch_adopted, handle)
            return self.status()

    def _watch_outside(self) -> None:
        with self._lock:
            if self._outside is not None or self.outside_poll_s <= 0:
                return
            self._outside = threading.Thread(
                target=self._outside_loop, name="engine-outside-watch", daemon=True
            )
        self._outside.start()

    def _outside_loop(self) -> None:
        while not self._closed.wait(self.outside_poll_s):
            with self._lock:
                idle = self._engine is None and not (
                    self._worker is not None and self._worker.is_alive()
                )
            if not idle:
                continue
            try:
                self._attach_once()
            except ApplianceError as err:  # Docker away: try again on the next round
                log.info("engine watch: %s", err)

    def start(self, profile: str | None = None) -> EngineStatus:
        """Start the engine in the background; returns at once (`wait_ready()` to block).

        Does nothing when the engine is already starting or running.
        """
        self.try_start(profile)
        return self.status()

    def try_start(self, profile: str | None = None) -> bool:
        """`start()`, saying whether this call started the engine: False when it was already
        starting or running (two pages clicking Start at once: one starts, one is told)."""
        with self._decide, self._lock:
            if self._busy() or self._status.state in (EngineState.READY, EngineState.SLEEPING):
                return False
            self._cancel.clear()
            self._pre_phases = []
            self._tail.clear()
            self._engine = None
            self._status = EngineStatus(
                state=EngineState.STARTING,
                profile=profile or self.settings.engine.profile,
                runtime=self.settings.engine.runtime,
                engine_url=self._url(),
                container_name=self._name(),
                message="Preparing to start the engine.",
                started_at=self._wall(),
                version=self._status.version,
            )
            self._bump()
            self._spawn(self._run_start, profile)
        self._notify()
        return True

    def stop(self, timeout_s: float | None = None) -> EngineStatus:
        """Stop gracefully (SIGTERM, deadline, kill), remove the engine, and return when done."""
        timeout = float(self.settings.engine.stop_timeout_s if timeout_s is None else timeout_s)
        self._cancel.set()
        self._tick.set()
        worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout=timeout + 10)
        with EngineLock(self.lock_timeout_s):
            handle = self._engine.handle if self._engine else self.runtime.find(self._name())
            if handle is None:
                with self._lock:
                    was = self._status.state
                self._update(
                    state=EngineState.STOPPED if was != EngineState.ABSENT else EngineState.ABSENT,
                    progress=None,
                    message="The engine is not running." if was == EngineState.ABSENT else "",
                )
                return self.status()
            self._update(state=EngineState.STOPPING, message="Stopping the engine.")
            self.runtime.stop(handle, timeout)
            self.runtime.remove(handle)
            if endpoint.uses_socket(self.settings.engine):
                endpoint.remove_socket(self._name())
        self._forget_engine()
        self._update(
            state=EngineState.STOPPED,
            container_id="",
            progress=None,
            restart_needed=False,
            message="Stopped; the GPU memory is released.",
        )
        return self.status()

    def restart(self, profile: str | None = None) -> EngineStatus:
        """Stop, then start with the current settings (how a changed setting takes effect)."""
        self.stop()
        return self.start(profile)

    def apply_settings(self, settings: st.Settings) -> EngineStatus:
        """Take new settings; a running engine launched with other settings needs a restart."""
        self.settings = settings
        self._refresh_desired_hash()
        return self.status()

    def close(self) -> None:
        """Stop watching (threads end); the engine itself keeps running and is adopted later."""
        self._closed.set()
        self._cancel.set()
        self._tick.set()
        if self._engine is not None:
            self._engine.stop_logs.set()
        worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout=5)

    # ------------------------------------------------------------------------------- sleeping

    def note_activity(self) -> None:
        """A request went to the engine or ended: restarts the idle-sleep clock.

        A busy engine seen before this (`_maybe_idle_sleep`) is forgotten: the clock now counts
        from here, and a request still running is seen again when the idle time is up.
        """
        self._last_activity = self._clock()
        self._engine_was_busy = False

    def idle_s(self) -> float:
        """Seconds since the last activity (a request, a browser chat, the engine seen busy)."""
        return max(0.0, self._clock() - self._last_activity)

    def begin_use(self, timeout_s: float = 120.0) -> None:
        """A browser chat is about to send a request: idle sleep waits until `end_use()`, and a
        sleeping engine is woken first (EngineError when it does not wake).

        The gateway's requests need no such call: the engine's own gauges show them (see
        `_maybe_idle_sleep`). Blocks while an idle sleep is being entered, then wakes the engine.
        """
        with self._sleep_gate:
            with self._lock:
                self._in_use += 1
            self.note_activity()
        try:
            self.ensure_awake(timeout_s)
        except BaseException:
            self.end_use()
            raise

    def end_use(self) -> None:
        """The browser chat's request ended: the idle time counts from now."""
        with self._lock:
            self._in_use = max(0, self._in_use - 1)
        self.note_activity()

    @contextlib.contextmanager
    def in_use(self, timeout_s: float = 120.0) -> Iterator[None]:
        """`begin_use()` ... `end_use()` around a block."""
        self.begin_use(timeout_s)
        try:
            yield
        finally:
            self.end_use()

    def sleep(self, level: int = 1, timeout_s: float = 120.0) -> EngineStatus:
        """Put a ready engine to sleep (dev-mode endpoints on loopback; needs `sleep_mode`).

        Level 1 only: level 2 discards the weights, and vLLM 0.23 then answers with garbage after
        `/wake_up` until a `reload_weights` RPC and a prefix-cache reset (seen on an H200:
        docs/runs/h200-vllm-0.23-notes.md). Level 1 parks them in host memory instead.
        """
        if level != 1:
            raise EngineError(
                f"Sleep level {level} is not supported; the appliance sleeps at level 1.",
                hint="Level 1 keeps the weights in host memory and wakes in about a second.",
            )
        if not self.settings.engine.sleep_mode:
            raise EngineError(
                "Sleep mode is off.",
                hint="Turn it on (`step-station config set engine.sleep_mode true`), then restart.",
            )
        if self.status().state != EngineState.READY:
            raise EngineError("Only a ready engine can sleep.")
        code = health.post(self._url(), f"/sleep?level={level}", timeout_s)
        if code != 200:
            raise EngineError(f"The engine refused to sleep (HTTP {code}).")
        self._poll_sleeping(want=True, timeout_s=timeout_s)
        self._update(state=EngineState.SLEEPING, message=f"Sleeping (level {level}).")
        return self.status()

    def wake(self, timeout_s: float = 120.0) -> EngineStatus:
        """Wake a sleeping engine; returns when it serves again (concurrent callers wait for the
        same wake-up)."""
        with self._wake_lock:
            if self.status().state != EngineState.SLEEPING:
                return self.status()
            self._update(message="Waking up.")
            code = health.post(self._url(), "/wake_up", timeout_s)
            if code != 200:
                raise EngineError(f"The engine did not wake up (HTTP {code}).")
            self._poll_sleeping(want=False, timeout_s=timeout_s)
            self.note_activity()
            self._update(state=EngineState.READY, message="Serving (woke up).")
        return self.status()

    def ensure_awake(self, timeout_s: float = 120.0) -> None:
        """Wake on demand (the gateway and chat call this before sending a request)."""
        self.note_activity()
        if self.status().state == EngineState.SLEEPING:
            self.wake(timeout_s)

    def _poll_sleeping(self, *, want: bool, timeout_s: float) -> None:
        deadline = self._clock() + timeout_s
        while self._clock() < deadline:
            if health.is_sleeping(self._url()) is want:
                return
            self._cancel.wait(self.poll_interval_s)
        raise EngineError(f"The engine did not {'sleep' if want else 'wake up'} in {timeout_s} s.")

    # ------------------------------------------------------------------------------------ logs

    def iter_logs(self, *, follow: bool, stop: threading.Event | None = None) -> Iterator[str]:
        """The engine's log lines (`step-station logs [-f]`)."""
        handle = self.runtime.find(self._name())
        if handle is None:
            raise EngineError("There is no engine to show logs for.", hint="`step-station start`.")
        if not follow:
            yield from self.runtime.tail(handle, TAIL_LINES)
            return
        for line in self.runtime.follow_logs(handle, stop or threading.Event()):
            yield line.text

    # --------------------------------------------------------------------------- the worker

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        def run() -> None:
            try:
                target(*args)
            except ApplianceError as err:
                self._fail(str(err))
            except Exception as err:  # noqa: BLE001 - a worker must never die silently
                log.exception("engine supervisor worker failed")
                self._fail(
                    f"Unexpected error in the engine supervisor: {err!r}. "
                    "Check `step-station logs`, then try again."
                )

        thread = threading.Thread(target=run, name="engine-supervisor", daemon=True)
        self._worker = thread
        thread.start()

    def _busy(self) -> bool:
        worker = self._worker
        return (
            worker is not None
            and worker.is_alive()
            and self._status.state.busy
            and worker is not threading.current_thread()
        )

    def _run_start(self, profile: str | None) -> None:
        settings = self.settings
        spec = self._build_spec(profile)
        self._update(
            profile=spec.profile,
            served_model_name=spec.served_model_name,
            effective=_effective(spec),
        )
        with self._lock:
            if self.settings is settings:  # else apply_settings set the hash the new ones want
                self._desired_hash = spec.settings_hash
        existing = self._find_running()
        if existing is not None:
            self._adopt(existing, spec)
            self._watch_adopted(existing)
            return
        if not self.runtime.image_present(spec):
            self._pull(spec)
        if self._cancel.is_set():
            return
        if not self.demo:  # flags the engine does not know: dropped (known no-ops) or refused
            self._update(message="Checking the engine's flags (once per image).")
            flags = compat.check_flags(spec, self.runtime)
            spec = dataclasses.replace(spec, args=flags.args)
            self._update(notes=list(flags.notes), effective=_effective(spec))
        spec = self._ensure_weights(spec)
        if template_notes := compat.template_notes(spec):
            self._update(notes=[*self.status().notes, *template_notes])
        retried = False
        while not self._cancel.is_set():
            handle = self._launch(spec)
            if handle is None:  # cancelled, or adopted one another process started
                return
            outcome = self._watch_start(
                handle, self._clock() + self.settings.engine.start_timeout_s
            )
            if outcome.ready:
                self._mark_ready(adopted=False)
                self._monitor(handle)
                return
            if outcome.cancelled:
                return
            safer = None
            if not retried and outcome.failure in RETRYABLE:
                safer = self._safer(spec, outcome.failure or "")
            if safer is None:
                if retried and outcome.failure in RETRYABLE:
                    outcome.message += f" It failed again after a retry with {self._retry_note()}."
                self._fail_engine(handle, outcome)
                return
            spec, note = safer
            retried = True
            self._remove_quietly(handle)
            self._update(
                retry_note=note,
                message=f"{_RETRY_REASON.get(outcome.failure or '', 'Failed')} at start; "
                f"retrying once with {note}.",
                effective={**_effective(spec), "retry": note},
            )

    def _safer(self, spec: LaunchSpec, failure: str) -> tuple[LaunchSpec, str] | None:
        """The one safer retry: when vLLM's start-up check found less free memory than
        `--gpu-memory-utilization` asks for (another program holds memory), ask for what was free
        minus a margin; otherwise `spec.safer_spec` (lower utilization, or shorter context)."""
        with self._lock:
            line = self._engine.tracker.failure_line if self._engine else ""
        match = _FREE_MEMORY.search(line) if failure == phases.MEMORY_IN_USE else None
        if match is None:
            return safer_spec(spec, failure, self._facts())
        free, total = float(match.group(1)), float(match.group(2))
        current = spec.arg_value("--gpu-memory-utilization")
        was = float(current) if current else VLLM_DEFAULT_GPU_MEMORY_UTILIZATION
        fits = int((free / total - _FREE_MARGIN) * 100) / 100 if total > 0 else 0.0
        if fits >= was or fits < 0.1:
            return None
        note = (
            f"--gpu-memory-utilization {fits:.2f} (was {was:.2f}; "
            f"{free:.1f} of {total:.1f} GiB free)"
        )
        return spec.with_arg("--gpu-memory-utilization", f"{fits:.2f}"), note

    def _facts(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._engine.tracker.facts) if self._engine else {}

    def _retry_note(self) -> str:
        with self._lock:
            return self._status.retry_note

    def _build_spec(self, profile: str | None) -> LaunchSpec:
        if self._spec_builder is not None:
            return self._spec_builder(self, profile)
        from appliance.engine.launch import launch_spec_for  # local: keeps import light

        return launch_spec_for(
            self.settings,
            profile=profile,
            runtime=self.runtime.kind,
            demo=self.demo,
            download_weights=self.download_weights,
            secrets=self._secrets,
        )

    def _find_running(self) -> EngineHandle | None:
        with EngineLock(self.lock_timeout_s):
            handle = self.runtime.find(self._name())
            if handle is None:
                return None
            if self.runtime.inspect(handle).running:
                return handle
            self.runtime.remove(handle)  # an old, exited engine: its name is needed again
            return None

    def _pull(self, spec: LaunchSpec) -> None:
        record = self._begin_pre_phase(PULLING)
        self._update(
            state=EngineState.PULLING_IMAGE, message=f"Pulling {spec.image}.", progress=(0, 0)
        )

        def on_progress(done: int, total: int, line: str) -> None:
            if self._cancel.is_set():
                raise EngineError("Start cancelled while pulling the image.")
            record.detail = _bytes_detail(done, total)
            self._update(progress=(done, total), message=line or f"Pulling {spec.image}.")

        self.runtime.ensure_image(spec, on_progress)
        self._end_pre_phase(record)

    def _ensure_weights(self, spec: LaunchSpec) -> LaunchSpec:
        if not spec.weights_repo:
            if spec.model.startswith("/"):  # a local checkpoint: never reach the Hub
                return spec.with_env(HF_HUB_OFFLINE="1")
            return spec
        record = self._begin_pre_phase(DOWNLOADING)
        self._update(
            state=EngineState.DOWNLOADING_WEIGHTS,
            message=f"Downloading {spec.weights_repo}.",
            progress=(0, 0),
        )

        def on_progress(done: int, total: int, line: str) -> None:
            record.detail = _bytes_detail(done, total)
            self._update(progress=(done, total), message=line or record.detail)

        fetch = self._weights_fetcher
        if fetch is None:
            from appliance.engine.weights import ensure_weights

            fetch = ensure_weights
        fetch(
            spec.weights_repo,
            hf_cache=spec.hf_cache,
            token=spec.hf_token,
            on_progress=on_progress,
            cancel=self._cancel,
        )
        self._end_pre_phase(record)
        return spec.with_env(HF_HUB_OFFLINE="1")

    def _launch(self, spec: LaunchSpec) -> EngineHandle | None:
        if spec.socket_dir:
            endpoint.prepare_socket(spec.name)
        else:
            health.ensure_port_free(spec.host_ip, spec.host_port)
        adopted: EngineHandle | None = None
        with EngineLock(self.lock_timeout_s):
            if self._cancel.is_set():
                return None
            existing = self.runtime.find(spec.name)
            if existing is not None:
                if self.runtime.inspect(existing).running:
                    self._adopt(existing, spec)
                    adopted = existing
                else:
                    self.runtime.remove(existing)
            if adopted is None:
                if spec.socket_dir:  # no engine of this name runs: a socket file left is stale
                    endpoint.remove_socket(spec.name)
                self._update(
                    state=EngineState.STARTING,
                    progress=None,
                    message="Starting the engine.",
                    exit_code=None,
                )
                from appliance.engine.launch import with_fresh_engine_key  # see _build_spec

                spec = with_fresh_engine_key(spec)  # a new key for every start, before it runs
                self._engine_key = spec.engine_key
                handle = self.runtime.launch(spec)
        if adopted is not None:  # watched outside the lock: the watch lasts the engine's life
            self._watch_adopted(adopted)
            return None
        self._watch_logs(handle, spec, fresh=True)
        self._update(container_id=handle.id, message="Loading the model.")
        return handle

    def _watch_start(self, handle: EngineHandle, deadline: float) -> _Outcome:
        """Poll until ready, exited, cancelled or past the deadline."""
        url = self._url()
        while True:
            if self._cancel.is_set():
                return _Outcome(cancelled=True)
            try:
                info = self.runtime.inspect(handle)
            except DockerUnavailableError as err:
                self._update(message=f"{err} Waiting for Docker to come back.")
                info = EngineExit(running=True)
            if not info.running:
                self._wait_logs_drained()
                return self._exited_outcome(info, starting=True)
            code = health.probe_health(url)
            if code == 200:
                return _Outcome(ready=True)
            if code == 503:
                return _Outcome(
                    message="The engine reported itself dead (/health 503) while starting."
                )
            if self._clock() >= deadline:
                return self._hang_outcome(handle)
            self._tick.wait(self.poll_interval_s)
            self._tick.clear()

    def _hang_outcome(self, handle: EngineHandle) -> _Outcome:
        with self._lock:
            phase = _phase_name(self.status())
        limit = self.settings.engine.start_timeout_s
        self._update(message=f"Not ready after {limit} s; stopping the engine.")
        self.runtime.stop(handle, self.settings.engine.stop_timeout_s)
        return _Outcome(
            message=f"The engine was not ready after {limit} s (stuck in '{phase}') and was "
            "stopped. See `step-station logs`; if the machine is just slow, raise "
            "engine.start_timeout_s (`step-station config set engine.start_timeout_s SECONDS`)."
        )

    def _exited_outcome(
        self, info: EngineExit, *, starting: bool, watched: bool = True
    ) -> _Outcome:
        with self._lock:
            failure = self._engine.tracker.failure if self._engine else None
            failure_line = self._engine.tracker.failure_line if self._engine else ""
        when = "while starting" if starting else "unexpectedly"
        code = "" if info.exit_code is None else f" (exit code {info.exit_code})"
        if info.gone:
            message = "The engine was removed by another program (or another step-station)."
        elif failure == phases.CUDA_OOM:
            message = f"The engine ran out of GPU memory {when}{code}."
        elif failure == phases.MAX_LEN_TOO_LARGE:
            message = f"The context length does not fit in the KV cache{code}."
        elif failure == phases.KV_NO_MEMORY:
            message = f"No GPU memory was left for the KV cache{code}."
        elif info.oom_killed:
            message = f"The engine was killed by the kernel's out-of-memory killer {when}{code}."
        elif not watched:
            shown = code or " (exit code unknown)"
            message = (
                f"The engine crashed while no step-station watched it{shown}: it ended without "
                "being stopped."
            )
        elif starting and failure is not None:
            message = f"The engine exited {when}{code}."
        else:
            # Any exit we did not ask for is a crash, even code 0 (vLLM's API server exits 0
            # when its engine core dies: vLLM issue 48966).
            message = f"The engine crashed: it exited {when}{code}."
        hint = _failure_hint(failure, info)
        if failure_line and failure not in (None, phases.CUDA_OOM):
            message += f" Log: {failure_line[-200:]}"
        return _Outcome(failure=failure, exit=info, message=f"{message} {hint}".strip())

    def _fail_engine(self, handle: EngineHandle, outcome: _Outcome) -> None:
        self._wait_logs_drained()
        tail = self._safe_tail(handle)
        info = outcome.exit
        self._fail(
            outcome.message,
            exit_code=info.exit_code if info else None,
            oom=bool(info and info.oom_killed) or outcome.failure == phases.CUDA_OOM,
            tail=tail,
        )
        try:  # what outlived the engine's main process (vLLM's worker after its core died)
            self.runtime.stop(handle, 5.0)
        except ApplianceError as err:
            log.info("could not clean up after the failed engine: %s", err)

    # ---------------------------------------------------------------------- adopted / ready

    def _adopt(self, handle: EngineHandle, spec: LaunchSpec | None) -> None:
        labels = handle.labels
        key = engine_key.recover(handle.name, labels)
        self._engine_key = key or ""
        if key is None:  # vLLM will refuse the appliance's requests on /v1 (401)
            log.warning("the running engine's key file is gone; restart the engine to use it")
            self._update(notes=[*self.status().notes, KEY_LOST_NOTE])
        self._update(
            state=EngineState.STARTING,
            container_id=handle.id,
            profile=labels.get(LABEL_PROFILE, spec.profile if spec else ""),
            served_model_name=labels.get(LABEL_SERVED_NAME, spec.served_model_name if spec else ""),
            started_at=handle.started_at,
            message="Found a running engine; watching it.",
            progress=None,
        )
        self._watch_logs(handle, spec, fresh=False)
        self._update_restart_needed()

    def _watch_adopted(self, handle: EngineHandle) -> None:
        if self.status().state != EngineState.READY:
            started = handle.started_at or self._wall()
            remaining = self.settings.engine.start_timeout_s - (self._wall() - started)
            outcome = self._watch_start(handle, self._clock() + max(remaining, 5.0))
            if outcome.cancelled:
                return
            if not outcome.ready:
                self._fail_engine(handle, outcome)
                return
            self._mark_ready(adopted=True)
        self._monitor(handle)

    def _mark_ready(self, *, adopted: bool) -> None:
        self._let_logs_catch_up()
        now = self._wall()
        with self._lock:
            if self._engine is not None:
                self._engine.tracker.close(now)
            self._status.ready_at = now
        msg = "Serving (adopted a running engine)." if adopted else "Serving."
        with self._lock:
            if self._status.retry_note:
                msg += f" Started after one retry with {self._status.retry_note}."
        state = EngineState.READY
        if adopted and self.settings.engine.sleep_mode and health.is_sleeping(self._url()):
            state, msg = EngineState.SLEEPING, "Sleeping (adopted a sleeping engine)."
        self._update(state=state, progress=None, message=msg)
        self._update_restart_needed()
        self.note_activity()

    def _monitor(self, handle: EngineHandle) -> None:
        """Watch a serving engine: a crash is seen within `monitor_interval_s` (+ inspect time)."""
        docker_lost = False
        last_probe = self._clock()
        while not self._cancel.is_set():
            try:
                info = self.runtime.inspect(handle)
            except DockerUnavailableError as err:
                docker_lost = True
                self._update(message=f"{err} The engine's state is unknown until Docker is back.")
                self._tick.wait(self.monitor_interval_s)
                self._tick.clear()
                continue
            if docker_lost:
                docker_lost = False
                self._update(message="Docker is reachable again.")
                self._resume_logs()
            if not info.running:
                if self._cancel.is_set():
                    return
                info = self._settle_exit(handle, info)
                self._wait_logs_drained()
                if info.gone:
                    self._forget_engine()
                    self._update(
                        state=EngineState.STOPPED,
                        container_id="",
                        message="The engine was stopped and removed by another step-station "
                        "process or by hand.",
                    )
                    return
                self._fail_engine(handle, self._exited_outcome(info, starting=False))
                return
            due = self._clock() - last_probe >= self.health_interval_s
            if self._status.state == EngineState.READY and due:
                last_probe = self._clock()
                if health.probe_health(self._url(), timeout_s=2.0) == 503:
                    self._dead_engine(handle)
                    return
            if self._status.state == EngineState.READY:
                self._maybe_idle_sleep()
            self._tick.wait(self.monitor_interval_s)
            self._tick.clear()

    def _dead_engine(self, handle: EngineHandle) -> None:
        """/health answered 503: the engine core died. vLLM's API server notices and exits by
        itself within ~5 s (with code 0); wait a bounded moment for that so the report carries
        its exit code and last lines, then stop what is left."""
        self._update(message="The engine reported itself dead (/health 503).")
        deadline = self._clock() + self.dead_exit_grace_s
        info = self.runtime.inspect(handle)
        while info.running and self._clock() < deadline:
            if self._cancel.wait(0.2):
                return
            info = self.runtime.inspect(handle)
        if not info.running:
            self._wait_logs_drained()
            self._fail_engine(handle, self._exited_outcome(info, starting=False))
            return
        self.runtime.stop(handle, self.settings.engine.stop_timeout_s)
        self._fail_engine(
            handle,
            _Outcome(  # no exit code: the engine did not end by itself, our stop ended it
                message="The engine crashed: it reported itself dead (/health 503) and was "
                "stopped. Start it again; if it keeps happening, see `step-station logs`.",
            ),
        )

    def _settle_exit(self, handle: EngineHandle, info: EngineExit) -> EngineExit:
        """An engine another process stops exits a moment before that process removes it: give
        the removal a short, bounded chance so a deliberate stop is not reported as a crash."""
        for _ in range(int(self.exit_settle_s / 0.1)):
            if info.gone or self._cancel.wait(0.1):
                break
            try:
                info = self.runtime.inspect(handle)
            except DockerUnavailableError:
                break
        return info

    def _maybe_idle_sleep(self) -> None:
        """Sleep after the idle time, never while a request runs.

        vLLM's `POST /sleep` aborts every running and waiting request: its `mode` defaults to
        "abort" and the engine core's `pause_scheduler` then finishes them all as aborted
        (vllm 0.32: `entrypoints/serve/dev/sleep/api_router.py` `sleep`, `v1/engine/core.py`
        `EngineCore.sleep` / `pause_scheduler`; older releases offload the weights under running
        requests). So right before sleeping: no browser chat open (`begin_use`), and the engine's
        own `vllm:num_requests_running` + `vllm:num_requests_waiting` at 0 (the gateway's and any
        other client's requests). While the engine is busy the idle clock keeps restarting, so
        the idle time counts from the end of the last request of any kind.
        """
        engine = self.settings.engine
        idle_s = (
            self.idle_sleep_s if self.idle_sleep_s is not None else engine.idle_sleep_minutes * 60
        )
        if not engine.sleep_mode or idle_s <= 0:
            return
        if self._clock() - self._last_activity < idle_s:
            return
        with self._sleep_gate:
            with self._lock:
                in_use = self._in_use
            if in_use:
                self.note_activity()
                return
            if self._clock() - self._last_activity < idle_s:
                return
            busy = requests_in_engine(self._url())
            if busy is None:  # the gauges are unreadable: not safe to sleep; try after idle_s
                log.info("idle sleep postponed: the engine's /metrics did not answer")
                self.note_activity()
                return
            if busy > 0:  # look again next round, until the engine is idle
                self._engine_was_busy = True
                return
            if self._engine_was_busy:
                self._engine_was_busy = False
                self.note_activity()  # the last request just ended: the idle time starts now
                return
            try:
                self.sleep()
            except EngineError as err:
                self._update(message=f"Idle sleep failed: {err}")
                self.note_activity()

    def _report_exited(self, handle: EngineHandle, info: EngineExit) -> None:
        """An exited engine found at attach: a crash, whatever its exit code.

        Our own stop removes the engine (container, pid file), so one that still exists ended
        without being asked to. Its exit code says nothing: vLLM's API server exits 0 when its
        engine core dies (vLLM issue 48966; seen here with the real 0.32 engine).
        """
        tail = self._safe_tail(handle)
        for line in tail:
            self._tail.append(line)
        tracker = phases.PhaseTracker()
        for line in tail:
            tracker.feed(line, self._wall())
        with self._lock:
            self._engine = _Engine(handle, tracker, threading.Event(), threading.Event())
            self._engine.logs_done.set()
        outcome = self._exited_outcome(info, starting=False, watched=False)
        self._fail(
            outcome.message,
            exit_code=info.exit_code,
            oom=info.oom_killed or tracker.failure == phases.CUDA_OOM,
            tail=tail,
            container_id=handle.id,
        )

    # ------------------------------------------------------------------------------- logs

    def _watch_logs(self, handle: EngineHandle, spec: LaunchSpec | None, *, fresh: bool) -> None:
        tracker = phases.PhaseTracker()
        if fresh:
            tracker.begin(self._wall())
        engine = _Engine(handle, tracker, threading.Event(), threading.Event(), spec)
        with self._lock:
            if self._engine is not None:
                self._engine.stop_logs.set()
            self._engine = engine
        thread = threading.Thread(
            target=self._read_logs, args=(engine,), name="engine-logs", daemon=True
        )
        thread.start()

    def _read_logs(self, engine: _Engine) -> None:
        since = engine.last_at
        try:
            for line in self.runtime.follow_logs(engine.handle, engine.stop_logs, since):
                if since is not None and line.at is not None and line.at <= since:
                    continue  # already seen before the stream was lost
                if line.at is not None:
                    engine.last_at = line.at
                self._take_line(engine, line)
        except ApplianceError as err:
            log.info("engine log stream ended: %s", err)
        finally:
            engine.logs_done.set()
            self._tick.set()  # the stream ends when the engine exits: look now

    def _resume_logs(self) -> None:
        """The log stream ends when Docker goes away; follow again from the last line seen."""
        with self._lock:
            engine = self._engine
        if engine is None or not engine.logs_done.is_set() or engine.stop_logs.is_set():
            return
        engine.logs_done.clear()
        thread = threading.Thread(
            target=self._read_logs, args=(engine,), name="engine-logs", daemon=True
        )
        thread.start()

    def _take_line(self, engine: _Engine, line: LogLine) -> None:
        now = line.at or self._wall()
        with self._lock:
            self._tail.append(line.text)
            phase_before = engine.tracker.current.name if engine.tracker.current else ""
            changed = engine.tracker.feed(line.text, now)
            if self._status.state in (EngineState.READY, EngineState.SLEEPING):
                engine.tracker.close(now)
            phase_after = engine.tracker.current.name if engine.tracker.current else ""
            self._bump()
        if changed and phase_after != phase_before:
            self._notify()

    def _let_logs_catch_up(self, timeout_s: float = 1.0) -> None:
        """/health may answer before the log reader saw the API server's lines: give it a moment
        so the timeline ends with the API server phase."""
        deadline = self._clock() + timeout_s
        while self._clock() < deadline:
            with self._lock:
                engine = self._engine
                if engine is None or engine.logs_done.is_set():
                    return
                current = engine.tracker.current
                if current is not None and current.name == phases.API_SERVER:
                    return
            self._cancel.wait(0.02)

    def _wait_logs_drained(self) -> None:
        engine = self._engine
        if engine is not None:
            engine.logs_done.wait(timeout=2.0)

    def _safe_tail(self, handle: EngineHandle) -> list[str]:
        with self._lock:
            if self._tail:
                return list(self._tail)[-50:]
        try:
            return self.runtime.tail(handle, 50)
        except ApplianceError:
            return []

    def _forget_engine(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.stop_logs.set()
            self._engine = None

    def _remove_quietly(self, handle: EngineHandle) -> None:
        with EngineLock(self.lock_timeout_s):
            self.runtime.stop(handle, 5.0)
            self.runtime.remove(handle)

    # ---------------------------------------------------------------------------- state

    def _update(self, **changes: Any) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(self._status, key, value)
            self._bump()
        self._notify()

    def _bump(self) -> None:
        with self._lock:
            self._status.version += 1
            self._changed.notify_all()

    def _notify(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
        if not listeners:
            return
        snap = self.status()
        for listener in listeners:
            try:
                listener(snap)
            except Exception:  # noqa: BLE001 - one broken listener must not stop the engine
                log.exception("engine status listener failed")

    def _fail(
        self,
        message: str,
        *,
        exit_code: int | None = None,
        oom: bool = False,
        tail: list[str] | None = None,
        container_id: str | None = None,
    ) -> None:
        with self._lock:
            if tail:
                known = set(self._tail)
                for line in tail:
                    if line not in known:
                        self._tail.append(line)
            changes: dict[str, Any] = {
                "state": EngineState.FAILED,
                "message": message,
                "exit_code": exit_code,
                "oom": oom,
                "progress": None,
            }
            if container_id is not None:
                changes["container_id"] = container_id
        self._update(**changes)

    def _begin_pre_phase(self, name: str) -> PhaseRecord:
        record = PhaseRecord(name=name, started_at=self._wall())
        with self._lock:
            self._pre_phases.append(record)
        return record

    def _end_pre_phase(self, record: PhaseRecord) -> None:
        with self._lock:
            record.elapsed_s = max(0.0, self._wall() - record.started_at)
            record.done = True
        self._update(progress=None)

    def _refresh_desired_hash(self) -> None:
        try:
            spec = self._build_spec(None)
        except (ApplianceError, SettingsError) as err:
            log.info("cannot compute the launch settings: %s", err)
            return
        with self._lock:
            self._desired_hash = spec.settings_hash
            if not self._status.served_model_name:
                self._status.served_model_name = spec.served_model_name
        self._update_restart_needed()

    def _update_restart_needed(self) -> None:
        note = "Settings changed since the engine started; restart it to apply them."
        with self._lock:
            engine = self._engine
            running_hash = engine.handle.labels.get(LABEL_SETTINGS_HASH, "") if engine else ""
            needed = bool(
                running_hash and self._desired_hash and running_hash != self._desired_hash
            )
            message = self._status.message
            if needed == self._status.restart_needed and (not needed or note in message):
                return  # (a new message, such as "Serving.", gets the note again)
        if needed and note not in message:
            message = f"{message} {note}".strip()
        self._update(restart_needed=needed, message=message)

    def _url(self) -> str:
        return endpoint.engine_url(self.settings.engine)

    def _name(self) -> str:
        return self.settings.engine.container_name


# ------------------------------------------------------------------------------- helpers


def _make_runtime(kind: str) -> Runtime:
    if kind == "docker":
        from appliance.engine.docker_runtime import DockerRuntime  # the only docker importer

        return DockerRuntime()
    if kind == "process":
        return ProcessRuntime()
    raise SettingsError(
        f"Unknown engine runtime {kind!r}.",
        hint="Use `step-station config set engine.runtime docker` (or `process`).",
    )


_GAUGE = re.compile(r"^vllm:num_requests_(?:running|waiting)(?:\{[^}]*\})?\s+(\S+)", re.MULTILINE)


def requests_in_engine(base_url: str, timeout_s: float = 2.0) -> int | None:
    """Requests running or waiting in the engine, from its `/metrics` gauges (summed over
    engines); None when it does not answer."""
    try:
        response = endpoint.request("GET", f"{base_url}/metrics", timeout_s)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    values = _GAUGE.findall(response.text)
    if not values:
        return None
    try:
        return round(sum(float(v) for v in values))
    except ValueError:
        return None


def _phase_name(status: EngineStatus) -> str:
    if status.state == EngineState.STARTING and status.phases:
        open_phases = [p for p in status.phases if not p.done]
        return (open_phases[-1] if open_phases else status.phases[-1]).name
    if status.state == EngineState.PULLING_IMAGE:
        return PULLING
    if status.state == EngineState.DOWNLOADING_WEIGHTS:
        return DOWNLOADING
    return status.state.label


def _effective(spec: LaunchSpec) -> dict[str, Any]:
    max_len = spec.arg_value("--max-model-len")
    util = spec.arg_value("--gpu-memory-utilization")
    return {
        "served_model_name": spec.served_model_name,
        "model": spec.model,
        "image": spec.image,
        "profile": spec.profile,
        "max_model_len": int(max_len) if max_len and max_len.isdigit() else None,
        "gpu_memory_utilization": float(util) if util else None,
        "gpus": list(spec.gpus) if spec.gpus is not None else None,
        "command": spec.display_command(),
    }


def _bytes_detail(done: int, total: int) -> str:
    if total <= 0:
        return f"{done / 1e9:.2f} GB"
    return f"{done / 1e9:.2f} of {total / 1e9:.2f} GB ({100 * done / total:.0f}%)"


def _failure_hint(failure: str | None, info: EngineExit) -> str:
    if info.oom_killed and failure != phases.MAX_LEN_TOO_LARGE:
        return phases.FAILURE_HINTS[phases.CUDA_OOM]
    if failure in phases.FAILURE_HINTS:  # what to do per failure kind recognised in the log
        return phases.FAILURE_HINTS[failure]
    if info.gone:
        return "Start it again if you want it running."
    return "See the log lines below or `step-station logs`, then start again."


def replace_settings(settings: st.Settings, **engine_changes: Any) -> st.Settings:
    """A copy of `settings` with some engine settings changed (tests, demo)."""
    new = copy.deepcopy(settings)
    new.engine = dataclasses.replace(new.engine, **engine_changes)
    return new
