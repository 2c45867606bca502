"""The tiny models (tests/realvllm/make_models.py) served by the real vLLM behave as their
manifest (models.json) says: tiny-std's wired chain through vLLM's step3p5 reasoning and tool
parsers, and the real Step-3.7 architecture taking an image through vLLM's Step3-VL processor.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from fixtures.realvllm import MODELS_DIR
from openai import OpenAI

pytestmark = pytest.mark.timeout(900)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
]
QUESTION = [{"role": "user", "content": "What is the answer?"}]


def manifest() -> dict[str, Any]:
    return json.loads((MODELS_DIR / "models.json").read_text())


def client(proc: Any) -> OpenAI:
    return OpenAI(base_url=f"{proc.url}/v1", api_key="unused", timeout=120, max_retries=0)


def reasoning_of(obj: Any) -> str | None:
    """vLLM 0.32 names the field `reasoning` (older ones `reasoning_content`)."""
    value = getattr(obj, "reasoning", None)
    return value if value is not None else getattr(obj, "reasoning_content", None)


def test_std_streams_reasoning_then_the_known_answer(real_vllm_std: Any) -> None:
    std = manifest()["std"]
    # No temperature: the model's generation_config default (1.0, top_p 0.95) samples, and the
    # wired margins still give the same tokens.
    stream = client(real_vllm_std).chat.completions.create(
        model=real_vllm_std.model,
        messages=QUESTION,
        reasoning_effort="medium",
        stream=True,
        stream_options={"include_usage": True},
    )
    reasoning, content, finishes, usage = [], [], [], None
    first_delta = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if first_delta is None:
                first_delta = choice.delta
            if reasoning_of(choice.delta):
                reasoning.append(reasoning_of(choice.delta))
            if choice.delta.content:
                content.append(choice.delta.content)
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    assert first_delta is not None
    assert first_delta.role == "assistant"
    assert "".join(reasoning).strip() == std["reasoning"]["medium"]["text"]
    assert len(reasoning) > 1, "reasoning should arrive in several deltas"
    assert "".join(content) == std["answer"]
    assert finishes == ["stop"]
    assert usage is not None
    assert usage.completion_tokens_details.reasoning_tokens == std["reasoning"]["medium"]["tokens"]


def test_std_levels_give_strictly_longer_reasoning(real_vllm_std: Any) -> None:
    std = manifest()["std"]
    api = client(real_vllm_std)
    lengths = {}
    for level in ("low", "medium", "high"):
        resp = api.chat.completions.create(
            model=real_vllm_std.model, messages=QUESTION, reasoning_effort=level, temperature=0
        )
        message = resp.choices[0].message
        reasoning = reasoning_of(message) or ""
        assert reasoning.strip() == std["reasoning"][level]["text"], level
        assert message.content == std["answer"], level
        assert resp.choices[0].finish_reason == "stop"
        tokens = resp.usage.completion_tokens_details.reasoning_tokens
        assert tokens == std["reasoning"][level]["tokens"], level
        lengths[level] = tokens
    assert lengths["low"] < lengths["medium"] < lengths["high"]


def test_std_with_tools_answers_with_a_parsed_tool_call(real_vllm_std: Any) -> None:
    call = manifest()["std"]["tool_call"]
    resp = client(real_vllm_std).chat.completions.create(
        model=real_vllm_std.model,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=TOOLS,
        reasoning_effort="low",
        temperature=0,
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls, choice.message
    fn = choice.message.tool_calls[0].function
    assert fn.name == call["name"]
    assert json.loads(fn.arguments) == call["arguments"]
    assert not (choice.message.content or "").strip()
    # With the tool's result in the conversation the model answers instead of calling again.
    follow = client(real_vllm_std).chat.completions.create(
        model=real_vllm_std.model,
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id, "content": "sunny"},
        ],
        tools=TOOLS,
        reasoning_effort="low",
        temperature=0,
    )
    assert follow.choices[0].finish_reason == "stop"
    assert follow.choices[0].message.content == manifest()["std"]["answer"]


def png_bytes(width: int, height: int) -> bytes:
    from PIL import Image

    img = Image.new("RGB", (width, height))
    for x in range(width):
        for y in range(height):
            img.putpixel((x, y), (x * 4 % 256, y * 5 % 256, (x + y) % 256))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_step_chat_with_an_image_runs_the_step3p7_code_path(real_vllm_step: Any) -> None:
    import base64

    api = client(real_vllm_step)
    url = "data:image/png;base64," + base64.b64encode(png_bytes(64, 48)).decode()
    with_image = api.chat.completions.create(
        model=real_vllm_step.model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
        max_tokens=8,
        temperature=0,
    )
    text_only = api.chat.completions.create(
        model=real_vllm_step.model,
        messages=[{"role": "user", "content": "What is in this picture?"}],
        max_tokens=8,
        temperature=0,
    )
    assert with_image.usage.completion_tokens > 0
    assert with_image.choices[0].finish_reason in ("stop", "length")
    # The Step3-VL processor expanded the template's one <im_patch> into the image's features
    # (a 728x728 global view of 169 tokens plus its start/end tokens).
    assert with_image.usage.prompt_tokens - text_only.usage.prompt_tokens >= 169
