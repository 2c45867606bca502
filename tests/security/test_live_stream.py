"""The dashboard's live stream (`GET /ss-live/dashboard`, ui/live.py), misused.

The one UI route outside Gradio (issue 16). On loopback it stands behind the Host/Origin guard and
the per-install secret like every UI route: a rebinding page (foreign Host), another site
(foreign Origin) and another local user (no or a forged cookie) get a refusal and no value. With
"UI on LAN" the UI lock asks for no secret and Gradio's `auth` does not cover a route outside
Gradio, so the route checks the owner's session itself: a LAN neighbour without it gets a 401,
with it the stream, and after logout a 401 again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fixtures.appliance import Appliance
from test_host_origin import EVIL_HOSTS, EVIL_ORIGINS
from test_ui_routes import PASSWORD, USER, _neighbour, _start

pytestmark = pytest.mark.timeout(300)

PATH = "/ss-live/dashboard"


def first_event(client: httpx.Client, **kw: object) -> tuple[int, dict[str, str] | str]:
    """The status and, for a 200, the stream's first event (the JSON of its data line); for a
    refusal its body. Reading stops there (the stream itself never ends)."""
    with client.stream("GET", PATH, timeout=httpx.Timeout(30), **kw) as reply:  # type: ignore[arg-type]
        if reply.status_code != 200:
            reply.read()
            return reply.status_code, reply.text
        assert reply.headers["content-type"].startswith("text/event-stream")
        for line in reply.iter_lines():
            if line.startswith("data: "):
                return 200, json.loads(line[len("data: ") :])
    raise AssertionError("the stream ended without an event")


def test_the_owner_gets_the_values_and_no_one_else_does(module_appliance: Appliance) -> None:
    app = module_appliance
    with httpx.Client(base_url=app.base) as client:
        status, event = first_event(client, headers={"Cookie": app.cookie})
        assert status == 200
        assert isinstance(event, dict)
        assert 'class="ss-cards"' in event["current"]  # the cards, as the page shows them
        assert "breakdown" in event

        # another local user: no cookie, a wrong one, the secret itself as the cookie
        for cookie in (None, f"step-station-ui-{app.ui_port}=not-it", app.token):
            headers = {"Cookie": cookie} if cookie else {}
            status, body = first_event(client, headers=headers)
            assert status == 401, (cookie, body)
            assert "ui_token_required" in str(body)
            assert "ss-cards" not in str(body)

        # DNS rebinding (foreign Host) and other sites (foreign Origin), even with the cookie
        for host in EVIL_HOSTS:
            status, body = first_event(client, headers={"Host": host, "Cookie": app.cookie})
            assert status == 403, (host, body)
            assert "ss-cards" not in str(body)
        for origin in EVIL_ORIGINS:
            status, body = first_event(client, headers={"Origin": origin, "Cookie": app.cookie})
            assert status == 403, (origin, body)
            assert "ss-cards" not in str(body)
        # only GET: the route takes nothing
        assert client.post(PATH, headers={"Cookie": app.cookie}).status_code in (404, 405)


def test_on_the_lan_the_stream_needs_the_owners_session(
    appliance: Callable[..., Appliance], tmp_path: Path
) -> None:
    app = _start(appliance, tmp_path)
    with _neighbour(app) as stranger:
        status, body = first_event(stranger)
        assert status == 401, body
        assert "login_required" in str(body)
        forged = {"Cookie": "access-token-x=y; access-token-unsecure-x=y"}
        assert first_event(stranger, headers=forged)[0] == 401

        signed_in = stranger.post("/login", data={"username": USER, "password": PASSWORD})
        assert signed_in.status_code == 200, signed_in.text
        status, event = first_event(stranger)
        assert status == 200
        assert isinstance(event, dict)
        assert "ss-cards" in event["current"]

        # a neighbour's page on another origin, with the owner's session: refused
        status, _ = first_event(stranger, headers={"Origin": "http://evil.test"})
        assert status == 403

        assert stranger.post("/logout").status_code in (200, 303)
        stranger.cookies.clear()
        assert first_event(stranger)[0] == 401
