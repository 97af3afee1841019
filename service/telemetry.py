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
from schemas.subjects import TRACEPARENT

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
    """The caller's trace context from NATS headers, if it sent one."""
    if not headers or TRACEPARENT not in headers:
        return None
    return _propagator.extract(headers)


def inject(headers: dict[str, str], span: trace.Span) -> None:
    _propagator.inject(headers, context=trace.set_span_in_context(span))


def trace_id_of(span: trace.Span) -> str | None:
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def annotate_request(span: trace.Span, reply, route: str | None) -> None:
    """GenAI semantic-convention attributes on the dispatcher's request span."""
    span.set_attribute("gen_ai.operation.name", "chat")
    span.set_attribute("lifeline.request.id", reply.id)
    span.set_attribute("lifeline.attempts", len(reply.attempts))
    if route is not None:
        span.set_attribute("lifeline.route", route)
    if reply.provider is not None:
        span.set_attribute("lifeline.provider", reply.provider)
        span.set_attribute("gen_ai.response.model", reply.model or "")
    if reply.usage is not None:
        span.set_attribute("gen_ai.usage.input_tokens", reply.usage.input_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", reply.usage.output_tokens)
    if reply.error is not None:
        span.set_attribute("error.type", reply.error.type)


def annotate_attempt(span: trace.Span, provider: str, kind: str, model: str, reply) -> None:
    """Attributes of one attempt span (dispatcher) or provider call span (worker)."""
    span.set_attribute("gen_ai.operation.name", "chat")
    span.set_attribute("gen_ai.provider.name", GEN_AI_PROVIDER.get(kind, kind))
    span.set_attribute("gen_ai.request.model", model)
    span.set_attribute("lifeline.provider", provider)
    if isinstance(reply, ProviderOk):
        span.set_attribute("gen_ai.response.model", reply.model)
        span.set_attribute("gen_ai.usage.input_tokens", reply.usage.input_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", reply.usage.output_tokens)
        return
    span.set_attribute("error.type", reply.kind)
    if reply.status_code is not None:
        span.set_attribute("http.response.status_code", reply.status_code)
    span.set_status(trace.Status(trace.StatusCode.ERROR, reply.message))
