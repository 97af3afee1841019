"""OpenTelemetry set-up, Lifeline's span recorder, and trace context in NATS headers.

Export follows the standard OTEL_* environment variables. Exporters are looked up by name
in the entry points the SDK and exporter packages register (the SDK's own mechanism), so
`OTEL_TRACES_EXPORTER=console,otlp` gets both, and a name or an OTLP protocol that is not
installed stops start-up with a message instead of turning export off. The resource, the
sampler and each exporter's settings (endpoint, headers, timeout) are the SDK's own, read
from the environment by the SDK. With no exporter configured, spans are sampled out: trace
ids are still made and propagated, so replies and audit events carry one, but nothing is
recorded and the cost is a few µs.

The dispatcher's and workers' own spans go through `SpanRecorder`, not the SDK's Tracer:
an SDK span costs ~15 µs to start and end (locks, attribute cleaning, a sampler call per
span), three of them per request were a third of the hot path's CPU. The recorder keeps
ids, times and attributes as plain values, shows a recording span to the processors'
`on_start` as it starts and hands each finished span to the SDK's span processors as a
ReadableSpan, so sampling config, resource, batching and exporters stay the SDK's own (a
BatchSpanProcessor gets a turn's spans on its queue at once: `hand_off`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import logging
import math
import os
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote, urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import (
    Event,
    ReadableSpan,
    Span,
    SpanProcessor,
    SynchronousMultiSpanProcessor,
    TracerProvider,
)
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from schemas import ProviderOk
from schemas.subjects import TRACEPARENT, TRACESTATE
from schemas.wire import MAX_MESSAGE_CHARS, MAX_NAME_LENGTH

# The metrics SDK (a fifth of a worker's start-up imports) loads only where metrics are
# exported: in meter_provider_from_env, once OTEL_METRICS_EXPORTER names an exporter.
if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider

log = logging.getLogger("lifeline.telemetry")

# gen_ai.provider.name values from the GenAI semantic conventions, by provider kind.
GEN_AI_PROVIDER = {
    "openai": "openai",
    "azure_openai": "azure.ai.openai",
    "anthropic": "anthropic",
    "fake": "lifeline.fake",
}

_propagator = TraceContextTextMapPropagator()


class TelemetryConfigError(ValueError):
    """An OTEL_* variable asks for something that is not installed or not supported.

    A ValueError, so the CLI prints it and exits 2 like any other bad configuration."""


# OTLP's protocol picks the exporter package: the entry-point names those packages register.
_OTLP_ENTRY_POINT = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}
_OTLP_PACKAGE = {
    "http/protobuf": "opentelemetry-exporter-otlp-proto-http",
    "grpc": "opentelemetry-exporter-otlp-proto-grpc",
}
# The spec's default, and what Lifeline has always sent; the SDK's own configurator says grpc.
_DEFAULT_OTLP_PROTOCOL = "http/protobuf"


def _exporter_types(signal: str) -> tuple[type, ...]:
    """The exporter classes a signal's entry points must give."""
    if signal == "TRACES":
        return (SpanExporter,)
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricReader

    return (MetricExporter, MetricReader)


def exporter_names(environ: Mapping[str, str] = os.environ, signal: str = "TRACES") -> list[str]:
    """The exporters asked for TRACES or METRICS, in order: OTEL_<signal>_EXPORTER as a
    comma-separated list ("none" entries add nothing), or ["otlp"] when it is unset and
    OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_<signal>_ENDPOINT is set; [] when
    OTEL_SDK_DISABLED=true. The names are not checked here: see `exporter_classes`."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    listed = environ.get(f"OTEL_{signal}_EXPORTER", "")
    names = [name.strip().lower() for name in listed.split(",") if name.strip()]
    if not names:
        # Not the spec's default of otlp to localhost: without a collector that would log
        # export failures on every run, so OTLP waits for an endpoint to be named.
        endpoint = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get(
            f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    return list(
        dict.fromkeys(name for name in names if name != "none")
    )  # one exporter per name, as the SDK


def exporter_classes(environ: Mapping[str, str] = os.environ, signal: str = "TRACES") -> list[type]:
    """The exporter class of each name of `exporter_names`, loaded from the entry points the
    SDK and exporter packages register ("otlp" by OTLP protocol). Raises TelemetryConfigError
    for a name or protocol that is not installed, naming the variable and what would work."""
    return [_exporter_class(name, environ, signal) for name in exporter_names(environ, signal)]


def _exporter_class(name: str, environ: Mapping[str, str], signal: str) -> type:
    group = f"opentelemetry_{signal.lower()}_exporter"
    entry_point = _otlp_entry_point(environ, signal) if name == "otlp" else name
    found = entry_points(group=group, name=entry_point)
    if not found:
        installed = ", ".join(sorted({"none", "otlp", *entry_points(group=group).names}))
        raise TelemetryConfigError(
            f"OTEL_{signal}_EXPORTER: no exporter {name!r} is installed (installed: {installed})"
        )
    exporter = next(iter(found)).load()
    if not (isinstance(exporter, type) and issubclass(exporter, _exporter_types(signal))):
        raise TelemetryConfigError(
            f"OTEL_{signal}_EXPORTER: {name!r} ({exporter!r}) is not a {signal.lower()} exporter"
        )
    return exporter


def _otlp_entry_point(environ: Mapping[str, str], signal: str) -> str:
    """The OTLP exporter's entry-point name for the protocol the environment asks for, if its
    package is installed: a protocol is never ignored, it works or start-up stops."""
    variable = f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"
    if not environ.get(variable, "").strip():
        variable = "OTEL_EXPORTER_OTLP_PROTOCOL"
    protocol = environ.get(variable, "").strip().lower() or _DEFAULT_OTLP_PROTOCOL
    if protocol not in _OTLP_ENTRY_POINT:
        raise TelemetryConfigError(
            f"{variable}={protocol} is not supported by the Python OTLP exporters: use "
            "http/protobuf or grpc"
        )
    if protocol == "http/protobuf":
        _check_http_endpoint(environ, signal)
        _check_http_files(environ, signal)
    entry_point = _OTLP_ENTRY_POINT[protocol]
    if not entry_points(group=f"opentelemetry_{signal.lower()}_exporter", name=entry_point):
        other = "http/protobuf" if protocol == "grpc" else "grpc"
        raise TelemetryConfigError(
            f"{variable}={protocol} needs the {_OTLP_PACKAGE[protocol]} package, which is not "
            "installed: "
            f"pip install {_OTLP_PACKAGE[protocol]}, or set {variable}={other}"
        )
    return entry_point


def _check_http_endpoint(environ: Mapping[str, str], signal: str) -> None:
    """An OTLP/HTTP endpoint is a URL: without its scheme (localhost:4318) the service started
    and its every export failed ("No connection adapters were found"). Not quoted: an
    endpoint may hold a token."""
    variable = f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"
    if not environ.get(variable, "").strip():
        variable = "OTEL_EXPORTER_OTLP_ENDPOINT"
    endpoint = environ.get(variable, "").strip().lower()
    if endpoint and not endpoint.startswith(("http://", "https://")):
        raise TelemetryConfigError(
            f"{variable} is no http:// or https:// URL, which OTLP over HTTP needs: e.g. "
            "http://localhost:4318"
        )


def _check_http_files(environ: Mapping[str, str], signal: str) -> None:
    """The TLS files an OTLP/HTTP exporter reads at each export: one that is not there started
    the service, and every export failed ("Could not find a suitable TLS CA certificate
    bundle, invalid path"). Each is the signal's variable, else the general one, as the SDK
    reads them."""
    for name in ("CERTIFICATE", "CLIENT_CERTIFICATE", "CLIENT_KEY"):
        variable = f"OTEL_EXPORTER_OTLP_{signal}_{name}"
        if not environ.get(variable, ""):
            variable = f"OTEL_EXPORTER_OTLP_{name}"
        path = environ.get(variable, "")
        if path and not os.path.isfile(path):
            raise TelemetryConfigError(
                f"{variable}={path}: no such file: name the PEM file it takes, or unset it"
            )


def service_resource(service_name: str) -> Resource:
    """The SDK's resource from the environment (OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME,
    the detectors of OTEL_EXPERIMENTAL_RESOURCE_DETECTORS), with service.name `service_name`
    unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES names the service."""
    resource = Resource.create()
    if SERVICE_NAME in OTELResourceDetector().detect().attributes:
        return resource
    return resource.merge(Resource({SERVICE_NAME: service_name}))


class Tracing(TracerProvider):
    """The SDK's TracerProvider, plus `recorder()` for Lifeline's own hot-path spans."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.processors = SynchronousMultiSpanProcessor()  # the same processors, for the recorder
        self.starters: list[SpanProcessor] = []  # those whose on_start does something
        # Per processor, what takes the recorder's ended spans: a batch of them at a time
        # (see `hand_off`), not the multi-processor's call per span and processor.
        self.enders: list[HandOff] = []

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        super().add_span_processor(span_processor)
        self.processors.add_span_processor(span_processor)
        self.enders.append(hand_off(span_processor))
        if _acts_on_start(span_processor):
            self.starters.append(span_processor)

    def recorder(self, scope: str) -> SpanRecorder:
        """A SpanRecorder sharing this provider's sampler, resource and processors (also those
        added later)."""
        return SpanRecorder(
            self.sampler,
            self.resource,
            self.processors,
            InstrumentationScope(scope),
            self.starters,
            self.enders,
        )


HandOff = Callable[[Sequence[ReadableSpan]], None]


def hand_off(processor: SpanProcessor) -> HandOff:
    """What hands ended spans to `processor`: its on_end per span, or, for the SDK's own
    BatchSpanProcessor (what every exporter of `tracer_provider_from_env` runs behind), the
    spans put on its queue together.

    A BatchSpanProcessor's on_end costs about 2 µs a span, and a request has three spans:
    it reads the span's SpanContext (which a LiteSpan then builds), asks the OS for the
    process id (a system call each time: glibc no longer caches it) to notice a fork, and
    appends to the queue. The SDK already notices a fork with `os.register_at_fork`, and a
    LiteSpan handed off is always sampled (`emit` runs only for recording spans, and a
    recording LiteSpan's flags say sampled), so `_QueueBatches` keeps the rest: the queue
    append, in order, and waking the export thread once a batch is full. It relies on
    attributes of the SDK's BatchProcessor that are not public API; `_QueueBatches.fits`
    checks them first, and a version without them gets on_end per span, as before
    (tests/test_span_recorder.py fails loudly then, so the adapter is updated, not lost).
    What would make it unnecessary upstream: an `on_end` for many spans at once, or one
    without a system call per span."""
    if type(processor) is BatchSpanProcessor and _QueueBatches.fits(processor):
        return _QueueBatches(processor).hand
    return _OneByOne(processor.on_end).hand


class _OneByOne:
    def __init__(self, on_end: Callable[[ReadableSpan], None]) -> None:
        self.on_end = on_end

    def hand(self, spans: Sequence[ReadableSpan]) -> None:
        on_end = self.on_end
        for span in spans:
            try:
                on_end(span)
            except Exception:  # a processor's bug: the other spans still go
                log.exception("a span processor failed on span %r", span.name)


class _QueueBatches:
    """Spans put straight on a BatchSpanProcessor's queue: what its on_end does for a sampled
    span (`BatchProcessor.emit`), once per batch of spans instead of once per span. Anything
    unusual (shut down, the queue too full to take them all) goes through on_end, so the
    SDK's own warnings and dropped-span counts stay as they are."""

    def __init__(self, processor: BatchSpanProcessor) -> None:
        self.batches = processor._batch_processor  # private: see `hand_off`
        self.one_by_one = _OneByOne(processor.on_end)

    @staticmethod
    def fits(processor: BatchSpanProcessor) -> bool:
        """Whether this SDK's BatchSpanProcessor has what `hand` uses, as it uses it."""
        batches = getattr(processor, "_batch_processor", None)
        queue = getattr(batches, "_queue", None)
        return (
            hasattr(os, "register_at_fork")  # the SDK's fork handling, instead of emit's getpid
            and isinstance(queue, collections.deque)
            and queue.maxlen == getattr(batches, "_max_queue_size", None)
            and isinstance(getattr(batches, "_max_export_batch_size", None), int)
            and isinstance(getattr(batches, "_worker_awaken", None), threading.Event)
            and getattr(batches, "_shutdown", None) is False
        )

    def hand(self, spans: Sequence[ReadableSpan]) -> None:
        batches = self.batches
        queue = batches._queue
        if batches._shutdown or len(queue) + len(spans) > batches._max_queue_size:
            self.one_by_one.hand(spans)
            return
        queue.extendleft(spans)  # as emit's appendleft, span by span: the export pops the right
        if len(queue) >= batches._max_export_batch_size:
            awaken = batches._worker_awaken  # read each time: a fork makes a new one
            if not awaken.is_set():
                awaken.set()


# on_start of these does nothing: the recorder need not call it, which keeps starting a
# sampled span as cheap as before when only the exporters' processors are there.
_NOOP_ON_START = {SpanProcessor.on_start, BatchSpanProcessor.on_start, SimpleSpanProcessor.on_start}


def _acts_on_start(processor: SpanProcessor) -> bool:
    return getattr(type(processor), "on_start", None) not in _NOOP_ON_START


_OTLP_SIGNALS = ("", "TRACES_", "METRICS_", "LOGS_")
_SHORTEST_SECRET = 6


def otlp_secrets(environ: Mapping[str, str] = os.environ) -> list[str]:
    """What the OTLP exporters' settings may hold that is secret: each header's value (as
    written, unquoted, URL-decoded, and its longer words: "Bearer <key>"), an endpoint's user
    info and query values. The SDK writes them in its own log lines (a header it cannot parse,
    an endpoint it cannot reach, on every failed export), so every log line hides them
    (logs.hide, in the CLI)."""
    found: set[str] = set()

    def add(value: str) -> None:
        for form in {value.strip(), value.strip("\"' "), unquote(value).strip("\"' ")}:
            if len(form) >= _SHORTEST_SECRET:  # not "gzip", "true": every line would lose them
                found.add(form)
                found.update(word for word in form.split() if len(word) >= 8)

    for signal in _OTLP_SIGNALS:
        for item in environ.get(f"OTEL_EXPORTER_OTLP_{signal}HEADERS", "").split(","):
            name_end = min((i for i in (item.find("="), item.find(":")) if i >= 0), default=-1)
            # An item without a name is a value too, which the SDK quotes whole as a header it
            # cannot parse: "api-key <key>" (no "="), or a value's end after a comma in it.
            add(item[name_end + 1 :] if name_end >= 0 else item)
        endpoint = environ.get(f"OTEL_EXPORTER_OTLP_{signal}ENDPOINT", "")
        try:
            parts = urlsplit(endpoint)
        except ValueError:  # unreadable, a port out of range: the SDK logs it whole
            parts = urlsplit("")
        # Its user info read as text, up to the last "@": urlsplit finds none in an endpoint
        # without its scheme (u:pw@host:4318), which the SDK quotes whole ("No connection
        # adapters were found for 'u:pw@host:4318/v1/traces'"), as it does one without a host.
        # A user without a password is a token (http://<key>@host). A password's start up to
        # a '/', '?' or '#' too: a parser ends the host there and quotes "u:<start>".
        authority = endpoint.partition("://")[2] if "://" in endpoint else endpoint
        user_info, at, _ = authority.rpartition("@")
        if at:
            password = user_info.partition(":")[2] or user_info
            add(password)
            add(re.split(r"[/?#]", password)[0])
        for value in (v for _, _, v in (q.partition("=") for q in parts.query.split("&"))):
            if value:
                add(value)
    return sorted(found)


def tracer_provider_from_env(service_name: str, environ: Mapping[str, str] = os.environ) -> Tracing:
    """A Tracing provider with a BatchSpanProcessor per exporter of OTEL_TRACES_EXPORTER (see
    `exporter_names`), sampling as OTEL_TRACES_SAMPLER(_ARG) say (the SDK's default sampler);
    with no exporter, sampling everything out. Raises TelemetryConfigError, before building
    anything, for an exporter or OTLP protocol that is not installed.

    `environ` holds the variables Lifeline reads itself (which exporters, which protocol);
    the SDK reads the resource, the sampler and each exporter's settings from os.environ."""
    classes = exporter_classes(environ, "TRACES")
    resource = service_resource(service_name)
    if not classes:
        return Tracing(resource=resource, sampler=ALWAYS_OFF, shutdown_on_exit=False)
    # Sampler from OTEL_TRACES_SAMPLER, else parent-based always-on. Shut down by shut_down(),
    # not also by the SDK at exit: a second shutdown after a collector that hung only warns
    # "shutdown can only be called once".
    provider = Tracing(resource=resource, shutdown_on_exit=False)
    for (
        exporter
    ) in classes:  # each reads its own settings: OTLP's OTEL_EXPORTER_OTLP_* endpoint, headers, ...
        provider.add_span_processor(BatchSpanProcessor(exporter(**_capped(exporter, "TRACES"))))
    return provider


# What an OTLP/HTTP exporter reads of a collector's answer: an ExportTraceServiceResponse (or
# a proxy's error page) is a few bytes, and the exporter only reads its status. `requests`
# reads an answer whole into memory, each read bounded in time but not the answer: a
# "collector" answering a body without end (a wrong endpoint, a proxy) grew a dispatcher by
# 120 MB a second, to its OOM kill.
MAX_COLLECTOR_ANSWER = 64 * 1024


def _capped(exporter: type, signal: str) -> dict[str, Any]:
    """The keyword arguments that make `exporter` read at most MAX_COLLECTOR_ANSWER of each
    answer: a requests Session of its own, for an exporter that takes one (the OTLP/HTTP
    ones). Nothing when a credential provider is configured: the SDK makes its session then."""
    try:
        takes_session = "session" in inspect.signature(exporter).parameters
    except (TypeError, ValueError):  # no signature to read: built as it always was
        return {}
    credentials = (
        "OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER",
        f"OTEL_PYTHON_EXPORTER_OTLP_HTTP_{signal}_CREDENTIAL_PROVIDER",
    )
    if not takes_session or any(os.environ.get(name) for name in credentials):
        return {}
    import requests  # what the OTLP/HTTP exporters use: installed with them

    session = _own_verify_session(requests.Session)()
    adapter = _capped_adapter(requests.adapters.HTTPAdapter)()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return {"session": session}


def _own_verify_session(base: type) -> type:
    """A requests Session whose own `verify` (where the SDK puts OTEL_EXPORTER_OTLP_CERTIFICATE)
    wins over REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE: requests lets those override it, so the
    collector's CA was ignored wherever an image sets one. Proxies still come from the
    environment."""

    class OwnVerifySession(base):  # type: ignore[misc, valid-type]
        def merge_environment_settings(
            self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any
        ) -> Any:
            if verify is None and self.verify is not True:
                verify = self.verify  # a CA file set on the session, or False
            return super().merge_environment_settings(url, proxies, stream, verify, cert)

    return OwnVerifySession


def _capped_adapter(base: type) -> type:
    import requests  # with urllib3, what the OTLP/HTTP exporters use
    import urllib3

    pools = _watched_pools()

    class CappedAdapter(base):  # type: ignore[misc, valid-type]
        """requests' HTTPAdapter that reads at most MAX_COLLECTOR_ANSWER of an answer, and
        closes its connection when there was more (it cannot be reused then), within the
        exporter's timeout in all (`_Deadline`)."""

        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = pools

        def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
            manager = super().proxy_manager_for(proxy, **kwargs)
            if manager.pool_classes_by_scheme is urllib3.poolmanager.pool_classes_by_scheme:
                manager.pool_classes_by_scheme = pools  # not a SOCKS proxy's own
            return manager

        def send(self, request: Any, stream: bool = False, **kwargs: Any) -> Any:
            timeout = kwargs.get("timeout")
            if not isinstance(timeout, int | float) or timeout <= 0:
                return self._read_capped(request, **kwargs)
            deadline = _exchange.deadline = _Deadline(timeout)
            try:
                return self._read_capped(request, **kwargs)
            except Exception as exc:
                if not deadline.cut:
                    raise
                raise requests.exceptions.ReadTimeout(
                    f"the collector's answer took more than the export's {timeout:g} s"
                ) from exc
            finally:
                deadline.end()
                _exchange.deadline = None

        def _read_capped(self, request: Any, **kwargs: Any) -> Any:
            response = super().send(request, stream=True, **kwargs)
            body = bytearray()
            try:
                for chunk in response.iter_content(16 * 1024):
                    body += chunk
                    if len(body) > MAX_COLLECTOR_ANSWER:
                        break
            finally:
                response.close()  # back to the pool when it was read to its end, else closed
            response._content = bytes(body[:MAX_COLLECTOR_ANSWER])  # what .content gives
            return response

    return CappedAdapter


# The exchange the exporting thread is in, for the connection it runs on (`_watched_pools`).
_exchange = threading.local()


class _Deadline:
    """An OTLP export's whole time. The SDK's exporters take their timeout
    (OTEL_EXPORTER_OTLP_TIMEOUT, 10 s by default) as a bound on the export and pass requests
    what is left of it, but requests bounds each read of the socket, not the answer: a
    collector answering a byte every few seconds held the export thread for as long as it
    dripped, and no span went out again. When the time is up, the exchange's socket is shut
    (a read waiting on it returns at once) and the export fails as timed out."""

    def __init__(self, seconds: float) -> None:
        self.connection: Any = None  # set as the request goes out on it
        self.cut = False
        self._over = False
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True
        self._timer.start()

    def _cut(self) -> None:
        with self._lock:
            if self._over:  # done meanwhile: its connection may be back in the pool
                return
            self.cut = True
            sock = getattr(self.connection, "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def end(self) -> None:
        with self._lock:
            self._over = True
        self._timer.cancel()


@functools.cache
def _watched_pools() -> dict[str, type]:
    """urllib3's connection pools, whose connections tell the exchange's `_Deadline` which
    socket it runs on."""
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class Watched:
        def request(self, *args: Any, **kwargs: Any) -> Any:
            deadline = getattr(_exchange, "deadline", None)
            if deadline is not None:
                deadline.connection = self
            return super().request(*args, **kwargs)  # type: ignore[misc]

    class Pool(HTTPConnectionPool):
        ConnectionCls = type("WatchedHTTPConnection", (Watched, HTTPConnection), {})

    class TLSPool(HTTPSConnectionPool):
        ConnectionCls = type("WatchedHTTPSConnection", (Watched, HTTPSConnection), {})

    return {"http": Pool, "https": TLSPool}


# How long a stopping process waits for its spans and metrics to be exported: the SDK's own
# shutdown waits up to 30 s for an exporter whose collector is down or hangs (and its OTLP
# exporters retry meanwhile), which took a stopping dispatcher past a supervisor's kill
# timeout after its own grace. What is not out by then is lost either way.
SHUTDOWN_S = 3.0


def shut_down(
    *providers: TracerProvider | MeterProvider | None, within_s: float = SHUTDOWN_S
) -> None:
    """Each provider's `shutdown()` (its last export), at once, waited for `within_s` at most
    in all: they go on in daemon threads, which do not hold up the process's exit."""
    waiting = []
    for provider in providers:
        if provider is None:
            continue
        done = threading.Event()
        threading.Thread(
            target=_shutdown, args=(provider, done), name="lifeline-telemetry-shutdown", daemon=True
        ).start()
        waiting.append((provider, done))
    give_up = time.monotonic() + within_s
    for provider, done in waiting:
        if not done.wait(max(give_up - time.monotonic(), 0)):
            log.warning(
                "the last %s were not exported within %g s (is the collector down?): left behind",
                "spans" if isinstance(provider, TracerProvider) else "metrics",
                within_s,
            )


def _shutdown(provider: TracerProvider | MeterProvider, done: threading.Event) -> None:
    try:
        provider.shutdown()
    finally:
        done.set()


def meter_provider_from_env(
    service_name: str, environ: Mapping[str, str] = os.environ
) -> MeterProvider | None:
    """A MeterProvider with a reader per exporter of OTEL_METRICS_EXPORTER (see `exporter_names`),
    exporting every OTEL_METRIC_EXPORT_INTERVAL (default 60 s), or None when no metrics exporter
    is configured (then nothing is collected at all). Raises TelemetryConfigError as
    `tracer_provider_from_env` does."""
    classes = exporter_classes(environ, "METRICS")
    if not classes:
        return None
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader

    # An entry point may be a pull reader (e.g. Prometheus) rather than a push exporter.
    readers = [
        cls()
        if issubclass(cls, MetricReader)
        else PeriodicExportingMetricReader(cls(**_capped(cls, "METRICS")))
        for cls in classes
    ]
    return MeterProvider(
        resource=service_resource(service_name), metric_readers=readers, shutdown_on_exit=False
    )  # shut down by shut_down(), as the tracer provider


_BREAKER_STATE = {"closed": 0, "half_open": 1, "open": 2}


def observe_health(meters: MeterProvider, health: Any) -> None:
    """Export the figures `lifeline status` shows as observable instruments, read from the
    dispatcher's health (service/health.py) when the reader collects: nothing on the hot path.
    Called on the dispatcher's event loop, where the health is read (`_on_loop`)."""
    meter = meters.get_meter("lifeline.dispatcher")
    read = _on_loop(health.snapshot)
    cached: list[Any] = [-math.inf, {}]  # one snapshot serves every gauge of a collection

    def snapshot() -> dict[str, Any]:
        now = time.monotonic()
        if now - cached[0] > 1.0:
            cached[0], cached[1] = now, read()
        return cached[1]

    def gauge(
        name: str, unit: str, description: str, value_of: Callable[[dict[str, Any]], Any]
    ) -> None:
        def callback(options: CallbackOptions) -> Iterator[Observation]:
            for label, figures in snapshot().items():
                value = value_of(figures)
                if value is not None:
                    attributes = {
                        "lifeline.health_key": label,
                        "lifeline.provider": figures["provider"],
                        "gen_ai.request.model": figures["model"],
                    }
                    yield Observation(value, attributes)

        meter.create_observable_gauge(
            name, callbacks=[callback], unit=unit, description=description
        )

    gauge(
        "lifeline.breaker.state",
        "1",
        "circuit breaker per target: 0 closed, 1 half-open, 2 open",
        lambda f: _BREAKER_STATE[f["state"]],
    )
    gauge(
        "lifeline.target.requests",
        "{request}",
        "calls of the target in the last 60 s (those cancelled before they answered too)",
        lambda f: f["ok"] + f["failed"] + f["cancelled"],
    )
    gauge(
        "lifeline.target.success_rate",
        "1",
        "share of the target's calls in the last 60 s that answered well",
        lambda f: f["ok"] / (f["ok"] + f["failed"]) if f["ok"] + f["failed"] else None,
    )
    gauge(
        "lifeline.target.latency.p50",
        "ms",
        "median latency of the target's good answers (last 30-60 s)",
        lambda f: f["p50_ms"],
    )
    gauge(
        "lifeline.target.latency.p95",
        "ms",
        "p95 latency of the target's good answers (last 30-60 s)",
        lambda f: f["p95_ms"],
    )
    gauge(
        "lifeline.target.first_chunk.p50",
        "ms",
        "median time to the first chunk of the target's streams (last 30-60 s)",
        lambda f: f["first_chunk_p50_ms"],
    )
    gauge(
        "lifeline.target.first_chunk.p95",
        "ms",
        "p95 time to the first chunk of the target's streams (last 30-60 s): what a stream's "
        'hedge = "p95" waits for',
        lambda f: f["first_chunk_p95_ms"],
    )

    def shared(options: CallbackOptions) -> Iterator[Observation]:
        yield Observation(1 if getattr(health, "shared", False) else 0)

    meter.create_observable_gauge(
        "lifeline.health.shared",
        callbacks=[shared],
        unit="1",
        description="1 while breaker state is shared through the JetStream bucket, "
        "0 on this dispatcher's own view",
    )


# How long a metrics reader waits for the event loop to read the health for it.
_LOOP_WAIT_S = 0.25


def _on_loop(read: Callable[[], Any]) -> Callable[[], Any]:
    """`read` for the metrics reader's thread: run on the event loop calling this, which
    changes what it reads. Read from the reader's thread itself, a snapshot could take one
    part of a change and not the rest (a slot's second renewed, its counts not yet cleared; a
    latency window turned, its histogram counted twice). Waited for _LOOP_WAIT_S at most: a
    loop that has not run it by then is mostly one that is stopping (its last export waits on
    it) or stuck, and it is read where it is asked, as before."""
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None

    def on_loop() -> Any:
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if loop is None or here is loop or not loop.is_running():
            return read()
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(read())
                except Exception as exc:  # noqa: BLE001 - the reader's thread says it
                    done.set_exception(exc)

        try:
            loop.call_soon_threadsafe(run)
            return done.result(_LOOP_WAIT_S)
        except (RuntimeError, concurrent.futures.TimeoutError):  # closed, or not running it
            done.cancel()
            return read()

    return on_loop


def remote_parent(headers: Mapping[str, str] | None) -> trace.SpanContext | None:
    """The caller's span context from NATS headers, if it sent a valid one.

    A plain `traceparent` is parsed here directly (the propagator's regex was ~5% of a
    worker's CPU); anything else, tracestate included, goes through the propagator.
    """
    if not headers:
        return None
    traceparent = headers.get(TRACEPARENT)
    if traceparent is None:
        return None
    plain = _plain_traceparent(traceparent, headers)
    if plain is not None:
        return plain[0]
    parts = traceparent.split("-")
    if (
        TRACESTATE in headers
        or len(parts) != 4
        or parts[0] != "00"
        or len(parts[1]) != 32
        or len(parts[2]) != 16
        or len(parts[3]) != 2
        # lowercase hex only, as the propagator reads it (int() takes more: capitals, "_")
        or traceparent.encode().translate(None, b"0123456789abcdef-")
    ):
        ctx = trace.get_current_span(_propagator.extract(headers)).get_span_context()
        return ctx if ctx.is_valid else None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    # Every flag kept, as the propagator keeps them (W3C level 2 adds 02, a random trace id):
    # a span that records nothing passes the parent on as it came.
    trace_flags = _FLAGS[flags] if flags < 2 else trace.TraceFlags(flags)
    return span_context(trace_id, span_id, trace_flags, None, is_remote=True)


# A traceparent as almost every caller sends it, `00-<32 hex>-<16 hex>-0[01]` without a
# tracestate, is checked by its shape: each byte translated to what it is (a lowercase hex
# digit to "0", "-" to itself, anything else to "x"), compared with the one shape it may have.
_SHAPE_OF = bytes(
    ord("0") if chr(b) in "0123456789abcdef" else b if b == ord("-") else ord("x")
    for b in range(256)
)
_PLAIN_SHAPE = b"00-" + b"0" * 32 + b"-" + b"0" * 16 + b"-00"


def _plain_traceparent(
    traceparent: str, headers: Mapping[str, str]
) -> tuple[trace.SpanContext, str] | None:
    """The span context of a plain traceparent (see _PLAIN_SHAPE) with valid ids, and its trace
    id as written (the span's `trace_hex`, not formatted again); None for any other, which
    `remote_parent`'s general reading then reads as it did (what it gives a plain one is the
    same: a test holds them alike)."""
    flags = _PLAIN_FLAGS.get(traceparent[53:])
    if (
        flags is None
        or traceparent[:3] != "00-"
        or traceparent.encode().translate(_SHAPE_OF) != _PLAIN_SHAPE
        or TRACESTATE in headers
    ):
        return None
    trace_hex = traceparent[3:35]
    trace_id, span_id = int(trace_hex, 16), int(traceparent[36:52], 16)
    if not trace_id or not span_id:
        return None
    remote = _new_tuple(trace.SpanContext, (trace_id, span_id, True, flags, _EMPTY_STATE, True))
    return remote, trace_hex


def extract(headers: Mapping[str, str] | None) -> Context | None:
    """The caller's trace context from NATS headers as an OTel Context, if it sent one."""
    parent = remote_parent(headers)
    return None if parent is None else _as_context(parent)


def _as_context(parent: trace.SpanContext) -> Context:
    return trace.set_span_in_context(trace.NonRecordingSpan(parent))


_DEFAULT_SAMPLER = ParentBased(ALWAYS_ON).get_description()


class SpanRecorder:
    """Starts LiteSpans: the sampler is asked once per local root (a remote or no parent);
    children follow their local parent's decision, as the default parent-based sampler would.
    A recording span is shown to `starters` (processors with an on_start) as it starts."""

    def __init__(
        self,
        sampler: Sampler,
        resource: Resource,
        processor,
        scope: InstrumentationScope,
        starters: list[SpanProcessor] | None = None,
        enders: list[HandOff] | None = None,
    ) -> None:
        self.sampler = sampler
        self.resource = resource
        self.processor = processor
        self.scope = scope
        # Shared with Tracing, as `starters` is; without it, the one processor's hand-off.
        self.enders = enders if enders is not None else [hand_off(processor)]
        # Shared with Tracing: sees processors added later.
        self.starters = starters if starters is not None else []
        self._ended: list[LiteSpan] = []  # ended by end_soon, for the processors this turn
        self.default_sampler = (
            type(sampler) is ParentBased and sampler.get_description() == _DEFAULT_SAMPLER
        )
        # ALWAYS_OFF (what runs when no exporter is set) is decided without the call too:
        # nothing records, whatever the parent did.
        self.never = sampler is ALWAYS_OFF
        self.decided_here = self.default_sampler or self.never

    def start(
        self,
        name: str,
        kind: trace.SpanKind,
        attributes: dict[str, Any],
        parent: Context | LiteSpan | trace.SpanContext | None = None,
    ) -> LiteSpan:
        if isinstance(parent, LiteSpan):  # a local child: same trace, same state, same decision
            if parent.recording:
                span = LiteSpan(
                    self,
                    name,
                    kind,
                    attributes,
                    parent,
                    True,
                    parent.trace_id,
                    parent.trace_state,
                    parent.trace_hex,
                )
                if self.starters:
                    self._started(span, parent.as_context())
                return span
            if type(parent) is _PassedOn:
                return _PassedOn(self, name, kind, attributes, parent.context, parent.trace_hex)
            return LiteSpan(
                self,
                name,
                kind,
                attributes,
                parent,
                False,
                parent.trace_id,
                parent.trace_state,
                parent.trace_hex,
            )
        if isinstance(parent, trace.SpanContext):  # from remote_parent: no Context built
            remote, context = parent, None
        else:
            context = parent
            remote = (
                trace.get_current_span(parent).get_span_context() if parent is not None else None
            )
        # SpanContext's fields read by position (its properties are Python calls): see
        # span_context for the layout, which a test checks against the installed API.
        if remote is not None and not remote[_VALID]:
            remote = None
        decided_here = self.decided_here
        if context is None and remote is not None and (self.starters or not decided_here):
            context = _as_context(remote)
        trace_id = remote[_TRACE_ID] if remote is not None else random.getrandbits(128)
        if decided_here:
            # The SDK's default, ParentBased(ALWAYS_ON), decided as it decides, without the
            # call: a root records, a child of a remote parent does what the parent did, and
            # ALWAYS_ON adds no attributes of its own. ALWAYS_OFF records nothing and adds none;
            # both pass a remote parent's trace state on.
            if self.never:
                if remote is not None:  # tracing is off here: the caller's context goes on
                    return _PassedOn(self, name, kind, attributes, remote)
                recording = False
            else:
                recording = remote is None or remote[_TRACE_FLAGS] & 1 == 1
            trace_state = remote[_TRACE_STATE] if remote is not None else None
            if trace_state is _EMPTY_STATE or not trace_state:
                trace_state = None  # what a span keeps when there is none
            span = LiteSpan(self, name, kind, attributes, remote, recording, trace_id, trace_state)
        else:
            result = self.sampler.should_sample(context, trace_id, name, kind, attributes)
            recording = result.decision.is_sampled()
            span = LiteSpan(
                self,
                name,
                kind,
                attributes,
                remote,
                recording,
                trace_id,
                result.trace_state or None,
            )
            if recording and result.attributes:
                span.set_attributes(result.attributes)
        if recording and self.starters:
            self._started(span, context)
        return span

    def start_remote(
        self,
        name: str,
        kind: trace.SpanKind,
        attributes: dict[str, Any],
        headers: Mapping[str, str] | None,
    ) -> LiteSpan:
        """`start(name, kind, attributes, remote_parent(headers))`, a worker's span under the
        attempt that called it: with the default sampler and a plain traceparent (nearly every
        call), decided here and the trace id kept as the header wrote it."""
        traceparent = headers.get(TRACEPARENT) if headers else None
        if traceparent is not None and self.default_sampler and not self.starters:
            plain = _plain_traceparent(traceparent, headers or {})
            if plain is not None:  # as `start` decides it: the parent's sampled flag
                remote, trace_hex = plain
                recording = remote[_TRACE_FLAGS] is _SAMPLED
                trace_id = remote[_TRACE_ID]
                return LiteSpan(
                    self, name, kind, attributes, remote, recording, trace_id, None, trace_hex
                )
        return self.start(name, kind, attributes, remote_parent(headers))

    def _emit_at_turn_end(self) -> None:
        """Hand the spans ended in this event-loop turn (`_ended`, which LiteSpan.end_soon
        fills) to the processors at its end: one callback per turn, not per span."""
        try:
            asyncio.get_running_loop().call_soon(self._emit)
        except RuntimeError:  # no loop runs: nothing to wait for
            self._emit()

    def _emit(self) -> None:
        ended, self._ended = self._ended, []
        for hand in self.enders:
            hand(ended)

    def _started(self, span: LiteSpan, parent_context: Context | None) -> None:
        # As the SDK's Span.start does: the span itself, still open, so a processor can read
        # it or add attributes (which then reach on_end), and the context it was started in.
        for processor in self.starters:
            # A LiteSpan reads like the SDK's Span for on_start (see its docstring).
            processor.on_start(cast(Span, span), parent_context=parent_context)


_SAMPLED = trace.TraceFlags(trace.TraceFlags.SAMPLED)
_NOT_SAMPLED = trace.TraceFlags(trace.TraceFlags.DEFAULT)
_FLAGS = (_NOT_SAMPLED, _SAMPLED)
_PLAIN_FLAGS = {"00": _NOT_SAMPLED, "01": _SAMPLED}  # a plain traceparent's (_plain_traceparent)
_UNSET = trace.Status(trace.StatusCode.UNSET)
_random_bits = random.getrandbits

# opentelemetry-api's SpanContext is a tuple of these fields, in this order; its __new__ (Python,
# about a tenth of a span's cost) only fills in defaults and computes is_valid. Spans made here
# have valid ids, so span_context builds the tuple directly. test_span_recorder checks the
# layout against the installed API and fails loudly if it changes.
_TRACE_ID, _SPAN_ID, _IS_REMOTE, _TRACE_FLAGS, _TRACE_STATE, _VALID = range(6)
_EMPTY_STATE = trace.DEFAULT_TRACE_STATE
_new_tuple = tuple.__new__


def span_context(
    trace_id: int,
    span_id: int,
    flags: trace.TraceFlags,
    trace_state: trace.TraceState | None,
    is_remote: bool = False,
) -> trace.SpanContext:
    """trace.SpanContext(trace_id, span_id, is_remote, flags, trace_state) for ids known to
    be valid (non-zero, in range), without its constructor's checks."""
    state = _EMPTY_STATE if trace_state is None else trace_state
    return _new_tuple(trace.SpanContext, (trace_id, span_id, is_remote, flags, state, True))


class LiteSpan(ReadableSpan):
    """One span in progress; ended spans are emitted to the processors if sampled.

    Its ids are kept as plain values; the OTel SpanContext is made when something asks for it
    (`context`: a processor, an HTTP propagation, an exporter), which a span that does not
    record never does. It is the SDK's ReadableSpan itself, its fields kept where
    ReadableSpan's properties read them (`_name`, `_attributes`, ...; ReadableSpan.__init__
    is not called), so an ended span goes to the processors as it is: no second object with
    the same fields is built per span (`emit`). While it runs it reads like the SDK's Span for
    processors' on_start (the same properties; `end_time` is None until it ends) and takes
    set_attribute(s), add_event and set_status. test_span_recorder checks every
    ReadableSpan property against a ReadableSpan built the SDK's way."""

    __slots__ = (
        "_attributes",
        "_context",
        "_end_time",
        "_events",
        "_kind",
        "_name",
        "_parent",
        "_start_time",
        "_status",
        "recorder",
        "recording",
        "span_id",
        "trace_hex",
        "trace_id",
        "trace_state",
    )

    # What every LiteSpan has alike, where ReadableSpan's properties look for it.
    _links: tuple[()] = ()
    _instrumentation_info = None
    # The trace flags `inject` writes for it when it does not record (see _PassedOn).
    unrecorded_flags = "00"

    def __init__(
        self,
        recorder: SpanRecorder,
        name: str,
        kind: trace.SpanKind,
        attributes: dict[str, Any],
        parent: LiteSpan | trace.SpanContext | None,
        recording: bool,
        trace_id: int,
        trace_state: trace.TraceState | None = None,  # None: empty
        trace_hex: str | None = None,
    ) -> None:
        self.recorder = recorder
        self._name = name
        self._kind = kind
        self._attributes = dict(attributes)
        self._parent = parent  # a local parent's SpanContext is made only if it is asked for
        self.recording = recording
        self.trace_id = trace_id
        self.span_id = _random_bits(64) or 1  # never the invalid 0
        self.trace_state = trace_state
        self._context: trace.SpanContext | None = None
        # The trace id as W3C writes it, formatted once per trace: traceparent and replies use it.
        # f"{trace_id:032x}", in half its instructions on 3.11 (about 1,250 against 2,550,
        # counted): to_bytes is big-endian by default, bytes.hex lowercase.
        self.trace_hex = trace_hex if trace_hex is not None else trace_id.to_bytes(16).hex()
        self._start_time = time.time_ns()
        self._end_time: int | None = None  # until it ends
        self._events: list[Event] | tuple[()] = ()  # a list from the first event on
        self._status = _UNSET  # Status is immutable: one value serves every span

    @property
    def context(self) -> trace.SpanContext:
        context = self._context
        if context is None:
            flags = _SAMPLED if self.recording else _NOT_SAMPLED
            context = self._context = span_context(
                self.trace_id, self.span_id, flags, self.trace_state
            )
        return context

    @property
    def parent(self) -> trace.SpanContext | None:
        parent = self._parent
        return parent.context if isinstance(parent, LiteSpan) else parent

    @property
    def resource(self) -> Resource:
        return self.recorder.resource

    @property
    def instrumentation_scope(self) -> InstrumentationScope:
        return self.recorder.scope

    def get_span_context(self) -> trace.SpanContext:
        return self.context

    def is_recording(self) -> bool:
        return self.recording

    def set_attributes(self, attributes: dict[str, Any]) -> None:
        self._attributes.update(attributes)

    def set_attribute(self, key: str, value: Any) -> None:
        self._attributes[key] = value

    def set_status(self, status: trace.Status) -> None:
        self._status = status

    def add_event(self, name: str, attributes: dict[str, Any] | None = None) -> None:
        if self.recording:
            if self._events:
                self._events.append(Event(name, attributes))  # type: ignore[union-attr]
            else:
                self._events = [Event(name, attributes)]

    def end(self) -> None:
        if self.recording:
            self._end_time = time.time_ns()
            self.emit()

    def end_soon(self) -> None:
        """End the span now, and hand it to the processors (queue it for export) at the end of
        this event-loop turn: after the reply the turn sends, which would otherwise wait for
        that work. A worker's span and a dispatcher's spans end this way: the reply goes
        first, and the turn's spans are handed over together (`hand_off`)."""
        if self.recording:
            self._end_time = time.time_ns()
            # With the recorder's other spans ended this turn (its method for this cost a call
            # more per span).
            ended = self.recorder._ended
            ended.append(self)
            if len(ended) == 1:  # the turn's first
                self.recorder._emit_at_turn_end()

    def emit(self) -> None:
        """The ended span (a ReadableSpan) to every processor."""
        for hand in self.recorder.enders:
            hand((self,))

    def as_context(self) -> Context:
        """An OTel Context with this span as the current one (for HTTP propagation):
        trace.set_span_in_context(NonRecordingSpan(self.context))'s, without its two calls,
        and the SpanContext made only if something reads it (`_Current`)."""
        current = otel_context.get_current() if _CURRENT is None else _CURRENT.get()
        view = _new_current(_Current)
        view._span = self
        return Context({**current, _SPAN_KEY: view}) if current else Context({_SPAN_KEY: view})

    def make_current(self) -> contextvars.Token[Context]:
        """`context.attach(self.as_context())`: the span current (a provider's HTTP call
        carries its traceparent) until `detach` is given what this returns."""
        if _CURRENT is None:
            return otel_context.attach(self.as_context())
        return _CURRENT.set(self.as_context())


class _Current(trace.NonRecordingSpan):
    """What OTel's current Context holds while a LiteSpan is current (`make_current`): a
    NonRecordingSpan of the span's SpanContext, as trace.set_span_in_context made it, whose
    SpanContext is made when something reads it (a provider's HTTP call propagating it), not
    for every call: making it, and NonRecordingSpan's __init__, were about 5,100 of a worker
    call's instructions (make bench-instr), for a provider that never asked. An exporter that
    reads the span still makes its SpanContext (about 3,400 of those), at export, off the
    call's path. Made with object.__new__ and `_span` set, never through
    NonRecordingSpan.__init__."""

    __slots__ = ("_span",)

    @property
    def _context(self) -> trace.SpanContext:  # type: ignore[override]
        return self._span.context


_new_current = object.__new__


def detach(token: contextvars.Token[Context]) -> None:
    """`context.detach(token)` for a token of `LiteSpan.make_current`."""
    if _CURRENT is None:
        otel_context.detach(token)
        return
    try:
        _CURRENT.reset(token)
    except Exception:  # as OTel's detach: a token of another context is logged, not raised
        log.exception("Failed to detach context")


# The key under which a Context holds its current span (set_span_in_context's), read once.
_SPAN_KEY = next(iter(trace.set_span_in_context(trace.INVALID_SPAN, Context())))


def _current_context_var() -> contextvars.ContextVar[Context] | None:
    """The ContextVar in which OTel's default runtime context keeps the current Context, or
    None under another runtime context (OTEL_PYTHON_CONTEXT). `context.attach` and `detach`
    are two calls each around its set and reset, and `set_span_in_context` two more around
    a copy: about 3,000 instructions of a worker's call (make bench-instr). Not public API:
    tests/test_span_recorder.py fails when a new version keeps it otherwise."""
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    var = getattr(runtime, "_current_context", None)
    if type(runtime) is ContextVarsRuntimeContext and isinstance(var, contextvars.ContextVar):
        return var
    return None


_CURRENT = _current_context_var()


class _PassedOn(LiteSpan):
    """A span started under a remote parent where tracing is off (the ALWAYS_OFF sampler: no
    exporter set). It records nothing, and its context (what `inject` and the providers'
    HTTP calls send on) is that parent's, as it came, flags and trace state included: W3C
    trace context has a participant that does not record pass on the traceparent it got. A
    context of its own, marked not sampled, made a provider or proxy that traces (or a worker
    that does, under a dispatcher that does not) drop the trace its caller sampled. Its local
    children (a dispatcher's attempt spans) pass the same context on."""

    __slots__ = ()

    def __init__(
        self,
        recorder: SpanRecorder,
        name: str,
        kind: trace.SpanKind,
        attributes: dict[str, Any],
        remote: trace.SpanContext,
        trace_hex: str | None = None,
    ) -> None:
        trace_state = remote[_TRACE_STATE]
        super().__init__(
            recorder,
            name,
            kind,
            attributes,
            remote,
            False,
            remote[_TRACE_ID],
            trace_state if trace_state else None,
            trace_hex,
        )
        self.span_id = remote[_SPAN_ID]
        self._context = remote

    @property
    def unrecorded_flags(self) -> str:
        return f"{self._context[_TRACE_FLAGS]:02x}"


def inject(headers: dict[str, str], span: trace.Span | LiteSpan) -> None:
    """W3C trace context of `span` into NATS headers (formatted directly: this is per attempt)."""
    if isinstance(span, LiteSpan):  # always valid: its ids are made here or passed on
        flags = "01" if span.recording else span.unrecorded_flags
        # The span id as f"{span_id:016x}" writes it, cheaper (see LiteSpan's trace_hex).
        headers[TRACEPARENT] = f"00-{span.trace_hex}-{span.span_id.to_bytes(8).hex()}-{flags}"
        if span.trace_state is not None:  # None when empty
            headers[TRACESTATE] = span.trace_state.to_header()
        return
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return
    headers[TRACEPARENT] = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
    if ctx.trace_state:
        headers[TRACESTATE] = ctx.trace_state.to_header()


def trace_id_of(span: trace.Span | LiteSpan) -> str | None:
    if isinstance(span, LiteSpan):
        return span.trace_hex
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def annotate_request(span: LiteSpan, reply, route: str | None) -> None:
    """GenAI semantic-convention attributes on the dispatcher's request span, set one by one
    in its own attributes, as set_attributes would set them: a dict of them built per request
    only to be copied in cost more."""
    attributes = span._attributes
    attributes["gen_ai.operation.name"] = "chat"
    attributes["lifeline.request.id"] = reply.id
    attributes["lifeline.attempts"] = len(reply.attempts)
    if route is not None:
        attributes["lifeline.route"] = route
    if reply.provider is not None:
        attributes["lifeline.provider"] = reply.provider
        attributes["lifeline.target"] = reply.target or reply.provider
        attributes["gen_ai.response.model"] = reply.model or ""
    if reply.template is not None:
        attributes["lifeline.template"] = reply.template
    if reply.usage is not None:
        attributes["gen_ai.usage.input_tokens"] = reply.usage.input_tokens
        attributes["gen_ai.usage.output_tokens"] = reply.usage.output_tokens
    if reply.error is not None:
        attributes["error.type"] = reply.error.type


def attempt_span_template(target) -> tuple[str, dict[str, str]]:
    """Name and fixed attributes of the span of an attempt on `target` (a service.target.Target)."""
    return f"chat {target.model}", {
        **provider_attributes(target.provider, target.kind, target.model),
        "lifeline.target": target.name,
        "lifeline.health_key": str(target.health_key),
    }


def provider_attributes(provider: str, kind: str, model: str) -> dict[str, str]:
    return {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": GEN_AI_PROVIDER.get(kind, kind),
        "gen_ai.request.model": model,
        "lifeline.provider": provider,
    }


def annotate_outcome(span: LiteSpan, reply, error_text: bool = False) -> None:
    """How an attempt (dispatcher) or a provider call (worker) ended. The model and message
    are a provider's words, clipped: a worker sees them before any bound of the wire (a
    300,000-character model name made one span 300 KB, and the export queue counts spans,
    not bytes). The message, which may quote the prompt, only with `error_text`
    (`audit.error_text`); `error.type` and the HTTP status say why without it."""
    attributes = span._attributes  # set one by one, as in annotate_request
    if isinstance(reply, ProviderOk):
        attributes["gen_ai.response.model"] = reply.model[:MAX_NAME_LENGTH]
        attributes["gen_ai.usage.input_tokens"] = reply.usage.input_tokens
        attributes["gen_ai.usage.output_tokens"] = reply.usage.output_tokens
        return
    attributes["error.type"] = reply.kind
    if reply.status_code is not None:
        attributes["http.response.status_code"] = reply.status_code
    message = reply.message[:MAX_MESSAGE_CHARS] if error_text else None
    span.set_status(trace.Status(trace.StatusCode.ERROR, message))


def annotate_cancelled(span: trace.Span | LiteSpan, exc: BaseException | None) -> None:
    """An attempt (or a request left to its next delivery) cancelled before it answered, and
    why when its cancel said so (hedge_lost, aborted, shutting_down): not an error of its own,
    so its status stays unset."""
    why = exc.args[0] if exc is not None and exc.args else None
    attributes = {"lifeline.outcome": "cancelled"}
    if isinstance(why, str):
        attributes["lifeline.cancel.reason"] = why[:MAX_NAME_LENGTH]
    span.set_attributes(attributes)


def annotate_stream(
    span: trace.Span | LiteSpan, chunks: int, first_at: float | None, opened: float
) -> None:
    """A streamed attempt: its chunks, and its time to first token (seconds, as the GenAI
    semantic conventions' gen_ai.server.time_to_first_token metric counts it)."""
    attributes: dict[str, int | float] = {"lifeline.stream.chunks": chunks}
    if first_at is not None:
        attributes["gen_ai.server.time_to_first_token"] = first_at - opened
    span.set_attributes(attributes)
