"""The HTTP front door: OpenAI's Chat Completions over HTTP, served from Lifeline's NATS path.

    POST /v1/chat/completions   the chat request -> a CompletionRequest on llm.complete (or,
                                with "stream": true, llm.stream) -> chat.completion (or
                                Server-Sent Events of chat.completion.chunk, then [DONE])
    GET  /v1/models             the routes (named targets, aliases) a request's `model` may name
    GET  /healthz, /readyz      liveness (its NATS connection not closed for good) and
                                readiness (connected), without a key, for probes

An async ASGI app (Starlette) served by uvicorn, and a NATS client like service/client.py: it
loads the wire and nothing of the dispatcher. `model` names a route, else a target or provider
(sent as `targets: [model]`), else an alias of one (the config's [model_aliases]). Lifeline's
own fields come back as x-lifeline-* headers and in a `lifeline` field of the body; errors in
OpenAI's shape with the status of STATUS below.

Starlette (Encode's ASGI toolkit, which FastAPI is built on) does routing and streamed
responses, uvicorn with httptools' C parser is the server, run inside Lifeline's own event
loop. Replies and stream events come through one wildcard inbox on the fast path; the request
path is a third of the gateway's CPU (py-spy), the rest being the HTTP stack and socket writes.

A reset on a stream (an attempt failed after its text was sent) is a chunk with an empty delta
and a `lifeline.reset` field ({"attempt", "discard", "error"}): drop the last `discard` content
and tool-call chunks. The official SDKs pass unknown fields through (Python:
`chunk.model_extra["lifeline"]`, Node: `chunk.lifeline`) and skip an empty delta; a named SSE
event would reach their loops as a malformed chunk, and a comment would reach no SDK user. The
final chunk's `lifeline` carries the attempts, and after a reset the whole `content` as it stands.

Auth: the keys in $LIFELINE_GATEWAY_KEYS (comma-separated), as `Authorization: Bearer <key>`;
with none set, only loopback clients are served.

A client that disconnects before its answer (or in the middle of its stream) has its request
aborted (llm.abort, with the random abort key the gateway sent it with): the dispatcher cancels
its attempts at their workers, HTTP calls included.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import ipaddress
import logging
import math
import os
import re
import socket
import sys
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache, partial
from http import HTTPStatus
from typing import Any

import h11
import msgspec
import uvicorn
from msgspec import Struct
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError
from nats.errors import Error as NatsError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from schemas import errors
from schemas.ids import SecretIds
from schemas.streaming import (
    Assembler,
    Event,
    StreamGap,
    StreamProtocolError,
    heartbeat_silence_s,
    is_heartbeat,
)
from schemas.subjects import (
    ABORT,
    ABORT_KEY,
    COMPLETE,
    HEARTBEAT_MS,
    STREAM,
    TRACEPARENT,
    TRACESTATE,
)
from schemas.wire import (
    DATA_URL,
    MAX_MESSAGE_CHARS,
    Attempt,
    ChatMessage,
    CompletionReply,
    CompletionRequest,
    Fault,
    ImagePart,
    KindOrStatus,
    NamedTool,
    OnMidstream,
    Part,
    ResponseFormat,
    TargetSpec,
    TextPart,
    Tool,
    ToolCall,
    ToolChoice,
    clipped,
    encoder,
    message_bytes,
    reply_decoder,
)
from service.discovery import Endpoint, Tally
from service.loop import STALL_S, Timeout, Timeouts
from service.memory import release_memory_soon
from service.natsio import Received, ensure_subscribed, fast_path

__all__ = ["KEYS_ENV", "Gateway", "Models", "keys_from_env"]

log = logging.getLogger("lifeline.gateway")

KEYS_ENV = "LIFELINE_GATEWAY_KEYS"
TIMEOUT_HEADER = "x-lifeline-timeout-s"
_GRACE_S = 5.0  # past the request's own deadline, the dispatcher has surely answered or died
# What the gateway answers a client that disconnected before its answer (nginx's "client closed
# request": only access logs see it) and what it maps an `aborted` reply to.
_CLIENT_GONE = 499
_TRIM_AFTER_PEAK = 256  # requests at once that make a flood worth trimming memory after
# A request body still arriving after this long is refused (408): a client that stalls
# mid-body would otherwise hold its connection, a task and its bytes so far for good.
_BODY_TIMEOUT_S = 30.0
# A request's head (request line and headers) must arrive within this long of the connection
# opening, or of its first bytes after a kept-alive connection's last answer (else 408), and
# within this many bytes (else 431; nginx allows 32 KiB, Node.js 16): see _Guarded.
_HEAD_TIMEOUT_S = 10.0
_MAX_HEAD_BYTES = 64 * 1024
# h11's own bound on a head (16 KiB) answered a plain 400 first: past ours by a read (asyncio's
# and uvloop's are at most 256 KiB), so that the 431 above is what a head over ours gets.
_H11_MAX_HEAD_BYTES = _MAX_HEAD_BYTES + 256 * 1024
_WARN_EVERY_S = 10.0  # at most one line this often about connections refused for their number
_LINGER_S = 2.0  # a refused head's connection waits this long for its client to close
_MAX_CONNECTIONS = 10_000  # the most open at once, when the file-descriptor limit allows it
# A stream's events waiting for its HTTP client to read them, at most (see _Unread); an event
# is its data and about this much of Python objects (nats-py's Msg, its headers and subject).
_MAX_UNREAD_BYTES = 16 * 1024 * 1024
_UNREAD_GRACE_S = 5.0  # ... when nothing was taken from them for this long
_UNREAD_SWEEP_S = 1.0  # how often open streams are looked at for that (and for silence)
# A connection whose answer waits to be written (its transport's buffer over its high-water
# mark, its writes paused) with none of it taken for this long is closed (see _Guarded).
# Longer than _UNREAD_GRACE_S: a stream cut for its unread events has its error event written
# to a client that reads on.
_UNDRAINED_S = 10.0
_EVENT_COST = 512
_TURN_EVERY = 32  # a stream's events written before the event loop gets a turn
# Put in a stream's queue in place of its events once they were too many (see _Inbox._on_msg).
_READ_TOO_SLOWLY = Msg(None, "", "", b"", None)  # type: ignore[arg-type]
_STOPPING = Msg(None, "", "", b"", None)  # type: ignore[arg-type]
_GAVE_UP = Msg(None, "", "", b"", None)  # type: ignore[arg-type]  # its wait_s ran out
_SILENT = Msg(None, "", "", b"", None)  # type: ignore[arg-type]  # its dispatcher went silent
# A stream asks its dispatcher for a heartbeat whenever it was quiet this long (see _Unread).
_HEARTBEAT_S = 2.0
_HEARTBEAT_MS = str(round(_HEARTBEAT_S * 1000))
_SILENCE_S = heartbeat_silence_s(_HEARTBEAT_S)
_STOP_GRACE_S = 5  # how long a stopping gateway lets its requests run (uvicorn's grace)
# A request that finds the NATS connection down waits this long (within its own timeout) for
# nats-py to reconnect, then gets a 503: a server restart is ridden out, an outage is not.
_RECONNECT_WAIT_S = 3.0
_RECONNECT_POLL_S = 0.05
_WATCH_AFTER_S = 0.5  # an answer this late has its client watched for a hang-up

# Lifeline's request error -> (HTTP status, OpenAI's error type). The code is Lifeline's type.
STATUS: dict[str, tuple[int, str]] = {
    errors.INVALID_REQUEST: (400, "invalid_request_error"),
    errors.NO_CAPABLE_TARGET: (400, "invalid_request_error"),
    errors.UNKNOWN_ROUTE: (404, "invalid_request_error"),
    errors.UNKNOWN_PROVIDER: (404, "invalid_request_error"),
    errors.PAYLOAD_TOO_LARGE: (413, "invalid_request_error"),
    errors.ALL_FAILED: (502, "upstream_error"),
    errors.FALLBACK_STOPPED: (502, "upstream_error"),
    errors.MAX_ATTEMPTS_REACHED: (502, "upstream_error"),
    errors.REPLY_TOO_LARGE: (502, "upstream_error"),
    errors.MIDSTREAM_FAILED: (502, "upstream_error"),
    errors.OVERLOADED: (503, "overloaded_error"),
    errors.SHUTTING_DOWN: (503, "overloaded_error"),
    errors.DEADLINE_EXCEEDED: (504, "timeout_error"),
    errors.ABORTED: (_CLIENT_GONE, "aborted"),
}
_INTERNAL = (500, "server_error")
# Answers after Lifeline spent its retries and fallbacks (or the request's whole deadline) on
# the request: the SDKs send a 5xx again on their own, twice by default, which runs the whole
# chain again and pays its providers again. Both SDKs obey `x-should-retry: false`. (Unless
# every call failed with a rate limit: see _RATE_LIMITABLE.)
_NOT_AGAIN = frozenset(
    (
        errors.ALL_FAILED,
        errors.FALLBACK_STOPPED,
        errors.MAX_ATTEMPTS_REACHED,
        errors.REPLY_TOO_LARGE,
        errors.MIDSTREAM_FAILED,
        errors.DEADLINE_EXCEEDED,
    )
)
# The chain ended without an answer, and every call it made failed with a rate limit: its
# providers said "not now", not "no", and billed nothing. Such an answer is a 429 with
# Retry-After (a provider's own 429, or LiteLLM's proxy when all its deployments cool down),
# which the SDKs raise as RateLimitError and send again after it (twice by default).
_RATE_LIMITABLE = frozenset(
    (errors.ALL_FAILED, errors.FALLBACK_STOPPED, errors.MAX_ATTEMPTS_REACHED)
)
# When to try such a chain again, unless the dispatcher's error says (retry_after_s): a
# breaker's default cooldown_s (service/health.py), after which Lifeline calls a provider its
# rate limits benched again.
_RATE_LIMITED_RETRY_S = 5.0


def keys_from_env(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The API keys the gateway accepts: $LIFELINE_GATEWAY_KEYS, comma-separated."""
    return [key.strip() for key in environ.get(KEYS_ENV, "").split(",") if key.strip()]


@dataclass(frozen=True)
class Models:
    """What `model` may name: routes first, then targets and providers, then the aliases of
    any of these (the config's [model_aliases]: an OpenAI SDK's "gpt-4o", say)."""

    routes: Sequence[str]
    targets: Sequence[str] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)

    def resolve(self, model: str) -> tuple[str, list[str] | None] | None:
        """(route, targets) for a request naming `model`, or None when it names nothing."""
        model = self.aliases.get(model, model)  # an alias never names a route or target itself
        if model in self.routes:
            return model, None
        if model in self.targets:
            return "default", [model]
        return None


# ---- OpenAI's request, as much of it as Lifeline reads -----------------------------------


class _Function(Struct):
    name: str
    arguments: str = "{}"


class _ToolCall(Struct):
    function: _Function
    id: str = ""
    type: str = "function"


class _Message(Struct):
    role: str
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[_ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: Any = None
    refusal: str | None = None  # an assistant's, as the SDKs echo a refused answer back
    name: str | None = None  # a participant's name: the wire carries none (x-lifeline-ignored)


class _FunctionDef(Struct):
    name: str
    description: str | None = None
    parameters: dict[str, Any] = {}


class _ToolDef(Struct):
    type: str = "function"
    function: _FunctionDef | None = None


class _StreamOptions(Struct):
    include_usage: bool | None = None


class LifelineOptions(Struct, forbid_unknown_fields=True):
    """The body's `lifeline` object (the SDKs' extra_body): Lifeline's per-request policy."""

    targets: list[str | TargetSpec] | None = None
    fallback: bool = True
    max_attempts: int | None = None
    fallback_on: list[KindOrStatus] | None = None
    on_midstream: OnMidstream | None = None
    faults: dict[str, Fault | list[Fault]] | None = None
    fail_on_length: bool = False
    metadata: dict[str, Any] = {}


class ChatRequest(Struct):
    model: str
    messages: list[_Message]
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    tools: list[_ToolDef] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    lifeline: LifelineOptions | None = None
    # Asking for what Lifeline's wire cannot carry: refused unless they ask for the default.
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    modalities: list[str] | None = None
    audio: Any = None
    functions: Any = None
    function_call: Any = None
    # Hints Lifeline's wire cannot carry: ignored, and named in x-lifeline-ignored.
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    prediction: Any = None
    web_search_options: Any = None
    service_tier: Any = None
    user: Any = None
    store: Any = None
    metadata: Any = None  # OpenAI's, for stored completions; Lifeline's is lifeline.metadata
    prompt_cache_key: Any = None
    safety_identifier: Any = None


_IGNORED = (
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "reasoning_effort",
    "verbosity",
    "prediction",
    "web_search_options",
    "service_tier",
    "user",
    "store",
    "metadata",
    "prompt_cache_key",
    "safety_identifier",
)
_chat_decoder = msgspec.json.Decoder(ChatRequest)
_ROLES = frozenset(("system", "user", "assistant", "tool", "developer"))
_AT_PATH = re.compile(r" - at `\$\.?([^`]*)`")


class HTTPError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
        lifeline: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = (
            status,
            message,
            code,
            param,
            kind,
        )
        self.headers = headers or {}
        self.lifeline = lifeline

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return {"error": error} | ({"lifeline": self.lifeline} if self.lifeline else {})

    def response(self) -> Response:
        return Response(encoder.encode(self.body()), self.status, self.headers, "application/json")


def _bad(message: str, param: str | None = None, code: str = "invalid_request") -> HTTPError:
    # Cut as the NATS path cuts its refusals: a message may quote what the client sent (a
    # role, msgspec's "Invalid enum value ..."), which was sent back whole however long.
    return HTTPError(400, clipped(message, MAX_MESSAGE_CHARS) or "", code, param)


def translate(
    chat: ChatRequest, request_id: str, models: Models | None, timeout_s: float | None
) -> tuple[CompletionRequest, list[str]]:
    """OpenAI's chat request as Lifeline's, and the names of the fields it ignored."""
    if chat.n not in (None, 1):
        raise _bad("Lifeline answers with one choice: n must be 1", "n", "unsupported_parameter")
    if chat.logprobs or chat.top_logprobs:
        raise _bad("Lifeline does not return logprobs", "logprobs", "unsupported_parameter")
    if chat.audio is not None or any(m != "text" for m in chat.modalities or ()):
        raise _bad("Lifeline answers with text only", "modalities", "unsupported_parameter")
    if chat.functions is not None or chat.function_call is not None:
        raise _bad("`functions` is deprecated: send `tools`", "functions", "unsupported_parameter")
    if not chat.messages:
        raise _bad("`messages` must not be empty", "messages")
    options = chat.lifeline or LifelineOptions()
    if options.targets is not None:
        route, targets = chat.model, options.targets
    else:
        resolved = models.resolve(chat.model) if models is not None else (chat.model, None)
        if resolved is None:
            raise _model_not_found(chat.model, models)
        route, targets = resolved
    stop = [chat.stop] if isinstance(chat.stop, str) else chat.stop
    request = CompletionRequest(
        messages=[_message(m, i) for i, m in enumerate(chat.messages)],
        id=request_id,
        route=route,
        targets=targets,  # type: ignore[arg-type]
        max_tokens=(
            chat.max_completion_tokens
            if chat.max_completion_tokens is not None
            else chat.max_tokens
        ),
        temperature=chat.temperature,
        top_p=chat.top_p,
        timeout_s=timeout_s,
        metadata=options.metadata,
        response_format=chat.response_format,
        fallback=options.fallback,
        max_attempts=options.max_attempts,
        fallback_on=options.fallback_on,
        faults=options.faults,
        on_midstream=options.on_midstream,
        tools=[_tool(t, i) for i, t in enumerate(chat.tools)] if chat.tools else None,
        tool_choice=_tool_choice(chat.tool_choice),
        parallel_tool_calls=chat.parallel_tool_calls,
        stop=stop or None,
        seed=chat.seed,
        fail_on_length=options.fail_on_length,
    )
    ignored = [name for name in _IGNORED if getattr(chat, name) is not None]
    if any(m.name is not None for m in chat.messages):
        ignored.append("messages[].name")
    return request, ignored


def _message(m: _Message, i: int) -> ChatMessage:
    where = f"messages[{i}]"
    if m.role not in _ROLES:
        raise _bad(f"unsupported role {m.role!r} (use tools for function calls)", f"{where}.role")
    if m.function_call is not None:
        raise _bad("`function_call` is deprecated: send `tool_calls`", f"{where}.function_call")
    content: str | list[Part] | None
    if isinstance(m.content, list):
        content = [_part(p, f"{where}.content[{j}]") for j, p in enumerate(m.content)]
    else:
        content = m.content if m.content is not None or m.tool_calls else m.refusal or ""
    calls = [ToolCall(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or ()]
    if m.role == "tool" and not m.tool_call_id:
        raise _bad("a tool message needs the tool_call_id it answers", f"{where}.tool_call_id")
    return ChatMessage(m.role, content, calls or None, m.tool_call_id)  # type: ignore[arg-type]


def _part(part: dict[str, Any], where: str) -> Part:
    kind = part.get("type")
    if kind in ("text", "refusal"):
        text = part.get(kind)
        if not isinstance(text, str):
            raise _bad(f"a {kind} part needs its `{kind}` string", f"{where}.{kind}")
        return TextPart(text)
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str):
            raise _bad("an image_url part needs image_url.url", f"{where}.image_url")
        detail = image.get("detail") if isinstance(image, dict) else None
        if detail not in (None, "auto", "low", "high"):
            raise _bad('image_url.detail is "auto", "low" or "high"', f"{where}.image_url.detail")
        if not url.startswith("data:"):
            return ImagePart(url=url, detail=detail)
        match = DATA_URL.fullmatch(url)
        if match is None or not match["type"].startswith("image/"):
            raise _bad("an image data URL must be data:image/<type>;base64,...", where)
        return ImagePart(data=match["data"], media_type=match["type"], detail=detail)
    raise _bad(f"content part type {kind!r} is not supported (text, image_url)", f"{where}.type")


def _tool(tool: _ToolDef, i: int) -> Tool:
    if tool.type != "function" or tool.function is None:
        raise _bad(f"tool type {tool.type!r} is not supported (function)", f"tools[{i}].type")
    f = tool.function
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", f.name):
        raise _bad("a function name is 1-64 of a-z, A-Z, 0-9, _ and -", f"tools[{i}].function.name")
    return Tool(f.name, f.description, f.parameters)


def _tool_choice(choice: str | dict[str, Any] | None) -> ToolChoice | None:
    if choice is None:
        return None
    if choice in ("auto", "none", "required"):
        return choice  # type: ignore[return-value]
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str):
            return NamedTool(name)
    raise _bad(
        'tool_choice is "auto", "none", "required" or {"type": "function", "function": {"name"}}',
        "tool_choice",
    )


_QUOTED_NAME_CHARS = 300  # of a `model` quoted back (names are at most 256: routing.py's 300)


def _model_not_found(model: str, models: Models | None) -> HTTPError:
    what = "Lifeline route"
    if models is not None:
        kinds = "route, target or alias" if models.aliases else "route or target"
        known = ", ".join(dict.fromkeys([*models.routes, *models.targets, *models.aliases]))
        what = f"Lifeline {kinds} ({known})"
    return HTTPError(
        404,
        f"The model `{clipped(model, _QUOTED_NAME_CHARS)}` does not exist: `model` names a {what}",
        "model_not_found",
        "model",
    )


# ---- Lifeline's reply, in OpenAI's shape -------------------------------------------------


def _usage(reply: CompletionReply) -> dict[str, Any] | None:
    u = reply.usage
    if u is None:
        return None
    return {
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.input_tokens + u.output_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_input_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
    }


def _tool_calls(calls: Iterable[ToolCall]) -> list[dict[str, Any]]:
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]


def _finish(reply: CompletionReply) -> str:
    return reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")


def _attempt_text(a: Attempt) -> str:
    name = a.target or a.provider
    if a.outcome == "ok":
        return f"{name}=ok"
    if a.outcome in ("skipped", "cancelled"):
        return f"{name}={a.outcome}:{a.reason}"
    status = f"/{a.status_code}" if a.status_code else ""
    return f"{name}={a.error_type}{status}{'->' + a.next if a.next else ''}"


def _ascii(text: str) -> str:
    """What an HTTP header value may hold: printable ASCII and spaces. A target's name and a
    model can be a client's own text, and one control character in a header makes the server
    drop the whole response."""
    return _NOT_IN_HEADERS.sub("?", text)


_NOT_IN_HEADERS = re.compile(r"[^\x20-\x7e]")


def lifeline_headers(reply: CompletionReply) -> dict[str, str]:
    """Who served (or why nobody did), every attempt in a line, the request and trace ids."""
    headers = {
        "x-lifeline-request-id": reply.id,
        "x-request-id": reply.id,
        "x-lifeline-attempts": str(len(reply.attempts)),
        "x-lifeline-attempt-list": _ascii(", ".join(map(_attempt_text, reply.attempts))),
    }
    for name, value in (
        ("x-lifeline-provider", reply.provider),
        ("x-lifeline-target", reply.target),
        ("x-lifeline-model", reply.model),
        ("x-lifeline-trace-id", reply.trace_id),
    ):
        if value:
            headers[name] = _ascii(value)
    return headers


def lifeline_field(reply: CompletionReply, route: str) -> dict[str, Any]:
    return {
        "request_id": reply.id,
        "route": route,
        "provider": reply.provider,
        "target": reply.target,
        "model": reply.model,
        "attempts": reply.attempts,
        "latency_ms": reply.latency_ms,
        "trace_id": reply.trace_id,
        **({"stream": reply.stream} if reply.stream is not None else {}),
    }


def reply_error(reply: CompletionReply, route: str) -> HTTPError:
    """A Lifeline error reply as an HTTP error, with Lifeline's headers and attempts."""
    error = reply.error
    kind, message = (error.type, error.message) if error else (errors.INTERNAL, "no error given")
    status, family = STATUS.get(kind, _INTERNAL)
    headers = lifeline_headers(reply)
    hint = error.retry_after_s if error else None
    if kind in errors.RESEND:
        headers |= _retry_after(hint or 1.0)
    elif kind in _RATE_LIMITABLE and _only_rate_limited(reply.attempts):
        status, family = 429, "rate_limit_error"
        headers |= _retry_after(hint or _RATE_LIMITED_RETRY_S)
    elif kind in _NOT_AGAIN:
        headers["x-should-retry"] = "false"
    param = None
    if kind == errors.INVALID_REQUEST and (at := _AT_PATH.search(message)):
        param = at.group(1)
    if kind in (errors.UNKNOWN_ROUTE, errors.UNKNOWN_PROVIDER):
        kind, param = "model_not_found", "model"
    return HTTPError(status, message, kind, param, family, headers, lifeline_field(reply, route))


def _only_rate_limited(attempts: Iterable[Attempt]) -> bool:
    """Every call made (a target skipped made none) failed with a rate limit."""
    made = [a for a in attempts if a.outcome not in ("skipped", "cancelled")]
    return bool(made) and all(a.error_type == "rate_limit" for a in made)


def _retry_after(seconds: float) -> dict[str, str]:
    """When to send a request again: in seconds (HTTP's, at least 1) and in milliseconds
    (which the OpenAI SDKs read first)."""
    return {
        "retry-after": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(max(1, round(seconds * 1000))),
    }


def completion_body(reply: CompletionReply, route: str, created: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None}
    if reply.tool_calls:
        message["tool_calls"] = _tool_calls(reply.tool_calls)
        message["content"] = reply.content or None
    return {
        "id": "chatcmpl-" + reply.id,
        "object": "chat.completion",
        "created": created,
        "model": reply.model or route,
        "choices": [
            {"index": 0, "message": message, "finish_reason": _finish(reply), "logprobs": None}
        ],
        "usage": _usage(reply),
        "system_fingerprint": None,
        "lifeline": lifeline_field(reply, route),
    }


# ---- the app -----------------------------------------------------------------------------


@lru_cache(maxsize=1024)
def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


class _Inbox:
    """Every reply and stream event on one wildcard inbox subscription, taken straight from
    the read loop by Lifeline's fast path over nats-py (service/natsio.py) and routed by the
    subject's last token: a reply to its request's future, an event to its stream's queue.
    Each request goes out with an abort key of its own: one given up on is aborted."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.fast = fast_path(nc)
        self.prefix = ""
        self.waiting: dict[str, asyncio.Future[Msg] | _Unread] = {}
        # When a request on llm.complete last heard a heartbeat (its dispatcher sends them).
        self.heard: dict[str, float] = {}
        self.abort_keys: dict[str, str] = {}  # a stream's token -> its request's abort key
        self._subscribing = asyncio.Lock()
        self._aborting: set[asyncio.Task[None]] = set()
        self._keys = SecretIds()  # abort keys: 96 random bits each
        self._watcher: asyncio.Task[None] | None = None  # _watch_unread, while streams are open
        # Each request's wait for its answer. Not asyncio's timers: after a stall (the gateway
        # stopped or starved past a request's wait) those fire before the answers that came
        # meanwhile are read, and requests already served got a 504 (see Timeouts).
        self._timeouts = Timeouts()

    async def _ready(self) -> str:
        if not self.prefix:
            async with self._subscribing:
                if not self.prefix:
                    prefix = self.nc.new_inbox() + "."
                    await self.fast.subscribe(prefix + "*", self._on_msg)
                    self.prefix = prefix
        return self.prefix

    def _on_msg(self, msg: Received) -> None:
        token = msg.subject[len(self.prefix) :]
        target = self.waiting.get(token)
        if isinstance(target, _Unread):
            target.heard_at = time.monotonic()
            if is_heartbeat(msg.headers):  # its dispatcher is alive: nothing to write
                target.silence_s = _SILENCE_S
                return
            target.put_nowait(msg)
            target.bytes += len(msg.data) + _EVENT_COST
            if target.bytes > _MAX_UNREAD_BYTES and target.unread_for() > _UNREAD_GRACE_S:
                self._cut(token, target)
        elif target is not None and not target.done():
            if is_heartbeat(msg.headers):  # its dispatcher is alive: no answer yet
                self.heard[token] = time.monotonic()
                self._watch()
                return
            target.set_result(msg)

    async def _reconnected(self, wait_s: float) -> None:
        """Returns once the NATS connection is back (callers ask only while it is down). While
        nats-py reconnects, a request published now would sit in its buffer until the
        connection is back or the request times out (a 504 after its whole timeout, blaming
        the dispatcher); so it waits up to _RECONNECT_WAIT_S (within `wait_s`) for the
        connection, then is refused with a 503 and Retry-After, which HTTP clients and load
        balancers retry later or elsewhere."""
        nc = self.nc
        waited = min(_RECONNECT_WAIT_S, wait_s)
        give_up = time.monotonic() + waited
        while not nc.is_connected:
            if nc.is_closed:
                raise ConnectionClosedError
            if time.monotonic() >= give_up:
                raise _nats_down(waited)
            await asyncio.sleep(_RECONNECT_POLL_S)

    async def _publish(
        self, subject: str, payload: bytes, reply: str, headers: dict[str, str]
    ) -> None:
        # Measured as it goes out, headers and all: one message over max_payload makes the
        # server close the connection, and every request of the gateway's with it.
        size = message_bytes(payload, headers)
        if size > self.nc.max_payload:
            raise _too_large_for_nats(size, self.nc.max_payload)
        if not self.fast.publish(subject, payload, reply, headers):
            await self.nc.publish(subject, payload, reply=reply, headers=headers)

    async def request(
        self,
        token: str,
        payload: bytes,
        headers: dict[str, str] | None,
        wait_s: float,
        gone: Callable[[], Awaitable[None]] | None = None,
    ) -> CompletionReply | None:
        """llm.complete's reply to one request (`token`: its id, unique); None when `gone`
        (which returns when the HTTP client has disconnected) returned first: the request is
        then aborted."""
        if not self.nc.is_connected:
            await self._reconnected(wait_s)
        prefix = await self._ready()
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self.waiting[token] = future
        reconnects = self.nc.stats["reconnects"]
        key = self._keys.next()
        watch = _HangUpWatch(gone, future) if gone is not None else None
        timer = self._timeouts.call_later(wait_s, _give_up, future)
        try:
            await self._publish(
                COMPLETE,
                payload,
                prefix + token,
                {**(headers or {}), ABORT_KEY: key, HEARTBEAT_MS: _HEARTBEAT_MS},
            )
            msg = await future
        except TimeoutError:
            self.abort(key)  # its answer would reach nobody now: stop what still runs for it
            raise _no_answer(wait_s, self.nc.is_connected) from None
        except _Silent:  # its dispatcher sent heartbeats, then nothing: most likely died
            self.abort(key)
            reconnected = self.nc.stats["reconnects"] != reconnects
            raise _went_silent(self.nc.is_connected, reconnected) from None
        except HTTPError:  # the gateway is stopping (stop_waiting)
            self.abort(key)
            raise
        except asyncio.CancelledError:  # its HTTP client is gone, or the gateway stops
            self.abort(key)
            if watch is not None and watch.happened and future.cancelled():
                return None
            raise
        finally:
            self._timeouts.cancel(timer)
            del self.waiting[token]
            self.heard.pop(token, None)
            if watch is not None:
                watch.stop()
        if msg.headers and msg.headers.get("Status") == "503":
            raise _no_dispatcher()
        return reply_decoder.decode(msg.data)

    async def stream(
        self, token: str, payload: bytes, headers: dict[str, str] | None, wait_s: float
    ) -> _Unread:
        """Send one request to llm.stream; its events come to the queue (close() it after)."""
        if not self.nc.is_connected:
            await self._reconnected(wait_s)
        prefix = await self._ready()
        queue = _Unread()
        queue.reconnects = self.nc.stats["reconnects"]
        queue.timer = self._timeouts.call_later(wait_s, _Unread.gave_up, queue)
        self.waiting[token] = queue
        self._watch()
        key = self.abort_keys[token] = self._keys.next()
        try:
            await self._publish(
                STREAM,
                payload,
                prefix + token,
                {**(headers or {}), ABORT_KEY: key, HEARTBEAT_MS: _HEARTBEAT_MS},
            )
        except BaseException:  # not sent (too large, say): nothing to abort
            del self.waiting[token], self.abort_keys[token]
            self._timeouts.cancel(queue.timer)
            raise
        return queue

    def stop_waiting(self) -> None:
        """The gateway is stopping: every request still waiting gets gateway_stopping, and a
        stream's request is aborted now, not when its writer takes that: one whose client
        stopped reading is stuck writing until uvicorn cancels it, and would be aborted only
        when Python collects it, past the NATS connection's close (its provider called on)."""
        for token, target in list(self.waiting.items()):
            if isinstance(target, _Unread):
                target.put_nowait(_STOPPING)
                if (key := self.abort_keys.pop(token, None)) is not None:
                    self.abort(key)
            elif not target.done():
                target.set_exception(_stopping())

    def _cut(self, token: str, queue: _Unread) -> None:
        """A stream whose client stopped reading while its events piled up (see _Unread):
        drop them, abort its request, and tell the client if it ever reads on."""
        while not queue.empty():
            queue.get_nowait()
        queue.bytes = 0
        queue.put_nowait(_READ_TOO_SLOWLY)
        self.close(token, ended=False)

    def _watch(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.ensure_future(self._watch_unread())

    async def _watch_unread(self) -> None:
        """While streams are open, cut those whose client stopped reading once no more events
        come to them (_on_msg cuts the others as their events come); and while streams or
        requests hear heartbeats, end those whose dispatcher went silent (no event, not even
        a heartbeat: it died, or lost NATS)."""
        while self.heard or any(isinstance(t, _Unread) for t in self.waiting.values()):
            slept_at = time.monotonic()
            await asyncio.sleep(_UNREAD_SWEEP_S)
            now = time.monotonic()
            # Woken late, the loop stood still meanwhile, and uvloop runs due timers before it
            # reads its sockets: the heartbeats that came meanwhile are unread. No silence is
            # judged now; the next sweep does, once they are read.
            stalled = now - slept_at > _UNREAD_SWEEP_S + STALL_S
            for token, heard_at in list(self.heard.items()):
                future = self.waiting.get(token)
                if (
                    not stalled
                    and now - heard_at > _SILENCE_S
                    and isinstance(future, asyncio.Future)
                ):
                    del self.heard[token]
                    if not future.done():
                        future.set_exception(_Silent())
            for token, target in list(self.waiting.items()):
                if (
                    isinstance(target, _Unread)
                    and not stalled
                    and target.silence_s is not None
                    and now - target.heard_at > target.silence_s
                ):
                    target.silence_s = None  # said once
                    target.put_nowait(_SILENT)
                if (
                    isinstance(target, _Unread)
                    and target.bytes > _MAX_UNREAD_BYTES
                    and target.unread_for() > _UNREAD_GRACE_S
                ):
                    self._cut(token, target)

    def close(self, token: str, ended: bool) -> None:
        """Forget a stream; one that had not `ended` (its client left, its events broke off)
        is aborted."""
        queue = self.waiting.pop(token, None)
        if isinstance(queue, _Unread):
            self._timeouts.cancel(queue.timer)
        key = self.abort_keys.pop(token, None)
        if key is not None and not ended:
            self.abort(key)

    def abort(self, key: str) -> None:
        """Abort the request sent with `key` (llm.abort), without waiting."""
        if self.fast.publish(ABORT, key.encode()):
            return
        task = asyncio.ensure_future(self._abort(key))
        self._aborting.add(task)
        task.add_done_callback(self._aborting.discard)

    async def _abort(self, key: str) -> None:
        with contextlib.suppress(NatsError):  # no connection: the request ends at its deadline
            await self.nc.publish(ABORT, key.encode())


class Gateway:
    """The ASGI app (`app`) on one NATS connection, and its uvicorn server (`start`, `stop`)."""

    def __init__(
        self,
        nc: Client,
        *,
        models: Models | None = None,
        keys: Sequence[str] = (),
        default_timeout_s: float = 60.0,
        max_body_bytes: int = 2 * 1024 * 1024,
        max_connections: int | None = None,
    ) -> None:
        self.nc = nc
        self.max_connections = max_connections or max_connections_default()
        self.models = models
        self.keys = [key.encode() for key in keys]
        self.default_timeout_s = default_timeout_s
        self.max_body_bytes = max_body_bytes
        self.inbox = _Inbox(nc)
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
                Route("/healthz", self.healthz, methods=["GET"]),
                Route("/readyz", self.readyz, methods=["GET"]),
            ],
            exception_handlers={HTTPException: _http_exception, Exception: _internal},
        )
        # Starlette would answer a path with a trailing slash with a redirect to one without,
        # before any key check, its Location built from the client's own Host header.
        self.app.router.redirect_slashes = False
        self.server: uvicorn.Server | None = None
        self.in_flight = 0  # chat completions being answered (a stream: until its first event)
        # Figures for the NATS service API (`lifeline health`, service/discovery.py): a chat
        # completion counted as it arrives, its time and any error as it is answered (a
        # stream: at its first event; an error after that is in its events, not here).
        self.tally = Tally()
        self._peak = 0  # the most in flight at once since in_flight was last 0 after a flood
        # Requests still reading their body, and whether stop() has given up on them: told
        # gateway_stopping, where uvicorn's cancel at the end of its grace sent a plain 500.
        self._reading: set[asyncio.Task[Any]] = set()
        self._cut_reads = False
        self._ticker: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None
        self.host, self.port = "127.0.0.1", 0

    # -- serving --

    async def subscribe(self) -> str:
        """Subscribe its inbox now, not at the first request, and return its subject once the
        server has answered: one the server refuses (a user connected without its inbox
        prefix) would leave it ready by every probe, each request a 504 after its timeout."""
        inbox = await self.inbox._ready() + "*"
        await ensure_subscribed(self.nc)
        return inbox

    async def start(self, host: str = "127.0.0.1", port: int = 8080) -> None:
        """Listen on host:port (0: any free port); OSError when it cannot."""
        for name in ("uvicorn.error", "uvicorn.access"):
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        protocol = _http_protocol()
        protocol.max_connections = self.max_connections
        config = uvicorn.Config(
            self.app,
            host=host,
            port=port,
            loop="none",
            http=protocol,
            ws="none",
            lifespan="off",
            access_log=False,
            log_config=None,
            server_header=False,
            timeout_graceful_shutdown=_STOP_GRACE_S,
            h11_max_incomplete_event_size=_H11_MAX_HEAD_BYTES,
        )
        config.load()
        # Bound here: uvicorn would log a bind error and sys.exit(). IPPROTO_TCP named, not 0:
        # asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and an accepted one
        # takes its listener's. Without it, Nagle held each answer's body (uvicorn writes it
        # after the head) for the client's delayed ACK: 40 ms per request on a kept-alive
        # connection, which is how the SDKs send every request after their first.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = _Listener(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            error = OSError(f"cannot listen on {host}:{port}: {exc.strerror}")
            error.errno = exc.errno  # what to do depends on it (service/cli.py)
            raise error from None
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[sock])
        self.server, self._sock = server, sock
        self.host, self.port = host, sock.getsockname()[1]
        # uvicorn's own loop refreshes the Date header and notices should_exit; no signals here.
        self._ticker = asyncio.ensure_future(server.main_loop())

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish, close. What still waits a second
        before uvicorn's grace (5 s) runs out is answered `gateway_stopping` (a stream: an
        error event, as any error after its first) and aborted, rather than cut off by
        uvicorn's cancel without a word (and a traceback in the log)."""
        server, self.server = self.server, None
        if server is None:
            return
        server.should_exit = True
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        shutdown = asyncio.ensure_future(
            server.shutdown(sockets=[self._sock] if self._sock else None)
        )
        try:
            await asyncio.wait_for(asyncio.shield(shutdown), _STOP_GRACE_S - 1)
        except TimeoutError:
            self.inbox.stop_waiting()
            self._cut_reads = True
            for task in self._reading:
                task.cancel()
            await shutdown
        watcher = self.inbox._watcher
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    # -- endpoints --

    def _refusal(self, request: Request) -> HTTPError | None:
        if self.keys:
            given = request.headers.get("authorization", "")
            scheme, _, key = given.partition(" ")
            key_bytes = key.strip().encode()
            if scheme.lower() == "bearer" and any(
                hmac.compare_digest(key_bytes, k) for k in self.keys
            ):
                return None
            return HTTPError(
                401,
                "Incorrect or missing API key: send `Authorization: Bearer <key>` with one of "
                f"the keys in the gateway's ${KEYS_ENV}",
                "invalid_api_key",
            )
        client = request.client
        if client is not None and _is_loopback(client.host):
            return None
        return HTTPError(
            403,
            "This Lifeline gateway has no API keys configured, so it serves only clients on "
            f"its own machine (loopback). Set {KEYS_ENV}=<key>[,<key>...] where it runs and "
            "send `Authorization: Bearer <key>`",
            "no_keys_configured",
            kind="permission_error",
        )

    async def healthz(self, request: Request) -> Response:
        """Alive while its NATS connection is usable or reconnecting (as service/probes.py)."""
        return self._probe(not self.nc.is_closed)

    async def readyz(self, request: Request) -> Response:
        """Ready while connected to NATS: requests can reach a dispatcher (if one runs)."""
        return self._probe(self.nc.is_connected)

    def _probe(self, ok: bool) -> Response:
        connected = self.nc.is_connected
        body = {
            "name": "lifeline-gateway",
            "connected": connected,
            "ready": connected,
            "problems": [] if connected else ["not connected to NATS"],
        }
        return Response(encoder.encode(body), 200 if ok else 503, media_type="application/json")

    async def list_models(self, request: Request) -> Response:
        if refused := self._refusal(request):
            return refused.response()
        return _json({"object": "list", "data": self._model_list()})

    async def get_model(self, request: Request) -> Response:
        if refused := self._refusal(request):
            return refused.response()
        name = request.path_params["model"]
        for model in self._model_list():
            if model["id"] == name:
                return _json(model)
        return _model_not_found(name, self.models).response()

    def _model_list(self) -> list[dict[str, Any]]:
        if self.models is None:
            return []
        owners = dict.fromkeys(self.models.routes, "lifeline-route")
        for name in self.models.targets:
            owners.setdefault(name, "lifeline-target")
        for name in self.models.aliases:
            owners.setdefault(name, "lifeline-alias")
        return [
            {"id": name, "object": "model", "created": 0, "owned_by": owner}
            for name, owner in owners.items()
        ]

    @property
    def connections(self) -> int:
        """HTTP connections open now (`max_connections` at most are served)."""
        server = self.server
        return len(server.server_state.connections) if server is not None else 0

    def endpoints(self) -> list[Endpoint]:
        """For the NATS service API: the chat completions endpoint (HTTP: no subject) with its
        figures, its connections and whether its NATS path is up."""
        return [
            self.tally.endpoint(
                "chat_completions",
                "",
                "",
                in_flight=self.in_flight,
                connections=self.connections,
                max_connections=self.max_connections,
                subscribed=self.nc.is_connected,
            )
        ]

    async def chat_completions(self, request: Request) -> Response:
        self.in_flight += 1
        self._peak = max(self._peak, self.in_flight)
        tally = self.tally
        tally.requests += 1
        started = time.monotonic()
        try:
            return await self._chat_completions(request)
        finally:
            tally.busy_ms += (time.monotonic() - started) * 1000
            self.in_flight -= 1
            if not self.in_flight and self._peak >= _TRIM_AFTER_PEAK:
                self._peak = 0
                release_memory_soon()  # a flood is over: hand its memory back to the system

    async def _chat_completions(self, request: Request) -> Response:
        request_id = ""
        try:
            if refused := self._refusal(request):
                raise refused
            body = await self._body(request)
            chat = decode_chat(body)
            request_id = os.urandom(16).hex()
            try:
                completion, ignored = translate(
                    chat, request_id, self.models, _timeout(request.headers.get(TIMEOUT_HEADER))
                )
            except ValueError as exc:  # a message or part the wire's types refuse
                raise _bad(str(exc)) from None
            payload = encoder.encode(completion)
            headers = _trace_headers(request)
            wait_s = (completion.timeout_s or self.default_timeout_s) + _GRACE_S
            extra = {"x-lifeline-ignored": ", ".join(ignored)} if ignored else {}
            if chat.stream:
                include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
                return await self._stream(
                    chat.model, completion, payload, headers, wait_s, include_usage, extra, request
                )
            gone = partial(_disconnected, request)
            reply = await self.inbox.request(request_id, payload, headers, wait_s, gone)
            if reply is None:  # nobody reads the answer: the request was aborted
                return Response(status_code=_CLIENT_GONE)
        except HTTPError as exc:
            if request_id:  # its own (no answer, stopping, ...): the id its audit event has
                exc.headers.setdefault("x-lifeline-request-id", request_id)
                exc.headers.setdefault("x-request-id", request_id)
            return self._failed(exc)
        except ClientDisconnect:  # gone while sending its body: nothing was sent on
            return Response(status_code=_CLIENT_GONE)
        except ConnectionClosedError:  # for good: the process is stopping (see app.py)
            return self._failed(_nats_closed())
        if reply.status != "ok":
            return self._failed(reply_error(reply, completion.route))
        body_out = completion_body(reply, completion.route, int(time.time()))
        return Response(
            encoder.encode(body_out),
            200,
            lifeline_headers(reply) | extra,
            "application/json",
        )

    def _failed(self, error: HTTPError) -> Response:
        self.tally.errors += 1
        self.tally.last_error = error.code
        return error.response()

    async def _body(self, request: Request) -> bytes:
        """The request's body, refused (413) over max_body_bytes as sent and, gzipped, as
        inflated."""
        gzipped = _gzipped(request.headers.get("content-encoding"))
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise _too_large(int(length), self.max_body_bytes)
        chunks, size = [], 0
        task = asyncio.current_task()
        assert task is not None
        self._reading.add(task)
        try:
            async with asyncio.timeout(_BODY_TIMEOUT_S):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        raise _too_large(size, self.max_body_bytes)
                    chunks.append(chunk)
        except TimeoutError:
            raise _body_too_slow(size) from None
        except asyncio.CancelledError:
            if not self._cut_reads:  # its client hung up, or uvicorn cancels: not ours
                raise
            task.uncancel()
            raise _stopping() from None
        finally:
            self._reading.discard(task)
        body = b"".join(chunks)
        return _gunzip(body, self.max_body_bytes) if gzipped else body

    async def _stream(
        self,
        model: str,
        completion: CompletionRequest,
        payload: bytes,
        headers: dict[str, str] | None,
        wait_s: float,
        include_usage: bool,
        extra: dict[str, str],
        request: Request,
    ) -> Response:
        """Errors before the first event are HTTP errors; after it, SSE error events. A client
        that hangs up before the first event has its request aborted, as one that hangs up
        during the stream does (the response's own disconnect watch: see `_events`)."""
        token = completion.id
        assembler = Assembler()
        task = asyncio.current_task()
        assert task is not None
        watch = _HangUpWatch(partial(_disconnected, request), task)
        try:
            queue = await self.inbox.stream(token, payload, headers, wait_s)
            first = await _next_event(queue, wait_s, self.nc)
            if first.headers and first.headers.get("Status") == "503":
                raise _no_dispatcher()
            try:
                event = assembler.feed(first.headers, first.data)
            except (StreamGap, StreamProtocolError) as exc:
                raise _broken(exc) from None
            if event.kind == "error" and event.reply is not None:
                raise reply_error(event.reply, completion.route)
        except asyncio.CancelledError:
            self.inbox.close(token, assembler.done)  # not ended: aborted
            if watch.happened:  # its client is gone: nobody reads an answer
                task.uncancel()
                return Response(status_code=_CLIENT_GONE)
            raise
        except BaseException:
            self.inbox.close(token, assembler.done)
            raise
        finally:
            watch.stop()
        sse = _SSE(model, completion.route, token, int(time.time()), include_usage)
        response_headers = {
            "x-lifeline-request-id": token,
            "x-request-id": token,
            "cache-control": "no-cache",
            "x-accel-buffering": "no",
            **extra,
        }
        if headers and TRACEPARENT in headers:
            response_headers["x-lifeline-trace-id"] = headers[TRACEPARENT].split("-")[1]
        events = self._events(token, queue, assembler, event, wait_s, sse)
        return StreamingResponse(events, 200, response_headers, "text/event-stream")

    async def _events(
        self,
        token: str,
        queue: _Unread,
        assembler: Assembler,
        event: Event,
        wait_s: float,
        sse: _SSE,
    ) -> AsyncIterator[bytes]:
        written = 0
        try:
            while True:
                yield sse.event(event, assembler)
                if assembler.done:
                    return
                written += 1
                if written % _TURN_EVERY == 0:
                    # Events already queued are taken without a wait and uvicorn writes
                    # without one while the socket takes them: a backlog of tiny deltas
                    # (100,000 of them, 25 µs each) was written in one turn of the loop,
                    # every other client of this gateway waiting up to 1.8 s.
                    await asyncio.sleep(0)
                try:
                    msg = await _next_event(queue, wait_s, self.nc)
                    event = assembler.feed(msg.headers, msg.data)
                except (StreamGap, StreamProtocolError) as exc:
                    yield sse.error(_broken(exc))
                    return
                except HTTPError as exc:
                    yield sse.error(exc)
                    return
        finally:
            self.inbox.close(token, assembler.done)


class _SSE:
    """One stream's chat.completion.chunk events, as bytes. Every chunk names the `model` the
    request asked for, as OpenAI's name one model on every chunk: which model answers is known
    only at the end (after a reset, another provider's may), and readers take it from the
    first chunk (the SDKs' stream helpers) or the last. The last chunk's `lifeline` names it."""

    def __init__(
        self, model: str, route: str, token: str, created: int, include_usage: bool
    ) -> None:
        self.route = route
        self.include_usage = include_usage
        self.head = (
            b'data: {"id":"chatcmpl-'
            + token.encode()
            + b'","object":"chat.completion.chunk","created":'
            + str(created).encode()
            + b',"model":'
            + encoder.encode(model)
        )
        self.started = False  # the first content chunk carries the role too
        # Each attempt numbers its tool calls from 0: after a reset, the next attempt's follow
        # the voided ones', so that a reader joining pieces by index (the SDKs' stream
        # helpers) gets two calls, not one glued from both (names, ids and arguments joined).
        self.calls_from = 0
        self.calls_top = -1

    def _chunk(self, delta: bytes, finish: bytes = b"null", tail: bytes = b"") -> bytes:
        return (
            self.head
            + b',"choices":[{"index":0,"delta":'
            + delta
            + b',"finish_reason":'
            + finish
            + b',"logprobs":null}]'
            + tail
            + b"}\n\n"
        )

    def _role(self) -> bytes:
        if self.started:
            return b""
        self.started = True
        return b'"role":"assistant",'

    def event(self, event: Event, assembler: Assembler) -> bytes:
        kind = event.kind
        if kind == "delta":
            return self._chunk(
                b"{" + self._role() + b'"content":' + encoder.encode(event.text) + b"}"
            )
        if kind == "tool_call":
            piece = event.tool_call
            assert piece is not None
            index = self.calls_from + piece.index
            self.calls_top = max(self.calls_top, index)
            call: dict[str, Any] = {"index": index, "function": {"arguments": piece.arguments}}
            if piece.id is not None:
                call["id"] = piece.id
                call["type"] = "function"
            if piece.name is not None:
                call["function"]["name"] = piece.name
            return self._chunk(
                b"{" + self._role() + b'"tool_calls":' + encoder.encode([call]) + b"}"
            )
        if kind == "reset":
            self.calls_from = self.calls_top + 1
            reset = encoder.encode({"reset": event.reset})
            return self._chunk(b"{}", tail=b',"lifeline":' + reset)
        reply = event.reply
        assert reply is not None
        if kind == "error":
            return self.error(reply_error(reply, self.route))
        lifeline = lifeline_field(reply, self.route)
        if reply.stream is not None and reply.stream.resets:
            lifeline["content"] = assembler.text  # the answer with the resets applied
            if reply.tool_calls:
                lifeline["tool_calls"] = _tool_calls(reply.tool_calls)
        # A stream without a delta still names the role once, as OpenAI's always does.
        out = self._chunk(
            b"{}" if self.started else b'{"role":"assistant"}',
            encoder.encode(_finish(reply)),
            b',"lifeline":' + encoder.encode(lifeline),
        )
        if self.include_usage:
            usage = encoder.encode(_usage(reply))
            out += self.head + b',"choices":[],"usage":' + usage + b"}\n\n"
        return out + b"data: [DONE]\n\n"

    def error(self, error: HTTPError) -> bytes:
        """An error after the stream started: the SDKs raise an APIError on a chunk whose
        data has an `error` (an unnamed event; no [DONE] follows)."""
        return b"data: " + encoder.encode(error.body()) + b"\n\n"


# ---- small pieces ------------------------------------------------------------------------


def decode_chat(body: bytes) -> ChatRequest:
    """A chat request's JSON body, or an HTTPError (400) saying what is wrong with it."""
    try:
        return _chat_decoder.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        at = _AT_PATH.search(text)
        raise _bad(text, at.group(1) if at else None) from None
    except msgspec.DecodeError as exc:
        raise _bad(f"the body is not JSON: {exc}") from None
    except RecursionError:
        raise _bad("the body is nested too deeply") from None


def _timeout(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        timeout_s = float(value)
    except ValueError:
        timeout_s = math.nan
    if not timeout_s > 0 or math.isinf(timeout_s):
        raise _bad(f"{TIMEOUT_HEADER} must be a number of seconds above 0", TIMEOUT_HEADER)
    return timeout_s


# A traceparent the dispatcher joins (W3C: version ff and all-zero ids are invalid): one it
# would not join is not forwarded, so that a stream's x-lifeline-trace-id, sent before the
# dispatcher says which trace it made, never names a trace that does not exist. A version
# after 00 may add fields after a dash: its first 55 characters, which every version shares,
# are forwarded (as W3C says to read one).
_TRACEPARENT = re.compile(
    r"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}"
)


def _trace_headers(request: Request) -> dict[str, str] | None:
    """The caller's W3C trace context, forwarded so that Lifeline's spans join its trace."""
    traceparent = request.headers.get(TRACEPARENT)
    if traceparent is None:
        return None
    traceparent = traceparent.strip()
    if not _TRACEPARENT.fullmatch(traceparent[:55]):
        return None
    if len(traceparent) > 55 and (traceparent.startswith("00") or traceparent[55] != "-"):
        return None
    headers = {TRACEPARENT: traceparent[:55]}
    tracestate = request.headers.get(TRACESTATE)
    if tracestate and len(tracestate) <= 512:
        headers[TRACESTATE] = _ascii(tracestate)
    return headers


class _HangUpWatch:
    """Cancels `future` (an answer's, or the task awaiting a stream's first event) when `gone()`
    returns (its HTTP client disconnected). Watching costs a
    task, so it starts only for an answer that has not come within _WATCH_AFTER_S: most come
    sooner, and a client leaving is then noticed that much later."""

    __slots__ = ("_future", "_gone", "_task", "_timer", "happened")

    def __init__(self, gone: Callable[[], Awaitable[None]], future: asyncio.Future[Any]) -> None:
        self._gone = gone
        self._future = future
        self._task: asyncio.Task[None] | None = None
        self.happened = False
        self._timer = asyncio.get_running_loop().call_later(_WATCH_AFTER_S, self._start)

    def _start(self) -> None:
        if not self._future.done():
            self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        await self._gone()
        self.happened = True
        self._future.cancel()

    def stop(self) -> None:
        self._timer.cancel()
        if self._task is not None:
            self._task.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (its body has been read: the server's next message
    is http.disconnect, which comes when the connection closes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Unread(asyncio.Queue[Msg]):
    """A stream's events not yet written to its HTTP client, and what they hold in memory
    (`bytes`, each event counted as its data and _EVENT_COST). A client that stops reading
    (its connection open, its socket full) would otherwise make the gateway hold the rest of
    the answer, several hundred bytes per token, for as long as it keeps the connection. A
    stream is cut when its events hold over _MAX_UNREAD_BYTES and none was taken for
    _UNREAD_GRACE_S: a burst that a reading client takes as fast as it comes is not cut."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.taken_at = time.monotonic()  # when its writer last took an event
        self.timer: Timeout | None = None  # puts _GAVE_UP in it when the wait runs out
        # When its last message (event or heartbeat) came, and, once a heartbeat came (its
        # dispatcher sends them), how long a silence means the dispatcher is gone.
        self.heard_at = time.monotonic()
        self.silence_s: float | None = None
        self.reconnects = 0  # the NATS connection's count of them when the request went

    def gave_up(self) -> None:
        self.put_nowait(_GAVE_UP)

    def unread_for(self) -> float:
        return time.monotonic() - self.taken_at


def _give_up(future: asyncio.Future[Msg]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


async def _next_event(queue: _Unread, wait_s: float, nc: Client) -> Msg:
    """The stream's next event; the events that came in time come before its _GAVE_UP."""
    msg = await queue.get()
    if msg is _GAVE_UP:
        raise _no_answer(wait_s, nc.is_connected)
    if msg is _STOPPING:
        raise _stopping()
    if msg is _SILENT:
        raise _went_silent(nc.is_connected, nc.stats["reconnects"] != queue.reconnects)
    if msg is _READ_TOO_SLOWLY:
        raise HTTPError(
            408,
            "the stream was stopped: this client stopped reading its events, and over "
            f"{_MAX_UNREAD_BYTES:,} bytes of them waited unread for {_UNREAD_GRACE_S:g} s; read "
            "them as they come, or send the request without `stream`",
            "stream_read_too_slowly",
        )
    queue.bytes -= len(msg.data) + _EVENT_COST
    queue.taken_at = time.monotonic()
    return msg


def _too_large_for_nats(size: int, max_payload: int) -> HTTPError:
    return HTTPError(
        413,
        f"the request is {size} bytes as Lifeline sends it (headers included), above the NATS "
        f"server's max_payload of {max_payload}",
        errors.PAYLOAD_TOO_LARGE,
    )


def _gzipped(encoding: str | None) -> bool:
    """Whether a body sent with this Content-Encoding is gzipped; 415 for one the gateway
    cannot read (RFC 9110 8.4), naming the one it can in Accept-Encoding (RFC 7694)."""
    codings = [c.strip().lower() for c in (encoding or "").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return False
    if codings in (["gzip"], ["x-gzip"]):
        return True
    raise HTTPError(
        415,
        f"the body's Content-Encoding is {_ascii(encoding or '')!r}: the gateway reads a body "
        "as it is or gzipped once (Content-Encoding: gzip)",
        "unsupported_content_encoding",
        headers={"accept-encoding": "gzip"},
    )


def _gunzip(body: bytes, limit: int) -> bytes:
    """A gzipped body inflated, member after member (as `cat a.gz b.gz` makes one), refused
    (413) as soon as it is over `limit`: a bomb (KiBs that inflate to GiBs) costs no more than
    a body at the limit."""
    pieces, size = [], 0
    try:
        while body:
            inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip's header and trailer
            piece = inflate.decompress(body, limit + 1 - size)
            size += len(piece)
            if size > limit:
                raise HTTPError(
                    413,
                    f"the gzipped body inflates to over {limit} bytes, the gateway's limit",
                    errors.PAYLOAD_TOO_LARGE,
                )
            if not inflate.eof:  # short of the limit, so every byte was read: it is cut short
                raise _bad("the gzipped body ends before its gzip stream does")
            pieces.append(piece)
            body = inflate.unused_data  # the next member, if any
    except zlib.error as exc:
        raise _bad(f"the body is not gzip, as its Content-Encoding says: {exc}") from None
    return b"".join(pieces)


def _body_too_slow(size: int) -> HTTPError:
    return HTTPError(
        408,
        f"the request body did not arrive within {_BODY_TIMEOUT_S:g} s ({size} bytes came): "
        "send it again",
        "request_timeout",
        headers={"connection": "close"},
    )


def _too_large(size: int, limit: int) -> HTTPError:
    return HTTPError(
        413, f"the body is {size} bytes, above the gateway's {limit}", errors.PAYLOAD_TOO_LARGE
    )


def _no_dispatcher() -> HTTPError:
    return _unavailable(
        "no Lifeline dispatcher is running on this gateway's NATS server: start one "
        "(`lifeline run` or `lifeline dispatcher`)",
        "no_dispatcher",
    )


def _nats_closed() -> HTTPError:
    return _unavailable(
        "this gateway's NATS connection is closed for good and it is stopping: send the request "
        "to another gateway, or again once it is restarted",
        "gateway_unavailable",
    )


def _nats_down(waited_s: float) -> HTTPError:
    return _unavailable(
        "this gateway has lost its NATS connection and is reconnecting (it waited "
        f"{waited_s:g} s for it): send the request again shortly, or to another gateway",
        "nats_unavailable",
    )


def _stopping() -> HTTPError:
    return _unavailable(
        f"this gateway is stopping and the request was still running {_STOP_GRACE_S - 1} s "
        "later, so it was aborted: send it again, to another gateway or once this one is back",
        "gateway_stopping",
    )


def _unavailable(message: str, code: str) -> HTTPError:
    """A 503 worth sending again in a second, in the shape of an overloaded dispatcher's."""
    return HTTPError(503, message, code, kind="overloaded_error", headers=_retry_after(1.0))


def _no_answer(wait_s: float, connected: bool = True) -> HTTPError:
    why = (
        "the dispatcher may have stopped"
        if connected
        else "this gateway's NATS connection dropped meanwhile and is reconnecting, so the "
        "answer may have been lost on the way"
    )
    return HTTPError(
        504,
        f"no answer from Lifeline within {wait_s:g} s (the request's timeout and a grace): " + why,
        "gateway_timeout",
        kind="timeout_error",
    )


class _Silent(Exception):
    """A request's dispatcher sent heartbeats, then nothing for _SILENCE_S."""


def _went_silent(connected: bool, reconnected: bool) -> HTTPError:
    if not connected:
        why = "this gateway's NATS connection dropped meanwhile and is reconnecting"
    elif reconnected:  # whatever was sent to it while it was away is gone: the answer too
        why = (
            "this gateway's NATS connection dropped and reconnected meanwhile, and what was "
            "sent to it while it was away was lost"
        )
    else:
        why = (
            "the dispatcher serving it most likely died or lost its NATS connection (no other "
            "dispatcher takes a request over)"
        )
    return HTTPError(
        504,
        f"Lifeline went silent: nothing came for {_SILENCE_S:g} s, not even the heartbeat its "
        f"dispatcher sends every {_HEARTBEAT_S:g} s while it works; {why}: send the request "
        "again",
        "gateway_timeout",
        kind="timeout_error",
    )


def _broken(exc: Exception) -> HTTPError:
    return HTTPError(502, f"the event stream broke: {exc}", "stream_broken", kind="server_error")


def _json(body: Any) -> Response:
    return Response(encoder.encode(body), 200, media_type="application/json")


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found" if exc.status_code == 404 else "invalid_request"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    if exc.status_code in (404, 405):  # a base_url without /v1, the legacy completions API
        message += (
            "; this gateway serves POST /v1/chat/completions and GET /v1/models: an SDK's "
            f"base_url is {str(request.base_url).rstrip('/')}/v1"
        )
    return HTTPError(exc.status_code, message, kind, headers=exc.headers).response()


async def _internal(request: Request, exc: Exception) -> Response:
    log.exception("gateway: %s %s failed", request.method, request.url.path)
    message = f"a bug in Lifeline's gateway ({type(exc).__name__}); its log has the traceback"
    return HTTPError(500, message, errors.INTERNAL, kind="server_error").response()


def _http_protocol(parser: str = "httptools") -> type[_Guarded]:
    """uvicorn's HTTP/1.1 protocol, httptools (C) where installed, else h11 (pure Python), with
    the bounds uvicorn leaves out (`_Guarded`)."""
    Protocol: type[asyncio.Protocol]
    try:
        if parser != "httptools":
            raise ImportError(parser)
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Protocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Protocol
    return type("GuardedHttpProtocol", (_Guarded, Protocol), {})


def max_connections_default() -> int:
    """As many connections as leave file descriptors for NATS, logs and the rest: the soft
    RLIMIT_NOFILE less 256, at most 10,000; under a limit of 512, half of it (a floor of 64
    went past a limit of 64, and the file descriptors ran out before the guard's 503 could
    answer: every new connection was reset, with no line said)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 1000
    if soft == resource.RLIM_INFINITY:
        return _MAX_CONNECTIONS
    if soft < 512:
        log.warning(
            "the open-files limit is %d: the gateway takes at most %d connections at once "
            "(raise `ulimit -n`, the hard limit, for more)",
            soft,
            max(1, soft // 2),
        )
        return max(1, soft // 2)
    return min(_MAX_CONNECTIONS, soft - 256)


# accept()'s failures that asyncio's loop meets by accepting nothing for a second.
_OUT_OF_RESOURCES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


class _Listener(socket.socket):
    """The gateway's listening socket, whose accept() stops asyncio's own loop from spinning
    when file descriptors run out. Its accept loop then logs the failure and accepts nothing
    for a second, but before CPython's fix (gh-151615) it goes on calling accept() for the rest
    of its backlog (100) first, each failure logged and scheduling one more retry: the retries
    multiplied, thousands of failed accepts a second, a core busy and the log flooded. Here
    the accept after a failure says there is nothing left, which ends that loop, as the fix
    does. (uvloop accepts with libuv, which sheds such connections, and never calls this.)"""

    _failed = False

    def accept(self) -> tuple[socket.socket, Any]:
        if self._failed:
            self._failed = False
            raise BlockingIOError(errno.EAGAIN, "accepting nothing for a second")
        try:
            return super().accept()
        except OSError as exc:
            if exc.errno not in _OUT_OF_RESOURCES:
                raise
            self._failed = True
            raise OSError(
                exc.errno,
                f"{exc.strerror}: the gateway accepts no connection for a second; raise the "
                "open-files limit (ulimit -n, its hard limit) or lower --max-connections",
            ) from None


def _close_delimited(cycle: Any) -> Callable[[Any], Awaitable[None]]:
    """`cycle.send` for an HTTP/1.0 request on httptools' protocol, which frames a response
    without a Content-Length (a stream) as chunked, a coding HTTP/1.0 does not have: its client
    read the chunk sizes as part of the body. Such a body is sent as it is, and ends where the
    connection closes (uvicorn closes an HTTP/1.0 connection after its answer), as h11 does."""
    send = cycle.send
    until_close = False

    async def send_close_delimited(message: Any) -> None:
        nonlocal until_close
        if message["type"] == "http.response.start":
            if not any(name.lower() == b"content-length" for name, _ in message.get("headers", ())):
                until_close = True
                cycle.chunked_encoding = False  # so uvicorn adds no Transfer-Encoding
                cycle.expected_content_length = sys.maxsize  # and counts none of it
        elif until_close and not message.get("more_body", False):
            cycle.expected_content_length = len(message.get("body", b""))  # the last piece
        await send(message)

    return send_close_delimited


def _head_size(scope: dict[str, Any]) -> int:
    """About the bytes of a parsed request's head: its request line and header lines."""
    line = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + 32
    return line + sum(len(name) + len(value) + 4 for name, value in scope.get("headers", ()))


class _Guarded:
    """Bounds on what a connection holds before its request reaches the app, which uvicorn
    does not set: a request's head (its request line and headers) must come within
    `_HEAD_TIMEOUT_S` of the connection opening or of data arriving between requests (else
    408), and within `_MAX_HEAD_BYTES` (else 431); past `max_connections` open at once, a new
    connection is answered 503 and closed; one whose answer its client stops taking is closed
    after _UNDRAINED_S. Without them one client can hold a connection and its buffered head (or
    its answer) for good, or send headers until the gateway runs out of memory, and many can
    take every file descriptor, the NATS connection's reconnects included.

    Mixed into uvicorn's HttpToolsProtocol or H11Protocol (`_http_protocol`); it relies on
    attributes both share (`connections`, `cycle`, `scope`, `tasks`, `transport`, `loop`), which
    tests/test_gateway.py checks."""

    max_connections = 1000  # set per server by Gateway.start
    _head_timer: asyncio.TimerHandle | None = None
    _head_bytes = 0
    _refused = False
    _serving: Any = None  # the request cycle its app task runs (see connection_lost)
    _ahead = 0  # about the bytes of a pipelined head come while _serving runs
    turned_away = 0  # connections refused for their number since the last warning (per class)
    warned_at = -math.inf
    _drain: Timeout | None = None  # while its writes are paused: when to look at them again
    _unsent = 0  # the bytes its transport held then
    _drains = Timeouts()  # every connection's (one loop timer for all; stall-proof)

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        if len(self.connections) > self.max_connections:  # type: ignore[attr-defined]
            self._turned_away()
            self._refuse(
                503,
                f"the gateway has its maximum of {self.max_connections} connections open: "
                "retry, or raise it (lifeline gateway --max-connections)",
                "too_many_connections",
                b"retry-after: 1\r\n",
            )
            return
        self._await_head()

    def _unsupported_upgrade_warning(self) -> None:
        """uvicorn's two warnings per request with an Upgrade header (one advising to install
        a WebSocket library): the gateway serves no WebSockets by design, and answers such a
        request as plain HTTP, so there is nothing to warn an operator of."""

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # the rest of a refused head, read and dropped until the client closes
        # A read that could hold a head over the bound: the app's task this read starts is
        # taken back if it does (a small read, nearly every one, costs one comparison).
        big = self._head_bytes + len(data) > _MAX_HEAD_BYTES
        tasks: set[asyncio.Task[None]] = self.tasks  # type: ignore[attr-defined]
        before = set(tasks) if big else None
        super().data_received(data)  # type: ignore[misc]
        if not self._between_requests():
            # A head came whole (the app has its request): what nearly every read is, at no
            # cost of a timer. A kept-alive connection's silence is uvicorn's to time out.
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            serving, scope = self._serving, self.scope  # type: ignore[attr-defined]
            if serving is not None and (serving is not self.cycle or scope is not serving.scope):
                self._pipelined_head(data, before is not None)
                return
            if before is not None and _head_size(scope) > _MAX_HEAD_BYTES:
                for task in tasks - before:  # not started yet: the request never runs
                    task.cancel()
                self._too_large_head()
            return
        if self._head_timer is None:  # these bytes begin a head that is not complete yet
            self._await_head()
        if self._answered_body():  # dropped by the parser: timed (it may trickle), not counted
            return
        conn = getattr(self, "conn", None)
        if conn is not None:  # h11's holds the head so far, and no more (the last body's end)
            self._head_bytes = len(conn.trailing_data[0])
        else:
            self._head_bytes += len(data)
        if self._head_bytes > _MAX_HEAD_BYTES:
            self._too_large_head()

    def _answered_body(self) -> bool:
        """Whether all that came since the last answer is that request's body, answered before
        it was read whole (a 413 by its Content-Length, a 401): no next head has begun."""
        cycle = self.cycle  # type: ignore[attr-defined]
        if cycle is None:
            return False
        conn = getattr(self, "conn", None)
        if conn is not None:  # h11's: in the body, or past it with nothing more
            state = conn.their_state
            return state is h11.SEND_BODY or (state is h11.IDLE and not conn.trailing_data[0])
        # httptools' protocol begins a new scope at a message's first byte.
        return self.scope is cycle.scope  # type: ignore[attr-defined,no-any-return]

    def _pipelined_head(self, data: bytes, big: bool) -> None:
        """Bytes of the next request's head, sent before this one's answer (pipelining):
        httptools' protocol reads it while this one is served, keeping each header, and the
        head's bound above applies only between requests. Over it, the connection is closed
        at once, unanswered: an answer now would read as the one to the request being served
        (which is aborted, as at any hang-up)."""
        scope = self.scope  # type: ignore[attr-defined]
        if scope is self.cycle.scope:  # type: ignore[attr-defined]
            # Its head came whole (the request waits its turn); what follows is its body.
            self._ahead = 0
            over = big and _head_size(scope) > _MAX_HEAD_BYTES
        else:
            ahead = self._ahead  # 0: the head began in this read, with what came before it
            self._ahead = ahead + len(data) if ahead else _head_size(scope)
            over = self._ahead > _MAX_HEAD_BYTES
        if over:
            self._refused = True
            self.transport.abort()  # type: ignore[attr-defined]

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request its parser refuses (a malformed request line or header,
        a body framed by both Content-Length and Transfer-Encoding, a bad chunk), plain text
        there: in OpenAI's error shape here, as the gateway's other refusals, and closed."""
        serving = self._serving or self.cycle  # type: ignore[attr-defined]
        scope = self.scope  # type: ignore[attr-defined]
        if (
            serving is not None
            and not serving.response_complete
            and (serving.response_started or scope is not serving.scope)
        ):
            # What is refused is a request sent before this one's answer, or it came while
            # that answer is written: a 400 now would be read as (or in) that answer. Closed
            # unanswered, the request being served aborted, as at any hang-up.
            self._refused = True
            self.transport.abort()  # type: ignore[attr-defined]
            return
        self._refuse(
            400,
            "the request is not valid HTTP/1.1 (a malformed request line or header, or a body "
            "framed by both Content-Length and Transfer-Encoding)",
            "invalid_http_request",
        )

    def _too_large_head(self) -> None:
        self._refuse(
            431,
            f"the request's head (request line and headers) is over {_MAX_HEAD_BYTES:,} bytes",
            "request_header_fields_too_large",
        )

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        # httptools' protocol only (h11's reads no request before the last is answered).
        self._serving, self._ahead = cycle, 0
        if cycle.scope["http_version"] == "1.0":
            cycle.send = _close_delimited(cycle)
        super()._start_asgi_task(cycle, app)  # type: ignore[misc]

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        self._await_drain()

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[misc]
        if self._drain is not None:
            self._drains.cancel(self._drain)
            self._drain = None

    def _await_drain(self) -> None:
        """A client that stops reading, its connection open, had the gateway hold the answer
        it does not take for as long as it kept the connection: a body whole in the
        transport's buffer, a stream's events in its queue (never cut when its answer ended
        short of _MAX_UNREAD_BYTES), past every timeout of uvicorn's (a close waits for the
        buffer to be sent). Once none of it was taken for _UNDRAINED_S, the connection is
        closed and that memory freed (a stream's request aborted, as at any hang-up); one
        that takes some, however slowly, is looked at again after as long."""
        self._unsent = self.transport.get_write_buffer_size()  # type: ignore[attr-defined]
        self._drain = self._drains.call_later(_UNDRAINED_S, _Guarded._drained_some, self)

    def _drained_some(self) -> None:
        self._drain = None
        transport: asyncio.Transport = self.transport  # type: ignore[attr-defined]
        if transport.get_write_buffer_size() < self._unsent:
            self._await_drain()
        else:
            transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._drain is not None:
            self._drains.cancel(self._drain)
            self._drain = None
        # A client that pipelines (sends its next request before its answer) makes httptools'
        # protocol take that queued request as its `cycle`, and uvicorn tells only `cycle` of
        # a hang-up: the request being served would run to its end, its provider calls too
        # (a stream written to a closed socket), rather than be aborted as any other is.
        serving = self._serving
        pipelined = serving is not self.cycle  # type: ignore[attr-defined]
        if serving is not None and pipelined and not serving.response_complete:
            serving.disconnected = True
            serving.message_event.set()
        super().connection_lost(exc)  # type: ignore[misc]

    def _turned_away(self) -> None:
        """Log connections refused for their number, at most one line per 10 s: the first at
        once, those after it in the line that follows the 10 s (none is left unreported)."""
        cls = type(self)
        cls.turned_away += 1
        wait = cls.warned_at + _WARN_EVERY_S - time.monotonic()
        if wait <= 0:
            cls._warn_turned_away(self.max_connections)
        elif cls.turned_away == 1:  # the first since the last line: the next line is due then
            self.loop.call_later(wait, cls._warn_turned_away, self.max_connections)  # type: ignore[attr-defined]

    @classmethod
    def _warn_turned_away(cls, max_connections: int) -> None:
        if cls.turned_away:
            log.warning(
                "gateway: %d connection(s) refused with 503: %d open, the maximum "
                "(lifeline gateway --max-connections)",
                cls.turned_away,
                max_connections,
            )
        cls.turned_away, cls.warned_at = 0, time.monotonic()

    def _between_requests(self) -> bool:
        """No request under way: none came yet, or the last one has been answered."""
        cycle = self.cycle  # type: ignore[attr-defined]
        return cycle is None or cycle.response_complete

    def _await_head(self) -> None:
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(_HEAD_TIMEOUT_S, self._head_late)  # type: ignore[attr-defined]

    def _head_late(self) -> None:
        self._head_timer = None
        if self._between_requests():
            self._refuse(
                408,
                f"no complete request head arrived within {_HEAD_TIMEOUT_S:g} s "
                f"({self._head_bytes} bytes came): send it again",
                "request_timeout",
            )

    def _refuse(self, status: int, message: str, code: str, extra: bytes = b"") -> None:
        """Answer `status` in OpenAI's error shape, without the app, and close."""
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        transport: asyncio.Transport = self.transport  # type: ignore[attr-defined]
        if transport.is_closing() or self._refused:
            return
        self._refused = True
        if self._between_requests() and self._answered_body():
            # What took too long is the body of a request already answered: an answer now
            # would be a second one to it, which a client reusing the connection reads as
            # the answer to its next request. Closed without one.
            transport.close()
            return
        # Too many connections is the gateway's load, as a dispatcher's overloaded is; a head
        # too slow or too large is the request's.
        kind = "overloaded_error" if status == 503 else "invalid_request_error"
        body = encoder.encode(HTTPError(status, message, code, kind=kind).body())
        transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n%s\r\n"
            % (status, HTTPStatus(status).phrase.encode(), len(body), extra)
            + body
        )
        if not self._head_bytes or not transport.can_write_eof():
            transport.close()
            return
        # A client still sending would get a reset, which can destroy the answer before it
        # reads it: end our side, drop what still comes, and close once it has closed or
        # after _LINGER_S (nginx's lingering close).
        transport.write_eof()
        self._head_timer = self.loop.call_later(_LINGER_S, transport.close)  # type: ignore[attr-defined]
