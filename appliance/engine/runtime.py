"""The interface every engine runtime implements (Docker container or local process).

The supervisor talks only to this interface, so the same state machine drives a container from
the local Docker engine and a subprocess (a pip-installed `vllm`, or the simulator in demo mode).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from appliance.engine.spec import LaunchSpec

# Called with (bytes done, bytes total, a short line such as "layer 3/7 downloading").
ProgressCallback = Callable[[int, int, str], None]


@dataclass(frozen=True)
class EngineHandle:
    """A running or exited engine the runtime knows: a container, or a process."""

    id: str  # container id, or "pid:1234"
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    started_at: float | None = None  # wall clock, when the engine process started


@dataclass(frozen=True)
class EngineExit:
    """What an inspection says: still running, or how it ended."""

    running: bool
    exit_code: int | None = None
    oom_killed: bool = False  # the kernel's OOM killer ended it
    gone: bool = False  # no longer exists (removed by someone else)
    error: str = ""  # the runtime's own reason (e.g. Docker's State.Error)


@dataclass(frozen=True)
class LogLine:
    text: str
    at: float | None = None  # wall clock when the runtime knows it (Docker timestamps)


class Runtime(ABC):
    """One way of running the engine. Methods block; the supervisor calls them from its thread."""

    kind: str = ""

    @abstractmethod
    def ensure_image(self, spec: LaunchSpec, on_progress: ProgressCallback) -> None:
        """Make the engine's image available locally (pull it), reporting byte progress."""

    def image_present(self, spec: LaunchSpec) -> bool:
        """True when `ensure_image` would not need to download anything."""
        del spec
        return True

    @abstractmethod
    def find(self, name: str) -> EngineHandle | None:
        """The engine this appliance manages under `name`, running or exited, if any."""

    @abstractmethod
    def launch(self, spec: LaunchSpec) -> EngineHandle:
        """Create and start the engine from the frozen spec."""

    @abstractmethod
    def inspect(self, handle: EngineHandle) -> EngineExit:
        """Fresh state of the engine (never a cached one)."""

    @abstractmethod
    def follow_logs(
        self, handle: EngineHandle, stop: threading.Event, since: float | None = None
    ) -> Iterator[LogLine]:
        """Every log line from the start (or from wall time `since`, where the runtime keeps
        times), then new ones until the engine exits or `stop` is set."""

    @abstractmethod
    def tail(self, handle: EngineHandle, lines: int = 50) -> list[str]:
        """The last log lines (split on `\\r` and `\\n`)."""

    @abstractmethod
    def stop(self, handle: EngineHandle, timeout_s: float) -> None:
        """SIGTERM, wait up to `timeout_s`, then kill. Returns when it has exited."""

    @abstractmethod
    def remove(self, handle: EngineHandle) -> None:
        """Forget the exited engine (remove the container, the pid file)."""

    def close(self) -> None:  # noqa: B027 - optional hook, most runtimes hold nothing
        """Release connections."""

    def engine_pids(self, container_id: str) -> set[int]:
        """Host PIDs of the engine's processes, so the dashboard can label its GPU memory; empty
        where the runtime cannot tell (a process engine's id is `pid:N`: the sampler reads its
        process tree itself)."""
        del container_id
        return set()

    def image_digest(self, ref: str) -> str:
        """The local image's id for `ref` (what a benchmark run records); "" where the runtime
        runs no images (a process engine)."""
        del ref
        return ""


def split_lines(buffer: str) -> tuple[list[str], str]:
    """Split text on `\\r` and `\\n`; returns complete lines and the unfinished rest."""
    normalized = buffer.replace("\r\n", "\n").replace("\r", "\n")
    parts = normalized.split("\n")
    rest = parts.pop()
    return [p for p in parts if p.strip()], rest
