"""The HTTP providers' `stream` against a real local server writing each kind's documented
server-sent events: the deltas a caller gets, the final ProviderOk, and every way it fails.

The server writes the events as the providers do (flushed as they are made) or in pieces cut
at odd places (inside a UTF-8 character, between the CR and LF of a line end), so the
framing is what a worker meets on a real network.

    OpenAI     https://platform.openai.com/docs/api-reference/chat-streaming
    Azure      https://learn.microsoft.com/azure/ai-services/openai/reference (same chunks,
               with prompt_filter_results and content_filter_results)
    Anthropic  https://docs.anthropic.com/en/docs/build-with-claude/streaming
"""

from __future__ import annotations

import asyncio
import json
import threading
import tracemalloc
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any, TypeVar

import msgspec
import pytest
from helpers import LocalHTTPServer, serving
from opentelemetry import context, trace

from schemas import ChatMessage, ProviderOk, ProviderRequest, Usage
from schemas.wire import ToolCallDelta
from workers.anthropic import AnthropicProvider, AnthropicSettings
from workers.azure_openai import AzureOpenAIProvider, AzureOpenAISettings
from workers.base import HttpProvider, ProviderError
from workers.openai import OpenAIProvider, OpenAISettings

MiB = 1024 * 1024
REQUEST = ProviderRequest(id="r1", messages=[ChatMessage("user", "Hello!")])
TEXTS = ["Hello", "! How can I", " assist you", " today?"]
# JSON may carry U+2028 and U+2029 unescaped: a line splitter that takes them for line ends
# (httpx's aiter_lines) cuts such a chunk in two.
UNICODE_TEXTS = ["line\u2028separator", " and\u2029paragraph", " 🎉 done", "\u2028"]


def sse(data: Any, event: str | None = None) -> str:
    """One event as the providers write it: JSON data on one line, U+2028 and all unescaped."""
    head = f"event: {event}\n" if event else ""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"{head}data: {text}\n\n"


# ---- each kind's documented stream ------------------------------------------------------

OPENAI_MODEL = "gpt-4o-mini-2024-07-18"


def openai_chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion.chunk",
        "created": 1741570283,
        "model": OPENAI_MODEL,
        "service_tier": "default",
        "system_fingerprint": "fp_06737a9306",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        "usage": None,  # with include_usage, null in every chunk but the last
    }


def openai_events(texts: list[str]) -> list[str]:
    usage = {
        "prompt_tokens": 19,
        "completion_tokens": 10,
        "total_tokens": 29,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }
    chunks = [
        openai_chunk({"role": "assistant", "content": "", "refusal": None}),
        *(openai_chunk({"content": text}) for text in texts),
        openai_chunk({}, "stop"),
        {**openai_chunk({}), "choices": [], "usage": usage},
    ]
    return [sse(chunk) for chunk in chunks] + [sse("[DONE]")]


def openai_error(message: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}


AZURE_MODEL = "gpt-4o-2024-08-06"
_SAFE = {"filtered": False, "severity": "safe"}
_FILTERS = {name: _SAFE for name in ("hate", "self_harm", "sexual", "violence")}


def azure_chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    choice = {
        "content_filter_results": _FILTERS if delta.get("content") else {},
        "delta": delta,
        "finish_reason": finish_reason,
        "index": 0,
        "logprobs": None,
    }
    return {
        "choices": [choice],
        "created": 1727289863,
        "id": "chatcmpl-AB7yVj1pT3aVYeFz5bWvrM6a0qC2X",
        "model": AZURE_MODEL,
        "object": "chat.completion.chunk",
        "system_fingerprint": "fp_67802d9a6d",
    }


def azure_events(texts: list[str]) -> list[str]:
    # Azure's first chunk: the prompt's filter results, with empty choices and no model.
    prompt_filter = {
        "choices": [],
        "created": 0,
        "id": "",
        "model": "",
        "object": "",
        "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": _FILTERS}],
    }
    usage = {"completion_tokens": 557, "prompt_tokens": 33, "total_tokens": 590}
    chunks = [
        prompt_filter,
        azure_chunk({"content": "", "refusal": None, "role": "assistant"}),
        *(azure_chunk({"content": text}) for text in texts),
        azure_chunk({}, "stop"),
        {**azure_chunk({}), "choices": [], "usage": usage},
    ]
    return [sse(chunk) for chunk in chunks] + [sse("[DONE]")]


ANTHROPIC_MODEL = "claude-sonnet-4-20250514"


def anthropic_events(texts: list[str]) -> list[str]:
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": ANTHROPIC_MODEL,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 25, "output_tokens": 1},
        },
    }
    block_start = {"type": "content_block_start", "index": 0}
    block_start["content_block"] = {"type": "text", "text": ""}
    deltas = [
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
        for text in texts
    ]
    message_delta = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 15},
    }
    events = [
        (start, "message_start"),
        (block_start, "content_block_start"),
        ({"type": "ping"}, "ping"),
        *((delta, "content_block_delta") for delta in deltas),
        ({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        (message_delta, "message_delta"),
        ({"type": "message_stop"}, "message_stop"),
    ]
    return [sse(data, event) for data, event in events]


def anthropic_error(type_: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": type_, "message": message}}


# ---- the kinds --------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    name: str  # also the label its messages start with
    key: str
    build: Callable[..., HttpProvider]  # build(base_url, **settings)
    events: Callable[[list[str]], list[str]]  # a whole stream answering these deltas
    error_event: Callable[[str], str]  # the event a stream fails with mid-way
    error_body: Callable[[str], dict[str, Any]]  # the JSON body of an HTTP error
    end: str  # the terminator
    model: str  # the model its stream reports
    usage: Usage  # the usage its stream reports


def _openai(base_url: str, name: str = "", **settings: Any) -> HttpProvider:
    table = {"kind": "openai", "model": "gpt-4o-mini", "base_url": f"{base_url}/v1", **settings}
    environ = {"OPENAI_API_KEY": OPENAI.key}
    return OpenAIProvider(msgspec.convert(table, OpenAISettings), environ=environ, name=name)


def _azure(base_url: str, name: str = "", **settings: Any) -> HttpProvider:
    table = {"kind": "azure_openai", "endpoint": base_url, "deployment": "gpt4o-prod", **settings}
    environ = {"AZURE_OPENAI_API_KEY": AZURE.key}
    settings_ = msgspec.convert(table, AzureOpenAISettings)
    return AzureOpenAIProvider(settings_, environ=environ, name=name)


def _anthropic(base_url: str, name: str = "", **settings: Any) -> HttpProvider:
    table = {"kind": "anthropic", "model": "claude-sonnet-4-0", "base_url": base_url, **settings}
    environ = {"ANTHROPIC_API_KEY": ANTHROPIC.key}
    settings_ = msgspec.convert(table, AnthropicSettings)
    return AnthropicProvider(settings_, environ=environ, name=name)


OPENAI = Kind(
    "openai",
    "sk-proj-stream-Zq7xW2vB9nK4mT1r",
    _openai,
    openai_events,
    lambda message: sse(openai_error(message)),
    lambda message: openai_error(message),
    "[DONE]",
    OPENAI_MODEL,
    Usage(19, 10),
)
AZURE = Kind(
    "azure_openai",
    "5f0c9e2ab7d14c83a6e1f2b3c4d5e6f7",
    _azure,
    azure_events,
    lambda message: sse(openai_error(message)),
    lambda message: {"error": {"code": "429", "message": message}},
    "[DONE]",
    AZURE_MODEL,
    Usage(33, 557),
)
ANTHROPIC = Kind(
    "anthropic",
    "sk-ant-api03-stream-Hs3kP8dQ2wX5",
    _anthropic,
    anthropic_events,
    lambda message: sse(anthropic_error("overloaded_error", message), "error"),
    lambda message: anthropic_error("rate_limit_error", message),
    "message_stop",
    ANTHROPIC_MODEL,
    Usage(25, 15),
)
KINDS = [OPENAI, AZURE, ANTHROPIC]
each_kind = pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.name)


# ---- a real HTTP server -----------------------------------------------------------------


class Server(LocalHTTPServer):
    """Answers every POST with `answer(handler)`; keeps what each request sent."""

    def __init__(self) -> None:
        super().__init__(_Handler)
        self.answer: Callable[[_Handler], None] = lambda handler: None
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []  # (headers, body)
        self.hung_up = threading.Event()  # the client closed the connection mid-answer
        self.release = threading.Event()  # set at teardown: ends any handler still waiting

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Server

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.connection.settimeout(10)  # never block a test for long, whatever the client does
        try:
            self.server.answer(self)
        except (BrokenPipeError, ConnectionResetError):
            self.server.hung_up.set()

    def log_message(self, *args: object) -> None:
        pass


def send(
    handler: _Handler,
    pieces: Iterable[bytes | str],
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> None:
    """Status, headers, then each piece written and flushed on its own (HTTP/1.0: without a
    Content-Length the body ends when the server closes)."""
    handler.send_response(status)
    for name, value in {"content-type": "text/event-stream", **(headers or {})}.items():
        handler.send_header(name, value)
    handler.end_headers()
    for piece in pieces:
        handler.wfile.write(piece.encode() if isinstance(piece, str) else piece)
        handler.wfile.flush()


def cut(events: list[str], size: int, newline: str = "\n", prefix: bytes = b"") -> list[bytes]:
    """The events' bytes (after `prefix`), with `newline` for line ends, in pieces of `size`
    bytes: cut inside UTF-8 characters, inside CRLF pairs, anywhere."""
    data = prefix + "".join(events).replace("\n", newline).encode()  # JSON escapes CR and LF
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.fixture
def server() -> Iterator[Server]:
    with serving(Server(), poll_interval_s=0.02) as server:
        yield server
        server.release.set()


@pytest.fixture
async def providers():
    """providers(kind, base_url, **settings): a provider, closed after the test."""
    built: list[HttpProvider] = []

    def build(kind: Kind, base_url: str, **settings: Any) -> HttpProvider:
        built.append(kind.build(base_url, **settings))
        return built[-1]

    yield build
    for provider in built:
        await provider.aclose()


async def streamed(
    provider: HttpProvider, timeout_s: float = 5, tool_deltas: list[Any] | None = None
) -> tuple[list[str], ProviderOk]:
    """The text deltas and the final ProviderOk of a stream that must succeed; its tool-call
    deltas go to `tool_deltas` (a stream with any fails without it)."""
    *deltas, last = [item async for item in provider.stream(REQUEST, timeout_s)]
    assert isinstance(last, ProviderOk), last
    texts = [delta for delta in deltas if isinstance(delta, str)]
    assert all(texts), deltas
    calls = [delta for delta in deltas if isinstance(delta, ToolCallDelta)]
    assert len(texts) + len(calls) == len(deltas)
    if tool_deltas is None:
        assert not calls, calls
    else:
        tool_deltas += calls
    return texts, last


T = TypeVar("T")


async def with_peak_bytes(call: Awaitable[T]) -> tuple[T, int]:
    """`call`'s result, and the most memory Python held at once while it ran."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = await call
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


async def failed(provider: HttpProvider, timeout_s: float = 5) -> tuple[list[str], ProviderError]:
    """The deltas a stream that must fail yielded first, and its ProviderError."""
    deltas: list[str] = []
    with pytest.raises(ProviderError) as caught:
        async for item in provider.stream(REQUEST, timeout_s):
            assert isinstance(item, str) and item, f"{item!r} before the failure"
            deltas.append(item)
    return deltas, caught.value


def assert_no_key(error: ProviderError, key: str) -> None:
    """Neither the key nor any 8-character piece of it, in the message, str or repr."""
    for text in (error.message, str(error), repr(error)):
        assert not any(key[i : i + 8] in text for i in range(len(key) - 7)), text


# ---- a whole stream ---------------------------------------------------------------------


@each_kind
async def test_the_deltas_join_into_the_answer_and_the_last_item_has_model_and_usage(
    kind, server, providers
):
    server.answer = lambda handler: send(handler, kind.events(TEXTS))
    deltas, ok = await streamed(providers(kind, server.url))
    assert deltas == TEXTS
    assert ok == ProviderOk(content="", model=kind.model, usage=kind.usage, finish_reason="stop")


@each_kind
async def test_the_request_is_the_kinds_body_with_its_streaming_switch(kind, server, providers):
    server.answer = lambda handler: send(handler, kind.events(TEXTS))
    await streamed(providers(kind, server.url))
    headers, body = server.requests[0]
    assert headers["accept"] == "text/event-stream"
    assert body["stream"] is True
    assert body["messages"] == [{"role": "user", "content": "Hello!"}]
    if kind is ANTHROPIC:
        assert "stream_options" not in body and body["max_tokens"] == 1024
    else:  # the usage comes in the last chunk only when asked for
        assert body["stream_options"] == {"include_usage": True}
    auth = {
        "openai": ("authorization", f"Bearer {kind.key}"),
        "azure_openai": ("api-key", kind.key),
        "anthropic": ("x-api-key", kind.key),
    }
    name, value = auth[kind.name]
    assert headers[name] == value


async def test_the_call_carries_the_current_trace_context(server, providers):
    server.answer = lambda handler: send(handler, OPENAI.events(TEXTS))
    span = trace.NonRecordingSpan(
        trace.SpanContext(0x1234, 0x5678, is_remote=False, trace_flags=trace.TraceFlags(1))
    )
    token = context.attach(trace.set_span_in_context(span))
    try:
        await streamed(providers(OPENAI, server.url))
    finally:
        context.detach(token)
    assert server.requests[0][0]["traceparent"] == f"00-{0x1234:032x}-{0x5678:016x}-01"


@each_kind
async def test_each_delta_comes_as_soon_as_it_is_written(kind, server, providers):
    events = kind.events(TEXTS)
    first_delta = next(i for i, e in enumerate(events) if TEXTS[0] in e)
    go_on, gave_up = threading.Event(), threading.Event()

    def answer(handler: _Handler) -> None:
        send(handler, events[: first_delta + 1])
        if not go_on.wait(30):  # the rest only once the client has the first delta
            gave_up.set()
        for event in events[first_delta + 1 :]:
            handler.wfile.write(event.encode())

    server.answer = answer
    stream = providers(kind, server.url).stream(REQUEST, 60)
    try:
        assert await asyncio.wait_for(anext(stream), 60) == TEXTS[0]
        assert not gave_up.is_set()  # it came while the rest was held back, not after
    finally:
        go_on.set()
    rest = [item async for item in stream]
    assert rest[:-1] == TEXTS[1:] and isinstance(rest[-1], ProviderOk)


@pytest.mark.parametrize("size", [1, 3, 7, 64])
@each_kind
async def test_u2028_u2029_and_emoji_come_through_intact_however_the_bytes_are_cut(
    kind, size, server, providers
):
    server.answer = lambda handler: send(handler, cut(kind.events(UNICODE_TEXTS), size))
    deltas, ok = await streamed(providers(kind, server.url))
    assert deltas == UNICODE_TEXTS
    assert "".join(deltas) == "line\u2028separator and\u2029paragraph 🎉 done\u2028"
    assert ok.usage == kind.usage


@pytest.mark.parametrize("newline", ["\r\n", "\r"], ids=["crlf", "cr"])
@pytest.mark.parametrize("size", [1, 2, 5, 4096])
@each_kind
async def test_crlf_and_cr_line_ends_read_as_lf_ones(kind, newline, size, server, providers):
    server.answer = lambda handler: send(handler, cut(kind.events(TEXTS), size, newline))
    deltas, ok = await streamed(providers(kind, server.url))
    assert deltas == TEXTS
    assert ok == ProviderOk(content="", model=kind.model, usage=kind.usage, finish_reason="stop")


@pytest.mark.parametrize("size", [1, 2, 4096])
async def test_a_byte_order_mark_before_the_stream_is_no_part_of_it(size, server, providers):
    """The SSE spec's UTF-8 decode drops one leading byte-order mark: kept, it made the first
    line a field named "\ufeffdata", and a first chunk carrying text was dropped without a
    word (here the stream starts with a delta, not with OpenAI's role-only chunk)."""
    events = OPENAI.events(TEXTS)[1:]
    server.answer = lambda handler: send(handler, cut(events, size, prefix="\ufeff".encode()))
    deltas, ok = await streamed(providers(OPENAI, server.url))
    assert deltas == TEXTS
    assert ok.usage == OPENAI.usage


async def test_deltas_are_passed_on_unstripped(server, providers):
    texts = ["  leading", "trailing  ", "\n", " \t", "x"]
    server.answer = lambda handler: send(handler, OPENAI.events(texts))
    deltas, _ = await streamed(providers(OPENAI, server.url))
    assert deltas == texts


async def test_a_compatible_server_without_usage_or_model_answers_with_the_requested_model(
    server, providers
):
    chunks = [{"choices": [{"index": 0, "delta": {"content": text}}]} for text in TEXTS]
    server.answer = lambda handler: send(handler, [sse(c) for c in chunks] + [sse("[DONE]")])
    deltas, ok = await streamed(providers(OPENAI, server.url))
    assert deltas == TEXTS
    assert ok == ProviderOk(content="", model="gpt-4o-mini", usage=Usage(0, 0))


async def test_comments_and_events_without_data_are_skipped(server, providers):
    events = [": keep-alive\n\n", "event: ping\n\n", "id: 7\n\n", *OPENAI.events(TEXTS)]
    server.answer = lambda handler: send(handler, events)
    deltas, _ = await streamed(providers(OPENAI, server.url))
    assert deltas == TEXTS


async def test_anthropic_passes_on_text_only_and_takes_the_last_cumulative_usage(server, providers):
    events = anthropic_events(["The answer", " is 4."])
    thinking = [
        {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta"}},
        {"type": "content_block_stop", "index": 0},
    ]
    thinking[1]["delta"]["thinking"] = "2 + 2 is 4"
    thinking[2]["delta"]["signature"] = "EqQBCgIYAhIM1gbcDa9GJwZA2b3h"
    tool = [
        {
            "type": "content_block_start",
            "index": 2,
            "content_block": {
                "type": "tool_use",
                "id": "toolu_01A09q90qw90lq917835lq9",
                "name": "get_weather",
                "input": {},
            },
        },
        {
            "type": "content_block_delta",
            "index": 2,
            "delta": {"type": "input_json_delta", "partial_json": '{"location": "San Fra'},
        },
        {"type": "content_block_stop", "index": 2},
    ]
    more_usage = {"type": "message_delta", "delta": {"stop_reason": None}}
    more_usage["usage"] = {"output_tokens": 89}
    stream = [
        events[0],
        *(sse(e, e["type"]) for e in thinking),
        *events[1:-2],
        *(sse(e, e["type"]) for e in tool),
        events[-2],
        sse(more_usage, "message_delta"),  # cumulative: the last count is the whole
        events[-1],
    ]
    server.answer = lambda handler: send(handler, stream)
    calls: list[Any] = []
    deltas, ok = await streamed(providers(ANTHROPIC, server.url), tool_deltas=calls)
    assert deltas == ["The answer", " is 4."]  # the thinking block is no part of the answer
    assert calls == [  # the tool call is passed on as it streams
        ToolCallDelta(0, "toolu_01A09q90qw90lq917835lq9", "get_weather", ""),
        ToolCallDelta(0, arguments='{"location": "San Fra'),
    ]
    assert ok.usage == Usage(25, 89)


# ---- failures before the stream ---------------------------------------------------------


@each_kind
async def test_a_429_is_a_rate_limit_with_its_retry_after(kind, server, providers):
    body = json.dumps(kind.error_body("Rate limit reached for requests"))
    headers = {"content-type": "application/json", "retry-after": "20"}
    server.answer = lambda handler: send(handler, [body], 429, headers)
    deltas, error = await failed(providers(kind, server.url))
    assert deltas == []
    assert (error.kind, error.status_code, error.retry_after_s) == ("rate_limit", 429, 20.0)
    assert error.message == f"{kind.name} 429: Rate limit reached for requests"


@pytest.mark.parametrize(
    ("kind", "status", "body"),
    [
        (OPENAI, 500, openai_error("The server had an error while processing your request.")),
        (AZURE, 503, {"error": {"code": "ServiceUnavailable", "message": "Try again later."}}),
        (ANTHROPIC, 529, anthropic_error("overloaded_error", "Overloaded")),
        (ANTHROPIC, 500, anthropic_error("api_error", "Internal server error")),
    ],
    ids=["openai-500", "azure-503", "anthropic-529", "anthropic-500"],
)
async def test_a_5xx_or_overloaded_is_a_server_error(kind, status, body, server, providers):
    headers = {"content-type": "application/json"}
    server.answer = lambda handler: send(handler, [json.dumps(body)], status, headers)
    deltas, error = await failed(providers(kind, server.url))
    assert deltas == []
    assert (error.kind, error.status_code) == ("server_error", status)
    assert error.message.startswith(f"{kind.name} {status}: ")


async def test_a_context_length_error_is_mapped_as_without_streaming(server, providers):
    body = openai_error("This model's maximum context length is 128000 tokens.")
    body["error"]["code"] = "context_length_exceeded"
    headers = {"content-type": "application/json"}
    server.answer = lambda handler: send(handler, [json.dumps(body)], 400, headers)
    _, error = await failed(providers(OPENAI, server.url))
    assert (error.kind, error.status_code) == ("context_length", 400)


@each_kind
async def test_a_200_that_is_not_an_event_stream_is_a_server_error(kind, server, providers):
    answer = json.dumps({"choices": [{"message": {"content": "whole"}}]})
    headers = {"content-type": "application/json"}
    server.answer = lambda handler: send(handler, [answer], 200, headers)
    deltas, error = await failed(providers(kind, server.url))
    assert deltas == []
    assert (error.kind, error.status_code) == ("server_error", 200)
    assert error.message == (
        f"{kind.name} answered a streamed request with Content-Type application/json, "
        "not text/event-stream"
    )


async def test_a_200_without_a_content_type_is_a_server_error(server, providers):
    def answer(handler: _Handler) -> None:
        handler.wfile.write(b"HTTP/1.0 200 OK\r\n\r\n" + OPENAI.events(TEXTS)[0].encode())

    server.answer = answer
    _, error = await failed(providers(OPENAI, server.url))
    assert error.kind == "server_error"
    assert "Content-Type (none), not text/event-stream" in error.message


async def test_an_unreachable_provider_is_a_connection_error(providers):
    server = LocalHTTPServer(_Handler)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    server.server_close()  # nothing listens there any more
    _, error = await failed(providers(OPENAI, url))
    assert error.kind == "connection"


# ---- failures mid-stream ----------------------------------------------------------------


@each_kind
async def test_an_error_event_fails_the_stream_after_the_deltas_before_it(kind, server, providers):
    events = kind.events(TEXTS)
    server.answer = lambda handler: send(
        handler, [*events[:4], kind.error_event("Overloaded, try again"), *events[4:]]
    )
    deltas, error = await failed(providers(kind, server.url))
    assert deltas == TEXTS[: len(deltas)] and deltas
    assert error.kind == "server_error"
    assert error.message == f"{kind.name} failed mid-stream: Overloaded, try again"


# llama.cpp's server writes a failure mid-stream as an `error:` line (a field no SSE parser
# knows), then data: [DONE]; some servers name an event error instead.
LLAMA_CPP_ERROR = {"code": 500, "message": "slot unavailable", "type": "server_error"}
ERROR_LINES = {
    "llama.cpp error: line": f"error: {json.dumps(LLAMA_CPP_ERROR)}\n\n",
    "event: error": sse(LLAMA_CPP_ERROR, "error"),
    "event: error, not JSON": "event: error\ndata: slot unavailable\n\n",
}


@pytest.mark.parametrize("line", ERROR_LINES.values(), ids=list(ERROR_LINES))
@pytest.mark.parametrize("kind", [OPENAI, AZURE], ids=lambda kind: kind.name)
async def test_an_error_line_fails_the_stream_and_is_no_end_of_a_whole_answer(
    kind, line, server, providers
):
    """Ignored, as the SSE spec says of a field it does not know, the text before it and the
    [DONE] after it passed a cut answer off as whole: an ok."""
    events = kind.events(TEXTS)
    server.answer = lambda handler: send(handler, [*events[:4], line, events[-1]])
    deltas, error = await failed(providers(kind, server.url))
    assert deltas == TEXTS[: len(deltas)] and deltas
    assert (error.kind, error.message) == (
        "server_error",
        f"{kind.name} failed mid-stream: slot unavailable",
    )


async def test_an_error_line_before_any_choice_says_what_failed(server, providers):
    """llama.cpp answered a prompt over its context so: said as "no choice", its reason was lost."""
    too_long = {
        **LLAMA_CPP_ERROR,
        "code": 400,
        "message": "the request exceeds the available context size, try increasing it",
        "type": "exceed_context_size_error",
    }
    server.answer = lambda handler: send(
        handler, [f"error: {json.dumps(too_long)}\n\n", "data: [DONE]\n\n"]
    )
    _, error = await failed(providers(OPENAI, server.url))
    assert error.message == f"openai failed mid-stream: {too_long['message']}"


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (anthropic_error("overloaded_error", "Overloaded"), "server_error"),
        (anthropic_error("api_error", "Internal server error"), "server_error"),
        (anthropic_error("timeout_error", "Request timed out"), "timeout"),
        (anthropic_error("rate_limit_error", "Number of request tokens exceeded"), "rate_limit"),
        (anthropic_error("invalid_request_error", "prompt is too long: 1 > 0"), "context_length"),
        (
            anthropic_error("invalid_request_error", "Output blocked by content filtering policy"),
            "content_filter",
        ),
        (anthropic_error("authentication_error", "invalid x-api-key"), "auth"),
        (anthropic_error("some_new_error", "?"), "server_error"),
        ({"type": "error", "error": "a string"}, "server_error"),
    ],
    ids=lambda value: value if isinstance(value, str) else str(value["error"])[:30],
)
async def test_anthropic_error_events_map_as_their_types_do_without_streaming(
    error, kind, server, providers
):
    events = anthropic_events(TEXTS)
    server.answer = lambda handler: send(handler, [*events[:3], sse(error, "error")])
    _, failure = await failed(providers(ANTHROPIC, server.url))
    assert failure.kind == kind
    assert failure.message.startswith("anthropic failed mid-stream: ")


@each_kind
async def test_a_long_error_event_is_not_read_as_json_and_is_quoted_from_its_start(
    kind, server, providers
):
    """An error event whose error is 1 MiB of empty lists, within max_response_bytes: decoded
    whole, and written back as JSON to quote 300 characters of it, it took 35 times its size
    and held the worker's event loop, every other call on it waiting."""
    error = {"message": None, "detail": [[]] * (MiB // 4)}
    event = (
        sse({"type": "error", "error": error}, "error")
        if kind is ANTHROPIC
        else sse({"error": error})
    )
    body = "".join([*kind.events(TEXTS)[:2], event]).encode()  # made before memory is traced
    server.answer = lambda handler: send(handler, [body])
    (_, failure), peak = await with_peak_bytes(failed(providers(kind, server.url)))
    assert failure.kind == "server_error"
    assert failure.message.startswith(
        f'{kind.name} failed mid-stream: {{"message": null, "detail": [[], []'
    )
    assert peak < 4 * MiB, peak  # the event read; decoded whole, 35 MiB


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("context_length_exceeded", "context_length"),
        ("content_filter", "content_filter"),
        (None, "server_error"),
        ("something_else", "server_error"),
    ],
)
async def test_openai_error_chunks_map_by_their_code(code, kind, server, providers):
    events = openai_events(TEXTS)
    error = openai_error("stopped", code)
    server.answer = lambda handler: send(handler, [*events[:2], sse(error), *events[2:]])
    _, failure = await failed(providers(OPENAI, server.url))
    assert (failure.kind, failure.message) == (kind, "openai failed mid-stream: stopped")


@pytest.mark.parametrize("kind", [OPENAI, AZURE], ids=lambda kind: kind.name)
async def test_a_content_filter_finish_reason_is_a_content_filter_error(kind, server, providers):
    events = kind.events(TEXTS)
    chunk = (
        openai_chunk({}, "content_filter") if kind is OPENAI else azure_chunk({}, "content_filter")
    )
    server.answer = lambda handler: send(handler, [*events[:-3], sse(chunk), sse("[DONE]")])
    deltas, error = await failed(providers(kind, server.url))
    assert deltas == TEXTS
    assert error.kind == "content_filter"
    assert "content_filter" in error.message


async def test_an_openai_refusal_streamed_is_a_content_filter_error_not_an_empty_answer(
    server, providers
):
    events = [
        sse(openai_chunk({"role": "assistant", "content": None, "refusal": ""})),
        sse(openai_chunk({"refusal": "I'm sorry, I cannot"})),
        sse(openai_chunk({"refusal": " assist with that."})),
        sse(openai_chunk({}, "stop")),
        sse("[DONE]"),
    ]
    server.answer = lambda handler: send(handler, events)
    deltas, error = await failed(providers(OPENAI, server.url))
    assert deltas == [] and error.kind == "content_filter" and "sorry" not in error.message


async def test_an_anthropic_refusal_is_a_content_filter_error(server, providers):
    events = anthropic_events(TEXTS)
    refusal = {"type": "message_delta", "delta": {"stop_reason": "refusal"}}
    refusal["usage"] = {"output_tokens": 3}
    server.answer = lambda handler: send(
        handler, [*events[:-2], sse(refusal, "message_delta"), events[-1]]
    )
    deltas, error = await failed(providers(ANTHROPIC, server.url))
    assert deltas == TEXTS
    assert (error.kind, error.message) == (
        "content_filter",
        "provider refused to answer (stop_reason refusal)",
    )


@each_kind
async def test_a_stream_that_ends_without_its_terminator_is_a_connection_error(
    kind, server, providers
):
    server.answer = lambda handler: send(handler, kind.events(TEXTS)[:-1])
    deltas, error = await failed(providers(kind, server.url))
    assert deltas == TEXTS  # what came is passed on; the answer is still not whole
    assert (error.kind, error.message) == (
        "connection",
        f"{kind.name} stream ended without {kind.end}",
    )


@each_kind
async def test_a_stream_that_ends_without_any_answer_is_a_server_error(kind, server, providers):
    """Only the usage chunk before [DONE], or a message that starts and stops: it was passed on
    as a whole, empty answer, where the same answer unstreamed is a server_error, which falls
    back."""
    events = kind.events([])
    if kind is ANTHROPIC:  # message_start, then message_stop
        events = [events[0], events[-1]]
    else:  # the chunks without a choice (usage; Azure's prompt filter results), then [DONE]
        events = [event for event in events if '"choices": []' in event] + [events[-1]]
    server.answer = lambda handler: send(handler, events)
    deltas, error = await failed(providers(kind, server.url))
    assert (deltas, error.kind, error.status_code) == ([], "server_error", 200)
    assert "without a choice" in error.message or "without a content block" in error.message


@each_kind
async def test_a_connection_cut_mid_body_is_a_connection_error(kind, server, providers):
    events = kind.events(TEXTS)
    # The Content-Length promises more than comes: httpx sees the body cut short.
    server.answer = lambda handler: send(handler, events[:4], headers={"content-length": "99999"})
    deltas, error = await failed(providers(kind, server.url))
    assert deltas == TEXTS[: len(deltas)]
    assert error.kind == "connection"
    assert "RemoteProtocolError" in error.message


@each_kind
async def test_a_stream_that_stops_coming_is_a_timeout(kind, server, providers):
    def stall(handler: _Handler) -> None:  # until the test's end: only a read timeout ends it
        send(handler, kind.events(TEXTS)[:4])
        server.release.wait(600)

    server.answer = stall
    async with asyncio.timeout(30):  # the call's 0.3 s read timeout, and a wide margin
        deltas, error = await failed(providers(kind, server.url), timeout_s=0.3)
    assert deltas == TEXTS[: len(deltas)] and deltas
    assert error.kind == "timeout"
    assert error.message == "no data within 0.3 s (ReadTimeout)"


@pytest.mark.parametrize(
    "data",
    ['{"choices": [{"delta": {"content": 42}}]}', "{not json", '["a", "list"]'],
    ids=["wrong-type", "not-json", "not-an-object"],
)
async def test_a_malformed_chunk_is_a_server_error_that_describes_it(data, server, providers):
    events = OPENAI.events(TEXTS)
    server.answer = lambda handler: send(handler, [*events[:3], sse(data), *events[3:]])
    deltas, error = await failed(providers(OPENAI, server.url))
    assert deltas == TEXTS[:2]
    assert (error.kind, error.status_code) == ("server_error", 200)
    assert error.message.startswith("provider sent an unexpected stream event (")
    assert data not in error.message


async def test_an_anthropic_text_delta_without_text_is_a_server_error(server, providers):
    events = anthropic_events(TEXTS)
    bad = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta"}}
    server.answer = lambda handler: send(handler, [*events[:4], sse(bad), *events[4:]])
    _, error = await failed(providers(ANTHROPIC, server.url))
    assert error.kind == "server_error"
    assert "a text_delta has no text" in error.message


async def test_a_caller_that_stops_early_closes_the_connection(server, providers):
    def answer(handler: _Handler) -> None:
        send(handler, OPENAI.events(TEXTS)[:2])
        if handler.rfile.read(1) == b"":  # nothing more is sent: wait for the client to go
            server.hung_up.set()

    server.answer = answer
    stream = providers(OPENAI, server.url).stream(REQUEST, 5)
    assert await anext(stream) == TEXTS[0]
    await stream.aclose()
    assert await asyncio.to_thread(server.hung_up.wait, 5)


# ---- the size limit ---------------------------------------------------------------------


@each_kind
async def test_a_stream_over_max_response_bytes_fails_as_too_large(kind, server, providers):
    events = kind.events(["word "] * 5000)  # 25,000 bytes of text
    server.answer = lambda handler: send(handler, events)
    provider = providers(kind, server.url, name="wordy", max_response_bytes=16 * 1024)
    deltas, error = await failed(provider)
    assert deltas == ["word "] * len(deltas) and len(deltas) < 5000  # never the whole answer
    assert len("".join(deltas)) <= 16 * 1024  # nothing past the limit was passed on
    assert (error.kind, error.status_code) == ("response_too_large", 200)
    assert "max_response_bytes (16384 bytes decoded)" in error.message
    assert error.message.endswith("raise max_response_bytes in [providers.wordy]")


@each_kind
async def test_the_limit_is_on_the_answer_not_on_the_streams_framing(kind, server, providers):
    """A streamed answer may be as long as a whole one: its events' framing, many times its
    text, does not count."""
    events = kind.events(["word "] * 5000)
    assert len("".join(events).encode()) > 10 * 25_000
    server.answer = lambda handler: send(handler, events)
    deltas, _ = await streamed(providers(kind, server.url, max_response_bytes=25_000))
    assert deltas == ["word "] * 5000


@each_kind
async def test_a_stream_of_exactly_max_response_bytes_is_read(kind, server, providers):
    events = kind.events(TEXTS)
    size = len("".join(TEXTS).encode())
    server.answer = lambda handler: send(handler, events)
    deltas, _ = await streamed(providers(kind, server.url, max_response_bytes=size))
    assert deltas == TEXTS
    _, error = await failed(providers(kind, server.url, max_response_bytes=size - 1))
    assert error.kind == "response_too_large"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param([b"data: ", *[b"x" * 65536] * (32 * 16)], id="one-line-never-ends"),
        # data: lines of 64 KiB, none of them over the limit, and no blank line to end their
        # event: httpx-sse keeps every one, so the bound is on the event. Counted per line,
        # a worker held 1.8 GB after five seconds of such a stream.
        *(
            pytest.param([b"data: " + b"x" * 65536 + end] * (32 * 16), id=f"lines-{name}")
            for name, end in (("lf", b"\n"), ("crlf", b"\r\n"), ("cr", b"\r"))
        ),
    ],
)
async def test_an_event_that_never_ends_is_cut_at_the_limit_and_memory_stays_near_it(
    body, server, providers
):
    server.answer = lambda handler: send(handler, body)  # 32 MiB
    provider = providers(OPENAI, server.url, max_response_bytes=MiB)
    (_, error), peak = await with_peak_bytes(failed(provider))
    assert error.kind == "response_too_large"
    assert peak < 8 * MiB  # about the 1 MiB limit and one read; the 32 MiB would be 32+


def empty_tool_calls(kind: Kind, count: int) -> list[str]:
    """A stream beginning `count` tool calls of a byte or two each, in events of 100 calls
    (OpenAI's chunks) or one event each (Anthropic's blocks)."""
    if kind is ANTHROPIC:
        block = {"type": "tool_use", "id": "a", "name": "b", "input": {}}
        events = [anthropic_events([])[0]]
        for n in range(count):
            start = {"type": "content_block_start", "index": n, "content_block": block}
            events.append(sse(start, "content_block_start"))
        return events
    return [
        sse(openai_chunk({"tool_calls": [{"index": i} for i in range(n, n + 100)]}))
        for n in range(0, count, 100)
    ]


@pytest.mark.parametrize("kind", [OPENAI, ANTHROPIC], ids=lambda kind: kind.name)
async def test_a_stream_of_empty_tool_calls_is_cut_at_the_limit_and_memory_stays_near_it(
    kind, server, providers
):
    """Each call begun costs the worker its state, a few hundred bytes, whatever its own
    bytes: calls of a byte or two each made it hold hundreds of times max_response_bytes."""
    limit = 64 * 1024
    # As many calls as the limit has bytes (each counts one or two). Made before memory is
    # traced: the server runs in this process.
    body = "".join(empty_tool_calls(kind, limit)).encode()
    server.answer = lambda handler: send(handler, [body])
    provider = providers(kind, server.url, max_response_bytes=limit)

    async def drained() -> ProviderError:
        with pytest.raises(ProviderError) as caught:
            async for _ in provider.stream(REQUEST, 30):
                pass
        return caught.value

    error, peak = await with_peak_bytes(drained())
    assert error.kind == "response_too_large"
    assert peak < 16 * limit, peak  # some reads and the calls within the limit; 300+ unbounded


async def test_many_events_each_under_the_limit_are_read_whatever_their_line_ends(
    server, providers
):
    """Events with every framing, together past the limit and its room for framing, each
    under it: each is counted alone, from the blank line that ended the one before."""
    texts = ["y" * 4000] * 300
    events = OPENAI.events(texts)
    events = [e.replace("\n", ("\n", "\r\n", "\r")[n % 3]) for n, e in enumerate(events)]
    assert sum(len(e) for e in events) > 1_200_000 + 16 * 1024
    server.answer = lambda handler: send(handler, events)
    deltas, _ = await streamed(providers(OPENAI, server.url, max_response_bytes=1_200_000))
    assert deltas == texts


async def test_a_line_over_the_limit_is_refused_even_when_it_ends(server, providers):
    events = OPENAI.events(TEXTS)
    # Just over the limit and a line's room for framing, then its line break.
    long_line = [b"data: " + b"x" * (MiB + 16 * 1024 + 100) + b"\n\n"]
    server.answer = lambda handler: send(handler, [events[0], *long_line, *events[1:]])
    deltas, error = await failed(providers(OPENAI, server.url, max_response_bytes=MiB))
    assert deltas == TEXTS[: len(deltas)] and error.kind == "response_too_large"


async def test_an_error_answer_over_the_limit_keeps_its_status_kind(server, providers):
    headers = {"content-type": "application/json"}
    server.answer = lambda handler: send(handler, [b"x" * 100_000], 503, headers)
    _, error = await failed(providers(OPENAI, server.url, max_response_bytes=1024))
    assert (error.kind, error.status_code) == ("server_error", 503)


# ---- credentials ------------------------------------------------------------------------


def key_echoes(kind: Kind) -> dict[str, Callable[[_Handler], None]]:
    """Answers that echo the kind's key: each must fail without the key in its message."""
    key = kind.key
    events = kind.events(TEXTS)
    json_type = {"content-type": "application/json"}
    return {
        "in-an-error-event": lambda h: send(h, [*events[:3], kind.error_event(f"bad key {key}")]),
        "in-a-401": lambda h: send(
            h, [json.dumps(kind.error_body(f"Incorrect API key provided: {key}"))], 401, json_type
        ),
        "in-a-malformed-event": lambda h: send(h, [*events[:3], sse(f'{{"{key}": [')]),
        "in-a-wrongly-typed-event": lambda h: send(
            h, [*events[:3], sse({"type": key, "choices": key, "error": None})]
        ),
        "in-the-content-type": lambda h: send(h, events, headers={"content-type": f"text/{key}"}),
        "in-a-malformed-header": lambda h: h.wfile.write(
            f"HTTP/1.0 200 OK\r\nnot a header {key}\r\n\r\n".encode()
        ),
    }


@pytest.mark.parametrize("where", list(key_echoes(OPENAI)))
@each_kind
async def test_the_key_never_appears_in_an_error_message(kind, where, server, providers):
    server.answer = key_echoes(kind)[where]
    _, error = await failed(providers(kind, server.url))
    assert_no_key(error, kind.key)


def test_an_openai_tool_call_streamed_in_many_small_pieces_is_held_in_about_its_own_size():
    """OpenAI (and Azure, and compatible servers) stream a tool call's arguments a few
    characters at a time, and each piece was held as a string of its own until [DONE]: about 30
    bytes for every 2 of arguments, in one worker, for one stream."""
    from httpx_sse import ServerSentEvent

    from schemas.wire import ToolCall
    from workers.openai import ChatStream

    text = json.dumps({"digits": "0123456789" * 20_000})
    pieces = [text[i : i + 2] for i in range(0, len(text), 2)]

    def chunk(function: dict[str, Any], first: bool = False) -> ServerSentEvent:
        call = {"index": 0, "function": function} | (
            {"id": "call_1", "type": "function"} if first else {}
        )
        delta = {"choices": [{"index": 0, "delta": {"tool_calls": [call]}}], "model": "m"}
        return ServerSentEvent(data=json.dumps(delta))

    reader = ChatStream("openai", "m")
    reader.read(chunk({"name": "get_digits", "arguments": ""}, first=True))
    events = [chunk({"arguments": piece}) for piece in pieces]
    tracemalloc.start()
    try:
        for event in events:
            reader.read(event)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 2 * len(text), f"{held} bytes held for {len(text)} bytes of arguments"
    finish = {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}
    reader.read(ServerSentEvent(data=json.dumps(finish)))
    ok = reader.read(ServerSentEvent(data="[DONE]"))
    assert isinstance(ok, ProviderOk)
    assert ok.tool_calls == [ToolCall("call_1", "get_digits", text)]
