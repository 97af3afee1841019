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
