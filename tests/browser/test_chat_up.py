"""`step-station up`: health, ports checked before anything starts, clean shutdown (no browser)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]


def test_healthz_and_sigterm_stops_the_demo_engine(appliance):
    app = appliance()
    health = app.health()
    assert health == {"ok": True, "demo": True, "engine": "ready"}
    engine = psutil.Process(app.engine_pid())
    assert "appliance.simulator" in " ".join(engine.cmdline())
    app.kill(signal.SIGTERM)
    # uvicorn re-raises the signal after its clean shutdown, so the exit status says SIGTERM.
    assert app.proc.returncode in (0, -signal.SIGTERM)
    assert "Traceback" not in app.log()
    assert not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE


def test_a_taken_ui_port_is_a_clear_error_before_anything_starts(tmp_path):
    home = tmp_path / "home"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "appliance",
                "up",
                "--demo",
                "--no-browser",
                "--ui-port",
                str(port),
            ],
            cwd=REPO,
            env={**os.environ, "STEP_STATION_HOME": str(home)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 7
    assert f"Port {port} on 127.0.0.1 (ui.port, the browser UI) is in use" in result.stderr
    assert "--ui-port N" in result.stderr
    assert "step-station config set ui.port N" in result.stderr
    # Nothing was started: no engine process, no history.
    assert not list((home / "data").glob("*.process.json")) if (home / "data").exists() else True
    assert not (home / "data" / "history.sqlite3").exists()


def test_a_bad_port_flag_is_refused(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "up", "--demo", "--no-browser", "--ui-port", "70000"],
        cwd=REPO,
        env={**os.environ, "STEP_STATION_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--ui-port 70000 is not a port" in result.stderr
