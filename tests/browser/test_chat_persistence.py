"""`kill -9` of the appliance in the middle of a reply loses no completed message."""

from __future__ import annotations

import signal
import sqlite3
import time

from chat_page import BOT, STATS, open_chat, send, wait_for_replies

from appliance.chat import history as hist


def rows(app) -> list[tuple[str, str, str]]:
    db = sqlite3.connect(app.home / "data" / "history.sqlite3")
    try:
        return db.execute(
            "SELECT role, status, content FROM messages ORDER BY conversation_id, position"
        ).fetchall()
    finally:
        db.close()


def test_kill_9_mid_stream_keeps_every_completed_message(appliance, page):
    app = appliance(sim={"tokens_per_s": 300, "output_tokens": 3000})
    open_chat(page, app.url)
    send(page, "first question")
    wait_for_replies(page, 1)
    first_answer = rows(app)[1][2]
    assert first_answer.startswith('Simulated reply from step3p7-flash to "first question"')

    send(page, "second question")
    page.wait_for_selector("#chatbot .thought-group .title.expanded")
    # Let the appliance save the streaming reply at least once, then kill it without warning.
    deadline = time.monotonic() + 30
    while not any(r[1] == hist.STREAMING and r[2] for r in rows(app)):
        assert time.monotonic() < deadline, "the streaming reply was never saved"
        time.sleep(0.1)
    app.kill(signal.SIGKILL)
    assert app.proc.returncode == -signal.SIGKILL

    again = appliance(home=app.home)
    saved = rows(again)
    assert [(role, status) for role, status, _ in saved] == [
        ("user", "complete"),
        ("assistant", "complete"),
        ("user", "complete"),
        ("assistant", "interrupted"),
    ]
    assert saved[0][2] == "first question"
    assert saved[1][2] == first_answer  # the completed reply, whole
    assert saved[2][2] == "second question"
    assert saved[3][2]  # the partial reply is kept, marked interrupted

    # The restarted UI shows it all, the partial reply labelled.
    open_chat(page, again.url)
    page.locator("#history-list").get_by_label("first question").check()
    wait_for_replies(page, 2)
    assert page.locator(f"{STATS}.status-complete").count() == 1
    interrupted = page.locator(f"{STATS}.status-interrupted")
    assert "interrupted" in interrupted.inner_text()
    assert first_answer[:60] in page.locator(BOT).first.inner_text()
