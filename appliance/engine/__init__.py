"""The engine manager: a supervisor (state machine) over a runtime (Docker or a local process).

`Supervisor(settings)` runs the engine in Docker; `Supervisor.for_demo(settings)` runs the
simulator as a local process. Only `docker_runtime.py` imports docker.

The names below load on first use (PEP 562's module `__getattr__`): the gateway, the chat and the
tabs import `appliance.engine.state` and `appliance.engine.protocol`, and importing those must not
pull the supervisor, its runtimes and their HTTP client in with this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from appliance.engine.process_runtime import ProcessRuntime
    from appliance.engine.runtime import EngineExit, EngineHandle, LogLine, Runtime
    from appliance.engine.spec import LaunchSpec, Mount
    from appliance.engine.state import EngineState, EngineStatus, PhaseRecord
    from appliance.engine.supervisor import Supervisor

__all__ = [
    "EngineExit",
    "EngineHandle",
    "EngineState",
    "EngineStatus",
    "LaunchSpec",
    "LogLine",
    "Mount",
    "PhaseRecord",
    "ProcessRuntime",
    "Runtime",
    "Supervisor",
]

_HOMES = {
    "EngineExit": "runtime",
    "EngineHandle": "runtime",
    "EngineState": "state",
    "EngineStatus": "state",
    "LaunchSpec": "spec",
    "LogLine": "runtime",
    "Mount": "spec",
    "PhaseRecord": "state",
    "ProcessRuntime": "process_runtime",
    "Runtime": "runtime",
    "Supervisor": "supervisor",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # the next lookup finds it without this function
    return value
