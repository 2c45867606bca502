"""OpenAI-compatible streaming chat against the engine, and the checks before a message is sent.

No gradio here: `ui/chat.py` renders what this module produces.

- `prepare_images`: real image bytes only (magic number and a full decode), a size limit, the
  engine's per-prompt image count, sides over 3024 px scaled down (vLLM's Step image processor
  would do it anyway, after we had shipped the big file).
- `ChatClient.stream`: one streaming chat completion as typed events (reasoning delta, content
  delta, usage, done, error). Reads `delta.reasoning`, falls back to `reasoning_content` (renamed
  in vLLM 0.11.1, removed in 0.16). Closing the generator closes the HTTP response, which aborts
  the request in the engine (its running-request gauge drops).
- `Reply` + `coalesce`: apply events to one reply and hand it to the UI at most once per interval
  (and at least once per tick while waiting, so a thinking timer keeps moving).
- `check_context`: refuse a conversation that does not fit the model's context, with numbers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, UnidentifiedImageError

from appliance import endpoint
from appliance.errors import BadInputError, EngineError
from appliance.units import fmt_bytes

REASONING_LEVELS = ("low", "medium", "high")
MAX_IMAGE_SIDE = 3024  # vLLM's Step image processor downscales any side above this
# Images with more pixels are refused before they are decoded (a decompression bomb: a small file
# that decodes to gigabytes). vLLM's Step3-VL processor resizes any image to at most 3024 px a
# side (vllm/transformers_utils/processors/step3_vl.py, MAX_IMAGE_SIZE = 3024, 9.1 MP), so 40 MP
# (a 7,700 x 5,200 photo) is plenty, and well under Pillow's own guard (MAX_IMAGE_PIXELS, ~89 MP,
# an error only at twice that). Decoding runs off the event loop (ChatService.submit).
MAX_IMAGE_PIXELS = 40_000_000
TOKENS_PER_IMAGE = 3164  # upper bound per image: 169-token global view + 81 per 504 px crop
CHARS_PER_TOKEN = 3.0  # conservative (real text averages ~4): over-estimates, never under
TOKENS_PER_MESSAGE = 8  # chat-template overhead per turn
MIN_REPLY_TOKENS = 256  # a conversation must leave at least this much room for the answer
# The browser re-renders a streaming message whole on every update, so an update costs more as
# the message grows. Updates spread out with it: the base interval (chat.stream_interval_ms,
# 50 ms) plus this much per 1,000 characters on screen (about 320 ms at 18,000 characters, the
# end of a 4,000-token answer). Measured in benchmarks/stream_smoothness.py.
INTERVAL_PER_KCHAR_S = 0.015

# Magic numbers of the formats vLLM's image loader (Pillow) accepts and browsers send.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)
_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}


class ContextTooLongError(BadInputError):
    """The conversation does not fit the model's context length."""


class EngineNotReadyError(EngineError):
    """The engine is not serving (stopped, starting, failed)."""


# ------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class PreparedImage:
    """An image checked and ready to send: `data` is what goes to the engine."""

    name: str
    mime: str
    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int

    @property
    def scaled(self) -> bool:
        return (self.width, self.height) != (self.original_width, self.original_height)

    def data_url(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"


def sniff_image(head: bytes) -> str | None:
    """The image format the first 16 bytes are the magic number of (PNG, JPEG, ...), or None."""
    return _sniff(head)


def _sniff(head: bytes) -> str | None:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    return None


def prepare_image(path: Path, *, max_mb: float, name: str | None = None) -> PreparedImage:
    """Check one image file and scale it to the engine's side limit; BadInputError if unusable."""
    name = name or path.name
    try:
        size = path.stat().st_size
    except OSError as err:
        raise BadInputError(
            f"{name} could not be read ({err.strerror}).", hint="Attach it again."
        ) from err
    _check_size(name, size, max_mb)
    return prepare_image_data(path.read_bytes(), name=name, max_mb=max_mb)


def _check_size(name: str, size: int, max_mb: float) -> None:
    limit = max_mb * 1024 * 1024  # the setting counts MiB
    if size > limit:
        raise BadInputError(
            f"{name} is {fmt_bytes(size)}; images may be at most {fmt_bytes(limit)}.",
            hint="Send a smaller or compressed image (the limit is the chat.max_image_mb "
            "setting). Nothing was sent.",
        )


def prepare_image_data(raw: bytes, *, name: str, max_mb: float) -> PreparedImage:
    """`prepare_image` for bytes already in memory (a PDF page's scan)."""
    _check_size(name, len(raw), max_mb)
    fmt = _sniff(raw[:16])
    if fmt is None:
        raise BadInputError(
            f"{name} is not an image (its bytes are not PNG, JPEG, GIF, WebP or BMP, whatever "
            "its name says).",
            hint="Attach a real image file. Nothing was sent.",
        )
    try:
        with Image.open(io.BytesIO(raw)) as img:
            _check_pixels(name, *img.size)  # from the header, before a byte is decoded
            img.load()  # a full decode: truncated or corrupt files fail here, not in the engine
            original = img.size
            if max(original) > MAX_IMAGE_SIDE:
                return _scaled(name, img, fmt)
    except Image.DecompressionBombError as err:  # Pillow's own guard, at twice ~89 MP
        raise BadInputError(
            f"{name} has far more than {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels ({err}).",
            hint=f"Scale it down (e.g. to {MAX_IMAGE_SIDE} px on its longest side) and attach it "
            "again. Nothing was sent.",
        ) from err
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
    ) as err:
        raise BadInputError(
            f"{name} looks like a {fmt} file but cannot be decoded ({err}).",
            hint="The file is damaged or truncated; export it again. Nothing was sent.",
        ) from err
    mime = _MIME.get(fmt)
    if mime is None:  # BMP: re-encode as PNG, which every engine build accepts
        return _reencode(name, raw)
    return PreparedImage(name, mime, raw, *original, *original)


def _check_pixels(name: str, width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise BadInputError(
            f"{name} is {width:,} x {height:,} pixels ({width * height / 1e6:,.0f} megapixels); "
            f"images may have at most {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels (the model sees at "
            f"most {MAX_IMAGE_SIDE} x {MAX_IMAGE_SIDE}).",
            hint=f"Scale it down (e.g. to {MAX_IMAGE_SIDE} px on its longest side) and attach it "
            "again. Nothing was sent.",
        )


def _scaled(name: str, img: Image.Image, fmt: str) -> PreparedImage:
    original = img.size
    factor = MAX_IMAGE_SIDE / max(original)
    size = (max(1, round(original[0] * factor)), max(1, round(original[1] * factor)))
    resized = img.convert("RGB" if fmt == "JPEG" else "RGBA").resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if fmt == "JPEG":
        resized.save(out, format="JPEG", quality=92)
        mime = "image/jpeg"
    else:
        resized.save(out, format="PNG", optimize=False)
        mime = "image/png"
    return PreparedImage(name, mime, out.getvalue(), *size, *original)


def _reencode(name: str, raw: bytes) -> PreparedImage:
    with Image.open(io.BytesIO(raw)) as img:
        out = io.BytesIO()
        img.save(out, format="PNG")
        return PreparedImage(name, "image/png", out.getvalue(), *img.size, *img.size)


def prepare_images(
    paths: Sequence[Path], *, max_mb: float, max_count: int, already_in_conversation: int = 0
) -> list[PreparedImage]:
    """Check a message's images: the count first (nothing read), then each file."""
    total = len(paths) + already_in_conversation
    if total > max_count:
        where = (
            f"{len(paths)} in this message and {already_in_conversation} earlier in the "
            "conversation"
            if already_in_conversation
            else f"{len(paths)} attached"
        )
        raise BadInputError(
            f"Too many images: {where}; the engine accepts at most {max_count} per request "
            "(engine.max_images_per_prompt).",
            hint="Remove some images or start a new conversation. Nothing was sent.",
        )
    return [prepare_image(Path(p), max_mb=max_mb) for p in paths]


# -------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class SamplingOptions:
    reasoning_effort: str = "medium"
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 0  # 0: the engine decides (up to the context left)
    system_prompt: str = ""

    def __post_init__(self) -> None:
        if self.reasoning_effort not in REASONING_LEVELS:
            raise BadInputError(
                f"Reasoning level {self.reasoning_effort!r} is not one of "
                f"{', '.join(REASONING_LEVELS)}."
            )
        if not 0.0 <= self.temperature <= 2.0:
            raise BadInputError("Temperature must be between 0 and 2.")
        if not 0.0 < self.top_p <= 1.0:
            raise BadInputError("top_p must be above 0 and at most 1.")
        if self.max_tokens < 0:
            raise BadInputError("Max tokens must be 0 (engine decides) or more.")


@dataclass(frozen=True)
class ModelInfo:
    id: str
    max_model_len: int


def build_request(
    model: str, messages: list[dict[str, Any]], options: SamplingOptions
) -> dict[str, Any]:
    """The chat-completions body: always a reasoning level, always usage in the stream."""
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "reasoning_effort": options.reasoning_effort,
        "temperature": options.temperature,
        "top_p": options.top_p,
    }
    if options.max_tokens:
        body["max_tokens"] = options.max_tokens
    return body


def estimate_tokens(messages: Sequence[dict[str, Any]]) -> int:
    """A conservative token count (over-estimates) for the context check."""
    total = 0
    for message in messages:
        total += TOKENS_PER_MESSAGE
        content = message.get("content", "")
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        for part in parts:
            if part.get("type") == "image_url":
                total += TOKENS_PER_IMAGE
            else:
                total += int(len(str(part.get("text", ""))) / CHARS_PER_TOKEN) + 1
    return total


def check_context(prompt_tokens: int, max_model_len: int, max_tokens: int, *, exact: bool) -> None:
    """Refuse a conversation that would not fit; never let the engine cut it silently."""
    reply_room = max_tokens or MIN_REPLY_TOKENS
    if prompt_tokens + reply_room <= max_model_len:
        return
    about = "" if exact else "about "
    raise ContextTooLongError(
        f"This conversation is {about}{prompt_tokens:,} tokens and the answer needs room for "
        f"{reply_room:,} more, but the model's context is {max_model_len:,} tokens.",
        hint="Start a new conversation, remove images or earlier messages, lower Max tokens, "
        "or raise engine.max_model_len in the Model tab. Nothing was sent.",
    )


# ---------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int | None = None


@dataclass(frozen=True)
class Done:
    finish_reason: str


@dataclass(frozen=True)
class StreamError:
    message: str


ChatEvent = ReasoningDelta | ContentDelta | Usage | Done | StreamError


def parse_chunk(data: dict[str, Any]) -> list[ChatEvent]:
    """Events in one `data:` chunk of a chat-completions stream."""
    events: list[ChatEvent] = []
    if "error" in data:
        err = data["error"]
        message = err.get("message") if isinstance(err, dict) else str(err)
        return [StreamError(str(message or "the engine reported an error"))]
    for choice in data.get("choices") or []:
        delta = choice.get("delta") or {}
        reasoning = delta.get("reasoning")
        if reasoning is None:
            reasoning = delta.get("reasoning_content")
        if reasoning:
            events.append(ReasoningDelta(str(reasoning)))
        content = delta.get("content")
        if content:
            events.append(ContentDelta(str(content)))
        if choice.get("finish_reason"):
            events.append(Done(str(choice["finish_reason"])))
    usage = data.get("usage")
    if usage:
        details = usage.get("completion_tokens_details") or {}
        events.append(
            Usage(
                int(usage.get("prompt_tokens") or 0),
                int(usage.get("completion_tokens") or 0),
                details.get("reasoning_tokens"),
            )
        )
    return events


def _error_message(status: int, body: bytes) -> str:
    try:
        data = json.loads(body)
        err = data.get("error", data)
        message = err.get("message") if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        message = body.decode("utf-8", "replace")[:300]
    return f"The engine refused the request (HTTP {status}): {message}"


class ChatClient:
    """Streaming chat completions against one engine URL (httpx, async)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str = "",
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Generous read timeout: a long prefill (256K tokens) can be silent for minutes.
        timeout = httpx.Timeout(connect=5.0, read=600.0, write=60.0, pool=5.0)
        if transport is not None:
            self._http = httpx.AsyncClient(
                base_url=self.base_url, headers=headers, transport=transport, timeout=timeout
            )
        else:  # the engine's socket or TCP address (appliance/endpoint.py)
            self._http = endpoint.async_client(self.base_url, headers=headers, timeout=timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def model_info(self) -> ModelInfo:
        """The served model and its context length, from `GET /v1/models`."""
        try:
            response = await self._http.get("/v1/models", timeout=5.0)
            response.raise_for_status()
            data = response.json()["data"]
        except (httpx.HTTPError, KeyError, ValueError) as err:
            raise EngineNotReadyError(
                f"The engine at {endpoint.describe(self.base_url)} did not list its model ({err}).",
                hint="Check the Model tab; start or restart the engine.",
            ) from err
        entry = next((m for m in data if m.get("id") == self.model), data[0] if data else None)
        if entry is None:
            raise EngineNotReadyError(
                f"The engine at {endpoint.describe(self.base_url)} serves no model.",
                hint="Restart the engine.",
            )
        return ModelInfo(str(entry["id"]), int(entry.get("max_model_len") or 0))

    async def count_tokens(self, messages: list[dict[str, Any]]) -> int | None:
        """Exact prompt tokens from the engine's `/tokenize`, or None when it cannot say."""
        try:
            response = await self._http.post(
                "/tokenize", json={"model": self.model, "messages": messages}, timeout=30.0
            )
            if response.status_code != 200:
                return None
            count = response.json().get("count")
            return int(count) if count is not None else None
        except (httpx.HTTPError, ValueError):
            return None

    async def count_text_tokens(self, text: str) -> int | None:
        """Tokens of a piece of text (an attached document) by the engine's own tokenizer,
        from `/tokenize` with a plain prompt; None when the engine cannot say."""
        body = {"model": self.model, "prompt": text, "add_special_tokens": False}
        try:
            response = await self._http.post("/tokenize", json=body, timeout=60.0)
            if response.status_code != 200:
                return None
            count = response.json().get("count")
            return int(count) if count is not None else None
        except (httpx.HTTPError, ValueError):
            return None

    async def stream(
        self, messages: list[dict[str, Any]], options: SamplingOptions
    ) -> AsyncIterator[ChatEvent]:
        """Yield events for one completion; closing this generator aborts the request."""
        body = build_request(self.model, messages, options)
        try:
            async with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    yield StreamError(_error_message(response.status_code, await response.aread()))
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        return
                    try:
                        chunk = json.loads(payload)
                    except ValueError:
                        yield StreamError(f"The engine sent a malformed chunk: {payload[:200]!r}")
                        return
                    for event in parse_chunk(chunk):
                        yield event
        except httpx.ConnectError:
            yield StreamError(
                f"The engine at {endpoint.describe(self.base_url)} refused the connection; it is "
                "not running. Start it in the Model tab."
            )
        except (httpx.ReadError, httpx.RemoteProtocolError, httpx.ReadTimeout) as err:
            yield StreamError(
                f"The connection to the engine broke mid-answer ({type(err).__name__}); "
                "the engine may have crashed. Check the Model tab, then regenerate."
            )


# ----------------------------------------------------------------------------------- replies

WAITING, THINKING, ANSWERING = "waiting", "thinking", "answering"
FINISHED, STOPPED, FAILED = "finished", "stopped", "failed"


@dataclass
class Reply:
    """One assistant reply as it streams: text so far, phase and timings."""

    level: str
    clock: Callable[[], float] = time.monotonic
    started: float = 0.0
    phase: str = WAITING
    reasoning_parts: list[str] = field(default_factory=list)
    content_parts: list[str] = field(default_factory=list)
    first_token_at: float | None = None
    reasoning_started: float | None = None
    reasoning_ended: float | None = None
    finished_at: float | None = None
    finished_wall: float | None = None  # time.time() when the engine's last chunk arrived
    deltas: int = 0
    reasoning_chars: int = 0
    content_chars: int = 0
    usage: Usage | None = None
    finish_reason: str = ""
    error: str = ""

    def __post_init__(self) -> None:
        if not self.started:
            self.started = self.clock()

    @property
    def reasoning(self) -> str:
        if len(self.reasoning_parts) > 1:
            self.reasoning_parts[:] = ["".join(self.reasoning_parts)]
        return self.reasoning_parts[0] if self.reasoning_parts else ""

    @property
    def content(self) -> str:
        if len(self.content_parts) > 1:
            self.content_parts[:] = ["".join(self.content_parts)]
        return self.content_parts[0] if self.content_parts else ""

    @property
    def active(self) -> bool:
        return self.phase in (WAITING, THINKING, ANSWERING)

    def apply(self, event: ChatEvent) -> None:
        now = self.clock()
        if isinstance(event, ReasoningDelta | ContentDelta):
            self.deltas += 1
            if self.first_token_at is None:
                self.first_token_at = now
        if isinstance(event, ReasoningDelta):
            if self.reasoning_started is None:
                self.reasoning_started = now
            self.reasoning_parts.append(event.text)
            self.reasoning_chars += len(event.text)
            if self.phase == WAITING:
                self.phase = THINKING
        elif isinstance(event, ContentDelta):
            if self.reasoning_started is not None and self.reasoning_ended is None:
                self.reasoning_ended = now
            self.content_parts.append(event.text)
            self.content_chars += len(event.text)
            self.phase = ANSWERING
        elif isinstance(event, Usage):
            self.usage = event
        elif isinstance(event, Done):
            self.finish_reason = event.finish_reason
        elif isinstance(event, StreamError):
            self.error = event.message
            self._end(FAILED)

    def finish(self) -> None:
        """The stream ended normally."""
        if self.active:
            self._end(FINISHED)

    def stop(self) -> None:
        """The owner pressed Stop (or the page went away)."""
        if self.active:
            self._end(STOPPED)

    def _end(self, phase: str) -> None:
        now = self.clock()
        self.finished_at = now
        self.finished_wall = time.time()
        if self.reasoning_started is not None and self.reasoning_ended is None:
            self.reasoning_ended = now
        self.phase = phase

    # ------------------------------------------------------------------------------ numbers

    def visible_chars(self) -> int:
        """Characters the page renders: the thinking while it is open, then the answer."""
        return self.content_chars if self.phase == ANSWERING else self.reasoning_chars

    def thinking_seconds(self) -> float:
        if self.reasoning_started is None:
            return 0.0
        end = self.reasoning_ended if self.reasoning_ended is not None else self.clock()
        return max(0.0, end - self.reasoning_started)

    def ttft_seconds(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    def completion_tokens(self) -> int:
        return self.usage.completion_tokens if self.usage else self.deltas

    def tokens_per_second(self) -> float | None:
        if self.first_token_at is None:
            return None
        end = self.finished_at if self.finished_at is not None else self.clock()
        span = end - self.first_token_at
        tokens = self.completion_tokens()
        # The first token's arrival starts the clock, so it is not counted in the rate.
        return (tokens - 1) / span if span > 0 and tokens > 1 else None

    def stats(self) -> dict[str, Any]:
        """What is shown under the reply and stored with it."""
        ttft = self.ttft_seconds()
        rate = self.tokens_per_second()
        return {
            "level": self.level,
            "ttft_s": None if ttft is None else round(ttft, 3),
            "thinking_s": round(self.thinking_seconds(), 2),
            "tokens_per_s": None if rate is None else round(rate, 1),
            "prompt_tokens": self.usage.prompt_tokens if self.usage else None,
            "completion_tokens": self.completion_tokens(),
            "finish_reason": self.finish_reason,
            "finished_wall": self.finished_wall,
            "phase": self.phase,
        }


async def coalesce(
    events: AsyncIterator[ChatEvent],
    reply: Reply,
    *,
    interval_s: float = 0.05,
    per_kchar_s: float = 0.0,
    tick_s: float = 0.25,
) -> AsyncGenerator[Reply, None]:
    """Apply `events` to `reply` and yield it at most once per interval.

    The interval is `interval_s` plus `per_kchar_s` per 1,000 characters on screen. Never once
    per token: a browser re-rendering a message per token falls seconds behind at 300 tokens/s.
    While nothing arrives it still yields every `tick_s` so timers move. The final state is
    yielded at once, without waiting for the interval. Cancelling the consumer (Stop) cancels
    the reader, which closes `events` and with it the HTTP request.
    """
    changed = asyncio.Event()

    async def read() -> None:
        try:
            async for event in events:
                reply.apply(event)
                changed.set()
                if not reply.active:
                    break
        finally:
            await _aclose(events)
        reply.finish()
        changed.set()

    reader = asyncio.create_task(read())
    last: float | None = None
    try:
        while True:
            if last is not None:
                # Rate limit: let tokens pile up until the interval since the last update passed.
                interval = interval_s + per_kchar_s * reply.visible_chars() / 1000
                pause = interval - (time.monotonic() - last)
                if pause > 0:
                    await asyncio.wait({reader}, timeout=pause)
            if not reader.done():
                wait = asyncio.ensure_future(changed.wait())
                await asyncio.wait(
                    {wait, reader}, timeout=tick_s, return_when=asyncio.FIRST_COMPLETED
                )
                wait.cancel()
            if reader.done():
                if not reader.cancelled() and reader.exception() is not None:
                    reply.apply(StreamError(f"The chat stream failed: {reader.exception()}"))
                reply.finish()
                yield reply
                return
            changed.clear()
            last = time.monotonic()
            yield reply
    finally:
        if not reader.done():
            reply.stop()
            reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader


async def _aclose(events: AsyncIterator[ChatEvent]) -> None:
    close = getattr(events, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()
