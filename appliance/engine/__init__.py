"""The engine manager: a supervisor (state machine) over a runtime (Docker or a local process).

`Supervisor(settings)` runs the engine in Docker; `Supervisor.for_demo(settings)` runs the
simulator as a local process. Only `docker_runtime.py` imports docker.
"""

from __future__ import annotations

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
