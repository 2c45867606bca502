"""Another local account against the service's control socket (appliance/control.py).

Whoever can connect to it can start and stop the engine, so only the owner's account may: the
socket is 0600 in a 0700 folder. The attacker here is uid 65534 (through `setpriv`), against a
real `step-station up --demo`.
"""

from __future__ import annotations

import os
import stat

import pytest
from fixtures.accounts import NOBODY, curl_as, need_another_account

from appliance import control


@pytest.fixture
def app(appliance, monkeypatch):
    running = appliance()
    monkeypatch.setenv("STEP_STATION_HOME", str(running.home))
    return running


def test_another_account_cannot_drive_the_engine_through_the_control_socket(app) -> None:
    path = control.socket_path()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.stat().st_uid == os.getuid()
    need_another_account()
    routes = (
        ("POST", "/stop"),
        ("POST", "/start"),
        ("GET", "/status"),
        ("POST", "/settings"),
        ("GET", "/keys"),
        ("POST", "/keys/create"),
        ("POST", "/pull"),
        ("POST", "/bench"),
        ("POST", "/bench/cancel"),
        ("GET", "/bench/runs"),
    )
    for method, route in routes:
        attempt = curl_as(NOBODY, path, route, method=method, host="control")
        assert attempt.returncode == 7, (route, attempt.stdout, attempt.stderr)  # no connect()
    assert app.health()["engine"] == "ready"  # nothing was stopped
    # the owner's account is served
    owner = control.service_supervisor(control.st.load_settings().settings)
    assert owner is not None
    assert owner.status().state.value == "ready"
