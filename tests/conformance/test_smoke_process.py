"""First check of the simulator process through the official openai SDK."""

from __future__ import annotations

import openai


def test_streams_reasoning_then_content(simulator):
    url = simulator()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="step3p7-flash",
        messages=[{"role": "user", "content": "Say hi"}],
        reasoning_effort="high",
        stream=True,
        stream_options={"include_usage": True},
    )
    kinds, reasoning, usage = [], "", None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            extra = choice.delta.model_extra or {}
            if extra.get("reasoning"):
                reasoning += extra["reasoning"]
                kinds.append("reasoning")
            if choice.delta.content:
                kinds.append("content")
    assert "Reasoning level: high" in reasoning
    assert kinds.index("content") > kinds.index("reasoning")
    assert "reasoning" not in kinds[kinds.index("content") :]
    assert usage is not None
    assert usage.completion_tokens >= len(kinds) > 0
