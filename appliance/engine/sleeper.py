"""The sleeper: puts a ready engine to sleep and wakes it, counts activity, and decides when an
idle engine may sleep without aborting anyone's request.

What it shares: it reads and writes the state through the status board (SLEEPING, READY); the
monitor asks it every round whether to sleep (`maybe_idle_sleep`); the starter tells it when an
engine becomes ready (`note_activity`). Its own locks: `_sleep_gate` makes the decision to sleep
and a browser chat's start exclude each other (vLLM's POST /sleep aborts every running request);
`_wake_lock` lets concurrent callers share one wake-up; `_count_lock` guards the count of
browser chats in flight. The board's lock is never held while waiting on these.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator

import httpx

from appliance import endpoint
from appliance.engine import health
from appliance.engine.board import StatusBoard
from appliance.engine.context import EngineContext
from appliance.engine.state import EngineState
from appliance.errors import EngineError

log = logging.getLogger(__name__)

_GAUGE = re.compile(r"^vllm:num_requests_(?:running|waiting)(?:\{[^}]*\})?\s+(\S+)", re.MULTILINE)


class Sleeper:
    """Sleep, wake, and the idle clock of one engine."""

    def __init__(self, ctx: EngineContext, board: StatusBoard) -> None:
        self._ctx = ctx
        self._board = board
        self._sleep_gate = threading.Lock()
        self._wake_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._in_use = 0  # browser chat streams open now
        self._engine_was_busy = False  # the engine's gauges showed requests at the last look
        self._last_activity = ctx.clock()

    # ------------------------------------------------------------------------------ activity

    def note_activity(self) -> None:
        """A request went to the engine or ended: restarts the idle-sleep clock.

        A busy engine seen before this (`maybe_idle_sleep`) is forgotten: the clock now counts
        from here, and a request still running is seen again when the idle time is up.
        """
        self._last_activity = self._ctx.clock()
        self._engine_was_busy = False

    def idle_s(self) -> float:
        """Seconds since the last activity (a request, a browser chat, the engine seen busy)."""
        return max(0.0, self._ctx.clock() - self._last_activity)

    def begin_use(self, timeout_s: float = 120.0) -> None:
        """A browser chat is about to send a request: idle sleep waits until `end_use()`, and a
        sleeping engine is woken first (EngineError when it does not wake).

        The gateway's requests need no such call: the engine's own gauges show them (see
        `maybe_idle_sleep`). Blocks while an idle sleep is being entered, then wakes the engine.
        """
        with self._sleep_gate:
            with self._count_lock:
                self._in_use += 1
            self.note_activity()
        try:
            self.ensure_awake(timeout_s)
        except BaseException:
            self.end_use()
            raise

    def end_use(self) -> None:
        """The browser chat's request ended: the idle time counts from now."""
        with self._count_lock:
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

    # ------------------------------------------------------------------------ sleep and wake

    def sleep(self, level: int = 1, timeout_s: float = 120.0) -> None:
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
        if not self._ctx.settings.engine.sleep_mode:
            raise EngineError(
                "Sleep mode is off.",
                hint="Turn it on (`step-station config set engine.sleep_mode true`), then restart.",
            )
        if self._board.state != EngineState.READY:
            raise EngineError("Only a ready engine can sleep.")
        code = health.post(self._ctx.url(), f"/sleep?level={level}", timeout_s)
        if code != 200:
            raise EngineError(f"The engine refused to sleep (HTTP {code}).")
        self._poll_sleeping(want=True, timeout_s=timeout_s)
        self._board.update(state=EngineState.SLEEPING, message=f"Sleeping (level {level}).")

    def wake(self, timeout_s: float = 120.0) -> None:
        """Wake a sleeping engine; returns when it serves again (concurrent callers wait for the
        same wake-up)."""
        with self._wake_lock:
            if self._board.state != EngineState.SLEEPING:
                return
            self._board.update(message="Waking up.")
            code = health.post(self._ctx.url(), "/wake_up", timeout_s)
            if code != 200:
                raise EngineError(f"The engine did not wake up (HTTP {code}).")
            self._poll_sleeping(want=False, timeout_s=timeout_s)
            self.note_activity()
            self._board.update(state=EngineState.READY, message="Serving (woke up).")

    def ensure_awake(self, timeout_s: float = 120.0) -> None:
        """Wake on demand (the gateway and chat call this before sending a request)."""
        self.note_activity()
        if self._board.state == EngineState.SLEEPING:
            self.wake(timeout_s)

    def _poll_sleeping(self, *, want: bool, timeout_s: float) -> None:
        deadline = self._ctx.clock() + timeout_s
        while self._ctx.clock() < deadline:
            if health.is_sleeping(self._ctx.url()) is want:
                return
            self._ctx.cancel.wait(self._ctx.timing.poll_interval_s)
        raise EngineError(f"The engine did not {'sleep' if want else 'wake up'} in {timeout_s} s.")

    # ----------------------------------------------------------------------------- idle sleep

    def maybe_idle_sleep(self) -> None:
        """Sleep after the idle time, never while a request runs (the monitor asks every round).

        vLLM's `POST /sleep` aborts every running and waiting request: its `mode` defaults to
        "abort" and the engine core's `pause_scheduler` then finishes them all as aborted
        (vllm 0.32: `entrypoints/serve/dev/sleep/api_router.py` `sleep`, `v1/engine/core.py`
        `EngineCore.sleep` / `pause_scheduler`; older releases offload the weights under running
        requests). So right before sleeping: no browser chat open (`begin_use`), and the engine's
        own `vllm:num_requests_running` + `vllm:num_requests_waiting` at 0 (the gateway's and any
        other client's requests). While the engine is busy the idle clock keeps restarting, so
        the idle time counts from the end of the last request of any kind.
        """
        engine = self._ctx.settings.engine
        chosen = self._ctx.timing.idle_sleep_s
        idle_s = chosen if chosen is not None else engine.idle_sleep_minutes * 60
        if not engine.sleep_mode or idle_s <= 0:
            return
        if self._ctx.clock() - self._last_activity < idle_s:
            return
        with self._sleep_gate:
            with self._count_lock:
                in_use = self._in_use
            if in_use:
                self.note_activity()
                return
            if self._ctx.clock() - self._last_activity < idle_s:
                return
            busy = requests_in_engine(self._ctx.url())
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
                self._board.update(message=f"Idle sleep failed: {err}")
                self.note_activity()


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
