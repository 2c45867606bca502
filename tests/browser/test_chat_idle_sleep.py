"""Idle sleep and the owner's own chat, in the browser (issue 13): a chat sent to a sleeping
engine wakes it and answers, and the engine stays awake while the answer streams.

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


def engine_state(app) -> str:
    return str((app.health() or {}).get("engine"))


def test_a_browser_chat_wakes_the_sleeping_engine_and_keeps_it_awake(appliance, page):
    app = appliance(
        sim={"tokens_per_s": TOKENS_PER_S, "output_tokens": ANSWER_TOKENS, "sleep_s": 0.2},
        settings={"engine": {"sleep_mode": True, "idle_sleep_minutes": IDLE_MINUTES}},
    )
    open_chat(page, app.url)
    # Nobody uses the engine after its start: idle sleep puts it to sleep.
    wait_until(lambda: engine_state(app) == "sleeping", timeout_s=60, interval_s=0.2)

    # A chat sent to the sleeping engine wakes it; its answer streams for longer than the idle
    # time, and the engine stays awake until the answer is complete.
    send(page, "Tell me a long story.")
    page.locator(BOT).first.wait_for(timeout=60_000)  # the answer is streaming
    seen: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(engine_state(app))
            done.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        wait_for_replies(page, 1, timeout_s=60)
    finally:
        done.set()
        watcher.join(5)
    assert seen, "the service's /healthz never answered"
    assert set(seen) == {"ready"}, seen
    stats = last_stats(page).inner_text()
    assert f"+ {ANSWER_TOKENS} completion tokens" in stats, stats
    reply = page.locator(BOT).last.inner_text()
    assert "not running" not in reply.lower(), reply

    # Left alone again, it sleeps again; the next chat wakes it and gets its whole answer too.
    wait_until(lambda: engine_state(app) == "sleeping", timeout_s=60, interval_s=0.2)
    send(page, "Are you awake?")
    wait_for_replies(page, 2, timeout_s=60)
    assert page.locator(STATS).count() == 2
    assert f"+ {ANSWER_TOKENS} completion tokens" in last_stats(page).inner_text()
