"""The Python client (service/client.py) over a real nats-server and a Lifeline stack: every
method, a stream with a reset and one with a gap, a job submitted twice, a result waited for."""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import threading
import time
from itertools import pairwise
from typing import Any

import msgspec
import nats
import pytest
import uvloop
from helpers import (
    TIMER_SLACK_MS,
    SilentServer,
    cli_env,
    config,
    dial_upstream,
    fake,
    loop_stall,
    peer_on_its_own_loop,
    wait_for,
)
from nats.aio.client import Client
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from schemas import ChatMessage, CompletionRequest, streaming, subjects
from schemas.wire import CompletionReply, ErrorInfo, encoder, progress_decoder, reply_decoder
from service import natsio
from service.client import (
    JOBS_STREAM,
    RESULTS_BUCKET,
    JobsUnavailable,
    Lifeline,
    LifelineError,
    NoAnswer,
    NoDispatcher,
    RequestTooLarge,
    StreamGap,
    Unreachable,
    request_of,
    stream,
    stream_text,
)
from service.config import JobsSettings
from service.embedded import EmbeddedNats
from service.natsio import ensure_subscribed
from service.natsopts import NatsOptionError

STORY = "Once upon a time, a lighthouse keeper kept the light burning."


@pytest.fixture
async def lifeline_client(nats_url: str):
    async with Lifeline.connect(nats_url, timeout_s=5) as client:
        yield client


def test_requests_are_made_of_strings_dicts_and_fields_and_checked():
    req = request_of(
        ["Be brief.", {"role": "user", "content": "Hi"}][1:],
        route="fast",
        tools=[{"name": "get_weather"}],
        tool_choice={"name": "get_weather"},
    )
    assert req.messages == [ChatMessage("user", "Hi")] and req.route == "fast"
    assert req.tools[0].name == "get_weather" and req.tool_choice.name == "get_weather"
    assert request_of("Hi").messages == [ChatMessage("user", "Hi")]
    again = request_of(req, timeout_s=3)
    assert (again.timeout_s, again.route, again.messages) == (3, "fast", req.messages)
    with pytest.raises(TypeError, match="max_token"):
        request_of("Hi", max_token=5)
    with pytest.raises(msgspec.ValidationError, match=r"\$.messages\[0\].role"):
        request_of([{"role": "robot", "content": "Hi"}])


async def test_complete_returns_ok_and_error_replies_alike(lifeline, lifeline_client):
    providers = {"flaky": fake(fail_status=429), "backup": fake()}
    routes = {"default": {"targets": ["flaky", "backup"]}, "strict": {"targets": ["flaky"]}}
    await lifeline(config(providers, routes))
    reply = await lifeline_client.complete(
        [{"role": "user", "content": "To get to the other side"}]
    )
    assert (reply.status, reply.content, reply.provider) == (
        "ok",
        "To get to the other side",
        "backup",
    )
    assert [(a.target, a.error_type, a.next) for a in reply.attempts] == [
        ("flaky", "rate_limit", "fallback"),
        ("backup", None, None),
    ]
    failed = await lifeline_client.complete("Hi", route="strict")  # returned, not raised
    assert failed.status == "error" and failed.error.type == "all_failed"


async def test_a_request_made_inside_the_callers_span_joins_its_trace(lifeline, lifeline_client):
    """The README says to send a traceparent so Lifeline's spans join the caller's trace; the
    client sent none and had no way to, so each request began a trace of its own."""
    await lifeline(config({"main": fake()}))
    caller = SpanContext(
        0x0AF7651916CD43DD8448EB211C80319C,
        0xB7AD6B7169203331,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    with trace.use_span(NonRecordingSpan(caller)):
        reply = await lifeline_client.complete("Hi")
        async with lifeline_client.stream("Hi") as answer:
            async for _ in answer:
                pass
    assert reply.trace_id == answer.reply.trace_id == "0af7651916cd43dd8448eb211c80319c"


async def test_connect_reads_nats_url_and_a_cluster_list(lifeline, nats_url, monkeypatch):
    await lifeline(config({"main": fake()}))
    dead = "nats://127.0.0.1:1"  # nothing listens there: the list's other server serves
    monkeypatch.setenv("NATS_URL", f"{dead}, {nats_url}")
    async with Lifeline.connect(route="default") as client:
        assert (await client.complete("hello", timeout_s=5)).content == "hello"
    monkeypatch.setenv("NATS_URL", "nats://alice:s3cret@127.0.0.1:1")
    # Its only server refused: Unreachable at once, saying so. Waiting out connect_timeout_s
    # (or retrying) would outlast the bound around it.
    async with asyncio.timeout(30):
        with pytest.raises(Unreachable, match=r"nats://\*\*\*@127.0.0.1:1") as refused:
            await Lifeline.connect(connect_timeout_s=600)
    assert "ConnectionRefusedError" in str(refused.value), refused.value
    assert "s3cret" not in str(refused.value)


# complete()'s two reply paths: its own subscription (heartbeats, the default), nats-py's request().
REPLY_PATHS = pytest.mark.parametrize("heartbeat_s", [2.0, None], ids=["heartbeats", "none"])


@REPLY_PATHS
async def test_transport_problems_raise(lifeline_client, client, tmp_path, heartbeat_s):
    with pytest.raises(NoDispatcher, match="lifeline run"):
        await lifeline_client.complete("Hi", heartbeat_s=heartbeat_s)
    with pytest.raises(NoDispatcher):
        await lifeline_client.stream("Hi").finish()
    with pytest.raises(NatsOptionError, match="credentials file"):  # as `lifeline --nats-creds`
        await Lifeline.connect(creds=str(tmp_path / "missing.creds"))
    own = Lifeline(client)  # a connection of your own: close() leaves it open
    with pytest.raises(NoDispatcher):
        await own.complete("Hi", heartbeat_s=heartbeat_s)
    await own.close()
    assert not client.is_closed


async def test_a_stream_applies_its_reset_and_ends_with_the_reply(lifeline, lifeline_client):
    providers = {
        "chatty": fake(fail_after_chunks=3, chunks=6),
        "storyteller": fake(reply=STORY, chunks=4),
    }
    await lifeline(config(providers))
    seen: list[tuple[str, str]] = []
    async with lifeline_client.stream("hello streaming world") as answer:
        async for event in answer:
            seen.append((event.kind, answer.text))
    kinds = [kind for kind, _ in seen]
    assert kinds == ["delta"] * 3 + ["reset"] + ["delta"] * 4 + ["end"]
    assert seen[2][1] == "hello stream"[: len(seen[2][1])] and seen[3][1] == ""  # voided
    assert answer.text == STORY and answer.done
    reply = answer.reply
    assert (reply.status, reply.content, reply.target) == ("ok", None, "storyteller")
    assert reply.stream.resets == 1 and [a.chunks for a in reply.attempts] == [3, 4]


async def test_a_stream_with_a_missing_event_raises_a_gap(client, lifeline_client):
    async def gappy(msg: Any) -> None:  # a stand-in dispatcher that loses event 2
        for seq, text in ((1, b"a"), (3, b"c")):
            headers = {subjects.SEQ: str(seq), subjects.ATTEMPT_NO: "1"}
            await client.publish(msg.reply, text, headers=headers)

    await client.subscribe(subjects.STREAM, cb=gappy)
    await ensure_subscribed(client)
    answer = lifeline_client.stream("Hi")
    with pytest.raises(StreamGap, match="event 3 arrived after event 1"):
        await answer.finish()
    assert answer.text == "a"


async def test_a_stream_that_cannot_be_trusted_raises_a_lifeline_error(client, lifeline_client):
    """The README: every transport problem is a LifelineError, a stream's StreamGap included.
    StreamGap and StreamProtocolError were schemas.streaming's, no LifelineError: a service
    that caught LifelineError around a stream crashed on an event lost in a NATS reconnect."""
    import schemas.streaming

    async def gappy(msg: Any) -> None:  # a stand-in dispatcher that loses event 2
        for seq, text in ((1, b"a"), (3, b"c")):
            headers = {subjects.SEQ: str(seq), subjects.ATTEMPT_NO: "1"}
            await client.publish(msg.reply, text, headers=headers)

    async def not_lifeline(msg: Any) -> None:  # something else subscribed to llm.stream
        await client.publish(msg.reply, b"<html>502 Bad Gateway</html>")

    sub = await client.subscribe(subjects.STREAM, cb=gappy)
    await ensure_subscribed(client)
    with pytest.raises(LifelineError, match="event 3 arrived after event 1") as gap:
        await lifeline_client.stream("Hi").finish()
    assert isinstance(gap.value, StreamGap | schemas.streaming.StreamGap)
    await sub.unsubscribe()
    await client.subscribe(subjects.STREAM, cb=not_lifeline)
    await ensure_subscribed(client)
    with pytest.raises(LifelineError, match="Lifeline-Seq") as junk:
        await lifeline_client.stream("Hi").finish()
    assert isinstance(junk.value, schemas.streaming.StreamProtocolError)


async def test_a_stream_stopped_before_its_end_says_so_when_its_reply_is_asked_for(
    lifeline, lifeline_client
):
    """finish() on a stream already left (a read cancelled by a timeout, aclose()) raised a
    bare AssertionError, and under `python -O` returned None as if it were the reply."""
    await lifeline(config({"main": fake(chunks=20, chunk_delay_ms=200)}))
    answer = lifeline_client.stream("one two three four five six")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(answer.finish(), 0.3)
    with pytest.raises(LifelineError, match="stopped before its end"):
        await answer.finish()
    async with lifeline_client.stream("one two three four five six") as left:
        await anext(left)
    with pytest.raises(LifelineError, match="stopped before its end"):
        await left.finish()


async def test_an_answer_that_is_no_reply_raises_a_lifeline_error(client, lifeline_client):
    """Something other than a dispatcher subscribed to llm.complete (or llm.jobs.result)
    answered: complete() and result() raised msgspec's DecodeError, no LifelineError."""

    async def not_lifeline(msg: Any) -> None:
        await client.publish(msg.reply, b"<html>502 Bad Gateway</html>")

    await client.subscribe(subjects.COMPLETE, cb=not_lifeline)
    await client.subscribe(subjects.JOBS_RESULT, cb=not_lifeline)
    await ensure_subscribed(client)
    with pytest.raises(LifelineError, match="llm.complete is no Lifeline reply.*502 Bad"):
        await lifeline_client.complete("Hi")
    with pytest.raises(LifelineError, match="llm.jobs.result is no Lifeline reply"):
        await lifeline_client.result("job-1")


async def test_a_stream_closed_from_another_task_ends_its_readers_loop_and_is_aborted(
    lifeline, lifeline_client
):
    """A "stop" button's handler calls aclose() while the reader task waits for the next
    event: aclose() raised "asynchronous generator is already running", and the request was
    aborted only if the garbage collector happened to close what it left."""
    stack = await lifeline(config({"main": fake(chunks=50, chunk_delay_ms=100)}))
    subscribed = len(lifeline_client.nc._subs)
    answer = lifeline_client.stream(" ".join(["word"] * 50))
    kinds: list[str] = []

    async def reader() -> str:
        async for event in answer:
            kinds.append(event.kind)
        return "ended"

    reading = asyncio.ensure_future(reader())
    await wait_for(lambda: len(kinds) >= 2)
    # Twice at once (a stop button pressed twice): one of them waited forever, and the
    # reader, cancelled twice, died cancelled instead of ending.
    await asyncio.wait_for(asyncio.gather(answer.aclose(), answer.aclose()), 5)
    assert await asyncio.wait_for(reading, 5) == "ended"  # as after a break: no error
    assert len(lifeline_client.nc._subs) == subscribed
    await wait_for(lambda: stack.dispatcher.aborts == 1, timeout_s=5)
    with pytest.raises(LifelineError, match="stopped before its end"):
        await answer.finish()


async def test_leaving_a_loop_over_a_stream_ends_it_unless_async_with_holds_it(
    lifeline, lifeline_client
):
    """A `break` out of `async for event in answer`, with neither `async with` nor aclose(),
    left the stream subscribed and its request running for as long as `answer` lived: the
    dispatcher streamed on into a subscription nobody read, its provider paid for every word."""
    stack = await lifeline(config({"main": fake(chunks=50, chunk_delay_ms=100)}))
    subscribed = len(lifeline_client.nc._subs)
    answer = lifeline_client.stream(" ".join(["word"] * 50))
    async for _ in answer:
        break
    await wait_for(lambda: stack.dispatcher.aborts == 1, timeout_s=5)
    assert len(lifeline_client.nc._subs) == subscribed
    assert answer.text.startswith("word")  # what was read is still there
    with pytest.raises(LifelineError, match="left its `async for`"):
        await answer.finish()
    assert [event async for event in answer] == []
    # In `async with`, the stream lasts as long as it: a loop left, the next one reads on.
    async with lifeline_client.stream("one two three four") as whole:
        async for _ in whole:
            break
        reply = await whole.finish()
    assert (reply.status, whole.text) == ("ok", "one two three four")
    assert stack.dispatcher.aborts == 1 and len(lifeline_client.nc._subs) == subscribed


async def test_a_second_reader_of_a_stream_is_refused_and_spoils_nothing(lifeline, lifeline_client):
    """Two tasks reading one stream (a finish() while a loop reads it): the second got
    RuntimeError "asynchronous generator is already running", and the first's stream ended
    then and there, its reply lost. Negative overloaded_retries raised AssertionError."""
    stack = await lifeline(config({"main": fake(chunks=5, chunk_delay_ms=100)}))
    answer = lifeline_client.stream("one two three four five")
    first = asyncio.ensure_future(answer.finish())
    await wait_for(lambda: answer.text)
    with pytest.raises(LifelineError, match="read by another task"):
        await answer.finish()
    reply = await asyncio.wait_for(first, 10)
    assert (reply.status, answer.text) == ("ok", "one two three four five")
    assert stack.dispatcher.aborts == 0
    with pytest.raises(ValueError, match="overloaded_retries"):
        await lifeline_client.complete("Hi", overloaded_retries=-1)
    with pytest.raises(ValueError, match="overloaded_retries"):
        lifeline_client.stream("Hi", overloaded_retries=-1)


async def test_the_module_level_stream_ends_with_its_loop_as_the_method_does(lifeline, client):
    """stream(nc, request) on a connection of one's own was a bare async generator: a `break`
    left its inbox subscribed and its request running (and billing) until the garbage
    collector came, and a second reader broke it. It now ends as Lifeline.stream() does, and
    `contextlib.aclosing()`, which its docs asked for, still works."""
    stack = await lifeline(config({"main": fake(chunks=50, chunk_delay_ms=100)}))
    subscribed = len(client._subs)
    words = CompletionRequest(messages=[ChatMessage("user", " ".join(["word"] * 50))], timeout_s=60)
    answer = stream(client, words)
    async for _ in answer:
        break  # kept in `answer`: the break alone ends it
    await wait_for(lambda: stack.dispatcher.aborts == 1, timeout_s=10, what="the abort")
    assert len(client._subs) == subscribed and answer.text.startswith("word")
    async with contextlib.aclosing(stream(client, words)) as events:
        async for _ in events:
            break
    await wait_for(lambda: stack.dispatcher.aborts == 2, timeout_s=10, what="the second abort")
    assert len(client._subs) == subscribed
    short = CompletionRequest(messages=[ChatMessage("user", "one two three")], timeout_s=60)
    answer = stream(client, short)
    first = asyncio.ensure_future(answer.finish())
    await wait_for(lambda: answer.text, what="the first reader's first word")
    with pytest.raises(LifelineError, match="read by another task"):
        await answer.finish()
    assert (await asyncio.wait_for(first, 30)).status == "ok"
    text, reply = await stream_text(client, short)
    assert (reply.status, text) == ("ok", "one two three")
    assert stack.dispatcher.aborts == 2 and len(client._subs) == subscribed


async def test_an_overloaded_request_is_sent_again_when_asked(lifeline, lifeline_client):
    """One dispatcher slot, held by a slow stream: the next request is refused as overloaded,
    and, when asked, sent again after retry_after_s until the slot is free (a stream's refusal
    is never shown as an event)."""
    providers = {"slow": fake(chunks=3, chunk_delay_ms=150)}
    await lifeline(config(providers, max_in_flight=1, default_timeout_s=5))
    for _ in range(32):  # quick answers bring retry_after_s (their moving average) down from 1 s
        await lifeline_client.complete("warm-up")
    held = lifeline_client.stream("first")
    assert (await anext(held)).kind == "delta"
    refused = await lifeline_client.complete("second")
    # Learnt from the warm-up's answers (a moving average of their latency): below its 1 s start.
    assert refused.error.type == "overloaded" and refused.error.retry_after_s < 1
    reply, events = await asyncio.gather(
        lifeline_client.complete("second", overloaded_retries=30),
        _events(lifeline_client.stream("third", overloaded_retries=30)),
    )
    assert (reply.status, reply.content) == ("ok", "second")
    assert [e.kind for e in events] == ["delta"] * 3 + ["end"] and events[0].seq == 1
    await held.aclose()


async def _events(answer: Any) -> list[Any]:
    return [event async for event in answer]


async def test_a_job_submitted_twice_is_kept_once_and_its_result_waited_for(
    lifeline, lifeline_client
):
    """Submitted before any dispatcher runs (the client makes the stream), answered once one
    starts; the same id again is a duplicate."""
    first = await lifeline_client.submit("hello later", job_id="job-1")
    again = await lifeline_client.submit("hello later", job_id="job-1")
    assert (first.job_id, first.duplicate, again.duplicate) == ("job-1", False, True)
    assert again.seq == first.seq and first.stream == JOBS_STREAM
    assert await lifeline_client.result("job-1") is None  # no dispatcher yet
    await lifeline(config({"main": fake()}))
    reply = await lifeline_client.result("job-1", wait_s=5)
    assert (reply.id, reply.status, reply.content) == ("job-1", "ok", "hello later")
    other = await lifeline_client.submit(CompletionRequest([ChatMessage("user", "x")], id="j2"))
    assert other.job_id == "j2" and not other.duplicate
    assert (await lifeline_client.result("j2", wait_s=5)).content == "x"


async def test_a_request_unanswered_while_nats_is_down_says_so(monkeypatch):
    """Requests made while the connection reconnects wait, as nats-py buffers them; one that
    times out then blames the connection, not the dispatcher. Once the waiting ones fill
    nats-py's buffer (2 MiB), the next is refused at once as Unreachable, not with nats-py's
    own error."""
    monkeypatch.setattr("service.client._GRACE_S", 0.1)
    monkeypatch.setattr("service.client._JS_TIMEOUT_S", 60)
    server = EmbeddedNats(port=-1)
    server.start()
    try:
        async with Lifeline.connect(server.url, timeout_s=0.2) as client:
            server.stop()
            await wait_for(lambda: not client.nc.is_connected)
            with pytest.raises(NoAnswer, match="NATS connection is down and reconnecting"):
                await client.complete("Hi")
            with pytest.raises(NoAnswer, match="NATS connection is down and reconnecting"):
                await client.stream("Hi").finish()
            with pytest.raises(Unreachable, match="down and reconnecting.*ask again"):
                await asyncio.wait_for(client.result("job-1"), 20)  # not a 60 s ask first
            big = "x" * 650_000  # three fill the buffer; each fits max_payload (1 MiB)
            waiting = [asyncio.ensure_future(client.complete(big)) for _ in range(3)]
            await wait_for(lambda: client.nc.pending_data_size > 1_900_000)
            for send in (lambda: client.complete(big), lambda: client.stream(big).finish()):
                with pytest.raises(Unreachable, match="fill nats-py's buffer"):
                    await send()
            for outcome in await asyncio.gather(*waiting, return_exceptions=True):
                assert isinstance(outcome, NoAnswer), outcome
    finally:
        server.stop()


class _Cuttable:
    """A TCP proxy to a NATS server that the test takes down (its connections cut, new ones
    refused) and up again: the client's connection drops and comes back while the server,
    and every other connection to it, stay up."""

    def __init__(self, upstream: str) -> None:
        self.host, port = upstream.removeprefix("nats://").rsplit(":", 1)
        self.upstream_port = int(port)
        self.port = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def up(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return f"nats://127.0.0.1:{self.port}"

    async def down(self) -> None:
        self.server.close()
        await self.server.wait_closed()
        for writer in self.writers:
            writer.close()
        self.writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        upstream = await dial_upstream(self.server, (self.host, self.upstream_port), self.writers)
        if upstream is None:
            writer.close()
            return
        up_reader, up_writer = upstream

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@REPLY_PATHS
async def test_a_request_whose_answer_a_reconnect_lost_says_so(
    client, nats_url, monkeypatch, heartbeat_s
):
    """The connection dropped and came back while a request waited, and its answer, sent
    meanwhile, was lost: its NoAnswer blamed the dispatcher ("may have stopped"), which had
    answered, rather than the reconnect."""
    monkeypatch.setattr("service.client._GRACE_S", 0.2)
    asked: list[Any] = []

    async def answers_late(msg: Any) -> None:  # a stand-in dispatcher, answering when told
        asked.append(msg)

    await client.subscribe(subjects.COMPLETE, cb=answers_late)
    await client.subscribe(subjects.STREAM, cb=answers_late)
    await ensure_subscribed(client)
    proxy = _Cuttable(nats_url)
    try:
        async with Lifeline.connect(await proxy.up(), timeout_s=2) as lifeline_client:
            for call in (
                lambda: lifeline_client.complete("Hi", heartbeat_s=heartbeat_s),
                lambda: lifeline_client.stream("Hi").finish(),
            ):
                asked.clear()
                waiting = asyncio.ensure_future(call())
                await wait_for(lambda: asked)
                await proxy.down()
                await wait_for(lambda: not lifeline_client.nc.is_connected)
                reply = _overloaded_reply("r", 1.0)  # any reply: it is lost on the way
                headers = {subjects.SEQ: "1", subjects.ATTEMPT_NO: "1", subjects.EVENT: "end"}
                await client.publish(asked[0].reply, reply, headers=headers)
                await client.flush()
                await proxy.up()
                await wait_for(lambda: lifeline_client.nc.is_connected, timeout_s=10)
                with pytest.raises(NoAnswer, match="reconnected.*lost.*send the request again"):
                    await asyncio.wait_for(waiting, 10)
    finally:
        await proxy.down()


async def test_an_outage_is_one_warning_however_many_retries_and_its_end_is_said(caplog):
    """The connection retries about twice a second while NATS is down: an application's log
    gets the outage's first failure, not a line per retry, and a line once it is back."""
    server = EmbeddedNats(port=-1)
    server.start()
    try:
        async with Lifeline.connect(server.url, timeout_s=0.2) as client:
            port = server.port
            caplog.set_level("DEBUG", logger="lifeline.client")
            server.stop()
            await asyncio.sleep(2.5)  # five retries or so
            retries = [r for r in caplog.records if "retry" in r.getMessage()]
            assert retries and all(r.levelname == "DEBUG" for r in retries)
            server = EmbeddedNats(port=port)
            server.start()
            await wait_for(lambda: client.nc.is_connected, timeout_s=10)
            with pytest.raises(NoDispatcher):  # asked, and the server answered
                await client.complete("Hi")
    finally:
        server.stop()
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "lifeline.client"]
    warnings = [line for level, line in said if level == "WARNING"]
    assert len(warnings) == 1 and "reconnecting" in warnings[0], said
    assert any(level == "INFO" and "reconnected after" in line for level, line in said), said


async def test_an_error_on_a_live_connection_is_no_outage_and_hides_none_after_it(caplog):
    """A refused publish was taken for an outage's first failure: said as "reconnecting", and
    the real outage after it got no WARNING and a wrong duration."""
    conf = (
        "authorization { users = [ {user: a, password: b, "
        'permissions: {publish: {deny: ["forbidden"]}}} ] }'
    )
    server = EmbeddedNats(port=-1, conf=conf)
    server.start()
    try:
        url = server.url.replace("nats://", "nats://a:b@")
        async with Lifeline.connect(url, timeout_s=0.2) as client:
            caplog.set_level("DEBUG", logger="lifeline.client")
            await client.nc.publish("forbidden", b"x")
            await wait_for(
                lambda: any("permissions violation" in r.getMessage() for r in caplog.records)
            )
            port = server.port
            server.stop()
            await asyncio.sleep(1.5)
            server = EmbeddedNats(port=port, conf=conf)
            server.start()
            await wait_for(lambda: client.nc.is_connected, timeout_s=10)
    finally:
        server.stop()
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("permissions violation" in w and "reconnecting" not in w for w in warned), warned
    assert any("reconnecting (retries logged at DEBUG)" in w for w in warned), warned


async def test_a_connect_given_up_on_leaves_nothing_connecting_behind():
    """Cancelled before the server answered (a timeout around it, a cancelled request handler,
    an integration's close()), connect() left nats-py connecting on for good: its socket held
    open, and another one dialed after each connect timeout."""
    async with SilentServer() as server:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(Lifeline.connect(server.url), 0.5)
        await wait_for(lambda: server.dialed and len(server.hung_up) == len(server.dialed))
        connecting = [t for t in asyncio.all_tasks() if "Client.connect" in repr(t.get_coro())]
        assert not connecting


async def test_a_job_submitted_to_a_server_without_jetstream_says_what_to_do():
    with EmbeddedNats(port=-1, jetstream=False) as server:
        async with Lifeline.connect(server.url, timeout_s=2) as client:
            with pytest.raises(JobsUnavailable, match=r"is JetStream on \(nats-server -js\)"):
                await client.submit("hello", job_id="nowhere")


async def test_a_result_read_from_the_bucket_is_a_result_or_none_whatever_happens_to_it(
    lifeline_client, client
):
    """No dispatcher runs, so the bucket is read: a value on the job's key that is no result
    (anyone may have JetStream write its answers there) raised msgspec's error, and the bucket
    deleted during a wait raised nats-py's NoRespondersError; both are "no result yet"."""
    await lifeline_client.submit("hello", job_id="victim")  # makes the stream and the bucket
    kv = await client.jetstream().key_value(RESULTS_BUCKET)
    await kv.put(subjects.job_key("victim"), b'{"stream":"LIFELINE_JOBS","seq":1}')
    assert await lifeline_client.result("victim") is None
    waiting = asyncio.ensure_future(lifeline_client.result("victim", wait_s=2))
    await asyncio.sleep(0.5)
    await client.jetstream().delete_key_value(RESULTS_BUCKET)
    assert await waiting is None


async def test_a_result_without_jetstream_state_is_none(lifeline_client):
    assert await lifeline_client.result("never-submitted", wait_s=0.1) is None


def test_the_clients_jobs_defaults_are_the_configs():
    """submit() makes the stream and bucket as a dispatcher would, when none has yet."""
    settings = JobsSettings()
    assert (JOBS_STREAM, RESULTS_BUCKET) == (settings.stream, settings.results_bucket)
    from service import client

    assert (client._JOBS_MAX, client._JOBS_DEDUP_WINDOW_S, client._RESULTS_TTL_S) == (
        settings.max_jobs,
        settings.dedup_window_s,
        settings.results_ttl_s,
    )


async def test_a_request_that_fits_only_without_its_headers_is_refused_and_spares_the_connection(
    lifeline, lifeline_client
):
    """Every request carries an abort key (a job its Nats-Msg-Id); nats-py checks only the
    payload, and the server closes the connection for good over a message that does not fit."""
    await lifeline(config({"main": fake()}))
    client = lifeline_client
    base = len(msgspec.json.encode(client.request("x", timeout_s=2))) - 1
    request = client.request("x" * (client.nc.max_payload - 8 - base), timeout_s=2)
    assert len(msgspec.json.encode(request)) == client.nc.max_payload - 8  # fits by itself
    with pytest.raises(RequestTooLarge, match="with its headers"):
        await client.complete(request)
    with pytest.raises(RequestTooLarge, match="with its headers"):
        await client.stream(request).finish()
    with pytest.raises(RequestTooLarge, match="with its headers"):
        await client.submit(request, job_id="big")
    assert not client.nc.is_closed
    assert (await client.complete("still here")).content == "still here"


async def test_a_job_id_its_header_cannot_carry_is_refused(lifeline_client):
    for job_id in ("row-7 ", " row-7", "a\nb"):
        with pytest.raises(ValueError, match="Nats-Msg-Id"):
            await lifeline_client.submit("hi", job_id=job_id)


async def test_a_notify_subject_no_dispatcher_would_publish_on_is_refused(lifeline_client):
    """The dispatcher publishes a job's result on no subject of Lifeline's or the server's,
    nor on one no subscriber can match, and says nothing of it: submit() took such a subject
    silently (where `lifeline submit --notify` refuses it), and the result never came."""
    for subject in ("llm.results.billing", "results.*", "results.>", "a b", "results..x", "$JS.x"):
        with pytest.raises(ValueError, match="notify"):
            await lifeline_client.submit("hi", job_id="pushed", notify=subject)
    assert (await lifeline_client.submit("hi", job_id="pushed", notify="results.x")).job_id


@REPLY_PATHS
async def test_closing_the_client_ends_its_calls_in_flight_and_aborts_them(
    lifeline, nats_url, client, heartbeat_s
):
    """nats-py leaves a request waiting out its timeout when its connection closes: a
    complete() then waited a minute, said NATS was reconnecting, and its request ran on."""
    from service.client import LifelineError

    # Neither the provider's answer nor the request's timeout comes within the bound below:
    # only the close can end the calls in it.
    stack = await lifeline(config({"main": fake(latency_ms=600_000)}))
    lifeline_client = await Lifeline.connect(nats_url, timeout_s=600)
    calls = [
        asyncio.ensure_future(lifeline_client.complete("waiting", heartbeat_s=heartbeat_s)),
        asyncio.ensure_future(lifeline_client.stream("waiting").finish()),
    ]
    await wait_for(lambda: stack.dispatcher.in_flight == 2, timeout_s=5)
    await lifeline_client.close()
    async with asyncio.timeout(30):
        for call in calls:
            with pytest.raises(LifelineError, match="closed"):
                await call
    await wait_for(lambda: stack.dispatcher.aborts == 2, timeout_s=5)  # stopped there too
    with pytest.raises(LifelineError, match="closed"):
        await lifeline_client.result("any")


async def test_waiting_for_a_result_rides_out_a_dispatcher_that_stops(lifeline, nats_url):
    """While it waits, its dispatcher stops (a restart): the wait goes on in the bucket."""
    stack = await lifeline(config({"main": fake()}))
    async with Lifeline.connect(nats_url, timeout_s=5) as lifeline_client:
        waiting = asyncio.ensure_future(lifeline_client.result("later", wait_s=10))
        await asyncio.sleep(0.3)
        await stack.stop()
        kv = await lifeline_client.nc.jetstream().key_value(JobsSettings().results_bucket)
        stored = encoder.encode({"id": "later", "status": "ok", "content": "stored meanwhile"})
        await kv.create(subjects.job_key("later"), stored)
        reply = await asyncio.wait_for(waiting, 10)
    assert reply is not None and reply.content == "stored meanwhile"


async def test_a_deadline_beyond_the_default_timeout_is_waited_for(lifeline, nats_url, monkeypatch):
    """deadline_unix_ms alone bounds a request at the dispatcher (no default timeout then):
    the client waits as long, not its own default."""
    monkeypatch.setattr("service.client._GRACE_S", 0.5)  # not 5 s: a shorter wait, the same test
    await lifeline(config({"main": fake(latency_ms=1500)}, default_timeout_s=0.1))
    async with Lifeline.connect(nats_url, default_timeout_s=0.1) as client:  # + 0.5 s of grace
        deadline = int(time.time() * 1000) + 15_000
        reply = await client.complete("hi", deadline_unix_ms=deadline)
        assert (reply.status, reply.content) == ("ok", "hi")


async def test_a_request_without_a_timeout_that_outlives_the_clients_default_says_what_to_set(
    lifeline, nats_url, monkeypatch
):
    """The dispatcher's default_timeout_s was longer than the client's: a healthy dispatcher
    still at work was blamed ("may have stopped"), and the request aborted."""
    monkeypatch.setattr("service.client._GRACE_S", 0.2)
    await lifeline(config({"main": fake(latency_ms=2000)}, default_timeout_s=10))
    async with Lifeline.connect(nats_url, default_timeout_s=0.3) as client:
        with pytest.raises(NoAnswer, match="set no timeout.*give the request a timeout_s"):
            await client.complete("hi")


BREAKS_OUT = """
import asyncio, sys
from service.client import Lifeline

async def main(url):
    async with Lifeline.connect(url) as lifeline:
        async for event in lifeline.stream("hi"):
            break  # neither `async with` nor aclose(): the program just ends
    print("done", flush=True)

asyncio.run(main(sys.argv[1]))
"""


async def test_a_program_that_breaks_out_of_a_stream_ends_quietly_and_aborts_it(lifeline, nats_url):
    """A program that left a stream by `break` ended with "an error occurred during closing
    of asynchronous generator" and a traceback: both of the stream's generators were closed
    at once at exit. Its request is aborted all the same (the client's close aborts it)."""
    stack = await lifeline(config({"main": fake(chunks=4, chunk_delay_ms=500)}))
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-c", BREAKS_OUT, nats_url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert (proc.returncode, out.decode(), err.decode()) == (0, "done\n", "")
    await wait_for(lambda: stack.dispatcher.aborts == 1, timeout_s=5)


async def test_a_result_is_read_from_the_bucket_while_a_dispatcher_answers_nothing(
    lifeline_client, client, monkeypatch
):
    """A dispatcher frozen (SIGSTOP) still holds its llm.jobs.result subscription and answers
    nothing: result() asked it for a fixed 5 s, past wait_s, then raised JobsUnavailable
    instead of reading the bucket."""
    # An ask that long would outlast the bound below: only one bounded by wait_s fits in it.
    monkeypatch.setattr("service.client._JS_TIMEOUT_S", 600.0)
    await lifeline_client.submit("hello", job_id="frozen")  # makes the stream and bucket
    kv = await client.jetstream().key_value(RESULTS_BUCKET)
    stored = encoder.encode({"id": "frozen", "status": "ok", "content": "stored"})
    await kv.create(subjects.job_key("frozen"), stored)

    async def frozen(msg: Any) -> None:
        pass  # never answers

    await client.subscribe(subjects.JOBS_RESULT, cb=frozen)
    await ensure_subscribed(client)
    async with asyncio.timeout(30):
        assert (await lifeline_client.result("frozen", wait_s=1)).content == "stored"
        assert (await lifeline_client.result("frozen")).content == "stored"
        assert await lifeline_client.result("missing", wait_s=0.5) is None


def test_a_client_used_in_another_event_loop_says_so_at_once(nats_url):
    """Connected under one asyncio.run() and used under the next, a client waited out every
    call's timeout, blamed the dispatcher, and its close() raised "Event loop is closed"."""
    first = asyncio.new_event_loop()
    try:
        lifeline = first.run_until_complete(Lifeline.connect(nats_url, timeout_s=1))

        async def elsewhere() -> None:
            calls = (
                lambda: lifeline.complete("Hi"),
                lambda: lifeline.stream("Hi").finish(),
                lambda: lifeline.result("job-1", wait_s=1),
                lambda: lifeline.submit("Hi", job_id="job-1"),
            )
            for call in calls:
                with pytest.raises(LifelineError, match="another event loop.*connect"):
                    await asyncio.wait_for(call(), 5)
            await lifeline.close()  # its loop is not running: nothing to do, and no error

        asyncio.run(elsewhere())
        assert not lifeline.nc.is_closed
        first.run_until_complete(lifeline.close())  # in its own loop it closes
        assert lifeline.nc.is_closed
    finally:
        first.close()


def test_the_nats_py_internals_the_client_relies_on_are_there():
    """_check_room reads the pending buffer's size and bound, as nats-py's publish does, and
    _forget_refused the request futures' map."""
    nc = Client()
    for name in ("_pending_data_size", "_max_pending_size", "_resp_map"):
        assert hasattr(nc, name), name


def test_the_error_callback_a_refusal_is_chained_onto_is_nats_pys():
    """On a connection of the user's own, natsio.publish_refusals chains onto nats-py 2.16's
    Client._error_cb, the coroutine its _process_err hands a refused publish to: renamed or
    reshaped, the chain would go nowhere and refused requests wait out their timeout again."""
    import inspect

    from service import natsio

    nc = Client()
    assert inspect.iscoroutinefunction(nc._error_cb)
    assert "self._error_cb(err)" in inspect.getsource(Client._process_err)
    refusals = natsio.publish_refusals(nc)
    assert refusals is not None and natsio.publish_refusals(nc) is refusals  # chained once
    assert inspect.iscoroutinefunction(nc._error_cb)


def test_without_nats_pys_error_callback_a_refusal_is_waited_out_as_before():
    """A nats-py whose Client has no coroutine _error_cb: nothing is chained, and requests
    wait for their answer as they did before refusals were told (no error of the client's)."""
    from service import natsio

    nc = Client()
    nc._error_cb = None
    assert natsio.publish_refusals(nc) is None
    assert nc._error_cb is None


@REPLY_PATHS
async def test_requests_refused_while_nats_is_down_leave_nothing_behind(monkeypatch, heartbeat_s):
    """nats-py registers a request's answer future before it refuses the request for a full
    buffer: every complete() refused during an outage left one in its map for good, each
    printed as "Future exception was never retrieved" at exit."""
    monkeypatch.setattr("service.client._GRACE_S", 0.1)
    server = EmbeddedNats(port=-1)
    server.start()
    try:
        async with Lifeline.connect(server.url, timeout_s=0.5) as client:
            server.stop()
            await wait_for(lambda: not client.nc.is_connected)
            big = "x" * 650_000  # three fill the buffer; each fits max_payload (1 MiB)
            waiting = [
                asyncio.ensure_future(client.complete(big, heartbeat_s=heartbeat_s))
                for _ in range(3)
            ]
            await wait_for(lambda: client.nc.pending_data_size > 1_900_000)
            in_flight = len(client.nc._resp_map)
            subs_in_flight = len(client.nc._subs)
            for _ in range(5):
                with pytest.raises(Unreachable, match="fill nats-py's buffer"):
                    await client.complete(big, heartbeat_s=heartbeat_s)
                with pytest.raises(Unreachable, match="fill nats-py's buffer"):
                    await client.stream(big).finish()
            assert len(client.nc._resp_map) == in_flight  # none of the refused left there
            assert len(client.nc._subs) == subs_in_flight
            await asyncio.gather(*waiting, return_exceptions=True)
            assert not client.nc._resp_map and not client._replies.waiting
    finally:
        server.stop()


def _overloaded_reply(request_id: str, retry_after_s: float) -> bytes:
    error = ErrorInfo("overloaded", "busy", retry_after_s=retry_after_s)
    return encoder.encode(CompletionReply(request_id, "error", error=error))


async def test_overloaded_retries_end_within_the_requests_timeout(client, lifeline_client):
    """Each retry had a fresh timeout_s and the waits came on top: complete(timeout_s=2,
    overloaded_retries=10) took 11 s. One deadline now: each retry is sent with what is left
    of it, and none when the wait before it would end past it (the refusal is returned)."""
    sent: list[CompletionRequest] = []

    async def refuse(msg: Any) -> None:  # a stand-in dispatcher, always overloaded
        request = msgspec.json.decode(msg.data, type=CompletionRequest)
        sent.append(request)
        body = _overloaded_reply(request.id or "", 0.2)
        if msg.subject == subjects.STREAM:
            headers = {subjects.SEQ: "1", subjects.ATTEMPT_NO: "0", subjects.EVENT: "error"}
            await client.publish(msg.reply, body, headers=headers)
        else:
            await client.publish(msg.reply, body)

    await client.subscribe(subjects.COMPLETE, cb=refuse)
    await client.subscribe(subjects.STREAM, cb=refuse)
    await ensure_subscribed(client)
    for call in (
        lambda: lifeline_client.complete("Hi", timeout_s=2, overloaded_retries=100),
        lambda: lifeline_client.stream("Hi", timeout_s=2, overloaded_retries=100).finish(),
    ):
        sent.clear()
        reply = await asyncio.wait_for(call(), 60)  # 100 waits of 0.2 s or more, before
        assert reply.status == "error" and reply.error.type == "overloaded"
        # Each retry went with what was left of the one deadline after the wait before it
        # (0.2 s or more; a timer may fire a hair early): so at most ten tries fit in the
        # request's 2 s, where a fresh timeout_s each time, or no deadline, sent all 101.
        timeouts = [request.timeout_s for request in sent]
        assert timeouts[0] == 2 and 2 <= len(timeouts) <= 10, timeouts
        assert all(b <= a - 0.199 for a, b in pairwise(timeouts)), timeouts


@pytest.mark.parametrize("retry_after_s", [-5.0, 1e6])
async def test_a_spoofed_overloaded_reply_neither_hurries_nor_stalls_the_retries(
    client, lifeline_client, monkeypatch, retry_after_s
):
    """Any subscriber of llm.complete (a rogue one, or anyone who learns a reply subject) can
    answer overloaded with any retry_after_s: a negative one sent every retry at once; a huge
    one was waited for up to the request's deadline, or, past it, ended the retries at once.
    A wait is 0.5 s for one that is no positive number, and at most what a dispatcher asks
    (30 s; 0.1 s here)."""
    from service import client as client_module

    if retry_after_s > 0:
        monkeypatch.setattr(client_module, "_RETRY_AFTER_MAX_S", 0.1)
    sent: list[CompletionRequest] = []

    async def refuse(msg: Any) -> None:
        request = msgspec.json.decode(msg.data, type=CompletionRequest)
        sent.append(request)
        await client.publish(msg.reply, _overloaded_reply(request.id or "", retry_after_s))

    await client.subscribe(subjects.COMPLETE, cb=refuse)
    await ensure_subscribed(client)
    timeout_s, retries = (2, 100) if retry_after_s < 0 else (3600, 10)
    reply = await asyncio.wait_for(
        lifeline_client.complete("Hi", timeout_s=timeout_s, overloaded_retries=retries), 60
    )
    assert reply.status == "error" and reply.error.type == "overloaded"
    timeouts = [request.timeout_s for request in sent]
    if retry_after_s < 0:  # 0.5 s or more between tries, within 2 s: not 101 at once
        assert 2 <= len(timeouts) <= 4, timeouts
        assert all(b <= a - 0.499 for a, b in pairwise(timeouts)), timeouts
    else:  # 0.1 to 0.2 s between tries: all sent, well within the hour
        assert len(timeouts) == 11, len(timeouts)


@pytest.mark.parametrize("retry_after_s", [math.nan, math.inf, -math.inf, 0.0, -1.0, 1e308])
def test_a_retry_wait_is_within_what_a_dispatcher_may_ask(retry_after_s):
    from service.client import _retry_after_s

    error = ErrorInfo("overloaded", "busy", retry_after_s=retry_after_s)  # unchecked, in code
    wait = _retry_after_s(CompletionReply("r", "error", error=error))
    assert 0.05 <= wait <= 60


def test_retries_wait_at_least_retry_after_s_spread_over_as_long_again():
    """A 0-20 % jitter brought refused requests back in waves, refused together again."""
    from service.client import _retry_after_s

    reply = reply_decoder.decode(_overloaded_reply("r", 1.0))
    waits = [_retry_after_s(reply) for _ in range(1000)]
    assert all(1.0 <= wait <= 2.0 for wait in waits)
    assert min(waits) < 1.1 and max(waits) > 1.9  # the whole range, not the first fifth


async def test_a_stream_event_whose_numbers_are_no_numbers_raises_a_lifeline_error(
    client, lifeline_client
):
    """Anyone who knows a stream's reply subject may publish to it. A Lifeline-Seq of digits
    that int() refuses ("²" passes str.isdigit(); 5,000 digits pass it and exceed Python's
    limit on int()) raised a bare ValueError out of the stream, no LifelineError."""
    seq = ["1"]

    async def odd(msg: Any) -> None:  # a stand-in dispatcher whose first event is no event
        await client.publish(
            msg.reply, b"a", headers={subjects.SEQ: seq[0], subjects.ATTEMPT_NO: "1"}
        )

    await client.subscribe(subjects.STREAM, cb=odd)
    await ensure_subscribed(client)
    for seq[0] in ("²", "9" * 5000, "١"):
        with pytest.raises(LifelineError, match="numeric Lifeline-Seq"):
            await asyncio.wait_for(lifeline_client.stream("Hi").finish(), 10)


async def test_waiting_for_a_result_for_nan_seconds_is_refused_at_once(lifeline_client):
    """wait_s=NaN compared false with every bound: result() asked again for good, though the
    job had no result, where the CLI's --wait refuses it."""
    with pytest.raises(ValueError, match="wait_s"):
        await asyncio.wait_for(lifeline_client.result("none", wait_s=float("nan")), 10)
    assert await asyncio.wait_for(lifeline_client.result("none", wait_s=-1), 10) is None


async def test_a_request_with_an_infinite_timeout_is_waited_for_as_the_dispatcher_bounds_it(
    client, nats_url, monkeypatch
):
    """timeout_s=inf goes on the wire as null (JSON has no infinity), and the dispatcher
    bounds such a request by its default_timeout_s; the client waited for ever on it, so a
    dispatcher that died with it hung the call."""
    monkeypatch.setattr("service.client._GRACE_S", 0.2)
    asked: list[Any] = []

    async def dies(msg: Any) -> None:  # a stand-in dispatcher that never answers
        asked.append(msgspec.json.decode(msg.data))

    await client.subscribe(subjects.COMPLETE, cb=dies)
    await client.subscribe(subjects.STREAM, cb=dies)
    await ensure_subscribed(client)
    async with Lifeline.connect(nats_url, default_timeout_s=0.5) as lifeline_client:
        for call in (
            lambda: lifeline_client.complete("Hi", timeout_s=float("inf")),
            lambda: lifeline_client.stream("Hi", timeout_s=float("inf")).finish(),
        ):
            with pytest.raises(NoAnswer, match="set no timeout|stalled"):
                await asyncio.wait_for(call(), 10)
    assert [a["timeout_s"] for a in asked] == [None, None]  # as the dispatcher read it


async def test_a_call_on_a_draining_connection_of_ones_own_raises_a_lifeline_error(nats_url):
    """A service that drains its own connection (nc.drain(), a graceful shutdown) while its
    handlers still call Lifeline(nc): nats-py refuses subscriptions then, and complete(),
    stream() and result() raised its ConnectionDrainingError, no LifelineError."""
    for call in (
        lambda own: own.complete("Hi"),
        lambda own: own.stream("Hi").finish(),
        lambda own: own.result("job-1"),
    ):
        async with _draining(nats_url) as nc:
            with pytest.raises(LifelineError, match="could not send.*draining"):
                await asyncio.wait_for(call(Lifeline(nc, timeout_s=1)), 10)


@contextlib.asynccontextmanager
async def _draining(nats_url: str) -> Any:
    """A connection of one's own, draining (a subscription's callback keeps it at it) until
    the block ends."""
    import nats

    nc = await nats.connect(nats_url)
    release = asyncio.Event()

    async def busy(msg: Any) -> None:
        await release.wait()

    await nc.subscribe("busy", cb=busy)
    await ensure_subscribed(nc)
    await nc.publish("busy", b"")
    await nc.flush()
    draining = asyncio.ensure_future(nc.drain())
    try:
        await wait_for(lambda: nc.is_draining)
        yield nc
    finally:
        release.set()
        await draining


async def test_a_stream_that_ended_while_its_connection_drains_keeps_its_reply(client, nats_url):
    """The end event read, the stream unsubscribes; on a connection of one's own that had
    begun to drain, nats-py refused that with ConnectionDrainingError, which finish() raised
    in place of the reply it had."""
    import nats

    async def whole(msg: Any) -> None:  # a stand-in dispatcher: a delta and the end at once
        await client.publish(msg.reply, b"a", headers={subjects.SEQ: "1", subjects.ATTEMPT_NO: "1"})
        end = {subjects.SEQ: "2", subjects.ATTEMPT_NO: "1", subjects.EVENT: "end"}
        await client.publish(msg.reply, encoder.encode(CompletionReply("r", "ok")), headers=end)

    await client.subscribe(subjects.STREAM, cb=whole)
    await ensure_subscribed(client)
    nc = await nats.connect(nats_url)
    release = asyncio.Event()

    async def busy(msg: Any) -> None:  # keeps the drain going while the stream is read
        await release.wait()

    await nc.subscribe("busy", cb=busy)
    await ensure_subscribed(nc)
    await nc.publish("busy", b"")
    await nc.flush()
    draining = None
    try:
        async with Lifeline(nc, timeout_s=5).stream("Hi") as answer:
            await anext(answer)
            inbox = next(s for s in nc._subs.values() if s.subject.startswith("_INBOX."))
            await wait_for(lambda: inbox.pending_msgs)  # the end is there, unread
            draining = asyncio.ensure_future(nc.drain())
            await wait_for(lambda: nc.is_draining)
            reply = await asyncio.wait_for(answer.finish(), 10)
        assert (reply.status, answer.text) == ("ok", "a")
    finally:
        release.set()
        if draining is not None:
            await draining


def test_an_error_reply_raised_crosses_a_process_boundary_whole():
    """ReplyError (what the LangChain and Haystack models raise) could not be unpickled, nor
    copied: its one argument is the reply, and pickle rebuilt it from its message, so a process
    pool, multiprocessing or a task queue handing it back broke (concurrent.futures' pool with
    BrokenProcessPool) where the error kind and attempts should have arrived."""
    import copy
    import pickle

    from service.client import ReplyError

    reply = msgspec.convert(
        {
            "id": "r1",
            "status": "error",
            "error": {"type": "all_failed", "message": "every target failed"},
            "attempts": [{"provider": "main", "model": "m", "outcome": "error", "latency_ms": 1.0}],
        },
        CompletionReply,
    )
    raised = ReplyError(reply)
    for again in (pickle.loads(pickle.dumps(raised)), copy.copy(raised), copy.deepcopy(raised)):
        assert type(again) is ReplyError and str(again) == str(raised)
        assert (again.type, again.reply) == ("all_failed", reply)


def test_an_error_reply_without_an_id_is_raised_without_naming_an_empty_request():
    """A dispatcher refuses a request as overloaded before giving it an id: ReplyError's message
    ended in "(request )"."""
    from service.client import ReplyError

    error = {"type": "overloaded", "message": "at its maximum of 1 requests"}
    refused = msgspec.convert({"id": "", "status": "error", "error": error}, CompletionReply)
    assert str(ReplyError(refused)) == "overloaded: at its maximum of 1 requests"
    named = msgspec.convert({"id": "r1", "status": "error", "error": error}, CompletionReply)
    assert str(ReplyError(named)).endswith("(request r1)")


def _error_reply(error_type: str, *attempts: dict[str, Any]) -> CompletionReply:
    error = {"type": error_type, "message": "failed"}
    data = {"id": "r1", "status": "error", "error": error, "attempts": list(attempts)}
    return msgspec.convert(data, CompletionReply)


def _call(kind: str, **fields: Any) -> dict[str, Any]:
    outcome = kind if kind in ("timeout", "no_responders") else "error"
    return {"provider": "p", "model": "m", "outcome": outcome, "latency_ms": 1.0} | {
        "error_type": kind,
        **fields,
    }


def test_every_error_reply_is_raised_as_the_class_of_what_a_resend_can_do():
    """Every error reply was one plain ReplyError, so retry policies that decide by type
    (LangGraph's default skips ValueError and OSError and retries the rest) paid again for
    requests no resend cures. Each request error, and a chain failed on each kind, against
    schemas/errors.py, the one table of them."""
    from schemas import errors
    from service.client import DeadlineExceeded, ReplyError, RequestRefused, Unavailable

    for error_type in errors.REQUEST_ERRORS:
        raised = ReplyError(_error_reply(error_type))
        if error_type in errors.RESEND:
            expected: type[ReplyError] = Unavailable
        elif error_type == errors.DEADLINE_EXCEEDED:
            expected = DeadlineExceeded
        elif error_type in errors.REFUSED:
            expected = RequestRefused
        else:  # a chain that made no call (or whose calls name no kind), aborted, internal
            expected = ReplyError
        assert type(raised) is expected, error_type
        assert isinstance(raised, ValueError) == (expected is RequestRefused), error_type
        assert isinstance(raised, OSError) == (expected is DeadlineExceeded), error_type
    for error_type in errors.CHAIN_FAILED:
        for kind, spec in errors.KINDS.items():
            raised = ReplyError(_error_reply(error_type, _call(kind), _call("auth")))
            assert isinstance(raised, ValueError) != spec.transient, (error_type, kind)
            assert isinstance(raised, ReplyError) and raised.type == error_type


def test_a_chain_refused_by_every_provider_is_final_and_one_a_later_call_may_cure_is_not():
    from service.client import ReplyError, RequestRefused

    refused = ReplyError(_error_reply("all_failed", _call("bad_request"), _call("context_length")))
    assert type(refused) is RequestRefused and isinstance(refused, ValueError)
    unwell = ReplyError(_error_reply("all_failed", _call("bad_request"), _call("server_error")))
    assert type(unwell) is ReplyError
    # A target passed over for its open breaker may answer once the breaker closes.
    skipped = {"provider": "p", "model": "m", "outcome": "skipped", "latency_ms": 0.0}
    breaker = ReplyError(
        _error_reply("all_failed", skipped | {"reason": "circuit_open"}, _call("auth"))
    )
    assert type(breaker) is ReplyError
    capability = ReplyError(
        _error_reply("all_failed", skipped | {"reason": "tools"}, _call("auth"))
    )
    assert type(capability) is RequestRefused


def test_an_error_reply_of_each_family_crosses_a_process_boundary_as_its_class():
    import copy
    import pickle

    from service.client import ReplyError

    for error_type in ("invalid_request", "overloaded", "deadline_exceeded", "internal"):
        raised = ReplyError(_error_reply(error_type))
        for again in (pickle.loads(pickle.dumps(raised)), copy.deepcopy(raised)):
            assert type(again) is type(raised)
            assert str(again) == f"{error_type}: failed (request r1)"
            assert (again.type, again.reply) == (error_type, raised.reply)


# ---- heartbeats on llm.complete: a dead dispatcher told from a slow model ------------------


async def test_a_request_that_asks_for_heartbeats_gets_them_until_its_one_reply(
    lifeline, client, audit
):
    """A provider taking a second, heartbeats asked every 200 ms: they come on the reply
    subject before the reply (none at once: most requests are answered sooner), never after
    it; a request that does not ask gets its one reply alone."""
    await lifeline(config({"main": fake(latency_ms=1000)}))
    payload = encoder.encode(CompletionRequest(messages=[ChatMessage("user", "hi")], timeout_s=10))
    heartbeat = {subjects.EVENT: "heartbeat"}

    async def messages(headers: dict[str, str]) -> list[Any]:
        inbox = client.new_inbox()
        sub = await client.subscribe(inbox)
        await client.publish(subjects.COMPLETE, payload, reply=inbox, headers=headers)
        got = [await sub.next_msg(timeout=10)]
        while got[-1].headers == heartbeat:
            got.append(await sub.next_msg(timeout=10))
        with contextlib.suppress(TimeoutError):
            got.append(await sub.next_msg(timeout=0.6))  # nothing may follow the reply
        await sub.unsubscribe()
        return got

    beating = await messages({subjects.HEARTBEAT_MS: "200"})
    *beats, reply = beating
    assert len(beats) >= 2 and all(m.headers == heartbeat for m in beats)
    progress = [progress_decoder.decode(m.data) for m in beats]  # how long, nothing failed
    waited = 200 - TIMER_SLACK_MS
    assert all(p.attempts == [] and p.elapsed_ms >= waited for p in progress), progress
    assert reply_decoder.decode(reply.data).status == "ok"
    quiet = await messages({})
    assert len(quiet) == 1 and reply_decoder.decode(quiet[0].data).status == "ok"
    await audit.wait_for(2)


async def test_a_requests_heartbeats_say_how_long_it_ran_and_which_attempts_failed(
    lifeline, lifeline_client
):
    """`lifeline ask` showed nothing while a route fell back past a hung target: a heartbeat
    was an empty message. It carries the request's progress now (how long its dispatcher has
    had it, the attempts finished so far as the reply will list them), which the client
    hands to `on_progress`."""
    await lifeline(config({"hung": fake(hang=True, timeout_s=0.5), "slow": fake(latency_ms=800)}))
    seen: list[Any] = []
    reply = await lifeline_client.complete("hi", heartbeat_s=0.2, on_progress=seen.append)
    assert reply.status == "ok" and reply.target == "slow", reply
    assert len(seen) >= 3, seen
    assert seen[0].attempts == []  # 200 ms in: the hung target still has it
    assert [p.elapsed_ms for p in seen] == sorted(p.elapsed_ms for p in seen)
    later = seen[-1]  # the slow target has it, the hung one's timeout reported
    assert later.elapsed_ms > 500 and later.attempts == reply.attempts[:1], later
    assert later.attempts[0].outcome == "timeout" and later.attempts[0].next == "fallback"


async def test_a_request_whose_dispatcher_dies_says_so_within_its_heartbeats_not_its_timeout(
    nats_url, tmp_path
):
    """Real processes: a request waits on a slow provider, its dispatcher is SIGKILLed. It
    waited out its whole timeout (a minute here) and then guessed; with heartbeats (the
    client's default) it ends once they stop, saying the dispatcher most likely died."""
    import signal

    from helpers import Service

    service = Service(tmp_path, nats_url, config({"main": fake(latency_ms=120_000)}))
    try:
        _, doomed = service.start_all(["main"], dispatchers=1)
        async with Lifeline.connect(nats_url, timeout_s=60) as lifeline_client:
            call = asyncio.ensure_future(lifeline_client.complete("hi", heartbeat_s=0.5))
            waiting = lifeline_client._replies.waiting
            await wait_for(lambda: any(w.beating for w in waiting.values()), what="a heartbeat")
            doomed.proc.send_signal(signal.SIGKILL)
            doomed.proc.wait()
            with pytest.raises(NoAnswer) as silent:
                await asyncio.wait_for(call, 30)
        said = str(silent.value)
        assert "not even the heartbeat" in said and "most likely died" in said, said
    finally:
        service.stop()


async def test_lifeline_ask_whose_dispatcher_dies_says_so_within_seconds_not_its_timeout(
    client, nats_url, tmp_path
):
    """`lifeline ask` (no --stream) sent through nats-py's request() without heartbeats: a
    dispatcher SIGKILLed mid-request cost it its whole --timeout and 2 s. Now it asks for them
    as the Python client does, and ends at their silence saying the dispatcher most likely
    died."""
    import signal
    import subprocess

    from helpers import Service, spawn_lifeline

    service = Service(tmp_path, nats_url, config({"main": fake(latency_ms=120_000)}))
    beats = await client.subscribe("_INBOX.>")
    try:
        _, doomed = service.start_all(["main"], dispatchers=1)
        ask = spawn_lifeline(
            "ask", "--nats-url", nats_url, "--timeout", "100", "hi", stderr=subprocess.PIPE
        )
        try:
            while not streaming.is_heartbeat((await beats.next_msg(timeout=20)).headers):
                pass
            doomed.proc.send_signal(signal.SIGKILL)
            doomed.proc.wait()
            _, err = await asyncio.to_thread(ask.communicate, timeout=30)
        finally:
            ask.kill()
            ask.wait()
        assert ask.returncode == 1, err
        assert "not even the heartbeat" in err and "most likely died" in err, err
    finally:
        service.stop()


async def test_a_request_asking_for_heartbeats_waits_on_a_dispatcher_that_sends_none(
    client, nats_url
):
    """An older dispatcher sends no heartbeats: the client holds no silence against it, and
    takes its reply, 2 s later than heartbeats every 0.2 s would allow."""

    async def old_dispatcher(msg) -> None:
        await asyncio.sleep(2)
        reply = CompletionReply("h1", "ok", content="late", provider="old", attempts=[])
        await client.publish(msg.reply, encoder.encode(reply))

    sub = await client.subscribe(subjects.COMPLETE, cb=old_dispatcher)
    await ensure_subscribed(client)
    try:
        async with Lifeline.connect(nats_url, timeout_s=10) as lifeline_client:
            reply = await lifeline_client.complete("hi", heartbeat_s=0.2)
        assert (reply.content, reply.provider) == ("late", "old")
    finally:
        await sub.unsubscribe()


async def test_a_refused_request_with_heartbeats_leaves_the_others_answers_alone(monkeypatch):
    """During an outage, requests that ask for heartbeats, sent together past the room left in
    nats-py's buffer: the one refused dropped the newest answer nats-py's request() awaited (a
    request without heartbeats, a job's), as if it were its own, and that one's answer, once
    NATS was back, reached nobody."""
    monkeypatch.setattr("service.client._GRACE_S", 0.1)
    server = EmbeddedNats(port=-1)
    server.start()
    try:
        async with Lifeline.connect(server.url, timeout_s=0.5) as client:
            server.stop()
            await wait_for(lambda: not client.nc.is_connected)
            big = "x" * 650_000  # three fill the buffer; each fits max_payload (1 MiB)
            waiting = [
                asyncio.ensure_future(client.complete(big, heartbeat_s=None, timeout_s=30))
                for _ in range(2)
            ]
            await wait_for(lambda: len(client.nc._resp_map) == 2)
            sent = await asyncio.gather(
                client.complete(big), client.complete(big), return_exceptions=True
            )
            assert sorted(type(outcome).__name__ for outcome in sent) == ["NoAnswer", "Unreachable"]
            assert len(client.nc._resp_map) == 2  # both still wait for their answers
            assert not client._replies.waiting
            for call in waiting:
                call.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
    finally:
        server.stop()


@pytest.mark.parametrize(
    "factory", [pytest.param(uvloop.new_event_loop, id="uvloop"), pytest.param(None, id="asyncio")]
)
def test_a_request_whose_heartbeats_came_while_the_client_was_stalled_gets_its_reply(
    nats_url, factory
):
    """The client's loop stood still for longer than the silence heartbeats allow (a read
    callback holding it, a paused process) while its dispatcher, alive, kept sending them.
    The wait that ran out late was waited again for no time at all: the heartbeats read from
    the socket meanwhile had not yet reached the request, and complete() raised NoAnswer
    blaming the dispatcher, which then answered."""
    finish = threading.Event()

    async def take(nc: Any, msg: Any) -> None:  # a dispatcher alive while the client stalls
        while not finish.is_set():
            await nc.publish(msg.reply, b"", headers={subjects.EVENT: "heartbeat"})
            await asyncio.sleep(0.05)
        reply = CompletionReply("r", "ok", content="Hi", provider="p", attempts=[])
        await nc.publish(msg.reply, encoder.encode(reply))

    async def scenario() -> CompletionReply:
        nc = await nats.connect(nats_url)
        # Past the 1.6 s of silence heartbeats every 0.2 s allow.
        async with loop_stall(2.5) as stall:
            try:
                client = Lifeline(nc, timeout_s=20)
                asking = asyncio.ensure_future(client.complete("hi", heartbeat_s=0.2))
                await wait_for(
                    lambda: any(w.beating for w in client._replies.waiting.values()),
                    what="the first heartbeat",
                )
                stall()
                await asyncio.sleep(0.3)  # the loop turns again after its stall
                finish.set()
                return await asyncio.wait_for(asking, 10)
            finally:
                await nc.close()

    with peer_on_its_own_loop(nats_url, subjects.COMPLETE, take):
        try:
            with asyncio.Runner(loop_factory=factory) as runner:
                reply = runner.run(scenario())
        finally:
            finish.set()
    assert (reply.status, reply.content) == ("ok", "Hi")


async def test_every_request_asking_for_heartbeats_gets_one_reply_and_no_heartbeat_after_it(
    lifeline, client, audit
):
    """Heartbeats every 200 ms asked by requests answered in the read that brought them
    (invalid JSON, an unknown route, a refused reply subject), refused from the backlog,
    aborted, hedged, failed over after longer than the interval, and cut short by a shutdown
    whose grace ran out: each gets its one reply (none on a refused subject), no heartbeat
    after it, and one audit event."""
    providers = {
        "slow": fake(latency_ms=3000),
        "flaky": fake(fail_status=500, latency_ms=300),
        "backup": fake(latency_ms=300),
        "quick": fake(latency_ms=50),
    }
    routes = {
        "default": {"targets": ["slow"]},
        "chain": {"targets": ["flaky", "backup"]},
        "hedged": {"targets": ["slow", "quick"], "hedge_after_ms": 300},
    }
    stack = await lifeline(config(providers, routes, max_in_flight=6, shutdown_grace_s=0.5))
    inbox = client.new_inbox()
    got: dict[str, list[str]] = {}
    kinds: set[str] = set()

    async def on_reply(msg: Any) -> None:
        beat = msg.headers == {subjects.EVENT: "heartbeat"}
        got.setdefault(msg.subject.rsplit(".", 1)[1], []).append("beat" if beat else "reply")
        if not beat:
            reply = reply_decoder.decode(msg.data)
            kinds.add(reply.error.type if reply.error else reply.status)

    await client.subscribe(inbox + ".*", cb=on_reply)
    refused = await client.subscribe("llm.refused-here")
    await ensure_subscribed(client)

    async def send(name: str, payload: bytes, reply: str = "") -> None:
        headers = {subjects.HEARTBEAT_MS: "200", subjects.ABORT_KEY: name}
        await client.publish(
            subjects.COMPLETE, payload, reply=reply or f"{inbox}.{name}", headers=headers
        )

    def ask(name: str, route: str = "default") -> bytes:
        return encoder.encode(CompletionRequest([ChatMessage("user", "hi")], id=name, route=route))

    await send("bad-json", b"{not json")
    await send("no-route", ask("no-route", "nope"))
    await send("refused", ask("refused"), reply="llm.refused-here")
    for name in ("chain", "hedged"):
        await send(name, ask(name, name))
    await audit.wait_for(3)  # those answered as they were read are no longer in flight
    # Seven slow ones past max_in_flight: at least one refused from the backlog.
    for name in ("aborted", "cut-1", "cut-2", "ov-1", "ov-2", "ov-3", "ov-4"):
        await send(name, ask(name))
    await wait_for(lambda: "beat" in got.get("aborted", []), what="a heartbeat")
    await client.publish(subjects.ABORT, b"aborted")
    answered = ["bad-json", "no-route", "chain", "hedged", "aborted"]
    await wait_for(lambda: all("reply" in got.get(name, []) for name in answered), 10)
    await stack.stop()  # its grace runs out: the requests still in flight are cut short
    sent = len(answered) + 1 + 6
    await audit.wait_for(sent)
    await asyncio.sleep(0.6)  # three intervals: a heartbeat after a reply would come in them
    assert len(got) == sent - 1, got
    for name, came in got.items():
        assert came.count("reply") == 1 and came[-1] == "reply", (name, came)
    assert len(audit.events) == sent
    assert "beat" in got["chain"]  # it took longer than the interval
    assert {"ok", "aborted", "overloaded", "shutting_down"} <= kinds, kinds
    with pytest.raises(TimeoutError):
        await refused.next_msg(timeout=0.1)


async def test_a_client_on_a_connection_of_ones_own_closed_and_connected_again_gets_replies(
    lifeline, nats_url
):
    """nats-py lets a program close its connection and connect the same Client again, and its
    request() then subscribes afresh. The replies of requests with heartbeats came to the
    subscription the close had ended: each waited out its timeout, then blamed the
    dispatcher."""
    await lifeline(config({"main": fake()}))
    nc = Client()
    await nc.connect(nats_url)
    client = Lifeline(nc, timeout_s=3)
    try:
        assert (await client.complete("hi")).content == "hi"
        await nc.close()
        await nc.connect(nats_url)
        assert (await asyncio.wait_for(client.complete("again"), 20)).content == "again"
        assert not client._replies.waiting
    finally:
        await nc.close()


async def test_clients_made_per_call_on_a_connection_of_ones_own_leave_no_subscriptions(
    lifeline, client
):
    """A `Lifeline(nc)` made for each call, on one long-lived connection (a web handler's
    pattern): each one's first complete() subscribed an inbox of its own for its replies,
    never unsubscribed, so the connection's subscriptions (each with its nats-py task) and
    the server's interest grew with every call. They share one, as nats-py's request() does."""
    await lifeline(config({"main": fake()}))
    await Lifeline(client).complete("first")
    subscribed = len(client._subs)
    for n in range(20):
        assert (await Lifeline(client, timeout_s=5).complete(f"call {n}")).content == f"call {n}"
    assert len(client._subs) == subscribed


async def test_a_request_silent_while_its_own_connection_is_down_blames_that(lifeline, nats_url):
    """The client's own NATS connection dropped while a request with heartbeats waited, and
    stays down: nothing reaches it, heartbeats neither. Its NoAnswer says the connection is
    down, not that the dispatcher, alive and still sending them, died."""
    stack = await lifeline(config({"slow": fake(latency_ms=30_000)}, shutdown_grace_s=0.1))
    proxy = _Cuttable(nats_url)
    nc = await nats.connect(await proxy.up(), reconnect_time_wait=0.1)
    try:
        client = Lifeline(nc, timeout_s=30)
        asking = asyncio.ensure_future(client.complete("hi", heartbeat_s=0.2))
        await wait_for(lambda: any(w.beating for w in client._replies.waiting.values()))
        await proxy.down()
        with pytest.raises(NoAnswer) as failed:
            await asyncio.wait_for(asking, 20)
        said = str(failed.value)
        assert "not even the heartbeat" in said and "connection is down" in said, said
        assert "most likely died" not in said, said
        assert not client._replies.waiting and stack.dispatcher.in_flight == 1
    finally:
        await natsio.close(nc)  # nats-py's own close fails while the server is gone
        await proxy.down()
