"""The event loop choice: uvloop where installed, asyncio's own when asked for."""

from __future__ import annotations

import asyncio
import contextvars
import sys

import pytest
import uvloop

from service import loop


def test_uvloop_is_the_default_where_it_is_installed(monkeypatch):
    monkeypatch.delenv(loop.ENV, raising=False)
    assert loop.loop_factory() is uvloop.new_event_loop and loop.loop_name() == "uvloop"

    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert loop.run(which()).startswith("uvloop")


def test_asyncio_s_own_loop_when_the_environment_asks_for_it(monkeypatch):
    monkeypatch.setenv(loop.ENV, "asyncio")
    assert loop.loop_factory() is None and loop.loop_name() == "asyncio"

    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert loop.run(which()).startswith("asyncio")


async def test_a_loop_that_swallows_a_cancel_is_still_stopped():
    """What Python 3.11's wait_for does inside nats-py: a cancel turns into an ordinary
    error, the loop logs it and goes round again. One cancel() would leave it running."""
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed == 0:
                    swallowed += 1
                    asyncio.current_task().uncancel()  # swallowed, like the bug
                    continue
                raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0.02)
    await asyncio.wait_for(loop.cancel_and_wait(task), 5)
    assert task.cancelled() and swallowed == 1


# start_now: a task whose first step runs in the caller (Python 3.12's eager tasks; on 3.11
# the step runs before its task exists). Dispatchers and workers call it from the socket's read
# callback, where no task is current, so each scenario runs in a loop callback, on uvloop and
# on asyncio's own loop.
LOOPS = [pytest.param(uvloop.new_event_loop, id="uvloop"), pytest.param(None, id="asyncio")]
EAGER = sys.version_info >= (3, 12)
seen: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="unset")


def in_a_callback(factory, scenario):
    """Run `scenario(event_loop)` as a loop callback (as a protocol's data_received runs), then
    wait for what it returns (an awaitable) to finish."""

    async def main():
        ev = asyncio.get_running_loop()
        started = ev.create_future()
        ev.call_soon(lambda: started.set_result(scenario(ev)))
        return await (await started)

    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


@pytest.mark.parametrize("factory", LOOPS)
def test_a_request_started_now_runs_to_its_first_wait_before_the_read_returns(factory):
    steps = []

    async def request(gate: asyncio.Future[str]) -> str:
        steps.append(("first", asyncio.current_task()))
        seen.set("in the request")
        answer = await gate
        steps.append(("after the wait", asyncio.current_task(), seen.get()))
        return answer

    def scenario(ev):
        gate = ev.create_future()
        task = loop.start_now(request(gate))
        # It ran already: as its task on 3.12, before its task existed on 3.11.
        assert steps == [("first", task if EAGER else None)]
        assert seen.get() == "unset"  # in the task's own context, not the caller's
        ev.call_later(0.01, gate.set_result, "answered")

        async def rest():
            assert await task == "answered"
            assert steps[1] == ("after the wait", task, "in the request")

        return rest()

    in_a_callback(factory, scenario)


@pytest.mark.parametrize("factory", LOOPS)
def test_a_request_whose_first_step_needs_its_task_gets_it(factory):
    """A worker's call sets a deadline timer that cancels its task: on 3.11, where the first
    step would run before the task exists, it waits for its turn instead."""
    current = []

    async def call() -> None:
        current.append(asyncio.current_task())

    def scenario(ev):
        task = loop.start_now(call(), asks_current_task=True)
        assert current == ([task] if EAGER else [])

        async def rest():
            await task
            assert current == [task]

        return rest()

    in_a_callback(factory, scenario)


@pytest.mark.parametrize("factory", LOOPS)
def test_a_request_that_ends_in_its_first_step_gives_its_task_that_end(factory):
    async def answers() -> str:
        return "at once"

    async def fails() -> str:
        raise ValueError("bad request")

    def scenario(ev):
        done, failed = loop.start_now(answers()), loop.start_now(fails())
        done.cancel()  # too late: the request has ended, and that end stands

        async def rest():
            await asyncio.wait([done, failed])
            assert done.result() == "at once"
            assert isinstance(failed.exception(), ValueError)

        return rest()

    in_a_callback(factory, scenario)


@pytest.mark.parametrize("factory", LOOPS)
def test_a_cancel_that_comes_in_the_same_read_reaches_the_request_where_it_waits(factory):
    """An abort can come in the same read as its request: the request's own handler (which
    answers `aborted` and cancels its attempts) must see the cancel."""
    handled = []

    async def call(reply: asyncio.Future[None]) -> None:
        try:
            await reply
        except asyncio.CancelledError:
            handled.append(asyncio.current_task())
            raise

    def scenario(ev):
        reply = ev.create_future()
        task = loop.start_now(call(reply))
        task.cancel()

        async def rest():
            await asyncio.wait([task])
            assert task.cancelled() and handled == [task]
            assert reply.cancelled()  # as a task cancels the future it waits on

        return rest()

    in_a_callback(factory, scenario)


async def test_inside_another_task_a_request_waits_for_the_loop_s_next_turn():
    ran = []

    async def request() -> None:
        ran.append(True)

    task = loop.start_now(request())  # this test is a task, as nats-py's read loop is
    assert ran == []
    await task
    assert ran == [True]


# ---- Timeouts: many calls' timeouts on one loop timer ----------------------------------------


@pytest.mark.parametrize("factory", LOOPS)
def test_timeouts_fire_in_time_order_and_a_cancelled_one_never_does(factory):
    async def scenario() -> list[str]:
        timeouts, fired, done = loop.Timeouts(), [], asyncio.Event()
        running = asyncio.get_running_loop()

        def note(name: str) -> None:
            fired.append(name)
            if name == "last":
                done.set()

        started = running.time()
        timeouts.call_later(0.05, note, "last")
        timeouts.call_later(0.02, note, "second")
        cancelled = timeouts.call_later(0.01, note, "cancelled")
        timeouts.call_later(0.01, note, "first")  # sooner than the timer set for "last"
        timeouts.cancel(cancelled)
        timeouts.cancel(cancelled)  # twice: nothing more
        await asyncio.wait_for(done.wait(), 10)
        assert running.time() - started >= 0.05 - 0.001  # uvloop's clock counts whole ms
        return fired

    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(scenario()) == ["first", "second", "last"]


@pytest.mark.parametrize("factory", LOOPS)
def test_one_hung_call_does_not_keep_the_cancelled_timeouts_behind_it(factory):
    """Calls mostly end in the order they started; one that hangs sits at the heap's top and
    keeps every later entry from leaving by the top. They go all at once when most are dead."""

    async def scenario() -> None:
        timeouts = loop.Timeouts()
        hung = timeouts.call_later(30, print, "never")
        for _ in range(10):
            for entry in [timeouts.call_later(30, print, "never") for _ in range(100)]:
                timeouts.cancel(entry)
            assert len(timeouts) <= 1 + 2 * 65
        timeouts.cancel(hung)
        assert len(timeouts) == 0
        ended = [timeouts.call_later(30, print, "never") for _ in range(100)]
        for entry in ended:  # ended in the order they started: each leaves at once
            timeouts.cancel(entry)
            assert len(timeouts) == 100 - ended.index(entry) - 1

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(scenario())


def test_a_timeout_whose_callback_fails_does_not_stop_the_others(caplog):
    async def scenario() -> list[str]:
        timeouts, fired, done = loop.Timeouts(), [], asyncio.Event()

        def broken(_: object) -> None:
            raise RuntimeError("a bug")

        timeouts.call_later(0, broken, None)
        timeouts.call_later(0, fired.append, "after it")
        timeouts.call_later(0.001, lambda _: done.set(), None)
        await asyncio.wait_for(done.wait(), 10)
        return fired

    assert loop.run(scenario()) == ["after it"]
    assert "a timeout's callback failed" in caplog.text


def test_timeouts_follow_the_loop_that_runs_them():
    """One Timeouts made once (a worker's, a dispatcher's inbox) and used on a later loop (a
    test's next asyncio.run): the later loop's timeouts fire; the first loop's are gone."""
    timeouts = loop.Timeouts()

    async def one(delay_s: float) -> str:
        got: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        timeouts.call_later(delay_s, got.set_result, "fired")
        return await asyncio.wait_for(got, 10)

    assert loop.run(one(0)) == "fired"

    async def leave_one() -> None:
        timeouts.call_later(60, print, "never")

    loop.run(leave_one())
    assert loop.run(one(0.001)) == "fired"
    assert len(timeouts) == 0


def test_a_timeout_left_on_an_earlier_loop_is_cancelled_without_a_word():
    """Its entry went with that loop's heap: cancelling it on the next loop (its heap empty,
    or holding only the next loop's entries) changes nothing there."""
    timeouts = loop.Timeouts()

    async def leave_one() -> loop.Timeout:
        return timeouts.call_later(60, print, "never")

    left = loop.run(leave_one())

    async def cancel_it() -> int:
        timeouts.loop()  # the next loop: the heap is its own
        timeouts.cancel(left)
        kept = timeouts.call_later(60, print, "never")
        timeouts.cancel(left)
        assert len(timeouts) == 1
        timeouts.cancel(kept)
        return len(timeouts)

    assert loop.run(cancel_it()) == 0


def test_a_timeout_fires_in_the_clock_tick_its_time_falls_in():
    """uvloop's clock counts milliseconds and rounds a timer's delay to them: an entry due
    less than half a millisecond after the clock's reading fires now, as its own loop timer
    would. Waiting for the clock to pass it (a time that float rounding put a hair after a
    tick, say) would fire it a tick later: the bench's hung-provider case saw its successors
    start 0.4 ms later at p50 until this was so."""

    async def scenario() -> list[str]:
        ev = asyncio.get_running_loop()
        timeouts, fired, base = loop.Timeouts(), [], ev.time()
        ev.time = lambda: base  # type: ignore[method-assign]  # a clock that stands still
        timeouts.call_later(0.1 + 1e-12, fired.append, "a hair after the tick")
        timeouts.call_later(0.1004, fired.append, "within half a millisecond")
        timeouts.call_later(0.1006, fired.append, "the next tick's")
        ev.time = lambda: base + 0.1  # type: ignore[method-assign]
        timeouts._fire()  # as the loop timer armed for the first entry would
        return fired

    assert asyncio.run(scenario()) == ["a hair after the tick", "within half a millisecond"]


@pytest.mark.parametrize("factory", LOOPS)
def test_after_a_stall_what_came_meanwhile_is_read_before_timeouts_fire(factory):
    """A dispatcher stopped (SIGSTOP) or starved past its attempts' timeouts: their answers
    came meanwhile and wait in its socket. uvloop runs due timers before it reads sockets, so
    every one of those attempts timed out, and the timeouts opened a healthy provider's
    breaker, shared with every other dispatcher: the loop reads the socket (uvloop in the same
    turn, asyncio's loop one turn earlier) but parses what it read in a task, a turn later,
    after the due timers. The entries now wait for the loop to catch up."""
    import socket
    import time

    async def scenario() -> list[str]:
        ev = asyncio.get_running_loop()
        timeouts, order, done = loop.Timeouts(), [], asyncio.Event()
        reader, writer = socket.socketpair()
        reader.setblocking(False)

        def on_read() -> None:  # as nats-py's reader: bytes to a buffer, parsed by a task
            reader.recv(64)
            ev.call_soon(order.append, "answer read")

        def timed_out(name: str) -> None:
            order.append(name)
            done.set()

        def stall() -> None:  # the answer arrives, and the loop stands still
            writer.send(b"answer")
            time.sleep(0.4)

        try:
            ev.add_reader(reader.fileno(), on_read)
            timeouts.call_later(0.05, timed_out, "timeout")
            ev.call_later(0.01, stall)
            await asyncio.wait_for(done.wait(), 10)
            ev.remove_reader(reader.fileno())
        finally:
            reader.close()
            writer.close()
        return order

    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(scenario()) == ["answer read", "timeout"]


def test_a_loop_that_stays_behind_gets_its_timeouts_after_at_most_a_second():
    """Catching up has a bound: timers that keep coming late fire all the same."""

    async def scenario() -> list[float]:
        ev = asyncio.get_running_loop()
        timeouts, fired, base = loop.Timeouts(), [], ev.time()
        now = [base]
        ev.time = lambda: now[0]  # type: ignore[method-assign]
        timeouts.call_later(0.1, lambda _: fired.append(now[0] - base), None)
        for step in range(12):  # every fire 0.3 s late: the loop never catches up
            now[0] = timeouts._timer_at + 0.3
            timeouts._fire()
            if fired:
                break
        return fired

    [fired_at] = asyncio.run(scenario())
    seen_at = 0.1 + 0.3  # the first late fire: the stall seen
    assert 1.0 <= fired_at - seen_at <= 1.0 + 0.31  # the first fire a second after it
