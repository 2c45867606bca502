"""The chat tab's decisions, without a browser, over a real history file: export names and
files, token sums, the conversation list, what a finished or stopped reply redraws, refusals."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fixtures.aio import run_async

from appliance.chat import history as hist
from appliance.chat.service import ChatService, EngineView
from appliance.controllers import chat as ctl
from appliance.errors import BadInputError
from appliance.settings import Settings

AT = time.mktime((2026, 12, 5, 21, 4, 5, 0, 0, -1))  # local time, as the file name shows it
NOT_READY = EngineView(False, label="Stopped", message="Stopped by the owner.")


def controller(tmp_path: Path, view: EngineView = NOT_READY) -> ctl.ChatController:
    history = hist.History(tmp_path / "history.sqlite3").open()
    service = ChatService(Settings(), history, lambda: view)
    return ctl.ChatController(service, exports=lambda: tmp_path / "exports", clock=lambda: AT)


def conversation(c: ctl.ChatController, title: str = "Trip plans") -> str:
    cid = c.history.create_conversation(title)
    c.history.add_message(cid, "user", "Where to?")
    return cid


# ------------------------------------------------------------------------------------ exports


def test_export_names_say_what_and_when() -> None:
    assert ctl.export_name("0123456789abcdef", "Markdown", AT) == (
        "step-station-conversation-01234567-20261205-210405.md"
    )
    assert ctl.export_name(None, "JSON", AT) == (
        "step-station-all-conversations-20261205-210405.json"
    )


def test_exporting_one_conversation_writes_a_private_file(tmp_path: Path) -> None:
    c = controller(tmp_path)
    cid = conversation(c)
    path = c.export(cid, "Markdown", everything=False)
    assert path == tmp_path / "exports" / ctl.export_name(cid, "Markdown", AT)
    assert "Where to?" in path.read_text(encoding="utf-8")
    assert path.stat().st_mode & 0o777 == 0o600  # an export is the whole chat


def test_export_all_holds_every_conversation_even_with_none_open(tmp_path: Path) -> None:
    c = controller(tmp_path)
    conversation(c, "First")
    conversation(c, "Second")
    path = c.export(None, "JSON", everything=True)
    assert path.name == "step-station-all-conversations-20261205-210405.json"
    text = path.read_text(encoding="utf-8")
    assert "First" in text
    assert "Second" in text


def test_export_this_with_none_open_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="Open a conversation first, or use Export all"):
        controller(tmp_path).export(None, "JSON", everything=False)
    assert not (tmp_path / "exports").exists()


# ------------------------------------------------------------------------------------- tokens


def message(role: str, meta: dict | None = None, status: str = hist.COMPLETE) -> hist.Message:
    return hist.Message(0, 0, role, "x", status=status, meta=meta or {})


def test_used_tokens_are_the_last_counted_replys_prompt_plus_answer() -> None:
    messages = [
        message("user"),
        message("assistant", {"prompt_tokens": 100, "completion_tokens": 20}),
        message("user"),
        message("assistant", {"prompt_tokens": 150, "completion_tokens": 30}),
        message("user"),
        message("assistant", {}, hist.FAILED),  # no usage: the one before still counts
    ]
    assert ctl.used_tokens(messages) == 180
    assert ctl.used_tokens([*messages[:1], message("assistant", {"prompt_tokens": 7})]) == 7
    assert ctl.used_tokens([message("user")]) is None


def test_context_is_unknown_while_the_engine_is_not_serving(tmp_path: Path) -> None:
    c = controller(tmp_path)
    cid = conversation(c)
    c.history.add_message(cid, "assistant", "Lisbon", meta={"prompt_tokens": 40})
    assert run_async(c.context(cid)) == (None, 40)
    assert run_async(c.context(None)) == (None, None)


# ------------------------------------------------------------------------------- the list, open


def test_the_list_keeps_the_selection_only_while_it_is_listed(tmp_path: Path) -> None:
    c = controller(tmp_path)
    trip = conversation(c, "Trip plans")
    soup = conversation(c, "Soup recipe")
    everything = c.history_list("", trip)
    assert set(everything.choices) == {("Trip plans", trip), ("Soup recipe", soup)}
    assert everything.value == trip
    searched = c.history_list("soup", trip)
    assert searched == ctl.HistoryList([("Soup recipe", soup)], None)


def test_opening_a_deleted_conversation_opens_an_empty_chat(tmp_path: Path) -> None:
    c = controller(tmp_path)
    cid = conversation(c)
    opened = c.open(cid)
    assert (opened.conversation_id, opened.title) == (cid, "Trip plans")
    assert [m.content for m in opened.messages] == ["Where to?"]
    c.delete(cid)
    assert c.open(cid) == ctl.Opened(None, "", [])
    assert c.open(None) == ctl.Opened(None, "", [])


def test_rename_needs_an_open_conversation(tmp_path: Path) -> None:
    c = controller(tmp_path)
    with pytest.raises(BadInputError, match="Open a conversation first"):
        c.rename(None, "x")
    cid = conversation(c)
    c.rename(cid, "Holiday")
    assert c.history_list("", cid).choices == [("Holiday", cid)]


# ------------------------------------------------------------------------ replies and actions


def test_a_finished_reply_is_not_redrawn_but_a_stopped_one_is(tmp_path: Path) -> None:
    c = controller(tmp_path)
    cid = conversation(c)
    reply = c.history.add_message(cid, "assistant", "Lisbon")
    assert run_async(c.finished(cid)) == ctl.Finished(redraw=False)
    c.history.update_message(reply.id, status=hist.STOPPED)
    assert run_async(c.finished(cid)) == ctl.Finished(True, ctl.STOPPED_NOTE)
    refused = conversation(c)  # no reply saved (the engine refused): redraw, nothing to say
    assert run_async(c.finished(refused)) == ctl.Finished(True, "")


def test_retry_and_undo_with_nothing_open(tmp_path: Path) -> None:
    c = controller(tmp_path)
    with pytest.raises(BadInputError, match="nothing to regenerate"):
        c.retry(None)
    assert c.undo(None) is None


def test_undo_hands_back_the_last_message_and_drops_its_reply(tmp_path: Path) -> None:
    c = controller(tmp_path)
    cid = conversation(c)
    c.history.add_message(cid, "assistant", "Lisbon")
    removed = c.undo(cid)
    assert removed is not None
    assert removed.content == "Where to?"
    assert c.messages(cid) == []


@pytest.mark.parametrize(
    ("index", "kinds"), [(1, ["text", "answer"]), (0, ["image"]), (3, ["text"])]
)
def test_only_the_text_of_own_messages_can_be_edited(
    tmp_path: Path, index: int, kinds: list[str]
) -> None:
    c = controller(tmp_path)
    cid = conversation(c)
    opts = c.options("low", "", 0.7, 0.95, 0)
    with pytest.raises(BadInputError, match=ctl.NOT_EDITABLE):
        run_async(c.edit(cid, index, "new", list(range(len(kinds))), kinds, opts))
    assert [m.content for m in c.messages(cid)] == ["Where to?"]  # untouched


def test_sampling_options_from_the_advanced_panel() -> None:
    opts = ctl.ChatController.options("high", "", 0.3, 0.5, None)
    assert (opts.reasoning_effort, opts.max_tokens, opts.system_prompt) == ("high", 0, "")
    with pytest.raises(BadInputError, match="Temperature"):
        ctl.ChatController.options("low", "", 3.0, 0.5, 10)


def test_the_banner_shows_until_ready_and_is_left_alone_when_unchanged(tmp_path: Path) -> None:
    c = controller(tmp_path)
    banner = c.banner(None)
    assert banner is not None
    assert banner.visible
    assert banner.text == NOT_READY.not_ready_text()
    assert c.banner(banner.key) is None  # the page shows it already
    ready = controller(tmp_path, EngineView(True, url="http://x", label="Ready"))
    hidden = ready.banner(banner.key)
    assert hidden is not None
    assert not hidden.visible


# ----------------------------------------------------------------------------------- uploads


def test_uploads_are_discarded_but_the_image_cache_is_kept(tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    keep = uploads / "step-station-chat"
    keep.mkdir(parents=True)
    (uploads / "hash1").mkdir()
    upload = uploads / "hash1" / "cat.png"
    cached = keep / "abc.png"
    outside = tmp_path / "mine.png"
    for f in (upload, cached, outside):
        f.write_bytes(b"png")
    ctl.discard_uploads([upload, cached, outside], uploads, keep)
    assert not upload.exists()
    assert not (uploads / "hash1").exists()  # its now-empty folder too
    assert cached.exists()
    assert outside.exists()
