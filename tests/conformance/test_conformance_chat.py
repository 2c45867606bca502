"""Chat and text completions through the official openai SDK (reference/vllm.md, chat section)."""

from __future__ import annotations

import json

import openai
import pytest
from conformance_servers import Server, client_for

LEVELS = ("low", "medium", "high")


def read_stream(stream):
    """(reasoning, content, kinds in arrival order, usage, finish_reason, tool call deltas)."""
    reasoning, content, kinds, usage, finish, tools = "", "", [], None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
        for choice in chunk.choices:
            extra = choice.delta.model_extra or {}
            piece = extra.get("reasoning") or extra.get("reasoning_content")
            if piece:
                reasoning += piece
                kinds.append("reasoning")
            if choice.delta.content:
                content += choice.delta.content
                kinds.append("content")
            if choice.delta.tool_calls:
                tools.extend(choice.delta.tool_calls)
                kinds.append("tool")
            finish = choice.finish_reason or finish
    return reasoning, content, kinds, usage, finish, tools


def reasoning_of(message) -> str:
    extra = message.model_extra or {}
    return extra.get("reasoning") or extra.get("reasoning_content") or ""


def test_models_lists_the_served_name_with_context_length(server: Server, client) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [server.model]
    assert models[0].owned_by == "vllm"
    assert (models[0].model_extra or {})["max_model_len"] > 0


def test_stream_sends_reasoning_then_content_then_usage(server: Server, client) -> None:
    stream = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "What is 2 + 2?"}],
        reasoning_effort="medium",
        max_tokens=400,
        stream=True,
        stream_options={"include_usage": True},
    )
    reasoning, content, kinds, usage, finish, _ = read_stream(stream)
    assert reasoning
    assert content
    first_content = kinds.index("content")
    assert "reasoning" not in kinds[first_content:]
    assert usage is not None
    assert usage.completion_tokens >= len(kinds)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert finish in ("stop", "length")


def test_stream_without_include_usage_has_no_usage_chunk(server: Server, client) -> None:
    stream = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Hi"}],
        reasoning_effort="low",
        max_tokens=50,
        stream=True,
    )
    *_, usage, _, _ = read_stream(stream)
    assert usage is None


def test_non_streaming_message_carries_reasoning_and_usage(server: Server, client) -> None:
    reply = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Name a colour."}],
        reasoning_effort="low",
        max_tokens=300,
    )
    assert reply.object == "chat.completion"
    assert reasoning_of(reply.choices[0].message)
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0


@pytest.mark.parametrize("level", LEVELS)
def test_reasoning_level_arrives(server: Server, client, level: str) -> None:
    if not server.simulated:
        pytest.skip("only the simulator names the level it received")
    reply = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Think about this."}],
        reasoning_effort=level,
    )
    assert f"Reasoning level: {level}." in reasoning_of(reply.choices[0].message)


def test_higher_levels_reason_longer(server: Server, client) -> None:
    lengths = {}
    for level in LEVELS:
        stream = client.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": "Is 1,001 a prime number?"}],
            reasoning_effort=level,
            stream=True,
            stream_options={"include_usage": True},
        )
        reasoning, *_ = read_stream(stream)
        lengths[level] = len(reasoning)
    assert lengths["low"] < lengths["medium"] < lengths["high"]


def test_max_tokens_cuts_with_finish_reason_length(server: Server, client) -> None:
    reply = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Tell me a long story."}],
        reasoning_effort="high",
        max_tokens=12,
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12


def test_ignore_eos_gives_exactly_max_tokens(server: Server, client) -> None:
    stream = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Go on."}],
        reasoning_effort="low",
        max_tokens=700,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    *_, usage, finish, _ = read_stream(stream)
    assert usage.completion_tokens == 700
    assert finish == "length"


def test_text_completions_stream_and_not(server: Server, client) -> None:
    reply = client.completions.create(model=server.model, prompt="The capital of France is")
    assert reply.object == "text_completion"
    assert reply.choices[0].text
    assert reply.usage.completion_tokens <= 16  # vLLM's and OpenAI's default max_tokens
    chunks = list(
        client.completions.create(
            model=server.model,
            prompt="Count to three:",
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage.completion_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "kelvin"]}},
            "required": ["city", "unit"],
        },
    },
}


def test_tool_call_non_streaming_then_tool_result(server: Server, client) -> None:
    messages = [{"role": "user", "content": "Use get_weather: what is the weather in Paris?"}]
    reply = client.chat.completions.create(
        model=server.model,
        messages=messages,
        tools=[WEATHER_TOOL],
        tool_choice="auto",
        reasoning_effort="low",
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert set(args) >= {"city"}
    if server.simulated:
        assert args == {"city": "Paris", "unit": "celsius"}
    messages += [
        {"role": "assistant", "tool_calls": [call.model_dump()], "content": None},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
    ]
    answer = client.chat.completions.create(
        model=server.model, messages=messages, tools=[WEATHER_TOOL], reasoning_effort="low"
    )
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content
    if server.simulated:
        assert "18 degrees and sunny" in answer.choices[0].message.content


def test_tool_call_streaming_assembles(server: Server, client) -> None:
    stream = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Call get_weather for Oslo."}],
        tools=[WEATHER_TOOL],
        reasoning_effort="low",
        stream=True,
    )
    _, _, kinds, _, finish, deltas = read_stream(stream)
    assert finish == "tool_calls"
    assert deltas[0].id
    assert deltas[0].function.name == "get_weather"
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert json.loads(arguments)["city"]
    assert kinds.index("tool") > kinds.index("reasoning")


def test_named_tool_choice_is_honoured(server: Server, client) -> None:
    other = {**WEATHER_TOOL, "function": {**WEATHER_TOOL["function"], "name": "get_time"}}
    reply = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "What time is it in Paris?"}],
        tools=[WEATHER_TOOL, other],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        reasoning_effort="low",
    )
    assert reply.choices[0].message.tool_calls[0].function.name == "get_time"


def test_auto_tool_choice_needs_the_flags(launch) -> None:
    bare = launch(
        "--served-model-name", "plain", "--kv-cache-dtype", "fp8",
        "--gpu-memory-utilization", "0.95", station_flags=False,
    )  # fmt: skip
    with pytest.raises(openai.BadRequestError) as err:
        client_for(bare).chat.completions.create(
            model="plain",
            messages=[{"role": "user", "content": "weather?"}],
            tools=[WEATHER_TOOL],
            tool_choice="auto",
        )
    assert err.value.status_code == 400
    assert "--enable-auto-tool-choice" in err.value.message


def test_without_reasoning_parser_the_thinking_stays_in_content(launch) -> None:
    bare = launch(
        "--served-model-name", "plain", "--kv-cache-dtype", "fp8",
        "--gpu-memory-utilization", "0.95", station_flags=False,
    )  # fmt: skip
    reply = client_for(bare).chat.completions.create(
        model="plain", messages=[{"role": "user", "content": "Hi"}], reasoning_effort="low"
    )
    message = reply.choices[0].message
    assert not reasoning_of(message)
    assert "</think>" in message.content
