"""Documents in the chat, from headless Chromium against `step-station up --demo` (issue 15,
item 4): a PDF and a code file attached and sent reach the engine (the simulator's answer quotes
the start of the message it received, the files' blocks first) and show as chips with their
token counts, also after a reload; a 300-page PDF, a 50 MB text file and a broken PDF each get a
clear message and nothing is stored or sent."""

from __future__ import annotations

import re

from chat_page import (
    BOT,
    INPUT,
    TOAST,
    USER,
    attach,
    close_toasts,
    open_chat,
    screenshot,
    send,
    toast_text,
    wait_for_replies,
)
from fixtures.pdf_kit import Scan, long_pdf, pdf_bytes, write_pdf

CHIP = "#chatbot .doc-chip"
ATTACHED = "#chat-attachments .doc-chip"


def finished_requests(app) -> float:
    """Chat completions the demo engine (the simulator) has answered."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in app.metrics().splitlines()
        if line.startswith("vllm:request_success_total")
    )


def test_a_pdf_and_a_code_file_reach_the_engine_as_text(appliance, page, tmp_path):
    app = appliance()
    pdf = write_pdf(tmp_path / "report.pdf", [["Zebra sales doubled in March."], [], Scan()])
    code = tmp_path / "main.py"
    code.write_text("def gnu():\n    return 'antelope'\n")
    open_chat(page, app.url)

    attach(page, [pdf])
    # Before sending: a chip under the box with the tokens by the engine's tokenizer.
    waiting = page.wait_for_selector(f"{ATTACHED}:has-text('report.pdf')")
    assert re.search(r"report\.pdf · PDF, 3 pages · \d+ tokens ·", waiting.inner_text())
    assert "estimate" not in waiting.inner_text()
    screenshot(page, "chat-documents-attached.png")
    send(page, "Summarise the report")
    wait_for_replies(page, 1)
    page.wait_for_function("(s) => !document.querySelector(s)", arg=ATTACHED)  # sent: gone
    reply = page.locator(BOT).last.inner_text()
    # The engine got the PDF's text, headed by its name, ahead of the question.
    assert "File: report.pdf" in reply
    assert "Zebra sales doubled in March." in reply
    assert "Image 1 is a JPEG image of 850x1100 pixels" in reply  # the scanned page 3
    chip = page.locator(CHIP).first.inner_text()
    assert re.search(
        r"report\.pdf · PDF, 3 pages · \d+ tokens · page 3 has no text and was sent as an "
        r"image · page 2 has no text and was skipped",
        chip,
    ), chip
    assert page.locator(f"{USER} img").count() == 1  # the scan shows in the bubble

    attach(page, [code])
    send(page, "Explain the code")
    wait_for_replies(page, 2)
    reply = page.locator(BOT).last.inner_text()
    assert "File: main.py" in reply
    assert "def gnu(): return 'antelope'" in reply
    assert re.search(r"main\.py · \d+ tokens", page.locator(CHIP).last.inner_text())
    assert finished_requests(app) == 2

    # Stored with the conversation: the chips come back after a reload.
    page.reload()
    page.wait_for_function(
        "(s) => document.querySelectorAll(s).length === 2", arg=CHIP, timeout=30_000
    )
    assert "report.pdf" in page.locator(CHIP).first.inner_text()
    screenshot(page, "chat-documents.png")

    # Undo: the question goes back into the box with its file (its chip under the box again),
    # and sent again the file reaches the engine again.
    page.locator("#chatbot button[aria-label='Undo']").last.click()
    page.wait_for_function(f"() => document.querySelector('{INPUT}').value === 'Explain the code'")
    page.wait_for_selector(f"{ATTACHED}:has-text('main.py')")
    page.wait_for_selector("#chat-input button.submit-button")
    page.locator(INPUT).press("Enter")
    wait_for_replies(page, 2)
    assert "def gnu(): return 'antelope'" in page.locator(BOT).last.inner_text()
    assert finished_requests(app) == 3


def test_too_big_and_broken_files_get_a_clear_message_and_nothing_is_sent(
    appliance, page, tmp_path
):
    app = appliance()
    book = long_pdf(tmp_path / "book.pdf", pages=300, lines=60)
    log = tmp_path / "server.log"
    line = b"2026-12-06 05:00:00 INFO request served in 12 ms\n"
    with log.open("wb") as handle:
        for _ in range(50 * 1024 * 1024 // len(line) + 1):
            handle.write(line)
    whole = pdf_bytes([["Some text on a page."]] * 3)
    broken = tmp_path / "contract.pdf"
    broken.write_bytes(whole[: len(whole) // 2])

    open_chat(page, app.url)
    attach(page, [book])
    send(page, "Summarise the book")
    text = toast_text(page, timeout_s=120)
    assert "book.pdf " in text
    assert re.search(r"tokens.*but the model's context has [\d,]+ tokens left for it", text), text
    assert "Nothing was sent" in text

    open_chat(page, app.url)  # a fresh page: the refused message stayed in the box
    attach(page, [log])
    send(page, "What went wrong?")
    text = toast_text(page, timeout_s=60)
    assert re.search(
        r"server\.log is 50\.0 MiB, about [\d,]+ tokens \(estimated from its size\), but the "
        r"model's context has [\d,]+ tokens left for it",
        text,
    ), text

    open_chat(page, app.url)
    attach(page, [broken])
    # Said under the box as soon as it is attached, and again when sent.
    page.wait_for_selector(f"{ATTACHED}:has-text('contract.pdf is not a readable PDF')")
    send(page, "Read the contract")
    text = toast_text(page, timeout_s=60)
    assert "contract.pdf is not a readable PDF" in text

    # Nothing was stored, nothing reached the engine, and the chat still works.
    close_toasts(page)
    open_chat(page, app.url)
    assert page.locator(USER).count() == 0
    assert finished_requests(app) == 0
    send(page, "A plain question")
    wait_for_replies(page, 1)
    assert page.locator(TOAST).count() == 0
    assert finished_requests(app) == 1
