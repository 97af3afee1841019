"""The fallback decision, in one place: try targets in order, stop at the first good answer.

Pure: no NATS, no telemetry. The caller injects `call(target, timeout_s)`, which returns
the worker's reply or a ProviderFailure for transport outcomes (timeout, no_responders),
and an optional `on_fallback` hook that sees each decision to move on.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import NamedTuple

from schemas import Attempt, ErrorInfo, ProviderFailure, ProviderOk, ProviderReply
from schemas.wire import ALL_FAILED, DEADLINE_EXCEEDED, FALLBACK_STOPPED


class Target(NamedTuple):
    provider: str  # name in config, also the subject token
    kind: str  # provider kind: openai, anthropic, fake, ...
    model: str
    timeout_s: float


class ChainResult(NamedTuple):
    answer: ProviderOk | None
    target: Target | None  # who served the answer
    attempts: list[Attempt]
    error: ErrorInfo | None


CallTarget = Callable[[Target, float], Awaitable[ProviderReply]]
OnFallback = Callable[[Target, Target, ProviderFailure], None]

# Outcomes that are not provider errors proper have their own outcome name.
_OUTCOMES = {"timeout": "timeout", "no_responders": "no_responders"}


def falls_back(failure: ProviderFailure, fallback_on: Collection[str | int] | None) -> bool:
    """None means every failure falls back (as LangChain, Haystack and Portkey do)."""
    if fallback_on is None:
        return True
    return failure.kind in fallback_on or (failure.status_code is not None and failure.status_code in fallback_on)


async def run_chain(
    targets: Sequence[Target],
    call: CallTarget,
    *,
    deadline: float,
    fallback_on: Collection[str | int] | None = None,
    on_fallback: OnFallback | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> ChainResult:
    """Try each target until one answers; `deadline` is on `clock`'s scale."""
    attempts: list[Attempt] = []
    previous: tuple[Target, ProviderFailure] | None = None
    for i, target in enumerate(targets):
        remaining_s = deadline - clock()
        if remaining_s <= 0:
            return ChainResult(None, None, attempts, _deadline_error(targets[i:]))
        if previous is not None and on_fallback is not None:
            on_fallback(previous[0], target, previous[1])  # only once the successor really starts
        started = clock()
        reply = await call(target, min(target.timeout_s, remaining_s))
        latency_ms = (clock() - started) * 1000
        if isinstance(reply, ProviderOk):
            attempts.append(Attempt(target.provider, reply.model or target.model, "ok", latency_ms))
            return ChainResult(reply, target, attempts, None)
        attempts.append(_failed_attempt(target, reply, latency_ms))
        if not falls_back(reply, fallback_on):
            return ChainResult(None, None, attempts, _stopped_error(target, reply, targets[i + 1 :]))
        previous = (target, reply)
    return ChainResult(None, None, attempts, _all_failed_error(attempts))


def _failed_attempt(target: Target, failure: ProviderFailure, latency_ms: float) -> Attempt:
    return Attempt(
        provider=target.provider,
        model=target.model,
        outcome=_OUTCOMES.get(failure.kind, "error"),  # type: ignore[arg-type]
        latency_ms=latency_ms,
        error_type=failure.kind,
        status_code=failure.status_code,
        message=failure.message,
    )


def describe(attempt: Attempt) -> str:
    status = f" {attempt.status_code}" if attempt.status_code else ""
    return f"{attempt.provider}: {attempt.error_type}{status}"


def _all_failed_error(attempts: list[Attempt]) -> ErrorInfo:
    summary = "; ".join(describe(a) for a in attempts)
    return ErrorInfo(ALL_FAILED, f"all {len(attempts)} targets failed ({summary}); see attempts for details")


def _stopped_error(target: Target, failure: ProviderFailure, rest: Sequence[Target]) -> ErrorInfo:
    skipped = ", ".join(t.provider for t in rest) or "none"
    status = f" ({failure.status_code})" if failure.status_code else ""
    return ErrorInfo(
        FALLBACK_STOPPED,
        f"{target.provider} failed with {failure.kind}{status}, which the route's fallback_on does not "
        f"include, so no fallback was tried (not tried: {skipped}): {failure.message}",
    )


def _deadline_error(rest: Sequence[Target]) -> ErrorInfo:
    names = ", ".join(t.provider for t in rest)
    return ErrorInfo(DEADLINE_EXCEEDED, f"the request's timeout_s ran out before trying {names}; raise timeout_s")
