"""Shared fixtures. Every test gets its own STEP_STATION_HOME (settings, secrets, data)."""

from __future__ import annotations

from pathlib import Path

import pytest

# Shared fixture plugins (tests/ is on sys.path through pytest's rootdir conftest insertion).
pytest_plugins = ["fixtures.sim", "fixtures.docker", "fixtures.realvllm"]


@pytest.fixture(autouse=True)
def station_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "station-home"
    monkeypatch.setenv("STEP_STATION_HOME", str(home))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return home
