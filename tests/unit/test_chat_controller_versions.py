"""The chat tab's decisions about versions, presets, search and import, over a real history file
(no browser): what is sent after paging, what a reopened conversation shows, what undo deletes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures.aio import run_async

from appliance.chat import client as chat
from appliance.chat import history as hist
from appliance.chat.service import ChatService, EngineView, to_openai
from appliance.controllers import chat as ctl
from appliance.errors import BadInputError
from appliance.settings import ChatSettings, Settings

NOT_READY = EngineView(False, label="Stopped", message="Stopped by the owner.")


def controller(tmp_path: Path, settings: Settings | None = None) -> ctl.ChatController:
    history = hist.History(tmp_path / "history.sqlite3").open()
    service = ChatService(settings or Settings(), history, lambda: NOT_READY)
    return ctl.ChatController(service, exports=lambda: tmp_path / "exports")


def exchange(c: ctl.ChatController, cid: str, question: str, answer: str) -> None:
    c.history.add_message(cid, "user", question)
    c.history.add_message(cid, "assistant", answer)


def test_the_path_shown_is_the_path_sent(tmp_path: Path) -> None:
    c = controller(tmp_path)
    cid = c.history.create_conversation()
    exchange(c, cid, "first", "a1")
    c.history.truncate(cid, 0)  # what the service does for an edit
    exchange(c, cid, "second", "a2")
    (point,) = c.branch_points(cid)
    assert (point.position, point.version, point.versions) == (0, 2, 2)
    assert point.label == "Message 1 (your message): 2/2"
    c.switch_version(cid, 0, -1)
    sent = to_openai(c.messages(cid))
    assert [m["content"] for m in sent] == ["first", "a1"]
    with pytest.raises(BadInputError, match="no other version"):
        c.switch_version(cid, 0, -1)


def test_a_regenerated_reply_is_redrawn_to_show_its_version(tmp_path: Path) -> None:
    c = controller(tmp_path)
    cid = c.history.create_conversation()
    exchange(c, cid, "q", "a")
    assert run_async(c.finished(cid)) == ctl.Finished(redraw=False)
    c.history.truncate(cid, 1)
    c.history.add_message(cid, "assistant", "a again")
    assert run_async(c.finished(cid)) == ctl.Finished(redraw=True)


def test_a_regenerate_the_engine_refused_brings_the_old_reply_back(tmp_path: Path) -> None:
    c = controller(tmp_path)
    cid = c.history.create_conversation()
    exchange(c, cid, "q", "a")
    c.retry(cid)  # sets the reply aside; then the engine refused: nothing stored
    assert [m.content for m in c.messages(cid)] == ["q"]
    assert run_async(c.finished(cid)).redraw
    assert [m.content for m in c.messages(cid)] == ["q", "a"]


def test_undo_deletes_instead_of_keeping_a_version(tmp_path: Path) -> None:
    c = controller(tmp_path)
    cid = c.history.create_conversation()
    exchange(c, cid, "q1", "a1")
    exchange(c, cid, "q2", "a2")
    removed = c.undo(cid)
    assert removed is not None
    assert removed.content == "q2"
    assert c.history.list_conversations("a2") == []
    assert c.branch_points(cid) == []


def test_a_conversation_reopens_with_its_preset_and_settings_as_sent(tmp_path: Path) -> None:
    c = controller(tmp_path, Settings(chat=ChatSettings(system_prompt="Old global prompt")))
    fresh = c.chosen(None)
    assert (fresh.preset, fresh.presets) == ("Default", ["Default"])
    assert fresh.options.system_prompt == "Old global prompt"
    terse = chat.SamplingOptions("low", 0.3, 0.9, 100, "One line.")
    c.create_preset("Terse", terse)
    cid = c.history.create_conversation()
    c.remember(cid, "Terse", terse)
    c.save_preset("Terse", chat.SamplingOptions("high", system_prompt="Changed since."))
    chosen = c.chosen(cid)
    assert chosen.preset == "Terse"
    assert chosen.options == terse  # as sent, not as the preset is now
    assert chosen.presets == ["Default", "Terse"]


def test_import_reads_an_export_file_and_refuses_a_broken_one(tmp_path: Path) -> None:
    c = controller(tmp_path)
    cid = c.history.create_conversation("Trip")
    exchange(c, cid, "where?", "Lisbon")
    path = c.export(cid, "JSON", everything=False)
    (copy,) = c.import_file(path)
    assert [m.content for m in c.messages(copy)] == ["where?", "Lisbon"]
    assert {h.conversation_id for h in c.search("lisbon")} == {cid, copy}
    broken = tmp_path / "broken.json"
    broken.write_bytes(b"\xff\xfe not text")
    with pytest.raises(BadInputError, match="could not be read"):
        c.import_file(broken)
    broken.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(BadInputError, match="not a Step Station chat export"):
        c.import_file(broken)
    assert len(c.history.list_conversations()) == 2
