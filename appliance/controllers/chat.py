"""The chat tab's logic: the conversation list, what each chat action does, exports, the banner.

The chat flow itself (checks, history, streaming) is `appliance.chat.service.ChatService`'s;
this module decides what the tab does around it. Messages come back as history messages: the tab
renders them (`ui.chat_render`). Refusals are appliance errors; the tab shows them and leaves the
chat and the input box as they were.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance.chat import client as chat
from appliance.chat import history as hist
from appliance.chat.service import ChatService, UserTurn
from appliance.errors import ApplianceError, BadInputError
from appliance.settings import cache_dir, private_dir, write_private

EXPORT_EXTENSIONS = {"JSON": "json", "Markdown": "md"}
STOPPED_NOTE = "Stopped: the engine ended the request."
NOT_EDITABLE = "Only the text of your own messages can be edited."


def export_folder() -> Path:
    return cache_dir() / "exports"


def export_name(conversation_id: str | None, fmt: str, at: float) -> str:
    """`step-station-conversation-<first 8 of the id>-<local time>.json`; without an id, the file
    holds every conversation: `step-station-all-conversations-...`."""
    name = f"conversation-{conversation_id[:8]}" if conversation_id else "all-conversations"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(at))
    return f"step-station-{name}-{stamp}.{EXPORT_EXTENSIONS.get(fmt, 'json')}"


def used_tokens(messages: Sequence[hist.Message]) -> int | None:
    """How much of the context the conversation fills: the last reply's prompt plus its answer
    (the prompt already holds everything before it); None before any counted reply."""
    for message in reversed(messages):
        if message.role == "assistant" and message.meta.get("prompt_tokens") is not None:
            return int(message.meta["prompt_tokens"]) + int(
                message.meta.get("completion_tokens") or 0
            )
    return None


def discard_uploads(files: Sequence[Path], uploads: Path, keep: Path) -> None:
    """Delete the UI's copies of a message's uploads once the message is stored (its images live
    in the history now), so they do not pile up. Only files inside `uploads` are touched, never
    those inside `keep` (the chat's own image cache, where a message put back by Undo points)."""
    uploads, keep = uploads.resolve(), keep.resolve()
    for file in files:
        path = file.resolve()
        if not path.is_relative_to(uploads) or path.is_relative_to(keep):
            continue
        path.unlink(missing_ok=True)
        folder = path.parent  # Gradio keeps each upload in a folder named by its hash
        if folder != uploads and folder.is_relative_to(uploads):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty


@dataclass(frozen=True)
class HistoryList:
    """The conversation list: (title, id) choices, and the one selected if it is listed."""

    choices: list[tuple[str, str]]
    value: str | None


@dataclass(frozen=True)
class Opened:
    """A conversation to show: None (an empty new chat) when the id is unknown or gone."""

    conversation_id: str | None
    title: str
    messages: list[hist.Message]


@dataclass(frozen=True)
class Finished:
    """After a reply ended or was stopped: whether to redraw the chat and what to say."""

    redraw: bool
    note: str = ""


BannerKey = tuple[bool, str, str]


@dataclass(frozen=True)
class Banner:
    """The "model not running" banner: shown with `text`, or hidden; `key` is what the page
    remembers so the next poll can leave an unchanged banner alone."""

    visible: bool
    text: str
    key: BannerKey


class ChatController:
    """What the chat tab's controls do, around the chat service."""

    def __init__(
        self,
        service: ChatService,
        *,
        exports: Callable[[], Path] = export_folder,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.history = service.history
        self.exports = exports
        self.clock = clock

    # ------------------------------------------------------------------------------ showing

    def messages(self, conversation_id: str | None) -> list[hist.Message]:
        if not conversation_id:
            return []
        return self.history.get_conversation(conversation_id).messages

    def history_list(self, query: str, selected: str | None) -> HistoryList:
        choices = [(s.title, s.id) for s in self.history.list_conversations(query or "")]
        value = selected if selected in {c[1] for c in choices} else None
        return HistoryList(choices, value)

    async def context(self, conversation_id: str | None) -> tuple[int | None, int | None]:
        """(the served context length, the tokens this conversation fills); None: unknown."""
        try:
            length = await self.service.context_length()
        except ApplianceError:
            length = None
        return length, used_tokens(self.messages(conversation_id))

    def open(self, conversation_id: str | None) -> Opened:
        """The conversation behind a link or a click; one deleted meanwhile opens an empty chat."""
        if not conversation_id:
            return Opened(None, "", [])
        try:
            conversation = self.history.get_conversation(conversation_id)
        except ApplianceError:
            return Opened(None, "", [])
        return Opened(conversation_id, conversation.title, conversation.messages)

    def banner(self, seen: BannerKey | None) -> Banner | None:
        """The engine banner; None when it is the one the page already shows."""
        view = self.service.engine()
        key = (view.ready, view.label, view.message)
        if key == seen:
            return None
        if view.ready:
            return Banner(False, "", key)
        return Banner(True, view.not_ready_text(), key)

    # ------------------------------------------------------------------------------ sending

    @staticmethod
    def options(
        level: str, system: str, temperature: float, top_p: float, max_tokens: float | None
    ) -> chat.SamplingOptions:
        """The Advanced panel as sampling options (raises for a value out of range)."""
        return chat.SamplingOptions(
            reasoning_effort=level,
            temperature=float(temperature),
            top_p=float(top_p),
            max_tokens=int(max_tokens or 0),
            system_prompt=system or "",
        )

    async def submit(
        self,
        conversation_id: str | None,
        text: str,
        files: Sequence[Path],
        options: chat.SamplingOptions,
    ) -> UserTurn:
        """Check and store a message (a new conversation when none is open)."""
        return await self.service.submit(conversation_id, text, list(files), options)

    def next_position(self, conversation_id: str) -> int:
        """Where the reply about to stream lands in the conversation."""
        return len(self.messages(conversation_id))

    async def finished(self, conversation_id: str | None) -> Finished:
        """After a reply ended, or was cancelled by Stop. A finished reply is already on screen
        (re-sending a long chat would only make the browser render it again); a stopped one is
        shown as saved; anything else (nothing saved, a failure) is redrawn from the history."""
        last = None
        if conversation_id:
            await self.service.settled(conversation_id)
            messages = self.messages(conversation_id)
            last = messages[-1] if messages else None
        if last is not None and last.role == "assistant" and last.status != hist.STOPPED:
            return Finished(redraw=False)
        stopped = last is not None and last.status == hist.STOPPED
        return Finished(redraw=True, note=STOPPED_NOTE if stopped else "")

    def retry(self, conversation_id: str | None) -> None:
        """Drop the last reply so it can be generated again."""
        if not conversation_id:
            raise BadInputError("There is nothing to regenerate yet.")
        self.service.prepare_regenerate(conversation_id)

    async def edit(
        self,
        conversation_id: str | None,
        index: int,
        value: object,
        positions: Sequence[int],
        kinds: Sequence[str],
        options: chat.SamplingOptions,
    ) -> None:
        """Replace the text of the shown message at `index` (one of the owner's own) and drop
        everything after it; the reply is generated again after this."""
        if not conversation_id or index >= len(positions) or kinds[index] != "text":
            raise BadInputError(NOT_EDITABLE)
        text = value if isinstance(value, str) else str(value or "")
        await self.service.prepare_edit(conversation_id, positions[index], text, options)

    def undo(self, conversation_id: str | None) -> hist.Message | None:
        """Remove the last message and its reply; the message goes back into the input box."""
        if not conversation_id:
            return None
        return self.service.undo(conversation_id)

    # ------------------------------------------------------------------------------ managing

    def rename(self, conversation_id: str | None, title: str) -> None:
        if not conversation_id:
            raise BadInputError("Open a conversation first.")
        self.history.rename(conversation_id, title)

    def delete(self, conversation_id: str | None) -> None:
        if conversation_id:
            self.history.delete(conversation_id)

    def export(self, conversation_id: str | None, fmt: str, *, everything: bool) -> Path:
        """Write this conversation (or all of them) as JSON or Markdown into a private file."""
        if not everything and not conversation_id:
            raise BadInputError("Open a conversation first, or use Export all.")
        which = None if everything else conversation_id
        markdown = fmt == "Markdown"
        text = self.history.export_markdown(which) if markdown else self.history.export_json(which)
        path = private_dir(self.exports()) / export_name(which, fmt, self.clock())
        write_private(path, text)  # 0600: an export is the whole chat
        return path
