"""Aborting a request its client no longer waits for (llm.abort), over a real nats-server: its
attempts are cancelled at their workers, it is still answered once and audited once (as
`aborted`), and nothing else is touched. Through the NATS wire, the Python client (a cancelled
task, a stream left early) and the HTTP gateway (a client that hangs up)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from typing import Any

import httpx
import nats
import pytest
from helpers import config, fake, hpub, raw_publish, wait_for
from test_gateway import gateway  # noqa: F401 (the fixture)

from schemas import ChatMessage, CompletionRequest, subjects
from schemas.wire import encoder, reply_decoder
from service.client import Lifeline, stream

SLOW = {"main": fake(latency_ms=30_000)}
# A stream of a hundred words, one every 100 ms: ten seconds, if nobody stops it.
LONG_STREAM = {"main": fake(reply=" ".join(["word"] * 100), chunks=100, chunk_delay_ms=100)}


def request(request_id: str, **fields: Any) -> bytes:
    body = CompletionRequest(
        messages=[ChatMessage("user", "Hello")], id=request_id, timeout_s=60, **fields
    )
    return encoder.encode(body)


async def running(stack: Any, count: int = 1) -> None:
    worker = stack.workers["main"]
    await wait_for(lambda: worker.in_flight == count, 5, what=f"{count} calls at the worker")


async def cancelled_at_the_worker(stack: Any, count: int = 1) -> None:
    worker = stack.workers["main"]
    await wait_for(
        lambda: worker.cancelled == count and not worker.in_flight, 5, what="the cancels"
    )


async def test_an_aborted_request_is_answered_once_audited_once_and_its_call_cancelled(
    lifeline, client, audit
):
    stack = await lifeline(config(SLOW))
    inbox = client.new_inbox()
    replies = await client.subscribe(inbox)
    await client.publish(
        subjects.COMPLETE, request("r-1"), reply=inbox, headers={subjects.ABORT_KEY: "k-1"}
    )
    await running(stack)
    await client.publish(subjects.ABORT, b"k-1")

    reply = reply_decoder.decode((await replies.next_msg(timeout=5)).data)
    assert (reply.id, reply.status, reply.error.type) == ("r-1", "error", "aborted")
    assert "aborted by its client" in reply.error.message
    [attempt] = reply.attempts  # where it was when it was stopped
    assert (attempt.target, attempt.outcome, attempt.reason) == ("main", "cancelled", "aborted")
    assert attempt.latency_ms > 0
    [(subject, event)] = await audit.wait_for(1)
    assert (subject, event.id, event.error_type) == ("llm.audit.error", "r-1", "aborted")
    # The provider call stopped, not left to run its 30 s: each wait above is 5 s at most.
    await cancelled_at_the_worker(stack)
    dispatcher = stack.dispatcher
    assert (dispatcher.aborts, dispatcher.in_flight) == (1, 0)
    await asyncio.sleep(0.2)
    with pytest.raises(nats.errors.TimeoutError):  # exactly one reply
        await replies.next_msg(timeout=0.2)
    assert len(audit.events) == 1


async def test_an_abort_stops_only_the_request_sent_with_its_key(lifeline, client, audit):
    # Three calls are left running: a short grace lets the stack stop without waiting them out.
    stack = await lifeline(config({**SLOW, "quick": fake()}, routes=None, shutdown_grace_s=0.5))
    inbox = client.new_inbox()
    replies = await client.subscribe(inbox)
    quick = request("quick-1", targets=["quick"])
    await client.publish(subjects.COMPLETE, quick, reply=inbox, headers={subjects.ABORT_KEY: "q"})
    assert reply_decoder.decode((await replies.next_msg(timeout=5)).data).status == "ok"
    for n, key in enumerate(["a", "b"]):
        headers = {subjects.ABORT_KEY: key}
        await client.publish(subjects.COMPLETE, request(f"slow-{n}"), reply=inbox, headers=headers)
    # A request without a key cannot be aborted; neither can a reused key's second request.
    await client.publish(subjects.COMPLETE, request("keyless"), reply=inbox)
    await client.publish(
        subjects.COMPLETE, request("reused"), reply=inbox, headers={subjects.ABORT_KEY: "a"}
    )
    await running(stack, 4)

    for stray in (b"q", b"nobody's", b"", b"a" * 300):  # answered already, unknown, odd
        await client.publish(subjects.ABORT, stray)
    await client.publish(subjects.ABORT, b"b")
    reply = reply_decoder.decode((await replies.next_msg(timeout=5)).data)
    assert (reply.id, reply.error.type) == ("slow-1", "aborted")
    await wait_for(lambda: stack.workers["main"].cancelled == 1, 5, what="the cancel")
    await asyncio.sleep(0.3)
    assert stack.workers["main"].in_flight == 3 and stack.dispatcher.in_flight == 3
    assert [e.id for _, e in audit.events] == ["quick-1", "slow-1"]
    assert stack.dispatcher.aborts_heard == 5 and stack.dispatcher.aborts == 1


@pytest.mark.parametrize(
    "length", [subjects.MAX_ABORT_KEY_LENGTH, subjects.MAX_ABORT_KEY_LENGTH + 1]
)
async def test_a_key_over_256_characters_is_accepted_and_served_but_aborts_nothing(
    lifeline, client, length
):
    """README, schemas/spec (the header's maxLength): the request is not refused for it."""
    stack = await lifeline(config({"main": fake(latency_ms=1000)}))
    key = "k" * length
    pending = asyncio.ensure_future(
        client.request(
            subjects.COMPLETE, request("r-key"), timeout=5, headers={subjects.ABORT_KEY: key}
        )
    )
    await running(stack)
    await client.publish(subjects.ABORT, key.encode())
    reply = reply_decoder.decode((await pending).data)
    assert reply.status == ("error" if length <= 256 else "ok")
    assert stack.dispatcher.aborts == (1 if length <= 256 else 0)


async def test_cancelling_the_python_clients_call_aborts_its_request(lifeline, nats_url, audit):
    stack = await lifeline(config(SLOW))
    async with Lifeline.connect(nats_url, timeout_s=60) as lifeline_client:
        call = asyncio.ensure_future(lifeline_client.complete("Hello", id="c-1"))
        await running(stack)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        [(_, event)] = await audit.wait_for(1)
        assert (event.id, event.error_type) == ("c-1", "aborted")
        await cancelled_at_the_worker(stack)


async def test_an_aborted_request_without_an_id_keeps_the_one_made_for_it(
    lifeline, nats_url, audit
):
    """Its reply and audit event said id "" (read again from the request) where every other
    outcome carries the id the dispatcher made for it: `lifeline audit <id>` found nothing."""
    stack = await lifeline(config(SLOW))
    async with Lifeline.connect(nats_url, timeout_s=60) as lifeline_client:
        call = asyncio.ensure_future(lifeline_client.complete("Hello"))  # no id
        await running(stack)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        [(_, event)] = await audit.wait_for(1)
        assert event.error_type == "aborted" and event.id


async def test_leaving_a_stream_before_its_end_aborts_it(lifeline, client, audit):
    stack = await lifeline(config(LONG_STREAM))
    body = CompletionRequest(messages=[ChatMessage("user", "Hello")], id="s-1", timeout_s=60)
    deltas = 0
    async for event in stream(client, body):
        deltas += event.kind == "delta"
        if deltas == 2:
            break  # the reader leaves after two chunks of a hundred
    [(_, event)] = await audit.wait_for(1)
    assert (event.id, event.error_type) == ("s-1", "aborted")
    assert [(a.outcome, a.reason) for a in event.attempts] == [("cancelled", "aborted")]
    await cancelled_at_the_worker(stack)


async def test_a_stream_kept_in_a_variable_is_still_aborted_when_its_loop_is_left(
    lifeline, client, audit
):
    """The module-level stream() on a connection of one's own, kept in a variable past its
    `async for`: leaving the loop ends the stream there, as Lifeline.stream() does, not when
    the variable goes (an async generator stayed open, its request running and billing)."""
    stack = await lifeline(config(LONG_STREAM))
    body = CompletionRequest(messages=[ChatMessage("user", "Hello")], id="s-4", timeout_s=60)
    events = stream(client, body)
    async for _ in events:
        break  # the reader leaves after the first event of a hundred
    [(_, event)] = await audit.wait_for(1)
    assert (event.id, event.error_type) == ("s-4", "aborted")
    await cancelled_at_the_worker(stack)
    assert events.reply is None and not events.done  # still held here, and ended


async def test_a_stream_left_early_after_its_hedge_won_still_lists_the_call_that_lost(
    lifeline, client, audit
):
    """The hedge streams, the slow call it beat was cancelled (hedge_lost); the reader then
    leaves. The aborted request's audit lists both calls, as a finished one's reply does."""
    providers = {
        "slow": fake(latency_ms=3000),
        "fast": fake(reply=" ".join(["word"] * 20), chunks=20, chunk_delay_ms=100),
    }
    await lifeline(
        config(providers, {"default": {"targets": ["slow", "fast"], "hedge_after_ms": 50}})
    )
    body = CompletionRequest(messages=[ChatMessage("user", "Hello")], id="s-3", timeout_s=60)
    events = 0
    async for _ in stream(client, body):
        events += 1
        if events == 3:
            break  # the reader leaves mid-stream
    [(_, event)] = await audit.wait_for(1)
    assert (event.id, event.error_type) == ("s-3", "aborted")
    assert [(a.target, a.outcome, a.reason, a.hedge) for a in event.attempts] == [
        ("slow", "cancelled", "hedge_lost", False),
        ("fast", "cancelled", "aborted", True),
    ]


async def test_a_stream_read_to_its_end_is_not_aborted(lifeline, client, audit):
    stack = await lifeline(config({"main": fake(chunks=3)}))
    body = CompletionRequest(messages=[ChatMessage("user", "Hello")], id="s-2", timeout_s=60)
    assert [e.kind async for e in stream(client, body)][-1] == "end"
    await asyncio.sleep(0.2)
    assert stack.dispatcher.aborts_heard == 0
    assert [e.error_type for _, e in await audit.wait_for(1)] == [None]


# ---- the HTTP gateway: a client that hangs up ---------------------------------------------------


def hang_up_after(url: str, body: bytes, until: bytes = b"", leave: Any = None) -> bytes:
    """POST `body` over a raw socket, read until `until` has come (or until `leave`, a
    threading.Event, is set), then close the connection: a client that leaves."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        seen = b""
        while until and until not in seen:
            seen += sock.recv(65536)
        if leave is not None:
            assert leave.wait(10)
        return seen


@pytest.mark.parametrize("stream", [False, True], ids=["answer", "stream before its first token"])
async def test_an_http_client_that_hangs_up_before_its_answer_has_its_request_aborted(
    gateway,  # noqa: F811
    audit,
    stream,
):
    gw, _, stack = await gateway(config(SLOW))
    body = (
        b'{"model": "default", "stream": %s, "messages": [{"role": "user", "content": "Hi"}]}'
        % (b"true" if stream else b"false")
    )
    leave = threading.Event()
    client = asyncio.ensure_future(asyncio.to_thread(hang_up_after, gw.url, body, leave=leave))
    await running(stack)  # the gateway's request is at the worker: now the client hangs up
    leave.set()
    assert await client == b""
    [(_, event)] = await audit.wait_for(1)
    assert event.error_type == "aborted"
    await cancelled_at_the_worker(stack)


async def test_an_http_stream_left_early_is_aborted(gateway, audit):  # noqa: F811
    gw, _, stack = await gateway(config(LONG_STREAM))
    body = b'{"model": "default", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}'
    seen = await asyncio.to_thread(hang_up_after, gw.url, body, b'"content"')
    assert b"text/event-stream" in seen
    [(_, event)] = await audit.wait_for(1, timeout_s=10)
    assert event.error_type == "aborted"
    await cancelled_at_the_worker(stack)


async def test_an_http_client_that_waits_gets_its_answer(gateway, audit):  # noqa: F811
    gw, _, _ = await gateway(config({"main": fake(latency_ms=300)}))
    async with httpx.AsyncClient(base_url=gw.url) as http:
        body = {"model": "default", "messages": [{"role": "user", "content": "Hi"}]}
        response = await http.post("/chat/completions", json=body)
    assert response.status_code == 200, response.text
    [(_, event)] = await audit.wait_for(1)
    assert event.status == "ok"


async def test_an_abort_right_behind_its_request_still_gets_it_answered_and_audited(
    lifeline, client, audit
):
    """The request and its abort in one read: the request's task has not started when the
    abort comes; it is still answered once and audited once."""
    await lifeline(config(SLOW))
    inbox = client.new_inbox()
    replies = await client.subscribe(inbox)
    for n in range(20):
        key = f"k-{n}"
        await client.publish(
            subjects.COMPLETE, request(f"r-{n}"), reply=inbox, headers={subjects.ABORT_KEY: key}
        )
        await client.publish(subjects.ABORT, key.encode())
    got = [reply_decoder.decode((await replies.next_msg(timeout=5)).data) for _ in range(20)]
    assert sorted(r.id for r in got) == sorted(f"r-{n}" for n in range(20))
    assert {r.error.type for r in got} == {"aborted"}
    events = await audit.wait_for(20)
    assert sorted(e.id for _, e in events) == sorted(f"r-{n}" for n in range(20))


async def test_a_key_with_spaces_around_it_aborts_its_request_when_sent_as_it_was(lifeline, client):
    """A header's value reaches the dispatcher with the whitespace around it stripped; the
    abort's body, compared as it came, named no request, and the request ran on unstoppable."""
    stack = await lifeline(config(SLOW))
    inbox = client.new_inbox()
    replies = await client.subscribe(inbox)
    key = "  spaced key\t"
    headers = {subjects.ABORT_KEY: key}
    await client.publish(subjects.COMPLETE, request("spaced"), reply=inbox, headers=headers)
    await running(stack)
    await client.publish(subjects.ABORT, key.encode())
    reply = reply_decoder.decode((await replies.next_msg(timeout=5)).data)
    assert (reply.id, reply.error.type) == ("spaced", "aborted")


@pytest.mark.parametrize(
    ("keys", "abort"),
    [
        ((b"  ",), b""),  # a blank key, and a stray empty abort from anyone
        ((b"\xffA", b"\xfeA"), b"\xfeA"),  # two clients' keys that read alike (U+FFFD)
    ],
    ids=["blank key", "keys not UTF-8"],
)
async def test_a_key_that_is_blank_or_not_utf8_aborts_nothing(
    lifeline, client, nats_url, keys, abort
):
    """A blank key was kept as "", so any client's empty abort stopped the request; keys not
    UTF-8 were read with U+FFFD for their bytes, so one client's abort stopped another's
    request. Neither makes a request stoppable: each is served all the same."""
    stack = await lifeline(config({"main": fake(latency_ms=1000)}))
    inbox = client.new_inbox()
    replies = await client.subscribe(inbox)
    for i, key in enumerate(keys):
        block = b"NATS/1.0\r\n%s: %s\r\n\r\n" % (subjects.ABORT_KEY.encode(), key)
        frame = hpub(subjects.COMPLETE.encode(), block, request(f"k{i}"), inbox.encode())
        await raw_publish(nats_url, [frame])
    await running(stack, len(keys))
    await raw_publish(
        nats_url, [b"PUB %s %d\r\n%s\r\n" % (subjects.ABORT.encode(), len(abort), abort)]
    )
    got = [reply_decoder.decode((await replies.next_msg(timeout=5)).data) for _ in keys]
    assert sorted((r.id, r.status) for r in got) == [(f"k{i}", "ok") for i in range(len(keys))]
    assert stack.dispatcher.aborts == 0


async def test_an_abort_read_with_a_streams_first_chunk_counts_that_chunk(lifeline, client, audit):
    """The abort comes in the same read as, and just ahead of, the attempt's first chunk: the
    chunk goes out as a delta before the cancel lands, and the attempt (cancelled before its
    call returned its output) said `chunks: 0` in the reply and the audit event. Whatever the
    reads: an attempt's `chunks` are the deltas its client got (the race is tried until it
    happens: both messages usually come in one read)."""
    await lifeline(config({"main": fake()}), [])

    async def worker(msg: Any) -> None:  # in the worker's place; the abort is the client's
        key = msg.headers[subjects.REQUEST_ID].encode()
        await client.publish(subjects.ABORT, key)
        await client.publish(msg.headers[subjects.STREAM_TO], b"Hello ")

    await client.subscribe(subjects.provider_subject("main"), cb=worker)
    await _abort_with_the_first_chunk(client, audit, lambda deltas: [("main", "cancelled", deltas)])


async def _abort_with_the_first_chunk(
    client: Any, audit: Any, expected: Callable[[int], list[tuple[str, str, int]]]
) -> None:
    """Streams aborted by a worker stand-in that sends the abort, then the first chunk, until
    the chunk is delivered (up to five tries): each reply's and audit event's attempts are
    `expected(the deltas the client got)`, as (target, outcome, chunks)."""
    raced = 0
    for n in range(5):
        inbox = client.new_inbox()
        events = await client.subscribe(inbox)
        request_id = f"race-{n}"
        headers = {subjects.ABORT_KEY: request_id}
        await client.publish(subjects.STREAM, request(request_id), reply=inbox, headers=headers)
        kinds: list[str] = []
        while not kinds or kinds[-1] not in ("end", "error"):
            msg = await events.next_msg(timeout=5)
            kinds.append((msg.headers or {}).get(subjects.EVENT, "delta"))
        reply = reply_decoder.decode(msg.data)
        assert reply.error is not None and reply.error.type == "aborted"
        [event] = [e for _, e in await audit.wait_for(n + 1) if e.id == request_id]
        deltas = kinds.count("delta")
        for attempts in (reply.attempts, event.attempts):
            got = [(a.target, a.outcome, a.chunks) for a in attempts]
            assert got == expected(deltas)
        raced += deltas
        if raced:
            break
    assert raced, "the first chunk never came in the abort's read"


@pytest.mark.parametrize("hedged", [False, True], ids=["before-its-hedge", "its-hedge"])
async def test_an_abort_read_with_a_raced_streams_first_chunk_counts_that_chunk(
    lifeline, client, audit, hedged
):
    """As above, on a hedging route, whose calls run as tasks beside the walk: the cancelled
    call's count never reached the walk's accounting, which said `chunks: 0` for a delta the
    client got. Before the hedge starts (the first call alone), and in the hedge, while the
    call it hedged runs on (never answering)."""
    providers = {"main": fake(), "other": fake()}
    route = {"targets": ["main", "other"], "hedge_after_ms": 50 if hedged else 30_000}
    await lifeline(config(providers, {"default": route}), [])

    async def worker(msg: Any) -> None:  # in the worker's place; the abort is the client's
        key = msg.headers[subjects.REQUEST_ID].encode()
        await client.publish(subjects.ABORT, key)
        await client.publish(msg.headers[subjects.STREAM_TO], b"Hello ")

    async def silent(msg: Any) -> None:  # the call the hedge races: it never answers
        pass

    streams = "other" if hedged else "main"
    await client.subscribe(subjects.provider_subject(streams), cb=worker)
    if hedged:
        await client.subscribe(subjects.provider_subject("main"), cb=silent)
    if hedged:
        await _abort_with_the_first_chunk(
            client,
            audit,
            lambda deltas: [("main", "cancelled", 0), ("other", "cancelled", deltas)],
        )
    else:
        await _abort_with_the_first_chunk(
            client, audit, lambda deltas: [("main", "cancelled", deltas)]
        )
