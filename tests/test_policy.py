"""run_chain, the fallback decision, with a scripted `call` and a fake clock: no NATS."""

from __future__ import annotations

import pytest

from schemas import ERROR_KINDS, ProviderFailure, ProviderOk, ProviderReply
from service.policy import Target, run_chain


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Script:
    """A fake `call`: one queued reply per target name; each call may spend fake-clock time."""

    def __init__(self, clock: Clock, replies: dict[str, ProviderReply], took: dict[str, float] | None = None) -> None:
        self.clock = clock
        self.replies = {name: [reply] for name, reply in replies.items()}
        self.took = took or {}
        self.calls: list[tuple[str, float]] = []  # (provider, timeout_s it was given)

    async def __call__(self, target: Target, timeout_s: float) -> ProviderReply:
        self.calls.append((target.provider, timeout_s))
        self.clock.now += self.took.get(target.provider, 0.0)
        return self.replies[target.provider].pop(0)

    @property
    def called(self) -> list[str]:
        return [name for name, _ in self.calls]


def target(name: str, timeout_s: float = 30.0) -> Target:
    return Target(name, "fake", f"{name}-model", timeout_s)


def ok(model: str = "served-model", content: str = "hi") -> ProviderOk:
    return ProviderOk(content=content, model=model)


def fail(kind: str = "server_error", status: int | None = None, message: str = "boom") -> ProviderFailure:
    return ProviderFailure(kind=kind, message=message, status_code=status)


async def run(replies: dict[str, ProviderReply], *, took=None, deadline_in: float = 60.0, timeouts=None, **kw):
    """Run a chain over the targets named in `replies`, in order; returns (result, script)."""
    clock = Clock()
    script = Script(clock, replies, took)
    targets = [target(name, (timeouts or {}).get(name, 30.0)) for name in replies]
    result = await run_chain(targets, script, deadline=clock.now + deadline_in, clock=clock, **kw)
    return result, script


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
    result, _ = await run({"a": fail("server_error", 503), "b": ok()}, fallback_on=["rate_limit", 503])
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
    replies = {"a": fail("server_error", 500, "oops"), "b": fail("rate_limit", 429, "slow down"), "c": fail("timeout")}
    result, script = await run(replies)
    assert script.called == ["a", "b", "c"]
    assert result.error is not None and result.error.type == "all_failed"
    got = [(a.provider, a.error_type, a.status_code, a.message) for a in result.attempts]
    assert got == [("a", "server_error", 500, "oops"), ("b", "rate_limit", 429, "slow down"), ("c", "timeout", None, "boom")]
    assert "all 3 targets failed" in result.error.message


async def test_each_attempt_gets_its_own_timeout_capped_by_the_time_left():
    replies = {"a": fail("timeout"), "b": fail("timeout"), "c": ok()}
    _, script = await run(replies, took={"a": 4.0, "b": 5.0}, deadline_in=10.0, timeouts={"a": 4.0, "b": 5.0})
    assert script.calls == [("a", 4.0), ("b", 5.0), ("c", 1.0)]  # c: 30 s of its own, 1 s left


async def test_a_target_that_cannot_start_before_the_deadline_is_not_called():
    replies = {"a": fail("timeout"), "b": ok(), "c": ok()}
    result, script = await run(replies, took={"a": 10.0}, deadline_in=10.0, timeouts={"a": 10.0})
    assert script.called == ["a"]
    assert result.answer is None
    assert result.error is not None and result.error.type == "deadline_exceeded"
    assert "b, c" in result.error.message
    assert [a.provider for a in result.attempts] == ["a"]


async def test_a_deadline_already_past_calls_nobody():
    result, script = await run({"a": ok()}, deadline_in=-1.0)
    assert script.calls == [] and result.attempts == []
    assert result.error is not None and result.error.type == "deadline_exceeded"


async def test_on_fallback_is_called_once_per_move_and_not_after_the_last_target():
    seen = []
    replies = {"a": fail("rate_limit", 429), "b": fail("server_error", 503), "c": fail("timeout")}
    await run(replies, on_fallback=lambda failed, nxt, why: seen.append((failed.provider, nxt.provider, why)))
    assert seen == [("a", "b", replies["a"]), ("b", "c", replies["b"])]


async def test_on_fallback_is_not_called_when_the_chain_stops_or_answers():
    seen = []
    await run({"a": fail("auth", 401), "b": ok()}, fallback_on=["rate_limit"], on_fallback=lambda *a: seen.append(a))
    await run({"a": ok(), "b": ok()}, on_fallback=lambda *a: seen.append(a))
    assert seen == []


@pytest.mark.parametrize(
    ("kind", "outcome"),
    [("timeout", "timeout"), ("no_responders", "no_responders"), ("rate_limit", "error"),
     ("server_error", "error"), ("connection", "error"), ("auth", "error")],
)  # fmt: skip
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
    clock = Clock(now=0.0)
    script = Script(clock, {"a": fail()}, took={"a": 5.0})  # a's failure uses up the whole request
    seen: list[tuple] = []
    result = await run_chain(
        [target("a"), target("b")], script, deadline=5.0, clock=clock, on_fallback=lambda *args: seen.append(args)
    )
    assert result.error is not None and result.error.type == "deadline_exceeded"
    assert (script.called, seen) == (["a"], [])
