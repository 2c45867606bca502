"""Settings: round trip, type errors naming the key, corrupt-file recovery, secrets mode, and the
store (validate, save atomically, swap, notify; nothing changed in place)."""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import threading
from pathlib import Path

import pytest

from appliance import settings as st
from appliance.cli import main
from appliance.errors import SettingsError


def test_round_trip_keeps_changed_values_only() -> None:
    s = st.with_changes(
        st.Settings(),
        {"engine.port": "8002", "gateway.share_lan": "on", "engine.gpu_memory_utilization": "0.9"},
    )
    path = st.save_settings(s)
    text = path.read_text()
    assert "port = 8002" in text
    assert "share_lan = true" in text
    assert "container_name" not in text  # defaults are not written
    loaded = st.load_settings().settings
    assert loaded == s
    assert loaded.engine.gpu_memory_utilization == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("engine.port", "eighty", "engine.port"),
        ("engine.nope", "1", "engine.nope"),
        ("nosection.port", "1", "nosection.port"),
        ("gateway.share_lan", "maybe", "gateway.share_lan"),
    ],
)
def test_bad_key_or_type_names_the_key(key: str, value: str, needle: str) -> None:
    with pytest.raises(SettingsError, match=needle.replace(".", r"\.")):
        st.with_changes(st.Settings(), {key: value})


def test_corrupt_file_is_backed_up_and_defaults_used() -> None:
    path = st.settings_path()
    path.parent.mkdir(parents=True)
    path.write_text("[engine\nport = = 3")
    result = st.load_settings()
    assert result.settings == st.Settings()
    assert len(result.warnings) == 1
    assert str(path) in result.warnings[0]
    backups = list(path.parent.glob("settings.toml.broken-*"))
    assert len(backups) == 1
    assert backups[0].read_text() == "[engine\nport = = 3"  # nothing lost
    assert not path.exists()


def test_unknown_key_in_file_is_recovered_with_reason() -> None:
    path = st.settings_path()
    path.parent.mkdir(parents=True)
    path.write_text("[engine]\nflux_capacitor = 1\n")
    result = st.load_settings()
    assert "engine.flux_capacitor" in result.warnings[0]


def test_secrets_are_0600_and_never_shown(capsys: pytest.CaptureFixture[str]) -> None:
    secrets = st.Secrets(hf_token="hf_supersecret")
    path = st.save_secrets(secrets)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert st.load_secrets().hf_token == "hf_supersecret"
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert "hf_supersecret" not in out
    assert "hf_token set" in out


def test_cli_set_get_and_error_exit(capsys: pytest.CaptureFixture[str], station_home: Path) -> None:
    assert main(["config", "set", "ui.port", "7900"]) == 0
    assert main(["config", "get", "ui.port"]) == 0
    assert capsys.readouterr().out.strip().endswith("7900")
    assert main(["config", "set", "ui.port", "x"]) == 2
    assert "ui.port" in capsys.readouterr().err
    assert str(station_home) in str(st.settings_path())


def test_secure_tree_takes_group_and_other_bits_but_keeps_programs_runnable(tmp_path) -> None:
    """An older home is tightened at start; the installer's venv under the data folder (its
    programs) must stay runnable: the service failed with 'Permission denied' when it was not."""
    root = tmp_path / "data"
    (root / "logs").mkdir(parents=True)
    (root / "venv" / "bin").mkdir(parents=True)
    notes = root / "logs" / "a.log"
    notes.write_text("x")
    notes.chmod(0o644)
    tool = root / "logs" / "tool.sh"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    program = root / "venv" / "bin" / "step-station"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    (root / "logs").chmod(0o755)
    st.secure_tree(root)
    assert (root.stat().st_mode & 0o777, (root / "logs").stat().st_mode & 0o777) == (0o700, 0o700)
    assert notes.stat().st_mode & 0o777 == 0o600
    assert tool.stat().st_mode & 0o777 == 0o700
    assert program.stat().st_mode & 0o777 == 0o755  # the venv is not walked


# ------------------------------------------------------------------------------- snapshots


def test_snapshots_are_frozen_and_with_changes_leaves_the_original() -> None:
    before = st.Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.engine.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.engine = st.EngineSettings()  # type: ignore[misc]
    after = st.with_changes(before, {"engine.port": 9001, "chat.temperature": 1})
    assert (after.engine.port, after.chat.temperature) == (9001, 1.0)
    assert isinstance(after.chat.temperature, float)
    assert before == st.Settings()
    assert after.ui is before.ui  # untouched sections are shared, not copied
    assert st.with_changes(before, {}) is before


# ------------------------------------------------------------------------------------ store


def _store() -> st.SettingsStore:
    return st.SettingsStore(st.Settings())


def test_store_update_saves_swaps_and_tells_subscribers_in_order() -> None:
    store = _store()
    seen: list[tuple[str, int]] = []
    store.subscribe(lambda s: seen.append(("first", s.engine.port)))
    store.subscribe(lambda s: seen.append(("second", s.engine.port)))
    old = store.current()
    new = store.update({"engine.port": "8100"})
    assert new.engine.port == 8100
    assert store.current() is new
    assert old.engine.port == 8001  # the old snapshot is as it was
    assert seen == [("first", 8100), ("second", 8100)]
    assert st.load_settings(store.path).settings == new


def test_store_bad_value_saves_nothing_and_tells_nobody() -> None:
    store = _store()
    store.update({"ui.port": 7900})
    before = store.path.read_bytes()
    told: list[st.Settings] = []
    store.subscribe(told.append)
    # one good key and one bad one: nothing of either is taken
    with pytest.raises(SettingsError, match=r"engine\.port") as caught:
        store.update({"gateway.port": 8100, "engine.port": "eighty"})
    assert "config set engine.port" in str(caught.value)  # what to do
    with pytest.raises(SettingsError, match=r"engine\.nope"):
        store.update({"engine.nope": 1})
    assert store.path.read_bytes() == before
    assert store.current().gateway.port == 8000
    assert told == []


def test_store_no_real_change_neither_saves_nor_notifies() -> None:
    store = _store()
    told: list[st.Settings] = []
    store.subscribe(told.append)
    same = store.update({"engine.port": "8001", "gateway.share_lan": "off"})  # the defaults
    assert same is store.current()
    assert not store.path.exists()
    assert told == []


def test_store_writes_atomically_and_privately(monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store()
    store.update({"engine.port": 8002})
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    # a write that fails half-way leaves the old file whole and no temporary file behind
    before = store.path.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        store.update({"engine.port": 8003})
    assert store.path.read_bytes() == before
    assert sorted(p.name for p in store.path.parent.iterdir()) == ["settings.toml"]
    assert store.current().engine.port == 8002  # not swapped in when the save failed


def test_store_writes_only_what_changed_not_run_only_values() -> None:
    """`up --ui-port 7999` is for that run: a later change through the store must not save it."""
    store = st.SettingsStore(st.with_changes(st.Settings(), {"ui.port": 7999}))
    store.update({"chat.temperature": 0.2})
    on_disk = st.load_settings(store.path).settings
    assert on_disk.chat.temperature == pytest.approx(0.2)
    assert on_disk.ui.port == 7860
    assert store.current().ui.port == 7999


def test_store_a_failing_subscriber_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = _store()
    told: list[int] = []

    def broken(settings: st.Settings) -> None:
        raise RuntimeError("subscriber bug")

    store.subscribe(broken)
    store.subscribe(lambda s: told.append(s.engine.port))
    with caplog.at_level(logging.ERROR, logger="appliance.settings"):
        store.update({"engine.port": 8004})
    assert told == [8004]
    assert "subscriber bug" in caplog.text


def test_store_concurrent_updates_from_threads_lose_nothing() -> None:
    store = _store()
    last: list[st.Settings] = []
    store.subscribe(lambda s: last.append(s))
    ports = list(range(9000, 9016))
    start = threading.Barrier(len(ports))

    def change(port: int) -> None:
        start.wait(timeout=10)
        # each thread owns one key (its own field) and shares one (engine.port)
        store.update({"engine.port": port})
        store.update({"chat.max_tokens": port})

    threads = [threading.Thread(target=change, args=(p,)) for p in ports]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    final = store.current()
    assert final.engine.port in ports
    assert final.chat.max_tokens in ports
    assert st.load_settings(store.path).settings == final  # the file holds the last snapshot
    assert last[-1] == final  # subscribers end on the snapshot in force


def test_store_concurrent_updates_of_different_keys_all_land() -> None:
    store = _store()
    keys = [
        ("engine.port", 9100),
        ("engine.max_model_len", 4096),
        ("gateway.port", 9200),
        ("ui.port", 9300),
        ("chat.max_tokens", 77),
        ("sampler.history_s", 60),
        ("engine.mtp", True),
        ("gateway.share_lan", True),
    ]
    start = threading.Barrier(len(keys))

    def change(key: str, value: object) -> None:
        start.wait(timeout=10)
        store.update({key: value})

    threads = [threading.Thread(target=change, args=kv) for kv in keys]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    on_disk = st.load_settings(store.path).settings
    for key, value in keys:
        assert store.current().get(key) == value, key
        assert on_disk.get(key) == value, key
