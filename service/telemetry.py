"""OpenTelemetry set-up and the trace-context plumbing over NATS headers.

Export follows the standard OTEL_* environment variables (OTLP over HTTP). With no
exporter configured, spans are sampled out: trace ids are still made and propagated, so
replies and audit events carry one, but nothing is recorded and the cost is a few µs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from schemas import ProviderOk
from schemas.subjects import TRACEPARENT, TRACESTATE

# gen_ai.provider.name values from the GenAI semantic conventions, by provider kind.
GEN_AI_PROVIDER = {
    "openai": "openai",
    "azure_openai": "azure.ai.openai",
    "anthropic": "anthropic",
    "fake": "lifeline.fake",
}

_propagator = TraceContextTextMapPropagator()


def exporter_configured(environ: Mapping[str, str] = os.environ) -> str | None:
    """"otlp", "console" or None, from the standard OTEL_* variables."""
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    chosen = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if chosen in ("none", "console"):
        return None if chosen == "none" else "console"
    if chosen == "otlp" or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return "otlp"
    return None


def tracer_provider_from_env(service_name: str, environ: Mapping[str, str] = os.environ) -> TracerProvider:
    resource = Resource.create({} if environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name})
    exporter = exporter_configured(environ)
    if exporter is None:
        return TracerProvider(resource=resource, sampler=ALWAYS_OFF)
    provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER, else parent-based always-on
    if exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def extract(headers: Mapping[str, str] | None) -> Context | None:
    """The caller's trace context from NATS headers, if it sent one.

    A plain `traceparent` is parsed here directly (the propagator's regex was ~5% of a
    worker's CPU); anything else, tracestate included, goes through the propagator.
    """
    if not headers:
        return None
    traceparent = headers.get(TRACEPARENT)
    if traceparent is None:
        return None
    parts = traceparent.split("-")
    if TRACESTATE in headers or len(parts) != 4 or parts[0] != "00" or len(parts[1]) != 32 or len(parts[2]) != 16:
        return _propagator.extract(headers)
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    parent = trace.SpanContext(trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(flags & 1))
    return trace.set_span_in_context(trace.NonRecordingSpan(parent))


def inject(headers: dict[str, str], span: trace.Span) -> None:
    """W3C trace context of `span` into NATS headers (formatted directly: this is per attempt)."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return
    headers[TRACEPARENT] = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
    if ctx.trace_state:
        headers[TRACESTATE] = ctx.trace_state.to_header()


def trace_id_of(span: trace.Span) -> str | None:
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def annotate_request(span: trace.Span, reply, route: str | None) -> None:
    """GenAI semantic-convention attributes on the dispatcher's request span."""
    attributes: dict[str, str | int] = {
        "gen_ai.operation.name": "chat",
        "lifeline.request.id": reply.id,
        "lifeline.attempts": len(reply.attempts),
    }
    if route is not None:
        attributes["lifeline.route"] = route
    if reply.provider is not None:
        attributes["lifeline.provider"] = reply.provider
        attributes["gen_ai.response.model"] = reply.model or ""
    if reply.usage is not None:
        attributes["gen_ai.usage.input_tokens"] = reply.usage.input_tokens
        attributes["gen_ai.usage.output_tokens"] = reply.usage.output_tokens
    if reply.error is not None:
        attributes["error.type"] = reply.error.type
    span.set_attributes(attributes)


def attempt_span_template(target) -> tuple[str, dict[str, str]]:
    """Name and fixed attributes of the span of an attempt on `target` (a policy.Target)."""
    return f"chat {target.model}", provider_attributes(target.provider, target.kind, target.model)


def provider_attributes(provider: str, kind: str, model: str) -> dict[str, str]:
    return {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": GEN_AI_PROVIDER.get(kind, kind),
        "gen_ai.request.model": model,
        "lifeline.provider": provider,
    }


def annotate_outcome(span: trace.Span, reply) -> None:
    """How an attempt (dispatcher) or a provider call (worker) ended."""
    if isinstance(reply, ProviderOk):
        span.set_attributes(
            {
                "gen_ai.response.model": reply.model,
                "gen_ai.usage.input_tokens": reply.usage.input_tokens,
                "gen_ai.usage.output_tokens": reply.usage.output_tokens,
            }
        )
        return
    attributes: dict[str, str | int] = {"error.type": reply.kind}
    if reply.status_code is not None:
        attributes["http.response.status_code"] = reply.status_code
    span.set_attributes(attributes)
    span.set_status(trace.Status(trace.StatusCode.ERROR, reply.message))
