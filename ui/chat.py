"""The chat tab: layout and wiring only.

The flow lives in `appliance.chat.service.ChatService` (checks, history, streaming); the
messages are built by `ui.chat_render`. Errors from the appliance become `gr.Error` here, and a
refused message stays in the input box.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from gradio import utils as gr_utils

from appliance.chat import client as chat
from appliance.chat import history as hist
from appliance.errors import ApplianceError, BadInputError
from appliance.services import Services
from appliance.settings import cache_dir, private_dir, write_private
from ui import chat_render as render

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
#chatbot .user-row img { max-height: 160px !important; width: auto !important;
  object-fit: contain; }
#chatbot .user-row .image-container { width: auto !important; height: auto !important; }
"""

# Defence in depth behind chat_render.block_remote_images: the page itself may load images and
# media only from the UI's own origin (and data:/blob: URLs, e.g. uploads' previews), so nothing
# a reply contains can make the browser fetch from another host.
HEAD = (
    '<meta http-equiv="Content-Security-Policy" '
    "content=\"img-src 'self' data: blob:; media-src 'self' data: blob:\">"
)


def max_upload_bytes(settings: Any) -> int:
    """Gradio refuses (413) an upload over the chat's image limit before it is stored."""
    return int(settings.chat.max_image_mb * 1024 * 1024)


def image_folder() -> Path:
    """Where stored images become files the page can show: inside Gradio's own cache, so
    streaming updates do not copy or re-hash them on every frame."""
    return Path(gr_utils.get_upload_folder()) / "step-station-chat"


def export_folder() -> Path:
    return cache_dir() / "exports"


def discard_uploads(files: list[Path]) -> None:
    """Delete Gradio's copies of a message's uploads once the message is stored (its images live
    in the history now): uploaded files do not pile up in Gradio's temporary folder. Only files
    inside that folder are touched, never the chat's own image cache (a message put back in the
    box by Undo points there)."""
    uploads = Path(gr_utils.get_upload_folder()).resolve()
    images = image_folder().resolve()
    for file in files:
        path = file.resolve()
        if not path.is_relative_to(uploads) or path.is_relative_to(images):
            continue
        path.unlink(missing_ok=True)
        folder = path.parent  # Gradio keeps each upload in a folder named by its hash
        if folder != uploads and folder.is_relative_to(uploads):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty


@dataclass
class ChatTab:
    """What app.py needs to finish the wiring (page load, the link to the Model tab)."""

    go_to_model: gr.Button
    on_load: Any
    load_inputs: list[Any]
    load_outputs: list[Any]


def build(services: Services) -> ChatTab:  # noqa: C901 - layout and handlers: issue 13 item 3
    """Create the chat tab's widgets inside the current gr.Tab and wire them to services.chat."""
    svc = services.chat
    cfg = services.settings.chat
    max_images = services.settings.engine.max_images_per_prompt

    def image_path(image: hist.StoredImage) -> Path:
        return render.image_file(image, image_folder())

    # ------------------------------------------------------------------------------- layout
    # The open conversation's id. It is mirrored into the page's URL (`?c=ID`), so a reload, a
    # bookmark or a second tab opens the same conversation.
    conversation = gr.Textbox(visible=False, elem_id="conversation-id")
    positions = gr.State([])
    kinds = gr.State([])
    engine_seen = gr.State(None)

    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=220, elem_id="history-column"):
            new_chat = gr.Button("New chat", variant="primary", size="sm", elem_id="new-chat")
            search = gr.Textbox(
                placeholder="Search titles", show_label=False, container=False, elem_id="search"
            )
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
                placeholder="Ask anything. Attach images with the clip, by dragging or pasting.",
            )
            live = gr.Markdown("", elem_id="chat-live")
            with gr.Row(equal_height=True):
                textbox = gr.MultimodalTextbox(
                    file_count="multiple",
                    file_types=["image"],
                    sources=["upload"],
                    placeholder=f"Message Step-3.7-Flash (up to {max_images} images, "
                    f"{cfg.max_image_mb} MB each)",
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
                    value=cfg.reasoning_level
                    if cfg.reasoning_level in chat.REASONING_LEVELS
                    else "medium",
                    label="Reasoning",
                    scale=0,
                    min_width=300,
                    elem_id="reasoning-level",
                )
            context_md = gr.Markdown(render.context_line(None, None), elem_id="chat-context")
            with gr.Accordion("Advanced", open=False, elem_id="advanced"):
                system_prompt = gr.Textbox(
                    cfg.system_prompt, label="System prompt", lines=2, elem_id="system-prompt"
                )
                with gr.Row():
                    temperature = gr.Slider(
                        0.0, 2.0, value=cfg.temperature, step=0.05, label="Temperature"
                    )
                    top_p = gr.Slider(0.05, 1.0, value=cfg.top_p, step=0.01, label="top_p")
                    max_tokens = gr.Number(
                        cfg.max_tokens,
                        label="Max tokens (0: as many as fit)",
                        precision=0,
                        minimum=0,
                        elem_id="max-tokens",
                    )
    sampling = [level, system_prompt, temperature, top_p, max_tokens]

    # ---------------------------------------------------------------------------- helpers

    def options(lvl: str, system: str, temp: float, tp: float, mx: float | None) -> Any:
        try:
            return chat.SamplingOptions(
                reasoning_effort=lvl,
                temperature=float(temp),
                top_p=float(tp),
                max_tokens=int(mx or 0),
                system_prompt=system or "",
            )
        except ApplianceError as err:
            raise gr.Error(str(err)) from err

    def rendered(conversation_id: str | None) -> render.Rendered:
        if not conversation_id:
            return render.Rendered()
        return render.render_messages(
            svc.history.get_conversation(conversation_id).messages, image_path
        )

    def history_choices(query: str = "") -> list[tuple[str, str]]:
        return [(s.title, s.id) for s in svc.history.list_conversations(query or "")]

    def list_update(query: str, selected: str | None) -> Any:
        choices = history_choices(query)
        value = selected if selected in {c[1] for c in choices} else None
        return gr.Radio(choices=choices, value=value)

    def used_tokens(conversation_id: str | None) -> int | None:
        if not conversation_id:
            return None
        for message in reversed(svc.history.get_conversation(conversation_id).messages):
            if message.role == "assistant" and message.meta.get("prompt_tokens") is not None:
                return int(message.meta["prompt_tokens"]) + int(
                    message.meta.get("completion_tokens") or 0
                )
        return None

    async def context_text(conversation_id: str | None) -> str:
        try:
            length = await svc.context_length()
        except ApplianceError:
            length = None
        return render.context_line(length, used_tokens(conversation_id))

    def busy_box() -> Any:
        return gr.MultimodalTextbox(value=None, submit_btn=False, stop_btn=True)

    def idle_box(value: Any = None) -> Any:
        """Back to Send. Without a value, whatever the owner typed meanwhile stays in the box."""
        if value is None:
            return gr.MultimodalTextbox(submit_btn=True, stop_btn=False)
        return gr.MultimodalTextbox(value=value, submit_btn=True, stop_btn=False)

    # ---------------------------------------------------------------------------- handlers

    async def on_submit(
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
        try:
            turn = await svc.submit(
                conversation_id,
                str(message.get("text") or ""),
                files,
                options(lvl, system, temp, tp, mx),
            )
        except ApplianceError as err:
            # The refused message stays in the box with its attachments (to fix and resend);
            # what is never sent is removed at the next start (settings.private_runtime).
            raise gr.Error(str(err), title="Not sent", print_exception=False) from err
        discard_uploads(files)
        return str(turn.conversation_id)

    def on_sent(conversation_id: str, lvl: str, query: str) -> tuple[Any, ...]:
        view = rendered(conversation_id)
        waiting = {
            "role": "assistant",
            "content": "",
            "metadata": {"title": f"Waiting · level {lvl}", "status": "pending"},
        }
        return (
            busy_box(),
            [*view.messages, waiting],
            view.positions,
            view.kinds,
            list_update(query, conversation_id),
            "Sending…",
        )

    async def on_respond(
        conversation_id: str | None,
        lvl: str,
        system: str,
        temp: float,
        tp: float,
        mx: float | None,
    ) -> Any:
        if not conversation_id:
            return
        opts = options(lvl, system, temp, tp, mx)
        base = rendered(conversation_id)
        position = len(svc.history.get_conversation(conversation_id).messages)
        updates = svc.respond(conversation_id, opts)
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
        yield gr.skip(), gr.skip(), gr.skip(), "", await context_text(conversation_id)

    async def on_finished(conversation_id: str | None, query: str) -> tuple[Any, ...]:
        """After a reply ended, or was cancelled by Stop (Gradio runs `.then` after a cancel).
        A cancelled reply is shown as saved (`stopped`); a finished one is already on screen,
        and re-sending a long chat would only make the browser render it again."""
        last = None
        if conversation_id:
            await svc.settled(conversation_id)
            messages = svc.history.get_conversation(conversation_id).messages
            last = messages[-1] if messages else None
        if last is not None and last.role == "assistant" and last.status != hist.STOPPED:
            return idle_box(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        final = rendered(conversation_id)
        return (
            idle_box(),
            final.messages,
            final.positions,
            final.kinds,
            "Stopped: the engine ended the request."
            if last is not None and last.status == hist.STOPPED
            else "",
            list_update(query, conversation_id),
        )

    def on_retry(conversation_id: str | None) -> tuple[Any, ...]:
        try:
            if not conversation_id:
                raise BadInputError("There is nothing to regenerate yet.")
            svc.prepare_regenerate(conversation_id)
        except ApplianceError as err:
            raise gr.Error(str(err), print_exception=False) from err
        view = rendered(conversation_id)
        return busy_box(), view.messages, view.positions, view.kinds

    async def on_edit(
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
        if not conversation_id or index >= len(shown_positions) or shown_kinds[index] != "text":
            view = rendered(conversation_id)
            gr.Warning("Only the text of your own messages can be edited.")
            return idle_box(), view.messages, view.positions, view.kinds, False
        text = data.value if isinstance(data.value, str) else str(data.value or "")
        try:
            await svc.prepare_edit(
                conversation_id,
                shown_positions[index],
                text,
                options(lvl, system, temp, tp, mx),
            )
        except ApplianceError as err:
            view = rendered(conversation_id)
            gr.Warning(str(err))
            return idle_box(), view.messages, view.positions, view.kinds, False
        view = rendered(conversation_id)
        return busy_box(), view.messages, view.positions, view.kinds, True

    def on_undo(conversation_id: str | None) -> tuple[Any, ...]:
        if not conversation_id:
            return idle_box(), [], [], []
        removed = svc.undo(conversation_id)
        view = rendered(conversation_id)
        box = None
        if removed is not None:
            box = {
                "text": removed.content,
                "files": [str(image_path(i)) for i in removed.images],
            }
        return idle_box(box), view.messages, view.positions, view.kinds

    async def on_open(conversation_id: str | None, query: str) -> tuple[Any, ...]:
        title = ""
        if conversation_id:
            try:
                title = svc.history.get_conversation(conversation_id).title
            except ApplianceError:
                conversation_id = None
        view = rendered(conversation_id)
        return (
            conversation_id,
            view.messages,
            view.positions,
            view.kinds,
            title,
            list_update(query, conversation_id),
            await context_text(conversation_id),
            "",
        )

    def on_new(query: str) -> tuple[Any, ...]:
        return None, [], [], [], "", list_update(query, None), "", idle_box()

    def on_rename(conversation_id: str | None, title: str, query: str) -> Any:
        try:
            if not conversation_id:
                raise BadInputError("Open a conversation first.")
            svc.history.rename(conversation_id, title)
        except ApplianceError as err:
            gr.Warning(str(err))
            return gr.skip()
        return list_update(query, conversation_id)

    def on_delete(conversation_id: str | None, query: str) -> tuple[Any, ...]:
        if conversation_id:
            svc.history.delete(conversation_id)
        return (None, [], [], [], "", list_update(query, None), gr.Row(visible=False))

    def on_export(conversation_id: str | None, fmt: str, everything: bool) -> Any:
        if not everything and not conversation_id:
            raise gr.Error("Open a conversation first, or use Export all.")
        which = None if everything else conversation_id
        markdown = fmt == "Markdown"
        text = svc.history.export_markdown(which) if markdown else svc.history.export_json(which)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = "all-conversations" if everything else f"conversation-{(conversation_id or '')[:8]}"
        folder = private_dir(export_folder())
        path = folder / f"step-station-{name}-{stamp}.{'md' if markdown else 'json'}"
        write_private(path, text)  # 0600: an export is the whole chat
        return gr.File(value=str(path), visible=True)

    def on_engine(seen: Any) -> tuple[Any, ...]:
        view = svc.engine()
        key = (view.ready, view.label, view.message)
        if key == seen:
            return gr.skip(), gr.skip(), gr.skip()
        if view.ready:
            return gr.Row(visible=False), gr.skip(), key
        return gr.Row(visible=True), view.not_ready_text(), key

    # ----------------------------------------------------------------------------- wiring
    stream_outputs = [chatbot, positions, kinds, live, context_md]
    chat_events: dict[str, Any] = {"concurrency_limit": None, "show_progress": "hidden"}

    sent = textbox.submit(
        on_submit, [textbox, conversation, *sampling], [conversation], **chat_events
    ).success(
        on_sent,
        [conversation, level, search],
        [textbox, chatbot, positions, kinds, history_list, live],
        **chat_events,
    )
    sent_reply = sent.success(on_respond, [conversation, *sampling], stream_outputs, **chat_events)
    finished_outputs = [textbox, chatbot, positions, kinds, live, history_list]
    sent_reply.then(on_finished, [conversation, search], finished_outputs)

    retried = chatbot.retry(on_retry, [conversation], [textbox, chatbot, positions, kinds])
    retry_reply = retried.success(
        on_respond, [conversation, *sampling], stream_outputs, **chat_events
    )
    retry_reply.then(on_finished, [conversation, search], finished_outputs)

    edit_ok = gr.State(False)
    edited = chatbot.edit(
        on_edit,
        [conversation, positions, kinds, *sampling],
        [textbox, chatbot, positions, kinds, edit_ok],
    )

    async def respond_if(ok: bool, *args: Any) -> Any:
        if not ok:
            return
        async for update in on_respond(*args):
            yield update

    edit_reply = edited.success(
        respond_if, [edit_ok, conversation, *sampling], stream_outputs, **chat_events
    )
    edit_reply.then(on_finished, [conversation, search], finished_outputs)

    # Stop cancels the running reply (its task is cancelled, which closes the engine request);
    # the `.then(on_finished)` above then shows the saved, `stopped` reply.
    textbox.stop(None, None, None, cancels=[sent_reply, retry_reply, edit_reply])
    chatbot.undo(on_undo, [conversation], [textbox, chatbot, positions, kinds])
    # The chat's own "Clear" button starts a new conversation; the old one stays in the history.
    chatbot.clear(
        on_new,
        [search],
        [conversation, chatbot, positions, kinds, title_box, history_list, live, textbox],
        cancels=[sent_reply, retry_reply, edit_reply],
    )

    open_outputs = [
        conversation,
        chatbot,
        positions,
        kinds,
        title_box,
        history_list,
        context_md,
        live,
    ]
    history_list.input(
        on_open,
        [history_list, search],
        open_outputs,
        cancels=[sent_reply, retry_reply, edit_reply],
    )
    # always_last: a search typed while the previous one runs is not dropped.
    search.change(
        list_update,
        [search, conversation],
        [history_list],
        show_progress="hidden",
        trigger_mode="always_last",
    )
    new_chat.click(
        on_new,
        [search],
        [conversation, chatbot, positions, kinds, title_box, history_list, live, textbox],
        cancels=[sent_reply, retry_reply, edit_reply],
    )
    rename.click(on_rename, [conversation, title_box, search], [history_list])
    delete.click(lambda: gr.Row(visible=True), None, [confirm_row])
    cancel_delete.click(lambda: gr.Row(visible=False), None, [confirm_row])
    confirm_delete.click(
        on_delete,
        [conversation, search],
        [conversation, chatbot, positions, kinds, title_box, history_list, confirm_row],
    )
    export_one.click(
        lambda c, f: on_export(c, f, everything=False),
        [conversation, export_format],
        [export_file],
    )
    export_all.click(
        lambda c, f: on_export(c, f, everything=True), [conversation, export_format], [export_file]
    )
    gr.Timer(2.0).tick(
        on_engine, [engine_seen], [banner_row, banner, engine_seen], show_progress="hidden"
    )

    conversation.change(
        None,
        [conversation],
        None,
        js="(c) => { const u = new URL(window.location.href); "
        "if (c) { u.searchParams.set('c', c); } else { u.searchParams.delete('c'); } "
        "window.history.replaceState(null, '', u); return []; }",
    )

    async def on_load(query: str, seen: Any, request: gr.Request) -> tuple[Any, ...]:
        conversation_id = request.query_params.get("c") or None
        return (*await on_open(conversation_id, query), *on_engine(seen))

    return ChatTab(
        go_to_model=go_to_model,
        on_load=on_load,
        load_inputs=[search, engine_seen],
        load_outputs=[*open_outputs, banner_row, banner, engine_seen],
    )
