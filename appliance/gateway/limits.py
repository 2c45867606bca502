"""Request limits: failed-authentication throttle per address, concurrency and rate per key.

Pure and synchronous (the gateway's event loop is the only caller); clocks are injectable so the
tests drive time instead of sleeping. Every table is bounded, so a scan from many addresses cannot
grow memory without limit.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# An address that sends this many bad or missing keys within the window is refused for the lockout
# time (429 with Retry-After), even with a good key; a good key clears its count.
AUTH_FAILURES_ALLOWED = 10
AUTH_FAILURE_WINDOW_S = 60.0
AUTH_LOCKOUT_S = 60.0
_MAX_TRACKED = 4096


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused and when to come back."""

    code: str
    message: str
    retry_after_s: int


class FailureThrottle:
    """Counts failed authentications per client address; blocks an address that keeps failing."""

    def __init__(
        self,
        allowed: int = AUTH_FAILURES_ALLOWED,
        window_s: float = AUTH_FAILURE_WINDOW_S,
        lockout_s: float = AUTH_LOCKOUT_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_tracked: int = _MAX_TRACKED,
    ) -> None:
        self.allowed = allowed
        self.window_s = window_s
        self.lockout_s = lockout_s
        self._clock = clock
        self._max = max_tracked
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._blocked_until: OrderedDict[str, float] = OrderedDict()

    def check(self, address: str) -> Refusal | None:
        """A refusal while the address is locked out, else None."""
        until = self._blocked_until.get(address)
        if until is None:
            return None
        remaining = until - self._clock()
        if remaining <= 0:
            del self._blocked_until[address]
            return None
        return Refusal(
            "too_many_failed_authentications",
            f"Too many requests with a wrong or missing API key from {address}; "
            f"try again in {math.ceil(remaining)} s with a valid key.",
            max(1, math.ceil(remaining)),
        )

    def failed(self, address: str) -> None:
        now = self._clock()
        times = self._failures.pop(address, None) or deque()
        times.append(now)
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if len(times) >= self.allowed:
            self._blocked_until[address] = now + self.lockout_s
            self._blocked_until.move_to_end(address)
            times.clear()
        else:
            self._failures[address] = times
        _trim(self._failures, self._max)
        _trim(self._blocked_until, self._max)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)


class KeyLimiter:
    """Per-principal (key id, or address without a key) concurrency cap and requests per minute."""

    def __init__(
        self,
        concurrency: int,
        per_minute: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_tracked: int = _MAX_TRACKED,
    ) -> None:
        self.concurrency = concurrency
        self.per_minute = per_minute
        self._clock = clock
        self._max = max_tracked
        self._running: dict[str, int] = {}
        self._recent: OrderedDict[str, deque[float]] = OrderedDict()

    def configure(self, concurrency: int, per_minute: int) -> None:
        self.concurrency = concurrency
        self.per_minute = per_minute

    def acquire(self, principal: str) -> Refusal | None:
        """Admit one request (call `release` when it ends) or say why not. 0 disables a limit."""
        running = self._running.get(principal, 0)
        if self.concurrency > 0 and running >= self.concurrency:
            return Refusal(
                "concurrency_limit_exceeded",
                f"This key already has {running} requests running (limit {self.concurrency}); "
                "wait for one to finish.",
                1,
            )
        now = self._clock()
        recent = self._recent.pop(principal, None) or deque()
        while recent and recent[0] <= now - 60.0:
            recent.popleft()
        if self.per_minute > 0 and len(recent) >= self.per_minute:
            self._recent[principal] = recent
            wait = max(1, math.ceil(recent[0] + 60.0 - now))
            return Refusal(
                "rate_limit_exceeded",
                f"This key sent {len(recent)} requests in the last minute (limit "
                f"{self.per_minute} per minute); try again in {wait} s.",
                wait,
            )
        recent.append(now)
        self._recent[principal] = recent
        _trim(self._recent, self._max)
        self._running[principal] = running + 1
        return None

    def release(self, principal: str) -> None:
        left = self._running.get(principal, 0) - 1
        if left > 0:
            self._running[principal] = left
        else:
            self._running.pop(principal, None)

    def running(self, principal: str) -> int:
        return self._running.get(principal, 0)


def _trim(table: OrderedDict[str, Any], limit: int) -> None:
    while len(table) > limit:
        table.popitem(last=False)
