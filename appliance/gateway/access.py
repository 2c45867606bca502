"""The gateway's access log: one line per request, never a body, a key or a query string.

Lines go to the gateway's own rotating file and to the `step_station.gateway.access` logger;
the last few hundred records stay in memory for the sharing panel's "recent usage".
"""

from __future__ import annotations

import logging
import logging.handlers
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

access_log = logging.getLogger("step_station.gateway.access")

_MAX_PATH_CHARS = 120


@dataclass(frozen=True)
class AccessRecord:
    at: float  # wall clock
    address: str
    key_name: str  # "" when no key was used
    key_id: str
    method: str
    path: str  # printable, truncated
    status: int
    duration_ms: float
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    note: str = ""  # e.g. "client disconnected"

    def line(self) -> str:
        key = f"{self.key_name}({self.key_id})" if self.key_id else "-"
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.at))
        parts = [
            when,
            self.address,
            f"key={key}",
            f'"{self.method} {self.path}"',
            str(self.status),
            f"{self.duration_ms:.0f}ms",
        ]
        if self.stream:
            parts.append("stream")
        if self.prompt_tokens or self.completion_tokens:
            parts.append(f"tokens={self.prompt_tokens}+{self.completion_tokens}")
        if self.note:
            parts.append(self.note)
        return " ".join(parts)


def printable_path(raw: bytes) -> str:
    """A request path safe to log: ASCII, escaped, truncated (it is chosen by the client)."""
    text = raw[:_MAX_PATH_CHARS].decode("ascii", "backslashreplace")
    text = "".join(c if 32 < ord(c) < 127 and c != '"' else f"\\x{ord(c):02x}" for c in text)
    return text + ("…" if len(raw) > _MAX_PATH_CHARS else "")


class AccessLog:
    """Recent records in memory plus the log line."""

    def __init__(self, keep: int = 500) -> None:
        self._records: deque[AccessRecord] = deque(maxlen=keep)
        self._lock = threading.Lock()
        self._handler: logging.Handler | None = None

    def add(self, record: AccessRecord) -> None:
        with self._lock:
            self._records.append(record)
        handler = self._handler
        if handler is not None:  # this gateway's own file, whatever the logging configuration
            handler.handle(
                logging.makeLogRecord(
                    {"name": access_log.name, "msg": record.line(), "levelno": logging.INFO,
                     "levelname": "INFO"}
                )
            )  # fmt: skip
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(record.line())

    def recent(self, limit: int = 50) -> list[AccessRecord]:
        """Newest first."""
        with self._lock:
            items = list(self._records)
        return items[::-1][:limit]

    def attach_file(self, path: Path) -> None:
        """Also write the lines to `path` (rotated at 5 MB, 3 old files kept)."""
        if self._handler is not None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=5_000_000, backupCount=3, encoding="utf-8"
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._handler = handler

    def detach_file(self) -> None:
        handler, self._handler = self._handler, None
        if handler is not None:
            handler.close()
