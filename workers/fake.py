"""The `fake` provider: deterministic behaviour from config, for demos and tests.

It never touches the network. Its failures are shaped like HTTP ones (`fail_status = 429`
is a rate limit, 503 a server error), so fallback can be shown and tested offline. An
answer over `max_response_bytes` fails as response_too_large, as an HTTP kind's would.
"""

from __future__ import annotations

import asyncio
import random

import msgspec

from schemas import ProviderOk, ProviderRequest, Usage
from workers.base import ProviderError, ProviderSettings, classify_status, response_too_large


class FakeSettings(ProviderSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: str = "fake-1"
    # "echo" repeats the last user message; "request" answers with the ProviderRequest it got,
    # as JSON (shows what a target's shaping sent); anything else is the answer.
    reply: str = "echo"
    latency_ms: float = 0.0
    fail_status: int | None = None  # answer every call with this HTTP-like status
    fail_rate: float = 0.0  # 0..1: share of calls that fail with fail_status (or 503)
    seed: int = 0
    hang: bool = False  # never answer: shows a timeout fallback
    # A last user message "fail <status>" (e.g. "fail 503") fails that call with that HTTP status:
    # real failures on demand, through a real worker, for tests and demos.
    fail_on_request: bool = False

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
        if self._fails():
            status = s.fail_status or 503
            raise ProviderError(
                classify_status(status), f"fake provider configured to fail with {status}", status
            )
        asked = self._asked_status(request) if s.fail_on_request else None
        if asked is not None:
            raise ProviderError(
                classify_status(asked), f"fake provider asked to fail with {asked}", asked
            )
        content = self._answer(request)
        # As an HTTP kind would: the limit is the same setting.
        if len(content.encode()) > s.max_response_bytes:
            raise response_too_large(200, s.max_response_bytes)
        usage = Usage(
            input_tokens=sum(len(m.content.split()) for m in request.messages),
            output_tokens=len(content.split()),
        )
        return ProviderOk(content=content, model=request.model or self.model, usage=usage)

    def _fails(self) -> bool:
        if self.settings.fail_rate:
            return self._random.random() < self.settings.fail_rate
        return self.settings.fail_status is not None

    @staticmethod
    def _asked_status(request: ProviderRequest) -> int | None:
        users = [m.content for m in request.messages if m.role == "user"]
        verb, _, status = (users[-1] if users else "").partition(" ")
        if verb == "fail" and status.isdigit() and 400 <= int(status) <= 599:
            return int(status)
        return None

    def _answer(self, request: ProviderRequest) -> str:
        if self.settings.reply == "request":
            return msgspec.json.encode(request).decode()
        if self.settings.reply != "echo":
            return self.settings.reply
        users = [m.content for m in request.messages if m.role == "user"]
        return users[-1] if users else ""

    async def aclose(self) -> None:
        return None
