"""Chat presets in the history file: the built-in one from the settings, saved, new, deleted."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.chat import client as chat
from appliance.chat import history as h
from appliance.chat import presets as p
from appliance.errors import BadInputError
from appliance.settings import ChatSettings


def presets(tmp_path: Path, settings: ChatSettings | None = None) -> p.Presets:
    history = h.History(tmp_path / "history.sqlite3").open()
    return p.Presets(history, p.from_settings(settings or ChatSettings()))


def test_the_global_system_prompt_moves_into_the_built_in_preset(tmp_path: Path) -> None:
    store = presets(tmp_path, ChatSettings(system_prompt="Answer in French.", temperature=0.2))
    (default,) = store.list()
    assert (default.name, default.builtin) == ("Default", True)
    assert default.system_prompt == "Answer in French."
    assert default.temperature == 0.2
    # Made once: later settings do not overwrite what the owner saved into it.
    store.save("Default", chat.SamplingOptions("high", system_prompt="Be brief."))
    store.history.close()
    again = presets(tmp_path, ChatSettings(system_prompt="Something else"))
    assert again.default().system_prompt == "Be brief."
    assert again.default().reasoning_level == "high"


def test_save_a_new_preset_then_edit_and_delete_it(tmp_path: Path) -> None:
    store = presets(tmp_path)
    pirate = store.create(
        "  Pirate   voice ", chat.SamplingOptions("low", 1.1, 0.9, 500, "Talk like a pirate.")
    )
    assert pirate.name == "Pirate voice"
    assert pirate.options() == chat.SamplingOptions("low", 1.1, 0.9, 500, "Talk like a pirate.")
    assert [x.name for x in store.list()] == ["Default", "Pirate voice"]
    with pytest.raises(BadInputError, match="exists already"):
        store.create("pirate VOICE", chat.SamplingOptions())
    with pytest.raises(BadInputError, match="needs a name"):
        store.create("  ", chat.SamplingOptions())
    store.save("pirate voice", chat.SamplingOptions("high", system_prompt="Arr."))
    assert store.get("Pirate voice").system_prompt == "Arr."
    with pytest.raises(BadInputError, match="no preset called"):
        store.save("Ghost", chat.SamplingOptions())
    with pytest.raises(BadInputError, match="cannot be deleted"):
        store.delete("Default")
    store.delete("Pirate voice")
    assert store.get("Pirate voice").name == "Default"  # gone: the built-in one stands in


def test_a_conversation_keeps_its_preset_and_settings_as_sent(tmp_path: Path) -> None:
    store = presets(tmp_path)
    preset = store.create("Terse", chat.SamplingOptions("low", system_prompt="One line."))
    cid = store.history.create_conversation("x")
    sent = p.sent_settings(preset, preset.options())
    store.history.set_settings(cid, preset.id, sent)
    store.save("Terse", chat.SamplingOptions("high", system_prompt="Changed later."))
    conv = store.history.get_conversation(cid)
    assert conv.preset_id == preset.id
    assert conv.settings["system_prompt"] == "One line."
    assert conv.settings["preset"] == "Terse"
    store.delete("Terse")  # the conversation keeps what it was sent with
    conv = store.history.get_conversation(cid)
    assert conv.preset_id is None
    assert conv.settings["reasoning_effort"] == "low"
