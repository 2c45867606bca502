"""Server-sent events passing through the gateway: read the usage, optionally hide its chunk.

The gateway forwards each complete event as soon as it arrives (no buffering beyond one event).
Only events that mention `"usage"` are parsed, so ordinary token chunks cost a substring search.
When the gateway itself asked the engine for `include_usage` (the client did not), the final
usage-only chunk (`choices: []` plus `usage`) is counted and removed, so the client sees exactly
the stream it asked for.

The agent routes carry their usage in their own events, always (see `apis.py` for vLLM's source):
Responses in `response.completed` (`response.usage`), Messages in `message_start` (input tokens)
and `message_delta` (the final counts), ended by `message_stop`. Nothing is hidden there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from appliance.gateway.apis import CHAT, MESSAGES, RESPONSES

_BOUNDARY = b"\n\n"
_MAX_PENDING = 1 << 20  # an upstream that never ends an event is passed through raw past 1 MiB


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @classmethod
    def from_json(cls, value: Any) -> Usage | None:  # noqa: ANN401 - any JSON value
        """OpenAI's `prompt_tokens`/`completion_tokens`, or the agent APIs' `input_tokens`/
        `output_tokens` (Anthropic counts cached prompt tokens apart: they are added back)."""
        if not isinstance(value, dict):
            return None
        if "prompt_tokens" not in value and ("input_tokens" in value or "output_tokens" in value):
            prompt = sum(_count(value.get(name)) for name in _INPUT_PARTS)
            return cls(prompt_tokens=prompt, completion_tokens=_count(value.get("output_tokens")))
        return cls(
            prompt_tokens=_count(value.get("prompt_tokens")),
            completion_tokens=_count(value.get("completion_tokens")),
        )


_INPUT_PARTS = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


def _count(value: Any) -> int:  # noqa: ANN401 - any JSON value
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


# Stream events that end a Responses stream, each with the whole response and its usage.
_RESPONSE_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})


class UsageTap:
    """Feed it upstream bytes; it returns the bytes to send on now and remembers the usage."""

    def __init__(self, *, strip_usage_chunk: bool, route: str = CHAT) -> None:
        self.strip = strip_usage_chunk
        self.route = route
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
        if b"data: [DONE]" in complete or (
            self.route == MESSAGES and b"event: message_stop" in complete
        ):
            self.done = True
        if b'"usage"' not in complete:
            return complete
        return self._inspect(complete)

    def finish(self) -> bytes:
        """Whatever is left when the upstream ends (normally nothing)."""
        rest, self._pending = self._pending, b""
        return rest

    def _inspect(self, complete: bytes) -> bytes:
        if self.route in (RESPONSES, MESSAGES):
            for event in complete.split(_BOUNDARY)[:-1]:
                if b'"usage"' in event:
                    self._agent_event(_data_json(event))
            return complete
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

    def _agent_event(self, payload: dict[str, Any] | None) -> None:
        kind = payload.get("type") if payload else None
        if payload is None or not isinstance(kind, str):
            return
        if self.route == RESPONSES:
            response = payload.get("response")
            usage = Usage.from_json(response.get("usage")) if isinstance(response, dict) else None
            if kind in _RESPONSE_ENDS and usage is not None:
                self.usage = usage
                self.final = self.done = True
            return
        if kind == "message_start":
            message = payload.get("message")
            if isinstance(message, dict):
                self.usage = Usage.from_json(message.get("usage")) or self.usage
        elif kind == "message_delta":
            usage = Usage.from_json(payload.get("usage"))
            if usage is not None:
                # Anthropic's own message_delta may carry only output_tokens: keep the input.
                if not usage.prompt_tokens and self.usage is not None:
                    usage.prompt_tokens = self.usage.prompt_tokens
                self.usage = usage
                self.final = True


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
