"""Circuit breakers, recent latencies and budgets, as pure units: no NATS, no sleeps.

service/health.py runs on an injected fake clock (`t[0]`, with a wall clock 1000 s ahead)
and, where its store matters, an in-memory one (MemoryStore) instead of the JetStream bucket;
Budget takes the same kind of clock; run_chain gets a real Health and, for hedging only,
real asyncio time (a 0.01 s hedge delay; no test asserts on durations).
"""

from __future__ import annotations

import asyncio
import time

import pytest
from test_policy import Clock, Script, events, fail, ok, target

from schemas.deadline import Deadline
from service.budgets import Budget, Budgets
from service.health import (
    CALL,
    CLOSED,
    HALF_OPEN,
    MIN_SAMPLES,
    OPEN,
    PROBE,
    SKIP,
    BreakerSettings,
    BreakerState,
    Health,
    TargetHealth,
    bucket_ms,
    bucket_of,
    percentile_ms,
)
from service.policy import Chain, ChainResult, Hedge, Limits, Needs, run_chain

P, M = "p", "m"
FAST = BreakerSettings(consecutive_failures=3, cooldown_s=5.0)
RATE = BreakerSettings(consecutive_failures=100, failure_rate=0.5, min_requests=10, window_s=10.0)


class MemoryStore:
    """A HealthStore in memory: keeps what it is told and answers claims with `answer`."""

    shared = True

    def __init__(self, answer: bool | None = True) -> None:
        self.answer = answer
        self.announced: list[BreakerState] = []
        self.claims: list[BreakerState] = []
        self.started: list[Health] = []

    async def start(self, health: Health) -> None:
        self.started.append(health)

    async def stop(self) -> None:
        self.started.clear()

    def announce(self, breaker: BreakerState) -> None:
        self.announced.append(breaker)

    async def claim(self, breaker: BreakerState) -> bool | None:
        self.claims.append(breaker)
        return self.answer


def make_health(store=None, start: float = 0.0) -> tuple[Health, list[float]]:
    t = [start]
    return Health(store, clock=lambda: t[0], wall=lambda: 1000.0 + t[0]), t


def failures(
    h: Health, n: int, settings=FAST, kind: str = "server_error", status=None, probe=False
) -> None:
    for _ in range(n):
        h.record(P, M, settings, False, kind, status, probe=probe)


def answers(h: Health, n: int, latency_ms: float = 10.0, settings=FAST, probe=False) -> None:
    for _ in range(n):
        h.record(P, M, settings, True, latency_ms=latency_ms, probe=probe)


def opened(store=None, settings=FAST) -> tuple[Health, list[float]]:
    """A Health whose p:m breaker opened at t = 0 after 3 failures in a row (cooldown 5 s)."""
    h, t = make_health(store)
    failures(h, 3, settings)
    return h, t


def admits(h: Health, t: list[float], *times: float) -> list[int]:
    out = []
    for t[0] in times:  # the fake clock moves to each time in turn
        out.append(h.admit(P, M))
    return out


def state(h: Health) -> str:
    return h.of(P, M).state


# ---- the breaker ---------------------------------------------------------------------


def test_consecutive_counted_failures_open_it_and_a_good_answer_restarts_the_count():
    h, t = make_health()
    failures(h, 2)
    answers(h, 1)
    failures(h, 2)
    assert (state(h), admits(h, t, 0.0)) == (CLOSED, [CALL])
    failures(h, 1)
    assert (state(h), admits(h, t, 0.0)) == (OPEN, [SKIP])


async def test_open_skips_until_the_cooldown_then_one_probe_whose_lease_runs_out():
    h, t = opened()
    t[0] = 1.0
    answers(h, 1, probe=False)  # a good answer that was not a probe does not close it
    assert (state(h), admits(h, t, 4.99, 5.0)) == (OPEN, [SKIP, PROBE])
    assert await h.claim(P, M, 2.0) is True
    assert state(h) == HALF_OPEN
    assert admits(h, t, 5.0, 6.99, 7.0) == [
        SKIP,
        SKIP,
        PROBE,
    ]  # others skip; then the lost probe's lease ends


@pytest.mark.parametrize("outcome", ["ok", "bad_request"])
def test_a_probe_that_gets_an_answer_closes_it_and_the_failures_before_no_longer_count(outcome):
    settings = BreakerSettings(
        consecutive_failures=3, failure_rate=0.5, min_requests=4, cooldown_s=5.0
    )
    h, t = opened(settings=settings)
    t[0] = 5.0
    h.claim_locally(P, M, 2.0)
    if outcome == "ok":
        answers(h, 1, settings=settings, probe=True)
    else:  # the request's own fault: the provider did answer
        failures(h, 1, settings, kind=outcome, status=400, probe=True)
    assert (state(h), h.of(P, M).consecutive, admits(h, t, 5.0)) == (CLOSED, 0, [CALL])
    t[0] = 6.0
    failures(
        h, 2, settings
    )  # counting the three before the close, 5 of 6 calls failed: the rate would open it
    assert state(h) == CLOSED


def test_a_failed_probe_reopens_it_for_a_fresh_cooldown():
    h, t = opened()
    t[0] = 5.0
    h.claim_locally(P, M, 2.0)
    t[0] = 6.0
    failures(h, 1, probe=True)
    assert state(h) == OPEN
    assert admits(h, t, 10.99, 11.0) == [SKIP, PROBE]


def test_the_failure_rate_waits_for_min_requests_then_opens_at_its_share():
    h, _ = make_health()
    failures(h, 9, RATE)  # every call failed, but only 9 of them
    assert state(h) == CLOSED
    failures(h, 1, RATE)
    assert state(h) == OPEN
    h, _ = make_health()
    answers(h, 6, settings=RATE)
    failures(h, 5, RATE)  # 5 of 11 < 50%
    assert state(h) == CLOSED
    failures(h, 1, RATE)  # 6 of 12
    assert state(h) == OPEN


@pytest.mark.parametrize(("later_s", "expected"), [(5.0, CLOSED), (11.0, OPEN)])
def test_calls_older_than_window_s_leave_the_failure_rate(later_s, expected):
    h, t = make_health()
    answers(h, 20, settings=RATE)
    t[0] = later_s
    failures(h, 10, RATE)  # within 10 s of the answers: 10 of 30 failed; after: 10 of 10
    assert state(h) == expected


@pytest.mark.parametrize("kind", ["bad_request", "invalid_output"])
def test_only_trip_on_failures_count_and_the_others_break_the_run(kind):
    h, _ = make_health()
    failures(h, 2)
    failures(h, 1, kind=kind, status=400)
    failures(h, 2)
    assert state(h) == CLOSED  # never three counted failures in a row
    failures(h, 9, RATE, kind=kind, status=400)
    failures(h, 1, RATE)  # they count as calls, not failures: 5 of 15 failed
    assert state(h) == CLOSED
    by_status = BreakerSettings(consecutive_failures=2, trip_on=frozenset({503}))
    failures(h, 5, by_status, "server_error", 500)
    assert state(h) == CLOSED
    failures(h, 2, by_status, "server_error", 503)
    assert state(h) == OPEN


@pytest.mark.parametrize("settings", [None, BreakerSettings(enabled=False, consecutive_failures=1)])
def test_without_a_breaker_the_figures_are_kept_but_the_state_never_changes(settings):
    store = MemoryStore()
    h, t = make_health(store)
    failures(h, 10, settings)
    answers(h, 2, settings=settings)
    assert (state(h), admits(h, t, 0.0), store.announced) == (CLOSED, [CALL], [])
    figures = h.snapshot()["p:m"]
    assert (figures["ok"], figures["failed"]) == (2, 10)


# ---- the store: where state changes go, and who sends the probe ----------------------------


def test_the_store_hears_open_close_and_a_local_claim_but_not_another_replicas_state():
    store = MemoryStore()
    h, t = opened(store)  # wall clock: 1000 s
    t[0] = 5.0
    h.claim_locally(P, M, 2.0)
    answers(h, 1, probe=True)
    h.claim_locally(P, M, 2.0, announce=False)
    h.apply(P, M, OPEN, 1_100_000, "told by another replica", 1_005_010)
    assert store.announced == [  # each state after the one before, if in the same millisecond
        BreakerState(P, M, OPEN, 1_005_000, "3 failures in a row (last: server_error)", 1_000_001),
        BreakerState(P, M, HALF_OPEN, 1_007_000, "cooldown over: one probe is out", 1_005_000),
        BreakerState(P, M, CLOSED, 0, "a probe got an answer", 1_005_001),
    ]
    assert state(h) == OPEN


async def test_a_probe_the_store_grants_is_sent_and_not_announced_again():
    store = MemoryStore(answer=True)
    h, t = opened(store)
    t[0] = 5.0
    assert await h.claim(P, M, 2.0) is True
    assert store.claims == [
        BreakerState(P, M, HALF_OPEN, 1_007_000, "cooldown over: one probe is out", 1_005_000)
    ]
    assert [b.state for b in store.announced] == [OPEN]  # the store recorded the claim itself
    assert (state(h), admits(h, t, 5.0, 6.99, 7.0)) == (HALF_OPEN, [SKIP, SKIP, PROBE])


async def test_a_probe_the_store_refuses_is_not_sent_and_is_asked_for_again_a_second_later():
    store = MemoryStore(answer=False)
    h, t = opened(store)
    t[0] = 5.0
    assert await h.claim(P, M, 30.0) is False
    assert [b.state for b in store.announced] == [OPEN]
    assert admits(h, t, 5.0, 5.99, 6.0) == [SKIP, SKIP, PROBE]  # not after the whole 30 s lease


async def test_a_refused_probe_keeps_the_lease_the_store_reports_for_the_dispatcher_holding_it():
    class Beaten(MemoryStore):
        async def claim(self, breaker: BreakerState) -> bool | None:
            [health] = self.started  # another dispatcher's claim arrives while we ask
            health.apply(P, M, HALF_OPEN, 1_020_000, "their probe is out", 1_005_000)
            return False

    h, t = opened(Beaten())
    await h.start()
    t[0] = 5.0
    assert await h.claim(P, M, 2.0) is False
    assert (h.of(P, M).reason, admits(h, t, 6.0, 19.99, 20.0)) == (
        "their probe is out",
        [SKIP, SKIP, PROBE],
    )
    await h.stop()


async def test_a_store_with_no_say_leaves_the_probe_to_this_dispatcher_and_hears_the_claim():
    store = MemoryStore(answer=None)
    h, t = opened(store)
    t[0] = 5.0
    assert await h.claim(P, M, 2.0) is True
    assert [b.state for b in store.announced] == [OPEN, HALF_OPEN]
    assert admits(h, t, 5.0, 7.0) == [SKIP, PROBE]


async def test_health_starts_and_stops_its_store_and_says_whether_it_shares():
    store = MemoryStore()
    h = Health(store)
    await h.start()
    assert (store.started, h.shared, Health().shared) == ([h], True, False)
    await h.stop()
    assert store.started == []
    await Health().start()  # the local store: nothing to start or stop
    await Health().stop()


async def test_a_breaker_opened_claimed_and_closed_in_one_millisecond_closes_at_every_replica():
    """One replica's open, its probe's claim and the probe's close, all in the same millisecond
    (a provider that answers at once): each state still comes after the one before, so a
    replica told them in order ends closed, not half-open (a close no newer than the state it
    finds loses to it, as it must between replicas)."""
    store = MemoryStore(answer=True)
    h, _ = make_health(store)  # the wall clock stands still: one millisecond throughout
    other, _ = make_health()
    failures(h, 3)
    assert await h.claim(P, M, 2.0) is True
    answers(h, 1, probe=True)
    told = [*store.announced[:1], *store.claims, *store.announced[1:]]
    assert [b.state for b in told] == [OPEN, HALF_OPEN, CLOSED]
    opened_at, claimed_at, closed_at = (b.since_unix_ms for b in told)
    assert 1_000_000 <= opened_at < claimed_at < closed_at <= 1_000_003
    for breaker in told:
        other.apply(
            breaker.provider,
            breaker.model,
            breaker.state,
            breaker.until_unix_ms,
            breaker.reason,
            breaker.since_unix_ms,
        )
    assert other.of(P, M).state == CLOSED


@pytest.mark.parametrize("told", [OPEN, HALF_OPEN])
def test_apply_moves_the_wall_clock_deadline_onto_the_monotonic_clock(told):
    h, t = make_health(start=100.0)  # wall clock: 1100 s
    h.apply(
        P, M, told, 1_105_000, "another replica", 1_100_000
    )  # until wall 1105 s = monotonic 105 s
    assert h.until_unix_ms(h.of(P, M)) == 1_105_000
    assert admits(h, t, 104.99, 105.0) == [SKIP, PROBE]
    h.apply(P, M, CLOSED, 0, "closed elsewhere", 1_106_000)
    assert admits(h, t, 105.0) == [CALL]


def test_a_close_told_from_no_later_than_this_breaker_opened_leaves_it_open():
    """The bucket's last close, replayed after this dispatcher opened the breaker on its own
    (the bucket was out of reach): an older close, or one of the same millisecond, loses."""
    h, _ = make_health(start=100.0)  # wall clock: 1100 s
    for _ in range(3):
        h.record(P, M, BreakerSettings(consecutive_failures=3), False, "server_error")
    opened_ms = h.of(P, M).since_unix_ms
    for since_ms in (opened_ms - 1, opened_ms):
        h.apply(P, M, CLOSED, 0, "closed elsewhere, earlier", since_ms)
        assert h.of(P, M).state == OPEN
    h.apply(P, M, CLOSED, 0, "closed elsewhere, since", opened_ms + 1)
    assert h.of(P, M).state == CLOSED


def test_an_open_told_from_before_this_breaker_closed_leaves_it_closed():
    """The bucket's last open (another replica's, within its cooldown), replayed on reconnecting
    after this dispatcher's probe closed the breaker: the older open does not bench a target
    just found good. A later one does."""
    h, t = opened(settings=BreakerSettings(consecutive_failures=3, cooldown_s=5.0))
    t[0] = 5.0
    h.claim_locally(P, M, 2.0)
    answers(h, 1, probe=True)
    closed_ms = h.of(P, M).since_unix_ms
    until_ms = closed_ms + 30_000  # the other replica's cooldown has 30 s to run
    for told, since_ms in ((OPEN, closed_ms - 1), (HALF_OPEN, closed_ms - 1), (CLOSED, closed_ms)):
        h.apply(P, M, told, until_ms, "told from before", since_ms)
        assert admits(h, t, 5.1) == [CALL]
    h.apply(P, M, OPEN, until_ms, "opened elsewhere, since", closed_ms + 1)
    assert admits(h, t, 5.1) == [SKIP]


async def test_a_probe_released_here_is_released_at_every_replica():
    """release() wrote its open with the claim's own moment: another replica kept the claim's
    half-open (a tie keeps it) and skipped the target for the rest of the lease."""
    store = MemoryStore(answer=True)
    h, t = opened(store)
    other, _ = make_health()
    t[0] = 5.0
    assert await h.claim(P, M, 31.0) is True
    h.release(P, M)
    for told in [*store.claims, *store.announced[1:]]:  # the claim, then the release
        other.apply(P, M, told.state, told.until_unix_ms, told.reason, told.since_unix_ms)
    assert (state(h), state(other)) == (OPEN, OPEN)
    assert other.admit(P, M) == PROBE  # the next call there probes, not one in 31 s


async def test_an_aborted_probe_lets_the_next_call_probe():
    """A probe whose request was aborted (or stopped) kept its claim: the target stayed benched
    for the whole lease, its timeout_s and a second, though nothing was decided."""
    h, t = make_health()
    settings = BreakerSettings(consecutive_failures=3, cooldown_s=5.0)
    probed = target("a", breaker=settings)
    key = probed.health_key
    for _ in range(3):
        h.record(*key, settings, False, "timeout")
    t[0] = 5.0
    started = asyncio.Event()

    async def hangs(target, timeout_s, previous):
        started.set()
        await asyncio.Event().wait()

    limits = Limits(Deadline(time.monotonic() + 30))
    walk = asyncio.ensure_future(run_chain(Chain([probed]), hangs, limits, health=h))
    await asyncio.wait_for(started.wait(), 5)
    assert h.of(*key).state == HALF_OPEN
    walk.cancel()
    with pytest.raises(asyncio.CancelledError):
        await walk
    assert (h.of(*key).state, h.admit(*key)) == (OPEN, PROBE)


def test_a_breaker_written_back_after_the_bucket_was_out_replaces_only_an_older_record():
    from service.shared_health import _newer

    def state(value: str, since_ms: int) -> BreakerState:
        return BreakerState(P, M, value, 0, "", since_ms)

    assert _newer(state(OPEN, 1001), state(CLOSED, 1000))
    assert _newer(state(OPEN, 1000), state(CLOSED, 1000))  # a tie: the open is the safer guess
    assert _newer(state(HALF_OPEN, 1000), state(CLOSED, 1000))
    assert not _newer(state(OPEN, 999), state(CLOSED, 1000))
    assert not _newer(state(OPEN, 1000), state(OPEN, 1000))
    assert not _newer(state(CLOSED, 1000), state(OPEN, 1000))


# ---- outcomes weighed in the order their calls were made -----------------------------------


def test_failed_calls_made_before_the_breaker_closed_count_for_nothing():
    settings = BreakerSettings(
        consecutive_failures=3, failure_rate=0.5, min_requests=4, cooldown_s=5.0
    )
    h, t = opened(settings=settings)
    t[0] = 5.0
    h.claim_locally(P, M, 2.0)
    t[0] = 5.1
    answers(h, 1, settings=settings, probe=True)
    t[0] = 7.0  # calls made at t = 1 time out now: a replica died with them in flight
    for _ in range(10):
        h.record(P, M, settings, False, "timeout", started=1.0)
    assert (state(h), h.of(P, M).consecutive) == (CLOSED, 0)  # neither in a row nor as a rate
    assert h.snapshot()["p:m"]["failed"] == 3 + 10  # the figures still show them
    h.record(P, M, settings, False, "timeout", started=6.0)  # a call made after the close counts
    assert h.of(P, M).consecutive == 1


def test_a_failure_older_than_a_good_answer_does_not_extend_a_run():
    h, t = make_health()
    t[0] = 2.1
    h.record(P, M, FAST, True, latency_ms=100.0, started=2.0)
    t[0] = 31.0  # calls made at t = 1, before the one that answered, time out only now
    for _ in range(5):
        h.record(P, M, FAST, False, "timeout", started=1.0)
    assert (state(h), h.of(P, M).consecutive) == (CLOSED, 0)
    for _ in range(3):  # calls made after the good answer fail: that is a run
        h.record(P, M, FAST, False, "timeout", started=3.0)
    assert state(h) == OPEN
    h, t = make_health()
    failures(
        h, 9, RATE
    )  # the failure rate still counts old failures: half the calls failing is unwell
    t[0] = 1.0
    h.record(P, M, RATE, True, started=1.0)
    h.record(P, M, RATE, False, "timeout", started=0.5)
    assert state(h) == OPEN


async def test_run_chain_tells_health_when_each_call_was_made():
    clock = Clock()
    h = Health(clock=clock, wall=clock)
    a = target("a", breaker=BreakerSettings(consecutive_failures=1))

    async def call(t, timeout_s, previous):
        if (
            t.name == "a"
        ):  # while this call hangs, a call of a that another request made later answers
            made = clock.now
            clock.now += 1
            h.record("a", "a-model", a.breaker, True, started=made + 0.5)
            clock.now += 29
            return fail("timeout")
        return ok(content="from b")

    result = await run_chain(
        Chain([a, target("b")]), call, Limits(Deadline(clock.now + 60)), health=h, clock=clock
    )
    assert result.answer is not None and result.answer.content == "from b"
    assert (
        h.of("a", "a-model").state == CLOSED
    )  # one counted failure opens it, but this one is old news


# ---- latency -------------------------------------------------------------------------


def test_p95_waits_for_min_samples_then_lies_within_one_bucket_of_most_answers():
    h, t = make_health()
    assert h.p95_ms(P, M) is None  # a target never seen
    answers(h, MIN_SAMPLES - 1)
    assert h.p95_ms(P, M) is None
    answers(h, 100 - MIN_SAMPLES + 1, 10.0)
    answers(h, 5, 1000.0)
    t[0] = 0.25  # p95 is recomputed at most four times a second
    p95 = h.p95_ms(P, M)
    assert p95 is not None and 10.0 <= p95 <= 11.5


def test_answers_older_than_60_s_drop_out_of_p95():
    h, t = make_health()
    t[0] = 1.0
    answers(h, 25, 1000.0)
    t[0] = 31.0
    answers(h, 25, 10.0)
    t[0] = 45.0
    assert h.p95_ms(P, M) == pytest.approx(bucket_ms(bucket_of(1000.0)))
    t[0] = 65.0  # the slow answers are 64 s old, the fast ones 34 s
    assert h.p95_ms(P, M) == pytest.approx(bucket_ms(bucket_of(10.0)))
    t[0] = 95.0
    assert h.p95_ms(P, M) is None


def test_snapshot_reports_each_targets_recent_figures():
    h, t = opened()
    answers(h, 2, 10.0)
    failures(h, 1, kind="bad_request")
    h.skipped(P, M)
    h.record("solo", "", None, True, latency_ms=3.0)
    snap = h.snapshot()
    assert set(snap) == {"p:m", "solo"}
    mine = snap["p:m"]
    assert (mine["provider"], mine["model"], mine["state"]) == (P, M, OPEN)
    assert (mine["ok"], mine["failed"], mine["skipped"]) == (2, 4, 1)
    assert mine["until_unix_ms"] == 1_005_000
    assert mine["latency"] == {str(bucket_of(10.0)): 2}
    t[0] = 61.0
    later = h.snapshot()["p:m"]
    assert (later["ok"], later["failed"], later["skipped"], later["latency"]) == (0, 0, 1, {})
    assert (TargetHealth(P, M).label, TargetHealth("solo", "").label) == ("p:m", "solo")


def test_snapshot_reports_streams_first_chunks_apart_and_none_for_a_target_never_streamed():
    """The figure a stream's hedge = "p95" waits for, beside the whole answers' (for `lifeline
    status` and the stats every dispatcher shares)."""
    h, t = make_health(start=100.0)
    for ms in (10.0, 20.0, 400.0):
        h.first_chunk(P, M, ms)
    h.record(P, M, None, True, latency_ms=900.0)
    h.cancelled(P, M)
    h.record("plain", "m", None, True, latency_ms=5.0)
    snap = h.snapshot()
    mine, plain = snap["p:m"], snap["plain:m"]
    assert mine["first_chunk_latency"] == {str(bucket_of(ms)): 1 for ms in (10.0, 20.0, 400.0)}
    assert (mine["first_chunk_p50_ms"], mine["first_chunk_p95_ms"]) == (
        bucket_ms(bucket_of(20.0)),
        bucket_ms(bucket_of(400.0)),
    )
    assert (mine["p50_ms"], mine["p95_ms"]) == (bucket_ms(bucket_of(900.0)),) * 2
    assert (mine["ok"], mine["cancelled"]) == (1, 1)
    assert (plain["first_chunk_latency"], plain["first_chunk_p50_ms"]) == ({}, None)
    assert plain["first_chunk_p95_ms"] is None
    t[0] += 61.0  # out of every window
    later = h.snapshot()["p:m"]
    assert (later["cancelled"], later["first_chunk_latency"], later["first_chunk_p95_ms"]) == (
        0,
        {},
        None,
    )


def test_percentile_reads_dict_and_list_histograms_alike():
    as_dict = {1: 0, 3: 1, 10: 9}
    as_list = [0] * 11
    as_list[3], as_list[10] = 1, 9
    for histogram in (as_dict, as_list):
        assert percentile_ms(histogram, 0.0) == bucket_ms(3)  # empty buckets are passed over
        assert percentile_ms(histogram, 0.1) == bucket_ms(3)
        assert percentile_ms(histogram, 0.5) == bucket_ms(10)
        assert percentile_ms(histogram, 1.0) == bucket_ms(10)
    assert percentile_ms({}, 0.95) is None and percentile_ms([0, 0], 0.95) is None


def test_bucket_of_small_exact_and_huge_latencies():
    assert [bucket_of(ms) for ms in (0.0, 0.5, 0.999, 1.149)] == [0, 0, 0, 0]
    assert bucket_of(1.15) == 1
    for k in range(
        1, 100
    ):  # the upper edge never understates, by at most 15% (rounding may pick the bucket below)
        ms = 1.15**k
        edge = bucket_ms(bucket_of(ms))
        assert (
            bucket_of(ms) in (k - 1, k)
            and ms <= edge * (1 + 1e-12)
            and edge <= ms * 1.15 * (1 + 1e-12)
        )
    assert bucket_of(1e9) == bucket_of(1e300) == 99
    assert bucket_ms(99) == pytest.approx(1.15**100)


# ---- budgets -------------------------------------------------------------------------


def test_a_budget_allows_its_reserve_then_ratio_per_request():
    budget = Budget(0.5, clock=lambda: 0.0)
    assert [budget.spend() for _ in range(4)] == [True, True, True, False]
    budget.deposit()
    budget.deposit()
    assert [budget.spend() for _ in range(2)] == [True, False]


def test_deposits_and_spends_older_than_10_s_stop_counting_and_ratio_zero_leaves_the_reserve():
    t = [0.0]
    budget, zero = Budget(1.0, clock=lambda: t[0]), Budget(0.0, clock=lambda: t[0])
    for _ in range(10):
        budget.deposit()
        zero.deposit()
    assert [budget.spend() for _ in range(14)] == [True] * 13 + [False]
    assert [zero.spend() for _ in range(4)] == [True, True, True, False]
    t[0] = 11.0  # only the reserve again: the 10 requests and the 13 spends are gone
    assert [budget.spend() for _ in range(4)] == [True, True, True, False]
    assert Budget(0.0, reserve=0, clock=lambda: 0.0).spend() is False


# ---- run_chain with a real Health --------------------------------------------------------


async def with_a_open(*after_a: str):
    """run_chain over a (its breaker just opened) and then `after_a`; returns (result, script, health)."""
    clock = Clock()
    h = Health(clock=clock, wall=clock)
    a = target("a", breaker=BreakerSettings(consecutive_failures=1))
    h.record("a", "a-model", a.breaker, False, "server_error")
    script = Script(clock, {"a": ok(content="from a"), "b": ok(content="from b")})
    chain = Chain([a, *(target(name) for name in after_a)])
    return (
        await run_chain(
            chain,
            script,
            Limits(Deadline(clock.now + 60)),
            health=h,
            clock=clock,
            sleep=clock.sleep,
        ),
        script,
        h,
    )


async def test_an_open_breaker_is_skipped_unless_it_is_the_last_target_left():
    result, script, h = await with_a_open("b")
    assert (
        script.called == ["b"] and result.answer is not None and result.answer.content == "from b"
    )
    assert [(x.target, x.outcome, x.reason) for x in result.attempts] == [
        ("a", "skipped", "circuit_open"),
        ("b", "ok", None),
    ]
    assert h.snapshot()["a:a-model"]["skipped"] == 1
    result, script, h = await with_a_open()
    assert (
        script.called == ["a"] and result.answer is not None and result.answer.content == "from a"
    )
    assert h.of("a", "a-model").state == CLOSED  # its answer, as a probe, closed the breaker


class Racer:
    """A fake `call` on real asyncio time: runs each target's coroutine function, keeps calls and cancellations."""

    def __init__(self, **behaviour) -> None:
        self.behaviour, self.called, self.cancelled = behaviour, [], []

    async def __call__(self, target, timeout_s, previous):
        self.called.append(target.name)
        try:
            return await self.behaviour[target.name]()
        except asyncio.CancelledError:
            self.cancelled.append(target.name)
            raise


def after(reply, seconds: float = 0.0):
    async def respond():
        await asyncio.sleep(seconds)
        return reply

    return respond


async def hedged(call, targets, budgets=None, on_event=None, health=None):
    limits = Limits(Deadline(time.monotonic() + 30), hedge=Hedge(after_s=0.01), budgets=budgets)
    return await run_chain(Chain(targets), call, limits, on_event=on_event, health=health)


async def test_a_hedge_that_answers_first_wins_and_the_slow_call_is_cancelled():
    racer = Racer(a=after(ok(content="too late"), 10.0), b=after(ok(content="from b")))
    result = await hedged(racer, [target("a"), target("b")])
    assert result.target is not None and result.target.name == "b"
    assert [(x.target, x.outcome, x.reason, x.hedge) for x in result.attempts] == [
        ("a", "cancelled", "hedge_lost", False),
        ("b", "ok", None, True),
    ]
    assert racer.cancelled == ["a"]


async def test_a_call_cancelled_is_counted_among_the_targets_calls_not_for_or_against_it():
    """A hedge that lost was in no figure: a provider that always loses is called (and may
    bill) while its row in `lifeline status` and its metrics stayed empty."""
    h = Health()
    racer = Racer(a=after(ok(content="too late"), 10.0), b=after(ok(content="from b")))
    await hedged(racer, [target("a"), target("b")], health=h)
    a, b = h.snapshot()["a:a-model"], h.snapshot()["b:b-model"]
    assert (a["ok"], a["failed"], a["cancelled"]) == (0, 0, 1)
    assert (b["ok"], b["failed"], b["cancelled"]) == (1, 0, 0)
    assert h.of("a", "a-model").consecutive == 0


async def test_a_first_target_that_answers_before_the_hedge_delay_is_not_hedged():
    racer = Racer(a=after(ok(content="from a")), b=after(ok()))
    result = await hedged(racer, [target("a"), target("b")])
    assert racer.called == ["a"]
    assert [(x.target, x.outcome, x.hedge) for x in result.attempts] == [("a", "ok", False)]


async def test_when_both_raced_targets_fail_the_chain_goes_on_and_retries_neither():
    b_called = asyncio.Event()

    async def a_fails_after_b_started():
        await b_called.wait()
        return fail("server_error", 503)

    async def b_fails():
        b_called.set()
        return fail("server_error", 503)

    racer = Racer(a=a_fails_after_b_started, b=b_fails, c=after(ok(content="from c")))
    result = await hedged(racer, [target("a", retries=2), target("b", retries=2), target("c")])
    assert result.answer is not None and result.answer.content == "from c"
    assert racer.called == ["a", "b", "c"]
    raced = [(x.target, x.outcome, x.retry, x.next, x.hedge) for x in result.attempts[:2]]
    # In the order they started, whichever failed first (here the hedge).
    assert raced == [("a", "error", 0, "fallback", False), ("b", "error", 0, "fallback", True)]


async def test_a_hedge_that_fails_while_the_call_it_hedged_answers_later_is_listed_after_it():
    racer = Racer(
        a=after(ok(content="from a"), 0.1), b=after(fail("server_error", 502)), c=after(ok())
    )
    result = await hedged(racer, [target("a"), target("b"), target("c")])
    assert result.answer is not None and result.answer.content == "from a"
    assert [(x.target, x.outcome, x.hedge) for x in result.attempts] == [
        ("a", "ok", False),
        ("b", "error", True),
    ]


async def test_an_empty_hedge_budget_starts_no_hedge_and_says_so():
    seen, on_event = events()
    racer = Racer(a=after(ok(content="from a"), 0.05), b=after(ok()))
    budgets = Budgets(Budget(1.0), Budget(0.0, reserve=0))
    result = await hedged(racer, [target("a"), target("b")], budgets, on_event)
    assert racer.called == ["a"] and result.answer is not None and result.answer.content == "from a"
    assert [
        attrs["lifeline.budget"] for name, attrs in seen if name == "lifeline.budget_spent"
    ] == ["hedge"]
    assert "lifeline.hedge" not in [name for name, _ in seen]


async def test_the_retry_budget_allows_one_retry_then_falls_back():
    clock = Clock()
    seen, on_event = events("lifeline.budget_spent")
    script = Script(clock, {"a": fail("server_error", 503), "b": ok(content="from b")})
    budgets = Budgets(Budget(0.0, reserve=1, clock=clock), Budget(0.1, clock=clock))
    limits = Limits(Deadline(clock.now + 60), budgets=budgets)
    chain = Chain([target("a", retries=3), target("b")])
    result = await run_chain(
        chain, script, limits, clock=clock, sleep=clock.sleep, rand=lambda: 0.5, on_event=on_event
    )
    assert script.called == ["a", "a", "b"]
    assert [(x.target, x.retry, x.next, x.reason) for x in result.attempts[:2]] == [
        ("a", 0, "retry", None),
        ("a", 1, "fallback", "retry_budget"),
    ]
    assert [attrs["lifeline.budget"] for _, attrs in seen] == ["retry"]


# ---- breakers inside a chain: the edge cases a review found --------------------------------


def tripped(clock: Clock, h: Health, name: str, cooldown_s: float = 5.0):
    """A target whose breaker opened on one failure; returns it."""
    t = target(name, breaker=BreakerSettings(consecutive_failures=1, cooldown_s=cooldown_s))
    h.record(t.provider, t.model, t.breaker, False, "server_error")
    return t


async def test_a_probe_the_request_cannot_send_is_not_claimed():
    clock = Clock()
    h = Health(clock=clock, wall=clock)
    b = tripped(clock, h, "b")
    clock.now += 6  # b's cooldown is over: the next call of b would be its probe
    script = Script(clock, {"a": fail("server_error", 503)})
    limits = Limits(Deadline(clock.now + 60), max_attempts=1)  # a takes the only attempt
    await run_chain(
        Chain([target("a"), b]), script, limits, health=h, clock=clock, sleep=clock.sleep
    )
    assert h.admit("b", "b-model") == PROBE  # still free for the next request


async def test_a_probe_is_never_hedged():
    clock = Clock()
    h = Health(clock=clock, wall=clock)
    a = tripped(clock, h, "a")
    clock.now += 6
    racer = Racer(a=after(ok(content="from a"), 0.05), b=after(ok(content="from b")))
    limits = Limits(Deadline(time.monotonic() + 30), hedge=Hedge(after_s=0.01))
    result = await run_chain(Chain([a, target("b")]), racer, limits, health=h)
    assert racer.called == ["a"] and result.answer is not None and result.answer.content == "from a"
    assert h.of("a", "a-model").state == CLOSED  # the probe's answer decided


async def test_a_timeout_the_requests_own_deadline_caused_does_not_count():
    clock = Clock()
    h = Health(clock=clock, wall=clock)
    a = target("a", timeout_s=30, breaker=BreakerSettings(consecutive_failures=1))
    script = Script(clock, {"a": fail("timeout"), "b": ok()})
    limits = Limits(
        Deadline(clock.now + 1)
    )  # the client gives the whole request 1 s: a's 30 s are cut short
    await run_chain(
        Chain([a, target("b")]), script, limits, health=h, clock=clock, sleep=clock.sleep
    )
    assert h.of("a", "a-model").state == CLOSED
    limits = Limits(Deadline(clock.now + 60))  # a timeout at a's own timeout_s counts
    await run_chain(
        Chain([a, target("b")]),
        Script(clock, {"a": fail("timeout"), "b": ok()}),
        limits,
        health=h,
        clock=clock,
        sleep=clock.sleep,
    )
    assert h.of("a", "a-model").state == OPEN


async def test_no_retries_into_a_breaker_the_failure_just_opened():
    clock = Clock()
    h = Health(clock=clock, wall=clock)
    a = target("a", retries=3, breaker=BreakerSettings(consecutive_failures=1))
    script = Script(clock, {"a": fail("server_error", 503), "b": ok()})
    await run_chain(
        Chain([a, target("b")]),
        script,
        Limits(Deadline(clock.now + 60)),
        health=h,
        clock=clock,
        sleep=clock.sleep,
    )
    assert script.called == ["a", "b"]


async def _race_ending_in_one_turn() -> ChainResult:
    """a fails with a failure that settles the race (outside fallback_on), its hedge b answers
    ok, both in the same turn."""
    go, b_started = asyncio.Event(), asyncio.Event()

    async def a_bad_request():
        await b_started.wait()
        await go.wait()
        return fail("bad_request", 400)

    async def b_ok():
        b_started.set()
        await go.wait()
        return ok(content="from b")

    async def release():
        await b_started.wait()
        await asyncio.sleep(0.01)
        go.set()

    limits = Limits(
        Deadline(time.monotonic() + 30),
        fallback_on=frozenset({"rate_limit"}),
        hedge=Hedge(after_s=0.01),
    )
    releasing = asyncio.ensure_future(release())
    result = await run_chain(
        Chain([target("a"), target("b")]), Racer(a=a_bad_request, b=b_ok), limits
    )
    await releasing
    return result


async def test_a_good_answer_in_the_same_turn_as_a_settling_failure_wins_the_race():
    """Both raced calls end in the same turn: the first good answer wins, whatever order the
    two are looked at in."""
    for _ in range(20):
        result = await _race_ending_in_one_turn()
        assert result.answer is not None and result.answer.content == "from b"


async def test_a_failure_that_stops_the_chain_settles_a_race():
    b_started = asyncio.Event()

    async def a_bad_request():
        await b_started.wait()
        return fail("bad_request", 400)

    async def b_slow():
        b_started.set()
        await asyncio.sleep(10)
        return ok(content="from b")

    racer = Racer(a=a_bad_request, b=b_slow)
    limits = Limits(
        Deadline(time.monotonic() + 30),
        fallback_on=frozenset({"rate_limit"}),
        hedge=Hedge(after_s=0.01),
    )
    result = await run_chain(Chain([target("a"), target("b")]), racer, limits)
    assert (
        result.answer is None
        and result.error is not None
        and result.error.type == "fallback_stopped"
    )
    assert racer.cancelled == ["b"]
    assert [(x.target, x.outcome, x.next, x.hedge) for x in result.attempts] == [
        ("a", "error", "stop", False),  # in the order the calls started
        ("b", "cancelled", None, True),
    ]


async def test_an_open_target_is_called_when_every_later_target_would_be_skipped_anyway():
    clock = Clock()
    h = Health(clock=clock, wall=clock)
    a = tripped(clock, h, "a")
    too_small = target("b", max_input_tokens=10)
    script = Script(clock, {"a": ok(content="from a")})
    result = await run_chain(
        Chain([a, too_small]),
        script,
        Limits(Deadline(clock.now + 60)),
        needs=Needs(input_tokens=500),
        health=h,
        clock=clock,
        sleep=clock.sleep,
    )
    assert result.answer is not None and result.answer.content == "from a"


async def test_a_hedge_whose_own_failure_stops_the_chain_is_reported_as_a_hedge():
    """b, the hedge, fails outside fallback_on; a runs on (it might still answer), then fails
    with a kind that would have fallen back to b: b's failure stops the chain, as a hedge's."""
    b_failed = asyncio.Event()

    async def a_slow():
        await b_failed.wait()
        for _ in range(5):  # the race hears of b's failure first
            await asyncio.sleep(0)
        return fail("rate_limit", 429)

    async def b_bad_request():
        b_failed.set()
        return fail("bad_request", 400)

    racer = Racer(a=a_slow, b=b_bad_request)
    limits = Limits(
        Deadline(time.monotonic() + 30),
        fallback_on=frozenset({"rate_limit"}),
        hedge=Hedge(after_s=0.01),
    )
    result = await run_chain(Chain([target("a"), target("b")]), racer, limits)
    assert result.error is not None and result.error.type == "fallback_stopped"
    assert [(x.target, x.outcome, x.next, x.hedge) for x in result.attempts] == [
        ("a", "error", "fallback", False),
        ("b", "error", "stop", True),
    ]


async def test_a_called_anyway_call_cut_short_leaves_another_requests_probe_alone():
    """One request holds the half-open probe; another, whose only target this is, calls it
    anyway and its short deadline cuts the call: the probe stays the first request's (no
    second probe starts while it runs)."""
    clock = Clock()
    health = Health(clock=clock, wall=clock)
    breaker = BreakerSettings(consecutive_failures=1, cooldown_s=5)
    a = target("a", timeout_s=30, breaker=breaker)
    health.record("a", "a-model", breaker, False, "server_error")
    clock.now += 6
    assert await health.claim("a", "a-model", 31)  # the first request's probe is out
    script = Script(clock, {"a": fail("timeout")}, took={"a": 1.0})
    await run_chain(
        Chain([a]),
        script,
        Limits(Deadline(clock.now + 1)),
        health=health,
        clock=clock,
        sleep=clock.sleep,
    )
    assert script.called == ["a"]  # called anyway: the last target left
    assert health.admit("a", "a-model") == SKIP


def test_calls_that_spanned_the_dispatchers_own_nats_outage_do_not_count():
    """A dispatcher the NATS server cut (a slow consumer), or one that reconnected, lost the
    replies in flight: their timeouts opened a healthy provider's breaker, which every
    dispatcher sharing health then skipped. What its provider said itself still counts."""
    h, t = make_health()
    h.own_outage = lambda started: started < 5.0  # the connection was back at t = 5
    t[0] = 10.0
    for kind in ("timeout", "no_responders", "connection"):
        for _ in range(3):
            h.record(P, M, FAST, False, kind, started=1.0)
    assert (state(h), h.of(P, M).consecutive) == (CLOSED, 0)
    for _ in range(3):  # calls made after it came back: a run
        h.record(P, M, FAST, False, "timeout", started=6.0)
    assert state(h) == OPEN
    h, t = make_health()
    h.own_outage = lambda started: True
    for _ in range(3):  # the provider's own answer, whatever the connection did
        h.record(P, M, FAST, False, "server_error", 503, started=1.0)
    assert state(h) == OPEN


@pytest.mark.parametrize("kind", ["timeout", "no_responders", "connection"])
def test_a_probe_that_spanned_the_dispatchers_own_outage_decides_nothing(kind):
    """It closed the breaker, as an answer would have: after a NATS blip a dead provider was
    called again by every request, each waiting out its timeout, until the failures reopened
    it. It leaves the breaker open, the next call probing; nor does it break a run of counted
    failures."""
    h, t = opened()
    h.own_outage = lambda started: started < 6.0
    t[0] = 5.0
    h.claim_locally(P, M, 2.0)
    h.record(P, M, FAST, False, kind, probe=True, started=5.0)
    assert state(h) == OPEN and admits(h, t, 5.0) == [PROBE]

    h, t = make_health()
    h.own_outage = lambda started: started < 6.0
    t[0] = 10.0
    failures(h, 2)
    h.record(P, M, FAST, False, kind, started=5.0)
    failures(h, 1)
    assert state(h) == OPEN


def test_the_transport_knows_a_call_spanned_an_outage_of_its_connection():
    from types import SimpleNamespace

    from service.transport import NatsTransport

    nc = SimpleNamespace(is_connected=True, stats={"reconnects": 0})
    transport = NatsTransport(nc)  # type: ignore[arg-type]
    before = time.monotonic()
    assert not transport.spanned_an_outage(before)
    nc.is_connected = False
    assert transport.spanned_an_outage(before)  # down now
    nc.is_connected, nc.stats["reconnects"] = True, 1
    assert transport.spanned_an_outage(before)  # reconnected since
    assert not transport.spanned_an_outage(time.monotonic())  # made after it was back
