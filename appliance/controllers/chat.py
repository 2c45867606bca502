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
from appliance.chat import presets as pre
from appliance.chat.service import ChatService, UserTurn
from appliance.errors import ApplianceError, BadInputError
from appliance.settings import cache_dir, private_dir, write_private

EXPORT_EXTENSIONS = {"JSON": "json", "Markdown": "md"}
STOPPED_NOTE = "Stopped: the engine ended the request."
NOT_EDITABLE = "Only the text of your own messages can be edited."
MAX_IMPORT_BYTES = 512 * 1024 * 1024  # an export with many images is big; more is not one


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
class Chosen:
    """The preset a conversation was last sent with and its values as sent (for a new chat or
    one never sent: the built-in preset's); `presets` are every preset's names, to pick from."""

    preset: str
    options: chat.SamplingOptions
    presets: list[str]


@dataclass(frozen=True)
class BranchPoint:
    """A message on the shown path that has other versions: `version` of `versions`."""

    position: int
    role: str
    version: int
    versions: int

    @property
    def label(self) -> str:
        who = "your message" if self.role == "user" else "reply"
        return f"Message {self.position + 1} ({who}): {self.version}/{self.versions}"


def branch_points(messages: Sequence[hist.Message]) -> list[BranchPoint]:
    return [
        BranchPoint(m.position, m.role, m.version, m.versions) for m in messages if m.versions > 1
    ]


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
        self.presets = pre.Presets(self.history, pre.from_settings(service.settings.chat))

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
        restored = False
        if conversation_id:
            await self.service.settled(conversation_id)
            with contextlib.suppress(BadInputError):  # deleted meanwhile
                restored = self.history.restore_path(conversation_id)
            messages = self.messages(conversation_id) if not restored else []
            last = messages[-1] if messages else None
        if restored:
            return Finished(redraw=True)
        # A regenerated reply is redrawn once: its stats line then says which version it is.
        settled = last is not None and last.role == "assistant" and last.status != hist.STOPPED
        if settled and last is not None and last.versions == 1:
            return Finished(redraw=False)
        stopped = last is not None and last.status == hist.STOPPED
        return Finished(redraw=True, note=STOPPED_NOTE if stopped else "")

    def retry(self, conversation_id: str | None) -> None:
        """Set the last reply aside (it stays as a version) so it can be generated again."""
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
        """A new version of the shown message at `index` (one of the owner's own): the old one
        and everything after it stay as the earlier version; the reply is generated again."""
        if not conversation_id or index >= len(positions) or kinds[index] != "text":
            raise BadInputError(NOT_EDITABLE)
        text = value if isinstance(value, str) else str(value or "")
        await self.service.prepare_edit(conversation_id, positions[index], text, options)

    def undo(self, conversation_id: str | None) -> hist.Message | None:
        """Delete the last message of the shown path and its reply (not kept as a version: undo
        takes it back); the message goes back into the input box."""
        if not conversation_id:
            return None
        return self.service.undo(conversation_id)

    # ---------------------------------------------------------------------------- versions

    def branch_points(self, conversation_id: str | None) -> list[BranchPoint]:
        """The shown path's messages that have other versions (edited, regenerated)."""
        return branch_points(self.messages(conversation_id))

    def switch_version(self, conversation_id: str | None, position: int, step: int) -> None:
        """Show the version before (`step` -1) or after (+1) of the message at `position`."""
        if not conversation_id:
            raise BadInputError("Open a conversation first.")
        if not self.history.switch_version(conversation_id, position, step):
            raise BadInputError("There is no other version that way.")

    # ----------------------------------------------------------------------------- presets

    def chosen(self, conversation_id: str | None) -> Chosen:
        """What the preset picker and the Advanced fold show for a conversation."""
        names = [p.name for p in self.presets.list()]
        settings: dict[str, object] = {}
        if conversation_id:
            with contextlib.suppress(ApplianceError):
                settings = self.history.get_conversation(conversation_id).settings
        if settings:
            preset = self.presets.find(str(settings.get("preset") or ""))
            try:
                options = chat.SamplingOptions(
                    reasoning_effort=str(settings["reasoning_effort"]),
                    temperature=float(str(settings["temperature"])),
                    top_p=float(str(settings["top_p"])),
                    max_tokens=int(str(settings["max_tokens"])),
                    system_prompt=str(settings.get("system_prompt") or ""),
                )
            except (KeyError, ValueError, BadInputError):
                options = (preset or self.presets.default()).options()
            return Chosen(preset.name if preset else names[0], options, names)
        default = self.presets.default()
        return Chosen(default.name, default.options(), names)

    def preset(self, name: str | None) -> pre.Preset:
        """The preset picked (the built-in one when it is gone)."""
        return self.presets.get(name)

    def save_preset(self, name: str | None, options: chat.SamplingOptions) -> pre.Preset:
        """Save the Advanced fold's values into the preset picked."""
        return self.presets.save(self.presets.get(name).name, options)

    def create_preset(self, name: str, options: chat.SamplingOptions) -> pre.Preset:
        """A new preset from the Advanced fold's values."""
        return self.presets.create(name, options)

    def remember(
        self, conversation_id: str | None, preset: str | None, options: chat.SamplingOptions
    ) -> None:
        """Store with the conversation the preset and the values its message was sent with."""
        if not conversation_id:
            return
        found = self.presets.find(preset)
        with contextlib.suppress(BadInputError):  # deleted meanwhile: nothing to remember
            self.history.set_settings(
                conversation_id, found.id if found else None, pre.sent_settings(found, options)
            )

    # ------------------------------------------------------------------------------ search

    def search(self, query: str) -> list[hist.SearchHit]:
        """Conversations whose title or messages hold the words, with highlighted snippets."""
        return self.history.search(query) if query.strip() else []

    # ------------------------------------------------------------------------------ managing

    def rename(self, conversation_id: str | None, title: str) -> None:
        if not conversation_id:
            raise BadInputError("Open a conversation first.")
        self.history.rename(conversation_id, title)

    def delete(self, conversation_id: str | None) -> None:
        if conversation_id:
            self.history.delete(conversation_id)

    def import_file(self, path: Path) -> list[str]:
        """Add the conversations of a JSON export file; their ids (all or nothing)."""
        try:
            size = path.stat().st_size
            if size > MAX_IMPORT_BYTES:
                raise BadInputError(
                    f"{path.name} is {size / 1e6:,.0f} MB; an import may be at most "
                    f"{MAX_IMPORT_BYTES / 1e6:,.0f} MB.",
                    hint="Export fewer conversations at a time. Nothing was imported.",
                )
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise BadInputError(
                f"{path.name} could not be read as a text file ({err}).",
                hint="Import a file made by Export (JSON). Nothing was imported.",
            ) from err
        return self.history.import_json(text)

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
