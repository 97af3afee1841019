"""The `anthropic` provider: the Anthropic Messages API.

    POST {base_url}/v1/messages     x-api-key: <key>, anthropic-version: <version>
    {"model", "max_tokens", "system"?,
     "messages": [{"role": "user"|"assistant", "content"}], "temperature"?}
    200 -> {"id", "type": "message", "role": "assistant", "model",
            "content": [{"type": "text", "text"}, ...], "stop_reason",
            "usage": {"input_tokens", "output_tokens"}}
    4xx/5xx -> {"type": "error", "error": {"type", "message"}}   (529 overloaded_error)

System prompts are a top-level field, not a message role, and max_tokens is required.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import httpx
import msgspec

from schemas import ProviderOk, ProviderRequest, Usage
from workers.base import (
    HttpProvider,
    ProviderError,
    ProviderSettings,
    TokenCount,
    classify_status,
    decode_body,
    error_body,
    error_message,
    error_text,
    require_api_key,
    retry_after_s,
    unexpected_body,
)

# How the API words a prompt that does not fit the model's context window (invalid_request_error).
_TOO_LONG = ("prompt is too long", "exceed context limit")


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


def message_error(response: httpx.Response, secrets: Iterable[str]) -> ProviderError:
    error = error_body(response)
    error_type = error.get("type")
    text = error_text(error, response)
    kind = classify_status(response.status_code)
    if error_type == "request_too_large" or (
        error_type == "invalid_request_error"
        and any(phrase in text.lower() for phrase in _TOO_LONG)
    ):
        kind = "context_length"
    elif error_type == "overloaded_error":  # 529: capacity, worth trying elsewhere
        kind = "server_error"
    message = error_message("anthropic", response.status_code, text, secrets)
    return ProviderError(
        kind,
        message,
        status_code=response.status_code,
        retry_after_s=retry_after_s(response),
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
