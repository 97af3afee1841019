"""The event loop Lifeline's processes run on: uvloop where it is installed (it is a
dependency on Linux and macOS with CPython), else asyncio's own. `LIFELINE_EVENT_LOOP=asyncio`
chooses asyncio's even where uvloop is there (to compare, or to rule it out).

uvloop is libuv under asyncio's API, kept by the people who maintain asyncio's own
event-loop code (MagicStack, whose Yury Selivanov co-maintains asyncio), with wheels on PyPI
for Linux and macOS; elsewhere Lifeline runs on asyncio's loop unchanged. nats-py, httpx and
the OpenTelemetry SDK run on uvloop as they are. It took a few per cent off the dispatcher's
and the worker's CPU per request (tests/bench/HISTORY.md, the first pass). It helps the relay
about as much as Lifeline, so the bench runs every process on it and the ratio stays like for
like.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import logging
import math
import os
import sys
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")

ENV = "LIFELINE_EVENT_LOOP"

log = logging.getLogger("lifeline.loop")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None for asyncio's default loop; ValueError for a name that
    is neither (a typo ran on uvloop without a word)."""
    chosen = os.environ.get(ENV, "").strip()
    if chosen.lower() not in ("", "asyncio", "uvloop"):
        raise ValueError(f"{ENV}={chosen!r}: expected asyncio, or uvloop (the default)")
    if chosen.lower() == "asyncio":
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


def start_now(
    coro: Coroutine[Any, Any, T],
    *,
    asks_current_task: bool = False,
    loop: asyncio.AbstractEventLoop | None = None,
) -> asyncio.Task[T]:
    """A task for `coro` whose first step runs now, in the caller, up to the coroutine's first
    wait, instead of on the event loop's next turn: Python 3.12's eager tasks
    (`asyncio.Task(..., eager_start=True)`), and on 3.11, which has none, `_Started`.

    A dispatcher or a worker starts a request this way when it holds almost none (light
    traffic): the request's work up to its first wait (a dispatcher's plan and its attempt's
    publish; a worker's call up to the provider's first wait) then runs in the read that
    brought it (see the README's benchmarks for what it bought). Busy, requests keep a task
    each that starts on the loop's next turn, so one read does not run the work of every
    request it brought before any reply goes. Inside another task (nats-py's read loop hands
    on what the fast path leaves to it), the step waits its turn.

    On 3.11 the first step runs before its task exists, so asyncio.current_task() is None in
    it: a coroutine whose first step needs its task waits for its turn there
    (`asks_current_task`). A worker's call does: its deadline timer cancels its task, and
    httpx (through sniffio) and anyio find their event loop by the current task, which a
    provider's first step, or a plug-in's, may ask for. A dispatcher's first step (the plan,
    the spans, the attempt's publish) does not, and the tests, most at 1 in flight, run it.

    `loop`: the running loop, when the caller holds it: asked for, on 3.11, it costs a
    system call (getpid, to notice a fork), as does asyncio.current_task() without one."""
    if loop is None:
        loop = asyncio.get_running_loop()
    if (asks_current_task and not _EAGER) or asyncio.current_task(loop) is not None:
        return loop.create_task(coro)
    if _EAGER:
        return asyncio.Task(coro, loop=loop, eager_start=True)  # type: ignore[call-arg]
    context = contextvars.copy_context()  # the task's: what the first step sets stays in it
    started = _Started(coro)
    context.run(started.first_step)
    return loop.create_task(started, context=context)


_EAGER = sys.version_info >= (3, 12)


class _Started(Coroutine[Any, Any, Any]):
    """A coroutine whose first step already ran (`first_step`), handed to a task: the task's
    own first step gets what that step gave (the future the coroutine waits on, its result or
    its exception), every later step goes to the coroutine. A cancel that comes before the
    task's first step is thrown into the coroutine where it waits, as a task that had started
    it would. Only public asyncio: the task is made after the first step, not before it (an
    earlier version made it first, to be current in the step, and measured no gain: making a
    task costs what skipping the turn saves, so it must come after the work that is urgent)."""

    __slots__ = ("_coro", "_done", "_first", "_outcome")

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._coro = coro
        self._first = True  # the task has not taken its first step yet
        self._done = False  # the coroutine ended in its first step: _outcome is how
        self._outcome: Any = None  # what the first step yielded, or how it ended

    def first_step(self) -> None:
        try:
            self._outcome = self._coro.send(None)
        except StopIteration as stop:
            self._done, self._outcome = True, stop
        except BaseException as exc:  # noqa: BLE001 - the task's first step raises it
            self._done, self._outcome = True, exc

    def send(self, value: Any) -> Any:
        if self._first:
            self._first = False
            outcome, self._outcome = self._outcome, None
            if self._done:
                raise outcome
            return outcome
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if self._first:
            self._first = False
            outcome, self._outcome = self._outcome, None
            if self._done:  # it ended before the cancel came: that end stands
                raise outcome
            if isinstance(outcome, asyncio.Future):  # as a task cancels the future it waits on
                outcome.cancel()
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, Any]:
        raise TypeError("a started coroutine belongs to its task: it cannot be awaited")


Timeout = list[Any]  # what Timeouts.call_later returns, for its cancel
_EARLY = 0.0005  # s: how soon before its time an entry fires (see Timeouts)
# After a stall (see Timeouts): a loop timer this late means the loop stood still; entries wait
# a turn at a time, and at most this long, for what the stall left unread.
STALL_S = 0.25
_CATCH_UP_S = 0.01
_MAX_CATCH_UP_S = 1.0


class Timeouts:
    """The timeouts of many calls on one event-loop timer.

    A dispatcher's attempt and a worker's call each have a timeout that almost never fires:
    the answer comes first and the timeout is cancelled. An event-loop timer per call costs
    about 2 µs to make and cancel on uvloop (a libuv handle made, started, stopped and closed
    a turn later), at 64 in flight 1 to 3 % of a dispatcher's or a worker's CPU (py-spy);
    here a timeout is an entry of a heap, cancelled by a mark, and one loop timer waits for
    the earliest entry. Cancelled entries leave the heap when they reach its top (calls
    mostly end in the order they started), or all at once when they are most of it, so a
    call that hangs does not keep the others' entries alive.

    An entry fires when the loop's clock is within half a millisecond of its time, as a loop
    timer of its own would on uvloop (whose clock counts milliseconds, and which rounds a
    delay to them); waiting for the clock to pass it exactly would add up to a millisecond
    (the clock's step), and a time a float's rounding put a hair after a tick another one.
    One Timeouts serves one event loop: made again when it finds another running (a test's
    next loop).

    After a stall (the process stopped or starved, a loop timer fired more than `STALL_S`
    late), entries wait until the loop keeps time again, at most `_MAX_CATCH_UP_S`: a stalled
    loop runs its due timers before it reads its sockets (uvloop's order), so every call whose
    answer came during the stall and waits unread would time out, and be charged to its
    provider's breaker. Each wait is `_CATCH_UP_S`, through one read of the sockets at least;
    the entries fire once a timer comes on time (the backlog read), or the wait runs out."""

    __slots__ = ("_dead", "_heap", "_loop", "_order", "_stalled_since", "_timer", "_timer_at")

    def __init__(self) -> None:
        self._heap: list[Timeout] = []  # [when, order, callback, arg]; callback None: over
        self._dead = 0  # cancelled entries still in the heap
        self._order = itertools.count()  # equal times fire in the order they were set
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf  # when the loop timer fires; never after the first entry
        self._stalled_since: float | None = None  # the first late fire of a stall, until one
        # comes on time

    def loop(self) -> asyncio.AbstractEventLoop:
        """The running event loop, as asyncio.get_running_loop() gives it, without asking it
        each time: on Python 3.11 that asks the OS for the process id (a system call, to
        notice a fork), which was about 1 % of a dispatcher's CPU and 2 % of a worker's
        (py-spy) from the calls per request that now come here."""
        loop = self._loop
        if loop is None or not loop.is_running():
            loop = asyncio.get_running_loop()
            if loop is not self._loop:  # a new loop: what the old one held will never fire
                self._heap, self._dead, self._timer, self._timer_at = [], 0, None, math.inf
                self._loop = loop
        return loop

    def call_later(
        self,
        delay_s: float,
        callback: Callable[[Any], object],
        arg: Any,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Timeout:
        """`callback(arg)` after `delay_s`, unless `cancel` is given what this returns first.
        `loop`: what `loop()` gave the caller just before (not asked again)."""
        if loop is None:
            loop = self.loop()
        when = loop.time() + delay_s
        entry = [when, next(self._order), callback, arg]
        heapq.heappush(self._heap, entry)
        if when < self._timer_at:
            self._arm(when)
        return entry

    def cancel(self, entry: Timeout) -> None:
        if entry[2] is None:  # fired, or cancelled already
            return
        entry[2] = entry[3] = None  # what it would have called is free to go
        heap = self._heap
        if heap and heap[0] is entry:  # the usual: calls end about in the order they started
            heapq.heappop(heap)
            while heap and heap[0][2] is None:
                heapq.heappop(heap)
                self._dead -= 1
            return
        self._dead += 1
        if self._dead > 64 and self._dead * 2 > len(heap):
            heap[:] = [live for live in heap if live[2] is not None]
            heapq.heapify(heap)
            self._dead = 0

    def pending(self) -> list[Any]:
        """The `arg` of every entry still to fire, in no order (what a shutdown cuts short)."""
        return [entry[3] for entry in self._heap if entry[2] is not None]

    def __len__(self) -> int:
        """Entries in the heap, cancelled ones not yet dropped included (for tests)."""
        return len(self._heap)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        assert self._loop is not None
        self._timer, self._timer_at = self._loop.call_at(when, self._fire), when

    def _fire(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        if now - self._timer_at > STALL_S:
            since = self._stalled_since
            if since is None:
                since = self._stalled_since = now
            if now - since < _MAX_CATCH_UP_S:  # the sockets read first (see the class)
                self._timer = self._loop.call_at(now + _CATCH_UP_S, self._fire)
                self._timer_at = now + _CATCH_UP_S
                return
        else:  # on time: the loop keeps up
            self._stalled_since = None
        self._timer, self._timer_at = None, math.inf
        heap = self._heap
        due = now + _EARLY
        while heap:
            entry = heap[0]
            if entry[2] is not None and entry[0] > due:
                self._arm(entry[0])
                return
            heapq.heappop(heap)
            callback, arg = entry[2], entry[3]
            if callback is None:
                self._dead -= 1
                continue
            entry[2] = entry[3] = None  # fired: a cancel now does nothing
            try:
                callback(arg)
            except Exception:  # one call's bug must not stop the others' timeouts
                log.exception("a timeout's callback failed")
