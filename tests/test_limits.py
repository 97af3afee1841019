"""The pieces behind the limits: message sizes as the server counts them, reply-subject
refusal, id salvage on the error path, URLs printed without their secrets, and what a
dispatcher says of a server whose max_payload is small."""

from __future__ import annotations

import asyncio
import logging

import nats
import pytest
from helpers import Ledger, Service, config, fake, published

from schemas import Attempt, AuditEvent, CompletionReply, ErrorInfo, subjects
from schemas.subjects import reply_subject_refused
from schemas.wire import MAX_ID_LENGTH, clipped, encoder, message_bytes, salvage_id
from service.app import start_stack
from service.config import parse_config
from service.embedded import EmbeddedNats, redact_url
from service.natsio import ensure_subscribed
from service.transport import _fitting, fitted

HEADERS = {
    "Lifeline-Deadline-Ms": "1893456000000",
    "Lifeline-Request-Id": "r\u00e9q-1",
    "traceparent": "00-" + "a" * 49,
}


@pytest.fixture
def small_server():
    with EmbeddedNats(port=-1, jetstream=False, conf="max_payload: 4096\n") as server:
        yield server


async def publish_sized(url: str, size: int) -> bool:
    """Publish a message of `size` bytes as message_bytes counts them; True if the server kept the
    connection."""
    nc = await nats.connect(url, allow_reconnect=False)
    payload = b"x" * (size - message_bytes(b"", HEADERS))
    assert message_bytes(payload, HEADERS) == size
    await nc.publish("sized", payload, headers=HEADERS)
    try:
        # The server judges a message before it reads the PING after it, and closes the
        # connection at once for one too large: a PONG means it kept the connection, and a
        # second round trip shows it is still there (no window of time to guess).
        await nc.flush(timeout=2)
        await nc.flush(timeout=2)
        return not nc.is_closed
    except nats.errors.Error:  # ConnectionClosedError, or a FlushTimeoutError if no PONG came
        return False
    finally:
        await nc.close()


async def test_message_bytes_counts_headers_as_the_server_does(small_server):
    assert await publish_sized(small_server.url, 4096) is True
    # One byte more and the server closes the connection (nats-py's own check sees only the
    # payload):
    assert await publish_sized(small_server.url, 4097) is False


@pytest.mark.parametrize(
    "subject, refused",
    [
        ("_INBOX.abc.1", False),
        ("my.replies.7", False),
        ("llm.complete", True),
        ("llm.audit.ok", True),
        ("llm.provider.openai", True),
        ("llm.cancel.openai", True),
        ("llm.jobs.result.x", True),
        ("$JS.API.INFO", True),
        ("$KV.bucket.key", True),
        ("$SYS.REQ.SERVER.PING", True),
        ("_INBOX.*", True),
        ("a.>", True),
        ("a b c", True),  # a header's value can hold what no subject may
        ("results.\r\nPUB x 1", True),
        ("tab\tbed", True),
        ("nul\x00", True),
        ("", True),
        ("a..b", True),  # an empty token: no subscription can match it
        ("_LIFELINE_DISPATCHER.abc.def.c", True),  # where workers stream chunks
        (".a", True),
        ("a.", True),
        ("résultats.équipe", False),  # non-ASCII is allowed in subjects
    ],
)
def test_reply_subjects_in_lifelines_or_the_servers_namespace_are_refused(subject, refused):
    assert (reply_subject_refused(subject) is not None) is refused


LONG = "n" * 300_000  # a name no request may carry (a config's or a worker's could)
ROOM = 64 * 1024


def test_an_audit_event_with_names_too_long_for_a_message_still_fits_and_keeps_its_id():
    attempt = Attempt(LONG, LONG, "error", 1.0, "server_error", message=LONG, target=LONG)
    event = AuditEvent(
        "req-1",
        "error",
        LONG,
        LONG,
        LONG,
        [attempt] * 3,
        5.0,
        "t" * 32,
        1,
        "all_failed",
        target=LONG,
        template=LONG,
        tools_called=[LONG] * 100,
    )
    sent, payload = _fitting(event, ROOM)
    assert len(payload) <= ROOM and encoder.encode(sent) == payload
    assert (sent.id, sent.status, sent.error_type, sent.trace_id) == (
        "req-1",
        "error",
        "all_failed",
        "t" * 32,
    )
    assert sent.route is not None and sent.route.startswith("n") and len(sent.route) <= 256


def test_a_reply_too_large_is_returned_as_it_was_sent_so_its_audit_event_says_the_same():
    error = ErrorInfo("all_failed", LONG)
    reply = CompletionReply("req-2", "ok", LONG, LONG, LONG, target=LONG, error=error)
    sent, payload = fitted(reply, ROOM)
    assert len(payload) <= ROOM and encoder.encode(sent) == payload
    assert sent.status == "error" and sent.error is not None
    assert sent.error.type == "reply_too_large" and sent.content is None


def test_a_clipped_text_keeps_its_start_and_its_end():
    assert clipped("short", 10) == "short" and clipped(None, 3) is None
    text = "Invalid enum value '" + "x" * 5000 + "' - at `$.messages[0].role`"
    cut = clipped(text, 300)
    assert cut is not None and len(cut) == 300 and "…" in cut
    assert cut.startswith("Invalid enum value") and cut.endswith("`$.messages[0].role`")


def test_an_id_is_salvaged_from_input_too_deeply_nested_to_decode():
    nested = b"[" * 10_000 + b"]" * 10_000
    assert salvage_id(b'{"meta": {"id": "inner"}, "id": "outer", "x": ' + nested + b"}") == "outer"
    assert salvage_id(b'{"x": ' + nested + b', "id": "after"}') == "after"
    far = b"[" * 40_000 + b"]" * 40_000
    assert (
        salvage_id(b'{"x": ' + far + b', "id": "after"}') == ""
    )  # beyond the first 64 KiB: not looked for
    assert salvage_id(b'{"id": "' + b"i" * (MAX_ID_LENGTH + 1) + b'"}') == ""  # too long to carry


def test_an_id_is_salvaged_past_thousands_of_nested_ids_in_one_pass():
    """Ids inside the request's objects are not its id; looking for the top-level one reads
    the input once (a pass per "id" met took 15 s of the event loop for 166 KB of these)."""
    inner = b'{"id": "not-it"},' * 3_000
    deep = b"[" * 100_000
    assert salvage_id(b'{"a": [' + inner + b'{}], "id": "top", "z": ' + deep) == "top"
    assert salvage_id(b'{"a": [' + inner * 2 + b"{}], " + deep) == ""


@pytest.mark.parametrize(
    "url, shown",
    [
        ("nats://alice:s3cret@host:4222", "nats://***@host:4222"),
        ("nats://TOKEN@host:4222", "nats://***@host:4222"),
        ("nats://host:4222", "nats://host:4222"),
        ("tls://u:p@a:1, nats://b:2", "tls://***@a:1,nats://b:2"),
        ("nats://alice:top,secret@h:1", "nats://***@h:1"),  # a comma in the password
        ("nats://alice:a://b@h:1", "nats://***@h:1"),
        ("nats://u:p,q@h1,nats://h2", "nats://***@h1,nats://h2"),
        ("nats://alice:Secr3t,part2,part3@h:1", "nats://***@h:1"),  # commas in the password
        ("nats://a:b,c@h1, tls://d,e@h2,h3", "nats://***@h1,tls://***@h2,h3"),
        ("h1:4222,h2:4222", "h1:4222,h2:4222"),
        ("wss://proxy:443/nats?token=s3cret", "wss://proxy:443/nats?token=***"),
        ("ws://u:p@h:1/p?a=1&s3cret,ws://h2:1", "ws://***@h:1/p?a=***&***,ws://h2:1"),
    ],
)
def test_nats_urls_are_shown_without_their_secrets(url, shown):
    assert redact_url(url) == shown


async def test_a_dispatcher_on_a_server_with_a_small_max_payload_says_so_at_start(
    small_server, tracers, caplog
):
    """On a server whose max_payload is a few KB, requests of a few KB are refused and a stream
    keeps 1 KiB of each message for its headers: said once, at start, with what to raise."""
    caplog.set_level(logging.WARNING, "lifeline")
    stack = await start_stack(parse_config(config({"main": fake()})), small_server.url, tracers)
    await stack.stop()
    [said] = [r.getMessage() for r in caplog.records if "max_payload is" in r.getMessage()]
    assert "max_payload is 4096 bytes" in said and "raise max_payload" in said


async def test_a_flood_past_a_subscriptions_queue_is_told_not_logged_per_message(nats_url, caplog):
    """nats-py calls the error callback for every message it drops from a full subscription
    queue, in its read: logging each one (a record and several str() of the error, ~30 us) held
    a dispatcher's reads for seconds under a flood on llm.jobs.result, its requests answered
    15 s late and its health bucket lost. The drops are counted and told once a minute."""
    from service.app import connect

    nc = await connect(nats_url, "flooded")
    sender = await nats.connect(nats_url)
    try:
        stuck = asyncio.Event()

        async def never_done(msg):
            await stuck.wait()

        await nc.subscribe("side.subject", cb=never_done, pending_msgs_limit=10)
        await ensure_subscribed(nc)
        with caplog.at_level(logging.WARNING, logger="lifeline"):
            for _ in range(5000):
                await sender.publish("side.subject", b"x")
            await ensure_subscribed(sender)
            await ensure_subscribed(nc)  # every message read, so every drop told
            stuck.set()
        told = [
            r
            for r in caplog.records
            if "dropped" in r.getMessage() or "SlowConsumer" in r.getMessage()
        ]
        assert len(told) == 1, f"{len(told)} log records for one flood"
        assert "side.subject" in told[0].getMessage()
    finally:
        await sender.close()
        await nc.close()


async def test_a_flood_of_result_asks_is_bounded_and_a_real_ask_still_answered(nats_url, tmp_path):
    """llm.jobs.result: each ask is a KV read. One at a time, 200,000 asks (unknown ids, as fast
    as one client publishes) were queued whole in the dispatcher (+73 MiB) and answered over
    55 s, long after their askers gave up, and a real ask behind them timed out. Now lookups run
    side by side, and asks beyond a bounded backlog are dropped as they come."""
    service = Service(tmp_path, nats_url, config({"a": fake()}))
    try:
        dispatcher = service.dispatcher()
        before = dispatcher.memory_kib()["VmRSS"]
        flooder = await nats.connect(nats_url)
        asker = await nats.connect(nats_url)
        try:
            sink = flooder.new_inbox()
            for n in range(200_000):
                await flooder.publish(subjects.JOBS_RESULT, b"unknown-%d" % n, reply=sink)
            await ensure_subscribed(flooder)

            # An ask made while the backlog is full is dropped, as a flood's are: its asker asks
            # again. Generous: answered within seconds here; behind the whole flood, after 55 s.
            async def answered() -> bytes:
                while True:
                    try:
                        return (await asker.request(subjects.JOBS_RESULT, b"a-job", timeout=2)).data
                    except nats.errors.TimeoutError:
                        continue

            assert await asyncio.wait_for(answered(), 30) == b""  # no such job
        finally:
            await flooder.close()
            await asker.close()
        grown_mib = (dispatcher.memory_kib()["VmHWM"] - before) / 1024
        assert grown_mib < 40, f"the dispatcher grew {grown_mib:.0f} MiB for a flood of asks"
        assert "Traceback" not in dispatcher.log()
    finally:
        service.stop()


async def test_a_flood_of_service_api_pings_does_not_hold_up_requests(nats_url, tmp_path):
    """$SRV.*: answered through nats-py, a coroutine per message read and a queue of up to
    524,288 a subject answered one after another without a yield, 600,000 pings held a
    dispatcher's loop: its requests answered 17 s late. Now they are read as requests are, and
    those past a bounded backlog dropped as they come."""
    service = Service(tmp_path, nats_url, config({"a": fake()}))
    try:
        service.start_all(["a"], 1)
        flooder = await nats.connect(nats_url)
        nc = await nats.connect(nats_url)
        try:
            ledger = await Ledger(nc).start()
            asker = flooder.new_inbox()
            answers = 0

            async def answered(msg):
                nonlocal answers
                answers += 1

            await nc.subscribe(asker, cb=answered, pending_msgs_limit=-1)
            await published(nc)
            for _ in range(600_000):
                await flooder.publish("$SRV.PING.lifeline-dispatcher", b"", reply=asker)
            await published(flooder)  # the dispatcher reads the pings first
            ids = [f"after-pings-{n}" for n in range(100)]
            for request_id in ids:
                body = {"id": request_id, "messages": [{"role": "user", "content": "hi"}]}
                await ledger.send(request_id, encoder.encode(body))
            await ledger.settle(len(ids), len(ids), timeout_s=120)
            ledger.assert_exactly_once(ids)
            last = -1
            while answers != last:  # until the pings' answers stop coming: a quiet second
                last = answers
                await asyncio.sleep(1)
            # A flood is shed as it is read, not answered in full after its askers are gone (and
            # answering it held the requests behind it: 5.8 s late here then, 1.3 s now).
            assert answers < 300_000, f"{answers:,} of 600,000 pings answered"
        finally:
            await flooder.close()
            await nc.close()
    finally:
        service.stop()
