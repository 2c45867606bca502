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
from typing import Any, Protocol

import anyio.to_thread

log = logging.getLogger("step_station.gateway")

READY_TTL_S = 1.0
NOT_READY_TTL_S = 0.5
WAKE_WAIT_S = 20.0


class EngineView(Protocol):
    """The part of `appliance.engine.Supervisor` the gateway uses."""

    def status(self) -> Any: ...

    def start(self) -> Any: ...


@dataclass(frozen=True)
class EngineCheck:
    ready: bool
    state: str
    url: str
    model: str
    message: str
    retry_after_s: int


@dataclass
class FixedStatus:
    state: str
    engine_url: str
    served_model_name: str
    message: str = ""
    phase: str = ""


class FixedEngine:
    """An engine the appliance does not manage (benchmarks, `--engine-url`): always ready."""

    def __init__(self, url: str, served_model_name: str) -> None:
        self.url = url.rstrip("/")
        self.served_model_name = served_model_name

    def status(self) -> FixedStatus:
        return FixedStatus("ready", self.url, self.served_model_name)

    def start(self) -> None:
        return None


_RETRY_AFTER = {
    "starting": 10,
    "pulling_image": 30,
    "downloading_weights": 30,
    "sleeping": 5,
    "stopping": 10,
}


def _state_name(status: Any) -> str:
    state = getattr(status, "state", "absent")
    return str(getattr(state, "value", state))


class EngineGate:
    """Cached readiness of the engine, with the optional start-or-wake on request."""

    def __init__(
        self,
        engine: EngineView,
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
        listen = getattr(engine, "add_listener", None)
        if listen is not None:
            listen(lambda status: self.invalidate())  # a state change is seen at once

    def invalidate(self) -> None:
        self._expires = 0.0

    def note_activity(self) -> None:
        """Tell the supervisor a request went to the engine (its idle-sleep clock restarts)."""
        note = getattr(self.engine, "note_activity", None)
        if note is not None:
            note()

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

    def _may_act(self, state: str) -> bool:
        """May a request start (absent, stopped) or wake (sleeping) the engine?"""
        if state == "sleeping":
            return self._start_on_request() or self._wake_on_request()
        return state in ("absent", "stopped") and self._start_on_request()

    async def _ask(self) -> EngineCheck:
        status = await anyio.to_thread.run_sync(self.engine.status)
        check = self._from_status(status)
        if check.ready or not self._may_act(check.state):
            return check
        if check.state == "sleeping" and hasattr(self.engine, "wake"):
            return await self._wake(check)
        if check.state in ("absent", "stopped"):
            self._start_in_background()
            return EngineCheck(
                False,
                "starting",
                "",
                check.model,
                "The engine was not running; this request started it. Starting takes minutes "
                "for the real model.",
                _RETRY_AFTER["starting"],
            )
        return check

    def _from_status(self, status: Any) -> EngineCheck:
        state = _state_name(status)
        url = str(getattr(status, "engine_url", "") or "").rstrip("/")
        model = str(
            getattr(status, "served_model_name", "")
            or getattr(self.engine, "served_model_name", "")
            or ""
        )
        message = str(getattr(status, "message", "") or "")
        phase = str(getattr(status, "phase", "") or "")
        if state == "ready" and url:
            return EngineCheck(True, state, url, model, message, 0)
        detail = f" ({phase})" if phase and phase.lower() != state.replace("_", " ") else ""
        text = f"The model is not ready: the engine is {state.replace('_', ' ')}{detail}."
        if message:
            text += f" {message}"
        if state in ("absent", "stopped", "failed"):
            text += " The owner can start it in Step Station's Model tab."
        return EngineCheck(False, state, url, model, text, _RETRY_AFTER.get(state, 30))

    async def _wake(self, check: EngineCheck) -> EngineCheck:
        wake = self.engine.wake  # type: ignore[attr-defined]
        await anyio.to_thread.run_sync(wake)
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
