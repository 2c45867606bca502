"""`/v1/messages` (Anthropic's Messages API) and `/v1/responses` (OpenAI's Responses API).

vLLM 0.32 serves both by turning the request into a chat completion and the chat answer back
(`vllm/entrypoints/anthropic/serving.py` to_chat_completion_request, messages_full_converter,
message_stream_converter; `vllm/entrypoints/openai/responses/serving.py`), so the simulator does
the same on top of its own chat: the reply echoes what it received (text, images, the tool's
result) and a request with `tools` gets a tool call back, as the chat's does. Shapes and event
order are those real vLLM 0.32 answered here (tiny-std model, recorded 2026-12-06):

- Messages: `{"id", "type": "message", "role", "content": [thinking, text | tool_use...],
  "model", "stop_reason", "usage": {"input_tokens", "output_tokens"}}`; a stream is
  `event: <type>\\ndata: {...}` from `message_start` (input tokens) through content blocks to
  `message_delta` (stop reason, final usage) and `message_stop`. Errors from the handler are
  `{"type": "error", "error": {"type", "message"}}`; a request the schema refuses (no
  `max_tokens`) is FastAPI's OpenAI-shaped 400, as vLLM's.
- Responses: a `response` object whose `output` holds reasoning, message and function_call
  items and whose `usage` is `{input_tokens, output_tokens, total_tokens, ...}`; a stream runs
  `response.created`, `response.in_progress`, per item `output_item.added` ... `output_item.done`,
  then `response.completed` with the whole response. No `[DONE]` in either.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from appliance.simulator.completions import Completions
from appliance.simulator.errors import DICT_MSG, ApiError, validation_error
from appliance.simulator.http import Response, StreamResponse
from appliance.simulator.prompts import read_chat, reasoning_level

Result = Response | StreamResponse
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def _hex() -> str:
    return uuid.uuid4().hex[:16]


def _event(kind: str, payload: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


Chunks = AsyncGenerator[dict[str, Any] | None, None]


async def _chat_chunks(stream: StreamResponse) -> Chunks:
    """The chat stream's events as JSON (None for `[DONE]`); closing this closes the chat's
    stream, so a client that leaves aborts the request in the engine as with the chat."""
    pending = b""
    try:
        async for data in stream.chunks:
            pending += data
            *events, pending = pending.split(b"\n\n")
            for event in events:
                text = event.decode().removeprefix("data: ").strip()
                if text:
                    yield None if text == "[DONE]" else json.loads(text)
    finally:
        aclose = getattr(stream.chunks, "aclose", None)
        if aclose is not None:
            await aclose()


class AgentApis:
    """The two agent routes on top of the simulator's chat completions."""

    def __init__(self, completions: Completions, image_limit: int | None) -> None:
        self.completions = completions
        self.image_limit = image_limit

    def _prompt_tokens(self, chat: dict[str, Any]) -> int:
        return read_chat(chat, reasoning_level(chat), self.image_limit).tokens

    # ------------------------------------------------------------------------------ Messages

    async def messages(self, body: Any) -> Result:  # noqa: ANN401 - any JSON value
        if not isinstance(body, dict):
            raise validation_error("body", DICT_MSG, body, "dict_type")
        for name in ("model", "messages", "max_tokens"):
            if name not in body:  # AnthropicMessagesRequest's required fields (FastAPI's 400)
                raise validation_error(name, "Field required", body, "missing")
        max_tokens = body["max_tokens"]
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise validation_error(
                "max_tokens", "Value error, max_tokens must be positive", max_tokens, "value_error"
            )
        chat = _converted(anthropic_to_chat, body)
        try:
            result = await self.completions.chat(chat)
            prompt_tokens = self._prompt_tokens(chat)
        except ApiError as err:  # vLLM's handler: the chat's error in Anthropic's shape
            error = err.body()["error"]
            detail = {"type": error["type"], "message": error["message"]}
            return Response.json({"type": "error", "error": detail}, err.status)
        if isinstance(result, StreamResponse):
            return StreamResponse(_message_events(_chat_chunks(result), prompt_tokens))
        return Response.json(_message_of(json.loads(result.body)))

    # ----------------------------------------------------------------------------- Responses

    async def responses(self, body: Any) -> Result:  # noqa: ANN401 - any JSON value
        if not isinstance(body, dict):
            raise validation_error("body", DICT_MSG, body, "dict_type")
        if "input" not in body:
            raise validation_error("input", "Field required", body, "missing")
        chat = _converted(responses_to_chat, body)
        result = await self.completions.chat(chat)
        prompt_tokens = self._prompt_tokens(chat)
        shell = _response_shell(body, str(chat.get("model") or self.completions.args.served_name))
        if isinstance(result, StreamResponse):
            return StreamResponse(_response_events(_chat_chunks(result), shell, prompt_tokens))
        reply = json.loads(result.body)
        choice = reply["choices"][0]
        message = choice["message"]
        items: list[dict[str, Any]] = []
        if message.get("reasoning"):
            items.append(_reasoning_item(f"rs_{_hex()}", message["reasoning"], None))
        if message.get("content"):
            items.append(_message_item(f"msg_{_hex()}", message["content"], "completed"))
        for call in message.get("tool_calls") or []:
            fn = call["function"]
            items.append(_call_item(f"fc_{_hex()}", call["id"], fn["name"], fn["arguments"]))
        usage = reply["usage"]
        return Response.json(
            _finished(shell, items, usage["prompt_tokens"], usage["completion_tokens"], choice)
        )


def _converted(convert: Callable[[dict[str, Any]], dict[str, Any]], body: dict[str, Any]) -> Any:
    """The request as a chat request; a body of the wrong shape is the 400 vLLM's request model
    gives (pydantic refuses it before the handler runs), never a crash."""
    try:
        return convert(body)
    except (AttributeError, TypeError, KeyError, ValueError) as err:
        message = f"Input is not a valid request: {err}"
        raise validation_error("body", message, body, "model_type") from None


# ---------------------------------------------------------------------------- Messages parts


def anthropic_to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """vLLM's to_chat_completion_request, the parts the simulator's chat reads."""
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if isinstance(system, list):
        system = "".join(str(b.get("text", "")) for b in system if isinstance(b, dict))
    if system:
        messages.append({"role": "system", "content": system})
    for message in body.get("messages") or []:
        _add_anthropic_message(message, messages)
    chat_body: dict[str, Any] = {
        "model": body.get("model"),
        "messages": messages,
        "max_tokens": body.get("max_tokens"),
    }
    for name, chat_name in (("temperature", "temperature"), ("top_p", "top_p"),
                            ("top_k", "top_k"), ("stop_sequences", "stop")):  # fmt: skip
        if body.get(name) is not None:
            chat_body[chat_name] = body[name]
    effort = (body.get("output_config") or {}).get("effort")
    if effort is not None:
        chat_body["reasoning_effort"] = effort
    tools = body.get("tools")
    if tools:
        chat_body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": tool.get("name"),
                    "description": tool.get("description"),
                    "parameters": tool.get("input_schema") or {"type": "object"},
                },
            }
            for tool in tools
            if isinstance(tool, dict)
        ]
        chat_body["tool_choice"] = _anthropic_tool_choice(body.get("tool_choice"))
    if body.get("stream"):
        chat_body["stream"] = True
        chat_body["stream_options"] = {"include_usage": True}
    return chat_body


def _add_anthropic_message(message: Any, messages: list[dict[str, Any]]) -> None:  # noqa: ANN401
    """One Anthropic message as chat messages (a tool_result is a `tool` message of its own)."""
    if not isinstance(message, dict):
        raise validation_error("messages", DICT_MSG, message, "dict_type")
    content = message.get("content")
    if not isinstance(content, list):
        messages.append({"role": message.get("role"), "content": content})
        return
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block)}})
        elif kind == "tool_use":
            arguments = json.dumps(block.get("input") or {})
            calls.append(
                {
                    "id": block.get("id") or f"call_{int(time.time())}",
                    "type": "function",
                    "function": {"name": block.get("name") or "", "arguments": arguments},
                }
            )
        elif kind == "tool_result":
            result = block.get("content")
            if isinstance(result, list):
                result = "\n".join(str(i.get("text", "")) for i in result if isinstance(i, dict))
            messages.append(
                {"role": "tool", "tool_call_id": block.get("tool_use_id") or "",
                 "content": str(result or "")}
            )  # fmt: skip
    if parts or calls:
        chat: dict[str, Any] = {"role": message.get("role"), "content": parts or None}
        if calls:
            chat["tool_calls"] = calls
        messages.append(chat)


def _image_url(block: dict[str, Any]) -> str:
    """vLLM's _convert_image_source_to_url: a URL source as it is, else a base64 data URL."""
    source = block.get("source") or {}
    if source.get("type") == "url":
        return str(source.get("url", ""))
    return f"data:{source.get('media_type', 'image/jpeg')};base64,{source.get('data', '')}"


def _anthropic_tool_choice(choice: Any) -> Any:  # noqa: ANN401 - any JSON value
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return {"any": "required", "none": "none"}.get(str(kind), "auto")


def _message_of(reply: dict[str, Any]) -> dict[str, Any]:
    """messages_full_converter: thinking, text, then each tool call as a tool_use block."""
    choice = reply["choices"][0]
    message = choice["message"]
    content: list[dict[str, Any]] = []
    if message.get("reasoning"):
        content.append(
            {"type": "thinking", "thinking": message["reasoning"], "signature": uuid.uuid4().hex}
        )
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        fn = call["function"]
        content.append(
            {"type": "tool_use", "id": call["id"], "name": fn["name"],
             "input": json.loads(fn["arguments"])}
        )  # fmt: skip
    usage = reply["usage"]
    return {
        "id": reply["id"],
        "type": "message",
        "role": "assistant",
        "content": content or [{"type": "text", "text": ""}],
        "model": reply["model"],
        "stop_reason": _STOP_REASONS.get(choice["finish_reason"], "end_turn"),
        "usage": {
            "input_tokens": usage["prompt_tokens"],
            "output_tokens": usage["completion_tokens"],
        },
    }


async def _message_events(  # noqa: C901 - one state machine, as vLLM's converter
    chunks: Chunks, prompt_tokens: int
) -> AsyncIterator[bytes]:
    """message_stream_converter: chat chunks to Anthropic's content-block events."""
    block: dict[str, Any] = {"type": None, "index": -1, "id": None}
    finish = "stop"

    def close() -> list[bytes]:
        out: list[bytes] = []
        if block["type"] is None:
            return out
        if block["type"] == "thinking":
            delta = {"type": "signature_delta", "signature": uuid.uuid4().hex}
            out.append(_delta_event(delta, block["index"]))
        out.append(_event("content_block_stop", {"type": "content_block_stop",
                                                 "index": block["index"]}))  # fmt: skip
        block.update(type=None, id=None)
        return out

    def open_block(content_block: dict[str, Any]) -> list[bytes]:
        out = close()
        block.update(type=content_block["type"], index=block["index"] + 1)
        block["id"] = content_block.get("id")
        payload = {"type": "content_block_start", "content_block": content_block,
                   "index": block["index"]}  # fmt: skip
        return [*out, _event("content_block_start", payload)]

    started = False
    try:
        async for chunk in chunks:
            if chunk is None:  # [DONE]
                for event in close():
                    yield event
                yield _event("message_stop", {"type": "message_stop"})
                continue
            if "error" in chunk:
                text = str(chunk["error"].get("message", ""))
                error = {"type": "internal_error", "message": text}
                yield _event("error", {"type": "error", "error": error})
                continue
            if not started:
                started = True
                message = {
                    "id": chunk["id"], "type": "message", "role": "assistant", "content": [],
                    "model": chunk["model"], "stop_reason": None, "stop_sequence": None,
                    "usage": {"input_tokens": prompt_tokens, "output_tokens": 0},
                }  # fmt: skip
                yield _event("message_start", {"type": "message_start", "message": message})
                continue
            if not chunk.get("choices"):  # the usage chunk
                for event in close():
                    yield event
                usage = chunk.get("usage") or {}
                stop = {"stop_reason": _STOP_REASONS.get(finish, "end_turn"),
                        "stop_sequence": None}  # fmt: skip
                counts = {"input_tokens": usage.get("prompt_tokens", prompt_tokens),
                          "output_tokens": usage.get("completion_tokens", 0)}  # fmt: skip
                yield _event(
                    "message_delta", {"type": "message_delta", "delta": stop, "usage": counts}
                )
                continue
            choice = chunk["choices"][0]
            finish = choice.get("finish_reason") or finish
            delta = choice.get("delta") or {}
            if delta.get("reasoning"):
                if block["type"] != "thinking":
                    for event in open_block({"type": "thinking", "thinking": ""}):
                        yield event
                thought = {"type": "thinking_delta", "thinking": delta["reasoning"]}
                yield _delta_event(thought, block["index"])
            if delta.get("content"):
                if block["type"] != "text":
                    for event in open_block({"type": "text", "text": ""}):
                        yield event
                yield _delta_event({"type": "text_delta", "text": delta["content"]}, block["index"])
            for call in delta.get("tool_calls") or []:
                fn = call.get("function") or {}
                if call.get("id") and fn.get("name") is not None and call["id"] != block["id"]:
                    start = {"type": "tool_use", "id": call["id"], "name": fn["name"], "input": {}}
                    for event in open_block(start):
                        yield event
                if fn.get("arguments"):
                    piece = {"type": "input_json_delta", "partial_json": fn["arguments"]}
                    yield _delta_event(piece, block["index"])
    finally:
        await chunks.aclose()


def _delta_event(delta: dict[str, Any], index: int) -> bytes:
    payload = {"type": "content_block_delta", "delta": delta, "index": index}
    return _event("content_block_delta", payload)


# --------------------------------------------------------------------------- Responses parts


def responses_to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """construct_input_messages and the request's sampling fields, as a chat request."""
    messages: list[dict[str, Any]] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    given = body.get("input")
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    elif isinstance(given, list):
        for item in given:
            _add_input_item(item, messages)
    else:
        raise validation_error("input", "Input should be a valid string", given, "string_type")
    chat: dict[str, Any] = {"messages": messages}
    for name in ("model", "temperature", "top_p"):
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    effort = (body.get("reasoning") or {}).get("effort")
    if effort is not None:
        chat["reasoning_effort"] = effort
    tools = [
        t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type") == "function"
    ]
    if tools:
        chat["tools"] = [
            {"type": "function", "function": {"name": t.get("name"),
             "description": t.get("description"), "parameters": t.get("parameters") or {}}}
            for t in tools
        ]  # fmt: skip
        choice = body.get("tool_choice", "auto")
        if isinstance(choice, dict):
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        chat["tool_choice"] = choice
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def _add_input_item(item: Any, messages: list[dict[str, Any]]) -> None:  # noqa: ANN401
    if not isinstance(item, dict):
        raise validation_error("input", DICT_MSG, item, "dict_type")
    kind = item.get("type", "message")
    if kind == "function_call":
        fn = {"name": item.get("name"), "arguments": item.get("arguments", "")}
        call = {"id": item.get("call_id"), "type": "function", "function": fn}
        last = messages[-1] if messages else None
        if last is not None and last.get("role") == "assistant":
            last.setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        messages.append(
            {"role": "tool", "tool_call_id": item.get("call_id"),
             "content": output if isinstance(output, str) else json.dumps(output)}
        )  # fmt: skip
    elif kind == "message":
        content = item.get("content")
        if isinstance(content, list):
            content = [_chat_part(part) for part in content]
        messages.append({"role": item.get("role", "user"), "content": content})
    # reasoning items: the chat template drops earlier reasoning anyway


def _chat_part(part: Any) -> dict[str, Any]:  # noqa: ANN401 - any JSON value
    kind = part.get("type") if isinstance(part, dict) else None
    if isinstance(part, dict) and kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": str(part.get("text", ""))}
    if isinstance(part, dict) and kind == "input_image":
        return {"type": "image_url", "image_url": {"url": part.get("image_url")}}
    return part if isinstance(part, dict) else {"type": str(kind)}


def _response_shell(body: dict[str, Any], model: str) -> dict[str, Any]:
    """The response object as vLLM's from_request fills it, still in progress."""
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
    return {
        "id": f"resp_{_hex()}",
        "created_at": int(time.time()),
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "metadata": body.get("metadata"),
        "model": model,
        "object": "response",
        "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "temperature": body.get("temperature", 1.0),
        "tool_choice": body.get("tool_choice", "auto" if tools else "none"),
        "tools": tools,
        "top_p": body.get("top_p", 1.0),
        "background": False,
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": None,
        "previous_response_id": None,
        "prompt": None,
        "reasoning": body.get("reasoning"),
        "service_tier": "auto",
        "status": "in_progress",
        "text": None,
        "top_logprobs": None,
        "truncation": "disabled",
        "usage": None,
        "user": None,
    }


def _finished(
    shell: dict[str, Any],
    items: list[dict[str, Any]],
    prompt: int,
    completion: int,
    choice: dict[str, Any],
) -> dict[str, Any]:
    cut = choice.get("finish_reason") == "length"
    usage = {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }
    return {
        **shell,
        "output": items,
        "status": "incomplete" if cut else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "usage": usage,
    }


def _reasoning_item(item_id: str, text: str | None, status: str | None) -> dict[str, Any]:
    content = None if text is None else [{"text": text, "type": "reasoning_text"}]
    return {"id": item_id, "summary": [], "type": "reasoning", "content": content,
            "encrypted_content": None, "status": status}  # fmt: skip


def _message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [_text_part(text, None)]
    return {"id": item_id, "content": content, "role": "assistant", "status": status,
            "type": "message", "phase": None}  # fmt: skip


def _text_part(text: str, logprobs: list[Any] | None) -> dict[str, Any]:
    return {"annotations": [], "text": text, "type": "output_text", "logprobs": logprobs}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed"
               ) -> dict[str, Any]:  # fmt: skip
    return {"arguments": arguments, "call_id": call_id, "name": name, "type": "function_call",
            "id": item_id, "status": status}  # fmt: skip


class _ResponseStream:
    """The Responses events of one stream: numbered, one open output item at a time."""

    def __init__(self) -> None:
        self.sequence = 0
        self.items: list[dict[str, Any]] = []
        self.kind: str | None = None
        self.item_id = ""
        self.text = ""
        self.call: tuple[str, str] = ("", "")

    def event(self, kind: str, payload: dict[str, Any]) -> bytes:
        data = {**payload, "sequence_number": self.sequence, "type": kind}
        self.sequence += 1
        return _event(kind, data)

    def _at(self, **extra: Any) -> dict[str, Any]:  # noqa: ANN401 - JSON values
        return {"item_id": self.item_id, "output_index": len(self.items), **extra}

    def open(self, kind: str, call: tuple[str, str] = ("", "")) -> list[bytes]:
        out = self.close()
        self.kind, self.text, self.call = kind, "", call
        if kind == "reasoning":
            self.item_id = f"rs_{_hex()}"
            item = _reasoning_item(self.item_id, None, "in_progress")
            part: dict[str, Any] = {"text": "", "type": "reasoning_text"}
        elif kind == "message":
            self.item_id = f"msg_{_hex()}"
            item, part = _message_item(self.item_id, None, "in_progress"), _text_part("", [])
        else:
            self.item_id = f"fc_{_hex()}"
            item = _call_item(self.item_id, call[0], call[1], "", "in_progress")
        index = len(self.items)
        out.append(self.event("response.output_item.added", {"item": item, "output_index": index}))
        if kind != "function_call":
            out.append(
                self.event("response.content_part.added", self._at(content_index=0, part=part))
            )
        return out

    def delta(self, text: str) -> bytes:
        self.text += text
        if self.kind == "reasoning":
            payload = self._at(content_index=0, delta=text)
            return self.event("response.reasoning_text.delta", payload)
        if self.kind == "message":
            payload = self._at(content_index=0, delta=text, logprobs=[])
            return self.event("response.output_text.delta", payload)
        return self.event("response.function_call_arguments.delta", self._at(delta=text))

    def close(self) -> list[bytes]:
        kind, text, index = self.kind, self.text, len(self.items)
        if kind is None:
            return []
        self.kind = None
        if kind == "reasoning":
            item = _reasoning_item(self.item_id, text, "completed")
            part: dict[str, Any] = {"text": text, "type": "reasoning_text"}
            out = [
                self.event("response.reasoning_text.done", self._at(content_index=0, text=text)),
                self.event("response.content_part.done", self._at(content_index=0, part=part)),
            ]
        elif kind == "message":
            item = _message_item(self.item_id, text, "completed")
            done = self._at(content_index=0, text=text, logprobs=[])
            out = [
                self.event("response.output_text.done", done),
                self.event(
                    "response.content_part.done",
                    self._at(content_index=0, part=_text_part(text, None)),
                ),
            ]
        else:
            item = _call_item(self.item_id, self.call[0], self.call[1], text)
            args = self._at(arguments=text, name=self.call[1])
            out = [self.event("response.function_call_arguments.done", args)]
        out.append(self.event("response.output_item.done", {"item": item, "output_index": index}))
        self.items.append(item)
        return out


async def _response_events(
    chunks: Chunks, shell: dict[str, Any], prompt_tokens: int
) -> AsyncIterator[bytes]:
    """The chat stream as Responses events (vLLM's SimpleStreamingEventProcessor order)."""
    state = _ResponseStream()
    yield state.event("response.created", {"response": shell})
    yield state.event("response.in_progress", {"response": shell})
    usage: dict[str, Any] = {}
    last_choice: dict[str, Any] = {}

    def feed(kind: str, text: str) -> list[bytes]:
        out = state.open(kind) if state.kind != kind else []
        return [*out, state.delta(text)]

    try:
        async for chunk in chunks:
            if chunk is None:
                break
            if "error" in chunk:
                error = chunk["error"]
                yield state.event(
                    "error", {"code": str(error.get("code")), "message": error.get("message"),
                              "param": None}
                )  # fmt: skip
                return
            if not chunk.get("choices"):
                usage = chunk.get("usage") or {}
                continue
            choice = chunk["choices"][0]
            last_choice = choice if choice.get("finish_reason") else last_choice
            delta = choice.get("delta") or {}
            for kind, text in (("reasoning", delta.get("reasoning")),
                               ("message", delta.get("content"))):  # fmt: skip
                if text:
                    for event in feed(kind, text):
                        yield event
            for call in delta.get("tool_calls") or []:
                fn = call.get("function") or {}
                if call.get("id"):
                    for event in state.open("function_call", (call["id"], fn.get("name", ""))):
                        yield event
                if fn.get("arguments"):
                    yield state.delta(fn["arguments"])
    finally:
        await chunks.aclose()
    for event in state.close():
        yield event
    final = _finished(
        shell,
        state.items,
        usage.get("prompt_tokens", prompt_tokens),
        usage.get("completion_tokens", 0),
        last_choice,
    )
    yield state.event("response.completed", {"response": final})
