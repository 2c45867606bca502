"""Chat history: SQLite in the data dir, every completed message durable, streams recoverable."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from appliance.chat import history as h
from appliance.errors import BadInputError
from appliance.settings import data_dir


@pytest.fixture
def store() -> h.History:
    hist = h.History().open()
    yield hist
    hist.close()


def test_lives_in_the_data_dir_with_wal(store: h.History) -> None:
    assert store.path.parent == data_dir()
    mode = sqlite3.connect(store.path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_messages_round_trip_with_images_and_meta(store: h.History) -> None:
    cid = store.create_conversation("Cats")
    png = h.StoredImage("cat.png", "image/png", b"\x89PNG fake bytes")
    store.add_message(cid, "user", "What is this?", images=[png, png])
    store.add_message(
        cid, "assistant", "A cat.", reasoning="It has whiskers.", meta={"level": "high"}
    )
    conv = store.get_conversation(cid)
    assert [m.role for m in conv.messages] == ["user", "assistant"]
    assert [m.position for m in conv.messages] == [0, 1]
    assert conv.messages[0].images == [png, png]
    assert conv.messages[1].reasoning == "It has whiskers."
    assert conv.messages[1].meta == {"level": "high"}
    assert conv.messages[1].status == h.COMPLETE


def test_list_search_rename_delete(store: h.History, tmp_path: Path) -> None:
    a = store.create_conversation("Rust lifetimes")
    b = store.create_conversation("Sourdough 100%_hydration")
    store.add_message(a, "user", "hi")  # touches a: newest first
    assert [s.id for s in store.list_conversations()] == [a, b]
    assert [s.id for s in store.list_conversations("rust")] == [a]
    # LIKE wildcards in the search are literal.
    assert [s.id for s in store.list_conversations("100%_h")] == [b]
    assert store.list_conversations("100%x") == []
    store.rename(b, "Bread")
    assert store.get_conversation(b).title == "Bread"
    with pytest.raises(BadInputError):
        store.rename(b, "   ")
    store.delete(a)
    assert [s.id for s in store.list_conversations()] == [b]
    with pytest.raises(BadInputError, match="does not exist"):
        store.get_conversation(a)


def test_delete_removes_messages_and_images(store: h.History) -> None:
    cid = store.create_conversation()
    store.add_message(cid, "user", "x", images=[h.StoredImage("a.png", "image/png", b"1")])
    store.delete(cid)
    db = sqlite3.connect(store.path)
    assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 0


def test_truncate_for_regenerate_and_edit(store: h.History) -> None:
    cid = store.create_conversation()
    for i in range(4):
        store.add_message(cid, "user" if i % 2 == 0 else "assistant", f"m{i}")
    store.truncate(cid, 2)
    assert [m.content for m in store.get_conversation(cid).messages] == ["m0", "m1"]
    # Positions continue from the kept ones.
    assert store.add_message(cid, "user", "again").position == 2


def test_streaming_reply_is_marked_interrupted_when_reopened(store: h.History) -> None:
    cid = store.create_conversation()
    store.add_message(cid, "user", "question")
    reply = store.add_message(cid, "assistant", "", status=h.STREAMING)
    store.update_message(reply.id, content="partial ans", reasoning="thought")
    store.close()
    reopened = h.History(store.path).open()
    messages = reopened.get_conversation(cid).messages
    assert messages[0].status == h.COMPLETE
    assert messages[1].status == h.INTERRUPTED
    assert messages[1].content == "partial ans"
    assert messages[1].reasoning == "thought"
    reopened.close()


def test_completed_messages_survive_kill_9(tmp_path: Path) -> None:
    """A process that is SIGKILLed right after writing keeps every committed message."""
    path = tmp_path / "h.sqlite3"
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from appliance.chat.history import History, STREAMING
        hist = History(Path({str(path)!r})).open()
        cid = hist.create_conversation("kill test")
        hist.add_message(cid, "user", "first")
        hist.add_message(cid, "assistant", "first answer")
        hist.add_message(cid, "user", "second")
        reply = hist.add_message(cid, "assistant", "", status=STREAMING)
        hist.update_message(reply.id, content="half an ans")
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], check=False, timeout=60)
    assert proc.returncode == -9
    hist = h.History(path).open()
    (summary,) = hist.list_conversations()
    messages = hist.get_conversation(summary.id).messages
    assert [(m.role, m.content, m.status) for m in messages] == [
        ("user", "first", h.COMPLETE),
        ("assistant", "first answer", h.COMPLETE),
        ("user", "second", h.COMPLETE),
        ("assistant", "half an ans", h.INTERRUPTED),
    ]


def test_export_json_and_markdown(store: h.History) -> None:
    cid = store.create_conversation("Export me")
    store.add_message(cid, "user", "Look", images=[h.StoredImage("a.png", "image/png", b"abc")])
    store.add_message(cid, "assistant", "**Nice**", reasoning="hmm", status=h.STOPPED)
    other = store.create_conversation("Other")
    store.add_message(other, "user", "second conversation")

    one = json.loads(store.export_json(cid))
    assert [c["title"] for c in one["conversations"]] == ["Export me"]
    msgs = one["conversations"][0]["messages"]
    assert msgs[0]["images"][0]["data_url"] == "data:image/png;base64,YWJj"
    assert msgs[1]["reasoning"] == "hmm"
    assert msgs[1]["status"] == "stopped"

    everything = json.loads(store.export_json())
    assert {c["title"] for c in everything["conversations"]} == {"Export me", "Other"}

    md = store.export_markdown(cid)
    assert md.startswith("# Export me")
    assert "*[image: a.png]*" in md
    assert "## Step-3.7-Flash (stopped)" in md
    assert "**Nice**" in md
    assert "second conversation" in store.export_markdown()


def test_adding_to_a_deleted_conversation_is_a_clear_error(store: h.History) -> None:
    cid = store.create_conversation()
    store.delete(cid)
    with pytest.raises(BadInputError, match="does not exist"):
        store.add_message(cid, "user", "hello")


def test_title_from_first_line() -> None:
    assert h.title_from("\n  Explain monads\nplease") == "Explain monads"
    assert h.title_from("") == "New conversation"
    long = h.title_from("x" * 200, limit=10)
    assert len(long) == 10
    assert long.endswith("…")
