"""One owner of the engine: while the service runs, the CLI drives the service's supervisor.

`step-station stop` and `start` in a terminal, against a running `step-station up --demo` (a real
process, the simulator as its engine): the moment the command returns, `/healthz`, `status --json`
and the open Model tab say the same thing, and the engine the CLI started is the service's child
(no second supervisor, no second engine).
"""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
from playwright.sync_api import expect

from appliance.control import socket_path as control_socket_path


def cli(app, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        env=app.env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def engine_state(app) -> str:
    health = app.health()
    assert health is not None
    return str(health["engine"])


def status_json(app) -> dict:
    result = cli(app, "status", "--json")
    return json.loads(result.stdout)


def test_cli_start_and_stop_go_through_the_service(appliance, page) -> None:
    app = appliance()  # the demo service started its engine
    page.goto(app.url)
    page.get_by_role("tab", name="Model").click()
    headline = page.locator("#ss-headline")
    expect(headline).to_contain_text("Ready", timeout=30_000)

    stopped = cli(app, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert engine_state(app) == "stopped"  # the moment the CLI returns
    assert status_json(app)["state"] == "stopped"
    expect(headline).to_contain_text("Stopped", timeout=5_000)  # the page's next refresh

    started = cli(app, "start")
    assert started.returncode == 0, started.stderr
    assert "Ready:" in started.stdout
    assert engine_state(app) == "ready"
    data = status_json(app)
    assert data["state"] == "ready"
    expect(headline).to_contain_text("Ready", timeout=5_000)
    # the engine the CLI asked for is the service's own child: one supervisor, one engine
    pid = int(data["container_id"].removeprefix("pid:"))
    assert psutil.Process(pid).ppid() == app.proc.pid
    assert "gpus" in data  # the service's own sampler answered `status --json`

    # `status` in words and `logs` come from the service too
    words = cli(app, "status")
    assert words.returncode == 0
    assert "Engine:  Ready" in words.stdout
    logs = cli(app, "logs")
    assert logs.returncode == 0
    assert "Starting vLLM server on unix:" in logs.stdout


def test_without_a_service_the_cli_runs_the_engine_itself(appliance, monkeypatch) -> None:
    """The service gone (SIGTERM stops its demo engine), the same commands still work alone."""
    app = appliance()
    monkeypatch.setenv("STEP_STATION_HOME", str(app.home))
    control = control_socket_path()
    assert control.is_socket()
    assert oct(control.stat().st_mode & 0o777) == oct(0o600)
    app.stop()
    assert not control.exists()  # a service that stopped leaves no socket behind
    alone = cli(app, "status")
    assert alone.returncode == 10, alone.stdout + alone.stderr  # not running, asked locally
    assert "Engine:  " in alone.stdout
