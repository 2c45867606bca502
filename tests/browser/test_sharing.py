"""The sharing tab in Chromium against `step-station up --demo`: switch sharing on, get a key
once, copy a snippet that works with the official openai SDK, see the use, revoke the key; the
clients' snippets name the LAN URL and the served model as text (a name full of quotes, shell
expansions and HTML stays text) and the copy button copies the text that runs.

Servers here may only bind to loopback, so the "LAN" interface is 127.0.0.2 (gateway.interface);
the switch, the key requirement and the rebinding are the same code paths as on a real LAN.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from playwright.sync_api import expect

from appliance.keys import KEY_PREFIX

pytestmark = pytest.mark.timeout(240)

MODEL = "step3p7-flash"
SERVED_NAME = Path(__file__).with_name("served_name")  # its sitecustomize renames the model
HOSTILE = 'st\'ep "3.7" $(touch pwned) <img src=x onerror="window.ssPwned=1">'


def _open_tab(page, app) -> None:
    page.goto(app.url)
    page.get_by_role("tab", name="Sharing").click()
    expect(page.locator("#ss-share-status")).to_contain_text("Not shared", timeout=30_000)


def _code_text(page, tab: str, elem_id: str) -> str:
    page.get_by_role("tab", name=tab, exact=True).click()
    return page.locator(f"#{elem_id} .cm-content").inner_text()


def test_share_switch_key_snippets_usage_and_revoke(appliance, page) -> None:
    app = appliance(settings={"gateway": {"interface": "127.0.0.2"}})
    _open_tab(page, app)
    # Not shared: loopback only, no key needed there.
    assert (
        openai.OpenAI(base_url=f"http://127.0.0.1:{app.api_port}/v1", api_key="x", max_retries=0)
        .models.list()
        .data
    )

    page.locator("#ss-share-switch input").check()
    expect(page.locator("#ss-share-status")).to_contain_text("Shared on the LAN", timeout=15_000)
    shown = page.locator("#ss-key-shown textarea, #ss-key-shown input").first
    expect(shown).to_have_value(re.compile("^" + re.escape(KEY_PREFIX)), timeout=15_000)
    key = shown.input_value()

    # The address list and the snippets use the LAN address; the snippet carries the new key.
    expect(page.locator("#ss-share-addresses")).to_contain_text(
        f"127.0.0.2:{app.api_port}", timeout=15_000
    )
    python = _code_text(page, "Python (openai SDK)", "ss-snippet-python-openai-sdk")
    assert f'base_url="http://127.0.0.2:{app.api_port}/v1"' in python
    assert key in python
    assert key in _code_text(page, "curl", "ss-snippet-curl")
    assert key in _code_text(page, "Continue", "ss-snippet-continue")
    assert key in _code_text(page, "Open WebUI", "ss-snippet-open-webui")

    # The gateway moved without restarting anything: loopback is closed, 127.0.0.2 needs the key.
    with pytest.raises(OSError):  # noqa: PT011
        socket.create_connection(("127.0.0.1", app.api_port), timeout=2).close()
    lan = f"http://127.0.0.2:{app.api_port}/v1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=lan, api_key="sk-step-wrong", max_retries=0).models.list()
    # Run the Python snippet exactly as shown: it prints the streamed answer.
    ran = subprocess.run(
        [sys.executable, "-c", python], capture_output=True, text=True, timeout=60, check=False
    )
    assert ran.returncode == 0, ran.stderr
    assert "Simulated reply" in ran.stdout
    assert app.health()["engine"] == "ready"  # the engine was never restarted

    # The use shows up in the key table and in recent use.
    page.locator("#ss-share-switch").scroll_into_view_if_needed()
    page.get_by_role("tab", name="Chat").click()
    page.get_by_role("tab", name="Sharing").click()  # shown again: refreshes at once
    expect(page.locator("#ss-recent")).to_contain_text("POST /v1/chat/completions", timeout=15_000)
    expect(page.locator("#ss-keys")).to_contain_text("lan-", timeout=15_000)

    # Make a second key by name, then revoke the first: it stops working at once.
    page.locator("#ss-key-name textarea, #ss-key-name input").first.fill("bob-laptop")
    page.locator("#ss-key-create").click()
    expect(shown).not_to_have_value(key, timeout=15_000)
    second = shown.input_value()
    assert second.startswith(KEY_PREFIX)
    expect(page.locator("#ss-keys")).to_contain_text("bob-laptop", timeout=15_000)
    page.locator("#ss-revoke-choice input").click()
    page.get_by_role("option", name=re.compile(r"^lan-")).click()
    page.locator("#ss-revoke").click()
    expect(page.locator("#ss-keys")).to_contain_text("revoked", timeout=15_000)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=lan, api_key=key, max_retries=0).models.list()
    assert openai.OpenAI(base_url=lan, api_key=second, max_retries=0).models.list().data

    # Sharing off: back on loopback; the key shown once is not shown again after a reload.
    page.locator("#ss-share-switch input").uncheck()
    expect(page.locator("#ss-share-status")).to_contain_text("Not shared", timeout=15_000)
    with pytest.raises(OSError):  # noqa: PT011
        socket.create_connection(("127.0.0.2", app.api_port), timeout=2).close()
    page.reload()
    page.get_by_role("tab", name="Sharing").click()
    expect(page.locator("#ss-share-status")).to_contain_text("Not shared", timeout=30_000)
    assert second not in page.content()
    assert key not in page.content()


def test_ui_on_lan_needs_the_owner_login_set_on_first_use(appliance, page) -> None:
    app = appliance()
    _open_tab(page, app)
    page.get_by_text("UI on LAN", exact=True).click()
    switch = page.locator("#ss-ui-lan input")
    # No login yet: refused, with the reason, and the switch goes back off (click, not check:
    # check() fails when the refusal unticks the box before it looks).
    switch.click()
    expect(page.get_by_text("needs an owner login first").first).to_be_visible(timeout=15_000)
    expect(switch).not_to_be_checked(timeout=15_000)
    page.locator("#ss-ui-user input, #ss-ui-user textarea").first.fill("owner")
    page.locator("#ss-ui-password input").fill("station-pass-1")
    switch.check()
    expect(page.locator("#ss-ui-lan-status")).to_contain_text(
        "owner login ('owner')", timeout=15_000
    )
    secrets = (app.home / "config" / "secrets.toml").read_text()
    assert "station-pass-1" not in secrets
    assert "ui_login_hash" in secrets
    app.stop()

    # From the next start the UI listens beyond loopback (127.0.0.2 stands in for the LAN here)
    # and every page asks for the login.
    again = appliance(home=app.home, settings={"ui": {"host": "127.0.0.2"}}, wait=False)
    url = f"http://127.0.0.2:{again.ui_port}/"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.2", again.ui_port), timeout=1):
                break
        except OSError:
            time.sleep(0.3)
    page.goto(url)
    password = page.locator("input[type=password]")
    expect(password).to_be_visible(timeout=60_000)
    page.locator("input[type=text], input:not([type])").first.fill("owner")
    password.fill("wrong-password")
    page.get_by_role("button", name=re.compile("login", re.IGNORECASE)).click()
    expect(page.get_by_text(re.compile("incorrect", re.IGNORECASE)).first).to_be_visible(
        timeout=15_000
    )
    page.locator("input[type=text], input:not([type])").first.fill("owner")
    password.fill("station-pass-1")
    page.get_by_role("button", name=re.compile("login", re.IGNORECASE)).click()
    expect(page.get_by_role("tab", name="Sharing")).to_be_visible(timeout=60_000)

    # Log out (a POST: appliance/login_guard.py refuses GET /logout): the login page again.
    page.get_by_role("tab", name="Sharing").click()
    page.get_by_text("UI on LAN", exact=True).click()
    page.locator("#ss-logout").click()
    login = page.get_by_role("button", name=re.compile("login", re.IGNORECASE))
    expect(login).to_be_visible(timeout=60_000)
    expect(page.get_by_role("tab", name="Sharing")).to_have_count(0)
    page.reload()
    expect(login).to_be_visible(timeout=60_000)


def test_client_snippets_name_the_url_and_model_as_text_and_copy_as_shown(
    appliance, page, tmp_path
) -> None:
    app = appliance(
        settings={"gateway": {"interface": "127.0.0.2"}},
        sim={"without_routes": "/v1/responses"},  # an engine without Codex's route
        env={"PYTHONPATH": str(SERVED_NAME), "STEP_TEST_SERVED_NAME": HOSTILE},
    )
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    _open_tab(page, app)
    page.locator("#ss-share-switch input").check()
    shown = page.locator("#ss-key-shown textarea, #ss-key-shown input").first
    expect(shown).to_have_value(re.compile("^" + re.escape(KEY_PREFIX)), timeout=15_000)
    key = shown.input_value()
    lan = f"http://127.0.0.2:{app.api_port}"

    # The engine lacks /v1/responses: the tab says so instead of Codex meeting a 501.
    expect(page.locator("#ss-agent-note")).to_contain_text(
        "Codex (POST /v1/responses)", timeout=30_000
    )
    claude = _code_text(page, "Claude Code", "ss-snippet-claude-code")
    assert f"export ANTHROPIC_BASE_URL={lan}\n" in claude  # the root: Claude Code adds /v1
    assert f"export ANTHROPIC_MODEL={shlex.quote(HOSTILE)}\n" in claude
    assert key in claude
    codex = _code_text(page, "Codex", "ss-snippet-codex")
    assert f'base_url = "{lan}/v1"' in codex
    assert 'wire_api = "responses"' in codex
    assert f"model = {json.dumps(HOSTILE)}" in codex
    assert "model_context_window = " in codex  # the engine's own, from its /v1/models
    # The name is text in the page: no element made from it, no script run.
    assert page.locator("img[src='x']").count() == 0
    assert page.evaluate("() => window.ssPwned") is None

    # The copy button copies the snippet, and what it copies runs as it is.
    page.get_by_role("tab", name="curl", exact=True).click()
    page.locator("#ss-snippet-curl").get_by_role("button", name=re.compile("copy", re.I)).click()
    copied = page.evaluate("() => navigator.clipboard.readText()")
    assert copied.startswith(f"export STEP_STATION_KEY={key}")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    ran = subprocess.run(
        ["bash", "-c", copied], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert not list(tmp_path.glob("pwned*"))
    chat, message = (json.loads(line) for line in ran.stdout.strip().splitlines())
    assert chat["choices"][0]["message"]["content"].startswith(f"Simulated reply from {HOSTILE}")
    assert message["type"] == "message"
    assert message["model"] == HOSTILE
