"""What this machine has: GPUs through NVML, host memory and disk through psutil.

The only module that imports pynvml. All NVML calls go through one query helper
(`NvmlSession.query`): NVML is initialised lazily under a lock, shut down at exit, bytes are
decoded, and any NVML error (NotSupported above all) comes back as the value None, never as an
exception. No GPU, no driver or no libnvidia-ml is a normal answer (`Hardware.nvml_error`).

The pynvml calls themselves sit in `Nvml`, one small method each, so tests can subclass it with a
fake (NotSupported values, no GPU, a GB300 next to an RTX PRO 6000).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import platform
import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pynvml

from appliance.units import fmt_bytes

T = TypeVar("T")

MIB = 1024**2
GIB = 1024**3
GB = 1000**3

# NVML clock event ("throttle") reason bits, named in the user's words.
THROTTLE_REASONS = {
    0x001: "gpu_idle",
    0x002: "applications_clocks_setting",
    0x004: "sw_power_cap",
    0x008: "hw_slowdown",
    0x010: "sync_boost",
    0x020: "sw_thermal_slowdown",
    0x040: "hw_thermal_slowdown",
    0x080: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}


class NvmlError(Exception):
    """An NVML call failed. Fakes raise this; the real layer raises pynvml.NVMLError."""


class NvmlNotSupported(NvmlError):
    """The device does not support this query (e.g. memory on unified-memory GPUs)."""


# ------------------------------------------------------------------------------ the NVML layer


class Nvml:
    """The pynvml calls the appliance uses, one method each. Subclass to fake NVML in tests."""

    def init(self) -> None:
        pynvml.nvmlInit()

    def shutdown(self) -> None:
        pynvml.nvmlShutdown()

    def driver_version(self) -> str | bytes:
        return pynvml.nvmlSystemGetDriverVersion()  # type: ignore[no-any-return]

    def device_count(self) -> int:
        return int(pynvml.nvmlDeviceGetCount())

    def handle(self, index: int) -> Any:
        return pynvml.nvmlDeviceGetHandleByIndex(index)

    def name(self, handle: Any) -> str | bytes:
        return pynvml.nvmlDeviceGetName(handle)  # type: ignore[no-any-return]

    def uuid(self, handle: Any) -> str | bytes:
        return pynvml.nvmlDeviceGetUUID(handle)  # type: ignore[no-any-return]

    def compute_capability(self, handle: Any) -> tuple[int, int]:
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        return int(major), int(minor)

    def memory(self, handle: Any) -> tuple[int, int]:
        """(total, used) bytes; v1 counts the driver's reservation as used, as nvidia-smi does."""
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return int(info.total), int(info.used)

    def utilization_pct(self, handle: Any) -> int:
        return int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

    def temperature_c(self, handle: Any) -> int:
        return int(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))

    def power_mw(self, handle: Any) -> int:
        return int(pynvml.nvmlDeviceGetPowerUsage(handle))

    def power_limit_mw(self, handle: Any) -> int:
        return int(pynvml.nvmlDeviceGetEnforcedPowerLimit(handle))

    def sm_clock_mhz(self, handle: Any) -> int:
        return int(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))

    def throttle_reasons(self, handle: Any) -> int:
        return int(pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))

    def processes(self, handle: Any) -> list[tuple[int, int | None]]:
        """(host pid, GPU memory bytes or None) of the compute processes on this GPU."""
        return [
            (int(p.pid), None if p.usedGpuMemory is None else int(p.usedGpuMemory))
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        ]


_NVML_ERRORS = (pynvml.NVMLError, NvmlError)


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class NvmlSession:
    """The one NVML query helper: lazy init under a lock, errors as values, shutdown at exit."""

    def __init__(self, api: Nvml | None = None) -> None:
        self.api = api or Nvml()
        self._lock = threading.Lock()
        self._started = False
        self._error: str | None = None

    def error(self) -> str | None:
        """Initialise NVML once; None when it works, else why it does not (a normal answer)."""
        with self._lock:
            if not self._started:
                self._started = True
                try:
                    self.api.init()
                except _NVML_ERRORS as err:
                    self._error = f"NVML unavailable: {err or type(err).__name__}"
                else:
                    atexit.register(self.close)
            return self._error

    def query(self, fn: Callable[..., T], *args: Any) -> T | None:
        """Call one `Nvml` method; None if NVML is unavailable or the call fails."""
        if self.error() is not None:
            return None
        try:
            return fn(*args)
        except _NVML_ERRORS:
            return None

    def close(self) -> None:
        with self._lock:
            if self._started and self._error is None:
                with contextlib.suppress(*_NVML_ERRORS):
                    self.api.shutdown()
            self._started = False
            self._error = None


_default_session = NvmlSession()


def default_session() -> NvmlSession:
    return _default_session


def use_nvml(api: Nvml) -> NvmlSession:
    """Replace the process-wide NVML layer (tests, demo mode); returns the new session."""
    global _default_session
    _default_session.close()
    _default_session = NvmlSession(api)
    return _default_session


# ---------------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    uuid: str
    compute_capability: tuple[int, int] | None
    memory_total_bytes: int | None  # None: NVML says NotSupported (unified memory)
    memory_used_bytes: int | None

    @property
    def is_blackwell(self) -> bool:
        """Blackwell is compute capability 10.x (B200, GB300) and 12.x (RTX PRO 6000, GB10)."""
        return self.compute_capability is not None and self.compute_capability[0] >= 10

    @property
    def unified_memory(self) -> bool:
        return self.memory_total_bytes is None

    def describe(self) -> str:
        cc = (
            "cc ?"
            if self.compute_capability is None
            else "cc {}.{}".format(*self.compute_capability)
        )
        memory = (
            "unified memory"
            if self.memory_total_bytes is None
            else fmt_bytes(self.memory_total_bytes)
        )
        return f"{self.name} ({memory}, {cc}{', Blackwell' if self.is_blackwell else ''})"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["compute_capability"] = (
            None if self.compute_capability is None else "{}.{}".format(*self.compute_capability)
        )
        data["is_blackwell"] = self.is_blackwell
        return data


@dataclass(frozen=True)
class ProcessMemory:
    pid: int  # host pid (NVML reports host pids even for processes inside containers)
    memory_bytes: int | None


@dataclass(frozen=True)
class GpuReading:
    index: int
    uuid: str
    memory_total_bytes: int | None
    memory_used_bytes: int | None
    utilization_pct: int | None
    temperature_c: int | None
    power_w: float | None
    power_limit_w: float | None
    sm_clock_mhz: int | None
    throttle_reasons: list[str] | None = field(default_factory=list)  # None: not supported
    processes: list[ProcessMemory] = field(default_factory=list)


@dataclass(frozen=True)
class HostInfo:
    cpu_count: int
    memory_total_bytes: int
    memory_available_bytes: int
    machine: str = ""  # x86_64, aarch64
    note: str | None = None  # Grace / NUMA: how host memory was counted


@dataclass(frozen=True)
class HostReading:
    cpu_percent: float
    memory_total_bytes: int
    memory_available_bytes: int

    @property
    def memory_used_bytes(self) -> int:
        return self.memory_total_bytes - self.memory_available_bytes


@dataclass(frozen=True)
class Hardware:
    gpus: list[GpuInfo]
    host: HostInfo
    driver_version: str | None = None
    nvml_error: str | None = None
    source: str = "detected"  # or "preset NAME"

    def describe(self) -> str:
        if not self.gpus:
            return f"no NVIDIA GPU ({self.nvml_error or 'NVML found none'})"
        counts: dict[str, int] = {}
        for gpu in self.gpus:
            counts[gpu.describe()] = counts.get(gpu.describe(), 0) + 1
        return " + ".join(f"{n}x {d}" for d, n in counts.items())

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "description": self.describe(),
            "gpus": [gpu.to_dict() for gpu in self.gpus],
            "host": asdict(self.host),
            "driver_version": self.driver_version,
            "nvml_error": self.nvml_error,
        }


# ----------------------------------------------------------------------------------- host side


@dataclass(frozen=True)
class _NumaNode:
    node: int
    has_cpus: bool
    total_bytes: int
    available_bytes: int


def _numa_nodes(sysfs: Path) -> list[_NumaNode]:
    nodes: list[_NumaNode] = []
    for path in sorted(sysfs.glob("devices/system/node/node[0-9]*")):
        try:
            cpulist = (path / "cpulist").read_text().strip()
            meminfo = (path / "meminfo").read_text()
        except OSError:
            continue
        values: dict[str, int] = {}
        for line in meminfo.splitlines():
            # "Node 0 MemTotal:       131072 kB"
            parts = line.split()
            if len(parts) == 5 and parts[4] == "kB" and parts[3].isdigit():
                values[parts[2].rstrip(":")] = int(parts[3]) * 1024
        available = values.get("MemFree", 0) + values.get("FilePages", 0)
        nodes.append(
            _NumaNode(int(path.name[4:]), bool(cpulist), values.get("MemTotal", 0), available)
        )
    return nodes


def host_info(sysfs: Path = Path("/sys")) -> HostInfo:
    """CPU count and host memory. On Grace in NUMA mode the GPU's HBM may show up as NUMA nodes
    without CPUs; those are left out so host memory is never the sum of HBM and LPDDR5X."""
    vm = psutil.virtual_memory()
    cpus = os.cpu_count() or 1
    nodes = _numa_nodes(sysfs)
    memory_nodes = [n for n in nodes if not n.has_cpus and n.total_bytes > 0]
    if memory_nodes:
        cpu_nodes = [n for n in nodes if n.has_cpus]
        ids = ", ".join(str(n.node) for n in memory_nodes)
        return HostInfo(
            cpu_count=cpus,
            memory_total_bytes=sum(n.total_bytes for n in cpu_nodes),
            memory_available_bytes=sum(n.available_bytes for n in cpu_nodes),
            machine=platform.machine(),
            note=(
                f"NUMA node(s) {ids} hold memory but no CPUs (GPU memory seen as system RAM on "
                "a coherent Grace system); host memory counts only the CPU nodes."
            ),
        )
    return HostInfo(
        cpu_count=cpus,
        memory_total_bytes=int(vm.total),
        memory_available_bytes=int(vm.available),
        machine=platform.machine(),
    )


def host_reading() -> HostReading:
    """Cheap host reading for the dashboard sampler (CPU since the last call, memory)."""
    vm = psutil.virtual_memory()
    return HostReading(
        cpu_percent=float(psutil.cpu_percent(interval=None)),
        memory_total_bytes=int(vm.total),
        memory_available_bytes=int(vm.available),
    )


def disk_free(path: str | os.PathLike[str]) -> int:
    """Free bytes on the file system that holds `path` (or would, once it is created)."""
    probe = Path(path).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return int(shutil.disk_usage(probe).free)


# ------------------------------------------------------------------------------------ GPU side


def _session(nvml: NvmlSession | None) -> NvmlSession:
    return nvml if nvml is not None else _default_session


def _gpu_info(s: NvmlSession, index: int) -> GpuInfo | None:
    api = s.api
    handle = s.query(api.handle, index)
    if handle is None:
        return None
    name = s.query(api.name, handle)
    uuid = s.query(api.uuid, handle)
    memory = s.query(api.memory, handle)
    return GpuInfo(
        index=index,
        name=_text(name) if name is not None else f"GPU {index}",
        uuid=_text(uuid) if uuid is not None else "",
        compute_capability=s.query(api.compute_capability, handle),
        memory_total_bytes=None if memory is None else memory[0],
        memory_used_bytes=None if memory is None else memory[1],
    )


def detect(nvml: NvmlSession | None = None, sysfs: Path = Path("/sys")) -> Hardware:
    """GPUs, driver and host. Never raises for a missing GPU or driver: see `nvml_error`."""
    s = _session(nvml)
    host = host_info(sysfs)
    error = s.error()
    if error is not None:
        return Hardware(gpus=[], host=host, nvml_error=error)
    driver = s.query(s.api.driver_version)
    count = s.query(s.api.device_count)
    if count is None:
        return Hardware([], host, _text(driver) if driver else None, "NVML could not count GPUs")
    gpus = [g for g in (_gpu_info(s, i) for i in range(count)) if g is not None]
    return Hardware(
        gpus=gpus,
        host=host,
        driver_version=_text(driver) if driver is not None else None,
        nvml_error=None if gpus else "NVML found no GPU",
    )


def _watts(milliwatts: int | None) -> float | None:
    return None if milliwatts is None else milliwatts / 1000.0


def read_gpus(nvml: NvmlSession | None = None) -> list[GpuReading]:
    """One reading per GPU; cheap enough for a 1 s sampler. Empty without NVML."""
    s = _session(nvml)
    api = s.api
    count = s.query(api.device_count) or 0
    readings: list[GpuReading] = []
    for index in range(count):
        handle = s.query(api.handle, index)
        if handle is None:
            continue
        uuid = s.query(api.uuid, handle)
        memory = s.query(api.memory, handle)
        reasons = s.query(api.throttle_reasons, handle)
        processes = s.query(api.processes, handle) or []
        readings.append(
            GpuReading(
                index=index,
                uuid=_text(uuid) if uuid is not None else "",
                memory_total_bytes=None if memory is None else memory[0],
                memory_used_bytes=None if memory is None else memory[1],
                utilization_pct=s.query(api.utilization_pct, handle),
                temperature_c=s.query(api.temperature_c, handle),
                power_w=_watts(s.query(api.power_mw, handle)),
                power_limit_w=_watts(s.query(api.power_limit_mw, handle)),
                sm_clock_mhz=s.query(api.sm_clock_mhz, handle),
                throttle_reasons=None
                if reasons is None
                else [n for bit, n in THROTTLE_REASONS.items() if reasons & bit],
                processes=[ProcessMemory(pid, used) for pid, used in processes],
            )
        )
    return readings


# -------------------------------------------------------------------------------------- presets


def _preset(
    source: str,
    gpu: tuple[str, tuple[int, int], int],
    count: int,
    host_gb: float,
    cpus: int,
    note: str | None = None,
) -> Hardware:
    name, cc, total_mib = gpu
    gpus = [
        GpuInfo(
            index=i,
            name=name,
            uuid=f"GPU-preset-{source}-{i}",
            compute_capability=cc,
            memory_total_bytes=total_mib * MIB,
            memory_used_bytes=0,
        )
        for i in range(count)
    ]
    host = HostInfo(
        cpu_count=cpus,
        memory_total_bytes=int(host_gb * GB),
        memory_available_bytes=int(host_gb * GB),
        machine="aarch64" if source == "gb300" else "x86_64",
        note=note,
    )
    return Hardware(gpus=gpus, host=host, driver_version=None, source=f"preset {source}")


# NVML totals in MiB as nvidia-smi shows them. GB300: ~256,703 MiB (sold as 252 GB HBM3e).
# H200: 143,771 MiB = 150.76e9 bytes (sold as 141 GB), as read on the H200 here.
# B200: 183,359 MiB (sold as ~180 GB); approximate, not read here.
_GB300 = ("NVIDIA GB300", (10, 3), 256_703)
_H200 = ("NVIDIA H200", (9, 0), 143_771)
_B200 = ("NVIDIA B200", (10, 0), 183_359)

PRESETS: dict[str, Hardware] = {
    # DGX Station: one GB300 and 496 GB of LPDDR5X on the Grace CPU (72 cores).
    "gb300": _preset(
        "gb300",
        _GB300,
        1,
        496,
        72,
        note="LPDDR5X on the Grace CPU, apart from the GPU's HBM3e",
    ),
    "h200": _preset("h200", _H200, 1, 256, 32),
    "8xh200": _preset("8xh200", _H200, 8, 2048, 224),
    "4xb200": _preset("4xb200", _B200, 4, 2048, 224),
}
