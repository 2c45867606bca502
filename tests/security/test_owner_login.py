"""The owner login on the LAN, attacked on a running `step-station up --demo` with "UI on LAN" on.

Servers here may only bind to loopback, so the UI's "LAN" address is 127.0.0.2 (`ui.host`) and a
neighbour is a client bound to another loopback address (127.0.0.3): the same code paths as on a
real LAN (the listener is beyond 127.0.0.1, the owner login guards every page, the throttle keys
on the client's address).

- 500 wrong logins from one address: at most the failure throttle's allowance is checked, the
  rest are 429 with Retry-After, even with the right password; another address still logs in.
- The password check runs off the event loop (Gradio calls a plain `auth` inline, in the loop the
  chat streams on): shown through Gradio's real /login route, non-timing (the thread it ran on).
  The latency side (chat stream p95 during a burst) is measured by benchmarks/login_burst.py.
- GET /logout is refused and leaves the session; POST /logout ends it (the old cookie, replayed,
  is refused).
- A session ends after its lifetime (STEP_STATION_UI_SESSION_S here) and when the login changes.
- Turning "UI on LAN" on or changing the owner login needs the current password once one exists.
- With the owner's certificate (ui.tls_cert / ui.tls_key) the UI is HTTPS only; a bad setting
  stops the start with the setting named.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomllib
from fixtures.appliance import Appliance, appliance

from appliance import settings as st
from appliance.gateway.limits import AUTH_FAILURES_ALLOWED
from appliance.keys import hash_login, login_user, verify_login

__all__ = ["appliance"]

pytestmark = pytest.mark.timeout(300)

LAN = "127.0.0.2"  # the UI's "LAN" address
NEIGHBOUR = "127.0.0.3"  # another machine on the LAN
USER, PASSWORD = "owner", "station-pass-1"
COOKIE = "access-token-"


def _with_login(home: Path, user: str = USER, password: str = PASSWORD) -> None:
    st.save_secrets(
        st.Secrets(ui_login_hash=hash_login(user, password)), home / "config" / "secrets.toml"
    )


def _start(
    appliance: Callable[..., Appliance],
    tmp_path: Path,
    *,
    lan: bool = True,
    env: dict[str, str] | None = None,
    ui: dict[str, Any] | None = None,
    verify: ssl.SSLContext | None = None,
) -> Appliance:
    """An appliance whose owner login is set; with `lan`, "UI on LAN" is on (UI on 127.0.0.2).
    With `verify` (a context trusting the test's certificate), the UI is expected on HTTPS."""
    home = tmp_path / "owner-login"
    _with_login(home)
    ui = {**({"lan": True, "host": LAN} if lan else {}), **(ui or {})}
    app = appliance(home=home, settings={"ui": ui} if ui else None, env=env, wait=False)
    url = f"{'https' if verify else 'http'}://{LAN if lan else '127.0.0.1'}:{app.ui_port}/healthz"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert app.proc.poll() is None, app.log()
        try:
            if httpx.get(url, timeout=2, verify=verify or True).status_code == 200:
                return app
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"the UI did not answer at {url}:\n{app.log()}")


def _client(app: Appliance, source: str = "127.0.0.1", host: str = LAN) -> httpx.Client:
    """A client from `source` to the UI; Origin is the UI's own (a page of the UI would send it).
    Cookies are sent by hand (`_as`), so a test can replay an old one."""
    base = f"http://{host}:{app.ui_port}"
    return httpx.Client(
        base_url=base,
        transport=httpx.HTTPTransport(local_address=source),
        headers={"Origin": base},
        timeout=60,
    )


def _login(client: httpx.Client, user: str = USER, password: str = PASSWORD) -> httpx.Response:
    return client.post("/login", data={"username": user, "password": password})


def _session(response: httpx.Response) -> dict[str, str]:
    """The session cookie a successful login set (the one Gradio sends over plain HTTP)."""
    assert response.status_code == 200, response.text
    cookies = {k: v for k, v in response.cookies.items() if k.startswith(COOKIE + "unsecure-")}
    assert cookies, response.headers
    return cookies


def _as(cookies: dict[str, str] | None, client: httpx.Client) -> dict[str, str]:
    """Headers that send exactly these cookies (None: the client's own jar)."""
    if cookies is None:
        return {}
    client.cookies.clear()
    return {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())} if cookies else {}


def _signed_in(client: httpx.Client, cookies: dict[str, str]) -> bool:
    """Whether Gradio takes these cookies as a signed-in owner (its login_check route)."""
    status = client.get("/gradio_api/login_check", headers=_as(cookies, client)).status_code
    assert status in (200, 401), status
    return status == 200


# -------------------------------------------------------------------------------- throttling


def test_a_burst_of_wrong_logins_from_one_address_is_throttled(
    appliance: Callable[..., Appliance], tmp_path: Path
) -> None:
    app = _start(appliance, tmp_path)
    neighbour = _client(app, NEIGHBOUR)

    def attempt(i: int) -> httpx.Response:
        return _login(neighbour, USER, f"wrong-password-{i}")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(attempt, range(500)))
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {400, 429}, sorted(set(statuses))
    # Only the throttle's allowance reached the password check; everything else was refused.
    assert statuses.count(400) <= AUTH_FAILURES_ALLOWED, statuses.count(400)
    assert statuses.count(429) >= 500 - AUTH_FAILURES_ALLOWED
    refused = next(a for a in answers if a.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    # Locked out: even the right password is refused from that address for now ...
    locked = _login(neighbour)
    assert locked.status_code == 429
    assert "Too many wrong owner logins" in locked.json()["detail"]
    # ... while the owner on another address signs in as usual.
    owner = _client(app)
    assert _signed_in(owner, _session(_login(owner)))


def test_the_password_check_runs_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through Gradio's own POST /login with the appliance's `auth`: the slow hash must not run
    on the thread of the event loop (every chat stream of the UI is on that loop)."""
    import asyncio

    import gradio as gr  # noqa: TID251 - Gradio's own /login route is what is tested here
    from fastapi import FastAPI

    import appliance.keys as keys
    from ui.app import _owner_login

    keys.OwnerLogin().set(USER, PASSWORD)
    services = type("S", (), {"settings": st.with_changes(st.Settings(), {"ui.lan": True})})()
    ran_on: list[int] = []
    real = keys.verify_login

    def spy(stored: str, username: str, password: str) -> bool:
        ran_on.append(threading.get_ident())
        return real(stored, username, password)

    monkeypatch.setattr(keys, "verify_login", spy)
    with gr.Blocks() as blocks:
        gr.Markdown("hello")
    app = gr.mount_gradio_app(FastAPI(), blocks, path="/", **_owner_login(services))

    async def post_logins() -> tuple[int, list[int]]:
        loop_thread = threading.get_ident()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            good = await client.post("/login", data={"username": USER, "password": PASSWORD})
            bad = await client.post("/login", data={"username": USER, "password": "wrong-pass"})
        return loop_thread, [good.status_code, bad.status_code]

    loop_thread, statuses = asyncio.run(post_logins())
    assert statuses == [200, 400]
    assert len(ran_on) == 2
    assert loop_thread not in ran_on, "the password hash ran on the event loop's thread"


# ---------------------------------------------------------------------------------- sessions


def test_logout_is_a_post_and_a_get_changes_nothing(
    appliance: Callable[..., Appliance], tmp_path: Path
) -> None:
    app = _start(appliance, tmp_path)
    client = _client(app)
    assert not _signed_in(client, {})
    cookies = _session(_login(client))
    assert _signed_in(client, cookies)

    # A GET (a link or an <img> on any page) is refused and the session lives on.
    got = client.get("/logout", headers=_as(cookies, client))
    assert got.status_code == 405, got.text
    assert got.headers["allow"] == "POST"
    assert _signed_in(client, cookies)

    posted = client.post("/logout", headers=_as(cookies, client))
    assert posted.status_code in (200, 302, 303), posted.text
    cleared = [v for k, v in posted.headers.multi_items() if k == "set-cookie"]
    assert any(c.startswith(COOKIE) and "Max-Age=0" in c for c in cleared), cleared
    # The old cookie, replayed (kept by an attacker, or a browser that ignored the clearing):
    assert not _signed_in(client, cookies)
    assert client.get("/config", headers=_as(cookies, client)).status_code == 401


def test_a_session_ends_after_its_lifetime(
    appliance: Callable[..., Appliance], tmp_path: Path
) -> None:
    lifetime_s = 5
    app = _start(appliance, tmp_path, env={"STEP_STATION_UI_SESSION_S": str(lifetime_s)})
    client = _client(app)
    started = time.monotonic()
    answer = _login(client)
    cookies = _session(answer)
    # The browser is told the same lifetime.
    set_cookies = [v for k, v in answer.headers.multi_items() if k == "set-cookie"]
    assert all(f"Max-Age={lifetime_s}" in c for c in set_cookies if c.startswith(COOKIE))
    if time.monotonic() - started < lifetime_s - 1:  # a machine this slow proves nothing here
        assert _signed_in(client, cookies)
    deadline = time.monotonic() + lifetime_s + 60
    while _signed_in(client, cookies):
        assert time.monotonic() < deadline, "the session outlived its lifetime by a minute"
        time.sleep(0.25)
    assert client.get("/config", headers=_as(cookies, client)).status_code == 401
    assert time.monotonic() - started >= lifetime_s  # it did not end early
    assert _signed_in(client, _session(_login(client)))  # signing in again works


# ------------------------------------------------------------------- changing login or sharing


class Events:
    """Gradio events sent as the page sends them: queue/join by fn_index, then the SSE stream."""

    def __init__(self, client: httpx.Client, cookies: dict[str, str] | None = None) -> None:
        self.client = client
        self.cookies = cookies
        config = client.get("/config", headers=_as(cookies, client))
        assert config.status_code == 200, config.text
        self.dependencies = config.json()["dependencies"]
        self.session = uuid.uuid4().hex

    def call(self, api_name: str, data: list[Any]) -> list[dict[str, Any]]:
        dependency = next(d for d in self.dependencies if d.get("api_name") == api_name)
        joined = self.client.post(
            "/gradio_api/queue/join",
            headers=_as(self.cookies, self.client),
            json={
                "data": data,
                "fn_index": dependency["id"],
                "session_hash": self.session,
                "event_data": None,
                "trigger_id": dependency["targets"][0][0],
            },
        )
        assert joined.status_code == 200, joined.text
        messages = []
        with self.client.stream(
            "GET",
            "/gradio_api/queue/data",
            params={"session_hash": self.session},
            headers=_as(self.cookies, self.client),
        ) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    message = json.loads(line[5:])
                    messages.append(message)
                    if message.get("msg") == "process_completed":
                        return messages
        raise AssertionError(f"no process_completed for {api_name}: {messages}")


def _warnings(messages: list[dict[str, Any]]) -> str:
    return " ".join(str(m.get("log") or "") for m in messages if m.get("msg") == "log")


def _ui_lan(home: Path) -> bool:
    path = home / "config" / "settings.toml"
    return bool(tomllib.loads(path.read_text()).get("ui", {}).get("lan", False))


def _stored_login(home: Path) -> str:
    return st.load_secrets(home / "config" / "secrets.toml").ui_login_hash


def _ui_cookie(app: Appliance) -> dict[str, str]:
    """The owner's browser on loopback holds the per-install secret's cookie (web_guard)."""
    name, _, value = app.cookie.partition("=")
    return {name: value}


def test_turning_ui_on_lan_on_needs_the_current_password(
    appliance: Callable[..., Appliance], tmp_path: Path
) -> None:
    """A login exists, the UI is on loopback: whoever reaches the switch (a rebinding page, a
    forgotten open tab) must not open the UI to the LAN without the owner password."""
    app = _start(appliance, tmp_path, lan=False)
    events = Events(_client(app, host="127.0.0.1"), _ui_cookie(app))

    for user, password in (("", ""), (USER, "not-the-password"), ("mallory", "mallory-pass-1")):
        messages = events.call("on_ui_lan", [True, user, password])
        assert "owner password" in _warnings(messages), messages
        assert not _ui_lan(app.home)
        assert verify_login(_stored_login(app.home), USER, PASSWORD)  # the login is unchanged

    messages = events.call("on_ui_lan", [True, "", PASSWORD])
    assert _ui_lan(app.home), messages


def test_changing_the_owner_login_needs_the_current_password(
    appliance: Callable[..., Appliance], tmp_path: Path
) -> None:
    app = _start(appliance, tmp_path)
    client = _client(app)
    cookies = _session(_login(client))
    events = Events(client, cookies)

    for current in ("", "not-the-password"):
        messages = events.call("on_change_login", [current, "mallory", "mallory-pass-1"])
        assert "current owner password" in _warnings(messages), messages
        assert login_user(_stored_login(app.home)) == USER
        assert verify_login(_stored_login(app.home), USER, PASSWORD)

    messages = events.call("on_change_login", [PASSWORD, "owner2", "station-pass-2"])
    assert verify_login(_stored_login(app.home), "owner2", "station-pass-2"), messages
    # Every session signed in with the old login ends; the new login signs in.
    assert not _signed_in(client, cookies)
    assert _login(client).status_code == 400
    assert _signed_in(client, _session(_login(client, "owner2", "station-pass-2")))


# ------------------------------------------------------------------------------------------ TLS


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.2 made here (the owner's own certificate)."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test's certificate (apt-get install openssl)")
    cert, key = tmp_path / "ui-cert.pem", tmp_path / "ui-key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            f"/CN={LAN}",
            "-addext",
            f"subjectAltName=IP:{LAN}",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def test_the_ui_serves_https_with_the_owners_certificate(
    appliance: Callable[..., Appliance], tmp_path: Path
) -> None:
    cert, key = _self_signed(tmp_path)
    tls = {"tls_cert": str(cert), "tls_key": str(key)}
    trust = ssl.create_default_context(cafile=str(cert))
    app = _start(appliance, tmp_path, ui=tls, verify=trust)
    base = f"https://{LAN}:{app.ui_port}"
    with httpx.Client(base_url=base, verify=trust, headers={"Origin": base}) as client:
        answer = _login(client)
        assert answer.status_code == 200, answer.text
        cookies = {k: v for k, v in answer.cookies.items() if k.startswith(COOKIE)}
        assert _signed_in(client, cookies)
    # Plain HTTP on that port gets no page (the password never crosses the network in clear).
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"http://{LAN}:{app.ui_port}/login", data={"username": USER}, timeout=10)


def test_a_bad_certificate_setting_stops_the_start_with_a_clear_error(
    appliance: Callable[..., Appliance], tmp_path: Path
) -> None:
    cert, _ = _self_signed(tmp_path)
    missing = tmp_path / "no-such-key.pem"
    home = tmp_path / "bad-tls"
    app = appliance(
        home=home, settings={"ui": {"tls_cert": str(cert), "tls_key": str(missing)}}, wait=False
    )
    assert app.proc.wait(timeout=120) != 0
    assert f"ui.tls_key names {missing}" in app.log()
    assert "step-station config set" in app.log()
