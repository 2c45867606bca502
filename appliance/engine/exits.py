"""How an engine's start or watch ended, in words: the `Outcome`, the message for an exit, and the
FAILED report with the engine's last lines.

Shared by the starter (an engine that exits or hangs while loading) and the monitor (a crash
while serving), and by the attacher (an engine found already exited). It reads the phase
tracker's verdict (the failure kind recognised in the log) from the watched engine on the status
board, under `board.lock`, and writes FAILED through the board.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from appliance.engine import phases
from appliance.engine.board import StatusBoard
from appliance.engine.context import EngineContext
from appliance.engine.log_follower import LogFollower
from appliance.engine.runtime import EngineExit, EngineHandle
from appliance.errors import ApplianceError

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    ready: bool = False
    cancelled: bool = False
    failure: str | None = None  # a phases.* failure kind from the log
    exit: EngineExit | None = None
    message: str = ""


def exited_outcome(
    board: StatusBoard, info: EngineExit, *, starting: bool, watched: bool = True
) -> Outcome:
    """The outcome of an engine that exited (or was removed), with the reason its log gave."""
    with board.lock:
        failure = board.engine.tracker.failure if board.engine else None
        failure_line = board.engine.tracker.failure_line if board.engine else ""
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
    hint = failure_hint(failure, info)
    if failure_line and failure not in (None, phases.CUDA_OOM):
        message += f" Log: {failure_line[-200:]}"
    return Outcome(failure=failure, exit=info, message=f"{message} {hint}".strip())


def fail_engine(
    ctx: EngineContext,
    board: StatusBoard,
    logs: LogFollower,
    handle: EngineHandle,
    outcome: Outcome,
) -> None:
    """Report the engine FAILED with its last lines, then stop what outlived it."""
    logs.wait_drained()
    tail = logs.tail_of(handle)
    info = outcome.exit
    board.fail(
        outcome.message,
        exit_code=info.exit_code if info else None,
        oom=bool(info and info.oom_killed) or outcome.failure == phases.CUDA_OOM,
        tail=tail,
    )
    try:  # what outlived the engine's main process (vLLM's worker after its core died)
        ctx.runtime.stop(handle, 5.0)
    except ApplianceError as err:
        log.info("could not clean up after the failed engine: %s", err)


def failure_hint(failure: str | None, info: EngineExit) -> str:
    if info.oom_killed and failure != phases.MAX_LEN_TOO_LARGE:
        return phases.FAILURE_HINTS[phases.CUDA_OOM]
    if failure in phases.FAILURE_HINTS:  # what to do per failure kind recognised in the log
        return phases.FAILURE_HINTS[failure]
    if info.gone:
        return "Start it again if you want it running."
    return "See the log lines below or `step-station logs`, then start again."
