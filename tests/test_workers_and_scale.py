"""The provider-worker protocol as another language would see it, and scale-out by queue groups."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time

import nats
import pytest
from helpers import USER_HELLO, Ledger, ask, config, fake, free_port, settled, wait_for

from schemas import subjects
from schemas.wire import encoder, provider_reply_decoder
from service.app import connect
from service.natsio import ensure_subscribed

PROVIDER_REQUEST = {"id": "r1", "messages": USER_HELLO["messages"]}


async def test_a_worker_answers_the_documented_provider_protocol(lifeline, client):
    await lifeline(config({"primary": fake(model="m", reply="yes")}))
    msg = await client.request(
        subjects.provider_subject("primary"), encoder.encode(PROVIDER_REQUEST), timeout=5
    )
    raw = msg.data
    assert b'"status":"ok"' in raw
    reply = provider_reply_decoder.decode(raw)
    assert (reply.content, reply.model) == ("yes", "m")


async def test_a_worker_answers_a_malformed_provider_request_with_bad_request(lifeline, client):
    await lifeline(config({"primary": fake()}))
    msg = await client.request(subjects.provider_subject("primary"), b"{nope", timeout=5)
    reply = provider_reply_decoder.decode(msg.data)
    assert (reply.kind, "invalid ProviderRequest" in reply.message) == ("bad_request", True)


async def test_a_worker_drops_work_whose_deadline_has_passed(lifeline, client, caplog):
    stack = await lifeline(config({"primary": fake()}))
    worker = stack.workers["primary"]
    for late_s in (0.5, 5, 7):  # a little late, then as late as a clock 5 s ahead makes it
        past = {subjects.DEADLINE_MS: str(int((time.time() - late_s) * 1000))}
        with pytest.raises(nats.errors.TimeoutError):
            await client.request(
                subjects.provider_subject("primary"),
                encoder.encode(PROVIDER_REQUEST),
                timeout=0.3,
                headers=past,
            )
    assert (worker.in_flight, worker.expired, worker.tally.requests) == (0, 3, 3)
    # The second request over a second late comes within the minute: one warning, not two.
    warnings = [r.getMessage() for r in caplog.records if "past their deadline" in r.message]
    assert len(warnings) == 1
    assert "dropped 1 request(s) that arrived over 1 s past their deadline" in warnings[0]
    assert re.search(r"the last 5\.\d s past", warnings[0]), warnings[0]
    assert "clock runs ahead" in warnings[0]


async def test_a_worker_answers_timeout_when_its_deadline_comes_first(lifeline, client):
    """Someone still listening past the attempt's deadline hears why: the call timed out."""
    stack = await lifeline(config({"primary": fake(hang=True)}))
    soon = {subjects.DEADLINE_MS: str(int(time.time() * 1000) + 300)}
    msg = await client.request(
        subjects.provider_subject("primary"), encoder.encode(PROVIDER_REQUEST), 5, headers=soon
    )
    reply = provider_reply_decoder.decode(msg.data)
    assert reply.kind == "timeout" and "did not answer within" in reply.message
    assert stack.workers["primary"].in_flight == 0 and stack.workers["primary"].cancelled == 0


async def _a_call_at_work(client, stack, attempt: str, deadline_in_ms: int) -> list[bytes]:
    """Send the hung `primary` worker a call with this attempt id and deadline, straight (no
    dispatcher); once it is at work, the replies it will send (a list, filled as they come)."""
    replies: list[bytes] = []

    async def on_reply(msg: nats.aio.msg.Msg) -> None:
        replies.append(msg.data)

    inbox = client.new_inbox()
    await client.subscribe(inbox, cb=on_reply)
    headers = {
        subjects.DEADLINE_MS: str(int(time.time() * 1000) + deadline_in_ms),
        subjects.ATTEMPT_ID: attempt,
    }
    await client.publish(
        subjects.provider_subject("primary"), encoder.encode(PROVIDER_REQUEST), inbox, headers
    )
    await wait_for(lambda: stack.workers["primary"].in_flight == 1)
    return replies


async def test_a_cancelled_call_gets_no_reply_even_past_its_deadline(lifeline, client):
    """A cancel is not a timeout: the worker stops and answers nothing."""
    stack = await lifeline(config({"primary": fake(hang=True)}))
    replies = await _a_call_at_work(client, stack, "a-1", deadline_in_ms=300)
    await client.publish(subjects.cancel_subject("primary"), b"a-1")
    await wait_for(lambda: stack.workers["primary"].cancelled == 1)
    await asyncio.sleep(0.5)  # past the deadline: a timeout reply would have come by now
    await settled(client, stack)
    assert replies == [] and stack.workers["primary"].in_flight == 0


async def test_a_cancel_stops_a_call_whose_attempt_id_is_over_64_bytes(lifeline, client):
    """The cancel's body was cut to 64 bytes and looked up among calls kept under their whole
    id: a longer id (another dispatcher's, a test harness's) was never cancelled."""
    stack = await lifeline(config({"primary": fake(hang=True)}))
    attempt = "attempt-" + "7" * 92  # 100 bytes
    replies = await _a_call_at_work(client, stack, attempt, deadline_in_ms=30_000)
    await client.publish(subjects.cancel_subject("primary"), attempt.encode())
    await wait_for(lambda: stack.workers["primary"].cancelled == 1, what="the call cancelled")
    await settled(client, stack)
    assert replies == [] and stack.workers["primary"].in_flight == 0  # cancelled: silent


async def test_a_worker_cancels_a_hung_call_when_the_dispatcher_gives_up(lifeline, client):
    stack = await lifeline(config({"primary": fake(hang=True, timeout_s=0.2), "backup": fake()}))
    reply = await ask(client, USER_HELLO)
    assert reply.provider == "backup"
    # The worker got the same deadline and cancelled its call: nothing keeps running unseen.
    await wait_for(lambda: not stack.workers["primary"].in_flight, timeout_s=2)


async def test_a_worker_stopping_cuts_its_calls_short_after_its_grace_and_the_dispatcher_falls_back(
    lifeline, client
):
    stack = await lifeline(config({"primary": fake(latency_ms=20_000), "backup": fake()}))
    primary = stack.workers["primary"]
    asking = asyncio.ensure_future(ask(client, {**USER_HELLO, "timeout_s": 60}))
    await wait_for(lambda: primary.in_flight == 1, timeout_s=5)
    await primary.stop(grace_s=0.1)
    reply = await asyncio.wait_for(asking, 5)
    assert (reply.status, reply.provider) == ("ok", "backup")
    assert [(a.provider, a.outcome) for a in reply.attempts] == [
        ("primary", "no_responders"),
        ("backup", "ok"),
    ]
    assert "stopped (its shutdown grace ran out)" in (reply.attempts[0].message or "")


async def test_a_worker_at_its_max_in_flight_refuses_at_once_and_the_dispatcher_falls_back(
    lifeline, client
):
    cfg = config({"busy": fake(latency_ms=1000, max_in_flight=2), "backup": fake()})
    stack = await lifeline(cfg)
    replies = await asyncio.gather(*(ask(client, {**USER_HELLO, "id": f"b{i}"}) for i in range(5)))
    served = sorted(r.provider for r in replies)
    assert served == ["backup"] * 3 + ["busy"] * 2
    refused = [r.attempts[0] for r in replies if r.provider == "backup"]
    assert {a.error_type for a in refused} == {"rate_limit"}
    assert "max_in_flight" in (refused[0].message or "")
    busy = stack.workers["busy"]
    assert (busy.tally.requests, busy.tally.errors, busy.in_flight) == (5, 3, 0)


async def test_a_worker_holds_long_prompts_to_its_byte_bound_and_the_dispatcher_falls_back(
    lifeline, client
):
    """A worker's calls come from every dispatcher, each within its own byte bound: a
    worker's memory is held to providers.<name>.max_in_flight_bytes too (a call costs about
    twice its bytes). Past it a call is refused rate_limit at once and the chain falls back;
    a call arriving with nothing else in flight is always taken."""
    cfg = config(
        {"busy": fake(latency_ms=1500, max_in_flight_bytes=1_000_000), "backup": fake()},
        max_in_flight_bytes=100_000_000,
    )
    stack = await lifeline(cfg)
    text = "x" * 200_000
    replies = await asyncio.gather(
        *(
            ask(client, {"id": f"long-{i}", "messages": [{"role": "user", "content": text}]})
            for i in range(8)
        )
    )
    served = sorted(r.provider for r in replies)
    assert served == ["backup"] * 4 + ["busy"] * 4  # 4 x 200 KB fit in 1 MB; the fifth would not
    refused = [r.attempts[0] for r in replies if r.provider == "backup"]
    assert {a.error_type for a in refused} == {"rate_limit"}
    assert "providers.busy.max_in_flight_bytes" in (refused[0].message or "")
    busy = stack.workers["busy"]
    assert (busy.in_flight, busy._bytes) == (0, 0)  # all given back

    busy.max_in_flight_bytes = 1_000  # smaller than the call itself
    reply = await ask(client, {"id": "alone", "messages": [{"role": "user", "content": text}]})
    assert reply.provider == "busy"  # nothing else in flight: taken


async def test_worker_replicas_share_the_load_of_one_provider(lifeline, client):
    first = await lifeline(config({"primary": fake()}))
    second = await lifeline(config({"primary": fake()}), workers=["primary"])
    await asyncio.gather(*(ask(client, USER_HELLO) for _ in range(40)))
    served = [s.components[0].nc.stats["in_msgs"] for s in (first, second)]
    assert sum(served) >= 40 and min(served) > 0


async def test_several_dispatchers_share_requests_and_each_is_answered_once(
    lifeline, client, audit
):
    stacks = [await lifeline(config({"primary": fake()})) for _ in range(2)]
    replies = await asyncio.gather(*(ask(client, {**USER_HELLO, "id": f"r{i}"}) for i in range(40)))
    assert sorted(r.id for r in replies) == sorted(f"r{i}" for i in range(40))
    await audit.wait_for(40)
    await settled(client, *stacks)
    assert len(audit.events) == 40
    handled = [s.components[-1].nc.stats["in_msgs"] for s in stacks]
    assert min(handled) > 0


async def test_a_dispatcher_stopping_answers_every_request_it_had_already_received(
    lifeline, client
):
    stack = await lifeline(config({"primary": fake(latency_ms=50)}, max_in_flight=100))
    ledger = await Ledger(client).start()
    ids = [f"s{i}" for i in range(3000)]
    for request_id in ids:
        await ledger.send(request_id, encoder.encode({**USER_HELLO, "id": request_id}))
    await ensure_subscribed(client)  # two flushes: every request has reached the server
    await stack.dispatcher.stop()  # with most of them still queued inside nats-py
    await ensure_subscribed(client)  # any "no responders" has come back by now
    heard = [i for i in ids if i not in ledger.unheard]
    await ledger.settle(len(heard), len(heard), quiet_s=0.1)
    await settled(client)
    ledger.assert_exactly_once(
        heard
    )  # none dropped from the queue: a reply and an audit event each


async def test_long_prompts_meet_the_byte_bound_before_the_request_bound(lifeline, client):
    """max_in_flight counts requests; a burst of long prompts is held to
    max_in_flight_bytes too (what they cost in memory), refused overloaded past it, each
    answered once. A request arriving with nothing else in flight is always taken."""
    stack = await lifeline(
        config({"slow": fake(latency_ms=1500)}, max_in_flight=100, max_in_flight_bytes=1_000_000)
    )
    ledger = await Ledger(client).start()
    text = "x" * 200_000
    ids = [f"long-{n}" for n in range(10)]
    for request_id in ids:
        payload = encoder.encode(
            {"id": request_id, "messages": [{"role": "user", "content": text}]}
        )
        await ledger.send(request_id, payload)
    await ledger.settle(len(ids), len(ids))
    ledger.assert_exactly_once(ids)
    served = [i for i in ids if ledger.reply_of[i].status == "ok"]
    refused = [ledger.reply_of[i].error for i in ids if ledger.reply_of[i].status != "ok"]
    assert len(served) == 4  # 4 x 200 KB fit in 1 MB; the fifth would not
    assert all(e.type == "overloaded" and e.retry_after_s for e in refused)
    assert "dispatcher.max_in_flight_bytes" in refused[0].message
    assert stack.dispatcher._bytes == 0  # all given back

    huge = encoder.encode({**USER_HELLO, "id": "alone", "metadata": {"pad": "y" * 500_000}})
    stack.dispatcher.max_in_flight_bytes = 1_000  # smaller than the request itself
    await ledger.send("alone", huge)
    await ledger.settle(len(ids) + 1, len(ids) + 1)
    assert ledger.reply_of["alone"].status == "ok"  # nothing else in flight: taken


async def test_a_cluster_url_with_one_server_down_connects_without_a_warning(
    nats_url, caplog, monkeypatch
):
    """A service given a cluster's URLs, the first of them down, logged "cannot reach NATS at
    <every URL>; waiting for it ... start nats-server there" at each start, then served from
    the next server a moment later: one reachable server is enough, as the README says."""
    monkeypatch.setattr("nats.aio.client.shuffle", lambda pool: None)  # the down one first
    caplog.set_level("DEBUG", logger="lifeline")
    down = f"nats://127.0.0.1:{free_port()}"
    nc = await connect(f"{down},{nats_url}", "lifeline-dispatcher")
    try:
        assert nc.is_connected
    finally:
        await nc.close()
    refused = [r for r in caplog.records if "ConnectionRefusedError" in r.getMessage()]
    assert refused, "the down server was never tried: nothing shown"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_cluster_url_with_every_server_down_says_it_waits(caplog):
    """Only when every server of the list has refused is the service waiting for NATS."""
    urls = ",".join(f"nats://127.0.0.1:{free_port()}" for _ in range(2))
    task = asyncio.ensure_future(connect(urls, "lifeline-dispatcher"))
    try:
        await wait_for(lambda: any("waiting for it" in r.getMessage() for r in caplog.records))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    waiting = [r for r in caplog.records if "waiting for it" in r.getMessage()]
    assert len(waiting) == 1 and waiting[0].levelno == logging.WARNING
