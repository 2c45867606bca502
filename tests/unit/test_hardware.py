"""Hardware probe: the real NVML path on this GPU-less machine, and fakes of the NVML layer for
what cannot run here (NotSupported values, two GPUs, a lost GPU)."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from appliance import hardware, planner
from appliance.hardware import MIB, Nvml, NvmlError, NvmlNotSupported, NvmlSession

NOT_SUPPORTED = object()


class FakeNvml(Nvml):
    """The NVML layer with devices described as dicts; NOT_SUPPORTED values raise NotSupported."""

    def __init__(self, devices: list[dict[str, Any]], init_error: str | None = None) -> None:
        self.devices = devices
        self.init_error = init_error
        self.init_calls = 0
        self.shutdown_calls = 0

    def _value(self, handle: int, key: str) -> Any:
        value = self.devices[handle][key]
        if value is NOT_SUPPORTED:
            raise NvmlNotSupported(key)
        if isinstance(value, Exception):
            raise value
        return value

    def init(self) -> None:
        self.init_calls += 1
        if self.init_error:
            raise NvmlError(self.init_error)

    def shutdown(self) -> None:
        self.shutdown_calls += 1

    def driver_version(self) -> bytes:
        return b"580.95.05"

    def device_count(self) -> int:
        return len(self.devices)

    def handle(self, index: int) -> int:
        return index

    def name(self, handle: Any) -> str | bytes:
        return self._value(handle, "name")

    def uuid(self, handle: Any) -> str | bytes:
        return self._value(handle, "uuid")

    def compute_capability(self, handle: Any) -> tuple[int, int]:
        return self._value(handle, "cc")

    def memory(self, handle: Any) -> tuple[int, int]:
        return self._value(handle, "memory")

    def utilization_pct(self, handle: Any) -> int:
        return self._value(handle, "util")

    def temperature_c(self, handle: Any) -> int:
        return self._value(handle, "temp")

    def power_mw(self, handle: Any) -> int:
        return self._value(handle, "power_mw")

    def power_limit_mw(self, handle: Any) -> int:
        return self._value(handle, "power_limit_mw")

    def sm_clock_mhz(self, handle: Any) -> int:
        return self._value(handle, "sm_clock")

    def throttle_reasons(self, handle: Any) -> int:
        return self._value(handle, "throttle")

    def processes(self, handle: Any) -> list[tuple[int, int | None]]:
        return self._value(handle, "procs")


def device(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": b"NVIDIA GB300",
        "uuid": b"GPU-gb300-0000",
        "cc": (10, 3),
        "memory": (256_703 * MIB, 1_024 * MIB),
        "util": 37,
        "temp": 51,
        "power_mw": 612_345,
        "power_limit_mw": 1_400_000,
        "sm_clock": 1_965,
        "throttle": 0,
        "procs": [(4242, 200 * 1024**3)],
    }
    base.update(overrides)
    return base


RTX_PRO = device(
    name="NVIDIA RTX PRO 6000 Blackwell Workstation Edition",
    uuid="GPU-rtxpro-1111",
    cc=(12, 0),
    memory=(97_887 * MIB, 500 * MIB),
)


# ------------------------------------------------------------------------------ real NVML path


def test_real_nvml_without_a_gpu_is_a_normal_answer() -> None:
    """On this machine there is no libnvidia-ml: the real pynvml path must answer, not raise."""
    session = NvmlSession()  # the real pynvml layer
    hw = hardware.detect(session)
    if hw.gpus:
        pytest.skip("this machine has an NVIDIA GPU; tests/gpu covers it")
    assert hw.nvml_error
    assert "NVML" in hw.nvml_error
    assert hardware.read_gpus(session) == []
    assert hw.host.cpu_count >= 1
    assert hw.host.memory_total_bytes > 0
    assert "no NVIDIA GPU" in hw.describe()


# ------------------------------------------------------------------------------------- fakes


def test_detect_reads_name_uuid_capability_memory_and_decodes_bytes() -> None:
    hw = hardware.detect(NvmlSession(FakeNvml([device()])))
    assert hw.nvml_error is None
    assert hw.driver_version == "580.95.05"
    (gpu,) = hw.gpus
    assert gpu.name == "NVIDIA GB300"
    assert gpu.uuid == "GPU-gb300-0000"
    assert gpu.compute_capability == (10, 3)
    assert gpu.is_blackwell
    assert gpu.memory_total_bytes == 256_703 * MIB
    assert gpu.memory_used_bytes == 1_024 * MIB
    assert gpu.to_dict()["compute_capability"] == "10.3"


def test_no_library_is_reported_not_raised() -> None:
    fake = FakeNvml([device()], init_error="NVML Shared Library Not Found")
    session = NvmlSession(fake)
    hw = hardware.detect(session)
    assert hw.gpus == []
    assert hw.nvml_error == "NVML unavailable: NVML Shared Library Not Found"
    assert hardware.read_gpus(session) == []
    assert fake.init_calls == 1  # not retried on every call


def test_no_gpu() -> None:
    hw = hardware.detect(NvmlSession(FakeNvml([])))
    assert hw.gpus == []
    assert hw.nvml_error == "NVML found no GPU"
    result = planner.plan(hw)
    assert result.chosen is None
    assert all(f.reason_codes == ["no_gpu"] for f in result.profiles)


def test_not_supported_is_a_value_unified_memory() -> None:
    """DGX Spark (GB10): memory queries say NotSupported; that is unified memory, not a crash."""
    spark = device(
        name="NVIDIA GB10",
        uuid="GPU-gb10",
        cc=(12, 1),
        memory=NOT_SUPPORTED,
        power_limit_mw=NOT_SUPPORTED,
        procs=NOT_SUPPORTED,
        throttle=NOT_SUPPORTED,
    )
    session = NvmlSession(FakeNvml([spark]))
    (gpu,) = hardware.detect(session).gpus
    assert gpu.memory_total_bytes is None
    assert gpu.memory_used_bytes is None
    assert gpu.unified_memory
    assert "unified memory" in gpu.describe()
    (reading,) = hardware.read_gpus(session)
    assert reading.memory_total_bytes is None
    assert reading.memory_used_bytes is None
    assert reading.power_limit_w is None
    assert reading.processes == []
    assert reading.throttle_reasons is None  # shown as n/a, not as "none"
    assert reading.utilization_pct == 37  # what is supported still comes through
    fit = planner.plan(hardware.detect(session)).fit("nvfp4-tp1")
    assert not fit.fits
    assert "memory_unknown" in fit.reason_codes


def test_any_nvml_error_on_a_call_is_none_not_an_exception() -> None:
    lost = device(temp=NvmlError("GPU is lost"), uuid=NvmlError("GPU is lost"))
    (reading,) = hardware.read_gpus(NvmlSession(FakeNvml([lost])))
    assert reading.temperature_c is None
    assert reading.uuid == ""
    assert reading.sm_clock_mhz == 1_965


def test_reading_fields_units_and_throttle_names() -> None:
    busy = device(throttle=0x004 | 0x040, procs=[(4242, 200 * 1024**3), (99, None)])
    (reading,) = hardware.read_gpus(NvmlSession(FakeNvml([busy])))
    assert reading.index == 0
    assert reading.uuid == "GPU-gb300-0000"
    assert reading.power_w == pytest.approx(612.345)
    assert reading.power_limit_w == pytest.approx(1400.0)
    assert reading.temperature_c == 51
    assert reading.throttle_reasons == ["sw_power_cap", "hw_thermal_slowdown"]
    assert reading.processes == [
        hardware.ProcessMemory(4242, 200 * 1024**3),
        hardware.ProcessMemory(99, None),
    ]


def test_two_gpus_gb300_is_picked_by_uuid_whatever_the_order() -> None:
    """A Station may hold an RTX PRO 6000 next to the GB300; NVML order is not guaranteed."""
    session = NvmlSession(FakeNvml([RTX_PRO, device()]))
    hw = hardware.detect(session)
    assert [g.name for g in hw.gpus] == [
        "NVIDIA RTX PRO 6000 Blackwell Workstation Edition",
        "NVIDIA GB300",
    ]
    assert [g.index for g in hw.gpus] == [0, 1]
    assert all(g.is_blackwell for g in hw.gpus)
    result = planner.plan(hw)
    assert result.chosen == "fp8-tp1"
    assert result.fit("fp8-tp1").gpu_uuids == ["GPU-gb300-0000"]
    assert result.to_dict()["chosen_gpu_uuids"] == ["GPU-gb300-0000"]
    assert len(hardware.read_gpus(session)) == 2


def test_lazy_init_once_under_concurrency_and_shutdown_on_close() -> None:
    fake = FakeNvml([device()])
    session = NvmlSession(fake)
    assert fake.init_calls == 0  # nothing happens until the first query
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        hardware.read_gpus(session)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert fake.init_calls == 1
    session.close()
    assert fake.shutdown_calls == 1
    hardware.read_gpus(session)  # a closed session starts again when used
    assert fake.init_calls == 2


def test_use_nvml_replaces_the_process_wide_layer() -> None:
    fake = FakeNvml([device()])
    previous = hardware.default_session()
    try:
        session = hardware.use_nvml(fake)
        assert hardware.default_session() is session
        assert [g.uuid for g in hardware.detect().gpus] == ["GPU-gb300-0000"]
    finally:
        hardware.use_nvml(previous.api)


# ---------------------------------------------------------------------------------- host side


def _node(sysfs: Path, node: int, cpulist: str, total_kb: int, free_kb: int, file_kb: int) -> None:
    path = sysfs / "devices" / "system" / "node" / f"node{node}"
    path.mkdir(parents=True)
    (path / "cpulist").write_text(cpulist + "\n")
    (path / "meminfo").write_text(
        f"Node {node} MemTotal:       {total_kb} kB\n"
        f"Node {node} MemFree:        {free_kb} kB\n"
        f"Node {node} FilePages:      {file_kb} kB\n"
        f"Node {node} HugePages_Total:     0\n"
    )


def test_grace_numa_counts_only_cpu_nodes(tmp_path: Path) -> None:
    """GB300 in NUMA mode: HBM shows up as a node without CPUs; never add it to host memory."""
    _node(tmp_path, 0, "0-71", 480_000_000, 400_000_000, 20_000_000)
    _node(tmp_path, 1, "", 250_000_000, 250_000_000, 0)
    info = hardware.host_info(tmp_path)
    assert info.memory_total_bytes == 480_000_000 * 1024
    assert info.memory_available_bytes == (400_000_000 + 20_000_000) * 1024
    assert info.note is not None
    assert "NUMA node(s) 1" in info.note


def test_plain_host_uses_psutil(tmp_path: Path) -> None:
    _node(tmp_path, 0, "0-1", 1_000, 500, 0)
    info = hardware.host_info(tmp_path)
    assert info.note is None
    assert info.memory_total_bytes > 1_000 * 1024  # psutil's total, not the node file
    reading = hardware.host_reading()
    assert 0 < reading.memory_available_bytes <= reading.memory_total_bytes
    assert reading.memory_used_bytes >= 0


def test_disk_free_walks_up_to_an_existing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "not" / "yet" / "there"
    free = hardware.disk_free(missing)
    assert free > 0
    assert abs(free - shutil.disk_usage(tmp_path).free) < 64 * MIB  # same file system
    assert not missing.exists()
    assert os.path.isdir(tmp_path)


# ------------------------------------------------------------------------------------ presets


def test_presets() -> None:
    gb300 = hardware.PRESETS["gb300"]
    (gpu,) = gb300.gpus
    assert gpu.compute_capability == (10, 3)
    assert gpu.is_blackwell
    assert gpu.memory_total_bytes == 256_703 * MIB
    assert gb300.host.memory_total_bytes == 496 * 10**9
    h200 = hardware.PRESETS["h200"].gpus[0]
    assert h200.compute_capability == (9, 0)
    assert not h200.is_blackwell
    # reference/vllm.md: NVML total 150.75e9 bytes on the H200 here.
    assert h200.memory_total_bytes == pytest.approx(150.75e9, rel=1e-3)
    assert len(hardware.PRESETS["8xh200"].gpus) == 8
    b200 = hardware.PRESETS["4xb200"].gpus
    assert len(b200) == 4
    assert b200[0].compute_capability == (10, 0)
    assert len({g.uuid for g in b200}) == 4
