"""The fallback decision, in one place: which target to call next, whether to retry, skip,
fall back or stop, and why.

Pure: no NATS, no telemetry. The caller injects `call(target, timeout_s, previous_errors)`,
which returns the worker's reply or a ProviderFailure for transport outcomes (timeout,
no_responders), an optional `validate` that checks a good answer (response_format), and an
optional `on_event(name, attributes)` that sees every decision as it is taken.

One request walks one chain: the route's targets, or, after a failure of a kind that has a
chain of its own (context_length, content_filter), that chain instead of the rest. For each
target, in order:

    skip it      its capabilities do not fit the request (max_input_tokens, json_output), its
                 circuit breaker is open and it is not the last target left, the request's
                 deadline has passed, or max_attempts physical attempts were made
    call it      with the smaller of its timeout_s and the time the request has left
    hedge it     when the route hedges and the call is still running after hedge_after_ms
                 (or the target's recent p95): the next target starts too, the first good
                 answer wins and the other call is cancelled; the hedge budget allows it
    retry it     on a retry_on failure, up to `retries` times, after a backoff with full
                 jitter (or the provider's Retry-After, when that is longer), if the wait fits
                 before the deadline and the route's retry budget allows it
    fall back    to the next target, if fallback_on allows it (None: every failure does)
    stop         on a failure fallback_on excludes, or when the request disabled fallback

Every attempt, skipped or made, lands in `attempts` with what happened next. Breaker
state and recent latencies come from an injected `health` (service/health.py), which
also hears every call's outcome.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple

from schemas import Attempt, ErrorInfo, ProviderFailure, ProviderOk, ProviderReply, errors
from schemas.wire import (
    ALL_FAILED,
    DEADLINE_EXCEEDED,
    FALLBACK_STOPPED,
    HEDGE_LOST,
    MAX_ATTEMPTS_REACHED,
    NO_CAPABLE_TARGET,
    RETRY_BUDGET,
)
from service.health import CALL, PROBE, Health, Untouched

# What a target retries on when its config names nothing: failures that a second try can fix.
DEFAULT_RETRY_ON = errors.DEFAULT_RETRY_ON  # the kinds schemas.errors marks as retried


class Target(NamedTuple):
    provider: str  # name in config, also the subject token
    kind: str  # provider kind: openai, anthropic, fake, ...
    model: str
    timeout_s: float
    name: str = ""  # label in replies and attempts; "" means the provider's name
    retries: int = 0
    retry_on: Collection[str | int] = DEFAULT_RETRY_ON
    backoff_s: float = 0.25
    max_backoff_s: float = 10.0
    max_input_tokens: int | None = None
    prompt_tokens: int = 0  # what the target's own template adds to the input, estimated
    json_output: bool = True
    pass_failures: bool = False
    weight: float = 1.0  # share within a load-balanced group (routing orders groups per request)
    breaker: Any = None  # its health.BreakerSettings; None: no circuit breaker
    shaping: Any = None  # opaque here: what the dispatcher needs to build this target's request
    # The model its breaker and figures are kept under, when not `model`: routing gives every
    # model the config never names one shared key per provider, so requests cannot grow health.
    health_key: str | None = None

    @property
    def label(self) -> str:
        return self.name or self.provider

    @property
    def health_model(self) -> str:
        return self.model if self.health_key is None else self.health_key


class Chain(NamedTuple):
    targets: Sequence[Target]
    by_kind: Mapping[str, Sequence[Target]] = {}  # error kind -> chain entered on that failure


class Budget:
    """At most `ratio` extra attempts per request of a route over the last 10 seconds, plus a
    reserve of 3 so a quiet route can still retry (Finagle's RetryBudget; Envoy's retry budget
    has the same aim). Each dispatcher keeps its own, so the share holds across replicas too."""

    __slots__ = ("_epochs", "_requests", "_spent", "clock", "ratio", "reserve")
    SLOTS = 10

    def __init__(
        self, ratio: float, reserve: float = 3.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ratio = ratio
        self.reserve = reserve
        self.clock = clock
        self._epochs = [-1] * self.SLOTS
        self._requests = [0] * self.SLOTS
        self._spent = [0] * self.SLOTS

    def _slot(self) -> int:
        second = int(self.clock())
        i = second % self.SLOTS
        if self._epochs[i] != second:
            self._epochs[i] = second
            self._requests[i] = self._spent[i] = 0
        return i

    def deposit(self) -> None:
        self._requests[self._slot()] += 1

    def available(self) -> float:
        self._slot()
        oldest = int(self.clock()) - self.SLOTS + 1
        live = [i for i, epoch in enumerate(self._epochs) if epoch >= oldest]
        return (
            self.ratio * sum(self._requests[i] for i in live)
            + self.reserve
            - sum(self._spent[i] for i in live)
        )

    def spend(self) -> bool:
        if self.available() < 1:
            return False
        self._spent[self._slot()] += 1
        return True


class Budgets(NamedTuple):
    """A route's budgets: retries and hedges spend `retry`; hedges spend `hedge` as well."""

    retry: Budget
    hedge: Budget


class Hedge(NamedTuple):
    after_s: float | None  # a fixed delay; with p95, the least delay
    p95: bool = False  # hedge when the call is slower than the target's recent p95


class Limits(NamedTuple):
    deadline: float  # on the clock's scale
    max_attempts: int = 6  # physical attempts across retries and fallbacks
    fallback_on: Collection[str | int] | None = None
    fallback: bool = True  # False: only the first target (and its retries)
    hedge: Hedge | None = None
    budgets: Budgets | None = None  # None: retries and hedges are not budgeted


class Needs(NamedTuple):
    """What the request asks of a target, for the pre-call capability checks."""

    input_tokens: int | None = None  # estimated; None when no target declares max_input_tokens
    json: bool = False


class ChainResult(NamedTuple):
    answer: ProviderOk | None
    target: Target | None  # who served the answer
    attempts: list[Attempt]
    error: ErrorInfo | None


CallTarget = Callable[[Target, float, tuple[str, ...]], Awaitable[ProviderReply]]
Validate = Callable[[ProviderOk], ProviderOk | ProviderFailure]
OnEvent = Callable[[str, dict[str, Any]], None]

# Outcomes that are not provider errors proper have their own outcome name.
_OUTCOMES = {"timeout": "timeout", "no_responders": "no_responders"}


def falls_back(failure: ProviderFailure, fallback_on: Collection[str | int] | None) -> bool:
    """None means every failure falls back (as LangChain, Haystack and Portkey do)."""
    if fallback_on is None:
        return True
    return matches(failure, fallback_on)


def matches(failure: ProviderFailure, kinds: Collection[str | int]) -> bool:
    return failure.kind in kinds or (
        failure.status_code is not None and failure.status_code in kinds
    )


def skip_reason(target: Target, needs: Needs) -> tuple[str, str] | None:
    """(reason, message) when the request exceeds what the target declares it can take."""
    if target.max_input_tokens is not None and needs.input_tokens is not None:
        tokens = needs.input_tokens + target.prompt_tokens
        if tokens > target.max_input_tokens:
            return "max_input_tokens", (
                f"the input is about {tokens} tokens; {target.label} takes at most {target.max_input_tokens}"
            )
    if needs.json and not target.json_output:
        return (
            "json_output",
            f"the request wants JSON output; {target.label} sets json_output = false",
        )
    return None


def backoff_s(target: Target, retry: int, rand: Callable[[], float]) -> float:
    """Exponential backoff with full jitter (AWS's "Exponential Backoff and Jitter")."""
    return rand() * min(target.max_backoff_s, target.backoff_s * 2**retry)


async def run_chain(
    chain: Chain,
    call: CallTarget,
    limits: Limits,
    *,
    needs: Needs = Needs(),
    validate: Validate | None = None,
    on_event: OnEvent | None = None,
    health: Health | Untouched | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    rand: Callable[[], float] = random.random,
) -> ChainResult:
    run = _Run(limits, on_event, clock, health, validate)
    if limits.budgets is not None:
        limits.budgets.retry.deposit()
        if limits.hedge is not None:  # only a hedging route ever spends its hedge budget
            limits.budgets.hedge.deposit()
    targets, current = (
        chain.targets,
        "",
    )  # current: the error kind whose chain we are on, "" for targets
    entered: set[str] = set()  # each error-class chain is entered at most once
    i = 0
    while i < len(targets):
        target = targets[i]
        i += 1
        if run.ended_one and not limits.fallback:
            return run.fail(_fallback_disabled(run.attempts[-1], targets[i - 1 :]))
        run.ended_one = True
        reason = skip_reason(target, needs)
        if reason is not None:
            run.skip(target, *reason)
            continue
        retry = 0
        probe = False  # this call was let through a breaker that is not closed: its outcome decides
        while True:
            remaining_s = limits.deadline - clock()
            if remaining_s <= 0:
                run.skip_rest(
                    targets[i - 1 :],
                    "deadline",
                    "the request's deadline passed before it could start",
                )
                return run.fail(_deadline_error(targets[i - 1 :]))
            if run.physical >= limits.max_attempts:
                run.skip_rest(
                    targets[i - 1 :],
                    "max_attempts",
                    f"max_attempts ({limits.max_attempts}) reached",
                )
                return run.fail(_max_attempts_error(limits.max_attempts, run.attempts))
            if retry == 0 and health is not None and target.breaker is not None:
                admitted = health.admit(target.provider, target.health_model)
                if admitted != CALL:
                    lease_s = target.timeout_s + 1
                    probe = admitted == PROBE and await health.claim(
                        target.provider, target.health_model, lease_s
                    )
                    if (
                        not probe
                        and limits.fallback
                        and any(skip_reason(t, needs) is None for t in targets[i:])
                    ):
                        health.skipped(target.provider, target.health_model)
                        run.skip(
                            target,
                            "circuit_open",
                            f"{target.label}'s circuit breaker is open: {_why_open(health, target)}",
                        )
                        break
                    probe = True  # the probe, or the last target left: called anyway
            if retry == 0 and run.failed is not None:
                run.fallback_event(run.failed, target, current)
            run.physical += 1
            previous = tuple(run.errors) if target.pass_failures else ()
            timeout_s = min(target.timeout_s, remaining_s)
            rival = (
                targets[i] if i < len(targets) and retry == 0 and not probe else None
            )  # a probe is never hedged
            hedge_s = (
                run.hedge_delay(target) if rival is not None and limits.hedge is not None else None
            )
            if hedge_s is None:
                started = clock()
                reply = await call(target, timeout_s, previous)
                reply, latency_ms = run.finish(
                    target, reply, started, probe, timeout_s < target.timeout_s
                )
                hedged = raced_past = False
            else:

                def settles(failure: ProviderFailure) -> bool:
                    """A failure that ends the chain or switches it wins a race too: the rival is cancelled."""
                    in_class_chain = failure.kind in chain.by_kind and failure.kind not in entered
                    return in_class_chain or not falls_back(failure, limits.fallback_on)

                raced = await run.race(
                    call, target, timeout_s, previous, hedge_s, rival, needs, settles
                )  # type: ignore[arg-type]
                if isinstance(raced, ChainResult):
                    return raced
                hedged = raced[0] is rival
                target, reply, latency_ms, raced_past = raced
                if raced_past:
                    i += 1  # the rival ran as the hedge: the chain goes on after it
            if isinstance(reply, ProviderOk):
                run.attempts.append(
                    Attempt(
                        target.provider,
                        reply.model or target.model,
                        "ok",
                        latency_ms,
                        target=target.label,
                        retry=retry,
                    )
                )
                return ChainResult(reply, target, run.attempts, None)
            run.errors.append(reply.kind)
            delay_s = None if raced_past else _retry_delay(target, reply, retry, run, rand)
            if delay_s is not None:
                run.attempts.append(_failed(target, reply, latency_ms, retry, "retry"))
                run.event(
                    "lifeline.retry", target, reply, {"lifeline.retry.delay_ms": delay_s * 1000}
                )
                await sleep(delay_s)
                retry += 1
                continue
            chain_of_kind = chain.by_kind.get(reply.kind) if reply.kind not in entered else None
            if not limits.fallback or (
                chain_of_kind is None and not falls_back(reply, limits.fallback_on)
            ):
                run.attempts.append(
                    _failed(target, reply, latency_ms, retry, "stop", run.take_denied(), hedged)
                )
                if not limits.fallback:
                    return run.fail(_fallback_disabled(run.attempts[-1], targets[i:]))
                return run.fail(_stopped_error(target, reply, targets[i:]))
            if chain_of_kind is not None:  # e.g. context_length: on to the long-context chain
                targets, current, i = chain_of_kind, reply.kind, 0
                entered.add(reply.kind)
            next_ = "fallback" if i < len(targets) else "stop"
            run.attempts.append(
                _failed(target, reply, latency_ms, retry, next_, run.take_denied(), hedged)
            )
            run.failed = (target, reply)
            break
    if run.physical == 0:
        return run.fail(_nothing_capable_error(run.attempts))
    return run.fail(_all_failed_error(run.attempts))


def _why_open(health: Health, target: Target) -> str:
    state = health.targets.get((target.provider, target.health_model))
    return state.reason if state is not None and state.reason else "it failed recently"


class _Run:
    """The state of one walk along a chain."""

    __slots__ = (
        "attempts",
        "clock",
        "denied",
        "ended_one",
        "errors",
        "failed",
        "health",
        "limits",
        "on_event",
        "physical",
        "validate",
    )

    def __init__(
        self,
        limits: Limits,
        on_event: OnEvent | None,
        clock: Callable[[], float],
        health: Health | Untouched | None = None,
        validate: Validate | None = None,
    ) -> None:
        self.limits = limits
        self.on_event = on_event
        self.clock = clock
        self.health = health
        self.validate = validate
        self.attempts: list[Attempt] = []
        self.errors: list[str] = []  # error kinds of the failed physical attempts, in order
        self.physical = 0
        self.failed: tuple[Target, ProviderFailure] | None = None  # the last failure that fell back
        self.ended_one = False
        self.denied: str | None = (
            None  # why the last failure was not retried, when a budget said no
        )

    def take_denied(self) -> str | None:
        denied, self.denied = self.denied, None
        return denied

    def finish(
        self,
        target: Target,
        reply: ProviderReply,
        started: float,
        probe: bool = False,
        capped: bool = False,
    ) -> tuple[ProviderReply, float]:
        """A call came back: validate a good answer, take its latency, tell health.
        `capped`: the request's deadline cut the call's timeout short, so a timeout says nothing
        about the target's health (short client deadlines must not open breakers). `started`
        goes to health too: a breaker weighs calls in the order they were made."""
        if isinstance(reply, ProviderOk) and self.validate is not None:
            reply = self.validate(reply)
        latency_ms = (self.clock() - started) * 1000
        health = self.health
        if health is not None:
            model = target.health_model
            if isinstance(reply, ProviderOk):
                health.record(
                    target.provider,
                    model,
                    target.breaker,
                    True,
                    latency_ms=latency_ms,
                    probe=probe,
                    started=started,
                )
            elif capped and reply.kind == "timeout":
                health.record(target.provider, model, None, False, reply.kind, started=started)
                if probe:
                    health.release(target.provider, model)  # undecided: the next request probes
            else:
                health.record(
                    target.provider,
                    model,
                    target.breaker,
                    False,
                    reply.kind,
                    reply.status_code,
                    probe=probe,
                    started=started,
                )
        return reply, latency_ms

    def hedge_delay(self, target: Target) -> float | None:
        """Seconds after which `rival` may start next to `target`; None: no hedge for this call."""
        hedge = self.limits.hedge
        if hedge is None or not self.limits.fallback:
            return None
        delay_s = hedge.after_s
        if hedge.p95 and self.health is not None:
            p95_ms = self.health.p95_ms(target.provider, target.health_model)
            if p95_ms is not None:
                delay_s = max(delay_s or 0.0, p95_ms / 1000)
            elif delay_s is None:
                return None  # too few recent answers to know this target's p95
        return delay_s

    def may_hedge(self, rival: Target, needs: Needs) -> bool:
        """Whether `rival` can start now as a hedge: it fits, its breaker is closed, the budgets allow it."""
        if self.physical >= self.limits.max_attempts or self.limits.deadline - self.clock() <= 0:
            return False
        if skip_reason(rival, needs) is not None:
            return False
        if self.health is not None and rival.breaker is not None:
            if self.health.admit(rival.provider, rival.health_model) != CALL:
                return False
        budgets = self.limits.budgets
        if budgets is not None:
            if budgets.hedge.available() < 1 or budgets.retry.available() < 1:
                self.budget_event("hedge", rival)
                return False
            budgets.hedge.spend()
            budgets.retry.spend()
        return True

    async def race(
        self,
        call: CallTarget,
        first: Target,
        timeout_s: float,
        previous: tuple[str, ...],
        delay_s: float,
        rival: Target,
        needs: Needs,
        settles: Callable[[ProviderFailure], bool],
    ) -> ChainResult | tuple[Target, ProviderReply, float, bool]:
        """Call `first`; if it is still running after delay_s, start `rival` too and take the first
        good answer, or the first failure that `settles` the chain (it would stop it or switch
        to an error-class chain). Returns the winner's ChainResult, or (target, failure,
        latency_ms, raced) for the failure the chain goes on from; raced: the rival ran too,
        so neither is retried."""
        started = self.clock()
        first_task = asyncio.ensure_future(call(first, timeout_s, previous))
        capped = {first: timeout_s < first.timeout_s}
        running: dict[asyncio.Future[ProviderReply], tuple[Target, float]] = {
            first_task: (first, started)
        }
        try:
            done, _ = await asyncio.wait({first_task}, timeout=delay_s)
            if done or not self.may_hedge(rival, needs):
                reply, latency_ms = self.finish(
                    first, await first_task, started, capped=capped[first]
                )
                return first, reply, latency_ms, False
            self.physical += 1
            hedge_started = self.clock()
            self._emit(
                "lifeline.hedge",
                {
                    "lifeline.hedge.from": first.label,
                    "lifeline.hedge.to": rival.label,
                    "lifeline.hedge.after_ms": (hedge_started - started) * 1000,
                },
            )
            rival_timeout_s = min(rival.timeout_s, self.limits.deadline - hedge_started)
            rival_previous = tuple(self.errors) if rival.pass_failures else ()
            rival_task = asyncio.ensure_future(call(rival, rival_timeout_s, rival_previous))
            capped[rival] = rival_timeout_s < rival.timeout_s
            running[rival_task] = (rival, hedge_started)
            last: tuple[Target, ProviderReply, float] | None = None
            while running:
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    target, t0 = running.pop(task)
                    reply, latency_ms = self.finish(
                        target, task.result(), t0, capped=capped[target]
                    )
                    if isinstance(reply, ProviderOk):
                        return await self._won(target, reply, latency_ms, target is rival, running)
                    if running and settles(reply):  # e.g. bad_request, when fallback_on excludes it
                        self.attempts.extend(
                            await self._cancel(running, is_hedge=target is not rival)
                        )
                        return target, reply, latency_ms, True
                    if running:  # the other call is still running: it takes over
                        self.attempts.append(
                            _failed(target, reply, latency_ms, 0, "fallback", hedge=target is rival)
                        )
                        self.errors.append(reply.kind)
                    last = (target, reply, latency_ms)
            assert last is not None
            return (*last, True)
        finally:
            for task in running:
                task.cancel()

    async def _won(
        self,
        target: Target,
        reply: ProviderOk,
        latency_ms: float,
        is_hedge: bool,
        running: dict[asyncio.Future[ProviderReply], tuple[Target, float]],
    ) -> ChainResult:
        """The first good answer of a race: cancel the rival (its worker aborts the call) and record both."""
        won = Attempt(
            target.provider,
            reply.model or target.model,
            "ok",
            latency_ms,
            target=target.label,
            hedge=is_hedge,
        )
        lost = await self._cancel(running, is_hedge=not is_hedge)
        self.attempts.extend([*lost, won] if is_hedge else [won, *lost])
        return ChainResult(reply, target, self.attempts, None)

    async def _cancel(
        self, running: dict[asyncio.Future[ProviderReply], tuple[Target, float]], is_hedge: bool
    ) -> list[Attempt]:
        """Cancel the calls still running in a race (their workers abort them); their attempts."""
        lost = []
        for task, (other, t0) in running.items():
            task.cancel()
            lost.append(
                Attempt(
                    other.provider,
                    other.model,
                    "cancelled",
                    (self.clock() - t0) * 1000,
                    target=other.label,
                    reason=HEDGE_LOST,
                    hedge=is_hedge,
                )
            )
        await asyncio.gather(
            *running, return_exceptions=True
        )  # the cancel reaches the worker before we answer
        running.clear()
        return lost

    def skip(self, target: Target, reason: str, message: str) -> None:
        self.attempts.append(
            Attempt(
                target.provider,
                target.model,
                "skipped",
                0.0,
                target=target.label,
                reason=reason,
                message=message,
            )
        )
        self._emit(
            "lifeline.skip",
            {
                "lifeline.target": target.label,
                "lifeline.skip.reason": reason,
                "lifeline.skip.message": message,
            },
        )

    def skip_rest(self, rest: Sequence[Target], reason: str, message: str) -> None:
        for target in rest:
            self.skip(target, reason, message)

    def _emit(self, name: str, attributes: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(name, attributes)

    def budget_event(self, budget: str, target: Target) -> None:
        self._emit(
            "lifeline.budget_spent", {"lifeline.budget": budget, "lifeline.target": target.label}
        )

    def event(
        self, name: str, target: Target, failure: ProviderFailure, extra: dict[str, Any]
    ) -> None:
        self._emit(
            name,
            {
                "lifeline.target": target.label,
                "lifeline.reason": failure.kind,
                "lifeline.status_code": failure.status_code or 0,
                **extra,
            },
        )

    def fallback_event(
        self, failed: tuple[Target, ProviderFailure], successor: Target, chain: str
    ) -> None:
        """Sent only once the successor really starts, so a skipped target gets no fallback event."""
        target, failure = failed
        self._emit(
            "lifeline.fallback",
            {
                "lifeline.fallback.from": target.label,
                "lifeline.fallback.to": successor.label,
                "lifeline.fallback.reason": failure.kind,
                "lifeline.fallback.status_code": failure.status_code or 0,
                "lifeline.fallback.chain": chain or "targets",
            },
        )

    def fail(self, error: ErrorInfo) -> ChainResult:
        return ChainResult(None, None, self.attempts, error)


def _retry_delay(
    target: Target, failure: ProviderFailure, retry: int, run: _Run, rand: Callable[[], float]
) -> float | None:
    """Seconds to wait before retrying `target`, or None when it should not be retried."""
    if retry >= target.retries or not matches(failure, target.retry_on):
        return None
    if run.physical >= run.limits.max_attempts:
        return None
    health = run.health
    if (
        health is not None
        and target.breaker is not None
        and health.admit(target.provider, target.health_model) != CALL
    ):
        return None  # this failure (or a failed probe) opened its breaker: no retries into it
    delay_s = backoff_s(target, retry, rand)
    if failure.retry_after_s is not None:
        if failure.retry_after_s > target.max_backoff_s:
            return None  # the provider asks for a longer pause than this target may wait: fall back
        delay_s = max(delay_s, failure.retry_after_s)
    if run.clock() + delay_s >= run.limits.deadline:
        return None
    budgets = run.limits.budgets
    if budgets is not None and not budgets.retry.spend():
        run.denied = RETRY_BUDGET
        run.budget_event("retry", target)
        return None
    return delay_s


def _failed(
    target: Target,
    failure: ProviderFailure,
    latency_ms: float,
    retry: int,
    next_: str,
    reason: str | None = None,
    hedge: bool = False,
) -> Attempt:
    return Attempt(
        provider=target.provider,
        model=target.model,
        outcome=_OUTCOMES.get(failure.kind, "error"),  # type: ignore[arg-type]
        latency_ms=latency_ms,
        error_type=failure.kind,
        status_code=failure.status_code,
        message=failure.message,
        target=target.label,
        retry=retry,
        reason=reason,
        next=next_,  # type: ignore[arg-type]
        hedge=hedge,
    )


def describe(attempt: Attempt) -> str:
    if attempt.outcome == "skipped":
        return f"{attempt.target or attempt.provider}: skipped ({attempt.reason})"
    status = f" {attempt.status_code}" if attempt.status_code else ""
    retry = f" (retry {attempt.retry})" if attempt.retry else ""
    return f"{attempt.target or attempt.provider}: {attempt.error_type}{status}{retry}"


def _summary(attempts: Sequence[Attempt]) -> str:
    return "; ".join(describe(a) for a in attempts)


def _names(targets: Sequence[Target]) -> str:
    return ", ".join(t.label for t in targets) or "none"


def _all_failed_error(attempts: list[Attempt]) -> ErrorInfo:
    made = sum(1 for a in attempts if a.outcome != "skipped")
    return ErrorInfo(
        ALL_FAILED, f"all {made} attempts failed ({_summary(attempts)}); see attempts for details"
    )


def _nothing_capable_error(attempts: list[Attempt]) -> ErrorInfo:
    return ErrorInfo(
        NO_CAPABLE_TARGET,
        f"no target can take this request, so none was called ({_summary(attempts)}); shorten the input, "
        "drop response_format, or add a target that fits",
    )


def _stopped_error(target: Target, failure: ProviderFailure, rest: Sequence[Target]) -> ErrorInfo:
    status = f" ({failure.status_code})" if failure.status_code else ""
    return ErrorInfo(
        FALLBACK_STOPPED,
        f"{target.label} failed with {failure.kind}{status}, which the route's fallback_on does not "
        f"include, so no fallback was tried (not tried: {_names(rest)}): {failure.message}",
    )


def _fallback_disabled(last: Attempt, rest: Sequence[Target]) -> ErrorInfo:
    what = (
        f"was skipped ({last.reason})"
        if last.outcome == "skipped"
        else f"failed with {last.error_type}"
    )
    return ErrorInfo(
        FALLBACK_STOPPED,
        f'{last.target} {what}; the request set "fallback": false, so no fallback was tried '
        f"(not tried: {_names(rest)}): {last.message}",
    )


def _deadline_error(rest: Sequence[Target]) -> ErrorInfo:
    return ErrorInfo(
        DEADLINE_EXCEEDED,
        f"the request's deadline passed before trying {_names(rest)}; raise timeout_s (or deadline_unix_ms)",
    )


def _max_attempts_error(max_attempts: int, attempts: list[Attempt]) -> ErrorInfo:
    return ErrorInfo(
        MAX_ATTEMPTS_REACHED,
        f"stopped after max_attempts ({max_attempts}) physical attempts ({_summary(attempts)}); "
        "raise max_attempts in the request or the route, up to dispatcher.max_attempts",
    )
