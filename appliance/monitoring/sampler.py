"""Background sampler: GPU, host and engine readings every `sampler.interval_s` into a ring buffer.

One thread per appliance samples once a second into a bounded buffer holding the last
`sampler.history_s` (15 minutes); every open page reads the same buffer, so a page costs a read,
never a new NVML query. A sample is cheap: four NVML readings and the process list per GPU
(~50 µs, reference/vllm.md), two /proc reads, one statvfs, and, while the engine is ready, one
scrape of its `/metrics` over loopback. The engine's host PIDs are asked from the runtime (Docker's
`container.top()`) only when a GPU process appears that is not known yet, never on every sample.

Memory on a Grace machine: in NUMA mode the OS may online the GPU's HBM as CPU-less NUMA nodes and
count it in "system RAM" (psutil's total would then be Grace LPDDR5X + HBM). The host reading
therefore sums only the NUMA nodes that have CPUs (the Grace memory) whenever CPU-less memory
nodes exist, and reports the CPU-less part apart (`gpu_numa_bytes`); GPU memory always comes from
NVML. On a machine without such nodes (x86, DGX Spark, this CI) it is psutil's reading.

Any reading the GPU does not support is None here and "n/a" on screen.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import psutil

from appliance import hardware
from appliance.engine.protocol import EngineReader
from appliance.engine.state import EngineStatus
from appliance.errors import ApplianceError
from appliance.settings import Settings
from appliance.units import fmt_bytes, fmt_num

if TYPE_CHECKING:  # httpx and prometheus_client stay out of the GPU test's imports
    from appliance.engine.runtime import Runtime
    from appliance.monitoring.metrics import EngineMetrics, MetricsScraper

log = logging.getLogger(__name__)

ENGINE_LABEL = "Step-3.7-Flash engine"
SYSFS = Path("/sys")
ENGINE_PID_REFRESH_S = 2.0  # re-ask the runtime at most this often, only when a GPU pid is new
SAMPLER_THREAD = "ss-sampler"
PR_SET_NAME = 15  # prctl's "set this thread's name"
# While no page watches (no dashboard stream open), a sample every this many seconds keeps the
# 15-minute history (a point per 10 s, where the plots draw one per 5 s) for the next page that
# opens, at a tenth of the cost: the appliance sits like this most of the day (issue 16's goal
# with no page open: under 0.3% of a core).
# (STEP_STATION_SAMPLER_IDLE_S: benchmarks/sampler_cost.py sets 1 for the "before" appliance.)
IDLE_INTERVAL_S = float(os.environ.get("STEP_STATION_SAMPLER_IDLE_S") or 10.0)


# ------------------------------------------------------------------------------------ samples


@dataclass(frozen=True)
class ProcessSample:
    pid: int
    memory_bytes: int | None
    is_engine: bool
    name: str = ""  # ENGINE_LABEL for the engine, else the process name when the host can see it


@dataclass(frozen=True)
class GpuSample:
    """One GPU at one moment; None for a reading the GPU does not support."""

    index: int
    name: str
    uuid: str
    memory_total_bytes: int | None
    memory_used_bytes: int | None
    utilization_pct: float | None
    temperature_c: float | None
    power_w: float | None
    power_limit_w: float | None
    sm_clock_mhz: int | None
    throttle_reasons: tuple[str, ...] | None
    processes: tuple[ProcessSample, ...] = ()

    @property
    def engine_memory_bytes(self) -> int | None:
        known = [p.memory_bytes for p in self.processes if p.is_engine and p.memory_bytes]
        return sum(known) if known else None

    @property
    def other_memory_bytes(self) -> int:
        return sum(p.memory_bytes or 0 for p in self.processes if not p.is_engine)

    @property
    def has_engine(self) -> bool:
        return any(p.is_engine for p in self.processes)


@dataclass(frozen=True)
class HostSample:
    cpu_pct: float | None
    memory_total_bytes: int | None
    memory_used_bytes: int | None
    memory_source: str  # "grace-numa": CPU NUMA nodes only; "system": psutil's reading
    gpu_numa_bytes: int | None  # memory in CPU-less NUMA nodes (HBM counted by the OS), if any
    weights_dir: str
    weights_disk_free_bytes: int | None


@dataclass(frozen=True)
class Sample:
    at: float  # wall clock
    gpus: tuple[GpuSample, ...]
    host: HostSample
    engine_state: str = ""
    engine: EngineMetrics | None = None
    gpu_error: str = ""  # why there are no GPU readings (no driver, no GPU), in plain words

    def engine_gpu(self) -> GpuSample | None:
        """The GPU that holds the engine's processes, else the first GPU."""
        for gpu in self.gpus:
            if gpu.has_engine:
                return gpu
        return self.gpus[0] if self.gpus else None


# ------------------------------------------------------------------------------ host readings


def weights_dir(settings: Settings) -> Path:
    """Where the weights live: the HF cache mounted into the engine."""
    if settings.engine.hf_cache_dir:
        return Path(settings.engine.hf_cache_dir).expanduser()
    return Path.home() / ".cache" / "huggingface"


def read_host(settings: Settings, sysfs: Path = SYSFS) -> HostSample:
    """CPU, memory (Grace apart from HBM where the OS mixes them) and free disk for weights."""
    reading = hardware.host_reading()
    info = hardware.host_info(sysfs)
    gpu_numa: int | None = None
    source = "system"
    if info.note:  # CPU-less NUMA nodes hold memory: the OS counts HBM as system RAM
        source = "grace-numa"
        gpu_numa = max(0, reading.memory_total_bytes - info.memory_total_bytes)
    wdir = weights_dir(settings)
    try:
        free: int | None = hardware.disk_free(wdir)
    except OSError:
        free = None
    return HostSample(
        cpu_pct=reading.cpu_percent,
        memory_total_bytes=info.memory_total_bytes,
        memory_used_bytes=info.memory_total_bytes - info.memory_available_bytes,
        memory_source=source,
        gpu_numa_bytes=gpu_numa,
        weights_dir=str(wdir),
        weights_disk_free_bytes=free,
    )


# ----------------------------------------------------------------------------- GPU readings


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def gpu_sample(
    reading: hardware.GpuReading, name: str, engine_pids: set[int], names: Callable[[int], str]
) -> GpuSample:
    """Turn one `hardware.GpuReading` into a sample, labelling the engine's processes."""
    processes = tuple(
        ProcessSample(
            pid=proc.pid,
            memory_bytes=_opt_int(proc.memory_bytes),
            is_engine=proc.pid in engine_pids,
            name=ENGINE_LABEL if proc.pid in engine_pids else names(proc.pid),
        )
        for proc in reading.processes
    )
    return GpuSample(
        index=reading.index,
        name=name,
        uuid=reading.uuid,
        memory_total_bytes=_opt_int(reading.memory_total_bytes),
        memory_used_bytes=_opt_int(reading.memory_used_bytes),
        utilization_pct=_opt_float(reading.utilization_pct),
        temperature_c=_opt_float(reading.temperature_c),
        power_w=_opt_float(reading.power_w),
        power_limit_w=_opt_float(reading.power_limit_w),
        sm_clock_mhz=_opt_int(reading.sm_clock_mhz),
        throttle_reasons=None
        if reading.throttle_reasons is None
        else tuple(reading.throttle_reasons),
        processes=processes,
    )


class ProcessNames:
    """Process names by pid, cached (a pid's name does not change while it lives)."""

    def __init__(self, limit: int = 256) -> None:
        self._names: dict[int, str] = {}
        self._limit = limit

    def __call__(self, pid: int) -> str:
        name = self._names.get(pid)
        if name is None:
            try:
                name = psutil.Process(pid).name()
            except (psutil.Error, OSError):
                name = ""  # in another PID namespace, or already gone
            if len(self._names) >= self._limit:
                self._names.clear()
            self._names[pid] = name
        return name


class EnginePids:
    """The engine's host PIDs, asked from the runtime only when an unknown GPU process appears."""

    def __init__(
        self,
        lookup: Callable[[], set[int]] | None,
        clock: Callable[[], float] = time.monotonic,
        refresh_s: float = ENGINE_PID_REFRESH_S,
    ) -> None:
        self._lookup = lookup
        self._clock = clock
        self._refresh_s = refresh_s
        self._pids: set[int] = set()
        self._checked: set[int] = set()  # GPU pids seen at the last lookup
        self._asked_at: float | None = None
        self._key: object = None

    def for_gpu_pids(self, gpu_pids: set[int], key: object = None) -> set[int]:
        """Engine pids among the GPU processes; `key` (e.g. the container id) resets the cache."""
        if self._lookup is None:
            return set()
        now = self._clock()
        changed = key != self._key
        unknown = gpu_pids - self._checked
        stale = self._asked_at is None or now - self._asked_at >= self._refresh_s
        if changed or (unknown and stale):
            self._key = key
            self._asked_at = now
            self._checked = set(gpu_pids)
            try:
                self._pids = set(self._lookup())
            except ApplianceError as err:
                log.debug("engine pids unavailable: %s", err)
                self._pids = set()
        return self._pids & gpu_pids


# -------------------------------------------------------------------------------- the sampler


@dataclass
class SamplerStats:
    samples: int = 0
    cpu_s: float = 0.0  # thread CPU time spent sampling
    reads: dict[str, int] = field(default_factory=dict)  # page reads by reader name


class Sampler:
    """Samples into a ring buffer from one background thread; pages read the buffer."""

    def __init__(
        self,
        settings: Settings,
        *,
        nvml: hardware.NvmlSession | None = None,
        read_host: Callable[[Settings], HostSample] = read_host,
        engine_status: Callable[[], EngineStatus] | None = None,
        engine_pids: Callable[[], set[int]] | None = None,
        scraper: MetricsScraper | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.interval_s = max(0.05, float(settings.sampler.interval_s))
        capacity = max(2, round(settings.sampler.history_s / self.interval_s))
        self._buffer: deque[Sample] = deque(maxlen=capacity)
        self._nvml = nvml or hardware.default_session()
        self._gpu_names: dict[str, str] = {}
        self._read_host = read_host
        self._engine_status = engine_status
        self._engine_pids = EnginePids(engine_pids)
        self._names = ProcessNames()
        self._scraper = scraper
        self._clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # a watcher came (sample now) or stop()
        self._thread: threading.Thread | None = None
        self._listeners: dict[int, Callable[[Sample], None]] = {}
        self._next_listener = 0
        self.idle_interval_s = max(self.interval_s, IDLE_INTERVAL_S)
        self.stats = SamplerStats()

    # ---- life cycle

    def start(self) -> None:
        """Start the background thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=SAMPLER_THREAD, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        if self._scraper is not None:
            self._scraper.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        _name_os_thread(SAMPLER_THREAD)
        due = time.monotonic()
        while not self._stop.is_set():
            watched = bool(self._listeners)
            now = time.monotonic()
            if now < due:
                self._wake.wait(due - now)
                if self._wake.is_set():  # a page came: sample now if the last one is stale
                    self._wake.clear()
                    due = min(due, self._last_at + self.interval_s)
                continue
            started = time.thread_time()
            sample: Sample | None = None
            try:
                sample = self.sample_once()
            except Exception:  # noqa: BLE001 - the sampler must outlive any one bad reading
                log.exception("sampling failed; trying again at the next interval")
            self.stats.cpu_s += time.thread_time() - started
            self._last_at = now
            interval = self.interval_s if watched else self.idle_interval_s
            due += interval
            if due < time.monotonic():  # fell behind (suspend, overload): skip, never burst
                due = time.monotonic() + interval
            if sample is not None:
                self._notify(sample)

    _last_at = float("-inf")

    # ---- watchers (pages that show live values)

    def watch(self, listener: Callable[[Sample], None]) -> int:
        """Call `listener(sample)` after each new sample (on the sampler thread; keep it short,
        e.g. `loop.call_soon_threadsafe`) until `unwatch(handle)`. While any listener is
        registered the sampler samples every `interval_s`, else every `idle_interval_s`; the first
        listener gets a fresh sample at once if the newest is older than `interval_s`."""
        with self._lock:
            self._next_listener += 1
            handle = self._next_listener
            self._listeners[handle] = listener
        self._wake.set()
        return handle

    def unwatch(self, handle: int) -> None:
        with self._lock:
            self._listeners.pop(handle, None)

    @property
    def watchers(self) -> int:
        return len(self._listeners)

    def _notify(self, sample: Sample) -> None:
        with self._lock:
            listeners = list(self._listeners.values())
        for listener in listeners:
            try:
                listener(sample)
            except Exception:  # noqa: BLE001 - a gone page must not stop the sampler
                log.debug("a sample listener failed", exc_info=True)

    # ---- sampling

    def sample_once(self) -> Sample:
        """Take one sample now, append it to the buffer and return it."""
        status = self._engine_status() if self._engine_status is not None else None
        state = _state_value(status)
        gpus, gpu_error = self._sample_gpus(status)
        engine = self._scrape(status, state)
        sample = Sample(
            at=self._clock(),
            gpus=gpus,
            host=self._read_host(self.settings),
            engine_state=state,
            engine=engine,
            gpu_error=gpu_error,
        )
        with self._lock:
            self._buffer.append(sample)
            self.stats.samples += 1
        return sample

    def _sample_gpus(self, status: EngineStatus | None) -> tuple[tuple[GpuSample, ...], str]:
        readings = hardware.read_gpus(self._nvml)
        if not readings:
            return (), self._nvml.error() or "NVML found no GPU"
        gpu_pids = {p.pid for r in readings for p in r.processes}
        key = (status.container_id if status else "") or _state_value(status)
        engine = self._engine_pids.for_gpu_pids(gpu_pids, key) if gpu_pids else set()
        gpus = tuple(gpu_sample(r, self._gpu_name(r), engine, self._names) for r in readings)
        return gpus, ""

    def _gpu_name(self, reading: hardware.GpuReading) -> str:
        """GPU names by UUID, from one `detect()` when a GPU is first seen (names never change)."""
        name = self._gpu_names.get(reading.uuid)
        if name is None:
            for info in hardware.detect(self._nvml).gpus:
                self._gpu_names[info.uuid] = info.name
            name = self._gpu_names.setdefault(reading.uuid, f"GPU {reading.index}")
        return name

    def _scrape(self, status: EngineStatus | None, state: str) -> EngineMetrics | None:
        if self._scraper is None or state not in ("ready", "sleeping"):
            if self._scraper is not None:
                self._scraper.reset()
            return None
        url = status.engine_url if status else ""
        if not url:
            return None
        try:
            return self._scraper.scrape(url)
        except ApplianceError as err:
            log.debug("engine metrics unavailable: %s", err)
            return None

    # ---- reading (pages)

    def latest(self, reader: str = "") -> Sample | None:
        """The newest sample; `reader` names the page for the read counters."""
        with self._lock:
            if reader:
                self.stats.reads[reader] = self.stats.reads.get(reader, 0) + 1
            return self._buffer[-1] if self._buffer else None

    def history(self, seconds: float | None = None, reader: str = "") -> list[Sample]:
        """Samples of the last `seconds` (all of the buffer when None), oldest first."""
        with self._lock:
            if reader:
                self.stats.reads[reader] = self.stats.reads.get(reader, 0) + 1
            samples = list(self._buffer)
        if seconds is None or not samples:
            return samples
        since = samples[-1].at - seconds
        return [s for s in samples if s.at >= since]

    @property
    def capacity(self) -> int:
        return self._buffer.maxlen or 0


def _name_os_thread(name: str) -> None:
    """Give the OS thread a name (`top -H`, /proc/PID/task/TID/comm), best effort, Linux only:
    the sampler's own CPU cost can then be read from outside (benchmarks/sampler_cost.py)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _state_value(status: EngineStatus | None) -> str:
    return status.state.value if status is not None else ""


# ------------------------------------------------------------------------- status (CLI, JSON)


def status_payload(sample: Sample) -> dict[str, Any]:
    """The `"gpus"` and `"host"` keys of `step-station status --json` (None where unsupported)."""
    return {
        "gpus": [
            {
                "index": g.index,
                "name": g.name,
                "uuid": g.uuid,
                "memory_total_bytes": g.memory_total_bytes,
                "memory_used_bytes": g.memory_used_bytes,
                "utilization_pct": g.utilization_pct,
                "temperature_c": g.temperature_c,
                "power_w": g.power_w,
                "processes": [
                    {"pid": p.pid, "memory_bytes": p.memory_bytes, "is_engine": p.is_engine}
                    for p in g.processes
                ],
            }
            for g in sample.gpus
        ],
        "host": {
            "cpu_pct": sample.host.cpu_pct,
            "memory_total_bytes": sample.host.memory_total_bytes,
            "memory_used_bytes": sample.host.memory_used_bytes,
            "weights_disk_free_bytes": sample.host.weights_disk_free_bytes,
        },
    }


def status_lines(sample: Sample) -> list[str]:
    """The same numbers as the dashboard, as plain lines for `step-station status`."""
    lines: list[str] = []
    if not sample.gpus:
        lines.append(f"GPU: none ({sample.gpu_error or 'no NVIDIA GPU found'})")
    for g in sample.gpus:
        lines.append(
            f"GPU {g.index} {g.name}: memory {fmt_bytes(g.memory_used_bytes)} of "
            f"{fmt_bytes(g.memory_total_bytes)}, utilization {fmt_num(g.utilization_pct, '%')}, "
            f"{fmt_num(g.temperature_c, ' °C')}, power {fmt_num(g.power_w, ' W')} of "
            f"{fmt_num(g.power_limit_w, ' W')}, SM clock {fmt_num(g.sm_clock_mhz, ' MHz')}"
        )
        if g.throttle_reasons:
            lines.append(f"  throttled: {', '.join(g.throttle_reasons)}")
        for p in g.processes:
            label = p.name or "(process in another namespace)"
            lines.append(f"  pid {p.pid} {label}: {fmt_bytes(p.memory_bytes)}")
    h = sample.host
    where = " (Grace memory, HBM apart)" if h.memory_source == "grace-numa" else ""
    lines.append(
        f"Host: CPU {fmt_num(h.cpu_pct, '%')}, memory {fmt_bytes(h.memory_used_bytes)} of "
        f"{fmt_bytes(h.memory_total_bytes)}{where}, free disk for weights "
        f"{fmt_bytes(h.weights_disk_free_bytes)} ({h.weights_dir})"
    )
    e = sample.engine
    if e is not None:
        lines.append(
            f"Engine metrics: {fmt_num(e.running)} running, {fmt_num(e.waiting)} waiting, KV cache "
            f"{fmt_num(e.kv_cache_usage_pct, '%', 1)}, generation "
            f"{fmt_num(e.generation_tokens_per_s, ' tokens/s', 1)}, prompt "
            f"{fmt_num(e.prompt_tokens_per_s, ' tokens/s', 1)}, prefix-cache hits "
            f"{fmt_num(e.prefix_cache_hit_pct, '%', 1)}, TTFT median "
            f"{fmt_num(e.ttft_median_s * 1000 if e.ttft_median_s is not None else None, ' ms')}"
        )
    return lines


# ------------------------------------------------------------------------- wiring (server.py)


def process_tree(pid: int) -> set[int]:
    """A process and all its descendants (the process runtime's engine)."""
    try:
        root = psutil.Process(pid)
        return {pid, *(child.pid for child in root.children(recursive=True))}
    except psutil.Error:
        return set()


class RunningEngine(EngineReader, Protocol):
    """The engine's owner as the sampler sees it: its status, and the runtime that can name the
    host PIDs of the engine's container."""

    @property
    def runtime(self) -> Runtime: ...


def engine_pid_lookup(supervisor: RunningEngine) -> Callable[[], set[int]]:
    """Host PIDs of the engine the supervisor runs: `docker top` of its container (NVML reports
    host PIDs, so names inside the container say nothing), or the process runtime's tree."""

    def lookup() -> set[int]:
        engine_id = str(supervisor.status().container_id or "")
        if not engine_id:
            return set()
        if engine_id.startswith("pid:"):
            return process_tree(int(engine_id[4:]))
        return set(supervisor.runtime.engine_pids(engine_id))

    return lookup


def build_sampler(settings: Settings, supervisor: RunningEngine | None = None) -> Sampler:
    """The appliance's sampler: engine status, engine pids and metrics from the supervisor."""
    from appliance.monitoring.metrics import MetricsScraper  # httpx only when serving

    return Sampler(
        settings,
        engine_status=supervisor.status if supervisor is not None else None,
        engine_pids=engine_pid_lookup(supervisor) if supervisor is not None else None,
        scraper=MetricsScraper(),
    )


def status_sample(
    settings: Settings, supervisor: RunningEngine | None = None, *, window_s: float = 0.5
) -> Sample:
    """One sample for `step-station status`, taken the way the dashboard's would be: two samples
    `window_s` apart, so CPU and tokens/s are rates over that window (a single reading of
    psutil's CPU percent or of a counter has nothing to compare with)."""
    sampler = build_sampler(settings, supervisor)
    try:
        sampler.sample_once()
        time.sleep(window_s)
        return sampler.sample_once()
    finally:
        sampler.stop()
