"""Settings: round trip, type errors naming the key, corrupt-file recovery, secrets mode."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from appliance import settings as st
from appliance.cli import main
from appliance.errors import SettingsError


def test_round_trip_keeps_changed_values_only() -> None:
    s = st.Settings()
    s.set("engine.port", "8002")
    s.set("gateway.share_lan", "on")
    s.set("engine.gpu_memory_utilization", "0.9")
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
        st.Settings().set(key, value)


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
