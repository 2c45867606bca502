"""The attacher: finds an engine this supervisor did not start and takes it over.

At appliance start-up and for the CLI (`attach`), it derives the state from the runtime: a
running engine is adopted (READY at once when /health answers, then watched on the worker
thread), an exited one is reported as the crash it was. Afterwards a light watcher thread
("engine-outside-watch", every `outside_poll_s`) adopts an engine another step-station process
starts while this one is idle.

What it shares: it decides under the context's `decide` lock (a start decides under the same
lock, so the two never both act) and the inter-process engine lock (a stop holds it from SIGTERM
to removal, so an engine on its way out is never adopted); the state goes through the status
board (`board.lock`); adopting and watching is the starter's (`adopt`, `watch_adopted`).
"""

from __future__ import annotations

import logging
import threading

from appliance.engine import health, phases
from appliance.engine.board import StatusBoard
from appliance.engine.context import EngineContext, Worker
from appliance.engine.exits import exited_outcome
from appliance.engine.lock import EngineLock
from appliance.engine.log_follower import LogFollower
from appliance.engine.runtime import EngineExit, EngineHandle
from appliance.engine.starter import Starter
from appliance.engine.state import EngineState, EngineStatus
from appliance.errors import ApplianceError

log = logging.getLogger(__name__)


class Attacher:
    """Adopts or reports the engine found under the supervisor's name."""

    def __init__(
        self,
        ctx: EngineContext,
        board: StatusBoard,
        logs: LogFollower,
        starter: Starter,
        worker: Worker,
    ) -> None:
        self._ctx = ctx
        self._board = board
        self._logs = logs
        self._starter = starter
        self._worker = worker
        self._outside: threading.Thread | None = None

    def attach_once(self) -> EngineStatus:
        """One look at the runtime: adopt, report, or say there is no engine."""
        ctx, board = self._ctx, self._board
        # Under the engine lock, like a start's own look (Starter._find_running): a stop holds it
        # from SIGTERM to removal, so an engine on its way out is never adopted (READY, then gone).
        with ctx.decide, EngineLock(ctx.timing.lock_timeout_s):
            with board.lock:
                if self._worker.busy(board.status.state) or board.engine is not None:
                    return board.snapshot()
            handle = ctx.runtime.find(ctx.name())
            self._starter.refresh_desired_hash()
            if handle is None:
                state = board.state
                if state not in (EngineState.STOPPED, EngineState.FAILED):
                    board.update(state=EngineState.ABSENT, container_id="", message="")
                return board.snapshot()
            info = ctx.runtime.inspect(handle)
            if not info.running:
                with board.lock:
                    known = board.status.container_id == handle.id
                if not known:
                    self._report_exited(handle, info)
                return board.snapshot()
            self._starter.adopt(handle, spec=None)
            if health.probe_health(ctx.url()) == 200:
                self._starter.mark_ready(adopted=True)
            self._worker.spawn(self._starter.watch_adopted, handle)
            return board.snapshot()

    def watch_outside(self) -> None:
        """Start the light watcher (once; not when `outside_poll_s` is 0)."""
        with self._board.lock:
            if self._outside is not None or self._ctx.timing.outside_poll_s <= 0:
                return
            self._outside = threading.Thread(
                target=self._outside_loop, name="engine-outside-watch", daemon=True
            )
        self._outside.start()

    def _outside_loop(self) -> None:
        ctx = self._ctx
        while not ctx.closed.wait(ctx.timing.outside_poll_s):
            with self._board.lock:
                idle = self._board.engine is None and not self._worker.alive()
            if not idle:
                continue
            try:
                self.attach_once()
            except ApplianceError as err:  # Docker away: try again on the next round
                log.info("engine watch: %s", err)

    def _report_exited(self, handle: EngineHandle, info: EngineExit) -> None:
        """An exited engine found at attach: a crash, whatever its exit code.

        Our own stop removes the engine (container, pid file), so one that still exists ended
        without being asked to. Its exit code says nothing: vLLM's API server exits 0 when its
        engine core dies (vLLM issue 48966; seen here with the real 0.32 engine).
        """
        tail = self._logs.load_exited(handle)
        outcome = exited_outcome(self._board, info, starting=False, watched=False)
        self._board.fail(
            outcome.message,
            exit_code=info.exit_code,
            oom=info.oom_killed or outcome.failure == phases.CUDA_OOM,  # its log said so
            tail=tail,
            container_id=handle.id,
        )
