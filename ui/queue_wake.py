"""Gradio's queue, asleep while nothing happens (issue 16).

Gradio's queue runs two loops on the event loop: `start_processing` looks for a new event every
`sleep_when_free` (1 ms; this UI had it at 5 ms) and `start_progress_updates` looks for progress
to send every `progress_update_sleep_when_free` (10 ms), with or without anything to do: ~300
wake-ups a second, most of the idle appliance's CPU (~20 ms/s on the development machine).

Here both loops wait on an asyncio event instead, set when something they look for may have come:
an event pushed to the queue, or an event's processing ended (a slot free for the next). A wait is
bounded by IDLE_WAIT_S, so a missed wake-up costs at most that, never a stuck queue. While events
run, the progress loop keeps Gradio's 10 ms (progress bars of running events).

How: the two loops sleep with `asyncio.sleep(<their attribute>)` through the `asyncio` name of
`gradio.queueing`; that name is given a stand-in that passes everything to asyncio except a sleep
of exactly the two marker delays set here. `Queue.push` and `Queue.process_events` are wrapped on
the one queue instance to set the event. A Gradio upgrade that renames any of these makes
`install` return False (the UI then keeps Gradio's polling) and tests/unit/test_ui_queue.py fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

IDLE_WAIT_S = 1.0  # the longest a loop sleeps without a wake-up
_PROCESS_MARK = 0.987654321  # sleep_when_free while installed (a delay nothing else uses)
_PROGRESS_MARK = 0.987654322  # progress_update_sleep_when_free while installed
PROGRESS_BUSY_S = 0.01  # Gradio's own progress cadence while events run

_queues: weakref.WeakSet[Any] = weakref.WeakSet()
_wakes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Event] = (
    weakref.WeakKeyDictionary()
)


def _wake_event() -> asyncio.Event:
    loop = asyncio.get_running_loop()
    event = _wakes.get(loop)
    if event is None:
        event = _wakes[loop] = asyncio.Event()
    return event


def wake() -> None:
    """Wake the queue loops of the running event loop (call from that loop)."""
    _wake_event().set()


def _busy() -> bool:
    return any(job is not None for q in list(_queues) for job in q.active_jobs)


class _SleepyAsyncio:
    """`asyncio` for gradio.queueing: the two idle sleeps wait for a wake-up instead."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    @staticmethod
    async def sleep(delay: float, result: Any = None) -> Any:
        if delay == _PROGRESS_MARK and _busy():
            return await asyncio.sleep(PROGRESS_BUSY_S, result)
        if delay not in (_PROCESS_MARK, _PROGRESS_MARK):
            return await asyncio.sleep(delay, result)
        event = _wake_event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), IDLE_WAIT_S)
        event.clear()
        return result


def _waking(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, **kwargs)
        finally:
            wake()

    return wrapper


def install(queue: Any) -> bool:
    """Make `queue` (a Blocks' `_queue`) sleep while idle; False where Gradio's internals are not
    the ones this knows (the queue then polls as Gradio does)."""
    from gradio import queueing

    needed = ("sleep_when_free", "progress_update_sleep_when_free", "push", "process_events")
    if not all(hasattr(queue, name) for name in needed) or not hasattr(queueing, "asyncio"):
        return False
    if not isinstance(queueing.asyncio, _SleepyAsyncio):
        queueing.asyncio = _SleepyAsyncio()
    if queue not in _queues:
        queue.push = _waking(queue.push)
        queue.process_events = _waking(queue.process_events)
        _queues.add(queue)
    queue.sleep_when_free = _PROCESS_MARK
    queue.progress_update_sleep_when_free = _PROGRESS_MARK
    return True


def installed(queue: Any) -> bool:
    return queue in _queues and queue.sleep_when_free == _PROCESS_MARK
