"""Tracing and metrics set up from the standard OTEL_* variables (issue 11): exporter lists,
OTLP protocols, refusals at start-up, the SDK's resource and sampler, and on_start for
Lifeline's own spans."""

from __future__ import annotations

import importlib.util
import os
import subprocess

import pytest
from helpers import ROOT, cli_env, run_lifeline, spawn_lifeline, wait_for_line
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind

from service.telemetry import (
    TelemetryConfigError,
    Tracing,
    exporter_classes,
    exporter_names,
    meter_provider_from_env,
    service_resource,
    tracer_provider_from_env,
)

GRPC_INSTALLED = importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is not None


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK reads the resource and sampler from os.environ: keep the shell's OTEL_* out."""
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def providers():
    """Collects providers built by a test and shuts them down (their batch threads) afterwards."""
    built: list = []
    yield built
    for provider in built:
        provider.shutdown()


def span_exporters(provider: Tracing) -> list[type]:
    return [
        type(p.span_exporter)
        for p in provider.processors._span_processors
        if isinstance(p, BatchSpanProcessor)
    ]


class Starts(SpanProcessor):
    """Remembers what on_start saw, and tags the span there as processors like baggage's do."""

    def __init__(self) -> None:
        self.started: list[tuple[str, int, int | None, trace.SpanContext | None, int]] = []

    def on_start(self, span, parent_context=None) -> None:  # type: ignore[no-untyped-def]
        parent = (
            trace.get_current_span(parent_context).get_span_context()
            if parent_context is not None
            else None
        )
        self.started.append(
            (
                span.name,
                span.context.span_id,
                span.parent and span.parent.span_id,
                parent,
                span.start_time,
            )
        )
        span.set_attribute("tagged.on_start", span.resource.attributes["service.name"])


# --- which exporters -------------------------------------------------------------------------


def test_an_exporter_list_gets_one_processor_and_exporter_per_entry(providers):
    provider = tracer_provider_from_env("lifeline", {"OTEL_TRACES_EXPORTER": "console, otlp"})
    providers.append(provider)
    assert span_exporters(provider) == [ConsoleSpanExporter, OTLPSpanExporter]
    span = provider.recorder("t").start("x", SpanKind.SERVER, {})
    assert span.is_recording()


def test_a_metrics_exporter_list_gets_one_reader_per_entry(providers):
    environ = {"OTEL_METRICS_EXPORTER": "otlp,console"}
    assert exporter_classes(environ, "METRICS") == [OTLPMetricExporter, ConsoleMetricExporter]
    meters = meter_provider_from_env("lifeline", {"OTEL_METRICS_EXPORTER": "otlp"})
    assert meters is not None
    providers.append(meters)
    assert meter_provider_from_env("lifeline", {"OTEL_METRICS_EXPORTER": "none"}) is None


@pytest.mark.parametrize(
    ("environ", "names"),
    [
        ({}, []),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"},
            ["otlp"],
        ),  # what docker-compose sets
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, ["otlp"]),
        (
            {
                "OTEL_TRACES_EXPORTER": "none",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
            },
            [],
        ),
        ({"OTEL_TRACES_EXPORTER": "console,none"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "CONSOLE,console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, []),
    ],
)
def test_exporter_names_follow_the_variables(environ, names):
    assert exporter_names(environ) == names


def test_an_endpoint_alone_exports_over_otlp_http():
    assert exporter_classes({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}) == [
        OTLPSpanExporter
    ]


@pytest.mark.parametrize("signal", ["TRACES", "METRICS"])
def test_an_unknown_exporter_is_refused_naming_the_variable_and_the_choices(signal):
    with pytest.raises(TelemetryConfigError) as refused:
        exporter_classes({f"OTEL_{signal}_EXPORTER": "console,jaeger"}, signal)
    message = str(refused.value)
    assert f"OTEL_{signal}_EXPORTER" in message and "'jaeger'" in message
    assert all(choice in message for choice in ("console", "otlp", "none"))


def test_an_unknown_exporter_stops_the_cli_at_start_up():
    done = run_lifeline(
        "dispatcher",
        "--config",
        str(ROOT / "lifeline.example.toml"),
        "--nats-url",
        "nats://127.0.0.1:1",
        env=cli_env(OTEL_TRACES_EXPORTER="console,jaeger"),
    )
    assert done.returncode == 2
    assert "OTEL_TRACES_EXPORTER" in done.stderr and "'jaeger'" in done.stderr
    assert "Traceback" not in done.stderr


# --- OTLP protocol ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variable", ["OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"]
)
def test_grpc_works_if_installed_and_is_refused_with_the_fix_if_not(variable):
    environ = {"OTEL_TRACES_EXPORTER": "otlp", variable: "grpc"}
    if GRPC_INSTALLED:
        [exporter] = exporter_classes(environ)
        assert "grpc" in exporter.__module__
        return
    with pytest.raises(TelemetryConfigError) as refused:
        exporter_classes(environ)
    message = str(refused.value)
    assert f"{variable}=grpc" in message
    assert (
        "pip install opentelemetry-exporter-otlp-proto-grpc" in message
        and "http/protobuf" in message
    )


def test_the_signal_protocol_overrides_the_general_one():
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
    }
    assert exporter_classes(environ) == [OTLPSpanExporter]


def test_an_unsupported_protocol_is_refused():
    with pytest.raises(
        TelemetryConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL=http/json .*http/protobuf or grpc"
    ):
        exporter_classes(
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
        )


@pytest.mark.parametrize(
    "variable",
    [
        "OTEL_EXPORTER_OTLP_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_CLIENT_KEY",
    ],
)
def test_a_tls_file_that_is_not_there_is_refused_naming_its_variable(variable, tmp_path):
    """The service started and every export failed ("Could not find a suitable TLS CA
    certificate bundle, invalid path"), an ERROR a batch, tracing off in effect."""
    missing = tmp_path / "nowhere" / "ca.pem"
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://c:4318", variable: str(missing)}
    with pytest.raises(TelemetryConfigError, match=f"{variable}={missing}: no such file"):
        exporter_classes(environ)


def test_the_tls_files_that_are_there_are_taken(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://c:4318"}
    assert exporter_classes({**environ, "OTEL_EXPORTER_OTLP_CERTIFICATE": str(ca)}) == [
        OTLPSpanExporter
    ]


def test_the_protocol_only_matters_when_otlp_is_asked_for():
    assert exporter_classes(
        {"OTEL_TRACES_EXPORTER": "console", "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"}
    ) == [ConsoleSpanExporter]


# --- resource and sampler: the SDK's own ------------------------------------------------------


def test_the_service_name_is_lifelines_unless_the_environment_names_it(monkeypatch):
    assert (
        service_resource("lifeline-dispatcher").attributes["service.name"] == "lifeline-dispatcher"
    )
    monkeypatch.setenv(
        "OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attributes,deployment.environment=prod"
    )
    resource = service_resource("lifeline-dispatcher")
    assert resource.attributes["service.name"] == "from-attributes"
    assert resource.attributes["deployment.environment"] == "prod"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-service-name")
    assert service_resource("lifeline-dispatcher").attributes["service.name"] == "from-service-name"


def test_the_sampler_comes_from_otel_traces_sampler(monkeypatch, providers):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    provider = tracer_provider_from_env("lifeline", {"OTEL_TRACES_EXPORTER": "console"})
    providers.append(provider)
    span = provider.recorder("t").start("x", SpanKind.SERVER, {})
    assert not span.is_recording() and span.get_span_context().is_valid


# --- on_start for Lifeline's spans ------------------------------------------------------------


def test_processors_get_on_start_for_recording_spans_and_can_tag_them(providers):
    exported = InMemorySpanExporter()
    provider = Tracing()
    providers.append(provider)
    starts = Starts()
    provider.add_span_processor(starts)
    provider.add_span_processor(SimpleSpanProcessor(exported))
    recorder = provider.recorder("t")

    root = recorder.start("request", SpanKind.SERVER, {"a": 1})
    child = recorder.start("attempt", SpanKind.CLIENT, {}, root)
    child.end()
    root.end()

    [
        (name, span_id, parent_id, _, started),
        (child_name, child_id, child_parent, context_parent, _),
    ] = starts.started
    assert (name, span_id, parent_id) == ("request", root.context.span_id, None)
    assert started == root.start_time > 0
    assert (child_name, child_id, child_parent) == (
        "attempt",
        child.context.span_id,
        root.context.span_id,
    )
    assert (
        context_parent == root.context
    )  # the parent context holds the parent span, as the SDK's does
    finished = {s.name: s for s in exported.get_finished_spans()}
    assert (
        finished["request"].attributes["tagged.on_start"]
        == provider.resource.attributes["service.name"]
    )
    assert finished["attempt"].attributes["tagged.on_start"]


def test_on_start_also_reaches_processors_added_after_the_recorder(providers):
    provider = Tracing()
    providers.append(provider)
    recorder = provider.recorder("t")
    starts = Starts()
    provider.add_span_processor(starts)
    recorder.start("late", SpanKind.SERVER, {}).end()
    assert [s[0] for s in starts.started] == ["late"]


def test_spans_sampled_out_are_never_shown_to_processors(providers):
    provider = Tracing(sampler=ALWAYS_OFF)
    providers.append(provider)
    starts, exported = Starts(), InMemorySpanExporter()
    provider.add_span_processor(starts)
    provider.add_span_processor(SimpleSpanProcessor(exported))
    root = provider.recorder("t").start("x", SpanKind.SERVER, {})
    provider.recorder("t").start("y", SpanKind.CLIENT, {}, root).end()
    root.end()
    assert starts.started == [] and exported.get_finished_spans() == ()


def test_exporters_processors_are_not_called_on_start():
    """BatchSpanProcessor's on_start does nothing: skipping it keeps a sampled span's cost as
    before."""
    provider = Tracing()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    assert provider.starters == []
    provider.shutdown()


def test_without_an_exporter_nothing_is_recorded_but_trace_ids_are_made(providers):
    provider = tracer_provider_from_env("lifeline", {})
    providers.append(provider)
    starts, exported = Starts(), InMemorySpanExporter()
    provider.add_span_processor(starts)
    provider.add_span_processor(SimpleSpanProcessor(exported))
    span = provider.recorder("t").start("x", SpanKind.SERVER, {})
    span.end()
    assert not span.is_recording() and span.get_span_context().is_valid
    assert starts.started == [] and exported.get_finished_spans() == ()
    assert provider.processors._span_processors[:-2] == ()  # no exporter of its own


@pytest.mark.parametrize(
    "headers",
    [
        "Authorization: Bearer sk-otel-SECRET-4242",
        'x-api-key="sk-otel-SECRET-4242"',
        "x-api-key sk-otel-SECRET-4242",
        "x-api-key=sk-otel,SECRET-4242",
    ],
)
def test_an_otlp_header_the_sdk_cannot_parse_is_logged_without_its_secret(headers):
    """The SDK warns of a header it cannot parse (a colon as curl writes it, a quoted value, no
    "=" at all, a value's end after a comma in it) quoting it whole: the key was in the log of
    every process."""
    proc = spawn_lifeline(
        "dispatcher",
        "--config",
        str(ROOT / "lifeline.example.toml"),
        "--nats-url",
        "nats://127.0.0.1:1",
        env=cli_env(
            OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:1", OTEL_EXPORTER_OTLP_HEADERS=headers
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        line, before = wait_for_line(proc, "Header format invalid", stream=proc.stderr)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert "***" in line and "SECRET" not in "".join(before), "".join(before)


def test_the_secrets_of_otlp_settings_are_found_in_every_form_the_sdk_may_quote():
    from service.telemetry import otlp_secrets

    key = "sk-otel-SECRET-4242"
    for environ in (
        {"OTEL_EXPORTER_OTLP_TRACES_HEADERS": f"x-api-key={key}%0Ax,accept=gzip"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:4318/v1/traces?api_key={key}"},
        {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"http://user:{key}@127.0.0.1:99999"},
        # A user alone is a token; without a scheme or a host the SDK quotes the endpoint whole
        # ("No connection adapters were found for ...", "Invalid URL ...: No host supplied").
        {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{key}@:4318"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": f"{key}@127.0.0.1:4318"},
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"user:{key}@127.0.0.1:4318"},
        # urllib3 ends the host at a '/' in the password and quotes "user:<its start>".
        {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://user:{key}/more@127.0.0.1:4318"},
    ):
        assert key in otlp_secrets(environ), environ
    assert otlp_secrets({"OTEL_EXPORTER_OTLP_HEADERS": "accept=gzip,a=b"}) == []  # too short
