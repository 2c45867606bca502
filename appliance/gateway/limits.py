"""Request limits: failed-authentication throttle per address, concurrency and rate per key,
what a forwarded body may ask of the engine, and how many connections one address may hold.

The throttles are pure and synchronous (the gateway's event loop is the only caller); clocks are
injectable so the tests drive time instead of sleeping. Every table is bounded, so a scan from
many addresses cannot grow memory without limit. `check_body` is pure too. `guarded_protocol`
is the one piece tied to the server: uvicorn's httptools protocol with a header read timeout and a
per-address connection cap, applied when a connection is accepted (before any ASGI code runs).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import resource
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from appliance.gateway.apis import MESSAGES, RESPONSES

# An address that sends this many bad or missing keys within the window is refused for the lockout
# time (429 with Retry-After), even with a good key; a good key clears its count.
AUTH_FAILURES_ALLOWED = 10
AUTH_FAILURE_WINDOW_S = 60.0
AUTH_LOCKOUT_S = 60.0
_MAX_TRACKED = 4096


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused and when to come back."""

    code: str
    message: str
    retry_after_s: int


class FailureThrottle:
    """Counts failed authentications per client address; blocks an address that keeps failing."""

    def __init__(
        self,
        allowed: int = AUTH_FAILURES_ALLOWED,
        window_s: float = AUTH_FAILURE_WINDOW_S,
        lockout_s: float = AUTH_LOCKOUT_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_tracked: int = _MAX_TRACKED,
    ) -> None:
        self.allowed = allowed
        self.window_s = window_s
        self.lockout_s = lockout_s
        self._clock = clock
        self._max = max_tracked
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._blocked_until: OrderedDict[str, float] = OrderedDict()

    def check(self, address: str) -> Refusal | None:
        """A refusal while the address is locked out, else None."""
        until = self._blocked_until.get(address)
        if until is None:
            return None
        remaining = until - self._clock()
        if remaining <= 0:
            del self._blocked_until[address]
            return None
        return Refusal(
            "too_many_failed_authentications",
            f"Too many requests with a wrong or missing API key from {address}; "
            f"try again in {math.ceil(remaining)} s with a valid key.",
            max(1, math.ceil(remaining)),
        )

    def failed(self, address: str) -> None:
        now = self._clock()
        times = self._failures.pop(address, None) or deque()
        times.append(now)
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if len(times) >= self.allowed:
            self._blocked_until[address] = now + self.lockout_s
            self._blocked_until.move_to_end(address)
            times.clear()
        else:
            self._failures[address] = times
        _trim(self._failures, self._max)
        _trim(self._blocked_until, self._max)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)


class KeyLimiter:
    """Per-principal (key id, or address without a key) concurrency cap and requests per minute."""

    def __init__(
        self,
        concurrency: int,
        per_minute: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_tracked: int = _MAX_TRACKED,
    ) -> None:
        self.concurrency = concurrency
        self.per_minute = per_minute
        self._clock = clock
        self._max = max_tracked
        self._running: dict[str, int] = {}
        self._recent: OrderedDict[str, deque[float]] = OrderedDict()

    def configure(self, concurrency: int, per_minute: int) -> None:
        self.concurrency = concurrency
        self.per_minute = per_minute

    def acquire(self, principal: str) -> Refusal | None:
        """Admit one request (call `release` when it ends) or say why not. 0 disables a limit."""
        running = self._running.get(principal, 0)
        if self.concurrency > 0 and running >= self.concurrency:
            return Refusal(
                "concurrency_limit_exceeded",
                f"This key already has {running} requests running (limit {self.concurrency}); "
                "wait for one to finish.",
                1,
            )
        now = self._clock()
        recent = self._recent.pop(principal, None) or deque()
        while recent and recent[0] <= now - 60.0:
            recent.popleft()
        if self.per_minute > 0 and len(recent) >= self.per_minute:
            self._recent[principal] = recent
            wait = max(1, math.ceil(recent[0] + 60.0 - now))
            return Refusal(
                "rate_limit_exceeded",
                f"This key sent {len(recent)} requests in the last minute (limit "
                f"{self.per_minute} per minute); try again in {wait} s.",
                wait,
            )
        recent.append(now)
        self._recent[principal] = recent
        _trim(self._recent, self._max)
        self._running[principal] = running + 1
        return None

    def release(self, principal: str) -> None:
        left = self._running.get(principal, 0) - 1
        if left > 0:
            self._running[principal] = left
        else:
            self._running.pop(principal, None)

    def running(self, principal: str) -> int:
        return self._running.get(principal, 0)


def _trim(table: OrderedDict[str, Any], limit: int) -> None:
    while len(table) > limit:
        table.popitem(last=False)


# ------------------------------------------------------------------------- request bodies
#
# What a LAN client may ask the engine to do. The gateway forwards the JSON body as it came, so
# every field vLLM acts on is reachable by anyone holding a key (or anyone on loopback when keys
# are off). Fields and content parts named below come from vLLM 0.32's own source:
# vllm/entrypoints/openai/chat_completion/protocol.py (ChatCompletionRequest),
# vllm/entrypoints/openai/completion/protocol.py (CompletionRequest),
# vllm/renderers/chat_utils.py (MM_PARSER_MAP, _parse_chat_message_content_mm_part) and
# vllm/sampling_params.py. Values that are not numbers are left to vLLM's own validation.
#
# The agent routes reach the same chat machinery: vLLM turns a Messages request into a chat
# completion (vllm/entrypoints/anthropic/serving.py to_chat_completion_request: an image block's
# `source` becomes an `image_url` part, a URL source fetched like any other,
# _convert_image_source_to_url), and a Responses request's `input` items into chat messages
# (openai/responses/utils.py construct_input_messages: a message's `content` parts, and a
# function_call_output's `output` parts, go to chat_utils' parsers: `input_image` fetches its
# `image_url`). The engine-side fields above are fields of both request models too.

MAX_N = 4  # vLLM's own ceiling is VLLM_MAX_N_SEQUENCES (sampling_params._verify_num_sequences)
MAX_OUTPUT_TOKENS = 262_144  # Step-3.7-Flash's context; vLLM refuses more than max_model_len too
MAX_LOGPROBS = 20  # OpenAI's top_logprobs maximum and vLLM's default --max-logprobs
MAX_STOP_STRINGS = 4  # vLLM's default VLLM_MAX_STOP_STRINGS (generate/base/protocol.py StopParam)
MAX_TOKEN_LISTS = 1024  # allowed_token_ids, stop_token_ids, bad_words, logprob_token_ids
MAX_LOGIT_BIAS = 300  # OpenAI's documented limit for logit_bias entries
MAX_MESSAGES = 4096
MAX_PROMPTS = 16  # /v1/completions: a list of prompts is that many requests at once
MAX_SCHEMA_BYTES = 64 << 10  # structured outputs: regex / grammar / JSON schema text
DEFAULT_MAX_IMAGES = 8  # the chat's limit (engine.max_images_per_prompt's default)
# Decoding costs width x height x 3 bytes whatever the file size: a one-colour PNG of 20,000 x
# 20,000 is a megabyte to send and 1.2 GB to decode. vLLM's own guard is VLLM_MAX_IMAGE_PIXELS
# (178,956,970, vllm/envs.py); the chat's is 40 MP (appliance/chat/client.py MAX_IMAGE_PIXELS).
MAX_IMAGE_PIXELS = 40_000_000
_SNIFF_CHARS = 256 << 10  # base64 characters decoded to find an image's size (192 KiB)

# Fields refused whatever their value (None and empty are let through: SDKs send defaults).
REFUSED_FIELDS: dict[str, str] = {
    # A Jinja template from the client, rendered in the engine. vLLM refuses it too unless
    # --trust-request-chat-template (chat_completion/serving.py), which the appliance never sets.
    "chat_template": "a chat template from the client is rendered in the engine",
    # Passed to the media connectors (video frame counts, audio decoding): memory per request.
    "media_io_kwargs": "it sets how the engine decodes media (frames, sizes)",
    # Passed to the Hugging Face processor: e.g. a larger max_pixels makes one image cost more.
    "mm_processor_kwargs": "it changes how the engine's image processor sizes inputs",
    # Disaggregated serving internals (KV / encoder-cache transfer between engines).
    "kv_transfer_params": "it is for engine-to-engine transfer, not clients",
    "ec_transfer_params": "it is for engine-to-engine transfer, not clients",
    # Free-form parameters for custom extensions of the engine.
    "vllm_xargs": "it passes free-form parameters to engine extensions",
    # Older vLLM accepted logits processors by qualified name from the request.
    "logits_processors": "it loads code in the engine by name",
    # Tensors deserialised by the engine (torch.load; CVE-2025-62164 in vLLM < 0.11.1).
    "prompt_embeds": "the engine deserialises tensors from it",
    # [prompt length x k] log-probabilities are allocated up front; vocabulary-wide with -1
    # (an OOM reported against vLLM: local-inference-lab/vllm#264).
    "prompt_logprobs": "its memory grows with the prompt length times k",
}
# Content parts that carry tensors or Python objects rather than text or media data
# (vllm/renderers/chat_utils.py: image_embeds/audio_embeds/video_embeds need
# --enable-mm-embeds; prompt_embeds is torch.load-ed; image_pil is a Python object).
REFUSED_PARTS = frozenset(
    {"image_embeds", "audio_embeds", "video_embeds", "prompt_embeds", "image_pil"}
)
# Content parts whose URL the engine fetches (MediaConnector.fetch_image/_audio/_video): any
# http(s) URL, on the LAN or the Internet; file:// with --allowed-local-media-path.
URL_PARTS = {
    "image_url": "image",
    "input_image": "image",
    "audio_url": "audio",
    "video_url": "video",
}
CHAT_TEMPLATE_KWARGS = frozenset({"enable_thinking", "thinking", "reasoning_effort"})
_STRUCTURED_FIELDS = ("structured_outputs", "response_format", "guided_json", "guided_regex",
                      "guided_grammar", "guided_choice")  # fmt: skip


@dataclass(frozen=True)
class BodyCaps:
    """The caps a request body is held to (the gateway's config carries one)."""

    max_n: int = MAX_N
    max_output_tokens: int = MAX_OUTPUT_TOKENS
    max_images: int = DEFAULT_MAX_IMAGES


@dataclass(frozen=True)
class BodyRefusal:
    """A 400 for one field: its OpenAI `param` path, a code and what to send instead."""

    param: str
    code: str
    message: str


def check_body(route: str, payload: dict[str, Any], caps: BodyCaps) -> BodyRefusal | None:
    """The first reason this body (any POST route) must not reach the engine, or None."""
    for name, why in REFUSED_FIELDS.items():
        value = payload.get(name)
        if value is None or value in ({}, [], "") or (name == "prompt_logprobs" and value == 0):
            continue
        return BodyRefusal(
            name,
            "field_not_allowed",
            f"`{name}` is not accepted by this gateway ({why}). Remove it from the request.",
        )
    refusal = _check_numbers(payload, caps) or _check_lists(payload) or _check_structured(payload)
    if refusal is not None:
        return refusal
    kwargs = payload.get("chat_template_kwargs")
    if isinstance(kwargs, dict):
        for key, value in kwargs.items():
            if key not in CHAT_TEMPLATE_KWARGS or isinstance(value, (dict, list)):
                allowed = ", ".join(sorted(CHAT_TEMPLATE_KWARGS))
                return BodyRefusal(
                    f"chat_template_kwargs.{str(key)[:64]}",
                    "field_not_allowed",
                    f"`chat_template_kwargs` may only set {allowed} (to a plain value) through "
                    "this gateway; use `reasoning_effort` for the reasoning level.",
                )
    if route == MESSAGES:
        return _check_messages(payload.get("messages"), caps) or _check_anthropic(
            payload.get("messages"), caps
        )
    if route == RESPONSES:
        return _check_responses_input(payload.get("input"), caps)
    if "messages" in payload:
        return _check_messages(payload.get("messages"), caps)
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) > MAX_PROMPTS:
            return BodyRefusal(
                "prompt",
                "too_many_prompts",
                f"`prompt` holds {len(prompt)} prompts; this gateway accepts at most "
                f"{MAX_PROMPTS} per request. Send them in several requests.",
            )
    return None


def _number(value: Any) -> float | None:  # noqa: ANN401 - any JSON value
    """A JSON value as vLLM's (lax) schema would read it as a number, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value.strip())
    return None


def _check_numbers(payload: dict[str, Any], caps: BodyCaps) -> BodyRefusal | None:
    limits: list[tuple[str, float, str]] = [
        ("n", caps.max_n, "Ask for fewer choices, or send several requests."),
        ("best_of", caps.max_n, "Ask for fewer candidates."),
        (
            "max_tokens",
            caps.max_output_tokens,
            "Ask for fewer tokens: no answer is longer than the engine's context length "
            "(`engine.max_model_len`).",
        ),
        ("max_completion_tokens", caps.max_output_tokens, "Ask for fewer tokens."),
        ("max_output_tokens", caps.max_output_tokens, "Ask for fewer tokens."),
        ("min_tokens", caps.max_output_tokens, "Ask for fewer tokens."),
        ("top_logprobs", MAX_LOGPROBS, "Ask for fewer log-probabilities."),
    ]
    if not isinstance(payload.get("logprobs"), bool):  # /v1/completions: logprobs is a count
        limits.append(("logprobs", MAX_LOGPROBS, "Ask for fewer log-probabilities."))
    for name, limit, advice in limits:
        value = _number(payload.get(name))
        if value is None:
            continue
        if value < 0 or value > limit:
            return BodyRefusal(
                name,
                "value_above_limit",
                f"`{name}` is {payload.get(name)!r}; this gateway accepts 0 to {int(limit)}. "
                + advice,
            )
    return None


def _check_lists(payload: dict[str, Any]) -> BodyRefusal | None:
    stop = payload.get("stop")
    if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
        return BodyRefusal(
            "stop",
            "too_many_items",
            f"`stop` has {len(stop)} strings; at most {MAX_STOP_STRINGS} are accepted.",
        )
    for name in ("allowed_token_ids", "stop_token_ids", "bad_words", "logprob_token_ids"):
        items = payload.get(name)
        if isinstance(items, list) and len(items) > MAX_TOKEN_LISTS:
            return BodyRefusal(
                name,
                "too_many_items",
                f"`{name}` has {len(items)} items; at most {MAX_TOKEN_LISTS} are accepted.",
            )
    bias = payload.get("logit_bias")
    if isinstance(bias, dict) and len(bias) > MAX_LOGIT_BIAS:
        return BodyRefusal(
            "logit_bias",
            "too_many_items",
            f"`logit_bias` has {len(bias)} entries; at most {MAX_LOGIT_BIAS} are accepted.",
        )
    return None


def _check_structured(payload: dict[str, Any]) -> BodyRefusal | None:
    # Regular expressions and grammars are compiled in the engine per request; a large one costs
    # compile time and memory before the first token. The agent APIs name theirs apart:
    # Responses `text.format` (responses/protocol.py extract_structured_outputs) and Messages
    # `output_config.format` (anthropic/serving.py _handle_output_config).
    fields = [(name, payload.get(name)) for name in _STRUCTURED_FIELDS]
    for outer in ("text", "output_config"):
        holder = payload.get(outer)
        fields.append(
            (f"{outer}.format", holder.get("format") if isinstance(holder, dict) else None)
        )
    for name, value in fields:
        if value is None:
            continue
        size = len(json.dumps(value)) if not isinstance(value, str) else len(value)
        if size > MAX_SCHEMA_BYTES:
            return BodyRefusal(
                name,
                "value_too_large",
                f"`{name}` is {size} characters; at most {MAX_SCHEMA_BYTES} are accepted. Send "
                "a smaller schema, regular expression or grammar.",
            )
    return None


def _check_messages(
    messages: Any,  # noqa: ANN401 - any JSON value
    caps: BodyCaps,
    name: str = "messages",
    fields: tuple[str, ...] = ("content",),
) -> BodyRefusal | None:
    """Each item's content parts (`fields` of each item that hold a list of parts)."""
    if not isinstance(messages, list):
        return None  # vLLM's schema refuses it
    if len(messages) > MAX_MESSAGES:
        return BodyRefusal(
            name,
            "too_many_items",
            f"`{name}` has {len(messages)} items; at most {MAX_MESSAGES} are accepted.",
        )
    images = 0
    for i, message in enumerate(messages):
        for field_name in fields:
            content = message.get(field_name) if isinstance(message, dict) else None
            if not isinstance(content, list):
                continue
            for j, part in enumerate(content):
                if not isinstance(part, dict):
                    continue
                where = f"{name}[{i}].{field_name}[{j}]"
                refusal, kind = _check_part(part, where)
                if refusal is not None:
                    return refusal
                if kind == "image":
                    images += 1
                    if images > caps.max_images:
                        return _too_many_images(where, caps)
    return None


def _too_many_images(where: str, caps: BodyCaps) -> BodyRefusal:
    return BodyRefusal(
        where,
        "too_many_images",
        f"The request has more than {caps.max_images} images; this appliance "
        f"accepts at most {caps.max_images} per request (the owner sets it with "
        "`step-station config set engine.max_images_per_prompt N`).",
    )


def _check_responses_input(value: Any, caps: BodyCaps) -> BodyRefusal | None:  # noqa: ANN401
    """`/v1/responses`: message items' `content` and function_call_output items' `output`."""
    return _check_messages(value, caps, "input", ("content", "output"))


def _check_anthropic(messages: Any, caps: BodyCaps) -> BodyRefusal | None:  # noqa: ANN401
    """`/v1/messages`: image blocks, in a message or inside a tool_result, only as base64."""
    if not isinstance(messages, list):
        return None
    images = 0
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for j, block in enumerate(content):
            if not isinstance(block, dict):
                continue
            inner = block.get("content") if block.get("type") == "tool_result" else None
            nested = [(f"[{k}]", b) for k, b in enumerate(inner)] if isinstance(inner, list) else []
            for suffix, item in [("", block), *((f".content{s}", b) for s, b in nested)]:
                if not isinstance(item, dict) or item.get("type") != "image":
                    continue
                where = f"messages[{i}].content[{j}]{suffix}"
                refusal = _check_image_source(item.get("source"), where)
                if refusal is not None:
                    return refusal
                images += 1
                if images > caps.max_images:
                    return _too_many_images(where, caps)
    return None


def _check_image_source(source: Any, where: str) -> BodyRefusal | None:  # noqa: ANN401
    if not isinstance(source, dict):
        return None  # vLLM's schema (a dict) or its converter decides
    if source.get("type") == "url":
        shown = json.dumps(source.get("url"))[:80]
        return BodyRefusal(
            f"{where}.source",
            "media_url_not_allowed",
            f"`{where}.source` is a URL ({shown}): this gateway accepts images only inline, as "
            '`{"type": "base64", "media_type": "image/png", "data": "..."}`; the engine never '
            "fetches URLs for clients. Download the image and send its bytes.",
        )
    data, media = source.get("data"), source.get("media_type", "image/jpeg")
    if not isinstance(data, str) or not isinstance(media, str):
        return None
    # vLLM builds `data:{media_type};base64,{data}` from the block and decodes that.
    size = image_size(f"data:{media};base64,{data[:_SNIFF_CHARS]}")
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        return BodyRefusal(
            f"{where}.source.data",
            "image_too_large",
            f"The image at `{where}` is {size[0]} x {size[1]} pixels; this gateway accepts at "
            f"most {MAX_IMAGE_PIXELS // 1_000_000} megapixels per image (the model sees far "
            "fewer). Resize it before sending.",
        )
    return None


def _check_part(part: dict[str, Any], where: str) -> tuple[BodyRefusal | None, str]:
    if part.get("uuid") is not None:
        # vLLM keys its media cache by a client's uuid instead of the content's hash, and an
        # item with a uuid and no data is served from that cache: another client's image. And a
        # part with a uuid is read by its keys whatever its `type` (chat_utils.py:1714,1727):
        # `{"type": "text", "uuid": "u", "image_url": "http://..."}` is an image URL to fetch.
        return BodyRefusal(
            f"{where}.uuid",
            "field_not_allowed",
            "`uuid` on a content part is not accepted by this gateway (the engine would cache "
            "media under a name of the client's choosing, and read the part as media whatever "
            "its type). Remove it.",
        ), ""
    kind = part.get("type")
    if kind is None:  # vLLM guesses the type from the first media key it finds
        kind = next((key for key in URL_PARTS if key in part), None)
        kind = kind or next((key for key in REFUSED_PARTS if key in part), None)
    if not isinstance(kind, str):
        return None, ""
    if kind in REFUSED_PARTS:
        return BodyRefusal(
            f"{where}.type",
            "content_part_not_allowed",
            f"Content parts of type `{kind}` are not accepted by this gateway (the engine would "
            "deserialise tensors or objects from them). Send images as `image_url` parts with "
            "a base64 `data:` URL.",
        ), ""
    modality = URL_PARTS.get(kind)
    if modality is None:
        return None, ""
    field_name = "image_url" if kind == "input_image" else kind
    value = part.get(field_name)
    url = value.get("url") if isinstance(value, dict) else value
    path = f"{where}.{field_name}" + (".url" if isinstance(value, dict) else "")
    if not isinstance(url, str) or url[:5].lower() != "data:":
        example = {"image": "image/png", "audio": "audio/wav", "video": "video/mp4"}[modality]
        shown = url[:80] if isinstance(url, str) else json.dumps(url)[:80]
        return BodyRefusal(
            path,
            "media_url_not_allowed",
            f"`{path}` is {shown!r}: this gateway accepts {modality}s only inline, as a base64 "
            f"data URL (`data:{example};base64,...`); the engine never fetches URLs for "
            "clients. Download the file and send its bytes in the data URL.",
        ), modality
    size = image_size(url) if modality == "image" else None
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        return BodyRefusal(
            path,
            "image_too_large",
            f"The image at `{path}` is {size[0]} x {size[1]} pixels; this gateway accepts at "
            f"most {MAX_IMAGE_PIXELS // 1_000_000} megapixels per image (the model sees far "
            "fewer). Resize it before sending.",
        ), modality
    return None, modality


def image_size(data_url: str) -> tuple[int, int] | None:
    """(width, height) from a base64 data URL's PNG, GIF, BMP, WebP or JPEG header; None when
    the header is not one of those or not within the first 192 KiB (vLLM decides then)."""
    head, _, data = data_url[:_SNIFF_CHARS].partition(",")
    if not head.lower().endswith(";base64"):
        return None
    data = "".join(data.split())
    try:
        raw = base64.b64decode(data[: len(data) // 4 * 4])
    except (binascii.Error, ValueError):
        return None
    if raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR":
        return _u32be(raw, 16), _u32be(raw, 20)
    if raw[:6] in (b"GIF87a", b"GIF89a"):
        return int.from_bytes(raw[6:8], "little"), int.from_bytes(raw[8:10], "little")
    if raw[:2] == b"BM" and len(raw) >= 26:
        width = int.from_bytes(raw[18:22], "little", signed=True)
        height = int.from_bytes(raw[22:26], "little", signed=True)
        return abs(width), abs(height)
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return _webp_size(raw)
    if raw[:2] == b"\xff\xd8":
        return _jpeg_size(raw)
    return None


def _u32be(raw: bytes, at: int) -> int:
    return int.from_bytes(raw[at : at + 4], "big")


def _webp_size(raw: bytes) -> tuple[int, int] | None:
    kind = raw[12:16]
    if kind == b"VP8X" and len(raw) >= 30:
        return 1 + int.from_bytes(raw[24:27], "little"), 1 + int.from_bytes(raw[27:30], "little")
    if kind == b"VP8L" and len(raw) >= 25:
        bits = int.from_bytes(raw[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if kind == b"VP8 " and len(raw) >= 30:
        width = int.from_bytes(raw[26:28], "little") & 0x3FFF
        return width, int.from_bytes(raw[28:30], "little") & 0x3FFF
    return None


def _jpeg_size(raw: bytes) -> tuple[int, int] | None:
    at = 2
    while at + 9 < len(raw):
        if raw[at] != 0xFF:
            return None
        marker = raw[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            at += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            height = int.from_bytes(raw[at + 5 : at + 7], "big")
            width = int.from_bytes(raw[at + 7 : at + 9], "big")
            return width, height
        at += 2 + int.from_bytes(raw[at + 2 : at + 4], "big")
    return None


# ----------------------------------------------------------------------------- connections
#
# uvicorn (0.54) has no header read timeout: its keep-alive timer is armed only after a response,
# so a connection that sends nothing, or one header byte every few seconds, is held for ever
# (uvicorn/protocols/http/httptools_impl.py: connection_made arms nothing; data_received cancels
# the keep-alive timer). `limit_concurrency` answers 503 only once a request's headers are in, so
# it does not bound idle sockets either. Both are added here, at accept time.

HEADER_TIMEOUT_S = 10.0
MAX_CONNECTIONS_PER_ADDRESS = 64
MAX_CONNECTIONS = 4096  # every address together; also bounded by the open-file limit

_log = logging.getLogger("step_station.gateway")


class ConnectionGuard:
    """Open connections per client address, and the limits new ones are held to."""

    def __init__(
        self,
        per_address: int = MAX_CONNECTIONS_PER_ADDRESS,
        header_timeout_s: float = HEADER_TIMEOUT_S,
        total: int = MAX_CONNECTIONS,
    ) -> None:
        self.per_address = per_address
        self.header_timeout_s = header_timeout_s
        self.total = total
        self._open: dict[str, int] = {}
        self._count = 0
        self.refused = 0  # connections closed at accept (for logs and tests)
        self.warned_at = -math.inf  # when a refusal was last logged

    def configure(self, per_address: int, header_timeout_s: float) -> None:
        self.per_address = per_address
        self.header_timeout_s = header_timeout_s

    def open_count(self, address: str | None = None) -> int:
        return self._count if address is None else self._open.get(address, 0)

    def admit(self, address: str) -> str:
        """'' when the connection may stay (count it; call `release`), else why it may not."""
        held = self._open.get(address, 0)
        if self.per_address > 0 and held >= self.per_address:
            return (
                f"{address} already has {held} connections open to this gateway (limit "
                f"{self.per_address}). Close idle connections or reuse them (keep-alive); the "
                "owner can raise it with `step-station config set "
                "gateway.max_connections_per_address N`."
            )
        if self.total > 0 and self._count >= self.total:
            return (
                f"The gateway has {self._count} connections open (limit {self.total}); try "
                "again shortly."
            )
        self._open[address] = held + 1
        self._count += 1
        return ""

    def release(self, address: str) -> None:
        left = self._open.get(address, 0) - 1
        if left > 0:
            self._open[address] = left
        else:
            self._open.pop(address, None)
        self._count = max(0, self._count - 1)


def raise_open_file_limit(wanted: int = 65536) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards the hard limit; the soft limit after.

    Each connection is a file descriptor, and the UI shares the gateway's process: with the usual
    soft limit of 1,024 a thousand idle sockets would leave the UI unable to accept or open files.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return int(soft)


def _canned(status: int, reason: str, code: str, message: str) -> bytes:
    body = json.dumps(
        {
            "error": {
                "message": message,
                "type": "rate_limit_error" if status == 429 else "invalid_request_error",
                "param": None,
                "code": code,
            }
        }
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n"
    )
    if status == 429:
        head += "retry-after: 5\r\n"
    return head.encode() + b"\r\n" + body


def guarded_protocol(guard: ConnectionGuard) -> type[asyncio.Protocol]:  # noqa: C901
    """uvicorn's httptools protocol held to `guard`: pass the result as `uvicorn.Config(http=)`."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _address = ""
        _admitted = False
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._address = self.client[0] if self.client else "?"
            why = guard.admit(self._address)
            if why:
                guard.refused += 1
                now = time.monotonic()
                if now - guard.warned_at >= 60.0:  # one line a minute, not one per socket
                    guard.warned_at = now
                    _log.warning(
                        "gateway: connections from %s refused (too many open; %d refused so far)",
                        self._address,
                        guard.refused,
                    )
                transport.write(_canned(429, "Too Many Requests", "too_many_connections", why))
                transport.close()
                return
            self._admitted = True
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            if self._admitted:
                self._admitted = False
                guard.release(self._address)
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_timer is None:
                self._arm_header_timer()  # the next request on a kept-alive connection

        def on_headers_complete(self) -> None:
            self._disarm_header_timer()
            super().on_headers_complete()

        def _arm_header_timer(self) -> None:
            if guard.header_timeout_s > 0:
                self._header_timer = self.loop.call_later(
                    guard.header_timeout_s, self._headers_late
                )

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is None or self.cycle.response_complete:
                message = (
                    f"The request headers did not arrive within {guard.header_timeout_s:g} s; "
                    "the connection is closed. Send the whole request head at once."
                )
                self.transport.write(_canned(408, "Request Timeout", "request_timeout", message))
            self.transport.close()

    return GuardedHttpToolsProtocol
