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
