"""The chat flow the UI drives: check, persist, stream, persist again. No gradio here.

`ChatService` ties the history, the engine's address (from the supervisor) and the streaming
client together. Every user message is committed before anything is sent; a reply is committed
as `streaming` when it starts, updated about once a second, and finalised as complete, stopped or
failed. A message that fails a check (images, context, engine not ready) is refused before it
is stored, so the UI can leave it in the input box.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.chat import client as chat
from appliance.chat import documents as docs
from appliance.chat import history as hist
from appliance.engine.protocol import EngineActivity, EngineOwner
from appliance.engine.state import EngineState
from appliance.errors import ApplianceError, BadInputError
from appliance.settings import Settings

PERSIST_INTERVAL_S = 1.0  # how often a streaming reply is written to the history
READ_CACHE_SIZE = 4  # documents read for the chips and kept for the send


@dataclass(frozen=True)
class EngineView:
    """What the chat needs to know about the engine right now."""

    ready: bool
    url: str = ""
    model: str = ""
    label: str = "Not started"  # the state in the user's words
    message: str = ""
    api_key: str = field(default="", repr=False)  # the engine's key (fresh on every start)

    def not_ready_text(self) -> str:
        if self.label == "Sleeping":
            return "The model is asleep (idle sleep); sending a message wakes it first."
        detail = f" {self.message}" if self.message else ""
        return f"The model is not running ({self.label}).{detail} Start it in the Model tab."


def engine_view_from(
    supervisor: EngineOwner | None, default_model: str = "step3p7-flash"
) -> EngineView:
    """Read a Supervisor's status into an EngineView (the supervisor owns the truth)."""
    if supervisor is None:
        return EngineView(False, message="No engine is configured.")
    status = supervisor.status()
    ready = status.state is EngineState.READY
    return EngineView(
        ready=ready and bool(status.engine_url),
        url=status.engine_url,
        model=status.served_model_name or default_model,
        label=status.state.label,
        message=status.message if not ready else "",
        api_key=supervisor.engine_api_key,
    )


@dataclass(frozen=True)
class UserTurn:
    conversation_id: str
    message: hist.Message
    created: bool  # a new conversation was started for it


def to_openai(messages: Sequence[hist.Message], system_prompt: str = "") -> list[dict[str, Any]]:
    """History messages as chat-completions messages (images as data URLs, documents as text
    parts headed by their names ahead of the typed text, thinking dropped)."""
    out: list[dict[str, Any]] = []
    if system_prompt.strip():
        out.append({"role": "system", "content": system_prompt})
    for message in messages:
        if message.role == "assistant":
            if message.content:  # a stopped or interrupted reply: the text the owner saw
                out.append({"role": "assistant", "content": message.content})
            continue
        attached = docs.stored_in(message)
        if message.images or attached:
            parts: list[dict[str, Any]] = [
                {"type": "image_url", "image_url": {"url": _data_url(i)}} for i in message.images
            ]
            parts.extend({"type": "text", "text": d.part()} for d in attached)
            if message.content:
                parts.append({"type": "text", "text": message.content})
            out.append({"role": message.role, "content": parts})
        else:
            out.append({"role": message.role, "content": message.content})
    return out


def _data_url(image: hist.StoredImage) -> str:
    return chat.PreparedImage(image.name, image.mime, image.data, 0, 0, 0, 0).data_url()


def final_status(phase: str) -> str:
    return {
        chat.FINISHED: hist.COMPLETE,
        chat.STOPPED: hist.STOPPED,
        chat.FAILED: hist.FAILED,
    }.get(phase, hist.INTERRUPTED)


class ChatService:
    def __init__(
        self,
        settings: Settings,
        history: hist.History,
        engine: Callable[[], EngineView],
        *,
        api_key: str = "",
        # the engine's owner: wake a sleeping engine before a request, and no idle sleep until
        # it ended (vLLM's /sleep aborts running requests)
        activity: EngineActivity | None = None,
    ) -> None:
        self.settings = settings
        self.history = history
        self._engine = engine
        self._api_key = api_key
        self._activity = activity
        self._clients: dict[tuple[str, str, str], chat.ChatClient] = {}
        self._model_info: dict[tuple[str, str], chat.ModelInfo] = {}
        self._active: dict[str, asyncio.Event] = {}  # conversation id -> set when its reply ended
        # Documents read for the chips before sending, kept for the send (a PDF of hundreds of
        # pages takes seconds): (path, size, mtime, caps) -> the document. A few at most.
        self._read: OrderedDict[tuple[str, int, int, int, int], docs.Document] = OrderedDict()
        self._read_lock = threading.Lock()

    # ------------------------------------------------------------------------------ engine

    def engine(self) -> EngineView:
        return self._engine()

    def _ready_engine(self) -> EngineView:
        view = self._engine()
        if not view.ready:
            raise chat.EngineNotReadyError(view.not_ready_text())
        return view

    async def _begin_use(self) -> None:
        """Before anything goes to the engine: wake it if it sleeps, and hold off idle sleep
        until `_end_use` (runs in a thread: a wake-up takes seconds)."""
        if self._activity is None:
            return
        try:
            await asyncio.to_thread(self._activity.begin_use)
        except ApplianceError as err:
            raise chat.EngineNotReadyError(f"The model could not be woken up: {err}") from err

    def _end_use(self) -> None:
        if self._activity is not None:
            self._activity.end_use()

    @contextlib.asynccontextmanager
    async def _using_engine(self) -> AsyncIterator[None]:
        await self._begin_use()
        try:
            yield
        finally:
            self._end_use()

    def _client(self, view: EngineView) -> chat.ChatClient:
        api_key = view.api_key or self._api_key
        key = (view.url, view.model, api_key)  # a restarted engine has a new key: a new client
        client = self._clients.get(key)
        if client is None:
            client = chat.ChatClient(view.url, view.model, api_key=api_key)
            self._clients[key] = client
        return client

    async def context_length(self) -> int | None:
        """The served model's context length (from /v1/models), or None when not serving."""
        view = self._engine()
        if not view.ready:
            return None
        info = await self._info(view)
        return info.max_model_len or None

    async def _info(self, view: EngineView) -> chat.ModelInfo:
        key = (view.url, view.model)
        info = self._model_info.get(key)
        if info is None:
            info = await self._client(view).model_info()
            self._model_info[key] = info
        return info

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    # ----------------------------------------------------------------------------- checks

    def prepare_images(
        self, paths: Sequence[Path], earlier: Sequence[hist.Message] = ()
    ) -> list[chat.PreparedImage]:
        already = sum(len(m.images) for m in earlier)
        return chat.prepare_images(
            paths,
            max_mb=self.settings.chat.max_image_mb,
            max_count=self.settings.engine.max_images_per_prompt,
            already_in_conversation=already,
        )

    def _known_context(self) -> int:
        """The last context length the engine listed, else the model's own (for the cap on how
        much of a document is read before the engine is asked)."""
        lengths = [i.max_model_len for i in self._model_info.values() if i.max_model_len]
        return max(lengths) if lengths else docs.NATIVE_CONTEXT

    def read_documents(
        self, paths: Sequence[Path], image_room: int = 0
    ) -> tuple[list[docs.Document], list[chat.PreparedImage]]:
        """Extract the documents' text (a worker thread's job: a PDF takes a while), at most
        about twice the context by the estimate: more could never be sent anyway; and up to
        `image_room` scanned pages, checked and scaled as attached images are."""
        limit = int(2 * self._known_context() * chat.CHARS_PER_TOKEN)
        documents = []
        for path in paths:
            document = self._read_document(Path(path), limit, max(image_room, 0))
            image_room -= len(document.page_images)
            documents.append(document)
        scans = [
            chat.prepare_image_data(
                scan.data, name=scan.name, max_mb=self.settings.chat.max_image_mb
            )
            for document in documents
            for scan in document.page_images
        ]
        return documents, scans

    def _read_document(self, path: Path, max_chars: int, image_room: int) -> docs.Document:
        try:
            info = path.stat()
        except OSError:
            return docs.read_document(path, max_chars=max_chars, max_page_images=image_room)
        key = (str(path), info.st_size, info.st_mtime_ns, max_chars, image_room)
        with self._read_lock:
            if key in self._read:
                self._read.move_to_end(key)
                return self._read[key]
        document = docs.read_document(path, max_chars=max_chars, max_page_images=image_room)
        with self._read_lock:
            self._read[key] = document
            while len(self._read) > READ_CACHE_SIZE:
                self._read.popitem(last=False)
        return document

    async def preview_documents(self, paths: Sequence[Path]) -> list[docs.Preview]:
        """Chips for files attached but not yet sent: each document's tokens by the engine's
        tokenizer when it is serving (a sleeping engine is not woken for this), an estimate
        labelled so otherwise; or why the file cannot go. Images are left to the send."""
        _images, files = docs.split_attachments(paths)
        if not files:
            return []
        room = self.settings.engine.max_images_per_prompt
        view = self._engine()
        out: list[docs.Preview] = []
        for path in files:
            try:
                (document,), _scans = await asyncio.to_thread(self.read_documents, [path], room)
            except BadInputError as err:
                out.append(docs.Preview(path.name, problem=str(err)))
                continue
            exact = None
            if view.ready and document.complete:
                exact = await self._client(view).count_text_tokens(document.part())
            tokens = exact if exact is not None else document.estimate()
            counted = docs.counted(document, tokens, exact=exact is not None)
            out.append(docs.Preview(path.name, counted))
        return out

    async def count_documents(
        self,
        view: EngineView,
        documents: Sequence[docs.Document],
        base: list[dict[str, Any]],
        options: chat.SamplingOptions,
    ) -> list[docs.Document]:
        """Each document's tokens (the engine's tokenizer; an estimate for one only partly
        read), and DocumentTooLongError, with the numbers, for the first that does not fit
        what the rest of the conversation (`base`) leaves of the context."""
        if not documents:
            return []
        info = await self._info(view)
        limit = info.max_model_len or docs.NATIVE_CONTEXT
        reply_room = options.max_tokens or chat.MIN_REPLY_TOKENS
        taken = chat.estimate_tokens(base)
        left = limit - taken - reply_room
        out: list[docs.Document] = []
        for document in documents:
            estimate = document.estimate()
            exact = None
            # Only partly read (far over the context): its estimate says enough. Anything read
            # whole is at most about twice the context, which the tokenizer counts in a second.
            if document.complete:
                exact = await self._client(view).count_text_tokens(document.part())
            counted = docs.counted(
                document, exact if exact is not None else estimate, exact=exact is not None
            )
            if counted.tokens > left or not counted.complete:
                raise docs.DocumentTooLongError(
                    docs.too_long(counted, left, limit, taken, reply_room),
                    hint="Attach a smaller file or only the part you need, start a new "
                    "conversation, or lower Max tokens. Nothing was sent.",
                )
            left -= counted.tokens
            out.append(counted)
        return out

    async def check_context(
        self, view: EngineView, messages: list[dict[str, Any]], options: chat.SamplingOptions
    ) -> int:
        """Estimated (or exact) prompt tokens; ContextTooLongError when it would not fit."""
        info = await self._info(view)
        estimate = chat.estimate_tokens(messages)
        if not info.max_model_len:
            return estimate
        limit = info.max_model_len
        if estimate + (options.max_tokens or chat.MIN_REPLY_TOKENS) <= limit // 2:
            return estimate  # far from the limit: no need to ask the engine
        exact = await self._client(view).count_tokens(messages)
        chat.check_context(
            exact if exact is not None else estimate,
            limit,
            options.max_tokens,
            exact=exact is not None,
        )
        return exact if exact is not None else estimate

    # ------------------------------------------------------------------------------- turns

    async def submit(
        self,
        conversation_id: str | None,
        text: str,
        image_paths: Sequence[Path],
        options: chat.SamplingOptions,
    ) -> UserTurn:
        """Check a new user message and store it; raise (storing nothing) when it cannot go."""
        text = text.strip()
        if not text and not image_paths:
            raise BadInputError("The message is empty.", hint="Type a message or attach images.")
        earlier: list[hist.Message] = []
        if conversation_id:
            earlier = self.history.get_conversation(conversation_id).messages
        image_files, document_files = docs.split_attachments(image_paths)
        # Decoding (Pillow) and text extraction (pypdf) run in a worker thread: a big image or
        # PDF never stalls other streams. A broken file is refused before the engine is woken.
        images = await asyncio.to_thread(self.prepare_images, image_files, earlier)
        room = self.settings.engine.max_images_per_prompt - len(images)
        room -= sum(len(m.images) for m in earlier)
        documents, scans = await asyncio.to_thread(self.read_documents, document_files, room)
        images += scans  # scanned pages go as images, after the attached ones
        async with self._using_engine():  # a sleeping engine wakes as the message is sent
            view = self._ready_engine()
            stored = [hist.StoredImage(i.name, i.mime, i.data) for i in images]
            pending = hist.Message(0, len(earlier), "user", text, images=stored)
            base = to_openai([*earlier, pending], options.system_prompt)
            documents = await self.count_documents(view, documents, base, options)
            pending.meta = docs.meta_for(documents)
            await self.check_context(
                view, to_openai([*earlier, pending], options.system_prompt), options
            )
        created = not conversation_id
        if not conversation_id:
            names = [i.name for i in images] + [d.name for d in documents]
            title = hist.title_from(text or ", ".join(names))
            conversation_id = self.history.create_conversation(title)
        message = self.history.add_message(
            conversation_id, "user", text, images=stored, meta=pending.meta
        )
        return UserTurn(conversation_id, message, created)

    async def respond(
        self, conversation_id: str, options: chat.SamplingOptions
    ) -> AsyncGenerator[chat.Reply, None]:
        """Stream the assistant's reply to the conversation's last user message.

        Yields the same `Reply` object, updated, at most every `chat.stream_interval_ms`.
        """
        messages = self.history.get_conversation(conversation_id).messages
        if not messages or messages[-1].role != "user":
            raise BadInputError(
                "There is no question to answer: the conversation does not end with your message.",
                hint="Type a message first.",
            )
        await self._begin_use()  # wakes a sleeping engine; idle sleep waits for the end
        try:
            view = self._ready_engine()
            payload = to_openai(messages, options.system_prompt)
            await self.check_context(view, payload, options)
            reply = chat.Reply(level=options.reasoning_effort)
            stored = self.history.add_message(
                conversation_id,
                "assistant",
                "",
                status=hist.STREAMING,
                meta={"level": options.reasoning_effort, "model": view.model},
            )
            ended = self._active[conversation_id] = asyncio.Event()
            events = self._client(view).stream(payload, options)
            interval = max(0.0, self.settings.chat.stream_interval_ms / 1000.0)
            last_saved = time.monotonic()
            updates = chat.coalesce(
                events, reply, interval_s=interval, per_kchar_s=chat.INTERVAL_PER_KCHAR_S
            )
            try:
                async for current in updates:
                    now = time.monotonic()
                    if current.active and now - last_saved >= PERSIST_INTERVAL_S:
                        self.history.update_message(
                            stored.id, content=current.content, reasoning=current.reasoning
                        )
                        last_saved = now
                    yield current
            finally:
                await updates.aclose()  # cancels the reader, which closes the HTTP request
                reply.stop()  # no-op when it already ended; Stop / page gone otherwise
                meta = {**reply.stats(), "model": view.model}
                if reply.error:
                    meta["error"] = reply.error
                self.history.update_message(
                    stored.id,
                    content=reply.content,
                    reasoning=reply.reasoning,
                    status=final_status(reply.phase),
                    meta=meta,
                )
                ended.set()
                if self._active.get(conversation_id) is ended:
                    del self._active[conversation_id]
        finally:
            self._end_use()

    async def settled(self, conversation_id: str, timeout_s: float = 10.0) -> None:
        """Wait until the conversation's streaming reply (if any) is finalised in the history."""
        ended = self._active.get(conversation_id)
        if ended is not None:
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(ended.wait(), timeout_s)

    def prepare_regenerate(self, conversation_id: str) -> None:
        """Drop the last reply (and anything after the last user message)."""
        messages = self.history.get_conversation(conversation_id).messages
        last_user = max((m.position for m in messages if m.role == "user"), default=None)
        if last_user is None:
            raise BadInputError("There is nothing to regenerate yet.", hint="Send a message.")
        self.history.truncate(conversation_id, last_user + 1)

    async def prepare_edit(
        self, conversation_id: str, position: int, text: str, options: chat.SamplingOptions
    ) -> None:
        """Replace a user message's text (images kept), dropping everything after it."""
        messages = self.history.get_conversation(conversation_id).messages
        target = next((m for m in messages if m.position == position), None)
        if target is None or target.role != "user":
            raise BadInputError("Only your own messages can be edited.")
        text = text.strip()
        kept = docs.meta_for(docs.stored_in(target))  # its documents stay, as its images do
        if not text and not target.images and not kept:
            raise BadInputError("The edited message is empty.", hint="Type some text.")
        async with self._using_engine():
            view = self._ready_engine()
            edited = hist.Message(0, position, "user", text, images=target.images, meta=kept)
            await self.check_context(
                view,
                to_openai([*messages[:position], edited], options.system_prompt),
                options,
            )
        self.history.truncate(conversation_id, position)
        self.history.add_message(conversation_id, "user", text, images=target.images, meta=kept)

    def undo(self, conversation_id: str) -> hist.Message | None:
        """Delete the shown path's last user message and its reply (not kept as a version, as an
        edit's or a regenerate's would be: undo takes it back); return that message (for the
        input box)."""
        messages = self.history.get_conversation(conversation_id).messages
        last_user = next((m for m in reversed(messages) if m.role == "user"), None)
        if last_user is None:
            return None
        self.history.delete_from(conversation_id, last_user.position)
        return last_user
