"""`/v1/chat/completions` and `/v1/completions`: validation, the reply plan, JSON and SSE output.

Output shapes follow vLLM: reasoning in `delta.reasoning` / `message.reasoning` when a reasoning
parser is set (else the reasoning and `</think>` stay in the content), tool calls in
`tool_calls`, a final chunk with `finish_reason`, a usage chunk with empty `choices` when
`stream_options.include_usage` is set, and `data: [DONE]`.
"""

from __future__ import annotations

import json
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from appliance.simulator import VLLM_VERSION
from appliance.simulator.args import ServeArgs
from appliance.simulator.engine import Engine, RequestAbortedError
from appliance.simulator.errors import DICT_MSG, ApiError, bad_request, validation_error
from appliance.simulator.generation import (
    ANSWER_FILLER,
    ANSWER_TOKENS,
    REASONING_FILLER,
    Reply,
    ToolCall,
    answer_head,
    count_prompt_tokens,
    fill,
    pieces,
    plan_lengths,
    reasoning_head,
    seed_of,
    tool_arguments,
)
from appliance.simulator.http import Response, StreamResponse
from appliance.simulator.knobs import Knobs
from appliance.simulator.prompts import ChatPrompt, read_chat, reasoning_level

THINK_END = "\n</think>\n\n"

# Request fields with a fixed type, checked as pydantic's lax mode does in vLLM's request models.
BOOL_FIELDS = ("stream", "echo", "ignore_eos", "skip_special_tokens")
INT_FIELDS = ("n", "seed", "min_tokens", "top_k", "top_logprobs")
NUMBER_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty")  # fmt: skip
DICT_FIELDS = ("stream_options", "response_format", "logit_bias", "chat_template_kwargs")
LAX_BOOLS = {"true", "false", "1", "0", "yes", "no", "on", "off", "t", "f", "y", "n"}


STREAM_OPTIONS_MSG = "Stream options can only be defined when `stream=True`."


def check_field_types(body: dict[str, Any]) -> None:
    """A wrongly typed field is vLLM's 400 validation error, never a 500."""
    # vLLM 0.23's request models check this in a "before" model validator, so it comes ahead of
    # every field's type, as a VLLMValidationError whose `parameter` becomes the error's `param`
    # (chat_completion/protocol.py `validate_stream_options`; seen on an H200 with real 0.23).
    if body.get("stream_options") and not body.get("stream"):
        error = validation_error((), f"Value error, {STREAM_OPTIONS_MSG}", body, "value_error")
        error.param = "stream_options"
        raise error
    for name in BOOL_FIELDS:
        value = body.get(name)
        if value is None or isinstance(value, bool) or value in (0, 1):
            continue
        if not (isinstance(value, str) and value.lower() in LAX_BOOLS):
            raise validation_error(name, "Input should be a valid boolean", value, "bool_type")
    for name in INT_FIELDS:
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise validation_error(name, "Input should be a valid integer", value, "int_type")
    for name in NUMBER_FIELDS:
        value = body.get(name)
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
            raise validation_error(name, "Input should be a valid number", value, "float_type")
    for name in DICT_FIELDS:
        value = body.get(name)
        if value is not None and not isinstance(value, dict):
            raise validation_error(name, DICT_MSG, value, "dict_type")


def check_text(value: Any) -> None:
    """A lone surrogate (JSON allows `\\ud800`) cannot be tokenized: vLLM's preprocessing turns
    the tokenizer's UnicodeEncodeError, a ValueError, into a 400."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError as err:
            raise bad_request(f"Invalid text in the request: {err}") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key)
            check_text(item)
    elif isinstance(value, list):
        for item in value:
            check_text(item)


def wants_stream(body: dict[str, Any]) -> bool:
    value = body.get("stream")
    if isinstance(value, str):
        return value.lower() in {"true", "1", "yes", "on", "t", "y"}
    return bool(value)


@dataclass(frozen=True)
class Segment:
    """A run of output tokens of one kind: reasoning, content, or one tool call's XML."""

    kind: str  # reasoning | content | tool
    start: int
    end: int
    tool: int = -1


@dataclass
class Output:
    texts: list[str]
    segments: list[Segment]

    def __len__(self) -> int:
        return len(self.texts)

    def text(self, kind: str) -> str:
        return "".join(
            "".join(self.texts[s.start : s.end]) for s in self.segments if s.kind == kind
        )


class Completions:
    def __init__(self, args: ServeArgs, knobs: Knobs, engine: Engine, max_model_len: int) -> None:
        self.args = args
        self.knobs = knobs
        self.engine = engine
        self.max_model_len = max_model_len
        self.fingerprint = fingerprint(args)

    # ----------------------------------------------------------------------------- shared checks

    def model_name(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if model is None:
            return self.args.served_name
        if model not in self.args.served_model_names:
            raise ApiError(404, f"The model `{model}` does not exist.", param="model")
        return str(model)

    def output_cap(self, body: dict[str, Any], prompt_tokens: int, default: int | None) -> int:
        """max_tokens checked against the context window as vLLM 0.23.0 does (TokenizeParams in
        vllm/renderers/params.py): the prompt may use the window minus max_tokens, so max_tokens
        equal to the window is a 400. (0.32 lets the prompt use the whole window and clamps
        max_tokens to what is left: there max_tokens == window is accepted, finish "length".)"""
        window = self.max_model_len
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        raw = body.get(name, default)
        if raw is not None and (not isinstance(raw, int) or isinstance(raw, bool)):
            raise validation_error(name, "Input should be a valid integer", raw, "int_type")
        if raw is not None and raw < 1:
            raise bad_request(f"{name} must be at least 1, got {raw}.", param=name)
        requested = raw or 0
        if requested > window:
            # 0.23.0 prints `{max_total_tokens=}`, hence the doubled name.
            raise bad_request(
                f"{name}={requested} cannot be greater than max_model_len=max_total_tokens="
                f"{window}. Please request fewer output tokens.",
                param=name,
            )
        if prompt_tokens > window - requested or prompt_tokens >= window:
            raise bad_request(
                f"This model's maximum context length is {window} tokens. However, you "
                f"requested {requested} output tokens and your prompt contains {prompt_tokens} "
                f"input tokens, for a total of {prompt_tokens + requested} tokens. Please "
                "reduce the length of the input prompt or the number of requested output tokens.",
                param="input_tokens",
            )
        return raw if raw is not None else window - prompt_tokens

    def forced_total(self, body: dict[str, Any], cap: int) -> int | None:
        if body.get("ignore_eos") and ("max_tokens" in body or "max_completion_tokens" in body):
            return cap
        forced = self.knobs.output_tokens
        min_tokens = body.get("min_tokens")
        if isinstance(min_tokens, int) and min_tokens > 0:
            forced = max(forced or 0, min_tokens)
        return forced

    # ----------------------------------------------------------------------------- chat

    async def chat(self, body: dict[str, Any]) -> Response | StreamResponse:
        if not isinstance(body, dict):
            raise validation_error("body", DICT_MSG, body, "dict_type")
        check_field_types(body)
        check_text(body)
        model = self.model_name(body)
        level = reasoning_level(body)
        prompt = read_chat(body, level, self.args.limit_mm_per_prompt.get("image"))
        tool_choice = self._tool_choice(body)
        prompt_tokens = prompt.tokens
        cap = self.output_cap(body, prompt_tokens, None)
        reply = self._plan_chat(body, model, level, prompt, tool_choice, cap)
        sequence = self._sequence(reply)
        if wants_stream(body):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            chunks = self._chat_stream(model, reply, sequence, prompt_tokens, include_usage)
            return StreamResponse(chunks)
        return Response.json(await self._chat_full(model, reply, sequence, prompt_tokens))

    def _tool_choice(self, body: dict[str, Any]) -> Any:
        tools = body.get("tools")
        if not tools:
            return "none"
        choice = body.get("tool_choice", "auto")
        if choice == "auto" and not (
            self.args.enable_auto_tool_choice and self.args.tool_call_parser
        ):
            raise bad_request(
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                "to be set"
            )
        return choice

    def _plan_chat(
        self,
        body: dict[str, Any],
        model: str,
        level: str | None,
        prompt: ChatPrompt,
        tool_choice: Any,
        cap: int,
    ) -> Reply:
        seed = seed_of(prompt.text)
        calls = []
        if tool_choice != "none" and prompt.tool_result is None:
            calls = self._tool_calls(body, tool_choice, prompt.user_text)
        answer_n = 0 if calls else ANSWER_TOKENS
        forced = self.forced_total(body, cap)
        tool_tokens = sum(len(pieces(call.xml())) for call in calls)
        budget = None if forced is None else max(0, forced - tool_tokens)
        think, answer, cut = plan_lengths(level, budget, max(0, cap - tool_tokens), answer_n)
        if calls and (cut or cap < tool_tokens):
            calls, cut = [], True
        hit_cap = forced is not None and forced >= cap
        head = reasoning_head(level, prompt.user_text, prompt.images)
        return Reply(
            reasoning=fill(head, REASONING_FILLER, think, seed),
            content=fill(
                answer_head(model, prompt.user_text, prompt.images, prompt.tool_result),
                ANSWER_FILLER,
                answer,
                seed,
            ),
            tool_calls=calls,
            finish_reason="length" if cut or hit_cap else ("tool_calls" if calls else "stop"),
        )

    def _tool_calls(self, body: dict[str, Any], choice: Any, user_text: str) -> list[ToolCall]:
        tools = [t.get("function", {}) for t in body.get("tools") or [] if isinstance(t, dict)]
        if isinstance(choice, dict):
            wanted = (choice.get("function") or {}).get("name")
            chosen = [t for t in tools if t.get("name") == wanted]
            if not chosen:
                raise bad_request(f"Tool '{wanted}' has not been passed in `tools`.")
        else:
            named = [t for t in tools if str(t.get("name", "")).lower() in user_text.lower()]
            chosen = (named or tools)[:1]
        return [
            ToolCall(
                id=f"chatcmpl-tool-{uuid.uuid4().hex}",
                name=str(tool.get("name", "tool")),
                arguments=json.dumps(tool_arguments(tool.get("parameters") or {}, user_text)),
            )
            for tool in chosen
        ]

    def _sequence(self, reply: Reply) -> Output:
        parsed = self.args.reasoning_parser is not None
        texts: list[str] = []
        segments: list[Segment] = []

        def add(kind: str, part: list[str], tool: int = -1) -> None:
            if part:
                segments.append(Segment(kind, len(texts), len(texts) + len(part), tool))
                texts.extend(part)

        add("reasoning" if parsed else "content", reply.reasoning)
        if not parsed and reply.reasoning:
            add("content", [THINK_END])
        add("content", reply.content)
        for index, call in enumerate(reply.tool_calls):
            add("tool", pieces(call.xml()), index)
        return Output(texts, segments)

    async def _chat_full(
        self, model: str, reply: Reply, seq: Output, prompt_tokens: int
    ) -> dict[str, Any]:
        finish = "length" if reply.finish_reason == "length" else "stop"
        async with aclosing(self.engine.run(prompt_tokens, len(seq), finish)) as steps:
            async for _ in steps:
                pass
        reasoning = seq.text("reasoning")
        content = seq.text("content")
        message: dict[str, Any] = {
            "role": "assistant",
            # null, not "", when nothing followed the reasoning (the budget ended inside it or
            # only tool calls came): Step3p5ReasoningParser.extract_reasoning returns None.
            "content": content or None,
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
            "tool_calls": [self._tool_json(call) for call in reply.tool_calls],
            "reasoning": reasoning or None,
        }
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": reply.finish_reason,
                    "stop_reason": None,
                    "token_ids": None,
                    "routed_experts": None,
                }
            ],
            "service_tier": None,
            "system_fingerprint": self.fingerprint,
            "usage": _usage(prompt_tokens, len(seq)),
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "prompt_text": None,
            "kv_transfer_params": None,
        }

    @staticmethod
    def _tool_json(call: ToolCall) -> dict[str, Any]:
        return {
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }

    async def _chat_stream(
        self, model: str, reply: Reply, seq: Output, prompt_tokens: int, include_usage: bool
    ) -> AsyncIterator[bytes]:
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }

        # Serialize the constant part once: 200 streams at 350 tokens/s make 70k chunks a second.
        prefix = _sse({**head, "choices": [{"index": 0, "delta": None}]})
        prefix = prefix[: prefix.rindex(b"null}]}")]
        suffix = b',"logprobs":null,"finish_reason":null,"token_ids":null}]}\n\n'

        # Chunk fields as 0.23.0 serializes them (exclude_unset): token_ids on every choice, the
        # fingerprint on the finish chunk unless a usage chunk follows (then on that one).
        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            if finish is None:
                return prefix + json.dumps(delta, separators=(",", ":")).encode() + suffix
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            choice.update(stop_reason=None, token_ids=None)
            last = {**head, "choices": [choice]}
            if not include_usage:
                last["system_fingerprint"] = self.fingerprint
            return _sse(last)

        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
        first["finish_reason"] = None
        yield _sse({**head, "choices": [first], "prompt_token_ids": None, "prompt_text": None})
        finish = "length" if reply.finish_reason == "length" else "stop"
        sent = 0
        finished = False
        try:
            async with aclosing(self.engine.run(prompt_tokens, len(seq), finish)) as steps:
                async for n in steps:
                    deltas = _deltas(seq, sent, sent + n, reply.tool_calls)
                    sent += n
                    if sent >= len(seq) and finish == "length" and deltas:
                        # Cut by max_tokens: the last token's text rides in the finish chunk.
                        for delta in deltas[:-1]:
                            yield chunk(delta)
                        yield chunk(deltas[-1], reply.finish_reason)
                        finished = True
                    else:
                        for delta in deltas:
                            yield chunk(delta)
        except ApiError as err:
            yield _sse(err.body())
            yield b"data: [DONE]\n\n"
            return
        except RequestAbortedError as aborted:  # /sleep aborted it, as vLLM's does
            yield chunk({}, "abort")
            if include_usage:
                yield _sse(
                    {**head, "choices": [], "usage": _usage(prompt_tokens, aborted.generated)}
                )
            yield b"data: [DONE]\n\n"
            return
        if not finished:  # the end-of-sequence token has no text: an empty delta
            yield chunk({}, reply.finish_reason)
        if include_usage:  # exclude_none: no prompt_tokens_details here
            usage = {k: v for k, v in _usage(prompt_tokens, len(seq)).items() if v is not None}
            yield _sse(
                {**head, "choices": [], "usage": usage, "system_fingerprint": self.fingerprint}
            )
        yield b"data: [DONE]\n\n"

    # ----------------------------------------------------------------------------- completions

    async def completion(self, body: dict[str, Any]) -> Response | StreamResponse:
        if not isinstance(body, dict):
            raise validation_error("body", DICT_MSG, body, "dict_type")
        check_field_types(body)
        check_text(body)
        model = self.model_name(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            prompt = " ".join(str(p) for p in prompt) if prompt else None
        if not isinstance(prompt, str):
            raise validation_error("prompt", "Field required", body, "missing")
        prompt_tokens = max(1, count_prompt_tokens(prompt))
        cap = self.output_cap(body, prompt_tokens, 16)  # OpenAI's and vLLM's default
        forced = self.forced_total(body, cap)
        natural = forced if forced is not None else ANSWER_TOKENS
        total = min(cap, natural)
        head_text = " " + answer_head(model, prompt, [], None)
        text = fill(head_text, ANSWER_FILLER, total, seed_of(prompt))
        finish = "length" if natural >= cap else "stop"
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        if wants_stream(body):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            stream = self._completion_stream(head, text, prompt_tokens, finish, include_usage)
            return StreamResponse(stream)
        async with aclosing(self.engine.run(prompt_tokens, len(text), finish)) as steps:
            async for _ in steps:
                pass
        choice = {
            "index": 0,
            "text": "".join(text),
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": None,
            "prompt_logprobs": None,
        }
        usage = _usage(prompt_tokens, len(text))
        payload = {**head, "choices": [choice], "usage": usage, "kv_transfer_params": None}
        return Response.json(payload)

    async def _completion_stream(
        self, head: dict[str, Any], text: list[str], prompt_tokens: int, finish: str, usage: bool
    ) -> AsyncIterator[bytes]:
        sent = 0
        try:
            async with aclosing(self.engine.run(prompt_tokens, len(text), finish)) as steps:
                async for n in steps:
                    done = sent + n >= len(text)
                    choice = {
                        "index": 0,
                        "text": "".join(text[sent : sent + n]),
                        "logprobs": None,
                        "finish_reason": finish if done else None,
                        "stop_reason": None,
                    }
                    sent += n
                    yield _sse({**head, "choices": [choice]})
        except ApiError as err:
            yield _sse(err.body())
            yield b"data: [DONE]\n\n"
            return
        except RequestAbortedError as aborted:  # /sleep aborted it, as vLLM's does
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": "abort"}
            yield _sse({**head, "choices": [{**choice, "stop_reason": None}]})
            if usage:
                yield _sse(
                    {**head, "choices": [], "usage": _usage(prompt_tokens, aborted.generated)}
                )
            yield b"data: [DONE]\n\n"
            return
        if usage:
            yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, len(text))})
        yield b"data: [DONE]\n\n"


def _deltas(seq: Output, start: int, end: int, calls: list[ToolCall]) -> list[dict[str, Any]]:
    """One delta per segment the step touches; a tool call is announced, then its arguments."""
    out: list[dict[str, Any]] = []
    for seg in seq.segments:
        lo, hi = max(start, seg.start), min(end, seg.end)
        if lo >= hi:
            continue
        if seg.kind != "tool":
            out.append({seg.kind: "".join(seq.texts[lo:hi])})
            continue
        call = calls[seg.tool]
        if lo == seg.start:
            fn = {"name": call.name, "arguments": ""}
            out.append({"tool_calls": [{"index": seg.tool, "id": call.id, "type": "function",
                                        "function": fn}]})  # fmt: skip
        if hi == seg.end:
            out.append(
                {"tool_calls": [{"index": seg.tool, "function": {"arguments": call.arguments}}]}
            )
    return out


def fingerprint(args: ServeArgs) -> str:
    """`system_fingerprint`: vllm-<version>[-tp<n>]-<8 hex of the config>, as 0.23.0's "full"
    mode builds it (vllm/entrypoints/serve/utils/fingerprint.py)."""
    parallel = f"-tp{args.tensor_parallel_size}" if args.tensor_parallel_size > 1 else ""
    config = f"{args.model}|{args.max_model_len}|{args.num_speculative_tokens}"
    return f"vllm-{VLLM_VERSION}{parallel}-{zlib.crc32(config.encode()):08x}"


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": None,
    }


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
