"""Durable jobs over a real nats-server with JetStream: publish and forget, results by id,
one result per id whatever is repeated or redelivered."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar

import msgspec
import nats.errors
import nats.js.api
import nats.js.errors
import pytest
from helpers import (
    LocalHTTPServer,
    Service,
    _completion,
    ask,
    config,
    fake,
    hpub,
    raw_publish,
    serving,
    settled,
    wait_for,
)
from opentelemetry.trace import SpanKind

from schemas import CompletionReply, subjects
from schemas.streaming import Assembler
from schemas.wire import audit_decoder, encoder, reply_decoder
from service.audit import ensure_audit_stream, read_events
from service.client import Lifeline
from service.config import AuditSettings, ConfigError, JobsSettings, parse_config
from service.jetstream import hint as jetstream_hint
from service.jobs import _claim_read, fetch_batch
from service.jobstore import ensure_jobs


def job(job_id: str, text: str = "hello", **fields: Any) -> bytes:
    return encoder.encode({"id": job_id, "messages": [{"role": "user", "content": text}], **fields})


async def submit(client, payload: bytes, msg_id: str | None = None, **headers: str) -> Any:
    js = client.jetstream()
    if msg_id is not None:
        headers[subjects.MSG_ID] = msg_id
    return await js.publish(subjects.JOBS_SUBMIT, payload, headers=headers or None)


async def _waiting_jobs(client, settle_s: float = 2.0) -> int:
    """Jobs left in the stream, once acknowledgements in flight have landed."""
    deadline = asyncio.get_running_loop().time() + settle_s
    while True:
        info = await client.jetstream().stream_info(JobsSettings().stream)
        if info.state.messages == 0 or asyncio.get_running_loop().time() > deadline:
            return info.state.messages
        await asyncio.sleep(0.05)


async def kept_audit_events(client, at_least: int) -> list[Any]:
    """Every audit event the audit stream keeps, oldest first, once it keeps at least
    `at_least`: the stream stores an event a moment after core subscribers see it."""
    stream = AuditSettings().stream

    async def stored() -> bool:
        info = await client.jetstream().stream_info(stream)
        return info.state.messages >= at_least

    await wait_for(stored, timeout_s=10, what=f"{at_least} events in {stream}")
    return [
        audit_decoder.decode(data)
        async for data in read_events(client.jetstream(), AuditSettings(), 0, False)
    ]


async def result_of(client, job_id: str, timeout_s: float = 10.0) -> Any:
    kv = await client.jetstream().key_value(JobsSettings().results_bucket)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            entry = await kv.get(subjects.job_key(job_id))
            return reply_decoder.decode(entry.value)
        except nats.js.errors.KeyNotFoundError:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no result for {job_id!r} after {timeout_s} s") from None
            await asyncio.sleep(0.05)


async def test_a_job_published_before_any_dispatcher_runs_is_answered_when_one_starts(
    lifeline, client, audit
):
    await ensure_jobs(client.jetstream(), JobsSettings())  # as `lifeline submit` does
    ack = await submit(client, job("early", "published while nobody listened"), "early")
    assert ack.stream == JobsSettings().stream and not ack.duplicate
    await lifeline(config({"main": fake()}))
    reply = await result_of(client, "early")
    assert (reply.id, reply.status, reply.content) == (
        "early",
        "ok",
        "published while nobody listened",
    )
    [(subject, event)] = await audit.wait_for(1)
    assert (subject, event.id) == ("llm.audit.ok", "early")


@pytest.mark.parametrize("status", ["404", "409", "500"])
async def test_a_job_with_a_status_header_of_its_own_is_answered_and_audited_as_any(
    lifeline, client, audit, status
):
    """nats-py's fetch took any message with a `Status` header for one of JetStream's own: a
    404 or 409 it dropped unseen (delivered again at every ack wait, never answered nor
    dead-lettered), any other raised and lost the whole batch it came in, again and again."""
    await ensure_jobs(client.jetstream(), JobsSettings())
    await submit(client, job("statused", "with a Status header"), "statused", Status=status)
    await submit(client, job("beside", "in the same pull"), "beside")
    await lifeline(config({"main": fake()}))
    for job_id, text in (("statused", "with a Status header"), ("beside", "in the same pull")):
        reply = await result_of(client, job_id)
        assert (reply.status, reply.content) == ("ok", text)
    events = await audit.wait_for(2)
    assert sorted(event.id for _, event in events) == ["beside", "statused"]


@pytest.mark.parametrize("block", [b"NATS/1.0", b"NATS", b"NATS/1.0 503 \xff\r\n\r\n"])
async def test_a_job_with_a_header_block_nats_py_cannot_read_is_answered_and_audited(
    lifeline, client, audit, nats_url, block
):
    """nats-server keeps whatever header block a client publishes: one cut short raised in
    nats-py's parser, and the delivery was dropped as unreadable every time it came, so the
    job was never answered, audited nor dead-lettered, and delivered again for good."""
    await ensure_jobs(client.jetstream(), JobsSettings())
    await raw_publish(nats_url, [hpub(subjects.JOBS_SUBMIT.encode(), block, job("odd", "hi"))])
    await lifeline(config({"main": fake()}))
    reply = await result_of(client, "odd")
    assert (reply.status, reply.content) == ("ok", "hi")
    [(_, event)] = await audit.wait_for(1)
    assert event.id == "odd"


async def test_ids_that_differ_only_in_bytes_not_utf8_are_two_jobs_each_refused(
    lifeline, client, audit, nats_url
):
    """JetStream tells Nats-Msg-Ids apart by their bytes; nats-py reads bytes that are not
    UTF-8 as U+FFFD, so `a\\xff` and `a\\xfe` read as one id: the second job was answered
    with the first one's result (another client's answer) and had no audit event."""
    await lifeline(config({"main": fake()}))
    notify = client.new_inbox()
    pushed = await client.subscribe(notify)
    body = encoder.encode({"messages": [{"role": "user", "content": "hi"}]})
    for raw in (b"a\xff", b"a\xfe"):
        block = b"NATS/1.0\r\nNats-Msg-Id: %s\r\nLifeline-Notify: %s\r\n\r\n" % (
            raw,
            notify.encode(),
        )
        await raw_publish(nats_url, [hpub(subjects.JOBS_SUBMIT.encode(), block, body)])
    replies = [reply_decoder.decode((await pushed.next_msg(timeout=5)).data) for _ in range(2)]
    for reply in replies:
        assert reply.status == "error" and reply.error is not None
        assert reply.error.type == "invalid_request" and "UTF-8" in reply.error.message
    events = await audit.wait_for(2)
    assert [event.error_type for _, event in events] == ["invalid_request"] * 2


@pytest.mark.parametrize(
    "given",
    [b"Nats-Msg-Id: first\r\nNats-Msg-Id: second", b"Nats-Msg-Id : spaced"],
    ids=["twice", "space before the colon"],
)
async def test_a_nats_msg_id_nats_server_reads_otherwise_is_refused_saying_so(
    lifeline, client, audit, nats_url, given
):
    """nats-server deduplicates by the first line written exactly `Nats-Msg-Id:` (none for
    `Nats-Msg-Id : K`), nats-py reads the last line whose name is Nats-Msg-Id once stripped:
    a job known by that id was deduplicated by another, or by none. Refused, saying why."""
    await lifeline(config({"main": fake()}))
    notify = client.new_inbox()
    pushed = await client.subscribe(notify)
    body = encoder.encode({"messages": [{"role": "user", "content": "hi"}]})
    block = b"NATS/1.0\r\n%s\r\nLifeline-Notify: %s\r\n\r\n" % (given, notify.encode())
    await raw_publish(nats_url, [hpub(subjects.JOBS_SUBMIT.encode(), block, body)])
    reply = reply_decoder.decode((await pushed.next_msg(timeout=5)).data)
    assert reply.status == "error" and reply.error is not None and reply.id == ""
    assert reply.error.type == "invalid_request" and "Nats-Msg-Id" in reply.error.message
    [(_, event)] = await audit.wait_for(1)
    assert event.error_type == "invalid_request"
    for job_id in ("first", "second", "spaced"):  # no result kept under an id it may not have
        with pytest.raises(AssertionError, match="no result"):
            await result_of(client, job_id, timeout_s=0.2)


async def test_a_repeat_within_the_dedup_window_is_kept_once_and_answered_once(
    lifeline, client, audit
):
    stack = await lifeline(config({"main": fake()}))
    acks = [await submit(client, job("twice"), "twice") for _ in range(2)]
    assert [bool(a.duplicate) for a in acks] == [False, True]
    reply = await result_of(client, "twice")
    assert reply.status == "ok"
    jobs = stack.dispatcher.jobs
    await wait_for(lambda: jobs.handled == 1 and jobs.in_flight == 0, timeout_s=5)
    await asyncio.sleep(0.3)  # room for a second answer, which must not come
    assert (jobs.handled, len(audit.events)) == (1, 1)


async def test_a_repeat_after_the_window_gets_the_stored_result_without_a_provider_call(
    lifeline, client, audit
):
    stack = await lifeline(config({"main": fake()}))
    notify = client.new_inbox()
    pushed = await client.subscribe(notify)
    await submit(client, job("again"), "again", **{subjects.NOTIFY: notify})
    first = reply_decoder.decode((await pushed.next_msg(timeout=5)).data)
    # Past the window JetStream keeps it as new (another Nats-Msg-Id stands for that here).
    await submit(client, job("again"), "again-later", **{subjects.NOTIFY: notify})
    second = reply_decoder.decode((await pushed.next_msg(timeout=5)).data)
    assert second == first  # the stored result, pushed again
    jobs = stack.dispatcher.jobs
    assert (jobs.handled, jobs.found) == (1, 1)
    assert len(audit.events) == 1


async def test_a_repeat_after_the_window_while_the_first_still_waits_is_answered_from_its_result(
    lifeline, client, audit
):
    """No dispatcher ran for longer than the dedup window, and the id was sent again: the
    stream holds both, and one pull brings them together. The first is called and audited; the
    second gets its stored result, pushed to its own Notify subject, with no call or event."""
    window = {"dedup_window_s": 0.2}
    await ensure_jobs(client.jetstream(), JobsSettings(**window))
    notify = client.new_inbox()
    pushed = await client.subscribe(notify)
    for _ in range(2):
        await submit(client, job("resent"), "resent", **{subjects.NOTIFY: notify})
        await asyncio.sleep(0.4)  # past the window: kept as a second job
    stack = await lifeline({**config({"main": fake(latency_ms=300)}), "jobs": window})
    first, second = [reply_decoder.decode((await pushed.next_msg(timeout=10)).data) for _ in "12"]
    assert first == second and first.status == "ok"
    jobs = stack.dispatcher.jobs
    await wait_for(lambda: jobs.in_flight == 0, timeout_s=5)
    assert (jobs.handled, jobs.found) == (1, 1)
    assert [e.id for e in await kept_audit_events(client, 1)] == ["resent"]
    assert await _waiting_jobs(client) == 0


class _SlowCountedProvider(BaseHTTPRequestHandler):
    """OpenAI's chat completions, each answered after 3 s, every call counted."""

    calls: ClassVar[list[str]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.calls.append(body["messages"][-1]["content"])
        time.sleep(3)
        answer = _completion("done")
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


async def test_a_repeat_taken_by_another_dispatcher_while_the_first_runs_gets_its_result(
    client, nats_url, tmp_path
):
    """Two dispatcher processes, one job at a time each; the id sent again past the dedup
    window while the first copy runs, so the other dispatcher takes the second copy. It waits
    for the first's result: one provider call, one audit event, a result for each copy."""
    _SlowCountedProvider.calls = []
    with serving(LocalHTTPServer(_SlowCountedProvider)) as server:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        data = config({"slow": {"kind": "openai", "model": "m", "base_url": url}})
        data["jobs"] = {"in_flight": 1, "dedup_window_s": 0.2}
        service = Service(tmp_path, nats_url, data)
        try:
            service.start_all(["slow"], dispatchers=2)
            notify = client.new_inbox()
            pushed = await client.subscribe(notify)
            for _ in range(2):
                await submit(client, job("twin", timeout_s=20), "twin", **{subjects.NOTIFY: notify})
                await asyncio.sleep(0.5)  # past the window: kept as a second job
            first, second = [
                reply_decoder.decode((await pushed.next_msg(timeout=20)).data) for _ in "12"
            ]
            assert first == second and first.status == "ok"
            assert await _waiting_jobs(client) == 0
            await asyncio.sleep(0.5)  # room for a second event, which must not come
            events = await kept_audit_events(client, 1)
            assert ([e.id for e in events], _SlowCountedProvider.calls) == (["twin"], ["hello"])
        finally:
            service.stop()


async def test_a_claim_its_dispatcher_left_behind_does_not_hold_the_id_for_ever(
    lifeline, client, audit
):
    """A dispatcher died holding an id's claim, and its own job never came back (its stream
    deleted, say): a copy of the id takes the claim over once it went unwritten for the ack
    wait, and is answered."""
    kv = await ensure_jobs(client.jetstream(), JobsSettings())
    await kv.create("claim." + subjects.job_key("orphan").removeprefix("job."), b"7.1")
    data = config({"main": fake()})
    data["jobs"] = {"ack_wait_s": 1}
    await lifeline(data)
    await submit(client, job("orphan"), "orphan")
    assert (await result_of(client, "orphan", timeout_s=15)).status == "ok"
    assert [event.id for _, event in await audit.wait_for(1)] == ["orphan"]


async def test_a_live_claim_is_judged_by_its_holders_ack_wait_not_the_waiters(
    lifeline, client, audit
):
    """A rolling config change: the claim's holder has a 30 s ack wait (it writes its claim
    every 10 s), the dispatcher a copy of the id reaches has 1 s. The copy waits for the
    holder's result, as long as the holder keeps its promise, rather than taking the claim
    over after its own ack wait: a second provider call and a second audit event."""
    kv = await ensure_jobs(client.jetstream(), JobsSettings())
    key = subjects.job_key("rolling")
    await kv.create("claim." + key.removeprefix("job."), b"7.1 30")
    data = config({"main": fake()})
    data["jobs"] = {"ack_wait_s": 1}
    await lifeline(data)
    await submit(client, job("rolling"), "rolling")
    await asyncio.sleep(4)  # four of the copy's ack waits, well within the holder's
    await kv.create(key, encoder.encode(CompletionReply("rolling", "ok", content="the holder's")))
    assert (await result_of(client, "rolling")).content == "the holder's"
    await asyncio.sleep(1)  # room for an audit event, which must not come
    assert audit.events == []


async def test_a_job_ended_leaves_no_claim_to_fill_a_bucket_limited_in_values(
    lifeline, client, audit
):
    """An operator's results bucket keeps at most 4 values: a claim left beside each result
    until the TTL filled it at the second job, the third refused. Claims go as their jobs end,
    so it holds three results, and nothing else; the id sent again still finds its result."""
    js = client.jetstream()
    await ensure_jobs(js, JobsSettings())
    stream = "KV_" + JobsSettings().results_bucket
    info = await js.stream_info(stream)
    await js.update_stream(info.config.evolve(max_msgs=4))
    stack = await lifeline(config({"main": fake()}))
    for name in ("one", "two", "three"):
        await submit(client, job(name), name)
        assert (await result_of(client, name)).status == "ok"
    await audit.wait_for(3)
    kv = await js.key_value(JobsSettings().results_bucket)
    keys = [subjects.job_key(name) for name in ("one", "two", "three")]
    await wait_for(lambda: _sorted_keys(kv, keys), timeout_s=5, what="only the results")
    await submit(client, job("one"))  # no Nats-Msg-Id: not a duplicate of the first
    await wait_for(lambda: stack.dispatcher.jobs.found == 1, timeout_s=10, what="the repeat")
    assert len(audit.events) == 3


async def test_a_claim_taken_over_is_not_purged_by_the_job_that_lost_it(lifeline, client):
    """A job ends having lost its claim (unwritten past its ack wait, taken over by a copy of
    the id): its purge, up to its own revision, leaves the copy's claim in place."""
    stack = await lifeline(config({"main": fake()}))
    kv = await client.jetstream().key_value(JobsSettings().results_bucket)
    claim = "claim." + subjects.job_key("contested").removeprefix("job.")
    lost = await kv.create(claim, b"7.1 30")
    taken = await kv.update(claim, b"8.2 30", last=lost)
    await stack.dispatcher.jobs._unclaim(claim, lost)
    assert (await kv.get(claim)).revision == taken
    await stack.dispatcher.jobs._unclaim(claim, taken)
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await kv.get(claim)


async def _sorted_keys(kv: Any, expected: list[str]) -> bool:
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:  # nats-py's answer for an empty bucket
        keys = []
    return sorted(keys) == sorted(expected)


def test_a_claims_promise_is_bounded_and_an_unreadable_one_is_the_waiters_own():
    """What a claim's value says of its holder's ack wait is read within the largest ack wait
    a config takes (300 s): a corrupt or hostile value does not keep its id waiting for ever.
    One without a reading (an earlier version's claim, garbage) is judged by the waiter's."""
    assert _claim_read(b"7.1 30", 5.0) == (b"7.1", 30.0)
    assert _claim_read(b"7.1 1e308", 5.0) == (b"7.1", 300.0)
    for unreadable in (b"7.1", b"7.1 inf", b"7.1 nan", b"7.1 -3", b"7.1 0", b"\xff x", b""):
        assert _claim_read(unreadable, 5.0)[1] == 5.0


def test_results_kept_shorter_than_the_dedup_window_are_refused():
    """An id sent again once its result expired runs again, but within the dedup window its
    publish is taken for a duplicate and dropped: with results kept for less than the window,
    `submit` said duplicate and the job never had a result again."""
    with pytest.raises(ConfigError, match=r"results_ttl_s \(60\) is under dedup_window_s \(120\)"):
        parse_config({**config({"a": fake()}), "jobs": {"results_ttl_s": 60}})
    parse_config({**config({"a": fake()}), "jobs": {"results_ttl_s": 60, "dedup_window_s": 60}})


async def test_a_job_that_asks_for_events_streams_its_answer_and_stores_its_result(
    lifeline, client, audit
):
    """The events of llm.stream, on the subject the job names, while it runs; the end event
    carries the stored result, without repeating the text."""
    await lifeline(
        config({"primary": fake(fail_after_chunks=2, chunks=4), "backup": fake(chunks=3)})
    )
    events_to = client.new_inbox()
    sub = await client.subscribe(events_to)
    await submit(
        client, job("streamed", "one two three"), "streamed", **{subjects.JOB_EVENTS: events_to}
    )
    assembler, kinds = Assembler(), []
    while not assembler.done:
        msg = await sub.next_msg(timeout=10)
        kinds.append(assembler.feed(msg.headers, msg.data).kind)
    assert kinds == ["delta", "delta", "reset", "delta", "delta", "delta", "end"]
    stored = await result_of(client, "streamed")
    assert assembler.text == stored.content == "one two three"
    assert assembler.reply == msgspec.structs.replace(stored, content=None)
    assert [a.outcome for a in stored.attempts] == ["error", "ok"]
    [(subject, event)] = await audit.wait_for(1)
    assert (subject, event.id, event.stream.resets) == ("llm.audit.ok", "streamed", 1)


async def test_a_job_that_asks_for_events_and_finds_its_result_stored_gets_it_as_events(
    lifeline, client
):
    """The id sent again, answered before: its listener got no event at all, and waited for
    an end that never came. It gets the stored answer as a stream of it: its text, then end."""
    stack = await lifeline(config({"main": fake()}))
    await submit(client, job("streamed-again", "said once"), "streamed-again")
    await result_of(client, "streamed-again")
    events_to = client.new_inbox()
    sub = await client.subscribe(events_to)
    again = {subjects.JOB_EVENTS: events_to}
    await submit(client, job("streamed-again", "said once"), "streamed-again-2", **again)
    assembler = Assembler()
    while not assembler.done:
        msg = await sub.next_msg(timeout=10)
        assembler.feed(msg.headers, msg.data)
    stored = await result_of(client, "streamed-again")
    assert assembler.text == stored.content == "said once"
    assert assembler.reply == msgspec.structs.replace(stored, content=None)
    assert (stack.dispatcher.jobs.handled, stack.dispatcher.jobs.found) == (1, 1)


async def test_an_invalid_job_gets_an_error_result_at_once_and_is_not_redelivered(
    lifeline, client, audit
):
    stack = await lifeline(config({"main": fake()}))
    await submit(client, b'{"id": "bad", "messages": []}', "bad")
    reply = await result_of(client, "bad")
    assert (reply.status, reply.error.type) == ("error", "invalid_request")
    await wait_for(lambda: stack.dispatcher.jobs.in_flight == 0, timeout_s=5)
    assert await _waiting_jobs(client) == 0  # acknowledged: gone from the work queue


def test_one_pull_brings_at_most_16_mib_of_the_largest_jobs():
    """A batch arriving at once waits at the server until read; counted at max_payload each,
    a pull stays far below nats-server's default max_pending (64 MiB)."""
    assert fetch_batch(1024 * 1024) == 16  # nats-server's default max_payload
    assert fetch_batch(64 * 1024) == 64  # small jobs: the batch's own bound
    assert fetch_batch(64 * 1024 * 1024) == 1


async def test_a_long_job_is_held_by_heartbeats_past_its_ack_wait(lifeline, client, audit):
    data = config({"slow": fake(latency_ms=2500)})
    data["jobs"] = {"ack_wait_s": 1}
    stack = await lifeline(data)
    await submit(client, job("long", timeout_s=10), "long")
    reply = await result_of(client, "long", timeout_s=10)
    assert reply.status == "ok"
    await asyncio.sleep(0.5)
    jobs = stack.dispatcher.jobs
    assert (jobs.handled, jobs.found) == (1, 0)  # never delivered a second time
    assert len(audit.events) == 1


async def test_the_client_makes_the_jobs_stream_again_when_it_is_gone_before_a_dispatcher(
    lifeline, client, nats_url
):
    """A long-lived client made the stream with its first job; gone since (a server restarted
    on an empty store), its next job is taken, as `lifeline submit` takes it, not refused until
    a dispatcher comes to make the stream again."""
    async with Lifeline.connect(nats_url) as lf:
        await lf.submit("before", job_id="before")
        await client.jetstream().delete_stream(JobsSettings().stream)
        submitted = await lf.submit("after the stream was gone", job_id="after")
        assert (submitted.job_id, submitted.duplicate) == ("after", False)
        await lifeline(config({"main": fake()}))
        reply = await lf.result("after", wait_s=10)
    assert reply is not None and reply.content == "after the stream was gone"


async def test_a_full_stream_refuses_new_jobs(lifeline, client, nats_url):
    settings = parse_config({**config({"main": fake()}), "jobs": {"max_jobs": 2}}).jobs
    await ensure_jobs(client.jetstream(), settings)  # no dispatcher: they wait
    await submit(client, job("j1"), "j1")
    await submit(client, job("j2"), "j2")
    with pytest.raises(nats.js.errors.APIError, match="maximum messages"):
        await submit(client, job("j3"), "j3")


async def test_a_dispatcher_killed_with_jobs_in_flight_loses_none_and_answers_each_once(
    client, nats_url, tmp_path
):
    """Real processes: two dispatchers pull jobs from a 300 ms provider; one is SIGKILLed
    while it holds some. Its jobs come back after their ack wait and the other finishes them:
    every id ends with exactly one stored result."""
    data = config({"slow": fake(latency_ms=300)})
    data["jobs"] = {"ack_wait_s": 2, "in_flight": 10}
    service = Service(tmp_path, nats_url, data)
    try:
        _, doomed, _ = service.start_all(["slow"], dispatchers=2)
        await ensure_jobs(client.jetstream(), JobsSettings())
        ids = [f"job-{n}" for n in range(60)]
        for job_id in ids:
            await submit(client, job(job_id, timeout_s=20), job_id)
        await asyncio.sleep(0.5)  # both dispatchers hold jobs now
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait()
        try:
            replies = [await result_of(client, job_id, timeout_s=30) for job_id in ids]
        except AssertionError as exc:  # what the dispatchers said is what explains it
            logs = "\n".join(f"--- {p.log_path.name}\n{p.log()[-3000:]}" for p in service.procs)
            raise AssertionError(f"{exc}\n{logs}") from None
        assert [r.id for r in replies] == ids and all(r.status == "ok" for r in replies)
        assert await _waiting_jobs(client) == 0  # every job acknowledged: none left behind
        consumer = await client.jetstream().consumer_info(
            JobsSettings().stream, subjects.JOBS_CONSUMER
        )
        assert consumer.delivered.consumer_seq > len(ids)  # the killed one's jobs came again
        # And one terminal audit event per id, kept in the audit stream.
        events = await kept_audit_events(client, len(ids))
        assert Counter(e.id for e in events) == Counter(ids)
    finally:
        service.stop()


async def test_a_job_its_dispatcher_stops_past_the_grace_is_cancelled_and_its_trace_ends(
    lifeline, client, exporter
):
    """A job still running when its dispatcher stopped was left running: its provider call
    went on, paid for, and the dispatcher's spans never ended, so the worker's span arrived
    without its parent. The call is cancelled at its worker now, the request span says why,
    and the job, not acknowledged, waits to be delivered again."""
    stack = await lifeline(
        config({"slow": fake(latency_ms=5000, timeout_s=30)}, shutdown_grace_s=0.1)
    )
    await submit(client, job("cut"), "cut")
    await wait_for(lambda: stack.dispatcher.jobs.in_flight == 1, timeout_s=5)
    await stack.dispatcher.stop()
    worker = stack.workers["slow"]
    await wait_for(lambda: worker.cancelled == 1 and not worker.in_flight, what="the cancel")
    spans = exporter.get_finished_spans()
    [request] = [s for s in spans if s.name == "chat" and s.kind == SpanKind.SERVER]
    assert request.attributes["lifeline.cancel.reason"] == "shutting_down"
    # Every span's parent was sent but the request span's own: the job's span, which the
    # delivery that ends the job sends (tests/test_jobs_redelivery.py).
    missing = {s.parent.span_id for s in spans if s.parent} - {s.context.span_id for s in spans}
    assert missing == {request.parent.span_id}
    assert await _waiting_jobs(client, settle_s=0.5) == 1


async def test_a_job_whose_dispatcher_died_after_storing_its_result_still_gets_its_audit(
    lifeline, client, audit
):
    """A dispatcher took the job, stored its result and died before its audit event went
    out. The job comes back; the next dispatcher finds the result, makes no provider call,
    and publishes the event, which the audit stream keeps once."""
    settings = JobsSettings(ack_wait_s=1)
    kv = await ensure_jobs(client.jetstream(), settings)
    await submit(client, job("orphan"), "orphan")
    # The dead dispatcher: it took the job (never acknowledged) and stored this result.
    took = await client.jetstream().pull_subscribe(
        subjects.JOBS_SUBMIT,
        durable=subjects.JOBS_CONSUMER,
        config=nats.js.api.ConsumerConfig(ack_wait=1, max_deliver=5, max_ack_pending=-1),
    )
    [taken] = await took.fetch(1, timeout=5)
    assert taken.metadata.num_delivered == 1
    stored = encoder.encode({"id": "orphan", "status": "ok", "content": "stored before dying"})
    await kv.create(subjects.job_key("orphan"), stored)
    await took.unsubscribe()

    stack = await lifeline({**config({"main": fake()}), "jobs": {"ack_wait_s": 1}})
    jobs = stack.dispatcher.jobs
    await wait_for(lambda: jobs.found == 1, timeout_s=10)  # delivered again, after 1 s
    assert jobs.handled == 0  # no provider call
    [(subject, event)] = await audit.wait_for(1)
    assert (subject, event.id, event.status) == ("llm.audit.ok", "orphan", "ok")
    events = await kept_audit_events(client, 1)
    assert [e.id for e in events] == ["orphan"]
    assert (await result_of(client, "orphan")).content == "stored before dying"


async def test_an_id_sent_again_long_after_its_result_is_not_audited_again_when_redelivered(
    lifeline, client, audit
):
    """Its result (and audit event) came from an earlier job of the id; this one, delivered
    a second time, must not publish another event: past the audit stream's dedup window it
    would be kept as a second one."""
    settings = JobsSettings(ack_wait_s=1)
    kv = await ensure_jobs(client.jetstream(), settings)
    stored = encoder.encode({"id": "old", "status": "ok", "content": "answered long ago"})
    await kv.create(subjects.job_key("old"), stored)
    await asyncio.sleep(0.01)  # the job is published after its result was stored
    await submit(client, job("old"), "old-again")
    took = await client.jetstream().pull_subscribe(  # a dispatcher that stalled with it
        subjects.JOBS_SUBMIT,
        durable=subjects.JOBS_CONSUMER,
        config=nats.js.api.ConsumerConfig(ack_wait=1, max_deliver=5, max_ack_pending=-1),
    )
    [taken] = await took.fetch(1, timeout=5)
    await took.unsubscribe()
    assert taken.metadata.num_delivered == 1
    stack = await lifeline({**config({"main": fake()}), "jobs": {"ack_wait_s": 1}})
    jobs = stack.dispatcher.jobs
    await wait_for(lambda: jobs.found == 1, timeout_s=10)
    await asyncio.sleep(0.3)
    assert (jobs.handled, audit.events) == (0, [])


async def test_what_jetstream_was_made_to_write_onto_a_jobs_key_is_no_result(
    lifeline, client, audit
):
    """Anyone may have JetStream itself answer onto a key of the results bucket: a job's
    publish acknowledgement goes to whatever reply subject its sender names, permissions or
    not. Written before the job, it neither passes for its result nor keeps it from being
    answered; asked for, it is no result."""
    kv = await ensure_jobs(client.jetstream(), JobsSettings())
    bucket = JobsSettings().results_bucket
    for job_id in ("victim", "bystander"):  # as an attacker's PubAck lands there
        ack = b'{"stream":"LIFELINE_JOBS","seq":1}'
        await client.publish(f"$KV.{bucket}.{subjects.job_key(job_id)}", ack)
    await client.flush()
    stack = await lifeline(config({"main": fake()}))
    asked = await client.request(subjects.JOBS_RESULT, b"bystander", timeout=5)
    assert asked.data == b""  # junk is no result
    await submit(client, job("victim", "the real question"), "victim")
    await wait_for(lambda: stack.dispatcher.jobs.handled == 1, timeout_s=10)  # not "found"
    reply = await result_of(client, "victim")
    assert (reply.status, reply.content) == ("ok", "the real question")
    [(_, event)] = await audit.wait_for(1)
    assert event.id == "victim"
    assert (await kv.get(subjects.job_key("victim"))).value is not None


async def test_a_job_failing_by_a_bug_is_retried_then_dead_lettered_and_dropped(
    lifeline, client, audit, monkeypatch
):
    """...and audited once, saying so: the engine never had it, so nothing else would."""
    from service import jobs

    async def broken(self: Any, msg: Any, arrived: float, served: list[bool], *_: Any) -> None:
        raise RuntimeError("results bucket unreachable")

    monkeypatch.setattr(jobs.Jobs, "_answer", broken)
    monkeypatch.setattr(jobs, "_RETRY_DELAY_S", 0.1)
    dead = await client.subscribe(subjects.JOBS_DEAD)
    data = config({"main": fake()})
    data["jobs"] = {"max_deliver": 3}
    await lifeline(data)
    await submit(client, job("doomed"), "doomed")
    letter = await dead.next_msg(timeout=10)
    assert letter.data == job("doomed")  # the job as it was submitted
    assert letter.headers[subjects.JOB_ERROR] == "RuntimeError: results bucket unreachable"
    consumer = await client.jetstream().consumer_info(JobsSettings().stream, subjects.JOBS_CONSUMER)
    assert consumer.delivered.consumer_seq == 3  # max_deliver deliveries, no more
    assert await _waiting_jobs(client) == 0  # not kept in the stream
    [(_, event)] = await audit.wait_for(1)
    assert (event.id, event.error_type) == ("doomed", "internal")
    # A job that is no request at all, whose handling fails the same way, is dead-lettered as
    # submitted too: any bytes, its headers kept (schemas/spec: llm.jobs.dead's payload is
    # not a CompletionRequest).
    headers = {subjects.MSG_ID: "garbage", "X-Own": "kept"}
    await client.jetstream().publish(subjects.JOBS_SUBMIT, b"\xffnot JSON", headers=headers)
    letter = await dead.next_msg(timeout=10)
    assert letter.data == b"\xffnot JSON"
    assert {k: letter.headers.get(k) for k in headers} == headers
    assert subjects.JOB_ERROR in letter.headers


async def test_a_repeat_waiting_behind_a_dead_lettered_job_gets_its_error_result_not_a_call(
    lifeline, client, audit, monkeypatch
):
    """The first copy of an id fails by a bug on its last delivery, while a second (sent with
    another Nats-Msg-Id) waits its turn: the id was let go before the first's error result
    was stored, and the second ran the provider in that gap. It gets the stored error."""
    from service import jobs

    real_answer, real_keep_or_fit = jobs.Jobs._answer, jobs.Jobs._keep_or_fit

    async def broken_first(self: Any, msg: Any, *args: Any) -> Any:
        if b"break" in msg.data:
            raise RuntimeError("results bucket unreachable")
        return await real_answer(self, msg, *args)

    async def slow_keep_or_fit(self: Any, key: str, reply: Any) -> Any:
        await asyncio.sleep(0.5)  # a store that takes its time, as over a busy cluster
        return await real_keep_or_fit(self, key, reply)

    monkeypatch.setattr(jobs.Jobs, "_answer", broken_first)
    monkeypatch.setattr(jobs.Jobs, "_keep_or_fit", slow_keep_or_fit)
    await ensure_jobs(client.jetstream(), JobsSettings())
    notify = client.new_inbox()
    pushed = await client.subscribe(notify)
    await submit(client, job("doomed", "break"), "doomed-1", **{subjects.NOTIFY: notify})
    await submit(client, job("doomed", "hello"), "doomed-2", **{subjects.NOTIFY: notify})
    data = config({"main": fake()})
    data["jobs"] = {"max_deliver": 1}
    stack = await lifeline(data)
    first, second = [reply_decoder.decode((await pushed.next_msg(timeout=10)).data) for _ in "12"]
    assert first == second and first.error is not None and first.error.type == "internal"
    assert (await result_of(client, "doomed")) == first
    await asyncio.sleep(0.3)  # room for a second event, which must not come
    assert [(event.id, event.error_type) for _, event in audit.events] == [("doomed", "internal")]
    assert stack.dispatcher.jobs.handled == 0  # no provider call


async def test_a_dead_letter_leaves_the_jobs_stream_directives_behind(
    lifeline, client, audit, monkeypatch
):
    """A job submitted with `Nats-Expected-Stream: LIFELINE_JOBS` (a client's guard for the
    jobs stream) kept it on its dead letter, and a stream an operator made on llm.jobs.dead
    refused the letter: a core publish, so lost unseen."""
    from service import jobs

    async def broken(self: Any, msg: Any, arrived: float, served: list[bool], *_: Any) -> None:
        raise RuntimeError("results bucket unreachable")

    monkeypatch.setattr(jobs.Jobs, "_answer", broken)
    monkeypatch.setattr(jobs, "_RETRY_DELAY_S", 0.1)
    js = client.jetstream()
    await js.add_stream(name="DEAD_LETTERS", subjects=[subjects.JOBS_DEAD])
    data = config({"main": fake()})
    data["jobs"] = {"max_deliver": 1}
    await lifeline(data)
    guards = {"Nats-Expected-Stream": JobsSettings().stream, "X-Own": "kept"}
    await submit(client, job("guarded"), "guarded", **guards)
    await audit.wait_for(1)
    await wait_for(lambda: _stored_letters(js), timeout_s=5, what="the dead letter in DEAD_LETTERS")
    letter = await js.get_last_msg("DEAD_LETTERS", subjects.JOBS_DEAD)
    assert letter.headers is not None and letter.data == job("guarded")
    assert (letter.headers.get("X-Own"), letter.headers.get(subjects.MSG_ID)) == ("kept", "guarded")
    assert "Nats-Expected-Stream" not in letter.headers


async def _stored_letters(js: Any) -> bool:
    return (await js.stream_info("DEAD_LETTERS")).state.messages == 1


async def test_a_result_that_cannot_be_stored_is_never_acknowledged(lifeline, client, monkeypatch):
    """The engine logs a failure to deliver and goes on; a job must not be acked then, or a
    results bucket that stayed unreachable past the dispatcher's patience would lose it for
    good. That delivery audits nothing: the delivery that stores the result audits it, and
    that is the one event the audit stream keeps for the job. The answer is kept meanwhile:
    the next delivery stores it without calling the provider again (with JetStream's disk
    full, each of five deliveries paid the provider anew)."""
    from service import jobs

    real_keep, failures = jobs.Jobs._keep, []

    async def flaky_keep(self: Any, key: str, reply: Any) -> Any:
        if not failures:
            failures.append((key, reply))
            raise TimeoutError("the results bucket did not answer")
        return await real_keep(self, key, reply)

    monkeypatch.setattr(jobs.Jobs, "_keep", flaky_keep)
    monkeypatch.setattr(jobs, "_RETRY_DELAY_S", 0.1)
    monkeypatch.setattr(jobs, "_STORE_PATIENCE_S", 0.0)  # no waiting it out: given up at once
    stack = await lifeline(config({"main": fake()}))
    await submit(client, job("kept-later"), "kept-later")
    reply = await result_of(client, "kept-later")  # stored on its second delivery
    assert reply.status == "ok" and [key for key, _ in failures] == [subjects.job_key("kept-later")]
    await asyncio.sleep(0.5)
    events = await kept_audit_events(client, 1)
    assert [(e.id, e.trace_id) for e in events] == [("kept-later", reply.trace_id)]
    assert failures[0][1].trace_id == reply.trace_id  # the first delivery's answer, kept
    worker = stack.workers["main"]
    assert worker.tally.requests == 1  # one provider call for two deliveries


async def test_an_answer_is_held_while_the_results_bucket_is_briefly_unreachable_not_paid_again(
    lifeline, client, monkeypatch
):
    """A node restarting, or its results stream electing a new leader, makes stores fail for a
    few seconds. The provider's answer is in hand then: the dispatcher tries the store again
    (its heartbeat holding the job) instead of having the job delivered again and the
    provider called, and paid, a second time. Anything else the bucket says is not waited
    out."""
    from service import jobs

    real_keep, tries = jobs.Jobs._keep, []

    async def unreachable_twice(self: Any, key: str, reply: Any) -> Any:
        tries.append(reply.trace_id)
        if len(tries) == 1:
            raise nats.js.errors.NoStreamResponseError
        if len(tries) == 2:
            raise nats.errors.TimeoutError
        return await real_keep(self, key, reply)

    monkeypatch.setattr(jobs.Jobs, "_keep", unreachable_twice)
    monkeypatch.setattr(jobs, "_STORE_BACKOFF_S", (0.05,))
    monkeypatch.setattr(jobs, "_RETRY_DELAY_S", 0.1)
    await lifeline(config({"main": fake()}))
    await submit(client, job("held"), "held")
    reply = await result_of(client, "held")
    assert reply.status == "ok" and tries == [reply.trace_id] * 3  # one provider call's answer
    assert await _waiting_jobs(client) == 0  # acknowledged
    consumer = await client.jetstream().consumer_info(JobsSettings().stream, subjects.JOBS_CONSUMER)
    assert consumer.delivered.consumer_seq == 1  # never delivered again
    events = await kept_audit_events(client, 1)
    assert [(e.id, e.trace_id) for e in events] == [("held", reply.trace_id)]

    tries.clear()  # a bucket that refuses (not unreachable) is not waited out

    async def refused(self: Any, key: str, reply: Any) -> Any:
        tries.append(reply.trace_id)
        if len(tries) == 1:
            raise nats.js.errors.BadRequestError(description="refused")
        return await real_keep(self, key, reply)

    monkeypatch.setattr(jobs.Jobs, "_keep", refused)
    await submit(client, job("refused-once"), "refused-once")
    reply = await result_of(client, "refused-once")
    # Delivered again (not waited out), and the answer kept from the first delivery stored.
    assert len(tries) == 2 and tries[0] == tries[1] == reply.trace_id


async def test_a_jobs_audit_event_waits_for_an_audit_stream_gone_for_a_moment(lifeline, client):
    """A cluster's audit stream has no leader for a few seconds after a node dies: an event
    published then as a core message was kept by nobody, and its job, acknowledged right
    after, never audited (174 of 1,200 in a `make chaos-cluster`). A job's event waits for the
    stream's confirmation instead; here the stream is gone while the job runs, and made again
    once its result is stored."""
    await lifeline(config({"main": fake()}))
    js = client.jetstream()
    await js.delete_stream(AuditSettings().stream)
    await submit(client, job("while-gone"), "while-gone")
    reply = await result_of(client, "while-gone")
    assert await ensure_audit_stream(js, AuditSettings()) is None
    events = await kept_audit_events(client, 1)
    assert [(e.id, e.trace_id) for e in events] == [("while-gone", reply.trace_id)]
    assert await _waiting_jobs(client) == 0  # acknowledged, once audited


async def test_a_jobs_audit_event_waits_when_the_dispatcher_could_not_look_at_the_stream(
    lifeline, client, monkeypatch
):
    """A dispatcher that cannot look at the audit stream as it starts (a cluster electing
    leaders after a node died: its look times out) cannot tell which event subjects the stream
    captures. It took that for "none" until its next look 30 s later, so its jobs' events went
    as core publishes, kept by nobody while the stream had no leader: 152 of 1,200 jobs of a
    `make chaos-cluster` lost their event, with no warning. Not known is not "not kept": a job's
    event waits for the stream's confirmation as ever."""
    from nats.js.client import JetStreamContext

    real_info, looks = JetStreamContext.stream_info, []

    async def first_look_times_out(self: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        if name == AuditSettings().stream and not looks:
            looks.append(name)
            raise nats.errors.TimeoutError
        return await real_info(self, name, *args, **kwargs)

    monkeypatch.setattr(JetStreamContext, "stream_info", first_look_times_out)
    await lifeline(config({"main": fake()}))
    assert looks  # the dispatcher's look at the stream failed
    js = client.jetstream()
    await js.delete_stream(AuditSettings().stream)  # no leader, as in a cluster after a kill
    await submit(client, job("unlooked"), "unlooked")
    reply = await result_of(client, "unlooked")
    assert await ensure_audit_stream(js, AuditSettings()) is None
    events = await kept_audit_events(client, 1)
    assert [(e.id, e.trace_id) for e in events] == [("unlooked", reply.trace_id)]
    assert await _waiting_jobs(client) == 0  # acknowledged, once audited


async def test_jobs_stop_waiting_for_an_audit_stream_that_stays_away(lifeline, client, monkeypatch):
    """Past its patience a job's event goes as a request's does, the job is acknowledged, and
    the next jobs do not wait for the stream until it is seen again."""
    from service import transport

    monkeypatch.setattr(transport, "_AUDIT_PATIENCE_S", 0.3)
    stack = await lifeline(config({"main": fake()}))
    await client.jetstream().delete_stream(AuditSettings().stream)
    await submit(client, job("first"), "first")
    assert (await result_of(client, "first")).status == "ok"
    await wait_for(lambda: stack.dispatcher.transport.audit_kept == frozenset(), timeout_s=5)
    assert await _waiting_jobs(client) == 0
    monkeypatch.setattr(transport, "_AUDIT_PATIENCE_S", 60.0)  # would hold the next job
    await submit(client, job("next"), "next")
    assert (await result_of(client, "next")).status == "ok"
    assert await _waiting_jobs(client) == 0


async def test_a_jobs_audit_event_waits_only_on_subjects_the_audit_stream_captures(
    lifeline, client, audit, monkeypatch
):
    """An operator's audit stream made beforehand may capture only some event subjects (the
    dispatcher warns at start). A job's event on one it does not capture never gets an ack:
    it used to wait for one all of its patience (20 s of the job's time) and only then go as
    a core publish. It goes at once now, and an event on a captured subject is still kept."""
    from service import transport

    monkeypatch.setattr(transport, "_AUDIT_PATIENCE_S", 600.0)  # a wait would hold the job
    stream = AuditSettings().stream
    await client.jetstream().add_stream(name=stream, subjects=[subjects.audit_subject("ok")])
    providers = {"main": fake(), "broken": fake(fail_status=503)}
    await lifeline(
        config(
            providers, routes={"default": {"targets": ["main"]}, "broken": {"targets": ["broken"]}}
        )
    )
    await submit(client, job("failed", route="broken"), "failed")
    assert (await result_of(client, "failed")).status == "error"
    assert await _waiting_jobs(client, settle_s=10) == 0  # acknowledged: audited
    await submit(client, job("answered"), "answered")
    assert (await result_of(client, "answered")).status == "ok"
    assert await _waiting_jobs(client) == 0
    events = await kept_audit_events(client, 1)
    assert [e.id for e in events] == ["answered"]  # the stream's, as it was made
    assert sorted(e.id for _, e in await audit.wait_for(2)) == ["answered", "failed"]


async def test_the_pull_loop_outlives_whatever_a_fetch_raises(lifeline, client, monkeypatch):
    """nats-py's fetch raises asyncio's TimeoutError on some paths, not only its own: once, that
    ended the pull loop, and the dispatcher took no job again (the bench found it)."""
    from service import jobs

    monkeypatch.setattr(jobs, "_FETCH_WAIT_S", 0.05)
    stack = await lifeline(config({"main": fake()}))
    pull = stack.dispatcher.jobs._sub
    real_fetch = pull.fetch
    raised: list[BaseException] = []

    async def fetch(*args: Any, **kwargs: Any) -> Any:
        for exc in (TimeoutError(), RuntimeError("a bug in the client")):
            if not any(type(e) is type(exc) for e in raised):
                raised.append(exc)
                raise exc
        return await real_fetch(*args, **kwargs)

    monkeypatch.setattr(pull, "fetch", fetch)
    await wait_for(lambda: len(raised) == 2, timeout_s=5)
    await submit(client, job("still-taken"), "still-taken")
    assert (await result_of(client, "still-taken")).status == "ok"


async def test_jobs_sent_without_any_id_are_each_answered(lifeline, client):
    """No id in the body, no Nats-Msg-Id: nothing to deduplicate by, but each is its own job
    (pushed to its Lifeline-Notify subject), not the first one's result again."""
    await lifeline(config({"main": fake()}))
    inbox = client.new_inbox()
    pushed = await client.subscribe(inbox)
    for text in ("first", "second"):
        body = encoder.encode({"messages": [{"role": "user", "content": text}]})
        await submit(client, body, **{subjects.NOTIFY: inbox})
    answers = {reply_decoder.decode((await pushed.next_msg(timeout=5)).data).content for _ in "ab"}
    assert answers == {"first", "second"}


@pytest.mark.parametrize("header", [subjects.NOTIFY, subjects.JOB_EVENTS])
async def test_a_notify_or_events_subject_no_subject_may_be_is_ignored_and_spares_the_dispatcher(
    lifeline, client, header
):
    """Written into a PUB line, a subject with a space is a protocol error for which the server
    closes the publisher's connection: such a job still gets its result, once, and nothing
    else on that dispatcher is lost."""
    stack = await lifeline(config({"main": fake()}))
    nc = stack.dispatcher.transport.nc
    await submit(client, job("spaced"), "spaced", **{header: "a b c"})
    reply = await result_of(client, "spaced")
    assert reply.status == "ok"
    assert await _waiting_jobs(client) == 0  # acknowledged: not delivered again
    assert (nc.is_connected, nc.stats["reconnects"]) == (True, 0)
    assert stack.dispatcher.jobs.handled == 1


@pytest.mark.parametrize("short_by", [-300, 25], ids=["over max_payload", "just under it"])
async def test_a_result_too_large_to_store_is_stored_as_a_small_error_once(
    lifeline, client, audit, short_by
):
    """A worker's answer that fits its reply but not the stored result (Lifeline's fields and the
    KV write's headers added): an error result is stored at once and the job acknowledged, as
    llm.complete answers reply_too_large; never the provider called again and again."""
    stack = await lifeline(
        config({"main": fake(reply="x" * (client.max_payload - short_by - 600))})
    )
    await submit(client, job("huge"), "huge")
    reply = await result_of(client, "huge")
    assert (reply.status, reply.error.type, reply.content) == ("error", "reply_too_large", None)
    # What a job of the id sent again gets, fewer max_tokens asked or not: another id it is.
    assert "ask for fewer max_tokens" in reply.error.message
    assert "submit the job again under another id" in reply.error.message
    assert [a.outcome for a in reply.attempts] == ["ok"]  # the worker's answer itself fitted
    assert await _waiting_jobs(client) == 0
    [(_, event)] = await audit.wait_for(1)
    assert event.error_type == "reply_too_large"
    nc = stack.dispatcher.transport.nc
    assert (stack.dispatcher.jobs.handled, nc.is_connected, nc.stats["reconnects"]) == (1, True, 0)


async def test_a_consumer_made_with_other_settings_is_updated_to_the_configs(lifeline, client):
    """The durable consumer outlives dispatchers: one made by an earlier config keeps its
    ack_wait and max_deliver unless updated, while heartbeats and dead letters follow the
    config (a job could then be redelivered while it runs, or never dead-lettered)."""
    from service.jobstore import ensure_jobs

    js = client.jetstream()
    await ensure_jobs(js, JobsSettings())
    old = await js.pull_subscribe(
        subjects.JOBS_SUBMIT,
        durable=subjects.JOBS_CONSUMER,
        config=nats.js.api.ConsumerConfig(ack_wait=1, max_deliver=2, max_ack_pending=-1),
    )
    await old.unsubscribe()
    await lifeline({**config({"main": fake()}), "jobs": {"ack_wait_s": 6, "max_deliver": 3}})
    info = await js.consumer_info(JobsSettings().stream, subjects.JOBS_CONSUMER)
    assert (info.config.ack_wait, info.config.max_deliver) == (6, -1)  # see the test below
    await submit(client, job("after"), "after")
    assert (await result_of(client, "after")).status == "ok"


async def test_a_job_whose_last_delivery_died_with_its_dispatcher_is_dead_lettered_and_audited(
    lifeline, client, audit
):
    """The consumer stopped delivering at jobs.max_deliver, and only the dispatcher holding
    the last delivery dead-letters: one that died with it (SIGKILL, out of memory) left the job
    in the stream for good, with no result, no dead letter and no audit event."""
    await ensure_jobs(client.jetstream(), JobsSettings(ack_wait_s=1, max_deliver=2))
    await submit(client, job("doomed"), "doomed")
    dead = await client.subscribe(subjects.JOBS_DEAD)
    took = await client.jetstream().pull_subscribe(  # dispatchers that each died with it
        subjects.JOBS_SUBMIT,
        durable=subjects.JOBS_CONSUMER,
        config=nats.js.api.ConsumerConfig(ack_wait=1, max_deliver=-1, max_ack_pending=-1),
    )
    for delivery in (1, 2):  # the second, its last, after the first's ack wait
        [taken] = await took.fetch(1, timeout=5)
        assert taken.metadata.num_delivered == delivery
    await took.unsubscribe()
    stack = await lifeline(
        {**config({"main": fake()}), "jobs": {"ack_wait_s": 1, "max_deliver": 2}}
    )
    letter = await dead.next_msg(timeout=10)
    assert "died or stopped while running it" in letter.headers[subjects.JOB_ERROR]
    [(_, event)] = await audit.wait_for(1)
    assert (event.id, event.error_type) == ("doomed", "internal")
    assert await _waiting_jobs(client) == 0 and stack.dispatcher.jobs.handled == 0


async def test_a_new_job_numbered_as_one_still_running_from_a_deleted_stream_is_run(
    lifeline, client, audit, monkeypatch
):
    """A jobs stream made again counts from 1: a new job with the number of one still running
    from the stream before was taken for its redelivery, never run, and acknowledged (so
    gone) when the old one ended."""
    from service import jobs as jobs_module

    monkeypatch.setattr(jobs_module, "_RESETUP_AFTER", 1)  # made again after 1 failed pull, not 5
    stack = await lifeline(
        config(
            {"slow": fake(latency_ms=5000, timeout_s=30), "main": fake()},
            routes={"default": {"targets": ["main"]}, "slow": {"targets": ["slow"]}},
            shutdown_grace_s=0.1,
        )
    )
    js, jobs = client.jetstream(), stack.dispatcher.jobs
    first = await submit(client, job("old", route="slow"), "old")
    await wait_for(lambda: jobs.in_flight == 1, timeout_s=5)
    await js.delete_stream(JobsSettings().stream)  # an operator's doing, or a server's restart

    async def made_again() -> bool:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            return (
                await js.consumer_info(JobsSettings().stream, subjects.JOBS_CONSUMER)
            ) is not None
        return False

    await wait_for(made_again, timeout_s=15, interval_s=0.2)
    again = await submit(client, job("new"), "new")
    assert again.seq == first.seq  # the collision
    assert (await result_of(client, "new")).content == "hello"
    [(_, event)] = await audit.wait_for(1)
    assert event.id == "new"
    # Its task ends once its delivery is acknowledged, a moment after its audit event went
    # out: then only the old one runs (checked at the audit event, this failed under load).
    await wait_for(lambda: jobs.in_flight == 1, timeout_s=5)


async def test_a_long_job_keeps_its_delivery_when_another_config_shortened_the_ack_wait(
    lifeline, client
):
    """The consumer is shared: a dispatcher started with a shorter jobs.ack_wait_s (a rolling
    deploy) sets it for all, and one heartbeating every third of its own 30 s had each long job
    delivered again, and its provider paid, twice."""
    stack = await lifeline(
        {
            **config({"slow": fake(latency_ms=2500, timeout_s=10)}, shutdown_grace_s=0.1),
            "jobs": {"ack_wait_s": 30},
        }
    )
    js, jobs = client.jetstream(), stack.dispatcher.jobs
    await submit(client, job("long"), "long")
    await wait_for(lambda: jobs.in_flight == 1, timeout_s=5)
    info = await js.consumer_info(JobsSettings().stream, subjects.JOBS_CONSUMER)
    await js.add_consumer(JobsSettings().stream, info.config.evolve(ack_wait=2))  # the other's
    assert (await result_of(client, "long")).status == "ok"
    info = await js.consumer_info(JobsSettings().stream, subjects.JOBS_CONSUMER)
    assert info.delivered.consumer_seq == 1


async def test_a_results_bucket_made_with_another_ttl_is_said_to_keep_its_own(
    lifeline, client, caplog
):
    """Made by a client's submit or an earlier config, the bucket kept its TTL while
    jobs.results_ttl_s said otherwise, and results went away without a word."""
    await ensure_jobs(
        client.jetstream(), JobsSettings(results_ttl_s=3, ack_wait_s=3, dedup_window_s=3)
    )
    await lifeline(config({"main": fake()}))
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("keeps results for 3 s, not the 86400 s" in line for line in said), said


async def test_an_id_over_its_bound_gets_an_error_stored_under_it_alone(lifeline, client, audit):
    """Ids from Nats-Msg-Id alone (bodies without one) are bound as body ids are: each too
    long is refused, its error stored under its own whole id (two sharing their first 4 KiB
    are two results, never one found for the other) with an audit event each."""
    await lifeline(config({"main": fake()}))
    body = encoder.encode({"messages": [{"role": "user", "content": "hi"}]})
    ids = ["p" * 4100 + "-one", "p" * 4100 + "-two"]
    for job_id in ids:
        await submit(client, body, job_id)
    for job_id in ids:
        reply = await result_of(client, job_id)
        assert (reply.status, reply.error.type, reply.id) == ("error", "invalid_request", "")
        assert "at most 256" in reply.error.message
    await audit.wait_for(2)
    assert len(await kept_audit_events(client, 2)) == 2
    asked = await client.request(subjects.JOBS_RESULT, ids[1].encode(), timeout=5)
    assert reply_decoder.decode(asked.data).error.message == reply.error.message
    unknown = await client.request(subjects.JOBS_RESULT, (ids[0] + "x").encode(), timeout=5)
    assert unknown.data == b""  # a longer id sharing a stored one's start finds nothing


async def test_ids_that_differ_by_what_a_header_strips_keep_an_audit_event_each(
    lifeline, client, audit
):
    """nats-py strips a header's value and turns its line breaks into spaces: the audit
    event's Nats-Msg-Id is a hash of the id, so these are five jobs with five kept events."""
    await lifeline(config({"main": fake()}))
    ids = ["inv-1", "inv-1 ", "inv-1\t", "inv-1\u00a0", "a\nb"]
    for n, job_id in enumerate(ids):
        await submit(client, job(job_id), f"msg-{n}")
    for job_id in ids:
        assert (await result_of(client, job_id)).status == "ok"
    await audit.wait_for(len(ids))
    kept = await kept_audit_events(client, len(ids))
    assert sorted(event.id for event in kept) == sorted(ids)


async def test_a_job_without_an_id_never_gets_another_jobs_result(lifeline, client):
    """One sent as `seq-<N>` by a client, one without any id that lands at sequence N: each
    gets its own answer (an id-less job's result is kept under its place in the stream)."""
    await lifeline(config({"main": fake()}))
    inbox = client.new_inbox()
    pushed = await client.subscribe(inbox)
    ack = await submit(client, job("seq-2", "the chosen one"), "seq-2")
    assert ack.seq == 1
    await result_of(client, "seq-2")
    body = encoder.encode({"messages": [{"role": "user", "content": "nameless"}]})
    assert (await submit(client, body, **{subjects.NOTIFY: inbox})).seq == 2
    reply = reply_decoder.decode((await pushed.next_msg(timeout=5)).data)
    assert (reply.id, reply.content) == ("seq-2", "nameless")


async def test_an_invalid_job_is_answered_and_audited_under_its_nats_msg_id(
    lifeline, client, audit
):
    await lifeline(config({"main": fake()}))
    await submit(client, b"{not json", "broken-1")
    reply = await result_of(client, "broken-1")
    assert (reply.id, reply.error.type) == ("broken-1", "invalid_request")
    [(_, event)] = await audit.wait_for(1)
    assert event.id == "broken-1"


async def test_no_answer_to_llm_jobs_result_goes_onto_lifelines_or_the_servers_subjects(
    lifeline, client, audit
):
    """An asker chooses the reply subject, and a dispatcher may write where the asker may
    not: into another job's result, the audit stream, the JetStream API."""
    await lifeline(config({"main": fake()}))
    await submit(client, job("mine", "my answer"), "mine")
    await result_of(client, "mine")
    await audit.wait_for(1)
    kv = await client.jetstream().key_value(JobsSettings().results_bucket)
    victim = subjects.job_key("victim")
    for reply_to in (
        f"$KV.{JobsSettings().results_bucket}.{victim}",
        "llm.audit.ok",
        f"$JS.API.STREAM.DELETE.{JobsSettings().stream}",
    ):
        await client.publish(subjects.JOBS_RESULT, b"mine", reply=reply_to)
    answered = await client.request(subjects.JOBS_RESULT, b"mine", timeout=5)  # all asked
    assert reply_decoder.decode(answered.data).content == "my answer"
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await kv.get(victim)
    assert len(audit.events) == 1
    await client.jetstream().stream_info(JobsSettings().stream)  # still there


@pytest.mark.parametrize("header", [subjects.NOTIFY, subjects.JOB_EVENTS])
async def test_a_notify_or_events_subject_too_long_to_publish_on_spares_the_dispatcher(
    lifeline, client, header
):
    """Over nats-server's 4 KiB protocol line, a publish on it would close the dispatcher's
    connection, again on each delivery: refused, the job gets its result once."""
    stack = await lifeline(config({"main": fake()}))
    nc = stack.dispatcher.transport.nc
    await submit(client, job("far"), "far", **{header: "r." + "x" * 5000})
    assert (await result_of(client, "far")).status == "ok"
    assert await _waiting_jobs(client) == 0
    assert (nc.is_connected, nc.stats["reconnects"]) == (True, 0)


async def test_jobs_and_the_audit_stream_come_back_after_their_streams_are_gone(
    lifeline, client, audit, monkeypatch
):
    """A server restarted on an empty store (or an operator deleting the streams): the
    dispatcher makes them again, takes jobs again and keeps audit events again."""
    from service import audit as audit_module
    from service import jobs as jobs_module

    monkeypatch.setattr(audit_module, "_WATCH_S", 0.3)
    monkeypatch.setattr(jobs_module, "_RESETUP_AFTER", 2)
    await lifeline(config({"main": fake()}))
    js = client.jetstream()
    await js.delete_stream(JobsSettings().stream)
    await js.delete_stream(AuditSettings().stream)
    deadline = asyncio.get_running_loop().time() + 15
    while True:  # submit as `lifeline submit` would, once the stream is there again
        try:
            await submit(client, job("reborn"), "reborn")
            break
        except nats.js.errors.NoStreamResponseError:
            assert asyncio.get_running_loop().time() < deadline, "the jobs stream never came back"
            await asyncio.sleep(0.2)
    assert (await result_of(client, "reborn", timeout_s=15)).status == "ok"
    [event] = await kept_audit_events(client, 1)
    assert event.id == "reborn"


async def test_following_an_empty_audit_stream_waits_for_its_first_event(lifeline, client):
    """lifeline audit --follow on a new deployment, before any request."""
    await lifeline(config({"main": fake()}))
    events = read_events(client.jetstream(), AuditSettings(), 20, follow=True)
    first = asyncio.ensure_future(events.__anext__())
    await asyncio.sleep(0.3)
    assert not first.done()
    await submit(client, job("first-ever"), "first-ever")
    assert audit_decoder.decode(await asyncio.wait_for(first, 10)).id == "first-ever"
    await events.aclose()


async def test_following_the_audit_stream_goes_on_into_one_made_again(lifeline, client):
    """Deleted and made again (a server restarted on an empty store), the stream counts from 1:
    a follower's ordered consumer resumed past its old place, and the new stream's first
    events (as many as the old one held) were never shown."""
    await lifeline(config({"main": fake()}))
    for n in range(3):
        await ask(client, {"id": f"before-{n}", "messages": [{"role": "user", "content": "q"}]})
    await kept_audit_events(client, 3)
    events = read_events(client.jetstream(), AuditSettings(), 0, follow=True)
    seen = [
        audit_decoder.decode(await asyncio.wait_for(events.__anext__(), 10)).id for _ in range(3)
    ]
    assert seen == ["before-0", "before-1", "before-2"]
    js = client.jetstream()
    await js.delete_stream(AuditSettings().stream)
    await ensure_audit_stream(js, AuditSettings())
    await ask(client, {"id": "after", "messages": [{"role": "user", "content": "q"}]})
    assert audit_decoder.decode(await asyncio.wait_for(events.__anext__(), 10)).id == "after"
    await events.aclose()


async def test_replicas_above_one_on_a_single_server_are_refused_with_what_to_do(
    lifeline, client, caplog
):
    caplog.set_level(logging.WARNING, "lifeline")
    await lifeline({**config({"main": fake()}), "jetstream": {"replicas": 3}})
    said = [r.getMessage() for r in caplog.records]
    needs = "jetstream.replicas (3) above 1 needs a NATS cluster: set it to 1 for a single server"
    assert any("not taking jobs" in line and needs in line for line in said), said
    assert any("shared health unavailable" in line and needs in line for line in said), said
    reply = await ask(client, {"messages": [{"role": "user", "content": "hi"}]})  # served anyway
    assert reply.status == "ok"


def test_a_cluster_short_of_servers_for_the_replicas_is_named():
    exc = nats.js.errors.BadRequestError(
        code=400, err_code=10005, description="no suitable peers for placement"
    )
    assert jetstream_hint(exc, 3).endswith(
        "fewer JetStream servers are up than jetstream.replicas (3) asks for: start the "
        "others, or lower it"
    )
    assert "is JetStream on (nats-server -js)" in jetstream_hint(TimeoutError(), 1)
    # A timeout may be a permission too: a least-privilege client reading the results bucket.
    assert "May this NATS user use this stream or bucket" in jetstream_hint(TimeoutError(), 1)


async def test_a_jobs_stream_made_with_other_settings_is_used_as_it_is(lifeline, client):
    js = client.jetstream()
    await js.add_stream(
        nats.js.api.StreamConfig(
            name=JobsSettings().stream,
            subjects=[subjects.JOBS_SUBMIT],
            retention=nats.js.api.RetentionPolicy.WORK_QUEUE,
            max_msgs=7,  # not the config's
        )
    )
    await lifeline(config({"main": fake()}))
    await submit(client, job("on-their-stream"), "on-their-stream")
    assert (await result_of(client, "on-their-stream")).status == "ok"
    assert (await js.stream_info(JobsSettings().stream)).config.max_msgs == 7


@pytest.mark.parametrize(
    ("limits", "expected", "stored", "logged"),
    [
        ({"max_value_size": 1200}, "reply_too_large", True, None),  # an error fits
        ({"max_value_size": 200}, "reply_too_large", False, "raise it (the max_msg_size"),
        ({"max_bytes": 4096}, "internal", False, "raise its max_bytes"),  # filled first
    ],
    ids=["small values", "tiny values", "full"],
)
async def test_a_result_the_results_bucket_refuses_for_good_ends_the_job_with_one_error(
    lifeline, client, audit, caplog, limits, expected, stored, logged
):
    """An operator's results bucket with a small max value size, or one at its max_bytes
    (discard new; a server's full store answers alike): no retry would store the result. The
    job ends at once with an error result, stored when the bucket takes that, pushed to its
    Lifeline-Notify subject and audited once with that error; the provider is called once,
    the job is not delivered again, and what cannot be stored is logged with what to raise,
    without a traceback."""
    caplog.set_level(logging.WARNING, "lifeline")
    js = client.jetstream()
    name = JobsSettings().results_bucket
    kv = await js.create_key_value(bucket=name, history=1, direct=True, **limits)
    if "max_bytes" in limits:
        with pytest.raises(nats.js.errors.ServiceUnavailableError, match="10077"):
            for n in range(100):
                await kv.put(f"filler.{n}", b"f" * 200)
    calls = await client.subscribe(subjects.provider_subject("main"))
    notify = client.new_inbox()
    pushed = await client.subscribe(notify)
    stack = await lifeline(config({"main": fake(reply="x" * 2000)}))
    await submit(client, job("refused"), "refused", **{subjects.NOTIFY: notify})
    reply = reply_decoder.decode((await pushed.next_msg(timeout=5)).data)
    assert (reply.id, reply.status, reply.error.type) == ("refused", "error", expected)
    if expected == "reply_too_large":
        assert f"max value size of the results bucket {name}" in reply.error.message
    # Kept, the error is what a job of the id sent again gets: it says to use another id.
    assert ("submit the job again under another id" in reply.error.message) == stored
    [(subject, event)] = await audit.wait_for(1)
    assert (subject, event.id, event.error_type) == ("llm.audit.error", "refused", expected)
    asked = await client.request(subjects.JOBS_RESULT, b"refused", timeout=5)
    assert (reply_decoder.decode(asked.data) if stored else asked.data) == (
        reply if stored else b""
    )
    assert await _waiting_jobs(client) == 0  # acknowledged
    consumer = await js.consumer_info(JobsSettings().stream, subjects.JOBS_CONSUMER)
    assert consumer.delivered.consumer_seq == 1  # never delivered again
    await wait_for(lambda: stack.dispatcher.jobs.in_flight == 0)
    await settled(client, stack)
    assert (calls.pending_msgs, pushed.pending_msgs, len(audit.events)) == (1, 0, 1)
    said = [r.getMessage() for r in caplog.records]
    if logged is None:  # fitted to the bucket's limit as it was stored: never refused
        assert not any("cannot be stored" in line for line in said), said
    else:
        assert any("cannot be stored" in line and logged in line for line in said), said
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], said


async def test_a_deleted_results_bucket_is_made_again_and_every_job_gets_its_result(
    lifeline, client, audit, monkeypatch
):
    """An operator deleting the results bucket while a job runs, and again while none does:
    the job in flight stores its answer in the bucket made again (one provider call, one
    result, one audit event), and so does every job after it."""
    from service import jobs

    monkeypatch.setattr(jobs, "_REMAKE_EVERY_S", 0.0)
    monkeypatch.setattr(jobs, "_STORE_PATIENCE_S", 3.0)  # without the fix: fail fast
    monkeypatch.setattr(jobs, "_RETRY_DELAY_S", 0.1)
    calls = await client.subscribe(subjects.provider_subject("main"))
    notify = client.new_inbox()
    pushed = await client.subscribe(notify)
    stack = await lifeline(config({"main": fake(latency_ms=500)}))
    js = client.jetstream()
    await submit(client, job("in-flight"), "in-flight", **{subjects.NOTIFY: notify})
    await calls.next_msg(timeout=5)  # its provider call has started
    await js.delete_key_value(JobsSettings().results_bucket)
    first = reply_decoder.decode((await pushed.next_msg(timeout=10)).data)
    assert (first.id, first.status) == ("in-flight", "ok")
    assert await result_of(client, "in-flight") == first

    await js.delete_key_value(JobsSettings().results_bucket)  # and with no job running
    await submit(client, job("after"), "after", **{subjects.NOTIFY: notify})
    second = reply_decoder.decode((await pushed.next_msg(timeout=10)).data)
    assert (second.id, second.status) == ("after", "ok")
    assert await result_of(client, "after") == second
    asked = await client.request(subjects.JOBS_RESULT, b"after", timeout=5)
    assert reply_decoder.decode(asked.data) == second

    await audit.wait_for(2)
    await wait_for(lambda: stack.dispatcher.jobs.in_flight == 0)
    await settled(client, stack)
    assert sorted(e.id for _, e in audit.events) == ["after", "in-flight"]
    assert (calls.pending_msgs, pushed.pending_msgs) == (1, 0)  # "after"'s call; no repeat
    assert stack.dispatcher.jobs.handled == 2


async def test_a_result_never_stored_still_reaches_its_notify_subject_on_the_last_delivery(
    lifeline, client, audit, monkeypatch, caplog
):
    """The results bucket unreachable through every delivery: the last one's answer went
    nowhere (its client waited for ever on Lifeline-Notify), and the log called it a bug. Its
    client now gets the answer; the job is dead-lettered and audited once, as before."""
    from service import jobs

    async def unreachable(self: Any, key: str, reply: Any) -> Any:
        raise nats.js.errors.ServiceUnavailableError()

    monkeypatch.setattr(jobs.Jobs, "_keep", unreachable)
    monkeypatch.setattr(jobs, "_RETRY_DELAY_S", 0.1)
    monkeypatch.setattr(jobs, "_STORE_PATIENCE_S", 0.0)
    notified = await client.subscribe("results.lost")
    dead = await client.subscribe(subjects.JOBS_DEAD)
    data = config({"main": fake()})
    data["jobs"] = {"max_deliver": 2}
    await lifeline(data)
    await submit(
        client, job("unkept", "hello there"), "unkept", **{subjects.NOTIFY: "results.lost"}
    )
    reply = reply_decoder.decode((await notified.next_msg(timeout=10)).data)
    assert (reply.id, reply.status, reply.content) == ("unkept", "ok", "hello there")
    await dead.next_msg(timeout=10)
    [(_, event)] = await audit.wait_for(1)
    assert (event.id, event.status) == ("unkept", "ok")
    assert not [r for r in caplog.records if "bug while answering" in r.getMessage()]
    with pytest.raises(nats.errors.TimeoutError):  # one answer, not one per delivery
        await notified.next_msg(timeout=0.5)


async def test_a_job_delivered_again_while_its_dispatcher_still_runs_it_is_called_once(
    lifeline, client, audit, monkeypatch
):
    """A dispatcher stopped (SIGSTOP) or starved past the ack wait, its heartbeats late: the
    job came back to the same dispatcher, which ran it a second time beside the first, a
    second provider call and a second live audit event. The run under way answers both."""
    from service import jobs

    async def late(self: Any, latest: Any) -> None:  # heartbeats that never come in time
        await asyncio.Event().wait()

    monkeypatch.setattr(jobs.Jobs, "_heartbeat", late)
    data = config({"main": fake(latency_ms=2500)})
    data["jobs"] = {"ack_wait_s": 1}
    stack = await lifeline(data)
    await submit(client, job("slow", "hello"), "slow")
    reply = await result_of(client, "slow", timeout_s=15)
    assert reply.status == "ok"
    await asyncio.sleep(1.5)  # a second run would have ended by now
    assert [event.id for _, event in audit.events] == ["slow"]
    assert stack.dispatcher.jobs.handled == 1
    assert await _waiting_jobs(client) == 0  # acknowledged: not delivered again


async def test_a_job_that_finds_no_worker_yet_waits_for_one(lifeline, client, audit, monkeypatch):
    """A fleet started all at once, its dispatcher before its workers: each job waiting in the
    stream was answered no_responders for good, stored, acknowledged and audited. A job is
    now delivered again while no worker answers, until its last delivery."""
    from schemas import ProviderFailure
    from service import jobs
    from service.transport import NatsTransport

    real_ask, asked = NatsTransport.ask_provider, []

    async def workers_not_up_yet(self: Any, provider: str, *args: Any) -> Any:
        asked.append(provider)
        if len(asked) <= 2:  # the first delivery finds nobody, the second too
            return ProviderFailure("no_responders", f"no worker is listening for {provider}")
        return await real_ask(self, provider, *args)

    monkeypatch.setattr(NatsTransport, "ask_provider", workers_not_up_yet)
    monkeypatch.setattr(jobs, "_RETRY_DELAY_S", 0.1)
    await lifeline(config({"main": fake()}))
    await submit(client, job("early", "hello"), "early")
    reply = await result_of(client, "early", timeout_s=15)
    assert (reply.status, reply.content) == ("ok", "hello")
    assert len(asked) == 3
    [(_, event)] = await audit.wait_for(1)
    assert (event.id, event.status) == ("early", "ok")


def test_answers_kept_for_their_next_delivery_are_bounded_by_bytes_oldest_out_first():
    from schemas.wire import CompletionReply
    from service.jobs import _Unstored

    kept = _Unstored(max_bytes=300)
    for n in range(5):
        kept.keep(f"k{n}", CompletionReply(f"job-{n}", "ok", content="x" * 60))
    assert kept.take("k0") is None and kept.take("k4").id == "job-4"  # type: ignore[union-attr]
    assert kept.take("k4") is None  # taken once
    kept.keep("huge", CompletionReply("huge", "ok", content="x" * 400))  # over the bound alone
    assert kept.take("huge") is None
    now = [0.0]
    aging = _Unstored(for_s=1800, clock=lambda: now[0])
    aging.keep("old", CompletionReply("old", "ok"))
    now[0] = 1801.0  # the id sent again long after: a new job, not the old answer
    assert aging.take("old") is None
