"""Credentials scrubbed from text by value: a provider's answers and errors, a plug-in model's
(workers/plugin.py, whose import loads no HTTP client, so this lives apart from workers.base)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import overload

import msgspec

from schemas import ProviderOk
from schemas.wire import ToolCall, ToolCallDelta


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every non-empty credential value in `secrets` replaced by "***".

    By value, not by place: a provider may echo a key anywhere (an error message, a nested
    field, a dump of the request headers, an HTML page), raw or JSON-escaped, so every
    occurrence of either form goes. Scrub before cutting a text short, or a key cut in two
    would leave its first half behind.
    """
    return Scrubber(secrets)(text)


class Scrubber:
    """`scrub` for one set of secrets, their written forms worked out once: a worker passes
    every text of every answer through one (`answer`, `delta`), not only its errors, since a
    provider (or a proxy in front of it) may echo a key in a model name, a tool call's id or
    the text itself. False when there is nothing to hide, so a caller skips it for free."""

    __slots__ = ("_forms",)

    def __init__(self, secrets: Iterable[str]) -> None:
        if isinstance(secrets, str):  # one key passed bare is one secret, not one per character
            secrets = (secrets,)
        forms = {form for secret in secrets if secret for form in _written_forms(secret)}
        # Longest first: one form may contain another.
        self._forms = tuple(sorted(forms, key=len, reverse=True))

    def __bool__(self) -> bool:
        return bool(self._forms)

    def __call__(self, text: str) -> str:
        for form in self._forms:
            if form in text:
                text = text.replace(form, "***")
        return text

    def answer(self, reply: ProviderOk) -> ProviderOk:
        """`reply` with its text, model and tool calls scrubbed (itself when none held a key)."""
        content, model = self(reply.content), self(reply.model)
        calls = reply.tool_calls
        if calls:
            calls = [self.delta(call) for call in calls]
        if content is reply.content and model is reply.model and calls == reply.tool_calls:
            return reply
        return msgspec.structs.replace(reply, content=content, model=model, tool_calls=calls)

    @overload
    def delta(self, item: str) -> str: ...
    @overload
    def delta(self, item: ToolCall) -> ToolCall: ...
    @overload
    def delta(self, item: ToolCallDelta) -> ToolCallDelta: ...
    def delta(self, item: str | ToolCall | ToolCallDelta) -> str | ToolCall | ToolCallDelta:
        """A streamed piece (or a whole tool call) scrubbed. A key split across two pieces of
        a stream is not found: each piece is sent as it comes."""
        if isinstance(item, str):
            return self(item)
        call_id = self(item.id) if item.id else item.id
        name = self(item.name) if item.name else item.name
        arguments = self(item.arguments)
        if call_id is item.id and name is item.name and arguments is item.arguments:
            return item
        return msgspec.structs.replace(item, id=call_id, name=name, arguments=arguments)


def _written_forms(secret: str) -> tuple[str, ...]:
    """How a secret can appear in a body: as is, and JSON-escaped (with and without \\u
    escapes, and with "/" escaped as many serializers write it: PHP's, some of Java's)."""
    ascii_json, utf8_json = json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]
    return (
        secret,
        ascii_json,
        utf8_json,
        ascii_json.replace("/", "\\/"),
        utf8_json.replace("/", "\\/"),
    )
