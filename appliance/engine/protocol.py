"""The engine's owner as every other part sees it: one contract, checked against the Supervisor.

The supervisor (appliance/engine/supervisor.py) owns the engine; the gateway, the chat, the
monitoring, the tabs' controllers and the control socket only ask it. They type it with these
protocols instead of importing the supervisor: this module needs nothing of the engine but its
state (state.py), so a client does not pull the supervisor's machinery in, and the layer test
(tests/unit/test_layers.py) keeps it that way. supervisor.py hands a `Supervisor` to an
`EngineOwner` under TYPE_CHECKING, so mypy fails the moment the two drift apart.

The parts, each named for what its users do with it; `EngineOwner` is all of them:

- `EngineReader`: the status snapshot and a long poll on it (the sampler, the CLI, the tabs);
- `EngineAddress`: where the engine listens, its served name and its per-start key;
- `EngineEvents`: the change counter and listeners (the gateway's cache, the start-up rates);
- `EngineSwitch`: start and stop (the Model tab, the gateway's start on request);
- `EngineActivity`: idle sleep's side: wake, a request went by, a browser chat is using it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from appliance.engine.state import EngineStatus

# Called with a copy of the status after every change, on the supervisor's thread.
Listener = Callable[[EngineStatus], None]


class EngineReader(Protocol):
    """What the engine is doing now."""

    def status(self) -> EngineStatus:
        """A snapshot (a copy the caller may keep)."""
        ...

    def wait_for_change(self, since_version: int, timeout_s: float) -> EngineStatus:
        """Block until the status version moves past `since_version` or `timeout_s` passes."""
        ...


class EngineAddress(Protocol):
    """Where requests for the model go."""

    @property
    def engine_url(self) -> str:
        """The engine's base URL (`http://...` or `unix:...` on the engine socket)."""
        ...

    @property
    def served_model_name(self) -> str:
        """The model name the engine answers to (what `/v1/models` lists)."""
        ...

    @property
    def engine_api_key(self) -> str:
        """The key the engine requires on /v1 ("" for none); fresh on every start."""
        ...


class EngineEvents(Protocol):
    """Being told about changes instead of polling for them."""

    @property
    def version(self) -> int:
        """Bumped on every change (the status carries the same number)."""
        ...

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(status)` after every change; returns the function that removes it."""
        ...


class EngineSwitch(Protocol):
    """Starting and stopping; the owner never starts a second engine."""

    def start(self, profile: str | None = None) -> EngineStatus:
        """Start in the background and return at once; nothing when already started."""
        ...

    def try_start(self, profile: str | None = None) -> bool:
        """`start()`, saying whether this call started it (False: already starting or running)."""
        ...

    def stop(self, timeout_s: float | None = None) -> EngineStatus:
        """Stop gracefully and return when the engine is gone."""
        ...


class EngineActivity(Protocol):
    """Idle sleep's side: who is using the engine, and waking it when someone does."""

    def wake(self, timeout_s: float = ...) -> EngineStatus:
        """Wake a sleeping engine; returns when it serves again."""
        ...

    def note_activity(self) -> None:
        """A request went to the engine or ended: the idle clock restarts."""
        ...

    def begin_use(self, timeout_s: float = ...) -> None:
        """A browser chat is about to send: wake the engine first, hold off idle sleep."""
        ...

    def end_use(self) -> None:
        """The browser chat's request ended: idle time counts from now."""
        ...


class EngineOwner(
    EngineReader, EngineAddress, EngineEvents, EngineSwitch, EngineActivity, Protocol
):
    """The engine's owner, whole: what the Supervisor offers every client."""
