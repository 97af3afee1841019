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
from schemas.wire import INTERNAL, PREVIOUS_ERRORS, encoder, salvage_id
from service import telemetry
from service.config import Config
from service.faults import simulate
from service.health import Health
from service.policy import ChainResult, Target, run_chain
from service.routing import Plan, Rejected, Router
from service.shaping import shape
from service.shared_health import SharedHealth
from service.transport import NatsTransport, ensure_subscribed

log = logging.getLogger("lifeline.dispatcher")


class Dispatcher:
    def __init__(self, nc: Client, config: Config, spans: telemetry.SpanRecorder) -> None:
        self.transport = NatsTransport(nc)
        self.config = config
        self.router = Router(config)
        self.spans = spans
        # Circuit breakers and recent figures; shared with the other replicas through JetStream KV.
        self.health: Health = SharedHealth(nc, config.dispatcher.health_bucket) if config.dispatcher.shared_health else Health()
        # Span name and attributes per (provider, model, target), built once rather than per attempt.
        self._span_templates: dict[tuple[str, str, str], tuple[str, dict[str, str]]] = {}
        self._attempt_ids = NUID()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sub = None

    async def start(self) -> None:
        if isinstance(self.health, SharedHealth):
            await self.health.start()
        self._sub = await self.transport.nc.subscribe(
            subjects.COMPLETE, queue=subjects.DISPATCHER_QUEUE, cb=self._on_msg, pending_msgs_limit=-1
        )
        await ensure_subscribed(self.transport.nc)

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop taking requests, then let the ones in flight finish (up to grace_s)."""
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        if isinstance(self.health, SharedHealth):
            await self.health.stop()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def _on_msg(self, msg: Msg) -> None:
        task = asyncio.create_task(self.handle(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def handle(self, msg: Msg) -> None:
        started = time.perf_counter()
        span = self.spans.start("chat", SpanKind.SERVER, {}, telemetry.extract(msg.headers))
        trace_id = telemetry.trace_id_of(span)
        route: str | None = None
        try:
            plan = self.router.plan(msg.data)
            route = plan.route
            result = await self._run(plan, span)
            reply = _reply(plan.request_id, result, trace_id)
        except Rejected as exc:
            route = exc.route
            reply = CompletionReply(exc.request_id, "error", trace_id=trace_id, error=exc.error)
        except Exception:
            log.exception("bug while handling a request; answering with an internal error")
            reply = CompletionReply(
                salvage_id(msg.data), "error", trace_id=trace_id,
                error=ErrorInfo(INTERNAL, "Lifeline failed unexpectedly; the dispatcher log has the traceback"),
            )  # fmt: skip
        reply = msgspec.structs.replace(reply, latency_ms=(time.perf_counter() - started) * 1000)
        try:
            await self._finish(msg, reply, route, len(msg.data))
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
        payloads: dict[str, bytes] = {}  # per target label: retries and plain targets reuse one encoding
        calls: dict[str, int] | None = {} if plan.faults is not None else None  # per target label, for faults

        async def call(target: Target, timeout_s: float, previous_errors: tuple[str, ...]) -> ProviderReply:
            if plan.faults is not None and calls is not None:
                n = calls[target.label] = calls.get(target.label, 0) + 1
                faults = plan.faults.get(target.label) or plan.faults.get(target.provider) or ()
                if n <= len(faults):
                    simulated = await simulate(faults[n - 1], target.label, timeout_s)
                    if simulated is not None:
                        return simulated
            if target.pass_failures:
                payload = encoder.encode(_shaped(base, target, previous_errors))
            else:
                payload = payloads.get(target.label) or payloads.setdefault(
                    target.label, encoder.encode(_shaped(base, target, None))
                )
            return await self._attempt(target, payload, plan.request_id, timeout_s, span)

        on_event = span.add_event if span.is_recording() else None
        return await run_chain(
            plan.chain, call, plan.limits, needs=plan.needs, validate=plan.validate, on_event=on_event, health=self.health
        )

    async def _attempt(
        self, target: Target, payload: bytes, request_id: str, timeout_s: float, parent: telemetry.LiteSpan
    ) -> ProviderReply:
        # run_chain already bounds timeout_s by what is left of the request's own deadline.
        attempt_deadline_ms = int((time.time() + timeout_s) * 1000)
        key = (target.provider, target.model, target.label)
        template = self._span_templates.get(key) or self._span_templates.setdefault(
            key, telemetry.attempt_span_template(target)
        )
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

    async def _finish(self, msg: Msg, reply: CompletionReply, route: str | None, request_bytes: int) -> None:
        if msg.reply:
            await self.transport.answer(msg.reply, reply)
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


def _shaped(base: ProviderRequest, target: Target, previous_errors: tuple[str, ...] | None) -> ProviderRequest:
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
        return CompletionReply(request_id, "error", attempts=result.attempts, trace_id=trace_id, error=result.error)
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
