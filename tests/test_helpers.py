"""The shared helpers' own promises: wait_for waits on state and fails when it never comes."""

from __future__ import annotations

import asyncio

import pytest
from helpers import wait_for


async def test_wait_for_returns_the_conditions_value_once_it_holds():
    box: list[str] = []
    asyncio.get_running_loop().call_later(0.05, box.append, "ready")
    assert await wait_for(lambda: box, timeout_s=2) == ["ready"]


async def test_wait_for_awaits_a_condition_that_is_a_coroutine_function():
    calls = []

    async def third_time() -> bool:
        calls.append(1)
        return len(calls) >= 3

    assert await wait_for(third_time, timeout_s=2, interval_s=0) is True
    assert len(calls) == 3


async def test_wait_for_fails_the_test_saying_what_never_came():
    with pytest.raises(AssertionError, match=r"within 0\.05 s: the answer \(still 0\)"):
        await wait_for(lambda: False, timeout_s=0.05, what=lambda: "the answer (still 0)")
    never: list[int] = []
    with pytest.raises(AssertionError, match=r"lambda: len\(never\) == 2"):
        await wait_for(lambda: len(never) == 2, timeout_s=0.01)
