"""What the supervisor reports: the engine's state and a snapshot of everything known about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class EngineState(str, Enum):
    """Where the engine is in its life cycle (DESIGN.md §Engine life cycle)."""

    ABSENT = "absent"
    PULLING_IMAGE = "pulling_image"
    DOWNLOADING_WEIGHTS = "downloading_weights"
    STARTING = "starting"
    READY = "ready"
    SLEEPING = "sleeping"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def busy(self) -> bool:
        """True while an operation is under way (start or stop)."""
        return self in _BUSY

    @property
    def running(self) -> bool:
        """True when an engine exists that serves or will serve."""
        return self in (EngineState.READY, EngineState.SLEEPING)

    @property
    def label(self) -> str:
        """The state in the user's words."""
        return _LABELS[self]


_BUSY = frozenset(
    {
        EngineState.PULLING_IMAGE,
        EngineState.DOWNLOADING_WEIGHTS,
        EngineState.STARTING,
        EngineState.STOPPING,
    }
)

_LABELS = {
    EngineState.ABSENT: "Not started",
    EngineState.PULLING_IMAGE: "Pulling image",
    EngineState.DOWNLOADING_WEIGHTS: "Downloading weights",
    EngineState.STARTING: "Starting",
    EngineState.READY: "Ready",
    EngineState.SLEEPING: "Sleeping",
    EngineState.STOPPING: "Stopping",
    EngineState.STOPPED: "Stopped",
    EngineState.FAILED: "Failed",
}


@dataclass
class PhaseRecord:
    """One step of a start, with its elapsed time (`elapsed_s` grows until `done`)."""

    name: str
    started_at: float  # wall-clock seconds (time.time())
    elapsed_s: float = 0.0
    done: bool = False
    detail: str = ""  # e.g. "21/50 shards" or "3.1 of 8.0 GiB (39%)"


@dataclass
class EngineStatus:
    """A snapshot of the engine; the supervisor hands out copies, never its own object."""

    state: EngineState = EngineState.ABSENT
    phase: str = ""  # the current phase's name (or the state's label when no phase applies)
    phases: list[PhaseRecord] = field(default_factory=list)
    profile: str = ""
    runtime: str = ""
    container_id: str = ""
    container_name: str = ""
    engine_url: str = ""
    served_model_name: str = ""
    message: str = ""
    progress: tuple[int, int] | None = None  # (bytes done, bytes total) while pulling/downloading
    log_tail: list[str] = field(default_factory=list)
    started_at: float | None = None  # wall clock, when the start was asked for
    ready_at: float | None = None
    exit_code: int | None = None
    oom: bool = False  # killed by the kernel OOM killer, or CUDA out of memory in the log
    restart_needed: bool = False
    retry_note: str = ""  # set when a start was retried with safer settings
    notes: list[str] = field(default_factory=list)  # what this start changed or warns about
    effective: dict[str, Any] = field(default_factory=dict)  # served name, max_model_len, kv tokens
    version: int = 0  # bumped on every change; UIs compare it to skip redraws

    @property
    def progress_fraction(self) -> float | None:
        if not self.progress or self.progress[1] <= 0:
            return None
        return min(1.0, self.progress[0] / self.progress[1])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (the CLI's `status --json`, the UI)."""
        return {
            "state": self.state.value,
            "phase": self.phase,
            "phases": [
                {
                    "name": p.name,
                    "started_at": p.started_at,
                    "elapsed_s": round(p.elapsed_s, 3),
                    "done": p.done,
                    "detail": p.detail,
                }
                for p in self.phases
            ],
            "profile": self.profile,
            "runtime": self.runtime,
            "container_id": self.container_id,
            "container_name": self.container_name,
            "engine_url": self.engine_url,
            "served_model_name": self.served_model_name,
            "message": self.message,
            "progress": list(self.progress) if self.progress else None,
            "log_tail": list(self.log_tail),
            "started_at": self.started_at,
            "ready_at": self.ready_at,
            "exit_code": self.exit_code,
            "oom": self.oom,
            "restart_needed": self.restart_needed,
            "retry_note": self.retry_note,
            "notes": list(self.notes),
            "effective": dict(self.effective),
            "version": self.version,
        }
