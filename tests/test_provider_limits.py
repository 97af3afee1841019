"""What no provider answer can make a worker do: hold more than max_response_bytes, or quote a
credential.

The size limits run against a real HTTP server on 127.0.0.1 (a 50 MB answer, a gzip bomb
that expands to 1 GiB), with each kind's documented answer shape, and measure the worker's
memory with tracemalloc. The credential checks feed each HTTP kind bodies that echo its key
in every place a provider or a proxy in front of it might.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import threading
import tracemalloc
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import msgspec
import pytest
from helpers import LocalHTTPServer, MockServer, expect_failure, serving
from test_provider_anthropic import MESSAGE
from test_provider_openai import COMPLETION

from schemas import ChatMessage, ProviderOk, ProviderRequest
from schemas.wire import ERROR_KINDS, ToolCall, ToolCallDelta, classify_status
from workers.anthropic import AnthropicProvider, AnthropicSettings
from workers.azure_openai import AzureOpenAIProvider, AzureOpenAISettings
from workers.base import DEFAULT_MAX_RESPONSE_BYTES, HttpProvider, ProviderError
from workers.fake import FakeProvider, FakeSettings
from workers.openai import OpenAIProvider, OpenAISettings
from workers.scrubbing import Scrubber, scrub

MiB = 1024 * 1024
REQUEST = ProviderRequest(id="r1", messages=[ChatMessage("user", "Hello!")])


# ---- the kinds, each with its key and its documented answer ----------------------------


@dataclass(frozen=True)
class Kind:
    name: str  # also the label that starts its error messages
    key: str
    build: Callable[..., HttpProvider]  # build(base_url, client, **settings)

    def answer(self, text: str) -> dict[str, Any]:
        """The kind's documented success body, answering `text`."""
        if self.name == "anthropic":
            return {**MESSAGE, "content": [{"type": "text", "text": text}]}
        completion = json.loads(json.dumps(COMPLETION))
        completion["choices"][0]["message"]["content"] = text
        return completion

    def answer_around(self) -> tuple[bytes, bytes]:
        """The success body's bytes before and after its answer text, to stream a long answer
        between."""
        before, after = json.dumps(self.answer("\x00")).encode().split(b"\\u0000")
        return before, after


def _openai(base_url: str, client: httpx.AsyncClient | None, **settings: Any) -> HttpProvider:
    table = {"kind": "openai", "model": "gpt-4o-mini", "base_url": f"{base_url}/v1", **settings}
    return OpenAIProvider(
        msgspec.convert(table, OpenAISettings), client, environ={"OPENAI_API_KEY": OPENAI.key}
    )


def _azure(base_url: str, client: httpx.AsyncClient | None, **settings: Any) -> HttpProvider:
    table = {"kind": "azure_openai", "endpoint": base_url, "deployment": "gpt4o-prod", **settings}
    environ = {"AZURE_OPENAI_API_KEY": AZURE.key}
    return AzureOpenAIProvider(msgspec.convert(table, AzureOpenAISettings), client, environ=environ)


def _anthropic(base_url: str, client: httpx.AsyncClient | None, **settings: Any) -> HttpProvider:
    table = {
        "kind": "anthropic",
        "model": "claude-sonnet-4-20250514",
        "base_url": base_url,
        **settings,
    }
    environ = {"ANTHROPIC_API_KEY": ANTHROPIC.key}
    return AnthropicProvider(msgspec.convert(table, AnthropicSettings), client, environ=environ)


OPENAI = Kind("openai", "sk-proj-limits-Zq7xW2vB9nK4mT1r", _openai)
AZURE = Kind("azure_openai", "5f0c9e2ab7d14c83a6e1f2b3c4d5e6f7", _azure)
ANTHROPIC = Kind("anthropic", "sk-ant-api03-limits-Hs3kP8dQ2wX5", _anthropic)
KINDS = [OPENAI, AZURE, ANTHROPIC]
each_kind = pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.name)


@pytest.fixture
async def providers():
    """providers(kind, base_url, client=None, **settings): a provider, closed after the test."""
    built: list[HttpProvider] = []

    def build(
        kind: Kind, base_url: str, client: httpx.AsyncClient | None = None, **settings: Any
    ) -> HttpProvider:
        built.append(kind.build(base_url, client, **settings))
        return built[-1]

    yield build
    for provider in built:
        await provider.aclose()


# ---- a real HTTP server -----------------------------------------------------------------


class Server(LocalHTTPServer):
    """Answers every POST with `answer(handler)`; counts what it sent and whether the client hung
    up."""

    def __init__(self) -> None:
        super().__init__(_Handler)
        self.answer: Callable[[_Handler], None] = lambda handler: send(handler, 200, [b"{}"])
        self.request_headers: list[dict[str, str]] = []
        self.sent_bytes = 0
        self.hung_up = (
            threading.Event()
        )  # the client closed the connection before the server was done
        self.finished = threading.Event()  # the handler has returned
        self.release = threading.Event()  # set at teardown: ends any handler still waiting

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Server

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.server.request_headers.append({k.lower(): v for k, v in self.headers.items()})
        self.connection.settimeout(10)  # never block a test for long, whatever the client does
        try:
            self.server.answer(self)
        except (BrokenPipeError, ConnectionResetError):
            self.server.hung_up.set()
        finally:
            self.server.finished.set()

    def log_message(self, *args: object) -> None:
        pass


def send(
    handler: _Handler, status: int, chunks: Iterable[bytes], headers: dict[str, str] | None = None
) -> None:
    """Status, headers, then the body chunk by chunk (HTTP/1.0: without a Content-Length it ends
    at close)."""
    handler.send_response(status)
    for name, value in {"content-type": "application/json", **(headers or {})}.items():
        handler.send_header(name, value)
    handler.end_headers()
    for chunk in chunks:
        handler.wfile.write(chunk)
        handler.server.sent_bytes += len(chunk)


def wait_for_hang_up(handler: _Handler) -> None:
    """Send nothing more; return when the client closes the connection (or after the 10 s socket
    timeout)."""
    if handler.rfile.read(1) == b"":
        handler.server.hung_up.set()


@pytest.fixture
def server() -> Iterator[Server]:
    with serving(Server(), poll_interval_s=0.02) as server:
        yield server
        server.release.set()  # ends any handler still waiting


# ---- big answers and compression bombs --------------------------------------------------

GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"


def gzip_of(before: bytes, block: bytes, repeats: int, after: bytes) -> bytes:
    """gzip of before + block * repeats + after, made in about the time one block takes.

    After a full flush deflate starts afresh, so every copy of `block` compresses to the
    same bytes: they are repeated rather than compressed again (1 GiB of answer in ~1 MB).
    """
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = deflate.compress(before) + deflate.flush(zlib.Z_FULL_FLUSH)
    middle = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    tail = deflate.compress(after) + deflate.flush()
    crc = zlib.crc32(before)
    for _ in range(repeats):
        crc = zlib.crc32(block, crc)
    size = len(before) + len(block) * repeats + len(after)
    trailer = zlib.crc32(after, crc).to_bytes(4, "little") + (size % 2**32).to_bytes(4, "little")
    return GZIP_HEADER + head + middle * repeats + tail + trailer


def test_gzip_of_makes_a_valid_gzip_stream():
    assert gzip.decompress(gzip_of(b"<", b"ab" * 1000, 5, b">")) == b"<" + b"ab" * 5000 + b">"


BOMB_BLOCK = b"a" * MiB


@pytest.fixture(scope="module")
def bombs() -> dict[str, tuple[bytes, bytes]]:
    """Per kind: (gzip, gzip-of-gzip) of its documented answer with 1 GiB of text in it."""
    made = {}
    for kind in KINDS:
        before, after = kind.answer_around()
        once = gzip_of(before, BOMB_BLOCK, 1024, after)
        made[kind.name] = (once, gzip.compress(once, 9))
    return made


async def failure_and_peak_bytes(provider: HttpProvider) -> tuple[ProviderError, int]:
    """The call's ProviderError, and the most memory Python held at once while it ran."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        error = await expect_failure(provider, REQUEST)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return error, peak


# The memory bound asserted: about the limit (4 MiB) plus one network read, with room to
# spare. Reading a 50 MB answer whole needs 50 MB; httpx's own gzip decoding measured
# 148 MB for the single bomb below and 2.2 GB for the double one.
PEAK_LIMIT_BYTES = 16 * MiB


def assert_too_large(error: ProviderError, status: int = 200) -> None:
    assert (error.kind, error.status_code) == ("response_too_large", status)
    assert (
        "max_response_bytes" in error.message
        and f"({DEFAULT_MAX_RESPONSE_BYTES} bytes" in error.message
    )
    assert "max_tokens" in error.message  # says what to do about it


@each_kind
async def test_a_50_mb_answer_fails_as_too_large_and_memory_stays_near_the_limit(
    kind, server, providers
):
    before, after = kind.answer_around()
    total = len(before) + 50 * MiB + len(after)
    chunks = [before, *[b"a" * 65536] * (50 * 16), after]
    server.answer = lambda handler: send(
        handler, 200, chunks
    )  # no Content-Length: read until the server closes
    error, peak = await failure_and_peak_bytes(providers(kind, server.url))
    assert_too_large(error)
    assert peak < PEAK_LIMIT_BYTES
    assert (
        server.finished.wait(5) and server.hung_up.is_set()
    )  # the worker stopped reading and hung up
    assert server.sent_bytes < total


@each_kind
async def test_a_content_length_over_the_limit_is_refused_before_any_of_the_body_is_read(
    kind, server, providers
):
    def headers_only(handler: _Handler) -> None:
        send(handler, 200, [], {"content-length": str(50 * MiB)})
        wait_for_hang_up(handler)

    server.answer = headers_only
    # A worker that read on would wait for a body that never comes, and fail as a timeout.
    error = await expect_failure(providers(kind, server.url, timeout_s=3), REQUEST)
    assert_too_large(error)
    assert server.hung_up.wait(5) and server.sent_bytes == 0


@each_kind
async def test_a_gzip_bomb_fails_as_too_large_and_memory_stays_near_the_limit(
    kind, server, providers, bombs
):
    bomb, _ = bombs[kind.name]
    assert (
        len(bomb) < DEFAULT_MAX_RESPONSE_BYTES
    )  # its Content-Length passes: the decoded size must be counted
    headers = {"content-encoding": "gzip", "content-length": str(len(bomb))}
    server.answer = lambda handler: send(handler, 200, [bomb], headers)
    error, peak = await failure_and_peak_bytes(providers(kind, server.url))
    assert_too_large(error)
    assert peak < PEAK_LIMIT_BYTES


@each_kind
async def test_a_2_kb_double_gzip_bomb_of_1_gib_fails_as_too_large_and_memory_stays_near_the_limit(
    kind, server, providers, bombs
):
    _, bomb = bombs[kind.name]
    assert len(bomb) < 10_000
    headers = {"content-encoding": "gzip, gzip", "content-length": str(len(bomb))}
    server.answer = lambda handler: send(handler, 200, [bomb], headers)
    error, peak = await failure_and_peak_bytes(providers(kind, server.url))
    assert_too_large(error)
    assert peak < PEAK_LIMIT_BYTES


@each_kind
@pytest.mark.parametrize("status, kind_of_status", [(500, "server_error"), (429, "rate_limit")])
@pytest.mark.parametrize("declared", [False, True], ids=["read", "content-length"])
async def test_an_error_answer_is_capped_too_and_keeps_the_kind_of_its_status_and_retry_after(
    kind, server, providers, status, kind_of_status, declared
):
    """A 429 over max_response_bytes kept its kind but lost its Retry-After: the dispatcher
    waited by its own backoff instead of the provider's word."""
    body = json.dumps({"error": {"message": "x" * (8 * MiB), "type": "server_error"}}).encode()
    headers = {**_retry_after(status), **({"content-length": str(len(body))} if declared else {})}
    server.answer = lambda handler: send(handler, status, [body], headers)
    error = await expect_failure(providers(kind, server.url), REQUEST)
    assert (error.kind, error.status_code) == (kind_of_status, status)
    assert error.retry_after_s == (7.0 if status == 429 else None)
    assert "max_response_bytes" in error.message and "left unread" in error.message


@each_kind
@pytest.mark.parametrize("status, kind_of_status", [(500, "server_error"), (429, "rate_limit")])
async def test_a_long_error_answer_is_not_read_as_json_and_keeps_the_kind_of_its_status(
    kind, server, providers, status, kind_of_status
):
    """An error body of 1 MiB of empty lists, within max_response_bytes: read as JSON, and
    written back as JSON to quote 300 characters of it, it took 20 times its size and held the
    worker's event loop, every other call on it waiting, for a third of a second."""
    body = b'{"error": {"message": null}, "detail": [' + b", ".join([b"[]"] * (MiB // 4)) + b"]}"
    server.answer = lambda handler: send(handler, status, [body])
    error, peak = await failure_and_peak_bytes(providers(kind, server.url))
    assert (error.kind, error.status_code) == (kind_of_status, status)
    assert error.message.startswith(
        f'{kind.name} {status}: {{"error": {{"message": null}}, "detail": [[], []'
    )
    assert peak < 4 * MiB, peak  # the body read, and a copy; read as JSON, 20 MiB


# A long error answer keeps the kind its fields name. Read as JSON only up to 64 KiB (above),
# one longer was classified by its status alone: OpenAI's context_length_exceeded became a
# bad_request, and the route's decision depended on how much the provider (or a proxy) wrote.
ECHOED_PROMPT = "Summarise this: " + "lorem ipsum dolor sit amet " * 4000  # ~105 KiB


def long_error(kind: Kind) -> tuple[int, dict[str, Any], str]:
    """The kind's documented error body naming a kind its status does not: (status, body,
    the kind it names)."""
    if kind is OPENAI:
        message = "This model's maximum context length is 128000 tokens. However, your messages"
        error = {"message": message, "type": "invalid_request_error", "param": "messages"}
        return 400, {"error": {**error, "code": "context_length_exceeded"}}, "context_length"
    if kind is AZURE:
        error = {
            "message": "The response was filtered due to the prompt triggering Azure OpenAI's "
            "content management policy.",
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": {"code": "ResponsibleAIPolicyViolation"},
        }
        return 400, {"error": error}, "content_filter"
    message = "prompt is too long: 212000 tokens > 200000 maximum"
    error = {"type": "invalid_request_error", "message": message}
    return 400, {"type": "error", "error": error, "request_id": "req_011C"}, "context_length"


def echoed_request() -> dict[str, Any]:
    """A request as a gateway echoes it: "type" and "code" keys that are not the error's."""
    text = {"type": "text", "text": ECHOED_PROMPT}
    code = {"type": "object", "properties": {"code": {"type": "string"}}}
    tool = {"type": "function", "function": {"name": "run", "parameters": code}}
    return {"messages": [{"role": "user", "content": [text]}], "tools": [tool]}


LONG_LAYOUTS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    # the provider quotes the prompt in its message, before the code (OpenAI's key order)
    "prompt-in-the-message": lambda body: {
        **body,
        "error": {**body["error"], "message": f"{body['error']['message']}: {ECHOED_PROMPT}"},
    },
    "request-echoed-first": lambda body: {"request": echoed_request(), **body},
    "padded-by-a-proxy": lambda body: {**body, "padding": [[]] * (MiB // 4)},  # 1 MiB
}


@each_kind
@pytest.mark.parametrize("layout", LONG_LAYOUTS)
async def test_a_long_error_answer_keeps_the_kind_its_code_or_type_names(
    kind, layout, server, providers
):
    status, body, named = long_error(kind)
    data = json.dumps(LONG_LAYOUTS[layout](body)).encode()
    assert len(data) > 64 * 1024
    server.answer = lambda handler: send(handler, status, [data])
    error, peak = await failure_and_peak_bytes(providers(kind, server.url))
    assert (error.kind, error.status_code) == (named, status)
    said = body["error"]["message"]
    if layout == "prompt-in-the-message":  # too long to read: quoted from the body's start
        assert error.message.startswith(f"{kind.name} {status}: {{")
        assert said in error.message and len(error.message) <= 300
    else:
        assert error.message == f"{kind.name} {status}: {said}"
    assert peak < 4 * MiB, peak  # the body read, and a copy; read as JSON, 20 MiB


def stream_of(kind: Kind, error: dict[str, Any]) -> bytes:
    """A streamed answer that fails at once with `error` (the value of its error field)."""
    if kind is ANTHROPIC:
        event = json.dumps({"type": "error", "error": error})
        return f"event: error\ndata: {event}\n\n".encode()
    return f"data: {json.dumps({'error': error})}\n\n".encode()


@each_kind
async def test_a_long_error_event_keeps_the_kind_its_code_or_type_names(kind, server, providers):
    _, body, named = long_error(kind)
    error = LONG_LAYOUTS["prompt-in-the-message"](body)["error"]
    data = stream_of(kind, error)
    headers = {"content-type": "text/event-stream"}
    server.answer = lambda handler: send(handler, 200, [data], headers)
    with pytest.raises(ProviderError) as caught:
        async for _ in providers(kind, server.url).stream(REQUEST, timeout_s=5):
            pass
    failure = caught.value
    assert (failure.kind, failure.status_code) == (named, 200)
    assert failure.message.startswith(f"{kind.name} failed mid-stream: ")
    assert body["error"]["message"] in failure.message and len(failure.message) <= 300


async def test_bytes_after_the_end_of_a_gzip_stream_count_against_the_limit(server, providers):
    body = gzip.compress(json.dumps(OPENAI.answer("hi")).encode()) + b"\x00" * (2 * MiB)
    server.answer = lambda handler: send(handler, 200, [body], {"content-encoding": "gzip"})
    error = await expect_failure(providers(OPENAI, server.url, max_response_bytes=MiB), REQUEST)
    assert error.kind == "response_too_large"


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
async def test_an_answer_of_exactly_max_response_bytes_is_read_and_one_byte_more_is_not(
    encoding, server, providers
):
    body = json.dumps(OPENAI.answer("exactly")).encode()
    wire = gzip.compress(body) if encoding == "gzip" else body
    server.answer = lambda handler: send(handler, 200, [wire], {"content-encoding": encoding})
    ok = await providers(OPENAI, server.url, max_response_bytes=len(body)).complete(
        REQUEST, timeout_s=5
    )
    assert ok.content == "exactly"
    error = await expect_failure(
        providers(OPENAI, server.url, max_response_bytes=len(body) - 1), REQUEST
    )
    assert error.kind == "response_too_large"


def _calling(kind: Kind, calls: int) -> bytes:
    """The kind's documented success body, its answer `calls` calls of a tool without
    parameters, written as briefly as each kind allows."""
    if kind.name == "anthropic":
        call = {"type": "tool_use", "id": "t", "name": "f", "input": {}}
        body = {**MESSAGE, "content": [call] * calls, "stop_reason": "tool_use"}
    else:
        body = json.loads(json.dumps(COMPLETION))
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"function": {"name": "f"}}],
        }
        body["choices"][0]["message"] = message
        body["choices"][0]["finish_reason"] = "tool_calls"
    data = json.dumps(body, separators=(",", ":")).encode()
    if kind.name == "anthropic":
        return data
    one = b'{"function":{"name":"f"}}'
    return data.replace(one, b",".join([one] * calls))


@each_kind
async def test_an_answer_of_more_tool_calls_than_max_response_bytes_holds_is_too_large(
    kind, server, providers
):
    """A 4 MiB answer of 160,000 empty tool calls (25 bytes each in OpenAI's shape) was read
    whole, and making, scrubbing and encoding so many calls held the worker's event loop for
    a third of a second or more, for a reply ten times max_payload. Each call counts 512
    bytes against max_response_bytes, its bookkeeping, as in a stream: the answer is
    response_too_large, saying why; a few hundred calls are read as ever."""
    one, each = len(_calling(kind, 1)), len(_calling(kind, 2)) - len(_calling(kind, 1))
    many = _calling(kind, 1 + (DEFAULT_MAX_RESPONSE_BYTES - one) // each)
    assert DEFAULT_MAX_RESPONSE_BYTES - each < len(many) <= DEFAULT_MAX_RESPONSE_BYTES
    server.answer = lambda handler: send(handler, 200, [many])
    error = await expect_failure(providers(kind, server.url), REQUEST)
    assert (error.kind, error.status_code) == ("response_too_large", 200)
    assert "tool calls" in error.message and "max_response_bytes (4194304" in error.message
    few = _calling(kind, 300)
    server.answer = lambda handler: send(handler, 200, [few])
    ok = await providers(kind, server.url).complete(REQUEST, timeout_s=5)
    assert ok.tool_calls is not None and len(ok.tool_calls) == 300


@pytest.mark.parametrize(
    "compress",
    [gzip.compress, zlib.compress, lambda data: zlib.compress(data, wbits=-zlib.MAX_WBITS)],
    ids=["gzip", "deflate", "raw-deflate"],
)
@each_kind
async def test_gzip_and_deflate_answers_are_decoded(kind, compress, server, providers):
    encoding = "gzip" if compress is gzip.compress else "deflate"
    text = (
        random.Random(7).randbytes(300_000).hex()
    )  # compresses to ~300 KB: several network reads and pieces
    body = compress(json.dumps(kind.answer(text)).encode())
    server.answer = lambda handler: send(handler, 200, [body], {"content-encoding": encoding})
    ok = await providers(kind, server.url).complete(REQUEST, timeout_s=5)
    assert ok.content == text
    assert (
        server.request_headers[0]["accept-encoding"] == "gzip, deflate"
    )  # never br or zstd: no bound for those


# A body the worker cannot decode: a 200 is a server_error, but an error status still says what
# failed. A 429 was a server_error without its Retry-After, and a 401 was retried.
unreadable_statuses = pytest.mark.parametrize(
    ("status", "kind", "retry_after_s"),
    [(200, "server_error", None), (429, "rate_limit", 7.0), (401, "auth", None)],
)


def _retry_after(status: int) -> dict[str, str]:
    return {"retry-after": "7"} if status == 429 else {}


@unreadable_statuses
async def test_an_encoding_the_worker_did_not_ask_for_is_a_server_error_unless_its_status_says_more(
    server, providers, status, kind, retry_after_s
):
    headers = {"content-encoding": "br", **_retry_after(status)}
    server.answer = lambda handler: send(handler, status, [b"\x1b\x00"], headers)
    error = await expect_failure(providers(OPENAI, server.url), REQUEST)
    assert (error.kind, error.status_code, error.retry_after_s) == (kind, status, retry_after_s)
    assert "Content-Encoding br" in error.message


@unreadable_statuses
async def test_a_corrupt_gzip_body_is_a_server_error_unless_its_status_says_more(
    server, providers, status, kind, retry_after_s
):
    headers = {"content-encoding": "gzip", **_retry_after(status)}
    server.answer = lambda handler: send(handler, status, [b"not gzip at all"], headers)
    error = await expect_failure(providers(OPENAI, server.url), REQUEST)
    assert (error.kind, error.status_code, error.retry_after_s) == (kind, status, retry_after_s)
    assert "does not decode" in error.message


async def test_a_body_cut_short_is_a_connection_error(server, providers):
    server.answer = lambda handler: send(
        handler, 200, [b'{"choices": ['], {"content-length": "1000"}
    )
    error = await expect_failure(providers(OPENAI, server.url), REQUEST)
    assert error.kind == "connection"


async def test_a_body_that_stops_coming_is_a_timeout(server, providers):
    def stall(handler: _Handler) -> None:  # until the test's end: only a read timeout ends it
        send(handler, 200, [b'{"choices": ['], {"content-length": "1000"})
        server.release.wait(600)

    server.answer = stall
    async with asyncio.timeout(30):  # the call's 0.3 s read timeout, and a wide margin
        with pytest.raises(ProviderError) as caught:
            await providers(OPENAI, server.url).complete(REQUEST, timeout_s=0.3)
    assert caught.value.kind == "timeout"


# ---- the setting ------------------------------------------------------------------------


SETTINGS = {
    "openai": (OpenAISettings, {"kind": "openai", "model": "gpt-4o-mini"}),
    "azure_openai": (
        AzureOpenAISettings,
        {"kind": "azure_openai", "endpoint": "https://r.azure.com", "deployment": "d"},
    ),
    "anthropic": (AnthropicSettings, {"kind": "anthropic", "model": "claude-sonnet-4-20250514"}),
    "fake": (FakeSettings, {"kind": "fake"}),
}


@pytest.mark.parametrize("kind", SETTINGS)
def test_every_kind_takes_max_response_bytes_defaulting_to_4_mib(kind):
    settings_type, table = SETTINGS[kind]
    assert (
        msgspec.convert(table, settings_type).max_response_bytes
        == 4 * MiB
        == DEFAULT_MAX_RESPONSE_BYTES
    )
    assert (
        msgspec.convert({**table, "max_response_bytes": 1024}, settings_type).max_response_bytes
        == 1024
    )


@pytest.mark.parametrize("kind", SETTINGS)
@pytest.mark.parametrize("value", [0, -1, 1.5, "4MB"])
def test_a_max_response_bytes_that_is_not_a_positive_integer_is_refused_naming_it(kind, value):
    settings_type, table = SETTINGS[kind]
    with pytest.raises(msgspec.ValidationError, match="max_response_bytes"):
        msgspec.convert({**table, "max_response_bytes": value}, settings_type)


async def test_the_fake_provider_honours_max_response_bytes_too():
    settings = msgspec.convert(
        {"kind": "fake", "reply": "x" * 100, "max_response_bytes": 99}, FakeSettings
    )
    error = await expect_failure(FakeProvider(settings), REQUEST)
    assert (error.kind, error.status_code) == ("response_too_large", 200)
    settings = msgspec.convert(
        {"kind": "fake", "reply": "x" * 100, "max_response_bytes": 100}, FakeSettings
    )
    assert (await FakeProvider(settings).complete(REQUEST, timeout_s=1)).content == "x" * 100


def test_response_too_large_is_a_wire_error_kind():
    assert "response_too_large" in ERROR_KINDS


# ---- no credential in any message -------------------------------------------------------


def test_scrub_replaces_every_occurrence_raw_and_json_escaped():
    secret = 'k"ey\\é'
    text = (
        f"a {secret} b {json.dumps(secret)} c {json.dumps(secret, ensure_ascii=False)} d {secret}"
    )
    assert scrub(text, [secret]) == 'a *** b "***" c "***" d ***'


def test_scrub_finds_a_key_whose_slashes_a_json_writer_escaped():
    assert scrub('{"got": "sk-ab\\/cd"}', ["sk-ab/cd"]) == '{"got": "***"}'


def test_an_answers_every_text_is_scrubbed_and_one_without_a_key_is_kept_as_it_is():
    scrubber = Scrubber(["sk-1"])
    call = ToolCall("call_sk-1", "sk-1", '{"key": "sk-1"}')
    answer = ProviderOk("said sk-1", "model-sk-1", tool_calls=[call])
    assert scrubber.answer(answer) == ProviderOk(
        "said ***", "model-***", tool_calls=[ToolCall("call_***", "***", '{"key": "***"}')]
    )
    clean = ProviderOk("nothing here", "m", tool_calls=[ToolCall("c", "n")])
    assert scrubber.answer(clean) is clean
    assert scrubber.delta("a sk-1 b") == "a *** b"
    assert scrubber.delta(ToolCallDelta(0, "sk-1", None, "sk-1")) == ToolCallDelta(
        0, "***", None, "***"
    )
    assert not Scrubber(["", ""]) and Scrubber("key")


def test_scrub_skips_empty_secrets_and_takes_a_bare_string_as_one_secret():
    assert scrub("abc", ["", ""]) == "abc"
    assert scrub("abc key", "key") == "abc ***"


def test_scrub_replaces_the_longer_of_two_overlapping_secrets_whole():
    assert scrub("token-123-extra", ["token-123", "token-123-extra"]) == "***"


@each_kind
async def test_every_kind_lists_the_key_it_sends_as_its_secrets(kind, providers):
    assert providers(kind, "http://127.0.0.1:1").secrets == (kind.key,)


def test_a_keyless_openai_compatible_server_has_no_secrets():
    settings = msgspec.convert({"kind": "openai", "model": "m", "api_key_env": ""}, OpenAISettings)
    assert OpenAIProvider(settings, environ={}).secrets == ()


def unexpected_200s(key: str) -> dict[str, Any]:
    """200 bodies that are no documented answer and echo the key somewhere."""
    return {
        "key-as-only-field": {"echo": key},
        "key-as-a-field-name": {key: 1},
        "key-in-wrongly-typed-fields": {"choices": key, "content": key},
        "content-is-a-dict": {
            "choices": [{"message": {"content": {"echo": key}}}],
            "content": [{"type": "text", "text": {"echo": key}}],
        },
        "content-is-a-list": {
            "choices": [{"message": {"content": [key]}}],
            "content": [{"type": "text", "text": [key]}],
        },
        "model-is-a-dict": {
            "choices": [{"message": {"content": "hi"}}],
            "content": [{"type": "text", "text": "hi"}],
            "model": {"echo": key},
        },
        "usage-is-a-string": {
            "choices": [{"message": {"content": "hi"}}],
            "content": [{"type": "text", "text": "hi"}],
            "usage": key,
        },
        "a-json-string": key,
        "headers-echo": {
            "headers": {"Authorization": f"Bearer {key}", "api-key": key, "x-api-key": key}
        },
        "nested-too-deep": "[" * 100_000 + json.dumps(key) + "]" * 100_000,
        "not-json": f"<html><body>502 Bad Gateway (upstream got key {key})</body></html>",
    }


@pytest.mark.parametrize("shape", list(unexpected_200s("k")))
@each_kind
async def test_an_unexpected_200_describes_its_shape_and_never_quotes_the_key(
    kind, shape, providers
):
    body = unexpected_200s(kind.key)[shape]
    if shape == "a-json-string":
        body = json.dumps(body).encode()
    elif isinstance(body, str):
        body = body.encode()  # sent as is, not as a JSON string
    error = await expect_failure(
        providers(kind, "https://provider.test", mock_client(200, body)), REQUEST
    )
    assert (error.kind, error.status_code) == ("server_error", 200)
    assert error.message.startswith("provider returned an unexpected response body")
    assert_no_key(error, kind.key)
    assert "***" not in error.message  # described, not quoted (and so nothing to scrub)


def errors_echoing(key: str, label: str) -> dict[str, Any]:
    """Error bodies that echo the key, in the kinds' documented shape and in others."""
    before_cut = 290 - len(
        f"{label} 400: "
    )  # unscrubbed, the key would start 10 characters before the cut
    return {
        "in-error-message": {
            "error": {"message": f"Incorrect API key provided: {key}.", "type": "x", "code": None}
        },
        "in-a-nested-dict-message": {"error": {"message": {"detail": {"key": key}}, "type": "x"}},
        "in-a-list-message": {"error": {"message": ["bad key", key]}},
        "error-is-a-string": {"error": f"invalid key {key}"},
        "headers-echo": {
            "headers": {"Authorization": f"Bearer {key}", "api-key": key, "x-api-key": key}
        },
        "not-json": f"<html>denied for {key}</html>",
        "json-escaped": json.dumps({"error": {"message": json.dumps({"key": key})}}),
        "cut-at-the-limit": {"error": {"message": "x" * before_cut + key}},
        "nested-too-deep": "[" * 100_000 + json.dumps(key) + "]" * 100_000,
        # JSON that Python's json cannot read, the key's first letter \u-escaped in it.
        "escaped-in-a-number-too-long": '{"error": {"message": "invalid key '
        + f"\\u{ord(key[0]):04x}{key[1:]}"
        + '"}, "n": '
        + "9" * 5000
        + "}",
        "escaped-next-to-a-byte-not-utf8": b'{"error": {"message": "\xff invalid key '
        + f"\\u{ord(key[0]):04x}{key[1:]}".encode()
        + b'"}}',
        # Past 64 KiB a body is quoted from its start only, cut through the key here; all the
        # space before it, raw or escaped, goes when the message is made one line.
        "cut-where-a-long-body-is-quoted": " " * (64 * 1024 - 10) + key + " ...",
        "cut-after-escaped-spaces": "\\u0020" * ((64 * 1024 - 16) // 6) + key + " ...",
    }


@pytest.mark.parametrize("status", [400, 401, 429, 500, 503])
@pytest.mark.parametrize("shape", list(errors_echoing("k", "")))
@each_kind
async def test_an_error_answer_never_carries_the_key_and_still_says_what_failed(
    kind, shape, status, providers
):
    body = errors_echoing(kind.key, kind.name)[shape]
    error = await expect_failure(
        providers(kind, "https://provider.test", mock_client(status, body)), REQUEST
    )
    assert (error.kind, error.status_code) == (classify_status(status), status)
    assert error.message.startswith(f"{kind.name} {status}:")
    assert_no_key(error, kind.key)
    if shape not in (
        "cut-at-the-limit",
        "nested-too-deep",
        "cut-where-a-long-body-is-quoted",
        "cut-after-escaped-spaces",
    ):  # where the key is past the first 300 characters, or past the quote
        assert "***" in error.message  # the provider's text is kept, the key in it is not


@each_kind
async def test_a_key_echoed_in_a_response_header_stays_out_of_the_message(kind, server, providers):
    server.answer = lambda handler: send(handler, 200, [b"{}"], {"content-encoding": kind.key})
    error = await expect_failure(providers(kind, server.url), REQUEST)
    assert (error.kind, error.status_code) == ("server_error", 200)
    assert_no_key(error, kind.key)


@each_kind
async def test_a_key_echoed_in_a_malformed_header_line_stays_out_of_the_transport_error(
    kind, server, providers
):
    def malformed(handler: _Handler) -> None:
        handler.wfile.write(f"HTTP/1.0 200 OK\r\nnot a header {kind.key}\r\n\r\n{{}}".encode())

    server.answer = malformed
    error = await expect_failure(providers(kind, server.url), REQUEST)
    assert error.kind == "connection"
    assert_no_key(error, kind.key)


def mock_client(status: int, body: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(MockServer(status, body)))


def assert_no_key(error: ProviderError, key: str) -> None:
    """Neither the key nor any 8-character piece of it, in the message, str or repr."""
    for text in (error.message, str(error), repr(error)):
        assert not any(key[i : i + 8] in text for i in range(len(key) - 7)), text
