"""The browser keeps no secret and no chat text: Gradio's run history is off.

Gradio 6 records every event's inputs and outputs in the browser's storage by default (its "run
history"), which would keep a new API key, an owner password and the chat in localStorage for any
later user of the browser profile or any script on the origin. After creating a key and chatting,
the page's storage holds none of them.
"""

from __future__ import annotations

import re

import pytest
from chat_page import open_chat, send, wait_for_replies
from playwright.sync_api import expect

from appliance.keys import KEY_PREFIX

pytestmark = pytest.mark.timeout(240)

STORAGE = """() => {
  const dump = s => Object.keys(s).map(k => k + "=" + s.getItem(k)).join("\\n");
  return dump(window.localStorage) + "\\n" + dump(window.sessionStorage);
}"""


def test_no_key_and_no_chat_text_in_the_browsers_storage(appliance, page) -> None:
    app = appliance()
    open_chat(page, app.url)
    send(page, "remember the secret word pomegranate")
    wait_for_replies(page, 1)
    page.get_by_role("tab", name="Sharing").click()
    page.locator("#ss-key-name textarea, #ss-key-name input").first.fill("storage-check")
    page.locator("#ss-key-create").click()
    shown = page.locator("#ss-key-shown textarea, #ss-key-shown input").first
    expect(shown).to_have_value(re.compile("^" + re.escape(KEY_PREFIX)), timeout=15_000)
    key = shown.input_value()
    page.reload()  # whatever the page saves, it has saved by now
    stored = page.evaluate(STORAGE)
    assert key not in stored
    assert key[len(KEY_PREFIX) :][:12] not in stored
    assert "pomegranate" not in stored
