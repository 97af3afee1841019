"""Health-aware and latency-aware routing over a real nats-server: circuit breakers (shared by
dispatcher processes through JetStream KV), hedged requests, and the hedge and retry budgets.

Failures come from fault injection (the dispatcher simulates them), so the same provider
can fail in one request and answer in the next, the way an outage comes and goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import time
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import nats
import nats.js.errors
import pytest
from helpers import (
    USER_HELLO,
    DeliveryProxy,
    LocalHTTPServer,
    ask,
    fake,
    run_lifeline,
    serving,
    spawn_lifeline,
    wait_for,
    wait_for_line,
    write_config,
)
from test_provider_streaming import openai_events

from schemas.wire import CompletionRequest
from service.app import start_stack
from service.client import stream_text
from service.config import parse_config
from service.embedded import EmbeddedNats
from service.health import CLOSED, MIN_SAMPLES, OPEN, PROBE, Health, bucket_ms, bucket_of
from service.shared_health import BucketStore, breaker_key, read_bucket


def outcomes(reply) -> list[tuple]:
    return [(a.target, a.outcome, a.error_type or a.reason) for a in reply.attempts]


def breaker_config(breaker: dict[str, Any] | None = None, **route: Any) -> dict[str, Any]:
    return {
        "providers": {"a": fake(reply="from a", fail_on_request=True), "b": fake(reply="from b")},
        "dispatcher": {"allow_fault_injection": True},
        "breaker": {"consecutive_failures": 2, "cooldown_s": 0.3, **(breaker or {})},
        "routes": {"default": {"targets": ["a", "b"], **route}},
    }


def asking_to_fail(status: int) -> dict[str, Any]:
    """A request that a (configured with fail_on_request) really fails, through its worker."""
    return {"messages": [{"role": "user", "content": f"fail {status}"}]}


FAIL_A = asking_to_fail(503)


# ---- a breaker's life ------------------------------------------------------------------


async def test_a_breaker_opens_skips_probes_and_closes(lifeline, client, audit):
    stack = await lifeline(breaker_config())
    health = stack.dispatcher.health
    for _ in range(2):  # two failures in a row open it
        reply = await ask(client, FAIL_A)
        assert outcomes(reply) == [("a", "error", "server_error"), ("b", "ok", None)]
    assert health.of("a", "fake-1").state == OPEN

    reply = await ask(client, USER_HELLO)  # a is skipped at once, without a call
    assert outcomes(reply) == [("a", "skipped", "circuit_open"), ("b", "ok", None)]
    assert "2 failures in a row" in (reply.attempts[0].message or "")
    events = await audit.wait_for(3)
    assert [(a.outcome, a.reason) for a in events[2][1].attempts] == [
        ("skipped", "circuit_open"),
        ("ok", None),
    ]

    await wait_for(
        lambda: health.admit("a", "fake-1") == PROBE
    )  # the cooldown ends: the next request probes a
    reply = await ask(client, USER_HELLO)
    assert outcomes(reply) == [("a", "ok", None)]
    assert health.of("a", "fake-1").state == CLOSED
    assert (await ask(client, USER_HELLO)).provider == "a"


async def test_a_failed_probe_opens_the_breaker_for_another_cooldown(lifeline, client):
    stack = await lifeline(breaker_config())
    for _ in range(2):
        await ask(client, FAIL_A)
    await wait_for(lambda: stack.dispatcher.health.admit("a", "fake-1") == PROBE)
    reply = await ask(client, FAIL_A)  # the probe fails
    assert outcomes(reply) == [("a", "error", "server_error"), ("b", "ok", None)]
    assert stack.dispatcher.health.of("a", "fake-1").state == OPEN
    assert outcomes(await ask(client, USER_HELLO))[0] == ("a", "skipped", "circuit_open")


async def test_the_failure_rate_over_the_window_opens_it_too(lifeline, client):
    await lifeline(
        breaker_config({"consecutive_failures": 100, "failure_rate": 0.5, "min_requests": 6})
    )
    for request in [USER_HELLO, FAIL_A] * 3:  # never two in a row, but half of six
        await ask(client, request)
    assert outcomes(await ask(client, USER_HELLO))[0] == ("a", "skipped", "circuit_open")


async def test_the_last_target_left_is_called_even_when_its_breaker_is_open(lifeline, client):
    await lifeline(breaker_config())
    for _ in range(2):
        await ask(client, FAIL_A)
    reply = await ask(client, {**USER_HELLO, "targets": ["a"]})
    assert outcomes(reply) == [("a", "ok", None)]  # better a call than a certain error


async def test_failures_that_are_the_requests_fault_do_not_open_it(lifeline, client):
    await lifeline(breaker_config())
    for _ in range(4):
        await ask(client, asking_to_fail(400))
    assert (await ask(client, USER_HELLO)).provider == "a"


async def test_settings_per_route_and_per_target(lifeline, client):
    config = breaker_config()
    config["routes"] = {
        "tolerant": {"targets": ["a", "b"], "breaker": {"consecutive_failures": 3}},
        "off": {
            "targets": [
                {"provider": "a", "name": "a-unguarded", "breaker": {"enabled": False}},
                "b",
            ]
        },
    }
    stack = await lifeline(config)
    for _ in range(2):
        await ask(client, {**FAIL_A, "route": "tolerant"})
    assert stack.dispatcher.health.of("a", "fake-1").state == CLOSED  # the route asks for 3
    for _ in range(3):
        await ask(client, {**FAIL_A, "route": "off"})
    reply = await ask(client, {**USER_HELLO, "route": "off"})
    assert outcomes(reply) == [("a-unguarded", "ok", None)]  # never skipped: no breaker


# ---- shared state ----------------------------------------------------------------------


@pytest.fixture
def second_dispatcher(tmp_path, nats_url):
    """`lifeline dispatcher` in its own process, on the same NATS and config (a 30 s cooldown)."""
    path = write_config(tmp_path / "lifeline.toml", breaker_config({"cooldown_s": 30}))
    proc = spawn_lifeline(
        "dispatcher",
        "--config",
        str(path),
        "--nats-url",
        nats_url,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_line(
            proc, "dispatcher serving", stream=proc.stderr
        )  # it logs this once subscribed
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        proc.stderr and proc.stderr.close()


async def test_two_dispatcher_processes_share_one_breaker_state(
    lifeline, client, second_dispatcher
):
    stack = await lifeline(breaker_config({"cooldown_s": 30}))
    kv = await client.jetstream().key_value("lifeline_health")
    # The breaker opens in whichever dispatcher sees a failure twice (each counts its own);
    # the other one learns it from the bucket.
    async with asyncio.timeout(10):
        while (await _state(kv)) != OPEN:
            await asyncio.gather(*(ask(client, FAIL_A) for _ in range(2)))
    # Both have it open before the test goes on: this one (opened here or adopted from the
    # bucket), and the other process (which adopts it quietly), once every request of a batch
    # both serve skips it.
    health = stack.dispatcher.health.of("a", "fake-1")
    await wait_for(lambda: health.state == OPEN)
    async with asyncio.timeout(10):
        while True:
            batch = await asyncio.gather(*(ask(client, USER_HELLO) for _ in range(20)))
            if {outcomes(r)[0] for r in batch} == {("a", "skipped", "circuit_open")}:
                break
    skipped_here = health.skipped
    replies = await asyncio.gather(*(ask(client, USER_HELLO) for _ in range(40)))
    assert {outcomes(r)[0] for r in replies} == {("a", "skipped", "circuit_open")}
    assert 0 < health.skipped - skipped_here < 40  # both processes served some, and both skipped a


async def _state(kv) -> str | None:
    try:
        entry = await kv.get(breaker_key("a", "fake-1"))
    except nats.js.errors.KeyNotFoundError:
        return None
    return json.loads(entry.value)["state"]


async def test_a_breaker_another_replica_opened_is_adopted_and_its_close_too(
    lifeline, client, nats_url, tracers
):
    first = await lifeline(breaker_config({"cooldown_s": 0.3}))
    second = await start_stack(
        parse_config(breaker_config({"cooldown_s": 0.3})), nats_url, tracers, workers=[]
    )
    both = [first.dispatcher.health.of("a", "fake-1"), second.dispatcher.health.of("a", "fake-1")]
    try:
        async with asyncio.timeout(10):
            while not all(h.state == OPEN for h in both):  # opened by one, adopted by the other
                await ask(client, FAIL_A)
                await asyncio.sleep(0.01)
            await wait_for(lambda: first.dispatcher.health.admit("a", "fake-1") == PROBE)
            while not all(
                h.state == CLOSED for h in both
            ):  # one replica's probe closes it for both
                await ask(client, USER_HELLO)
                await asyncio.sleep(0.01)
    finally:
        await second.stop()
    # One replica closed it on its own probe; the other adopted that close from the bucket.
    assert [h.reason for h in both] == ["a probe got an answer"] * 2


async def test_the_last_target_called_through_its_open_breaker_does_not_reopen_it_each_time(
    lifeline, client, caplog
):
    """A route whose only target is down: each request still calls it (a call that might work
    beats a certain error), but each failure opened the open breaker again, a warning line and
    a write to the shared bucket per request, for as long as the outage lasted."""
    caplog.set_level(logging.INFO, "lifeline.health")
    config = breaker_config({"cooldown_s": 30})
    config["routes"] = {"default": {"targets": ["a"]}}
    stack = await lifeline(config)
    for _ in range(12):
        reply = await ask(client, FAIL_A)
        assert outcomes(reply) == [("a", "error", "server_error")]  # called anyway, each time
    opened = [r for r in caplog.records if "opened" in r.getMessage()]
    assert len(opened) == 1, [r.getMessage() for r in opened]
    assert stack.dispatcher.health.of("a", "fake-1").state == OPEN
    reply = await ask(client, USER_HELLO)  # and one that works closes it
    assert outcomes(reply) == [("a", "ok", None)]
    assert stack.dispatcher.health.of("a", "fake-1").state == CLOSED


async def test_without_jetstream_a_dispatcher_says_so_and_uses_its_own_view(tracers, caplog):
    caplog.set_level(logging.WARNING, "lifeline.health")
    with EmbeddedNats(port=-1, jetstream=False) as server:
        stack = await start_stack(parse_config(breaker_config()), server.url, tracers)
        nc = await nats.connect(server.url)
        try:
            for _ in range(2):
                await ask(nc, FAIL_A)
            assert outcomes(await ask(nc, USER_HELLO))[0] == ("a", "skipped", "circuit_open")
        finally:
            await nc.close()
            await stack.stop()
    assert any(
        "shared health unavailable" in r.message
        and "own view" in r.message
        and "is JetStream on (nats-server -js)" in r.message  # what to do about it
        for r in caplog.records
    )


# ---- hedging ---------------------------------------------------------------------------


def hedge_config(**route: Any) -> dict[str, Any]:
    return {
        "providers": {"slow": fake(reply="slow", latency_ms=3000), "fast": fake(reply="fast")},
        "routes": {"default": {"targets": ["slow", "fast"], "hedge_after_ms": 50, **route}},
    }


async def test_a_hedge_wins_over_a_slow_target_and_the_slow_call_is_cancelled(
    lifeline, client, audit, exporter
):
    # Only the cancel ends slow's call within the bounds below: not its answer, its timeout_s
    # nor the request's.
    config = hedge_config()
    config["providers"]["slow"] = fake(reply="slow", latency_ms=600_000, timeout_s=600)
    stack = await lifeline(config)
    reply = await ask(client, {**USER_HELLO, "timeout_s": 600}, timeout_s=30)
    assert reply.content == "fast"
    assert [(a.target, a.outcome, a.reason, a.hedge) for a in reply.attempts] == [
        ("slow", "cancelled", "hedge_lost", False),
        ("fast", "ok", None, True),
    ]
    slow = stack.workers["slow"]
    await wait_for(lambda: slow.cancelled == 1 and slow.in_flight == 0, timeout_s=30)
    [(_, event)] = await audit.wait_for(1)
    assert [a.outcome for a in event.attempts] == ["cancelled", "ok"]
    [request] = [s for s in exporter.get_finished_spans() if s.name == "chat"]
    [hedge] = [e for e in request.events if e.name == "lifeline.hedge"]
    assert (hedge.attributes["lifeline.hedge.from"], hedge.attributes["lifeline.hedge.to"]) == (
        "slow",
        "fast",
    )


async def test_a_fast_first_target_is_never_hedged(lifeline, client):
    config = hedge_config(hedge_after_ms=2000)
    config["providers"]["slow"] = fake(reply="slow", latency_ms=20)
    await lifeline(config)
    reply = await ask(client, USER_HELLO, timeout_s=5)
    assert outcomes(reply) == [("slow", "ok", None)]  # a hedge would show as a cancelled attempt


async def test_hedge_p95_waits_for_the_targets_recent_p95(lifeline, client):
    config = hedge_config(hedge="p95")
    del config["routes"]["default"]["hedge_after_ms"]
    config["providers"]["slow"] = fake(reply="slow", latency_ms=20)
    stack = await lifeline(config)
    slowest_ms = 0.0  # of the whole requests, each at least as long as its call to slow
    for n in range(25):  # a history of ~20 ms answers; no hedging before there is one
        reply = await ask(client, USER_HELLO)
        slowest_ms = max(slowest_ms, reply.latency_ms)
        if n < MIN_SAMPLES:
            assert outcomes(reply) == [("slow", "ok", None)]
        else:  # now the slowest ~5% may be hedged at the p95, as asked
            assert reply.status == "ok"
    # The p95 is recomputed at most 4 times a second: one computed before the 20th answer may
    # stand for up to 0.25 s (25 fast answers can come within that).
    health = stack.dispatcher.health
    await wait_for(lambda: health.p95_ms("slow", "fake-1") is not None, timeout_s=5)
    p95_ms = health.p95_ms("slow", "fake-1")
    # Learnt from these answers: at least their 20 ms, at most the slowest of them (as the
    # upper edge of its histogram bucket, which is what a percentile reads), however slow the
    # machine made them; nothing else (a timeout, a cancelled hedge) went into it.
    assert p95_ms is not None and 20 <= p95_ms <= bucket_ms(bucket_of(slowest_ms)), slowest_ms


class _SlowStreams(BaseHTTPRequestHandler):
    """An OpenAI-compatible server whose streams start at once and take over a second to
    finish, but for a request saying "late start", whose first chunk comes 0.8 s late."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        late = body["messages"][-1]["content"] == "late start"
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        time.sleep(0.8 if late else 0)
        for event in openai_events(["one", " two", " three", " four"]):
            self.wfile.write(event.encode())
            self.wfile.flush()
            time.sleep(0.3 if '"content": "' in event else 0)

    def log_message(self, *args: object) -> None:
        pass


async def test_a_stream_is_hedged_at_the_p95_of_first_chunks_not_of_whole_answers(lifeline, client):
    """A stream's race is won by its first chunk. The target's whole answers take over a
    second and its first chunks come at once: a stream whose first chunk is 0.8 s late is
    hedged, where the p95 of whole answers would have left it waiting."""
    with serving(LocalHTTPServer(_SlowStreams), poll_interval_s=0.02) as server:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        config = {
            "providers": {
                "steady": {"kind": "openai", "model": "m", "base_url": url, "api_key_env": ""},
                "fast": fake(reply="fast answer"),
            },
            "routes": {"default": {"targets": ["steady", "fast"], "hedge": "p95"}},
        }
        stack = await lifeline(config)
        history = [stream_text(client, CompletionRequest(**USER_HELLO)) for _ in range(MIN_SAMPLES)]
        for text, reply in await asyncio.gather(*history):
            assert outcomes(reply) == [("steady", "ok", None)] and text == "one two three four"
        health = stack.dispatcher.health
        await wait_for(lambda: health.p95_ms("steady", "m") is not None, timeout_s=5)
        assert health.p95_ms("steady", "m") > 1000  # whole answers: four chunks 0.3 s apart
        late = {"messages": [{"role": "user", "content": "late start"}]}
        text, reply = await stream_text(client, CompletionRequest(**late))
        assert text == "fast answer"
        assert [(a.target, a.outcome, a.reason, a.hedge) for a in reply.attempts] == [
            ("steady", "cancelled", "hedge_lost", False),
            ("fast", "ok", None, True),
        ]


def misconfigured_hedge_config(primary: dict[str, Any]) -> dict[str, Any]:
    """A route a, b, c hedged after 50 ms, whose hedge b has a wrong key: it fails `auth` (not in
    fallback_on) at once, long before a, which takes a second, ends."""
    return {
        "providers": {
            "a": {**primary, "latency_ms": 1000},
            "b": fake(reply="from b", fail_status=401),
            "c": fake(reply="from c"),
        },
        "routes": {
            "default": {
                "targets": ["a", "b", "c"],
                "hedge_after_ms": 50,
                "fallback_on": ["server_error"],
            }
        },
    }


@pytest.mark.parametrize("streamed", [False, True], ids=["complete", "stream"])
async def test_a_hedge_failing_outside_fallback_on_leaves_the_call_it_hedged_to_answer(
    lifeline, client, streamed
):
    """Without the hedge, a would have answered: the hedge's own failure, one that would stop
    the chain, must not cancel a and hand the client b's error instead."""
    stack = await lifeline(misconfigured_hedge_config(fake(reply="from a")))
    if streamed:
        text, reply = await stream_text(client, CompletionRequest(**USER_HELLO))
    else:
        reply = await ask(client, USER_HELLO, timeout_s=10)
        text = reply.content
    assert reply.error is None and text == "from a"
    assert [(a.target, a.outcome, a.error_type, a.hedge) for a in reply.attempts] == [
        ("a", "ok", None, False),
        ("b", "error", "auth", True),
    ]
    assert stack.workers["a"].cancelled == 0


async def test_a_hedges_stopping_failure_ends_the_chain_once_the_call_it_hedged_falls_back(
    lifeline, client
):
    """a fails with a kind that falls back, to b: without the hedge the chain would have called
    b next and stopped at its auth failure. So it stops there, and c is never called."""
    await lifeline(misconfigured_hedge_config(fake(reply="from a", fail_status=503)))
    reply = await ask(client, USER_HELLO, timeout_s=10)
    assert reply.error is not None and reply.error.type == "fallback_stopped"
    assert [(a.target, a.outcome, a.error_type, a.next, a.hedge) for a in reply.attempts] == [
        ("a", "error", "server_error", "fallback", False),
        ("b", "error", "auth", "stop", True),
    ]


@pytest.mark.parametrize(
    "own, streamed",
    [({"timeout_s": 0.02}, False), ({"ttft_s": 0.005}, True)],
    ids=["timeout_s", "ttft_s on a stream"],
)
async def test_time_limits_a_request_sets_on_its_own_target_never_open_the_shared_breaker(
    lifeline, client, own, streamed
):
    """ "Requests cannot change breakers": a client that names its own target with a time limit
    tighter than the provider's pace made it time out each time, and its timeouts opened the
    breaker of a healthy provider for every request of every client."""
    config = {
        "providers": {"a": fake(reply="from a", latency_ms=50), "b": fake(reply="from b")},
        "breaker": {"consecutive_failures": 2, "cooldown_s": 30},
        "routes": {"default": {"targets": ["a", "b"]}},
    }
    stack = await lifeline(config)
    tight = {**USER_HELLO, "targets": [{"provider": "a", **own}, "b"]}
    for _ in range(4):
        if streamed:
            _, reply = await stream_text(client, CompletionRequest(**tight))
        else:
            reply = await ask(client, tight)
        assert outcomes(reply) == [("a", "timeout", "timeout"), ("b", "ok", None)]
    assert stack.dispatcher.health.of("a", "fake-1").state == CLOSED
    assert outcomes(await ask(client, USER_HELLO)) == [("a", "ok", None)]


# ---- budgets under load ----------------------------------------------------------------


async def test_the_hedge_budget_holds_under_load(lifeline, client):
    config = hedge_config(hedge_budget=0.1)
    config["providers"]["slow"] = fake(reply="slow", latency_ms=300)
    await lifeline(config)
    replies = await asyncio.gather(*(ask(client, USER_HELLO, timeout_s=10) for _ in range(80)))
    hedged = sum(1 for r in replies if any(a.hedge for a in r.attempts))
    assert all(r.status == "ok" for r in replies)
    assert 3 <= hedged <= 0.1 * 80 + 3  # the reserve of 3, then one hedge per ten requests at most


async def test_the_retry_budget_holds_under_load_and_the_attempt_says_why(lifeline, client):
    await lifeline(
        {
            "providers": {"a": fake(fail_status=503), "b": fake(reply="b")},
            "routes": {
                "default": {
                    "targets": [{"provider": "a", "retries": 3, "backoff_s": 0}, "b"],
                    "retry_budget": 0.2,
                    "breaker": {"enabled": False},
                }
            },  # else a's breaker would end the retries first
        }
    )
    replies = await asyncio.gather(*(ask(client, USER_HELLO) for _ in range(80)))
    assert all(r.provider == "b" for r in replies)
    retries = sum(1 for r in replies for a in r.attempts if a.retry > 0)
    assert 3 <= retries <= 0.2 * 80 + 3  # without the budget: 3 per request, 240
    denied = [a for r in replies for a in r.attempts if a.reason == "retry_budget"]
    assert denied and all(a.next == "fallback" for a in denied)


# ---- health made visible ---------------------------------------------------------------


async def lifeline_cli(*args: str) -> tuple[int, str, str]:
    done = await asyncio.to_thread(run_lifeline, *args)  # the loop goes on serving meanwhile
    return done.returncode, done.stdout, done.stderr


async def test_lifeline_status_shows_every_breaker_and_recent_figures(lifeline, client, nats_url):
    stack = await lifeline(breaker_config({"cooldown_s": 30}))
    for _ in range(2):
        await ask(client, FAIL_A)
    await ask(client, USER_HELLO)  # skips a
    await stack.dispatcher.health.store.publish_stats()  # it does so every second anyway

    code, out, err = await lifeline_cli("status", "--nats-url", nats_url)
    assert code == 0, err
    assert "1 dispatcher reporting" in out
    [a_line] = [line for line in out.splitlines() if line.startswith("a:fake-1")]
    assert a_line.split()[1:6] == ["open", "2", "0.0%", "0", "-"]
    assert "2 failures in a row (last: server_error); cooldown ends in" in out
    [b_line] = [line for line in out.splitlines() if line.startswith("b:fake-1")]
    assert b_line.split()[1:4] == ["closed", "3", "100.0%"]

    code, out, _ = await lifeline_cli("status", "--nats-url", nats_url, "--json")
    view = json.loads(out)["targets"]
    assert (view["a:fake-1"]["state"], view["a:fake-1"]["failed"], view["a:fake-1"]["skipped"]) == (
        "open",
        2,
        1,
    )


async def test_lifeline_status_shows_the_first_chunk_p50_p95_streams_are_hedged_on(
    lifeline, client, nats_url
):
    """hedge = "p95" on llm.stream waits for the p95 of a target's first chunks, but `lifeline
    status` showed only whole answers' p50/p95: an operator could not see the figure the hedge
    acts on. Its first chunks are summed over every live dispatcher, as the other figures are;
    a target that never streamed shows none."""
    config = {
        "providers": {
            # The first chunk at once, the whole answer 0.6 s later.
            "s": fake(reply="one two three four", chunk_delay_ms=200),
            "c": fake(reply="complete"),
        },
        "routes": {"default": {"targets": ["s"]}, "plain": {"targets": ["c"]}},
    }
    one = await lifeline(config)
    two = await lifeline(config, workers=[])  # a second dispatcher, sharing the bucket
    dispatchers = [one.dispatcher.health, two.dispatcher.health]
    streams = 0
    async with asyncio.timeout(20):  # until each dispatcher served a stream of its own
        while streams < 4 or not all(h.of("s", "fake-1").first_chunks for h in dispatchers):
            text, reply = await stream_text(client, CompletionRequest(**USER_HELLO))
            assert (text, reply.status) == ("one two three four", "ok")
            streams += 1
    assert (await ask(client, {**USER_HELLO, "route": "plain"})).status == "ok"
    for health in dispatchers:
        await health.store.publish_stats()  # each does so every second anyway

    code, out, _ = await lifeline_cli("status", "--nats-url", nats_url, "--json")
    assert code == 0
    view = json.loads(out)
    assert len(view["dispatchers"]) == 2
    streamed, plain = view["targets"]["s:fake-1"], view["targets"]["c:fake-1"]
    assert sum(streamed["first_chunk_latency"].values()) == streams  # from both dispatchers
    assert streamed["first_chunk_p50_ms"] <= streamed["first_chunk_p95_ms"]
    assert streamed["first_chunk_p95_ms"] < streamed["p50_ms"]  # the chunks 200 ms apart
    assert plain["p95_ms"] is not None
    assert (plain["first_chunk_p50_ms"], plain["first_chunk_p95_ms"]) == (None, None)

    from service.cli import _ms  # how the table writes a figure

    code, out, err = await lifeline_cli("status", "--nats-url", nats_url)
    assert code == 0, err
    header, s_line, c_line = (
        next(line for line in out.splitlines() if line.startswith(start))
        for start in ("PROVIDER:MODEL", "s:fake-1", "c:fake-1")
    )
    columns = [
        (header.index(name) + len(name) - 10, header.index(name) + len(name))
        for name in ("FIRST P50", "FIRST P95")
    ]  # right-aligned, 10 wide
    assert [s_line[a:b].strip() for a, b in columns] == [
        _ms(streamed["first_chunk_p50_ms"]),
        _ms(streamed["first_chunk_p95_ms"]),
    ]
    assert [c_line[a:b].strip() for a, b in columns] == ["-", "-"]


async def test_lifeline_status_says_what_to_do_when_no_dispatcher_shared_anything(nats_url):
    code, _, err = await lifeline_cli("status", "--nats-url", nats_url)
    assert code == 1
    assert "no bucket lifeline_health" in err and "lifeline run" in err


async def test_lifeline_status_on_a_bucket_that_stalls_midway_fails_saying_so(nats_url, client):
    """`lifeline status` listed the bucket's keys, then read each, with no bound on the whole:
    a link that lost the listing's messages partway held it for good (nats-py's listing waits
    without a timeout), and a bucket of many keys took a round trip each. It reads them in
    one pass now, and gives up after --timeout, saying how far it got."""
    kv = await client.jetstream().create_key_value(bucket="lifeline_health")
    for i in range(20):
        await kv.put(f"stats.d{i}", b"{}")
    proxy = DeliveryProxy(nats_url, after=5, loses=True)  # 5 of the listing's 20 deliveries
    try:
        through = await proxy.start()
        code, out, err = await lifeline_cli("status", "--nats-url", through, "--timeout", "1")
    finally:
        await proxy.close()
    assert code == 1 and out == ""
    assert "lifeline: bucket lifeline_health on" in err, err
    assert "did not answer within 1 s (5 key(s) read)" in err, err


async def test_lifeline_status_reads_every_key_when_the_count_outruns_the_keys(nats_url, client):
    """nats-py's key listing asks the server how many keys are still to come, and took "none,
    and none received yet" for an empty bucket: when that answer reached the client before
    the keys did, `lifeline status` printed an empty bucket and exited 0 (seen under load)."""
    kv = await client.jetstream().create_key_value(bucket="lifeline_health")
    for i in range(3):
        stats = {"dispatcher": f"d{i}", "host": "h", "ts_unix_ms": int(time.time() * 1000)}
        await kv.put(f"stats.d{i}", json.dumps(stats).encode())
    proxy = DeliveryProxy(nats_url, after=10**6, loses=False, late=3)
    try:
        through = await proxy.start()
        code, out, err = await lifeline_cli("status", "--nats-url", through, "--json")
    finally:
        await proxy.close()
    assert code == 0, err
    assert proxy.held, "the keys were not held back behind the count"
    assert sorted(d["id"] for d in json.loads(out)["dispatchers"]) == ["d0", "d1", "d2"], out


async def test_status_reads_leave_no_consumers_behind(nats_url, client):
    """Each read of the bucket made a consumer that the server kept for nats-py's default 5
    minutes: `lifeline status` once a second left 300 on the bucket's stream."""
    js = client.jetstream()
    kv = await js.create_key_value(bucket="lifeline_health")
    await kv.put("stats.x", b"{}")
    for _ in range(5):
        assert await read_bucket(client, "lifeline_health", 10) == {"stats.x": b"{}"}
    async with asyncio.timeout(30):  # gone a little after each read
        while (await js.stream_info("KV_lifeline_health")).state.consumer_count:
            await asyncio.sleep(0.2)


async def test_each_metrics_collection_reads_the_health_as_it_was_at_one_moment():
    """The metrics reader collects in its own thread, and read the health there while the
    event loop changed it: one target's figures from before a change, another's from after
    (or a slot's second renewed and its counts not yet cleared). The two targets below are
    always answered in the same step of the loop, so any one moment has them equal."""
    import sys

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from service.telemetry import observe_health

    health = Health()
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    observe_health(meters, health)
    stop = asyncio.Event()

    async def answer_both() -> None:
        while not stop.is_set():
            now = time.monotonic()
            health.of("p", "a").answered(now, 1.0, now)
            health.of("p", "b").answered(now, 1.0, now)
            await asyncio.sleep(0)

    def requests_of_each() -> dict[str, int]:
        return {
            point.attributes["lifeline.health_key"]: point.value
            for rm in reader.get_metrics_data().resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
            if metric.name == "lifeline.target.requests"
            for point in metric.data.data_points
        }

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns often: a read cut by a change is likely
    answering = asyncio.create_task(answer_both())
    try:
        for _ in range(3):  # a snapshot serves a second's collections: three of them
            await asyncio.sleep(1.05)
            seen = await asyncio.to_thread(requests_of_each)
            assert seen["p:a"] == seen["p:b"] > 0, seen
    finally:
        sys.setswitchinterval(interval)
        stop.set()
        await answering
        meters.shutdown()


async def test_breaker_state_and_figures_are_opentelemetry_metrics(nats_url, tracers, client):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    stack = await start_stack(parse_config(breaker_config()), nats_url, tracers, meters=meters)
    try:
        for _ in range(2):
            await ask(client, FAIL_A)
        text, _ = await stream_text(client, CompletionRequest(**USER_HELLO))  # b streams
        assert text == "from b"
        points = {
            (metric.name, point.attributes["lifeline.health_key"]): point.value
            for rm in reader.get_metrics_data().resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
            for point in metric.data.data_points
            if "lifeline.health_key" in point.attributes
        }
    finally:
        await stack.stop()
        meters.shutdown()
    assert points[("lifeline.breaker.state", "a:fake-1")] == 2  # open
    assert points[("lifeline.breaker.state", "b:fake-1")] == 0
    assert points[("lifeline.target.success_rate", "a:fake-1")] == 0.0
    assert points[("lifeline.target.success_rate", "b:fake-1")] == 1.0
    assert points[("lifeline.target.requests", "b:fake-1")] == 3  # two answers and a stream
    assert points[("lifeline.target.latency.p95", "b:fake-1")] > 0
    assert points[("lifeline.target.first_chunk.p95", "b:fake-1")] > 0  # what a hedge waits for
    assert ("lifeline.target.first_chunk.p95", "a:fake-1") not in points  # it never streamed


async def test_with_fallback_off_an_open_first_target_is_still_called(lifeline, client):
    await lifeline(breaker_config())
    for _ in range(2):
        await ask(client, FAIL_A)
    reply = await ask(client, {**USER_HELLO, "fallback": False})
    assert outcomes(reply) == [("a", "ok", None)]  # the only target this request may use


async def test_only_one_replica_sends_the_half_open_probe(
    lifeline, client, nats_url, tracers, monkeypatch
):
    from service import shared_health

    # What is shown is the claim, not its bound: on a loaded 2-core CI machine a claim past
    # its 0.25 s counts the bucket unreachable, and each replica then probes by its own view.
    monkeypatch.setattr(shared_health, "_CLAIM_TIMEOUT_S", 5.0)
    monkeypatch.setattr(shared_health, "_OP_TIMEOUT_S", 5.0)
    config = breaker_config({"cooldown_s": 0.3})
    config["providers"]["a"] = fake(
        reply="from a", latency_ms=300, fail_on_request=True
    )  # the probe is still out when the others arrive
    first = await lifeline(config)
    second = await start_stack(parse_config(config), nats_url, tracers, workers=[])
    both = [first.dispatcher.health, second.dispatcher.health]
    try:
        async with asyncio.timeout(10):
            while not all(h.of("a", "fake-1").state == OPEN for h in both):
                await ask(client, FAIL_A)
        await wait_for(
            lambda: all(h.admit("a", "fake-1") == PROBE for h in both)
        )  # the cooldown is over for both
        replies = await asyncio.gather(*(ask(client, USER_HELLO) for _ in range(12)))
    finally:
        await second.stop()
    first_outcomes = sorted(outcomes(r)[0] for r in replies)
    assert first_outcomes == [("a", "ok", None)] + [("a", "skipped", "circuit_open")] * 11


@contextlib.asynccontextmanager
async def cooled_down(nats_url: str, bucket: str) -> AsyncIterator[tuple[Health, list[float]]]:
    """A Health sharing `bucket`, on a clock the test moves (now[0]), whose breaker for a:m is
    open with its cooldown over: the next call probes."""
    now = [100.0]
    nc = await nats.connect(nats_url)
    health = Health(BucketStore(nc, bucket), clock=lambda: now[0])
    await health.start()
    try:
        assert health.shared, health.store.problem
        target = health.of("a", "m")
        target.state, target.open_until = OPEN, now[0]
        yield health, now
    finally:
        await health.stop()
        await nc.close()


async def test_a_claim_lost_to_this_dispatchers_own_unechoed_write_is_tried_again_soon(nats_url):
    """The bucket's newer revision can be our own write whose echo has not arrived: nobody else
    will announce a probe, so the next claim comes after about a second, not after the whole
    lease."""
    async with cooled_down(nats_url, "claims") as (health, now):
        store = health.store
        key = breaker_key("a", "m")
        value = store._value(health.state_of(health.of("a", "m")))
        stale = await store.kv.put(key, value)
        await store.kv.put(key, value)  # our own later write, its echo not followed yet
        store._revisions[key] = stale
        assert await health.claim("a", "m", lease_s=31) is False
        now[0] += 1.5
        assert health.admit("a", "m") == PROBE  # before: SKIP for the 31 s lease


@pytest.mark.parametrize("how", ["the key deleted", "the bucket's stream purged"])
async def test_a_breaker_key_gone_from_the_bucket_does_not_bench_its_target_for_good(nats_url, how):
    """Every replica claimed the probe over the revision it last saw; once the key was deleted
    (or the stream purged, or its records expired) no claim could succeed, and the target was
    skipped for good while `lifeline status` showed it closed."""
    async with cooled_down(nats_url, "gone") as (health, _):
        store = health.store
        key = breaker_key("a", "m")
        await store.kv.put(key, store._value(health.state_of(health.of("a", "m"))))
        await wait_for(lambda: key in store._revisions)
        if how == "the key deleted":
            await store.kv.delete(key)
        else:
            await store.nc.jetstream().purge_stream("KV_gone")
        claimed = await wait_for(lambda: health.claim("a", "m", lease_s=31), timeout_s=10)
        assert claimed is True


async def test_a_replica_idle_through_a_server_restart_sees_the_new_buckets_breakers():
    """nats-server restarted without its store: the bucket is made anew, and a replica that
    was idle through it must still adopt what another writes there. (Three dispatcher
    processes, two of them idle, missed every record of the new bucket: their watches resumed
    at their old place in the old stream. Each store now watches afresh after a reconnect.)"""
    from service.health import BreakerSettings

    breaker = BreakerSettings(consecutive_failures=2, cooldown_s=30)
    server = EmbeddedNats(port=-1)
    server.start()
    connect = {"max_reconnect_attempts": -1, "reconnect_time_wait": 0.1}
    nc_a, nc_b = (
        await nats.connect(server.url, **connect),
        await nats.connect(server.url, **connect),
    )
    a, b = Health(BucketStore(nc_a, "h")), Health(BucketStore(nc_b, "h"))
    await a.start()
    await b.start()
    try:
        for n in range(8):  # the old stream's sequence moves past where the new one will start
            await a.store.kv.put(breaker_key("q", f"m{n}"), b"{}")
        server.stop()
        server.start()  # the same port, an empty store: the bucket is gone
        await wait_for(lambda: nc_a.is_connected and nc_b.is_connected, timeout_s=15)
        await wait_for(lambda: a.shared and b.shared, timeout_s=15)
        for _ in range(2):
            a.record("p", "m", breaker, False, "server_error")
        assert a.of("p", "m").state == OPEN
        await wait_for(
            lambda: b.targets.get(("p", "m")) is not None and b.of("p", "m").state == OPEN,
            timeout_s=15,
        )
    finally:
        await a.stop()
        await b.stop()
        await nc_a.close()
        await nc_b.close()
        server.stop()


async def test_a_replica_sees_the_breakers_of_a_bucket_deleted_and_made_again(
    nats_url, monkeypatch
):
    """An operator deleted the bucket and it was made again, no connection lost: a replica's
    watch resumed at its old place in the old stream, far past the new one's records, and it
    never heard another replica's breaker again while it said it shared them."""
    from service import shared_health
    from service.health import BreakerSettings

    breaker = BreakerSettings(consecutive_failures=2, cooldown_s=30)
    nc_a, nc_b = await nats.connect(nats_url), await nats.connect(nats_url)
    a, b = Health(BucketStore(nc_a, "h2")), Health(BucketStore(nc_b, "h2"))
    monkeypatch.setattr(shared_health, "_LOOK_EVERY_S", 0.5, raising=False)  # not 5 s
    await a.start()
    await b.start()
    try:
        for n in range(30):  # the old stream's sequence moves past where the new one will start
            await a.store.kv.put(breaker_key("q", f"m{n}"), b"{}")
        js = nc_a.jetstream()
        await js.delete_key_value("h2")
        await js.create_key_value(bucket="h2", history=1)
        await asyncio.sleep(1.5)  # each looks again, and watches the new bucket
        for _ in range(2):
            a.record("p", "m", breaker, False, "server_error")
        await wait_for(
            lambda: b.targets.get(("p", "m")) is not None and b.of("p", "m").state == OPEN,
            timeout_s=10,
        )
    finally:
        await a.stop()
        await b.stop()
        await nc_a.close()
        await nc_b.close()


async def test_the_stats_of_dispatchers_long_gone_are_swept_from_the_bucket(nats_url, monkeypatch):
    """Only a stop deleted a dispatcher's stats document: each one SIGKILLed (or out of
    memory) left its key for good, read by every `lifeline status`."""
    from service import shared_health
    from service.shared_health import STATS_PREFIX, stats_document

    monkeypatch.setattr(shared_health, "_SWEEP_EVERY_S", 0.2, raising=False)
    nc = await nats.connect(nats_url)
    health = Health(BucketStore(nc, "h3"))
    await health.start()
    try:
        kv = health.store.kv
        now_ms = int(time.time() * 1000)
        for name, ts in (("dead", now_ms - 3_600_000), ("alive", now_ms)):
            await kv.put(STATS_PREFIX + name, stats_document(name, "host", ts, {}, 65536))
        await wait_for(lambda: _gone(kv, STATS_PREFIX + "dead"), timeout_s=10)
        assert (await kv.get(STATS_PREFIX + "alive")).value
    finally:
        await health.stop()
        await nc.close()


async def _gone(kv: Any, key: str) -> bool:
    try:
        await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return True
    return False


def test_a_peers_clock_ahead_does_not_stretch_a_cooldown():
    """A replica whose clock ran an hour ahead wrote an open breaker (or a probe's lease)
    ending an hour from now by every other clock: the target was benched for the hour, though
    its cooldown was 2 s."""
    now = [100.0]
    health = Health(clock=lambda: now[0], wall=lambda: 1_000_000.0 + now[0])
    ahead_ms = int((1_000_000.0 + now[0] + 3600) * 1000)
    health.apply(
        "p", "m", OPEN, until_unix_ms=ahead_ms + 2000, reason="5 failures", since_unix_ms=ahead_ms
    )
    assert health.admit("p", "m") != PROBE  # open, for its cooldown
    now[0] += 2.5
    assert health.admit("p", "m") == PROBE  # the cooldown as written, not the hour


async def test_simulated_failures_never_change_the_real_shared_breakers(lifeline, client):
    stack = await lifeline(breaker_config())
    for _ in range(5):  # five simulated 503s: the request that asked for them falls back
        reply = await ask(client, {**USER_HELLO, "faults": {"a": [503]}})
        assert outcomes(reply) == [("a", "error", "server_error"), ("b", "ok", None)]
    assert stack.dispatcher.health.of("a", "fake-1").state == CLOSED
    assert (await ask(client, USER_HELLO)).provider == "a"  # every other client still gets a


async def test_simulated_failures_never_spend_the_retry_budget_of_real_requests(lifeline, client):
    """Simulated 503s retried spent the route's retry budget: a few requests with faults, and
    the next real failure of every other client fell back without its retry (retry_budget)."""
    await lifeline(
        breaker_config(
            {"enabled": False},
            targets=[{"provider": "a", "retries": 1, "backoff_s": 0}, "b"],
            retry_budget=0.2,
        )
    )
    for _ in range(6):  # each retries a simulated 503 once: the reserve of 3, and more
        reply = await ask(client, {**USER_HELLO, "faults": {"a": [503, 503]}})
        assert reply.provider == "b"
    real = await ask(client, FAIL_A)
    assert [(a.target, a.retry, a.reason) for a in real.attempts] == [
        ("a", 0, None),
        ("a", 1, None),  # retried: the budget is the real requests'
        ("b", 0, None),
    ]


async def test_a_simulated_answer_does_not_close_a_really_open_breaker(lifeline, client):
    stack = await lifeline(breaker_config())
    health = stack.dispatcher.health
    for _ in range(2):
        await ask(client, FAIL_A)
    assert health.of("a", "fake-1").state == OPEN
    await wait_for(
        lambda: health.admit("a", "fake-1") == PROBE
    )  # the cooldown is over: the next real call probes
    reply = await ask(
        client, {**USER_HELLO, "faults": {"a": [401]}}
    )  # a 401 is the request's fault: would close it
    assert outcomes(reply)[0] == (
        "a",
        "skipped",
        "circuit_open",
    )  # no probe from a simulated request either
    assert stack.dispatcher.health.of("a", "fake-1").state == OPEN


async def test_a_breaker_opened_while_the_bucket_was_out_of_reach_outlives_its_older_close(
    nats_url,
):
    """The bucket holds an older close; this dispatcher opened the breaker while it could not
    reach the bucket. Back in reach, its open stays (the replayed close is older) and reaches
    the other dispatchers."""
    from service.health import BreakerSettings

    breaker = BreakerSettings(consecutive_failures=2, cooldown_s=30)
    nc_a, nc_b = await nats.connect(nats_url), await nats.connect(nats_url)
    a, b = Health(BucketStore(nc_a, "h")), Health(BucketStore(nc_b, "h"))
    await a.start()
    await b.start()
    try:
        for _ in range(2):  # earlier: b opened it, and its probe closed it again
            b.record("p", "m", breaker, False, "server_error")
        # a hears of the breaker first: a watch brings a key's latest record, not every one (the
        # bucket keeps one a key, and a watch that lags skips what was replaced meanwhile), and a
        # close of a breaker a never heard of is no news (it is closed there already).
        await wait_for(lambda: getattr(a.targets.get(("p", "m")), "state", None) == OPEN, 15)
        b.targets["p", "m"].open_until = 0
        assert await b.claim("p", "m", 31)
        b.record("p", "m", breaker, True, probe=True)
        closed = b.of("p", "m")
        assert closed.state == CLOSED

        def a_saw_the_close() -> bool:
            seen = a.targets["p", "m"]
            return (seen.state, seen.since_unix_ms) == (CLOSED, closed.since_unix_ms)

        await wait_for(a_saw_the_close, timeout_s=15)  # a watch's delivery, on a busy machine
        a.store._degrade(TimeoutError("a put timed out"))  # a loses the bucket a moment
        for _ in range(2):
            a.record("p", "m", breaker, False, "server_error")
        assert a.of("p", "m").state == OPEN
        await a.store._stop_watcher()  # and reconnects, as its maintenance does
        await a.store._connect(a)
        await wait_for(lambda: b.of("p", "m").state == OPEN, timeout_s=15)
        assert a.of("p", "m").state == OPEN
    finally:
        await a.stop()
        await b.stop()
        await nc_a.close()
        await nc_b.close()


def _record(provider: str, model: str, state: str, until_unix_ms: Any, since_unix_ms: Any) -> bytes:
    """A breaker entry as another dispatcher (or any client of the bucket) writes it."""
    return (
        f'{{"provider":"{provider}","model":"{model}","state":"{state}",'
        f'"until_unix_ms":{until_unix_ms},"reason":"peer","since_unix_ms":{since_unix_ms},'
        f'"by":"peer"}}'
    ).encode()


async def test_a_breaker_entry_with_a_number_too_large_for_a_float_is_ignored(lifeline, client):
    """JSON integers have no bound and msgspec decodes them whole: one of 400 digits raised
    OverflowError in Health.apply, which ended the store's watch for good, and the dispatcher
    adopted no other replica's breaker again (while `lifeline status` showed them open)."""
    stack = await lifeline(breaker_config({"cooldown_s": 30}))
    kv = await client.jetstream().key_value("lifeline_health")
    huge = "9" * 400
    await kv.put(breaker_key("x", "y"), _record("x", "y", OPEN, huge, huge))
    now_ms = int(time.time() * 1000)
    await kv.put(breaker_key("a", "fake-1"), _record("a", "fake-1", OPEN, now_ms + 30_000, now_ms))
    await wait_for(lambda: stack.dispatcher.health.of("a", "fake-1").state == OPEN)
    assert outcomes(await ask(client, USER_HELLO))[0] == ("a", "skipped", "circuit_open")


@pytest.mark.parametrize("state", [OPEN, "half_open"])
async def test_an_until_in_year_9999_does_not_bench_a_target_for_good(lifeline, client, state):
    """A breaker entry open (or half-open) until year 9999 since now, as a writer's bug or any
    client of the bucket may put it: every replica skipped the target for 8000 years, none ever
    probed it to write anything newer, and one that restarted adopted it again."""
    stack = await lifeline(
        {**breaker_config({"cooldown_s": 30}), "dispatcher": {"max_timeout_s": 120}}
    )
    health = stack.dispatcher.health
    kv = await client.jetstream().key_value("lifeline_health")
    now_ms = int(time.time() * 1000)
    await kv.put(breaker_key("a", "fake-1"), _record("a", "fake-1", state, 253402300799000, now_ms))
    await wait_for(lambda: health.of("a", "fake-1").state == state)
    assert outcomes(await ask(client, USER_HELLO))[0] == ("a", "skipped", "circuit_open")
    target = health.of("a", "fake-1")
    left_s = (target.open_until if state == OPEN else target.probe_until) - time.monotonic()
    assert left_s <= (3600 if state == OPEN else 121)  # the longest cooldown, or lease


def test_an_adopted_cooldown_or_lease_ends_at_the_longest_one_can_last():
    now = [100.0]
    health = Health(clock=lambda: now[0], wall=lambda: 1_000_000.0 + now[0])
    health.longest_lease_s = 61.0
    since_ms = int((1_000_000.0 + now[0]) * 1000)
    health.apply("p", "open", OPEN, 253402300799000, "peer", since_ms)
    health.apply("p", "probing", "half_open", 253402300799000, "peer", since_ms)
    now[0] += 61.5
    assert health.admit("p", "probing") == PROBE  # the longest lease is over
    assert health.admit("p", "open") != PROBE
    now[0] += 3600
    assert health.admit("p", "open") == PROBE  # the longest cooldown is over


@pytest.mark.parametrize(
    "figures",
    [
        {"latency": {"5": 10**400}},  # p50/p95: 0.5 * count, past a float's range
        {"ok": 10**400, "failed": 1 - 10**400},  # success: ok / (ok + failed)
    ],
)
async def test_lifeline_status_leaves_out_stats_with_counts_past_an_int64(
    lifeline, client, nats_url, figures
):
    """A stats document (another version's, any client's) whose counts no dispatcher could
    write: `lifeline status` ended in an OverflowError traceback, and showed no dispatcher."""
    stack = await lifeline(breaker_config())
    await ask(client, USER_HELLO)
    await stack.dispatcher.health.store.publish_stats()
    kv = await client.jetstream().key_value("lifeline_health")
    document = {
        "dispatcher": "odd",
        "host": "elsewhere",
        "ts_unix_ms": int(time.time() * 1000),
        "targets": {"a:fake-1": {"provider": "a", "model": "fake-1", **figures}},
    }
    await kv.put("stats.odd", json.dumps(document).encode())
    for json_arg in ((), ("--json",)):
        code, out, err = await lifeline_cli("status", "--nats-url", nats_url, *json_arg)
        assert (code, err) == (0, "")
        assert "1 dispatcher reporting" in out or len(json.loads(out)["dispatchers"]) == 1
