"""The chat tab in headless Chromium against `step-station up --demo` (the simulator as engine)."""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

from chat_page import (
    BOT,
    INPUT,
    STATS,
    THOUGHT_TITLE,
    USER,
    attach,
    close_toasts,
    last_stats,
    open_chat,
    png,
    screenshot,
    send,
    set_level,
    stop_button,
    toast_text,
    wait_for_replies,
    wait_until,
)


def test_images_and_level_high_thinking_collapses_with_its_duration(appliance, page, tmp_path):
    app = appliance(sim={"tokens_per_s": 120})
    open_chat(page, app.url)
    page.wait_for_selector("#chat-context:has-text('Context: 262,144 tokens')")
    set_level(page, "high")
    wide = png(tmp_path / "wide.png", (6048, 1512), "teal")  # over 3024 px: scaled before sending
    small = png(tmp_path / "small.png", (320, 240), "orange")
    attach(page, [wide, small])
    send(page, "What is in these two pictures?")

    # Thinking streams into an open block with a live timer and the level.
    title = page.locator(THOUGHT_TITLE).first
    page.wait_for_selector(f"{THOUGHT_TITLE}.expanded")
    page.wait_for_selector("#chatbot .thought-group:has-text('Reasoning level: high.')")
    first = title.inner_text()
    assert re.search(r"Thinking · \d+\.\d s · level high", first)
    wait_until(lambda: title.inner_text() != first, timeout_s=10)  # the timer moves
    page.wait_for_selector(f"{THOUGHT_TITLE}:has-text('Thinking · 2.')")
    screenshot(page, "chat-thinking.png")

    # The answer starts: the block collapses and shows how long the model thought.
    wait_for_replies(page, 1)
    assert "expanded" not in (title.get_attribute("class") or "")
    duration = page.locator("#chatbot .thought-group .duration").first.inner_text()
    assert re.fullmatch(r"\(\d+(\.\d+)?s\)", duration.strip())
    stats = last_stats(page)
    assert "level-high" in (stats.get_attribute("class") or "")
    text = stats.inner_text()
    assert text.startswith("level high · first token ")
    assert re.search(r"\d+ tok/s · [\d,]+ prompt \+ [\d,]+ completion tokens", text)

    # Both images reached the engine, the wide one scaled to the 3024 px limit.
    answer = page.locator(BOT).last.inner_text()
    assert "Image 1 is a PNG image of 3024x756 pixels" in answer
    assert "Image 2 is a PNG image of 320x240 pixels" in answer
    assert page.locator(f"{USER} img").count() == 2
    # The level the engine received is in its own reasoning.
    title.click()
    page.wait_for_selector(f"{THOUGHT_TITLE}.expanded")
    assert "Reasoning level: high." in page.locator("#chatbot .thought-group").first.inner_text()
    assert "There are 2 image(s)." in page.locator("#chatbot .thought-group").first.inner_text()
    title.click()
    page.wait_for_selector("#chat-context:has-text('this conversation')")
    screenshot(page, "chat-answer.png")


def test_stop_ends_the_request_in_the_engine(appliance, page):
    app = appliance(sim={"tokens_per_s": 40, "output_tokens": 3000})
    open_chat(page, app.url)
    send(page, "Tell me a very long story")
    page.wait_for_selector(f"{THOUGHT_TITLE}.expanded")
    wait_until(lambda: app.gauge() == 1, timeout_s=10)
    clicked = time.monotonic()
    stop_button(page).click()
    wait_until(lambda: app.gauge() == 0, timeout_s=5)
    took = time.monotonic() - clicked
    print(f"running-request gauge back to 0 {took:.2f} s after Stop")
    assert took <= 1.0, f"the engine still ran the request {took:.2f} s after Stop"
    # The page says so, and the partial reply is kept, marked stopped.
    stats = page.wait_for_selector(f"{STATS}.status-stopped")
    assert "stopped" in stats.inner_text()
    db = sqlite3.connect(app.home / "data" / "history.sqlite3")
    (status,) = db.execute("SELECT status FROM messages WHERE role = 'assistant'").fetchone()
    assert status == "stopped"
    # The input is usable again.
    page.wait_for_selector("#chat-input button.submit-button")


def requests_done(app) -> float:
    return app.gauge("vllm:request_success_total")


def test_regenerate_edit_and_undo(appliance, page):
    app = appliance()
    open_chat(page, app.url)
    send(page, "first question")
    wait_for_replies(page, 1)
    assert requests_done(app) == 1

    # Regenerate with another level: one reply, replaced, answered at the new level.
    set_level(page, "low")
    page.locator("#chatbot button[aria-label='Retry']").last.click()
    wait_until(lambda: requests_done(app) == 2, timeout_s=30)
    page.wait_for_selector(f"{STATS}.level-low")
    assert page.locator(STATS).count() == 1

    # Edit the question: the reply is recomputed for the new text.
    page.locator("#chatbot button[aria-label='Edit']").last.click()
    editor = page.locator("#chatbot textarea").first
    editor.fill("second question")
    page.locator("#chatbot button[aria-label='Submit']").first.click()
    wait_until(lambda: requests_done(app) == 3, timeout_s=30)
    wait_for_replies(page, 1)
    page.wait_for_selector(
        f"{BOT}:has-text('Simulated reply from step3p7-flash to \"second question\"')"
    )
    assert page.locator(STATS).count() == 1
    assert page.locator(USER).last.inner_text().strip().startswith("second question")

    # Undo: the exchange goes, the question comes back into the box.
    page.locator("#chatbot button[aria-label='Undo']").last.click()
    page.wait_for_function(f"() => document.querySelector('{INPUT}').value === 'second question'")
    assert page.locator(STATS).count() == 0


def test_reload_keeps_the_conversation(appliance, page, new_page):
    app = appliance()
    open_chat(page, app.url)
    send(page, "remember me")
    wait_for_replies(page, 1)
    answer = 'Simulated reply from step3p7-flash to "remember me"'
    stats = last_stats(page).inner_text()
    assert "?c=" in page.url  # the open conversation is in the address
    page.reload()
    page.wait_for_selector(INPUT)
    wait_for_replies(page, 1)
    assert page.locator(USER).last.inner_text().strip().startswith("remember me")
    assert answer in page.locator(BOT).last.inner_text()
    assert last_stats(page).inner_text() == stats
    # A different browser (no local state) finds it in the history list.
    other = new_page()
    open_chat(other, app.url)
    other.locator("#history-list").get_by_label("remember me").check()
    wait_for_replies(other, 1)
    assert answer in other.locator(BOT).last.inner_text()
    assert last_stats(other).inner_text() == stats


def make_noise_png(path: Path, megabytes: int) -> Path:
    """A real PNG of incompressible noise, about `megabytes` MB."""
    import os

    from PIL import Image

    side = int((megabytes * 1024 * 1024 / 3) ** 0.5) + 1
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(path, compress_level=0)
    return path


def test_bad_images_get_a_clear_message_and_nothing_is_sent(appliance, page, tmp_path):
    app = appliance()
    open_chat(page, app.url)
    fake = tmp_path / "notes.png"
    fake.write_text("just some text, not an image\n" * 200)
    huge = make_noise_png(tmp_path / "huge.png", 50)
    many = [png(tmp_path / f"p{i}.png", (64, 64)) for i in range(20)]
    cases = [
        ([fake], "notes.png is not an image"),
        (many, "Too many images: 20 attached; the engine accepts at most 8 per request"),
    ]
    for files, message in cases:
        attach(page, files)
        send(page, "look at this")
        text = toast_text(page)
        assert message in text
        assert "Nothing was sent" in text
        # Nothing reached the engine or the history, and the input still holds the message.
        assert app.gauge("vllm:prompt_tokens_total") == 0
        assert page.locator(USER).count() == 0
        assert page.locator(INPUT).input_value() == "look at this"
        close_toasts(page)
        for button in page.locator("#chat-input button.delete-button").all()[::-1]:
            button.click()
        page.wait_for_function("() => !document.querySelector('#chat-input .thumbnail-item')")
    # Over chat.max_image_mb but under the upload door (the PDF cap, 64 MiB: ui/chat.py
    # max_upload_bytes): refused on send from its size, unread, and never stored.
    attach(page, [huge])
    send(page, "look at this")
    text = toast_text(page)
    assert "huge.png is 50." in text
    assert "images may be at most 20.0 MiB" in text
    assert app.gauge("vllm:prompt_tokens_total") == 0
    db = sqlite3.connect(app.home / "data" / "history.sqlite3")
    assert db.execute("SELECT COUNT(*) FROM conversations").fetchone() == (0,)


def test_engine_not_ready_says_so_and_links_to_the_model_tab(appliance, page):
    app = appliance()
    open_chat(page, app.url)
    import os
    import signal

    os.kill(app.engine_pid(), signal.SIGKILL)  # the engine dies under the appliance
    banner = page.wait_for_selector("#engine-banner-text:has-text('The model is not running')")
    assert "Start it in the Model tab" in banner.inner_text()
    send(page, "are you there?")
    assert "The model is not running" in toast_text(page)
    assert page.locator(INPUT).input_value() == "are you there?"
    page.locator("#go-to-model").click()
    page.wait_for_selector("#tab-model", state="visible")
    assert page.locator("#tab-chat").is_hidden()
