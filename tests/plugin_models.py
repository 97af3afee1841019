"""Model classes the plug-in tests name by import path (tests.plugin_models:...)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

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


NOT_A_CLASS = 42


class NoCall:
    pass
