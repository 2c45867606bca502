"""The UI's Gradio queue: asleep while idle (ui/queue_wake.py), or polling every QUEUE_POLL_MS
where STEP_STATION_QUEUE_POLL_MS asks for the old way. Both lean on Gradio internals; these tests
fail when an upgrade moves them."""

from __future__ import annotations

import asyncio

import gradio as gr
from gradio import queueing

from ui import app, queue_wake


def test_tune_queue_sets_the_idle_poll_gradio_uses() -> None:
    with gr.Blocks() as blocks:
        gr.Markdown("x")
    blocks.queue()
    default = blocks._queue.sleep_when_free
    app.tune_queue(blocks, 5)
    # The attribute Gradio's start_processing loop sleeps on while the queue is empty.
    assert blocks._queue.sleep_when_free == 0.005 != default
    app.tune_queue(blocks, 0)  # never a busy loop
    assert blocks._queue.sleep_when_free == 0.001


def test_the_queue_sleeps_until_woken_and_wakes_on_push_and_on_an_event_end(monkeypatch) -> None:
    monkeypatch.setattr(queue_wake, "IDLE_WAIT_S", 3600.0)  # only a wake-up ends a sleep
    with gr.Blocks() as blocks:
        gr.Markdown("x")
    blocks.queue()
    queue = blocks._queue
    assert queue_wake.install(queue)
    assert queue_wake.installed(queue)
    assert isinstance(queueing.asyncio, queue_wake._SleepyAsyncio)
    # Gradio's loops sleep on exactly these attributes (start_processing, start_progress_updates)
    assert queue.sleep_when_free == queue_wake._PROCESS_MARK
    assert queue.progress_update_sleep_when_free == queue_wake._PROGRESS_MARK

    async def scenario() -> tuple[int, bool]:
        sleeper = queueing.asyncio
        # an idle sleep waits for a wake-up
        napping = asyncio.ensure_future(sleeper.sleep(queue.sleep_when_free))
        await asyncio.sleep(0)
        assert not napping.done()
        queue_wake.wake()
        await asyncio.wait_for(napping, 30)

        # the queue's push and process_events wake it (wrapped on the instance)
        pushes = 0

        async def fake_push(*args: object, **kwargs: object) -> None:
            nonlocal pushes
            pushes += 1

        queue.push = queue_wake._waking(fake_push)
        napping = asyncio.ensure_future(sleeper.sleep(queue.sleep_when_free))
        await asyncio.sleep(0)
        await queue.push()
        await asyncio.wait_for(napping, 30)
        # any other delay is a plain sleep
        plain = asyncio.ensure_future(sleeper.sleep(0.001, "r"))
        return pushes, await plain == "r"

    pushes, plain = asyncio.run(scenario())
    assert pushes == 1
    assert plain
