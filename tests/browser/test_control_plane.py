"""One owner of the engine: while the service runs, the CLI drives the service's supervisor.

`step-station stop` and `start` in a terminal, against a running `step-station up --demo` (a real
process, the simulator as its engine): the moment the command returns, `/healthz`, `status --json`
and the open Model tab say the same thing, and the engine the CLI started is the service's child
(no second supervisor, no second engine).

`config set` and `keys` go through the service too: what they change is in force in the service
(its supervisor, its gateway) the moment the command returns.
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
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


def api_status(app, key: str = "") -> int:
    """The gateway's answer to GET /v1/models, with this API key (or none)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(
        f"http://127.0.0.1:{app.api_port}/v1/models", headers=headers, timeout=10
    ).status_code


def test_config_set_reaches_the_running_service_at_once(appliance) -> None:
    """`config set` while the service runs: saved, and the service's supervisor and gateway
    work with the new value the moment the command returns (no restart of the service)."""
    app = appliance()
    assert status_json(app)["restart_needed"] is False
    assert api_status(app) == 200  # on loopback the API needs no key by default

    changed = cli(app, "config", "set", "engine.max_model_len", "65536")
    assert changed.returncode == 0, changed.stderr
    assert "the running service uses it now" in changed.stdout
    assert "`step-station restart` applies" in changed.stdout  # the engine runs the old value
    data = status_json(app)
    assert data["restart_needed"] is True  # the service's supervisor has the new settings
    assert "restart it to apply them" in data["message"]
    assert "max_model_len = 65536" in (app.home / "config" / "settings.toml").read_text()

    locked = cli(app, "config", "set", "gateway.require_key_on_loopback", "true")
    assert locked.returncode == 0, locked.stderr
    assert api_status(app) == 401  # the gateway took it at once

    bad = cli(app, "config", "set", "gateway.max_body_mb", "lots")
    assert bad.returncode == 2
    assert "gateway.max_body_mb" in bad.stderr  # the service's own words, and its exit code
    assert "max_body_mb" not in (app.home / "config" / "settings.toml").read_text()


def test_a_key_revoked_from_the_cli_is_refused_by_the_gateway_at_once(appliance) -> None:
    app = appliance(settings={"gateway": {"require_key_on_loopback": True}})
    made = cli(app, "keys", "create", "laptop")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("sk-step-")
    assert api_status(app, key) == 200
    revoked = cli(app, "keys", "revoke", "laptop")
    assert revoked.returncode == 0, revoked.stderr
    assert api_status(app, key) == 401  # the very next request
    listed = json.loads(cli(app, "keys", "list", "--json").stdout)
    assert [(k["name"], k["active"]) for k in listed] == [("laptop", False)]
