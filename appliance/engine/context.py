"""What every part of the supervisor shares: the settings, the runtime, the clocks, the timings,
the two signals a stop sends, and the one worker thread.

The supervisor (`supervisor.py`) builds one `EngineContext` and hands it to each part (the status
board, the log follower, the sleeper, the starter, the monitor, the attacher), so they all read
the same settings (replaced whole by `apply_settings`, never changed in place) and the same
clocks (tests pass fake ones). Nothing here is guarded by the status board's lock: `settings`
is swapped by one assignment, and the events and the worker slot are thread-safe on their own.
`decide` is the one lock kept here: a start and an adoption decide one at a time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from appliance import endpoint
from appliance import settings as st
from appliance.engine.process_runtime import ProcessRuntime
from appliance.engine.runtime import Runtime
from appliance.engine.state import EngineState
from appliance.errors import ApplianceError, SettingsError

log = logging.getLogger(__name__)


@dataclass
class Timing:
    """The supervisor's intervals and grace times (tests shorten them)."""

    poll_interval_s: float = 0.25  # how often a start looks at /health
    monitor_interval_s: float = 1.0  # how often a serving engine is inspected
    lock_timeout_s: float = 30.0  # the longest wait for the inter-process engine lock
    outside_poll_s: float = 2.0  # how often an idle one looks for an engine started elsewhere
    exit_settle_s: float = 2.0  # see Monitor._settle_exit
    health_interval_s: float = 2.0  # how often a serving engine's /health is probed
    idle_sleep_s: float | None = None  # None: engine.idle_sleep_minutes
    dead_exit_grace_s: float = 8.0  # see Monitor._dead_engine


class EngineContext:
    """The shared surroundings of one supervisor's parts."""

    def __init__(
        self,
        settings: st.Settings,
        *,
        runtime: Runtime | None,
        clock: Callable[[], float],
        wall: Callable[[], float],
        timing: Timing,
    ) -> None:
        self.settings = settings  # replaced whole, never mutated (apply_settings)
        self._runtime = runtime
        self.clock = clock  # monotonic: deadlines
        self.wall = wall  # wall time: what the status shows
        self.timing = timing
        self.cancel = threading.Event()  # stop()/close(): the start and the watch end
        self.tick = threading.Event()  # "look now": ends a poll's sleep early
        self.closed = threading.Event()  # close(): the outside watch ends
        self.decide = threading.RLock()  # start() vs adopting: one decision at a time

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            self._runtime = make_runtime(self.settings.engine.runtime)
        return self._runtime

    def url(self) -> str:
        return endpoint.engine_url(self.settings.engine)

    def name(self) -> str:
        return self.settings.engine.container_name

    def nap(self, seconds: float) -> None:
        """Sleep between two looks at the engine; a `tick` (log stream ended, stop) ends it."""
        self.tick.wait(seconds)
        self.tick.clear()


class Worker:
    """The supervisor's one worker thread: a start (then its watch) or an adopted engine's watch.

    An error that escapes the thread's job is reported through `on_error` (the status board's
    FAILED), never lost with the thread.
    """

    def __init__(self, on_error: Callable[[str], None]) -> None:
        self._on_error = on_error
        self._thread: threading.Thread | None = None

    def spawn(self, target: Callable[..., None], *args: Any) -> None:
        def run() -> None:
            try:
                target(*args)
            except ApplianceError as err:
                self._on_error(str(err))
            except Exception as err:  # noqa: BLE001 - a worker must never die silently
                log.exception("engine supervisor worker failed")
                self._on_error(
                    f"Unexpected error in the engine supervisor: {err!r}. "
                    "Check `step-station logs`, then try again."
                )

        thread = threading.Thread(target=run, name="engine-supervisor", daemon=True)
        self._thread = thread
        thread.start()

    def alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def busy(self, state: EngineState) -> bool:
        """A start or stop is under way on another thread than the caller's."""
        thread = self._thread
        return (
            thread is not None
            and thread.is_alive()
            and state.busy
            and thread is not threading.current_thread()
        )

    def join(self, timeout_s: float) -> None:
        """Wait for the thread to end (not when called from the thread itself)."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=timeout_s)


def make_runtime(kind: str) -> Runtime:
    if kind == "docker":
        from appliance.engine.docker_runtime import DockerRuntime  # the only docker importer

        return DockerRuntime()
    if kind == "process":
        return ProcessRuntime()
    raise SettingsError(
        f"Unknown engine runtime {kind!r}.",
        hint="Use `step-station config set engine.runtime docker` (or `process`).",
    )
