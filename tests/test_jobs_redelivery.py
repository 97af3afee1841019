"""A durable job's deliveries, seen as a user sees them: one trace, one audit event, one
result, whatever delivered it again."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from helpers import ask, config, fake, wait_for
from opentelemetry.trace import SpanKind
from test_jobs import job, kept_audit_events, result_of, submit

from schemas import ProviderFailure, subjects
from schemas.wire import reply_decoder
from service import jobs
from service.transport import NatsTransport

CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def no_worker_at_first(monkeypatch) -> list[str]:
    """The first provider call finds no worker (a fleet whose workers start late): the job
    is delivered again, 0.1 s later, and answered then."""
    real_ask, asked = NatsTransport.ask_provider, []

    async def ask(self: Any, provider: str, *args: Any) -> Any:
        asked.append(provider)
        if len(asked) == 1:
            return ProviderFailure("no_responders", f"no worker is listening for {provider}")
        return await real_ask(self, provider, *args)

    monkeypatch.setattr(NatsTransport, "ask_provider", ask)
    monkeypatch.setattr(jobs, "_RETRY_DELAY_S", 0.1)
    return asked


@pytest.mark.parametrize("traceparent", [None, CALLER], ids=["untraced", "traced"])
async def test_a_job_delivered_again_is_one_trace_under_its_job_span(
    lifeline, client, exporter, no_worker_at_first, traceparent
):
    """Each delivery's request span began a trace of its own when the job came without a
    traceparent (as `lifeline submit` sends it): the first delivery's attempts were in a
    trace nothing led to. Now every delivery is a child of one `job` span, from when the job
    was stored until its result was, itself under the submitter's span when it sent one."""
    await lifeline(config({"main": fake()}))
    headers = {subjects.TRACEPARENT: traceparent} if traceparent else {}
    await submit(client, job("traced"), "traced", **headers)
    reply = await result_of(client, "traced", timeout_s=15)
    assert (reply.status, len(no_worker_at_first)) == ("ok", 2)

    def named(name: str) -> list[Any]:
        return [s for s in exporter.get_finished_spans() if s.name == name]

    await wait_for(lambda: len(named("job")) == 1, what="the job span")
    [job_span] = named("job")
    chats = [s for s in named("chat") if s.kind == SpanKind.SERVER]
    assert len(chats) == 2  # one per delivery
    assert {s.context.trace_id for s in [job_span, *chats]} == {int(reply.trace_id, 16)}
    assert {s.parent.span_id for s in chats} == {job_span.context.span_id}
    if traceparent:
        assert reply.trace_id == traceparent.split("-")[1]
        assert job_span.parent.span_id == int(traceparent.split("-")[2], 16)
    else:
        assert job_span.parent is None
    assert job_span.kind == SpanKind.CONSUMER
    assert job_span.start_time <= min(s.start_time for s in chats)
    assert job_span.end_time >= max(s.end_time for s in chats)
    assert {
        k: job_span.attributes[k]
        for k in ("lifeline.request.id", "lifeline.job.deliveries", "lifeline.job.outcome")
    } == {
        "lifeline.request.id": "traced",
        "lifeline.job.deliveries": 2,
        "lifeline.job.outcome": "answered",
    }


async def test_a_job_waiting_for_workers_is_said_once_a_delivery_with_what_to_start(
    lifeline, client, caplog, no_worker_at_first
):
    """A dispatcher up before its workers logged each delivery of a waiting job twice: the
    engine's line, then the jobs front end's, the same reason again inside a Python repr
    (`_NotStored('...')`). Now one line a delivery, in words, naming the worker to start."""
    caplog.set_level(logging.WARNING, "lifeline")
    await lifeline(config({"main": fake()}))
    await submit(client, job("early"), "early")
    assert (await result_of(client, "early", timeout_s=15)).status == "ok"
    said = [r.getMessage() for r in caplog.records if "early" in r.getMessage()]
    assert len(said) == 1, said
    assert "lifeline worker main" in said[0] and "tried again in 0.1 s" in said[0], said
    assert "_NotStored" not in said[0] and "no_responders" not in said[0], said


async def test_a_last_delivery_audited_by_a_dispatcher_that_died_keeps_one_event(
    lifeline, client, monkeypatch
):
    """The job's last delivery answered it, could not store the result (the bucket
    unreachable), audited it and died before dead-lettering it. The delivery after it finds
    no result, dead-letters the job and audits that: a live subscriber sees a second event of
    the id, under the same Nats-Msg-Id, and the audit stream keeps one, the first."""
    import asyncio

    import nats.js.errors
    from test_jobs import kept_audit_events

    from schemas.wire import audit_decoder

    dying = [True]
    real_keep, real_dead_letter = jobs.Jobs._keep, jobs.Jobs._dead_letter

    async def keep(self: Any, key: str, reply: Any) -> Any:
        if dying[0]:
            raise nats.js.errors.ServiceUnavailableError()
        return await real_keep(self, key, reply)

    async def dead_letter(self: Any, *args: Any, **kwargs: Any) -> None:
        if dying[0]:  # the dispatcher dies here: killed before it dead-letters the job
            await asyncio.Event().wait()
        await real_dead_letter(self, *args, **kwargs)

    monkeypatch.setattr(jobs.Jobs, "_keep", keep)
    monkeypatch.setattr(jobs.Jobs, "_dead_letter", dead_letter)
    monkeypatch.setattr(jobs, "_RETRY_DELAY_S", 0.1)
    monkeypatch.setattr(jobs, "_STORE_PATIENCE_S", 0.0)
    live = await client.subscribe(subjects.AUDIT_ALL)
    dead = await client.subscribe(subjects.JOBS_DEAD)
    data = {**config({"main": fake()}, shutdown_grace_s=0.1)}
    data["jobs"] = {"ack_wait_s": 1, "max_deliver": 2}
    first = await lifeline(data)
    await submit(client, job("last"), "last")
    answered = await live.next_msg(timeout=10)  # its last delivery's, as it died
    await first.stop()
    dying[0] = False
    await lifeline(data)
    letter = await dead.next_msg(timeout=10)
    assert letter.headers[subjects.MSG_ID] == "last"
    again = await live.next_msg(timeout=10)
    events = [audit_decoder.decode(m.data) for m in (answered, again)]
    assert [(e.id, e.status) for e in events] == [("last", "ok"), ("last", "error")]
    assert answered.headers[subjects.MSG_ID] == again.headers[subjects.MSG_ID]
    # A request after it, audited through the same connection: kept after it, if it were.
    assert (
        await ask(client, {"id": "after", "messages": [{"role": "user", "content": "hi"}]})
    ).status == "ok"
    kept = await kept_audit_events(client, 2)
    assert [(e.id, e.status) for e in kept] == [("last", "ok"), ("after", "ok")]


async def test_a_dead_lettered_job_has_its_error_as_its_result(
    lifeline, client, audit, monkeypatch
):
    """A job dead-lettered after failing on each delivery went to llm.jobs.dead, core NATS,
    and nowhere else: its client, waiting on Lifeline-Notify or asking `lifeline result`,
    heard nothing for ever, and told it from a job still waiting by nothing. Its result is now
    the error its audit event reports, stored and pushed like any result, and found by a
    delivery that comes again."""

    async def broken(self: Any, msg: Any, *_: Any) -> Any:
        raise RuntimeError("a bug in the jobs front end")

    monkeypatch.setattr(jobs.Jobs, "_answer", broken)
    monkeypatch.setattr(jobs, "_RETRY_DELAY_S", 0.1)
    notified = await client.subscribe("results.doomed")
    data = config({"main": fake()})
    data["jobs"] = {"max_deliver": 2}
    await lifeline(data)
    await submit(client, job("doomed"), "doomed", **{subjects.NOTIFY: "results.doomed"})
    pushed = reply_decoder.decode((await notified.next_msg(timeout=10)).data)
    assert (pushed.id, pushed.status, pushed.error.type) == ("doomed", "error", "internal")
    assert subjects.JOBS_DEAD in pushed.error.message
    assert await result_of(client, "doomed") == pushed
    asked = await client.request(subjects.JOBS_RESULT, b"doomed", timeout=5)
    assert reply_decoder.decode(asked.data) == pushed
    [(_, event)] = await audit.wait_for(1)
    assert (event.id, event.error_type, event.trace_id) == ("doomed", "internal", pushed.trace_id)


async def test_a_job_run_again_once_its_result_expired_keeps_its_own_audit_event(
    lifeline, client, audit
):
    """Results kept a short time (jobs.results_ttl_s): a job of an id whose result has expired
    runs again, a second provider call. Its audit event carried the Nats-Msg-Id of the first
    job of the id, and the audit stream, within its 10-minute window, dropped it as that
    one's duplicate: a request paid for and kept nowhere."""
    calls = await client.subscribe(subjects.provider_subject("main"))
    brief = {"results_ttl_s": 1, "ack_wait_s": 1, "dedup_window_s": 1}
    await lifeline({**config({"main": fake()}), "jobs": brief})
    await submit(client, job("brief"), "brief")
    assert (await result_of(client, "brief")).status == "ok"
    kv = await client.jetstream().key_value(jobs.JobsSettings().results_bucket)

    async def expired() -> bool:
        try:
            await kv.get(subjects.job_key("brief"))
        except Exception:  # noqa: BLE001 - gone: KeyNotFoundError, or deleted as a marker
            return True
        return False

    await wait_for(expired, timeout_s=10, interval_s=0.2, what="the result to expire")
    await submit(client, job("brief"), "brief-again")  # past the jobs' dedup window, say
    assert (await result_of(client, "brief")).status == "ok"
    await audit.wait_for(2)
    assert calls.pending_msgs == 2  # two requests, each paid for
    # A request after them, through the same connection: kept after them, if they were.
    hi = {"id": "after", "messages": [{"role": "user", "content": "hi"}]}
    assert (await ask(client, hi)).status == "ok"
    kept = await kept_audit_events(client, 3)
    assert [e.id for e in kept] == ["brief", "brief", "after"]


async def test_a_job_stuck_at_an_older_consumers_delivery_limit_runs_after_an_upgrade(
    lifeline, client, audit
):
    """Dispatchers before 0855c68 made the consumer with max_deliver = jobs.max_deliver, and a
    job whose last delivery died with its dispatcher stayed in the stream, never delivered
    again. A dispatcher of now updates the consumer to no limit of its own: the server
    delivers such a job again (once its last delivery's ack wait, restarted by the update at
    the new jobs.ack_wait_s, is over), and it is answered and audited once."""
    import nats.js.api

    from service.config import JobsSettings
    from service.jobstore import ensure_jobs

    await ensure_jobs(client.jetstream(), JobsSettings())
    await submit(client, job("stuck"), "stuck")
    took = await client.jetstream().pull_subscribe(  # the old consumer, and its dead holders
        subjects.JOBS_SUBMIT,
        durable=subjects.JOBS_CONSUMER,
        config=nats.js.api.ConsumerConfig(ack_wait=1, max_deliver=2, max_ack_pending=-1),
    )
    for delivery in (1, 2):
        [taken] = await took.fetch(1, timeout=5)
        assert taken.metadata.num_delivered == delivery
    await took.unsubscribe()
    await lifeline({**config({"main": fake()}), "jobs": {"ack_wait_s": 1}})
    reply = await result_of(client, "stuck", timeout_s=15)  # after its ack wait, at most
    assert (reply.status, reply.content) == ("ok", "hello")
    [(_, event)] = await audit.wait_for(1)
    assert (event.id, event.status) == ("stuck", "ok")


async def test_a_dispatcher_killed_in_a_jobs_last_delivery_leaves_one_result_and_event(
    client, nats_url, tmp_path, audit
):
    """Real processes: the job's one delivery (jobs.max_deliver = 1) is under way at a slow
    provider when its dispatcher is SIGKILLed. Another dispatcher gets it after its ack wait,
    makes no provider call, and ends it: one dead letter, one result (the error, stored and
    pushed), one audit event, live and kept."""
    import signal

    from helpers import Service
    from test_jobs import kept_audit_events

    from service.config import JobsSettings
    from service.jobstore import ensure_jobs

    data = config({"slow": fake(latency_ms=30_000)})
    data["jobs"] = {"ack_wait_s": 1, "max_deliver": 1}
    service = Service(tmp_path, nats_url, data)
    try:
        _, doomed = service.start_all(["slow"], dispatchers=1)
        await ensure_jobs(client.jetstream(), JobsSettings())
        calls = await client.subscribe(subjects.provider_subject("slow"))
        dead = await client.subscribe(subjects.JOBS_DEAD)
        notified = await client.subscribe("results.cut")
        await submit(client, job("cut", timeout_s=60), "cut", **{subjects.NOTIFY: "results.cut"})
        await calls.next_msg(timeout=10)  # its one delivery is at the provider
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait()
        service.dispatcher()
        letter = await dead.next_msg(timeout=15)
        assert "died or stopped while running it" in letter.headers[subjects.JOB_ERROR]
        pushed = reply_decoder.decode((await notified.next_msg(timeout=5)).data)
        assert (pushed.id, pushed.error.type) == ("cut", "internal")
        assert await result_of(client, "cut") == pushed
        [(_, event)] = await audit.wait_for(1)
        assert (event.id, event.error_type) == ("cut", "internal")
        assert [e.id for e in await kept_audit_events(client, 1)] == ["cut"]
        assert calls.pending_msgs == 0  # the second dispatcher called nobody
    finally:
        service.stop()
