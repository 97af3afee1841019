"""The dispatcher: where llm.complete is handled.

Each message gets its own asyncio task (a NATS callback that awaited the work would
serve one request at a time). For every message, whatever happens, the dispatcher sends
exactly one CompletionReply (when the message has a reply subject) and publishes exactly
one AuditEvent. A request becomes a plan in service/routing.py; the fallback decisions
are made in service/policy.py; what a target's request looks like is service/shaping.py.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.nuid import NUID
from opentelemetry.trace import SpanKind, Status, StatusCode

from schemas import AuditEvent, CompletionReply, ErrorInfo, ProviderReply, ProviderRequest, subjects
from schemas.wire import (
    INTERNAL,
    OVERLOADED,
    PAYLOAD_TOO_LARGE,
    PREVIOUS_ERRORS,
    REPLY_SUBJECT_REFUSED,
    encoder,
    salvage_id,
)
from service import telemetry
from service.config import Config
from service.faults import simulate
from service.health import Health, LocalStore, Untouched
from service.memory import release_memory_soon
from service.natsio import ensure_subscribed, stop_taking
from service.policy import ChainResult, Target, run_chain
from service.routing import Plan, Rejected, Router
from service.shaping import shape
from service.shared_health import BucketStore
from service.transport import NatsTransport

log = logging.getLogger("lifeline.dispatcher")

_TRIM_AFTER_PEAK = 256  # requests in flight at once that make a burst worth trimming memory after
_YIELD_EVERY = 32  # "overloaded" answers between two yields to the event loop
_SPAN_TEMPLATES_MAX = (
    1024  # a request can name its own target labels: the cache must not grow with them
)
# Room kept for an attempt's headers (deadline, ids, traceparent, a client's tracestate) when
# checking that a request fits a worker's subject; the exact size is checked per attempt.
_HEADER_ROOM = 1024


class Dispatcher:
    def __init__(self, nc: Client, config: Config, spans: telemetry.SpanRecorder) -> None:
        self.transport = NatsTransport(nc)
        self.config = config
        self.router = Router(config)
        self.spans = spans
        # Circuit breakers and recent figures; with shared_health, shared with the other replicas
        # through JetStream KV.
        self.health = Health(
            store=BucketStore(nc, config.dispatcher.health_bucket)
            if config.dispatcher.shared_health
            else LocalStore()
        )
        # Span name and attributes per (provider, model, target), built once rather than per attempt.
        self._span_templates: dict[tuple[str, str, str], tuple[str, dict[str, str]]] = {}
        self._attempt_ids = NUID()
        self._tasks: set[asyncio.Task[None]] = set()
        self.max_in_flight = config.dispatcher.max_in_flight
        self._latency_s = (
            1.0  # moving average of answered requests: the overloaded reply's retry_after_s
        )
        self._peak = 0  # most requests in flight since memory was last trimmed
        self._refused = 0  # requests answered "overloaded"
        self._sub = None

    async def start(self) -> None:
        await self.health.start()
        self._sub = await self.transport.nc.subscribe(
            subjects.COMPLETE,
            queue=subjects.DISPATCHER_QUEUE,
            cb=self._on_msg,
            pending_msgs_limit=-1,
        )
        await ensure_subscribed(self.transport.nc)

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop taking requests, answer those already received, then let the ones in flight
        finish (up to grace_s)."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await stop_taking(sub)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        await self.health.stop()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def _on_msg(self, msg: Msg) -> None:
        arrived = time.monotonic()
        if len(self._tasks) >= self.max_in_flight:
            # Answered here, without a task: shedding must cost less than the work it sheds.
            await self.handle(msg, arrived, self._overloaded(msg.data))
            # nats-py hands queued messages over without suspending: yield now and then, or a
            # backlog of refusals would starve the requests in flight of their replies (not
            # after each one: every yield lets nats-py's flusher make one small socket write).
            self._refused += 1
            if self._refused % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
            return
        task = asyncio.create_task(self.handle(msg, arrived))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._peak = max(self._peak, len(self._tasks) + 1)
        if not self._tasks and self._peak >= _TRIM_AFTER_PEAK:
            self._peak = 0
            release_memory_soon()  # a burst is over: hand its memory back to the system

    def _overloaded(self, data: bytes) -> Rejected:
        retry_after_s = round(min(max(self._latency_s, 0.05), 30.0), 2)
        return Rejected(
            OVERLOADED,
            f"this dispatcher is working on its maximum of {self.max_in_flight} requests "
            f"(dispatcher.max_in_flight); retry after {retry_after_s:g} s, or add dispatcher replicas",
            salvage_id(data),
            retry_after_s=retry_after_s,
        )

    async def handle(
        self, msg: Msg, arrived: float | None = None, refused: Rejected | None = None
    ) -> None:
        """Answer one llm.complete message: exactly one reply (if it has a reply subject that
        may be answered on) and exactly one audit event, whatever the message holds."""
        arrived = time.monotonic() if arrived is None else arrived
        route: str | None = None
        reply_to: str | None = msg.reply or None
        span = self.spans.start("chat", SpanKind.SERVER, {}, telemetry.extract(msg.headers))
        trace_id = telemetry.trace_id_of(span)
        try:
            if (
                reply_to is not None
                and (why := subjects.reply_subject_refused(reply_to)) is not None
            ):
                refused, reply_to = _refused_reply_subject(reply_to, why, msg.data), None
            if refused is not None:
                raise refused
            plan = self.router.plan(msg.data, arrived)
            route = plan.route
            result = await self._run(plan, span)
            reply = _reply(plan.request_id, result, trace_id)
            self._latency_s += (
                time.monotonic() - arrived - self._latency_s
            ) / 16  # a moving average
        except Rejected as exc:
            route = exc.route
            reply = CompletionReply(exc.request_id, "error", trace_id=trace_id, error=exc.error)
        except Exception:
            log.exception("bug while handling a request; answering with an internal error")
            reply = CompletionReply(
                salvage_id(msg.data),
                "error",
                trace_id=trace_id,
                error=ErrorInfo(
                    INTERNAL, "Lifeline failed unexpectedly; the dispatcher log has the traceback"
                ),
            )
        reply = msgspec.structs.replace(reply, latency_ms=(time.monotonic() - arrived) * 1000)
        try:
            reply = await self._finish(reply_to, reply, route, len(msg.data))
        except Exception:  # the last line: nothing may escape a request's task unlogged
            log.exception("bug while answering request %r", reply.id)
        finally:
            _annotate(span, reply, route)
            span.end()

    async def _run(self, plan: Plan, span: telemetry.LiteSpan) -> ChainResult:
        request = plan.request
        base = ProviderRequest(
            id=plan.request_id,
            messages=request.messages,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            metadata=request.metadata,
            top_p=request.top_p,
            response_format=request.response_format,
        )
        base_payload = encoder.encode(base)
        self._check_fits(base_payload, plan)
        payloads: dict[str, bytes] = {}  # per shaped target label: its retries reuse one encoding
        calls: dict[str, int] | None = (
            {} if plan.faults is not None else None
        )  # per target label, for faults

        async def call(
            target: Target, timeout_s: float, previous_errors: tuple[str, ...]
        ) -> ProviderReply:
            if plan.faults is not None and calls is not None:
                n = calls[target.label] = calls.get(target.label, 0) + 1
                faults = plan.faults.get(target.label) or plan.faults.get(target.provider) or ()
                if n <= len(faults):
                    simulated = await simulate(faults[n - 1], target.label, timeout_s)
                    if simulated is not None:
                        return simulated
            if target.pass_failures:
                payload = encoder.encode(_shaped(base, target, previous_errors))
            elif target.shaping is None:
                payload = base_payload
            else:
                payload = payloads.get(target.label) or payloads.setdefault(
                    target.label, encoder.encode(_shaped(base, target, None))
                )
            return await self._attempt(target, payload, plan.request_id, timeout_s, span)

        on_event = span.add_event if span.is_recording() else None
        # Simulated outcomes belong to the request that asked for them, not to the shared breakers.
        health = self.health if plan.faults is None else Untouched(self.health)
        return await run_chain(
            plan.chain,
            call,
            plan.limits,
            needs=plan.needs,
            validate=plan.validate,
            on_event=on_event,
            health=health,
        )

    async def _attempt(
        self,
        target: Target,
        payload: bytes,
        request_id: str,
        timeout_s: float,
        parent: telemetry.LiteSpan,
    ) -> ProviderReply:
        # run_chain already bounds timeout_s by what is left of the request's own deadline.
        attempt_deadline_ms = int((time.time() + timeout_s) * 1000)
        key = (target.provider, target.model, target.label)
        template = self._span_templates.get(key)
        if template is None:
            template = telemetry.attempt_span_template(target)
            if len(self._span_templates) < _SPAN_TEMPLATES_MAX:
                self._span_templates[key] = template
        span = self.spans.start(template[0], SpanKind.CLIENT, template[1], parent)
        headers = {
            subjects.DEADLINE_MS: str(attempt_deadline_ms),
            subjects.REQUEST_ID: request_id,
            subjects.ATTEMPT_ID: self._attempt_ids.next().decode(),
        }
        telemetry.inject(headers, span)
        try:
            reply = await self.transport.ask_provider(target.provider, payload, timeout_s, headers)
            if span.is_recording():
                telemetry.annotate_outcome(span, reply)
            return reply
        finally:
            span.end()

    def _check_fits(self, payload: bytes, plan: Plan) -> None:
        """Refuse a request that would not fit the workers' subject once headers are added."""
        size = len(payload) + _HEADER_ROOM + len(plan.request_id)
        if size > self.transport.max_payload:
            raise Rejected(
                PAYLOAD_TOO_LARGE,
                f"request is {size} bytes as sent to a provider worker (with {_HEADER_ROOM} bytes kept for headers), "
                f"above the NATS server's max_payload of {self.transport.max_payload}; shorten the messages, "
                "or raise max_payload in nats-server's config",
                plan.request_id,
                plan.route,
            )

    async def _finish(
        self, reply_to: str | None, reply: CompletionReply, route: str | None, request_bytes: int
    ) -> CompletionReply:
        if reply_to is not None:
            reply = await self.transport.answer(
                reply_to, reply
            )  # an error reply if the answer does not fit
        await self.transport.audit(
            AuditEvent(
                id=reply.id,
                status=reply.status,
                route=route,
                provider=reply.provider,
                model=reply.model,
                attempts=reply.attempts,
                latency_ms=reply.latency_ms,
                trace_id=reply.trace_id,
                ts_unix_ms=int(time.time() * 1000),
                error_type=reply.error.type if reply.error else None,
                usage=reply.usage,
                request_bytes=request_bytes,
                target=reply.target,
                template=reply.template,
            )
        )
        return reply


def _refused_reply_subject(reply_to: str, why: str, data: bytes) -> Rejected:
    return Rejected(
        REPLY_SUBJECT_REFUSED,
        f"reply subject {reply_to[:200]!r} refused: {why}; use an inbox (nc.request does) or a subject of your own",
        salvage_id(data),
    )


def _shaped(
    base: ProviderRequest, target: Target, previous_errors: tuple[str, ...] | None
) -> ProviderRequest:
    """`previous_errors` is None unless the target opted in to pass_failures."""
    if target.shaping is None:
        request = base
    else:
        request = shape(base, target.shaping, previous_errors or ())
    if previous_errors is not None:
        metadata = {**request.metadata, PREVIOUS_ERRORS: list(previous_errors)}
        request = msgspec.structs.replace(request, metadata=metadata)
    return request


def _reply(request_id: str, result: ChainResult, trace_id: str | None) -> CompletionReply:
    if result.answer is None or result.target is None:
        return CompletionReply(
            request_id, "error", attempts=result.attempts, trace_id=trace_id, error=result.error
        )
    target = result.target
    return CompletionReply(
        request_id,
        "ok",
        content=result.answer.content,
        provider=target.provider,
        model=result.answer.model or target.model,
        attempts=result.attempts,
        usage=result.answer.usage,
        trace_id=trace_id,
        target=target.label,
        template=target.shaping.template_name if target.shaping is not None else None,
    )


def _annotate(span: telemetry.LiteSpan, reply: CompletionReply, route: str | None) -> None:
    if not span.is_recording():
        return
    telemetry.annotate_request(span, reply, route)
    if reply.error is not None:
        span.set_status(Status(StatusCode.ERROR, reply.error.message))
