"""Presets and history in headless Chromium against `step-station up --demo` (the simulator
echoes what it received): a preset saved, chosen and kept after a reload; search finding a word
inside a reply (its snippet shows `<script>` as text); an edit making a second version that is
still reachable after a reload; export then import giving the same conversation."""

from __future__ import annotations

import json
import sqlite3
from urllib.parse import parse_qs, urlparse

from chat_page import (
    BOT,
    INPUT,
    STATS,
    USER,
    choose,
    close_toasts,
    download,
    field,
    open_accordion,
    open_chat,
    send,
    set_level,
    toast_text,
    wait_for_replies,
    wait_until,
)

PIRATE = "Talk like a pirate in every answer, matey, and never break character."


def conversation_id(page) -> str:
    return parse_qs(urlparse(page.url).query).get("c", [""])[0]


def stored_settings(app, cid: str) -> dict:
    db = sqlite3.connect(app.home / "data" / "history.sqlite3")
    try:
        (settings,) = db.execute(
            "SELECT settings FROM conversations WHERE id = ?", (cid,)
        ).fetchone()
    finally:
        db.close()
    return json.loads(settings)


def prompt_tokens(page) -> int:
    text = page.locator(STATS).last.inner_text()
    return int(text.split(" prompt + ")[0].rsplit("· ", 1)[1].replace(",", ""))


def test_a_preset_is_saved_chosen_and_kept_after_reload(appliance, page, new_page):
    app = appliance()
    open_chat(page, app.url)
    assert page.locator("#preset input").input_value() == "Default"
    send(page, "ahoy")
    wait_for_replies(page, 1)
    plain_prompt = prompt_tokens(page)

    # A new preset from the Advanced fold: a system prompt and a level, saved under a name.
    page.locator("#new-chat").click()
    page.wait_for_function("() => !new URL(location.href).searchParams.get('c')")
    open_accordion(page, "#advanced")
    page.locator("#system-prompt textarea").fill(PIRATE)
    set_level(page, "low")
    page.locator("#preset-name input, #preset-name textarea").first.fill("Pirate")
    page.locator("#preset-new").click()
    page.wait_for_function("() => document.querySelector('#preset input').value === 'Pirate'")

    # Back to the built-in preset and then the new one: the fields follow the choice.
    choose(page, "#preset", "Default")
    wait_until(lambda: field(page, "#system-prompt") == "", 10)
    choose(page, "#preset", "Pirate")
    wait_until(lambda: field(page, "#system-prompt") == PIRATE, 10)
    assert page.locator("#reasoning-level input[value=low]").is_checked()

    send(page, "ahoy")
    wait_for_replies(page, 1)
    page.wait_for_selector(f"{STATS}.level-low")
    # The system prompt reached the engine (the prompt grew by it) and the conversation keeps it.
    assert prompt_tokens(page) > plain_prompt + 10
    cid = conversation_id(page)
    settings = stored_settings(app, cid)
    assert settings["preset"] == "Pirate"
    assert settings["system_prompt"] == PIRATE
    assert settings["reasoning_effort"] == "low"

    # After a reload the conversation comes back with its preset and its settings.
    page.reload()
    page.wait_for_selector(INPUT)
    wait_for_replies(page, 1)
    page.wait_for_function("() => document.querySelector('#preset input').value === 'Pirate'")
    open_accordion(page, "#advanced")
    assert field(page, "#system-prompt") == PIRATE
    assert page.locator("#reasoning-level input[value=low]").is_checked()

    # Another browser, a new chat: the preset is there to choose.
    other = new_page()
    open_chat(other, app.url)
    assert other.locator("#preset input").input_value() == "Default"
    open_accordion(other, "#advanced")
    choose(other, "#preset", "Pirate")
    wait_until(lambda: field(other, "#system-prompt") == PIRATE, 10)


def test_search_finds_a_word_inside_a_reply_and_shows_html_as_text(appliance, page):
    app = appliance()
    open_chat(page, app.url)
    send(page, "tell me about <script>window.pwned = 1</script> quokkas")
    wait_for_replies(page, 1)
    page.locator("#new-chat").click()
    page.wait_for_function("() => !new URL(location.href).searchParams.get('c')")
    send(page, "tell me about zebras")
    wait_for_replies(page, 1)

    # "Simulated" is only in the replies, "quokkas" only in the first conversation.
    page.locator("#search textarea, #search input").first.fill("simulated quokkas")
    page.wait_for_selector("#search-results .search-hit")
    wait_until(lambda: page.locator("#search-results .search-hit").count() == 1, 10)
    wait_until(lambda: page.locator("#history-list label").count() == 1, 10)
    snippet = page.locator("#search-results .search-snippet").first
    marks = [m.lower() for m in snippet.locator("mark").all_inner_texts()]
    assert "simulated" in marks
    assert "quokkas" in marks
    # The reply's <script> is shown as text, never made into an element or run.
    assert "<script>window.pwned = 1</script>" in snippet.inner_text()
    assert page.locator("#search-results script").count() == 0
    assert page.evaluate("() => window.pwned") is None

    # The result opens its conversation.
    page.locator("#search-results .search-title").first.click()
    page.wait_for_selector(f"{USER}:has-text('quokkas')")
    wait_for_replies(page, 1)


def versions_count(page) -> str:
    return page.locator("#version-count").inner_text().strip()


def test_an_edit_makes_a_second_version_and_both_stay_reachable_after_reload(appliance, page):
    app = appliance()
    open_chat(page, app.url)
    send(page, "first question")
    wait_for_replies(page, 1)
    assert not page.locator("#versions").is_visible()

    page.locator("#chatbot button[aria-label='Edit']").last.click()
    page.locator("#chatbot textarea").first.fill("second question")
    page.locator("#chatbot button[aria-label='Submit']").first.click()
    page.wait_for_selector(f"{BOT}:has-text('to \"second question\"')")
    page.wait_for_selector("#versions", state="visible")
    wait_until(lambda: versions_count(page) == "2/2", 15)

    page.reload()
    page.wait_for_selector(INPUT)
    wait_for_replies(page, 1)
    page.wait_for_selector("#versions", state="visible")
    assert versions_count(page) == "2/2"
    assert page.locator(USER).last.inner_text().strip().startswith("second question")

    # Page back to the first version: its question and its own reply.
    page.locator("#version-before").click()
    page.wait_for_selector(f"{BOT}:has-text('to \"first question\"')")
    assert page.locator(USER).last.inner_text().strip().startswith("first question")
    wait_until(lambda: versions_count(page) == "1/2", 10)
    assert page.locator(STATS).count() == 1
    # ... and forward again.
    page.locator("#version-after").click()
    page.wait_for_selector(f"{BOT}:has-text('to \"second question\"')")
    wait_until(lambda: versions_count(page) == "2/2", 10)

    # Regenerate: the reply gets versions of its own, the picker now offers both messages.
    page.locator("#chatbot button[aria-label='Retry']").last.click()
    page.wait_for_selector(f"{STATS}:has-text('version 2/2')")
    page.wait_for_function(
        "() => document.querySelector('#version-point input').value.includes('reply')"
    )
    page.locator("#version-before").click()
    page.wait_for_selector(f"{STATS}:has-text('version 1/2')")
    assert page.locator(USER).last.inner_text().strip().startswith("second question")
    # The question's versions are still there to pick and page.
    choose(page, "#version-point", "Message 1 (your message): 2/2")
    page.locator("#version-before").click()
    page.wait_for_selector(f"{BOT}:has-text('to \"first question\"')")


def test_export_then_import_gives_the_same_conversation(appliance, page, tmp_path):
    app = appliance()
    open_chat(page, app.url)
    send(page, "pack for the trip")
    wait_for_replies(page, 1)
    page.locator("#chatbot button[aria-label='Retry']").last.click()  # a second reply version
    page.wait_for_selector(f"{STATS}:has-text('version 2/2')")
    original_id = conversation_id(page)

    open_accordion(page, "#manage")
    page.locator("#export-one").click()
    href = page.wait_for_selector("#export-file a[href]").get_attribute("href")
    exported = download(app, href)
    (original,) = json.loads(exported)["conversations"]
    assert len(original["messages"]) == 3  # the question and both replies

    # A malformed file: a clear message, nothing imported.
    broken = tmp_path / "broken.json"
    broken.write_text(exported.decode()[:200])
    with page.expect_file_chooser() as chooser:
        page.locator("#import").click()
    chooser.value.set_files(str(broken))
    assert "not a Step Station chat export" in toast_text(page)
    close_toasts(page)
    assert page.locator("#history-list label").count() == 1

    good = tmp_path / "export.json"
    good.write_bytes(exported)
    with page.expect_file_chooser() as chooser:
        page.locator("#import").click()
    chooser.value.set_files(str(good))
    page.wait_for_function(
        "(old) => { const c = new URL(location.href).searchParams.get('c'); "
        "return c && c !== old; }",
        arg=original_id,
    )
    wait_until(lambda: page.locator("#history-list label").count() == 2, 10)
    wait_for_replies(page, 1)
    imported_id = conversation_id(page)
    page.wait_for_selector(f"{STATS}:has-text('version 2/2')")

    page.locator("#export-one").click()
    page.wait_for_function(
        "(old) => { const a = document.querySelector('#export-file a[href]'); "
        "return a && a.getAttribute('href') !== old; }",
        arg=href,
    )
    again_href = page.locator("#export-file a[href]").get_attribute("href")
    (imported,) = json.loads(download(app, again_href))["conversations"]
    assert imported["id"] == imported_id != original_id
    assert {**imported, "id": original_id} == original
