"""Server-sent events passing through the gateway: read the usage, optionally hide its chunk.

The gateway forwards each complete event as soon as it arrives (no buffering beyond one event).
Only events that mention `"usage"` are parsed, so ordinary token chunks cost a substring search.
When the gateway itself asked the engine for `include_usage` (the client did not), the final
usage-only chunk (`choices: []` plus `usage`) is counted and removed, so the client sees exactly
the stream it asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

_BOUNDARY = b"\n\n"
_MAX_PENDING = 1 << 20  # an upstream that never ends an event is passed through raw past 1 MiB


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @classmethod
    def from_json(cls, value: Any) -> Usage | None:
        if not isinstance(value, dict):
            return None
        prompt = value.get("prompt_tokens")
        completion = value.get("completion_tokens")
        return cls(
            prompt_tokens=prompt if isinstance(prompt, int) and prompt >= 0 else 0,
            completion_tokens=completion if isinstance(completion, int) and completion >= 0 else 0,
        )


class UsageTap:
    """Feed it upstream bytes; it returns the bytes to send on now and remembers the usage."""

    def __init__(self, *, strip_usage_chunk: bool) -> None:
        self.strip = strip_usage_chunk
        self.usage: Usage | None = None
        self.done = False  # `data: [DONE]` went by: the client may hang up from now on
        self.final = False  # the final usage chunk (`choices: []`) went by: usage is complete
        self._pending = b""

    def feed(self, data: bytes) -> bytes:
        buffer = self._pending + data if self._pending else data
        end = buffer.rfind(_BOUNDARY)
        if end < 0:
            if len(buffer) > _MAX_PENDING:
                self._pending = b""
                return buffer
            self._pending = buffer
            return b""
        end += len(_BOUNDARY)
        complete, self._pending = buffer[:end], buffer[end:]
        if b"data: [DONE]" in complete:
            self.done = True
        if b'"usage"' not in complete:
            return complete
        return self._inspect(complete)

    def finish(self) -> bytes:
        """Whatever is left when the upstream ends (normally nothing)."""
        rest, self._pending = self._pending, b""
        return rest

    def _inspect(self, complete: bytes) -> bytes:
        kept: list[bytes] = []
        for event in complete.split(_BOUNDARY)[:-1]:
            if b'"usage"' in event:
                payload = _data_json(event)
                usage = Usage.from_json(payload.get("usage")) if payload else None
                if usage is not None:
                    self.usage = usage
                    if payload is not None and payload.get("choices") == []:
                        self.final = True
                        if self.strip:
                            continue
            kept.append(event + _BOUNDARY)
        return b"".join(kept)


def _data_json(event: bytes) -> dict[str, Any] | None:
    lines = [line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    try:
        value = json.loads(b"\n".join(lines))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def usage_of_body(body: bytes) -> Usage | None:
    """The usage of a non-streamed completion response, if it has one."""
    if b'"usage"' not in body:
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return Usage.from_json(value.get("usage")) if isinstance(value, dict) else None
