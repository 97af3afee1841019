"""The `fake` provider: deterministic behaviour from config, for demos and tests.

It never touches the network. Its failures are shaped like HTTP ones (`fail_status = 429`
is a rate limit, 503 a server error), so fallback can be shown and tested offline. An
answer over `max_response_bytes` fails as response_too_large, as an HTTP kind's would.

It streams too: the answer in `chunks` pieces, `chunk_delay_ms` apart, after `latency_ms`;
`fail_after_chunks = N` fails the stream after N chunks (with fail_status, else 503),
`stall_after_chunks = N` stops sending after N chunks without ending (an idle stream). With
fail_on_request, "fail 503 after 2" as the last user message does the former on demand.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Annotated

import msgspec
from msgspec import Meta

from schemas import ProviderOk, ProviderRequest, Usage
from schemas.wire import FinishReason, ToolCall, ToolCallDelta
from workers.base import ProviderError, ProviderSettings, classify_status, response_too_large


class FakeToolCall(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    arguments: str = "{}"  # JSON, as a provider sends it (malformed on purpose if you like)


class FakeSettings(ProviderSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: str = "fake-1"
    # "echo" repeats the last user message; "request" answers with the ProviderRequest it got,
    # as JSON (shows what a target's shaping sent); anything else is the answer.
    reply: str = "echo"
    latency_ms: Annotated[float, Meta(ge=0, le=365 * 86_400_000.0)] = 0.0  # a year at most
    fail_status: int | None = None  # answer every call with this HTTP-like status
    fail_rate: float = 0.0  # 0..1: share of calls that fail with fail_status (or 503)
    seed: int = 0
    hang: bool = False  # never answer: shows a timeout fallback
    # A last user message "fail <status>" (e.g. "fail 503") fails that call with that HTTP status:
    # real failures on demand, through a real worker, for tests and demos.
    fail_on_request: bool = False
    # Streaming: the answer in this many pieces (fewer when it is shorter), this far apart.
    chunks: Annotated[int, Meta(ge=1)] = 4
    chunk_delay_ms: Annotated[float, Meta(ge=0, le=365 * 86_400_000.0)] = 0.0
    fail_after_chunks: Annotated[int, Meta(ge=0)] | None = None
    stall_after_chunks: Annotated[int, Meta(ge=0)] | None = None
    # Tool calls to answer with (finish_reason "tool_calls"), e.g.
    # [{name = "get_weather", arguments = '{"city": "Paris"}'}]; `reply` is then the text beside
    # them ("" for none). Only when the request offers tools.
    tool_calls: tuple[FakeToolCall, ...] = ()
    finish_reason: FinishReason | None = None  # e.g. "length": an answer cut short

    def __post_init__(self) -> None:
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError(f"fail_rate must be between 0 and 1, got {self.fail_rate}")
        if self.latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, got {self.latency_ms}")
        if self.fail_status is not None and not 400 <= self.fail_status <= 599:
            raise ValueError(
                f"fail_status must be an HTTP error status (400..599), got {self.fail_status}"
            )


class FakeProvider:
    def __init__(self, settings: FakeSettings) -> None:
        self.settings = settings
        self.model = settings.model
        self._random = random.Random(settings.seed)

    async def complete(self, request: ProviderRequest, timeout_s: float) -> ProviderOk:
        s = self.settings
        if s.hang:
            await asyncio.Event().wait()  # until the worker cancels us
        if s.latency_ms:
            await asyncio.sleep(s.latency_ms / 1000)
        answer, _, _ = self._answer_or_failure(request)
        return answer

    async def stream(
        self, request: ProviderRequest, timeout_s: float
    ) -> AsyncIterator[str | ToolCallDelta | ProviderOk]:
        s = self.settings
        if s.hang:
            await asyncio.Event().wait()
        if s.latency_ms:  # the time to the first chunk
            await asyncio.sleep(s.latency_ms / 1000)
        answer, fail_after, status = self._answer_or_failure(request)
        for i, piece in enumerate(_split(answer.content, s.chunks)):
            if i == fail_after:
                raise ProviderError(
                    classify_status(status),
                    f"fake provider configured to fail with {status} after {i} chunks",
                    status,
                )
            if i == s.stall_after_chunks:
                await asyncio.Event().wait()  # until the worker cancels us
            if i and s.chunk_delay_ms:
                await asyncio.sleep(s.chunk_delay_ms / 1000)
            yield piece
        for index, call in enumerate(answer.tool_calls or ()):  # each in two pieces, as APIs do
            half = len(call.arguments) // 2
            yield ToolCallDelta(index, call.id, call.name, call.arguments[:half])
            yield ToolCallDelta(index, arguments=call.arguments[half:])
        yield msgspec.structs.replace(answer, content="")

    def _answer_or_failure(self, request: ProviderRequest) -> tuple[ProviderOk, int | None, int]:
        """The answer, or the configured (or asked-for) failure raised; and, for a stream of
        it, after how many chunks it fails (None: it does not) and with which status."""
        s = self.settings
        if self._fails():
            status = s.fail_status or 503
            raise ProviderError(
                classify_status(status), f"fake provider configured to fail with {status}", status
            )
        fail_after, status = s.fail_after_chunks, s.fail_status or 503
        if s.fail_on_request:
            asked, after = self._asked(request)
            if asked is not None and after is None:
                raise ProviderError(
                    classify_status(asked), f"fake provider asked to fail with {asked}", asked
                )
            if asked is not None:
                fail_after, status = after, asked
        content = self._answer(request)
        # As an HTTP kind would: the limit is the same setting.
        if len(content.encode()) > s.max_response_bytes:
            raise response_too_large(200, s.max_response_bytes)
        usage = Usage(
            input_tokens=sum(len(m.text.split()) for m in request.messages),
            output_tokens=len(content.split()),
        )
        model = request.model or self.model
        calls = None
        finish = s.finish_reason or "stop"
        if s.tool_calls and request.tools:
            calls = [
                ToolCall(f"call_{i + 1}", call.name, call.arguments)
                for i, call in enumerate(s.tool_calls)
            ]
            finish = s.finish_reason or "tool_calls"
        answer = ProviderOk(content, model, usage, tool_calls=calls, finish_reason=finish)
        return answer, fail_after, status

    def _fails(self) -> bool:
        if self.settings.fail_rate:
            return self._random.random() < self.settings.fail_rate
        return self.settings.fail_status is not None

    @staticmethod
    def _asked(request: ProviderRequest) -> tuple[int | None, int | None]:
        """("fail 503" -> (503, None); "fail 503 after 2" -> (503, 2) (a stream fails after
        2 chunks; an answer that does not stream is not failed by it)."""
        users = [m.text for m in request.messages if m.role == "user"]
        words = (users[-1] if users else "").split()
        if len(words) not in (2, 4) or words[0] != "fail" or not words[1].isdigit():
            return None, None
        status = int(words[1])
        if not 400 <= status <= 599:
            return None, None
        if len(words) == 4:
            if words[2] != "after" or not words[3].isdigit():
                return None, None
            return status, int(words[3])
        return status, None

    def _answer(self, request: ProviderRequest) -> str:
        if self.settings.reply == "request":
            return msgspec.json.encode(request).decode()
        if self.settings.reply != "echo":
            return self.settings.reply
        users = [m.text for m in request.messages if m.role == "user"]
        return users[-1] if users else ""

    async def aclose(self) -> None:
        return None


def _split(text: str, count: int) -> list[str]:
    """`text` in `count` pieces of near-equal length (fewer when it is shorter), in order."""
    count = max(1, min(count, len(text)))
    size, extra = divmod(len(text), count)
    out, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        out.append(text[start:end])
        start = end
    return [piece for piece in out if piece]
