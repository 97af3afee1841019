"""Test mode: a worker that misbehaves on request, so the conformance kit can check deadlines,
cancels and error kinds on the wire (service/conformance.py).

A worker is in test mode when its environment has LIFELINE_TEST_MODE=1 (the kit starts every
worker so). Then a ProviderRequest whose LAST message is a `user` message with string content
starting `lifeline-test:` is a directive, answered by the worker itself:

    lifeline-test: sleep <ms>                       wait ms milliseconds, then answer ok (any
                                                    content); the worker's deadline timer and
                                                    cancels stop it, as they stop a real call
    lifeline-test: fail <status> [retry_after <s>]  answer a ProviderFailure: kind
                                                    classify_status(status), status_code status,
                                                    retry_after_s s when given

A directive this module cannot read is answered as a bad_request; directives never reach the
provider. Outside test mode all of this is ordinary text.

A directive is carried out in the provider's place: the wrapped provider is what the worker
runtime (workers/runtime.py) calls, under the deadline timer and cancel handling every call
gets, so a sleep is stopped by the runtime's own, as the provider's call would be; nothing here
watches a deadline or a cancel. Workers in other languages implement the same two directives
the same way: where they call their model, in place of that call, never in a layer in front of
it with a timer or cancels of its own (the kit cuts a slow worker's ordinary calls short too,
which such a layer would not cover).

`with_test_mode(provider)` wraps any provider: its `complete`, and its `stream` when it has one.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from typing import Any

from schemas import ProviderOk, ProviderRequest, Usage
from schemas.errors import ProviderError, classify_status
from workers.base import Delta, Provider

TEST_MODE_ENV = "LIFELINE_TEST_MODE"
PREFIX = "lifeline-test:"
USAGE = "lifeline-test: sleep <ms> | lifeline-test: fail <status> [retry_after <seconds>]"


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process runs in test mode (LIFELINE_TEST_MODE=1)."""
    return environ.get(TEST_MODE_ENV) == "1"


def directive(request: ProviderRequest) -> list[str] | None:
    """The words after `lifeline-test:` when the request's last message is a directive, else
    None."""
    if not request.messages:
        return None
    last = request.messages[-1]
    if last.role != "user" or not isinstance(last.content, str):
        return None
    if not last.content.startswith(PREFIX):
        return None
    return last.content[len(PREFIX) :].split()


async def obey(words: list[str], request: ProviderRequest, model: str) -> ProviderOk:
    """Carry out one directive: the ProviderOk of a sleep, or the ProviderError of a fail (or
    of a directive that does not read)."""
    match words:
        case ["sleep", ms] if (delay_ms := _number(ms)) is not None:
            await asyncio.sleep(delay_ms / 1000)
            return ProviderOk(f"slept {ms} ms", request.model or model, Usage())
        case ["fail", status, *rest] if (
            status.isascii() and status.isdigit() and 400 <= int(status) <= 599
        ):
            code = int(status)
            match rest:
                case []:
                    retry_after = None
                case ["retry_after", seconds] if (after := _number(seconds)) is not None:
                    retry_after = after
                case _:
                    raise _unreadable(words)
            raise ProviderError(
                classify_status(code),
                f"test mode: failing with {code} as asked",
                code,
                retry_after,
            )
    raise _unreadable(words)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _unreadable(words: list[str]) -> ProviderError:
    said = " ".join(words)[:100]
    return ProviderError("bad_request", f"test mode: no such directive {said!r}; know: {USAGE}")


class TestModeProvider:
    """`inner`, with the directives answered before they reach it."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(self, inner: Provider) -> None:
        self.inner = inner
        self.model = inner.model

    def __getattr__(self, name: str) -> Any:  # secrets, identifying parameters, ...
        if name == "inner":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    async def complete(self, request: ProviderRequest, timeout_s: float) -> ProviderOk:
        words = directive(request)
        if words is not None:
            return await obey(words, request, self.model)
        return await self.inner.complete(request, timeout_s)

    async def aclose(self) -> None:
        await self.inner.aclose()


class StreamingTestModeProvider(TestModeProvider):
    """The same, for a provider with `stream`: a sleep streams its answer as one chunk."""

    async def stream(
        self, request: ProviderRequest, timeout_s: float
    ) -> AsyncIterator[Delta | ProviderOk]:
        words = directive(request)
        if words is None:
            # Closed with this generator, at once: the runtime's aclose reaches the HTTP call.
            inner = self.inner.stream(request, timeout_s)  # type: ignore[attr-defined]
            async with aclosing(inner) as deltas:
                async for item in deltas:
                    yield item
            return
        answer = await obey(words, request, self.model)
        yield answer.content
        yield ProviderOk("", answer.model, answer.usage, finish_reason="stop")


def with_test_mode(provider: Provider) -> Provider:
    """`provider` obeying the test directives; it streams only if `provider` does."""
    if hasattr(provider, "stream"):
        return StreamingTestModeProvider(provider)
    return TestModeProvider(provider)
