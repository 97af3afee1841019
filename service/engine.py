"""The engine: one request, from its bytes to exactly one reply and exactly one audit event.

Front ends take requests off NATS and hand them here: service/dispatcher.py serves core
request/reply on llm.complete and llm.stream; a JetStream jobs front end would sit beside it
and differ only in how it delivers the reply (`Respond`, or for a stream a `Sink`, whose
calls go through service/streaming.py's Relay). The engine knows no NATS message:

    plan      service/routing.py turns the bytes into a Plan (route, Targets, Deadline,
              limits), or a Rejected that is answered as an error
    chain     service/policy.py walks the plan's chain; each call goes through `Transport`
              (service/transport.py) to a provider worker, and, for a request with `faults`,
              through service/faults.py first
    reply     the first good answer, or the error, with every attempt; handed to `Respond`
    audit     what was delivered, published through `Transport`

Nothing escapes `serve`: a bug becomes an `internal_error` reply (and a log line with the
traceback), so the one-reply-one-audit promise holds whatever the request holds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from functools import partial
from typing import Protocol

import msgspec
from opentelemetry.trace import SpanKind, Status, StatusCode

from schemas import (
    Attempt,
    AuditEvent,
    CompletionReply,
    ErrorInfo,
    ProviderOk,
    ProviderReply,
    ProviderRequest,
)
from schemas.deadline import Deadline
from schemas.ids import SecretIds
from schemas.subjects import ATTEMPT_ID, DEADLINE_MS, REQUEST_ID
from schemas.wire import (
    INTERNAL,
    PAYLOAD_TOO_LARGE,
    PREVIOUS_ERRORS,
    ToolCall,
    encoder,
    salvage_id,
)
from service import telemetry
from service.config import Config
from service.faults import injecting
from service.health import Health, Untouched
from service.policy import CallTarget, ChainResult, Started, Validate, run_chain
from service.routing import Plan, Rejected, Router
from service.shaping import shape
from service.streaming import Relay, Sink, Stream, StreamLimits
from service.target import Target

log = logging.getLogger("lifeline.dispatcher")

# A request can name its own target labels: the span cache must not grow with them.
_SPAN_TEMPLATES_MAX = 1024
# Span kinds read once: on Python 3.11 an enum member read off its class goes through
# EnumType.__getattr__ (about 1,700 instructions, counted, against a global's few dozen).
_SERVER = SpanKind.SERVER
_CLIENT = SpanKind.CLIENT
# Room kept for an attempt's headers (deadline, ids, traceparent, a client's tracestate) when
# checking that a request fits a worker's subject; the exact size is checked per attempt.
_HEADER_ROOM = 1024


class Transport(Protocol):
    """What the engine needs of NATS (service/transport.py is the real one)."""

    @property
    def max_payload(self) -> int: ...

    async def ask_provider(
        self,
        provider: str,
        payload: bytes,
        timeout_s: float,
        headers: dict[str, str],
        own_timeout_s: float | None = None,  # the target's, when timeout_s is the deadline's
    ) -> ProviderReply: ...

    async def audit(self, event: AuditEvent, msg_id: str | None = None) -> None: ...

    async def stream_provider(
        self,
        provider: str,
        payload: bytes,
        headers: dict[str, str],
        limits: StreamLimits,
        on_chunk: Callable[[bytes, bool], None],  # a chunk, and whether it is a tool call's
    ) -> Stream: ...


# Delivers the reply the front end's way; returns what was really delivered (a reply too
# large for NATS goes out as an error), which the audit event then reports.
Respond = Callable[[CompletionReply], Awaitable[CompletionReply]]


class DeliverAgain(Exception):
    """Raised by a `Respond` whose front end will get the request again because its reply
    could not be delivered (a job whose result could not be stored): nothing is audited now;
    the delivery that stores it audits what was stored."""


class NotKept(Exception):
    """Raised by a `Respond` whose reply reached its client but could not be kept (a job's last
    delivery, its results bucket unreachable): logged as a warning, and audited."""


class Inbound(msgspec.Struct, frozen=True):
    """A request as a front end received it."""

    data: bytes
    headers: Mapping[str, str] | None
    arrived: float  # time.monotonic() when it arrived: its deadline counts from here
    default_id: str = ""  # the request's id when its body has none (a job's Nats-Msg-Id)
    audit_id: str | None = None  # the audit event's Nats-Msg-Id: the audit stream keeps one


class Engine:
    def __init__(
        self, config: Config, transport: Transport, health: Health, spans: telemetry.SpanRecorder
    ) -> None:
        self.router = Router(config)
        self.transport = transport
        self.health = health  # circuit breakers and recent figures, shared by every request
        self.spans = spans
        # Span name and attributes per target, built once rather than per attempt.
        self._span_templates: dict[tuple[str, str, str], tuple[str, dict[str, str]]] = {}
        self._attempt_ids = SecretIds()  # what a cancel names: never guessable
        # Error messages in audit events and spans (audit.error_text): a provider's may quote
        # the prompt, so they stay out unless the config opts in.
        self.error_text = config.audit.error_text

    async def serve(
        self,
        inbound: Inbound,
        respond: Respond | None,
        refused: Rejected | None = None,
        sink: Sink | None = None,
        *,
        if_cancelled: Callable[[], ErrorInfo] | None = None,
        answered: CompletionReply | None = None,
        progress: list[Attempt] | None = None,
    ) -> CompletionReply:
        """Answer one request through `respond` (None: nobody to answer), or as a stream of
        events through `sink` (with both, the stream's end event carries what `respond`
        returned), and audit it; with `refused`, the front end already knows the answer is
        that refusal. Never raises, but for a cancel (its front end stopping, its client
        aborting) before the answer is known: with `if_cancelled` (a front end whose requests
        nobody delivers again) the request is then answered with the error it gives (why it
        was cancelled) and audited, its attempts cancelled at their workers; without it the
        cancel goes on up, unanswered. With `answered`, the front end has the answer already
        (a job answered on an earlier delivery whose result could not be stored): it is
        responded and audited as it is, without a provider call. With `progress`, the list
        the request's attempts are kept in as the chain goes (its heartbeats report them)."""
        # A request without headers (no trace context of its own) is told so without the call.
        parent = telemetry.remote_parent(inbound.headers) if inbound.headers else None
        span = self.spans.start("chat", _SERVER, {}, parent)
        trace_id = span.trace_hex
        route: str | None = None
        request_id: str | None = None  # the plan's: generated when the request has none
        # Filled as the chain goes: a cancel still reports them, and so do heartbeats.
        attempts: list[Attempt] = [] if progress is None else progress
        relay = Relay(sink, inbound.arrived) if sink is not None else None
        if relay is not None:
            respond = relay.end if respond is None else _kept_then_streamed(respond, relay)
        try:
            if refused is not None:
                raise refused
            plan = self.router.plan(inbound.data, inbound.arrived, inbound.default_id)
            route, request_id = plan.route, plan.request_id
            if relay is not None:
                on_event = span.add_event if span.recording else None
                relay.follow(plan.limits.on_midstream, plan.validate, on_event)
            # A reply's latency_ms is taken as the reply is made, not set in a copy of it made
            # afterwards (about 1,100 instructions); `answered` keeps its own: its call was then.
            if answered is not None:
                reply = answered
            else:
                result = await self._complete(plan, span, relay, attempts)
                if relay is not None:  # a race's loser voided as it lost: its chunks, known now
                    counted = relay.counted(result.attempts)
                    if counted is not result.attempts:
                        result = msgspec.structs.replace(result, attempts=counted)
                latency_ms = (time.monotonic() - inbound.arrived) * 1000  # _ms_since, inline
                reply = _reply(plan.request_id, result, trace_id, latency_ms)
        except Rejected as exc:
            route = exc.route
            reply = CompletionReply(
                exc.request_id,
                "error",
                latency_ms=_ms_since(inbound.arrived),
                trace_id=trace_id,
                error=exc.error,
            )
        except Exception:
            log.exception("bug while handling a request; answering with an internal error")
            reply = _internal_error(request_id, inbound.data, trace_id, _ms_since(inbound.arrived))
        except asyncio.CancelledError as exc:
            if if_cancelled is None:  # not answered here: its next delivery answers it
                if span.recording:
                    telemetry.annotate_cancelled(span, exc)
                    if request_id is not None:
                        span.set_attribute("lifeline.request.id", request_id)
                span.end()
                raise
            _uncancel()  # answered here: what follows (the reply, the audit) must still run
            error = if_cancelled()
            if relay is not None:
                attempts = relay.counted(attempts)
            reply = CompletionReply(
                salvage_id(inbound.data) if request_id is None else request_id,
                "error",
                attempts=_cut_short(attempts, error.type),
                latency_ms=_ms_since(inbound.arrived),
                trace_id=trace_id,
                error=error,
            )
        try:  # the last lines: nothing may escape a request unlogged, nor skip its audit
            if respond is not None:
                reply = await respond(reply)
        except DeliverAgain as again:
            log.warning("request %r waits: %s", reply.id, again)
            _annotate(span, reply, route, self.error_text)
            span.end()
            return reply
        except NotKept as lost:
            log.warning("request %r answered, but: %s", reply.id, lost)
        except Exception:
            log.exception("bug while answering request %r", reply.id)
        except asyncio.CancelledError:  # only while a publish waits on a reconnecting connection
            if if_cancelled is None:
                span.end()  # its attempts' spans ended: theirs must not lose their parent
                raise
            _uncancel()  # the audit event still goes out
        try:
            event = _audit_event(reply, route, len(inbound.data), self.error_text)
            await self.transport.audit(event, inbound.audit_id)
        except Exception:
            log.exception("bug while auditing request %r", reply.id)
        except asyncio.CancelledError:
            if if_cancelled is None:
                raise
            _uncancel()
        finally:
            _annotate(span, reply, route, self.error_text)
            span.end_soon()  # to the exporter with the turn's other spans, in one hand-off
        return reply

    async def audit_again(self, inbound: Inbound, reply: CompletionReply) -> None:
        """Publish the audit event of a request answered before, once more: a job delivered
        again after its result was stored, whose first delivery may have died before its
        event went out. The audit stream keeps one per `inbound.audit_id`."""
        try:
            route = self.router.plan(inbound.data, inbound.arrived, inbound.default_id).route
        except Rejected as exc:
            route = exc.route
        try:
            await self.transport.audit(
                _audit_event(reply, route, len(inbound.data), self.error_text),
                inbound.audit_id,
            )
        except Exception:
            log.exception("bug while auditing request %r again", reply.id)

    def _complete(
        self, plan: Plan, span: telemetry.LiteSpan, relay: Relay | None, attempts: list[Attempt]
    ) -> Coroutine[None, None, ChainResult]:
        """The walk of the plan's chain, to be awaited (a plain function returning run_chain's
        coroutine: a coroutine of its own cost about 700 instructions a request); raises
        Rejected for a request too large for the workers' subject."""
        request = _provider_request(plan)
        payloads = _Payloads(request, encoder.encode(request))
        self._check_fits(payloads.base, plan)

        checked: CallTarget
        if relay is None:  # a C-level partial: no closure made, no frame of its own per attempt
            checked = partial(self._attempt, payloads, plan.request_id, span, plan.validate)
        else:
            checked = self._streaming(plan, payloads, span, relay)
        health: Health | Untouched = self.health
        if plan.faults is not None:
            if relay is None:
                checked = injecting(checked, plan.faults)
            else:
                checked = injecting(checked, plan.faults, relay.cut, relay.number)
            health = Untouched(self.health)  # simulated outcomes are not the shared breakers'
        return run_chain(
            plan.chain,
            checked,
            plan.limits,
            needs=plan.needs,
            validate=None,  # checked in the attempt (a stream's in its Relay): its span says so
            on_event=span.add_event if span.recording else None,
            health=health,
            attempts=attempts,
            streamed=relay is not None,  # its race is to the first chunk: hedge = "p95" of those
        )

    def _streaming(
        self, plan: Plan, payloads: _Payloads, span: telemetry.LiteSpan, relay: Relay
    ) -> CallTarget:
        """The policy's call for a streamed request: each attempt numbered by `relay`, sent
        the text so far when it continues one that failed."""

        async def stream(
            target: Target, timeout_s: float, previous: tuple[str, ...]
        ) -> ProviderReply | Started:
            number = relay.number()
            payload: bytes | None = None
            if relay.continues(target.prefill):
                prefilled = encoder.encode(relay.with_text(payloads.request(target, previous)))
                if len(prefilled) + _HEADER_ROOM <= self.transport.max_payload:
                    relay.continuing(number)
                    payload = prefilled
                # else the text so far is too long to hand back: this target starts afresh
                # (the client gets a reset), as one that takes no prefill does
            if payload is None:
                payload = payloads.for_target(target, previous)
            return await self._stream_attempt(
                target, payload, plan.request_id, timeout_s, span, relay, number
            )

        return stream

    async def _attempt(
        self,
        payloads: _Payloads,
        request_id: str,
        parent: telemetry.LiteSpan,
        validate: Validate | None,
        target: Target,
        timeout_s: float,
        previous: tuple[str, ...],
    ) -> ProviderReply:
        """One call of a worker (the policy's `call`, its first four arguments bound per
        request), its answer checked against what the request required. The policy has
        already bounded timeout_s by the request's deadline; the attempt's own Deadline tells
        the worker when to give up."""
        # The request as encoded once, for a target that changes nothing of it (nearly every
        # one), read here: a call of for_target is about 400 instructions.
        if target.shaping is None and not target.pass_failures:
            payload = payloads.base
        else:
            payload = payloads.for_target(target, previous)
        span, headers = self._attempt_span(target, request_id, timeout_s, parent)
        try:
            reply = await self.transport.ask_provider(
                target.provider, payload, timeout_s, headers, target.timeout_s
            )
            if validate is not None and isinstance(reply, ProviderOk):
                reply = validate(reply)
            if span.recording:
                telemetry.annotate_outcome(span, reply, self.error_text)
            return reply
        except asyncio.CancelledError as exc:
            if span.recording:
                telemetry.annotate_cancelled(span, exc)
            raise
        finally:
            span.end_soon()  # handed to the exporter after the reply goes

    async def _stream_attempt(
        self,
        target: Target,
        payload: bytes,
        request_id: str,
        timeout_s: float,
        parent: telemetry.LiteSpan,
        relay: Relay,
        number: int,
    ) -> ProviderReply | Started:
        """One streaming call of a worker: its chunks go through `relay`; the attempt's span
        ends when its stream does, with its time to first token."""
        span, headers = self._attempt_span(target, request_id, timeout_s, parent)
        limits = StreamLimits(
            timeout_s, target.ttft_s, target.idle_s, relay.take_cut(), target.max_response_bytes
        )
        opened = time.monotonic()
        try:
            stream = await self.transport.stream_provider(
                target.provider, payload, headers, limits, relay.on_chunk(number)
            )
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError) and span.recording:
                telemetry.annotate_cancelled(span, exc)
            span.end()
            raise

        def finished(reply: ProviderReply | None, why: BaseException | None) -> None:
            if span.is_recording():
                if reply is not None:
                    telemetry.annotate_outcome(span, reply, self.error_text)
                else:  # its stream was cancelled (a rival won, the request stopped)
                    telemetry.annotate_cancelled(span, why)
                telemetry.annotate_stream(span, stream.chunks, stream.first_at, opened)
            span.end()

        return await relay.started(number, stream, finished)

    def _attempt_span(
        self, target: Target, request_id: str, timeout_s: float, parent: telemetry.LiteSpan
    ) -> tuple[telemetry.LiteSpan, dict[str, str]]:
        """An attempt's span, and the headers it goes to its worker with: its deadline, the
        request's and its own id, and its trace context."""
        # A target's template found here (a call of _span_template is about 400 instructions),
        # made there the first time.
        template = self._span_templates.get((target.provider, target.model, target.name))
        name, attributes = template if template is not None else self._span_template(target)
        span = self.spans.start(name, _CLIENT, attributes, parent)
        headers = {
            DEADLINE_MS: Deadline.header_after(timeout_s),
            REQUEST_ID: request_id,
            ATTEMPT_ID: self._attempt_ids.next(),
        }
        telemetry.inject(headers, span)
        return span, headers

    def _span_template(self, target: Target) -> tuple[str, dict[str, str]]:
        key = (target.provider, target.model, target.name)
        template = self._span_templates.get(key)
        if template is None:
            template = telemetry.attempt_span_template(target)
            if len(self._span_templates) < _SPAN_TEMPLATES_MAX:
                self._span_templates[key] = template
        return template

    def _check_fits(self, payload: bytes, plan: Plan) -> None:
        """Refuse a request that would not fit the workers' subject once headers are added."""
        size = len(payload) + _HEADER_ROOM + len(plan.request_id)
        max_payload = self.transport.max_payload
        if size > max_payload:
            raise Rejected(
                PAYLOAD_TOO_LARGE,
                f"request is {size} bytes as sent to a provider worker (with {_HEADER_ROOM} bytes "
                f"kept for headers), above the NATS server's max_payload of {max_payload}; "
                "shorten the messages, or raise max_payload in nats-server's config",
                plan.request_id,
                plan.route,
            )


class _Payloads(msgspec.Struct):
    """What each target is sent: the request encoded once (`base`), or once per shaped
    target, or, for a target with pass_failures, once per attempt (the failures so far change
    it). `_Payloads(request, encoder.encode(request))`: a msgspec Struct, made per request and
    built in C (a class with an `__init__` of its own cost about 1,000 instructions more)."""

    _request: ProviderRequest
    base: bytes
    # By the target itself: two in one chain may share a name (one provider twice, say, the
    # second with a larger max_tokens), never their shaping.
    _shaped: dict[int, bytes] = msgspec.field(default_factory=dict)

    def request(self, target: Target, previous: tuple[str, ...]) -> ProviderRequest:
        """What `target` is sent, not yet encoded."""
        if target.pass_failures:
            return _shaped(self._request, target, previous)
        return self._request if target.shaping is None else _shaped(self._request, target)

    def for_target(self, target: Target, previous: tuple[str, ...]) -> bytes:
        if target.pass_failures:
            return encoder.encode(_shaped(self._request, target, previous))
        if target.shaping is None:
            return self.base
        payload = self._shaped.get(id(target))
        if payload is None:
            payload = self._shaped[id(target)] = encoder.encode(_shaped(self._request, target))
        return payload


def _provider_request(plan: Plan) -> ProviderRequest:
    request = plan.request
    # Positional, in ProviderRequest's field order: msgspec matches keyword arguments one by
    # one (about 550 instructions each, counted), and this is made per request.
    # tests/test_audit_and_tracing.py checks every field against a keyword-built one.
    return ProviderRequest(
        plan.request_id,  # id
        request.messages,  # messages
        request.max_tokens,  # max_tokens
        request.temperature,  # temperature
        None,  # model: the worker's own
        request.metadata,  # metadata
        request.top_p,  # top_p
        request.response_format,  # response_format
        request.tools,  # tools
        request.tool_choice,  # tool_choice
        request.parallel_tool_calls,  # parallel_tool_calls
        request.stop,  # stop
        request.seed,  # seed
    )


def _shaped(
    base: ProviderRequest, target: Target, previous: tuple[str, ...] | None = None
) -> ProviderRequest:
    """`previous` (the failures so far) only for a target that opted in to pass_failures."""
    request = base if target.shaping is None else shape(base, target.shaping, previous or ())
    if previous is not None:
        metadata = {**request.metadata, PREVIOUS_ERRORS: list(previous)}
        request = msgspec.structs.replace(request, metadata=metadata)
    return request


def _kept_then_streamed(keep: Respond, relay: Relay) -> Respond:
    """A streamed job's answer: kept whole (with its stream's figures) by `keep`, then what
    was kept ends the stream."""

    async def both(reply: CompletionReply) -> CompletionReply:
        return await relay.end(await keep(msgspec.structs.replace(reply, stream=relay.stats())))

    return both


def _ms_since(arrived: float) -> float:
    """A reply's latency_ms: the time since its request `arrived` (time.monotonic())."""
    return (time.monotonic() - arrived) * 1000


def _reply(
    request_id: str, result: ChainResult, trace_id: str | None, latency_ms: float
) -> CompletionReply:
    target, answer = result.target, result.answer
    if answer is None or target is None:
        return CompletionReply(
            request_id,
            "error",
            attempts=result.attempts,
            latency_ms=latency_ms,
            trace_id=trace_id,
            error=result.error,
        )
    return CompletionReply(  # positional, in field order (see _provider_request)
        request_id,  # id
        "ok",  # status
        answer.content,  # content
        target.provider,  # provider
        answer.model or target.model,  # model
        result.attempts,  # attempts
        answer.usage,  # usage
        latency_ms,  # latency_ms
        trace_id,  # trace_id
        None,  # error
        target.name,  # target
        target.shaping.template_name if target.shaping is not None else None,  # template
        None,  # stream
        answer.tool_calls,  # tool_calls
        answer.finish_reason,  # finish_reason
    )


def _cut_short(attempts: list[Attempt], why: str) -> list[Attempt]:
    """A cancelled request's attempts: those the cancel cut short say why (`why`, the request's
    error type: aborted, shutting_down)."""
    return [
        msgspec.structs.replace(a, reason=why)
        if a.outcome == "cancelled" and a.reason is None
        else a
        for a in attempts
    ]


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


def _internal_error(
    request_id: str | None, data: bytes, trace_id: str | None, latency_ms: float
) -> CompletionReply:
    message = "Lifeline failed unexpectedly; the dispatcher log has the traceback"
    known = salvage_id(data) if request_id is None else request_id
    error = ErrorInfo(INTERNAL, message)
    return CompletionReply(known, "error", latency_ms=latency_ms, trace_id=trace_id, error=error)


def _audit_event(
    reply: CompletionReply, route: str | None, request_bytes: int, error_text: bool
) -> AuditEvent:
    """The request's audit event; its attempts' error messages only with `error_text`."""
    attempts = reply.attempts
    # A good first call carries no message: only a request with more attempts, or failed, can.
    if not error_text and (len(attempts) > 1 or reply.error is not None):
        attempts = [a if a.message is None else _without_message(a) for a in attempts]
    return AuditEvent(  # positional, in field order (see _provider_request)
        reply.id,  # id
        reply.status,  # status
        route,  # route
        reply.provider,  # provider
        reply.model,  # model
        attempts,  # attempts
        reply.latency_ms,  # latency_ms
        reply.trace_id,  # trace_id
        math.trunc(time.time() * 1000),  # ts_unix_ms (int(), cheaper: see TargetHealth._slot)
        reply.error.type if reply.error else None,  # error_type
        reply.usage,  # usage
        request_bytes,  # request_bytes
        reply.target,  # target
        reply.template,  # template
        reply.stream,  # stream
        reply.finish_reason,  # finish_reason
        _tools_called(reply.tool_calls) if reply.tool_calls else [],  # tools_called
    )


def _without_message(attempt: Attempt) -> Attempt:
    return msgspec.structs.replace(attempt, message=None)


# The audit event names the tools an answer calls, not as many as the provider wrote: 900
# made-up names of 1,000 characters made one event of 906 KB (the names are the answer's).
_MAX_TOOLS_CALLED = 64
_MAX_TOOL_NAME = 64


def _tools_called(calls: list[ToolCall]) -> list[str]:
    return [call.name[:_MAX_TOOL_NAME] for call in calls[:_MAX_TOOLS_CALLED]]


def _annotate(
    span: telemetry.LiteSpan, reply: CompletionReply, route: str | None, error_text: bool
) -> None:
    if not span.recording:
        return
    telemetry.annotate_request(span, reply, route)
    if reply.error is not None:  # its message may quote the request, or a provider's error
        span.set_status(Status(StatusCode.ERROR, reply.error.message if error_text else None))
