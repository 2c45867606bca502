"""The sampler over a fake NVML layer (the one seam that cannot run here without a GPU).

The same code path runs against a real H200 in tests/gpu/test_sampler_gpu.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from appliance import hardware
from appliance.engine.state import EngineState, EngineStatus
from appliance.errors import DockerUnavailableError, HardwareError
from appliance.monitoring import sampler as monitoring_sampler
from appliance.monitoring import status as status_module
from appliance.monitoring.metrics import EngineMetrics
from appliance.monitoring.sampler import (
    ENGINE_LABEL,
    EnginePids,
    HostSample,
    Sample,
    Sampler,
    engine_pid_lookup,
    read_host,
    status_lines,
    status_payload,
)
from appliance.settings import Settings, with_changes

GB = 10**9


class FakeNvml(hardware.Nvml):
    """A GB300 next to an RTX PRO 6000; knobs for NotSupported readings and a missing driver."""

    def __init__(
        self,
        gpus: list[dict] | None = None,
        *,
        not_supported: frozenset[str] = frozenset(),
        no_driver: bool = False,
    ) -> None:
        self.gpus = gpus if gpus is not None else two_gpus()
        self.not_supported = not_supported
        self.no_driver = no_driver
        self.calls: dict[str, int] = {}

    def _get(self, what: str, handle: int):
        self.calls[what] = self.calls.get(what, 0) + 1
        if what in self.not_supported:
            raise hardware.NvmlNotSupported(what)
        return self.gpus[handle][what]

    def init(self) -> None:
        if self.no_driver:
            raise hardware.NvmlError("libnvidia-ml.so.1 not found")

    def shutdown(self) -> None:
        pass

    def driver_version(self) -> str:
        return "580.00"

    def device_count(self) -> int:
        return len(self.gpus)

    def handle(self, index: int) -> int:
        return index

    def name(self, handle: int) -> bytes:
        return self.gpus[handle]["name"].encode()

    def uuid(self, handle: int) -> str:
        return self.gpus[handle]["uuid"]

    def compute_capability(self, handle: int) -> tuple[int, int]:
        return self.gpus[handle]["cc"]

    def memory(self, handle: int) -> tuple[int, int]:
        return self._get("memory", handle)

    def utilization_pct(self, handle: int) -> int:
        return self._get("utilization", handle)

    def temperature_c(self, handle: int) -> int:
        return self._get("temperature", handle)

    def power_mw(self, handle: int) -> int:
        return self._get("power", handle)

    def power_limit_mw(self, handle: int) -> int:
        return self._get("power_limit", handle)

    def sm_clock_mhz(self, handle: int) -> int:
        return self._get("sm_clock", handle)

    def throttle_reasons(self, handle: int) -> int:
        return self._get("throttle", handle)

    def processes(self, handle: int) -> list[tuple[int, int | None]]:
        return self._get("processes", handle)


def two_gpus() -> list[dict]:
    return [
        {
            "name": "NVIDIA RTX PRO 6000 Blackwell Workstation Edition",
            "uuid": "GPU-rtx",
            "cc": (12, 0),
            "memory": (97 * GB, 3 * GB),
            "utilization": 5,
            "temperature": 40,
            "power": 60_000,
            "power_limit": 600_000,
            "sm_clock": 500,
            "throttle": 0x001,
            "processes": [(4242, 2 * GB)],
        },
        {
            "name": "NVIDIA GB300",
            "uuid": "GPU-gb300",
            "cc": (10, 3),
            "memory": (269 * GB, 250 * GB),
            "utilization": 87,
            "temperature": 61,
            "power": 912_500,
            "power_limit": 1_400_000,
            "sm_clock": 1965,
            "throttle": 0x004 | 0x020,
            "processes": [(1001, 240 * GB), (1002, 1 * GB), (5555, 4 * GB)],
        },
    ]


def fake_status(
    state: EngineState = EngineState.READY, container_id: str = "c1", url: str = ""
) -> EngineStatus:
    """The supervisor's status with the parts the sampler reads set."""
    return EngineStatus(state=state, container_id=container_id, engine_url=url)


def fixed_host(settings: Settings) -> HostSample:
    return HostSample(
        cpu_pct=12.5,
        memory_total_bytes=496 * GB,
        memory_used_bytes=100 * GB,
        memory_source="system",
        gpu_numa_bytes=None,
        weights_dir="/w",
        weights_disk_free_bytes=900 * GB,
    )


def make_sampler(api: FakeNvml, **kwargs) -> Sampler:
    settings = kwargs.pop("settings", Settings())
    kwargs.setdefault("read_host", fixed_host)
    return Sampler(settings, nvml=hardware.NvmlSession(api), **kwargs)


def test_two_gpus_with_the_engine_labelled_across_the_container_boundary() -> None:
    lookups: list[int] = []

    def engine_pids() -> set[int]:
        lookups.append(1)
        return {1001, 1002, 77}  # 77: an engine process that holds no GPU memory

    sampler = make_sampler(FakeNvml(), engine_status=lambda: fake_status(), engine_pids=engine_pids)
    sample = sampler.sample_once()
    rtx, gb300 = sample.gpus
    assert (rtx.name, gb300.name) == (
        "NVIDIA RTX PRO 6000 Blackwell Workstation Edition",
        "NVIDIA GB300",
    )
    assert gb300.power_w == pytest.approx(912.5)
    assert gb300.power_limit_w == pytest.approx(1400.0)
    assert gb300.throttle_reasons == ("sw_power_cap", "sw_thermal_slowdown")
    assert [(p.pid, p.is_engine) for p in gb300.processes] == [
        (1001, True),
        (1002, True),
        (5555, False),
    ]
    assert gb300.processes[0].name == ENGINE_LABEL
    assert gb300.engine_memory_bytes == 241 * GB
    assert gb300.other_memory_bytes == 4 * GB
    assert sample.engine_gpu() is gb300
    assert not rtx.processes[0].is_engine

    payload = status_payload(sample)
    assert payload["gpus"][1] == {
        "index": 1,
        "name": "NVIDIA GB300",
        "uuid": "GPU-gb300",
        "memory_total_bytes": 269 * GB,
        "memory_used_bytes": 250 * GB,
        "utilization_pct": 87.0,
        "temperature_c": 61.0,
        "power_w": 912.5,
        "processes": [
            {"pid": 1001, "memory_bytes": 240 * GB, "is_engine": True},
            {"pid": 1002, "memory_bytes": GB, "is_engine": True},
            {"pid": 5555, "memory_bytes": 4 * GB, "is_engine": False},
        ],
    }
    assert payload["host"] == {
        "cpu_pct": 12.5,
        "memory_total_bytes": 496 * GB,
        "memory_used_bytes": 100 * GB,
        "weights_disk_free_bytes": 900 * GB,
    }
    # The same processes on the next sample: Docker is not asked again.
    sampler.sample_once()
    assert len(lookups) == 1


def test_not_supported_readings_are_none_and_shown_as_na() -> None:
    api = FakeNvml(not_supported=frozenset({"memory", "power", "power_limit", "throttle"}))
    sample = make_sampler(api).sample_once()
    gb300 = sample.gpus[1]
    assert gb300.memory_total_bytes is None
    assert gb300.memory_used_bytes is None
    assert gb300.power_w is None
    assert gb300.utilization_pct == 87.0  # the supported ones still come through
    payload = status_payload(sample)["gpus"][1]
    assert payload["memory_total_bytes"] is None
    assert payload["power_w"] is None
    line = next(line for line in status_lines(sample) if "GB300" in line)
    assert "memory n/a of n/a" in line
    assert "power n/a of n/a" in line


def test_no_driver_is_a_normal_answer() -> None:
    sample = make_sampler(FakeNvml(no_driver=True)).sample_once()
    assert sample.gpus == ()
    assert "NVML unavailable" in sample.gpu_error
    assert status_payload(sample)["gpus"] == []
    assert status_lines(sample)[0].startswith("GPU: none (NVML unavailable")


def test_no_gpu_is_a_normal_answer() -> None:
    sample = make_sampler(FakeNvml(gpus=[])).sample_once()
    assert sample.gpus == ()
    assert sample.gpu_error == "NVML found no GPU"


def test_gpu_names_are_read_once() -> None:
    api = FakeNvml()
    names: list[int] = []
    original = api.name

    def counting_name(handle: int) -> bytes:
        names.append(handle)
        return original(handle)

    api.name = counting_name  # type: ignore[method-assign]
    sampler = make_sampler(api)
    for _ in range(3):
        sampler.sample_once()
    assert sorted(names) == [0, 1]


def test_ring_buffer_keeps_only_the_history_window() -> None:
    settings = with_changes(Settings(), {"sampler.interval_s": 1.0, "sampler.history_s": 5})
    ticks = iter(range(100, 200))
    sampler = make_sampler(FakeNvml(), settings=settings, clock=lambda: float(next(ticks)))
    for _ in range(8):
        sampler.sample_once()
    assert sampler.capacity == 5
    assert [s.at for s in sampler.history()] == [103.0, 104.0, 105.0, 106.0, 107.0]
    assert [s.at for s in sampler.history(seconds=2)] == [105.0, 106.0, 107.0]
    latest = sampler.latest(reader="dashboard")
    assert latest is not None
    assert latest.at == 107.0
    assert sampler.stats.reads == {"dashboard": 1}


def test_engine_pids_are_asked_only_for_unknown_processes() -> None:
    now = [0.0]
    calls: list[int] = []

    def lookup() -> set[int]:
        calls.append(1)
        return {10}

    pids = EnginePids(lookup, clock=lambda: now[0], refresh_s=30)
    assert pids.for_gpu_pids({10, 20}, key="c1") == {10}
    assert pids.for_gpu_pids({10, 20}, key="c1") == {10}
    assert len(calls) == 1
    pids.for_gpu_pids({10, 20, 30}, key="c1")  # a new process, but asked recently
    assert len(calls) == 1
    now[0] = 31.0
    pids.for_gpu_pids({10, 20, 30}, key="c1")
    assert len(calls) == 2
    pids.for_gpu_pids({10, 20, 30}, key="c2")  # a new container: ask at once
    assert len(calls) == 3


def test_engine_pid_lookup_failure_is_not_fatal() -> None:
    def lookup() -> set[int]:
        raise DockerUnavailableError("Docker is not reachable.")

    sample = make_sampler(
        FakeNvml(), engine_status=lambda: fake_status(), engine_pids=lookup
    ).sample_once()
    assert not any(p.is_engine for g in sample.gpus for p in g.processes)


def test_metrics_are_scraped_only_while_the_engine_serves() -> None:
    class Scraper:
        def __init__(self) -> None:
            self.urls: list[str] = []
            self.resets = 0

        def scrape(self, url: str) -> EngineMetrics:
            self.urls.append(url)
            return EngineMetrics(at=1.0, running=3, kv_cache_usage_pct=12.0)

        def reset(self) -> None:
            self.resets += 1

        def close(self) -> None:
            pass

    status = fake_status(state=EngineState.STARTING, url="http://127.0.0.1:8001")
    scraper = Scraper()
    sampler = make_sampler(FakeNvml(), engine_status=lambda: status, scraper=scraper)
    assert sampler.sample_once().engine is None
    status.state = EngineState.READY
    engine = sampler.sample_once().engine
    assert engine is not None
    assert engine.running == 3
    assert scraper.urls == ["http://127.0.0.1:8001"]
    status.state = EngineState.STOPPED
    assert sampler.sample_once().engine is None
    assert scraper.resets == 2


def test_background_thread_samples_and_stops() -> None:
    settings = with_changes(Settings(), {"sampler.interval_s": 0.05})
    seen = threading.Event()

    def host(s: Settings) -> HostSample:
        if sampler.stats.samples >= 3:
            seen.set()
        return fixed_host(s)

    sampler = make_sampler(FakeNvml(), settings=settings, read_host=host)
    sampler.watch(lambda _sample: None)  # a page looks: every interval_s
    sampler.start()
    sampler.start()  # idempotent: still one thread
    assert seen.wait(10)
    sampler.stop()
    assert not sampler.running
    count = sampler.stats.samples
    assert count >= 3
    assert sampler.stats.cpu_s > 0
    assert sampler.stats.samples == count  # nothing samples after stop


def test_a_failing_reading_does_not_kill_the_thread() -> None:
    settings = with_changes(Settings(), {"sampler.interval_s": 0.05})
    calls = [0]
    recovered = threading.Event()

    def host(s: Settings) -> HostSample:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("transient")
        recovered.set()
        return fixed_host(s)

    sampler = make_sampler(FakeNvml(), settings=settings, read_host=host)
    sampler.watch(lambda _sample: None)
    sampler.start()
    assert recovered.wait(10)
    sampler.stop()


def write_node(root: Path, node: int, cpus: str, total_kb: int, free_kb: int) -> None:
    path = root / "devices" / "system" / "node" / f"node{node}"
    path.mkdir(parents=True)
    (path / "cpulist").write_text(cpus + "\n")
    (path / "meminfo").write_text(
        f"Node {node} MemTotal:       {total_kb} kB\n"
        f"Node {node} MemFree:        {free_kb} kB\n"
        f"Node {node} FilePages:      0 kB\n"
    )


def test_grace_memory_is_counted_apart_from_hbm(tmp_path: Path) -> None:
    # Grace (CPUs, 480 GiB) and the GPU's HBM onlined as a CPU-less node (240 GiB).
    write_node(tmp_path, 0, "0-71", 480 * 1024**2, 400 * 1024**2)
    write_node(tmp_path, 1, "", 240 * 1024**2, 240 * 1024**2)
    host = read_host(Settings(), sysfs=tmp_path)
    assert host.memory_source == "grace-numa"
    assert host.memory_total_bytes == 480 * 1024**3
    assert host.memory_used_bytes == 80 * 1024**3


def test_plain_host_memory_and_weights_disk(tmp_path: Path) -> None:
    write_node(tmp_path, 0, "0-1", 24 * 1024**2, 20 * 1024**2)
    settings = with_changes(
        Settings(), {"engine.hf_cache_dir": str(tmp_path / "not" / "created" / "yet")}
    )
    host = read_host(settings, sysfs=tmp_path)
    assert host.memory_source == "system"
    assert host.gpu_numa_bytes is None
    assert host.memory_total_bytes is not None
    assert host.memory_total_bytes > 0
    assert host.weights_disk_free_bytes is not None
    assert host.weights_disk_free_bytes > 0
    assert host.weights_dir.endswith("yet")


class Supervisor:
    def __init__(self, container_id: str, runtime: object = None) -> None:
        self.container_id = container_id
        self.runtime = runtime

    def status(self) -> EngineStatus:
        return fake_status(container_id=self.container_id)


def test_engine_pids_of_a_process_engine_include_its_children() -> None:
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        assert engine_pid_lookup(Supervisor(f"pid:{proc.pid}"))() == {proc.pid, child}
    finally:
        if child:
            os.kill(child, signal.SIGKILL)
        proc.kill()
        proc.wait(10)
    assert engine_pid_lookup(Supervisor(""))() == set()


def test_engine_pids_of_a_container_come_from_the_runtime() -> None:
    class Runtime:
        def engine_pids(self, container_id: str) -> set[int]:
            return {41, 42} if container_id == "abc" else set()

    assert engine_pid_lookup(Supervisor("abc", Runtime()))() == {41, 42}


def test_status_report_for_the_cli_without_an_appliance(monkeypatch: pytest.MonkeyPatch) -> None:
    """`status --json` is the engine's keys, then the sampler's `gpus` and `host` from one sample;
    `status` prints the same sample's lines."""
    api = FakeNvml()
    monkeypatch.setattr(hardware, "_default_session", hardware.NvmlSession(api))
    engine = EngineStatus(state=EngineState.READY, container_id="abc")
    payload, lines = status_module.status_report(
        engine,
        Settings(),
        Supervisor("abc", type("R", (), {"engine_pids": lambda s, c: {1001}})()),
    )
    assert list(payload)[:6] == [
        "state",
        "phase",
        "profile",
        "container_id",
        "engine_url",
        "message",
    ]
    assert payload["state"] == "ready"
    assert list(payload)[-2:] == ["gpus", "host"]
    assert "warnings" not in payload
    assert any(line.startswith("GPU 1 NVIDIA GB300: memory ") for line in lines)
    assert lines[-1].startswith("Host: CPU ")
    assert [g["name"] for g in payload["gpus"]] == [
        "NVIDIA RTX PRO 6000 Blackwell Workstation Edition",
        "NVIDIA GB300",
    ]
    assert payload["gpus"][1]["processes"][0] == {
        "pid": 1001,
        "memory_bytes": 240 * GB,
        "is_engine": True,
    }
    host = payload["host"]
    assert set(host) == {
        "cpu_pct",
        "memory_total_bytes",
        "memory_used_bytes",
        "weights_disk_free_bytes",
    }
    assert host["memory_total_bytes"] > host["memory_used_bytes"] > 0
    assert host["weights_disk_free_bytes"] > 0
    assert 0.0 <= host["cpu_pct"] <= 100.0


def test_status_report_keeps_the_engine_part_when_sampling_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fail(*_args: object, **_kwargs: object) -> None:
        raise HardwareError("NVML: driver/library version mismatch")

    monkeypatch.setattr(status_module, "status_sample", fail)
    payload, lines = status_module.status_report(
        EngineStatus(state=EngineState.STOPPED), Settings()
    )
    assert payload["state"] == "stopped"
    assert "gpus" not in payload
    assert payload["warnings"] == ["sampler: NVML: driver/library version mismatch"]
    assert lines == ["GPUs and host: not read (NVML: driver/library version mismatch)"]


def test_an_engine_process_that_appears_later_is_labelled_soon() -> None:
    """The engine's CUDA process shows up on the GPU seconds after its container started (same
    container id): it is labelled at the next allowed lookup, and known pids never re-trigger."""
    now = [0.0]
    engine: set[int] = set()
    calls: list[float] = []

    def lookup() -> set[int]:
        calls.append(now[0])
        return set(engine)

    pids = EnginePids(lookup, clock=lambda: now[0])  # the default refresh (2 s)
    assert pids.for_gpu_pids({10}, key="c1") == set()  # a desktop process, not the engine
    engine.add(20)
    now[0] = 1.0
    assert pids.for_gpu_pids({10, 20}, key="c1") == set()  # asked 1 s ago: not yet
    now[0] = 2.5
    assert pids.for_gpu_pids({10, 20}, key="c1") == {20}
    for t in (5.0, 10.0, 60.0):
        now[0] = t
        assert pids.for_gpu_pids({10, 20}, key="c1") == {20}
    assert calls == [0.0, 2.5]


def test_without_watchers_the_sampler_slows_down_and_a_watcher_gets_a_sample_at_once() -> None:
    """Nobody looks: a sample every idle_interval_s (the history stays, cheaper). A page comes
    (`watch`): a fresh sample at once, then every interval_s, each handed to the listener;
    `unwatch`: back to the idle pace."""
    settings = with_changes(Settings(), {"sampler.interval_s": 0.05})
    sampler = make_sampler(FakeNvml(), settings=settings)
    assert sampler.idle_interval_s == monitoring_sampler.IDLE_INTERVAL_S
    sampler.idle_interval_s = 3600.0  # "never again" while nobody watches
    sampler.start()
    try:
        deadline = time.monotonic() + 10
        while sampler.stats.samples < 1:
            assert time.monotonic() < deadline, "no first sample"
            time.sleep(0.01)
        time.sleep(0.5)  # a window of ten intervals in which nothing may happen
        assert sampler.stats.samples == 1
        got: list[Sample] = []
        three = threading.Event()

        def listener(sample: Sample) -> None:
            got.append(sample)
            if len(got) >= 3:
                three.set()

        handle = sampler.watch(listener)
        assert sampler.watchers == 1
        assert three.wait(10), "a watched sampler did not sample every interval_s"
        assert got[-1] is sampler.latest()
        sampler.unwatch(handle)
        assert sampler.watchers == 0
        unwatched_at = sampler.stats.samples
        time.sleep(0.5)  # ten intervals: at most the sample that was under way lands
        assert sampler.stats.samples <= unwatched_at + 1
    finally:
        sampler.stop()
    assert not sampler.running
