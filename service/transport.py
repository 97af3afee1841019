"""The dispatcher's NATS seam: ask a provider worker, answer a client, publish audit.

Transport outcomes become ProviderFailures here, so the fallback loop sees one shape:
no worker subscribed -> "no_responders" at once; no reply in time -> "timeout". A reply
that arrives after its attempt was given up is dropped by nats-py (its inbox token is gone),
and the worker is told to cancel it, so no abandoned HTTP call keeps running and billing.

Every message leaves through a size check against the server's max_payload (headers
included): one message over it makes the server close the whole connection, which would
take every other request in flight down with it.

Streaming (llm.stream) adds two things here: `ProviderStream`, one streaming attempt at a
worker (its chunks arrive on the same inbox subscription as replies, under the attempt's
token plus ".c", and go to a callback as they are read; one timer per attempt covers
ttft_s, idle_s and timeout_s), and `ClientStream`, the events of one request, published in
order on the client's reply subject (schemas/streaming.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError

from schemas import (
    Attempt,
    AuditEvent,
    CompletionReply,
    ErrorInfo,
    ProviderFailure,
    ProviderOk,
    ProviderReply,
)
from schemas.errors import bounded_retry_after, timeout_message
from schemas.ids import SecretIds
from schemas.streaming import (
    END,
    ERROR,
    HEARTBEAT,
    HEARTBEAT_MS_BOUNDS,
    RESET,
    TOOL_CALL,
    StreamReset,
    pieces,
)
from schemas.subjects import (
    ATTEMPT_ID,
    ATTEMPT_NO,
    DEADLINE_MS,
    EVENT,
    MSG_ID,
    REQUEST_ID,
    SEQ,
    STREAM_TO,
    TRACEPARENT,
    TRACESTATE,
    audit_subject,
    cancel_subject,
    provider_subject,
)
from schemas.wire import (
    ERROR_KINDS,
    MAX_MESSAGE_CHARS,
    MAX_NAME_LENGTH,
    REPLY_TOO_LARGE,
    Progress,
    ToolCallDelta,
    clipped,
    delta_bytes,
    encoder,
    message_bytes,
    provider_reply_decoder,
    tool_call_delta_decoder,
)
from service import jetstream
from service.loop import Timeout, Timeouts
from service.natsio import FastPath, Received, fast_path, measured, publish_later, publish_now
from service.streaming import StreamLimits

log = logging.getLogger("lifeline.transport")

# A job's audit event waits for the stream's confirmation (NatsTransport._audit_acked): each
# try this long, up to this long in all (a cluster elects a stream's new leader in a few
# seconds), pausing jetstream.BACKOFF_S between tries.
_AUDIT_TRY_S = 1.0
_AUDIT_PATIENCE_S = 20.0
# At most this many requests' events wait for it at once (audit.confirm_requests), apart from
# their requests: about 3 KiB each, so a bound on the memory an outage of the stream takes.
_CONFIRMING_MAX = 10_000

_KINDS = frozenset(ERROR_KINDS)
# Room kept in every message of a stream for its headers: a chunk may use max_payload minus this.
STREAM_HEADER_ROOM = 1024

OnChunk = Callable[[bytes, bool], None]  # a chunk, and whether it is a piece of a tool call
_SLACK_S = 0.001  # a stream's limit counts as reached this close to it (see ProviderStream._check)
_TOOL_CALL_HEADERS = {EVENT: TOOL_CALL}


def attempt_block(headers: dict[str, str]) -> bytes | None:
    """The NATS header block of an attempt as the engine heads it (Engine._attempt_span: its
    deadline, request id, attempt id and traceparent, in that order), written in one go:
    natsio.header_block's loop over the headers was about 12,400 instructions of every
    attempt, this about 4,300 (make bench-instr's natsio part). The same bytes as header_block
    writes (tests/test_natsio.py checks them); None for any other set of headers (a
    tracestate, say), or a request id header_block would write otherwise (a line break in it,
    or spaces around it: it strips values), and then header_block decides. The other three
    are Lifeline's own: digits, an id of its alphabet, a traceparent it formatted."""
    if len(headers) != 4:
        return None
    deadline, request_id = headers.get(DEADLINE_MS), headers.get(REQUEST_ID)
    attempt_id, traceparent = headers.get(ATTEMPT_ID), headers.get(TRACEPARENT)
    if (
        deadline is None
        or request_id is None
        or attempt_id is None
        or traceparent is None
        or "\r" in request_id
        or "\n" in request_id
        or request_id.strip() != request_id
    ):
        return None
    return (
        f"NATS/1.0\r\n{DEADLINE_MS}: {deadline}\r\n{REQUEST_ID}: {request_id}\r\n"
        f"{ATTEMPT_ID}: {attempt_id}\r\n{TRACEPARENT}: {traceparent}\r\n\r\n"
    ).encode()


class NatsTransport:
    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._inbox = _Inbox(nc)
        self._reconnects = 0  # nats-py's count when last looked at (spanned_an_outage)
        self._back_at = -math.inf  # monotonic: when a reconnect was first seen
        # The audit subjects the audit stream is there to capture (service.audit.keep_audit_stream
        # says): a job's event on one is published to JetStream and waited for (_audit_acked).
        # None while that is not known (not looked at yet, or the look failed): waited for too,
        # since a core publish is lost while a cluster's stream has no leader.
        self.audit_kept: frozenset[str] | None = None
        # audit.confirm_requests: a request's event waits for the stream's ack as a job's does,
        # in a task of its own (`_confirming`), its request answered and its place let go.
        self.confirm_requests = False
        self._confirming: set[asyncio.Task[None]] = set()
        self._confirming_full = False  # said once per time the bound is reached
        self._path: FastPath | None = None  # the connection's fast path, from `start` on

    def spanned_an_outage(self, started: float) -> bool:
        """Whether this connection was down at some time since `started` (time.monotonic()):
        it is down now, or it reconnected since (as far as a look at nats-py's count of
        reconnects can tell: no later than the first look after). A call's reply is lost with
        the connection (the server cut it as a slow consumer, say), so the call's timeout says
        nothing of its provider (Health's own_outage)."""
        nc = self.nc
        if not nc.is_connected:
            return True
        reconnects = nc.stats["reconnects"]
        if reconnects != self._reconnects:
            self._reconnects, self._back_at = reconnects, time.monotonic()
        return started < self._back_at

    @property
    def max_payload(self) -> int:
        """The server's limit on one message, headers included (from its INFO)."""
        return self.nc._max_payload  # Client.max_payload's own attribute (see natsio)

    async def start(self) -> None:
        self._path = fast_path(self.nc)
        await self._inbox.start()

    async def ask_provider(
        self,
        provider: str,
        payload: bytes,
        timeout_s: float,
        headers: dict[str, str],
        own_timeout_s: float | None = None,
    ) -> ProviderReply:
        """One attempt; `headers` carry its Lifeline-Attempt-Id, which a cancel names.
        `own_timeout_s`, the target's, tells a timeout of its own from one its request's
        deadline cut short (timeout_s is the shorter of the two)."""
        subject = provider_subject(provider)
        block = attempt_block(headers)  # built once, and sent as it is
        if block is not None:
            size = len(block) + len(payload)
        else:
            size, block = measured(payload, headers)
        max_payload = self.nc._max_payload  # Client.max_payload's own attribute (see natsio)
        if size > max_payload and TRACESTATE in headers:
            # A client's tracestate, up to 8 KB where the request's size check keeps 1 KB for
            # headers, failed a request that fit without it as bad_request ("shorten the
            # messages"). Tracing never fails a request: W3C lets a participant drop
            # tracestate, and the traceparent still joins the worker's span to the trace.
            del headers[TRACESTATE]
            size, block = measured(payload, headers)
        if size > max_payload:  # e.g. a template made it longer: never send it
            return ProviderFailure(
                "bad_request",
                f"the request for {provider} is {size} bytes with headers, above the NATS "
                f"server's max_payload of {max_payload}; shorten the messages or the "
                "target's template",
            )
        inbox = self._inbox
        if inbox._sub is None:
            await inbox.start()
        # The inbox's work inline (send, then wait here): no coroutine of its own, so one frame
        # less kept alive per attempt in flight.
        token, future, timer, sent = inbox.send(subject, payload, timeout_s, headers, block)
        try:
            if not sent:
                await self.nc.publish(subject, payload, reply=inbox.prefix + token, headers=headers)
            msg = await future
        except NatsTimeoutError:
            self.cancel_now(provider, headers[ATTEMPT_ID])
            own = timeout_s if own_timeout_s is None else own_timeout_s
            return ProviderFailure("timeout", timeout_message(provider, timeout_s, own))
        except asyncio.CancelledError:  # e.g. a hedge lost, or a dispatcher shutting down
            self.cancel_now(provider, headers[ATTEMPT_ID])
            raise
        except NatsError as exc:  # the connection is closed or cannot buffer: this attempt failed
            return ProviderFailure("connection", f"could not ask {subject}: {type(exc).__name__}")
        finally:
            inbox.close(token, timer)
        if not msg.data and msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
            return ProviderFailure(
                "no_responders",
                f"no worker is listening on {subject}: start one with `lifeline worker {provider}`",
            )
        try:
            return _bounded(provider_reply_decoder.decode(msg.data))
        except (msgspec.DecodeError, RecursionError) as exc:
            message = f"worker on {subject} sent a reply that breaks the protocol: {exc}"
            return ProviderFailure("server_error", message[:MAX_MESSAGE_CHARS])

    async def stream_provider(
        self,
        provider: str,
        payload: bytes,
        headers: dict[str, str],
        limits: StreamLimits,
        on_chunk: OnChunk,
    ) -> ProviderStream:
        """Start one streaming attempt: the worker streams its chunks to `on_chunk`."""
        stream = ProviderStream(
            self, provider, limits, on_chunk, headers[ATTEMPT_ID], self._inbox._timeouts
        )
        await self._inbox.open_stream(provider_subject(provider), payload, headers, stream)
        return stream

    def cancel_now(self, provider: str, attempt_id: str) -> None:
        """`cancel` without waiting (fast path, else a task): from a callback, or for a cohort
        of timeouts, where each awaited publish would make the next attempt start later."""
        subject, payload = cancel_subject(provider), attempt_id.encode()
        if not fast_path(self.nc).publish(subject, payload):
            task = asyncio.ensure_future(self.cancel(provider, attempt_id))
            _background.add(task)
            task.add_done_callback(_background.discard)

    def client_stream(self, reply_subject: str) -> ClientStream:
        return ClientStream(self.nc, reply_subject)

    async def cancel(self, provider: str, attempt_id: str) -> None:
        """Tell the worker running `attempt_id` that nobody waits for it: it aborts the HTTP
        call."""
        try:
            await self.nc.publish(cancel_subject(provider), attempt_id.encode())
        except NatsError:
            pass  # no connection: the worker drops the call at its deadline anyway

    async def answer(self, reply_subject: str, reply: CompletionReply) -> CompletionReply:
        """Send `reply` (urgent: see natsio's FastPath.publish), or, when it would not fit
        max_payload, an error reply that does. Returns what was sent (the audit event must say
        the same)."""
        reply, payload = fitted(reply, self.nc._max_payload)
        # Fitted, it is never over max_payload: the fast path's publish itself, without
        # publish_now's size check and its two calls (about 1,700 instructions a reply). Named
        # by its id only where a log line may say it (the f-string was about 1,600 more).
        path = self._path or fast_path(self.nc)
        if not path.publish(reply_subject, payload, "", None, None, True):
            await publish_later(self.nc, reply_subject, payload, f"the reply to {reply.id!r}")
        return reply

    async def audit(self, event: AuditEvent, msg_id: str | None = None) -> None:
        """Publish the request's one audit event (the audit stream captures it, and keeps one
        per `msg_id` when given). A job's event (one with a `msg_id`), and with
        audit.confirm_requests every request's (given one of its own), waits for the stream's
        confirmation (`_audit_acked`)."""
        confirm_apart = msg_id is None and self.confirm_requests
        if confirm_apart:
            msg_id = f"req:{secrets.token_hex(12)}"  # this event's alone: tries share it
        headers = {MSG_ID: _short_msg_id(msg_id)} if msg_id else None
        room = self.nc._max_payload - (400 if headers else 0)
        subject, (_, payload) = audit_subject(event.status), _fitting(event, room)
        if headers and (self.audit_kept is None or subject in self.audit_kept):
            if confirm_apart:  # a request's: answered already, its place in max_in_flight
                # is let go while its event waits (an audit outage must not refuse requests)
                if self._confirm_apart(subject, payload, headers):
                    return
            else:  # a job's: acknowledged only once its event is kept
                await self._confirmed(subject, payload, headers)
                return
        if headers is None:  # fitted to max_payload, as a reply is: the fast path's publish itself
            if not (self._path or fast_path(self.nc)).publish(subject, payload):
                await publish_later(self.nc, subject, payload, "an audit event")
            return
        if publish_now(self.nc, subject, payload, "an audit event", headers) is None:
            await publish_later(self.nc, subject, payload, "an audit event", headers)

    def _confirm_apart(self, subject: str, payload: bytes, headers: dict[str, str]) -> bool:
        """A request's event confirmed in a task of its own (`settle_audits` waits for them
        at a stop); False when _CONFIRMING_MAX wait already: this one is sent as is."""
        if len(self._confirming) >= _CONFIRMING_MAX:
            if not self._confirming_full:
                self._confirming_full = True
                log.warning(
                    "audit: %d request events already wait for the audit stream's "
                    "confirmation; the next ones are sent as core publishes until fewer wait",
                    _CONFIRMING_MAX,
                )
            return False
        self._confirming_full = False
        task = asyncio.ensure_future(self._confirmed(subject, payload, headers))
        self._confirming.add(task)
        task.add_done_callback(self._confirm_done)
        return True

    def _confirm_done(self, task: asyncio.Task[None]) -> None:
        self._confirming.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("bug while confirming an audit event", exc_info=exc)

    async def _confirmed(self, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        """The event confirmed by the stream (`_audit_acked`), else sent as a core publish."""
        try:
            if await self._audit_acked(subject, payload, headers):
                return
        except asyncio.CancelledError:  # a stop past its grace: sent as is, kept if it can
            publish_now(self.nc, subject, payload, "an audit event", headers)
            raise
        if publish_now(self.nc, subject, payload, "an audit event", headers) is None:
            await publish_later(self.nc, subject, payload, "an audit event", headers)

    async def settle_audits(self, timeout_s: float) -> None:
        """At a stop, once every request is answered: the requests' events still waiting for
        the stream's confirmation get up to `timeout_s` more, then go as core publishes."""
        if not self._confirming:
            return
        waiting = set(self._confirming)
        _, late = await asyncio.wait(waiting, timeout=timeout_s)
        if late:
            log.warning(
                "audit: %d request events not confirmed by the audit stream within the "
                "shutdown grace; sent as core publishes, kept only if the stream takes them now",
                len(late),
            )
            for task in late:
                task.cancel()
            await asyncio.wait(late)

    async def _audit_acked(self, subject: str, payload: bytes, headers: dict[str, str]) -> bool:
        """A job's audit event (one with a Nats-Msg-Id) published to JetStream, and tried again
        until the stream confirms it, for up to _AUDIT_PATIENCE_S: whether it did. A core
        publish is kept only by a stream that can take it then, and a cluster's audit stream
        has no leader for a few seconds after a node dies: its jobs, acknowledged right after,
        lost their events for good (174 of 1,200 in one `make chaos-cluster`). The job's
        heartbeat holds it meanwhile; a try that timed out may have been kept, and the stream
        keeps one event per Nats-Msg-Id. Requests' events stay core publishes unless
        audit.confirm_requests says otherwise: a JetStream publish costs 93 to 200 µs of CPU
        against 2 to 4 (the README's Durable jobs); a request's reply has gone by then."""
        js = self.nc.jetstream(timeout=_AUDIT_TRY_S)
        give_up, tries = time.monotonic() + _AUDIT_PATIENCE_S, 0
        while True:
            try:
                await js.publish(subject, payload, headers=headers)
                return True
            except jetstream.UNREACHABLE as exc:  # no leader yet, a timeout, reconnecting
                problem = exc
            except NatsError as exc:  # a refusal, the connection closed: no wait cures it
                log.warning("audit: JetStream did not take an event (%r); sent as is", exc)
                return False
            if time.monotonic() >= give_up:
                log.warning(
                    "audit: the audit stream did not confirm an event in %g s (%r); sent as a "
                    "core publish, kept only if the stream takes it now, as are the next "
                    "events until the stream is seen again",
                    _AUDIT_PATIENCE_S,
                    problem,
                )
                self.audit_kept = frozenset()  # the next jobs do not wait: until the stream is seen
                return False
            await asyncio.sleep(jetstream.BACKOFF_S[min(tries, len(jetstream.BACKOFF_S) - 1)])
            tries += 1


def _short_msg_id(msg_id: str) -> str:
    """A Nats-Msg-Id of at most 300 characters, distinct for distinct ids: a long one (a job id
    taken from its own Nats-Msg-Id, which has no length limit) keeps its start and a hash."""
    if len(msg_id) <= 300:
        return msg_id
    return msg_id[:200] + "~" + hashlib.sha256(msg_id.encode()).hexdigest()


def _bounded(reply: ProviderReply) -> ProviderReply:
    """A worker's reply with its free texts cut to a size that replies and audit events can
    carry, and its numbers held to what Lifeline's own workers send (a worker in another
    language may send any): a Retry-After of an hour at most (1e306 overflowed the gateway's
    Retry-After header), an HTTP status of three digits."""
    if isinstance(reply, ProviderOk):
        if len(reply.model) > MAX_NAME_LENGTH:
            return msgspec.structs.replace(reply, model=reply.model[:MAX_NAME_LENGTH])
        return reply
    if reply.kind not in _KINDS:  # a worker of another language's, say: what policy knows
        message = f"worker answered an unknown error kind {reply.kind[:64]!r}: {reply.message}"
        reply = msgspec.structs.replace(reply, kind="server_error", message=message)
    after = reply.retry_after_s
    if after is not None and bounded_retry_after(after) != after:  # Lifeline's own workers' bound
        reply = msgspec.structs.replace(reply, retry_after_s=bounded_retry_after(after))
    if reply.status_code is not None and not 100 <= reply.status_code <= 999:
        # An HTTP status is three digits; msgspec decodes any integer, and one past an int64
        # could not go on a span (OTLP), nor be read by a client decoding an int64.
        reply = msgspec.structs.replace(reply, status_code=None)
    if len(reply.message) > MAX_MESSAGE_CHARS:
        return msgspec.structs.replace(reply, message=reply.message[:MAX_MESSAGE_CHARS])
    return reply


TooLarge = Callable[[CompletionReply, int, int], CompletionReply]


def fitted(
    reply: CompletionReply,
    room: int,
    too_large: TooLarge | None = None,
    *,
    cut_names: bool = True,
) -> tuple[CompletionReply, bytes]:
    """`reply` and its encoding in at most `room` bytes (what a NATS message or a stored result
    may carry besides its headers). An answer that fits once its attempts' texts are left out
    goes so; one too large even then becomes a reply_too_large error, without the answer, that
    fits (`too_large(reply, size, room)` says why; by default, the NATS server's max_payload).
    An error keeps its kind: its texts are what is cut (`_fitting`).
    Without `cut_names`, a room too small even for that error's names is left to the caller,
    over `room`. Every reply, result and end event goes out through here; what it returns is
    what went out, so the audit event reports that."""
    payload = encoder.encode(reply)
    if len(payload) <= room:
        return reply, payload
    if reply.status == "ok":
        lean = _texts_dropped(reply)
        lean_payload = encoder.encode(lean)
        if len(lean_payload) <= room:
            return lean, lean_payload
        reply = (too_large or _too_large)(reply, len(payload), room)
    return _fitting(reply, room, cut_names)


def _too_large(reply: CompletionReply, size: int, max_payload: int) -> CompletionReply:
    who = f" from {clipped(reply.target or reply.provider, 100)}" if reply.provider else ""
    message = (
        f"the answer{who} makes a reply of {size} bytes, above the NATS server's max_payload of "
        f"{max_payload}; "
        "ask for fewer max_tokens, or raise max_payload in nats-server's config"
    )
    return as_error(reply, REPLY_TOO_LARGE, message)


def as_error(reply: CompletionReply, kind: str, message: str) -> CompletionReply:
    """`reply` failed with `kind` after all: without its answer, all of it (its text and its
    tool calls, whose arguments can be as big)."""
    return msgspec.structs.replace(
        reply,
        status="error",
        content=None,
        tool_calls=None,
        finish_reason=None,
        error=ErrorInfo(kind, message),
    )


_Fits = TypeVar("_Fits", CompletionReply, AuditEvent)


def _fitting(message: _Fits, max_payload: int, cut_names: bool = True) -> tuple[_Fits, bytes]:
    """The message as sent, and its encoding: with its attempts' texts, then its attempts,
    then the length of its names and texts cut if that is what it takes to fit (its id, status,
    error type and trace id always stay). Never more than `max_payload` (unless not
    `cut_names`): one message over the server's limit closes the whole connection, and a
    request's one reply and one audit event must each go out whatever the request held."""
    payload = encoder.encode(message)
    if len(payload) <= max_payload:
        return message, payload
    message = _texts_dropped(message)
    payload = encoder.encode(message)
    if len(payload) <= max_payload:
        return message, payload
    message = msgspec.structs.replace(message, attempts=[])
    payload = encoder.encode(message)
    if len(payload) <= max_payload or not cut_names:
        return message, payload
    # Only names no wire bound stopped (a config's, a worker's) can leave it too big now.
    log.error(
        "the %s for %r did not fit %d bytes: its names cut short",
        _kind(message),
        message.id[:256],
        max_payload,
    )
    message = _names_cut(message)
    payload = encoder.encode(message)
    if len(payload) <= max_payload:
        return message, payload
    return _bare(message, len(payload), max_payload)


def _texts_dropped(message: _Fits) -> _Fits:
    attempts: list[Attempt] = [msgspec.structs.replace(a, message=None) for a in message.attempts]
    return msgspec.structs.replace(message, attempts=attempts)


def _kind(message: CompletionReply | AuditEvent) -> str:
    return "reply" if isinstance(message, CompletionReply) else "audit event"


def _names_cut(message: _Fits) -> _Fits:
    """The message with every text bounded: a few KiB at most, whatever it held."""
    common = {
        "id": message.id[:256],
        "provider": clipped(message.provider, 256),
        "model": clipped(message.model, 256),
        "target": clipped(message.target, 256),
        "template": clipped(message.template, 256),
        "finish_reason": clipped(message.finish_reason, 64),
    }
    if isinstance(message, CompletionReply):
        error = message.error
        if error is not None:
            error = ErrorInfo(
                error.type[:64],
                clipped(error.message, MAX_MESSAGE_CHARS) or "",
                error.retry_after_s,
            )
        return msgspec.structs.replace(
            message, **common, error=error, content=None, tool_calls=None
        )
    return msgspec.structs.replace(
        message,
        **common,
        route=clipped(message.route, 256),
        error_type=clipped(message.error_type, 64),
        tools_called=[name[:64] for name in message.tools_called[:64]],
    )


def _bare(message: _Fits, size: int, max_payload: int) -> tuple[_Fits, bytes]:
    """The message down to what says whose it is and how it ended (id, status, error kind,
    trace id, figures), with no names; a reply's error says its details did not fit. Its id
    is cut short only if even that is too much (a client matches its answer by the reply
    subject, not the id)."""
    texts = {"provider": None, "model": None, "target": None, "template": None}
    if isinstance(message, CompletionReply):
        error = message.error
        if error is not None:
            note = (
                f"the reply's details ({size} bytes) did not fit the NATS server's max_payload "
                f"({max_payload} bytes left): raise max_payload"
            )
            texts["error"] = ErrorInfo(error.type, note, error.retry_after_s)
    else:
        texts.update(route=None, tools_called=[])
    message = msgspec.structs.replace(message, **texts)
    payload = encoder.encode(message)
    if len(payload) > max_payload and isinstance(message, CompletionReply) and message.error:
        message = msgspec.structs.replace(message, error=ErrorInfo(message.error.type, ""))
        payload = encoder.encode(message)
    over = len(payload) - max_payload
    if over > 0:  # every character of the id is a byte or more of the message
        message = msgspec.structs.replace(message, id=message.id[: max(len(message.id) - over, 0)])
        payload = encoder.encode(message)
    return message, payload


_background: set[asyncio.Future[None]] = set()  # cancels sent from callbacks, until sent


class _Inbox:
    """Request/reply for the attempts: one wildcard subscription takes every reply, and each
    attempt waits on a future with a timeout, an entry of the inbox's Timeouts (nats-py's
    request() makes a random token, a done-callback and an asyncio.wait_for per call, which
    cost a tenth of the dispatcher's CPU at 64 in flight). A reply after its attempt gave up
    finds no future and is dropped. A streaming attempt's chunks come to
    <prefix>.<token>.c and its reply to <prefix>.<token>, both to its ProviderStream."""

    __slots__ = ("_nc", "_path", "_streams", "_sub", "_timeouts", "_tokens", "_waiting", "prefix")

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self.prefix = ""
        # Not guessable: a worker may publish chunks to any dispatcher's <prefix>.*.c (it
        # cannot know which stream is whose), and the prefix is in every request it gets.
        self._tokens = SecretIds()
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._streams: dict[str, ProviderStream] = {}
        self._sub: Subscription | None = None
        self._timeouts = Timeouts()  # every attempt's timeout on one loop timer
        self._path: FastPath | None = None  # the connection's fast path, from `start` on

    async def start(self) -> None:
        if self._sub is None:
            self.prefix = self._nc.new_inbox() + "."
            self._path = fast_path(self._nc)
            self._sub = await self._path.subscribe(self.prefix + ">", self._on_reply)

    def _on_reply(self, msg: Received) -> None:
        token = msg.subject[len(self.prefix) :]
        if token[-2:] == ".c":
            stream = self._streams.get(token[:-2])
            if stream is not None:
                stream.chunk(msg.data, msg.headers)
            return
        future = self._waiting.pop(token, None)
        if future is not None:
            if not future.done():
                future.set_result(msg)
            return
        stream = self._streams.get(token)
        if stream is not None:
            stream.final(msg)

    async def open_stream(
        self, subject: str, payload: bytes, headers: dict[str, str], stream: ProviderStream
    ) -> None:
        if self._sub is None:
            await self.start()
        token = self._tokens.next()
        inbox = self.prefix + token
        headers[STREAM_TO] = inbox + ".c"
        # Measured as it goes out, its Lifeline-Stream-To header included: as planning measured
        # it (engine's _check_fits), not with the room the stream's events keep for theirs.
        size = message_bytes(payload, headers)
        if size > self._nc.max_payload:
            stream.end(
                ProviderFailure(
                    "bad_request",
                    f"the request on {subject} is {size} bytes with headers, above the NATS "
                    f"server's max_payload of {self._nc.max_payload}; shorten the messages or "
                    "the target's template",
                )
            )
            return
        self._streams[token] = stream
        stream.opened(lambda: self._streams.pop(token, None))
        try:
            if not fast_path(self._nc).publish(subject, payload, inbox, headers):
                await self._nc.publish(subject, payload, reply=inbox, headers=headers)
        except NatsError as exc:
            stream.end(
                ProviderFailure("connection", f"could not ask {subject}: {type(exc).__name__}")
            )

    def send(
        self,
        subject: str,
        payload: bytes,
        timeout_s: float,
        headers: dict[str, str],
        block: bytes | None = None,
    ) -> tuple[str, asyncio.Future[Msg], Timeout, bool]:
        """Send one request (started: see NatsTransport.ask_provider): its token, the future
        its reply (or, after timeout_s, NatsTimeoutError) comes to, its timeout (for `close`),
        and whether it went out; when not (the fast path cannot take it), the caller publishes
        it through nats-py to prefix + token."""
        token = self._tokens.next()
        future: asyncio.Future[Msg] = self._timeouts.loop().create_future()
        self._waiting[token] = future
        timer = self._timeouts.call_later(timeout_s, _expire, future)
        path = self._path or fast_path(self._nc)  # the fast path found once (a call less)
        sent = path.publish(subject, payload, self.prefix + token, headers, block, True)
        return token, future, timer, sent

    def close(self, token: str, timer: Timeout) -> None:
        """A request is over (answered, timed out or cancelled): a late reply finds nothing."""
        self._timeouts.cancel(timer)
        self._waiting.pop(token, None)


# The status the server answers with, in an empty message, when nobody is subscribed (a
# worker's reply with a header of that name and a body is its answer, not the server's).
_NO_RESPONDERS = "503"


def _expire(future: asyncio.Future[Msg]) -> None:
    if not future.done():
        future.set_exception(NatsTimeoutError())


class ProviderStream:
    """One streaming attempt at a worker, as the dispatcher sees it.

    Chunks go to `on_chunk` as the read loop hands them over (no task switch per chunk).
    `first` is done at the first chunk, or at the end when none came; `done` at the end, with
    the worker's reply (a ProviderOk whose `content` is what did not stream) or the failure:
    the worker's, no_responders, or a timeout of the attempt's own timer (timeout_s, ttft_s,
    idle_s), which also tells the worker to cancel. A worker that does not stream answers once:
    its content is passed on as the stream's chunks, then it ends; so are the tool calls of
    one that streamed none of theirs."""

    __slots__ = (
        "_close",
        "_counted",
        "_idle_s",
        "_last",
        "_left",
        "_limits",
        "_loop",
        "_max_chunk",
        "_on_chunk",
        "_opened_at",
        "_started",
        "_timeouts",
        "_timer",
        "_tools_streamed",
        "_transport",
        "attempt_id",
        "chunks",
        "done",
        "first",
        "first_at",
        "provider",
    )

    def __init__(
        self,
        transport: NatsTransport,
        provider: str,
        limits: StreamLimits,
        on_chunk: OnChunk,
        attempt_id: str,
        timeouts: Timeouts | None = None,
    ) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._transport = transport
        self.provider = provider
        self.attempt_id = attempt_id
        self._limits = limits
        self._on_chunk = on_chunk
        self._max_chunk = transport.nc.max_payload - STREAM_HEADER_ROOM
        self._left = limits.max_bytes  # what the deltas may still add up to (None: no bound)
        self.first: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[ProviderReply] = loop.create_future()
        self.chunks = 0
        self.first_at: float | None = None  # time.monotonic() of the first chunk
        self._opened_at = time.monotonic()
        self._counted = True  # its end, if any, counted the chunks that arrived
        self._tools_streamed = False  # a tool-call piece came (else its end's calls are sent)
        self._started = self._last = loop.time()
        self._close: Callable[[], object] | None = None
        # The soonest limit: timeout_s (the attempt's share of the deadline) bounds ttft_s too.
        first_check = (
            limits.timeout_s if limits.ttft_s is None else min(limits.ttft_s, limits.timeout_s)
        )
        # On the inbox's Timeouts, as every call's timeout: after a stall (a long read, a paused
        # VM) it lets the loop read what came meanwhile first. A loop timer of its own fired
        # first on uvloop, and failed a stream whose chunk had come in time.
        self._timeouts = Timeouts() if timeouts is None else timeouts
        self._timer = self._at(self._started + first_check)

    def opened(self, close: Callable[[], object]) -> None:
        """The inbox routes to this stream until `close` is called (at the end)."""
        self._close = close

    def chunk(self, data: bytes, headers: dict[str, str] | None = None) -> None:
        if self.done.done():
            return  # after a timeout: the worker is being cancelled
        tool = headers is not None and headers.get(EVENT) == TOOL_CALL
        if tool:
            try:
                piece = tool_call_delta_decoder.decode(data)
            except (msgspec.DecodeError, RecursionError) as exc:
                message = (
                    f"worker {self.provider} streamed a tool-call piece that is no "
                    f"ToolCallDelta: {exc}"
                )
                self._give_up("server_error", message[:MAX_MESSAGE_CHARS])
                return
            size = delta_bytes(piece)
            self._tools_streamed = True
            # Passed on as decoded, not as the worker wrote it: what max_response_bytes counts
            # is then all the client gets (no padding, no fields the wire does not know).
            data = encoder.encode(piece)
        else:  # every delta is whole UTF-8, as clients decode each one by itself
            size = len(data) or 1  # as delta_bytes counts: endless empty deltas are bounded too
            try:
                data.decode()
            except UnicodeDecodeError as exc:
                self._give_up(
                    "server_error",
                    f"worker {self.provider} streamed a chunk that is not whole UTF-8 ({exc.reason} "
                    f"at byte {exc.start}): a character cut in two, or no text",
                )
                return
        if len(data) > self._max_chunk:
            self._give_up(
                "response_too_large",
                f"a chunk from {self.provider} is {len(data)} bytes, above what a stream event "
                f"may carry ({self._max_chunk}, the NATS server's max_payload less room for "
                "headers)",
            )
            return
        if self._left is not None:
            self._left -= size
            if self._left < 0:
                self._give_up(
                    "response_too_large",
                    f"{self.provider} streamed over its max_response_bytes "
                    f"({self._limits.max_bytes}): stopped by the dispatcher (a worker of "
                    "Lifeline's stops there itself)",
                )
                return
        self.chunks += 1
        self._last = self._loop.time()
        if self.first_at is None:
            self.first_at = time.monotonic()
            if not self.first.done():  # its waiter's cancel (a hedge lost, an abort) cancels it
                self.first.set_result(None)
            idle_s = self._limits.idle_s
            if idle_s is not None and self._timer[0] > self._last + idle_s:
                self._timeouts.cancel(self._timer)  # from now on the idle limit is the soonest
                self._timer = self._at(self._last + idle_s)
        self._on_chunk(data, tool)
        cut = self._limits.cut
        if cut is not None and self.chunks == cut[0]:  # a request's simulated failure
            self.end(cut[1])
            self._transport.cancel_now(self.provider, self.attempt_id)

    def final(self, msg: Msg) -> None:
        if self.done.done():
            return
        if not msg.data and msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
            subject = provider_subject(self.provider)
            self.end(
                ProviderFailure(
                    "no_responders",
                    f"no worker is listening on {subject}: start one with "
                    f"`lifeline worker {self.provider}`",
                )
            )
            return
        try:
            reply = _bounded(provider_reply_decoder.decode(msg.data))
        except (msgspec.DecodeError, RecursionError) as exc:
            message = f"worker {self.provider} sent a reply that breaks the protocol: {exc}"
            self.end(ProviderFailure("server_error", message[:MAX_MESSAGE_CHARS]))
            return
        if isinstance(reply, ProviderOk):
            if reply.chunks != self.chunks:
                self._counted = False
            if reply.chunks > self.chunks:
                self.end(
                    ProviderFailure(
                        "connection",
                        f"{self.chunks} of the {reply.chunks} chunks {self.provider} streamed "
                        "arrived: the others were lost on the way",
                    )
                )
                return
            if reply.chunks < self.chunks:  # its end would send what streamed a second time
                self.end(
                    ProviderFailure(
                        "server_error",
                        f"worker {self.provider} breaks the protocol: it streamed {self.chunks} "
                        f"chunks and its end says {reply.chunks}",
                    )
                )
                return
            for piece in pieces(reply.content, self._max_chunk):  # a worker that did not stream
                self.chunk(piece)
                if self.done.done():
                    return
            if not self._tools_streamed:  # its tool calls, whole, as one piece each
                for index, call in enumerate(reply.tool_calls or ()):
                    delta = ToolCallDelta(index, call.id, call.name, call.arguments)
                    self.chunk(encoder.encode(delta), _TOOL_CALL_HEADERS)
                    if self.done.done():
                        return
        self.end(reply)

    @property
    def intact(self) -> bool:
        """Whether the chunks relayed are all the worker sent so far, in order (see
        streaming.Stream): its end did not count others, and no outage of this connection
        since the attempt began lost some on the way (asked only when it failed)."""
        return self._counted and not self._transport.spanned_an_outage(self._opened_at)

    def end(self, reply: ProviderReply) -> None:
        self._timeouts.cancel(self._timer)
        if self._close is not None:
            self._close()
        if not self.first.done():
            self.first.set_result(None)
        if not self.done.done():
            self.done.set_result(reply)

    def abandon(self) -> None:
        """Nobody waits for this attempt any more (a hedge lost, a shutdown): its worker is
        told to cancel it. Its waiter's cancel may have cancelled `done` (an awaited future is
        cancelled with its task): that is no end, so its timer and inbox entry go here too."""
        if not self.done.done() or self.done.cancelled():
            self.end(ProviderFailure("timeout", "abandoned"))
            self._transport.cancel_now(self.provider, self.attempt_id)

    def _check(self) -> None:
        """The attempt's one timer: it fires at the soonest of its limits and, when a chunk has
        come since, sets itself again instead of being reset on every chunk."""
        # Timeouts fires an entry up to half a millisecond early: its time counts as reached.
        limits, now = self._limits, max(self._loop.time(), self._timer[0]) + _SLACK_S
        end_at = self._started + limits.timeout_s
        if now >= end_at:
            self._give_up(
                "timeout",
                f"the stream from {self.provider} did not end within {limits.timeout_s:.3g} s "
                f"({self.chunks} chunks)",
            )
            return
        if self.first_at is None:
            if limits.ttft_s is not None and now >= self._started + limits.ttft_s:
                self._give_up(
                    "timeout",
                    f"no first chunk from {self.provider} within ttft_s = {limits.ttft_s:.3g} s",
                )
                return
            due = self._started + limits.ttft_s if limits.ttft_s is not None else end_at
        else:
            if limits.idle_s is not None and now >= self._last + limits.idle_s:
                self._give_up(
                    "timeout",
                    f"{self.provider} sent no chunk for idle_s = {limits.idle_s:.3g} s after "
                    f"{self.chunks} chunks",
                )
                return
            due = self._last + limits.idle_s if limits.idle_s is not None else end_at
        self._timer = self._at(min(due, end_at))

    def _at(self, when: float) -> Timeout:
        """`_check` at `when` (the loop's time)."""
        return self._timeouts.call_later(when - self._loop.time(), ProviderStream._check, self)

    def _give_up(self, kind: str, message: str) -> None:
        self.end(ProviderFailure(kind, message))
        self._transport.cancel_now(self.provider, self.attempt_id)


class ClientStream:
    """One request's events on the client's reply subject, in order, each with its number
    (schemas/streaming.py). Deltas are published from the read callback that received their
    chunk, through the fast path with a header block built by one format; when the fast path
    cannot take a message (a reconnect), it and every later one go through nats-py in order."""

    __slots__ = (
        "_backlog",
        "_drain",
        "_ended",
        "_fast",
        "_nc",
        "beat_every_s",
        "beat_seq",
        "beat_since",
        "seq",
        "subject",
    )

    def __init__(self, nc: Client, subject: str) -> None:
        self._nc = nc
        self._fast = fast_path(nc)
        self.subject = subject
        self.seq = 0
        self._ended = False  # its end (or error) event went: no heartbeat after it
        self._backlog: deque[tuple[dict[str, str], bytes]] = deque()  # held through a reconnect
        self._drain: asyncio.Task[None] | None = None

    def delta(self, attempt: int, text: bytes) -> None:
        self.seq += 1
        if not self._backlog and self._fast.publish(
            self.subject, text, block=_DELTA_BLOCK % (self.seq, attempt)
        ):
            return
        self._later({SEQ: str(self.seq), ATTEMPT_NO: str(attempt)}, text)

    def tool_call(self, attempt: int, piece: bytes) -> None:
        self._control(TOOL_CALL, attempt, piece)

    def reset(self, reset: StreamReset) -> None:
        payload = encoder.encode(reset)
        # A worker's message may fill its whole reply: on a small max_payload the reset, with
        # its headers and fields, would not fit, and dropped it leaves the client a gap.
        headers = _event_headers(self.seq + 1, reset.attempt, RESET)
        room = self._nc.max_payload - message_bytes(b"", headers)
        if len(payload) > room:  # each character cut is a byte or more; "…" is three
            error = reset.error
            most = max(len(error.message) - (len(payload) - room) - 3, 0)
            error = ErrorInfo(error.type, clipped(error.message, most) if most else "")
            payload = encoder.encode(msgspec.structs.replace(reset, error=error))
        self._control(RESET, reset.attempt, payload)

    def heartbeat(self) -> None:
        """An empty heartbeat event, unnumbered (see Heartbeats); none once the stream ended.
        None either while events wait to go (they say as much) or the connection is down:
        held through an outage, it would tell nothing when it came, and take room in nats-py's
        reconnect buffer from the answers; the next one goes an interval after it is back."""
        if self._ended or self._backlog:
            return
        if not self._fast.publish(self.subject, b"", block=_HEARTBEAT_BLOCK) and (
            self._nc.is_connected
        ):
            self._later({EVENT: HEARTBEAT}, b"")

    async def end(self, reply: CompletionReply, attempt: int) -> CompletionReply:
        """The last event: end, or error. Returns what was sent (the audit event says the same)."""
        self._ended = True
        # The room its own headers leave (as an error event's: "error" is the longer name),
        # not STREAM_HEADER_ROOM: that is for a worker's chunks, whose headers are added later.
        headers = _event_headers(self.seq + 1, attempt, ERROR)
        reply, payload = fitted(reply, self._nc.max_payload - message_bytes(b"", headers))
        self._control(END if reply.status == "ok" else ERROR, attempt, payload)
        if self._drain is not None:  # events held through a reconnect, the end among them:
            await asyncio.shield(self._drain)  # a cancel now (an abort) must not drop them
        return reply

    def _control(self, kind: str, attempt: int, payload: bytes) -> None:
        self.seq += 1
        headers = _event_headers(self.seq, attempt, kind)
        if message_bytes(payload, headers) > self._nc.max_payload:
            # Callers keep to the room (`end` makes a reply fit): only a bug gets here. The fast
            # path checks no size, and one message over max_payload makes the server close the
            # whole connection, every other request's included: drop it, loudly.
            log.error("not sending a %s event of %d bytes to %s", kind, len(payload), self.subject)
            return
        if self._backlog or not self._fast.publish(self.subject, payload, headers=headers):
            self._later(headers, payload)

    def _later(self, headers: dict[str, str], payload: bytes) -> None:
        self._backlog.append((headers, payload))
        if self._drain is None or self._drain.done():
            self._drain = asyncio.ensure_future(self._send_backlog())

    async def _send_backlog(self) -> None:
        while self._backlog:
            headers, payload = self._backlog.popleft()
            try:
                await self._nc.publish(self.subject, payload, headers=headers)
            except NatsError as exc:
                log.warning("could not send a stream event to %s: %s", self.subject, exc)
                self._backlog.clear()  # the client sees a gap, or nothing: never a wrong order


class ReplyHeartbeat:
    """An llm.complete request's heartbeats (see Heartbeats) on its reply subject, until its
    one reply: messages with `Lifeline-Event: heartbeat`, which its client, having asked, reads
    apart from the reply, each carrying the request's Progress: how long the dispatcher has had
    it and the attempts finished so far (`attempts`, the list the engine fills as the chain
    goes: Engine.serve's `progress`). `respond` sends the reply (NatsTransport.answer)."""

    __slots__ = (
        "_answer",
        "_ended",
        "_fast",
        "_room",
        "arrived",
        "attempts",
        "beat_every_s",
        "beat_seq",
        "beat_since",
        "seq",
        "subject",
    )

    def __init__(self, transport: NatsTransport, subject: str, arrived: float) -> None:
        self._answer = transport.answer
        self._fast = fast_path(transport.nc)
        self._room = min(_PROGRESS_MAX, transport.nc.max_payload - len(_HEARTBEAT_BLOCK))
        self.subject = subject
        self.arrived = arrived  # time.monotonic() when the request arrived
        self.attempts: list[Attempt] = []
        self.seq = 0  # a reply has no events before it: a heartbeat every interval
        self._ended = False

    def heartbeat(self) -> None:
        if self._ended:  # none after the reply
            return
        elapsed_ms = round((time.monotonic() - self.arrived) * 1000, 1)
        body = encoder.encode(Progress(elapsed_ms, self.attempts))
        if len(body) > self._room:  # many attempts with long messages: the time alone
            body = encoder.encode(Progress(elapsed_ms))
        # None through a reconnect (the fast path refuses): late, it is none
        self._fast.publish(self.subject, body, block=_HEARTBEAT_BLOCK)

    def respond(self, reply: CompletionReply) -> Awaitable[CompletionReply]:
        self._ended = True
        return self._answer(self.subject, reply)  # its coroutine: no frame of this one's


class Heartbeats:
    """The llm.stream and llm.complete requests whose client asked for heartbeats
    (Lifeline-Heartbeat-Ms), and the one task that sends them while any is open: a stream gets
    one as it is taken (its client learns that a dispatcher that sends them has it), then one
    whenever it sent nothing for its interval, until its end event; a request on llm.complete
    one every interval until its reply (none at once: most are answered sooner, and a message
    more for each would cost them all). One look at every such stream per tick
    (a quarter of the shortest interval, 0.1 s at least) instead of a timer per stream set
    again on every event: an event costs nothing more, and a heartbeat comes within its
    interval and two ticks of the last event, twice the interval at most (an event is seen at
    the tick after it; streaming.heartbeat_silence_s leaves more). A stream leaves when its
    request's task is done (`discard`)."""

    def __init__(self) -> None:
        # Per request's task, its stream (or reply), which keeps its interval, when its last
        # event was seen and its seq then (beat_*: no object more per request). Read by a
        # dispatcher's every done request (a C-level test when empty, not a method call).
        self.beating: dict[object, ClientStream | ReplyHeartbeat] = {}
        self._tick_s = _HEARTBEAT_TICK_MAX_S
        self._task: asyncio.Task[None] | None = None

    def add(
        self,
        key: object,
        stream: ClientStream | ReplyHeartbeat,
        every_s: float,
        at_once: bool = True,
    ) -> None:
        if at_once:
            stream.heartbeat()
        stream.beat_every_s, stream.beat_since = every_s, time.monotonic()
        stream.beat_seq = stream.seq
        self.beating[key] = stream
        if every_s < self._tick_s * 4:
            self._tick_s = max(every_s / 4, _HEARTBEAT_TICK_MIN_S)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._beat())

    def discard(self, key: object) -> None:
        self.beating.pop(key, None)

    def stop(self) -> None:
        self.beating.clear()
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _beat(self) -> None:
        try:
            while self.beating:
                await asyncio.sleep(self._tick_s)
                now = time.monotonic()
                for stream in self.beating.values():
                    if stream.seq != stream.beat_seq:  # events went since the last look
                        stream.beat_since, stream.beat_seq = now, stream.seq
                    elif now - stream.beat_since >= stream.beat_every_s:
                        stream.heartbeat()
                        stream.beat_since = now
        except Exception:  # a bug here must not end every stream's heartbeats unseen
            log.exception("heartbeats stopped: a bug (requests still get their replies)")
        finally:
            self._tick_s = _HEARTBEAT_TICK_MAX_S


def heartbeat_interval(value: str | None) -> float | None:
    """A request's Lifeline-Heartbeat-Ms, in seconds, kept within HEARTBEAT_MS_BOUNDS; None
    when it asked for none (no header, or one that is no whole number of milliseconds). The
    few values clients send are read once (parsing one is about 0.5 µs, per request)."""
    if value is None:
        return None
    known = _INTERVALS.get(value, _UNKNOWN)
    if known is not _UNKNOWN:
        return known  # type: ignore[return-value]
    every_s = _heartbeat_interval(value)
    if len(_INTERVALS) < _INTERVALS_KEPT:  # values a client makes up never push them out
        _INTERVALS[value] = every_s
    return every_s


def _heartbeat_interval(value: str) -> float | None:
    value = value.strip()
    if not value.isascii() or not value.isdigit():
        return None
    low, high = HEARTBEAT_MS_BOUNDS
    # Ten digits or more (leading zeros aside) are past the bound: not read as a number, which
    # for a long enough value costs time, and past 4,300 digits int() refuses.
    digits = value.lstrip("0")
    return (min(max(int(digits or "0"), low), high) if len(digits) < 10 else high) / 1000


_HEARTBEAT_TICK_MAX_S, _HEARTBEAT_TICK_MIN_S = 1.0, 0.1
_PROGRESS_MAX = 16 * 1024  # a heartbeat's Progress, at most (else its elapsed time alone)
_INTERVALS: dict[str, float | None] = {}  # heartbeat_interval's, by header value
_INTERVALS_KEPT = 16
_UNKNOWN = object()
_HEARTBEAT_BLOCK = b"NATS/1.0\r\n" + EVENT.encode() + b": " + HEARTBEAT.encode() + b"\r\n\r\n"


def _event_headers(seq: int, attempt: int, kind: str) -> dict[str, str]:
    return {SEQ: str(seq), ATTEMPT_NO: str(attempt), EVENT: kind}


_DELTA_BLOCK = b"NATS/1.0\r\n" + SEQ.encode() + b": %d\r\n" + ATTEMPT_NO.encode() + b": %d\r\n\r\n"
