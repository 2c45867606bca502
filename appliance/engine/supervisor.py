"""The engine's state machine: from nothing to serving and back, telling the truth at every step.

The truth is the runtime (Docker): the engine carries `io.step-station.*` labels, so a restarted
appliance re-derives the state and adopts a running engine instead of starting a second one.
Operations that create or remove the engine hold an inter-process lock (`lock.py`), so the UI,
the CLI and the gateway never race. Every wait has a deadline and ends early when the engine
exits; waits sleep on an event that `stop()` (and tests) can set.

`Supervisor` is the facade every client uses; the work is done by its parts, one job each:

- `board.StatusBoard`: the current status, its listeners and waiters (its lock guards the state);
- `starter.Starter`: pull, weights, flags, launch, wait for ready, one safer retry; adoption;
- `monitor.Monitor`: watching a serving engine (exit, /health, asking for idle sleep);
- `log_follower.LogFollower`: the engine's log into the tail and the phase tracker;
- `sleeper.Sleeper`: sleep, wake, and the idle clock;
- `attach.Attacher`: finding an engine this process did not start;
- `context.EngineContext`: what they share (settings, runtime, clocks, timings, stop signals).

Threads: `start()` returns at once; one worker thread runs the start and then watches the engine
until it stops; one log thread per engine feeds the phase tracker; an idle supervisor's outside
watcher adopts an engine another process starts. `status()` returns a copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from appliance import endpoint
from appliance import settings as st
from appliance.engine.attach import Attacher
from appliance.engine.board import TAIL_LINES, Listener, StatusBoard
from appliance.engine.context import EngineContext, Timing, Worker
from appliance.engine.launch import launch_spec_for, served_name_for
from appliance.engine.lock import EngineLock
from appliance.engine.log_follower import LogFollower
from appliance.engine.monitor import Monitor
from appliance.engine.process_runtime import ProcessRuntime
from appliance.engine.runtime import Runtime
from appliance.engine.sleeper import Sleeper, requests_in_engine
from appliance.engine.spec import LaunchSpec
from appliance.engine.starter import KEY_LOST_NOTE, Starter, WeightsFetcher
from appliance.engine.state import EngineState, EngineStatus

if TYPE_CHECKING:
    from appliance.engine.protocol import EngineOwner

__all__ = [
    "KEY_LOST_NOTE",
    "TAIL_LINES",
    "SpecBuilder",
    "Supervisor",
    "replace_settings",
    "requests_in_engine",
]

SpecBuilder = Callable[["Supervisor", "str | None"], LaunchSpec]
# Asked before every start: None lets it go, an error (raised in its place) says why not.
StartGuard = Callable[[], Exception | None]

_T = TypeVar("_T")


class _InTiming(Generic[_T]):
    """A supervisor attribute kept in the shared `Timing`, where the parts read it: setting it
    on the supervisor (tests do) changes what every part sees."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, sup: Supervisor, owner: type | None = None) -> _T:
        return cast(_T, getattr(sup._ctx.timing, self._name))

    def __set__(self, sup: Supervisor, value: _T) -> None:
        setattr(sup._ctx.timing, self._name, value)


class Supervisor:
    """One engine, one state machine. Thread-safe; all public methods may be called from any
    thread (UI callbacks, CLI, gateway)."""

    poll_interval_s = _InTiming[float]()
    monitor_interval_s = _InTiming[float]()
    lock_timeout_s = _InTiming[float]()
    outside_poll_s = _InTiming[float]()
    exit_settle_s = _InTiming[float]()
    health_interval_s = _InTiming[float]()
    idle_sleep_s = _InTiming[float | None]()  # None: engine.idle_sleep_minutes
    dead_exit_grace_s = _InTiming[float]()

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
        self.demo = demo
        self.download_weights = (not demo) if download_weights is None else download_weights
        self._secrets = secrets
        self._spec_builder = spec_builder
        timing = Timing(
            poll_interval_s=poll_interval_s,
            monitor_interval_s=monitor_interval_s,
            lock_timeout_s=lock_timeout_s,
            outside_poll_s=outside_poll_s,
            health_interval_s=health_interval_s,
            idle_sleep_s=idle_sleep_s,
        )
        ctx = EngineContext(settings, runtime=runtime, clock=clock, wall=wall, timing=timing)
        self._ctx = ctx
        self._board = StatusBoard(
            EngineStatus(engine_url=ctx.url(), container_name=ctx.name()), clock=clock, wall=wall
        )
        self._worker = Worker(self._board.fail)
        self._logs = LogFollower(ctx, self._board)
        self._sleeper = Sleeper(ctx, self._board)
        self._monitor = Monitor(ctx, self._board, self._logs, self._sleeper)
        self._starter = Starter(
            ctx,
            self._board,
            self._logs,
            self._monitor,
            self._sleeper,
            spec_for=self._build_spec,
            weights_fetcher=weights_fetcher,
            demo=demo,
        )
        self._attacher = Attacher(ctx, self._board, self._logs, self._starter, self._worker)
        self._start_guards: list[StartGuard] = []

    @classmethod
    def for_demo(cls, settings: st.Settings, **kwargs: Any) -> Supervisor:
        """A supervisor that runs the simulator as a local process (`step-station up --demo`)."""
        kwargs.setdefault("runtime", ProcessRuntime())
        return cls(replace_settings(settings, runtime="process"), demo=True, **kwargs)

    # -------------------------------------------------------------------------------- reading

    @property
    def settings(self) -> st.Settings:
        return self._ctx.settings

    @settings.setter
    def settings(self, settings: st.Settings) -> None:
        self._ctx.settings = settings

    @property
    def engine_url(self) -> str:
        return self._ctx.url()

    @property
    def engine_api_key(self) -> str:
        """The running engine's key, which vLLM requires on /v1 (the gateway and the chat send
        it); a fresh one on every start, recovered from its private file on adoption."""
        return self._starter.engine_key

    @property
    def served_model_name(self) -> str:
        with self._board.lock:
            if self._board.status.served_model_name:
                return self._board.status.served_model_name
        return served_name_for(self.settings)

    @property
    def version(self) -> int:
        with self._board.lock:
            return self._board.status.version

    @property
    def runtime(self) -> Runtime:
        return self._ctx.runtime

    def status(self) -> EngineStatus:
        """A snapshot (a copy): open phases show their elapsed time up to now."""
        return self._board.snapshot()

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(status)` after every state change; returns the function that removes it.
        Listeners run on the supervisor's threads and must return quickly."""
        return self._board.add_listener(listener)

    subscribe = add_listener

    def wait_for_change(self, since_version: int, timeout_s: float) -> EngineStatus:
        """Block until the version moves past `since_version` or `timeout_s` passes."""
        return self._board.wait_for_change(since_version, timeout_s)

    def wait_ready(self, timeout_s: float | None = None) -> EngineStatus:
        """Block until ready; EngineError with the reason when it fails, stops or times out."""
        timeout = self.settings.engine.start_timeout_s + 60 if timeout_s is None else timeout_s
        return self._board.wait_ready(timeout, self._busy)

    # ------------------------------------------------------------------------------ operations

    def attach(self) -> EngineStatus:
        """Derive the state from the runtime and adopt a running engine (appliance start-up, CLI).

        Never starts anything. A healthy engine is READY as soon as this returns. Afterwards a
        light watcher (every `outside_poll_s`) adopts an engine that another step-station
        process (the CLI) starts while this one is idle.
        """
        status = self._attacher.attach_once()
        self._attacher.watch_outside()
        return status

    def start(self, profile: str | None = None) -> EngineStatus:
        """Start the engine in the background; returns at once (`wait_ready()` to block).

        Does nothing when the engine is already starting or running.
        """
        self.try_start(profile)
        return self.status()

    def try_start(self, profile: str | None = None) -> bool:
        """`start()`, saying whether this call started the engine: False when it was already
        starting or running (two pages clicking Start at once: one starts, one is told).
        Raises the refusal of a start guard (`add_start_guard`) while one holds the GPU."""
        ctx, board = self._ctx, self._board
        with ctx.decide, board.lock:
            if self._busy() or board.status.state in (EngineState.READY, EngineState.SLEEPING):
                return False
            for guard in list(self._start_guards):
                refusal = guard()
                if refusal is not None:
                    raise refusal
            ctx.cancel.clear()
            board.begin_start(
                EngineStatus(
                    state=EngineState.STARTING,
                    profile=profile or self.settings.engine.profile,
                    runtime=self.settings.engine.runtime,
                    engine_url=ctx.url(),
                    container_name=ctx.name(),
                    message="Preparing to start the engine.",
                    started_at=ctx.wall(),
                )
            )
            self._worker.spawn(self._starter.run, profile)
        board.notify()
        return True

    def add_start_guard(self, guard: StartGuard) -> Callable[[], None]:
        """Ask `guard()` before every start, from whichever door it comes (the control socket,
        the Model tab, the gateway's start on request): an error it returns is raised instead of
        starting. MoE tuning holds the GPU this way for hours (appliance/server.py wires
        `TuneRunner.start_refusal`). The check runs under the same lock as the start decision,
        so a guard that begins answering before its owner stops the engine leaves no gap for a
        start to slip through. Returns the function that removes the guard."""
        with self._ctx.decide:
            self._start_guards.append(guard)

        def remove() -> None:
            with self._ctx.decide, contextlib.suppress(ValueError):
                self._start_guards.remove(guard)

        return remove

    def stop(self, timeout_s: float | None = None) -> EngineStatus:
        """Stop gracefully (SIGTERM, deadline, kill), remove the engine, and return when done."""
        ctx, board = self._ctx, self._board
        timeout = float(self.settings.engine.stop_timeout_s if timeout_s is None else timeout_s)
        ctx.cancel.set()
        ctx.tick.set()
        self._worker.join(timeout + 10)
        with EngineLock(ctx.timing.lock_timeout_s):
            engine = board.engine
            handle = engine.handle if engine else ctx.runtime.find(ctx.name())
            if handle is None:
                was = board.state
                board.update(
                    state=EngineState.STOPPED if was != EngineState.ABSENT else EngineState.ABSENT,
                    progress=None,
                    message="The engine is not running." if was == EngineState.ABSENT else "",
                )
                return self.status()
            board.update(state=EngineState.STOPPING, message="Stopping the engine.")
            ctx.runtime.stop(handle, timeout)
            ctx.runtime.remove(handle)
            if endpoint.uses_socket(self.settings.engine):
                endpoint.remove_socket(ctx.name())
        self._logs.forget()
        board.update(
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
        self._starter.refresh_desired_hash()
        return self.status()

    def close(self) -> None:
        """Stop watching (threads end); the engine itself keeps running and is adopted later."""
        ctx = self._ctx
        ctx.closed.set()
        ctx.cancel.set()
        ctx.tick.set()
        engine = self._board.engine
        if engine is not None:
            engine.stop_logs.set()
        self._worker.join(5)

    # ------------------------------------------------------------------------------- sleeping

    def note_activity(self) -> None:
        """A request went to the engine or ended: restarts the idle-sleep clock."""
        self._sleeper.note_activity()

    def idle_s(self) -> float:
        """Seconds since the last activity (a request, a browser chat, the engine seen busy)."""
        return self._sleeper.idle_s()

    def begin_use(self, timeout_s: float = 120.0) -> None:
        """A browser chat is about to send a request: idle sleep waits until `end_use()`, and a
        sleeping engine is woken first (EngineError when it does not wake)."""
        self._sleeper.begin_use(timeout_s)

    def end_use(self) -> None:
        """The browser chat's request ended: the idle time counts from now."""
        self._sleeper.end_use()

    def in_use(self, timeout_s: float = 120.0) -> AbstractContextManager[None]:
        """`begin_use()` ... `end_use()` around a block."""
        return self._sleeper.in_use(timeout_s)

    def sleep(self, level: int = 1, timeout_s: float = 120.0) -> EngineStatus:
        """Put a ready engine to sleep (level 1 only; needs `sleep_mode`): see `Sleeper.sleep`."""
        self._sleeper.sleep(level, timeout_s)
        return self.status()

    def wake(self, timeout_s: float = 120.0) -> EngineStatus:
        """Wake a sleeping engine; returns when it serves again (concurrent callers wait for the
        same wake-up)."""
        self._sleeper.wake(timeout_s)
        return self.status()

    def ensure_awake(self, timeout_s: float = 120.0) -> None:
        """Wake on demand (the gateway and chat call this before sending a request)."""
        self._sleeper.ensure_awake(timeout_s)

    # ------------------------------------------------------------------------------------ logs

    def iter_logs(self, *, follow: bool, stop: threading.Event | None = None) -> Iterator[str]:
        """The engine's log lines (`step-station logs [-f]`)."""
        return self._logs.iter_logs(follow=follow, stop=stop)

    # --------------------------------------------------------------------------------- inside

    def _busy(self) -> bool:
        return self._worker.busy(self._board.status.state)

    def _build_spec(self, profile: str | None) -> LaunchSpec:
        if self._spec_builder is not None:
            return self._spec_builder(self, profile)
        return launch_spec_for(
            self.settings,
            profile=profile,
            runtime=self.runtime.kind,
            demo=self.demo,
            download_weights=self.download_weights,
            secrets=self._secrets,
        )


def replace_settings(settings: st.Settings, **engine_changes: Any) -> st.Settings:
    """A copy of `settings` with some engine settings changed (tests, demo); the original is left
    as it was (settings are never changed in place)."""
    return dataclasses.replace(
        settings, engine=dataclasses.replace(settings.engine, **engine_changes)
    )


if TYPE_CHECKING:
    # Every client types the engine with protocol.EngineOwner: a Supervisor that stops
    # satisfying it is a type error here, not a page that breaks at run time.
    def _is_an_engine_owner(supervisor: Supervisor) -> EngineOwner:
        return supervisor
