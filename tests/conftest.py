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


# ----------------------------------------------- no test writes into the repository's own files

REPO = Path(__file__).resolve().parents[1]
_TRACKED_BEFORE: dict[str, str] = {}


def _tracked_changes() -> str:
    """`git status` of tracked files (modified or deleted), "" outside a git checkout."""
    import subprocess

    try:
        return subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def pytest_sessionstart(session: pytest.Session) -> None:
    del session
    _TRACKED_BEFORE["status"] = _tracked_changes()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """On a clean checkout (CI), a run that changed tracked files fails: tests write into their own
    temporary folders (screenshots too: scripts/screenshots.sh is the one way into docs/img)."""
    before = _TRACKED_BEFORE.get("status")
    if before != "" or exitstatus not in (0, 1):
        return  # a working tree with edits of its own (a developer's): nothing to compare
    after = _tracked_changes()
    if after:
        print(f"\nThe test run changed tracked files of the repository:\n{after}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# ------------------------------------------------------- where the run's time went, per file

_FILE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = report.nodeid.split("::", 1)[0]
    _FILE_SECONDS[path] = _FILE_SECONDS.get(path, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The 25 costliest test files (setup, call and teardown together; a session fixture counts
    in the file whose test first used it): what to speed up next (docs/benchmarks.md)."""
    if len(_FILE_SECONDS) < 2:
        return
    total = sum(_FILE_SECONDS.values())
    terminalreporter.section("slowest 25 files")
    for path, seconds in sorted(_FILE_SECONDS.items(), key=lambda kv: -kv[1])[:25]:
        terminalreporter.write_line(f"{seconds:8.1f}s {100 * seconds / total:5.1f}%  {path}")
    terminalreporter.write_line(f"{total:8.1f}s in {len(_FILE_SECONDS)} files")
