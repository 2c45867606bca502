"""The start-up timeline and the engine's memory breakdown, as plain data for the UI and the CLI.

`ProgressRates` listens to the supervisor (every progress update reaches it once, whatever the
number of open pages) and turns the (bytes done, bytes total) of the image pull and the weights
download into a rate and an ETA over the last few seconds. `build_timeline()` turns an
`EngineStatus` into steps with their elapsed times ("Ready in 7 min 12 s"), the last log line,
and on failure the reason, what to do and the log tail. `memory_breakdown()` splits the engine GPU's
memory into weights, KV cache (reserved and in use), the rest of the engine, other processes and
free memory. Nothing here imports gradio.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance.engine import phases as log_phases
from appliance.engine.state import EngineState, EngineStatus
from appliance.monitoring.sampler import Sample
from appliance.units import fmt_duration, fmt_progress, fmt_rate

PULLING = "Pulling image"
DOWNLOADING = "Downloading weights"
READY_STEP = "Ready"
RATE_WINDOW_S = 10.0

GIB = 1024**3

WHY_RESERVED = (
    "vLLM reserves most of the GPU when it starts: it takes `--gpu-memory-utilization` of the "
    "memory (0.95 on the Station) up front, loads the weights into it and hands all the rest to a "
    "KV-cache pool it manages itself, so the GPU looks almost full even with no request running; "
    "the KV cache in use is the part of that pool holding live requests."
)


# --------------------------------------------------------------------------------- byte rates


@dataclass
class _Transfer:
    points: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=256))
    done: int = 0
    total: int = 0


class ProgressRates:
    """Rates and ETAs of the pull and the download, fed by the supervisor's status updates."""

    def __init__(
        self, window_s: float = RATE_WINDOW_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._transfers: dict[str, _Transfer] = {}
        self._started_at: float | None = None

    def observe(self, status: EngineStatus) -> None:
        """Supervisor listener: record the progress of the current transfer."""
        step = {EngineState.PULLING_IMAGE: PULLING, EngineState.DOWNLOADING_WEIGHTS: DOWNLOADING}
        with self._lock:
            if status.started_at != self._started_at:  # a new start: forget the last one
                self._started_at = status.started_at
                self._transfers.clear()
            name = step.get(status.state)
            if name is None or status.progress is None:
                return
            done, total = status.progress
            transfer = self._transfers.setdefault(name, _Transfer())
            now = self._clock()
            transfer.points.append((now, done))
            transfer.done, transfer.total = done, max(total, transfer.total)
            while len(transfer.points) > 2 and now - transfer.points[0][0] > self._window_s:
                transfer.points.popleft()

    def estimate(self, name: str) -> tuple[float | None, float | None]:
        """(bytes per second over the last window, seconds left) of one transfer."""
        with self._lock:
            transfer = self._transfers.get(name)
            if transfer is None or len(transfer.points) < 2:
                return None, None
            (t0, d0), (t1, d1) = transfer.points[0], transfer.points[-1]
            if t1 <= t0 or d1 < d0:
                return None, None
            rate = (d1 - d0) / (t1 - t0)
            left = transfer.total - transfer.done
            eta = left / rate if rate > 0 and transfer.total > 0 else None
            return rate, eta

    def totals(self, name: str) -> tuple[int, int] | None:
        with self._lock:
            transfer = self._transfers.get(name)
            return (transfer.done, transfer.total) if transfer else None


# ----------------------------------------------------------------------------------- timeline


@dataclass(frozen=True)
class Step:
    name: str
    state: str  # done | active | pending | failed
    elapsed_s: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class Timeline:
    headline: str
    steps: tuple[Step, ...]
    last_line: str = ""
    failed: bool = False
    reason: str = ""
    what_to_do: str = ""
    log_tail: tuple[str, ...] = ()


_BUSY = (EngineState.PULLING_IMAGE, EngineState.DOWNLOADING_WEIGHTS, EngineState.STARTING)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`])")


_PROGRESS = re.compile(r"^(?P<label>.*?):\s*\d{1,3}%")


def compact_log(lines: list[str] | tuple[str, ...]) -> list[str]:
    """Log lines as a terminal shows them: a run of progress-bar updates (tqdm redraws the same
    line with `\r`) collapses to its last state."""
    out: list[str] = []
    last_label: str | None = None
    for line in lines:
        match = _PROGRESS.match(line)
        label = match.group("label") if match else None
        if label is not None and label == last_label and out:
            out[-1] = line
        else:
            out.append(line)
        last_label = label
    return out


def split_failure(message: str) -> tuple[str, str]:
    """The supervisor writes "reason. What to do." in one message: split after the reason."""
    text = message.strip()
    if not text:
        return "The engine failed.", "See the log below, then start again."
    parts = _SENTENCE_END.split(text, maxsplit=1)
    if len(parts) == 2:
        return parts[0], parts[1]
    return text, "See the log below, then start again."


def _transfer_detail(
    name: str, status: EngineStatus, rates: ProgressRates | None, elapsed_s: float | None = None
) -> str:
    totals = rates.totals(name) if rates else None
    progress = status.progress if _is_current(status, name) else None
    done, total = progress or totals or (0, 0)
    parts = []
    if total > 0 or done > 0:
        parts.append(fmt_progress(done, total))
    if rates is not None and _is_current(status, name):
        rate, eta = rates.estimate(name)
        if rate is not None:
            parts.append(fmt_rate(rate))
        if eta is not None:
            parts.append(f"{fmt_duration(eta)} left")
    elif done > 0 and elapsed_s:
        parts.append(f"{fmt_rate(done / elapsed_s)} on average")
    return ", ".join(parts)


def _is_current(status: EngineStatus, name: str) -> bool:
    return (name == PULLING and status.state == EngineState.PULLING_IMAGE) or (
        name == DOWNLOADING and status.state == EngineState.DOWNLOADING_WEIGHTS
    )


def build_timeline(
    status: EngineStatus, rates: ProgressRates | None = None, now: float | None = None
) -> Timeline:
    """Steps of the current (or last) start, with what the UI says at the top."""
    now = time.time() if now is None else now
    steps: list[Step] = []
    seen: set[str] = set()
    failed = status.state == EngineState.FAILED
    for record in status.phases:
        seen.add(record.name)
        state = "done" if record.done else "active"
        if failed and not record.done:
            state = "failed"
        detail = record.detail
        if record.name in (PULLING, DOWNLOADING):
            detail = (
                _transfer_detail(
                    record.name, status, rates, record.elapsed_s if record.done else None
                )
                or detail
                or "already here"
            )
        steps.append(Step(record.name, state, record.elapsed_s, detail))
    if status.state in _BUSY:
        upcoming = dict.fromkeys((log_phases.LAUNCHING, *log_phases.LOG_PHASES))
        steps += [Step(name, "pending") for name in upcoming if name not in seen]
    ready_in = None
    if (
        status.ready_at
        and status.started_at
        and status.state
        in (
            EngineState.READY,
            EngineState.SLEEPING,
        )
    ):
        ready_in = status.ready_at - status.started_at
        steps.append(Step(READY_STEP, "done", None, f"in {fmt_duration(ready_in)}"))

    last_line = status.log_tail[-1] if status.log_tail else ""
    reason = what = ""
    if failed:
        reason, what = split_failure(status.message)
    headline = _headline(status, ready_in, now, reason)
    return Timeline(
        headline=headline,
        steps=tuple(steps),
        last_line=last_line,
        failed=failed,
        reason=reason,
        what_to_do=what,
        log_tail=tuple(compact_log(status.log_tail)[-20:]) if failed else (),
    )


def _headline(status: EngineStatus, ready_in: float | None, now: float, reason: str) -> str:
    state = status.state
    if state in (EngineState.READY, EngineState.SLEEPING):
        if ready_in is not None:
            word = "Ready" if state == EngineState.READY else "Sleeping; was ready"
            return f"{word} in {fmt_duration(ready_in)}"
        return state.label
    if state in _BUSY:
        since = fmt_duration(now - status.started_at) if status.started_at else ""
        return f"Starting: {status.phase or state.label}" + (f" ({since} so far)" if since else "")
    if state == EngineState.FAILED:
        return f"Failed: {reason}"
    return status.message or state.label


# ----------------------------------------------------------------------------- memory breakdown


@dataclass(frozen=True)
class MemoryPart:
    name: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class MemoryBreakdown:
    gpu_name: str
    total_bytes: int
    parts: tuple[MemoryPart, ...]
    note: str = ""


def memory_breakdown(
    sample: Sample | None, effective: dict[str, Any], kv_usage_pct: float | None
) -> MemoryBreakdown | None:
    """Where the engine GPU's memory went: weights, KV cache (in use / reserved but free), the
    rest of the engine (activations, CUDA graphs, context), other processes, free.

    Weights and the KV-cache pool come from the engine's own log lines (`Model loading took X
    GiB`, `Available KV cache memory: Y GiB`); KV in use is the pool times vLLM's KV-cache usage.
    """
    gpu = sample.engine_gpu() if sample else None
    if gpu is None or gpu.memory_total_bytes is None or gpu.memory_used_bytes is None:
        return None
    total, used = gpu.memory_total_bytes, gpu.memory_used_bytes
    parts: list[MemoryPart] = []
    engine_bytes = gpu.engine_memory_bytes
    if engine_bytes:
        weights = int(float(effective.get("weights_gib") or 0) * GIB)
        kv_pool = int(float(effective.get("kv_cache_gib") or 0) * GIB)
        weights = min(weights, engine_bytes)
        kv_pool = min(kv_pool, engine_bytes - weights)
        in_use = int(kv_pool * (kv_usage_pct or 0) / 100) if kv_usage_pct is not None else 0
        if weights:
            parts.append(MemoryPart("Weights", weights))
        if kv_pool:
            parts.append(MemoryPart("KV cache in use", in_use))
            parts.append(MemoryPart("KV cache reserved, free", kv_pool - in_use))
        rest = engine_bytes - weights - kv_pool
        parts.append(
            MemoryPart("Engine: activations, CUDA graphs, context", max(0, rest))
            if weights or kv_pool
            else MemoryPart("Engine", engine_bytes)
        )
    other = gpu.other_memory_bytes
    if other:
        parts.append(MemoryPart("Other processes", other))
    accounted = sum(p.bytes for p in parts)
    driver = used - accounted
    if driver > 0:
        parts.append(MemoryPart("Driver and unlisted", driver))
    parts.append(MemoryPart("Free", max(0, total - used)))
    note = "" if engine_bytes else "The engine holds no memory on this GPU now."
    return MemoryBreakdown(gpu_name=gpu.name, total_bytes=total, parts=tuple(parts), note=note)
