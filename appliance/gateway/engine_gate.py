"""What the gateway needs from the engine: is it ready, where is it, what is its model called.

The supervisor (appliance/engine) is the truth; its `status()` may touch Docker, so the gateway
asks at most once a second and shares one answer among concurrent requests. A connection refused
by the engine invalidates the cached answer at once.

Residency is the owner's: an API client can cause a start or a wake only when the owner turned on
`gateway.start_on_request`, or, for a wake alone, turned on idle sleep (an engine put to sleep
because nobody used it wakes when somebody does; otherwise a LAN client would get 503 until the
owner chatted in the browser). Nothing here stops, unloads or reconfigures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio.to_thread

from appliance.engine.protocol import EngineOwner, Listener
from appliance.engine.state import EngineState, EngineStatus

log = logging.getLogger("step_station.gateway")

READY_TTL_S = 1.0
NOT_READY_TTL_S = 0.5
WAKE_WAIT_S = 20.0

# What a request may cause: a start (absent, stopped) or, for a sleeping engine, a wake.
STARTABLE = (EngineState.ABSENT, EngineState.STOPPED)


@dataclass(frozen=True)
class EngineCheck:
    ready: bool
    state: EngineState
    url: str
    model: str
    message: str
    retry_after_s: int


class FixedEngine:
    """An engine the appliance does not manage (benchmarks, `--engine-url`): always ready.

    It is the gateway's `EngineOwner` all the same: nothing to start, stop or wake (it serves
    whatever happens), no idle clock, no key of its own (the gateway is given a fixed one), and a
    status that never changes."""

    def __init__(self, url: str, served_model_name: str) -> None:
        self.url = url.rstrip("/")
        self.served_model_name = served_model_name

    @property
    def engine_url(self) -> str:
        return self.url

    @property
    def engine_api_key(self) -> str:
        return ""

    @property
    def version(self) -> int:
        return 0

    def status(self) -> EngineStatus:
        return EngineStatus(
            state=EngineState.READY, engine_url=self.url, served_model_name=self.served_model_name
        )

    def wait_for_change(self, since_version: int, timeout_s: float) -> EngineStatus:
        del since_version  # the version never moves: the whole wait passes
        time.sleep(max(timeout_s, 0.0))
        return self.status()

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        del listener  # never called: nothing changes
        return lambda: None

    def start(self, profile: str | None = None) -> EngineStatus:
        del profile
        return self.status()

    def try_start(self, profile: str | None = None) -> bool:
        del profile
        return False  # already running

    def stop(self, timeout_s: float | None = None) -> EngineStatus:
        del timeout_s  # not the appliance's engine to stop: it keeps serving
        return self.status()

    def wake(self, timeout_s: float = 0.0) -> EngineStatus:
        del timeout_s
        return self.status()

    def note_activity(self) -> None:
        return None

    def begin_use(self, timeout_s: float = 0.0) -> None:
        del timeout_s

    def end_use(self) -> None:
        return None


_RETRY_AFTER = {
    EngineState.STARTING: 10,
    EngineState.PULLING_IMAGE: 30,
    EngineState.DOWNLOADING_WEIGHTS: 30,
    EngineState.SLEEPING: 5,
    EngineState.STOPPING: 10,
}


class EngineGate:
    """Cached readiness of the engine, with the optional start-or-wake on request."""

    def __init__(
        self,
        engine: EngineOwner,
        *,
        start_on_request: Callable[[], bool] = lambda: False,
        wake_on_request: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self._start_on_request = start_on_request
        self._wake_on_request = wake_on_request
        self._clock = clock
        self._cached: EngineCheck | None = None
        self._expires = 0.0
        self._inflight: asyncio.Future[EngineCheck] | None = None
        self._starting = threading.Event()
        engine.add_listener(lambda status: self.invalidate())  # a state change is seen at once

    def invalidate(self) -> None:
        self._expires = 0.0

    def note_activity(self) -> None:
        """Tell the supervisor a request went to the engine (its idle-sleep clock restarts)."""
        self.engine.note_activity()

    async def check(self) -> EngineCheck:
        cached = self._cached
        if cached is not None and self._clock() < self._expires:
            if cached.ready or not self._may_act(cached.state):
                return cached
        if self._inflight is not None:
            return await asyncio.shield(self._inflight)
        loop = asyncio.get_running_loop()
        self._inflight = loop.create_future()
        try:
            result = await self._ask()
        except BaseException as err:
            self._inflight.set_exception(err)
            self._inflight.exception()  # mark retrieved; the waiters re-raise it
            raise
        else:
            self._inflight.set_result(result)
        finally:
            self._inflight = None
        self._cached = result
        self._expires = self._clock() + (READY_TTL_S if result.ready else NOT_READY_TTL_S)
        return result

    def _may_act(self, state: EngineState) -> bool:
        """May a request start (absent, stopped) or wake (sleeping) the engine?"""
        if state is EngineState.SLEEPING:
            return self._start_on_request() or self._wake_on_request()
        return state in STARTABLE and self._start_on_request()

    async def _ask(self) -> EngineCheck:
        status = await anyio.to_thread.run_sync(self.engine.status)
        check = self._from_status(status)
        if check.ready or not self._may_act(check.state):
            return check
        if check.state is EngineState.SLEEPING:
            return await self._wake(check)
        if check.state in STARTABLE:
            self._start_in_background()
            return EngineCheck(
                False,
                EngineState.STARTING,
                "",
                check.model,
                "The engine was not running; this request started it. Starting takes minutes "
                "for the real model.",
                _RETRY_AFTER[EngineState.STARTING],
            )
        return check

    def _from_status(self, status: EngineStatus) -> EngineCheck:
        state = status.state
        url = status.engine_url.rstrip("/")
        model = status.served_model_name or self.engine.served_model_name
        message, phase = status.message, status.phase
        if state is EngineState.READY and url:
            return EngineCheck(True, state, url, model, message, 0)
        words = state.value.replace("_", " ")
        detail = f" ({phase})" if phase and phase.lower() != words else ""
        text = f"The model is not ready: the engine is {words}{detail}."
        if message:
            text += f" {message}"
        if state in (EngineState.ABSENT, EngineState.STOPPED, EngineState.FAILED):
            text += " The owner can start it in Step Station's Model tab."
        return EngineCheck(False, state, url, model, text, _RETRY_AFTER.get(state, 30))

    async def _wake(self, check: EngineCheck) -> EngineCheck:
        await anyio.to_thread.run_sync(self.engine.wake)
        deadline = self._clock() + WAKE_WAIT_S
        while self._clock() < deadline:
            status = await anyio.to_thread.run_sync(self.engine.status)
            woke = self._from_status(status)
            if woke.ready:
                return woke
            await asyncio.sleep(0.2)
        return check

    def _start_in_background(self) -> None:
        if self._starting.is_set():
            return
        self._starting.set()

        def run() -> None:
            try:
                self.engine.start()
            except Exception as err:  # noqa: BLE001 - reported in the engine's own status
                log.warning("start on request failed: %s", err)
            finally:
                self._starting.clear()
                with contextlib.suppress(Exception):
                    self.invalidate()

        threading.Thread(target=run, name="gateway-start-on-request", daemon=True).start()
