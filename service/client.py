"""A Python client for Lifeline's NATS path: one answer, a stream of one, durable jobs.

    async with Lifeline.connect() as lifeline:           # $NATS_URL, else nats://127.0.0.1:4222
        reply = await lifeline.complete("Why did the chicken cross the road?", route="default")
        print(reply.content if reply.status == "ok" else reply.error)

        async with lifeline.stream("Tell me a story", timeout_s=60) as answer:
            async for event in answer:                   # resets applied, gaps detected
                if event.kind == "delta":
                    print(event.text, end="", flush=True)
                elif event.kind == "reset":              # an attempt failed mid-answer
                    redraw(answer.text)                   # the text so far, without the void part
        answer.reply                                     # the end event's reply: attempts, usage

        job = await lifeline.submit("Summarise this later", job_id="ticket-42")
        reply = await lifeline.result("ticket-42", wait_s=30)   # None if none yet

A request is a CompletionRequest, or messages (a string is one user message; a message may be
a ChatMessage or a dict of the wire's fields) with any CompletionRequest field as a keyword.
Replies are CompletionReply Structs (schemas/wire.py).

Errors: an answer with `status == "error"` (all_failed, deadline_exceeded, overloaded, ...) is a
reply like any other: it is returned, never raised (complete(..., overloaded_retries=N) resends
on `overloaded` and `shutting_down` after 1-2x its retry_after_s, within the request's own
timeout). What raises is a transport problem, a LifelineError:
Unreachable (no NATS server, or one refusing the connection its inbox), NoDispatcher (nobody
on llm.complete), NoAnswer (no reply within the request's timeout and a grace: a TimeoutError
too), RequestTooLarge (over the server's max_payload), NotPermitted (the NATS user may not
publish llm.complete, llm.stream or llm.jobs.submit: raised as the server refuses it, on a
connection of your own too; a ValueError), JobsUnavailable (no JetStream). A
stream also raises StreamGap when an event went missing and StreamProtocolError on a message
that is not an event (LifelineErrors too, and subclasses of schemas/streaming.py's own).
A request the wire's types refuse (a bad role, a negative timeout) raises msgspec.ValidationError
before anything is sent. ReplyError(reply) raises an error reply, as the integrations do, as
the class of what a resend can do about it (RequestRefused, Unavailable, DeadlineExceeded).

Stopping: cancel the task awaiting complete(), or leave a stream before its end (break out of
its `async for`, or of its `async with`; aclose()), and the client aborts the request
(llm.abort, with the random abort key it was sent with): its dispatcher cancels its attempts
at their workers, HTTP calls included, so nobody pays for an answer nobody reads. Inside
`async with`, the block is the stream's scope rather than the loop: a second loop (or
finish()) reads on after a `break`.

Its import loads NATS and the wire, nothing of the dispatcher (a contract in pyproject.toml).
The module-level `stream()` and `stream_text()` work on a nats-py connection of your own; any
other language does the same with its NATS client and the protocol in schemas/streaming.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import secrets
import sys
import time
import uuid
import weakref
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Mapping,
)
from types import TracebackType
from typing import Any, NamedTuple, Self, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError

from schemas import ChatMessage, CompletionReply, CompletionRequest, streaming, subjects
from schemas.errors import DEADLINE_EXCEEDED, INTERNAL, RESEND, resend_is_futile
from schemas.streaming import Assembler, Event
from schemas.subjects import STREAM
from schemas.wire import (
    Progress,
    ToolCall,
    encoder,
    message_bytes,
    progress_decoder,
    reply_decoder,
)
from service import jetstream, natsio, natsopts
from service.jobstore import ensure_jobs_as_a_client

__all__ = [
    "DeadlineExceeded",
    "JobsUnavailable",
    "Lifeline",
    "LifelineError",
    "NoAnswer",
    "NoDispatcher",
    "ReplyError",
    "RequestRefused",
    "RequestTooLarge",
    "StreamGap",
    "StreamProtocolError",
    "Streamed",
    "Submitted",
    "Unavailable",
    "Unreachable",
    "abort",
    "abort_key",
    "request_of",
    "stream",
    "stream_text",
]

log = logging.getLogger("lifeline.client")

T = TypeVar("T")

LOCAL_NATS = "nats://127.0.0.1:4222"
_GRACE_S = 5.0  # past the request's own deadline, the dispatcher has surely answered or died
_DEFAULT_TIMEOUT_S = 60.0  # the dispatcher's default_timeout_s, for requests without their own
# A request asks its dispatcher for a heartbeat when it sent nothing for this long: a dispatcher
# that died is told from a slow model in streaming.heartbeat_silence_s (7 s).
HEARTBEAT_S = 2.0
_STALL_S = 0.25  # a wait that ran out this late: the loop stood still (service.loop's)
_JS_TIMEOUT_S = 5.0  # one JetStream operation (publish, bucket read)
_ASK_MIN_S = 1.0  # the least a dispatcher is given to answer llm.jobs.result, whatever wait_s
# (a busy one may take a while, and a client without bucket permissions has no other way)
_MIN_TRY_S = 0.05  # the least time left worth sending a retry with
# An overloaded reply's retry_after_s, as a dispatcher sends it (0.05 to 30 s): anything may
# answer on a reply subject, and a wait outside these (negative, hours) is taken as the bound.
_RETRY_AFTER_MIN_S = 0.05
_RETRY_AFTER_MAX_S = 30.0
_RETRY_AFTER_DEFAULT_S = 0.5  # without one (or one that is no positive number)
# The jobs stream and results bucket as `lifeline run` names and shapes them
# (service.config.JobsSettings' defaults; tests/test_client.py checks they agree).
JOBS_STREAM = "LIFELINE_JOBS"
RESULTS_BUCKET = "lifeline_results"
_JOBS_MAX = 100_000
_JOBS_DEDUP_WINDOW_S = 120.0
_RESULTS_TTL_S = 86_400.0

Messages = str | ChatMessage | Mapping[str, Any] | Iterable[ChatMessage | Mapping[str, Any]]


class LifelineError(Exception):
    """No answer could be had from Lifeline: a transport problem, not an error reply."""


class Unreachable(LifelineError, ConnectionError):
    """No NATS server answered at the URL (or any URL of the cluster list); or, once connected,
    the connection is down and holds as many requests for it as nats-py buffers."""


class NoDispatcher(LifelineError):
    """Nobody is subscribed to llm.complete / llm.stream: no dispatcher runs on this NATS server."""


class NoAnswer(LifelineError, TimeoutError):
    """No reply (or, on a stream, no end) within the request's timeout and a grace: the
    dispatcher may have stopped."""


class NotPermitted(LifelineError, ValueError):
    """The NATS server refused the request: its user may not publish its subject (llm.complete,
    llm.stream, llm.jobs.submit, a JetStream API's), so it went nowhere. Sent again, it is
    refused again (a ValueError, as RequestRefused is): the user's role, not the request, must
    change."""


class RequestTooLarge(LifelineError, ValueError):
    """The request is over the NATS server's max_payload."""


class JobsUnavailable(LifelineError):
    """The jobs stream or results bucket could not be used (is JetStream on: nats-server -js?)."""


class StreamGap(LifelineError, streaming.StreamGap):
    """An event of a stream went missing (a NATS reconnect, a consumer too slow): the text
    so far is not the answer. Also schemas.streaming's StreamGap, as Assembler raises it."""


class StreamProtocolError(LifelineError, streaming.StreamProtocolError):
    """A message on a stream's reply subject that is not an llm.stream event."""


class ReplyError(LifelineError):
    """An error reply, raised: the client returns error replies, the LangChain and Haystack
    integrations raise this (their frameworks' fallbacks and retries expect an exception).

    `ReplyError(reply)` makes the class of the reply's family, as OSError(errno, ...) makes a
    FileNotFoundError, so that retry policies which decide by type (LangGraph's RetryPolicy,
    tenacity's retry_if_exception_type) retry what a resend can cure and nothing else:
        RequestRefused      a resend gets the same answer (also a ValueError)
        Unavailable         overloaded, shutting_down: send it again after retry_after_s
        DeadlineExceeded    deadline_exceeded (also a TimeoutError)
        ReplyError itself   the rest: a chain that failed on a transient kind, aborted, internal
    """

    def __new__(cls, reply: CompletionReply) -> Self:
        family = _family(reply) if cls is ReplyError else cls
        return super(ReplyError, family).__new__(family, reply)

    def __init__(self, reply: CompletionReply) -> None:
        self.reply = reply
        self.type = reply.error.type if reply.error is not None else "internal"
        message = reply.error.message if reply.error is not None else "no error given"
        named = f" (request {reply.id})" if reply.id else ""  # a refusal comes before an id
        text = f"{self.type}: {message}{named}"
        super().__init__(text)
        self.args = (text,)  # OSError's __init__ (DeadlineExceeded's) keeps __new__'s: the reply

    @property
    def retry_after_s(self) -> float | None:
        """When the dispatcher said to send it again (overloaded, shutting_down, a chain whose
        calls were all rate limited), else None."""
        return self.reply.error.retry_after_s if self.reply.error is not None else None

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from the reply, not from the message (an exception's default): pickled (a
        # process pool, a task queue) or copied, it arrives whole.
        return type(self), (self.reply,), self.__dict__


class RequestRefused(ReplyError, ValueError):
    """Sent again unchanged, the request gets the same answer: Lifeline refused it
    (invalid_request, payload_too_large, unknown_route, ...), or every call its chain made
    failed on a kind no retry cures (bad_request, context_length, auth, ...). A ValueError, so
    retry policies that treat one as final (LangGraph's default) do not pay for it again."""


class Unavailable(ReplyError):
    """The dispatcher could not take the request (overloaded) or finish it (shutting_down):
    another one, or a later moment, can; send it again after `retry_after_s`."""


class DeadlineExceeded(ReplyError, TimeoutError):
    """The request's timeout_s or deadline_unix_ms ran out before a target could answer."""


def _family(reply: CompletionReply) -> type[ReplyError]:
    kind = reply.error.type if reply.error is not None else INTERNAL
    if kind in RESEND:
        return Unavailable
    if kind == DEADLINE_EXCEEDED:
        return DeadlineExceeded
    calls = [a for a in reply.attempts if a.outcome not in ("ok", "skipped", "cancelled")]
    skips = (a.reason for a in reply.attempts if a.outcome == "skipped")
    if resend_is_futile(kind, (a.error_type for a in calls), skips):
        return RequestRefused
    return ReplyError


class Submitted(NamedTuple):
    job_id: str
    duplicate: bool  # the id was submitted before within the dedup window: kept once
    stream: str
    seq: int


def request_of(request: CompletionRequest | Messages, **fields: Any) -> CompletionRequest:
    """A CompletionRequest from one, or from messages, with `fields` (any CompletionRequest
    field, by name) set on it. Raises TypeError on an unknown field and msgspec.ValidationError
    on a value the wire refuses."""
    unknown = set(fields) - set(CompletionRequest.__struct_fields__)
    if unknown:
        raise TypeError(
            f"not a CompletionRequest field: {', '.join(sorted(unknown))} "
            f"(fields: {', '.join(CompletionRequest.__struct_fields__)})"
        )
    fields = {name: value for name, value in fields.items() if value is not None}
    if isinstance(request, CompletionRequest):
        if not fields:
            return request
        data = {f: getattr(request, f) for f in CompletionRequest.__struct_fields__} | fields
    else:
        data = {"messages": _messages(request), **fields}
    return msgspec.convert(data, CompletionRequest)


def _messages(messages: Messages) -> list[ChatMessage | Mapping[str, Any]]:
    if isinstance(messages, str):
        return [ChatMessage("user", messages)]
    if isinstance(messages, ChatMessage | Mapping):
        return [messages]
    return list(messages)


def _wait_s(request: CompletionRequest, default_s: float) -> float:
    """How long the dispatcher may take to answer `request`: its own bound, plus a grace. As
    the dispatcher reads it: deadline_unix_ms alone bounds the request (no default then), and
    with timeout_s the sooner of the two does."""
    timeout_s = _sent_timeout_s(request)
    if request.deadline_unix_ms is None:
        bound = timeout_s or default_s
    else:
        bound = max(request.deadline_unix_ms / 1000 - time.time(), 0.0)
        if timeout_s is not None:
            bound = min(bound, timeout_s)
    return bound + _GRACE_S


def _sent_timeout_s(request: CompletionRequest) -> float | None:
    """The request's timeout_s as the dispatcher reads it. JSON has no infinity: msgspec
    sends timeout_s=inf as null, which the dispatcher bounds by its default_timeout_s, so
    waiting for ever on it hung a call whose dispatcher had died."""
    timeout_s = request.timeout_s
    return None if timeout_s is not None and math.isinf(timeout_s) else timeout_s


class Lifeline:
    """A connection to Lifeline over NATS. `await Lifeline.connect(...)` or
    `async with Lifeline.connect(...) as lifeline:`; `Lifeline(nc)` wraps a nats-py
    connection of your own (close() leaves it open).

    `route` and `timeout_s` are the defaults of every request that names none;
    `default_timeout_s` is how long to wait for a request without a timeout_s (set it to the
    dispatcher's `default_timeout_s` if you changed that). `jobs_stream` and
    `results_bucket` are the config's [jobs] names, and `jobs_replicas` its
    [jetstream] replicas, for a stream and bucket submit() makes before any dispatcher has."""

    def __init__(
        self,
        nc: Client,
        *,
        route: str | None = None,
        timeout_s: float | None = None,
        default_timeout_s: float = _DEFAULT_TIMEOUT_S,
        jobs_stream: str = JOBS_STREAM,
        results_bucket: str = RESULTS_BUCKET,
        jobs_replicas: int = 1,
        owns_connection: bool = False,
    ) -> None:
        self.nc = nc
        self.route = route
        self.timeout_s = timeout_s
        self.default_timeout_s = default_timeout_s
        self.jobs_stream = jobs_stream
        self.results_bucket = results_bucket
        self.jobs_replicas = jobs_replicas
        self._owns = owns_connection
        self._jobs_ready = False
        self._keys: set[str] = set()  # the abort keys of the requests in flight
        self._replies = _Replies.of(nc)  # llm.complete's, for requests that ask for heartbeats
        # The event loop its connection lives in: nats-py's tasks and futures are that loop's.
        self._loop: asyncio.AbstractEventLoop | None = _running_loop()

    @classmethod
    def connect(
        cls,
        url: str | None = None,
        *,
        name: str = "lifeline-client",
        connect_timeout_s: float = 5.0,
        route: str | None = None,
        timeout_s: float | None = None,
        default_timeout_s: float = _DEFAULT_TIMEOUT_S,
        jobs_stream: str = JOBS_STREAM,
        results_bucket: str = RESULTS_BUCKET,
        jobs_replicas: int = 1,
        **options: str,
    ) -> _Connecting:
        """Connect to NATS as the `lifeline` commands do: `url`, else $NATS_URL, else
        nats://127.0.0.1:4222, a comma-separated list naming a cluster's servers (any one
        reachable is enough); `options` are the other --nats-* options by their [nats] key
        (user, password, token, nkey and creds files, ca, cert, key, inbox_prefix), each
        else its environment variable (NATS_USER, NATS_CREDS, ...; service/natsopts.py).
        User info in the URL works too.

        Raises Unreachable when no server answers (every server refused once, or none within
        connect_timeout_s) or when the server refuses the connection its inbox (a
        least-privilege user without its inbox_prefix: no answer could reach it), NatsOptionError
        (a ValueError) on conflicting options or an unreadable file. Once connected, the
        connection reconnects for as long as it takes (requests meanwhile wait, then raise
        NoAnswer)."""
        unknown = set(options) - set(natsopts.ENV)
        if unknown:
            raise TypeError(
                f"unknown NATS option {', '.join(sorted(unknown))} "
                f"(options: {', '.join(k for k in natsopts.ENV if k != 'url')})"
            )
        resolved = natsopts.resolve({**options, "url": url}, default_url=LOCAL_NATS)
        settings = {
            "route": route,
            "timeout_s": timeout_s,
            "default_timeout_s": default_timeout_s,
            "jobs_stream": jobs_stream,
            "results_bucket": results_bucket,
            "jobs_replicas": jobs_replicas,
        }
        return _Connecting(cls._open(resolved, name, connect_timeout_s, settings))

    @classmethod
    async def _open(
        cls,
        resolved: natsopts.NatsOptions,
        name: str,
        connect_timeout_s: float,
        settings: dict[str, Any],
    ) -> Self:
        kwargs = resolved.connect_kwargs()
        failures: list[BaseException] = []  # while connecting: each server's refusal
        connected = False
        every_server_failed = asyncio.Event()

        outage = _Outage(resolved.shown)
        refusals = natsio.PublishRefusals()  # told by on_error: nothing chained onto it
        refused: list[str] = []  # while it checks its inbox: the server's refusals

        async def on_error(exc: Exception) -> None:
            refused_publish = natsio.refused_publish(exc)
            if refused_publish is not None and refusals.refused(refused_publish, resolved.who):
                return  # a request's own: it raises NotPermitted, saying so
            if checking_inbox and "permissions violation for subscription" in str(exc).lower():
                refused.append(str(exc).lower())
                return
            if connected and "permissions violation" in str(exc).lower():
                # The server refused one message (a publish, a subscription); the connection
                # is up: no outage, said as it is.
                log.warning("NATS at %s: %s: %s", resolved.shown, type(exc).__name__, exc)
                return
            if connected:
                outage.failed(exc)
                return
            failures.append(exc)
            if len(failures) >= len(kwargs["servers"]):
                every_server_failed.set()

        async def on_reconnected() -> None:
            outage.over()

        checking_inbox = False
        nc = Client()
        natsio.tells_refusals(nc, refusals)
        connecting = asyncio.ensure_future(
            nc.connect(
                **kwargs,
                name=name,
                connect_timeout=connect_timeout_s,
                # Once connected, reconnect for as long as it takes; the first connect gives
                # up when every server has failed once, or after connect_timeout_s.
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                error_cb=on_error,
                reconnected_cb=on_reconnected,
            )
        )
        gave_up = asyncio.ensure_future(every_server_failed.wait())
        try:
            await asyncio.wait(
                (connecting, gave_up), timeout=connect_timeout_s, return_when="FIRST_COMPLETED"
            )
        except asyncio.CancelledError:
            # Given up on (a timeout around connect(), a cancelled caller): nats-py would go on
            # connecting for good, a socket open and another dialed after each timeout.
            await asyncio.shield(_stop_connecting(nc, connecting))
            raise
        finally:
            gave_up.cancel()
        if connecting.done() and not connecting.cancelled() and connecting.exception() is None:
            connected = checking_inbox = True
            try:
                inbox = await natsio.subscribe_to_an_inbox(nc, connect_timeout_s)
            except asyncio.CancelledError:  # given up on: no connection left behind
                await asyncio.shield(natsio.close(nc))
                raise
            checking_inbox = False
            if inbox is not None and any(f'"{inbox.lower()}"' in e for e in refused):
                await natsio.close(nc)
                raise Unreachable(_inbox_refused(resolved, inbox))
            return cls(nc, owns_connection=True, **settings)
        await _stop_connecting(nc, connecting)
        why: BaseException | None = failures[-1] if failures else None
        if why is None and not connecting.cancelled():
            why = connecting.exception()
        reason = f"{type(why).__name__}: {why}" if why else f"none within {connect_timeout_s:g} s"
        raise Unreachable(
            f"cannot reach NATS at {resolved.shown} ({reason}). "
            "Start one (`lifeline run` starts an embedded server), or set NATS_URL"
        )

    async def close(self) -> None:
        """Close the connection that connect() made: requests still in flight on it are aborted
        at their dispatchers and raise LifelineError. On a connection of your own
        (`Lifeline(nc)`) it does nothing: the connection, and the calls made on it, stay yours
        to end. From another event loop than its own, it closes the connection in its own loop while
        that loop runs (in another thread), and does nothing (never raises) once it has
        stopped or closed."""
        owner = self._loop
        if owner is not None and owner is not _running_loop():
            if self._owns and owner.is_running() and not owner.is_closed():
                with contextlib.suppress(Exception):
                    closing = asyncio.run_coroutine_threadsafe(self.close(), owner)
                    await asyncio.wait_for(asyncio.wrap_future(closing), _JS_TIMEOUT_S)
            return
        if self._owns:
            for key in list(self._keys):
                await abort(self.nc, key)
            await natsio.close(self.nc)  # also while the server is gone
            self._replies.closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def request(self, request: CompletionRequest | Messages, **fields: Any) -> CompletionRequest:
        """The CompletionRequest this client would send (its default route and timeout_s
        applied to one that sets neither)."""
        defaults = {"route": self.route, "timeout_s": self.timeout_s}
        if isinstance(request, CompletionRequest):
            defaults = {
                "route": self.route if request.route == "default" else None,
                "timeout_s": self.timeout_s if request.timeout_s is None else None,
            }
        return request_of(request, **{**defaults, **fields})

    async def complete(
        self,
        request: CompletionRequest | Messages,
        *,
        overloaded_retries: int = 0,
        heartbeat_s: float | None = HEARTBEAT_S,
        on_progress: Callable[[Progress], Any] | None = None,
        **fields: Any,
    ) -> CompletionReply:
        """Send one request to llm.complete and return its reply, ok or error (an error reply
        is returned, not raised). `fields` are CompletionRequest fields: route, timeout_s,
        max_tokens, tools, tool_choice, response_format, ... An `overloaded` (or
        `shutting_down`) reply is sent again, after 1-2x its retry_after_s, up to
        overloaded_retries times, all within the request's timeout (fixed at the first send:
        a retry is sent with what is left; the refusal is returned when no time is left).
        `heartbeat_s`: the dispatcher is asked for a heartbeat every this many seconds until
        it replies, so one that died raises NoAnswer within streaming.heartbeat_silence_s of
        its last, not at the request's timeout (None: no heartbeats). `on_progress` is called
        with each heartbeat's Progress (how long the dispatcher has had the request, the
        attempts that failed so far), in the connection's read: keep it short."""
        self._check_loop()
        _check_retries(overloaded_retries)
        _check_heartbeat(heartbeat_s)
        every_s = _heartbeat_ms(heartbeat_s)
        req = sent = self.request(request, **fields)
        # One deadline for the whole call, fixed at the first send: a retry is sent with what
        # is left of it (its timeout_s), and none is sent when the wait before it ends past it.
        deadline = time.monotonic() + _wait_s(req, self.default_timeout_s) - _GRACE_S
        refusals = natsio.publish_refusals(self.nc)
        for retry in range(overloaded_retries + 1):
            payload = encoder.encode(sent)
            key = abort_key()
            headers = _traced({subjects.ABORT_KEY: key})
            if every_s is not None:
                headers[subjects.HEARTBEAT_MS] = str(round(every_s * 1000))
            _check_size(self.nc, payload, headers)
            _check_room(self.nc, payload, headers)
            self._keys.add(key)
            reconnects = _reconnects(self.nc)
            wait_s = _wait_s(sent, self.default_timeout_s)
            try:
                asking = (
                    self.nc.request(subjects.COMPLETE, payload, timeout=wait_s, headers=headers)
                    if every_s is None
                    else self._replies.request(
                        self.nc, subjects.COMPLETE, payload, headers, wait_s, every_s, on_progress
                    )
                )
                msg = await _unless_refused(refusals, subjects.COMPLETE, asking)
            except asyncio.CancelledError:  # nobody waits for the answer any more: stop it
                await abort(self.nc, key)
                raise
            except nats.errors.NoRespondersError:
                raise NoDispatcher(
                    f"no dispatcher is subscribed to {subjects.COMPLETE}: start one "
                    "(`lifeline run`)"
                ) from None
            except _WentSilent as silent:
                await abort(self.nc, key)  # most likely nobody runs it: in case one does
                raise NoAnswer(
                    f"no reply on {subjects.COMPLETE}, and nothing for {silent.silence_s:g} s, "
                    f"not even the heartbeat its dispatcher sends every {every_s:g} s while it "
                    f"works; {_silence_why(self.nc, reconnects)}"
                ) from None
            except NatsTimeoutError:
                await abort(self.nc, key)  # given up on: whatever still runs for it stops
                raise NoAnswer(
                    f"no reply on {subjects.COMPLETE} within "
                    f"{_wait_s(sent, self.default_timeout_s):g} s (the request's timeout and a "
                    f"grace); {_why_silent(self.nc, sent, self.default_timeout_s, reconnects)}"
                ) from None
            except nats.errors.ConnectionClosedError:
                raise _closed() from None
            except nats.errors.OutboundBufferLimitError:
                # Only nats-py's request() left a future in its map; with heartbeats (_Replies)
                # the newest there is another request's, whose answer would reach nobody.
                if every_s is None:
                    _forget_refused(self.nc)
                raise _buffer_full() from None
            except nats.errors.Error as exc:  # a connection of one's own draining (nc.drain())
                raise _unsent(exc) from None
            finally:
                self._keys.discard(key)
            reply = _decoded(msg.data, subjects.COMPLETE)
            if retry < overloaded_retries and _overloaded(reply):
                retry_req = await _wait_to_retry(req, reply, deadline)
                if retry_req is not None:
                    sent = retry_req
                    continue
            return reply
        raise AssertionError("unreachable")  # pragma: no cover

    def stream(
        self,
        request: CompletionRequest | Messages,
        *,
        overloaded_retries: int = 0,
        heartbeat_s: float | None = HEARTBEAT_S,
        **fields: Any,
    ) -> Streamed:
        """Send one request to llm.stream: an async iterable of its events (schemas/streaming.py:
        delta, tool_call, reset, end, error), resets applied to `.text`, a missing event raised
        as StreamGap. Leaving an `async for` over it before its end (a break, a return, an
        exception) ends the stream: unsubscribed, its request aborted. In `async with`, the
        block ends it instead, and a loop left early can be followed by another (or finish())
        that reads on. `fields` and overloaded_retries as for complete(); a request refused as
        overloaded is sent again before any event of it is yielded. `heartbeat_s`: the
        dispatcher is asked for a heartbeat whenever the stream was quiet this long, so one
        that died mid-stream raises NoAnswer within streaming.heartbeat_silence_s of its last
        event, not at the request's timeout (None: no heartbeats)."""
        self._check_loop()
        _check_retries(overloaded_retries)
        _check_heartbeat(heartbeat_s)
        req = self.request(request, **fields)
        return Streamed(
            self.nc,
            req,
            overloaded_retries,
            self.default_timeout_s,
            self._keys,
            self._check_loop,
            refusals=natsio.publish_refusals(self.nc),
            heartbeat_s=heartbeat_s,
        )

    async def submit(
        self,
        request: CompletionRequest | Messages,
        *,
        job_id: str | None = None,
        notify: str | None = None,
        **fields: Any,
    ) -> Submitted:
        """Publish a durable job to llm.jobs.submit through JetStream, its id (job_id, else the
        request's id, else a new one) as Nats-Msg-Id: it waits in the jobs stream until a
        dispatcher has stored its result, even when none runs now. The same id again within
        the dedup window is acknowledged as a duplicate and kept once. `notify`: a subject
        the result is also published on (ValueError for one a dispatcher would not publish
        on). Creates the stream and bucket (as a dispatcher would) when no dispatcher has yet."""
        self._check_loop()
        req = self.request(request, **fields)
        job_id = job_id or req.id or uuid.uuid4().hex
        check_job_id(job_id)
        if notify and (why := subjects.reply_subject_refused(notify)) is not None:
            # The dispatcher skips such a subject without a word (publishing there would loop
            # through Lifeline's subjects, reach the server's, or close its connection): taken
            # here, the job would run and its result never come where it was awaited.
            raise ValueError(
                f"notify subject {notify[:200]!r}: no result is published there: {why}"
            )
        if req.id != job_id:
            req = request_of(req, id=job_id)
        headers = _traced({subjects.MSG_ID: job_id})
        if notify:
            headers[subjects.NOTIFY] = notify
        js = self.nc.jetstream(timeout=_JS_TIMEOUT_S)
        payload = encoder.encode(req)
        _check_size(self.nc, payload, headers)
        refusals = natsio.publish_refusals(self.nc)
        try:
            if not self._jobs_ready:  # its first request: the stream's INFO (nats-py's name),
                # and where no dispatcher made them yet, the stream's and the bucket's CREATE
                api = f"{js._prefix}.STREAM"
                making = self._ensure_jobs()
                for name in (self.jobs_stream, f"KV_{self.results_bucket}"):
                    making = _unless_refused(refusals, f"{api}.CREATE.{name}", making)
                await _unless_refused(refusals, f"{api}.INFO.{self.jobs_stream}", making)
            try:
                publishing = js.publish(subjects.JOBS_SUBMIT, payload, headers=headers)
                ack = await _unless_refused(refusals, subjects.JOBS_SUBMIT, publishing)
            except nats.js.errors.NoStreamResponseError:
                # Gone since it was made (a server restarted on an empty store, an operator
                # deleting it): made again, as `lifeline submit` does, rather than every job
                # refused until a dispatcher makes it.
                await self._ensure_jobs()
                ack = await js.publish(subjects.JOBS_SUBMIT, payload, headers=headers)
        except LifelineError:
            raise
        except nats.errors.MaxPayloadError:
            raise RequestTooLarge(
                f"the job is {len(payload)} bytes, over the NATS server's max_payload"
            ) from None
        except nats.errors.ConnectionClosedError:
            raise _closed() from None
        except Exception as exc:  # noqa: BLE001 - nats-py's JetStream errors are many types
            why = (
                jetstream.hint(exc, self.jobs_replicas)
                if self.nc.is_connected
                else f"{type(exc).__name__}: {_why_silent(self.nc)}"
            )
            raise JobsUnavailable(f"could not submit job {job_id!r} ({why})") from None
        return Submitted(job_id, bool(ack.duplicate), ack.stream, ack.seq)

    async def result(self, job_id: str, wait_s: float = 0.0) -> CompletionReply | None:
        """A job's reply (ok or error), waiting up to wait_s seconds for it to appear; None when
        there is none (yet, or any more: results expire). See `stored_result`."""
        self._check_loop()
        data = await stored_result(self.nc, job_id, wait_s, self.results_bucket)
        return _decoded(data, subjects.JOBS_RESULT) if data is not None else None

    def _check_loop(self) -> None:
        """LifelineError unless called in the event loop the client connected in: nats-py's
        connection (its read loop, flusher, futures) belongs to that loop, and from another
        one a call would wait out its whole timeout and blame the dispatcher."""
        loop = _running_loop()
        if loop is None:
            return  # stream() outside a coroutine: checked again when it is read
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise LifelineError(
                "this Lifeline client belongs to another event loop (the one it connected in: "
                "each asyncio.run() has its own): connect a client in this event loop"
            )

    async def _ensure_jobs(self) -> None:
        """The jobs stream and results bucket when no dispatcher has made them yet, shaped as
        a dispatcher shapes them (service/jobstore.py). A stream that exists is used as it
        is: a least-privilege client may look at it, not make it."""
        shape = _JobsShape(
            self.jobs_stream, _JOBS_MAX, _JOBS_DEDUP_WINDOW_S, self.results_bucket, _RESULTS_TTL_S
        )
        js = self.nc.jetstream(timeout=_JS_TIMEOUT_S)
        await ensure_jobs_as_a_client(js, shape, self.jobs_replicas)
        self._jobs_ready = True


class _JobsShape(NamedTuple):
    stream: str
    max_jobs: int
    dedup_window_s: float
    results_bucket: str
    results_ttl_s: float


class _Outage:
    """What the connection's reconnect loop logs: its first failure at WARNING, the retries
    that follow (about two a second while NATS is down) at DEBUG, and how long it was down
    once it is back. An application's log is not the place for a line per retry."""

    def __init__(self, shown: str) -> None:
        self.shown = shown
        self.since: float | None = None
        self.retries = 0

    def failed(self, exc: Exception) -> None:
        what = f"{type(exc).__name__}: {exc or ''}"
        if self.since is None:
            self.since, self.retries = time.monotonic(), 0
            log.warning("NATS at %s: %s; reconnecting (retries logged at DEBUG)", self.shown, what)
        else:
            self.retries += 1
            log.debug("NATS at %s: %s (retry %d)", self.shown, what, self.retries)

    def over(self) -> None:
        if self.since is not None:
            down_s, self.since = time.monotonic() - self.since, None
            log.info("NATS at %s: reconnected after %.1f s", self.shown, down_s)


class _Connecting:
    """What Lifeline.connect returns: await it, or use it in `async with`."""

    def __init__(self, opening: Any) -> None:
        self._opening = opening
        self._client: Lifeline | None = None

    def __await__(self) -> Generator[Any, None, Lifeline]:
        return self._opening.__await__()

    async def __aenter__(self) -> Lifeline:
        self._client = await self._opening
        return self._client

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.close()


class Streamed:
    """One request's answer on llm.stream, as it comes: iterate it for its events; between
    them, `text` is the answer so far with resets applied and `tool_calls` the calls so far;
    after the last, `reply` is the end (or error) event's reply (content null: the text is
    `text`). `await streamed.finish()` reads the rest and returns the reply.

    An `async for` over it outside `async with` is its scope: left before the end, the stream
    is closed (see _Loop). In `async with`, the block is, and a loop may be left and another
    begun."""

    def __init__(
        self,
        nc: Client,
        request: CompletionRequest,
        overloaded_retries: int,
        default_s: float,
        keys: set[str] | None = None,
        check_loop: Any = None,
        assembler: Assembler | None = None,
        refusals: natsio.PublishRefusals | None = None,
        heartbeat_s: float | None = None,
    ) -> None:
        self.request = request
        self._heartbeat_s = heartbeat_s
        self._given = assembler  # the caller's, for a single try (module-level stream())
        self.assembler = assembler or Assembler()
        self._nc = nc
        self._keys = keys
        self._retries = overloaded_retries
        self._default_s = default_s
        self._check_loop = check_loop
        self._events: AsyncGenerator[Event, None] | None = None  # this try's, while it runs
        self._refusals = refusals
        self._tries = 0
        self._over = False
        self._sent = request  # this try's request: a retry's has the time left as timeout_s
        self._deadline: float | None = None  # the whole stream's, fixed at its first send
        self._reader: asyncio.Task[Any] | None = None  # the task inside __anext__, if any
        self._left: asyncio.Event | None = None  # set when a reader aclose() stopped has left
        self._held = False  # in `async with`: the block ends the stream, not a loop left
        self._loop_left = False  # ended because an `async for` over it was left (finish says)

    @property
    def text(self) -> str:
        return self.assembler.text

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self.assembler.tool_calls

    @property
    def reply(self) -> CompletionReply | None:
        return self.assembler.reply

    @property
    def done(self) -> bool:
        return self.assembler.done

    def __aiter__(self) -> AsyncIterator[Event]:
        return self if self._held else _Loop(self)

    async def __anext__(self) -> Event:
        # One async generator (_stream_try()) per try, driven from here rather than from a
        # generator of generators: a loop that ends with a stream broken out of unread closes
        # each of its async generators at once, and an outer one then finds its inner one
        # already closing ("aclose(): asynchronous generator is already running").
        if self._check_loop is not None:
            self._check_loop()
        if self._reader is not None and self._reader is not asyncio.current_task():
            # Its async generator is mid-read: a second read would fail in it, and end the
            # stream for the reader too.
            raise LifelineError(
                "this stream is being read by another task: one task reads a stream (the "
                "others can await that task, then use the stream's text and reply)"
            )
        self._reader = asyncio.current_task()
        try:
            return await self._next()
        except asyncio.CancelledError:
            # aclose() from another task (a "stop" button) cancelled this read: the stream
            # ends here for its reader, as a break would; any other cancel goes on.
            reader = self._reader
            if self._left is not None and reader is not None and reader.uncancel() == 0:
                raise StopAsyncIteration from None
            raise
        finally:
            self._reader = None
            left, self._left = self._left, None  # a later cancel of a read is not aclose()'s
            if left is not None:
                left.set()

    async def _next(self) -> Event:
        while not self._over:
            if self._events is None:
                if self._deadline is None:
                    self._deadline = time.monotonic() + _wait_s(self.request, self._default_s)
                    self._deadline -= _GRACE_S
                if self._tries or self._given is None:
                    self.assembler = Assembler()
                self._events = _stream_try(
                    self._nc,
                    self._sent,
                    self.assembler,
                    self._default_s,
                    self._keys,
                    self._refusals,
                    self._heartbeat_s,
                )
            try:
                event = await anext(self._events)
            except BaseException:  # its end, or a failure: either way that try has closed
                self._over, self._events = True, None
                raise
            reply = event.reply
            refused = reply is not None and _overloaded(reply) and event.seq == 1
            if refused and self._tries < self._retries:
                assert reply is not None and self._deadline is not None
                self._tries += 1
                await self._end_try()
                retry_req = await _wait_to_retry(self.request, reply, self._deadline)
                if retry_req is not None:
                    self._sent = retry_req
                    continue  # and send it again
                self._over = True  # no time left for another try: its refusal is the end
            return event
        raise StopAsyncIteration

    async def finish(self) -> CompletionReply:
        async for _ in self:
            pass
        if self.reply is None and self._loop_left:
            raise LifelineError(
                "this stream was stopped before its end when its reader left its `async for` "
                "(outside `async with`, the loop is the stream's scope), so it has no reply: to "
                "read on after a break, read it in `async with lifeline.stream(...) as answer:`"
            )
        if self.reply is None:  # stopped before its end: aclose(), a break, a cancel, an error
            raise LifelineError(
                "this stream was stopped before its end (aclose(), leaving its `async with`, "
                "a cancelled read, or the error it raised), so it has no reply: send the "
                "request again"
            )
        return self.reply

    async def aclose(self) -> None:
        """Stop reading: unsubscribes, and aborts the request if it has not ended. From
        another task than the one reading it, that read ends the iteration (as a break
        would), and aclose() returns once the request is aborted."""
        self._over = True
        reader = self._reader
        if reader is not None and reader is not asyncio.current_task():
            # Its read is under way (an async generator cannot be closed then): stop it, once
            # (a second aclose() meanwhile, a stop button pressed twice, waits for the same).
            if self._left is None:
                self._left = asyncio.Event()
                reader.cancel()
            await self._left.wait()
        await self._end_try()

    async def _end_try(self) -> None:
        events, self._events = self._events, None
        if events is not None:
            await events.aclose()

    def _loop_gone(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """An `async for` over it outside `async with` was left before the stream's end: close
        it in its event loop (called from a finalizer, in whatever thread collects it)."""
        if self._over or self._held or self._reader is not None or loop is None:
            return  # (a reader: a loop in another task reads it, this one was refused)
        self._over = self._loop_left = True  # nothing more is read, whatever runs first
        with contextlib.suppress(RuntimeError):  # that loop has closed: nothing to close
            loop.call_soon_threadsafe(_close_in_background, self)

    async def __aenter__(self) -> Self:
        self._held = True
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class _Loop:
    """One `async for` over a Streamed outside `async with`. A `break` does not close an async
    iterator (PEP 525, PEP 533 deferred): the loop only drops it, and a Streamed kept in a
    variable stayed subscribed, its request running, for as long as the variable lived. The
    loop is all that holds this object, so it goes the moment the loop is left, and takes
    the stream with it (a finalizer cannot await: the close is a task of the stream's loop)."""

    __slots__ = ("_loop", "_streamed")

    def __init__(self, streamed: Streamed) -> None:
        self._streamed = streamed
        self._loop = _running_loop()  # None outside one (aiter() in sync code): GC closes it

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        return await self._streamed.__anext__()

    def __del__(self) -> None:
        self._streamed._loop_gone(self._loop)


_closing: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to its tasks


def _close_in_background(streamed: Streamed) -> None:
    task = asyncio.ensure_future(streamed.aclose())
    _closing.add(task)
    task.add_done_callback(_closed_in_background)


def _closed_in_background(task: asyncio.Task[None]) -> None:
    _closing.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.warning("closing a stream left by its `async for`: %r", task.exception())


def _inbox_refused(resolved: natsopts.NatsOptions, inbox: str) -> str:
    """Why a connection is given up at once: every answer to it would be dropped, while its
    requests would still run (a dispatcher paying a provider for an answer nobody may read)."""
    user = resolved.user if resolved.user and resolved.password else "<user>"
    return (
        f"NATS at {resolved.shown} refused this connection's subscription to its inbox "
        f"({inbox.rpartition('.')[0]}.>), so no answer could reach it; nothing was sent. A "
        f'least-privilege user connects with its inbox prefix: inbox_prefix="_INBOX.{user}" '
        "(or $NATS_INBOX_PREFIX)"
    )


async def _unless_refused(
    refusals: natsio.PublishRefusals | None, subject: str, work: Awaitable[T]
) -> T:
    """What `work` returns; NotPermitted as soon as the server refuses its publish to
    `subject` (as the connection's error callback hears: natsio.publish_refusals)."""
    if refusals is None:
        return await work
    try:
        return await refusals.unless_refused(subject, work)
    except natsio.PublishRefused as exc:
        raise NotPermitted(
            f"{exc}: the NATS server refused the request, so nothing got it; its role does "
            "not allow it (`lifeline nats-config` gives a client's subjects)"
        ) from exc


def _buffer_full() -> Unreachable:
    return Unreachable(
        "the NATS connection is down and reconnecting, and the requests already waiting for it "
        "fill nats-py's buffer (pending_size, 2 MiB by default): send this one again once NATS "
        "is back"
    )


def _traced(headers: dict[str, str]) -> dict[str, str]:
    """`headers` with the caller's current trace context (traceparent, tracestate), so
    Lifeline's spans join the caller's trace. Only in a process that uses OpenTelemetry
    already: the client loads none of it itself (pyproject's layers), and without it there
    is no current span to carry."""
    if "opentelemetry.context" in sys.modules:
        from opentelemetry import propagate  # pyproject's contract names this exception

        propagate.inject(headers)
    return headers


def _check_room(nc: Client, payload: bytes, headers: dict[str, str]) -> None:
    """Unreachable when the connection is down and nats-py's pending buffer has no room for
    the message: nats-py would refuse it (OutboundBufferLimitError) only after its request()
    had registered the answer's future, which then stays in `_resp_map` for good (and is
    failed, unretrieved, at close). Relies on nats-py 2.16's `_pending_data_size` and
    `_max_pending_size` (tests/test_client.py checks they are there); it counts the headers
    too, where nats-py counts the payload alone: refused a little early, never late."""
    if nc.is_connected or nc.is_closed:
        return  # closed: nats-py raises ConnectionClosedError before registering anything
    room = nc._max_pending_size - nc._pending_data_size
    if nc._max_pending_size <= 0 or message_bytes(payload, headers) > room:
        raise _buffer_full()


def _forget_refused(nc: Client) -> None:
    """After nats-py's request() refused its message (OutboundBufferLimitError) past
    _check_room (a subscription of its own queued meanwhile): drop the answer's future it
    registered. Nothing yields between registering it and the refusal, so it is the last one."""
    resp_map = getattr(nc, "_resp_map", None)
    if resp_map:
        token = next(reversed(resp_map))
        if not resp_map[token].done():
            del resp_map[token]


async def _stop_connecting(nc: Client, connecting: asyncio.Future[Any]) -> None:
    """Stop nats-py's connect and close what it opened (its socket, its tasks)."""
    connecting.cancel()
    with contextlib.suppress(BaseException):
        await connecting
    with contextlib.suppress(Exception):
        await nc.close()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _closed() -> LifelineError:
    return LifelineError(
        "the NATS connection is closed (Lifeline.close(), or the server refused it for good); "
        "a request in flight was aborted: connect again to send it"
    )


def _unsent(exc: nats.errors.Error) -> LifelineError:
    """nats-py refused to send (or to subscribe for the answer) on a connection that is not
    closed: one of the caller's own that is draining (nc.drain()), most likely. A transport
    problem like any other, so a LifelineError rather than nats-py's own error."""
    return LifelineError(f"could not send the request: {type(exc).__name__}: {exc}")


def _reconnects(nc: Client) -> int:
    """How many times the connection has come back (nats-py's count)."""
    return nc.stats.get("reconnects", 0)


def _why_silent(
    nc: Client,
    request: CompletionRequest | None = None,
    default_s: float | None = None,
    reconnects: int | None = None,
    events: int = 0,
) -> str:
    """Why no answer came, as far as the connection tells: `reconnects` is its count of
    reconnects when the request was sent, `events` how many of a stream's events came."""
    if nc.is_closed:
        return "the NATS connection was closed meanwhile"
    if nc.is_connected and reconnects is not None and _reconnects(nc) != reconnects:
        # Whatever was published to this client while it was away is gone: the answer too.
        return (
            "the NATS connection dropped and reconnected while it waited, so the answer may "
            "have been lost on the way: send the request again"
        )
    if (
        nc.is_connected
        and request is not None
        and default_s is not None
        and (_sent_timeout_s(request) is None and request.deadline_unix_ms is None)
    ):
        return (
            f"the request set no timeout, so this client waited its default_timeout_s "
            f"({default_s:g} s); a dispatcher whose dispatcher.default_timeout_s is longer may "
            "still have been working on it: give the request a timeout_s (LangChain and "
            "Haystack: timeout=...), or connect with default_timeout_s as the dispatcher's; "
            "else the dispatcher may have stopped"
        )
    if nc.is_connected and events:
        # A dispatcher that stops ends its streams with an error event (shutting_down): one
        # silent mid-stream most likely died, and no other takes a stream over (llm.stream is
        # core NATS, delivered once).
        return (
            f"{events} events came, then none: the dispatcher serving it most likely died "
            "mid-stream (one that stops ends its streams with shutting_down); send it again"
        )
    if nc.is_connected:
        return "the dispatcher may have stopped"
    return (
        "the NATS connection is down and reconnecting, so the request or its answer may have "
        "been lost on the way: send it again once NATS is back"
    )


def _decoded(data: bytes, subject: str) -> CompletionReply:
    """The reply in an answer on `subject`; LifelineError when it holds none (whatever else
    is subscribed to it answered, not a dispatcher), rather than msgspec's own error."""
    try:
        return reply_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise LifelineError(
            f"the answer on {subject} is no Lifeline reply ({exc}; it begins {data[:40]!r}): "
            f"is something other than a Lifeline dispatcher subscribed to {subject}?"
        ) from None


def _check_retries(overloaded_retries: int) -> None:
    if overloaded_retries < 0:
        raise ValueError(
            f"overloaded_retries={overloaded_retries}: it is how many times a request refused "
            "as overloaded is sent again, 0 or more"
        )


def _overloaded(reply: CompletionReply) -> bool:
    """An error worth sending again: `overloaded`, or `shutting_down` (errors.RESEND)."""
    return reply.status == "error" and reply.error is not None and reply.error.type in RESEND


def _retry_after_s(reply: CompletionReply) -> float:
    """How long to wait before sending a refused request again: uniform between retry_after_s
    and twice it. retry_after_s is the dispatcher's estimate of when a slot frees, so never
    less; a jitter as wide as the wait itself (full jitter over one more retry_after_s)
    spreads the requests refused together over the next interval, where a few per cent
    brought them back in one wave to be refused together again. Not exponential backoff:
    retry_after_s already grows with the dispatcher's load, and the request's deadline bounds
    the retries. A retry_after_s that is no positive number (negative, NaN: a reply from
    something other than a dispatcher) counts as none, and one is taken within what a
    dispatcher sends: a negative one sent every retry at once, a huge one waited for hours."""
    after = reply.error.retry_after_s if reply.error is not None else None
    if after is None or not after > 0:
        after = _RETRY_AFTER_DEFAULT_S
    after = min(max(after, _RETRY_AFTER_MIN_S), _RETRY_AFTER_MAX_S)
    return after * (1 + random.random())


async def _wait_to_retry(
    request: CompletionRequest, reply: CompletionReply, deadline: float
) -> CompletionRequest | None:
    """Wait before sending `request` again after its refusal `reply`, and return it with the
    time left before `deadline` (monotonic) as its timeout_s; None, at once, when the wait
    would end past the deadline (or too close to it for a try: the refusal is the answer)."""
    wait = _retry_after_s(reply)
    if time.monotonic() + wait + _MIN_TRY_S >= deadline:
        return None
    await asyncio.sleep(wait)
    left = deadline - time.monotonic()
    if left < _MIN_TRY_S:
        return None
    return request_of(request, timeout_s=left)


async def stored_result(
    nc: Client, job_id: str, wait_s: float = 0.0, bucket: str = RESULTS_BUCKET
) -> bytes | None:
    """A job's stored result, asking again until wait_s is over; None when there is none.
    Asked of a dispatcher (llm.jobs.result), which needs no bucket permissions; read from the
    results bucket (`bucket`) while no dispatcher answers (none runs, or one is restarting),
    where the connection may. Neither answering is tried again until wait_s is over (a
    dispatcher restarting, a bucket made again, a client whose user may not read it); then
    JobsUnavailable says why."""
    if math.isnan(wait_s):
        # NaN: every comparison with it is false, so no time left would ever be "over" and
        # the lookup would go on for good (the CLI's --wait refuses it too).
        raise ValueError(f"wait_s={wait_s}: how long to wait for the result, in seconds")
    kv: Any = None
    trouble: str | None = None  # why the last look could not tell

    async def read() -> bytes | None:
        nonlocal kv, trouble
        if kv is None:
            # A dispatcher that holds its subscription but answers nothing (frozen, stopping)
            # is waited for no longer than what is left of wait_s, then the bucket is read.
            ask_s = max(min(_JS_TIMEOUT_S, give_up - time.monotonic()), _ASK_MIN_S)
            try:
                answer, trouble = await _asked(nc, job_id, ask_s), None
                return answer
            except (nats.errors.NoRespondersError, NatsTimeoutError):
                pass
            try:
                kv = await nc.jetstream(timeout=_JS_TIMEOUT_S).key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                trouble = None
                return None  # no dispatcher (nor submit) ever made it: no job has a result yet
            except nats.errors.ConnectionClosedError:
                raise _closed() from None
            except Exception as exc:  # noqa: BLE001
                trouble = (
                    f"no dispatcher answers {subjects.JOBS_RESULT}, and bucket {bucket} cannot "
                    f"be read ({type(exc).__name__}: {exc})"
                )
                return None
        try:
            value, trouble = await _in_bucket(kv, bucket, subjects.job_key(job_id)), None
            return value
        except JobsUnavailable as exc:  # a dispatcher may answer by the next look
            kv, trouble = None, str(exc)
            return None

    give_up = time.monotonic() + wait_s
    pause = 0.05
    while True:
        down = nc.is_reconnecting  # a request now would wait out its timeout in the buffer
        if not down and (data := await read()):
            return data
        left = give_up - time.monotonic()
        if left <= 0:
            if down:
                raise Unreachable(
                    f"the NATS connection is down and reconnecting, so job {job_id!r}'s result "
                    "cannot be looked up now: ask again once NATS is back"
                )
            if trouble is not None:
                raise JobsUnavailable(trouble)
            return None
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, 0.5)


async def _asked(nc: Client, job_id: str, timeout_s: float) -> bytes:
    """A dispatcher's answer on llm.jobs.result: the result, or b"" while there is none.
    Raises nats-py's NoRespondersError and TimeoutError (the bucket is read then)."""
    try:
        msg = await nc.request(subjects.JOBS_RESULT, job_id.encode(), timeout=timeout_s)
    except nats.errors.ConnectionClosedError:
        raise _closed() from None
    except (nats.errors.NoRespondersError, NatsTimeoutError):
        raise
    except nats.errors.Error as exc:  # a connection of one's own draining (nc.drain())
        raise _unsent(exc) from None
    return msg.data


async def _in_bucket(kv: Any, bucket: str, key: str) -> bytes | None:
    """One key's value in the results bucket (a direct get), None while there is none (or
    what is there is no result: anyone may have JetStream write its answers onto a key, as
    the dispatcher takes it too)."""
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None
    except NatsTimeoutError:
        raise JobsUnavailable(
            f"no answer from bucket {bucket} within {_JS_TIMEOUT_S:g} s"
        ) from None
    except nats.errors.ConnectionClosedError:
        raise _closed() from None
    except Exception as exc:  # noqa: BLE001 - gone (no responders), refused, ...: many types
        raise JobsUnavailable(
            f"bucket {bucket} cannot be read ({type(exc).__name__}: {exc})"
        ) from None
    return entry.value if _is_result(entry.value) else None


def _is_result(value: bytes | None) -> bool:
    if not value:
        return False
    try:
        reply_decoder.decode(value)
    except msgspec.DecodeError:
        return False
    return True


def _check_size(nc: Client, payload: bytes, headers: dict[str, str]) -> None:
    """RequestTooLarge unless the message fits the server's max_payload, headers included:
    nats-py checks only the payload, and the server closes the connection for good over a
    message that does not fit (every other request on it lost)."""
    size = message_bytes(payload, headers)
    if size > nc.max_payload:
        raise RequestTooLarge(
            f"the request is {size} bytes with its headers, over the NATS server's max_payload "
            f"of {nc.max_payload}"
        )


def check_job_id(job_id: str) -> None:
    """A job id travels as the Nats-Msg-Id header too, and nats-py strips a header's value and
    turns its line breaks into spaces: such an id would deduplicate as another one."""
    if job_id != job_id.strip() or any(c in job_id for c in "\r\n"):
        raise ValueError(
            f"job id {job_id!r} starts or ends with whitespace or holds a line break, which "
            "its Nats-Msg-Id header cannot carry"
        )


def abort_key() -> str:
    """A fresh abort key: 96 random bits, so only its client and the dispatchers know it."""
    return secrets.token_hex(12)


async def abort(nc: Client, key: str) -> None:
    """Abort the request sent with `key` as its Lifeline-Abort-Key (llm.abort): its
    dispatcher stops it, if it still runs. Never raises: without a connection there is
    nobody to tell, and the request ends at its deadline anyway."""
    with contextlib.suppress(nats.errors.Error):
        await nc.publish(subjects.ABORT, key.encode())


def stream(
    nc: Client,
    request: CompletionRequest,
    assembler: Assembler | None = None,
    default_timeout_s: float = _DEFAULT_TIMEOUT_S,
    heartbeat_s: float | None = HEARTBEAT_S,
) -> Streamed:
    """Send `request` to llm.stream on a nats-py connection of your own: an async iterable
    of its events until the end or error event, as `Lifeline.stream()` gives (without its
    retries of a refusal as overloaded). Pass an Assembler to read the text so far (with
    resets applied) between events; the Streamed's own `text` and `reply` say the same.
    Raises StreamGap when an event went missing, NoDispatcher when no dispatcher listens,
    NotPermitted as soon as the server refuses the request (its user may not publish
    llm.stream), and NoAnswer (a TimeoutError) when the stream stalls for longer than the
    request's own timeout allows, or its dispatcher went silent (`heartbeat_s`, as for
    `Lifeline.stream()`). Left before its end (a break out of its `async for`, aclose(), any
    of those errors), the stream is closed and its request aborted."""
    _check_heartbeat(heartbeat_s)
    refusals = natsio.publish_refusals(nc)
    return Streamed(
        nc,
        request,
        0,
        default_timeout_s,
        assembler=assembler,
        refusals=refusals,
        heartbeat_s=heartbeat_s,
    )


def _heartbeat_ms(heartbeat_s: float | None) -> float | None:
    """The heartbeat interval a request asks for, in seconds, as the dispatcher keeps it (whole
    milliseconds within streaming.HEARTBEAT_MS_BOUNDS); None for none."""
    if heartbeat_s is None:
        return None
    low, high = streaming.HEARTBEAT_MS_BOUNDS
    return min(max(round(heartbeat_s * 1000), low), high) / 1000


def _silence_why(nc: Client, reconnects: int) -> str:
    """Why a request that got heartbeats heard nothing more: its dispatcher died (no other
    takes a core request over), unless this connection's own outage says more."""
    if not nc.is_connected or _reconnects(nc) != reconnects:  # its own outage lost it
        return _why_silent(nc, reconnects=reconnects)
    return (
        "the dispatcher serving it most likely died or lost its NATS connection (a request on "
        "llm.complete or llm.stream is core NATS: no other dispatcher takes it over): send it "
        "again"
    )


class _WentSilent(Exception):
    def __init__(self, silence_s: float) -> None:
        self.silence_s = silence_s


class _Waiting:
    __slots__ = ("beating", "future", "heard_at", "on_progress")

    def __init__(
        self, future: asyncio.Future[Msg], on_progress: Callable[[Progress], Any] | None
    ) -> None:
        self.future = future
        self.heard_at = 0.0
        self.beating = False  # a heartbeat came: its dispatcher sends them
        self.on_progress = on_progress


class _Replies:
    """Replies to llm.complete requests that ask for heartbeats (nats-py's request() hands a
    request the first message on its reply subject, which would be a heartbeat), on one
    wildcard subscription per connection, made at the first of them and shared by every
    Lifeline on it as nats-py's request() shares its own: a Lifeline(nc) made per call adds
    none. A heartbeat marks its request heard; the reply ends it. Once a heartbeat came, a
    request heard nothing of for streaming.heartbeat_silence_s raises _WentSilent."""

    def __init__(self) -> None:  # holds nothing of its connection's: see `of`
        self.prefix = ""
        self.waiting: dict[str, _Waiting] = {}
        self._sid: int | None = None  # its subscription's, on the connection
        self._subscribing: asyncio.Lock | None = None

    @classmethod
    def of(cls, nc: Client) -> _Replies:
        replies = _REPLIES.get(nc)
        if replies is None:
            replies = _REPLIES[nc] = cls()
        return replies

    def _subscribed(self, nc: Client) -> bool:
        # A close ends the subscription, and nats-py lets the same Client connect again (its
        # request() then subscribes afresh): so does this.
        sub = nc._subs.get(self._sid) if self._sid is not None else None
        return sub is not None and sub._cb == self._on_msg

    async def _ready(self, nc: Client) -> str:
        if not self._subscribed(nc):
            if self._subscribing is None:
                self._subscribing = asyncio.Lock()
            async with self._subscribing:
                if not self._subscribed(nc):
                    prefix = nc.new_inbox() + "."
                    self._sid = (await nc.subscribe(prefix + "*", cb=self._on_msg))._id
                    self.prefix = prefix
        return self.prefix

    async def _on_msg(self, msg: Msg) -> None:
        waiting = self.waiting.get(msg.subject[len(self.prefix) :])
        if waiting is None:
            return  # given up on, or answered already
        if streaming.is_heartbeat(msg.headers):
            waiting.heard_at, waiting.beating = time.monotonic(), True
            if waiting.on_progress is not None and msg.data:  # an older dispatcher's is empty
                _tell_progress(waiting.on_progress, msg.data)
        elif not waiting.future.done():
            waiting.future.set_result(msg)

    def closed(self) -> None:
        """The connection was closed: the requests waiting end now (as natsio.close ends
        nats-py's), not at their timeouts."""
        for waiting in self.waiting.values():
            if not waiting.future.done():
                waiting.future.set_exception(nats.errors.ConnectionClosedError())

    async def request(
        self,
        nc: Client,
        subject: str,
        payload: bytes,
        headers: dict[str, str],
        timeout_s: float,
        every_s: float,
        on_progress: Callable[[Progress], Any] | None = None,
    ) -> Msg:
        """The reply to one request, as nats-py's request() gives it (NoRespondersError,
        TimeoutError), or _WentSilent; each heartbeat's Progress to `on_progress`."""
        prefix = await self._ready(nc)
        token = secrets.token_hex(12)
        future = asyncio.get_running_loop().create_future()
        waiting = self.waiting[token] = _Waiting(future, on_progress)
        silence_s = streaming.heartbeat_silence_s(every_s)
        give_up = time.monotonic() + timeout_s
        stalled_at = 0.0  # the end of the loop's last stall: the silence counts from there
        try:
            await nc.publish(subject, payload, reply=prefix + token, headers=headers)
            while True:
                # Looked at again a silence after the last heartbeat, or after this wait began
                # (a heartbeat does not wake it: the first one starts the silence's count).
                now = time.monotonic()
                heard_at = max(waiting.heard_at, stalled_at) if waiting.beating else now
                wait_s = max(min(give_up - now, heard_at + silence_s - now), 0.0)
                done, _ = await asyncio.wait((waiting.future,), timeout=wait_s)
                if done:
                    msg = waiting.future.result()
                    if msg.headers and msg.headers.get("Status") == "503":
                        raise nats.errors.NoRespondersError
                    return msg
                woke = time.monotonic()
                if woke >= give_up:
                    raise NatsTimeoutError
                if woke - now > wait_s + _STALL_S:
                    # Ran out late: the loop stood still, and what came meanwhile is unread
                    # (nats-py hands it on over a few turns of the loop). A whole silence more.
                    stalled_at = woke
                    continue
                if waiting.beating and woke - max(waiting.heard_at, stalled_at) >= silence_s:
                    raise _WentSilent(silence_s)
        finally:
            del self.waiting[token]


def _tell_progress(on_progress: Callable[[Progress], Any], data: bytes) -> None:
    """A heartbeat's Progress to the caller's callback: one that does not decode (a newer
    dispatcher's, say) is passed over, and the callback's own error is logged, not raised
    into the connection's read (the request goes on)."""
    try:
        progress = progress_decoder.decode(data)
    except msgspec.DecodeError:
        return
    try:
        on_progress(progress)
    except Exception:
        log.exception("on_progress raised; the request goes on")


# Each connection's _Replies, for as long as it lives (nothing in one refers back to it).
_REPLIES: weakref.WeakKeyDictionary[Client, _Replies] = weakref.WeakKeyDictionary()


def _check_heartbeat(heartbeat_s: float | None) -> None:
    if heartbeat_s is not None and not (heartbeat_s > 0 and math.isfinite(heartbeat_s)):
        raise ValueError(
            f"heartbeat_s must be a number of seconds above 0, or None for no heartbeats; got "
            f"{heartbeat_s!r}"
        )


async def _stream_try(
    nc: Client,
    request: CompletionRequest,
    assembler: Assembler,
    default_timeout_s: float,
    keys: set[str] | None,
    refusals: natsio.PublishRefusals | None = None,
    heartbeat_s: float | None = None,
) -> AsyncGenerator[Event, None]:
    """One try of a Streamed: `request` sent to llm.stream, its events yielded until the end
    or error event (see `stream`). Closed before its end, the request is aborted, unless the
    server refused it (NotPermitted): then no dispatcher has it, and nothing is aborted.
    With `heartbeat_s`, heartbeats are asked for; once one came (the dispatcher sends them:
    an older one does not), a silence of streaming.heartbeat_silence_s ends the try."""
    payload, headers = encoder.encode(request), _traced({subjects.ABORT_KEY: abort_key()})
    every_s, silence_s = _heartbeat_ms(heartbeat_s), None
    if every_s is not None:
        headers[subjects.HEARTBEAT_MS] = str(round(every_s * 1000))
    _check_size(nc, payload, headers)
    _check_room(nc, payload, headers)  # before subscribing: nothing to undo
    inbox = nc.new_inbox()
    try:
        sub = await nc.subscribe(inbox)
    except nats.errors.ConnectionClosedError:
        raise _closed() from None
    except nats.errors.Error as exc:  # a connection of one's own draining (nc.drain())
        raise _unsent(exc) from None
    timeout_s = _wait_s(request, default_timeout_s)
    give_up = time.monotonic() + timeout_s
    key = headers[subjects.ABORT_KEY]
    reconnects = _reconnects(nc)
    if keys is not None:
        keys.add(key)  # aborted by its Lifeline's close()
    came = 0  # the events of this try that came

    async def next_msg() -> Msg:
        asked_at = time.monotonic()
        left_s = give_up - asked_at
        silent = silence_s is not None and silence_s < left_s
        wait_s = max(silence_s if silent else left_s, 0.001)
        try:
            return await sub.next_msg(timeout=wait_s)
        except nats.errors.ConnectionClosedError:
            raise _closed() from None
        except NatsTimeoutError:
            # Ran out late, the loop stood still meanwhile, and its timers ran before it read
            # its socket again: what came meanwhile (heartbeats) is unread. Wait once more.
            if silent and time.monotonic() - asked_at > wait_s + _STALL_S:
                return await next_msg()
            if silent:
                raise NoAnswer(
                    f"the stream went silent: nothing came for {silence_s:g} s after {came} "
                    f"events, not even the heartbeat its dispatcher sends every {every_s:g} s "
                    f"while it works; {_silence_why(nc, reconnects)}"
                ) from None
            raise NoAnswer(
                f"the stream stalled: no end after {timeout_s:g} s (the request's timeout "
                f"and a grace); {_why_silent(nc, reconnects=reconnects, events=came)}"
            ) from None

    async def sent() -> Msg:  # the request published, and its first answer
        try:
            await nc.publish(STREAM, payload, reply=inbox, headers=headers)
        except nats.errors.ConnectionClosedError:
            raise _closed() from None
        except nats.errors.OutboundBufferLimitError:
            raise _buffer_full() from None
        except nats.errors.Error as exc:
            raise _unsent(exc) from None
        return await next_msg()

    refused = False  # by the server: it went nowhere, so no dispatcher has it to abort
    try:
        try:
            msg = await _unless_refused(refusals, STREAM, sent())
        except NotPermitted:
            refused = True
            raise
        while True:
            if msg.headers and msg.headers.get("Status") == "503":
                raise NoDispatcher(
                    f"no dispatcher is subscribed to {STREAM}: start one (`lifeline run`)"
                )
            if every_s is not None and streaming.is_heartbeat(msg.headers):
                silence_s = streaming.heartbeat_silence_s(every_s)  # it sends them: heard
                msg = await next_msg()
                continue
            came += 1
            yield _fed(assembler, msg.headers, msg.data)
            if assembler.done:
                return
            msg = await next_msg()
    finally:
        if keys is not None:
            keys.discard(key)
        try:
            if not assembler.done and not refused:
                await asyncio.shield(abort(nc, key))
        finally:  # a second cancel while it aborts (its reader's, and aclose()'s) unsubscribes
            # Closed or draining (a connection of one's own, nc.drain()), nats-py refuses the
            # unsubscribe, and has dropped or is dropping the subscription itself: its error
            # would take the place of the stream's end, read already (or of the error raised).
            with contextlib.suppress(nats.errors.Error):
                await asyncio.shield(sub.unsubscribe())


def _fed(assembler: Assembler, headers: Mapping[str, str] | None, data: bytes) -> Event:
    """The Assembler's event, its StreamGap and StreamProtocolError raised as the client's
    own: LifelineErrors, as every transport problem is."""
    try:
        return assembler.feed(headers, data)
    except streaming.StreamGap as exc:
        raise StreamGap(str(exc)) from None
    except streaming.StreamProtocolError as exc:
        raise StreamProtocolError(str(exc)) from None


async def stream_text(nc: Client, request: CompletionRequest) -> tuple[str, CompletionReply]:
    """The whole streamed answer with resets applied, and the end (or error) event's reply."""
    assembler = Assembler()
    async for _ in stream(nc, request, assembler):
        pass
    assert assembler.reply is not None
    return assembler.text, assembler.reply
