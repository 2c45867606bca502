"""Conversation -> Chatbot messages: thinking block states, stats line, streaming-friendly text."""

from __future__ import annotations

from pathlib import Path

from appliance.chat import client as chat
from appliance.chat import history as hist
from ui import chat_render as render


class Clock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


def live(reply: chat.Reply) -> render.Rendered:
    out = render.Rendered()
    render.render_live_reply(out, 3, reply)
    return out


def test_thinking_is_open_with_a_timer_then_collapses_with_its_duration() -> None:
    clock = Clock()
    reply = chat.Reply(level="high", clock=clock)
    waiting = live(reply).messages
    assert waiting[0]["metadata"]["status"] == "pending"  # a block shows before the first token
    clock.now = 10.5
    reply.apply(chat.ReasoningDelta("Let me think"))
    clock.now = 12.0
    (thinking,) = live(reply).messages
    assert thinking["metadata"]["status"] == "pending"
    assert thinking["metadata"]["title"] == "Thinking · 1.5 s · level high"
    assert thinking["content"] == "Let me think"
    reply.apply(chat.ContentDelta("The answer"))
    thought, answer = live(reply).messages
    assert thought["metadata"]["status"] == "done"  # done = collapsed in the Chatbot
    assert thought["metadata"]["duration"] == 1.5
    assert thought["metadata"]["title"] == "Thought · level high"
    assert answer["content"] == "The answer"  # no footer while streaming: the text only grows


def test_streaming_text_only_grows_between_updates() -> None:
    reply = chat.Reply(level="low")
    reply.apply(chat.ContentDelta("one "))
    before = live(reply).messages[-1]["content"]
    reply.apply(chat.ContentDelta("two"))
    after = live(reply).messages[-1]["content"]
    assert after.startswith(before)  # so Gradio's diff sends an append, not the whole message


def test_finished_reply_has_the_stats_footer() -> None:
    clock = Clock()
    reply = chat.Reply(level="medium", clock=clock)
    clock.now = 10.2
    reply.apply(chat.ContentDelta("Hi"))
    clock.now = 12.2
    reply.apply(chat.Usage(1234, 201))
    reply.finish()
    (answer,) = live(reply).messages
    assert answer["content"].startswith(
        'Hi\n\n<div class="reply-stats level-medium status-complete">'
    )
    assert (
        "level medium · first token 200 ms · 100 tok/s · 1,234 prompt + 201 completion tokens"
        in (answer["content"])
    )


def test_stored_messages_render_with_images_status_and_positions(tmp_path: Path) -> None:
    image = hist.StoredImage("a.png", "image/png", b"\x89PNG data")
    messages = [
        hist.Message(1, 0, "user", "look", images=[image, image]),
        hist.Message(2, 1, "assistant", "partial", "thought", hist.INTERRUPTED, {"level": "low"}),
    ]
    out = render.render_messages(messages, lambda i: render.image_file(i, tmp_path))
    assert out.kinds == ["image", "image", "text", "thinking", "answer"]
    assert out.positions == [0, 0, 0, 1, 1]
    path = Path(out.messages[0]["content"]["path"])
    assert path.read_bytes() == image.data
    assert path.parent == tmp_path
    assert "status-interrupted" in out.messages[-1]["content"]
    assert "interrupted: the appliance stopped mid-answer" in out.messages[-1]["content"]


def test_context_line() -> None:
    assert render.context_line(None, None) == "Context: unknown until the model is running"
    assert render.context_line(262144, 2621) == (
        "Context: 262,144 tokens · this conversation ≈ 2,621 (1%)"
    )
