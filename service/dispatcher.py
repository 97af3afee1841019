"""The dispatcher: where llm.complete is handled.

Each message gets its own asyncio task (a NATS callback that awaited the work would
serve one request at a time). For every message, whatever happens, the dispatcher sends
exactly one CompletionReply (when the message has a reply subject) and publishes exactly
one AuditEvent. The fallback decision itself lives in service/policy.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.nuid import NUID
from opentelemetry.trace import SpanKind, Status, StatusCode

from schemas import AuditEvent, CompletionReply, CompletionRequest, ErrorInfo, ProviderFailure, ProviderReply, ProviderRequest
from schemas import subjects
from schemas.wire import (
    INTERNAL,
    INVALID_REQUEST,
    PAYLOAD_TOO_LARGE,
    UNKNOWN_PROVIDER,
    UNKNOWN_ROUTE,
    encoder,
    request_decoder,
    salvage_id,
)
from service import telemetry
from service.config import Config
from service.policy import ChainResult, Target, run_chain
from service.transport import NatsTransport, ensure_subscribed

log = logging.getLogger("lifeline.dispatcher")

_EXAMPLE = '{"messages": [{"role": "user", "content": "Hello"}], "route": "default"}'


class Rejected(Exception):
    """A request refused before any provider is tried."""

    def __init__(self, error_type: str, message: str, request_id: str = "", route: str | None = None) -> None:
        super().__init__(message)
        self.error = ErrorInfo(error_type, message)
        self.request_id = request_id
        self.route = route


class Plan(msgspec.Struct, frozen=True):
    request: CompletionRequest
    request_id: str
    targets: list[Target]
    fallback_on: Collection[str | int] | None
    timeout_s: float


class Dispatcher:
    def __init__(self, nc: Client, config: Config, spans: telemetry.SpanRecorder) -> None:
        self.transport = NatsTransport(nc)
        self.config = config
        self.spans = spans
        self.targets = {
            name: Target(name, p.kind, p.model, p.timeout_s) for name, p in config.providers.items()
        }
        self.routes = {
            name: ([self.targets[t] for t in r.targets], frozenset(r.fallback_on) if r.fallback_on is not None else None)
            for name, r in config.routes.items()
        }
        # Per-provider span name and attributes, built once rather than per attempt.
        self._span_templates = {name: telemetry.attempt_span_template(t) for name, t in self.targets.items()}
        self._ids = NUID()  # unique ids for requests that bring none, cheaper than uuid4
        self._tasks: set[asyncio.Task[None]] = set()
        self._sub = None

    async def start(self) -> None:
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
            plan = self.plan(msg.data)
            route = plan.request.route if plan.request.targets is None else None
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

    def plan(self, data: bytes) -> Plan:
        """Validate a raw request and resolve its targets; raises Rejected."""
        limits = self.config.dispatcher
        if len(data) > limits.max_request_bytes:
            raise Rejected(
                PAYLOAD_TOO_LARGE,
                f"request is {len(data)} bytes; this dispatcher accepts at most {limits.max_request_bytes} "
                "(dispatcher.max_request_bytes in the config)",
            )
        try:
            request = request_decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise Rejected(INVALID_REQUEST, f"invalid request: {exc}. Expected JSON like {_EXAMPLE}", salvage_id(data)) from None
        request_id = request.id or self._ids.next().decode()
        timeout_s = request.timeout_s or limits.default_timeout_s
        if timeout_s > limits.max_timeout_s:
            raise Rejected(
                INVALID_REQUEST,
                f"timeout_s {timeout_s:g} is above this dispatcher's maximum of {limits.max_timeout_s:g}",
                request_id, request.route,
            )  # fmt: skip
        targets, fallback_on = self._resolve(request, request_id)
        return Plan(request, request_id, targets, fallback_on, timeout_s)

    def _resolve(self, request: CompletionRequest, request_id: str) -> tuple[list[Target], Collection[str | int] | None]:
        if request.targets is not None:
            unknown = [t for t in request.targets if t not in self.targets]
            if unknown or not request.targets:
                raise Rejected(
                    UNKNOWN_PROVIDER,
                    f"unknown provider(s) {unknown} in targets; configured: {sorted(self.targets)}",
                    request_id,
                )
            return [self.targets[t] for t in request.targets], None
        route = self.routes.get(request.route)
        if route is None:
            raise Rejected(
                UNKNOWN_ROUTE,
                f"unknown route {request.route!r}; configured routes: {sorted(self.routes)}",
                request_id, request.route,
            )  # fmt: skip
        return route

    async def _run(self, plan: Plan, span: telemetry.LiteSpan) -> ChainResult:
        request = plan.request
        payload = encoder.encode(
            ProviderRequest(
                id=plan.request_id,
                messages=request.messages,
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                metadata=request.metadata,
            )
        )
        async def call(target: Target, timeout_s: float):
            return await self._attempt(target, payload, plan.request_id, timeout_s, span)

        def on_fallback(failed: Target, successor: Target, failure: ProviderFailure) -> None:
            span.add_event(
                "lifeline.fallback",
                {
                    "lifeline.fallback.from": failed.provider,
                    "lifeline.fallback.to": successor.provider,
                    "lifeline.fallback.reason": failure.kind,
                    "lifeline.fallback.status_code": failure.status_code or 0,
                },
            )

        return await run_chain(
            plan.targets, call, deadline=time.monotonic() + plan.timeout_s, fallback_on=plan.fallback_on,
            on_fallback=on_fallback,
        )

    async def _attempt(
        self, target: Target, payload: bytes, request_id: str, timeout_s: float, parent: telemetry.LiteSpan
    ) -> ProviderReply:
        # run_chain already bounds timeout_s by what is left of the request's own deadline.
        attempt_deadline_ms = int((time.time() + timeout_s) * 1000)
        name, attributes = self._span_templates[target.provider]
        span = self.spans.start(name, SpanKind.CLIENT, attributes, parent)
        headers = {subjects.DEADLINE_MS: str(attempt_deadline_ms), subjects.REQUEST_ID: request_id}
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
            )
        )


def _reply(request_id: str, result: ChainResult, trace_id: str | None) -> CompletionReply:
    if result.answer is None or result.target is None:
        return CompletionReply(request_id, "error", attempts=result.attempts, trace_id=trace_id, error=result.error)
    return CompletionReply(
        request_id,
        "ok",
        content=result.answer.content,
        provider=result.target.provider,
        model=result.answer.model or result.target.model,
        attempts=result.attempts,
        usage=result.answer.usage,
        trace_id=trace_id,
    )


def _annotate(span: telemetry.LiteSpan, reply: CompletionReply, route: str | None) -> None:
    if not span.is_recording():
        return
    telemetry.annotate_request(span, reply, route)
    if reply.error is not None:
        span.set_status(Status(StatusCode.ERROR, reply.error.message))
