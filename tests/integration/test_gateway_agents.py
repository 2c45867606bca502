"""The coding-agent routes through the gateway: `POST /v1/responses` with the official openai SDK's
Responses API and `POST /v1/messages` with the official anthropic SDK, each in front of the
simulator and of the real vLLM 0.32 (the session's tiny-std engine, tests/fixtures/realvllm.py).

Both engines answer a tool call when sent `tools` (the real one through vLLM's step3p5 tool
parser: the tiny model is wired to call get_weather for Paris, then to answer "The answer is
42." once the tool's result is in the conversation); the simulator echoes what it received.
The engine-only checks (a route the engine lacks, a client that hangs up, per-key limits) run
against the simulator, whose knobs make them happen.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from gateway_kit import (
    MODEL,
    GatewayStack,
    free_port,
    http,
    running_requests,
    start_gateway,
    wait_until,
)

from appliance import settings as st
from appliance.gateway import FixedEngine
from appliance.gateway.sharing import Sharing

pytestmark = pytest.mark.timeout(900)

QUESTION = "What is the answer?"
WEATHER = "What is the weather in Paris?"
REAL_ANSWER = "The answer is 42."  # tests/realvllm/make_models.py wires tiny-std to say this
OPENAI_TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    }
]
ANTHROPIC_TOOLS = [
    {
        "name": "get_weather",
        "description": "The weather in a city.",
        "input_schema": OPENAI_TOOLS[0]["parameters"],
    }
]


@pytest.fixture(params=["simulator", "real-vllm"])
def stack(request: pytest.FixtureRequest, simulator: Any) -> Iterator[GatewayStack]:
    """A keyed gateway on loopback in front of the simulator, then of the real vLLM."""
    if request.param == "simulator":
        url = str(simulator(uds=True))  # on its socket, as the appliance runs the engine
    else:
        url = request.getfixturevalue("real_vllm_std").url
    settings = st.with_changes(
        st.Settings(), {"gateway.port": free_port(), "gateway.require_key_on_loopback": True}
    )
    gateway = start_gateway(settings, FixedEngine(url, MODEL), url)
    gateway.kind = request.param  # type: ignore[attr-defined]
    yield gateway
    gateway.gateway.stop()


def _real(stack: GatewayStack) -> bool:
    return stack.kind == "real-vllm"  # type: ignore[attr-defined]


def _claude(stack: GatewayStack, key: str | None = None, **kwargs: Any) -> anthropic.Anthropic:
    """The anthropic SDK as Claude Code configures it: the gateway's root as its base URL."""
    kwargs.setdefault("max_retries", 0)
    kwargs.setdefault("timeout", 300)
    return anthropic.Anthropic(base_url=f"http://{stack.host}:{stack.port}", api_key=key, **kwargs)


def _answered(stack: GatewayStack, text: str, question: str) -> None:
    if _real(stack):
        assert text == REAL_ANSWER
    else:  # the simulator's reply quotes what it was sent
        assert text.startswith(f'Simulated reply from {MODEL} to "{question}"'), text


def _usage_of(stack: GatewayStack, name: str) -> Any:
    return next(k for k in stack.keys.list() if k.name == name)


# ------------------------------------------------------------------------ Responses API


def test_responses_api_streaming_and_not_with_usage_per_key(stack: GatewayStack) -> None:
    codex, other = stack.key("codex"), stack.key("other")
    client = stack.client(codex, timeout=300)

    whole = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=300)
    assert whole.status == "completed"
    _answered(stack, whole.output_text, QUESTION)
    assert [item.type for item in whole.output] == ["reasoning", "message"]
    assert whole.usage is not None
    assert whole.usage.input_tokens > 0
    assert whole.usage.output_tokens > 0

    events = list(
        client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=300, stream=True)
    )
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1, kinds  # streamed in pieces, not in one event at the end
    done = events[-1].response
    assert "".join(deltas) == done.output_text
    _answered(stack, done.output_text, QUESTION)
    assert done.usage is not None

    stack.client(other).responses.create(model=MODEL, input="hello", max_output_tokens=300)

    counted = _usage_of(stack, "codex")
    assert counted.requests == 2
    assert counted.prompt_tokens == whole.usage.input_tokens + done.usage.input_tokens
    assert counted.completion_tokens == whole.usage.output_tokens + done.usage.output_tokens
    assert _usage_of(stack, "other").requests == 1  # per key

    def records() -> list[Any]:  # each is written just after its answer went out
        return [r for r in reversed(stack.gateway.recent(10)) if r.path == "/v1/responses"]

    assert wait_until(lambda: len(records()) == 3)
    assert [(r.key_name, r.status, r.stream) for r in records()] == [
        ("codex", 200, False),
        ("codex", 200, True),
        ("other", 200, False),
    ]
    assert records()[1].completion_tokens == done.usage.output_tokens


# ------------------------------------------------------------------------- Messages API


def test_messages_api_streaming_and_not_with_usage_per_key(stack: GatewayStack) -> None:
    claude = stack.key("claude-code")
    client = _claude(stack, claude)  # sends the key as x-api-key
    question = [{"role": "user", "content": QUESTION}]

    message = client.messages.create(model=MODEL, max_tokens=300, messages=question)
    assert message.type == "message"
    assert message.stop_reason == "end_turn"
    assert [block.type for block in message.content] == ["thinking", "text"]
    _answered(stack, message.content[1].text, QUESTION)
    assert message.usage.input_tokens > 0
    assert message.usage.output_tokens > 0

    with client.messages.stream(model=MODEL, max_tokens=300, messages=question) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1  # streamed in pieces
    text = "".join(b.text for b in final.content if b.type == "text")
    assert "".join(pieces) == text
    _answered(stack, text, QUESTION)
    assert final.usage.input_tokens == message.usage.input_tokens  # the same prompt
    assert final.usage.output_tokens > 0

    # Claude Code sends the key as a Bearer token when it is set as ANTHROPIC_AUTH_TOKEN.
    bearer = _claude(stack, None, auth_token=claude)
    third = bearer.messages.create(model=MODEL, max_tokens=300, messages=question)

    counted = _usage_of(stack, "claude-code")
    assert counted.requests == 3
    assert counted.prompt_tokens == sum(m.usage.input_tokens for m in (message, final, third))
    assert counted.completion_tokens == sum(m.usage.output_tokens for m in (message, final, third))

    def records() -> list[Any]:  # each is written just after its answer went out
        return [r for r in reversed(stack.gateway.recent(10)) if r.path == "/v1/messages"]

    assert wait_until(lambda: len(records()) == 3)
    assert [(r.key_name, r.status, r.stream) for r in records()] == [
        ("claude-code", 200, False),
        ("claude-code", 200, True),
        ("claude-code", 200, False),
    ]


# --------------------------------------------------------------------------------- keys


def test_a_wrong_or_missing_key_is_401_in_each_apis_own_shape(stack: GatewayStack) -> None:
    good = stack.key("good")
    wrong = good[:-4] + "xxxx"
    with pytest.raises(openai.AuthenticationError) as caught:
        stack.client(wrong).responses.create(model=MODEL, input="x")
    assert caught.value.status_code == 401
    assert caught.value.body["code"] == "invalid_api_key"
    assert caught.value.body["type"] == "invalid_request_error"

    for client in (_claude(stack, wrong), _claude(stack, None, auth_token=wrong)):
        for stream in (False, True):
            with pytest.raises(anthropic.AuthenticationError) as refused:
                client.messages.create(
                    model=MODEL, max_tokens=5, stream=stream,
                    messages=[{"role": "user", "content": "x"}],
                )  # fmt: skip
            body = refused.value.body
            assert body["type"] == "error", body
            assert body["error"]["type"] == "authentication_error", body
            assert "wrong or was revoked" in body["error"]["message"]

    missing = stack.raw(
        http("POST", "/v1/messages", body=b"{}", headers={"Content-Type": "application/json"})
    )
    assert missing.status == 401
    error = missing.json()
    assert error["type"] == "error"
    assert error["error"]["type"] == "authentication_error"
    assert "x-api-key" in error["error"]["message"]
    # A body error on the Anthropic route is Anthropic-shaped too (the gateway's own 400).
    bad = stack.raw(http("POST", "/v1/messages", body=b"{nope", headers={"x-api-key": good}))
    assert bad.status == 400
    assert bad.json()["error"]["type"] == "invalid_request_error"
    assert _usage_of(stack, "good").requests == 0  # refused requests are not counted


# ---------------------------------------------------------------------- tool round trip


def test_a_tool_call_round_trip_through_both_apis(stack: GatewayStack) -> None:
    key = stack.key("agent")

    # Responses: the call streams as function_call_arguments deltas, as vLLM sends them.
    client = stack.client(key, timeout=300)
    asked = [{"role": "user", "content": WEATHER}]
    events = list(
        client.responses.create(
            model=MODEL, input=asked, tools=OPENAI_TOOLS, reasoning={"effort": "low"},
            max_output_tokens=300, stream=True,
        )
    )  # fmt: skip
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    done = events[-1].response
    calls = [item for item in done.output if item.type == "function_call"]
    assert len(calls) == 1, done.output
    call = calls[0]
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert "".join(pieces) == call.arguments
    assert pieces, "the arguments came as stream events"
    follow = client.responses.create(
        model=MODEL,
        input=[
            *asked,
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        ],
        tools=OPENAI_TOOLS,
        reasoning={"effort": "low"},
        max_output_tokens=300,
    )
    if _real(stack):
        assert follow.output_text == REAL_ANSWER
    else:
        assert 'The tool returned: "sunny"' in follow.output_text

    # Messages: a tool_use block whose input streams as input_json_delta pieces.
    claude = _claude(stack, key)
    user = {"role": "user", "content": WEATHER}
    with claude.messages.stream(
        model=MODEL,
        max_tokens=300,
        tools=ANTHROPIC_TOOLS,
        messages=[user],
    ) as stream:
        raw = list(stream)
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    uses = [block for block in final.content if block.type == "tool_use"]
    assert len(uses) == 1, final.content
    assert (uses[0].name, uses[0].input) == ("get_weather", {"city": "Paris"})
    json_pieces = [
        e.delta.partial_json
        for e in raw
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    ]
    assert json.loads("".join(json_pieces)) == {"city": "Paris"}
    answer = claude.messages.create(
        model=MODEL,
        max_tokens=300,
        tools=ANTHROPIC_TOOLS,
        messages=[
            user,
            {"role": "assistant", "content": [b.model_dump() for b in final.content]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "sunny"}],
            },
        ],
    )
    assert answer.stop_reason == "end_turn"
    text = "".join(b.text for b in answer.content if b.type == "text")
    if _real(stack):
        assert text == REAL_ANSWER
    else:
        assert 'The tool returned: "sunny"' in text
    assert _usage_of(stack, "agent").requests == 4


# ---------------------------------------------------------------- engine-only behaviour


@pytest.fixture
def sim_stack(simulator: Any) -> Iterator[Any]:
    """Keyed gateways in front of simulators with the given knobs."""
    made: list[GatewayStack] = []

    def make(**knobs: Any) -> GatewayStack:
        sim = simulator(uds=True, **knobs)
        settings = st.with_changes(
            st.Settings(),
            {
                "gateway.port": free_port(),
                "gateway.require_key_on_loopback": True,
                "gateway.per_key_concurrency": 1,
            },
        )
        gateway = start_gateway(settings, FixedEngine(sim.url, MODEL), sim.url)
        gateway.sim = sim  # type: ignore[attr-defined]
        made.append(gateway)
        return gateway

    yield make
    for gateway in made:
        gateway.gateway.stop()


@pytest.mark.parametrize("listed", [True, False], ids=["openapi-lists-paths", "no-openapi"])
def test_an_engine_without_the_routes_gets_a_clear_501_not_a_404(sim_stack, listed: bool) -> None:
    """An older vLLM lacks the agent routes. With its /openapi.json the gateway knows before
    forwarding; without it, the engine's bare 404 is turned into the same answer."""
    missing = "/v1/messages,/v1/responses" + ("" if listed else ",/openapi.json")
    stack = sim_stack(without_routes=missing)
    key = stack.key("k")
    # The SDKs retry a 5xx twice by default; the gateway's x-should-retry: false stops that.
    with pytest.raises(openai.APIStatusError) as caught:
        stack.client(key, max_retries=2).responses.create(model=MODEL, input="x")
    assert caught.value.status_code == 501
    assert caught.value.body["code"] == "route_not_served_by_engine"
    assert "/v1/responses" in caught.value.body["message"]
    with pytest.raises(anthropic.APIStatusError) as refused:
        _claude(stack, key, max_retries=2).messages.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert refused.value.status_code == 501
    body = refused.value.body
    assert body["type"] == "error"
    assert "does not serve POST /v1/messages" in body["error"]["message"]

    def seen() -> list[tuple[str, int]]:  # a record is written just after the answer is sent
        return [(r.path, r.status) for r in reversed(stack.gateway.recent(10))]

    assert wait_until(lambda: len(seen()) >= 2)
    assert seen() == [("/v1/responses", 501), ("/v1/messages", 501)]  # no retries
    assert (
        stack.client(key)
        .chat.completions.create(  # the other routes still work
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3
        )
        .choices
    )
    # The engine logs each request when it answers; once the chat is in its log, so is any
    # earlier request.
    log = stack.sim.output  # type: ignore[attr-defined]
    assert wait_until(lambda: '"POST /v1/chat/completions HTTP/1.1"' in log(), 10)
    forwarded = log().count('"POST /v1/messages HTTP/1.1"')
    assert forwarded == (0 if listed else 1)  # listed: never forwarded at all
    # What the Sharing tab can say about it (from the same route list).
    note = _sharing(stack).agent_routes_note()
    if listed:
        assert "Claude Code (POST /v1/messages)" in note
        assert "Codex (POST /v1/responses)" in note
    else:
        assert note == ""  # no route list to go by: nothing claimed


def _sharing(stack: GatewayStack) -> Sharing:
    return Sharing(st.SettingsStore(stack.settings), stack.gateway, stack.keys)


def test_hanging_up_mid_stream_ends_the_engine_request_and_limits_apply(sim_stack) -> None:
    stack = sim_stack(tokens_per_s=30)
    key = stack.key("one-at-a-time")
    engine = stack.sim.url  # type: ignore[attr-defined]
    bodies = {
        "/v1/messages": {"model": MODEL, "max_tokens": 3000, "stream": True,
                         "messages": [{"role": "user", "content": "long"}]},
        "/v1/responses": {"model": MODEL, "input": "long", "max_output_tokens": 3000,
                          "stream": True},
    }  # fmt: skip
    for path, body in bodies.items():
        with httpx.stream(
            "POST", f"http://{stack.host}:{stack.port}{path}", json=body,
            headers={"x-api-key": key}, timeout=30,
        ) as response:  # fmt: skip
            assert response.status_code == 200
            lines = response.iter_lines()
            while "delta" not in next(lines):
                pass  # tokens are flowing
            assert running_requests(engine) == 1
            # The key's concurrency limit (1) holds on these routes too, in the API's shape.
            if path == "/v1/messages":
                with pytest.raises(anthropic.RateLimitError) as limited:
                    _claude(stack, key).messages.create(
                        model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "y"}]
                    )
                assert limited.value.body["error"]["type"] == "rate_limit_error"
            else:
                with pytest.raises(openai.RateLimitError):
                    stack.client(key).responses.create(model=MODEL, input="y")
        assert wait_until(lambda: running_requests(engine) == 0, timeout_s=5), path
    notes = {r.path: r.note for r in stack.gateway.recent(10) if r.status == 200}
    assert notes == dict.fromkeys(bodies, "client disconnected")
    assert _sharing(stack).agent_routes_note() == ""  # this engine serves both
