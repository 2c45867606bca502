"""The sharing tab in Chromium against `step-station up --demo`: switch sharing on, get a key
once, copy a snippet that works with the official openai SDK, see the use, revoke the key.

Servers here may only bind to loopback, so the "LAN" interface is 127.0.0.2 (gateway.interface);
the switch, the key requirement and the rebinding are the same code paths as on a real LAN.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import openai
import pytest
from playwright.sync_api import expect

from appliance.keys import KEY_PREFIX

pytestmark = pytest.mark.timeout(240)

MODEL = "step3p7-flash"


def _open_tab(page, app) -> None:
    page.goto(app.url)
    page.get_by_role("tab", name="Sharing").click()
    expect(page.locator("#ss-share-status")).to_contain_text("Not shared", timeout=30_000)


def _code_text(page, tab: str, elem_id: str) -> str:
    page.get_by_role("tab", name=tab).click()
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
    expect(page.locator("#ss-share-addresses")).to_contain_text(f"127.0.0.2:{app.api_port}")
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
    time.sleep(0.5)
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
    expect(page.locator("#ss-keys")).to_contain_text("bob-laptop")
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
