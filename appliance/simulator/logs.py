"""vLLM-shaped log output: `(APIServer pid=1) INFO 11-29 01:02:03 [api_server.py:1885] text`.

Log records go to stdout and tqdm progress bars to stderr, as in vLLM; every write is flushed
so `docker logs` and a parent process see lines as they happen.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

API = "APIServer"
CORE = "EngineCore_DP0"


class VllmLog:
    """Writes log lines in vLLM's format, tagged per process like vLLM's multiproc prefix."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        pid = os.getpid()
        self.pids = {API: pid, CORE: pid + 1}

    def _prefix(self, proc: str) -> str:
        return f"({proc} pid={self.pids[proc]}) "

    def line(self, text: str, *, where: str, level: str = "INFO", proc: str = API) -> None:
        stamp = time.strftime("%m-%d %H:%M:%S")
        for part in text.split("\n"):
            self.out.write(f"{self._prefix(proc)}{level} {stamp} [{where}] {part}\n")
        self.out.flush()

    def info(self, text: str, where: str, proc: str = API) -> None:
        self.line(text, where=where, proc=proc)

    def warning(self, text: str, where: str, proc: str = API) -> None:
        self.line(text, where=where, level="WARNING", proc=proc)

    def error(self, text: str, where: str, proc: str = API) -> None:
        self.line(text, where=where, level="ERROR", proc=proc)

    def raw(self, text: str, *, stderr: bool = False) -> None:
        """Unformatted output (tracebacks, uvicorn's own lines)."""
        stream = self.err if stderr else self.out
        stream.write(text if text.endswith("\n") else text + "\n")
        stream.flush()

    def bar_start(self, proc: str = CORE) -> None:
        # vLLM prefixes only the start of a line; the tqdm updates after each \r carry no prefix.
        self.err.write(self._prefix(proc))

    def bar(self, text: str, *, first: bool = False) -> None:
        self.err.write(("" if first else "\r") + text)
        self.err.flush()

    def bar_end(self) -> None:
        self.err.write("\n")
        self.err.flush()


def tqdm_bar(desc: str, done: int, total: int, elapsed: float, *, style: str = "bar") -> str:
    """One tqdm frame in vLLM's two styles: the shard loader's "Completed |" and the plain bar."""
    pct = int(100 * done / total) if total else 100
    rate = done / elapsed if elapsed > 0 else 0.0
    remaining = (total - done) / rate if rate > 0 else None
    span = f"{_clock(elapsed)}<{_clock(remaining) if remaining is not None else '?'}"
    if rate >= 1 or rate == 0:
        speed = f"{rate:.2f}it/s" if rate else "?it/s"
    else:
        speed = f"{1 / rate:.2f}s/it"
    if style == "shards":
        return f"{desc}: {pct:3d}% Completed | {done}/{total} [{span}, {speed}]"
    filled = pct // 10
    bar = "\u2588" * filled + " " * (10 - filled)
    return f"{desc}: {pct:3d}%|{bar}| {done}/{total} [{span}, {speed}]"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60:02d}:{seconds % 60:02d}"
