"""The log follower: reads the engine's log (container or process) into the status board's tail
and feeds each line to the engine's phase tracker.

One reader thread per watched engine ("engine-logs"); a new engine's reader replaces the old
one's. What it shares: the engine being watched lives on the status board (`board.engine`) and,
like the tail and the tracker it feeds, is guarded by `board.lock`. The reader sets the shared
`tick` event when its stream ends (the engine exited: the start's or the monitor's poll looks
now) and waits on the shared `cancel` event, which a stop sets.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from appliance.engine import phases
from appliance.engine.board import TAIL_LINES, StatusBoard
from appliance.engine.context import EngineContext
from appliance.engine.runtime import EngineHandle, LogLine
from appliance.engine.spec import LaunchSpec
from appliance.engine.state import EngineState
from appliance.errors import ApplianceError, EngineError

log = logging.getLogger(__name__)


@dataclass
class WatchedEngine:
    """The engine being watched, with its log reader's signals."""

    handle: EngineHandle
    tracker: phases.PhaseTracker
    stop_logs: threading.Event
    logs_done: threading.Event
    spec: LaunchSpec | None = None
    last_at: float | None = None  # wall time of the last log line (Docker's timestamps)


class LogFollower:
    """Follows the watched engine's log; every part asks it for the tail and the tracker's
    verdict through the board."""

    def __init__(self, ctx: EngineContext, board: StatusBoard) -> None:
        self._ctx = ctx
        self._board = board

    def follow(self, handle: EngineHandle, spec: LaunchSpec | None, *, fresh: bool) -> None:
        """Watch `handle` from now on: its log feeds a new phase tracker (`fresh`: the engine
        was just launched, so its first phase starts now)."""
        tracker = phases.PhaseTracker()
        if fresh:
            tracker.begin(self._ctx.wall())
        engine = WatchedEngine(handle, tracker, threading.Event(), threading.Event(), spec)
        with self._board.lock:
            if self._board.engine is not None:
                self._board.engine.stop_logs.set()
            self._board.engine = engine
        self._start_reader(engine)

    def resume(self) -> None:
        """The log stream ends when Docker goes away; follow again from the last line seen."""
        with self._board.lock:
            engine = self._board.engine
        if engine is None or not engine.logs_done.is_set() or engine.stop_logs.is_set():
            return
        engine.logs_done.clear()
        self._start_reader(engine)

    def load_exited(self, handle: EngineHandle) -> list[str]:
        """Take an engine that already exited as the watched one: its last lines go to the tail
        and through a tracker (so its failure is read), without a reader. Returns those lines."""
        tail = self.tail_of(handle)
        tracker = phases.PhaseTracker()
        for line in tail:
            tracker.feed(line, self._ctx.wall())
        with self._board.lock:
            for line in tail:
                self._board.tail.append(line)
            self._board.engine = WatchedEngine(
                handle, tracker, threading.Event(), threading.Event()
            )
            self._board.engine.logs_done.set()
        return tail

    def forget(self) -> None:
        """No engine is watched any more: its reader ends."""
        with self._board.lock:
            if self._board.engine is not None:
                self._board.engine.stop_logs.set()
            self._board.engine = None

    def catch_up(self, timeout_s: float = 1.0) -> None:
        """/health may answer before the reader saw the API server's lines: give it a moment
        so the timeline ends with the API server phase."""
        deadline = self._ctx.clock() + timeout_s
        while self._ctx.clock() < deadline:
            with self._board.lock:
                engine = self._board.engine
                if engine is None or engine.logs_done.is_set():
                    return
                current = engine.tracker.current
                if current is not None and current.name == phases.API_SERVER:
                    return
            self._ctx.cancel.wait(0.02)

    def wait_drained(self) -> None:
        """The engine exited: let the reader take its last lines (bounded)."""
        engine = self._board.engine
        if engine is not None:
            engine.logs_done.wait(timeout=2.0)

    def tail_of(self, handle: EngineHandle) -> list[str]:
        """The last lines seen, or the runtime's own tail when none were read."""
        with self._board.lock:
            if self._board.tail:
                return list(self._board.tail)[-50:]
        try:
            return self._ctx.runtime.tail(handle, 50)
        except ApplianceError:
            return []

    def iter_logs(self, *, follow: bool, stop: threading.Event | None = None) -> Iterator[str]:
        """The engine's log lines (`step-station logs [-f]`), straight from the runtime."""
        runtime = self._ctx.runtime
        handle = runtime.find(self._ctx.name())
        if handle is None:
            raise EngineError("There is no engine to show logs for.", hint="`step-station start`.")
        if not follow:
            yield from runtime.tail(handle, TAIL_LINES)
            return
        for line in runtime.follow_logs(handle, stop or threading.Event()):
            yield line.text

    # -------------------------------------------------------------------------- the reader

    def _start_reader(self, engine: WatchedEngine) -> None:
        thread = threading.Thread(
            target=self._read, args=(engine,), name="engine-logs", daemon=True
        )
        thread.start()

    def _read(self, engine: WatchedEngine) -> None:
        since = engine.last_at
        try:
            for line in self._ctx.runtime.follow_logs(engine.handle, engine.stop_logs, since):
                if since is not None and line.at is not None and line.at <= since:
                    continue  # already seen before the stream was lost
                if line.at is not None:
                    engine.last_at = line.at
                self._take_line(engine, line)
        except ApplianceError as err:
            log.info("engine log stream ended: %s", err)
        finally:
            engine.logs_done.set()
            self._ctx.tick.set()  # the stream ends when the engine exits: look now

    def _take_line(self, engine: WatchedEngine, line: LogLine) -> None:
        now = line.at or self._ctx.wall()
        board = self._board
        with board.lock:
            board.tail.append(line.text)
            phase_before = engine.tracker.current.name if engine.tracker.current else ""
            changed = engine.tracker.feed(line.text, now)
            if board.status.state in (EngineState.READY, EngineState.SLEEPING):
                engine.tracker.close(now)
            phase_after = engine.tracker.current.name if engine.tracker.current else ""
            board.bump()
        if changed and phase_after != phase_before:
            board.notify()
