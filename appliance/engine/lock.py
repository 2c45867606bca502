"""An inter-process lock that serializes engine operations from the UI, the CLI and the gateway.

`fcntl.flock` on a file in the data dir: the kernel releases it when the holder dies (even by
`kill -9`), so a crashed appliance never leaves the engine locked.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from appliance import settings as st
from appliance.errors import EngineError


def lock_path() -> Path:
    return st.data_dir() / "engine.lock"


class EngineLock:
    """`with EngineLock(): ...` holds the lock; waits at most `timeout_s`, then says who holds it.

    Re-entrant within one process (a thread-level RLock guards the file lock), so a supervisor
    method holding it may call another that takes it too.
    """

    _thread_lock = threading.RLock()
    _depth = 0
    _fd: int | None = None

    def __init__(
        self,
        timeout_s: float = 30.0,
        *,
        path: Path | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout_s = timeout_s
        self.path = path or lock_path()
        self._sleep = sleep
        self._clock = clock

    def __enter__(self) -> EngineLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def acquire(self) -> None:
        if not EngineLock._thread_lock.acquire(timeout=self.timeout_s):
            raise self._busy("another operation in this process")
        try:
            if EngineLock._depth == 0:
                EngineLock._fd = self._acquire_file()
            EngineLock._depth += 1
        except BaseException:
            EngineLock._thread_lock.release()
            raise

    def release(self) -> None:
        EngineLock._depth -= 1
        if EngineLock._depth == 0 and EngineLock._fd is not None:
            fcntl.flock(EngineLock._fd, fcntl.LOCK_UN)
            os.close(EngineLock._fd)
            EngineLock._fd = None
        EngineLock._thread_lock.release()

    def _acquire_file(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = self._clock() + self.timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if self._clock() >= deadline:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise self._busy(holder) from None
                self._sleep(0.05)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd

    def _busy(self, holder: str) -> EngineError:
        return EngineError(
            f"Another engine operation is in progress ({holder}); waited {self.timeout_s:.0f} s.",
            hint="Wait for it to finish (`step-station status`), then try again.",
        )


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except OSError:
        text = ""
    return f"process {text}" if text.isdigit() else "another process"
