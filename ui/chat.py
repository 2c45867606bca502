"""The chat tab: layout and wiring only.

What each action does is `appliance.controllers.chat.ChatController`'s (around the chat service:
checks, history, streaming); the messages are built by `ui.chat_render`. Errors from the appliance
become `gr.Error`/`gr.Warning` here, and a refused message stays in the input box.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from gradio import utils as gr_utils

from appliance.chat import client as chat
from appliance.chat import documents as docs
from appliance.chat import history as hist
from appliance.controllers.chat import ChatController, discard_uploads
from appliance.controllers.chat import export_folder as export_folder  # app.py serves it
from appliance.errors import ApplianceError
from appliance.services import Services
from appliance.settings import Settings
from ui import chat_render as render
from ui.polling import poll_while_visible

PANEL = "ss-chat"  # the chat's layout row: its visibility switches the engine banner's timer
ENGINE_POLL_S = 2.0

LATEX: list[dict[str, str | bool]] = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\[", "right": "\\]", "display": True},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "$", "right": "$", "display": False},
]

CSS = """
#chat-column .reply-stats { font-size: 0.8em; opacity: 0.7; margin-top: 0.4em; }
#chat-live { min-height: 1.4em; font-size: 0.85em; opacity: 0.8; }
#chat-context { font-size: 0.85em; opacity: 0.8; }
#engine-banner { border-left: 4px solid var(--color-accent); padding-left: 0.6em; }
#history-list { max-height: 60vh; overflow-y: auto; }
#search-results { max-height: 40vh; overflow-y: auto; font-size: 0.85em; }
#search-results .search-hit { margin-bottom: 0.6em; }
#search-results .search-title { font-weight: 600; }
#search-results .search-snippet { opacity: 0.85; white-space: pre-wrap; }
#versions { align-items: center; }
#version-count { text-align: center; }
#chatbot .user-row img { max-height: 160px !important; width: auto !important;
  object-fit: contain; }
#chatbot .user-row .image-container { width: auto !important; height: auto !important; }
#chatbot .doc-chip, #chat-attachments .doc-chip { display: inline-block; font-size: 0.85em;
  padding: 0.15em 0.7em; border: 1px solid var(--border-color-primary); border-radius: 999px; }
#chat-attachments .doc-problem { border-color: var(--error-border-color); }
"""

# Defence in depth behind chat_render.block_remote_images: the page itself may load images and
# media only from the UI's own origin (and data:/blob: URLs, e.g. uploads' previews), so nothing
# a reply contains can make the browser fetch from another host.
HEAD = (
    '<meta http-equiv="Content-Security-Policy" '
    "content=\"img-src 'self' data: blob:; media-src 'self' data: blob:\">"
)


def max_upload_bytes(settings: Settings) -> int:
    """Gradio refuses (413) an upload over the larger of the chat's image limit and the PDF
    limit before it is stored; a text file under it but too big is refused with its token
    numbers, unread (appliance/chat/documents.py)."""
    return max(int(settings.chat.max_image_mb * 1024 * 1024), docs.MAX_UPLOAD_BYTES)


def image_folder() -> Path:
    """Where stored images become files the page can show: inside Gradio's own cache, so
    streaming updates do not copy or re-hash them on every frame."""
    return Path(gr_utils.get_upload_folder()) / "step-station-chat"


def _discard_uploads(files: list[Path]) -> None:
    """Gradio's copies of a stored message's uploads go; the chat's own image cache stays."""
    discard_uploads(files, Path(gr_utils.get_upload_folder()), image_folder())


def _image_path(image: hist.StoredImage) -> Path:
    return render.image_file(image, image_folder())


def _busy_box() -> Any:
    return gr.MultimodalTextbox(value=None, submit_btn=False, stop_btn=True)


def _idle_box(value: Any = None) -> Any:
    """Back to Send. Without a value, whatever the owner typed meanwhile stays in the box."""
    if value is None:
        return gr.MultimodalTextbox(submit_btn=True, stop_btn=False)
    return gr.MultimodalTextbox(value=value, submit_btn=True, stop_btn=False)


class _Handlers:
    """The tab's event handlers: each asks the controller, then maps its answer to the outputs
    the wiring in `build` lists (messages rendered by `ui.chat_render`)."""

    def __init__(self, controller: ChatController) -> None:
        self.ctl = controller

    # ---------------------------------------------------------------------------- helpers

    def rendered(self, conversation_id: str | None) -> render.Rendered:
        if not conversation_id:
            return render.Rendered()
        return render.render_messages(self.ctl.messages(conversation_id), _image_path)

    def list_update(self, query: str, selected: str | None) -> Any:
        listed = self.ctl.history_list(query, selected)
        return gr.Radio(choices=listed.choices, value=listed.value)

    async def context_text(self, conversation_id: str | None) -> str:
        return render.context_line(*await self.ctl.context(conversation_id))

    @staticmethod
    def options(lvl: str, system: str, temp: float, tp: float, mx: float | None) -> Any:
        try:
            return ChatController.options(lvl, system, temp, tp, mx)
        except ApplianceError as err:
            raise gr.Error(str(err)) from err

    def view(self, conversation_id: str | None) -> tuple[Any, Any, Any]:
        shown = self.rendered(conversation_id)
        return shown.messages, shown.positions, shown.kinds

    # ---------------------------------------------------------------------------- sending

    async def on_submit(
        self,
        message: dict[str, Any] | None,
        conversation_id: str | None,
        lvl: str,
        system: str,
        temp: float,
        tp: float,
        mx: float | None,
    ) -> str:
        """Check and store the message. Its only output is the (invisible) conversation id, so
        a refusal shows as a toast and leaves the chat and the input box as they were."""
        message = message or {}
        files = [Path(f) for f in message.get("files") or []]
        opts = self.options(lvl, system, temp, tp, mx)
        try:
            text = str(message.get("text") or "")
            turn = await self.ctl.submit(conversation_id, text, files, opts)
        except ApplianceError as err:
            # The refused message stays in the box with its attachments (to fix and resend);
            # what is never sent is removed at the next start (settings.private_runtime).
            raise gr.Error(str(err), title="Not sent", print_exception=False) from err
        _discard_uploads(files)
        return str(turn.conversation_id)

    def on_sent(self, conversation_id: str, lvl: str, query: str) -> tuple[Any, ...]:
        view = self.rendered(conversation_id)
        waiting = {
            "role": "assistant",
            "content": "",
            "metadata": {"title": f"Waiting · level {lvl}", "status": "pending"},
        }
        return (
            _busy_box(),
            [*view.messages, waiting],
            view.positions,
            view.kinds,
            self.list_update(query, conversation_id),
            "Sending…",
        )

    async def on_respond(
        self,
        conversation_id: str | None,
        lvl: str,
        system: str,
        temp: float,
        tp: float,
        mx: float | None,
    ) -> AsyncIterator[Any]:
        if not conversation_id:
            return
        opts = self.options(lvl, system, temp, tp, mx)
        base = self.rendered(conversation_id)
        position = self.ctl.next_position(conversation_id)
        updates = self.ctl.service.respond(conversation_id, opts)
        try:
            async for reply in updates:
                view = render.Rendered(list(base.messages), list(base.positions), list(base.kinds))
                render.render_live_reply(view, position, reply)
                yield view.messages, view.positions, view.kinds, render.live_stats(reply), gr.skip()
        except ApplianceError as err:
            gr.Warning(str(err), title="Not sent")
        finally:
            await updates.aclose()
        # The last update above already showed the finished reply; only the context line moves.
        yield gr.skip(), gr.skip(), gr.skip(), "", await self.context_text(conversation_id)

    async def respond_if(self, ok: bool, *args: Any) -> AsyncIterator[Any]:
        """After an edit: answer only when the edit was taken."""
        if not ok:
            return
        async for update in self.on_respond(*args):
            yield update

    async def on_finished(self, conversation_id: str | None, query: str) -> tuple[Any, ...]:
        """After a reply ended, or was cancelled by Stop (Gradio runs `.then` after a cancel)."""
        done = await self.ctl.finished(conversation_id)
        if not done.redraw:
            return _idle_box(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return (
            _idle_box(),
            *self.view(conversation_id),
            done.note,
            self.list_update(query, conversation_id),
        )

    def on_retry(self, conversation_id: str | None) -> tuple[Any, ...]:
        try:
            self.ctl.retry(conversation_id)
        except ApplianceError as err:
            raise gr.Error(str(err), print_exception=False) from err
        return _busy_box(), *self.view(conversation_id)

    async def on_edit(
        self,
        data: gr.EditData,
        conversation_id: str | None,
        shown_positions: list[int],
        shown_kinds: list[str],
        lvl: str,
        system: str,
        temp: float,
        tp: float,
        mx: float | None,
    ) -> tuple[Any, ...]:
        index = data.index if isinstance(data.index, int) else data.index[0]
        opts = self.options(lvl, system, temp, tp, mx)
        try:
            await self.ctl.edit(
                conversation_id, index, data.value, shown_positions, shown_kinds, opts
            )
        except ApplianceError as err:
            gr.Warning(str(err))
            return _idle_box(), *self.view(conversation_id), False
        return _busy_box(), *self.view(conversation_id), True

    def on_undo(self, conversation_id: str | None) -> tuple[Any, ...]:
        removed = self.ctl.undo(conversation_id)
        box = None
        if removed is not None:
            box = {
                "text": removed.content,
                "files": [str(_image_path(i)) for i in removed.images]
                + [str(render.document_file(d, image_folder())) for d in docs.stored_in(removed)],
            }
        return _idle_box(box), *self.view(conversation_id)

    async def on_attachments(self, message: dict[str, Any] | None) -> str:
        """Chips for the documents in the input box, with their token counts."""
        files = [Path(f) for f in (message or {}).get("files") or []]
        return render.attachment_chips(await self.ctl.service.preview_documents(files))

    # --------------------------------------------------------------------------- managing

    async def on_open(self, conversation_id: str | None, query: str) -> tuple[Any, ...]:
        """Show a conversation, with the preset and settings it was last sent with and its
        versions bar."""
        opened = self.ctl.open(conversation_id)
        view = render.render_messages(opened.messages, _image_path)
        return (
            opened.conversation_id,
            view.messages,
            view.positions,
            view.kinds,
            opened.title,
            self.list_update(query, opened.conversation_id),
            await self.context_text(opened.conversation_id),
            "",
            *self.chosen(opened.conversation_id),
            *self.versions_bar(opened.conversation_id, None),
        )

    # ------------------------------------------------------------------- presets, versions

    def chosen(self, conversation_id: str | None) -> tuple[Any, ...]:
        """The preset picker and the sampling fields for a conversation (or a new chat)."""
        chosen = self.ctl.chosen(conversation_id)
        o = chosen.options
        picker = gr.Dropdown(choices=chosen.presets, value=chosen.preset)
        return picker, o.reasoning_effort, o.system_prompt, o.temperature, o.top_p, o.max_tokens

    def on_preset(self, name: str) -> tuple[Any, ...]:
        """A preset picked: its values into the level and the Advanced fold."""
        o = self.ctl.preset(name).options()
        return o.reasoning_effort, o.system_prompt, o.temperature, o.top_p, o.max_tokens

    def on_save_preset(
        self, name: str, lvl: str, system: str, temp: float, tp: float, mx: float | None
    ) -> None:
        try:
            saved = self.ctl.save_preset(name, self.options(lvl, system, temp, tp, mx))
        except ApplianceError as err:
            raise gr.Error(str(err), print_exception=False) from err
        gr.Info(f"Preset {saved.name!r} saved.")

    def on_new_preset(
        self, new_name: str, lvl: str, system: str, temp: float, tp: float, mx: float | None
    ) -> tuple[Any, Any]:
        try:
            made = self.ctl.create_preset(new_name, self.options(lvl, system, temp, tp, mx))
        except ApplianceError as err:
            raise gr.Error(str(err), print_exception=False) from err
        names = [p.name for p in self.ctl.presets.list()]
        return gr.Dropdown(choices=names, value=made.name), ""

    def on_remember(
        self,
        conversation_id: str | None,
        preset: str,
        lvl: str,
        system: str,
        temp: float,
        tp: float,
        mx: float | None,
    ) -> None:
        """After a message was taken: the conversation keeps its preset and settings."""
        try:
            options = ChatController.options(lvl, system, temp, tp, mx)
        except ApplianceError:
            return  # the send itself was refused for it, with a message
        self.ctl.remember(conversation_id, preset, options)

    def versions_bar(self, conversation_id: str | None, selected: str | None) -> tuple[Any, ...]:
        """The `< 2/3 >` bar: hidden unless a shown message has other versions; it pages the
        one picked (the last such message unless another is picked)."""
        points = self.ctl.branch_points(conversation_id) if conversation_id else []
        if not points:
            return gr.Row(visible=False), gr.Dropdown(choices=[], value=None), ""
        point = next((p for p in points if str(p.position) == str(selected)), points[-1])
        picker = gr.Dropdown(
            choices=[(p.label, str(p.position)) for p in points], value=str(point.position)
        )
        return gr.Row(visible=True), picker, f"{point.version}/{point.versions}"

    def latest_versions(self, conversation_id: str | None) -> tuple[Any, ...]:
        """The bar after the chat changed: it pages the last message with versions (the one a
        regenerate or an edit just made)."""
        return self.versions_bar(conversation_id, None)

    def on_version(self, conversation_id: str | None, selected: str, step: int) -> tuple[Any, ...]:
        try:
            self.ctl.switch_version(conversation_id, int(selected or -1), step)
        except (ApplianceError, ValueError) as err:
            gr.Warning(str(err))
        return *self.view(conversation_id), *self.versions_bar(conversation_id, selected)

    def on_version_before(self, conversation_id: str | None, selected: str) -> tuple[Any, ...]:
        return self.on_version(conversation_id, selected, -1)

    def on_version_after(self, conversation_id: str | None, selected: str) -> tuple[Any, ...]:
        return self.on_version(conversation_id, selected, +1)

    def on_search(self, query: str, selected: str | None) -> tuple[Any, Any]:
        """The list narrowed to matching conversations, and the snippets that matched."""
        return self.list_update(query, selected), render.search_results(self.ctl.search(query))

    async def on_import(self, upload: Any, query: str) -> tuple[Any, ...]:
        """Import a JSON export and open the (last) conversation it held."""
        path = Path(upload if isinstance(upload, str) else getattr(upload, "name", ""))
        try:
            added = self.ctl.import_file(path)
        except ApplianceError as err:
            raise gr.Error(str(err), title="Not imported", print_exception=False) from err
        finally:
            _discard_uploads([path])
        gr.Info(f"Imported {len(added)} conversation{'s' if len(added) != 1 else ''}.")
        return await self.on_open(added[-1] if added else None, query)

    def on_new(self, query: str) -> tuple[Any, ...]:
        return None, [], [], [], "", self.list_update(query, None), "", _idle_box()

    def on_rename(self, conversation_id: str | None, title: str, query: str) -> Any:
        try:
            self.ctl.rename(conversation_id, title)
        except ApplianceError as err:
            gr.Warning(str(err))
            return gr.skip()
        return self.list_update(query, conversation_id)

    def on_delete(self, conversation_id: str | None, query: str) -> tuple[Any, ...]:
        self.ctl.delete(conversation_id)
        return (None, [], [], [], "", self.list_update(query, None), gr.Row(visible=False))

    def on_export(self, conversation_id: str | None, fmt: str, everything: bool) -> Any:
        try:
            path = self.ctl.export(conversation_id, fmt, everything=everything)
        except ApplianceError as err:
            raise gr.Error(str(err)) from err
        return gr.File(value=str(path), visible=True)

    def export_one(self, conversation_id: str | None, fmt: str) -> Any:
        return self.on_export(conversation_id, fmt, everything=False)

    def export_all(self, conversation_id: str | None, fmt: str) -> Any:
        return self.on_export(conversation_id, fmt, everything=True)

    def on_engine(self, seen: Any) -> tuple[Any, ...]:
        banner = self.ctl.banner(tuple(seen) if seen else None)
        if banner is None:
            return gr.skip(), gr.skip(), gr.skip()
        if not banner.visible:
            return gr.Row(visible=False), gr.skip(), banner.key
        return gr.Row(visible=True), banner.text, banner.key

    async def on_load(self, query: str, seen: Any, request: gr.Request) -> tuple[Any, ...]:
        conversation_id = request.query_params.get("c") or None
        return (*await self.on_open(conversation_id, query), *self.on_engine(seen))


@dataclass
class ChatTab:
    """What app.py needs to finish the wiring (page load, the link to the Model tab)."""

    go_to_model: gr.Button
    on_load: Any
    load_inputs: list[Any]
    load_outputs: list[Any]


def build(services: Services) -> ChatTab:
    """Create the chat tab's widgets inside the current gr.Tab and wire them to the controller."""
    h = _Handlers(ChatController(services.chat))
    cfg = services.settings.chat
    max_images = services.settings.engine.max_images_per_prompt
    start = h.ctl.chosen(None)  # the built-in preset until a conversation is opened

    # ------------------------------------------------------------------------------- layout
    # The open conversation's id. It is mirrored into the page's URL (`?c=ID`), so a reload, a
    # bookmark or a second tab opens the same conversation.
    conversation = gr.Textbox(visible=False, elem_id="conversation-id")
    positions = gr.State([])
    kinds = gr.State([])
    engine_seen = gr.State(None)

    with gr.Row(equal_height=False, elem_id=f"{PANEL}-panel"):
        with gr.Column(scale=1, min_width=220, elem_id="history-column"):
            new_chat = gr.Button("New chat", variant="primary", size="sm", elem_id="new-chat")
            search = gr.Textbox(
                placeholder="Search titles and messages",
                show_label=False,
                container=False,
                elem_id="search",
            )
            search_results = gr.HTML("", elem_id="search-results")
            history_list = gr.Radio(
                choices=[], label="Conversations", elem_id="history-list", interactive=True
            )
            with gr.Accordion("This conversation", open=False, elem_id="manage"):
                title_box = gr.Textbox(label="Title", elem_id="title-box")
                rename = gr.Button("Rename", size="sm", elem_id="rename")
                delete = gr.Button("Delete…", size="sm", variant="stop", elem_id="delete")
                with gr.Row(visible=False) as confirm_row:
                    confirm_delete = gr.Button(
                        "Delete for good", size="sm", variant="stop", elem_id="confirm-delete"
                    )
                    cancel_delete = gr.Button("Keep", size="sm")
                export_format = gr.Radio(
                    ["JSON", "Markdown"], value="JSON", label="Export as", elem_id="export-format"
                )
                with gr.Row():
                    export_one = gr.Button("Export this", size="sm", elem_id="export-one")
                    export_all = gr.Button("Export all", size="sm", elem_id="export-all")
                export_file = gr.File(label="Export", visible=False, elem_id="export-file")
                import_button = gr.UploadButton(
                    "Import JSON…", file_types=[".json"], size="sm", elem_id="import"
                )

        with gr.Column(scale=4, elem_id="chat-column"):
            with gr.Row(visible=False, elem_id="engine-banner") as banner_row:
                banner = gr.Markdown(elem_id="engine-banner-text")
                go_to_model = gr.Button(
                    "Open the Model tab", size="sm", scale=0, elem_id="go-to-model"
                )
            chatbot = gr.Chatbot(
                label="Step-3.7-Flash",
                height="62vh",
                editable="user",
                latex_delimiters=LATEX,
                buttons=["copy", "copy_all"],
                feedback_options=None,
                elem_id="chatbot",
                placeholder="Ask anything. Attach images, PDFs, text, code or CSV files with the "
                "clip, by dragging or pasting.",
            )
            # Versions of edited or regenerated messages: pick the message, page `< 2/3 >`.
            with gr.Row(visible=False, elem_id="versions") as versions_row:
                version_point = gr.Dropdown(
                    choices=[], show_label=False, container=False, scale=3, elem_id="version-point"
                )
                version_before = gr.Button("‹", size="sm", scale=0, elem_id="version-before")
                version_count = gr.Markdown("", elem_id="version-count")
                version_after = gr.Button("›", size="sm", scale=0, elem_id="version-after")
            live = gr.Markdown("", elem_id="chat-live")
            with gr.Row(equal_height=True):
                textbox = gr.MultimodalTextbox(
                    file_count="multiple",
                    file_types=docs.FILE_TYPES,  # checked again on the server
                    sources=["upload"],
                    placeholder=f"Message Step-3.7-Flash (up to {max_images} images, "
                    f"{cfg.max_image_mb} MB each; PDF, text, code, CSV)",
                    show_label=False,
                    submit_btn=True,
                    stop_btn=False,
                    scale=5,
                    max_lines=12,
                    # Gradio turns pasted text over 1,000 characters into a .txt attachment,
                    # which is not an image: keep pasted text as text.
                    max_plain_text_length=10_000_000,
                    elem_id="chat-input",
                )
                level = gr.Radio(
                    list(chat.REASONING_LEVELS),
                    value=start.options.reasoning_effort,
                    label="Reasoning",
                    scale=0,
                    min_width=300,
                    elem_id="reasoning-level",
                )
                preset = gr.Dropdown(
                    choices=start.presets,
                    value=start.preset,
                    label="Preset",
                    scale=0,
                    min_width=180,
                    elem_id="preset",
                )
            # The documents in the input box as chips with their tokens; `attached` mirrors the
            # box's file list in the browser, so typing never calls the server for them.
            attached = gr.Textbox(visible=False, elem_id="attached-files")
            attachments_md = gr.Markdown("", elem_id="chat-attachments")
            context_md = gr.Markdown(render.context_line(None, None), elem_id="chat-context")
            with gr.Accordion("Advanced", open=False, elem_id="advanced"):
                system_prompt = gr.Textbox(
                    start.options.system_prompt,
                    label="System prompt",
                    lines=2,
                    elem_id="system-prompt",
                )
                with gr.Row():
                    temperature = gr.Slider(
                        0.0, 2.0, value=start.options.temperature, step=0.05, label="Temperature"
                    )
                    top_p = gr.Slider(
                        0.05, 1.0, value=start.options.top_p, step=0.01, label="top_p"
                    )
                    max_tokens = gr.Number(
                        start.options.max_tokens,
                        label="Max tokens (0: as many as fit)",
                        precision=0,
                        minimum=0,
                        elem_id="max-tokens",
                    )
                # The level and these fields edit the preset picked above when saved into it.
                with gr.Row(equal_height=True):
                    save_preset = gr.Button(
                        "Save to this preset", size="sm", scale=0, elem_id="preset-save"
                    )
                    preset_name = gr.Textbox(
                        placeholder="New preset name",
                        show_label=False,
                        container=False,
                        elem_id="preset-name",
                    )
                    new_preset = gr.Button(
                        "Save as new preset", size="sm", scale=0, elem_id="preset-new"
                    )
    sampling = [level, system_prompt, temperature, top_p, max_tokens]

    # ----------------------------------------------------------------------------- wiring
    stream_outputs = [chatbot, positions, kinds, live, context_md]
    versions_outputs = [versions_row, version_point, version_count]
    # A message taken (sent, regenerated, edited): its conversation keeps the preset and values.
    remember_inputs = [conversation, preset, *sampling]
    chat_events: dict[str, Any] = {"concurrency_limit": None, "show_progress": "hidden"}

    sent = textbox.submit(
        h.on_submit, [textbox, conversation, *sampling], [conversation], **chat_events
    ).success(
        h.on_sent,
        [conversation, level, search],
        [textbox, chatbot, positions, kinds, history_list, live],
        **chat_events,
    )
    sent.success(h.on_remember, remember_inputs, None, show_progress="hidden")
    sent_reply = sent.success(
        h.on_respond, [conversation, *sampling], stream_outputs, **chat_events
    )
    finished_outputs = [textbox, chatbot, positions, kinds, live, history_list]
    sent_reply.then(h.on_finished, [conversation, search], finished_outputs).then(
        h.latest_versions, [conversation], versions_outputs
    )

    retried = chatbot.retry(h.on_retry, [conversation], [textbox, chatbot, positions, kinds])
    retried.success(h.on_remember, remember_inputs, None, show_progress="hidden")
    retry_reply = retried.success(
        h.on_respond, [conversation, *sampling], stream_outputs, **chat_events
    )
    retry_reply.then(h.on_finished, [conversation, search], finished_outputs).then(
        h.latest_versions, [conversation], versions_outputs
    )

    edit_ok = gr.State(False)
    edited = chatbot.edit(
        h.on_edit,
        [conversation, positions, kinds, *sampling],
        [textbox, chatbot, positions, kinds, edit_ok],
    )

    edited.success(h.on_remember, remember_inputs, None, show_progress="hidden")
    edit_reply = edited.success(
        h.respond_if, [edit_ok, conversation, *sampling], stream_outputs, **chat_events
    )
    edit_reply.then(h.on_finished, [conversation, search], finished_outputs).then(
        h.latest_versions, [conversation], versions_outputs
    )

    # Stop cancels the running reply (its task is cancelled, which closes the engine request);
    # the `.then(h.on_finished)` above then shows the saved, `stopped` reply.
    textbox.stop(None, None, None, cancels=[sent_reply, retry_reply, edit_reply])
    textbox.change(
        None,
        [textbox],
        [attached],
        js="(v) => JSON.stringify(((v && v.files) || []).map((f) => f.path || f.url || ''))",
    )
    attached.change(
        h.on_attachments,
        [textbox],
        [attachments_md],
        show_progress="hidden",
        trigger_mode="always_last",
    )
    chatbot.undo(h.on_undo, [conversation], [textbox, chatbot, positions, kinds]).then(
        h.latest_versions, [conversation], versions_outputs
    )
    # The chat's own "Clear" button starts a new conversation; the old one stays in the history.
    chatbot.clear(
        h.on_new,
        [search],
        [conversation, chatbot, positions, kinds, title_box, history_list, live, textbox],
        cancels=[sent_reply, retry_reply, edit_reply],
    ).then(h.latest_versions, [conversation], versions_outputs)

    open_outputs = [
        conversation,
        chatbot,
        positions,
        kinds,
        title_box,
        history_list,
        context_md,
        live,
        preset,
        *sampling,
        *versions_outputs,
    ]
    history_list.input(
        h.on_open,
        [history_list, search],
        open_outputs,
        cancels=[sent_reply, retry_reply, edit_reply],
    )
    # always_last: a search typed while the previous one runs is not dropped.
    search.change(
        h.on_search,
        [search, conversation],
        [history_list, search_results],
        show_progress="hidden",
        trigger_mode="always_last",
    )
    new_chat.click(
        h.on_new,
        [search],
        [conversation, chatbot, positions, kinds, title_box, history_list, live, textbox],
        cancels=[sent_reply, retry_reply, edit_reply],
    ).then(h.latest_versions, [conversation], versions_outputs)
    version_shown = [chatbot, positions, kinds, *versions_outputs]
    version_before.click(h.on_version_before, [conversation, version_point], version_shown)
    version_after.click(h.on_version_after, [conversation, version_point], version_shown)
    version_point.input(h.versions_bar, [conversation, version_point], versions_outputs)
    # `.input`: only the owner's pick loads a preset's values, not a conversation being opened
    # (that shows the values it was sent with).
    preset.input(h.on_preset, [preset], sampling, show_progress="hidden")
    save_preset.click(h.on_save_preset, [preset, *sampling], None)
    new_preset.click(h.on_new_preset, [preset_name, *sampling], [preset, preset_name])
    import_button.upload(
        h.on_import,
        [import_button, search],
        open_outputs,
        cancels=[sent_reply, retry_reply, edit_reply],
    )
    rename.click(h.on_rename, [conversation, title_box, search], [history_list])
    delete.click(lambda: gr.Row(visible=True), None, [confirm_row])
    cancel_delete.click(lambda: gr.Row(visible=False), None, [confirm_row])
    confirm_delete.click(
        h.on_delete,
        [conversation, search],
        [conversation, chatbot, positions, kinds, title_box, history_list, confirm_row],
    ).then(h.latest_versions, [conversation], versions_outputs)
    export_one.click(h.export_one, [conversation, export_format], [export_file])
    export_all.click(h.export_all, [conversation, export_format], [export_file])
    # The engine banner follows the engine while the chat is on screen (issue 16: a page on
    # another tab, or in a background browser tab, sends no polls); shown again, at once.
    engine_timer = gr.Timer(ENGINE_POLL_S, active=False)
    engine_outputs = [banner_row, banner, engine_seen]
    engine_timer.tick(h.on_engine, [engine_seen], engine_outputs, show_progress="hidden")
    poll_while_visible(PANEL, [engine_timer], h.on_engine, [engine_seen], engine_outputs)

    conversation.change(
        None,
        [conversation],
        None,
        js="(c) => { const u = new URL(window.location.href); "
        "if (c) { u.searchParams.set('c', c); } else { u.searchParams.delete('c'); } "
        "window.history.replaceState(null, '', u); return []; }",
    )

    return ChatTab(
        go_to_model=go_to_model,
        on_load=h.on_load,
        load_inputs=[search, engine_seen],
        load_outputs=[*open_outputs, banner_row, banner, engine_seen],
    )
