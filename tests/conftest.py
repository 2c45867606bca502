"""Shared fixtures. Every test gets its own STEP_STATION_HOME (settings, secrets, data)."""

from __future__ import annotations

from pathlib import Path

import pytest

# Shared fixture plugins (tests/ is on sys.path through pytest's rootdir conftest insertion).
pytest_plugins = ["fixtures.sim", "fixtures.docker", "fixtures.realvllm"]


@pytest.fixture(scope="session")
def shared_flags_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One engine-flags cache for the session: `vllm serve --help=all` of a real engine costs
    30-75 s on this machine, and every test has its own home."""
    return tmp_path_factory.mktemp("engine-flags")


@pytest.fixture(autouse=True)
def station_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_flags_cache: Path) -> Path:
    home = tmp_path / "station-home"
    (home / "cache").mkdir(parents=True)
    (home / "cache" / "engine-flags").symlink_to(shared_flags_cache, target_is_directory=True)
    monkeypatch.setenv("STEP_STATION_HOME", str(home))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return home
