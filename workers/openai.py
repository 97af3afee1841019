"""The `openai` provider: OpenAI Chat Completions, and any server that speaks it.

    POST {base_url}/chat/completions     Authorization: Bearer <key>, OpenAI-Organization: <org>
    {"model", "messages": [{"role", "content"}], "max_tokens"?, "temperature"?}
    200 -> {"id", "object": "chat.completion", "model",
            "choices": [{"message": {"role", "content"}, "finish_reason"}],
            "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}
    4xx/5xx -> {"error": {"message", "type", "param", "code"}}

    streamed: the same body with "stream": true, "stream_options": {"include_usage": true}
    200 -> text/event-stream, one chat.completion.chunk per event
           data: {"model", "choices": [{"delta": {"role"?, "content"?}, "finish_reason"}],
                  "usage": null}
           then one {"choices": [], "usage": {...}}, then data: [DONE];
           an error mid-stream is data: {"error": {"message", "type", "code"}}

Local OpenAI-compatible servers (vLLM, Ollama, llama.cpp, LM Studio) work with
`base_url` pointed at them and `api_key_env = ""` (no Authorization header).
The body builder and the response and error parsing are shared with workers.azure_openai.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

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

# error.code (and Azure's error.innererror.code) values that mean more than the HTTP status says.
_CODE_KINDS = {
    "context_length_exceeded": "context_length",
    "content_filter": "content_filter",
    "content_policy_violation": "content_filter",
    "ResponsibleAIPolicyViolation": "content_filter",
}


class OpenAISettings(ProviderSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"  # None or "": send no Authorization header
    base_url: str = "https://api.openai.com/v1"
    organization: str | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError('model must be set, e.g. model = "gpt-4o-mini"')
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")


def chat_body(request: ProviderRequest, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
    }
    # Unset options are left out so the provider's own defaults apply.
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.response_format is not None:  # json_object / json_schema, OpenAI's own shape
        body["response_format"] = msgspec.to_builtins(request.response_format)
    return body


# The parts of a chat.completion Lifeline reads, typed: msgspec skips the rest, and a body
# that differs fails with the path and the type it found, never a value (see decode_body).
class _Message(msgspec.Struct):
    content: str | None = None  # null when the answer was filtered


class _Choice(msgspec.Struct):
    message: _Message
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: TokenCount | None = None
    completion_tokens: TokenCount | None = None


class _Completion(msgspec.Struct):
    choices: Annotated[list[_Choice], msgspec.Meta(min_length=1)]
    model: str | None = None
    usage: _Usage | None = None  # some compatible servers leave usage out


_completion_decoder = msgspec.json.Decoder(_Completion)


# The parts of a chat.completion.chunk Lifeline reads, typed as the whole body's are.
class _Delta(msgspec.Struct):
    content: str | None = None  # absent from the first chunk (role only) and the last ones


class _ChunkChoice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    # Empty in the usage chunk, and in Azure's chunks of prompt_filter_results.
    choices: list[_ChunkChoice] = []
    model: str | None = None
    usage: _Usage | None = None  # null but in the last chunk (include_usage)
    error: Any = None  # {"message", "type", "code"}: the stream failed


_chunk_decoder = msgspec.json.Decoder(_Chunk)


def parse_chat_completion(response: httpx.Response, model: str) -> ProviderOk:
    """A 200 chat.completion as ProviderOk; `model` stands in when the body names none."""
    data = decode_body(response, _completion_decoder)
    choice = data.choices[0]
    # A filtered answer is missing or cut short: a failure the route may fall back on, not an
    # answer.
    if choice.finish_reason == "content_filter":
        status = response.status_code
        raise ProviderError(
            "content_filter", "provider withheld the answer (finish_reason content_filter)", status
        )
    if choice.message.content is None:
        raise unexpected_body(response, "choices[0].message.content is null or missing")
    usage = data.usage or _Usage()
    tokens = Usage(
        input_tokens=usage.prompt_tokens or 0, output_tokens=usage.completion_tokens or 0
    )
    return ProviderOk(content=choice.message.content, model=data.model or model, usage=tokens)


def _code_kind(error: dict[str, Any]) -> str | None:
    """The kind error.code (or Azure's error.innererror.code) names, if it names one."""
    inner = error.get("innererror")
    codes = [error.get("code"), inner.get("code") if isinstance(inner, dict) else None]
    kinds = [_CODE_KINDS[c] for c in codes if isinstance(c, str) and c in _CODE_KINDS]
    return kinds[0] if kinds else None


def chat_error(response: httpx.Response, label: str, secrets: Iterable[str]) -> ProviderError:
    error = error_body(response)
    kind = _code_kind(error) or classify_status(response.status_code)
    message = error_message(label, response.status_code, error_text(error, response), secrets)
    return ProviderError(
        kind,
        message,
        status_code=response.status_code,
        retry_after_s=retry_after_s(response),
    )


class ChatStream:
    """One streamed chat completion's chunks (a StreamReader): the deltas, the model the chunks
    name and the usage the last one carries, until data: [DONE]."""

    end = "[DONE]"

    def __init__(self, label: str, model: str) -> None:
        self.label = label
        self.model = model
        self.usage = _Usage()

    def read(self, event: ServerSentEvent) -> str | ProviderOk | None:
        if event.data == "[DONE]":
            tokens = Usage(
                input_tokens=self.usage.prompt_tokens or 0,
                output_tokens=self.usage.completion_tokens or 0,
            )
            return ProviderOk(content="", model=self.model, usage=tokens)
        chunk: _Chunk = decode_event(event, _chunk_decoder)
        if chunk.error is not None:
            raise self._failed(chunk.error)
        self.model = chunk.model or self.model  # Azure's filter results name "": kept as was
        if chunk.usage is not None:
            self.usage = chunk.usage
        if not chunk.choices:
            return None
        choice = chunk.choices[0]
        if choice.finish_reason == "content_filter":  # as parse_chat_completion: no answer
            raise ProviderError(
                "content_filter", "provider withheld the answer (finish_reason content_filter)", 200
            )
        return choice.delta.content if choice.delta is not None else None

    def _failed(self, error: Any) -> ProviderError:
        """An error chunk: its code's kind as chat_error reads it, else a server_error (the
        request was accepted; the provider failed while answering)."""
        kind = (_code_kind(error) if isinstance(error, dict) else None) or "server_error"
        message = f"{self.label} failed mid-stream: {stream_error_text(error)}"
        return ProviderError(kind, message, 200)


class OpenAIProvider(HttpProvider):
    label = "openai"

    def __init__(
        self,
        settings: OpenAISettings,
        client: httpx.AsyncClient | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        key = require_api_key(environ, settings.api_key_env) if settings.api_key_env else ""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if settings.organization:
            headers["OpenAI-Organization"] = settings.organization
        url = settings.base_url.rstrip("/") + "/chat/completions"
        super().__init__(
            settings,
            url=url,
            secrets=(key,),
            headers=headers,
            client=client,
            base_url=settings.base_url,
        )

    def body(self, request: ProviderRequest, model: str) -> dict[str, Any]:
        return chat_body(request, model)

    def parse(self, response: httpx.Response, model: str) -> ProviderOk:
        return parse_chat_completion(response, model)

    def error(self, response: httpx.Response) -> ProviderError:
        return chat_error(response, self.label, self.secrets)

    def stream_body(self, request: ProviderRequest, model: str) -> dict[str, Any]:
        # include_usage: the last chunk carries the usage, as the whole answer's body does.
        stream_options = {"include_usage": True}
        return {**chat_body(request, model), "stream": True, "stream_options": stream_options}

    def stream_reader(self, model: str) -> ChatStream:
        return ChatStream(self.label, model)
