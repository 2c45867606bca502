"""Chat and text completions through the official openai SDK (reference/vllm.md, chat section).

On real vLLM the tiny standard model answers deterministically (tests/realvllm/make_models.py:
reasoning whose length depends on the level, then "The answer is 42.", or a get_weather call when
tools are sent), so the same assertions run there; the tiny Step-3.7 model has dummy weights
(random text), so only shapes are asserted on it.
"""

from __future__ import annotations

import json
from functools import cache

import httpx
import openai
import pytest
from conformance_servers import Server, client_for, vllm_version
from fixtures.realvllm import MODELS_DIR

LEVELS = ("low", "medium", "high")
RANDOM_TEXT = "the tiny Step-3.7 model has dummy weights: its text is random"


@cache
def tiny_models() -> dict:
    """What tests/realvllm/make_models.py says the tiny models answer."""
    return json.loads((MODELS_DIR / "models.json").read_text())


def skip_random_text(server: Server, why: str = RANDOM_TEXT) -> None:
    if server.model_kind == "step":
        pytest.skip(why)


def sse(server: Server, payload: dict) -> list[dict]:
    """The raw `data:` events of a streamed chat completion, as JSON (without [DONE])."""
    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    events = []
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json={"model": server.model, "stream": True, **payload},
        headers=headers,
        timeout=120,
    ) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
            elif line == "data: [DONE]":
                events.append({"done": True})
    assert events[-1] == {"done": True}
    return events[:-1]


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
    card = models[0]
    assert card.object == "model"
    assert card.owned_by == "vllm"
    extra = card.model_extra or {}
    assert extra["max_model_len"] > 0
    assert extra["root"]  # the model path or hub id it was started with
    assert extra["parent"] is None
    assert extra["permission"][0]["object"] == "model_permission"
    assert extra["permission"][0]["id"].startswith("modelperm-")


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
    assert usage is not None
    assert usage.completion_tokens >= len(kinds)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert finish in ("stop", "length")
    if server.model_kind == "step":
        return  # random text rarely closes its reasoning
    assert content
    first_content = kinds.index("content")
    assert "reasoning" not in kinds[first_content:]
    if server.model_kind == "std":
        assert content == tiny_models()["std"]["answer"]
        assert reasoning == tiny_models()["std"]["reasoning"]["medium"]["text"]


def test_stream_chunk_shapes(server: Server) -> None:
    """First chunk: the role with empty content; the finish chunk of a stop: an empty delta
    (the end-of-sequence token has no text; serving.py sends DeltaMessage()); then the usage
    chunk with no choices. Same in 0.23.0 and 0.32 (chat_completion/serving.py)."""
    events = sse(
        server,
        {
            "messages": [{"role": "user", "content": "What is 2 + 2?"}],
            "reasoning_effort": "low",
            "max_tokens": 300,
            "stream_options": {"include_usage": True},
        },
    )
    first, *middle, finish, usage = events
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["choices"][0]["finish_reason"] is None
    assert all(e["choices"][0]["finish_reason"] is None for e in middle)
    assert {e["id"] for e in events} == {first["id"]}
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] > 0
    # vllm-<version>[-<parallelism>]-<hash8> (vllm/entrypoints/serve/utils/fingerprint.py), on
    # the last chunk only: the usage chunk here, the finish chunk without include_usage.
    version = ".".join(str(part) for part in vllm_version(server))
    assert usage["system_fingerprint"].startswith(f"vllm-{version}")
    assert "system_fingerprint" not in finish
    assert all("token_ids" in e["choices"][0] for e in [*middle, finish])
    if server.model_kind == "step":
        return  # random text: a stop or a cut, either way a finish chunk came
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert finish["choices"][0]["delta"] == {}


def test_a_budget_that_ends_inside_the_reasoning(server: Server, client) -> None:
    """No answer text: content is null, not "" (Step3p5ReasoningParser.extract_reasoning returns
    None, 0.23.0 and 0.32); streamed, the last token rides in the finish chunk (finish_reason
    "length"), as serving.py attaches the finish reason to the last output's delta."""
    reply = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Think hard."}],
        reasoning_effort="high",
        max_tokens=5,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content is None
    assert reasoning_of(choice.message)
    events = sse(
        server,
        {
            "messages": [{"role": "user", "content": "Think hard."}],
            "reasoning_effort": "high",
            "max_tokens": 5,
        },
    )
    finish = events[-1]["choices"][0]
    assert finish["finish_reason"] == "length"
    assert finish["delta"].get("reasoning")
    assert not any(e["choices"][0]["delta"].get("content") for e in events[1:])


def test_usage_counts_reasoning_tokens_from_0_32(server: Server, client) -> None:
    """0.32 adds usage.completion_tokens_details.reasoning_tokens when a reasoning parser is set
    (chat_completion/serving.py, _make_completion_tokens_details); 0.23.0 has no
    completion_tokens_details (its UsageInfo has prompt, completion, total)."""
    reply = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Name a colour."}],
        reasoning_effort="low",
        max_tokens=300,
    )
    details = reply.usage.completion_tokens_details
    if vllm_version(server) < (0, 32):
        assert details is None
        return
    assert details.reasoning_tokens > 0
    assert details.reasoning_tokens <= reply.usage.completion_tokens
    if server.model_kind == "std":
        assert details.reasoning_tokens == tiny_models()["std"]["reasoning"]["low"]["tokens"]


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
    assert reply.usage.completion_tokens > 0
    if server.model_kind != "step":
        assert reply.choices[0].message.content


@pytest.mark.parametrize("level", LEVELS)
def test_reasoning_level_reaches_the_template(server: Server, level: str) -> None:
    """vLLM hands reasoning_effort to the chat template, which writes `Reasoning: <level>` at
    the top of the system turn (Step-3.7's template, the tiny models' and the simulator's);
    /tokenize renders the same template (its chat_template_kwargs carry the level)."""
    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": "Think about this."}],
        "chat_template_kwargs": {"reasoning_effort": level},
        "return_token_strs": True,
    }
    response = httpx.post(f"{server.url}/tokenize", json=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    rendered = "".join(response.json()["token_strs"]).replace("\u0120", " ")
    assert f"Reasoning: {level}" in rendered.replace("Reasoning:", "Reasoning: ").replace("  ", " ")


def test_higher_levels_reason_longer(server: Server, client) -> None:
    skip_random_text(server)
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
    skip_random_text(server, RANDOM_TEXT + ": it calls no tool")
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
    assert call.id.startswith("chatcmpl-tool-")
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert args["city"] == "Paris"
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
    skip_random_text(server, RANDOM_TEXT + ": it calls no tool")
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
    # Structured output forces the JSON, but random weights never close its strings.
    skip_random_text(server, RANDOM_TEXT + ": the forced JSON arguments never end")
    other = {**WEATHER_TOOL, "function": {**WEATHER_TOOL["function"], "name": "get_time"}}
    reply = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "What time is it in Paris?"}],
        tools=[WEATHER_TOOL, other],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        reasoning_effort="low",
    )
    assert reply.choices[0].message.tool_calls[0].function.name == "get_time"


@pytest.fixture(scope="module")
def bare(module_launch):
    """`vllm serve` without the Station profile's parsers (real vLLM: started once per module)."""
    return module_launch(
        "--served-model-name", "plain", "--kv-cache-dtype", "fp8",
        "--gpu-memory-utilization", "0.95", station_flags=False, real_start=True,
    )  # fmt: skip


def test_auto_tool_choice_needs_the_flags(bare) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client_for(bare).chat.completions.create(
            model="plain",
            messages=[{"role": "user", "content": "weather?"}],
            tools=[WEATHER_TOOL],
            tool_choice="auto",
        )
    assert err.value.status_code == 400
    assert "--enable-auto-tool-choice" in err.value.message


def test_without_reasoning_parser_the_thinking_stays_in_content(bare) -> None:
    reply = client_for(bare).chat.completions.create(
        model="plain", messages=[{"role": "user", "content": "Hi"}], reasoning_effort="low"
    )
    message = reply.choices[0].message
    assert not reasoning_of(message)
    assert "</think>" in message.content
