"""Attacks on the fleet's new doors (docs/fleet.md): a member's gateway without or with a wrong
fleet key, `GET /health` with a foreign Host, the router's admin routes from another local
process, and the fleet's files as another account would find them."""

from __future__ import annotations

import contextlib
import json
import stat
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fixtures.appliance import appliance
from fixtures.fleet_kit import KEY, fleet, needs_router, status, view, wait_for

from appliance.fleet import members as fm

__all__ = ["appliance", "fleet"]  # fixtures
pytestmark = needs_router


def _router_port(app: Any) -> int:  # noqa: ANN401
    argv = (app.home / "cache" / "logs" / "fleet-router.log").read_text().splitlines()[0].split()
    return int(argv[argv.index("--port") + 1])


def test_health_is_refused_under_a_foreign_host_and_keys_are_not_accepted_sideways(
    fleet: Any,  # noqa: ANN401
) -> None:
    app, (m1, _) = fleet("round_robin")
    assert status(f"{m1.url}/health") == 200
    # DNS rebinding: the member's gateway answers only its own names.
    assert status(f"{m1.url}/health", {"Host": "evil.example"}) in (400, 403, 421)
    # The fleet key in x-api-key and a different key in Authorization: refused, not half-taken.
    request = urllib.request.Request(
        f"{m1.url}/v1/models",
        headers={"Authorization": "Bearer sk-step-other", "x-api-key": KEY},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 401
    # The front's /health is not an open door to its engine's state beyond a status code.
    with urllib.request.urlopen(f"http://127.0.0.1:{app.api_port}/health", timeout=5) as reply:
        assert reply.read() == b""


class _Thief(BaseHTTPRequestHandler):
    seen: list[str] = []  # noqa: RUF012 - shared by the handler instances on purpose

    def do_GET(self) -> None:  # noqa: N802
        _Thief.seen.append(self.headers.get("Authorization", ""))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_GET  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002, ANN401
        del format, args


def test_a_worker_added_behind_the_fronts_back_is_thrown_out(fleet: Any) -> None:  # noqa: ANN401
    """vllm-router 0.1.17's admin routes answer any local process: one that adds its own worker
    would be sent the fleet key. The front checks the router's worker list every second and
    restarts a router whose list is not the configured one (routing to the own engine
    meanwhile)."""
    app, members = fleet("round_robin")
    thief = ThreadingHTTPServer(("127.0.0.1", 0), _Thief)
    threading.Thread(target=thief.serve_forever, daemon=True).start()
    thief_url = f"http://127.0.0.1:{thief.server_address[1]}"
    try:
        port = _router_port(app)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/add_worker?url={thief_url}", method="POST", data=b""
        )
        request.add_header("Content-Type", "application/json")
        with contextlib.suppress(urllib.error.HTTPError):
            urllib.request.urlopen(request, timeout=10)
        assert _Thief.seen, "the router took the foreign worker (it health-checked it)"

        def configured_again() -> bool:
            try:
                new_port = _router_port_latest(app)
                with urllib.request.urlopen(f"http://127.0.0.1:{new_port}/workers", timeout=2) as r:
                    urls = {w["url"] for w in json.loads(r.read())["workers"]}
            except OSError:
                return False
            expected = {f"http://127.0.0.1:{app.api_port}", *(m.url for m in members)}
            return urls == expected and view(app).get("router") == "running"

        wait_for("the router restarted with the configured workers only", configured_again)
    finally:
        thief.shutdown()


def _router_port_latest(app: Any) -> int:  # noqa: ANN401
    lines = (app.home / "cache" / "logs" / "fleet-router.log").read_text().splitlines()
    argv = [line for line in lines if line.startswith("--- ")][-1].split()
    return int(argv[argv.index("--port") + 1])


def test_the_fleet_files_are_private(fleet: Any) -> None:  # noqa: ANN401
    app, (m1, _) = fleet("round_robin")
    wait_for("the fleet view written", lambda: view(app))
    for path in (
        app.home / "data" / "fleet.key",
        app.home / "data" / "fleet-status.json",
        m1.home / "data" / "fleet.key",
    ):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o600, (path, oct(mode))
    assert fm.read_key(app.home / "data" / "fleet.key") == KEY


def test_a_members_load_report_answers_only_the_fleet_key(fleet: Any) -> None:  # noqa: ANN401
    """`GET /fleet/load` on a member tells its engine's queue and KV-cache use: the front's, and
    nobody else's (no key, a client key, a near miss, two keys, a foreign Host, other methods)."""
    _, (m1, _) = fleet("round_robin")
    url = f"{m1.url}/fleet/load"
    good = {"Authorization": f"Bearer {KEY}"}
    with urllib.request.urlopen(urllib.request.Request(url, headers=good), timeout=10) as reply:
        load = json.loads(reply.read())
    assert load["state"] == "ready"
    assert isinstance(load["kv_cache_pct"], float)
    assert isinstance(load["running"], int)
    assert status(url, {**good, "Host": "evil.example"}) in (400, 403, 421)
    assert status(url) == 401
    assert status(url, {"Authorization": "Bearer sk-step-" + "a" * 32}) == 401
    assert status(url, {"Authorization": f"Bearer {KEY[:-1]}"}) == 401
    assert status(url, {**good, "x-api-key": "sk-step-other"}) == 401
    post = urllib.request.Request(url, data=b"{}", headers=good, method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(post, timeout=10)
    assert err.value.code == 404
    # A Station outside any fleet has no such route.
    (m1.home / "data" / "fleet.key").unlink()
    wait_for("m1 forgets the fleet key", lambda: status(url, good) == 404, timeout=10)
