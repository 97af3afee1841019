"""The fallback decision, in one place: which target to call next, whether to retry, skip,
fall back or stop, and why.

Pure: no NATS, no telemetry. The caller injects `call(target, timeout_s, previous_errors)`,
which returns the worker's reply or a ProviderFailure for transport outcomes (timeout,
no_responders), an optional `validate` that checks a good answer (response_format), and an
optional `on_event(name, attributes)` that sees every decision as it is taken.

One request walks one chain: the route's targets, or, after a failure of a kind that has a
chain of its own (context_length, content_filter), that chain instead of the rest. For each
target, in order:

    skip it      its capabilities do not fit the request (max_input_tokens, json_output), the
                 request's deadline has passed, or max_attempts physical attempts were made
    call it      with the smaller of its timeout_s and the time the request has left
    retry it     on a retry_on failure, up to `retries` times, after a backoff with full
                 jitter (or the provider's Retry-After, when that is longer), if the wait fits
                 before the deadline
    fall back    to the next target, if fallback_on allows it (None: every failure does)
    stop         on a failure fallback_on excludes, or when the request disabled fallback

Every attempt, skipped or made, lands in `attempts` with what happened next.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple

from schemas import Attempt, ErrorInfo, ProviderFailure, ProviderOk, ProviderReply
from schemas.wire import ALL_FAILED, DEADLINE_EXCEEDED, FALLBACK_STOPPED, MAX_ATTEMPTS_REACHED, NO_CAPABLE_TARGET

# What a target retries on when its config names nothing: failures that a second try can fix.
DEFAULT_RETRY_ON = frozenset({"rate_limit", "server_error", "timeout", "connection"})


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
    shaping: Any = None  # opaque here: what the dispatcher needs to build this target's request

    @property
    def label(self) -> str:
        return self.name or self.provider


class Chain(NamedTuple):
    targets: Sequence[Target]
    by_kind: Mapping[str, Sequence[Target]] = {}  # error kind -> chain entered on that failure


class Limits(NamedTuple):
    deadline: float  # on the clock's scale
    max_attempts: int = 6  # physical attempts across retries and fallbacks
    fallback_on: Collection[str | int] | None = None
    fallback: bool = True  # False: only the first target (and its retries)


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
    return failure.kind in kinds or (failure.status_code is not None and failure.status_code in kinds)


def skip_reason(target: Target, needs: Needs) -> tuple[str, str] | None:
    """(reason, message) when the request exceeds what the target declares it can take."""
    if target.max_input_tokens is not None and needs.input_tokens is not None:
        tokens = needs.input_tokens + target.prompt_tokens
        if tokens > target.max_input_tokens:
            return "max_input_tokens", (
                f"the input is about {tokens} tokens; {target.label} takes at most {target.max_input_tokens}"
            )
    if needs.json and not target.json_output:
        return "json_output", f"the request wants JSON output; {target.label} sets json_output = false"
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
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    rand: Callable[[], float] = random.random,
) -> ChainResult:
    run = _Run(limits, on_event, clock)
    targets, current = chain.targets, ""  # current: the error kind whose chain we are on, "" for targets
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
        while True:
            remaining_s = limits.deadline - clock()
            if remaining_s <= 0:
                run.skip_rest(targets[i - 1 :], "deadline", "the request's deadline passed before it could start")
                return run.fail(_deadline_error(targets[i - 1 :]))
            if run.physical >= limits.max_attempts:
                run.skip_rest(targets[i - 1 :], "max_attempts", f"max_attempts ({limits.max_attempts}) reached")
                return run.fail(_max_attempts_error(limits.max_attempts, run.attempts))
            if retry == 0 and run.failed is not None:
                run.fallback_event(run.failed, target, current)
            run.physical += 1
            started = clock()
            previous = tuple(run.errors) if target.pass_failures else ()
            reply = await call(target, min(target.timeout_s, remaining_s), previous)
            if isinstance(reply, ProviderOk) and validate is not None:
                reply = validate(reply)
            latency_ms = (clock() - started) * 1000
            if isinstance(reply, ProviderOk):
                run.attempts.append(
                    Attempt(target.provider, reply.model or target.model, "ok", latency_ms, target=target.label, retry=retry)
                )
                return ChainResult(reply, target, run.attempts, None)
            run.errors.append(reply.kind)
            delay_s = _retry_delay(target, reply, retry, run, rand)
            if delay_s is not None:
                run.attempts.append(_failed(target, reply, latency_ms, retry, "retry"))
                run.event("lifeline.retry", target, reply, {"lifeline.retry.delay_ms": delay_s * 1000})
                await sleep(delay_s)
                retry += 1
                continue
            chain_of_kind = chain.by_kind.get(reply.kind) if reply.kind not in entered else None
            if not limits.fallback or (chain_of_kind is None and not falls_back(reply, limits.fallback_on)):
                run.attempts.append(_failed(target, reply, latency_ms, retry, "stop"))
                if not limits.fallback:
                    return run.fail(_fallback_disabled(run.attempts[-1], targets[i:]))
                return run.fail(_stopped_error(target, reply, targets[i:]))
            if chain_of_kind is not None:  # e.g. context_length: on to the long-context chain
                targets, current, i = chain_of_kind, reply.kind, 0
                entered.add(reply.kind)
            run.attempts.append(_failed(target, reply, latency_ms, retry, "fallback" if i < len(targets) else "stop"))
            run.failed = (target, reply)
            break
    if run.physical == 0:
        return run.fail(_nothing_capable_error(run.attempts))
    return run.fail(_all_failed_error(run.attempts))


class _Run:
    """The state of one walk along a chain."""

    __slots__ = ("limits", "on_event", "clock", "attempts", "errors", "physical", "failed", "ended_one")

    def __init__(self, limits: Limits, on_event: OnEvent | None, clock: Callable[[], float]) -> None:
        self.limits = limits
        self.on_event = on_event
        self.clock = clock
        self.attempts: list[Attempt] = []
        self.errors: list[str] = []  # error kinds of the failed physical attempts, in order
        self.physical = 0
        self.failed: tuple[Target, ProviderFailure] | None = None  # the last failure that fell back
        self.ended_one = False

    def skip(self, target: Target, reason: str, message: str) -> None:
        self.attempts.append(
            Attempt(target.provider, target.model, "skipped", 0.0, target=target.label, reason=reason, message=message)
        )
        if self.on_event is not None:
            self.on_event(
                "lifeline.skip",
                {"lifeline.target": target.label, "lifeline.skip.reason": reason, "lifeline.skip.message": message},
            )

    def skip_rest(self, rest: Sequence[Target], reason: str, message: str) -> None:
        for target in rest:
            self.skip(target, reason, message)

    def event(self, name: str, target: Target, failure: ProviderFailure, extra: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(
                name,
                {
                    "lifeline.target": target.label,
                    "lifeline.reason": failure.kind,
                    "lifeline.status_code": failure.status_code or 0,
                    **extra,
                },
            )

    def fallback_event(self, failed: tuple[Target, ProviderFailure], successor: Target, chain: str) -> None:
        """Sent only once the successor really starts, so a skipped target gets no fallback event."""
        if self.on_event is not None:
            target, failure = failed
            self.on_event(
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


def _retry_delay(target: Target, failure: ProviderFailure, retry: int, run: _Run, rand: Callable[[], float]) -> float | None:
    """Seconds to wait before retrying `target`, or None when it should not be retried."""
    if retry >= target.retries or not matches(failure, target.retry_on):
        return None
    if run.physical >= run.limits.max_attempts:
        return None
    delay_s = backoff_s(target, retry, rand)
    if failure.retry_after_s is not None:
        if failure.retry_after_s > target.max_backoff_s:
            return None  # the provider asks for a longer pause than this target may wait: fall back
        delay_s = max(delay_s, failure.retry_after_s)
    if run.clock() + delay_s >= run.limits.deadline:
        return None
    return delay_s


def _failed(target: Target, failure: ProviderFailure, latency_ms: float, retry: int, next_: str) -> Attempt:
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
        next=next_,  # type: ignore[arg-type]
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
    return ErrorInfo(ALL_FAILED, f"all {made} attempts failed ({_summary(attempts)}); see attempts for details")


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
    what = f"was skipped ({last.reason})" if last.outcome == "skipped" else f"failed with {last.error_type}"
    return ErrorInfo(
        FALLBACK_STOPPED,
        f"{last.target} {what}; the request set \"fallback\": false, so no fallback was tried "
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
