"""Model classes the plug-in tests name by import path (tests.plugin_models:...)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator

import msgspec

from workers.plugin import Answer, Model, ModelError, ProviderRequest, ToolCall, Usage

CALLED_IN: list[str] = []  # the thread each synchronous call ran in


class SyncUpper(Model):
    def call(self, request: ProviderRequest) -> str:
        CALLED_IN.append(threading.current_thread().name)
        return request.messages[-1].text.upper()


class AsyncStreaming(Model):
    """Async call and async stream; the stream ends with an Answer carrying usage."""

    async def call(self, request: ProviderRequest) -> Answer:
        return Answer(text="one two three", usage=Usage(3, 3))

    async def stream(self, request: ProviderRequest) -> AsyncIterator[str | Answer]:
        for word in ("one", " two", " three"):
            await asyncio.sleep(0)
            yield word
        yield Answer(usage=Usage(3, 3), finish_reason="stop")


class Failing(Model):
    """`rate_limit` when asked to, any other exception otherwise."""

    def call(self, request: ProviderRequest) -> str:
        if request.messages[-1].text == "rate limit":
            raise ModelError("rate_limit", "too many requests", retry_after_s=2)
        raise ZeroDivisionError("the model's own bug")


class ToolCaller(Model):
    def call(self, request: ProviderRequest) -> Answer:
        assert request.tools is not None
        return Answer(tool_calls=[ToolCall("call-1", request.tools[0].name, '{"city": "Paris"}')])


class WithSettings(Model):
    class Settings(msgspec.Struct, forbid_unknown_fields=True):
        temperature: float
        greeting: str = "hi"

    def call(self, request: ProviderRequest) -> str:
        return f"{self.settings.greeting} at {self.settings.temperature}"


# ---- models that misbehave: each still gets its one reply, at once ---------------------------


class StopsIterating(Model):
    """A sync call whose StopIteration (a next() on an empty generator) asyncio cannot carry."""

    def call(self, request: ProviderRequest) -> str:
        return next(m.text for m in request.messages if m.role == "system")


class SurrogateText(Model):
    """Text decoded with surrogateescape from a tokenizer's bytes: no JSON can carry it."""

    def call(self, request: ProviderRequest) -> Answer:
        return Answer(text=b"caf\xe9".decode("utf-8", "surrogateescape"))


class UnknownUsage(Model):
    """Token counts of a type msgspec does not know (numpy's, say)."""

    def call(self, request: ProviderRequest) -> Answer:
        return Answer(text="hi", usage=Usage(input_tokens=object()))  # type: ignore[arg-type]


class OwnCancelledError(Model):
    """An async call whose own inner task is cancelled and awaited (a library's time limit):
    the CancelledError is the model's failure, not a cancel of the call."""

    async def call(self, request: ProviderRequest) -> str:
        inner = asyncio.ensure_future(asyncio.sleep(10))
        await asyncio.sleep(0)
        inner.cancel()
        await inner
        return "unreachable"


class UsageAsDict(Model):
    def call(self, request: ProviderRequest) -> Answer:
        return Answer(text="hi", usage={"input_tokens": 3, "output_tokens": 1})  # type: ignore[arg-type]


class BlockingStream(Model):
    """A sync `stream` that is a plain function doing blocking work (an HTTP call, say)
    before it returns its iterator."""

    def call(self, request: ProviderRequest) -> str:
        return "x"

    def stream(self, request: ProviderRequest) -> Iterator[str]:
        time.sleep(3)
        return iter(["a", "b"])


STREAMED: list[int] = []  # the pieces EndlessStream yielded, per stream


class EndlessStream(Model):
    """A stream that never ends (a model generating without a stop): the runtime stops it."""

    def call(self, request: ProviderRequest) -> str:
        return "x"

    async def stream(self, request: ProviderRequest) -> AsyncIterator[str]:
        STREAMED.append(0)
        while True:
            STREAMED[-1] += 1
            await asyncio.sleep(0)
            yield "y" * 1000


HANG = threading.Event()  # set to let HangsInItsThread's calls end


class HangsInItsThread(Model):
    """A sync call that hangs (a stuck library call): its threads stay busy."""

    def call(self, request: ProviderRequest) -> str:
        HANG.wait(30)
        return "late"


NOT_A_CLASS = 42


class NoCall:
    pass


class InitRaises(Model):
    """A class whose making fails (a model file missing, say)."""

    def __init__(self) -> None:
        raise RuntimeError("weights not found")

    def call(self, request: ProviderRequest) -> str:
        return "never"


class OddSettings(Model):
    """`Settings` that is no type msgspec can fill."""

    Settings = 5

    def call(self, request: ProviderRequest) -> str:
        return "never"
