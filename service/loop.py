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
