"""Idle sleep and the owner's own chat, in the browser (issue 13): a chat keeps the engine awake,
and a chat sent to a sleeping engine wakes it and answers.

A real `step-station up --demo` with sleep mode on and an idle time of three seconds; the
simulator streams slower than that, so a chat that did not hold off idle sleep would be cut off
by vLLM's /sleep (which aborts running requests) before its answer ends.
"""

from __future__ import annotations

import threading

from chat_page import BOT, STATS, last_stats, open_chat, send, wait_for_replies, wait_until

IDLE_MINUTES = 0.05  # three seconds
TOKENS_PER_S = 12
ANSWER_TOKENS = 60  # five seconds of streaming, longer than the idle time


def test_a_browser_chat_keeps_the_engine_awake_and_wakes_it_from_sleep(appliance, page):
    app = appliance(
        sim={"tokens_per_s": TOKENS_PER_S, "output_tokens": ANSWER_TOKENS, "sleep_s": 0.2},
        settings={"engine": {"sleep_mode": True, "idle_sleep_minutes": IDLE_MINUTES}},
    )
    open_chat(page, app.url)

    # While an answer streams for longer than the idle time, the engine stays awake.
    seen: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            health = app.health()
            if health is not None:
                seen.append(str(health["engine"]))
            done.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    send(page, "Tell me a long story.")
    watcher.start()
    try:
        wait_for_replies(page, 1, timeout_s=60)
    finally:
        done.set()
        watcher.join(5)
    assert seen, "the service's /healthz never answered"
    assert "sleeping" not in seen, seen
    assert f"+ {ANSWER_TOKENS} completion tokens" in last_stats(page).inner_text()

    # Left alone, the engine goes to sleep; the page's next chat wakes it and gets its answer.
    wait_until(
        lambda: (app.health() or {}).get("engine") == "sleeping", timeout_s=60, interval_s=0.2
    )
    send(page, "Are you awake?")
    wait_for_replies(page, 2, timeout_s=60)
    assert page.locator(STATS).count() == 2
    reply = page.locator(BOT).last.inner_text()
    assert "not running" not in reply.lower(), reply
    assert f"+ {ANSWER_TOKENS} completion tokens" in last_stats(page).inner_text()
