"""The streaming client against the real simulator process (vLLM's API, metrics and abort)."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request

from fixtures.aio import run_async

from appliance.chat import client as chat


def running(url: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:num_requests_running")
    )


async def stream_all(url: str, level: str, text: str = "hello") -> chat.Reply:
    client = chat.ChatClient(url, "step3p7-flash")
    reply = chat.Reply(level=level)
    try:
        async for event in client.stream(
            [{"role": "user", "content": text}], chat.SamplingOptions(level)
        ):
            reply.apply(event)
        reply.finish()
    finally:
        await client.aclose()
    return reply


def test_reasoning_and_answer_arrive_apart_with_the_level_and_usage(simulator) -> None:
    url = simulator()
    reply = run_async(stream_all(url, "high", "What is 2+2?"))
    assert reply.phase == chat.FINISHED
    assert reply.reasoning.startswith("Reasoning level: high.")
    assert 'The user wrote: "What is 2+2?"' in reply.reasoning
    assert reply.content.startswith("Simulated reply from step3p7-flash")
    assert "Reasoning level" not in reply.content
    assert reply.usage is not None
    assert reply.usage.completion_tokens > 0
    assert reply.usage.prompt_tokens > 0
    assert reply.ttft_seconds() is not None
    assert reply.thinking_seconds() > 0


def test_each_level_reaches_the_engine(simulator) -> None:
    url = simulator()
    lengths = {}
    for level in chat.REASONING_LEVELS:
        reply = run_async(stream_all(url, level))
        assert reply.reasoning.startswith(f"Reasoning level: {level}.")
        lengths[level] = reply.usage.completion_tokens if reply.usage else 0
    assert lengths["low"] < lengths["medium"] < lengths["high"]


def test_model_info_and_exact_token_count(simulator) -> None:
    url = simulator("--max-model-len", "32768")

    async def run() -> tuple[chat.ModelInfo, int | None]:
        client = chat.ChatClient(url, "step3p7-flash")
        try:
            info = await client.model_info()
            count = await client.count_tokens([{"role": "user", "content": "one two three"}])
            return info, count
        finally:
            await client.aclose()

    info, count = run_async(run())
    assert info == chat.ModelInfo("step3p7-flash", 32768)
    assert count is not None
    assert count > 0


def test_closing_the_stream_aborts_the_request_in_the_engine(simulator) -> None:
    url = simulator(tokens_per_s=50)

    async def run() -> float:
        client = chat.ChatClient(url, "step3p7-flash")
        events = client.stream([{"role": "user", "content": "long"}], chat.SamplingOptions())
        got = 0
        async for _ in events:
            got += 1
            if got == 5:
                break
        assert running(url) == 1  # still generating in the engine
        await events.aclose()
        closed = time.monotonic()
        while running(url) != 0:
            await asyncio.sleep(0.02)
        await client.aclose()
        return time.monotonic() - closed

    run_async(asyncio.wait_for(run(), 30))
    assert running(url) == 0


def test_an_engine_error_becomes_a_stream_error(simulator) -> None:
    url = simulator()

    async def run() -> list[chat.ChatEvent]:
        client = chat.ChatClient(url, "no-such-model")
        try:
            return [
                e
                async for e in client.stream(
                    [{"role": "user", "content": "x"}], chat.SamplingOptions()
                )
            ]
        finally:
            await client.aclose()

    (event,) = run_async(run())
    assert isinstance(event, chat.StreamError)
    assert "HTTP 404" in event.message


def test_an_engine_that_is_not_there_is_a_clear_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    async def run() -> list[chat.ChatEvent]:
        client = chat.ChatClient(url, "step3p7-flash")
        try:
            return [
                e
                async for e in client.stream(
                    [{"role": "user", "content": "x"}], chat.SamplingOptions()
                )
            ]
        finally:
            await client.aclose()

    (event,) = run_async(run())
    assert isinstance(event, chat.StreamError)
    assert "refused the connection" in event.message
