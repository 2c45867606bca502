"""The engine as a local subprocess: a pip-installed `vllm serve`, or the simulator (demo mode).

Like a container, the process outlives the appliance: it runs in its own session, its output goes
to a log file, and a pid file (with the process's start time, against pid reuse) lets a restarted
appliance adopt it instead of starting a second one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from appliance import settings as st
from appliance.engine import engine_key
from appliance.engine.runtime import EngineExit, EngineHandle, LogLine, ProgressCallback, Runtime
from appliance.engine.runtime import split_lines as _split
from appliance.engine.spec import LaunchSpec
from appliance.errors import EngineError

_TAIL_BYTES = 64 * 1024
# The log file is polled (no inotify in the standard library): every 0.1 s while lines come, up to
# every 1 s while the log is quiet; a quiet serving engine cost 10 wake-ups a second before.
FOLLOW_MIN_S = 0.1
FOLLOW_MAX_S = 1.0


class ProcessRuntime(Runtime):
    kind = "process"

    def __init__(self, state_dir: Path | None = None, log_dir: Path | None = None) -> None:
        self._state_dir = state_dir or st.data_dir()
        self._log_dir = log_dir or st.cache_dir() / "logs"
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------ files

    def _pid_file(self, name: str) -> Path:
        return self._state_dir / f"{name}.process.json"

    def _log_file(self, name: str) -> Path:
        return self._log_dir / f"{name}.log"

    def _read_record(self, name: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self._pid_file(name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    # ---------------------------------------------------------------------------- runtime

    def ensure_image(self, spec: LaunchSpec, on_progress: ProgressCallback) -> None:
        del spec, on_progress  # nothing to pull: the program is installed locally

    def find(self, name: str) -> EngineHandle | None:
        record = self._read_record(name)
        if record is None:
            return None
        return EngineHandle(
            id=f"pid:{record['pid']}",
            name=name,
            labels=dict(record.get("labels", {})),
            started_at=float(record.get("started_at", 0.0)) or None,
        )

    def launch(self, spec: LaunchSpec) -> EngineHandle:
        if not spec.executable:
            raise EngineError("The process runtime needs a program to run (no executable given).")
        log_path = self._log_file(spec.name)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._state_dir.mkdir(parents=True, exist_ok=True)
        argv = [*spec.executable, *spec.args]
        # Secrets (the engine key as VLLM_API_KEY, the HF token when the engine downloads) go in
        # the environment, which only the owner (and root) can read; never in argv, which `ps`
        # shows every local user.
        env = dict(os.environ) | spec.env_map
        with log_path.open("wb") as log:
            try:
                child = subprocess.Popen(  # noqa: S603 - argv built from the launch spec
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # survives the appliance; stopped as a group
                )
            except OSError as err:
                raise EngineError(
                    f"Could not run {argv[0]!r} ({err.strerror}).",
                    hint="Install vLLM (`pip install step-station[native]`) or use the Docker "
                    "runtime (`step-station config set engine.runtime docker`).",
                ) from err
        with self._lock:
            self._children[child.pid] = child
        created = psutil.Process(child.pid).create_time()
        record = {
            "pid": child.pid,
            "create_time": created,
            "started_at": time.time(),
            "labels": spec.label_map,
            "argv": argv,
            "log": str(log_path),
        }
        pid_file = self._pid_file(spec.name)
        tmp = pid_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(record), encoding="utf-8")
        os.replace(tmp, pid_file)  # a reader never sees half a record
        return EngineHandle(
            id=f"pid:{child.pid}", name=spec.name, labels=spec.label_map, started_at=time.time()
        )

    def _pid(self, handle: EngineHandle) -> int:
        return int(handle.id.split(":", 1)[1])

    def inspect(self, handle: EngineHandle) -> EngineExit:
        pid = self._pid(handle)
        with self._lock:
            child = self._children.get(pid)
        if child is not None:
            code = child.poll()
            return EngineExit(running=code is None, exit_code=code)
        record = self._read_record(handle.name)
        if record is None or record.get("pid") != pid:
            return EngineExit(running=False, gone=True)
        try:
            proc = psutil.Process(pid)
            alive = proc.status() != psutil.STATUS_ZOMBIE
            same = abs(proc.create_time() - float(record.get("create_time", 0))) < 1.0
        except psutil.Error:
            alive, same = False, False
        if alive and same:
            return EngineExit(running=True)
        return EngineExit(running=False, error="the process ended while no appliance watched it")

    def follow_logs(
        self, handle: EngineHandle, stop: threading.Event, since: float | None = None
    ) -> Iterator[LogLine]:
        del since  # the log file has no times; a process runtime never loses its stream
        path = self._log_file(handle.name)
        rest = ""
        wait = FOLLOW_MIN_S
        with contextlib.suppress(FileNotFoundError), path.open("rb") as log:
            while not stop.is_set():
                chunk = log.read(65536)
                if chunk:
                    wait = FOLLOW_MIN_S
                    lines, rest = _split(rest + chunk.decode("utf-8", "replace"))
                    for line in lines:
                        yield LogLine(line)
                    continue
                if not self.inspect(handle).running:
                    chunk = log.read()
                    lines, rest = _split(rest + chunk.decode("utf-8", "replace") + "\n")
                    for line in lines:
                        yield LogLine(line)
                    return
                stop.wait(wait)
                # A quiet log (a serving engine) is read less often, a busy one (a start) at once.
                wait = min(wait * 2, FOLLOW_MAX_S)

    def tail(self, handle: EngineHandle, lines: int = 50) -> list[str]:
        path = self._log_file(handle.name)
        try:
            with path.open("rb") as log:
                size = log.seek(0, os.SEEK_END)
                log.seek(max(0, size - _TAIL_BYTES))
                text = log.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return []
        found, rest = _split(text + "\n")
        del rest
        return found[-lines:]

    def stop(self, handle: EngineHandle, timeout_s: float) -> None:
        pid = self._pid(handle)
        if not self.inspect(handle).running:
            self._kill_leftovers(handle)
            return
        self._signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.inspect(handle).running:
                return
            time.sleep(0.05)
        self._signal_group(pid, signal.SIGKILL)
        for _ in range(100):
            if not self.inspect(handle).running:
                return
            time.sleep(0.05)

    def _signal_group(self, pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)  # the engine runs in its own session: pgid == pid

    def _kill_leftovers(self, handle: EngineHandle) -> None:
        """The API server is gone but its group may not be: when vLLM's engine core is killed,
        its worker process lives on (seen with the real 0.32 engine), holding the model's memory.
        Kill what is left of the engine's process group: processes whose group is the engine's
        pid and that started after it (a reused pid is never mistaken for ours)."""
        pid = self._pid(handle)
        record = self._read_record(handle.name)
        created = (
            float(record.get("create_time", 0.0)) if record and record.get("pid") == pid else 0.0
        )
        if not created:
            return
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == pid and proc.create_time() >= created - 1.0:
                    proc.kill()
            except (OSError, psutil.Error):
                continue

    def remove(self, handle: EngineHandle) -> None:
        pid = self._pid(handle)
        self._kill_leftovers(handle)
        with self._lock:
            child = self._children.pop(pid, None)
        if child is not None:
            child.poll()
        record = self._read_record(handle.name)
        if record is not None and record.get("pid") == pid:
            self._pid_file(handle.name).unlink(missing_ok=True)
            engine_key.discard(handle.name, handle.labels)
