"""The event loop Lifeline's processes run on: uvloop where it is installed (it is a
dependency on Linux and macOS with CPython), else asyncio's own. `LIFELINE_EVENT_LOOP=asyncio`
chooses asyncio's even where uvloop is there (to compare, or to rule it out).

uvloop is libuv under asyncio's API, kept by the people who maintain asyncio's own
event-loop code; nats-py, httpx and the OpenTelemetry SDK run on it unchanged. It took about
a tenth off the dispatcher's and the worker's CPU per request (see the README's benchmarks).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

ENV = "LIFELINE_EVENT_LOOP"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None for asyncio's default loop."""
    if os.environ.get(ENV, "").strip().lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def loop_name() -> str:
    return "asyncio" if loop_factory() is None else "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main), on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait until it has ended.

    One `cancel()` is not always enough for a loop that catches exceptions and carries on:
    Python 3.11's `asyncio.wait_for` (nats-py awaits through it) swallows a cancel that
    arrives as the future it waits on completes, and the loop then sleeps and goes round
    again, so a shutdown waiting for it waits forever (a dispatcher whose connection was
    closed for good hung exactly so). So the cancel is repeated until the task has ended.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.cancelled():
        task.exception()  # retrieved, as gather(return_exceptions=True) did: no warning at exit


def start_now(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """A task for `coro` whose first step runs now, in the caller, up to the coroutine's first
    wait, instead of on the event loop's next turn: Python 3.12's eager tasks
    (`asyncio.Task(..., eager_start=True)`); on 3.11, which has none, create_task's task.

    A dispatcher or a worker starts a request this way when it holds almost none (light
    traffic): the request's work up to its first wait (a dispatcher's plan and its attempt's
    publish; a worker's call up to the provider's first wait) then runs in the read that
    brought it. On Python 3.12 that took 0.037 ms off a request at 1 in flight (see the
    README's benchmarks). Busy, requests keep a task each that starts on the loop's next turn,
    so one read does not run the work of every request it brought before any reply goes.
    Inside another task (nats-py's read loop hands on what the fast path leaves to it), the
    step waits its turn."""
    loop = asyncio.get_running_loop()
    if not _EAGER or asyncio.current_task(loop) is not None:
        return loop.create_task(coro)
    return asyncio.Task(coro, loop=loop, eager_start=True)  # type: ignore[call-arg]


# An emulation for 3.11 (the first step run as the task through asyncio's private
# _enter_task, the task's own first step handed what it yielded) measured no gain in bench-ab:
# what it saves, its own Python calls and the task's scheduled first step cost again.
_EAGER = sys.version_info >= (3, 12)
