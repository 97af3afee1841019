"""The `anthropic` provider: the Anthropic Messages API.

    POST {base_url}/v1/messages     x-api-key: <key>, anthropic-version: <version>
    {"model", "max_tokens", "system"?,
     "messages": [{"role": "user"|"assistant", "content"}], "temperature"?}
    200 -> {"id", "type": "message", "role": "assistant", "model",
            "content": [{"type": "text", "text"}, ...], "stop_reason",
            "usage": {"input_tokens", "output_tokens"}}
    4xx/5xx -> {"type": "error", "error": {"type", "message"}}   (529 overloaded_error)

    streamed: the same body with "stream": true
    200 -> text/event-stream, each event's data an object whose "type" is its name:
           message_start {"message": {"model", "usage": {"input_tokens", ...}}}
           content_block_start, then content_block_delta {"delta": {"type": "text_delta",
           "text"}} ..., content_block_stop, for each block
           message_delta {"delta": {"stop_reason"}, "usage": {"output_tokens"}} (cumulative)
           message_stop (the end); ping at any time; error {"error": {"type", "message"}}

System prompts are a top-level field, not a message role, and max_tokens is required.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import httpx
import msgspec
from httpx_sse import ServerSentEvent

from schemas import ProviderOk, ProviderRequest, Usage
from workers.base import (
    HttpProvider,
    ProviderError,
    ProviderSettings,
    TokenCount,
    classify_status,
    decode_body,
    decode_event,
    error_body,
    error_message,
    error_text,
    require_api_key,
    retry_after_s,
    stream_error_text,
    unexpected_body,
)

# How the API words a prompt that does not fit the model's context window (invalid_request_error).
_TOO_LONG = ("prompt is too long", "exceed context limit")
# Each error type with the HTTP status it comes with (https://docs.anthropic.com/en/api/errors):
# an error event in a stream has its type, and no status of its own.
_TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


class AnthropicSettings(ProviderSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: str
    api_key_env: str = "ANTHROPIC_API_KEY"
    base_url: str = "https://api.anthropic.com"
    anthropic_version: str = "2023-06-01"
    default_max_tokens: int = 1024  # the API requires max_tokens; used when a request sets none

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError('model must be set, e.g. model = "claude-sonnet-4-20250514"')
        if not self.api_key_env:
            raise ValueError("api_key_env must name the environment variable holding the API key")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")


def messages_body(request: ProviderRequest, model: str, default_max_tokens: int) -> dict[str, Any]:
    system = "\n\n".join(m.content for m in request.messages if m.role == "system")
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": request.max_tokens if request.max_tokens is not None else default_max_tokens,
        "messages": [
            {"role": m.role, "content": m.content} for m in request.messages if m.role != "system"
        ],
    }
    if system:
        body["system"] = system
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p
    # response_format has no Messages API equivalent: the dispatcher checks the answer instead.
    return body


# The parts of a message object Lifeline reads, typed: msgspec skips the rest, and a body
# that differs fails with the path and the type it found, never a value (see decode_body).
class _Block(msgspec.Struct):
    type: str | None = None  # "text", "thinking", "tool_use", ...: only text blocks are the answer
    text: str | None = None


class _Usage(msgspec.Struct):
    input_tokens: TokenCount | None = None
    output_tokens: TokenCount | None = None


class _Message(msgspec.Struct):
    content: list[_Block]
    model: str | None = None
    stop_reason: str | None = None
    usage: _Usage | None = None


_message_decoder = msgspec.json.Decoder(_Message)


# The parts of a stream's events Lifeline reads, typed as the whole message's are: one shape
# for every event type (no tagged union, whose Literal tags would quote an unexpected value).
class _EventDelta(msgspec.Struct):
    type: str | None = None  # in content_block_delta: "text_delta", "input_json_delta", ...
    text: str | None = None
    stop_reason: str | None = None  # in message_delta


class _StartedMessage(msgspec.Struct):
    model: str | None = None
    usage: _Usage | None = None


class _Event(msgspec.Struct):
    type: str
    message: _StartedMessage | None = None  # message_start
    content_block: _Block | None = None  # content_block_start
    delta: _EventDelta | None = None  # content_block_delta, message_delta
    usage: _Usage | None = None  # message_delta
    error: Any = None  # error: {"type", "message"}


_event_decoder = msgspec.json.Decoder(_Event)


def parse_message(response: httpx.Response, model: str) -> ProviderOk:
    """A 200 message object as ProviderOk; `model` stands in when the body names none."""
    data = decode_body(response, _message_decoder)
    texts = [block.text for block in data.content if block.type == "text"]
    if None in texts:
        raise unexpected_body(response, "a content block of type text has no text")
    # stop_reason "refusal": the safety classifiers stopped the answer; it is not one to pass on.
    if data.stop_reason == "refusal":
        raise ProviderError(
            "content_filter",
            "provider refused to answer (stop_reason refusal)",
            response.status_code,
        )
    usage = data.usage or _Usage()
    tokens = Usage(input_tokens=usage.input_tokens or 0, output_tokens=usage.output_tokens or 0)
    return ProviderOk(
        content="".join(t for t in texts if t is not None), model=data.model or model, usage=tokens
    )


def _error_kind(error_type: object, text: str, status: int) -> str:
    """The kind of an error of `error_type` saying `text`, answered with HTTP `status`."""
    if error_type == "request_too_large" or (
        error_type == "invalid_request_error"
        and any(phrase in text.lower() for phrase in _TOO_LONG)
    ):
        return "context_length"
    if error_type == "overloaded_error":  # 529: capacity, worth trying elsewhere
        return "server_error"
    return classify_status(status)


def message_error(response: httpx.Response, secrets: Iterable[str]) -> ProviderError:
    error = error_body(response)
    text = error_text(error, response)
    kind = _error_kind(error.get("type"), text, response.status_code)
    message = error_message("anthropic", response.status_code, text, secrets)
    return ProviderError(
        kind,
        message,
        status_code=response.status_code,
        retry_after_s=retry_after_s(response),
    )


class MessageStream:
    """One streamed message's events (a StreamReader): its text deltas, the model message_start
    names and the token counts message_start and message_delta report, until message_stop."""

    end = "message_stop"

    def __init__(self, label: str, model: str) -> None:
        self.label = label
        self.model = model
        self.input_tokens = 0
        self.output_tokens = 0

    def read(self, event: ServerSentEvent) -> str | ProviderOk | None:
        data: _Event = decode_event(event, _event_decoder)
        if data.type == "content_block_delta" and data.delta is not None:
            return self._text(data.delta)
        if data.type == "content_block_start" and data.content_block is not None:
            return data.content_block.text if data.content_block.type == "text" else None
        if data.type == "message_start" and data.message is not None:
            self.model = data.message.model or self.model
            self._count(data.message.usage)
        elif data.type == "message_delta":
            self._count(data.usage)
            if data.delta is not None and data.delta.stop_reason == "refusal":
                raise ProviderError(  # as parse_message: no answer to pass on
                    "content_filter", "provider refused to answer (stop_reason refusal)", 200
                )
        elif data.type == "message_stop":
            usage = Usage(input_tokens=self.input_tokens, output_tokens=self.output_tokens)
            return ProviderOk(content="", model=self.model, usage=usage)
        elif data.type == "error":
            raise self._failed(data.error)
        return None  # ping, content_block_stop, and event types added later

    def _text(self, delta: _EventDelta) -> str | None:
        """A text_delta's text; the deltas of other blocks (tool input, thinking) are no part of
        the answer, as parse_message reads only text blocks."""
        if delta.type != "text_delta":
            return None
        if delta.text is None:
            raise ProviderError(
                "server_error",
                "provider sent an unexpected stream event: a text_delta has no text",
                200,
            )
        return delta.text

    def _count(self, usage: _Usage | None) -> None:
        """The counts `usage` has replace those held: message_delta's are cumulative."""
        if usage is not None and usage.input_tokens is not None:
            self.input_tokens = usage.input_tokens
        if usage is not None and usage.output_tokens is not None:
            self.output_tokens = usage.output_tokens

    def _failed(self, error: Any) -> ProviderError:
        """An error event: the kind message_error gives its type answered with that type's
        HTTP status; an unknown type is a server_error (the request was accepted)."""
        error_type = error.get("type") if isinstance(error, dict) else None
        status = _TYPE_STATUS.get(error_type, 500) if isinstance(error_type, str) else 500
        text = stream_error_text(error)
        return ProviderError(
            _error_kind(error_type, text, status), f"{self.label} failed mid-stream: {text}", 200
        )


class AnthropicProvider(HttpProvider):
    label = "anthropic"

    def __init__(
        self,
        settings: AnthropicSettings,
        client: httpx.AsyncClient | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        key = require_api_key(environ, settings.api_key_env)
        headers = {"x-api-key": key, "anthropic-version": settings.anthropic_version}
        url = settings.base_url.rstrip("/") + "/v1/messages"
        super().__init__(
            settings,
            url=url,
            secrets=(key,),
            headers=headers,
            client=client,
            base_url=settings.base_url,
        )
        self.default_max_tokens = settings.default_max_tokens

    def body(self, request: ProviderRequest, model: str) -> dict[str, Any]:
        return messages_body(request, model, self.default_max_tokens)

    def parse(self, response: httpx.Response, model: str) -> ProviderOk:
        return parse_message(response, model)

    def error(self, response: httpx.Response) -> ProviderError:
        return message_error(response, self.secrets)

    def stream_body(self, request: ProviderRequest, model: str) -> dict[str, Any]:
        return {**messages_body(request, model, self.default_max_tokens), "stream": True}

    def stream_reader(self, model: str) -> MessageStream:
        return MessageStream(self.label, model)
