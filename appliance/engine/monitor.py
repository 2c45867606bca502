"""The monitor: watches a serving engine until it ends, on the supervisor's worker thread.

Every `monitor_interval_s` it inspects the engine (an exit is a crash, unless another process
removed it), probes /health every `health_interval_s` (503: the engine core died) and asks the
sleeper whether an idle engine may sleep. What it shares: the state goes through the status
board (under `board.lock`); it waits on the shared `tick` event (the log reader sets it when the
stream ends) and ends when the shared `cancel` event is set (a stop or close).
"""

from __future__ import annotations

from appliance.engine import health
from appliance.engine.board import StatusBoard
from appliance.engine.context import EngineContext
from appliance.engine.exits import Outcome, exited_outcome, fail_engine
from appliance.engine.log_follower import LogFollower
from appliance.engine.runtime import EngineExit, EngineHandle
from appliance.engine.sleeper import Sleeper
from appliance.engine.state import EngineState
from appliance.errors import DockerUnavailableError


class Monitor:
    """Watches one serving engine at a time."""

    def __init__(
        self, ctx: EngineContext, board: StatusBoard, logs: LogFollower, sleeper: Sleeper
    ) -> None:
        self._ctx = ctx
        self._board = board
        self._logs = logs
        self._sleeper = sleeper

    def watch(self, handle: EngineHandle) -> None:
        """Watch a serving engine: a crash is seen within `monitor_interval_s` (+ inspect time)."""
        ctx, board, timing = self._ctx, self._board, self._ctx.timing
        docker_lost = False
        last_probe = ctx.clock()
        while not ctx.cancel.is_set():
            try:
                info = ctx.runtime.inspect(handle)
            except DockerUnavailableError as err:
                docker_lost = True
                board.update(message=f"{err} The engine's state is unknown until Docker is back.")
                ctx.nap(timing.monitor_interval_s)
                continue
            if docker_lost:
                docker_lost = False
                board.update(message="Docker is reachable again.")
                self._logs.resume()
            if not info.running:
                self._ended(handle, info)
                return
            due = ctx.clock() - last_probe >= timing.health_interval_s
            if board.status.state == EngineState.READY and due:
                last_probe = ctx.clock()
                if health.probe_health(ctx.url(), timeout_s=2.0) == 503:
                    self._dead_engine(handle)
                    return
            if board.status.state == EngineState.READY:
                self._sleeper.maybe_idle_sleep()
            ctx.nap(timing.monitor_interval_s)

    def _ended(self, handle: EngineHandle, info: EngineExit) -> None:
        """The engine is no longer running: removed by someone (STOPPED) or crashed (FAILED)."""
        if self._ctx.cancel.is_set():
            return
        info = self._settle_exit(handle, info)
        self._logs.wait_drained()
        if info.gone:
            self._logs.forget()
            self._board.update(
                state=EngineState.STOPPED,
                container_id="",
                message="The engine was stopped and removed by another step-station "
                "process or by hand.",
            )
            return
        self._fail(handle, exited_outcome(self._board, info, starting=False))

    def _dead_engine(self, handle: EngineHandle) -> None:
        """/health answered 503: the engine core died. vLLM's API server notices and exits by
        itself within ~5 s (with code 0); wait a bounded moment for that so the report carries
        its exit code and last lines, then stop what is left."""
        ctx = self._ctx
        self._board.update(message="The engine reported itself dead (/health 503).")
        deadline = ctx.clock() + ctx.timing.dead_exit_grace_s
        info = ctx.runtime.inspect(handle)
        while info.running and ctx.clock() < deadline:
            if ctx.cancel.wait(0.2):
                return
            info = ctx.runtime.inspect(handle)
        if not info.running:
            self._logs.wait_drained()
            self._fail(handle, exited_outcome(self._board, info, starting=False))
            return
        ctx.runtime.stop(handle, ctx.settings.engine.stop_timeout_s)
        self._fail(
            handle,
            Outcome(  # no exit code: the engine did not end by itself, our stop ended it
                message="The engine crashed: it reported itself dead (/health 503) and was "
                "stopped. Start it again; if it keeps happening, see `step-station logs`.",
            ),
        )

    def _settle_exit(self, handle: EngineHandle, info: EngineExit) -> EngineExit:
        """An engine another process stops exits a moment before that process removes it: give
        the removal a short, bounded chance so a deliberate stop is not reported as a crash."""
        for _ in range(int(self._ctx.timing.exit_settle_s / 0.1)):
            if info.gone or self._ctx.cancel.wait(0.1):
                break
            try:
                info = self._ctx.runtime.inspect(handle)
            except DockerUnavailableError:
                break
        return info

    def _fail(self, handle: EngineHandle, outcome: Outcome) -> None:
        fail_engine(self._ctx, self._board, self._logs, handle, outcome)
