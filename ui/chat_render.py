"""Conversation -> Chatbot messages (plain dicts in Gradio's messages format). No widgets here.

Streaming-friendly on purpose: while a reply streams, its text only grows, so Gradio's diff sends
an `append` of the new characters instead of the whole message. Everything that changes in place
(the live timer, tokens/s) lives in short strings: the thinking block's title and the live-stats
line outside the chat.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import chat
from appliance import history as hist

_EXT = {"image/png": "png", "image/jpeg": "jpg", "image/gif": "gif", "image/webp": "webp"}

STATUS_NOTES = {
    hist.STOPPED: "stopped",
    hist.INTERRUPTED: "interrupted: the appliance stopped mid-answer",
    hist.FAILED: "failed",
    hist.STREAMING: "still streaming",
}


@dataclass
class Rendered:
    """Chatbot messages plus, for each, the history position it shows (for edit)."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # "image" | "text" | "thinking" | "answer"

    def add(self, position: int, kind: str, message: dict[str, Any]) -> None:
        self.messages.append(message)
        self.positions.append(position)
        self.kinds.append(kind)


def image_file(image: hist.StoredImage, folder: Path) -> Path:
    """The image as a file the UI can serve (content-addressed, written once)."""
    digest = hashlib.sha256(image.data).hexdigest()[:32]
    path = folder / f"{digest}.{_EXT.get(image.mime, 'png')}"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        tmp.write_bytes(image.data)
        tmp.replace(path)
    return path


def _fmt_seconds(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def stats_line(stats: dict[str, Any], status: str) -> str:
    """`level high · first token 0.42 s · 341 tok/s · 1,234 prompt + 4,000 completion tokens`."""
    parts = [f"level {stats.get('level') or '?'}"]
    parts.append(f"first token {_fmt_seconds(stats.get('ttft_s'))}")
    rate = stats.get("tokens_per_s")
    parts.append(f"{rate:,.0f} tok/s" if rate else "– tok/s")
    prompt = stats.get("prompt_tokens")
    completion = stats.get("completion_tokens") or 0
    if prompt is not None:
        parts.append(f"{prompt:,} prompt + {completion:,} completion tokens")
    else:
        parts.append(f"{completion:,} completion tokens")
    note = STATUS_NOTES.get(status)
    if note:
        parts.append(note)
    if stats.get("finish_reason") == "length":
        parts.append("cut at Max tokens")
    return " · ".join(parts)


def _footer(stats: dict[str, Any], status: str, error: str = "") -> str:
    level = stats.get("level") or ""
    line = stats_line(stats, status)
    footer = (
        # Classes, not data- attributes: the chat's HTML sanitizer keeps only classes.
        f'\n\n<div class="reply-stats level-{level} status-{status}">{line}</div>'
    )
    if error:
        footer = f"\n\n**Error:** {error}" + footer
    return footer


def _thinking(
    position: int, reasoning: str, seconds: float, *, pending: bool, level: str
) -> dict[str, Any]:
    if pending:
        title = f"Thinking · {seconds:.1f} s · level {level}"
        meta: dict[str, Any] = {"title": title, "status": "pending", "id": f"think-{position}"}
    else:
        meta = {
            "title": f"Thought · level {level}",
            "status": "done",
            "duration": round(seconds, 1),
            "id": f"think-{position}",
        }
    return {"role": "assistant", "content": reasoning, "metadata": meta}


def render_user(out: Rendered, message: hist.Message, image_path: Callable[..., Path]) -> None:
    for image in message.images:
        path = image_path(image)
        out.add(
            message.position,
            "image",
            {"role": "user", "content": {"path": str(path), "alt_text": image.name}},
        )
    if message.content or not message.images:
        out.add(message.position, "text", {"role": "user", "content": message.content})


def render_stored_reply(out: Rendered, message: hist.Message) -> None:
    stats = dict(message.meta)
    level = str(stats.get("level") or "")
    if message.reasoning:
        seconds = float(stats.get("thinking_s") or 0.0)
        out.add(
            message.position,
            "thinking",
            _thinking(message.position, message.reasoning, seconds, pending=False, level=level),
        )
    body = message.content + _footer(stats, message.status, str(stats.get("error") or ""))
    out.add(message.position, "answer", {"role": "assistant", "content": body})


def render_live_reply(out: Rendered, position: int, reply: chat.Reply) -> None:
    """A reply while it streams (and its final form once it ended)."""
    if not reply.active:
        status = hist.COMPLETE if reply.phase == chat.FINISHED else chat_status(reply.phase)
        stored = hist.Message(
            0, position, "assistant", reply.content, reply.reasoning, status, reply.stats()
        )
        if reply.error:
            stored.meta["error"] = reply.error
        render_stored_reply(out, stored)
        return
    thinking_open = reply.phase in (chat.WAITING, chat.THINKING)
    if thinking_open or reply.reasoning_parts:
        out.add(
            position,
            "thinking",
            _thinking(
                position,
                reply.reasoning,
                reply.thinking_seconds()
                if reply.reasoning_started
                else reply.clock() - reply.started,
                pending=thinking_open,
                level=reply.level,
            ),
        )
    if reply.phase == chat.ANSWERING:
        out.add(position, "answer", {"role": "assistant", "content": reply.content})


def chat_status(phase: str) -> str:
    return {chat.STOPPED: hist.STOPPED, chat.FAILED: hist.FAILED}.get(phase, hist.INTERRUPTED)


def render_messages(messages: Sequence[hist.Message], image_path: Callable[..., Path]) -> Rendered:
    out = Rendered()
    for message in messages:
        if message.role == "user":
            render_user(out, message, image_path)
        elif message.role == "assistant":
            render_stored_reply(out, message)
    return out


def live_stats(reply: chat.Reply) -> str:
    """One short line under the chat while a reply streams."""
    if reply.phase == chat.WAITING:
        return f"Waiting for the first token · {reply.clock() - reply.started:.1f} s"
    rate = reply.tokens_per_second()
    verb = "Thinking" if reply.phase == chat.THINKING else "Answering"
    if not reply.active:
        return ""
    return f"{verb} · level {reply.level} · {reply.completion_tokens():,} tokens" + (
        f" · {rate:,.0f} tok/s" if rate else ""
    )


def context_line(context_len: int | None, used: int | None) -> str:
    if not context_len:
        return "Context: unknown until the model is running"
    line = f"Context: {context_len:,} tokens"
    if used:
        line += f" · this conversation ≈ {used:,} ({used / context_len:.0%})"
    return line
