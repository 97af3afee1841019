"""What every provider kind implements, and the error mapping they share.

    ProviderError            a provider call failed; `kind` is one of schemas.ERROR_KINDS
    classify_status(code)    HTTP status -> error kind (429 rate_limit, 5xx server_error, ...)
    post_json(...)           one HTTP attempt, transport errors mapped to ProviderError, the
                             answer read up to max_response_bytes (decoded) and no further
    HttpProvider.stream      the same attempt answered as server-sent events, yielded as text
                             deltas then one ProviderOk (the kinds read their events: StreamReader)
    error_message(...)       a provider's error text, short, one line, never the API key
    scrub(text, secrets)     text with every credential value replaced by "***"

Workers make exactly one HTTP attempt per request: retries, fallback and deadlines
belong to the dispatcher, so nothing here retries. Whatever a provider answers, a worker
keeps at most max_response_bytes of it in memory and quotes none of its credentials.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import errno
import json
import math
import re
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator, Mapping
from contextlib import aclosing, contextmanager, suppress
from typing import Any, Protocol

import httpx
import msgspec
from httpx_sse import EventSource, ServerSentEvent, SSEError

# What EventSource.aiter_sse reads a stream with (see _events_of): private, but it is what the
# package does, line by line, and the readers' tests pin it (tests/test_provider_streaming.py).
from httpx_sse._api import _aiter_sse_lines
from httpx_sse._decoders import SSEDecoder
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from schemas import ProviderOk, ProviderRequest

# The one exception type and status mapping of providers, re-exported for the provider modules.
from schemas.errors import ProviderError, bounded_retry_after, classify_status
from schemas.wire import ToolCallDelta, delta_bytes
from workers.early_answers import EarlyAnswers
from workers.scrubbing import scrub

# The keys every provider table accepts, in a module of their own so that a plug-in's import
# (workers/plugin.py) loads no HTTP client.
from workers.settings import DEFAULT_MAX_RESPONSE_BYTES, ProviderSettings, shown_env_name

# What a streamed answer yields before its end: a piece of text, or a piece of a tool call.
Delta = str | ToolCallDelta


class Provider(Protocol):
    """One provider kind. `complete` makes one call and returns or raises ProviderError.

    A kind may also have `stream` (optional, so not a member here; HttpProvider has it):

        async def stream(self, request, timeout_s) -> AsyncIterator[Delta | ProviderOk]

    an async generator making the same one call, yielding the answer's text deltas (non-empty
    str) and tool-call deltas (ToolCallDelta) as they arrive and, last, one
    ProviderOk(content="", model, usage, tool_calls, finish_reason); it raises
    ProviderError on any failure, before or after deltas were yielded. A provider without
    `stream` is streamed by the runtime as one chunk: its `complete` answer.
    """

    model: str

    async def complete(self, request: ProviderRequest, timeout_s: float) -> ProviderOk: ...

    async def aclose(self) -> None: ...


_propagator = TraceContextTextMapPropagator()
_MESSAGE_LIMIT = 300
# The Content-Encodings a worker asks for: only those read_capped can decode with a bound. httpx
# would add br and zstd on its own if their packages happened to be installed.
_ACCEPT_ENCODING = "gzip, deflate"
_PIECE_BYTES = 64 * 1024  # the most one decompress step may produce
_EVENT_STREAM = "text/event-stream"
# What a streamed tool call begun costs against max_response_bytes besides its own bytes: the
# state its reader keeps for it (about 400 bytes), so that calls of a byte each cannot make a
# worker hold hundreds of times the limit.
_CALL_BYTES = 512


def _one_line(text: str) -> str:
    return " ".join(text.split())[:_MESSAGE_LIMIT]


def redact(error: ProviderError, secrets: Iterable[str]) -> ProviderError:
    """`error` itself, its message (and so its str and repr) scrubbed of `secrets`, one short
    line."""
    error.message = _one_line(scrub(error.message, secrets))
    error.args = (error.message,)
    return error


def retry_after_s(response: httpx.Response) -> float | None:
    """The Retry-After header in seconds, given as seconds or as an HTTP date (RFC 9110; a
    date past is 0), at most RETRY_AFTER_MAX_S; None without one, or for one that is neither,
    nan, inf or negative.

    Azure's retry-after-ms comes first when it holds a number: it is the finer of the two it
    sends, and the one the OpenAI and Azure SDKs wait by."""
    with suppress(ValueError):
        milliseconds = float(response.headers.get("retry-after-ms", "nan"))
        if (seconds := bounded_retry_after(milliseconds / 1000)) is not None:
            return seconds
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):  # a year or zone past a C int
            return None
        if when.tzinfo is None:  # -0000: UTC, said so by RFC 5322
            when = when.replace(tzinfo=datetime.UTC)
        seconds = max((when - datetime.datetime.now(datetime.UTC)).total_seconds(), 0.0)
    return bounded_retry_after(seconds)


def error_body(response: httpx.Response) -> dict[str, Any]:
    """The provider's JSON error object, or {} when the body is not JSON (or nested too deep,
    or holds a number too long, to read). A body too long to read as JSON gives the fields
    the kinds classify by (_long_error_fields), so that its kind does not hang on its size.

    The object is the body's `error`, or the body itself when it says it is one (vLLM's
    shape before it took OpenAI's wrapper, still answered by servers built on its protocol:
    {"object": "error", "message", "type", "param", "code"})."""
    if len(response.content) > _ERROR_READ_BYTES:
        return _long_error_body(response.content)
    try:
        body = response.json()
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, int digits
        return {}
    if not isinstance(body, dict):
        return {}
    error = body.get("error", body if body.get("object") == _UNWRAPPED else None)
    return error if isinstance(error, dict) else {}


def error_text(error: dict[str, Any], response: httpx.Response) -> str:
    """What the provider says went wrong: error.message, as JSON when it is not a string, else
    the body.

    The result quotes the provider, credentials included: pass it through error_message. A
    JSON body is quoted as rewritten by Python's json, so that however it escaped a key
    (`\\u0073k-...`), scrub finds it in one of the forms it knows.
    """
    if 300 <= response.status_code < 400:
        where = response.headers.get("location") or "nowhere it says"
        return (
            f"redirected to {where}, which the worker does not follow (the key would go "
            "along): point the provider's URL there if that is where it now answers"
        )
    text = _message_text(error)
    if text:
        return text
    if len(response.content) > _ERROR_READ_BYTES:
        return _start_of(response.content, response.encoding or "utf-8")
    if not response.content.strip():  # a proxy's 401 or 502 often has none: say so
        return "(empty body)"
    try:
        return json.dumps(response.json(), ensure_ascii=False)
    except (ValueError, RecursionError, TypeError):  # not JSON Python reads: its escapes undone
        return _JSON_ESCAPE.sub(_unescaped, response.text)


# A provider's error is a few hundred bytes. One far longer is not read as JSON: Python's json
# (as msgspec's untyped decoding) builds every value in it, 20 to 35 times its size, and a body
# of 4 MiB of empty lists held the worker's event loop, every other call on it waiting, for
# 1.2 s. Only the fields its kind is read from are (_long_error_fields); its start is quoted
# when its message is not one of them.
_ERROR_READ_BYTES = 64 * 1024
_WORD = re.compile(r"\S*")


def _start_of(data: bytes | msgspec.Raw, encoding: str = "utf-8") -> str:
    """The start of an error too long to read as JSON, quoted as error_text quotes a body it
    cannot read (its escapes undone), less its last word: the cut may have gone through a
    credential, whose first half scrub() would not know. A start that is all one word is
    kept: a word that long (thousands of characters, escapes undone) ends far past the 300
    characters a message keeps."""
    head = str(memoryview(data)[:_ERROR_READ_BYTES], encoding, "replace")
    head = _JSON_ESCAPE.sub(_unescaped, head)
    last_word = _WORD.match(head[::-1]).end()  # \S* matches, if only nothing
    return head if last_word == len(head) else head[: len(head) - last_word]


# A JSON string's escapes. A body Python's json cannot read (a number of 5,000 digits, nesting
# past the recursion limit, one byte that is not UTF-8) is quoted as text, and may still
# spell a key `\u0073k-...`: undone, every escape leaves a form scrub() knows.
_JSON_ESCAPE = re.compile(r'\\(u[0-9a-fA-F]{4}|["\\/bfnrt])')
_ESCAPED = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def _unescaped(match: re.Match[str]) -> str:
    code = match.group(1)
    if code[0] != "u":
        return _ESCAPED[code]
    char = chr(int(code[1:], 16))
    return "\ufffd" if "\ud800" <= char <= "\udfff" else char  # a half pair says nothing


# The fields of an error object the kinds classify by: OpenAI's and Azure's code (and Azure's
# innererror.code), Anthropic's type, and the message. Kept raw, and the rest of the object
# skipped, nothing in it is built: msgspec walks a 4 MiB body of empty lists in about 13 ms
# (Python's json took 1.2 s), as it walks the fields it skips in a 200. Wherever they stand:
# OpenAI writes code after a message that may echo the prompt, so a body's start may not hold
# it, and a prompt echoed first is full of "type" keys that are not the error's.
class _ErrorFields(msgspec.Struct):
    message: msgspec.Raw = msgspec.Raw()
    type: msgspec.Raw = msgspec.Raw()
    code: msgspec.Raw = msgspec.Raw()
    innererror: msgspec.Raw = msgspec.Raw()


class _InnerError(msgspec.Struct):
    code: msgspec.Raw = msgspec.Raw()


class _ErrorEnvelope(msgspec.Struct):
    error: msgspec.Raw = msgspec.Raw()
    object: msgspec.Raw = msgspec.Raw()  # "error": the body is the error object (error_body)


# What an error body that is itself the error object says it is (error_body).
_UNWRAPPED = "error"


_error_fields = msgspec.json.Decoder(_ErrorFields)
_inner_error = msgspec.json.Decoder(_InnerError)
_error_envelope = msgspec.json.Decoder(_ErrorEnvelope)


def _long_error_body(content: bytes) -> dict[str, Any]:
    """error_body of a body too long to read as JSON: _long_error_fields of its `error`, or
    of itself when it says it is the error object."""
    try:
        envelope = _error_envelope.decode(content)
    except (msgspec.DecodeError, RecursionError):  # not JSON, not an object, nested too deep
        return {}
    if not envelope.error and _short_value(envelope.object) == _UNWRAPPED:
        return _long_error_fields(content)
    return _long_error_fields(envelope.error)


def _long_error_fields(raw: bytes | msgspec.Raw) -> dict[str, Any]:
    """An error object too long to read as JSON, as a dict of those of its message, type, code
    and innererror.code that are short enough to read; {} when `raw` is not an object (or not
    JSON, or nested too deep). The kinds read it as they read a short one: by .get("code"),
    .get("type"), .get("message")."""
    try:
        error = _error_fields.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return {}
    fields = {
        name: value
        for name in ("message", "type", "code")
        if (value := _short_value(getattr(error, name))) is not None
    }
    with suppress(msgspec.DecodeError, RecursionError):  # one that is not an object says nothing
        if (code := _short_value(_inner_error.decode(error.innererror).code)) is not None:
            fields["innererror"] = {"code": code}
    return fields


def _short_value(raw: msgspec.Raw) -> Any:
    """A field's value, None when it is absent or null, too long to build (as a whole body
    is), or unreadable (msgspec refuses a lone surrogate Python's json would take)."""
    if not 0 < len(raw) <= _ERROR_READ_BYTES:
        return None
    try:
        return msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None


def stream_error(raw: msgspec.Raw) -> object:
    """An error event's `error` field, which the kinds' decoders keep raw: its value (None
    when absent or null), or, past _ERROR_READ_BYTES (or nested too deep), the start of its
    text; an object that long, _long_error_fields of it, its message that start when too long
    to read. A value that large is not built: decoded whole, a 4 MiB one of empty lists took
    200 MiB and the worker's event loop 0.6 s."""
    if len(raw) == 0:
        return None
    if len(raw) <= _ERROR_READ_BYTES:
        with suppress(RecursionError):
            return msgspec.json.decode(raw)
    fields = _long_error_fields(raw)
    if not fields:
        return _start_of(raw)
    if not fields.get("message"):  # none short enough to read: quoted as a string is
        fields["message"] = _start_of(raw)
    return fields


def event_error(event: ServerSentEvent) -> object:
    """What an event named error says failed, as stream_error reads an `error` field: its
    data's `error` (OpenAI's and Anthropic's shape), else its data (llama.cpp's `error:` line
    holds the error object itself), or its text when that is not a JSON object."""
    data = event.data.encode()
    try:
        error = stream_error(_error_envelope.decode(data).error)
    except (msgspec.DecodeError, RecursionError):  # not JSON, or no object: its text says it
        return event.data if len(data) <= _ERROR_READ_BYTES else _start_of(data)
    return error if error is not None else stream_error(msgspec.Raw(data))


def stream_error_text(error: object) -> str:
    """What an error event in a stream says went wrong: error.message as error_text reads it,
    else the error itself (a string as is, anything else as JSON).

    The result quotes the provider, credentials included: HttpProvider.stream scrubs it.
    """
    if isinstance(error, str) and error:
        return error
    text = _message_text(error) if isinstance(error, dict) else None
    if text:
        return text
    try:
        return json.dumps(error)
    except (RecursionError, TypeError, ValueError):
        return "no message"


def _message_text(error: dict[str, Any]) -> str | None:
    message = error.get("message")
    if isinstance(message, str) and message:
        return message
    if message:  # a dict, list or number: some gateways nest the real message
        try:
            return json.dumps(message)
        except RecursionError:
            pass
    return None


def decode_body(response: httpx.Response, decoder: msgspec.json.Decoder[Any]) -> Any:
    """The body as a kind's documented type, or ProviderError(server_error) saying how it differs.

    msgspec's errors name a type and a path (``Expected `str | null`, got `object` - at
    `$.choices[0].message.content` ``), never a value, as long as the type has no Literal,
    enum or forbid_unknown_fields: so the message describes the body without quoting it.
    """
    try:
        return decoder.decode(response.content)
    except (msgspec.DecodeError, RecursionError) as exc:  # ValidationError is a DecodeError
        raise unexpected_body(response, str(exc)) from exc


def http_client(
    base_url: str, headers: dict[str, str], timeout_s: float, max_connections: int = 256
) -> httpx.AsyncClient:
    """The one pooled client a worker keeps for its provider. httpx never retries on its own.
    Its pool takes as many connections as the worker takes calls (max_in_flight): a call
    admitted must not then wait for a connection until its deadline, a timeout that would
    count against a healthy provider; the worker's admission is the one limit."""
    client = httpx.AsyncClient(
        base_url=base_url,
        headers=headers,
        timeout=httpx.Timeout(timeout_s),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=64),
    )
    # An answer sent before the body is all written is read (workers/early_answers.py). httpx
    # takes no network backend, so its pool's is set; a transport of our own would do it, but
    # then httpx ignores the environment's proxies (HTTPS_PROXY, ...), whose connections keep
    # httpcore's backend (tests/test_http_providers.py pins both).
    client._transport._pool._network_backend = EarlyAnswers()  # type: ignore[attr-defined]
    return client


async def post_json(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    timeout_s: float,
    headers: dict[str, str] | None = None,
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
) -> httpx.Response:
    """One POST; transport failures become ProviderError(timeout | connection).

    The current trace context goes out as `traceparent`, so the provider call is part of
    the request's trace. The answer, error or not, comes back read and decoded, at most
    `max_response_bytes` of it: a longer one raises ProviderError(response_too_large) as
    soon as it passes the limit (see read_capped).
    """
    headers = {"Accept-Encoding": _ACCEPT_ENCODING, **(headers or {})}
    _propagator.inject(headers)
    with _transport_errors(timeout_s):
        async with client.stream(
            "POST", url, json=body, timeout=timeout_s, headers=headers
        ) as response:
            try:
                content = await read_capped(response, max_response_bytes)
            finally:
                await release(response)
    return _in_memory(response, content)


async def release(response: httpx.Response) -> None:
    """Keep the answer's connection for the next call only when nothing came past the answer.

    httpcore hands a kept-alive connection to the next request with whatever its HTTP parser
    (h11) had already read past the last answer: a body after a 204 or a 304, bytes past the
    Content-Length. That was read as the next request's answer: one client's answer served to
    another's request, audited ok (curl calls it "Excess found", and closes). So the
    connection is closed instead (the pool then drops it) when anything is left over, when
    the answer is no 200 (the calls that misbehave), or when the parser cannot be reached to
    tell (httpcore's internals: tests/test_http_providers.py pins them)."""
    if response.status_code == 200 and not _left_over(response):
        return
    stream = response.extensions.get("network_stream")
    if stream is not None:
        with suppress(Exception):  # closing what is broken already: nothing more to do
            await stream.aclose()


def _left_over(response: httpx.Response) -> bool:
    """Whether h11 holds bytes past this answer (True when it cannot be reached)."""
    try:  # httpx 0.28's stream -> httpcore 1.0's pool stream -> its HTTP/1.1 connection
        connection = response.stream._stream._httpcore_stream._stream._connection  # type: ignore[attr-defined]
        data, _ = connection._h11_state.trailing_data
    except AttributeError:  # HTTP/2, or other internals: never reused blind
        return True
    return bool(data)


@contextmanager
def _transport_errors(timeout_s: float, silence: str = "no answer") -> Iterator[None]:
    """httpx's transport failures in the block as ProviderError: a timeout (httpx's timeouts
    bound each wait: connect, and every read) as `timeout`, anything else that cut or refused
    the connection as `connection`. `silence` says what the timeout waited for."""
    try:
        yield
    except SSEError as exc:  # httpx-sse's, a TransportError: but the answer is no event stream
        raise ProviderError(
            "server_error", f"provider's answer is not an event stream: {exc}", 200
        ) from exc
    except httpx.TimeoutException as exc:
        raise ProviderError(
            "timeout", f"{silence} within {timeout_s:.3g} s ({type(exc).__name__})"
        ) from exc
    except httpx.TransportError as exc:
        if _out_of_files(exc):  # this worker's own limit, not the provider's failing
            raise ProviderError("rate_limit", _OUT_OF_FILES, retry_after_s=1.0) from exc
        raise ProviderError("connection", f"{type(exc).__name__}: {exc}{_to(exc)}") from exc


def _to(exc: httpx.TransportError) -> str:
    """Where the failed connection went (scheme, host and port: never user info, path or
    query): httpx's ConnectError says only "All connection attempts failed", and a base_url
    with nothing listening there is a config to check, not a provider down."""
    try:
        url = exc.request.url
    except RuntimeError:  # raised without its request
        return ""
    return f" ({url.scheme}://{url.netloc.decode('ascii')})"


_OUT_OF_FILES = (
    "this worker is out of file descriptors (EMFILE), so it could not open a connection to "
    "the provider: raise its open-files limit (`ulimit -n`, LimitNOFILE=, the container's "
    "nofile) or lower the provider's max_in_flight"
)


def _out_of_files(exc: BaseException) -> bool:
    """Whether an OS error of too many open files (this process's or the system's) lies under
    `exc`: httpx's ConnectError says only "All connection attempts failed" over it."""
    seen: set[int] = set()
    under: list[BaseException | None] = [exc]
    while under:
        one = under.pop()
        if one is None or id(one) in seen or len(seen) > 32:
            continue
        seen.add(id(one))
        if isinstance(one, OSError) and one.errno in (errno.EMFILE, errno.ENFILE):
            return True
        if isinstance(one, BaseExceptionGroup):
            under.extend(one.exceptions)
        under += (one.__cause__, one.__context__)
    return False


async def read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    """A streamed response's body, decoded; ProviderError(response_too_large) as soon as it
    passes `max_bytes`.

    The limit holds for the decoded body and for what came over the wire (so trailing junk
    after a gzip stream cannot run on either), and a Content-Length above it is refused
    before any of the body is read. Leaving the body unread is safe: closing the response
    closes its connection rather than returning it to the pool.

    Decoding happens here, from the raw bytes, not in httpx: httpx has no bound on decoded
    output (its gzip and deflate decoders call zlib without max_length, and neither the
    client nor the response takes a limit), so one 64 KiB network read of a gzip bomb came
    out as one 66 MB chunk, and `Content-Encoding: gzip, gzip` turned 2.5 KB into one 1 GiB
    chunk (httpx 0.28.1: 148 MB and 2.2 GB peak memory before a 4 MiB limit could be
    checked). zlib's own max_length bounds every step to _PIECE_BYTES instead: about
    `max_bytes` plus one network read is ever held (5-6 MiB measured for a 4 MiB limit,
    for a 50 MB answer and for both bombs).
    """
    body = bytearray()
    async for piece in _capped_pieces(response, max_bytes):
        body += piece
    return bytes(body)


async def _capped_pieces(
    response: httpx.Response, max_bytes: int, per_line: bool = False
) -> AsyncIterator[bytes]:
    """A streamed response's body as it comes, decoded, each piece at most _PIECE_BYTES; the
    checks of read_capped (which keeps the pieces) and of a stream's events (which do not).

    `per_line` (an event stream): the bound is on each event (the lines up to a blank one),
    not on the whole body. An event stream is held an event at a time (httpx-sse keeps every
    data: line until the blank line that ends its event), and its framing (about 200 bytes
    per token in OpenAI's chunks) is no part of the answer, whose own size
    HttpProvider.stream bounds."""
    if not per_line and _declared_bytes(response) > max_bytes:
        raise _too_large(response, max_bytes)
    layers = _inflaters(response)
    body_bytes = wire_bytes = 0
    last = b""  # the byte before a piece: a blank line may begin in one piece and end in the next
    async for chunk in response.aiter_raw():
        wire_bytes += len(chunk)
        if wire_bytes > max_bytes and not per_line:
            raise _too_large(response, max_bytes)
        try:
            for piece in _decoded(chunk, layers):
                if per_line:
                    body_bytes = _event_bytes(body_bytes, last, piece, max_bytes + _EVENT_ROOM)
                    if body_bytes < 0:
                        raise _too_large(response, max_bytes)
                    last = piece[-1:]
                    yield piece
                    continue
                body_bytes += len(piece)
                if body_bytes > max_bytes:
                    raise _too_large(response, max_bytes)
                yield piece
        except zlib.error as exc:
            encoding = response.headers.get("content-encoding")
            raise _unreadable(
                response, f"provider's {encoding} body does not decode: {exc}"
            ) from exc


def _unreadable(response: httpx.Response, message: str) -> ProviderError:
    """A body the worker cannot decode: a server_error for a 200, but an HTTP error status
    still says what failed (a 429 stays a rate limit, with its Retry-After; a 401 an auth
    error, which is not retried), as for a body over max_response_bytes."""
    status = response.status_code
    if status >= 400:
        return ProviderError(
            classify_status(status),
            f"provider answered HTTP {status} with a body the worker cannot read: {message}",
            status,
            retry_after_s(response),
        )
    return ProviderError("server_error", message, status)


# What one event of a stream may hold beyond max_response_bytes: its framing.
_EVENT_ROOM = 16 * 1024
# Two line ends in a row (CR, LF or CRLF each): an empty line, which ends an event.
_BLANK_LINE = re.compile(rb"\n\n|\r\r|\n\r")


def _event_bytes(before: int, last: bytes, piece: bytes, limit: int) -> int:
    """The bytes of the event still open after `piece` (`before` of it read already, `last`
    the byte before `piece`), or -1 when an event is over `limit`. The blank lines are looked
    for only once the open event might be over _EVENT_ROOM: until then it is counted with
    every event before it, which is cheaper and can only count too much."""
    total = before + len(piece)
    if total <= _EVENT_ROOM:
        return total
    data = last + piece
    ends = [match.end() for match in _BLANK_LINE.finditer(data)]
    if not ends:
        return total if total <= limit else -1
    if before + ends[0] - len(last) > limit:  # the event that ends here
        return -1
    open_bytes = len(data) - ends[-1]
    return open_bytes if open_bytes <= limit else -1


def _too_large(response: httpx.Response, max_bytes: int) -> ProviderError:
    """response_too_large for this answer, an error status's Retry-After kept."""
    status = response.status_code
    return response_too_large(status, max_bytes, retry_after_s(response) if status >= 400 else None)


def response_too_large(
    status_code: int | None, max_bytes: int, retry_after: float | None = None
) -> ProviderError:
    """The answer is over max_response_bytes: the message says the limit and the two ways out.

    An HTTP error status still says more than the size of its body: a 429 stays a rate limit,
    with its Retry-After (`retry_after`), as when its body cannot be decoded (_unreadable)."""
    if status_code is not None and status_code >= 400:
        return ProviderError(
            classify_status(status_code),
            f"provider answered HTTP {status_code} with a body over "
            f"max_response_bytes ({max_bytes} bytes decoded), left unread",
            status_code,
            retry_after,
        )
    return ProviderError(
        "response_too_large",
        f"provider answer is over max_response_bytes ({max_bytes} bytes decoded): "
        f"ask for fewer max_tokens, or {_RAISE_LIMIT}",
        status_code,
    )


# How a response_too_large message ends, for in_table to say where: the helpers that find an
# answer too large know the limit, not the provider's name, which only its config gives.
_RAISE_LIMIT = "raise max_response_bytes"


def in_table(error: ProviderError, name: str) -> ProviderError:
    """`error` itself, its message, when it asks for a setting of the provider's (an answer
    over max_response_bytes, a worker out of file descriptors), naming the table to change it
    in: [providers.<name>] (`name` empty: a provider made without one)."""
    if name and error.message.endswith((_RAISE_LIMIT, _OUT_OF_FILES)):
        error.message += f" in [providers.{name}]"
        error.args = (error.message,)
    return error


def _counted(answer: ProviderOk, max_bytes: int) -> ProviderOk:
    """`answer`, counted against max_response_bytes as a stream's deltas are: its text, each
    tool call's arguments, name and id, and _CALL_BYTES more per call. A body within the limit
    can hold 160,000 empty calls (4 MiB), each then made, scrubbed and encoded: a third of a
    second of the event loop, for a reply ten times the usual max_payload."""
    calls = answer.tool_calls or ()
    size = len(calls) * _CALL_BYTES
    if size <= max_bytes:  # else over whatever they hold
        size += len(answer.content.encode()) + sum(
            len(call.arguments.encode()) + len(call.name) + len(call.id) for call in calls
        )
    if size <= max_bytes:
        return answer
    raise ProviderError(
        "response_too_large",
        f"provider answer of {len(calls)} tool calls is over max_response_bytes ({max_bytes} "
        f"bytes decoded, each tool call counting {_CALL_BYTES} more): {_RAISE_LIMIT}",
        200,
    )


def _declared_bytes(response: httpx.Response) -> float:
    """The Content-Length (the encoded size), or 0 when there is none to go by."""
    value = response.headers.get("content-length", "")
    if not (value.isascii() and value.isdigit()):
        return 0  # absent, or several (h11 has refused a malformed one): the read itself counts
    return int(value) if len(value) <= 18 else math.inf  # int() refuses thousands of digits


class _Inflater:
    """One gzip or deflate layer whose every step yields at most _PIECE_BYTES.

    zlib's max_length is the bound; input it has not consumed yet waits in unconsumed_tail.
    """

    def __init__(self, encoding: str) -> None:
        # deflate should be zlib-wrapped, but some servers send it raw: like httpx, try the
        # wrapped form and fall back to raw if the very first step fails.
        self._raw_fallback = encoding == "deflate"
        self._zlib = zlib.decompressobj(
            zlib.MAX_WBITS | 16 if encoding == "gzip" else zlib.MAX_WBITS
        )

    def decode(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for data in chunks:
            # After the end of the stream, whatever follows is junk: dropped, not kept in
            # unused_data.
            while not self._zlib.eof:
                piece = self._step(data)
                data = self._zlib.unconsumed_tail
                if piece:
                    yield piece
                if not data and len(piece) < _PIECE_BYTES:
                    break  # zlib has said all it can until more input comes

    def _step(self, data: bytes) -> bytes:
        try:
            return self._zlib.decompress(data, _PIECE_BYTES)
        except zlib.error:
            if not self._raw_fallback:
                raise
            self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
            return self._zlib.decompress(data, _PIECE_BYTES)
        finally:
            self._raw_fallback = False


def _inflaters(response: httpx.Response) -> list[_Inflater]:
    """One bounded decoder per Content-Encoding, in the order that undoes them (none for
    identity)."""
    header = response.headers.get("content-encoding", "")
    encodings = [e for e in (e.strip().lower() for e in header.split(",")) if e and e != "identity"]
    if any(e not in ("gzip", "deflate") for e in encodings):
        raise _unreadable(
            response,
            # The header as sent, not lowercased: scrub() finds a credential echoed here by its
            # exact value.
            f"provider answered in Content-Encoding {header.strip()}, which the worker did not "
            f"ask for and cannot read with a bound (it sends Accept-Encoding: {_ACCEPT_ENCODING})",
        )
    return [_Inflater(e) for e in reversed(encodings)]


def _decoded(chunk: bytes, layers: list[_Inflater]) -> Iterator[bytes]:
    """One network read through every layer, lazily: no layer ever holds more than one piece."""
    pieces: Iterable[bytes] = (chunk,)
    for layer in layers:
        pieces = layer.decode(pieces)
    return iter(pieces)


def _in_memory(response: httpx.Response, content: bytes) -> httpx.Response:
    """The response again, with the decoded body in memory, as the kinds' parsers read it.

    The framing headers go: the body is no longer encoded, and httpx would decode it again.
    """
    return httpx.Response(
        response.status_code, headers=_unframed(response), content=content, request=response.request
    )


def _unframed(response: httpx.Response) -> list[tuple[str, str]]:
    """The response's headers but the framing ones: its body is no longer encoded, and httpx
    would decode it again."""
    framing = ("content-encoding", "content-length", "transfer-encoding")
    return [(name, value) for name, value in response.headers.multi_items() if name not in framing]


class _CappedBody(httpx.AsyncByteStream):
    """An event stream's body read through _capped_pieces: decoded with a bound, and
    ProviderError(response_too_large) once one of its lines passes `max_bytes`."""

    def __init__(self, response: httpx.Response, max_bytes: int) -> None:
        self._response = response
        self._max_bytes = max_bytes

    async def __aiter__(self) -> AsyncIterator[bytes]:
        pieces = _capped_pieces(self._response, self._max_bytes, per_line=True)
        async with aclosing(pieces):
            async for piece in pieces:
                yield piece


def _event_source(response: httpx.Response, max_bytes: int) -> EventSource:
    """A 200 event stream's events, read by httpx-sse from the capped, decoded body.

    httpx-sse splits lines on CR, LF and CRLF only, as the SSE spec says (httpx's aiter_lines
    also splits on U+2028 and U+2029, which JSON leaves unescaped inside strings: a chunk with
    one broke a hand-written parser). Neither its
    line buffer nor its event's data: lines have a bound of their own: the count of each
    event's bytes (see _capped_pieces) is the bound, so a stream, however it is framed, holds
    at most about `max_bytes`. httpx-sse is kept by florimondmanca, small, on httpx's own API;
    the worker checks the status first (an error body is not an event stream).
    """
    capped = httpx.Response(
        response.status_code,
        headers=_unframed(response),
        stream=_CappedBody(response, max_bytes),
        request=response.request,
    )
    # An event stream is always UTF-8, whatever charset it declares, and one byte-order mark
    # at its start is no part of it (the SSE spec's UTF-8 decode): kept, it made the first
    # line a field named "\ufeffdata", and the first chunk was dropped without a word.
    capped.encoding = "utf-8-sig"
    return EventSource(capped)


async def _events_of(source: EventSource) -> AsyncGenerator[ServerSentEvent, None]:
    """The source's events, as aiter_sse reads them, and one more: a line `error: <data>` is
    an event named error with that data. llama.cpp's server (and the servers built on it)
    writes a failure mid-stream so, a field the SSE spec says to ignore, then `data: [DONE]`:
    ignored, the text streamed before it was passed off as the whole answer, an ok, and a
    prompt over its context (a failure before any text) said only that no choice came."""
    decoder = SSEDecoder()
    lines = _aiter_sse_lines(source.response)
    async with aclosing(lines):
        async for line in lines:
            if line.startswith("error:"):
                decoder.decode("event: error")
                line = "data" + line.removeprefix("error")
            event = decoder.decode(line.rstrip("\n"))
            if event is not None:
                yield event


class StreamReader(Protocol):
    """One streamed answer's events, read in order: HttpProvider.stream_reader makes one per
    call, and HttpProvider.stream feeds it every event that carries data."""

    # The event that ends a whole answer, as "stream ended without <end>" names it.
    end: str

    def read(self, event: ServerSentEvent) -> Delta | list[Delta] | ProviderOk | None:
        """A text delta (yielded if non-empty) or a tool-call delta, or several, the final
        ProviderOk once `end` arrives, or None for an event that carries neither;
        ProviderError for an error event or one that is not the documented shape."""
        ...


def decode_event(event: ServerSentEvent, decoder: msgspec.json.Decoder[Any]) -> Any:
    """One event's data as a kind's documented type, or ProviderError(server_error) saying how
    it differs, never quoting it (as decode_body)."""
    try:
        return decoder.decode(event.data)
    except (msgspec.DecodeError, RecursionError) as exc:  # ValidationError is a DecodeError
        size = len(event.data.encode())
        message = f"provider sent an unexpected stream event ({size} bytes): {exc}"
        raise ProviderError("server_error", message, 200) from exc


class HttpProvider:
    """A provider behind one HTTP endpoint: a pooled client, one POST per call, no retries.

    A kind supplies its URL and auth headers, and `body`, `parse` and `error` for its
    documented request, response and error shapes; for `stream`, `stream_body` (its body with
    its streaming switch on) and `stream_reader` (its events). `secrets` holds every
    credential value it sends (the API key, and anything else a kind authenticates with): no
    message that leaves `complete` or `stream` carries one, whatever shape of body quoted it.
    """

    label = "provider"  # names the provider in error messages

    def __init__(
        self,
        settings: ProviderSettings,
        url: str,
        secrets: Iterable[str],
        headers: dict[str, str],
        client: httpx.AsyncClient | None,
        base_url: str,
        name: str = "",
    ) -> None:
        self.settings = settings
        self.name = name  # its [providers.<name>] table, as the config names it
        self.model = settings.model
        self._url = url
        given = (*secrets, *url_secrets(url))
        self.secrets: tuple[str, ...] = tuple(secret for secret in given if secret)
        # Auth goes with each request (not on the client), so an injected client sends it too.
        self._headers = headers
        self._client = client or http_client(
            base_url, {}, settings.timeout_s, settings.max_in_flight
        )

    async def complete(self, request: ProviderRequest, timeout_s: float) -> ProviderOk:
        model = request.model or self.model
        return await self.post(self.body(request, model), model, timeout_s)

    async def post(self, body: dict[str, Any], model: str, timeout_s: float) -> ProviderOk:
        """`complete` once the body is built: `body` POSTed, its answer parsed, every failure a
        ProviderError scrubbed of `secrets`."""
        try:
            response = await post_json(
                self._client,
                self._url,
                body,
                timeout_s,
                headers=self._headers,
                max_response_bytes=self.settings.max_response_bytes,
            )
            if response.status_code != 200:
                raise self.error(response)
            return _counted(self.parse(response, model), self.settings.max_response_bytes)
        except ProviderError as exc:
            raise self._leaving(exc)

    async def stream(
        self, request: ProviderRequest, timeout_s: float
    ) -> AsyncIterator[Delta | ProviderOk]:
        """The answer as the provider writes it: its text deltas (non-empty, exactly as sent, so
        they join into the whole answer) and, last, one ProviderOk(content="", model, usage).

        One POST, as `complete`, asking for server-sent events. A non-200 is read (capped) and
        mapped by the kind's `error`, as `complete` maps it. Every failure raises ProviderError,
        before or after deltas were yielded, scrubbed of `secrets`; a stream that stops before
        its reader's `end` event is a connection error, never a short answer passed off as
        whole. `timeout_s` bounds the connect and each wait for more of the stream; the whole
        call's deadline is the caller's. A caller that stops early should aclose() the
        generator (contextlib.aclosing), so that the connection closes at once.
        """
        model = request.model or self.model
        body, reader = self.stream_call(request, model)
        # identity: a compressing server or proxy would hold deltas back to fill its blocks.
        headers = {"Accept": _EVENT_STREAM, "Accept-Encoding": "identity", **self._headers}
        _propagator.inject(headers)
        final: ProviderOk | None = None
        left = self.settings.max_response_bytes  # the answer's own size: its text, its tool calls
        calls = 0  # the tool calls begun (the readers number them 0, 1, ...)
        try:
            with _transport_errors(timeout_s, "no data"):
                async with self._client.stream(
                    "POST", self._url, json=body, timeout=timeout_s, headers=headers
                ) as response:
                    try:
                        async with aclosing(await self._events(response)) as events:
                            async for event in events:
                                # No data, no event: the SSE spec dispatches none (httpx-sse
                                # does, for a lone event:, id: or retry: field).
                                item = reader.read(event) if event.data else None
                                if isinstance(item, ProviderOk):
                                    final = item
                                    break
                                for delta in item if isinstance(item, list) else (item,):
                                    if delta:
                                        left -= delta_bytes(delta)
                                        if (
                                            isinstance(delta, ToolCallDelta)
                                            and delta.index >= calls
                                        ):
                                            calls = delta.index + 1
                                            left -= _CALL_BYTES
                                        if left < 0:
                                            raise response_too_large(
                                                200, self.settings.max_response_bytes
                                            )
                                        yield delta
                    finally:
                        await release(response)
            # After the connection is released: a caller may stop at the last item.
            if final is None:
                raise ProviderError("connection", f"{self.label} stream ended without {reader.end}")
            yield final
        except ProviderError as exc:
            raise self._leaving(exc)

    def _leaving(self, error: ProviderError) -> ProviderError:
        """`error` as it leaves `complete` or `stream`: every failure passes here, whichever
        helper quoted the body (scrubbed of `secrets`) or found the answer too large (told its
        table)."""
        return redact(in_table(error, self.name), self.secrets)

    async def _events(self, response: httpx.Response) -> AsyncGenerator[ServerSentEvent, None]:
        """The answer's events, after its status and type say it is the stream asked for."""
        max_bytes = self.settings.max_response_bytes
        if response.status_code != 200:
            content = await read_capped(response, max_bytes)
            raise self.error(_in_memory(response, content))
        # As sent, not lowercased: scrub() finds a credential echoed here by its exact value.
        media_type = response.headers.get("content-type", "").partition(";")[0].strip()
        if media_type.lower() != _EVENT_STREAM:
            # e.g. a compatible server that ignores the streaming switch and answers whole
            raise ProviderError(
                "server_error",
                f"{self.label} answered a streamed request with Content-Type "
                f"{media_type or '(none)'}, not {_EVENT_STREAM}",
                response.status_code,
            )
        return _events_of(_event_source(response, max_bytes))

    async def aclose(self) -> None:
        await self._client.aclose()

    def body(self, request: ProviderRequest, model: str) -> dict[str, Any]:
        raise NotImplementedError

    def parse(self, response: httpx.Response, model: str) -> ProviderOk:
        raise NotImplementedError

    def error(self, response: httpx.Response) -> ProviderError:
        raise NotImplementedError

    def stream_body(self, request: ProviderRequest, model: str) -> dict[str, Any]:
        """The kind's body for `stream`: `body` with its streaming switch on."""
        raise NotImplementedError

    def stream_reader(self, model: str) -> StreamReader:
        """A reader of one streamed answer's events; `model` stands in when they name none."""
        raise NotImplementedError

    def stream_call(
        self, request: ProviderRequest, model: str
    ) -> tuple[dict[str, Any], StreamReader]:
        """One streamed call's body and the reader of its answer. A kind whose reader needs to
        know something of the body as it was built overrides this, not the two above."""
        return self.stream_body(request, model), self.stream_reader(model)


def url_secrets(url: str) -> tuple[str, ...]:
    """What a URL's user info sends (https://user:password@proxy/v1): the password (a user
    alone: a token) as written and as decoded, and the Basic credentials httpx makes of them."""
    parsed = httpx.URL(url)
    if not parsed.userinfo:
        return ()
    user, _, password = parsed.userinfo.decode("ascii").partition(":")
    basic = base64.b64encode(f"{parsed.username}:{parsed.password}".encode()).decode()
    return (password or user, parsed.password or parsed.username, basic)


def require_api_key(environ: Mapping[str, str], name: str) -> str:
    # Stripped: a key read from a file (a compose or Kubernetes secret) often ends in a newline,
    # which no HTTP header may carry: every call would fail as a connection error.
    key = environ.get(name, "").strip()
    if not key:
        raise ValueError(f"provider needs an API key: set {shown_env_name(name)}")
    if any(not " " < c < "\x7f" for c in key):
        raise ValueError(
            f"the API key in {shown_env_name(name)} holds a space or a character no HTTP "
            "header may carry"
        )
    return key


def error_message(label: str, status: int, text: str, secrets: Iterable[str]) -> str:
    """'<label> <status>: <text>', one line, short, and never carrying a credential in `secrets`."""
    return _one_line(f"{label} {status}: {scrub(text, secrets)}")


def unexpected_body(response: httpx.Response, detail: str) -> ProviderError:
    """A 200 that is not the documented answer: server_error. `detail` must describe the body's
    shape (types, missing fields), never quote it; HttpProvider.complete scrubs it anyway."""
    size = len(response.content)
    message = f"provider returned an unexpected response body ({size} bytes): {detail}"
    return ProviderError("server_error", message, response.status_code)
