"""The audit event and the trace of each request: what operators see of every fallback."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

import nats
import nats.js.api
import pytest
from helpers import (
    USER_HELLO,
    DeliveryProxy,
    LocalHTTPServer,
    Service,
    ask,
    config,
    fake,
    hpub,
    raw_publish,
    run_lifeline,
    serving,
    settled,
    wait_for,
)
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from schemas import ProviderFailure, ProviderRequest, subjects
from schemas.streaming import Assembler
from schemas.wire import (
    MAX_ID_LENGTH,
    MAX_NAME_LENGTH,
    ChatMessage,
    CompletionRequest,
    audit_decoder,
    encoder,
    reply_decoder,
)
from service import telemetry
from service.app import Stack, start_dispatcher, start_worker
from service.audit import read_events
from service.client import stream_text
from service.config import AuditSettings, parse_config
from service.natsio import ensure_subscribed
from service.telemetry import Tracing, tracer_provider_from_env

SECRET_PROMPT = "my card number is 4111 1111 1111 1111"


async def test_each_request_yields_exactly_one_audit_event_with_its_attempts(
    lifeline, client, audit
):
    stack = await lifeline(config({"primary": fake(fail_status=503), "backup": fake()}))
    replies = [await ask(client, {**USER_HELLO, "id": f"r{i}"}) for i in range(3)]
    events = await audit.wait_for(3)
    await settled(client, stack)  # a duplicate would have arrived by now
    assert sorted(e.id for _, e in audit.events) == ["r0", "r1", "r2"]
    for (subject, event), reply in zip(sorted(events, key=lambda x: x[1].id), replies):
        assert subject == "llm.audit.ok"
        assert (event.route, event.provider, event.trace_id) == (
            "default",
            "backup",
            reply.trace_id,
        )
        assert [a.provider for a in event.attempts] == ["primary", "backup"]
        assert event.attempts[0].error_type == "server_error"


async def test_audit_events_never_carry_the_prompt_or_the_answer(lifeline, client, audit):
    await lifeline(config({"primary": fake(reply="echo")}))
    reply = await ask(client, {"messages": [{"role": "user", "content": SECRET_PROMPT}]})
    assert reply.content == SECRET_PROMPT  # the echo provider answers with the prompt itself
    await audit.wait_for(1)
    raw = audit.raw[0]
    # Neither the prompt nor the (echoed) answer: ids are random, so match text that no id can hold.
    assert b"card number" not in raw and b"4111 1111" not in raw


async def test_a_failed_request_is_audited_on_the_error_subject(lifeline, client, audit):
    await lifeline(config({"primary": fake(fail_status=500)}))
    await ask(client, USER_HELLO)
    [(subject, event)] = await audit.wait_for(1)
    assert (subject, event.status, event.error_type) == ("llm.audit.error", "error", "all_failed")
    assert event.attempts[0].status_code == 500


async def test_spans_follow_the_genai_conventions_and_record_each_fallback(
    lifeline, client, exporter
):
    await lifeline(
        config({"primary": fake(model="gpt-x", fail_status=429), "backup": fake(model="claude-y")})
    )
    reply = await ask(client, USER_HELLO)
    request_span = next(s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER)
    attempts = [
        s
        for s in exporter.get_finished_spans()
        if s.parent and s.parent.span_id == request_span.context.span_id
    ]
    assert format(request_span.context.trace_id, "032x") == reply.trace_id
    assert request_span.attributes["gen_ai.operation.name"] == "chat"
    assert request_span.attributes["lifeline.route"] == "default"
    assert request_span.attributes["gen_ai.usage.output_tokens"] == reply.usage.output_tokens
    failed, served = sorted(attempts, key=lambda s: s.start_time)
    assert failed.attributes["gen_ai.provider.name"] == "lifeline.fake"
    assert failed.attributes["gen_ai.request.model"] == "gpt-x"
    assert failed.attributes["error.type"] == "rate_limit"
    assert failed.status.status_code == StatusCode.ERROR
    assert served.attributes["gen_ai.response.model"] == "claude-y"
    [event] = [e for e in request_span.events if e.name == "lifeline.fallback"]
    assert event.attributes["lifeline.fallback.from"] == "primary"
    assert event.attributes["lifeline.fallback.to"] == "backup"
    assert event.attributes["lifeline.fallback.reason"] == "rate_limit"
    assert event.attributes["lifeline.fallback.status_code"] == 429


async def test_an_answer_that_fails_its_check_is_a_failed_attempt_in_the_trace(
    lifeline, client, exporter
):
    """The trace shows why the request fell back: the attempt whose answer was not the JSON
    the request asked for is an error span, not a good answer."""
    await lifeline(config({"primary": fake(reply="not json"), "backup": fake(reply='{"a": 1}')}))
    reply = await ask(client, {**USER_HELLO, "response_format": {"type": "json_object"}})
    assert [a.error_type for a in reply.attempts] == ["invalid_output", None]
    request_span = next(s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER)
    failed, served = sorted(
        (
            s
            for s in exporter.get_finished_spans()
            if s.parent and s.parent.span_id == request_span.context.span_id
        ),
        key=lambda s: s.start_time,
    )
    assert failed.attributes["error.type"] == "invalid_output"
    assert failed.status.status_code == StatusCode.ERROR
    assert "error.type" not in served.attributes


async def test_a_failed_request_span_has_error_status_and_type(lifeline, client, exporter):
    await lifeline(config({"primary": fake(fail_status=503)}))
    await ask(client, USER_HELLO)
    request_span = next(s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER)
    assert request_span.status.status_code == StatusCode.ERROR
    assert request_span.attributes["error.type"] == "all_failed"


async def test_one_trace_spans_the_client_the_dispatcher_and_the_worker(
    lifeline, client, exporter, tracers
):
    """A client that sends traceparent sees the dispatcher's and the worker's spans in its trace."""
    await lifeline(config({"primary": fake()}))
    tracer = tracers.get_tracer("test-client")
    with tracer.start_as_current_span("client request") as client_span:
        headers: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(headers)
        reply = await ask(client, USER_HELLO, headers=headers)
    trace_id = client_span.get_span_context().trace_id
    assert reply.trace_id == format(trace_id, "032x")
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert {s.context.trace_id for s in spans.values()} == {trace_id}
    dispatcher_span = next(s for s in spans.values() if s.kind == SpanKind.SERVER)
    assert dispatcher_span.parent.span_id == client_span.get_span_context().span_id
    # client -> dispatcher request span -> attempt span -> worker's provider-call span
    chain = [
        s
        for s in exporter.get_finished_spans()
        if s.kind == SpanKind.CLIENT and s.name.startswith("chat ")
    ]
    attempt = next(s for s in chain if s.parent.span_id == dispatcher_span.context.span_id)
    worker = next(s for s in chain if s.parent.span_id == attempt.context.span_id)
    assert worker.attributes["gen_ai.provider.name"] == "lifeline.fake"


async def test_without_an_exporter_nothing_is_recorded_but_trace_ids_still_flow():
    from service.telemetry import tracer_provider_from_env

    provider = tracer_provider_from_env("lifeline", environ={})
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("x") as span:
        assert not span.is_recording()
        assert span.get_span_context().is_valid
    assert trace.get_current_span() is not span


def test_trace_context_from_headers_round_trips_and_bad_headers_are_ignored():
    from service.telemetry import extract, inject

    span = trace.NonRecordingSpan(
        trace.SpanContext(0x1234, 0x5678, is_remote=False, trace_flags=trace.TraceFlags(1))
    )
    headers: dict[str, str] = {}
    inject(headers, span)
    assert headers["traceparent"] == f"00-{0x1234:032x}-{0x5678:016x}-01"
    parent = trace.get_current_span(extract(headers)).get_span_context()
    assert (parent.trace_id, parent.span_id, parent.is_remote, parent.trace_flags) == (
        0x1234,
        0x5678,
        True,
        1,
    )
    for bad in ("garbage", f"00-{'0' * 32}-{0x5678:016x}-01", f"00-{'z' * 32}-{0x5678:016x}-01"):
        assert not trace.get_current_span(extract({"traceparent": bad})).get_span_context().is_valid


def test_the_engines_positional_builders_fill_every_field_by_its_name():
    """The engine builds the worker's request, the reply and the audit event positionally
    (msgspec's keyword matching costs about 550 instructions per argument, per request): each
    must equal the same struct built by keyword, its fields set to values of their own."""
    import time as _time

    from msgspec import structs

    from schemas import AuditEvent, CompletionReply, ErrorInfo, ProviderOk, ProviderRequest, Usage
    from schemas.deadline import Deadline
    from schemas.wire import Attempt, StreamStats, ToolCall, request_decoder
    from service import engine
    from service.policy import Chain, ChainResult, Limits
    from service.routing import Plan
    from service.target import Target

    request = request_decoder.decode(
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 7, "temperature": 0.5,'
        b' "metadata": {"k": "v"}, "top_p": 0.9, "response_format": {"type": "json_object"},'
        b' "tools": [{"name": "t", "parameters": {"type": "object"}}], "tool_choice": "auto",'
        b' "parallel_tool_calls": false, "stop": ["x"], "seed": 3}'
    )
    plan = Plan(request, "rid", "main", Chain([]), Limits(Deadline(1.0)), None, None, None)
    sent = engine._provider_request(plan)
    assert isinstance(sent, ProviderRequest) and sent.id == "rid" and sent.model is None
    assert (sent.max_tokens, sent.temperature, sent.top_p, sent.seed) == (7, 0.5, 0.9, 3)
    assert (sent.metadata, sent.stop, sent.parallel_tool_calls) == ({"k": "v"}, ["x"], False)
    assert sent.tools == request.tools and sent.tool_choice == "auto"
    assert sent.response_format == request.response_format and sent.messages == request.messages

    target = Target(name="tgt", provider="prov", kind="fake", model="m", timeout_s=1)
    answer = ProviderOk(
        "text",
        "model-x",
        Usage(1, 2),
        tool_calls=[ToolCall("c1", "tool", "{}")],
        finish_reason="tool_calls",
    )
    attempts = [Attempt("prov", "model-x", "ok", 1.5, target="tgt")]
    reply = engine._reply("rid", ChainResult(answer, target, attempts, None), "trace", 1.25)
    assert reply == CompletionReply(
        id="rid",
        status="ok",
        content="text",
        provider="prov",
        model="model-x",
        attempts=attempts,
        usage=Usage(1, 2),
        latency_ms=1.25,
        trace_id="trace",
        target="tgt",
        tool_calls=answer.tool_calls,
        finish_reason="tool_calls",
    )

    reply = structs.replace(reply, latency_ms=2.5, stream=StreamStats(chunks=3))
    before = int(_time.time() * 1000)
    event = engine._audit_event(reply, "main", 42, True)
    assert before <= event.ts_unix_ms <= int(_time.time() * 1000) + 1
    assert event == AuditEvent(
        id="rid",
        status="ok",
        route="main",
        provider="prov",
        model="model-x",
        attempts=attempts,
        latency_ms=2.5,
        trace_id="trace",
        ts_unix_ms=event.ts_unix_ms,
        usage=Usage(1, 2),
        request_bytes=42,
        target="tgt",
        stream=StreamStats(chunks=3),
        finish_reason="tool_calls",
        tools_called=["tool"],
    )
    failed = CompletionReply("rid", "error", error=ErrorInfo("timeout", "slow"))
    event = engine._audit_event(failed, None, 1, False)
    assert (event.error_type, event.route, event.tools_called) == ("timeout", None, [])


async def test_an_audit_stream_that_cannot_be_made_at_start_is_made_once_it_can(
    lifeline, client, caplog, monkeypatch
):
    """A dispatcher that cannot make the audit stream as it starts (a cluster still electing,
    another stream on its subjects) says why and what to do, and keeps trying: it used to try
    once, and its events were kept by nobody for good."""
    from service import audit

    monkeypatch.setattr(audit, "_SETUP_RETRY_S", 0.05)
    caplog.set_level(logging.WARNING, "lifeline.audit")
    js = client.jetstream()
    await js.add_stream(nats.js.api.StreamConfig(name="SQUATTER", subjects=["llm.audit.>"]))
    await lifeline(config({"main": fake()}))
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "events are not kept in stream LIFELINE_AUDIT yet" in said
    assert "another stream already takes these subjects: remove it" in said

    await js.delete_stream("SQUATTER")

    async def made() -> bool:
        try:
            await js.stream_info(AuditSettings().stream)
            return True
        except nats.js.errors.NotFoundError:
            return False

    await wait_for(made, 5)
    reply = await ask(client, {**USER_HELLO, "id": "kept"})

    async def kept() -> list[str]:
        return [
            audit_decoder.decode(data).id
            async for data in read_events(js, AuditSettings(), 0, False)
        ]

    await wait_for(kept, 5)
    assert await kept() == ["kept"] and reply.status == "ok"
    assert "events are kept in stream LIFELINE_AUDIT from now on" in " ".join(
        r.getMessage() for r in caplog.records
    )


@pytest.mark.parametrize("confirm", [False, True], ids=["core", "confirmed"])
async def test_a_requests_event_outlives_an_audit_stream_outage_when_confirmed(
    lifeline, client, audit, confirm
):
    """A request's event is a core publish: sent while the audit stream is away (a cluster's
    has no leader for a few seconds after a node dies), it reaches live subscribers and the
    stream keeps none of it. With audit.confirm_requests it is tried again until the stream
    confirms it, as a job's is, and kept once the stream is back; the reply never waits."""
    from service.audit import ensure_audit_stream

    await lifeline({**config({"main": fake()}), "audit": {"confirm_requests": confirm}})
    js = client.jetstream()
    await js.delete_stream(AuditSettings().stream)
    assert (await ask(client, {**USER_HELLO, "id": "while-gone"})).status == "ok"
    await audit.wait_for(1)  # its first try went by: seen live, kept by no stream
    assert await ensure_audit_stream(js, AuditSettings()) is None
    assert (await ask(client, {**USER_HELLO, "id": "after"})).status == "ok"
    expected = {"while-gone", "after"} if confirm else {"after"}

    async def kept() -> set[str]:
        return {
            audit_decoder.decode(data).id
            async for data in read_events(js, AuditSettings(), 0, False)
        }

    await wait_for(lambda: _at_least(kept, len(expected)), 10, "the events kept", interval_s=0.2)
    assert await kept() == expected


async def test_confirmed_events_waiting_for_the_stream_take_no_requests_place(
    lifeline, client, audit
):
    """With audit.confirm_requests, a request's event waited for the stream in the request's
    own task: while the stream was away (up to 20 s a try), every request answered kept its
    place in max_in_flight, and the next ones were refused overloaded, an audit outage
    turned into an outage of the service. The events wait apart from their requests now."""
    from service.audit import ensure_audit_stream

    stack = await lifeline(
        {**config({"main": fake()}, max_in_flight=2), "audit": {"confirm_requests": True}}
    )
    js = client.jetstream()
    await js.delete_stream(AuditSettings().stream)
    ids = [f"during-{i}" for i in range(5)]
    for request_id in ids:
        reply = await ask(client, {**USER_HELLO, "id": request_id})
        assert reply.status == "ok", reply.error
    assert stack.dispatcher.in_flight == 0  # answered: only their events wait
    assert await ensure_audit_stream(js, AuditSettings()) is None

    async def kept() -> set[str]:
        return {
            audit_decoder.decode(data).id
            async for data in read_events(js, AuditSettings(), 0, False)
        }

    await wait_for(lambda: _at_least(kept, len(ids)), 10, "the events kept", interval_s=0.2)
    assert await kept() == set(ids)


async def test_a_stop_sends_confirmed_events_still_waiting_once_its_grace_is_out(
    lifeline, client, audit, caplog
):
    """A request's event still waiting for the audit stream at a stop gets the rest of the
    shutdown grace, then goes as a core publish (live subscribers see it), said in a warning:
    the stop does not wait out the 20 s of the event's patience."""
    caplog.set_level(logging.WARNING, "lifeline.transport")
    stack = await lifeline(
        {**config({"main": fake()}, shutdown_grace_s=0.5), "audit": {"confirm_requests": True}}
    )
    await client.jetstream().delete_stream(AuditSettings().stream)
    assert (await ask(client, {**USER_HELLO, "id": "at-stop"})).status == "ok"
    seen = len(audit.events)
    await asyncio.wait_for(stack.stop(), 10)
    await audit.wait_for(seen + 1)  # sent once more, as a core publish, at the stop
    assert {event.id for _, event in audit.events} == {"at-stop"}
    assert "1 request events not confirmed by the audit stream within the shutdown grace" in (
        " ".join(r.getMessage() for r in caplog.records)
    )


async def _at_least(kept: Any, count: int) -> bool:
    return len(await kept()) >= count


async def test_jetstream_gone_silent_under_the_audit_stream_is_said_and_its_return_too(
    tracers, caplog, monkeypatch
):
    """nats-server disables JetStream when its disk fills up: the events still reach live
    subscribers, but none is kept, and the server confirms no capture that would tell. The
    dispatcher's look at the stream said nothing (a debug line) for as long as it lasted."""
    from service import audit
    from service.app import start_stack
    from service.embedded import EmbeddedNats

    monkeypatch.setattr(audit, "_WATCH_S", 0.05)
    monkeypatch.setattr(audit, "_SETUP_RETRY_S", 0.05)
    caplog.set_level(logging.WARNING, "lifeline.audit")
    said = lambda: " ".join(r.getMessage() for r in caplog.records)
    server = EmbeddedNats(port=-1)
    server.start()
    stack = await start_stack(parse_config(config({"main": fake()})), server.url, tracers)
    try:
        server.stop(graceful=False)
        server.jetstream = False  # the same port, no JetStream: as a disabled one answers
        server.start()
        await wait_for(lambda: "JetStream does not answer" in said(), timeout_s=15)
        assert "not kept in stream LIFELINE_AUDIT until it does" in said()
        server.stop(graceful=False)
        server.jetstream = True
        server.start()  # an empty store: the stream is made again
        await wait_for(lambda: "kept in stream LIFELINE_AUDIT from now on" in said(), 15)
    finally:
        await stack.stop()
        server.stop()


async def test_an_audit_listing_that_stalls_midway_fails_saying_so(nats_url, client, monkeypatch):
    """`lifeline audit` lists the events the stream holds. When the link stops delivering
    them partway (a stalled or half-dead connection), it fails saying what was shown is not
    all, instead of waiting forever or ending as if that were every event."""
    from service import audit

    monkeypatch.setattr(audit, "_STALL_S", 0.5)
    settings = AuditSettings()
    js = client.jetstream()
    assert await audit.ensure_audit_stream(js, settings) is None
    events = [encoder.encode({"id": f"r{i}", "status": "ok"}) for i in range(300)]
    for event in events:
        await js.publish("llm.audit.ok", event)
    proxy = DeliveryProxy(nats_url, after=50, loses=False)
    through = await nats.connect(await proxy.start())
    read: list[bytes] = []
    try:
        with pytest.raises(audit.AuditStalled, match=r"sent nothing for 0.5 s after \d+ event"):
            async with asyncio.timeout(30):
                async for data in read_events(through.jetstream(), settings, 0, False):
                    read.append(data)
    finally:
        await proxy.close()
        await through.close()
    assert 0 < len(read) < 300
    assert read == events[: len(read)]  # in order, none skipped, up to where it stalled


async def test_an_audit_listing_shows_every_stored_message_and_acts_on_none_of_their_headers(
    nats_url, client
):
    """Any client may publish on llm.audit.>, with any headers, and the stream keeps it. A
    message that looked like JetStream's own (an idle heartbeat, a flow control request: an
    empty body and status 100) was taken for one by the reader's ordered consumer: swallowed
    (the listing short, or failed as stalled), and with a Nats-Consumer-Stalled header the
    reader published to the subject its sender named there."""
    from service import audit

    settings = AuditSettings()
    js = client.jetstream()
    assert await audit.ensure_audit_stream(js, settings) is None
    stolen = await client.subscribe("stolen.>")
    await client.flush()
    idle = b"Status: 100\r\nDescription: Idle Heartbeat\r\n"
    hostile = [  # (header lines, body); nats-server drops a published status line
        (idle, b""),
        (idle + b"Nats-Consumer-Stalled: stolen.here\r\n", b""),
        (b"Status: 100\r\nDescription: FlowControl Request\r\n", b""),
        (b"Status: 100\r\n", b""),
        (b"Status: 404\r\nDescription: No Messages\r\n", b""),
        (b"Status: 404\r\nDescription: No Messages\r\n", b"a 404"),
        (b"Status: 409\r\nDescription: Consumer Deleted\r\n", b"a 409"),
        (b"Status: 408\r\nDescription: Request Timeout\r\n", b"a 408"),
        (b"Status: 503\r\n", b"a 503"),
        (b"Status: 400\r\n", b"a 400"),
    ]
    stored: list[bytes] = []

    async def keep(publish: Any, data: bytes) -> None:
        await publish
        stored.append(data)
        # stored in this order: the next one waits for it
        await wait_for(
            lambda: _holds(js, settings.stream, len(stored)), 5, what=f"{len(stored)} kept"
        )

    def sent(lines: bytes, body: bytes) -> Any:
        return raw_publish(nats_url, [hpub(b"llm.audit.ok", b"NATS/1.0\r\n%s\r\n" % lines, body)])

    for n, (lines, body) in enumerate(hostile):
        await keep(js.publish("llm.audit.ok", b"event %d" % n), b"event %d" % n)
        await keep(sent(lines, body), body)
    await keep(sent(*hostile[1]), b"")  # the last one too

    async def listed() -> list[bytes]:
        async with asyncio.timeout(20):
            return [data async for data in read_events(js, settings, 0, False)]

    assert await listed() == stored
    assert (await js.stream_info(settings.stream)).state.messages == len(stored)
    last_two = [data async for data in read_events(js, settings, 2, False)]
    assert last_two == stored[-2:]
    await client.flush()
    await asyncio.sleep(0.3)  # the reader's publish, had it made one, has come by now
    with pytest.raises(nats.errors.TimeoutError):
        await stolen.next_msg(timeout=0.1)


async def _holds(js: Any, stream: str, messages: int) -> bool:
    return (await js.stream_info(stream)).state.messages >= messages


def test_a_collector_that_hangs_does_not_hold_a_stopping_process(nats_url, tmp_path):
    """The SDK's shutdown waits up to 30 s for its last export (and the OTLP exporter retries
    meanwhile): with its collector down, a stopped dispatcher went on 32 s after SIGTERM, past
    a supervisor's kill timeout. It waits SHUTDOWN_S for both now, and says what it left."""
    hung = socket.socket()  # accepts connections (its backlog), never answers
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{hung.getsockname()[1]}",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    service = Service(tmp_path, nats_url, config({"main": fake()}), env)
    try:
        dispatcher = service.dispatcher()
        reply = run_lifeline("ask", "--nats-url", nats_url, "hello")
        assert "no_responders" in reply.stdout + reply.stderr  # a request, so spans to export
        time.sleep(0.2)  # its spans on their way to the collector that hangs
        dispatcher.proc.send_signal(signal.SIGTERM)
        # About SHUTDOWN_S (3 s) for its spans and metrics together; 20 s without a bound.
        assert dispatcher.proc.wait(timeout=12) == 0
        assert "the last spans were not exported within 3 s" in dispatcher.log()
        # Shut down once, by Lifeline: the SDK's own exit hook warned of a second shutdown.
        assert "can only be called once" not in dispatcher.log()
    finally:
        service.stop()
        hung.close()


class _EndlessCollector(BaseHTTPRequestHandler):
    """A "collector" answering each export 200 with a body that never ends (a wrong endpoint,
    a proxy's stream)."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        chunk = b"x" * 65536
        try:
            while True:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:  # the exporter hung up
            pass

    def log_message(self, *args: object) -> None:
        pass


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


async def test_a_collector_answering_without_end_does_not_grow_the_process(
    nats_url, client, tmp_path
):
    """`requests` read an OTLP collector's answer whole: one answering a body without end grew
    a dispatcher by 120 MB a second, to its OOM kill. An answer is read to 64 KiB at most."""
    with serving(LocalHTTPServer(_EndlessCollector)) as collector:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.server_address[1]}",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_METRIC_EXPORT_INTERVAL": "200",
        }
        service = Service(tmp_path, nats_url, config({"main": fake()}), env)
        try:
            dispatcher = service.dispatcher()
            before = grown = _rss_kib(dispatcher.pid)
            end = time.monotonic() + 3
            while time.monotonic() < end and grown - before < 256 * 1024:
                # Answered no_responders (no worker runs): spans all the same, to export.
                replies = await asyncio.gather(*(ask(client, USER_HELLO) for _ in range(20)))
                assert all(r.error is not None for r in replies)
                grown = _rss_kib(dispatcher.pid)
            assert grown - before < 64 * 1024, f"grew {(grown - before) // 1024} MiB"
            assert "Failed to export" not in dispatcher.log()  # answered 200: exported
        finally:
            service.stop()


class _DrippingCollector(BaseHTTPRequestHandler):
    """A "collector" whose first answer comes a byte at a time, for as long as the exporter
    listens (a proxy or collector that is stuck, a link that trickles), in its headers or in
    its body; every later export is answered at once, and its spans' trace ids kept."""

    protocol_version = "HTTP/1.1"
    drip_in: ClassVar[str] = "headers"
    answered: ClassVar[int] = 0
    trace_ids: ClassVar[set[int]] = set()
    stop: ClassVar[threading.Event] = threading.Event()

    def do_POST(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).answered += 1
        if self.answered == 1:
            self._drip()
            return
        exported = ExportTraceServiceRequest.FromString(body)
        for resource in exported.resource_spans:
            for scope in resource.scope_spans:
                self.trace_ids.update(int.from_bytes(s.trace_id) for s in scope.spans)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def _drip(self) -> None:
        if self.drip_in == "headers":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nx-slow: ")
        else:
            self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n")
        try:
            while not self.stop.wait(0.05):  # a byte every 50 ms: each read well in time
                self.wfile.write(b"x")
                self.wfile.flush()
        except OSError:  # the exporter hung up
            pass
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("drip_in", ["headers", "body"])
def test_a_collector_that_drips_its_answer_holds_no_export_past_its_timeout(monkeypatch, drip_in):
    """The OTLP exporter's timeout (OTEL_EXPORTER_OTLP_TIMEOUT, 10 s by default) bounds an
    export's whole time, the SDK says; `requests` bounds each read of the socket instead. A
    collector answering a byte at a time held the export thread for as long as it dripped: no
    span was exported again, even once the collector was well, and the queue dropped them."""
    _DrippingCollector.drip_in, _DrippingCollector.answered = drip_in, 0
    _DrippingCollector.trace_ids = set()
    _DrippingCollector.stop = threading.Event()
    with serving(LocalHTTPServer(_DrippingCollector)) as collector:
        monkeypatch.setenv(
            "OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.server_address[1]}"
        )
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        provider = tracer_provider_from_env("lifeline-test")
        spans = provider.recorder("test")
        try:
            spans.start("first", SpanKind.SERVER, {}).end()  # its export meets the drip
            deadline = time.monotonic() + 5
            while _DrippingCollector.answered == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            later = spans.start("later", SpanKind.SERVER, {})
            later.end()
            deadline = time.monotonic() + 30  # the export's timeout is 1 s
            while later.trace_id not in _DrippingCollector.trace_ids:
                assert time.monotonic() < deadline, "a later span was never exported"
                time.sleep(0.05)
        finally:
            _DrippingCollector.stop.set()
            telemetry.shut_down(provider)


class _TLSCollector(BaseHTTPRequestHandler):
    """A collector over HTTPS that keeps the trace ids of the spans it was sent."""

    trace_ids: ClassVar[set[int]] = set()

    def do_POST(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        exported = ExportTraceServiceRequest.FromString(
            self.rfile.read(int(self.headers["content-length"]))
        )
        for resource in exported.resource_spans:
            for scope in resource.scope_spans:
                self.trace_ids.update(int.from_bytes(s.trace_id) for s in scope.spans)
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _collector_certificate(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A CA of the test's own, and a certificate it signed for 127.0.0.1, with its key."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=t-ca")
    openssl("req", *ec, "-keyout", "c.key", "-out", "c.csr", "-subj", "/CN=collector")
    (tmp_path / "c.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    signed = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1"]
    openssl("x509", "-req", "-in", "c.csr", "-out", "c.pem", "-extfile", "c.ext", *signed)
    return tmp_path / "ca.pem", tmp_path / "c.pem", tmp_path / "c.key"


def test_the_otlp_certificate_is_trusted_beside_a_requests_ca_bundle(monkeypatch, tmp_path):
    """OTEL_EXPORTER_OTLP_CERTIFICATE was ignored wherever REQUESTS_CA_BUNDLE (or
    CURL_CA_BUNDLE) is set, as in many images: `requests` lets those variables override a
    session's own `verify`, which is where the SDK puts the certificate. Every export to a
    collector signed by that CA failed with CERTIFICATE_VERIFY_FAILED."""
    ca, cert, key = _collector_certificate(tmp_path)
    system = ssl.get_default_verify_paths().cafile or ssl.get_default_verify_paths().openssl_cafile
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", system)  # a bundle without the collector's CA
    _TLSCollector.trace_ids = set()
    server = LocalHTTPServer(_TLSCollector)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    with serving(server) as collector:
        endpoint = f"https://127.0.0.1:{collector.server_address[1]}"
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(ca))
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        provider = tracer_provider_from_env("lifeline-test")
        try:
            span = provider.recorder("test").start("sent", SpanKind.SERVER, {})
            span.end()
            provider.force_flush(10_000)
            assert span.trace_id in _TLSCollector.trace_ids, "the span was not exported"
        finally:
            telemetry.shut_down(provider)


async def test_a_clients_long_tracestate_never_fails_a_request_that_fits_without_it(
    lifeline, client, exporter
):
    """A valid tracestate may be 8 KB (32 members); a request's size check keeps 1 KB for an
    attempt's headers. A request that fit the NATS server with the client's tracestate failed
    every attempt as bad_request ("shorten the messages") once the dispatcher's own headers
    were added. Tracing is advisory: the tracestate is left behind, the trace goes on."""
    await lifeline(config({"primary": fake(reply="hi")}))
    traceparent = f"00-{0x1234:032x}-{0x5678:016x}-01"
    headers = {
        "traceparent": traceparent,
        "tracestate": ",".join(f"k{i}={'v' * 240}" for i in range(32)),
    }
    header_bytes = len("NATS/1.0\r\n\r\n") + sum(len(k) + len(v) + 4 for k, v in headers.items())
    empty = len(encoder.encode({"messages": [{"role": "user", "content": ""}]}))
    room = client.max_payload - header_bytes - 64  # the client's message fits, just
    request = encoder.encode({"messages": [{"role": "user", "content": "x" * (room - empty)}]})
    reply = await ask(client, request, headers=headers)
    assert reply.status == "ok", (reply.error, reply.attempts)
    # Still one trace, the client's: the request's span, the attempt's, the worker's.
    spans = exporter.get_finished_spans()
    assert sorted(s.name for s in spans) == ["chat", "chat fake-1", "chat fake-1"]
    assert {s.context.trace_id for s in spans} == {0x1234}


def cancel_reasons(exporter) -> list[str]:
    """The lifeline.cancel.reason of every cancelled attempt span exported so far."""
    return [
        s.attributes.get("lifeline.cancel.reason", "")
        for s in exporter.get_finished_spans()
        if s.kind == SpanKind.CLIENT and s.attributes.get("lifeline.outcome") == "cancelled"
    ]


async def test_a_cancelled_attempt_says_so_and_why_in_its_span(lifeline, client, exporter):
    """A hedge's loser and an aborted request's attempt ended as plain, successful-looking
    spans: their outcome and reason were only in the reply's attempts."""
    cfg = config({"slow": fake(latency_ms=3000), "fast": fake(latency_ms=100)})
    cfg["routes"] = {
        "hedged": {"targets": ["slow", "fast"], "hedge_after_ms": 50},
        "default": {"targets": ["slow"]},
    }
    stack = await lifeline(cfg)
    reply = await ask(client, {**USER_HELLO, "route": "hedged"})
    assert [(a.target, a.outcome, a.reason) for a in reply.attempts] == [
        ("slow", "cancelled", "hedge_lost"),
        ("fast", "ok", None),
    ]
    inbox = client.new_inbox()
    answers = await client.subscribe(inbox)
    body = encoder.encode({**USER_HELLO, "id": "to-abort"})
    await client.publish(subjects.COMPLETE, body, reply=inbox, headers={subjects.ABORT_KEY: "k"})
    await wait_for(lambda: stack.dispatcher.in_flight == 1)
    await client.publish(subjects.ABORT, b"k")
    assert reply_decoder.decode((await answers.next_msg(timeout=5)).data).error.type == "aborted"

    await wait_for(
        lambda: sorted(cancel_reasons(exporter)) == ["aborted", "hedge_lost"],
        what=lambda: cancel_reasons(exporter),
    )


async def test_a_hedged_request_aborted_while_both_calls_run_says_why_in_their_spans(
    lifeline, client, exporter
):
    """An llm.complete request aborted after its hedge began: both its calls' spans said
    cancelled without a reason, though its reply's attempts said aborted for each."""
    cfg = config({"a": fake(latency_ms=3000), "b": fake(latency_ms=3000)})
    cfg["routes"] = {"default": {"targets": ["a", "b"], "hedge_after_ms": 50}}
    stack = await lifeline(cfg)
    inbox = await client.subscribe(client.new_inbox())
    body = encoder.encode({**USER_HELLO, "id": "to-abort"})
    await client.publish(
        subjects.COMPLETE, body, reply=inbox.subject, headers={subjects.ABORT_KEY: "k"}
    )
    await wait_for(lambda: all(stack.workers[t].in_flight for t in "ab"), what="the hedge")
    await client.publish(subjects.ABORT, b"k")
    reply = reply_decoder.decode((await inbox.next_msg(timeout=5)).data)
    assert [(a.target, a.outcome, a.reason) for a in reply.attempts] == [
        ("a", "cancelled", "aborted"),
        ("b", "cancelled", "aborted"),
    ]

    await wait_for(
        lambda: cancel_reasons(exporter) == ["aborted", "aborted"],
        what=lambda: cancel_reasons(exporter),
    )


async def test_a_cancelled_streamed_attempt_says_why_in_its_span(lifeline, client, exporter):
    """On llm.stream, a hedge's loser and an aborted request's attempt said cancelled in their
    spans but not why, though the reply's attempts gave hedge_lost and aborted."""
    cfg = config(
        {
            # Its first chunk long after the hedge's 50 ms, however late a loaded machine is.
            "slow": fake(reply="a b c d", chunks=4, chunk_delay_ms=400, latency_ms=600),
            "fast": fake(latency_ms=3000),
        }
    )
    cfg["routes"] = {
        "hedged": {"targets": ["slow", "fast"], "hedge_after_ms": 50},
        "default": {"targets": ["slow"]},
    }
    await lifeline(cfg)
    hedged = CompletionRequest([ChatMessage("user", "hi")], route="hedged", timeout_s=10)
    _, reply = await stream_text(client, hedged)
    assert [(a.target, a.outcome, a.reason) for a in reply.attempts] == [
        ("slow", "ok", None),
        ("fast", "cancelled", "hedge_lost"),
    ]
    inbox = await client.subscribe(client.new_inbox())
    body = encoder.encode({**USER_HELLO, "id": "to-abort", "timeout_s": 10})
    await client.publish(
        subjects.STREAM, body, reply=inbox.subject, headers={subjects.ABORT_KEY: "k"}
    )
    assembler, event = Assembler(), None
    while event is None or event.kind != "delta":  # the abort comes mid-stream
        msg = await inbox.next_msg(timeout=5)
        event = assembler.feed(msg.headers, msg.data)
    await client.publish(subjects.ABORT, b"k")

    await wait_for(
        lambda: sorted(cancel_reasons(exporter)) == ["aborted", "hedge_lost"],
        what=lambda: cancel_reasons(exporter),
    )


class _TraceparentsSeen(BaseHTTPRequestHandler):
    """OpenAI's chat completions, answering "hi"; keeps each call's traceparent header."""

    seen: ClassVar[list[str | None]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.seen.append(self.headers.get("traceparent"))
        answer = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hi"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


async def _ask_split_tracing(
    nats_url: str, client, worker_tracers: Tracing, dispatcher_tracers: Tracing, **ask_kw
) -> list[str | None]:
    """One request through a dispatcher and an OpenAI worker traced by their own providers;
    the traceparent headers the provider's HTTP server saw."""
    _TraceparentsSeen.seen = []
    with serving(LocalHTTPServer(_TraceparentsSeen)) as server:
        base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        openai = {"kind": "openai", "model": "m", "base_url": base_url, "api_key_env": ""}
        cfg = parse_config(config({"local": openai}))
        stack = Stack()
        try:
            component, _ = await start_worker(cfg, "local", nats_url, worker_tracers)
            stack.components.append(component)
            component, stack.dispatcher = await start_dispatcher(cfg, nats_url, dispatcher_tracers)
            stack.components.append(component)
            reply = await ask(client, USER_HELLO, **ask_kw)
        finally:
            await stack.stop()
    assert reply.status == "ok", reply.error
    return _TraceparentsSeen.seen


async def test_a_worker_that_does_not_trace_passes_its_callers_sampled_context_on_to_the_provider(
    nats_url, client, tracers, exporter
):
    """With its tracing off, a worker sent its own unsampled context (flags 00) on the
    provider's HTTP call: a provider or proxy that traces dropped the trace the dispatcher
    sampled. It passes on the traceparent it was sent, as W3C trace context asks."""
    untraced = tracer_provider_from_env("lifeline-worker-local", environ={})
    seen = await _ask_split_tracing(nats_url, client, untraced, tracers)
    [attempt] = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
    sent = attempt.context
    assert seen == [f"00-{sent.trace_id:032x}-{sent.span_id:016x}-01"]


async def test_a_dispatcher_that_does_not_trace_passes_its_callers_sampled_context_to_the_worker(
    nats_url, client, tracers, exporter
):
    """With the dispatcher's tracing off, its attempts sent the worker their own unsampled
    context: a worker that traces recorded nothing of a trace its client sampled."""
    caller = trace.SpanContext(0x1234, 0x5678, False, trace.TraceFlags(trace.TraceFlags.SAMPLED))
    headers = {subjects.TRACEPARENT: f"00-{caller.trace_id:032x}-{caller.span_id:016x}-01"}
    untraced = tracer_provider_from_env("lifeline-dispatcher", environ={})
    seen = await _ask_split_tracing(nats_url, client, tracers, untraced, headers=headers)
    [worker] = exporter.get_finished_spans()
    assert (worker.context.trace_id, worker.parent.span_id) == (caller.trace_id, caller.span_id)
    assert seen == [f"00-{caller.trace_id:032x}-{worker.context.span_id:016x}-01"]


async def test_a_dead_lettered_jobs_span_carries_its_id_clipped_as_every_span_does(
    lifeline, client, exporter, monkeypatch, audit
):
    """A job's id may come from its Nats-Msg-Id, which nothing bounds but JetStream's 64 KiB
    of headers: the `job` span of one dead-lettered carried all of it (a 60 KB span, where
    every other span's ids and names are at most 256 characters, and the export queue counts
    spans, not bytes); its result and audit event carried it too, where a job answered
    refuses such an id (answered without one)."""
    from service import jobs

    async def broken(self: Any, *_: Any) -> None:
        raise RuntimeError("results bucket unreachable")

    monkeypatch.setattr(jobs.Jobs, "_answer", broken)
    monkeypatch.setattr(jobs, "_RETRY_DELAY_S", 0.1)
    data = config({"main": fake()})
    data["jobs"] = {"max_deliver": 2}
    await lifeline(data)
    long_id = "j" * 60_000
    body = encoder.encode({"messages": [{"role": "user", "content": "hi"}]})  # no id of its own
    await client.jetstream().publish(subjects.JOBS_SUBMIT, body, headers={subjects.MSG_ID: long_id})

    def job_spans() -> list[Any]:
        return [s for s in exporter.get_finished_spans() if s.name == "job"]

    await wait_for(lambda: len(job_spans()) == 1, timeout_s=15, what="the dead-lettered span")
    [span] = job_spans()
    assert span.attributes["lifeline.job.outcome"] == "dead_lettered"
    request_id = span.attributes["lifeline.request.id"]
    assert 0 < len(request_id) <= MAX_ID_LENGTH and long_id.startswith(request_id)
    [(_, event)] = await audit.wait_for(1)
    assert event.id == "" and event.error_type == "internal", event


async def test_a_workers_status_code_past_any_http_one_is_no_status(
    lifeline, client, exporter, caplog
):
    """A worker (of another language, or a buggy one) may answer any integer as its HTTP
    status: msgspec decodes it whole. On an attempt's span and its fallback event, one past
    an int64 could not be encoded for OTLP: the exporter logged a traceback for it at every
    export and sent the span without it (a reply and an audit event carried it, which a
    client decoding an int64 cannot read). A status code is three digits; any other is none."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    await lifeline(config({"odd": fake(), "backup": fake(reply="backup")}), workers=["backup"])

    async def fails_with_a_wild_status(msg: Any) -> None:
        failure = ProviderFailure("server_error", "down", status_code=2**64)
        await client.publish(msg.reply, encoder.encode(failure))

    await client.subscribe(subjects.provider_subject("odd"), cb=fails_with_a_wild_status)
    await ensure_subscribed(client)
    reply = await ask(client, USER_HELLO)
    assert (reply.status, reply.content) == ("ok", "backup")
    assert (reply.attempts[0].error_type, reply.attempts[0].status_code) == ("server_error", None)
    spans = exporter.get_finished_spans()
    assert len(spans) == 4  # the request's, two attempts', the backup worker's
    encode_spans(spans)  # what the OTLP exporter sends
    assert "Failed to encode" not in caplog.text


async def test_a_model_name_sent_straight_to_a_worker_is_clipped_on_its_span(
    lifeline, client, exporter
):
    """A request on llm.provider.<name> may come from any client the NATS server lets publish
    there, with a model name as long as max_payload: the worker's span carried it twice (its
    name and gen_ai.request.model), 2 MB a span in an export queue that counts spans, and kept
    it among its span templates (256 of them: 500 MB held for good)."""
    await lifeline(config({"main": fake()}))
    model = "m" * 400_000
    request = ProviderRequest(id="direct", messages=[ChatMessage("user", "hi")], model=model)
    await client.request(subjects.provider_subject("main"), encoder.encode(request), timeout=10)
    await wait_for(lambda: exporter.get_finished_spans(), what="the worker's span")
    [span] = exporter.get_finished_spans()
    assert len(span.name) <= len("chat ") + MAX_NAME_LENGTH
    assert model.startswith(span.attributes["gen_ai.request.model"])
    assert len(span.attributes["gen_ai.request.model"]) == MAX_NAME_LENGTH
