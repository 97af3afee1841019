"""llm.stream over a real nats-server: deltas as they come, fallback before the first chunk,
and reset / continue / fail once output has started."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import msgspec
import nats
import pytest
import uvloop
from helpers import (
    USER_HELLO,
    LocalHTTPServer,
    Service,
    ask,
    config,
    fake,
    loop_stall,
    peer_on_its_own_loop,
    serving,
    settled,
    wait_for,
)
from opentelemetry.trace import SpanKind

from schemas import (
    Attempt,
    ChatMessage,
    CompletionReply,
    CompletionRequest,
    ProviderFailure,
    ProviderOk,
    ProviderRequest,
    Usage,
    subjects,
)
from schemas.streaming import END, ERROR, Assembler, StreamGap
from schemas.wire import (
    MAX_ID_LENGTH,
    audit_decoder,
    encoder,
    provider_request_decoder,
    reply_decoder,
)
from service.app import start_stack
from service.client import NoAnswer, NoDispatcher, stream, stream_text
from service.config import parse_config
from service.embedded import EmbeddedNats
from service.natsio import ensure_subscribed
from service.streaming import Relay
from service.telemetry import Tracing
from service.transport import ClientStream

ANSWER = "The quick brown fox jumps over the lazy dog, twice."


def request(text: str = ANSWER, **fields: Any) -> CompletionRequest:
    return CompletionRequest(messages=[ChatMessage("user", text)], **{"timeout_s": 5, **fields})


async def events_of(client, req: CompletionRequest) -> list:
    return [event async for event in stream(client, req)]


def kinds(events: list) -> list[str]:
    return [e.kind for e in events]


def route(*targets: Any, **settings: Any) -> dict[str, Any]:
    return {"default": {"targets": list(targets), **settings}}


# ---- the happy path ---------------------------------------------------------------------------


async def test_deltas_arrive_in_order_and_end_with_the_reply_without_the_text(
    lifeline, client, audit
):
    await lifeline(config({"main": fake(chunks=5)}))
    events = await events_of(client, request())
    assert kinds(events) == ["delta"] * 5 + ["end"]
    assert [e.seq for e in events] == [1, 2, 3, 4, 5, 6]
    assert "".join(e.text for e in events) == ANSWER
    end = events[-1].reply
    assert (end.status, end.content, end.provider) == ("ok", None, "main")
    assert end.stream is not None and (end.stream.chunks, end.stream.resets) == (5, 0)
    assert end.stream.ttft_ms is not None and end.stream.ttft_ms > 0
    assert [(a.outcome, a.chunks) for a in end.attempts] == [("ok", 5)]
    [(subject, event)] = await audit.wait_for(1)
    assert subject == "llm.audit.ok" and event.stream == end.stream


# ---- before the first chunk: the client never sees the failed attempt -----------------------


@pytest.mark.parametrize(
    "primary, workers, failure",
    [
        (fake(fail_status=503), None, "server_error"),
        (fake(timeout_s=60), ["backup"], "no_responders"),  # no worker runs for primary
        (fake(latency_ms=3000), None, "timeout"),  # its first token comes too late (ttft_s)
    ],
    ids=["error", "no_responders", "ttft"],
)
async def test_a_failure_before_the_first_chunk_falls_back_unseen(
    lifeline, client, primary, workers, failure
):
    routes = route({"provider": "primary", "ttft_s": 0.2}, "backup")
    await lifeline(config({"primary": primary, "backup": fake(chunks=3)}, routes), workers)
    events = await events_of(client, request())
    assert kinds(events) == ["delta", "delta", "delta", "end"]  # no reset: nothing to take back
    assert {e.attempt for e in events} == {2}
    assert "".join(e.text for e in events) == ANSWER
    first, second = events[-1].reply.attempts
    assert (first.target, first.error_type, first.chunks) == ("primary", failure, 0)
    assert (second.target, second.outcome) == ("backup", "ok")


async def test_a_failure_before_the_first_chunk_is_retried_and_one_after_it_is_not(
    lifeline, client
):
    providers = {"flaky": fake(fail_on_request=True, chunks=4), "backup": fake()}
    await lifeline(config(providers, route({"provider": "flaky", "retries": 2}, "backup")))
    _, reply = await stream_text(client, request("fail 503"))
    assert [(a.target, a.retry) for a in reply.attempts][:3] == [
        ("flaky", 0),
        ("flaky", 1),
        ("flaky", 2),
    ]
    _, reply = await stream_text(client, request("fail 503 after 2"))
    assert [(a.target, a.retry, a.chunks) for a in reply.attempts] == [
        ("flaky", 0, 2),
        ("backup", 0, 4),
    ]


# ---- after the first chunk ---------------------------------------------------------------------


async def test_reset_voids_the_failed_attempts_chunks_and_the_text_is_the_next_answer(
    lifeline, client, audit, exporter
):
    providers = {
        "flaky": fake(fail_on_request=True, chunks=6),
        "backup": fake(reply="An answer from the backup, whole.", chunks=4),
    }
    await lifeline(config(providers))
    assembler = Assembler()
    events = [e async for e in stream(client, request("fail 503 after 3"), assembler)]
    assert kinds(events) == ["delta"] * 3 + ["reset"] + ["delta"] * 4 + ["end"]
    reset = events[3].reset
    assert (reset.attempt, reset.discard, reset.error.type) == (1, 3, "server_error")
    assert assembler.text == "An answer from the backup, whole."
    end = events[-1].reply
    assert end.stream.resets == 1 and end.stream.chunks == 7
    assert [(a.target, a.outcome, a.chunks, a.next) for a in end.attempts] == [
        ("flaky", "error", 3, "fallback"),
        ("backup", "ok", 4, None),
    ]
    [(_, audited)] = await audit.wait_for(1)
    assert audited.stream.resets == 1
    [request_span] = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    [event] = [e for e in request_span.events if e.name == "lifeline.reset"]
    assert dict(event.attributes) == {
        "lifeline.reset.attempt": 1,
        "lifeline.reset.discard": 3,
        "lifeline.reset.reason": "server_error",
    }
    attempt_spans = [  # the dispatcher's (the workers' spans are CLIENT spans too)
        s for s in exporter.get_finished_spans() if "lifeline.health_key" in s.attributes
    ]
    assert all("gen_ai.server.time_to_first_token" in s.attributes for s in attempt_spans)
    assert sorted(s.attributes["lifeline.stream.chunks"] for s in attempt_spans) == [3, 4]


async def test_continue_hands_the_text_so_far_to_a_target_that_takes_a_prefill(lifeline, client):
    providers = {
        "flaky": fake(fail_on_request=True, chunks=4),
        "resumer": fake(reply="request", chunks=2),  # answers with the request it got, as JSON
    }
    routes = route("flaky", {"provider": "resumer", "prefill": True}, on_midstream="continue")
    await lifeline(config(providers, routes))
    events = await events_of(client, request("fail 503 after 2"))
    assert kinds(events) == ["delta", "delta", "reset", "delta", "delta", "end"]
    reset = events[2].reset
    assert (reset.attempt, reset.discard) == (1, 0)  # nothing voided: the next one goes on
    partial = events[0].text + events[1].text
    assert partial == "fail 503 after 2"[: len(partial)] and partial
    sent = provider_request_decoder.decode(events[3].text + events[4].text)
    assert sent.messages[-1] == ChatMessage("assistant", partial)


async def test_continue_falls_back_to_reset_for_a_target_without_prefill(lifeline, client):
    providers = {"flaky": fake(fail_on_request=True, chunks=4), "backup": fake(reply="whole")}
    await lifeline(config(providers, route("flaky", "backup", on_midstream="continue")))
    assembler = Assembler()
    events = [e async for e in stream(client, request("fail 503 after 2"), assembler)]
    [reset] = [e.reset for e in events if e.kind == "reset"]
    assert reset.discard == 2
    assert assembler.text == "whole"


@pytest.mark.parametrize(
    "sent, counted",
    [([b"one ", b"three "], 3), ([b"one ", b"one ", b"two "], 2)],
    ids=["lost", "extra"],
)
async def test_continue_never_goes_on_from_text_whose_chunks_were_lost_or_added(
    lifeline, client, sent, counted
):
    """A worker's end counts more chunks than arrived (one lost on the way, in the middle) or
    fewer (one sent twice): the text so far is not what it wrote. Handed on as a prefill, the
    next target went on from it (a reset with discard 0), and the client's answer kept the
    hole, or the repeat, with nothing to tell it: it is voided, as a target without prefill
    would have it."""
    providers = {"liar": fake(), "resumer": fake(reply="whole", chunks=1)}
    routes = route("liar", {"provider": "resumer", "prefill": True}, on_midstream="continue")
    await lifeline(config(providers, routes), workers=["resumer"])

    async def streams_then_miscounts(msg: Any) -> None:
        for chunk in sent:
            await client.publish(msg.headers[subjects.STREAM_TO], chunk)
        await client.publish(msg.reply, encoder.encode(ProviderOk("", "m", chunks=counted)))

    await client.subscribe(subjects.provider_subject("liar"), cb=streams_then_miscounts)
    await ensure_subscribed(client)
    assembler = Assembler()
    events = [e async for e in stream(client, request(), assembler)]
    [reset] = [e.reset for e in events if e.kind == "reset"]
    assert (reset.attempt, reset.discard) == (1, len(sent))
    assert assembler.text == "whole" and events[-1].reply.status == "ok"


async def test_continue_never_goes_on_from_text_streamed_across_the_dispatchers_outage(
    nats_url, tracers, client
):
    """The dispatcher's connection dropped and came back mid-stream: a chunk the worker sent
    meanwhile was lost, and the attempt then failed with no end to count its chunks by. The
    next target went on from the text with the hole in it; it is voided instead."""
    from test_client import _Cuttable

    from service.app import start_worker

    proxy = _Cuttable(nats_url)
    providers = {"liar": fake(), "resumer": fake(reply="whole", chunks=1)}
    routes = route("liar", {"provider": "resumer", "prefill": True}, on_midstream="continue")
    cfg = parse_config(config(providers, routes))
    stack = await start_stack(cfg, await proxy.up(), tracers, workers=[])
    resumer, _ = await start_worker(cfg, "resumer", nats_url, tracers)  # not behind the proxy
    asked: list[Any] = []

    async def streams(msg: Any) -> None:
        asked.append(msg)
        await client.publish(msg.headers[subjects.STREAM_TO], b"one ")

    try:
        await client.subscribe(subjects.provider_subject("liar"), cb=streams)
        await ensure_subscribed(client)
        assembler = Assembler()
        events = stream(client, request(timeout_s=30), assembler)
        async with events:
            async for event in events:
                if event.kind == "delta":
                    break
            dispatcher = stack.dispatcher.transport.nc
            await proxy.down()
            await wait_for(lambda: not dispatcher.is_connected)
            to = asked[0].headers[subjects.STREAM_TO]
            await client.publish(to, b"two ")  # lost with the dispatcher's connection
            await client.flush()
            await proxy.up()
            await wait_for(lambda: dispatcher.is_connected, 10)
            await dispatcher.flush()
            await client.publish(to, b"three ")
            failure = ProviderFailure("server_error", "cut off")
            await client.publish(asked[0].reply, encoder.encode(failure))
            reply = await events.finish()
        assert reply.status == "ok" and "three" not in assembler.text, (
            reply.error,
            reply.attempts,
            assembler.text,
        )
        assert assembler.text == "whole"
    finally:
        await stack.stop()
        await resumer.stop()
        await proxy.down()


async def test_continue_with_text_too_long_to_hand_back_starts_the_next_target_afresh(
    lifeline, client
):
    """The request with the text so far would not fit a NATS message: rather than fail every
    target that takes a prefill (saying to shorten the messages), it starts afresh, after a
    reset, as a target without prefill does."""
    providers = {
        "flaky": fake(reply="y" * 3000, fail_on_request=True, chunks=4),
        "resumer": fake(reply="request", chunks=2),
    }
    routes = route("flaky", {"provider": "resumer", "prefill": True}, on_midstream="continue")
    stack = await lifeline(config(providers, routes))
    prompt = "fail 503 after 2"
    base = len(encoder.encode(request(prompt)))
    # Room for the request with its headers, not for the 1,500 characters streamed before.
    stack.dispatcher.transport.nc._max_payload = base + 1024 + 600
    assembler = Assembler()
    events = [e async for e in stream(client, request(prompt), assembler)]
    [reset] = [e.reset for e in events if e.kind == "reset"]
    assert reset.discard == 2  # voided: the next target starts from the beginning
    assert assembler.reply is not None and assembler.reply.status == "ok"
    sent = provider_request_decoder.decode(assembler.text)
    assert sent.messages[-1].role == "user"  # no prefill


async def test_a_stream_request_that_fits_as_planned_is_sent_not_refused(lifeline, client):
    """A request that passes planning's size check (with room for an attempt's headers) goes
    to its worker on llm.stream as on llm.complete. The stream's own check added the room
    its events keep for their headers on top of the real headers, so requests within about a
    kilobyte of max_payload failed every target as bad_request, on llm.stream alone."""
    stack = await lifeline(config({"main": fake(reply="fits", chunks=2)}, route("main")))
    nc = stack.dispatcher.transport.nc
    nc._max_payload = 1100  # planning refuses it (on llm.complete), saying its size
    prompt = "x" * 5000  # a long one: the end event has room under max_payload
    refused = await ask(client, request(prompt, id="r1"))
    size = int(re.search(r"request is (\d+) bytes", refused.error.message).group(1))
    nc._max_payload = size  # planning's check passes, with nothing to spare
    assembler = Assembler()
    events = [e async for e in stream(client, request(prompt, id="r2"), assembler)]
    assert events[-1].kind == "end", events[-1]
    assert (events[-1].reply.status, assembler.text) == ("ok", "fits")


async def test_fail_ends_the_stream_with_an_error_and_tries_nothing_else(lifeline, client, audit):
    providers = {"flaky": fake(fail_on_request=True, chunks=4), "backup": fake()}
    await lifeline(config(providers))
    events = await events_of(client, request("fail 503 after 2", on_midstream="fail"))
    assert kinds(events) == ["delta", "delta", "error"]
    reply = events[-1].reply
    assert reply.error.type == "midstream_failed"
    assert "after 2 chunks" in reply.error.message and "backup" in reply.error.message
    assert [(a.target, a.next) for a in reply.attempts] == [("flaky", "stop")]
    assert reply.stream is not None and reply.stream.chunks == 2  # the client can count its own
    [(subject, _)] = await audit.wait_for(1)
    assert subject == "llm.audit.error"


async def test_an_idle_stream_is_given_up_and_its_worker_cancels_the_call(lifeline, client):
    providers = {"stalls": fake(stall_after_chunks=2, chunks=4), "backup": fake(reply="backup")}
    stack = await lifeline(
        config(providers, route({"provider": "stalls", "idle_s": 0.2}, "backup"))
    )
    assembler = Assembler()
    events = [e async for e in stream(client, request(), assembler)]
    [reset] = [e.reset for e in events if e.kind == "reset"]
    assert (reset.discard, reset.error.type) == (2, "timeout")
    assert "idle_s" in reset.error.message
    assert assembler.text == "backup"
    stalled = stack.workers["stalls"]
    await wait_for(lambda: stalled.cancelled == 1 and stalled.in_flight == 0, timeout_s=2)


async def test_the_assembled_text_is_checked_against_response_format(lifeline, client):
    providers = {"prose": fake(reply="not json at all"), "json": fake(reply='{"ok": true}')}
    await lifeline(config(providers))
    assembler = Assembler()
    req = request(response_format={"type": "json_object"})
    events = [e async for e in stream(client, req, assembler)]
    [reset] = [e.reset for e in events if e.kind == "reset"]
    assert reset.error.type == "invalid_output"
    assert assembler.text == '{"ok": true}'


async def test_a_hedge_races_to_the_first_chunk_and_the_loser_is_cancelled(lifeline, client):
    # Only the cancel ends slow's call within the bound below: not its answer, its timeout_s
    # nor the request's.
    slow_600s = fake(reply="slow", latency_ms=600_000, timeout_s=600)
    providers = {"slow": slow_600s, "fast": fake(reply="fast answer")}
    stack = await lifeline(config(providers, route("slow", "fast", hedge_after_ms=50)))
    text, reply = await stream_text(client, request(timeout_s=600))
    assert text == "fast answer"
    assert [(a.target, a.outcome, a.reason, a.hedge) for a in reply.attempts] == [
        ("slow", "cancelled", "hedge_lost", False),
        ("fast", "ok", None, True),
    ]
    slow = stack.workers["slow"]
    await wait_for(lambda: slow.cancelled == 1 and slow.in_flight == 0, timeout_s=30)


async def test_an_error_naming_a_cancelled_race_loser_says_why_it_was_cancelled(lifeline, client):
    """The hedge wins the race to the first chunk, then fails mid-stream with nothing left to
    try: the error's message lists every attempt, and named the cancelled loser "slow: None"."""
    providers = {
        "slow": fake(reply="slow", latency_ms=3000),
        "fast": fake(reply="fast answer", chunks=4, chunk_delay_ms=20, fail_after_chunks=2),
    }
    await lifeline(config(providers, route("slow", "fast", hedge_after_ms=50)))
    events = await events_of(client, request())
    error = events[-1].reply.error
    assert error is not None and error.type == "all_failed"
    assert "slow: cancelled (hedge_lost)" in error.message, error.message


# ---- the protocol ---------------------------------------------------------------------------


async def test_a_worker_that_does_not_stream_is_streamed_as_one_chunk(lifeline, client, nats_url):
    """A v1 worker in any language: it ignores Lifeline-Stream-To and answers once."""
    await lifeline(config({"v1": fake()}), workers=[])

    async def answer_once(msg: Any) -> None:
        asked: ProviderRequest = provider_request_decoder.decode(msg.data)
        await client.publish(msg.reply, encoder.encode(ProviderOk("whole " + asked.id, "own-1")))

    await client.subscribe(subjects.provider_subject("v1"), cb=answer_once)
    await ensure_subscribed(client)
    events = await events_of(client, request(id="r1"))
    assert kinds(events) == ["delta", "end"]
    assert events[0].text == "whole r1" and events[-1].reply.model == "own-1"


async def test_a_worker_that_loses_a_chunk_fails_the_attempt(lifeline, client):
    """The reply counts the chunks sent; fewer arrived means the text is not the answer."""
    await lifeline(config({"liar": fake(), "backup": fake(reply="ok")}), workers=["backup"])

    async def stream_with_a_gap(msg: Any) -> None:
        to = msg.headers[subjects.STREAM_TO]
        await client.publish(to, b"one ")
        await client.publish(msg.reply, encoder.encode(ProviderOk("", "m", chunks=2)))

    await client.subscribe(subjects.provider_subject("liar"), cb=stream_with_a_gap)
    await ensure_subscribed(client)
    assembler = Assembler()
    events = [e async for e in stream(client, request(), assembler)]
    [reset] = [e.reset for e in events if e.kind == "reset"]
    assert reset.error.type == "connection" and "1 of the 2 chunks" in reset.error.message
    assert assembler.text == "ok"


async def test_a_worker_whose_end_counts_fewer_chunks_than_it_sent_fails_the_attempt(
    lifeline, client
):
    """Its end's content would be taken for what did not stream and sent again: the client
    would read the answer twice (a tool call's arguments joined twice, no JSON)."""
    await lifeline(config({"liar": fake(), "backup": fake(reply="ok")}), workers=["backup"])

    async def streams_then_says_none(msg: Any) -> None:
        for chunk in (b"Hello ", b"world"):
            await client.publish(msg.headers[subjects.STREAM_TO], chunk)
        await client.publish(msg.reply, encoder.encode(ProviderOk("Hello world", "m", chunks=0)))

    await client.subscribe(subjects.provider_subject("liar"), cb=streams_then_says_none)
    await ensure_subscribed(client)
    assembler = Assembler()
    events = [e async for e in stream(client, request(), assembler)]
    [reset] = [e.reset for e in events if e.kind == "reset"]
    assert reset.error.type == "server_error" and "streamed 2 chunks" in reset.error.message
    assert assembler.text == "ok"


async def test_a_workers_answer_with_a_status_header_is_its_answer_not_no_responders(
    lifeline, client
):
    """Only the server's own no-responders message (empty) means nobody listens."""
    await lifeline(config({"odd": fake(), "backup": fake(reply="backup")}), workers=["backup"])

    async def answers_with_a_status_header(msg: Any) -> None:
        answer = encoder.encode(ProviderOk("mine", "m"))
        await client.publish(msg.reply, answer, headers={"Status": "503"})

    await client.subscribe(subjects.provider_subject("odd"), cb=answers_with_a_status_header)
    await ensure_subscribed(client)
    reply = await ask(client, {**USER_HELLO, "route": "default"})
    assert (reply.status, reply.content, reply.provider) == ("ok", "mine", "odd")


async def test_an_error_kind_no_one_knows_counts_as_a_server_error_and_is_named(lifeline, client):
    """A worker in another language may answer any kind: the policy (fallback_on, breakers,
    retries) and the audit event know the table's, so any other is a server_error."""
    await lifeline(config({"odd": fake(), "backup": fake(reply="backup")}), workers=["backup"])

    async def fails_its_own_way(msg: Any) -> None:
        failure = ProviderFailure("ok", "all good, honestly")
        await client.publish(msg.reply, encoder.encode(failure))

    await client.subscribe(subjects.provider_subject("odd"), cb=fails_its_own_way)
    await ensure_subscribed(client)
    reply = await ask(client, USER_HELLO)
    assert (reply.status, reply.content) == ("ok", "backup")
    first = reply.attempts[0]
    assert first.error_type == "server_error" and "unknown error kind 'ok'" in first.message


@pytest.mark.parametrize("after", [1e306, -5.0, 7200.0])
async def test_a_workers_retry_after_reaches_the_client_at_most_an_hour(lifeline, client, after):
    """A worker in another language may answer any Retry-After: Lifeline's own workers pass on
    an hour at most, and the dispatcher holds any other's to the same (1e306 made the gateway's
    Retry-After header overflow, a 500)."""
    await lifeline(config({"odd": fake()}), workers=[])

    async def rate_limited(msg: Any) -> None:
        failure = ProviderFailure("rate_limit", "slow down", 429, after)
        await client.publish(msg.reply, encoder.encode(failure))

    await client.subscribe(subjects.provider_subject("odd"), cb=rate_limited)
    await ensure_subscribed(client)
    reply = await ask(client, USER_HELLO)
    assert reply.status == "error" and reply.attempts[0].error_type == "rate_limit"
    expected = None if after < 0 else 3600.0
    assert reply.error is not None and reply.error.retry_after_s == expected, reply.error


async def test_the_client_helper_raises_on_a_sequence_gap(client):
    """A stand-in dispatcher that skips event 2: the helper must not hand out that text."""

    async def gappy(msg: Any) -> None:
        for seq, text in ((1, b"a"), (3, b"c")):
            headers = {subjects.SEQ: str(seq), subjects.ATTEMPT_NO: "1"}
            await client.publish(msg.reply, text, headers=headers)

    await client.subscribe(subjects.STREAM, cb=gappy)
    await ensure_subscribed(client)
    with pytest.raises(StreamGap, match="event 3 arrived after event 1: 1 lost"):
        await stream_text(client, request())


async def test_the_client_helper_says_when_no_dispatcher_listens(client):
    with pytest.raises(NoDispatcher, match="lifeline run"):
        await stream_text(client, request())


async def test_a_refused_stream_request_gets_one_error_event_and_one_audit_event(
    lifeline, client, audit
):
    await lifeline(config({"main": fake()}))
    bad = msgspec.structs.replace(request(), route="nowhere")
    events = await events_of(client, bad)
    assert kinds(events) == ["error"] and events[0].seq == 1
    assert events[0].reply.error.type == "unknown_route"
    assert events[0].attempt == 0  # no attempt started (README, schemas/spec)
    [(subject, _)] = await audit.wait_for(1)
    assert subject == "llm.audit.error"


async def test_an_error_event_with_every_target_skipped_names_attempt_0(lifeline, client):
    await lifeline(config({"main": fake()}, route({"provider": "main", "json_output": False})))
    events = await events_of(client, request(response_format={"type": "json_object"}))
    assert kinds(events) == ["error"] and events[0].reply.error.type == "no_capable_target"
    assert [a.outcome for a in events[0].reply.attempts] == ["skipped"]
    assert events[0].attempt == 0


async def test_every_streamed_request_ends_once_and_is_audited_once(lifeline, client, audit):
    """Mixed outcomes, all in flight at once: per id, exactly one end or error event (the
    helper checks order and gaps) and exactly one audit event."""
    providers = {
        "flaky": fake(fail_on_request=True, chunks=3, chunk_delay_ms=1),
        "backup": fake(chunks=2),
    }
    stack = await lifeline(config(providers))
    texts = ["hello there", "fail 503 after 1", "fail 429", "fail 503 after 2"] * 25
    reqs = [request(text, id=f"r{i}") for i, text in enumerate(texts)]
    if_fail = [request("fail 503 after 1", id=f"f{i}", on_midstream="fail") for i in range(20)]
    results = await asyncio.gather(*(stream_text(client, r) for r in reqs + if_fail))
    assert [reply.id for _, reply in results] == [r.id for r in reqs + if_fail]
    for (text, reply), req in zip(results[: len(reqs)], reqs, strict=True):
        assert reply.status == "ok"
        expected = req.messages[0].content
        assert text == expected  # both fakes echo: the voided chunks are gone
    assert all(reply.error.type == "midstream_failed" for _, reply in results[len(reqs) :])
    await settled(client, stack)
    await audit.wait_for(len(reqs) + len(if_fail))
    audited = [event.id for _, event in audit.events]
    assert sorted(audited) == sorted(r.id for r in reqs + if_fail)


# ---- end to end through an HTTP provider: client -> NATS -> dispatcher -> worker -> SSE -----


class SSEServer(LocalHTTPServer):
    """An OpenAI-compatible server streaming chat.completion.chunk events from a script:
    ("ok", pieces) streams them and [DONE]; ("stall", pieces) streams them, then keeps the
    connection open without a chunk, noting when the client hangs up; ("cut", pieces) streams
    them and closes without [DONE]."""

    def __init__(self) -> None:
        super().__init__(_SSEHandler)
        self.script: list[tuple[str, list[str]]] = []
        self.hung_up = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _SSEHandler(BaseHTTPRequestHandler):
    server: SSEServer

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        assert body["stream"] is True
        action, pieces = self.server.script.pop(0)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece in pieces:
            self._event({"choices": [{"index": 0, "delta": {"content": piece}}], "model": "sse-1"})
        if action == "ok":
            self._event({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3}})
            self.wfile.write(b"data: [DONE]\n\n")
        elif action == "stall":
            try:
                for _ in range(200):  # an SSE comment now and then, until the client is gone
                    time.sleep(0.05)
                    self.wfile.write(b": waiting\n\n")
                    self.wfile.flush()
            except OSError:
                self.server.hung_up.set()
        self.wfile.flush()
        self.close_connection = True

    def _event(self, chunk: dict[str, Any]) -> None:
        self.wfile.write(
            b"data: " + json.dumps({"object": "chat.completion.chunk", **chunk}).encode()
        )
        self.wfile.write(b"\n\n")
        self.wfile.flush()


@pytest.fixture
def sse_server() -> Iterator[SSEServer]:
    with serving(SSEServer()) as server:
        yield server


def openai_at(server: SSEServer) -> dict[str, Any]:
    return {"kind": "openai", "model": "sse-1", "base_url": server.base_url, "api_key_env": ""}


async def test_an_http_stream_that_goes_idle_is_reset_and_its_http_call_cancelled(
    lifeline, client, sse_server
):
    sse_server.script = [("stall", ["Half ", "an answer"]), ("ok", ["The ", "whole ", "answer"])]
    routes = route({"provider": "first", "idle_s": 0.3}, "second")
    await lifeline(
        config({"first": openai_at(sse_server), "second": openai_at(sse_server)}, routes)
    )
    assembler = Assembler()
    events = [e async for e in stream(client, request(), assembler)]
    assert kinds(events) == ["delta", "delta", "reset", "delta", "delta", "delta", "end"]
    assert [e.text for e in events[:2]] == ["Half ", "an answer"]
    assert events[2].reset.discard == 2 and "idle_s" in events[2].reset.error.message
    assert assembler.text == "The whole answer"  # exactly the serving target's answer
    assert events[-1].reply.usage.output_tokens == 3
    # The dispatcher's cancel reached the worker, which closed the HTTP call.
    assert await asyncio.to_thread(sse_server.hung_up.wait, 3)


async def test_an_http_stream_that_ends_without_done_is_a_midstream_failure(
    lifeline, client, sse_server
):
    sse_server.script = [("cut", ["Cut ", "short"]), ("ok", ["Complete"])]
    await lifeline(config({"first": openai_at(sse_server), "second": openai_at(sse_server)}))
    assembler = Assembler()
    events = [e async for e in stream(client, request(), assembler)]
    [reset] = [e.reset for e in events if e.kind == "reset"]
    assert (reset.discard, reset.error.type) == (2, "connection")
    assert "without [DONE]" in reset.error.message
    assert assembler.text == "Complete"


async def test_a_fault_can_cut_a_real_stream_after_n_chunks(lifeline, client):
    providers = {"main": fake(chunks=5), "backup": fake(reply="from backup")}
    stack = await lifeline(config(providers, allow_fault_injection=True))
    assembler = Assembler()
    req = request(faults={"main": ["503 after 2", "ok"]})
    events = [e async for e in stream(client, req, assembler)]
    assert kinds(events)[:3] == ["delta", "delta", "reset"]
    reset = events[2].reset
    assert (reset.discard, reset.error.type) == (2, "server_error")
    assert "simulated for main" in reset.error.message and "after 2 chunks" in reset.error.message
    assert assembler.text == "from backup"
    main = stack.workers["main"]
    await wait_for(lambda: main.in_flight == 0, timeout_s=2)
    # Without streaming the same fault fails the call at once.
    reply = await ask(client, {**msgspec.to_builtins(req), "id": "plain"})
    assert [(a.target, a.error_type) for a in reply.attempts] == [
        ("main", "server_error"),
        ("backup", None),
    ]


async def test_mid_stream_failures_count_for_the_targets_circuit_breaker(lifeline, client):
    providers = {"flaky": fake(fail_on_request=True, chunks=3), "backup": fake()}
    data = config(providers)
    data["breaker"] = {"consecutive_failures": 2, "cooldown_s": 30}
    await lifeline(data)
    for _ in range(2):
        _, reply = await stream_text(client, request("fail 503 after 1"))
        assert [a.outcome for a in reply.attempts] == ["error", "ok"]
    _, reply = await stream_text(client, request("fail 503 after 1"))
    assert [(a.target, a.outcome, a.reason) for a in reply.attempts] == [
        ("flaky", "skipped", "circuit_open"),
        ("backup", "ok", None),
    ]


async def test_past_max_in_flight_a_stream_request_gets_one_overloaded_error_event(
    lifeline, client, audit
):
    await lifeline(config({"slow": fake(latency_ms=300)}, max_in_flight=1))
    results = await asyncio.gather(*(events_of(client, request(id=f"s{i}")) for i in range(3)))
    ends = sorted(
        events[-1].reply.error.type if events[-1].reply.error else "ok" for events in results
    )
    assert ends == ["ok", "overloaded", "overloaded"]
    refused = [events for events in results if events[-1].kind == "error"]
    assert all(kinds(events) == ["error"] and events[0].seq == 1 for events in refused)
    assert all(events[0].reply.error.retry_after_s for events in refused)
    await audit.wait_for(3)
    assert sorted(event.id for _, event in audit.events) == ["s0", "s1", "s2"]


# ---- tool calls in a stream -------------------------------------------------------------------

WEATHER = {"name": "get_weather", "parameters": {"type": "object"}}
PARIS = {"name": "get_weather", "arguments": '{"city": "Paris"}'}


async def test_tool_calls_stream_as_tool_call_events_and_come_whole_in_the_end(lifeline, client):
    await lifeline(config({"agent": fake(reply="Checking.", tool_calls=[PARIS], chunks=2)}))
    assembler = Assembler()
    req = request(tools=[WEATHER])
    events = [e async for e in stream(client, req, assembler)]
    assert kinds(events) == ["delta", "delta", "tool_call", "tool_call", "end"]
    first, rest = events[2].tool_call, events[3].tool_call
    assert (first.index, first.name, rest.name) == (0, "get_weather", None)
    assert first.arguments + rest.arguments == '{"city": "Paris"}'
    end = events[-1].reply
    assert assembler.text == "Checking." and end.finish_reason == "tool_calls"
    assert assembler.tool_calls == end.tool_calls  # what the pieces make is the whole call
    assert [(c.name, c.arguments) for c in end.tool_calls] == [("get_weather", '{"city": "Paris"}')]


async def test_a_reset_voids_the_failed_attempts_tool_call_pieces_too(lifeline, client):
    providers = {
        "agent": fake(reply="", tool_calls=[PARIS]),
        "backup": fake(reply="", tool_calls=[{"name": "get_weather", "arguments": "{}"}]),
    }
    await lifeline(config(providers, allow_fault_injection=True))
    assembler = Assembler()
    req = request(tools=[WEATHER], faults={"agent": "503 after 1"})
    events = [e async for e in stream(client, req, assembler)]
    assert kinds(events) == ["tool_call", "reset", "tool_call", "tool_call", "end"]
    assert events[1].reset.discard == 1
    assert [(c.name, c.arguments) for c in assembler.tool_calls] == [("get_weather", "{}")]


async def test_a_worker_that_does_not_stream_has_its_tool_calls_streamed_whole(lifeline, client):
    await lifeline(config({"v1": fake()}), workers=[])

    async def answer_once(msg: Any) -> None:
        call = {"id": "c1", "name": "get_weather", "arguments": "{}"}
        answer = ProviderOk("", "own-1", tool_calls=[call], finish_reason="tool_calls")
        await client.publish(msg.reply, encoder.encode(answer))

    await client.subscribe(subjects.provider_subject("v1"), cb=answer_once)
    await ensure_subscribed(client)
    assembler = Assembler()
    events = [e async for e in stream(client, request(tools=[WEATHER]), assembler)]
    assert kinds(events) == ["tool_call", "end"]
    assert assembler.tool_calls == events[-1].reply.tool_calls


async def test_a_worker_that_streams_only_its_text_has_its_tool_calls_streamed_whole(
    lifeline, client
):
    """A worker (of another language, say) that streams its text and gives its tool calls
    only in its end, as the protocol lets it give the content it did not stream: the calls
    were in the end event alone, never a tool_call event, so a reader of the events (the
    gateway's SDK clients, `tool_calls` so far) never saw them."""
    await lifeline(config({"v1": fake()}), workers=[])

    async def streams_its_text_only(msg: Any) -> None:
        await client.publish(msg.headers[subjects.STREAM_TO], b"Let me look. ")
        call = {"id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
        answer = ProviderOk("", "own-1", tool_calls=[call], finish_reason="tool_calls", chunks=1)
        await client.publish(msg.reply, encoder.encode(answer))

    await client.subscribe(subjects.provider_subject("v1"), cb=streams_its_text_only)
    await ensure_subscribed(client)
    assembler = Assembler()
    events = [e async for e in stream(client, request(tools=[WEATHER]), assembler)]
    assert kinds(events) == ["delta", "tool_call", "end"]
    assert assembler.tool_calls == events[-1].reply.tool_calls
    assert assembler.text == "Let me look. "


async def test_a_stream_still_running_when_the_shutdown_grace_ends_ends_with_shutting_down(
    lifeline, client, audit
):
    stack = await lifeline(config({"main": fake(chunks=50, chunk_delay_ms=100)}))
    events = []

    async def read() -> None:
        async for event in stream(client, request()):
            events.append(event)

    reading = asyncio.ensure_future(read())
    await wait_for(lambda: len(events) >= 2, 5, what="the first chunks")
    await stack.dispatcher.stop(grace_s=0.2)
    await asyncio.wait_for(reading, 5)
    assert kinds(events)[-1] == "error" and set(kinds(events)[:-1]) == {"delta"}
    error = events[-1].reply.error
    assert error.type == "shutting_down" and error.retry_after_s
    [(subject, event)] = await audit.wait_for(1)
    assert subject == "llm.audit.error" and event.error_type == "shutting_down"
    worker = stack.workers["main"]  # its worker was told, and stopped streaming
    await wait_for(lambda: worker.cancelled == 1 and not worker.in_flight, 5, what="the cancel")


# ---- limits that hold whatever a worker sends --------------------------------------------------


def _huge_tool_call(client) -> dict[str, Any]:
    """A tool call whose arguments fit a worker's reply but not a reply with Lifeline's fields."""
    return {"name": "t", "arguments": '{"x": "' + "a" * (client.max_payload - 420) + '"}'}


async def test_an_end_too_large_for_its_tool_calls_ends_as_a_small_error_and_spares_the_connection(
    lifeline, client, audit
):
    stack = await lifeline(config({"agent": fake(reply="", tool_calls=[_huge_tool_call(client)])}))
    tool = {"name": "t", "parameters": {"type": "object"}}
    events = await events_of(client, request("call it", id="big", tools=[tool]))
    assert kinds(events) == ["tool_call", "tool_call", "error"]  # the pieces fit, the end not
    end = events[-1].reply
    assert (end.status, end.error.type, end.tool_calls) == ("error", "reply_too_large", None)
    assert "ask for fewer max_tokens" in end.error.message
    [(subject, event)] = await audit.wait_for(1)
    assert (subject, event.error_type) == ("llm.audit.error", "reply_too_large")
    assert not stack.dispatcher.transport.nc.is_closed  # every other request still has a path
    assert (await ask(client, {"messages": [{"role": "user", "content": "hi"}]})).status == "ok"


async def test_a_reply_too_large_for_its_tool_calls_is_answered_as_a_small_error(
    lifeline, client, audit
):
    await lifeline(config({"agent": fake(reply="", tool_calls=[_huge_tool_call(client)])}))
    tool = {"name": "t", "parameters": {"type": "object"}}
    req = {"id": "big", "messages": [{"role": "user", "content": "call it"}], "tools": [tool]}
    reply = await ask(client, req, timeout_s=5)
    assert (reply.id, reply.status, reply.error.type) == ("big", "error", "reply_too_large")
    assert reply.tool_calls is None and reply.attempts[0].outcome == "ok"
    [(_, event)] = await audit.wait_for(1)
    assert event.error_type == "reply_too_large"


async def test_ttft_s_never_outlasts_the_time_the_attempt_has(lifeline, client):
    """A route's ttft_s longer than what is left of a request's timeout: the timeout wins."""
    # A ttft_s that won would outlast the bound below, and the client's own wait for the reply.
    await lifeline(config({"silent": fake()}, route({"provider": "silent", "ttft_s": 600})), [])
    await client.subscribe(subjects.provider_subject("silent"), cb=_ignore)  # never answers
    await ensure_subscribed(client)
    async with asyncio.timeout(30):
        events = await events_of(client, request("hi", timeout_s=0.5))
    assert kinds(events) == ["error"]
    assert [a.error_type for a in events[-1].reply.attempts] == ["timeout"]


async def _ignore(msg: Any) -> None:
    pass


async def test_a_hedge_answering_whole_as_the_first_attempt_starts_streaming_loses(
    lifeline, client
):
    """Attempt 1's first chunk and the hedge's whole answer come in the same read: the attempt
    that owns the output (the client has its text) wins, the end event names it, and nothing
    comes after the end."""
    await lifeline(
        config(
            {"a": fake(), "b": fake()},
            route("a", "b", hedge_after_ms=50, hedge_budget=1.0, retry_budget=10.0),
        ),
        [],
    )
    first_calls: dict[str, Any] = {}

    async def worker_a(msg: Any) -> None:
        first_calls[provider_request_decoder.decode(msg.data).id] = msg

    async def worker_b(msg: Any) -> None:  # the hedge: a's first chunk and b's answer at once
        a = first_calls[provider_request_decoder.decode(msg.data).id]
        await client.publish(a.headers[subjects.STREAM_TO], b"A1 ")
        await client.publish(msg.reply, encoder.encode(ProviderOk("B whole", "b-1")))
        await asyncio.sleep(0.2)
        await client.publish(a.headers[subjects.STREAM_TO], b"A2")
        await client.publish(a.reply, encoder.encode(ProviderOk("", "a-1", chunks=2)))

    await client.subscribe(subjects.provider_subject("a"), cb=worker_a)
    await client.subscribe(subjects.provider_subject("b"), cb=worker_b)
    await ensure_subscribed(client)
    subs = []
    for i in range(15):  # the two answers' order in the read varies: either must end right
        inbox = client.new_inbox()
        sub = await client.subscribe(inbox)
        subs.append(sub)
        await ensure_subscribed(client)
        await client.publish(subjects.STREAM, encoder.encode(request("hi", id=f"h{i}")), inbox)
        assembler, events = Assembler(), []
        while not events or not assembler.done:
            msg = await sub.next_msg(timeout=5)
            events.append(assembler.feed(msg.headers, msg.data))
        end = events[-1].reply
        assert (end.status, end.provider, assembler.text) == ("ok", "a", "A1 A2"), events
        a, b = end.attempts
        assert (a.target, a.outcome) == ("a", "ok")
        # the hedge cancelled, or its answer in by then (an `ok` that lost): never served
        assert (b.target, b.reason) == ("b", "hedge_lost") and b.outcome in ("cancelled", "ok")
    await asyncio.sleep(0.4)  # time for anything sent after an end (once, for all of them)
    assert [sub.pending_msgs for sub in subs] == [0] * len(subs)


async def test_continue_then_an_answer_without_chunks_still_voids_the_failed_text(lifeline, client):
    """on_midstream = continue keeps a failed attempt's text for the next one; a next target
    that cannot continue it and answers with nothing to stream must still void it."""
    providers = {"flaky": fake(fail_on_request=True, chunks=4), "backup": fake(reply="")}
    await lifeline(config(providers, route("flaky", "backup", on_midstream="continue")))
    assembler = Assembler()
    events = [e async for e in stream(client, request("fail 503 after 2"), assembler)]
    assert kinds(events) == ["delta", "delta", "reset", "end"]
    assert events[2].reset.discard == 2
    end = events[-1].reply
    assert (end.status, end.provider, assembler.text) == ("ok", "backup", "")


@pytest.mark.parametrize(
    "chunks",
    [["café".encode()[:4], "café".encode()[4:]], [b"ok \xff"]],
    ids=["a character cut in two", "no UTF-8"],
)
async def test_a_chunk_that_is_no_whole_utf8_fails_its_attempt_and_falls_back(
    lifeline, client, audit, chunks
):
    await lifeline(
        config({"raw": fake(), "backup": fake(reply="fine")}, route("raw", "backup")), ["backup"]
    )

    async def worker(msg: Any) -> None:
        for chunk in chunks:
            await client.publish(msg.headers[subjects.STREAM_TO], chunk)
        await client.publish(msg.reply, encoder.encode(ProviderOk("", "m", chunks=len(chunks))))

    await client.subscribe(subjects.provider_subject("raw"), cb=worker)
    await ensure_subscribed(client)
    assembler = Assembler()
    events = [e async for e in stream(client, request("hi"), assembler)]  # every event decodes
    end = events[-1].reply
    assert (end.status, end.provider, assembler.text) == ("ok", "backup", "fine")
    failed = end.attempts[0]
    assert (failed.error_type, "not whole UTF-8" in failed.message) == ("server_error", True)
    [(_, event)] = await audit.wait_for(1)
    assert event.status == "ok"


@pytest.mark.parametrize(
    ("chunk", "bound"), [(b"x" * 1000, 50_000), (b"", 5_000)], ids=["text", "empty deltas"]
)
async def test_a_worker_streaming_past_max_response_bytes_is_stopped_by_the_dispatcher(
    lifeline, client, audit, chunk, bound
):
    """A worker that never stops streaming (one in another language that ignores
    max_response_bytes, say) would fill the dispatcher's memory with the text it keeps for
    resets until the attempt's timeout. Past the provider's max_response_bytes the dispatcher
    fails the attempt as response_too_large, cancels it at the worker, and falls back. An
    empty delta counts as a byte: endless empty ones are stopped too."""
    await lifeline(
        config(
            {"raw": fake(max_response_bytes=bound), "backup": fake(reply="fine")},
            route("raw", "backup"),
        ),
        ["backup"],
    )
    cancelled: list[bytes] = []
    sent = 0

    async def worker(msg: Any) -> None:
        nonlocal sent
        while not cancelled and sent < 100_000:  # without the bound: 100,000 chunks, then an end
            await client.publish(msg.headers[subjects.STREAM_TO], chunk)
            sent += 1
            if sent % 20 == 0:
                await client.flush()
        await client.publish(msg.reply, encoder.encode(ProviderOk("", "m", chunks=sent)))

    await client.subscribe(subjects.provider_subject("raw"), cb=worker)

    async def cancel(msg: Any) -> None:
        cancelled.append(msg.data)

    await client.subscribe(subjects.cancel_subject("raw"), cb=cancel)
    await ensure_subscribed(client)
    assembler = Assembler()
    events = [e async for e in stream(client, request("hi"), assembler)]
    end = events[-1].reply
    assert (end.status, end.provider, assembler.text) == ("ok", "backup", "fine")
    failed = end.attempts[0]
    assert failed.error_type == "response_too_large", failed
    assert f"max_response_bytes ({bound})" in failed.message
    await wait_for(lambda: cancelled, what="the attempt cancelled at its worker")
    assert sent < 100_000  # stopped after the bound, not at the worker's end
    [(_, event)] = await audit.wait_for(1)
    assert event.status == "ok"


async def test_tool_call_pieces_reach_the_client_as_the_dispatcher_counted_them(lifeline, client):
    """A worker's tool-call piece is decoded to be counted against max_response_bytes (its
    arguments, name and id), but went on to the client as the worker wrote it: padding and
    fields the wire does not know passed uncounted (1.2 MB reached a client through a bound of
    4 KiB) and unread. The client gets the piece as decoded."""
    await lifeline(config({"raw": fake(max_response_bytes=4096)}, route("raw")), [])
    padded = b'{"index": 0, "id": "c1", "name": "f", "arguments": "{}", "note": "token=abc"' + (
        b" " * 20_000 + b"}"
    )

    async def worker(msg: Any) -> None:
        for _ in range(3):
            await client.publish(
                msg.headers[subjects.STREAM_TO], padded, headers={"Lifeline-Event": "tool_call"}
            )
        await client.publish(msg.reply, encoder.encode(ProviderOk("", "m", chunks=3)))

    await client.subscribe(subjects.provider_subject("raw"), cb=worker)
    inbox = client.new_inbox()
    got: list[Any] = []
    ended = asyncio.Event()

    async def on_event(msg: Any) -> None:
        got.append(msg)
        if msg.headers and msg.headers.get("Lifeline-Event") in ("end", "error"):
            ended.set()

    await client.subscribe(inbox, cb=on_event)
    await ensure_subscribed(client)
    await client.publish(subjects.STREAM, encoder.encode(request("hi")), reply=inbox)
    await asyncio.wait_for(ended.wait(), 10)
    pieces = [m.data for m in got if m.headers.get("Lifeline-Event") == "tool_call"]
    assert pieces, [m.headers for m in got]
    assert all(b"token=abc" not in p and len(p) < 200 for p in pieces), pieces[0][:200]


async def test_a_simulated_failure_counts_as_an_attempt_in_the_events_numbers(lifeline, client):
    providers = {"main": fake(chunks=3), "backup": fake(reply="from backup", chunks=2)}
    await lifeline(config(providers, allow_fault_injection=True))
    events = await events_of(client, request("hi", faults={"main": 503}))
    attempts = events[-1].reply.attempts
    assert [(a.target, a.outcome) for a in attempts] == [("main", "error"), ("backup", "ok")]
    assert {e.attempt for e in events} == {2}  # backup's deltas and the end: attempt 2


async def test_a_streams_chunk_subject_cannot_be_guessed_from_another(lifeline, client):
    """Workers may publish chunks to any <dispatcher prefix>.*.c, and every request they get
    shows the prefix: the rest must not be guessable, or a worker could write into another
    provider's stream."""
    await lifeline(config({"raw": fake()}, route("raw")), [])
    seen: list[str] = []

    async def worker(msg: Any) -> None:
        seen.append(msg.headers[subjects.STREAM_TO])
        await client.publish(msg.reply, encoder.encode(ProviderOk("", "m")))

    await client.subscribe(subjects.provider_subject("raw"), cb=worker)
    await ensure_subscribed(client)
    for _ in range(2):
        await events_of(client, request("hi"))
    tokens = [subject.removesuffix(".c").rsplit(".", 1)[-1] for subject in seen]
    assert len(tokens) == 2 and tokens[0] != tokens[1]
    assert all(len(t) == 24 and int(t, 16) >= 0 for t in tokens)  # 96 random bits, as hex


async def test_events_the_fast_path_cannot_take_are_held_and_sent_in_order(client, nats_url):
    """While the connection reconnects the fast path takes nothing: every event from then on
    waits in the stream's backlog, and goes out through nats-py in its order, the end last."""
    nc = await nats.connect(nats_url)
    try:
        inbox = client.new_inbox()
        sub = await client.subscribe(inbox)
        await ensure_subscribed(client)
        events = ClientStream(nc, inbox)
        fast_publish = events._fast.publish
        events._fast.publish = lambda *args, **kwargs: False  # as during a reconnect
        for n in range(2_000):
            events.delta(1, f"{n} ".encode())
        events._fast.publish = fast_publish  # back: later events still queue behind the rest
        events.delta(1, b"last")
        await events.end(CompletionReply("held", "ok"), 1)
        assembler = Assembler()
        while not assembler.done:
            msg = await sub.next_msg(timeout=10)
            assembler.feed(msg.headers, msg.data)
        assert assembler.text == "".join(f"{n} " for n in range(2_000)) + "last"
    finally:
        await nc.close()


async def test_a_first_chunk_after_its_waiter_was_cancelled_is_no_error():
    """A hedge's loser, or an aborted request's attempt: its waiter's cancel cancels the
    stream's `first`, and a first chunk read in the same turn then raised InvalidStateError in
    the read loop's handler (an ERROR and a traceback in the dispatcher's log)."""
    from types import SimpleNamespace

    from service.streaming import StreamLimits
    from service.transport import ProviderStream

    got: list[bytes] = []
    transport = SimpleNamespace(nc=SimpleNamespace(max_payload=1 << 20))
    stream = ProviderStream(
        transport, "p", StreamLimits(5.0), lambda data, tool: got.append(data), "a1"
    )
    stream.first.cancel()  # as `await stream.first` in a cancelled task leaves it
    stream.chunk(b"hello")
    assert stream.chunks == 1 and got == [b"hello"]
    stream.end(ProviderOk(content="", model="m", usage=Usage(1, 1)))


class Recorded:
    """A Relay's sink that records what its client would get."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def delta(self, attempt: int, text: bytes) -> None:
        self.events.append(f"delta {text.decode()}")

    def tool_call(self, attempt: int, piece: bytes) -> None:
        self.events.append("tool_call")

    def reset(self, reset: Any) -> None:
        self.events.append(f"reset {reset.attempt} discard {reset.discard} {reset.error.type}")

    async def end(self, reply: CompletionReply, attempt: int) -> CompletionReply:
        self.events.append(f"end {reply.status} attempt {attempt}")
        return reply


class Opened:
    """An attempt's stream as the Relay sees it (service.transport.ProviderStream's surface)."""

    intact = True

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.first: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[Any] = loop.create_future()

    def abandon(self) -> None:
        pass


async def test_nothing_follows_the_event_that_closes_a_stream():
    """The relay's end (the end or error event) closes the stream: a chunk that comes later
    (from an attempt whose task is cancelled a turn after the request was aborted, as a
    hedging route's first call is) reaches no client, nor does a reset. Such chunks went out
    after the error event in two of three runs of 150 streams aborted as their worker
    started streaming, on a route with hedge_after_ms (separate processes; the race needs
    the chunks to meet the abort in the dispatcher's read)."""
    sink = Recorded()
    relay = Relay(sink, time.monotonic())
    relay.follow("reset", None, None)
    chunk = relay.on_chunk(relay.number())
    chunk(b"a")
    await relay.end(CompletionReply("r", "error"))
    chunk(b"b")  # read before the attempt's task got its cancel
    chunk(b"{}", True)
    relay.ended(1, ProviderFailure("connection", "cut"))  # would reset the output
    assert sink.events == ["delta a", "end error attempt 1"]


@pytest.mark.parametrize("returned", [False, True], ids=["cancelled", "abandoned"])
async def test_a_first_chunk_that_slips_out_as_its_call_loses_the_race_is_voided(returned):
    """A hedging route: the hedge failed with a kind that switches chains (or answered without
    a chunk) and the policy cancels the first call; that call's first chunk came in the turns
    in between. It owned the output for good: every chunk of the next target was dropped, and
    the client's text was the stray chunk under an end event naming the next target (12 of
    160 streams with a worker timing its chunk just after the hedge's failure). The same when
    its call had returned its output in those turns, and the policy abandons it."""
    sink = Recorded()
    relay = Relay(sink, time.monotonic())
    relay.follow("reset", None, None)
    first, _hedge = relay.number(), relay.number()
    opened = Opened()
    call = asyncio.ensure_future(relay.started(first, opened, lambda reply, why: None))
    await asyncio.sleep(0)  # waiting for its first chunk
    relay.on_chunk(first)(b"stray")
    opened.first.set_result(None)
    if returned:  # policy's _stop on a call done with its output
        (await call).abandon(asyncio.CancelledError("hedge_lost"))
    else:  # policy's _stop, before the call's task resumes
        call.cancel("hedge_lost")
        await asyncio.gather(call, return_exceptions=True)

    nxt = relay.number()
    following = Opened()
    call = asyncio.ensure_future(relay.started(nxt, following, lambda reply, why: None))
    await asyncio.sleep(0)
    relay.on_chunk(nxt)(b"answer")
    following.first.set_result(None)
    following.done.set_result(ProviderOk("", "m", chunks=1))
    output = await call
    reply = await output.end()
    assert reply.content == "answer"
    await relay.end(CompletionReply("r", "ok"))
    assert sink.events == [
        "delta stray",
        "reset 1 discard 1 hedge_lost",
        "delta answer",
        "end ok attempt 3",
    ]


@pytest.mark.parametrize("returned", [False, True], ids=["cancelled", "abandoned"])
async def test_an_attempt_voided_as_it_lost_its_race_says_how_many_chunks_its_client_got(
    returned,
):
    """README: an attempt's `chunks` says how many chunks of it the client received. A race's
    loser whose first chunks slipped out as it lost (then voided by a reset) was listed with
    0: the policy records it as it cancels it, before the chunks are known, and the end's
    stream.chunks counted them (1 in 1,600 streams on a route hedging after 3 ms)."""
    relay = Relay(Recorded(), time.monotonic())
    relay.follow("reset", None, None)
    first, _hedge = relay.number(), relay.number()
    opened = Opened()
    call = asyncio.ensure_future(relay.started(first, opened, lambda reply, why: None))
    await asyncio.sleep(0)
    for chunk in (b"stray ", b"slipped"):
        relay.on_chunk(first)(chunk)
    opened.first.set_result(None)
    if returned:
        (await call).abandon(asyncio.CancelledError("hedge_lost"))
    else:
        call.cancel("hedge_lost")
        await asyncio.gather(call, return_exceptions=True)
    as_recorded = [  # the policy's record: the loser as it cancelled it, the hedge that won
        Attempt("a", "m", "cancelled", 5.0, target="a", reason="hedge_lost"),
        Attempt("b", "m", "ok", 6.0, target="b", hedge=True),
    ]
    counted = relay.counted(as_recorded)
    assert [a.chunks for a in counted] == [2, 0]
    assert sum(a.chunks for a in counted) == relay.stats().chunks


async def test_the_end_event_names_the_attempt_that_answered_whole():
    """README: an event's Lifeline-Attempt is the attempt it belongs to. When the answer came
    whole (no chunk) from the first call while a hedge still ran, the end event named the
    hedge, the last attempt started, though `attempts` lists the first call as the one ok."""
    sink = Recorded()
    relay = Relay(sink, time.monotonic())
    relay.follow("reset", None, None)
    first, _hedge = relay.number(), relay.number()
    opened = Opened()
    opened.first.set_result(None)
    opened.done.set_result(ProviderOk("", "m"))
    reply = await relay.started(first, opened, lambda reply, why: None)
    assert isinstance(reply, ProviderOk)
    await relay.end(CompletionReply("r", "ok"))
    assert sink.events == ["end ok attempt 1"]


async def test_an_aborted_streams_attempt_counts_the_chunks_its_client_got(lifeline, client, audit):
    """README: an attempt's `chunks` says how many chunks of it the client received. An
    attempt cut short by an abort mid-stream said 0, in its reply and audit event, though its
    client had its deltas and the end event's stream.chunks counted them."""
    from schemas.streaming import Assembler

    providers = {"main": fake(reply=" ".join(["word"] * 100), chunks=100, chunk_delay_ms=50)}
    await lifeline(config(providers))
    sub = await client.subscribe(client.new_inbox())
    body = encoder.encode(request("hi", id="cut", timeout_s=30))
    await client.publish(
        subjects.STREAM, body, reply=sub.subject, headers={subjects.ABORT_KEY: "cut"}
    )
    assembler, deltas = Assembler(), 0
    while deltas < 3:
        msg = await sub.next_msg(timeout=10)
        deltas += assembler.feed(msg.headers, msg.data).kind == "delta"
    await client.publish(subjects.ABORT, b"cut")
    while not assembler.done:
        msg = await sub.next_msg(timeout=10)
        event = assembler.feed(msg.headers, msg.data)
        deltas += event.kind == "delta"
    end = event.reply
    assert end.error.type == "aborted" and end.stream.chunks == deltas
    assert [(a.outcome, a.chunks) for a in end.attempts] == [("cancelled", deltas)]
    [(_, audited)] = await audit.wait_for(1)
    assert [(a.outcome, a.chunks) for a in audited.attempts] == [("cancelled", deltas)]


# ---- the end event on a server with a small max_payload -----------------------------------------


class StreamEnds:
    """Each request's closing events (end or error) and audit events, counted per id: every
    request is sent on a reply subject of its own under one inbox."""

    def __init__(self, nc: nats.NATS) -> None:
        self.nc, self.inbox = nc, nc.new_inbox()
        self._ids: dict[str, str] = {}  # reply token -> request id
        self.ends: Counter[str] = Counter()
        self.reply: dict[str, CompletionReply] = {}
        self.audits: Counter[str] = Counter()

    async def start(self) -> StreamEnds:
        await self.nc.subscribe(self.inbox + ".*", cb=self._on_event)
        await self.nc.subscribe(subjects.AUDIT_ALL, cb=self._on_audit)
        await ensure_subscribed(self.nc)
        return self

    async def _on_event(self, msg: Any) -> None:
        if msg.headers and msg.headers.get(subjects.EVENT) in (END, ERROR):
            request_id = self._ids[msg.subject.rsplit(".", 1)[1]]
            self.ends[request_id] += 1
            self.reply[request_id] = reply_decoder.decode(msg.data)

    async def _on_audit(self, msg: Any) -> None:
        self.audits[audit_decoder.decode(msg.data).id] += 1

    async def send(self, req: CompletionRequest) -> None:
        token = str(len(self._ids))
        self._ids[token] = req.id
        await self.nc.publish(subjects.STREAM, encoder.encode(req), reply=f"{self.inbox}.{token}")

    async def settle(self, stack: Any) -> None:
        """Every request audited, then nothing more to come (a second end would show)."""
        await wait_for(lambda: len(self.audits) == len(self._ids), 10)
        await settled(self.nc, stack)

    def assert_one_end_and_one_audit_each(self) -> None:
        for request_id in self._ids.values():
            assert (self.ends[request_id], self.audits[request_id]) == (1, 1), (
                f"{request_id[:40]!r}: {self.ends[request_id]} end events, "
                f"{self.audits[request_id]} audit events"
            )


@pytest.fixture
async def small_payload(tracers) -> AsyncIterator[Any]:
    """Factory: `await small_payload(max_payload, config, workers)` starts a nats-server with
    that max_payload and a stack on it; gives (stack, a client there). All stopped after."""
    with contextlib.ExitStack() as servers:
        async with contextlib.AsyncExitStack() as later:

            async def start(max_payload: int, cfg: dict, workers: list[str] | None = None) -> Any:
                conf = f"max_payload: {max_payload}\n"
                server = servers.enter_context(EmbeddedNats(port=-1, conf=conf))
                stack = await start_stack(parse_config(cfg), server.url, tracers, workers=workers)
                later.push_async_callback(stack.stop)
                nc = await nats.connect(server.url)
                later.push_async_callback(nc.close)
                return stack, nc

            yield start


def _ids() -> list[str]:
    """Request ids of every length up to the longest allowed."""
    return [f"{n}-".ljust(n, "i") for n in range(8, MAX_ID_LENGTH + 1, 31)]


@pytest.mark.parametrize("max_payload", [700, 1200])
async def test_a_stream_refused_on_a_server_with_a_1_kb_max_payload_still_ends_saying_why(
    small_payload, max_payload
):
    """No request fits a worker's message there (1 KiB is kept for its headers), so each is
    refused as payload_too_large: that error event must reach the client, cut to its kind if
    that is all that fits. It was measured against max_payload less those 1,024 bytes (176
    left at 1,200), dropped as too large whatever it was cut to, and the client waited out its
    timeout for an end that never came."""
    stack, nc = await small_payload(max_payload, config({"main": fake()}))
    ends = await StreamEnds(nc).start()
    for request_id in _ids():
        await ends.send(request("hi", id=request_id))
    await ends.settle(stack)
    ends.assert_one_end_and_one_audit_each()
    for reply in ends.reply.values():
        assert reply.error is not None and reply.error.type == "payload_too_large", reply


async def test_a_streamed_answer_with_long_names_on_a_2_kb_max_payload_ends_ok(small_payload):
    """Long names and ids on a 2 KiB max_payload: the end event of an answer the client has
    whole goes out, ok, in the room its own headers leave. It was measured against max_payload
    less the 1 KiB kept for a worker's chunk headers, made a reply_too_large error, and even
    that did not fit: the stream never ended."""
    long = fake(model="m" * 200, reply="answered", chunks=2)
    stack, nc = await small_payload(2048, config({"p" * 100: long}))
    ends = await StreamEnds(nc).start()
    for request_id in _ids():
        await ends.send(request("hi", id=request_id))
    await ends.settle(stack)
    ends.assert_one_end_and_one_audit_each()
    assert {reply.status for reply in ends.reply.values()} == {"ok"}


async def test_a_failed_stream_whose_summary_does_not_fit_ends_with_its_own_kind(small_payload):
    """Failure messages as long as a worker may send on a 2 KiB max_payload (control
    characters, six bytes each in JSON): the error event keeps its kind (all_failed) and drops
    the attempts' texts. It said reply_too_large, "the answer makes a reply of ... bytes": no
    target had answered."""
    stack, nc = await small_payload(2048, config({"main": fake()}), workers=[])

    async def failing_worker(msg: Any) -> None:  # fails with as long a message as asked for
        length = int(provider_request_decoder.decode(msg.data).messages[-1].content)
        failure = ProviderFailure("server_error", "\x01" * length, 503)
        await nc.publish(msg.reply, encoder.encode(failure))

    await nc.subscribe(subjects.provider_subject("main"), cb=failing_worker)
    ends = await StreamEnds(nc).start()
    for n, request_id in enumerate(_ids()):
        await ends.send(request(str(n * 37), id=request_id))
    await ends.settle(stack)
    ends.assert_one_end_and_one_audit_each()
    for reply in ends.reply.values():
        assert reply.error is not None and reply.error.type == "all_failed", reply


async def test_a_reset_whose_error_does_not_fit_still_reaches_the_client(small_payload):
    """A worker failing mid-stream with as long a message as its reply can carry (control
    characters, six bytes each in JSON) on a 2 KiB max_payload: the reset event must still
    reach the client, its message cut to fit, and the next target's answer follow. It was
    dropped as too large: the client read a gap in the events (StreamGap) instead of an
    answer that was there."""
    cfg = config({"main": fake(), "backup": fake(reply="ok", chunks=1)})
    _, nc = await small_payload(2048, cfg, workers=["backup"])

    async def fails_after_a_chunk(msg: Any) -> None:
        await nc.publish(msg.headers[subjects.STREAM_TO], b"Hello ")
        # As long a failure as fits the worker's reply, in as few fields as the wire allows.
        failure = b'{"status":"error","kind":"server_error","message":"%s"}'
        await nc.publish(msg.reply, failure % (b"\\u0001" * ((2048 - len(failure)) // 6)))

    await nc.subscribe(subjects.provider_subject("main"), cb=fails_after_a_chunk)
    await ensure_subscribed(nc)
    assembler = Assembler()
    events = [e async for e in stream(nc, request("hi"), assembler)]
    assert kinds(events) == ["delta", "reset", "delta", "end"]
    reset = events[1].reset
    assert (reset.attempt, reset.discard, reset.error.type) == (1, 1, "server_error")
    assert assembler.text == "ok" and events[-1].reply.status == "ok"


@pytest.mark.parametrize(
    "factory", [pytest.param(uvloop.new_event_loop, id="uvloop"), pytest.param(None, id="asyncio")]
)
def test_a_first_chunk_that_came_while_the_dispatcher_was_starved_is_served_not_timed_out(
    nats_url, factory
):
    """A read callback that holds the dispatcher's loop past a stream's ttft_s (a burst to
    handle, a GC pause), while the worker's first chunk arrives in time: uvloop runs due
    timers before it reads its sockets again, so the attempt timed out, the worker was told to
    cancel, and the next target was called and paid. Calls on llm.complete wait for the loop
    to catch up (service.loop.Timeouts, README: Circuit breakers); a stream's timer now does."""
    asked, starved = threading.Event(), threading.Event()

    async def answer(nc: Any, msg: Any) -> None:  # a worker answering while the dispatcher stalls
        asked.set()
        await asyncio.get_running_loop().run_in_executor(None, starved.wait, 10)
        await nc.publish(msg.headers[subjects.STREAM_TO], b"served in time")
        await nc.publish(msg.reply, encoder.encode(ProviderOk("", "m", chunks=1)))

    async def scenario() -> CompletionReply:
        routes = route({"provider": "main", "ttft_s": 0.2}, "backup")
        cfg = parse_config(config({"main": fake(), "backup": fake(reply="backup")}, routes))
        stack = await start_stack(cfg, nats_url, Tracing(), workers=["backup"])
        nc = await nats.connect(nats_url)
        async with loop_stall(0.6, first=starved.set) as stall:
            try:
                reading = asyncio.ensure_future(stream(nc, request("hi")).finish())
                while not asked.is_set():
                    await asyncio.sleep(0.001)
                stall()
                return await asyncio.wait_for(reading, 10)
            finally:
                await nc.close()
                await stack.stop()

    worker = peer_on_its_own_loop(nats_url, subjects.provider_subject("main"), answer)
    with worker, asyncio.Runner(loop_factory=factory) as runner:
        reply = runner.run(scenario())
    assert (reply.status, reply.provider) == ("ok", "main"), reply.attempts


async def test_a_stream_whose_dispatcher_dies_says_so_and_the_other_dispatcher_serves_anew(
    client, nats_url, tmp_path
):
    """Real processes: streams under way on one dispatcher, a second one started, the first
    SIGKILLed. llm.stream is core NATS, delivered once: the other cannot take a stream over,
    and the dead one cannot send its error event. Streams that asked for heartbeats (the
    client's default) end as soon as the silence outlasts them, long before their 30 s
    timeout, saying the dispatcher most likely died; one that did not ask waits out its
    timeout, and says how many events came and that the dispatcher serving it died mid-stream
    (one that stops sends shutting_down). A new stream is served."""
    words = " ".join(f"w{n}" for n in range(30))  # 9 s of chunks: longer than the timeout
    data = config({"slow": fake(reply=words, chunks=30, chunk_delay_ms=300)})
    service = Service(tmp_path, nats_url, data)
    try:
        _, doomed = service.start_all(["slow"], dispatchers=1)
        came = [0, 0, 0]
        outcomes: dict[int, BaseException | str] = {}

        async def read(i: int, timeout_s: float, heartbeat_s: float | None) -> None:
            req = CompletionRequest(id=f"s{i}", timeout_s=timeout_s, **USER_HELLO)
            try:
                async for _ in stream(client, req, heartbeat_s=heartbeat_s):
                    came[i] += 1
                outcomes[i] = "ended"
            except NoAnswer as exc:
                outcomes[i] = exc

        readers = [
            asyncio.create_task(read(0, 30, 0.5)),
            asyncio.create_task(read(1, 30, 0.5)),
            asyncio.create_task(read(2, 6, None)),
        ]
        await wait_for(lambda: all(came), what="every stream's first events")
        service.dispatcher()  # the second one, serving before the first dies
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait()
        await asyncio.gather(*readers)
        assert all(isinstance(o, NoAnswer) for o in outcomes.values()), outcomes
        for i in (0, 1):
            said = str(outcomes[i])
            assert re.search(r"went silent.*not even the heartbeat.*most likely died", said), said
        assert re.search(r"\d+ events came, then none.*died mid-stream", str(outcomes[2]))
        async for event in stream(client, CompletionRequest(**USER_HELLO)):
            assert event.kind == "delta"  # served: its first chunk (leaving aborts the rest)
            break
    finally:
        service.stop()


# ---- heartbeats: a dead dispatcher told from a slow model ------------------------------------


async def _raw_stream(client, req: CompletionRequest, headers: dict[str, str]) -> list[Any]:
    """Every message on the reply subject until the end event and 0.6 s after it."""
    inbox = client.new_inbox()
    sub = await client.subscribe(inbox)
    await client.publish(subjects.STREAM, encoder.encode(req), reply=inbox, headers=headers)
    messages = []
    while not messages or (messages[-1].headers or {}).get(subjects.EVENT) not in (END, ERROR):
        messages.append(await sub.next_msg(timeout=10))
    with contextlib.suppress(nats.errors.TimeoutError):
        while True:  # nothing may follow the end, a heartbeat neither
            messages.append(await sub.next_msg(timeout=0.6))
    await sub.unsubscribe()
    return messages


async def test_a_stream_that_asks_for_heartbeats_gets_one_at_once_and_one_in_each_quiet_spell(
    lifeline, client, audit
):
    """Chunks 1 s apart, heartbeats asked every 200 ms: one comes before anything else (the
    client learns a dispatcher that sends them took its request), more between the chunks,
    none after the end; they carry no Lifeline-Seq, so the numbered events are the answer's as
    without them. A stream that does not ask gets none."""
    slow = fake(reply="one two three", chunks=3, chunk_delay_ms=1000)
    await lifeline(config({"main": slow}))
    req = request("hi", timeout_s=10)
    beating = await _raw_stream(client, req, {subjects.HEARTBEAT_MS: "200"})
    heartbeat = {subjects.EVENT: "heartbeat"}
    assert beating[0].headers == heartbeat and beating[0].data == b""
    numbered = [m for m in beating if m.headers != heartbeat]
    assert [int(m.headers[subjects.SEQ]) for m in numbered] == [1, 2, 3, 4]
    assert b"".join(m.data for m in numbered[:3]) == b"one two three"
    assert numbered[-1] is beating[-1]  # the end is the last message
    between = [
        sum(1 for m in beating[beating.index(a) : beating.index(b)] if m.headers == heartbeat)
        for a, b in itertools.pairwise(numbered[:3])  # between the three chunks
    ]
    assert all(n >= 1 for n in between), between  # each second without a chunk had one
    quiet = await _raw_stream(client, request("hi", timeout_s=10), {})
    assert not [m for m in quiet if m.headers and m.headers.get(subjects.EVENT) == "heartbeat"]
    await audit.wait_for(2)  # one audit event each, heartbeats or not


async def test_a_client_asking_for_heartbeats_waits_on_a_dispatcher_that_sends_none(client):
    """A dispatcher that sends no heartbeats (an older one) is not taken for a dead one: the
    client holds the silence against it only once a heartbeat came. This one answers after
    2 s, past the 1.6 s of silence that heartbeats every 0.2 s would allow."""

    async def old_dispatcher(msg) -> None:
        await asyncio.sleep(2)
        assert subjects.HEARTBEAT_MS in msg.headers  # asked for, not given
        reply = CompletionReply("h1", "ok", provider="old", attempts=[])
        for seq, (event, data) in enumerate([(None, b"late"), (END, encoder.encode(reply))], 1):
            headers = {subjects.SEQ: str(seq), subjects.ATTEMPT_NO: "1"}
            if event is not None:
                headers[subjects.EVENT] = event
            await client.publish(msg.reply, data, headers=headers)

    sub = await client.subscribe(subjects.STREAM, cb=old_dispatcher)
    await ensure_subscribed(client)
    try:
        text, reply = "", None
        async for event in stream(client, request("hi", timeout_s=10), heartbeat_s=0.2):
            text += event.text
            reply = event.reply or reply
        assert (text, reply.provider) == ("late", "old")
    finally:
        await sub.unsubscribe()


async def test_a_stream_that_goes_silent_while_its_own_connection_is_down_blames_that(
    lifeline, nats_url
):
    """The client's own NATS connection dropped mid-stream and stays down: nothing reaches it,
    heartbeats neither. Its NoAnswer blamed the dispatcher ("most likely died"), which is
    alive and still sending; it says the client's connection is down instead."""
    from test_client import _Cuttable

    await lifeline(config({"slow": fake(reply="a b", chunks=2, chunk_delay_ms=5000)}))
    proxy = _Cuttable(nats_url)
    nc = await nats.connect(await proxy.up(), reconnect_time_wait=0.1)
    try:
        with pytest.raises(NoAnswer) as failed:
            async for event in stream(nc, request("hi", timeout_s=30), heartbeat_s=0.2):
                if event.kind == "delta":
                    await proxy.down()
        said = str(failed.value)
        assert "went silent" in said and "connection is down" in said, said
        assert "dispatcher serving it most likely died" not in said, said
        await proxy.up()
        await wait_for(lambda: nc.is_connected, 10)
    finally:
        await nc.close()
        await proxy.down()


@pytest.mark.parametrize(
    "value, beats",
    [
        ("0", True),
        (" 300 ", True),
        ("99999999999", True),
        ("0000000000300", True),
        ("9" * 5000, True),
        ("-5", False),
        ("3e2", False),
        ("\u0663\u0660\u0660", False),  # Arabic-Indic digits: no ASCII number
        ("", False),
    ],
)
async def test_any_whole_number_of_heartbeat_ms_is_kept_within_bounds_and_nothing_else_asks(
    lifeline, client, audit, value, beats
):
    """Lifeline-Heartbeat-Ms is any run of ASCII digits (the AsyncAPI pattern), kept within
    200 to 60,000. One of ten digits or more (a huge interval, or a small one written with
    leading zeros) asked for none instead: no heartbeat at once, and its client, holding
    the silence against none, waited out its timeout for a dead dispatcher. Whatever the
    value, the answer is whole and ends once, with no heartbeat after its end."""
    await lifeline(config({"main": fake(reply="a b", chunks=2)}))
    messages = await _raw_stream(client, request("hi"), {subjects.HEARTBEAT_MS: value})
    events = [(m.headers or {}).get(subjects.EVENT) for m in messages]
    assert (events[0] == "heartbeat") is beats, events
    assert events.count(END) == 1 and events[-1] == END, events
    await audit.wait_for(1)


async def test_heartbeats_are_not_held_through_the_dispatchers_outage(nats_url, tracers, client):
    """The dispatcher's connection dropped mid-stream: each heartbeat due meanwhile was put in
    nats-py's reconnect buffer (that the answers of every stream share, 2 MiB), to reach the
    client in one stale burst when it came back. None is held now; they resume once it is
    back, and the stream ends once."""
    from test_client import _Cuttable

    from service.app import start_worker

    proxy = _Cuttable(nats_url)
    cfg = parse_config(config({"slow": fake(reply="a b", chunks=2, chunk_delay_ms=4000)}))
    stack = await start_stack(cfg, await proxy.up(), tracers, workers=[])
    worker, _ = await start_worker(cfg, "slow", nats_url, tracers)  # not behind the proxy
    dispatcher = stack.dispatcher.transport.nc
    inbox = client.new_inbox()
    sub = await client.subscribe(inbox)
    headers = {subjects.HEARTBEAT_MS: "200"}
    try:
        await client.publish(subjects.STREAM, encoder.encode(request(timeout_s=30)), inbox, headers)
        first = await sub.next_msg(timeout=10)
        assert first.headers == {subjects.EVENT: "heartbeat"}
        await proxy.down()
        await wait_for(lambda: not dispatcher.is_connected)
        await asyncio.sleep(1.0)  # five intervals: five heartbeats were due
        assert b"heartbeat" not in b"".join(dispatcher._pending)
        await proxy.up()
        await wait_for(lambda: dispatcher.is_connected, 10)
        events = []
        while not events or events[-1] not in (END, ERROR):
            events.append((await sub.next_msg(timeout=20)).headers.get(subjects.EVENT))
        assert "heartbeat" in events and events.count(END) + events.count(ERROR) == 1, events
    finally:
        await stack.stop()
        await worker.stop()
        await proxy.down()


@pytest.mark.parametrize(
    "factory", [pytest.param(uvloop.new_event_loop, id="uvloop"), pytest.param(None, id="asyncio")]
)
def test_a_stream_whose_heartbeats_came_while_the_client_was_stalled_goes_on(nats_url, factory):
    """The client's loop stood still for longer than the silence heartbeats allow (a read
    callback holding it, a paused process) while its dispatcher, alive, kept sending them:
    the wait's timer fired before the socket was read again, and the stream raised NoAnswer
    blaming the dispatcher, its heartbeats waiting unread. A wait that ran out late waits
    once more before it judges."""
    finish = threading.Event()

    async def take(nc: Any, msg: Any) -> None:  # a dispatcher alive while the client stalls
        while not finish.is_set():
            await nc.publish(msg.reply, b"", headers={subjects.EVENT: "heartbeat"})
            await asyncio.sleep(0.05)
        delta = {subjects.SEQ: "1", subjects.ATTEMPT_NO: "1"}
        await nc.publish(msg.reply, b"Hi", headers=delta)
        reply = CompletionReply("r", "ok", provider="p", attempts=[])
        end = {**delta, subjects.SEQ: "2", subjects.EVENT: END}
        await nc.publish(msg.reply, encoder.encode(reply), headers=end)

    async def scenario() -> tuple[str, CompletionReply]:
        nc = await nats.connect(nats_url)
        # Past the 1.6 s of silence heartbeats every 0.2 s allow.
        async with loop_stall(2.5) as stall:
            try:
                events = stream(nc, request("hi", timeout_s=20), heartbeat_s=0.2)
                reading = asyncio.ensure_future(events.finish())
                await wait_for(lambda: nc.stats["in_msgs"], what="the first heartbeat")
                stall()
                await asyncio.sleep(0.3)  # the loop turns again after its stall
                finish.set()
                reply = await asyncio.wait_for(reading, 10)
                return events.assembler.text, reply
            finally:
                await nc.close()

    with peer_on_its_own_loop(nats_url, subjects.STREAM, take):
        try:
            with asyncio.Runner(loop_factory=factory) as runner:
                text, reply = runner.run(scenario())
        finally:
            finish.set()
    assert (text, reply.status) == ("Hi", "ok")
