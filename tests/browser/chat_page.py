"""Page helpers for the chat tab (selectors in one place)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image

REPO = Path(__file__).resolve().parents[2]

INPUT = "#chat-input textarea"
FILE_INPUT = "#chat-input input[type=file]"
BOT = "#chatbot .bot-row"
USER = "#chatbot .user-row"
THOUGHT_TITLE = "#chatbot .thought-group .title"
STATS = "#chatbot .reply-stats"
TOAST = ".toast-body"


def png(path: Path, size: tuple[int, int] = (320, 240), color: str = "orange") -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def open_chat(page: Any, url: str) -> None:
    page.goto(url)
    page.wait_for_selector(INPUT)
    page.wait_for_function("() => window.gradio_config !== undefined")
    # the page load's answer (conversation, preset, level) has been applied: a level chosen
    # before it would be set back (ui/app.py marks the body once it is in)
    page.wait_for_function("() => document.body.dataset.chatLoaded === '1'")


def after_next_frames(page: Any, frames: int = 3) -> None:
    """Let the page paint a few frames."""
    page.evaluate(
        """(n) => new Promise((done) => {
            const step = (left) => left ? requestAnimationFrame(() => step(left - 1)) : done();
            step(n);
        })""",
        frames,
    )


def open_accordion(page: Any, selector: str) -> None:
    """Expand a closed accordion and wait until its fields can be typed into.

    Gradio mounts a closed accordion's children on expand with their first values, then one
    animation frame later sets their stored values again: a field filled in that frame is set
    back (a user cannot type that fast; a test can)."""
    page.locator(f"{selector} > .label-wrap, {selector} button.label-wrap").first.click()
    page.wait_for_selector(f"{selector} [data-testid=accordion-content]", state="visible")
    after_next_frames(page)


def set_level(page: Any, level: str) -> None:
    page.locator("#reasoning-level").get_by_label(level, exact=True).check()


def attach(page: Any, files: list[Path]) -> None:
    page.set_input_files(FILE_INPUT, [str(f) for f in files])
    # Each attachment shows a thumbnail once uploaded.
    page.wait_for_function(
        "(n) => document.querySelectorAll('#chat-input .thumbnail-item, #chat-input "
        '[data-testid="file-preview"], #chat-input img\').length >= n',
        arg=min(len(files), 1),
    )


def send(page: Any, text: str) -> None:
    page.wait_for_selector("#chat-input button.submit-button")  # not while a reply streams
    page.fill(INPUT, text)
    page.locator(INPUT).press("Enter")


def stats_count(page: Any) -> int:
    return page.locator(STATS).count()


def wait_for_replies(page: Any, count: int, timeout_s: float = 60) -> None:
    page.wait_for_function(
        f"(n) => document.querySelectorAll('{STATS}').length >= n",
        arg=count,
        timeout=timeout_s * 1000,
    )


def last_stats(page: Any) -> Any:
    return page.locator(STATS).last


def stop_button(page: Any) -> Any:
    return page.locator("#chat-input button.stop-button")


def toast_text(page: Any, timeout_s: float = 15) -> str:
    page.wait_for_selector(TOAST, timeout=timeout_s * 1000)
    return " ".join(page.locator(TOAST).all_inner_texts())


def close_toasts(page: Any) -> None:
    for button in page.locator(".toast-close").all():
        button.click()
    page.wait_for_function("() => document.querySelectorAll('.toast-body').length === 0")


def wait_until(predicate: Any, timeout_s: float, interval_s: float = 0.02) -> float:
    """Poll `predicate` until true; return the seconds it took (fails with AssertionError)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)
    return time.monotonic() - start


def screenshot_dir() -> Path:
    """Where the browser tests put the README's screenshots: docs/img only when
    `scripts/screenshots.sh` asks (STEP_SCREENSHOTS); a plain test run never writes into tracked
    files, so its pictures go to a temporary folder."""
    chosen = os.environ.get("STEP_SCREENSHOTS")
    if chosen:
        return Path(chosen)
    return Path(tempfile.gettempdir()) / f"step-station-screenshots-{os.getuid()}"


def screenshot(page: Any, name: str, *, full_page: bool = False) -> Path:
    folder = screenshot_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    page.screenshot(path=str(path), full_page=full_page)
    return path


def choose(page: Any, selector: str, option: str) -> None:
    """Pick an option of a Gradio dropdown the way the owner does: open it, click the option."""
    page.locator(f"{selector} input").click()
    page.get_by_role("option", name=option, exact=True).click()
    page.wait_for_function(
        "([sel, want]) => document.querySelector(sel + ' input').value === want",
        arg=[selector, option],
    )


def field(page: Any, selector: str) -> str:
    """The value of a textbox or number field (its textarea or input)."""
    return str(page.locator(f"{selector} textarea, {selector} input").first.input_value())


def download(app: Any, href: str) -> bytes:
    """A file the page links to, fetched with the owner's cookie (as the page itself does)."""
    import urllib.request

    request = urllib.request.Request(href, headers={"Cookie": app.cookie})
    with urllib.request.urlopen(request, timeout=10) as response:
        return bytes(response.read())
