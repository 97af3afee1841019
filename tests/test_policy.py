"""run_chain, the fallback decision, with a scripted `call` and a fake clock: no NATS."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from schemas import ERROR_KINDS, ProviderFailure, ProviderOk, ProviderReply
from schemas.deadline import Deadline
from service.budgets import Budget, Budgets
from service.policy import Chain, Hedge, Limits, Needs, Started, run_chain
from service.shaping import Shaping, Template
from service.target import Target


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class Script:
    """A fake `call`: replies queued per target name (one, or a list in turn); each call may
    spend fake-clock time."""

    def __init__(
        self, clock: Clock, replies: dict[str, Any], took: dict[str, float] | None = None
    ) -> None:
        self.clock = clock
        self.replies = {
            name: list(r) if isinstance(r, list) else [r] for name, r in replies.items()
        }
        self.took = took or {}
        self.calls: list[tuple[str, float]] = []  # (target, timeout_s it was given)
        self.previous: list[tuple[str, ...]] = []

    @property
    def slept(self) -> list[float]:
        return self.clock.slept

    async def __call__(
        self, target: Target, timeout_s: float, previous: tuple[str, ...]
    ) -> ProviderReply:
        self.calls.append((target.name, timeout_s))
        self.previous.append(previous)
        self.clock.now += self.took.get(target.name, 0.0)
        queue = self.replies[target.name]
        return queue.pop(0) if len(queue) > 1 else queue[0]

    @property
    def called(self) -> list[str]:
        return [name for name, _ in self.calls]


def target(name: str, timeout_s: float = 30.0, **kw: Any) -> Target:
    return Target(
        name=name, provider=name, kind="fake", model=f"{name}-model", timeout_s=timeout_s, **kw
    )


def ok(model: str = "served-model", content: str = "hi") -> ProviderOk:
    return ProviderOk(content=content, model=model)


def fail(
    kind: str = "server_error", status: int | None = None, message: str = "boom", retry_after_s=None
) -> ProviderFailure:
    return ProviderFailure(
        kind=kind, message=message, status_code=status, retry_after_s=retry_after_s
    )


async def run(
    replies: dict[str, Any],
    *,
    took=None,
    deadline_in: float = 60.0,
    timeouts=None,
    targets=None,
    by_kind=None,
    max_attempts: int = 6,
    fallback_on=None,
    fallback: bool = True,
    rand=lambda: 0.5,
    **kw,
):
    """Run a chain over the targets named in `replies` (or `targets`), in order; returns (result, script).
    `replies` may also hold the replies of targets only reached through `by_kind`."""
    clock = Clock()
    script = Script(clock, replies, took)
    if targets is None:
        targets = [target(name, (timeouts or {}).get(name, 30.0)) for name in replies]
    limits = Limits(Deadline(clock.now + deadline_in), max_attempts, fallback_on, fallback)
    result = await run_chain(
        Chain(targets, by_kind or {}),
        script,
        limits,
        clock=clock,
        sleep=clock.sleep,
        rand=rand,
        **kw,
    )
    return result, script


def events(kind: str | None = None):
    seen: list[tuple[str, dict]] = []

    def on_event(name: str, attributes: dict) -> None:
        if kind is None or name == kind:
            seen.append((name, attributes))

    return seen, on_event


async def test_the_first_ok_answers_and_later_targets_are_never_called():
    result, script = await run({"a": ok(content="from a"), "b": ok(), "c": ok()})
    assert result.error is None and result.answer is not None
    assert (result.answer.content, result.target.provider) == ("from a", "a")
    assert script.called == ["a"]


@pytest.mark.parametrize("kind", ERROR_KINDS)
async def test_every_failure_kind_falls_back_by_default(kind):
    result, script = await run({"a": fail(kind), "b": ok()})
    assert result.target is not None and result.target.provider == "b"
    assert script.called == ["a", "b"]


async def test_a_kind_listed_in_fallback_on_falls_back():
    result, _ = await run({"a": fail("rate_limit", 429), "b": ok()}, fallback_on=["rate_limit"])
    assert result.target is not None and result.target.provider == "b"


async def test_a_status_listed_in_fallback_on_falls_back_even_when_its_kind_is_not():
    result, _ = await run(
        {"a": fail("server_error", 503), "b": ok()}, fallback_on=["rate_limit", 503]
    )
    assert result.target is not None and result.target.provider == "b"


async def test_a_failure_outside_fallback_on_ends_the_chain():
    replies = {"a": fail("auth", 401, "bad key"), "b": ok(), "c": ok()}
    result, script = await run(replies, fallback_on=["rate_limit", 503])
    assert script.called == ["a"]
    assert (result.answer, result.target) == (None, None)
    assert result.error is not None and result.error.type == "fallback_stopped"
    assert "auth" in result.error.message and "401" in result.error.message
    assert "not tried: b, c" in result.error.message
    assert [a.provider for a in result.attempts] == ["a"]


async def test_a_failure_without_a_status_is_not_matched_by_a_status_in_fallback_on():
    result, script = await run({"a": fail("timeout"), "b": ok()}, fallback_on=[504])
    assert script.called == ["a"]
    assert result.error is not None and result.error.type == "fallback_stopped"


async def test_all_failed_lists_every_attempt_in_order():
    replies = {
        "a": fail("server_error", 500, "oops"),
        "b": fail("rate_limit", 429, "slow down"),
        "c": fail("timeout"),
    }
    result, script = await run(replies)
    assert script.called == ["a", "b", "c"]
    assert result.error is not None and result.error.type == "all_failed"
    got = [(a.provider, a.error_type, a.status_code, a.message) for a in result.attempts]
    assert got == [
        ("a", "server_error", 500, "oops"),
        ("b", "rate_limit", 429, "slow down"),
        ("c", "timeout", None, "boom"),
    ]
    assert "all 3 attempts failed" in result.error.message


async def test_each_attempt_gets_its_own_timeout_capped_by_the_time_left():
    replies = {"a": fail("timeout"), "b": fail("timeout"), "c": ok()}
    _, script = await run(
        replies, took={"a": 4.0, "b": 5.0}, deadline_in=10.0, timeouts={"a": 4.0, "b": 5.0}
    )
    assert script.calls == [("a", 4.0), ("b", 5.0), ("c", 1.0)]  # c: 30 s of its own, 1 s left


async def test_a_target_that_cannot_start_before_the_deadline_is_not_called():
    replies = {"a": fail("timeout"), "b": ok(), "c": ok()}
    result, script = await run(replies, took={"a": 10.0}, deadline_in=10.0, timeouts={"a": 10.0})
    assert script.called == ["a"]
    assert result.answer is None
    assert result.error is not None and result.error.type == "deadline_exceeded"
    assert "b, c" in result.error.message
    assert [(a.target, a.outcome, a.reason) for a in result.attempts] == [
        ("a", "timeout", None),
        ("b", "skipped", "deadline"),
        ("c", "skipped", "deadline"),
    ]


async def test_a_failure_at_the_deadline_says_the_chain_stopped_there():
    """`next` says what the dispatcher did: a failure that left no time for another call said
    "fallback", though nothing was tried after it (as after max_attempts, it stopped)."""
    replies = {"a": fail("timeout"), "b": ok()}
    result, _ = await run(replies, took={"a": 10.0}, deadline_in=10.0, timeouts={"a": 10.0})
    assert [(a.target, a.next) for a in result.attempts] == [("a", "stop"), ("b", None)]


async def test_a_timeout_cut_at_the_deadline_that_fired_a_hair_early_starts_no_other_call():
    """Event-loop timers fire up to half a millisecond early: an attempt cut at the deadline may
    end just before it. What is left then is no time for a call: the request's deadline has
    passed, not every target failed."""
    replies = {"a": fail("timeout"), "b": ok()}
    result, script = await run(replies, took={"a": 9.9995}, deadline_in=10.0, timeouts={"a": 10.0})
    assert script.called == ["a"]
    assert result.error is not None and result.error.type == "deadline_exceeded"
    assert [(a.target, a.outcome, a.reason) for a in result.attempts] == [
        ("a", "timeout", None),
        ("b", "skipped", "deadline"),
    ]


async def test_a_deadline_already_past_calls_nobody():
    result, script = await run({"a": ok()}, deadline_in=-1.0)
    assert script.calls == []
    assert [(a.outcome, a.reason) for a in result.attempts] == [("skipped", "deadline")]
    assert result.error is not None and result.error.type == "deadline_exceeded"


async def test_a_fallback_event_is_sent_once_per_move_and_not_after_the_last_target():
    seen, on_event = events("lifeline.fallback")
    replies = {"a": fail("rate_limit", 429), "b": fail("server_error", 503), "c": fail("timeout")}
    await run(replies, on_event=on_event)
    moves = [
        (e["lifeline.fallback.from"], e["lifeline.fallback.to"], e["lifeline.fallback.reason"])
        for _, e in seen
    ]
    assert moves == [("a", "b", "rate_limit"), ("b", "c", "server_error")]
    assert seen[0][1]["lifeline.fallback.status_code"] == 429


async def test_no_fallback_event_when_the_chain_stops_or_answers():
    seen, on_event = events("lifeline.fallback")
    await run({"a": fail("auth", 401), "b": ok()}, fallback_on=["rate_limit"], on_event=on_event)
    await run({"a": ok(), "b": ok()}, on_event=on_event)
    assert seen == []


@pytest.mark.parametrize(
    ("kind", "outcome"),
    [
        ("timeout", "timeout"),
        ("no_responders", "no_responders"),
        ("rate_limit", "error"),
        ("server_error", "error"),
        ("connection", "error"),
        ("auth", "error"),
    ],
)
async def test_a_failed_attempt_outcome_follows_the_failure_kind(kind, outcome):
    result, _ = await run({"a": fail(kind), "b": ok()})
    assert (result.attempts[0].outcome, result.attempts[0].error_type) == (outcome, kind)


async def test_the_ok_attempt_records_the_model_the_provider_answered_with():
    result, _ = await run({"a": fail(), "b": ok(model="gpt-4o-2024-08-06")})
    failed, served = result.attempts
    assert (failed.model, failed.outcome) == ("a-model", "error")
    assert (served.provider, served.model, served.outcome) == ("b", "gpt-4o-2024-08-06", "ok")


async def test_an_ok_without_a_model_records_the_configured_one():
    result, _ = await run({"a": ok(model="")})
    assert result.attempts[0].model == "a-model"


async def test_attempt_latency_is_measured_on_the_clock():
    result, _ = await run({"a": fail(), "b": ok()}, took={"a": 2.5, "b": 0.25})
    assert [a.latency_ms for a in result.attempts] == [2500.0, 250.0]


async def test_no_fallback_is_reported_to_a_target_the_deadline_kept_from_starting():
    seen, on_event = events("lifeline.fallback")
    result, script = await run(
        {"a": fail(), "b": ok()}, took={"a": 5.0}, deadline_in=5.0, on_event=on_event
    )
    assert result.error is not None and result.error.type == "deadline_exceeded"
    assert (script.called, seen) == (["a"], [])


# ---- every decision says what came next --------------------------------------------


async def test_each_failed_attempt_says_what_the_dispatcher_did_next():
    result, _ = await run(
        {"a": fail("rate_limit"), "b": fail("auth"), "c": ok()}, fallback_on=["rate_limit"]
    )
    assert [(a.target, a.next) for a in result.attempts] == [("a", "fallback"), ("b", "stop")]


# ---- capability checks -------------------------------------------------------------


async def test_a_target_whose_max_input_tokens_the_input_exceeds_is_skipped_without_a_call():
    seen, on_event = events("lifeline.skip")
    targets = [target("short", max_input_tokens=1000), target("long", max_input_tokens=100_000)]
    result, script = await run(
        {"short": ok(), "long": ok(content="long")},
        targets=targets,
        needs=Needs(input_tokens=5000),
        on_event=on_event,
    )
    assert script.called == ["long"]
    assert result.target is not None and result.target.name == "long"
    skipped = result.attempts[0]
    assert (skipped.target, skipped.outcome, skipped.reason) == (
        "short",
        "skipped",
        "max_input_tokens",
    )
    assert "5000" in (skipped.message or "") and "1000" in (skipped.message or "")
    assert [e["lifeline.skip.reason"] for _, e in seen] == ["max_input_tokens"]


async def test_a_target_without_json_output_is_skipped_when_the_request_wants_json():
    targets = [target("plain", json_output=False), target("json")]
    result, script = await run(
        {"plain": ok(), "json": ok()}, targets=targets, needs=Needs(json=True)
    )
    assert script.called == ["json"]
    assert (result.attempts[0].outcome, result.attempts[0].reason) == ("skipped", "json_output")


async def test_when_every_target_is_skipped_nothing_is_called_and_the_error_says_so():
    targets = [target("a", max_input_tokens=10), target("b", max_input_tokens=20)]
    result, script = await run(
        {"a": ok(), "b": ok()}, targets=targets, needs=Needs(input_tokens=50)
    )
    assert script.calls == []
    assert result.error is not None and result.error.type == "no_capable_target"
    assert "a: skipped (max_input_tokens)" in result.error.message


async def test_a_skip_is_not_a_failure_the_fallback_event_names_the_failed_target():
    seen, on_event = events("lifeline.fallback")
    targets = [target("a"), target("b", max_input_tokens=1), target("c")]
    await run(
        {"a": fail("rate_limit"), "b": ok(), "c": ok()},
        targets=targets,
        needs=Needs(input_tokens=9),
        on_event=on_event,
    )
    assert [(e["lifeline.fallback.from"], e["lifeline.fallback.to"]) for _, e in seen] == [
        ("a", "c")
    ]


# ---- output validation -------------------------------------------------------------


async def test_an_answer_that_fails_validation_is_an_invalid_output_failure_and_falls_back():
    def validate(answer: ProviderOk):
        return (
            answer if answer.content.startswith("{") else fail("invalid_output", message="not JSON")
        )

    result, script = await run(
        {"cheap": ok(content="Sure! Here"), "better": ok(content="{}")}, validate=validate
    )
    assert script.called == ["cheap", "better"]
    assert result.answer is not None and result.answer.content == "{}"
    first = result.attempts[0]
    assert (first.outcome, first.error_type, first.message, first.next) == (
        "error",
        "invalid_output",
        "not JSON",
        "fallback",
    )


# ---- retries -----------------------------------------------------------------------


async def test_a_retry_on_failure_is_retried_on_the_same_target_before_falling_back():
    seen, on_event = events("lifeline.retry")
    targets = [target("a", retries=2), target("b")]
    result, script = await run(
        {"a": [fail("rate_limit", 429), fail("server_error", 500), ok()], "b": ok()},
        targets=targets,
        on_event=on_event,
    )
    assert script.called == ["a", "a", "a"]
    assert [(a.target, a.retry, a.outcome, a.next) for a in result.attempts] == [
        ("a", 0, "error", "retry"),
        ("a", 1, "error", "retry"),
        ("a", 2, "ok", None),
    ]
    assert [e["lifeline.reason"] for _, e in seen] == ["rate_limit", "server_error"]


async def test_retries_run_out_then_the_chain_falls_back():
    targets = [target("a", retries=1), target("b")]
    result, script = await run({"a": fail("server_error"), "b": ok()}, targets=targets)
    assert script.called == ["a", "a", "b"]
    assert [a.next for a in result.attempts[:2]] == ["retry", "fallback"]


async def test_a_failure_outside_retry_on_falls_back_at_once():
    targets = [target("a", retries=3, retry_on=frozenset({"rate_limit"})), target("b")]
    _, script = await run({"a": fail("auth", 401), "b": ok()}, targets=targets)
    assert script.called == ["a", "b"]


async def test_retry_on_may_name_an_http_status():
    targets = [target("a", retries=1, retry_on=frozenset({529})), target("b")]
    _, script = await run({"a": [fail("server_error", 529), ok()], "b": ok()}, targets=targets)
    assert script.called == ["a", "a"]


async def test_a_spent_quota_is_retried_only_where_retry_on_names_quota_not_its_429():
    """OpenAI's insufficient_quota comes with the 429 of a rate limit: `retry_on = [429]` waits
    out rate limits, and called a spent account again, for nothing, until its retries ran out."""
    spent = fail("quota", 429)
    by_status = [target("a", retries=2, retry_on=frozenset({429})), target("b")]
    _, script = await run({"a": [spent, ok()], "b": ok()}, targets=by_status)
    assert script.called == ["a", "b"]
    _, script = await run({"a": [fail("rate_limit", 429), ok()], "b": ok()}, targets=by_status)
    assert script.called == ["a", "a"]  # the same status, a rate limit: waited out
    named = [target("a", retries=2, retry_on=frozenset({"quota"})), target("b")]
    _, script = await run({"a": [spent, ok()], "b": ok()}, targets=named)
    assert script.called == ["a", "a"]


async def test_backoff_doubles_with_full_jitter_up_to_max_backoff():
    targets = [target("a", retries=4, backoff_s=1.0, max_backoff_s=3.0)]
    _, script = await run({"a": fail("server_error")}, targets=targets, rand=lambda: 1.0)
    assert script.slept == [1.0, 2.0, 3.0, 3.0]
    _, script = await run({"a": fail("server_error")}, targets=targets, rand=lambda: 0.25)
    assert script.slept == [0.25, 0.5, 0.75, 0.75]


async def test_retry_after_is_honoured_when_longer_than_the_backoff():
    targets = [target("a", retries=1, backoff_s=0.1)]
    _, script = await run(
        {"a": [fail("rate_limit", 429, retry_after_s=2.0), ok()]}, targets=targets
    )
    assert script.slept == [2.0]


async def test_a_retry_after_longer_than_max_backoff_falls_back_instead_of_waiting():
    targets = [target("a", retries=3, max_backoff_s=5.0), target("b")]
    result, script = await run(
        {"a": fail("rate_limit", 429, retry_after_s=60.0), "b": ok()}, targets=targets
    )
    assert script.called == ["a", "b"] and script.slept == []
    assert result.attempts[0].next == "fallback"


async def test_a_retry_its_target_allows_but_not_made_says_why_in_the_attempt():
    """A target with retries left failing with a retry_on kind fell back at once, its attempt
    saying nothing of why (only a spent budget said so): the provider's Retry-After was past
    max_backoff_s, the wait would end after the deadline, or the failure opened its breaker."""
    from service.health import BreakerSettings, Health

    targets = [target("a", retries=3, max_backoff_s=5.0), target("b")]
    too_long = fail("rate_limit", 429, retry_after_s=60.0)
    result, _ = await run({"a": too_long, "b": ok()}, targets=targets)
    assert (result.attempts[0].reason, result.attempts[0].next) == ("retry_after", "fallback")

    past_deadline = fail("rate_limit", 429, retry_after_s=4.0)
    result, _ = await run({"a": past_deadline, "b": ok()}, targets=targets, deadline_in=3.0)
    assert (result.attempts[0].reason, result.attempts[0].next) == ("deadline", "fallback")

    clock = Clock()
    breaker = BreakerSettings(consecutive_failures=1)
    opens = [target("a", retries=3, breaker=breaker), target("b")]
    result = await run_chain(
        Chain(opens),
        Script(clock, {"a": fail("server_error", 503), "b": ok()}),
        Limits(Deadline(clock.now + 60)),
        health=Health(clock=clock, wall=clock),
        clock=clock,
        sleep=clock.sleep,
    )
    assert (result.attempts[0].reason, result.attempts[0].next) == ("circuit_open", "fallback")


async def test_a_chain_every_call_of_which_was_rate_limited_says_when_to_come_back():
    """The soonest Retry-After among its providers: when the chain may find one taking calls
    (what the HTTP gateway's 429 passes on). A chain that failed otherwise too says nothing."""
    limited = {
        "a": fail("rate_limit", 429, retry_after_s=30.0),
        "b": fail("rate_limit", 429, retry_after_s=4.0),
        "c": fail("rate_limit", 429),
    }
    result, _ = await run(limited)
    assert (result.error.type, result.error.retry_after_s) == ("all_failed", 4.0)
    result, _ = await run({**limited, "c": fail("server_error", 503)})
    assert (result.error.type, result.error.retry_after_s) == ("all_failed", None)
    result, _ = await run(limited, max_attempts=1)
    assert (result.error.type, result.error.retry_after_s) == ("max_attempts_reached", 30.0)


async def test_a_hedged_chain_every_call_of_which_was_rate_limited_names_the_soonest_retry_after():
    """The hedge's rate limit, which ended while the call it hedged ran on, counts as much as
    the last call's: the soonest Retry-After of the two is when to come back."""
    hedge_failed = asyncio.Event()

    async def call(t, timeout_s, previous):
        if t.name == "b":  # the hedge
            hedge_failed.set()
            return fail("rate_limit", 429, retry_after_s=2.0)
        await hedge_failed.wait()
        for _ in range(5):  # the race hears of b's failure before a's end
            await asyncio.sleep(0)
        return fail("rate_limit", 429, retry_after_s=30.0)

    limits = Limits(Deadline(time.monotonic() + 5), hedge=Hedge(after_s=0.01))
    result = await run_chain(Chain([target("a"), target("b")]), call, limits)
    assert [(x.target, x.error_type, x.next, x.hedge) for x in result.attempts] == [
        ("a", "rate_limit", "stop", False),
        ("b", "rate_limit", "fallback", True),
    ]
    assert (result.error.type, result.error.retry_after_s) == ("all_failed", 2.0)


async def test_a_retry_whose_backoff_would_end_after_the_deadline_is_not_made():
    targets = [target("a", retries=3, backoff_s=4.0), target("b")]
    _, script = await run(
        {"a": fail("server_error"), "b": ok()}, targets=targets, deadline_in=3.0, rand=lambda: 1.0
    )
    assert script.called == ["a", "b"] and script.slept == []


async def test_a_retry_whose_backoff_would_leave_under_a_millisecond_is_not_made():
    """A wait that ends 0.6 ms before the deadline leaves no time for a call: the chain
    moves on at once, rather than waiting and then skipping everything for the deadline."""
    targets = [target("a", retries=2, backoff_s=1.0), target("b")]
    result, script = await run(
        {"a": fail("server_error", 503), "b": ok()},
        targets=targets,
        deadline_in=0.5006,
        rand=lambda: 0.5,  # a backoff of 0.5 s
    )
    assert script.called == ["a", "b"] and script.slept == []
    assert result.error is None
    assert [(a.target, a.outcome, a.next) for a in result.attempts] == [
        ("a", "error", "fallback"),
        ("b", "ok", None),
    ]


def one_retry(clock: Clock) -> Budgets:
    """A route's budgets with room for one retry: the reserve, no share of its requests."""
    return Budgets(Budget(0.0, reserve=1, clock=clock), Budget(0.0, reserve=1, clock=clock))


async def a_retry_is_made(budgets: Budgets, clock: Clock) -> bool:
    """Whether a request whose first call fails is retried, not refused for the budget."""
    script = Script(clock, {"a": [fail("server_error", 503), ok()], "b": ok()})
    limits = Limits(Deadline(clock.now + 60), budgets=budgets)
    chain = Chain([target("a", retries=1), target("b")])
    result = await run_chain(chain, script, limits, clock=clock, sleep=clock.sleep)
    return script.called == ["a", "a"] and result.attempts[0].reason is None


async def test_a_retry_its_request_aborted_during_the_backoff_gives_its_budget_back():
    clock = Clock()
    budgets = one_retry(clock)
    backing_off = asyncio.Event()

    async def sleep(seconds: float) -> None:  # the client aborts during the backoff
        backing_off.set()
        await asyncio.sleep(60)

    script = Script(clock, {"a": fail("server_error", 503), "b": ok()})
    limits = Limits(Deadline(clock.now + 60), budgets=budgets)
    chain = Chain([target("a", retries=1), target("b")])
    walk = asyncio.ensure_future(run_chain(chain, script, limits, clock=clock, sleep=sleep))
    await asyncio.wait_for(backing_off.wait(), 5)
    walk.cancel()
    with pytest.raises(asyncio.CancelledError):
        await walk
    assert script.called == ["a"]
    assert await a_retry_is_made(budgets, clock)  # not refused with reason retry_budget


async def test_a_retry_skipped_for_a_breaker_opened_during_the_backoff_gives_its_budget_back():
    from service.health import BreakerSettings, Health

    clock = Clock()
    budgets = one_retry(clock)
    health = Health(clock=clock, wall=clock)
    breaker = BreakerSettings(consecutive_failures=5, cooldown_s=1.0)

    async def sleep(seconds: float) -> None:  # other requests' failures open a's breaker
        clock.now += seconds
        for _ in range(5):
            health.record("a", "a-model", breaker, False, "server_error", started=clock.now)

    script = Script(clock, {"a": fail("server_error", 503), "b": ok()})
    result = await run_chain(
        Chain([target("a", retries=1, breaker=breaker), target("b")]),
        script,
        Limits(Deadline(clock.now + 60), budgets=budgets),
        health=health,
        clock=clock,
        sleep=sleep,
        rand=lambda: 0.5,
    )
    assert script.called == ["a", "b"]
    assert [(x.target, x.outcome, x.reason) for x in result.attempts][1] == (
        "a",
        "skipped",
        "circuit_open",
    )
    assert await a_retry_is_made(budgets, clock)


# ---- the cap on physical attempts --------------------------------------------------


async def test_max_attempts_caps_retries_and_fallbacks_together():
    targets = [target("a", retries=5), target("b", retries=5)]
    result, script = await run(
        {"a": fail("server_error"), "b": ok()}, targets=targets, max_attempts=3
    )
    assert script.called == ["a", "a", "a"]
    assert result.error is not None and result.error.type == "max_attempts_reached"
    assert "max_attempts (3)" in result.error.message
    assert [(a.target, a.outcome, a.reason) for a in result.attempts][-1] == (
        "b",
        "skipped",
        "max_attempts",
    )
    # The last call's failure said "fallback", though the cap tried nothing after it.
    assert [a.next for a in result.attempts] == ["retry", "retry", "stop", None]


async def test_skipped_targets_do_not_count_as_attempts():
    targets = [target("a", max_input_tokens=1), target("b", max_input_tokens=1), target("c")]
    result, _ = await run(
        {"a": ok(), "b": ok(), "c": ok()},
        targets=targets,
        needs=Needs(input_tokens=9),
        max_attempts=1,
    )
    assert result.target is not None and result.target.name == "c"


# ---- chains per error class --------------------------------------------------------


async def test_a_context_length_failure_enters_its_own_chain_instead_of_the_rest():
    seen, on_event = events("lifeline.fallback")
    by_kind = {"context_length": [target("long")]}
    replies = {"a": fail("context_length", 400), "b": ok(), "long": ok(content="long answer")}
    result, script = await run(
        replies, targets=[target("a"), target("b")], by_kind=by_kind, on_event=on_event
    )
    assert script.called == ["a", "long"]
    assert result.answer is not None and result.answer.content == "long answer"
    assert seen[0][1]["lifeline.fallback.chain"] == "context_length"


async def test_a_content_filter_failure_enters_its_chain_even_when_fallback_on_excludes_it():
    by_kind = {"content_filter": [target("lenient")]}
    replies = {"strict": fail("content_filter"), "b": ok(), "lenient": ok()}
    _, script = await run(
        replies,
        targets=[target("strict"), target("b")],
        by_kind=by_kind,
        fallback_on=["rate_limit"],
    )
    assert script.called == ["strict", "lenient"]


async def test_other_failures_keep_to_the_main_chain():
    by_kind = {"context_length": [target("long")]}
    _, script = await run(
        {"a": fail("rate_limit"), "b": ok(), "long": ok()},
        targets=[target("a"), target("b")],
        by_kind=by_kind,
    )
    assert script.called == ["a", "b"]


async def test_an_error_class_chain_is_entered_only_once():
    by_kind = {"context_length": [target("long"), target("longer")]}
    replies = {
        "a": fail("context_length"),
        "long": fail("context_length"),
        "longer": fail("context_length"),
    }
    result, script = await run(replies, targets=[target("a")], by_kind=by_kind)
    assert script.called == ["a", "long", "longer"]
    assert result.error is not None and result.error.type == "all_failed"


# ---- fallback disabled -------------------------------------------------------------


async def test_fallback_false_tries_only_the_first_target_but_keeps_its_retries():
    targets = [target("a", retries=1), target("b")]
    result, script = await run(
        {"a": fail("server_error"), "b": ok()}, targets=targets, fallback=False
    )
    assert script.called == ["a", "a"]
    assert result.error is not None and result.error.type == "fallback_stopped"
    assert '"fallback": false' in result.error.message and "not tried: b" in result.error.message
    assert result.attempts[-1].next == "stop"


async def test_fallback_false_also_keeps_error_class_chains_shut():
    by_kind = {"context_length": [target("long")]}
    _, script = await run(
        {"a": fail("context_length"), "long": ok()},
        targets=[target("a")],
        by_kind=by_kind,
        fallback=False,
    )
    assert script.called == ["a"]


async def test_fallback_false_with_a_skipped_first_target_calls_nobody():
    targets = [target("a", max_input_tokens=1), target("b")]
    result, script = await run(
        {"a": ok(), "b": ok()}, targets=targets, needs=Needs(input_tokens=9), fallback=False
    )
    assert script.calls == []
    assert result.error is not None and result.error.type == "fallback_stopped"
    assert "skipped (max_input_tokens)" in result.error.message


# ---- failure passed forward --------------------------------------------------------


async def test_a_target_with_pass_failures_gets_the_earlier_error_kinds():
    targets = [target("a", retries=1), target("b"), target("c", pass_failures=True)]
    replies = {"a": [fail("rate_limit"), fail("timeout")], "b": fail("server_error"), "c": ok()}
    _, script = await run(replies, targets=targets)
    assert script.previous == [(), (), (), ("rate_limit", "timeout", "server_error")]


async def test_the_last_failure_of_a_chain_says_stop_not_fallback():
    result, _ = await run({"a": fail("rate_limit"), "b": fail("server_error")})
    assert [a.next for a in result.attempts] == ["fallback", "stop"]


async def test_a_targets_template_counts_toward_its_max_input_tokens():
    """A templated target is judged on the input as its template makes it."""
    shaping = Shaping(template=Template(user="{input} " * 3))
    targets = [
        target("a", max_input_tokens=100, shaping=shaping),
        target("b", max_input_tokens=100),
    ]
    needs = Needs(input_tokens=50, shaped_tokens=lambda template, with_tools: 150)
    result, _ = await run({"a": ok(), "b": ok()}, targets=targets, needs=needs)
    assert (result.attempts[0].reason, result.target.name) == ("max_input_tokens", "b")
    assert "about 150 tokens" in result.attempts[0].message


async def test_a_cancelled_walk_reports_the_calls_it_cut_short_in_the_callers_list():
    """A request cancelled mid-chain (its client aborted, its dispatcher stopped) still has
    its attempts: those made, and the calls still running as cancelled, a hedge as such."""
    started = asyncio.Event()

    async def call(t, timeout_s, previous):
        if t.name == "a":
            return fail("server_error")  # fails at once: falls back to b
        if t.name == "c":
            started.set()
        await asyncio.sleep(60)  # b and its hedge c never answer

    attempts: list = []
    limits = Limits(Deadline(time.monotonic() + 30), hedge=Hedge(after_s=0.01))
    chain = Chain([target("a"), target("b"), target("c")])
    walk = asyncio.ensure_future(run_chain(chain, call, limits, attempts=attempts))
    await asyncio.wait_for(started.wait(), 5)
    walk.cancel()
    with pytest.raises(asyncio.CancelledError):
        await walk
    assert [(a.target, a.outcome, a.hedge) for a in attempts] == [
        ("a", "error", False),
        ("b", "cancelled", False),
        ("c", "cancelled", True),
    ]
    assert all(a.reason is None for a in attempts[1:])  # the caller says why


async def test_a_walk_cancelled_while_its_race_loser_stops_reports_both_calls():
    """The hedge answered and the call it beat is being cancelled (its worker told) when the
    request is aborted: both calls are in its attempts, the loser as hedge_lost."""
    stopping = asyncio.Event()

    async def call(t, timeout_s, previous):
        if t.name == "b":
            return ok(content="from b")
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:  # its cancel takes a moment to reach its worker
            stopping.set()
            await asyncio.sleep(60)
            raise

    attempts: list = []
    limits = Limits(Deadline(time.monotonic() + 30), hedge=Hedge(after_s=0.01))
    chain = Chain([target("a"), target("b")])
    walk = asyncio.ensure_future(run_chain(chain, call, limits, attempts=attempts))
    await asyncio.wait_for(stopping.wait(), 5)
    walk.cancel()
    with pytest.raises(asyncio.CancelledError):
        await walk
    assert [(a.target, a.outcome, a.reason, a.hedge) for a in attempts] == [
        ("a", "cancelled", "hedge_lost", False),
        ("b", "ok", None, True),
    ]


@pytest.mark.parametrize("hedged", [False, True], ids=["before-its-hedge", "its-hedge"])
async def test_a_raced_call_cancelled_as_its_first_chunk_went_out_counts_that_chunk(hedged):
    """A race's calls run as tasks: one cancelled with the walk as its first chunk went out
    (its cancel says so, as streaming's Relay.started does) had it counted only after the walk
    had reported it as `chunks: 0`. The walk now waits for its calls' cancels, as it does
    for a call not raced (its cancel runs in the walk's own task)."""
    streaming = asyncio.Event()

    async def call(t, timeout_s, previous):
        if t.name == ("b" if hedged else "a"):
            streaming.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError as exc:
            if streaming.is_set() and t.name == ("b" if hedged else "a"):
                exc.chunks_delivered = 1  # its first chunk had gone to the client
            raise

    attempts: list = []
    limits = Limits(Deadline(time.monotonic() + 30), hedge=Hedge(after_s=0.01 if hedged else 30))
    chain = Chain([target("a"), target("b")])
    walk = asyncio.ensure_future(run_chain(chain, call, limits, attempts=attempts, streamed=True))
    await asyncio.wait_for(streaming.wait(), 5)
    walk.cancel()
    with pytest.raises(asyncio.CancelledError):
        await walk
    expected = [("a", "cancelled", 0, False), ("b", "cancelled", 1, True)]
    got = [(a.target, a.outcome, a.chunks, a.hedge) for a in attempts]
    assert got == (expected if hedged else [("a", "cancelled", 1, False)])


async def test_a_walk_cancelled_after_its_hedge_failed_reports_the_hedges_failure():
    """The hedge failed at once and the call it hedged runs on when the request is aborted:
    the hedge's failure is in its attempts, after that call."""
    hedge_failed = asyncio.Event()

    async def call(t, timeout_s, previous):
        if t.name == "b":
            hedge_failed.set()
            return fail("server_error", 503)
        await asyncio.sleep(60)

    attempts: list = []
    limits = Limits(Deadline(time.monotonic() + 30), hedge=Hedge(after_s=0.01))
    chain = Chain([target("a"), target("b"), target("c")])
    walk = asyncio.ensure_future(run_chain(chain, call, limits, attempts=attempts))
    await asyncio.wait_for(hedge_failed.wait(), 5)
    for _ in range(20):  # loop turns, not time: the race hears of it; a runs on
        await asyncio.sleep(0)
    walk.cancel()
    with pytest.raises(asyncio.CancelledError):
        await walk
    assert [(a.target, a.outcome, a.error_type, a.hedge) for a in attempts] == [
        ("a", "cancelled", None, False),
        ("b", "error", "server_error", True),
    ]


async def test_a_failure_in_the_same_turn_as_the_hedges_answer_is_recorded_as_a_failure():
    """The first call fails as its hedge answers: it was not cancelled, it failed, and its
    breaker counts it."""
    from service.health import OPEN, BreakerSettings, Health

    loop = asyncio.get_running_loop()
    gate = loop.create_future()  # both calls end when it opens: in the same turn

    async def call(t, timeout_s, previous):
        if t.name == "b":  # the hedge started
            loop.call_later(0.01, gate.set_result, None)
        await gate
        return fail("server_error", 503) if t.name == "a" else ok(content="from b")

    health = Health()
    a = target("a", breaker=BreakerSettings(consecutive_failures=1))
    limits = Limits(Deadline(time.monotonic() + 5), hedge=Hedge(after_s=0.02))
    result = await run_chain(Chain([a, target("b")]), call, limits, health=health)
    assert result.answer is not None and result.answer.content == "from b"
    assert [(x.target, x.outcome, x.error_type, x.reason, x.hedge) for x in result.attempts] == [
        ("a", "error", "server_error", None, False),
        ("b", "ok", None, None, True),
    ]
    assert health.of("a", "a-model").state == OPEN


async def test_two_answers_in_the_same_turn_serve_the_hedged_call_and_count_both_as_answers():
    """The call and its hedge both answer in the same turn: the call the hedge raced is
    served, every time (not whichever the set of finished calls yields first), and the other's
    answer, paid for and good, is an `ok` attempt that lost the race, counted by its target's
    health as an answer, not as a cancelled call."""
    from service.health import Health

    loop = asyncio.get_running_loop()
    for _ in range(20):
        gate = loop.create_future()  # both calls end when it opens: in the same turn

        async def call(t, timeout_s, previous, gate=gate):
            if t.name == "b":  # the hedge started
                loop.call_later(0.01, gate.set_result, None)
            await gate
            return ok(content=f"from {t.name}")

        health = Health()
        limits = Limits(Deadline(time.monotonic() + 5), hedge=Hedge(after_s=0.02))
        result = await run_chain(Chain([target("a"), target("b")]), call, limits, health=health)
        assert result.answer is not None and result.answer.content == "from a"
        got = [(x.target, x.outcome, x.reason, x.hedge) for x in result.attempts]
        assert got == [("a", "ok", None, False), ("b", "ok", "hedge_lost", True)]
        seen = health.snapshot()
        assert [(seen[t]["ok"], seen[t]["cancelled"]) for t in sorted(seen)] == [(1, 0), (1, 0)]


def _hedged_race(a_says: ProviderReply):
    """`call` for a chain a, b, c hedged after 10 ms: b, the hedge, fails `auth` (outside
    fallback_on) at once, and a answers `a_says` only once b's failure is in; the calls made."""
    b_failed = asyncio.Event()
    made: list[str] = []

    async def call(t, timeout_s, previous):
        made.append(t.name)
        if t.name == "b":
            b_failed.set()
            return fail("auth", 401, "b's key is wrong")
        if t.name == "a":
            await b_failed.wait()
            for _ in range(5):  # the race hears of b's failure before a's end
                await asyncio.sleep(0)
            return a_says
        return ok(content="from c")

    limits = Limits(
        Deadline(time.monotonic() + 5), fallback_on=["server_error"], hedge=Hedge(after_s=0.01)
    )
    return call, limits, made


async def test_a_hedges_failure_outside_fallback_on_does_not_cancel_the_call_it_hedged():
    """Without the hedge, a would have answered: a hedge that fails with a kind that stops the
    chain (a second provider's wrong key) must not cost the request a's answer."""
    call, limits, made = _hedged_race(ok(content="from a"))
    result = await run_chain(Chain([target("a"), target("b"), target("c")]), call, limits)
    assert result.answer is not None and result.answer.content == "from a"
    assert [(x.target, x.outcome, x.error_type, x.hedge) for x in result.attempts] == [
        ("a", "ok", None, False),
        ("b", "error", "auth", True),
    ]
    assert made == ["a", "b"]


async def test_a_hedges_stopping_failure_decides_once_the_call_it_hedged_falls_back_to_it():
    """a fails with a kind that falls back: without the hedge the chain would have called b
    next and stopped at its auth failure, so it stops there, and c is never called."""
    call, limits, made = _hedged_race(fail("server_error", 503))
    result = await run_chain(Chain([target("a"), target("b"), target("c")]), call, limits)
    assert result.answer is None and result.error is not None
    assert result.error.type == "fallback_stopped"
    assert [(x.target, x.outcome, x.error_type, x.next, x.hedge) for x in result.attempts] == [
        ("a", "error", "server_error", "fallback", False),
        ("b", "error", "auth", "stop", True),
    ]
    assert made == ["a", "b"]


async def test_a_hedges_switching_failure_enters_its_chain_once_the_call_it_hedged_falls_back():
    """b, the hedge, fails context_length, which has a chain of its own; a fails later with a
    kind that falls back, to b: without the hedge b's failure would have switched to that
    chain, so it does, and c (the rest of the route) is never called."""
    b_failed = asyncio.Event()
    made: list[str] = []

    async def call(t, timeout_s, previous):
        made.append(t.name)
        if t.name == "b":
            b_failed.set()
            return fail("context_length", 400)
        if t.name == "a":
            await b_failed.wait()
            for _ in range(5):  # the race hears of b's failure before a's end
                await asyncio.sleep(0)
            return fail("server_error", 503)
        return ok(content=f"from {t.name}")

    limits = Limits(
        Deadline(time.monotonic() + 5), fallback_on=["server_error"], hedge=Hedge(after_s=0.01)
    )
    chain = Chain([target("a"), target("b"), target("c")], {"context_length": [target("long")]})
    result = await run_chain(chain, call, limits)
    assert result.answer is not None and result.answer.content == "from long"
    assert [(x.target, x.outcome, x.error_type, x.next, x.hedge) for x in result.attempts] == [
        ("a", "error", "server_error", "fallback", False),
        ("b", "error", "context_length", "fallback", True),
        ("long", "ok", None, None, False),
    ]
    assert made == ["a", "b", "long"]


async def test_the_hedged_calls_own_stopping_failure_still_ends_the_race_at_once():
    """The call a hedge raced fails with a kind outside fallback_on: the chain stops there, as
    without the hedge, and the hedge still running is cancelled."""
    hedge_started = asyncio.Event()

    async def call(t, timeout_s, previous):
        if t.name == "b":
            hedge_started.set()
            await asyncio.sleep(60)
        await hedge_started.wait()
        return fail("auth", 401)

    limits = Limits(
        Deadline(time.monotonic() + 5), fallback_on=["server_error"], hedge=Hedge(after_s=0.01)
    )
    result = await asyncio.wait_for(run_chain(Chain([target("a"), target("b")]), call, limits), 5)
    assert result.error is not None and result.error.type == "fallback_stopped"
    assert [(x.target, x.outcome, x.error_type, x.hedge) for x in result.attempts] == [
        ("a", "error", "auth", False),
        ("b", "cancelled", None, True),
    ]


# ---- timeouts and breakers: which timeouts count against a target ----------------------------


async def test_a_timeout_at_nearly_the_targets_own_timeout_counts_against_it():
    """A request whose timeout equals the target's (30 s each, the example config's) leaves its
    first call a few ms less than 30 s: that call's timeouts still open the breaker."""
    from service.health import OPEN, BreakerSettings, Health

    clock = Clock()
    health = Health(clock=clock, wall=clock)
    hung = target("hung", breaker=BreakerSettings(consecutive_failures=2))
    for _ in range(2):
        arrived = clock.now
        clock.now += 0.002  # the plan, before the first call
        script = Script(clock, {"hung": fail("timeout"), "b": ok()}, took={"hung": 29.998})
        await run_chain(
            Chain([hung, target("b")]),
            script,
            Limits(Deadline(arrived + 30)),
            health=health,
            clock=clock,
            sleep=clock.sleep,
        )
    assert health.of("hung", "hung-model").state == OPEN


async def test_a_timeout_the_requests_short_deadline_cut_does_not_count():
    from service.health import CLOSED, BreakerSettings, Health

    clock = Clock()
    health = Health(clock=clock, wall=clock)
    slow = target("slow", breaker=BreakerSettings(consecutive_failures=2))
    for _ in range(3):
        script = Script(clock, {"slow": fail("timeout")}, took={"slow": 2.0})
        await run_chain(
            Chain([slow]), script, Limits(Deadline(clock.now + 2)), health=health, clock=clock
        )
    assert health.of("slow", "slow-model").state == CLOSED


async def test_a_providers_own_timeout_counts_even_in_a_call_the_deadline_cut_short():
    """A timeout the provider answered itself (Anthropic's 504 timeout_error, an HTTP 408)
    is its own clock running out, not the request's short deadline cutting the call: it
    counts toward the breaker as any failure of the provider does."""
    from service.health import OPEN, BreakerSettings, Health

    clock = Clock()
    health = Health(clock=clock, wall=clock)
    slow = target("slow", breaker=BreakerSettings(consecutive_failures=2))
    for _ in range(2):
        script = Script(clock, {"slow": fail("timeout", 504)}, took={"slow": 0.5})
        await run_chain(
            Chain([slow]), script, Limits(Deadline(clock.now + 2)), health=health, clock=clock
        )
    assert health.of("slow", "slow-model").state == OPEN


async def test_a_retry_after_its_backoff_skips_a_breaker_that_opened_meanwhile():
    from service.health import BreakerSettings, Health

    clock = Clock()
    health = Health(clock=clock, wall=clock)
    breaker = BreakerSettings(consecutive_failures=5)
    a = target("a", retries=1, backoff_s=1.0, breaker=breaker)

    async def sleep(seconds: float) -> None:  # other requests' failures open a's breaker
        clock.now += seconds
        for _ in range(5):
            health.record("a", "a-model", breaker, False, "server_error", started=clock.now)

    script = Script(clock, {"a": [fail("server_error", 503), ok()], "b": ok()})
    events: list[tuple[str, dict]] = []
    result = await run_chain(
        Chain([a, target("b")]),
        script,
        Limits(Deadline(clock.now + 60)),
        health=health,
        clock=clock,
        sleep=sleep,
        on_event=lambda name, attributes: events.append((name, attributes)),
    )
    assert script.called == ["a", "b"]
    assert [(x.target, x.outcome, x.reason) for x in result.attempts][-2:] == [
        ("a", "skipped", "circuit_open"),
        ("b", "ok", None),
    ]
    assert [name for name, _ in events] == ["lifeline.retry", "lifeline.skip", "lifeline.fallback"]


async def test_a_probe_claim_that_outlasts_the_deadline_calls_nobody_and_frees_the_probe():
    """The shared bucket may take up to 250 ms to grant a half-open probe: a request whose
    deadline passed meanwhile ends with deadline_exceeded, the target skipped for the
    deadline, not a call made with no time left (a timeout, all_failed)."""
    from service.health import OPEN, PROBE, BreakerSettings, Health

    clock = Clock()

    class SlowBucket:  # grants the probe, 250 ms later
        shared = True

        async def start(self, health: Health) -> None:
            pass

        async def stop(self) -> None:
            pass

        def announce(self, breaker) -> None:
            pass

        async def claim(self, breaker) -> bool | None:
            clock.now += 0.25
            return True

    health = Health(SlowBucket(), clock=clock, wall=clock)
    a = target("a", breaker=BreakerSettings(cooldown_s=1.0))
    state = health.of(*a.health_key)
    state.state, state.open_until = OPEN, clock.now - 1  # cooled down: the next call probes
    script = Script(clock, {"a": ok()})
    result = await run_chain(
        Chain([a]), script, Limits(Deadline(clock.now + 0.05)), health=health, clock=clock
    )
    assert script.called == []
    assert result.error is not None and result.error.type == "deadline_exceeded"
    assert [(x.target, x.outcome, x.reason) for x in result.attempts] == [
        ("a", "skipped", "deadline")
    ]
    assert health.admit(*a.health_key) == PROBE  # the probe it never sent is the next call's


def test_a_retry_not_made_gives_back_to_the_second_that_paid_for_it():
    """The refund named the second read after the spend: across a second's boundary it went
    to a slot that had paid nothing, and the spend stayed charged for the whole window."""
    now = [9.9999]
    budget = Budget(0.0, reserve=1.0, clock=lambda: now[0])
    assert budget.spend()
    now[0] = 10.0  # the next second, as the policy read it
    budget.refund(budget.spent_in)
    assert budget.spend()  # the reserve is back


# ---- hedge = "p95" on streamed requests -----------------------------------------------------


class Streamed(Started):
    """A streamed call's output: it started (its first chunk came); its end comes `rest_s`
    later on the fake clock."""

    def __init__(self, clock: Clock, rest_s: float, content: str) -> None:
        self.clock, self.rest_s, self.content = clock, rest_s, content
        self.delivered = 1

    async def end(self) -> ProviderReply:
        self.clock.now += self.rest_s
        return ok(content=self.content)

    def abandon(self, why: BaseException | None = None) -> None:
        pass


def p95_hedging(clock: Clock) -> Limits:
    return Limits(Deadline(clock.now + 60), hedge=Hedge(after_s=None, p95=True))


async def streams_of_a(health, clock: Clock) -> None:
    """A history for target a: MIN_SAMPLES streams whose first chunk came after 1 ms and
    whose whole answer after a second, as long answers stream."""
    from service.health import MIN_SAMPLES

    async def call(t, timeout_s, previous):
        clock.now += 0.001
        return Streamed(clock, 1.0, "from a")

    chain = Chain([target("a"), target("b")])
    for _ in range(MIN_SAMPLES):
        result = await run_chain(
            chain, call, p95_hedging(clock), health=health, clock=clock, streamed=True
        )
        assert [x.target for x in result.attempts] == ["a"]  # no p95 yet: no hedge


async def test_a_stream_is_hedged_when_its_first_chunk_is_later_than_the_targets_first_chunks_p95():
    """A stream's race is settled by its first chunk, but hedge = "p95" waited for the p95 of
    whole answers: a stream whose first chunk was 300 times later than usual was not hedged
    before it came (nor would it be for ~1 s, the time a whole answer takes)."""
    from service.health import Health

    clock = Clock()
    health = Health(clock=clock, wall=clock)
    await streams_of_a(health, clock)

    async def call(t, timeout_s, previous):
        if t.name == "a":
            # Its first chunk comes after 0.3 s: far past a's first chunks' p95 (about 1 ms),
            # well before that of its whole answers (about 1 s). Only the event loop's order
            # of timers matters here, never how fast the machine is.
            await asyncio.sleep(0.3)
        return Streamed(clock, 0.0, f"from {t.name}")

    result = await run_chain(
        Chain([target("a"), target("b")]),
        call,
        p95_hedging(clock),
        health=health,
        clock=clock,
        streamed=True,
    )
    assert result.answer is not None and result.answer.content == "from b"
    assert [(x.target, x.outcome, x.reason, x.hedge) for x in result.attempts] == [
        ("a", "cancelled", "hedge_lost", False),
        ("b", "ok", None, True),
    ]


async def test_a_complete_request_is_hedged_at_the_whole_answers_p95_however_fast_streams_start():
    """llm.complete waits for the whole answer: the p95 its hedge waits for is that of whole
    answers, not of the first chunks that streams of the same target get quickly."""
    from service.health import Health

    clock = Clock()
    health = Health(clock=clock, wall=clock)
    await streams_of_a(health, clock)

    async def call(t, timeout_s, previous):
        if t.name == "a":
            await asyncio.sleep(0.3)  # as above: past the first chunks' p95, before the other
        return ok(content=f"from {t.name}")

    result = await run_chain(
        Chain([target("a"), target("b")]), call, p95_hedging(clock), health=health, clock=clock
    )
    assert [(x.target, x.outcome, x.hedge) for x in result.attempts] == [("a", "ok", False)]
