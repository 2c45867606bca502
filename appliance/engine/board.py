"""The status board: the engine's current `EngineStatus`, who is told when it changes, and how to
wait for a change.

Every part of the supervisor writes the status here (`update`, `fail`, the phases before the
engine's own log takes over) and every reader gets a copy (`snapshot`), never the board's object.

Locking: `lock` (re-entrant) guards everything on the board: the status, the listeners, the
phases before launch, the log tail, the engine being watched (`engine`, which the log follower
sets and feeds) and the settings hash the current settings want. `changed` is a Condition on
that same lock, notified at every version bump; `wait_for_change` and `wait_ready` sleep on it.
Listeners are called outside the lock, on whichever thread made the change.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from appliance.engine.spec import LABEL_SETTINGS_HASH
from appliance.engine.state import EngineState, EngineStatus, PhaseRecord
from appliance.errors import EngineError

if TYPE_CHECKING:
    from appliance.engine.log_follower import WatchedEngine

log = logging.getLogger(__name__)

TAIL_LINES = 200
PULLING = "Pulling image"
DOWNLOADING = "Downloading weights"
RESTART_NOTE = "Settings changed since the engine started; restart it to apply them."

Listener = Callable[[EngineStatus], None]


class StatusBoard:
    """The one `EngineStatus` of a supervisor, with its listeners and waiters."""

    def __init__(
        self, status: EngineStatus, *, clock: Callable[[], float], wall: Callable[[], float]
    ) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.status = status
        self.pre_phases: list[PhaseRecord] = []  # pull and download, before the engine's log
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.engine: WatchedEngine | None = None
        self.desired_hash = ""  # the launch settings hash the current settings ask for
        self._listeners: list[Listener] = []
        self._clock = clock
        self._wall = wall

    # -------------------------------------------------------------------------------- reading

    @property
    def state(self) -> EngineState:
        with self.lock:
            return self.status.state

    def snapshot(self) -> EngineStatus:
        """A copy: open phases show their elapsed time up to now."""
        with self.lock:
            snap = copy.deepcopy(self.status)
            log_phases = self.engine.tracker.phases if self.engine else []
            snap.phases = copy.deepcopy(self.pre_phases + log_phases)
            snap.log_tail = list(self.tail)[-50:]
            if self.engine is not None:
                snap.effective = {**snap.effective, **self.engine.tracker.facts}
        now = self._wall()
        for phase in snap.phases:
            if not phase.done:
                phase.elapsed_s = max(0.0, now - phase.started_at)
        snap.phase = phase_name(snap)
        return snap

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(status)` after every state change; returns what removes it."""
        with self.lock:
            self._listeners.append(listener)

        def remove() -> None:
            with self.lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return remove

    def wait_for_change(self, since_version: int, timeout_s: float) -> EngineStatus:
        """Block until the version moves past `since_version` or `timeout_s` passes."""
        deadline = self._clock() + timeout_s
        with self.changed:
            while self.status.version <= since_version:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                self.changed.wait(min(remaining, 0.5))
        return self.snapshot()

    def wait_ready(self, timeout_s: float, busy: Callable[[], bool]) -> EngineStatus:
        """Block until ready; EngineError when it fails, stops (`busy()` false) or times out."""
        deadline = self._clock() + timeout_s
        with self.changed:
            while True:
                state = self.status.state
                if state in (EngineState.READY, EngineState.SLEEPING):
                    break
                if state == EngineState.FAILED:
                    raise EngineError(self.status.message or "The engine failed to start.")
                if state in (EngineState.STOPPED, EngineState.ABSENT) and not busy():
                    raise EngineError(
                        "The engine is not starting.", hint="Start it with `step-station start`."
                    )
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise EngineError(
                        f"The engine was not ready after {timeout_s:.0f} s (state: {state.value}).",
                        hint="`step-station status` shows where it is.",
                    )
                self.changed.wait(min(remaining, 0.5))
        return self.snapshot()

    # -------------------------------------------------------------------------------- writing

    def begin_start(self, status: EngineStatus) -> None:
        """A new start: `status` replaces the old one (its version goes on), and the phases,
        the tail and the engine of the last start are forgotten. Listeners are not called: the
        caller notifies once it has released the lock."""
        with self.lock:
            self.pre_phases = []
            self.tail.clear()
            self.engine = None
            status.version = self.status.version
            self.status = status
            self.bump()

    def update(self, **changes: Any) -> None:
        with self.lock:
            for key, value in changes.items():
                setattr(self.status, key, value)
            self.bump()
        self.notify()

    def bump(self) -> None:
        with self.lock:
            self.status.version += 1
            self.changed.notify_all()

    def notify(self) -> None:
        with self.lock:
            listeners = list(self._listeners)
        if not listeners:
            return
        snap = self.snapshot()
        for listener in listeners:
            try:
                listener(snap)
            except Exception:  # noqa: BLE001 - one broken listener must not stop the engine
                log.exception("engine status listener failed")

    def fail(
        self,
        message: str,
        *,
        exit_code: int | None = None,
        oom: bool = False,
        tail: list[str] | None = None,
        container_id: str | None = None,
    ) -> None:
        with self.lock:
            if tail:
                known = set(self.tail)
                for line in tail:
                    if line not in known:
                        self.tail.append(line)
            changes: dict[str, Any] = {
                "state": EngineState.FAILED,
                "message": message,
                "exit_code": exit_code,
                "oom": oom,
                "progress": None,
            }
            if container_id is not None:
                changes["container_id"] = container_id
        self.update(**changes)

    def begin_pre_phase(self, name: str) -> PhaseRecord:
        record = PhaseRecord(name=name, started_at=self._wall())
        with self.lock:
            self.pre_phases.append(record)
        return record

    def end_pre_phase(self, record: PhaseRecord) -> None:
        with self.lock:
            record.elapsed_s = max(0.0, self._wall() - record.started_at)
            record.done = True
        self.update(progress=None)

    # ---------------------------------------------------------------------- restart needed

    def want_settings(self, settings_hash: str, served_model_name: str) -> None:
        """The current settings launch with `settings_hash`: a running engine launched with
        other settings needs a restart."""
        with self.lock:
            self.desired_hash = settings_hash
            if not self.status.served_model_name:
                self.status.served_model_name = served_model_name
        self.update_restart_needed()

    def update_restart_needed(self) -> None:
        with self.lock:
            engine = self.engine
            running_hash = engine.handle.labels.get(LABEL_SETTINGS_HASH, "") if engine else ""
            needed = bool(running_hash and self.desired_hash and running_hash != self.desired_hash)
            message = self.status.message
            if needed == self.status.restart_needed and (not needed or RESTART_NOTE in message):
                return  # (a new message, such as "Serving.", gets the note again)
        if needed and RESTART_NOTE not in message:
            message = f"{message} {RESTART_NOTE}".strip()
        self.update(restart_needed=needed, message=message)


def phase_name(status: EngineStatus) -> str:
    """The current phase's name, or the state's label when no phase applies."""
    if status.state == EngineState.STARTING and status.phases:
        open_phases = [p for p in status.phases if not p.done]
        return (open_phases[-1] if open_phases else status.phases[-1]).name
    if status.state == EngineState.PULLING_IMAGE:
        return PULLING
    if status.state == EngineState.DOWNLOADING_WEIGHTS:
        return DOWNLOADING
    return status.state.label
