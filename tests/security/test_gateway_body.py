"""Attacks through the gateway's forwarded body: media URLs the engine would fetch into the LAN,
engine-side fields a client must not set, and sizes vLLM has had denial-of-service bugs with.

Each attack goes to a real gateway in front of the real simulator process; the proof that nothing
reached the engine is the engine's own access log (vLLM's uvicorn line, which the simulator
writes the same way), read after a good request sent last has been logged.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
import threading
import zlib

import pytest
from integration.gateway_kit import (
    MODEL,
    GatewayStack,
    free_port,
    png_data_url,
    start_gateway,
    wait_until,
)

from appliance import settings as st
from appliance.gateway import FixedEngine

pytestmark = pytest.mark.timeout(180)

CHAT_LINE = '"POST /v1/chat/completions HTTP/1.1"'
COMPLETIONS_LINE = '"POST /v1/completions HTTP/1.1"'
RESPONSES_LINE = '"POST /v1/responses HTTP/1.1"'
MESSAGES_LINE = '"POST /v1/messages HTTP/1.1"'


class Listener:
    """A TCP listener of the test's own on loopback that records every connection it accepts."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[tuple[str, int]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.accepted.append(peer)
            conn.close()

    def close(self) -> None:
        self.sock.close()


def http(stack: GatewayStack, method: str, target: str, *, body: bytes = b"", **headers: str):
    """A request as bytes, Connection: close, with the Host a client of this gateway sends."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{stack.port}", "Connection: close"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@pytest.fixture
def listener():
    lst = Listener()
    yield lst
    lst.close()


@pytest.fixture
def stack(simulator):
    sim = simulator()
    settings = st.with_changes(
        st.Settings(), {"gateway.port": free_port(), "gateway.require_key_on_loopback": True}
    )
    gw = start_gateway(settings, FixedEngine(sim.url, MODEL), sim.url)
    gw.sim = sim  # type: ignore[attr-defined]
    gw.secret = gw.key("attacker-with-a-key")  # type: ignore[attr-defined]
    yield gw
    gw.gateway.stop()


def _post(stack: GatewayStack, path: str, body: dict) -> tuple[int, dict]:
    data = json.dumps(body).encode()
    reply = stack.raw(
        http(
            stack,
            "POST",
            path,
            body=data,
            Authorization=f"Bearer {stack.secret}",  # type: ignore[attr-defined]
            Content_Type="application/json",
        ),
        timeout=60,
    )
    return reply.status, reply.json() if reply.body else {}


def _chat(**extra) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        **extra,
    }


def _with_part(part: dict) -> dict:
    content = [{"type": "text", "text": "what is this?"}, part]
    return _chat(messages=[{"role": "user", "content": content}])


def _png_header(width: int, height: int) -> str:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = (
        struct.pack(">I", len(ihdr))
        + b"IHDR"
        + ihdr
        + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    )
    return "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk).decode()


def _engine_lines(stack: GatewayStack, line: str) -> int:
    return stack.sim.output().count(line)  # type: ignore[attr-defined]


def _assert_engine_saw_only(stack: GatewayStack, good_chats: int) -> None:
    """The engine logged exactly `good_chats` chat requests before a good one sent now."""
    # Once the engine has logged this last request, it has logged everything sent before it
    # (the test sends one request at a time).
    status, _ = _post(stack, "/v1/chat/completions", _chat())
    assert status == 200
    assert wait_until(lambda: _engine_lines(stack, CHAT_LINE) >= good_chats + 1, 30)
    seen = _engine_lines(stack, CHAT_LINE)
    assert seen == good_chats + 1, stack.sim.output()[-3000:]  # type: ignore[attr-defined]


def test_media_urls_are_refused_before_the_engine_and_nothing_is_fetched(stack, listener):
    target = f"http://127.0.0.1:{listener.port}/secret.png"
    parts = {
        "image_url": {"type": "image_url", "image_url": {"url": target}},
        "image_url as a string, no type": {"image_url": target},
        "input_image": {"type": "input_image", "image_url": target},
        "audio_url": {"type": "audio_url", "audio_url": {"url": target.replace("png", "wav")}},
        "video_url": {"type": "video_url", "video_url": {"url": target.replace("png", "mp4")}},
        "https": {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}},
        "file": {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}},
        "leading space": {"type": "image_url", "image_url": {"url": " " + target}},
    }
    for name, part in parts.items():
        status, body = _post(stack, "/v1/chat/completions", _with_part(part))
        assert status == 400, (name, body)
        error = body["error"]
        assert error["code"] == "media_url_not_allowed", (name, error)
        assert "data:" in error["message"], error
        assert "base64" in error["message"], error
        assert error["param"].startswith("messages[0].content[1]"), error
    # the same picture inline is fine
    status, body = _post(stack, "/v1/chat/completions", _with_part(
        {"type": "image_url", "image_url": {"url": png_data_url()}}))  # fmt: skip
    assert status == 200, body
    _assert_engine_saw_only(stack, good_chats=1)
    assert listener.accepted == []


def test_engine_side_fields_and_parts_are_refused(stack):
    attacks = {
        "chat_template": _chat(chat_template="{{ raise_exception('x') }}"),
        "media_io_kwargs": _chat(media_io_kwargs={"video": {"num_frames": 100000}}),
        "mm_processor_kwargs": _chat(mm_processor_kwargs={"max_pixels": 10**9}),
        "kv_transfer_params": _chat(kv_transfer_params={"do_remote_prefill": True}),
        "ec_transfer_params": _chat(ec_transfer_params={"x": 1}),
        "vllm_xargs": _chat(vllm_xargs={"x": 1}),
        "logits_processors": _chat(logits_processors=["os.system"]),
        "prompt_logprobs": _chat(prompt_logprobs=-1),
        "chat_template_kwargs.tools": _chat(chat_template_kwargs={"tools": [{"x": 1}]}),
        "messages[0].content[1].type": _with_part({"type": "image_embeds", "image_embeds": "AAAA"}),
        "messages[0].content[1].uuid": _with_part(
            {"type": "image_url", "image_url": {"url": png_data_url()}, "uuid": "victim-image"}
        ),
    }
    for param, body in attacks.items():
        status, reply = _post(stack, "/v1/chat/completions", body)
        assert status == 400, (param, reply)
        assert reply["error"]["param"] == param, reply
        assert reply["error"]["type"] == "invalid_request_error"
    status, reply = _post(
        stack, "/v1/completions", {"model": MODEL, "prompt": "x", "prompt_embeds": "AAAA"}
    )
    assert (status, reply["error"]["param"]) == (400, "prompt_embeds"), reply
    _assert_engine_saw_only(stack, good_chats=0)
    assert _engine_lines(stack, COMPLETIONS_LINE) == 0


def test_caps_are_refused_with_the_limit_and_never_reach_the_engine(stack):
    many_images = [{"type": "image_url", "image_url": {"url": png_data_url(2, 2)}}] * 9
    attacks = {
        "n": _chat(n=1000),
        "max_tokens": _chat(max_tokens=10**9),
        "max_completion_tokens": _chat(max_completion_tokens="1000000000"),
        "min_tokens": _chat(min_tokens=10**9),
        "top_logprobs": _chat(logprobs=True, top_logprobs=100000),
        "stop": _chat(stop=[f"s{i}" for i in range(5000)]),
        "logit_bias": _chat(logit_bias={str(i): 1 for i in range(5000)}),
        "allowed_token_ids": _chat(allowed_token_ids=list(range(5000))),
        "structured_outputs": _chat(structured_outputs={"regex": "(a|aa)*" * 20000}),
        "messages": _chat(messages=[{"role": "user", "content": "x"}] * 5000),
        "messages[0].content[8]": _chat(messages=[{"role": "user", "content": many_images}]),
        # a PNG header of 20,000 x 20,000 (1.2 GB to decode) in a few bytes
        "messages[0].content[1].image_url.url": _with_part(
            {"type": "image_url", "image_url": {"url": _png_header(20_000, 20_000)}}
        ),
    }
    for param, body in attacks.items():
        status, reply = _post(stack, "/v1/chat/completions", body)
        assert status == 400, (param, reply)
        error = reply["error"]
        assert error["param"] == param, error
        assert any(ch.isdigit() for ch in error["message"]), error  # names the limit
    status, reply = _post(stack, "/v1/chat/completions", attacks["messages[0].content[8]"])
    assert "engine.max_images_per_prompt" in reply["error"]["message"]
    for body in (
        {"model": MODEL, "prompt": "x", "best_of": 500},
        {"model": MODEL, "prompt": "x", "logprobs": 1000},
        {"model": MODEL, "prompt": ["x"] * 500},
    ):
        status, reply = _post(stack, "/v1/completions", body)
        assert status == 400, (body, reply)
    _assert_engine_saw_only(stack, good_chats=0)
    assert _engine_lines(stack, COMPLETIONS_LINE) == 0


def test_caps_follow_the_engine_settings(simulator):
    sim = simulator()
    settings = st.with_changes(
        st.Settings(),
        {
            "gateway.port": free_port(),
            "engine.max_images_per_prompt": 2,
            "engine.max_model_len": 1000,
        },
    )
    stack = start_gateway(settings, FixedEngine(sim.url, MODEL), sim.url)
    stack.secret = stack.key("k")  # type: ignore[attr-defined]
    try:
        three = [{"type": "image_url", "image_url": {"url": png_data_url(2, 2)}}] * 3
        status, reply = _post(stack, "/v1/chat/completions", _with_part(three[0]) | {
            "messages": [{"role": "user", "content": three}]})  # fmt: skip
        assert status == 400, reply
        assert "at most 2" in reply["error"]["message"]
        status, reply = _post(stack, "/v1/chat/completions", _chat(max_tokens=1001))
        assert (status, reply["error"]["param"]) == (400, "max_tokens"), reply
        assert "0 to 1000" in reply["error"]["message"]
        assert "engine.max_model_len" in reply["error"]["message"]
        status, reply = _post(stack, "/v1/chat/completions", _chat(max_tokens=1000))
        assert status == 200, reply
    finally:
        stack.gateway.stop()


def test_ordinary_requests_within_the_caps_still_pass(stack):
    images = [{"type": "image_url", "image_url": {"url": png_data_url(4, 4)}}] * 2
    for body in (
        _chat(n=2, max_tokens=8, logprobs=True, top_logprobs=5, stop=["a", "b", "c", "d"]),
        _chat(max_completion_tokens=16, chat_template_kwargs={"enable_thinking": False}),
        _chat(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}, *images]}]),
        _chat(seed=1, temperature=0, logit_bias={"1": 0.5}, prompt_logprobs=None),
    ):
        status, reply = _post(stack, "/v1/chat/completions", body)
        assert status == 200, (body, reply)
    status, reply = _post(
        stack, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 4}
    )
    assert status == 200, reply


def _messages(*content: dict, **extra) -> dict:
    parts = [{"type": "text", "text": "hi"}, *content]
    return {
        "model": MODEL,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": parts}],
    } | extra


def _responses(*content: dict, **extra) -> dict:
    parts = [{"type": "input_text", "text": "hi"}, *content]
    body = {"model": MODEL, "max_output_tokens": 4, "input": [{"role": "user", "content": parts}]}
    return body | extra


def _base64_image(data_url: str) -> dict:
    source = {"type": "base64", "media_type": "image/png", "data": data_url.split(",", 1)[1]}
    return {"type": "image", "source": source}


def test_the_agent_routes_refuse_the_same_attacks_before_the_engine(stack, listener):
    """/v1/messages and /v1/responses reach vLLM's chat machinery (and its media fetcher): the
    same refusals hold there, in each API's own shape, and nothing reaches the engine."""
    target = f"http://127.0.0.1:{listener.port}/secret.png"
    url_image = {"type": "image", "source": {"type": "url", "url": target}}
    tool_result = {"type": "tool_result", "tool_use_id": "t", "content": [url_image]}
    huge = _png_header(20_000, 20_000)
    messages_attacks = [
        ("messages[0].content[1].source", _messages(url_image)),
        # an image inside a tool's result is fetched the same way (_convert_user_tool_result)
        ("messages[0].content[1].content[0].source", _messages(tool_result)),
        ("messages[0].content[9]", _messages(*[_base64_image(png_data_url(2, 2))] * 9)),
        (
            "messages[0].content[1].source.data",
            _messages(_base64_image(_png_header(20_000, 20_000))),
        ),
        ("chat_template_kwargs.tools", _messages(chat_template_kwargs={"tools": [{"x": 1}]})),
        ("kv_transfer_params", _messages(kv_transfer_params={"do_remote_prefill": True})),
        ("vllm_xargs", _messages(vllm_xargs={"x": 1})),
        ("max_tokens", _messages(max_tokens=10**9)),
    ]
    for param, body in messages_attacks:
        status, reply = _post(stack, "/v1/messages", body)
        assert status == 400, (param, reply)
        assert reply["type"] == "error", reply  # Anthropic's shape
        assert reply["error"]["type"] == "invalid_request_error", reply
        assert reply["error"]["param"] == param, reply
    status, reply = _post(stack, "/v1/messages", messages_attacks[0][1])
    assert "base64" in reply["error"]["message"]

    function_output = [
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c",
         "output": [{"type": "input_image", "image_url": target}]},
    ]  # fmt: skip
    responses_attacks = [
        ("input[0].content[1].image_url", _responses({"type": "input_image", "image_url": target})),
        # a function's output is a tool message whose parts vLLM parses like a user's
        ("input[1].output[0].image_url", {"model": MODEL, "input": function_output}),
        ("input[0].content[1].image_url", _responses({"type": "input_image", "image_url": huge})),
        ("mm_processor_kwargs", _responses(mm_processor_kwargs={"max_pixels": 10**9})),
        ("max_output_tokens", _responses(max_output_tokens=10**9)),
        ("top_logprobs", _responses(top_logprobs=100000)),
    ]
    for param, body in responses_attacks:
        status, reply = _post(stack, "/v1/responses", body)
        assert status == 400, (param, reply)
        assert reply["error"]["param"] == param, reply
    # The same pictures inline are fine.
    inline = png_data_url()
    status, reply = _post(stack, "/v1/messages", _messages(_base64_image(inline)))
    assert status == 200, reply
    image = {"type": "input_image", "image_url": inline}
    status, reply = _post(stack, "/v1/responses", _responses(image))
    assert status == 200, reply
    _assert_engine_saw_only(stack, good_chats=0)
    assert _engine_lines(stack, MESSAGES_LINE) == 1
    assert _engine_lines(stack, RESPONSES_LINE) == 1
    assert listener.accepted == []
