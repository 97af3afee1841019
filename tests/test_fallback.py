"""Fallback over a real nats-server: each failure kind moves on to the next provider."""

from __future__ import annotations

import asyncio

from helpers import TIMER_SLACK_MS, USER_HELLO, ask, config, fake, settled

from schemas import ProviderOk, subjects
from schemas.ids import SecretIds
from schemas.wire import encoder, reply_decoder


async def test_first_provider_answers_when_healthy(lifeline, client):
    await lifeline(config({"primary": fake(model="m1", reply="hello"), "backup": fake()}))
    reply = await ask(client, USER_HELLO)
    assert reply.status == "ok"
    assert (reply.content, reply.provider, reply.model) == ("hello", "primary", "m1")
    assert [a.outcome for a in reply.attempts] == ["ok"]
    assert reply.usage is not None and reply.usage.output_tokens == 1


async def test_server_error_falls_back_to_the_next_provider(lifeline, client):
    await lifeline(config({"primary": fake(fail_status=503), "backup": fake(reply="from backup")}))
    reply = await ask(client, USER_HELLO)
    assert (reply.status, reply.content, reply.provider) == ("ok", "from backup", "backup")
    first, second = reply.attempts
    assert (first.outcome, first.error_type, first.status_code) == ("error", "server_error", 503)
    assert second.outcome == "ok"


async def test_rate_limit_falls_back_to_the_next_provider(lifeline, client):
    await lifeline(config({"primary": fake(fail_status=429), "backup": fake()}))
    reply = await ask(client, USER_HELLO)
    assert reply.provider == "backup"
    assert (reply.attempts[0].error_type, reply.attempts[0].status_code) == ("rate_limit", 429)


async def test_hung_provider_falls_back_after_its_own_timeout(lifeline, client):
    await lifeline(config({"primary": fake(hang=True, timeout_s=0.2), "backup": fake()}))
    reply = await ask(client, USER_HELLO)
    assert reply.provider == "backup"
    hung = reply.attempts[0]
    assert (hung.outcome, hung.error_type) == ("timeout", "timeout")
    assert hung.latency_ms >= 200 - TIMER_SLACK_MS  # it waited for the timeout, not less


async def test_no_responders_falls_back_at_once_without_waiting_for_the_timeout(lifeline, client):
    # "ghost" has no worker running and a 60 s timeout: waiting for it would blow the 5 s ask.
    await lifeline(config({"ghost": fake(timeout_s=60), "backup": fake()}), workers=["backup"])
    reply = await ask(client, USER_HELLO, timeout_s=5)
    assert reply.provider == "backup"
    ghost = reply.attempts[0]
    assert (ghost.outcome, ghost.error_type) == ("no_responders", "no_responders")
    assert "lifeline worker ghost" in (ghost.message or "")


async def test_fallback_on_stops_the_chain_on_a_failure_it_does_not_list(lifeline, client):
    routes = {
        "default": {"targets": ["primary", "backup"], "fallback_on": ["rate_limit", "timeout"]}
    }
    await lifeline(config({"primary": fake(fail_status=401), "backup": fake()}, routes))
    reply = await ask(client, USER_HELLO)
    assert reply.status == "error"
    assert reply.error is not None and reply.error.type == "fallback_stopped"
    assert "auth" in reply.error.message and "backup" in reply.error.message
    assert [a.provider for a in reply.attempts] == ["primary"]


async def test_fallback_on_accepts_status_codes(lifeline, client):
    routes = {"default": {"targets": ["primary", "backup"], "fallback_on": [503]}}
    await lifeline(config({"primary": fake(fail_status=503), "backup": fake()}, routes))
    assert (await ask(client, USER_HELLO)).provider == "backup"


async def test_all_failed_lists_every_attempt_with_its_own_error(lifeline, client):
    providers = {
        "a": fake(fail_status=500),
        "b": fake(fail_status=429),
        "c": fake(hang=True, timeout_s=0.1),
        "d": fake(timeout_s=30),
    }
    await lifeline(config(providers), workers=["a", "b", "c"])  # d has no worker
    reply = await ask(client, USER_HELLO)
    assert reply.status == "error" and reply.error is not None
    assert reply.error.type == "all_failed"
    kinds = [(a.provider, a.error_type) for a in reply.attempts]
    assert kinds == [
        ("a", "server_error"),
        ("b", "rate_limit"),
        ("c", "timeout"),
        ("d", "no_responders"),
    ]
    for name in "abcd":
        assert f"{name}:" in reply.error.message


async def test_explicit_targets_override_the_route(lifeline, client):
    await lifeline(config({"primary": fake(reply="p"), "other": fake(reply="o")}))
    reply = await ask(client, {**USER_HELLO, "targets": ["other"]})
    assert (reply.provider, reply.content) == ("other", "o")


async def test_request_timeout_bounds_the_whole_chain(lifeline, client):
    await lifeline(config({"slow": fake(hang=True, timeout_s=30), "backup": fake()}))
    reply = await ask(client, {**USER_HELLO, "timeout_s": 0.3})
    assert reply.status == "error" and reply.error is not None
    assert reply.error.type == "deadline_exceeded"
    assert reply.attempts[0].outcome == "timeout"
    assert "backup" in reply.error.message


async def test_a_late_reply_from_an_abandoned_attempt_is_ignored(lifeline, client, audit):
    # A worker that ignores the deadline header and answers after 300 ms, when the
    # dispatcher gave up at 100 ms: backup serves, and the late answer changes nothing.
    stack = await lifeline(
        config({"primary": fake(timeout_s=0.1), "backup": fake(reply="b")}), workers=["backup"]
    )
    late_sent = asyncio.Event()

    async def late_worker(msg):
        await asyncio.sleep(0.3)
        await msg.respond(encoder.encode(ProviderOk(content="late", model="x")))
        late_sent.set()

    await client.subscribe(subjects.provider_subject("primary"), cb=late_worker)
    inbox = client.new_inbox()
    sub = await client.subscribe(inbox)
    await client.publish(subjects.COMPLETE, encoder.encode(USER_HELLO), reply=inbox)
    first = reply_decoder.decode((await sub.next_msg(timeout=5)).data)
    assert (first.content, first.attempts[0].outcome) == ("b", "timeout")
    await asyncio.wait_for(late_sent.wait(), timeout=5)
    await client.flush()  # the late answer has reached the server, and so the dispatcher next:
    await settled(client, stack)
    assert sub.pending_msgs == 0  # no second reply
    [(_, event)] = audit.events  # and no second audit event
    assert (event.provider, [a.outcome for a in event.attempts]) == ("backup", ["timeout", "ok"])
    assert (
        await ask(client, {**USER_HELLO, "targets": ["backup"]})
    ).content == "b"  # and it serves on


async def test_results_go_to_a_reply_subject_the_caller_consumes_later(lifeline, client):
    """The asynchronous pattern: publish with your own reply subject, consume results there."""
    await lifeline(config({"primary": fake()}))
    results = await client.subscribe("results.billing-service")
    for i in range(3):
        request = {**USER_HELLO, "id": f"job-{i}"}
        await client.publish(
            subjects.COMPLETE, encoder.encode(request), reply="results.billing-service"
        )
    ids = sorted(
        [reply_decoder.decode((await results.next_msg(timeout=5)).data).id for _ in range(3)]
    )
    assert ids == ["job-0", "job-1", "job-2"]


async def test_attempt_ids_cannot_be_guessed_from_one_seen(lifeline, client):
    """A cancel names an attempt id: ids that follow from one another would let anyone who saw
    one cancel the calls after it. Each is 96 random bits."""
    await lifeline(config({"primary": fake()}))
    seen: list[str] = []

    async def spy(msg) -> None:  # a listener beside the worker (no queue group)
        seen.append(msg.headers[subjects.ATTEMPT_ID])

    await client.subscribe(subjects.provider_subject("primary"), cb=spy)
    for _ in range(20):
        assert (await ask(client, USER_HELLO)).status == "ok"
    await client.flush()
    assert len(seen) == 20 and all(len(i) == 24 for i in seen)
    assert len({i[:6] for i in seen}) == 20  # no shared prefix, no counter


def test_secret_ids_stay_random_and_distinct_across_the_batches_they_are_drawn_in():
    ids = SecretIds()
    drawn = [ids.next() for _ in range(1000)]  # about 16 draws from the OS
    assert all(len(i) == 24 and int(i, 16) >= 0 for i in drawn)
    assert len(set(drawn)) == 1000 and len({i[:8] for i in drawn}) > 990


async def test_a_route_named_by_a_model_alias_runs_the_route_or_target_it_stands_for(
    lifeline, client, audit
):
    """An alias worked as a `model` at the gateway only: a framework integration's
    model="gpt-4o-mini" or a batch file's line sent without the config reached the dispatcher
    as an unknown route. The dispatcher takes it as the route it stands for (audited under that
    route's name), or as a target's chain of one."""
    cfg = config({"primary": fake(fail_status=503), "backup": fake(reply="from backup")})
    await lifeline(cfg | {"model_aliases": {"gpt-4o-mini": "default", "gpt-4.1": "primary"}})
    routed = await ask(client, {**USER_HELLO, "route": "gpt-4o-mini", "id": "by-alias"})
    assert (routed.status, routed.provider) == ("ok", "backup")  # the default route's fallback
    assert [a.provider for a in routed.attempts] == ["primary", "backup"]
    targeted = await ask(client, {**USER_HELLO, "route": "gpt-4.1", "id": "by-target-alias"})
    assert [a.provider for a in targeted.attempts] == ["primary"]  # its chain of one
    assert targeted.error.type == "all_failed"
    events = {event.id: event for _, event in await audit.wait_for(2)}
    assert events["by-alias"].route == "default"
    unknown = await ask(client, {**USER_HELLO, "route": "gpt-5"})
    assert unknown.error.message == (
        "unknown route 'gpt-5'; configured routes: ['default']; model aliases: "
        "['gpt-4.1', 'gpt-4o-mini']"
    )
