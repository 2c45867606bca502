"""Chunk parsing, the reply accumulator and the coalescer (no engine needed)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from fixtures.aio import run_async

from appliance.chat import client as chat


def test_parse_reads_reasoning_then_falls_back_to_reasoning_content() -> None:
    new = {"choices": [{"delta": {"reasoning": "think"}, "finish_reason": None}]}
    old = {"choices": [{"delta": {"reasoning_content": "think old"}, "finish_reason": None}]}
    both = {"choices": [{"delta": {"reasoning": "new", "reasoning_content": "old"}}]}
    assert chat.parse_chunk(new) == [chat.ReasoningDelta("think")]
    assert chat.parse_chunk(old) == [chat.ReasoningDelta("think old")]
    assert chat.parse_chunk(both) == [chat.ReasoningDelta("new")]


def test_parse_content_finish_usage_and_error() -> None:
    chunk = {"choices": [{"delta": {"content": "Hi"}, "finish_reason": "stop"}]}
    assert chat.parse_chunk(chunk) == [chat.ContentDelta("Hi"), chat.Done("stop")]
    usage = {
        "choices": [],
        "usage": {
            "prompt_tokens": 12,
            "completion_tokens": 40,
            "completion_tokens_details": {"reasoning_tokens": 30},
        },
    }
    assert chat.parse_chunk(usage) == [chat.Usage(12, 40, 30)]
    assert chat.parse_chunk({"error": {"message": "boom"}}) == [chat.StreamError("boom")]
    # An empty role-only first chunk carries nothing.
    assert chat.parse_chunk({"choices": [{"delta": {"role": "assistant", "content": ""}}]}) == []


def test_request_always_sends_a_level_and_asks_for_usage() -> None:
    body = chat.build_request(
        "step3p7-flash", [{"role": "user", "content": "x"}], chat.SamplingOptions("high")
    )
    assert body["reasoning_effort"] == "high"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert "max_tokens" not in body
    assert chat.build_request("m", [], chat.SamplingOptions(max_tokens=64))["max_tokens"] == 64


@pytest.mark.parametrize(
    "kwargs",
    [{"reasoning_effort": "max"}, {"temperature": 3.0}, {"top_p": 0.0}, {"max_tokens": -1}],
)
def test_bad_sampling_options_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(chat.BadInputError):
        chat.SamplingOptions(**kwargs)  # type: ignore[arg-type]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_reply_times_thinking_ttft_and_rate() -> None:
    clock = Clock()
    reply = chat.Reply(level="high", clock=clock)
    clock.now = 100.5
    reply.apply(chat.ReasoningDelta("a"))
    assert reply.phase == chat.THINKING
    clock.now = 102.5
    reply.apply(chat.ContentDelta("b"))
    assert reply.phase == chat.ANSWERING
    clock.now = 103.5
    reply.apply(chat.Usage(10, 301))
    reply.finish()
    stats = reply.stats()
    assert stats["ttft_s"] == 0.5
    assert stats["thinking_s"] == 2.0
    assert stats["tokens_per_s"] == 100.0  # 300 tokens after the first, in 3 s
    assert stats["prompt_tokens"] == 10
    assert stats["completion_tokens"] == 301
    assert stats["level"] == "high"
    assert reply.phase == chat.FINISHED


def test_an_error_ends_the_reply_as_failed() -> None:
    reply = chat.Reply(level="low")
    reply.apply(chat.ContentDelta("partial"))
    reply.apply(chat.StreamError("engine died"))
    reply.finish()
    assert (reply.phase, reply.error, reply.content) == (chat.FAILED, "engine died", "partial")


async def burst(n: int) -> AsyncIterator[chat.ChatEvent]:
    """n tokens with no pause at all: the worst case for a per-token UI."""
    for i in range(n):
        yield chat.ReasoningDelta(f"r{i} ") if i < n // 2 else chat.ContentDelta(f"c{i} ")
        if i % 50 == 0:
            await asyncio.sleep(0)
    yield chat.Usage(5, n)


async def collect(events: AsyncIterator[chat.ChatEvent], **kwargs: float) -> list[str]:
    reply = chat.Reply(level="medium")
    seen = []
    async for current in chat.coalesce(events, reply, **kwargs):
        seen.append(current.content)
    assert reply.phase == chat.FINISHED
    return seen


def test_coalescing_never_updates_per_token() -> None:
    updates = run_async(collect(burst(4000), interval_s=0.05))
    assert len(updates) <= 4  # 4,000 tokens arrived at once: a handful of updates, not 4,000
    assert updates[-1] == "".join(f"c{i} " for i in range(2000, 4000))


def test_each_new_token_is_shown_without_waiting_for_a_tick() -> None:
    """The source only moves on once the consumer has seen its last token; with a tick of a
    minute, any wait for something other than "a token arrived" would deadlock."""
    shown: list[asyncio.Event] = [asyncio.Event() for _ in range(20)]

    async def lockstep() -> AsyncIterator[chat.ChatEvent]:
        for i in range(20):
            yield chat.ContentDelta(f"<{i}>")
            await shown[i].wait()

    async def run() -> int:
        reply = chat.Reply(level="low")
        updates = 0
        async for current in chat.coalesce(lockstep(), reply, interval_s=0.0, tick_s=60.0):
            updates += 1
            for i in range(20):
                if f"<{i}>" in current.content:
                    shown[i].set()
        return updates

    assert run_async(asyncio.wait_for(run(), 30)) >= 20


def test_ticks_keep_coming_while_the_engine_is_silent() -> None:
    async def slow_start() -> AsyncIterator[chat.ChatEvent]:
        await asyncio.sleep(0.4)
        yield chat.ContentDelta("late")

    async def run() -> list[str]:
        reply = chat.Reply(level="low")
        phases = []
        async for current in chat.coalesce(slow_start(), reply, interval_s=0.01, tick_s=0.05):
            phases.append(current.phase)
        return phases

    phases = run_async(run())
    assert phases.count(chat.WAITING) >= 2  # the waiting timer moved before the first token
    assert phases[-1] == chat.FINISHED


def test_closing_the_consumer_closes_the_source() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[chat.ChatEvent]:
        try:
            while True:
                yield chat.ContentDelta("x")
                await asyncio.sleep(0.001)
        finally:
            closed.set()

    async def run() -> chat.Reply:
        reply = chat.Reply(level="low")
        updates = chat.coalesce(endless(), reply, interval_s=0.01)
        async for _ in updates:
            if len(reply.content) > 20:
                break
        await updates.aclose()
        await asyncio.wait_for(closed.wait(), 5)
        return reply

    reply = run_async(run())
    assert reply.phase == chat.STOPPED


def test_cancelling_the_consumer_task_closes_the_source() -> None:
    """Stop in the UI cancels the handler's task: the source must be closed too."""
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[chat.ChatEvent]:
        try:
            while True:
                yield chat.ReasoningDelta("x")
                await asyncio.sleep(0.001)
        finally:
            closed.set()

    async def run() -> chat.Reply:
        reply = chat.Reply(level="low")

        async def consume() -> None:
            async for _ in chat.coalesce(endless(), reply, interval_s=0.01):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(closed.wait(), 5)
        return reply

    assert run_async(run()).phase == chat.STOPPED


def test_context_check_refuses_with_numbers() -> None:
    chat.check_context(1000, 4096, 0, exact=True)
    with pytest.raises(chat.ContextTooLongError, match=r"about 4,000 tokens .* context is 4,096"):
        chat.check_context(4000, 4096, 0, exact=False)
    with pytest.raises(chat.ContextTooLongError, match="room for 2,000 more"):
        chat.check_context(3000, 4096, 2000, exact=True)


def test_estimate_over_counts_text_and_charges_images() -> None:
    text_only = [{"role": "user", "content": "word " * 300}]  # 1,500 characters
    with_images = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
                {"type": "text", "text": "hi"},
            ],
        }
    ]
    assert chat.estimate_tokens(text_only) >= 1500 / 4  # never under a real tokenizer's count
    assert chat.estimate_tokens(with_images) >= chat.TOKENS_PER_IMAGE
