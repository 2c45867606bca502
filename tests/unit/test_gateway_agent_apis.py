"""The agent routes' pure parts: usage from their stream events and bodies, error shapes, and how
the gateway reads an engine's route list. Event bytes are real vLLM 0.32's (tiny-std model)."""

from __future__ import annotations

import json

from appliance.gateway import apis
from appliance.gateway.apis import CHAT, MESSAGES, RESPONSES
from appliance.gateway.sse import Usage, UsageTap, usage_of_body


def _event(kind: str, payload: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


MESSAGES_STREAM = [
    _event("message_start", {"type": "message_start", "message": {
        "id": "chatcmpl-1", "type": "message", "role": "assistant", "content": [],
        "model": "step3p7-flash", "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 22, "output_tokens": 0}}}),
    _event("content_block_start", {"type": "content_block_start",
                                   "content_block": {"type": "text", "text": ""}, "index": 0}),
    _event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                   "delta": {"type": "text_delta", "text": "The usage"}}),
    _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
    _event("message_delta", {"type": "message_delta",
                             "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                             "usage": {"input_tokens": 22, "output_tokens": 31}}),
    _event("message_stop", {"type": "message_stop"}),
]  # fmt: skip


def _response(status: str, usage: dict | None) -> dict:
    return {"id": "resp_1", "object": "response", "status": status, "output": [], "usage": usage}


RESPONSES_STREAM = [
    _event("response.created", {"response": _response("in_progress", None),
                                "sequence_number": 0, "type": "response.created"}),
    _event("response.output_text.delta", {"delta": '"usage": 5', "sequence_number": 1,
                                          "type": "response.output_text.delta"}),
    _event("response.completed", {"response": _response("completed", {
        "input_tokens": 22, "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 31, "total_tokens": 53}), "sequence_number": 2,
        "type": "response.completed"}),
]  # fmt: skip


def _feed(tap: UsageTap, events: list[bytes], split: int = 7) -> bytes:
    """All events through the tap in small, unaligned pieces (as TCP may deliver them)."""
    data = b"".join(events)
    out = b"".join(tap.feed(data[i : i + split]) for i in range(0, len(data), split))
    return out + tap.finish()


def test_messages_stream_usage_is_read_and_nothing_is_hidden() -> None:
    tap = UsageTap(strip_usage_chunk=True, route=MESSAGES)  # strip never applies here
    out = _feed(tap, MESSAGES_STREAM)
    assert out == b"".join(MESSAGES_STREAM)
    assert tap.usage == Usage(prompt_tokens=22, completion_tokens=31)
    assert tap.final
    assert tap.done


def test_messages_delta_without_input_tokens_keeps_the_start_count() -> None:
    """Anthropic's own message_delta may carry only output_tokens."""
    tap = UsageTap(strip_usage_chunk=False, route=MESSAGES)
    events = [*MESSAGES_STREAM]
    events[4] = events[4].replace(b'"input_tokens":22,', b"")
    _feed(tap, events)
    assert tap.usage == Usage(prompt_tokens=22, completion_tokens=31)


def test_messages_stream_cut_before_its_end_counts_what_was_seen() -> None:
    tap = UsageTap(strip_usage_chunk=False, route=MESSAGES)
    _feed(tap, MESSAGES_STREAM[:3])
    assert tap.usage == Usage(prompt_tokens=22, completion_tokens=0)
    assert not tap.final
    assert not tap.done


def test_responses_stream_usage_comes_from_the_completed_event() -> None:
    tap = UsageTap(strip_usage_chunk=False, route=RESPONSES)
    out = _feed(tap, RESPONSES_STREAM[:2])
    assert tap.usage is None  # response.created's usage is null; a delta's text is not usage
    assert not tap.done
    out += _feed(tap, RESPONSES_STREAM[2:])
    assert out == b"".join(RESPONSES_STREAM)
    assert tap.usage == Usage(prompt_tokens=22, completion_tokens=31)
    assert tap.final
    assert tap.done


def test_an_incomplete_response_is_counted_too() -> None:
    tap = UsageTap(strip_usage_chunk=False, route=RESPONSES)
    ended = RESPONSES_STREAM[2].replace(b"response.completed", b"response.incomplete")
    _feed(tap, [ended])
    assert tap.usage == Usage(prompt_tokens=22, completion_tokens=31)


def test_chat_streams_are_unchanged_by_the_route_argument() -> None:
    usage_chunk = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n'
    tap = UsageTap(strip_usage_chunk=True, route=CHAT)
    assert tap.feed(b'data: {"choices":[{"delta":{}}]}\n\n' + usage_chunk + b"data: [DONE]\n\n")
    assert tap.usage == Usage(3, 4)
    assert tap.done


def test_body_usage_in_each_shape() -> None:
    assert usage_of_body(b'{"usage":{"prompt_tokens":3,"completion_tokens":4}}') == Usage(3, 4)
    responses = {"usage": {"input_tokens": 22, "output_tokens": 31, "total_tokens": 53,
                           "input_tokens_details": {"cached_tokens": 8}}}  # fmt: skip
    assert usage_of_body(json.dumps(responses).encode()) == Usage(22, 31)
    # Anthropic counts cached prompt tokens apart from input_tokens; they are prompt tokens too.
    messages = {"usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 12,
                          "cache_creation_input_tokens": 3}}  # fmt: skip
    assert usage_of_body(json.dumps(messages).encode()) == Usage(25, 5)
    assert Usage.from_json({"input_tokens": -1, "output_tokens": True}) == Usage(0, 0)


def test_error_shapes() -> None:
    openai_shape = json.loads(apis.error_body(401, "invalid_api_key", "wrong key"))
    assert openai_shape == {"error": {"message": "wrong key", "type": "invalid_request_error",
                                      "param": None, "code": "invalid_api_key"}}  # fmt: skip
    anthropic_shape = json.loads(
        apis.error_body(401, "invalid_api_key", "wrong key", route=MESSAGES)
    )
    assert anthropic_shape["type"] == "error"
    assert anthropic_shape["error"]["type"] == "authentication_error"
    assert anthropic_shape["error"]["message"] == "wrong key"
    kinds = {400: "invalid_request_error", 404: "not_found_error", 413: "request_too_large",
             429: "rate_limit_error", 503: "overloaded_error", 500: "api_error",
             501: "api_error"}  # fmt: skip
    for status, kind in kinds.items():
        body = json.loads(apis.error_body(status, "c", "m", route=MESSAGES, param="x"))
        assert body["error"]["type"] == kind, status
        assert body["error"]["param"] == "x"


def test_engine_route_list() -> None:
    document = {"openapi": "3.1.0", "paths": {"/v1/messages": {"post": {}}, "/health": {}}}
    assert apis.engine_paths(json.dumps(document).encode()) == {"/v1/messages", "/health"}
    for not_a_list in (b"<html>", b"[]", b'{"paths": []}', b""):
        assert apis.engine_paths(not_a_list) is None
    assert apis.is_unknown_route(404, b'{"detail":"Not Found"}')
    unknown_model = b'{"type":"error","error":{"type":"NotFoundError","message":"The model"}}'
    assert not apis.is_unknown_route(404, unknown_model)
    assert not apis.is_unknown_route(405, b'{"detail":"Not Found"}')
    assert not apis.is_unknown_route(404, b"not json")
