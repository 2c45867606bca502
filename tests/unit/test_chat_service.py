"""The chat flow over the real simulator and a real history file: check, store, stream, store."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import pytest
from fixtures.aio import run_async
from PIL import Image

from appliance.chat import client as chat
from appliance.chat import history as hist
from appliance.chat.service import ChatService, EngineView
from appliance.errors import BadInputError
from appliance.settings import Settings, with_changes

OPTS = chat.SamplingOptions("low")


def running(url: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:num_requests_running")
    )


def service(url: str, *, ready: bool = True) -> ChatService:
    view = EngineView(
        ready=ready, url=url, model="step3p7-flash", label="Ready" if ready else "Stopped"
    )
    return ChatService(Settings(), hist.History().open(), lambda: view)


async def answer(
    svc: ChatService, conversation_id: str, opts: chat.SamplingOptions = OPTS
) -> chat.Reply:
    last = None
    updates = svc.respond(conversation_id, opts)
    async for reply in updates:
        last = reply
    assert last is not None
    return last


def png(path: Path, size: tuple[int, int] = (64, 48)) -> Path:
    Image.new("RGB", size, "green").save(path)
    return path


def test_a_turn_is_stored_then_answered_and_stored(simulator, tmp_path: Path) -> None:
    url = simulator()
    svc = service(url)

    async def run() -> tuple[str, chat.Reply]:
        turn = await svc.submit(
            None,
            "Two pictures?",
            [png(tmp_path / "a.png"), png(tmp_path / "b.png")],
            chat.SamplingOptions("high"),
        )
        assert turn.created
        # The question is durable before anything was sent.
        stored = svc.history.get_conversation(turn.conversation_id).messages
        assert [(m.role, m.content, len(m.images)) for m in stored] == [
            ("user", "Two pictures?", 2)
        ]
        return turn.conversation_id, await answer(
            svc, turn.conversation_id, chat.SamplingOptions("high")
        )

    cid, reply = run_async(run())
    assert reply.phase == chat.FINISHED
    assert "There are 2 image(s)" in reply.reasoning  # both images reached the engine
    conv = svc.history.get_conversation(cid)
    assert conv.title == "Two pictures?"
    _user, bot = conv.messages
    assert bot.status == hist.COMPLETE
    assert bot.content == reply.content
    assert bot.reasoning.startswith("Reasoning level: high.")
    assert bot.meta["level"] == "high"
    assert bot.meta["completion_tokens"] > 0
    assert bot.meta["prompt_tokens"] > 0


def test_a_long_reply_is_saved_while_it_streams(simulator) -> None:
    url = simulator(tokens_per_s=60, output_tokens=2000)
    svc = service(url)

    async def run() -> tuple[str, hist.Message]:
        turn = await svc.submit(None, "stream slowly", [], OPTS)
        updates = svc.respond(turn.conversation_id, OPTS)
        start = time.monotonic()
        async for _ in updates:
            if time.monotonic() - start > 1.6:
                break
        midway = svc.history.get_conversation(turn.conversation_id).messages[-1]
        await updates.aclose()
        return turn.conversation_id, midway

    cid, midway = run_async(run())
    assert midway.status == hist.STREAMING
    assert midway.reasoning.startswith("Reasoning level: low.")  # written before the end
    final = svc.history.get_conversation(cid).messages[-1]
    assert final.status == hist.STOPPED
    assert len(final.reasoning + final.content) >= len(midway.reasoning + midway.content)


def test_stop_ends_the_request_in_the_engine(simulator) -> None:
    url = simulator(tokens_per_s=50)
    svc = service(url)

    async def run() -> str:
        turn = await svc.submit(None, "please stop me", [], OPTS)

        async def consume() -> None:
            async for _ in svc.respond(turn.conversation_id, OPTS):
                pass

        task = asyncio.create_task(consume())  # what Gradio does with a chat handler
        while running(url) != 1:
            await asyncio.sleep(0.05)
        task.cancel()  # what Stop does
        with pytest.raises(asyncio.CancelledError):
            await task
        await svc.settled(turn.conversation_id)
        while running(url) != 0:
            await asyncio.sleep(0.02)
        return turn.conversation_id

    cid = run_async(asyncio.wait_for(run(), 30))
    assert running(url) == 0
    assert svc.history.get_conversation(cid).messages[-1].status == hist.STOPPED


def test_an_over_long_conversation_is_refused_and_nothing_is_stored(simulator) -> None:
    url = simulator("--max-model-len", "2048")
    svc = service(url)

    async def run() -> None:
        await svc.submit(None, "word " * 3000, [], OPTS)

    with pytest.raises(chat.ContextTooLongError, match=r"context is 2,048 tokens"):
        run_async(run())
    assert svc.history.list_conversations() == []


def test_engine_not_ready_refuses_before_storing(simulator) -> None:
    svc = service("http://127.0.0.1:9", ready=False)
    with pytest.raises(chat.EngineNotReadyError, match=r"not running \(Stopped\).*Model tab"):
        run_async(svc.submit(None, "hello", [], OPTS))
    assert svc.history.list_conversations() == []


def test_image_count_includes_earlier_messages(simulator, tmp_path: Path) -> None:
    url = simulator()
    svc = service(url)
    svc.settings = with_changes(svc.settings, {"engine.max_images_per_prompt": 3})
    first = [png(tmp_path / f"{i}.png") for i in range(2)]

    async def run() -> None:
        turn = await svc.submit(None, "two", first, OPTS)
        await answer(svc, turn.conversation_id)
        await svc.submit(turn.conversation_id, "two more", first, OPTS)

    with pytest.raises(BadInputError, match=r"2 in this message and 2 earlier"):
        run_async(run())
    (summary,) = svc.history.list_conversations()
    assert summary.message_count == 2  # the refused message was not stored


def test_regenerate_edit_and_undo(simulator) -> None:
    url = simulator()
    svc = service(url)

    async def run() -> str:
        turn = await svc.submit(None, "first question", [], OPTS)
        await answer(svc, turn.conversation_id)
        svc.prepare_regenerate(turn.conversation_id)
        again = await answer(svc, turn.conversation_id, chat.SamplingOptions("medium"))
        assert again.reasoning.startswith("Reasoning level: medium.")
        await svc.prepare_edit(turn.conversation_id, 0, "edited question", OPTS)
        edited = await answer(svc, turn.conversation_id)
        assert '"edited question"' in edited.reasoning
        return turn.conversation_id

    cid = run_async(run())
    messages = svc.history.get_conversation(cid).messages
    assert [(m.role, m.status) for m in messages] == [
        ("user", "complete"),
        ("assistant", "complete"),
    ]
    assert messages[0].content == "edited question"
    removed = svc.undo(cid)
    assert removed is not None
    assert removed.content == "edited question"
    assert svc.history.get_conversation(cid).messages == []
    # deleted, not kept as a version: no search finds it and the export holds no message
    assert svc.history.search("edited") == []
    exported = json.loads(svc.history.export_json(cid))
    assert "edited question" not in json.dumps(exported)


def test_empty_message_is_refused() -> None:
    svc = service("http://127.0.0.1:9")
    with pytest.raises(BadInputError, match="empty"):
        run_async(svc.submit(None, "   ", [], OPTS))
