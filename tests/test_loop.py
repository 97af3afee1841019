"""The event loop choice: uvloop where installed, asyncio's own when asked for."""

from __future__ import annotations

import asyncio

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
