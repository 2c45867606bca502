"""A simulated DGX Station GPU for browser tests: `STEP_FAKE_NVML=gb300` on PYTHONPATH=<this dir>.

NVML is the one seam that cannot run on a machine without a GPU (tests/gpu/ covers the real one).
This replaces `appliance.hardware`'s NVML layer in the appliance process with a GB300 whose
process list holds the demo engine's real host PID (read from the process runtime's pid file)
with the memory vLLM would take at `--gpu-memory-utilization 0.95`, and one other process. Every
other part (sampler, pid mapping, metrics, UI) is the real one. Screenshots taken with it say so.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

if os.environ.get("STEP_FAKE_NVML") == "gb300":
    from appliance import hardware

    MIB = 1024**2
    GIB = 1024**3
    TOTAL = 256_703 * MIB  # what NVML reports on a GB300
    IDLE_USED = 610 * MIB
    ENGINE_BYTES = int(0.95 * TOTAL) - 2 * GIB
    OTHER = (4242, int(1.2 * GIB))  # e.g. a desktop session on the same GPU

    _cache: dict[str, tuple[float, int | None]] = {}

    def _engine_pid() -> int | None:
        """The demo engine's pid, read at most every 0.5 s (NVML itself answers in µs)."""
        now = time.monotonic()
        cached = _cache.get("pid")
        if cached is not None and now - cached[0] < 0.5:
            return cached[1]
        pid = _read_engine_pid()
        _cache["pid"] = (now, pid)
        return pid

    def _read_engine_pid() -> int | None:
        data = Path(os.environ["STEP_STATION_HOME"]) / "data"
        for record in data.glob("*.process.json"):
            try:
                pid = int(json.loads(record.read_text())["pid"])
                os.kill(pid, 0)
                return pid
            except (OSError, ValueError, KeyError):
                continue
        return None

    class StationNvml(hardware.Nvml):
        def init(self) -> None:
            pass

        def shutdown(self) -> None:
            pass

        def driver_version(self) -> str:
            return "580.95.05 (simulated)"

        def device_count(self) -> int:
            return 1

        def handle(self, index: int) -> int:
            return index

        def name(self, handle: int) -> str:
            return "NVIDIA GB300"

        def uuid(self, handle: int) -> str:
            return "GPU-5a1e0000-0000-4000-8000-00000000gb30"

        def compute_capability(self, handle: int) -> tuple[int, int]:
            return (10, 3)

        def _busy(self) -> bool:
            return _engine_pid() is not None

        def memory(self, handle: int) -> tuple[int, int]:
            used = IDLE_USED + OTHER[1] + (ENGINE_BYTES if self._busy() else 0)
            return TOTAL, used

        def utilization_pct(self, handle: int) -> int:
            return int(40 + 20 * ((time.time() // 7) % 3)) if self._busy() else 0

        def temperature_c(self, handle: int) -> int:
            return 58 if self._busy() else 41

        def power_mw(self, handle: int) -> int:
            return 612_000 if self._busy() else 95_000

        def power_limit_mw(self, handle: int) -> int:
            return 1_400_000

        def sm_clock_mhz(self, handle: int) -> int:
            return 1_965

        def throttle_reasons(self, handle: int) -> int:
            return 0

        def processes(self, handle: int) -> list[tuple[int, int | None]]:
            pid = _engine_pid()
            found = [OTHER]
            if pid is not None:
                found.insert(0, (pid, ENGINE_BYTES))
            return found

    hardware.use_nvml(StationNvml())
