"""Gateway limits and the usage tap: pure logic, driven by a fake clock (no sleeping)."""

from __future__ import annotations

import json

from appliance.gateway.limits import FailureThrottle, KeyLimiter
from appliance.gateway.sse import UsageTap, usage_of_body


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_address_that_keeps_failing_is_locked_out_then_let_back() -> None:
    clock = Clock()
    throttle = FailureThrottle(allowed=3, window_s=60, lockout_s=30, clock=clock)
    for _ in range(2):
        throttle.failed("10.0.0.9")
    assert throttle.check("10.0.0.9") is None
    throttle.failed("10.0.0.9")
    refusal = throttle.check("10.0.0.9")
    assert refusal is not None
    assert refusal.retry_after_s == 30
    assert throttle.check("10.0.0.8") is None  # other addresses unaffected
    clock.now += 29.5
    assert throttle.check("10.0.0.9") is not None
    clock.now += 1
    assert throttle.check("10.0.0.9") is None


def test_failures_outside_the_window_and_a_success_reset_the_count() -> None:
    clock = Clock()
    throttle = FailureThrottle(allowed=3, window_s=60, lockout_s=30, clock=clock)
    throttle.failed("a")
    throttle.failed("a")
    clock.now += 61
    throttle.failed("a")
    assert throttle.check("a") is None
    throttle.failed("a")
    throttle.succeeded("a")
    throttle.failed("a")
    assert throttle.check("a") is None


def test_the_throttle_table_stays_bounded() -> None:
    throttle = FailureThrottle(allowed=1, window_s=60, lockout_s=30, max_tracked=100)
    for i in range(1000):
        throttle.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(throttle._blocked_until) <= 100  # noqa: SLF001


def test_per_key_concurrency_and_rate() -> None:
    clock = Clock()
    limiter = KeyLimiter(concurrency=2, per_minute=3, clock=clock)
    assert limiter.acquire("k") is None
    assert limiter.acquire("k") is None
    refusal = limiter.acquire("k")
    assert refusal is not None
    assert refusal.code == "concurrency_limit_exceeded"
    assert limiter.acquire("other") is None
    limiter.release("k")
    assert limiter.acquire("k") is None  # third request this minute
    limiter.release("k")
    limiter.release("k")
    refusal = limiter.acquire("k")
    assert refusal is not None
    assert refusal.code == "rate_limit_exceeded"
    assert refusal.retry_after_s == 60
    clock.now += 60.5
    assert limiter.acquire("k") is None
    limiter.configure(concurrency=0, per_minute=0)  # 0 turns a limit off
    for _ in range(50):
        assert limiter.acquire("k") is None


def _event(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def test_usage_tap_passes_events_on_as_they_complete_and_strips_the_injected_usage() -> None:
    tap = UsageTap(strip_usage_chunk=True)
    first = _event({"choices": [{"delta": {"content": "Hi"}}]})
    assert tap.feed(first[:10]) == b""  # half an event waits
    assert tap.feed(first[10:]) == first  # sent the moment it is complete
    usage = _event({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 34}})
    assert not tap.final
    assert not tap.done
    out = tap.feed(usage + b"data: [DONE]\n\n")
    assert out == b"data: [DONE]\n\n"
    assert tap.final
    assert tap.done
    assert tap.usage is not None
    assert (tap.usage.prompt_tokens, tap.usage.completion_tokens) == (
        12,
        34,
    )


def test_usage_tap_keeps_usage_the_client_asked_for() -> None:
    tap = UsageTap(strip_usage_chunk=False)
    usage = _event({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}})
    assert tap.feed(usage) == usage
    assert tap.usage is not None
    assert tap.usage.completion_tokens == 2
    # A content chunk that carries usage (continuous stats) is never removed.
    tap = UsageTap(strip_usage_chunk=True)
    chunk = _event(
        {"choices": [{"delta": {}}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    )
    assert tap.feed(chunk) == chunk
    assert not tap.final  # running totals: the count waits for the final usage chunk
    # `"usage": null` on ordinary chunks is not usage.
    tap = UsageTap(strip_usage_chunk=True)
    plain = _event({"choices": [{"delta": {"content": "x"}}], "usage": None})
    assert tap.feed(plain) == plain
    assert tap.usage is None


def test_usage_of_a_plain_response() -> None:
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}})
    usage = usage_of_body(body.encode())
    assert usage is not None
    assert usage.completion_tokens == 4
    assert usage_of_body(b'not json with "usage"') is None
    assert usage_of_body(b"{}") is None
