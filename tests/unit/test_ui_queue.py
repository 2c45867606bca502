"""The UI's Gradio queue polls every QUEUE_POLL_MS while idle, not Gradio's 1 ms."""

from __future__ import annotations

import gradio as gr

from ui import app


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
