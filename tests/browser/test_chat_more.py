"""Chat tab: rendering, Advanced settings, context limit, history sidebar, concurrent chats."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
from chat_page import (
    BOT,
    INPUT,
    STATS,
    USER,
    last_stats,
    open_accordion,
    open_chat,
    send,
    set_level,
    toast_text,
    wait_for_replies,
    wait_until,
)
from playwright.sync_api import expect


def test_markdown_code_latex_advanced_settings_and_context_limit(appliance, page):
    app = appliance(settings={"engine": {"max_model_len": 4096}})
    open_chat(page, app.url)
    page.wait_for_selector("#chat-context:has-text('Context: 4,096 tokens')")

    # Markdown, inline code and LaTeX render (the simulator quotes the question back).
    send(page, "Explain `x = 1` and $$E = mc^2$$ **briefly**")
    wait_for_replies(page, 1)
    user = page.locator(USER).last
    assert user.locator("code").first.inner_text() == "x = 1"
    assert user.locator(".katex").count() >= 1
    assert user.locator("strong").first.inner_text() == "briefly"

    # Advanced: Max tokens caps the reply, and the reply says it was cut.
    open_accordion(page, "#advanced")
    page.locator("#max-tokens input").fill("30")
    page.locator("#max-tokens input").press("Tab")
    set_level(page, "low")
    expect(page.locator("#max-tokens input")).to_have_value("30")
    send(page, "short please")
    wait_for_replies(page, 2)
    stats = last_stats(page).inner_text()
    assert "30 completion tokens" in stats
    assert "cut at Max tokens" in stats

    # A message that cannot fit the 4,096-token context is refused with numbers, not cut.
    requests_before = app.gauge("vllm:request_success_total")
    send(page, "word " * 12000)
    text = toast_text(page)
    assert "context is 4,096 tokens" in text
    assert "Nothing was sent" in text
    assert page.locator(INPUT).input_value().startswith("word word")
    assert app.gauge("vllm:request_success_total") == requests_before
    assert page.locator(STATS).count() == 2


def _history_titles(page) -> list[str]:
    return [t.strip() for t in page.locator("#history-list label").all_inner_texts()]


def test_history_sidebar_search_rename_export_delete(appliance, page):
    app = appliance()
    open_chat(page, app.url)
    send(page, "alpha question")
    wait_for_replies(page, 1)
    page.locator("#new-chat").click()
    page.wait_for_function("() => !new URL(location.href).searchParams.get('c')")
    send(page, "beta question")
    wait_for_replies(page, 1)
    wait_until(lambda: _history_titles(page) == ["beta question", "alpha question"], 10)

    # Search titles.
    page.locator("#search textarea, #search input").first.fill("alp")
    wait_until(lambda: _history_titles(page) == ["alpha question"], 10)
    page.locator("#search textarea, #search input").first.fill("")
    wait_until(lambda: len(_history_titles(page)) == 2, 10)

    # Open one, rename it.
    page.locator("#history-list").get_by_label("alpha question").check()
    page.wait_for_selector(f"{USER}:has-text('alpha question')")
    open_accordion(page, "#manage")
    page.locator("#title-box textarea, #title-box input").first.fill("Renamed alpha")
    page.locator("#rename").click()
    wait_until(lambda: "Renamed alpha" in _history_titles(page), 10)

    # Export this one as JSON: the file holds the conversation.
    page.locator("#export-one").click()
    link = page.wait_for_selector("#export-file a[href]")
    # The download needs the owner's cookie (the page's own); another local user gets 401.
    with pytest.raises(urllib.error.HTTPError) as stranger:
        urllib.request.urlopen(link.get_attribute("href"), timeout=10)
    assert stranger.value.code == 401
    owner = {"Cookie": app.cookie}
    request = urllib.request.Request(link.get_attribute("href"), headers=owner)
    with urllib.request.urlopen(request, timeout=10) as response:
        exported = json.loads(response.read())
    (conversation,) = exported["conversations"]
    assert conversation["title"] == "Renamed alpha"
    assert [m["role"] for m in conversation["messages"]] == ["user", "assistant"]
    assert conversation["messages"][1]["reasoning"].startswith("Reasoning level: medium.")
    # Export all as Markdown.
    page.locator("#export-format").get_by_label("Markdown").check()
    page.locator("#export-all").click()
    href = page.wait_for_selector("#export-file a[href$='.md']").get_attribute("href")
    with urllib.request.urlopen(
        urllib.request.Request(href, headers=owner), timeout=10
    ) as response:
        markdown = response.read().decode()
    assert "# Renamed alpha" in markdown
    assert "# beta question" in markdown

    # Delete, with a confirmation step.
    page.locator("#delete").click()
    page.locator("#confirm-delete").click()
    wait_until(lambda: _history_titles(page) == ["beta question"], 10)
    assert page.locator(BOT).count() == 0


def test_two_chats_stream_at_the_same_time(appliance, page, new_page):
    """Gradio runs one event at a time by default; chat events must not wait for each other."""
    app = appliance(sim={"tokens_per_s": 40, "output_tokens": 600})
    other = new_page()
    open_chat(page, app.url)
    open_chat(other, app.url)
    send(page, "first chat")
    send(other, "second chat")
    peak = 0.0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and peak < 2:
        peak = max(peak, app.gauge())
        time.sleep(0.05)
    assert peak == 2, "the second chat waited for the first one"
    for p in (page, other):
        p.locator("#chat-input button.stop-button").click()
    wait_until(lambda: app.gauge() == 0, 10)


PASTE_OR_DROP = """async ([kind, b64, text]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const dt = new DataTransfer();
  if (b64) dt.items.add(new File([bytes], 'pasted.png', {type: 'image/png'}));
  if (text) dt.setData('text/plain', text);
  const area = document.querySelector('#chat-input textarea');
  if (kind === 'paste') {
    area.focus();
    const init = {clipboardData: dt, bubbles: true, cancelable: true};
    return area.dispatchEvent(new ClipboardEvent('paste', init));  // false: a handler took it
  } else {
    const target = document.querySelector('#chat-input .full-container') || area;
    for (const type of ['dragenter', 'dragover', 'drop']) {
      const init = {dataTransfer: dt, bubbles: true, cancelable: true};
      target.dispatchEvent(new DragEvent(type, init));
    }
  }
  return true;
}"""


def test_paste_and_drop_images_and_paste_long_text(appliance, page, tmp_path):
    import base64

    from chat_page import png

    app = appliance()
    open_chat(page, app.url)
    image = base64.b64encode(png(tmp_path / "p.png", (200, 100)).read_bytes()).decode()
    page.evaluate(PASTE_OR_DROP, ["paste", image, ""])
    page.wait_for_selector("#chat-input .thumbnail-item")
    page.evaluate(PASTE_OR_DROP, ["drop", image, ""])
    page.wait_for_function(
        "() => document.querySelectorAll('#chat-input .thumbnail-item').length === 2"
    )
    send(page, "pasted and dropped")
    wait_for_replies(page, 1)
    answer = page.locator(BOT).last.inner_text()
    assert "Image 1 is a PNG image of 200x100 pixels" in answer
    assert "Image 2 is a PNG image of 200x100 pixels" in answer

    # Long pasted text stays text. Gradio's paste handler would cancel the paste (before any
    # await) and make the text a .txt attachment, which the image check would then refuse; a
    # paste nobody cancels is the browser's to insert as text (a script-made event inserts
    # nothing itself, so the check is that no handler took it).
    long_text = "lorem ipsum " * 200
    page.locator(INPUT).focus()
    assert page.evaluate(PASTE_OR_DROP, ["paste", "", long_text]) is True
    assert page.locator("#chat-input .thumbnail-item").count() == 0
