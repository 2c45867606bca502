"""Every route of the UI listener, tried by a LAN neighbour with and without the owner's session.

"UI on LAN" on (the UI on 127.0.0.2, this machine's stand-in LAN address; the neighbour a client
bound to 127.0.0.3): without a session, no Gradio route gives anything but the login page, a
refusal or nothing; with the owner's session the page's own routes work, and the routes the page
never uses stay closed. A real export file exists, so `file=` is tried on something worth taking.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fixtures.appliance import Appliance

from appliance import settings as st
from appliance.keys import hash_login

pytestmark = pytest.mark.timeout(300)

LAN, NEIGHBOUR = "127.0.0.2", "127.0.0.3"
USER, PASSWORD = "owner", "station-pass-1"

# (method, path): every Gradio route family the issue names, and the API ones.
ROUTES = [
    ("GET", "/config"),
    ("GET", "/gradio_api/info"),
    ("GET", "/gradio_api/openapi.json"),
    ("POST", "/gradio_api/call/on_create"),
    ("POST", "/gradio_api/run/predict"),
    ("POST", "/gradio_api/api/predict"),
    ("POST", "/gradio_api/queue/join"),
    ("GET", "/gradio_api/queue/data?session_hash=abc"),
    ("GET", "/gradio_api/heartbeat/abc"),
    ("POST", "/gradio_api/upload"),
    ("GET", "/gradio_api/upload_progress?upload_id=abc"),
    ("GET", "/gradio_api/startup-events"),
    ("GET", "/gradio_api/token"),
    ("GET", "/gradio_api/user"),
    ("GET", "/gradio_api/runs"),
    ("GET", "/gradio_api/proxy=http://127.0.0.1:1/"),
    ("GET", "/monitoring"),
    ("GET", "/logout"),
]


def _start(appliance: Callable[..., Appliance], tmp_path: Path) -> Appliance:
    home = tmp_path / "lan-routes"
    st.save_secrets(
        st.Secrets(ui_login_hash=hash_login(USER, PASSWORD)), home / "config" / "secrets.toml"
    )
    app = appliance(home=home, settings={"ui": {"lan": True, "host": LAN}}, wait=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert app.proc.poll() is None, app.log()
        try:
            if httpx.get(f"http://{LAN}:{app.ui_port}/healthz", timeout=2).status_code == 200:
                return app
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"the UI did not answer on {LAN}:\n{app.log()}")


def _neighbour(app: Appliance) -> httpx.Client:
    base = f"http://{LAN}:{app.ui_port}"
    return httpx.Client(
        base_url=base,
        transport=httpx.HTTPTransport(local_address=NEIGHBOUR),
        headers={"Origin": base},  # as the UI's own page would send it
        timeout=httpx.Timeout(30, read=10),  # a stream opened for a stranger would hang
    )


def _send(client: httpx.Client, method: str, path: str, **kw: object) -> httpx.Response:
    if method == "POST" and path.endswith("/upload"):
        return client.post(path, files={"files": ("x.png", b"\x89PNG")}, **kw)  # type: ignore[arg-type]
    if method == "POST":
        return client.post(path, json={"data": [], "fn_index": 0, "session_hash": "abc"}, **kw)  # type: ignore[arg-type]
    return client.get(path, **kw)  # type: ignore[arg-type]


def test_every_ui_route_without_and_with_the_owners_session_on_the_lan(
    appliance: Callable[..., Appliance], tmp_path: Path
) -> None:
    app = _start(appliance, tmp_path)
    exports = app.home / "cache" / "exports"  # ui/chat.py export_folder(): Gradio serves it
    exports.mkdir(parents=True, exist_ok=True)
    loot = exports / "chats.json"
    loot.write_text('{"conversations": ["private words ' + secrets.token_hex(4) + '"]}')
    loot.chmod(0o600)
    file_routes = [("GET", f"/gradio_api/file={loot}"), ("GET", f"/file={loot}")]

    with _neighbour(app) as stranger:
        page = stranger.get("/")
        assert page.status_code == 200  # the login page, and nothing of the app
        assert "private words" not in page.text
        for method, path in ROUTES + file_routes:
            reply = _send(stranger, method, path)
            assert reply.status_code in (401, 403, 404, 405), (method, path, reply.status_code)
            assert "private words" not in reply.text
            assert "dependencies" not in reply.text  # the app's event list stays unknown

        signed_in = stranger.post("/login", data={"username": USER, "password": PASSWORD})
        assert signed_in.status_code == 200, signed_in.text
        config = stranger.get("/config")
        assert config.status_code == 200
        deps = config.json()["dependencies"]
        assert deps
        # the page's own routes now answer; the named API, token and proxy routes stay closed
        assert stranger.get("/gradio_api/startup-events").status_code == 200
        upload = _send(stranger, "POST", "/gradio_api/upload")
        assert upload.status_code == 200, upload.text
        for method, path in ROUTES:
            if path in ("/config", "/gradio_api/startup-events", "/gradio_api/upload"):
                continue
            if path.startswith(("/gradio_api/queue/", "/gradio_api/heartbeat", "/gradio_api/run/")):
                continue  # the page's queue: answered by Gradio for this session
            if path.startswith(("/gradio_api/upload_progress", "/logout")):
                continue
            reply = _send(stranger, method, path)
            assert reply.status_code == 404, (method, path, reply.status_code)
        # logout is POST only, and ends the session
        assert stranger.get("/logout").status_code in (404, 405)
        assert stranger.post("/logout").status_code in (200, 303)
        stranger.cookies.clear()
        assert stranger.get("/gradio_api/login_check").status_code == 401
        assert "private words" not in _send(stranger, *file_routes[0]).text
