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

import msgspec

from schemas import ProviderOk, ProviderRequest, Usage
from schemas.wire import ToolCall, ToolCallDelta
from workers.base import ProviderError, classify_status, in_table, response_too_large

# The kind's keys live with the others' (no provider code loaded to check a config); imported
# from here as before.
from workers.settings import (
    FakeSettings,
    FakeToolCall,  # noqa: F401 - re-exported, see above
)


class FakeProvider:
    def __init__(self, settings: FakeSettings, name: str = "") -> None:
        self.settings = settings
        self.name = name  # its [providers.<name>] table, as the config names it
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
            raise in_table(response_too_large(200, s.max_response_bytes), self.name)
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
