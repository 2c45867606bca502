"""The sampler against a real NVIDIA GPU: known torch allocations in a child process.

Run on the device machine (one H200): `python tests/gpu/test_sampler_gpu.py` (pytest without the
repository's conftest, so only pytest, torch, nvidia-ml-py, psutil and platformdirs are needed;
same as `pytest -q -s --noconftest -m gpu tests/gpu/test_sampler_gpu.py`).
A child process (tests/gpu/alloc_child.py) creates its CUDA context, allocates 8 GiB, then 16 GiB
more, frees everything and exits. After each step the sampler's device memory and the child's
per-process memory must match what was allocated within 1%, and fall back after the release.
`-s` prints the readings as a table for the issue note.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

# The device machine runs this file from a plain checkout (nothing installed): import from it.
REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from appliance import hardware  # noqa: E402
from appliance.monitoring.sampler import ENGINE_LABEL, Sample, Sampler, status_payload  # noqa: E402
from appliance.settings import Settings, with_changes  # noqa: E402

pytestmark = pytest.mark.gpu

GIB = 1024**3
STEPS = (8 * GIB, 16 * GIB)
CHILD = Path(__file__).with_name("alloc_child.py")
SETTLE_S = 10.0  # bounded wait for NVML's per-process accounting to catch up after a step


@pytest.fixture(scope="module")
def gpu() -> hardware.GpuReading:
    pytest.importorskip("torch")
    readings = hardware.read_gpus()
    if not readings:
        pytest.skip(f"no NVIDIA GPU here ({hardware.default_session().error() or 'none found'})")
    return readings[0]


class Child:
    def __init__(self, uuid: str) -> None:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=uuid, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.pid = self.proc.pid

    def ask(self, command: str) -> dict:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the allocation child died (exit {self.proc.poll()})"
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("exit\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def gpu_of(sample: Sample, uuid: str):
    return next(g for g in sample.gpus if g.uuid == uuid)


def process_bytes(sample: Sample, uuid: str, pid: int) -> int | None:
    for p in gpu_of(sample, uuid).processes:
        if p.pid == pid:
            return p.memory_bytes
    return None


def settle(sampler: Sampler, ok: Callable[[Sample], bool]) -> Sample:
    """Sample until `ok` holds or SETTLE_S passes; returns the last sample either way."""
    deadline = time.monotonic() + SETTLE_S
    sample = sampler.sample_once()
    while not ok(sample) and time.monotonic() < deadline:
        time.sleep(0.2)
        sample = sampler.sample_once()
    return sample


def within(actual: int | None, expected: int, tolerance: int) -> bool:
    return actual is not None and abs(actual - expected) <= tolerance


def test_sampler_memory_matches_known_allocations(gpu: hardware.GpuReading) -> None:
    uuid = gpu.uuid
    child = Child(uuid)
    engine = {child.pid}
    sampler = Sampler(Settings(), engine_pids=lambda: engine)
    rows: list[tuple[str, int, int | None, int | None, int | None]] = []
    try:
        base = sampler.sample_once()
        base_used = gpu_of(base, uuid).memory_used_bytes
        total = gpu_of(base, uuid).memory_total_bytes
        assert base_used is not None
        assert total is not None
        assert process_bytes(base, uuid, child.pid) is None

        ctx = child.ask("init")
        sample = settle(sampler, lambda s: process_bytes(s, uuid, child.pid) is not None)
        ctx_bytes = process_bytes(sample, uuid, child.pid)
        assert ctx_bytes is not None, "the child's CUDA context is not in NVML's process list"
        ctx_used = gpu_of(sample, uuid).memory_used_bytes
        assert ctx_used is not None
        rows.append(("context", 0, ctx_used, ctx_bytes, ctx["reserved_bytes"]))

        allocated = 0
        for step in STEPS:
            answer = child.ask(f"alloc {step}")
            allocated += step
            assert answer["reserved_bytes"] >= allocated  # torch really holds it
            tolerance = allocated // 100
            expected_proc = ctx_bytes + answer["reserved_bytes"]
            sample = settle(
                sampler,
                lambda s, e=expected_proc, t=tolerance: within(
                    process_bytes(s, uuid, child.pid), e, t
                ),
            )
            proc = process_bytes(sample, uuid, child.pid)
            used = gpu_of(sample, uuid).memory_used_bytes
            rows.append((f"+{step // GIB} GiB", allocated, used, proc, answer["reserved_bytes"]))
            # Per-process: the context plus what torch allocated, within 1% of the allocation.
            assert within(proc, expected_proc, tolerance), (proc, expected_proc)
            # Device: used grew by the allocation, within 1%.
            assert within(used, ctx_used + answer["reserved_bytes"], tolerance), (used, ctx_used)
            # And agrees with CUDA's own view of the device (total - free), within 1% of total.
            cuda_used = answer["cuda_total_bytes"] - answer["cuda_free_bytes"]
            assert within(used, cuda_used, total // 100), (used, cuda_used)
            # The child is labelled as the engine because the engine pid lookup names it.
            entry = next(p for p in gpu_of(sample, uuid).processes if p.pid == child.pid)
            assert entry.is_engine
            assert entry.name == ENGINE_LABEL

        payload = status_payload(sample)
        mine = next(g for g in payload["gpus"] if g["uuid"] == uuid)
        assert {"pid": child.pid, "memory_bytes": proc, "is_engine": True} in mine["processes"]
        assert mine["memory_total_bytes"] == total

        # Release: the process falls back to its context, the device to where it was.
        child.ask("free")
        tolerance = allocated // 100
        sample = settle(
            sampler, lambda s: within(process_bytes(s, uuid, child.pid), ctx_bytes, tolerance)
        )
        proc = process_bytes(sample, uuid, child.pid)
        used = gpu_of(sample, uuid).memory_used_bytes
        rows.append(("freed", 0, used, proc, 0))
        assert within(proc, ctx_bytes, tolerance), (proc, ctx_bytes)
        assert within(used, ctx_used, tolerance), (used, ctx_used)

        child.close()
        sample = settle(
            sampler,
            lambda s: (
                process_bytes(s, uuid, child.pid) is None
                and within(gpu_of(s, uuid).memory_used_bytes, base_used, tolerance)
            ),
        )
        used = gpu_of(sample, uuid).memory_used_bytes
        rows.append(("exited", 0, used, process_bytes(sample, uuid, child.pid), 0))
        assert process_bytes(sample, uuid, child.pid) is None
        assert within(used, base_used, tolerance), (used, base_used)
    finally:
        child.close()
        print(f"\nGPU {gpu.index} {uuid}: total {total} bytes, idle used {base_used} bytes")
        print(
            f"{'step':<10} {'allocated':>14} {'device used':>16} {'child (NVML)':>16} {'torch':>14}"
        )
        for name, alloc, used, proc, torch_reserved in rows:
            print(f"{name:<10} {alloc:>14} {used!s:>16} {proc!s:>16} {torch_reserved:>14}")


def test_background_sampler_sees_the_allocation(gpu: hardware.GpuReading) -> None:
    """The thread path (what pages read): a sample taken after an allocation shows it."""
    settings = with_changes(Settings(), {"sampler.interval_s": 0.2})
    child = Child(gpu.uuid)
    sampler = Sampler(settings)  # no engine lookup: the child is "another process"
    sampler.start()
    try:
        child.ask("init")
        answer = child.ask(f"alloc {4 * GIB}")
        asked_at = time.time()
        deadline = time.monotonic() + SETTLE_S
        found = None
        while time.monotonic() < deadline:
            latest = sampler.latest(reader="gpu-test")
            if latest is not None and latest.at > asked_at:
                found = process_bytes(latest, gpu.uuid, child.pid)
                if found is not None and found >= answer["reserved_bytes"]:
                    break
            time.sleep(0.2)
        assert found is not None
        assert found >= answer["reserved_bytes"]
        entry = next(p for p in gpu_of(sampler.latest(), gpu.uuid).processes if p.pid == child.pid)
        assert not entry.is_engine
        assert entry.name.startswith("python")
        print(f"\nsampler thread: {sampler.stats.samples} samples, {sampler.stats.cpu_s:.4f} s CPU")
    finally:
        sampler.stop()
        child.close()


if __name__ == "__main__":
    raise SystemExit(
        pytest.main([__file__, "-q", "-s", "--noconftest", "-p", "no:cacheprovider", "-m", "gpu"])
    )
