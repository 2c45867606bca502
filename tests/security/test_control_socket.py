"""Another local account against the service's control socket (appliance/control.py).

Whoever can connect to it can start and stop the engine, so only the owner's account may: the
socket is 0600 in a 0700 folder. The attacker here is uid 65534 (through `setpriv`), against a
real `step-station up --demo`.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest

from appliance import control

NOBODY = 65534


@pytest.fixture
def app(appliance, monkeypatch):
    running = appliance()
    monkeypatch.setenv("STEP_STATION_HOME", str(running.home))
    return running


def _as_nobody(path: str, route: str, method: str = "GET") -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            "curl",
            "-sS",
            "-X",
            method,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
            "--unix-socket",
            path,
            f"http://control{route}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_another_account_cannot_drive_the_engine_through_the_control_socket(app) -> None:
    path = control.socket_path()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.stat().st_uid == os.getuid()
    if shutil.which("setpriv") is None or shutil.which("curl") is None or os.getuid() != 0:
        pytest.skip("switching to another account needs root, setpriv and curl")
    for method, route in (("POST", "/stop"), ("POST", "/start"), ("GET", "/status")):
        attempt = _as_nobody(str(path), route, method)
        assert attempt.returncode == 7, (route, attempt.stdout, attempt.stderr)  # no connect()
    assert app.health()["engine"] == "ready"  # nothing was stopped
    # the owner's account is served
    owner = control.service_supervisor(control.st.load_settings().settings)
    assert owner is not None
    assert owner.status().state.value == "ready"
