"""The provider worker runtime: subscribe, decode, call the provider once, always reply.

A worker serves one provider on llm.provider.<name>, in the queue group of that provider,
so N replicas share the load. It knows its provider, never the routes. Protocol (any
language can implement it): the request body is a ProviderRequest; the reply is a
ProviderOk or ProviderFailure; the `Lifeline-Deadline-Ms` header is the Unix time in ms
after which the dispatcher no longer waits, so work past it is dropped unanswered. Every
replica also listens on llm.cancel.<name>: a message there names a `Lifeline-Attempt-Id`
the dispatcher gave up on, and the replica running it cancels it, HTTP call included.

Streaming: a request with a `Lifeline-Stream-To` header wants the answer as it comes,
published there in order: text as bare UTF-8 chunks, and pieces of tool calls as JSON
ToolCallDeltas with the header `Lifeline-Event: tool_call`; then the one reply, a ProviderOk
whose `chunks` says how many were sent (its content is only what did not stream). A provider with a
`stream` method streams; any other answers once, and the dispatcher streams that as one chunk.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from opentelemetry.trace import SpanKind

from schemas import ProviderFailure, ProviderOk, ProviderReply, ProviderRequest
from schemas.deadline import Deadline
from schemas.errors import ERROR_KINDS, bounded_retry_after, timeout_message
from schemas.streaming import TOOL_CALL, pieces
from schemas.subjects import (
    ATTEMPT_ID,
    DEADLINE_MS,
    EVENT,
    STREAM_TO,
    cancel_subject,
    provider_queue,
    provider_subject,
    reply_subject_refused,
)
from schemas.wire import (
    MAX_MESSAGE_CHARS,
    MAX_NAME_LENGTH,
    ToolCallDelta,
    encoder,
    provider_request_decoder,
)
from service import telemetry
from service.discovery import Tally
from service.loop import Timeouts, start_now
from service.natsio import (
    LIGHT,
    FastPath,
    Received,
    ensure_subscribed,
    fast_path,
    publish_checked,
    publish_later,
    publish_now,
    stop_taking,
)
from workers.base import Provider, ProviderError
from workers.scrubbing import Scrubber

log = logging.getLogger("lifeline.worker")


class WorkerRuntime:
    def __init__(
        self,
        name: str,
        kind: str,
        provider: Provider,
        nc: Client,
        spans: telemetry.SpanRecorder,
        timeout_s: float,
        max_in_flight: int = 1000,
        max_in_flight_bytes: int = 256 * 1024 * 1024,
        error_text: bool = False,
    ) -> None:
        self.name = name
        self.kind = kind
        self.provider = provider
        self.nc = nc
        self.spans = spans
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self.max_in_flight_bytes = max_in_flight_bytes
        # A failure's message on its span (audit.error_text): a provider's may quote the prompt.
        self.error_text = error_text
        self._bytes = 0  # of the calls in flight, their requests' sizes by task in _sizes
        self._sizes: dict[asyncio.Task[None], int] = {}
        # Each request's task, with its attempt id (None without one); and the reverse, for
        # cancels. One done-callback per task forgets both.
        self._tasks: dict[asyncio.Task[None], str | None] = {}
        self._by_attempt: dict[str, asyncio.Task[None]] = {}
        self._sub: Subscription | None = None
        self._cancel_sub: Subscription | None = None
        self.cancelled = 0  # attempts stopped by a cancel message
        self._stopping = False  # the shutdown grace ran out: calls cut short still reply
        self.cancels_heard = 0  # cancel messages, for this replica's attempts or another's
        self.expired = 0  # requests dropped because their deadline had passed on arrival
        self._expired_warned_at: float | None = None  # see _drop_expired
        self._expired_since_warning = 0
        self.tally = Tally()  # figures for the NATS service API ($SRV.STATS)
        # Every call's deadline timer (_Expiry) on one loop timer: while it waits, the call is
        # inside its provider (see stop()).
        self._timeouts = Timeouts()
        self._what = f"{name}'s reply"  # what a log line calls a reply it could not send
        # Span name and attributes per model (spans copy the attributes).
        self._span_templates: dict[str, tuple[str, dict[str, str]]] = {}
        self._odd_kinds: set[str] = set()  # kinds that were no str, each said once (_failure)
        # Its credentials, scrubbed from every text of every reply, answers included (the process
        # scrubs its log lines: service/logs.py).
        scrubber = Scrubber(getattr(provider, "secrets", ()))
        self._scrub = scrubber if scrubber else None  # None: nothing to hide, nothing to do
        self._path: FastPath | None = None  # the connection's fast path, from `start` on

    async def start(self) -> None:
        # Calls come on this loop (the subscriptions below): their tasks are made on it
        # without asyncio.create_task's lookup, a system call per call on Python 3.11.
        self._loop: asyncio.AbstractEventLoop = asyncio.get_running_loop()
        path = self._path = fast_path(self.nc)
        path.in_flight = self._tasks.__len__  # light traffic: replies go at once
        self._sub = await path.subscribe(
            provider_subject(self.name), self._on_msg, queue=provider_queue(self.name)
        )
        self._cancel_sub = await path.subscribe(cancel_subject(self.name), self._on_cancel)
        await ensure_subscribed(self.nc)

    async def stop(self, grace_s: float = 10.0) -> None:
        """Take no more calls; those in flight may finish within `grace_s`, then each left is
        cut short and answered no_responders. A negative or NaN grace is none: on NaN asyncio's
        wait lasted as long as the calls (a hung model's, for ever) and uvloop's raised, so no
        call was cut short."""
        if not grace_s >= 0:
            grace_s = 0.0
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await stop_taking(sub)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        if self._tasks:  # cut short, each one replies no_responders: its dispatcher moves on now
            log.warning(
                "worker %s: %d calls still running after the %g s shutdown grace: cancelling them",
                self.name,
                len(self._tasks),
                grace_s,
            )
            self._stopping = True
            for task in set(self._tasks):
                task.cancel()
            # Answered now: a provider that catches the cancel runs on, and its dispatcher
            # would wait for it until its deadline. (A call past its deadline was answered then.)
            for call in self._timeouts.pending():
                call.settle(self._stopped())
            await asyncio.wait(set(self._tasks), timeout=_REPLY_AFTER_CANCEL_S)
        if self._cancel_sub is not None:
            cancel_sub, self._cancel_sub = self._cancel_sub, None
            try:
                await cancel_sub.unsubscribe()
            except NatsError:  # a connection closed for good has nothing left to drop
                pass
        await self.provider.aclose()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def in_flight_bytes(self) -> int:
        return self._bytes

    @property
    def subscribed(self) -> bool:
        return self._sub is not None

    def _on_msg(self, msg: Received) -> None:
        self.tally.requests += 1
        size = len(msg.data)
        full = len(self._tasks) >= self.max_in_flight
        if full or (self._bytes + size > self.max_in_flight_bytes and self._tasks):
            self._refuse(msg, by_bytes=not full)
            return
        # Light traffic: the call runs in this read up to its provider's first wait (start_now).
        handle = self.handle(msg)
        if len(self._tasks) < LIGHT:
            # Its task must exist in the first step on 3.11: _Expiry cancels it, and httpx
            # (sniffio) finds its event loop by it.
            task = start_now(handle, asks_current_task=True, loop=self._loop)
        else:
            task = self._loop.create_task(handle)
        attempt_id = msg.headers.get(ATTEMPT_ID) if msg.headers else None
        if attempt_id is not None and (len(attempt_id) > 64 or not attempt_id.isascii()):
            attempt_id = _attempt_key(attempt_id.encode())  # as its cancel's body is cut
        self._tasks[task] = attempt_id
        self._sizes[task] = size
        self._bytes += size
        task.add_done_callback(self._finished)
        if attempt_id is not None:
            self._by_attempt[attempt_id] = task

    def _refuse(self, msg: Received, by_bytes: bool = False) -> None:
        """A call over max_in_flight (or max_in_flight_bytes): answered rate_limit at once,
        without a task, so a flood costs this worker a reply each and no memory."""
        if by_bytes:
            what = (
                f"{self.max_in_flight_bytes:,} bytes of requests "
                f"(providers.{self.name}.max_in_flight_bytes)"
            )
        else:
            what = f"{self.max_in_flight} calls (providers.{self.name}.max_in_flight)"
        reply = ProviderFailure(
            "rate_limit",
            f"worker {self.name} is working on its maximum of {what}; add worker replicas or "
            "raise it",
        )
        if msg.reply and not fast_path(self.nc).publish(msg.reply, encoder.encode(reply)):
            task = asyncio.ensure_future(self._send(msg.reply, reply))  # which counts it
            self._tasks[task] = None
            task.add_done_callback(self._finished)
            return
        self.tally.errors += 1
        self.tally.last_error = reply.kind

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._bytes -= self._sizes.pop(task, 0)
        attempt_id = self._tasks.pop(task, None)
        if attempt_id is not None:
            self._by_attempt.pop(attempt_id, None)

    def _on_cancel(self, msg: Received) -> None:
        self.cancels_heard += 1
        task = self._by_attempt.pop(_attempt_key(msg.data), None)
        if task is not None and task.cancel():
            self.cancelled += 1

    async def handle(self, msg: Received) -> None:
        """Answer one ProviderRequest, once, whatever happens on the way: a bug (here or in the
        provider's answer) is logged and answered server_error, never left to the deadline.
        A request past its deadline is dropped unanswered: nobody waits for it."""
        started = time.perf_counter()
        reply: ProviderReply
        headers = msg.headers
        try:
            # What the attempt's deadline leaves, at most this worker's own timeout_s.
            left_s = Deadline.left_in_header(headers.get(DEADLINE_MS)) if headers else None
            timeout_s = self.timeout_s
            if left_s is not None and left_s < timeout_s:
                timeout_s = left_s
            if timeout_s <= 0:
                self._drop_expired(timeout_s)
                return  # the dispatcher has already moved on; calling now would only cost money
            try:
                request = provider_request_decoder.decode(msg.data)
            except (msgspec.DecodeError, RecursionError) as exc:
                reply = ProviderFailure(
                    "bad_request", f"worker {self.name}: invalid ProviderRequest: {exc}"[:1000]
                )
            else:
                answered = await self._call(request, timeout_s, headers, msg.reply)
                if answered is None:  # at its deadline already: the provider ran on past it
                    self.tally.busy_ms += (time.perf_counter() - started) * 1000
                    return
                reply = answered
        except Exception:
            log.exception("worker %s: bug while answering a request", self.name)
            reply = ProviderFailure(
                "server_error", f"worker {self.name} failed while answering (a bug: see its log)"
            )
        latency_ms = (time.perf_counter() - started) * 1000
        self.tally.busy_ms += latency_ms
        if msg.reply:
            try:
                reply = msgspec.structs.replace(reply, latency_ms=latency_ms)
                # An answer that encodes and fits is encoded here (a call of _payload is about
                # 1,100 instructions); a failure, or an answer that cannot be encoded or is
                # too large, goes through _payload, which counts and replaces it.
                payload = None
                if type(reply) is ProviderOk:
                    try:
                        payload = encoder.encode(reply)
                    except (TypeError, ValueError, OverflowError):
                        payload = None
                if payload is None or len(payload) > self.nc._max_payload:
                    payload = self._payload(reply)
            except Exception:  # still one reply, and at once: the dispatcher would wait it out
                log.exception("worker %s: bug while encoding a reply", self.name)
                payload = self._bug_payload(latency_ms)
            try:  # sent at once when the fast path takes it: no coroutine of its own
                # It fits max_payload (above): the fast path's publish itself, without
                # publish_now's size check and its two calls (about 1,700 instructions).
                path = self._path or fast_path(self.nc)
                if not path.publish(msg.reply, payload, "", None, None, True):
                    await publish_later(self.nc, msg.reply, payload, self._what)
            except Exception:  # a second try might send it twice
                log.exception("worker %s: bug while sending a reply", self.name)

    async def _send(self, subject: str, reply: ProviderReply) -> None:
        """Publish a reply (see `_payload`) through nats-py."""
        await publish_checked(self.nc, subject, self._payload(reply), self._what, urgent=True)

    def _payload(self, reply: ProviderReply) -> bytes:
        """A reply encoded to fit the server's max_payload (a provider's already scrubbed of
        this worker's credentials by `_call`); failures counted."""
        if isinstance(reply, ProviderFailure):
            self.tally.errors += 1
            self.tally.last_error = reply.kind
        try:
            payload = encoder.encode(reply)
        except (TypeError, ValueError, OverflowError) as exc:  # UnicodeEncodeError included
            # What the provider gave cannot be written as JSON (a lone surrogate in a text, a
            # value of a type msgspec does not know): the call failed, say so now.
            log.error("worker %s: its answer cannot be encoded: %r", self.name, exc)
            self.tally.errors += 1
            self.tally.last_error = "server_error"
            reply = ProviderFailure(
                "server_error",
                f"worker {self.name}'s answer cannot be encoded as JSON ({type(exc).__name__}): "
                "a text with a lone surrogate, or a value of an unknown type",
                latency_ms=reply.latency_ms,
            )
            payload = encoder.encode(reply)
        if len(payload) > self.nc.max_payload:
            self.tally.errors += 1
            self.tally.last_error = "response_too_large"
            reply = ProviderFailure(
                "response_too_large",
                f"{self.name}'s answer makes a reply of {len(payload)} bytes, above the NATS "
                "server's max_payload "
                f"of {self.nc.max_payload}; ask for fewer max_tokens, or raise max_payload in "
                "nats-server's config",
                latency_ms=reply.latency_ms,
            )
            payload = encoder.encode(reply)
        return payload

    def _bug_payload(self, latency_ms: float) -> bytes:
        """The reply to send when the one made could not be encoded (a bug)."""
        self.tally.errors += 1
        self.tally.last_error = "server_error"
        failure = ProviderFailure(
            "server_error",
            f"worker {self.name} failed while encoding its reply (a bug: see its log)",
            latency_ms=latency_ms,
        )
        return encoder.encode(failure)

    def _drop_expired(self, left_s: float) -> None:
        """Count a request that came past its deadline. Now and then one comes a little late
        (a dispatcher's timer fired while it was on its way); one more than a second late
        means this worker falls far behind, or its clock runs ahead of the dispatchers' (the
        deadline travels as wall-clock time), and then it drops everything: say so, once a
        minute at most."""
        self.expired += 1
        if left_s > -_EXPIRED_WARN_AFTER_S:
            return
        self._expired_since_warning += 1
        now = time.monotonic()
        if self._expired_warned_at is not None and now - self._expired_warned_at < 60:
            return
        log.warning(
            "worker %s: dropped %d request(s) that arrived over %g s past their deadline (the "
            "last %.1f s past, by this machine's clock); the worker is falling behind, or its "
            "clock runs ahead of the dispatchers' (check NTP): their requests time out instead",
            self.name,
            self._expired_since_warning,
            _EXPIRED_WARN_AFTER_S,
            -left_s,
        )
        self._expired_warned_at, self._expired_since_warning = now, 0

    def _timed_out(self, timeout_s: float) -> ProviderFailure:
        """A call that ran out of `timeout_s`, said as the dispatcher's own timer says it."""
        return ProviderFailure("timeout", timeout_message(self.name, timeout_s, self.timeout_s))

    def _stopped(self) -> ProviderFailure:
        """A call cut short by this worker's shutdown: its dispatcher moves on at once."""
        return ProviderFailure(
            "no_responders",
            f"worker {self.name} stopped (its shutdown grace ran out) before the provider "
            "answered; the call was cancelled",
        )

    async def _call(
        self,
        request: ProviderRequest,
        timeout_s: float,
        headers: dict[str, str] | None,
        reply_to: str | None = None,
    ) -> ProviderReply | None:
        """The call's reply; None when it was settled as it was cut short (`_Expiry.settle`):
        sent then (its deadline's timeout, a shutdown's no_responders) or never (cancelled)."""
        # Clipped as every name on a span: a request sent straight to this subject may name a
        # model as long as max_payload, twice on its span and kept among the templates.
        model = (request.model or self.provider.model)[:MAX_NAME_LENGTH]
        template = self._span_templates.get(model)
        if template is None:  # a request may name any model: the cache is bounded
            template = f"chat {model}", telemetry.provider_attributes(self.name, self.kind, model)
            if len(self._span_templates) < _SPAN_ATTRIBUTES_MAX:
                self._span_templates[model] = template
        name, attributes = template
        span = self.spans.start_remote(name, _CLIENT, attributes, headers)
        # The provider gets the time left before the dispatcher's deadline, and no more: a
        # call nobody waits for is cancelled, not left running (and billing).
        expiry = _Expiry(timeout_s, self, reply_to)
        # The span is current during the call, so providers' HTTP requests carry its traceparent.
        token = span.make_current()
        stream_to = headers.get(STREAM_TO) if headers else None
        try:
            reply: ProviderReply
            if stream_to and hasattr(self.provider, "stream"):
                reply = await self._stream(request, timeout_s, stream_to, expiry)
            else:
                reply = await self.provider.complete(request, timeout_s)
            # expiry.task_cancelled(), inline on the path of every answer (a method call less).
            if expiry._task.cancelling() > expiry._cancelling:
                # The provider swallowed the cancel (a library catching BaseException, a
                # retry loop): its answer is as late as if it had not, and goes as the cancel
                # says (none, a timeout), never as an answer past its deadline.
                self._dropped(expiry)
                raise asyncio.CancelledError
        except ProviderError as exc:
            if expiry.task_cancelled():  # raised after a cancel it caught: the cancel decides
                self._dropped(expiry)
                expiry.settle(None)  # a dispatcher's cancel: nobody waits (else settled then)
            reply = _failure(exc, self.name, self._odd_kinds)
        # Anything else, Python's TimeoutError included: `timeout` is this call's deadline (the
        # CancelledError below), or a provider's ProviderError; its own TimeoutError is no
        # more than any other exception of its own.
        except Exception as exc:
            log.exception("provider %s raised unexpectedly", self.name)
            reply = ProviderFailure(
                "server_error", f"worker {self.name} failed: {type(exc).__name__}"
            )
        except asyncio.CancelledError:
            if not expiry.task_cancelled():  # nobody cancelled this call: the provider's own
                log.exception("provider %s raised CancelledError of its own", self.name)
                reply = ProviderFailure(
                    "server_error", f"worker {self.name} failed: CancelledError of its own"
                )
            elif self._stopping and not expiry.was_ours():
                _uncancel()  # this worker is stopping: its reply went as stop() cancelled it
                reply = self._stopped()
            elif not expiry.was_ours():  # the dispatcher gave up on it: nobody gets a reply
                span.add_event("lifeline.cancelled", {})
                span.end()
                raise
            else:
                reply = self._timed_out(timeout_s)
        # SystemExit, KeyboardInterrupt, GeneratorExit, a class of the provider's own: raised
        # out of the task, they would stop the worker or end the call unanswered.
        except BaseException as exc:
            if not _raised_by_call(exc):
                raise
            log.error("provider %s raised %s", self.name, type(exc).__name__, exc_info=exc)
            reply = ProviderFailure(
                "server_error", f"worker {self.name} failed: {type(exc).__name__}"
            )
        finally:
            self._timeouts.cancel(expiry._timer)  # expiry.stop(), a method call less
            telemetry.detach(token)
        if isinstance(reply, ProviderFailure):  # before the span and the reply see it
            message = reply.message
            if self._scrub is not None:
                message = self._scrub(message)
            # Cut (once scrubbed: no key cut in two) to what the dispatcher keeps: a longer one
            # only risked the server's max_payload, its kind lost to response_too_large.
            message = message[:MAX_MESSAGE_CHARS]
            # A provider's error text may hold a lone surrogate (JSON lets one be escaped): as
            # UTF-8 it can be neither sent nor exported in a span (the exporter dropped the
            # batch, other requests' spans with it), and the failure's kind must still go.
            message = message.encode("utf-8", "replace").decode()
            reply = msgspec.structs.replace(reply, message=message)
        elif self._scrub is not None:
            reply = self._scrub.answer(reply)
        if span.recording:
            telemetry.annotate_outcome(span, reply, self.error_text)
        span.end_soon()  # handed to the exporter after the reply goes
        return None if expiry.settled else reply

    def _dropped(self, expiry: _Expiry) -> None:
        """Say that a provider caught its call's cancel and went on, once per call: what it
        gave is dropped, its caller answered (or not) when the call was cut short."""
        since = ""
        if expiry.settled:
            since = f" for {self._timeouts.loop().time() - expiry.settled_at:.1f} s"
        log.warning(
            "worker %s: the provider caught its call's cancel (at its deadline, a cancel or "
            "a shutdown) and went on%s; what it gave is dropped. A provider must let a "
            "CancelledError end its call: meanwhile the call holds its place in flight",
            self.name,
            since,
        )

    def _send_now(self, subject: str, reply: ProviderReply) -> None:
        """A reply sent outside its call's task, which may run on (`_Expiry.settle`): through
        the fast path, else by nats-py in a task of its own (counted in flight)."""
        try:
            payload = self._payload(reply)
            if publish_now(self.nc, subject, payload, self._what, urgent=True) is None:
                task = asyncio.ensure_future(publish_later(self.nc, subject, payload, self._what))
                self._tasks[task] = None
                task.add_done_callback(self._finished)
        except Exception:  # in a timer's callback, or stop(): nothing above it would log it
            log.exception("worker %s: bug while sending a reply", self.name)

    async def _stream(
        self,
        request: ProviderRequest,
        timeout_s: float,
        stream_to: str,
        expiry: _Expiry,
    ) -> ProviderReply:
        """Publish the provider's text deltas to `stream_to` as they come; the end's
        ProviderOk says how many chunks went out.

        A stream whose pieces come without a wait in between (an async generator that never
        awaits) would make a chunk message of each, some 100,000 a second for its dispatcher
        to relay, every other request through it waiting meanwhile. So the first
        `_STREAM_BURST` pieces of such a run go out one by one, as they come, and the rest are
        held and go out together (`_merged`), as one chunk (up to max_bytes) per kind: text,
        or the pieces of one tool call that only add to its arguments. They go when the
        stream is about to wait (see `_Next`), before a piece of another kind or call, before
        the end, and when the event loop gets a turn (`_give_way`). A piece that comes after a
        wait goes out at once, as before."""
        if reply_subject_refused(stream_to, chunks=True) is not None:  # not Lifeline's own
            return await self.provider.complete(request, timeout_s)
        path, nc = fast_path(self.nc), self.nc
        max_bytes = nc.max_payload - _STREAM_HEADER_ROOM
        scrub = self._scrub
        chunks = 0
        # What this stream has queued since the event loop last had a turn, a piece's subject
        # and framing counted (held or not): a provider whose pieces come without a wait would
        # otherwise hold the loop until its stream ends, every other call and its deadline
        # with it, and queue all of its chunks in memory meanwhile.
        queued, framing = 0, len(stream_to) + _CHUNK_FRAMING
        run = 0  # pieces since the stream last waited
        rested = time.monotonic()  # when it last rested (or began): see _HOT_S
        # Pieces past the run's first _STREAM_BURST, not yet sent: text, or one tool call's
        # (each scrubbed and checked as it came); their bytes, a tool call's as sent alone.
        held: list[Any] = []
        held_bytes = 0
        unsent: list[tuple[bytes, dict[str, str] | None]] = []  # what the fast path refused

        def send_now() -> bool:
            """The held pieces out as chunks, through the fast path; False while some wait in
            `unsent` for nats-py's publish (`send`)."""
            nonlocal chunks, held_bytes
            if held:
                unsent.extend(_merged(held, scrub, max_bytes))
                held.clear()
                held_bytes = 0
            sent = 0
            for chunk, headers in unsent:
                if not path.publish(stream_to, chunk, headers=headers):
                    break
                sent += 1
            chunks += sent
            del unsent[:sent]
            return not unsent

        async def send() -> None:
            nonlocal chunks
            if not send_now():
                while unsent:
                    chunk, headers = unsent[0]
                    await nc.publish(stream_to, chunk, headers=headers)
                    del unsent[0]
                    chunks += 1

        def before_wait() -> None:  # called by _Next, synchronously: the stream waits next
            nonlocal run
            run = 0
            if held or unsent:
                send_now()  # what the fast path refuses goes once the stream's wait is over

        end: ProviderOk | None = None
        deltas = self.provider.stream(request, timeout_s)
        next_item = _Next(deltas.__aiter__(), before_wait)
        try:
            while True:
                try:
                    item = await next_item
                except StopAsyncIteration:
                    break
                if expiry.task_cancelled():  # it swallowed the cancel: nothing more goes out
                    self._dropped(expiry)
                    raise asyncio.CancelledError
                if unsent:
                    await send()
                if isinstance(item, str):
                    # Its size, checked as UTF-8 now (a lone surrogate fails here, as sent alone).
                    size = len(item) if item.isascii() else len(item.encode())
                    run += 1
                    if run > _STREAM_BURST:
                        if held and (
                            isinstance(held[0], ToolCallDelta) or held_bytes + size > max_bytes
                        ):
                            await send()
                        held.append(item)
                        held_bytes += size
                    else:
                        if scrub is not None:
                            item = scrub.delta(item)
                        for piece in pieces(item, max_bytes):
                            if not path.publish(stream_to, piece):
                                await nc.publish(stream_to, piece)
                            chunks += 1
                    queued += size + framing
                elif isinstance(item, ProviderOk):
                    end = item
                    break
                elif isinstance(item, ToolCallDelta):
                    if scrub is not None:
                        item = scrub.delta(item)
                    payload = encoder.encode(item)
                    size = len(payload)
                    if size > max_bytes:
                        raise ProviderError(
                            "response_too_large",
                            f"{self.name} streamed a tool-call piece of {size} bytes, above "
                            f"what a stream event may carry ({max_bytes})",
                        )
                    run += 1
                    if run > _STREAM_BURST:
                        if held and not (_adds_to(held, item) and held_bytes + size <= max_bytes):
                            await send()
                        held.append(item)
                        held_bytes += size
                    else:
                        if not path.publish(stream_to, payload, headers=_TOOL_CALL):
                            await nc.publish(stream_to, payload, headers=_TOOL_CALL)
                        chunks += 1
                    queued += size + framing
                else:
                    if held:
                        await send()  # what came before it goes first
                    if scrub is not None:
                        item = scrub.delta(item)
                    for piece in pieces(item, max_bytes):  # no text: fails, as it did
                        if not path.publish(stream_to, piece):
                            await nc.publish(stream_to, piece)
                        chunks += 1
                        queued += len(piece) + framing
                if queued > _STREAM_QUEUED_MAX:
                    queued = 0
                    if held:
                        await send()  # what came before the turn goes out in it
                    await _give_way(nc)
                    if time.monotonic() - rested > _HOT_S:
                        await asyncio.sleep(_REST_S)
                        rested = time.monotonic()
            if end is not None and (held or unsent):
                await send()  # before the end, which counts it
        finally:
            await deltas.aclose()
        if end is None:
            raise ProviderError(
                "connection", f"{self.name}'s stream ended without its end (no usage, no stop)"
            )
        return msgspec.structs.replace(end, chunks=chunks)


_SPAN_ATTRIBUTES_MAX = 256
# Read once: on Python 3.11 reading a member off an Enum class goes through its metaclass's
# __getattr__, some 1,500 instructions a call.
_CLIENT = SpanKind.CLIENT
_ODD_KINDS_SAID = 64  # error kinds that were no str, each said once: a worker's log says this many
_EXPIRED_WARN_AFTER_S = 1.0  # later than this past its deadline, a request is worth a warning
_REPLY_AFTER_CANCEL_S = 2.0  # for calls cut short at shutdown to end
# What the dispatcher adds to a chunk when it passes it on (transport.STREAM_HEADER_ROOM).
_STREAM_HEADER_ROOM = 1024
_TOOL_CALL = {EVENT: TOOL_CALL}
# A stream gives the event loop a turn after queueing this much (a piece costs its bytes and
# a chunk's framing, "PUB <subject> <size>\r\n...\r\n", whether it goes out alone or merged):
# about 120 one-character pieces on a dispatcher's inbox, about a millisecond of this worker's
# time at most (it publishes some 100,000 such chunks a second), so other calls' replies and
# deadlines wait no longer than that.
_STREAM_QUEUED_MAX = 8 * 1024
_CHUNK_FRAMING = 16
# Of a stream's pieces that come without a wait in between, this many go out one by one: a
# burst (a read that brought several events, the fake provider's `chunks`) streams as it did;
# past it, the rest of the run is held and goes out merged (see `_stream`), about a chunk per
# turn of the event loop instead of one per piece.
_STREAM_BURST = 64
# A stream that queues a turn's worth (_STREAM_QUEUED_MAX) this long after it last rested
# rests for _REST_S, a real wait of the event loop. Its turns (_give_way) run the loop's other
# work, but never block it (nor does a provider's own `await asyncio.sleep(0)`), and under
# uvloop a loop that never blocks starves the process's other threads of the GIL: a
# synchronous model's threads (workers/plugin.py) took up to seconds to start a call beside
# such a stream, and its calls timed out. A tenth of a hot stream's time at most; a stream
# over HTTP, whose turn's worth takes seconds to come, pauses a millisecond per 8 KiB.
_HOT_S = 0.01
_REST_S = 0.001


async def _give_way(nc: Client) -> None:
    """A turn of the event loop (other calls, the timers of deadlines, the fast path's write of
    what a stream queued), then a wait while the connection's socket is behind: what is
    queued stays about one `_STREAM_QUEUED_MAX` plus the socket's buffers, however fast a
    provider's pieces come."""
    await asyncio.sleep(0)
    transport = nc._transport  # nats-py's; its drain() waits out the socket's high-water mark
    if transport is not None:
        try:
            await transport.drain()
        except (OSError, RuntimeError):  # the connection is going: nats-py's reconnect buffers
            pass


def _adds_to(held: list[Any], piece: ToolCallDelta) -> bool:
    """Whether `piece` can go out in one chunk with the held pieces: they are pieces of its
    call, and it only adds to the arguments (an id or a name begins a chunk, as a call's
    first piece carries them)."""
    first = held[0]
    return (
        isinstance(first, ToolCallDelta)
        and first.index == piece.index
        and piece.id is None
        and piece.name is None
    )


def _merged(
    held: list[Any], scrub: Scrubber | None, max_bytes: int
) -> list[tuple[bytes, dict[str, str] | None]]:
    """Held pieces as the chunks that carry them: text joined, scrubbed together (a key split
    across its pieces is found) and cut to max_bytes; a tool call's pieces, each scrubbed as
    it came, as one: the first's index, id and name, and the arguments joined. That one is no
    bigger than the pieces sent alone, which `_stream` keeps within max_bytes together."""
    first = held[0]
    if isinstance(first, ToolCallDelta):
        if len(held) > 1:
            first = msgspec.structs.replace(first, arguments="".join(p.arguments for p in held))
        return [(encoder.encode(first), _TOOL_CALL)]
    text = "".join(held)
    if scrub is not None:
        text = scrub.delta(text)
    return [(chunk, None) for chunk in pieces(text, max_bytes)]


class _Next:
    """`await anext(stream)`, calling `before_wait()` when the stream is about to wait: its
    `__anext__` did not finish at once, and the task is about to suspend on what it awaits
    (a read, a timer, even `asyncio.sleep(0)`). Not called for an item that came at once.
    Whatever is thrown in while it waits (a cancel) is the stream's, as with `await`."""

    __slots__ = ("_before_wait", "_stream")

    def __init__(self, stream: AsyncIterator[Any], before_wait: Callable[[], None]) -> None:
        self._stream = stream
        self._before_wait = before_wait

    def __await__(self) -> Generator[Any, Any, Any]:
        step = self._stream.__anext__().__await__()
        try:
            awaited = step.send(None)
        except StopIteration as done:  # it came at once (StopAsyncIteration goes through)
            return done.value
        thrown: BaseException | None = None
        try:
            self._before_wait()
        except BaseException as exc:  # noqa: BLE001 - a bug: the stream gets it, at its wait
            thrown = exc
        while True:  # `yield from step`, which has already yielded `awaited`
            sent = None
            if thrown is None:
                try:
                    sent = yield awaited
                except GeneratorExit:
                    step.close()
                    raise
                except BaseException as exc:  # noqa: BLE001 - a cancel: the stream's to handle
                    thrown = exc
            try:
                if thrown is None:
                    awaited = step.send(sent)
                else:
                    exc, thrown = thrown, None
                    awaited = step.throw(exc)
            except StopIteration as done:
                return done.value


def _attempt_key(attempt_id: bytes) -> str:
    """An attempt id as a call is kept under and its cancel looks it up: cut alike (a cancel's
    body is bounded), else an id over 64 bytes is never found."""
    return attempt_id[:64].decode(errors="replace")


def _failure(exc: ProviderError, name: str, odd_kinds: set[str]) -> ProviderFailure:
    """A ProviderError as the reply, its message as text whatever the provider gave (a model's
    `ModelError("connection", exc)`, a number, None): no reply could carry anything else.
    Its kind, status_code and retry_after_s are made what the dispatcher decodes (a Retry-After
    passed on as the str it was read as is still a number of seconds), else left out: one
    field of the wrong type would make the whole reply undecodable, its kind lost with it.
    A kind that is no str is a server_error, said once per kind (`odd_kinds`, worker `name`)."""
    message = exc.message
    if type(message) is not str:
        message = _as_text(message)
    # A str subclass (a StrEnum of the model's own kinds) is its str; anything else is no kind.
    if isinstance(exc.kind, str):
        kind = str.__str__(exc.kind)
        if kind not in ERROR_KINDS:  # sent as is: the dispatcher's server_error names it
            _say_odd_kind(exc.kind, name, odd_kinds, "is no error kind")
    else:
        kind = "server_error"
        _say_odd_kind(exc.kind, name, odd_kinds)
    status = _number(exc.status_code, int)
    if status is not None and not 100 <= status <= 599:
        status = None
    after = _number(exc.retry_after_s, float)
    if after is not None:
        after = bounded_retry_after(after)
    return ProviderFailure(kind, message, status, after)


def _say_odd_kind(kind: object, name: str, said: set[str], why: str = "is no str") -> None:
    """Warn, once per kind (up to _ODD_KINDS_SAID of them), that a provider's error kind is no
    str (an int, a plain Enum, None) or no error kind (a typo): the model's author would not
    know why the dispatcher took its rate_limit for a server_error."""
    try:
        shown = repr(kind)[:100]
    # A __repr__ of the model's own that fails (SystemExit too: raised here, out of the call's
    # handler, it would stop the worker): its type says something.
    except BaseException:  # noqa: BLE001
        shown = f"({type(kind).__name__} that cannot be shown)"
    if shown in said or len(said) >= _ODD_KINDS_SAID:
        return
    said.add(shown)
    log.warning(
        "worker %s: its provider raised an error of kind %s (%s), whose kind %s: "
        "answered as server_error; a kind is one of %s (a str, or a StrEnum of them)",
        name,
        shown,
        type(kind).__name__,
        why,
        ", ".join(ERROR_KINDS),
    )


def _number(value: object, kind: type) -> Any:
    """`value` as an int or float ("429", 429.0 and "2" included), or None (True, "soon")."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return msgspec.convert(value, kind, strict=False)
    except (msgspec.ValidationError, TypeError):
        return None


def _as_text(value: object) -> str:
    if value is None:
        return "(no message)"
    try:
        return str(value)
    except Exception:  # noqa: BLE001 - a __str__ that fails: its type says something
        return f"({type(value).__name__} that cannot be shown)"


def _raised_by_call(exc: BaseException) -> bool:
    """Whether a BaseException out of a call (no CancelledError: those are sorted out before)
    is the provider's to answer for, as a server_error. Not so a KeyboardInterrupt while
    SIGINT's handler raises them (Python's own, asyncio.Runner's at a second Ctrl-C): this
    process's Ctrl-C lands in whatever the main thread runs, a call included. A worker serving
    handles SIGINT itself (it stops gently), so there every KeyboardInterrupt is the
    provider's; one from a model's thread is sorted out in that thread (workers/plugin.py).
    Nor a GeneratorExit outside any task: the call's coroutine is being closed."""
    if isinstance(exc, KeyboardInterrupt):
        handler = signal.getsignal(signal.SIGINT)
        runner = getattr(getattr(handler, "func", None), "__self__", None)
        return handler is not signal.default_int_handler and not isinstance(runner, asyncio.Runner)
    if isinstance(exc, GeneratorExit):
        return asyncio.current_task() is not None
    return True


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


class _Expiry:
    """Cancels the current task after `timeout_s`: asyncio.timeout's job with one entry of the
    worker's shared Timeouts and none of its bookkeeping, which was about a tenth of a
    worker's CPU per request (py-spy). `was_ours()` tells, on CancelledError, whether the
    cancel was this timer's alone.

    Whatever cuts the call short settles its reply then (`settle`): the timeout at its
    deadline, no_responders at a shutdown, nothing for a cancel (its dispatcher gave up). A
    provider that catches the CancelledError (a library catching BaseException, a retry loop)
    runs on, maybe for seconds, and its caller must not wait for it: what it gives is dropped.
    The call keeps its place in flight (max_in_flight) until it does end: it still holds what
    it holds, a model's thread, a connection, and a provider that does so at every deadline
    would otherwise gather calls without bound."""

    __slots__ = (
        "_cancelling",
        "_reply_to",
        "_runtime",
        "_task",
        "_timeout_s",
        "_timeouts",
        "_timer",
        "expired",
        "settled",
        "settled_at",
    )

    def __init__(self, timeout_s: float, runtime: WorkerRuntime, reply_to: str | None) -> None:
        timeouts = runtime._timeouts
        loop = timeouts.loop()
        task = asyncio.current_task(loop)
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self.expired = False
        self.settled = False
        self._timeouts = timeouts
        self._timeout_s = timeout_s
        self._runtime = runtime
        self._reply_to = reply_to
        self._timer = timeouts.call_later(timeout_s, _Expiry._expire, self, loop)

    def _expire(self) -> None:
        self.expired = True
        if self.task_cancelled():  # a dispatcher's cancel came first: nobody waits for it
            self.settle(None)  # (a shutdown's settled it)
        else:
            timed_out = self._runtime._timed_out(self._timeout_s)
            self.settle(msgspec.structs.replace(timed_out, latency_ms=self._timeout_s * 1000))
        self._task.cancel()

    def settle(self, reply: ProviderFailure | None) -> None:
        """Send `reply` now (None: none), once, for the call just cancelled, whose task may
        run on; its end then sends nothing (`_call` gives None)."""
        if self.settled:
            return
        self.settled = True
        self.settled_at = self._timeouts.loop().time()
        if reply is not None and self._reply_to:
            self._runtime._send_now(self._reply_to, reply)

    def was_ours(self) -> bool:
        return self.expired and self._task.uncancel() <= self._cancelling

    def task_cancelled(self) -> bool:
        """Whether anyone (this timer, a cancel message, a shutdown) cancelled the task since;
        a CancelledError without that came from inside the provider's call."""
        return self._task.cancelling() > self._cancelling

    def stop(self) -> None:
        self._timeouts.cancel(self._timer)
