"""The fallback decision, in one place: which target to call next, whether to retry, skip,
fall back or stop, and why.

Pure: no NATS, no telemetry. The caller injects `call(target, timeout_s, previous_errors)`,
which returns the worker's reply or a ProviderFailure for transport outcomes (timeout,
no_responders), an optional `validate` that checks a good answer (response_format), and an
optional `on_event(name, attributes)` that sees every decision as it is taken.

One request walks one chain with a Cursor: the route's targets, or, after a failure of a
kind that has a chain of its own (context_length, content_filter), that chain instead of the
rest. Each step is a decision, a value the loop in `run_chain` acts on:

    Call      the target fits and may be called: with the smaller of its timeout_s and the
              time the request has left. When the route hedges and the call is still running
              after hedge_after_ms (or the target's recent p95: of whole answers, or for a
              streamed request of first chunks, which settle its race), the next target
              starts too (a hedge, one kind of attempt): the first good answer wins, the
              other is cancelled
    Skip      its capabilities do not fit the request (max_input_tokens, json_output, tools,
              vision), or its circuit breaker is open and another target that fits is left
    Retry     a retry_on failure, up to `retries` times, after a backoff with full jitter (or
              the provider's Retry-After, when that is longer), if the wait fits before the
              deadline and the route's retry budget allows it
    FallBack  on to the next target, when fallback_on allows it (None: every failure does)
    Switch    on to the chain of the failure's kind, instead of the rest (each entered once)
    Stop      a failure fallback_on excludes, fallback disabled by the request, the deadline
              passed, or max_attempts physical attempts made

A new rule is a new decision, not a flag threaded through the loop. Every attempt, skipped
or made, lands in `attempts` with what happened next. Breaker state
and recent latencies come from an injected `health` (service/health.py), which also hears
every call's outcome.

A streamed call (llm.stream) returns `Started` at its first chunk instead of a reply: from
then on its output reaches the client, so a race (hedge) is settled by the first chunk, and
`Started.end()` gives the reply. A failure after that is a mid-stream failure (Outcome's
`streamed` > 0): never retried, and with on_midstream = "fail" it stops the request
(`_Run.decide`); otherwise the chain goes on as after any failure, and the front end voids or
continues the partial output (service/streaming.py).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import msgspec

from schemas import Attempt, ErrorInfo, ProviderFailure, ProviderOk, ProviderReply
from schemas.deadline import MIN_CALL_S, Deadline
from schemas.errors import WHOLE_TIMEOUT_SHARE
from schemas.wire import (
    ALL_FAILED,
    DEADLINE_EXCEEDED,
    FALLBACK_STOPPED,
    HEDGE_LOST,
    MAX_ATTEMPTS_REACHED,
    MIDSTREAM_FAILED,
    NO_CAPABLE_TARGET,
    RETRY_BUDGET,
)
from service.budgets import Budgets
from service.health import CALL, CLOSED, PROBE, Health, Untouched
from service.target import Target

if TYPE_CHECKING:
    from service.shaping import Template


class Chain(NamedTuple):
    targets: Sequence[Target]
    by_kind: Mapping[str, Sequence[Target]] = {}  # error kind -> chain entered on that failure


class Hedge(NamedTuple):
    after_s: float | None  # a fixed delay; with p95, the least delay
    p95: bool = False  # hedge when the call is slower than the target's recent p95


# The values made per request (here Limits, ChainResult, Outcome; routing's Plan, the engine's
# Inbound) are frozen msgspec Structs: built in C, where a NamedTuple's __new__ is Python
# (about 2,300 instructions against 20, counted with callgrind).
class Limits(msgspec.Struct, frozen=True):
    deadline: Deadline  # on the injected clock's scale
    max_attempts: int = 6  # physical attempts across retries and fallbacks
    fallback_on: Collection[str | int] | None = None
    fallback: bool = True  # False: only the first target (and its retries)
    hedge: Hedge | None = None
    budgets: Budgets | None = None  # None: retries and hedges are not budgeted
    on_midstream: str = "reset"  # "fail": a failure after the first chunk stops the request


class Needs(NamedTuple):
    """What the request asks of a target, for the pre-call capability checks."""

    input_tokens: int | None = None  # estimated; None when no target declares max_input_tokens
    json: bool = False
    tools: bool = False  # the request offers tools
    images: bool = False  # a message has an image
    # The input as a target's shaping makes it, estimated: (its template or None, whether it
    # is sent the tools) -> tokens (a template may repeat the input or replace a long system
    # prompt; drop = ["tools"] leaves their definitions out). None: the request's own
    # estimate serves every target.
    shaped_tokens: Callable[[Template | None, bool], int] | None = None
    # tool_choice is "required" or names a tool: a target sent no tools cannot answer it.
    tool_call: bool = False


class ChainResult(msgspec.Struct, frozen=True):
    answer: ProviderOk | None
    target: Target | None  # who served the answer
    attempts: list[Attempt]
    error: ErrorInfo | None


class Started:
    """What a streamed call returns at its first chunk: its output is reaching the client.
    `end()` waits for the rest and gives the reply (its `content` the whole text);
    `delivered` is how many chunks of it the client got."""

    delivered: int = 0

    async def end(self) -> ProviderReply:
        raise NotImplementedError

    def abandon(self, why: BaseException | None = None) -> None:
        """Nobody follows this output any more (a race settled otherwise, a cancel): stop its
        call without waiting for its end. `why`: the cancel that stopped it, for its span."""
        raise NotImplementedError


class _CutShort(Started):
    """A streamed call cancelled after its first chunks reached the client but before it
    returned its output (an abort read in the same turn as its first chunk): the cancel says
    how many, as `chunks_delivered` (service/streaming.py's Relay.started sets it)."""

    def __init__(self, delivered: int) -> None:
        self.delivered = delivered


CallTarget = Callable[[Target, float, tuple[str, ...]], Awaitable[ProviderReply | Started]]
Validate = Callable[[ProviderOk], ProviderOk | ProviderFailure]
OnEvent = Callable[[str, dict[str, Any]], None]
Next = Literal["retry", "fallback", "stop"]

NO_NEEDS = Needs()  # what a request asks when it asks nothing special of its targets


# The decisions: what the loop does next.
@dataclass(frozen=True, slots=True)
class Call:
    probe: bool = False  # let through a breaker that is not closed: its outcome decides it


_CALL = Call()  # the decision of almost every step: made once
_PROBE = Call(probe=True)


class _Claim:
    """A breaker whose cooldown is over: the call may be its probe, once claimed
    (`_Run.claim`, the one step that waits on the health store)."""


_CLAIM = _Claim()


@dataclass(frozen=True, slots=True)
class Skip:
    reason: str  # one of schemas.errors.SKIP_REASONS
    message: str


@dataclass(frozen=True, slots=True)
class Retry:
    delay_s: float


@dataclass(frozen=True, slots=True)
class FallBack:
    pass


@dataclass(frozen=True, slots=True)
class Switch:
    kind: str  # the error kind whose chain comes next


@dataclass(frozen=True, slots=True)
class Stop:
    error: ErrorInfo
    # The targets left, recorded as skipped for this reason (deadline, max_attempts).
    skip_rest: tuple[Sequence[Target], str, str] | None = None


class Outcome(msgspec.Struct, frozen=True):
    """How one call ended (for a race: the call that decides it)."""

    target: Target
    reply: ProviderReply
    latency_ms: float
    hedge: bool = False  # the call was started as a hedge
    raced: bool = False  # another call ran beside it, so neither is retried
    # The race's other calls, entered beside this one in the order they started: those it
    # cancelled when it settled the race, and those that failed while it ran (or as it ended).
    cancelled: tuple[Attempt, ...] = ()
    streamed: int = 0  # chunks of its answer the client received before it ended


class Cursor(msgspec.Struct):
    """Where a request is along its chain: `Cursor(chain, chain.targets)` at its start. A
    msgspec Struct, made per request and built in C (a class with an `__init__` of its own
    cost about 1,000 instructions more, counted)."""

    _chain: Chain
    _targets: Sequence[Target]  # the chain walked now: the route's, or a failure kind's
    _i: int = 0  # the index of the target after the current one
    kind: str = ""  # the error kind whose chain this is; "" for the route's own
    _entered: tuple[str, ...] = ()  # the kinds whose chains were entered (rarely any)

    def next(self) -> Target | None:
        if self._i >= len(self._targets):
            return None
        self._i += 1
        return self._targets[self._i - 1]

    def peek(self) -> Target | None:
        """The target after the current one: a hedge's rival."""
        return self._targets[self._i] if self._i < len(self._targets) else None

    def pass_next(self) -> None:
        """The next target already ran, as a hedge: the chain goes on after it."""
        self._i += 1

    def rest(self) -> Sequence[Target]:
        """The targets after the current one."""
        return self._targets[self._i :]

    def from_current(self) -> Sequence[Target]:
        return self._targets[max(self._i - 1, 0) :]

    def chain_for(self, kind: str) -> Sequence[Target] | None:
        """The chain a failure of `kind` switches to; None when it has none (an empty one is
        none: switching to it ended the walk) or was entered."""
        return None if kind in self._entered else self._chain.by_kind.get(kind) or None

    def switch(self, kind: str) -> None:
        self._targets, self.kind, self._i = self._chain.by_kind[kind], kind, 0
        self._entered += (kind,)


def falls_back(failure: ProviderFailure, fallback_on: Collection[str | int] | None) -> bool:
    """None means every failure falls back (as LangChain, Haystack and Portkey do)."""
    if fallback_on is None:
        return True
    return matches(failure, fallback_on)


def matches(failure: ProviderFailure, kinds: Collection[str | int]) -> bool:
    status = failure.status_code
    return failure.kind in kinds or (status is not None and status in kinds)


def retried(failure: ProviderFailure, retry_on: Collection[str | int]) -> bool:
    """Whether a target's `retry_on` retries this failure: by its kind or its HTTP status, but
    a spent quota only when `quota` is named. OpenAI says "insufficient_quota" with the 429 of
    a rate limit, and `retry_on = [429]` asks for rate limits to be waited out: no wait cures
    a spent quota, which a retry would only call again (and spend the retry budget on)."""
    if failure.kind == "quota":
        return "quota" in retry_on
    return matches(failure, retry_on)


def skip_reason(target: Target, needs: Needs) -> tuple[str, str] | None:
    """(reason, message) when the request exceeds what the target declares it can take."""
    if target.max_input_tokens is not None and needs.input_tokens is not None:
        tokens, shaping = needs.input_tokens, target.shaping
        if shaping is not None and needs.shaped_tokens is not None:
            without_tools = "tools" in shaping.drop
            if shaping.template is not None or without_tools:
                tokens = needs.shaped_tokens(shaping.template, not without_tools)
        if tokens > target.max_input_tokens:
            return "max_input_tokens", (
                f"the input is about {tokens} tokens; "
                f"{target.name} takes at most {target.max_input_tokens}"
            )
    if needs.json and not target.json_output:
        return (
            "json_output",
            f"the request wants JSON output; {target.name} sets json_output = false",
        )
    if needs.tools and not target.tools:
        return "tools", f"the request offers tools; {target.name} sets tools = false"
    if needs.tool_call and target.shaping is not None and "tools" in target.shaping.drop:
        return "tools", f"the request requires a tool call; {target.name} drops tools"
    if needs.images and not target.vision:
        return "vision", f"the request has images; {target.name} sets vision = false"
    return None


def backoff_s(target: Target, retry: int, rand: Callable[[], float]) -> float:
    """Exponential backoff with full jitter (AWS's "Exponential Backoff and Jitter")."""
    return rand() * min(target.max_backoff_s, target.backoff_s * 2**retry)


async def run_chain(
    chain: Chain,
    call: CallTarget,
    limits: Limits,
    *,
    needs: Needs = NO_NEEDS,
    validate: Validate | None = None,
    on_event: OnEvent | None = None,
    health: Health | Untouched | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    rand: Callable[[], float] = random.random,
    attempts: list[Attempt] | None = None,
    streamed: bool = False,
) -> ChainResult:
    """Walk `chain`; `attempts`, when given, is the list the walk records its attempts in, so
    a caller whose walk is cancelled still has them: then the calls still running are in it
    too, as `cancelled` (their reason is the caller's to give), and a race's calls that ended
    before the race was over (its loser, hedge_lost; its winner). `streamed`: the request is
    llm.stream's, its calls return Started at their first chunk."""
    run = _Run(
        Cursor(chain, chain.targets),
        call,
        limits,
        needs,
        validate,
        on_event,
        health,
        clock,
        rand,
        attempts if attempts is not None else [],
        streamed,
    )
    budgets = limits.budgets
    if budgets is not None:  # the request counts toward its route's budgets
        budgets.retry.deposit()
        if limits.hedge is not None:  # only a hedging route ever spends its hedge budget
            budgets.hedge.deposit()
    try:  # the walk, here rather than in a coroutine of its own: one frame less per wake-up
        while (target := run.cursor.next()) is not None:
            retry = 0
            decision = run.admit(target)  # no await unless a probe is claimed: the common step
            if decision is _CLAIM:
                decision = await run.claim(target)
            while isinstance(decision, Call):
                probe = decision.probe
                outcome = await run.attempt(target, retry, probe)
                if isinstance(outcome.reply, ProviderOk):
                    return run.succeed(outcome, retry)
                decision = run.decide(outcome, retry)
                if isinstance(decision, Retry):
                    await sleep(decision.delay_s)
                    retry += 1
                    # Its breaker may have opened during the backoff (other requests' failures):
                    # asked again, as for any call (a probe keeps the claim it holds).
                    decision = run.out_of_room() or (_PROBE if probe else run.breaker(target))
                    if decision is _CLAIM:
                        decision = await run.claim(target)
                    run.settle_retry(made=isinstance(decision, Call))
                    if isinstance(decision, Skip):  # the retry skipped: the next target falls back
                        run.fell_back = outcome
            match decision:
                case Skip(reason, message):
                    run.skip(target, reason, message)
                case Switch(kind):
                    run.cursor.switch(kind)
                case Stop():
                    return run.fail(decision)
        return run.fail(run.exhausted())
    except asyncio.CancelledError:
        run.cut_short()
        raise


class _Run(msgspec.Struct):
    """One walk along a chain: what it has done so far, and the decisions at each step.

    A msgspec Struct, made once per request by run_chain and built in C: a class with an
    `__init__` of its own cost about 2,300 instructions more per request (counted). Its
    first fields are run_chain's arguments, given positionally; the rest start empty."""

    cursor: Cursor
    call: CallTarget
    limits: Limits
    needs: Needs
    validate: Validate | None
    on_event: OnEvent | None
    health: Health | Untouched | None
    clock: Callable[[], float]
    rand: Callable[[], float]
    attempts: list[Attempt]
    streamed: bool = False
    # The calls running, until their outcome: what a cancelled walk cut short.
    # (The output of one that streams to the client, once it does: how much it sent.)
    calling: dict[tuple[int, float], tuple[Target, float, bool, Started | None]] = msgspec.field(
        default_factory=dict
    )
    # The entries of a race's calls that ended (failed, lost or won) while the race goes on
    # (its loser is being cancelled, its winner streams): what a cancelled walk reports of
    # them, until the race's outcome takes them to `attempts`.
    unrecorded: tuple[Attempt, ...] = ()
    # Health keys whose probe this request holds (None: none, the common case, no set made).
    claims: set[tuple[str, str]] | None = None
    # The error kinds of the failed physical attempts, in order.
    errors: list[str] = msgspec.field(default_factory=list)
    # The soonest a provider that rate limited this request said to come back (Retry-After).
    back_after_s: float | None = None
    physical: int = 0
    fell_back: Outcome | None = None  # the last failure that fell back, until its successor starts
    # The second the retry budget paid for a retry in, while it waits out its backoff
    # (None: no retry waiting, or no budget): refunded if the retry is not made.
    retry_paid_in: int | None = None

    # Before a target: Call, Skip or Stop.

    def admit(self, target: Target) -> Call | Skip | Stop | _Claim:
        if self.attempts and not self.limits.fallback:
            return Stop(_fallback_disabled(self.attempts[-1], self.cursor.from_current()))
        if self.needs is not NO_NEEDS:
            reason = skip_reason(target, self.needs)
            if reason is not None:
                return Skip(*reason)
        limits, health = self.limits, self.health
        # The common step decided here, then out_of_room and breaker for anything else: time
        # and attempts left (Deadline.passed, inline), and no breaker, or a closed one.
        if self.physical < limits.max_attempts and limits.deadline.at - self.clock() >= MIN_CALL_S:
            if health is None or target.breaker is None:
                return _CALL
            state = health.targets.get(target.health_key)
            if state is None or state.state == CLOSED:
                return _CALL
        return self.out_of_room() or self.breaker(target)

    def out_of_room(self) -> Stop | None:
        """Stop when the deadline has passed or max_attempts were made; checked before every
        call."""
        if self.limits.deadline.passed(self.clock()):
            rest = self.cursor.from_current()
            message = "the request's deadline passed before it could start"
            return Stop(_deadline_error(rest), (rest, "deadline", message))
        max_attempts = self.limits.max_attempts
        if self.physical >= max_attempts:
            rest = self.cursor.from_current()
            error = _max_attempts_error(max_attempts, self.attempts)
            return Stop(error, (rest, "max_attempts", f"max_attempts ({max_attempts}) reached"))
        return None

    def breaker(self, target: Target) -> Call | Skip | _Claim:
        health = self.health
        if health is None or target.breaker is None:
            return _CALL
        admitted = health.admit(*target.health_key)
        if admitted == CALL:
            return _CALL
        if admitted == PROBE:
            return _CLAIM
        return self._not_probing(target)

    async def claim(self, target: Target) -> Call | Skip | Stop:
        """Claim the probe of `target`'s breaker: Call(probe) when this request holds it, Stop
        when the claim outlasted the deadline (the shared bucket may take up to 250 ms)."""
        health, key = self.health, target.health_key
        assert health is not None
        try:
            won = await health.claim(*key, target.timeout_s + 1)
        except asyncio.CancelledError:  # aborted meanwhile: the lease taken must not bench it
            health.release(*key)
            raise
        stop = self.out_of_room()
        if stop is not None:
            if won:  # a probe never sent decides nothing: the next call probes
                health.release(*key)
            return stop
        if not won:
            return self._not_probing(target)
        if self.claims is None:
            self.claims = set()
        self.claims.add(key)
        return _PROBE

    def _not_probing(self, target: Target) -> Call | Skip:
        """The breaker is open and this request does not hold its probe: skipped when another
        target that fits is left, else called anyway (the last one left)."""
        health, key = self.health, target.health_key
        assert health is not None
        if self.limits.fallback and self._fits_later():
            health.skipped(*key)
            state = health.targets.get(key)
            why = state.reason if state is not None and state.reason else "it failed recently"
            return Skip("circuit_open", f"{target.name}'s circuit breaker ({key}) is open: {why}")
        return _PROBE

    def _fits_later(self) -> bool:
        return any(skip_reason(t, self.needs) is None for t in self.cursor.rest())

    # The attempt: one call, or a race with a hedge.

    async def attempt(self, target: Target, retry: int, probe: bool) -> Outcome:
        if retry == 0 and self.fell_back is not None:
            self._fallback_event(self.fell_back, target)
            self.fell_back = None
        self.physical += 1
        # min() spelled out, with its result on a tie or a NaN: on 3.11 a call of the builtin
        # costs about 1,300 instructions, the comparison 200.
        now = self.clock()  # when the call starts, and what bounds its timeout: one reading
        left_s = self.limits.deadline.at - now  # Deadline.left_s, inline (as in admit)
        timeout_s = left_s if left_s < target.timeout_s else target.timeout_s  # noqa: FURB136
        hedging = retry == 0 and not probe and self.limits.hedge is not None
        rival = self.cursor.peek() if hedging else None
        delay_s = self._hedge_delay(target) if rival is not None else None
        if rival is None or delay_s is None:
            # _calling and _previous, inline: a call of each cost a few tenths of a % here.
            started = now
            self.calling[(id(target), started)] = (target, started, False, None)
            previous = tuple(self.errors) if target.pass_failures else ()
            try:  # not through _called: a coroutine more per attempt is 0.6 % of the engine
                reply = await self.call(target, timeout_s, previous)
            except asyncio.CancelledError as exc:
                self._cut_short_by(target, started, exc)
                raise
            if isinstance(reply, Started):
                output = reply
                self._streaming(target, started, output)
                reply = await output.end()
                return self.finish(target, reply, started, timeout_s, probe, output.delivered)
            return self.finish(target, reply, started, timeout_s, probe)
        return await self.race(target, timeout_s, delay_s, rival)

    async def _called(
        self, target: Target, started: float, timeout_s: float
    ) -> ProviderReply | Started:
        """The call of `target` started at `started`, in a race (as its own task)."""
        try:
            return await self.call(target, timeout_s, self._previous(target))
        except asyncio.CancelledError as exc:
            self._cut_short_by(target, started, exc)
            raise

    def _cut_short_by(self, target: Target, started: float, exc: BaseException) -> None:
        """A call cancelled as its stream's first chunks went out: its attempt says what the
        client got (cut_short), which the cancel carries (streaming.Relay.started)."""
        delivered = getattr(exc, "chunks_delivered", 0)
        if delivered:
            self._streaming(target, started, _CutShort(delivered))

    def _calling(self, target: Target, started: float, hedge: bool = False) -> float:
        """A call of `target` starts at `started` (returned)."""
        self.calling[(id(target), started)] = (target, started, hedge, None)
        return started

    def _streaming(self, target: Target, started: float, output: Started) -> None:
        """The call of `target` started at `started` streams to the client through `output`:
        its first chunk came now."""
        key = (id(target), started)
        if key in self.calling:
            self.calling[key] = (*self.calling[key][:3], output)
        if self.health is not None:
            self.health.first_chunk(*target.health_key, (self.clock() - started) * 1000)

    def cut_short(self) -> None:
        """The walk was cancelled: the calls still running are cancelled attempts (one that
        streamed says how many chunks the client got)."""
        self.settle_retry(made=False)  # a retry still in its backoff never will be
        now = self.clock()
        cut = list(self.unrecorded)
        for target, started, hedge, output in self.calling.values():
            latency_ms = (now - started) * 1000
            if self.health is not None:
                self.health.cancelled(*target.health_key)
                if self.claims is not None and target.health_key in self.claims:
                    # An aborted (or stopped) probe decides nothing: the next call probes,
                    # not one after the whole lease (the target's timeout_s and a second).
                    self.health.release(*target.health_key)
            cut.append(
                Attempt(
                    target.provider,
                    target.model,
                    "cancelled",
                    latency_ms,
                    target=target.name,
                    hedge=hedge,
                    chunks=0 if output is None else output.delivered,
                )
            )
        # In the order the calls started, as everywhere in `attempts`: a race's hedge after the
        # call it hedged, whichever ended first.
        self.attempts.extend(sorted(cut, key=lambda attempt: attempt.hedge))
        self.calling.clear()
        self.unrecorded = ()

    def _previous(self, target: Target) -> tuple[str, ...]:
        return tuple(self.errors) if target.pass_failures else ()

    def finish(
        self,
        target: Target,
        reply: ProviderReply,
        started: float,
        timeout_s: float,
        probe: bool = False,
        streamed: int = 0,
    ) -> Outcome:
        """A call came back: validate a good answer, take its latency, tell health."""
        self.calling.pop((id(target), started), None)
        if isinstance(reply, ProviderOk) and self.validate is not None:
            reply = self.validate(reply)
        latency_ms = (self.clock() - started) * 1000
        health = self.health
        if health is not None:
            # `started` goes to health too: a breaker weighs calls in the order they were made.
            if isinstance(reply, ProviderOk):  # the common case, in one call
                health.answered(target.health_key, target.breaker, latency_ms, probe, started)
            else:
                self._record_failure(target, reply, started, timeout_s, probe)
        return Outcome(target, reply, latency_ms, False, False, (), streamed)

    def _record_failure(
        self,
        target: Target,
        reply: ProviderFailure,
        started: float,
        timeout_s: float,
        probe: bool,
    ) -> None:
        """A failed call, for health. A timeout the request's own deadline cut short says
        nothing about the target's health (short client deadlines must not open breakers). Cut
        short means by more than the moments a request spends before its call: a deadline of
        the target's own timeout_s leaves its first call a few ms less, and that call's timeout
        counts. Nor does a timeout of a target whose time limits the request set itself. A
        timeout the provider answered with a status of its own (Anthropic's 504
        timeout_error, an HTTP 408) is its own clock's, and counts.

        A call let through a breaker that is not closed without this request holding its probe
        (the last target left, called anyway: _not_probing) fails as the breaker expects: it
        leaves the breaker as it is, rather than opening it again, with a warning and a write
        to the shared bucket, once per request while the provider is down."""
        health, key = self.health, target.health_key
        provider, model = key
        assert health is not None
        holds_probe = probe and self.claims is not None and key in self.claims
        capped = target.own_limits or timeout_s < target.timeout_s * _CAPPED_BELOW
        if capped and reply.kind == "timeout" and reply.status_code is None:
            health.record(provider, model, None, False, reply.kind, started=started)
            if holds_probe:  # another's stays
                health.release(provider, model)  # undecided: the next request probes
        else:
            health.record(
                provider,
                model,
                target.breaker,
                False,
                reply.kind,
                reply.status_code,
                probe=holds_probe,
                started=started,
            )

    def _hedge_delay(self, target: Target) -> float | None:
        """Seconds after which the next target may start beside `target`; None: no hedge."""
        hedge = self.limits.hedge
        if hedge is None or not self.limits.fallback:
            return None
        delay_s = hedge.after_s
        if hedge.p95 and self.health is not None:
            # Of what settles this call's race: a stream's first chunk, or the whole answer.
            p95_ms = self.health.p95_ms(*target.health_key, self.streamed)
            if p95_ms is not None:
                delay_s = max(delay_s or 0.0, p95_ms / 1000)
            elif delay_s is None:
                return None  # too few recent answers to know this target's p95
        return delay_s

    def _may_hedge(self, rival: Target) -> bool:
        """Whether `rival` can start now as a hedge: it fits, its breaker is closed, the
        budgets allow it."""
        if self.physical >= self.limits.max_attempts or self.limits.deadline.passed(self.clock()):
            return False
        if skip_reason(rival, self.needs) is not None:
            return False
        health = self.health
        if (
            health is not None
            and rival.breaker is not None
            and health.admit(*rival.health_key) != CALL
        ):
            return False
        budgets = self.limits.budgets
        if budgets is not None:
            if budgets.hedge.available() < 1 or budgets.retry.available() < 1:
                self._budget_event("hedge", rival)
                return False
            budgets.hedge.spend()
            budgets.retry.spend()
        return True

    async def race(self, first: Target, timeout_s: float, delay_s: float, rival: Target) -> Outcome:
        """Call `first`; if it is still running after delay_s, start `rival` too. The first good
        answer wins, as does a failure of `first` that settles the chain (it would stop it or
        switch chains); the other call is cancelled (its worker aborts it). A hedge never makes
        the outcome worse than no hedge: its own settling failure waits for `first`'s end."""
        started = self._calling(first, self.clock())
        task = asyncio.ensure_future(self._called(first, started, timeout_s))
        why: str | None = None  # why the request stopped (aborted, shutting_down): for the spans
        running: dict[asyncio.Future[ProviderReply | Started], _Running] = {
            task: _Running(first, started, timeout_s, False)
        }
        try:
            done, _ = await asyncio.wait({task}, timeout=delay_s)
            if done or not self._may_hedge(rival):
                reply = await task
                running.clear()
                if isinstance(reply, Started):
                    output = reply
                    self._streaming(first, started, output)
                    reply = await output.end()
                    return self.finish(first, reply, started, timeout_s, streamed=output.delivered)
                return self.finish(first, reply, started, timeout_s)
            self.physical += 1
            self.cursor.pass_next()
            hedge_started = self._calling(rival, self.clock(), hedge=True)
            self._emit(
                "lifeline.hedge",
                {
                    "lifeline.hedge.from": first.name,
                    "lifeline.hedge.to": rival.name,
                    "lifeline.hedge.after_ms": (hedge_started - started) * 1000,
                },
            )
            rival_timeout_s = min(rival.timeout_s, self.limits.deadline.left_s(hedge_started))
            rival_call = self._called(rival, hedge_started, rival_timeout_s)
            running[asyncio.ensure_future(rival_call)] = _Running(
                rival, hedge_started, rival_timeout_s, True
            )
            outcome = await self._settle(running)
            self.unrecorded = ()  # the outcome takes them to `attempts`
            return outcome
        except asyncio.CancelledError as exc:
            why = exc.args[0] if exc.args and isinstance(exc.args[0], str) else None
            await self._stopped(running, why)
            raise
        finally:
            for pending in running:
                _stop(pending, why)

    async def _stopped(
        self, running: dict[asyncio.Future[ProviderReply | Started], _Running], why: str | None
    ) -> None:
        """The walk was cancelled mid-race: its calls are stopped, and waited for, as a call
        not raced is (its cancel runs in the walk's own task). A call whose first chunks went
        out in the turns that brought the cancel says so only as it ends (_called), or had
        returned its output the walk never took: either way cut_short, next, counts them."""
        for task, call in running.items():
            taken = (id(call.target), call.started) not in self.calling  # a loser, reported
            if not taken and task.done() and isinstance(output := _result(task), Started):
                self._streaming(call.target, call.started, output)
            _stop(task, why)
        if running:
            await asyncio.wait(running)

    async def _settle(
        self, running: dict[asyncio.Future[ProviderReply | Started], _Running]
    ) -> Outcome:
        """The outcome of a race with both calls running. A streamed call that starts
        streaming wins it: the other is cancelled, then its stream is followed to the end."""
        last: Outcome | None = None
        # A hedge that failed while the call it hedged runs on: its entry goes in after that
        # call's, as `attempts` are in the order the calls started.
        early: tuple[Attempt, ...] = ()
        # Such a failure that would settle the chain (stop it, or switch chains) does not
        # settle the race: without the hedge the call it hedged would have run on, and may
        # still answer. It decides only if that call fails too and would fall back to it.
        held: Outcome | None = None
        while running:
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            # Both calls may have ended in the same turns: the one that owns the output (its
            # text is the client's) wins whatever the other answered, then a good answer wins
            # over a failure that would settle the race, then the call the hedge raced (what
            # would have answered without it) over the hedge.
            for task in sorted(done, key=lambda task: (_precedence(task), running[task].hedge)):
                call = running.pop(task)
                reply = task.result()
                if isinstance(reply, Started):
                    self._streaming(call.target, call.started, reply)
                    if held is not None:
                        self._failed_call(held.reply)
                    try:
                        cancelled = await self._cancel(running, hedge=not call.hedge)
                    except BaseException as exc:  # cancelled itself meanwhile: the output stops too
                        reply.abandon(exc)
                        raise
                    output, reply = reply, await reply.end()
                    outcome = self.finish(
                        call.target, reply, call.started, call.timeout_s, streamed=output.delivered
                    )
                    return msgspec.structs.replace(
                        outcome, hedge=call.hedge, raced=True, cancelled=cancelled + early
                    )
                outcome = self.finish(call.target, reply, call.started, call.timeout_s)
                outcome = msgspec.structs.replace(outcome, hedge=call.hedge, raced=True)
                settles = not isinstance(outcome.reply, ProviderOk) and self._settles(outcome)
                if held is not None and (isinstance(outcome.reply, ProviderOk) or settles):
                    self._failed_call(held.reply)  # it failed, and decides nothing
                elif held is not None:  # falls back to the hedge's target, whose failure decides
                    self._failed_call(outcome.reply)
                    self._record(outcome, 0, "fallback")
                    return held
                if isinstance(outcome.reply, ProviderOk) or (
                    running and settles and not call.hedge
                ):
                    self.unrecorded += (
                        _answered(outcome)
                        if isinstance(outcome.reply, ProviderOk)
                        else _failed(outcome, outcome.reply, 0, "stop", None),
                    )
                    cancelled = await self._cancel(running, hedge=not call.hedge)
                    return msgspec.structs.replace(outcome, cancelled=cancelled + early)
                if running:  # the other call is still running: it takes over
                    if call.hedge:
                        held = outcome if settles else None
                        if held is None:
                            self._failed_call(outcome.reply)
                        early = (_failed(outcome, outcome.reply, 0, "fallback", None),)
                        self.unrecorded += early
                    else:
                        self._failed_call(outcome.reply)
                        self._record(outcome, 0, "fallback")
                last = outcome
        assert last is not None
        return msgspec.structs.replace(last, cancelled=last.cancelled + early) if early else last

    def _settles(self, outcome: Outcome) -> bool:
        """A failure that ends the chain or switches it: of the call a hedge raced, it settles
        the race too (the hedge is cancelled); of the hedge, only once that call failed too."""
        failure = outcome.reply
        assert isinstance(failure, ProviderFailure)
        switches = self.cursor.chain_for(failure.kind) is not None
        return switches or not falls_back(failure, self.limits.fallback_on)

    async def _cancel(
        self, running: dict[asyncio.Future[ProviderReply | Started], _Running], hedge: bool
    ) -> tuple[Attempt, ...]:
        """Cancel the calls still running in a race (their workers abort them); their attempts.
        A call that ended in the same turns as the one that settled the race was not cut short:
        a failure is the failure it is, for the attempts, its breaker and pass_failures; a good
        answer is an `ok` attempt that lost the race (its target answered, and was paid)."""
        lost = []
        for task, call in running.items():
            t = call.target
            reply = _result(task) if task.done() else None
            if isinstance(reply, (ProviderOk, ProviderFailure)):
                ended = self.finish(t, reply, call.started, call.timeout_s)
                ended = msgspec.structs.replace(ended, hedge=call.hedge)
                if isinstance(ended.reply, ProviderOk):
                    lost.append(msgspec.structs.replace(_answered(ended), reason=HEDGE_LOST))
                    continue
                self._failed_call(ended.reply)
                lost.append(_failed(ended, ended.reply, 0, "fallback", None))
                continue
            _stop(task, HEDGE_LOST)
            self.calling.pop((id(t), call.started), None)
            if self.health is not None:
                self.health.cancelled(*t.health_key)
            latency_ms = (self.clock() - call.started) * 1000
            lost.append(
                Attempt(
                    t.provider,
                    t.model,
                    "cancelled",
                    latency_ms,
                    target=t.name,
                    reason=HEDGE_LOST,
                    hedge=hedge,
                )
            )
        self.unrecorded += tuple(lost)
        # The cancel reaches the worker before the client gets its answer.
        await asyncio.gather(*running, return_exceptions=True)
        running.clear()
        return tuple(lost)

    # After a failure: Retry, FallBack, Switch or Stop.

    def _failed_call(self, failure: ProviderReply) -> None:
        """Every failed physical call, whether it decides the walk or not (a race's loser):
        its kind for pass_failures and the rate-limit check, its Retry-After for when the
        chain may take calls again (see _with_back_after)."""
        assert isinstance(failure, ProviderFailure)
        self.errors.append(failure.kind)
        if failure.kind == "rate_limit" and failure.retry_after_s is not None:
            hint = failure.retry_after_s
            self.back_after_s = hint if self.back_after_s is None else min(self.back_after_s, hint)

    def decide(self, outcome: Outcome, retry: int) -> Retry | FallBack | Switch | Stop:
        target, failure = outcome.target, outcome.reply
        assert isinstance(failure, ProviderFailure)
        self._failed_call(failure)
        denied = None  # why a retry its target allowed was not made
        if outcome.streamed and self.limits.on_midstream == "fail":
            self._record(outcome, retry, "stop")
            return Stop(_midstream_error(target, failure, outcome.streamed, self.cursor.rest()))
        if not outcome.raced and not outcome.streamed:  # a retry would repeat what was sent
            delay_s, denied = self._retry_delay(target, failure, retry)
            if delay_s is not None:
                self._record(outcome, retry, "retry")
                extra = {"lifeline.retry.delay_ms": delay_s * 1000}
                self._event("lifeline.retry", target, failure, extra)
                return Retry(delay_s)
        chain = self.cursor.chain_for(failure.kind)  # e.g. context_length: a long-context chain
        rest = self.cursor.rest()
        if not self.limits.fallback:
            self._record(outcome, retry, "stop", denied)
            return Stop(_fallback_disabled(self.attempts[-1], rest))
        if chain is None and not falls_back(failure, self.limits.fallback_on):
            self._record(outcome, retry, "stop", denied)
            return Stop(_stopped_error(target, failure, rest))
        goes_on = bool(chain) if chain is not None else bool(rest)
        if self.physical >= self.limits.max_attempts or self.limits.deadline.passed(self.clock()):
            goes_on = False  # the rest are skipped: max_attempts, or the deadline
        self._record(outcome, retry, "fallback" if goes_on else "stop", denied)
        self.fell_back = outcome
        return FallBack() if chain is None else Switch(failure.kind)

    def _retry_delay(
        self, target: Target, failure: ProviderFailure, retry: int
    ) -> tuple[float | None, str | None]:
        """Seconds to wait before retrying `target` (None: no retry), and why not when its
        retries allowed one (the attempt's reason; max_attempts says so in the error)."""
        if retry >= target.retries or not retried(failure, target.retry_on):
            return None, None
        if self.physical >= self.limits.max_attempts:
            return None, None
        health = self.health
        if (
            health is not None
            and target.breaker is not None
            and health.admit(*target.health_key) != CALL
        ):
            return None, "circuit_open"  # this failure (or a failed probe) opened its breaker
        delay_s = backoff_s(target, retry, self.rand)
        if failure.retry_after_s is not None:
            if failure.retry_after_s > target.max_backoff_s:
                return None, "retry_after"  # a longer pause than allowed: fall back
            delay_s = max(delay_s, failure.retry_after_s)
        if self.limits.deadline.passed(self.clock() + delay_s):  # no time left for the retry
            return None, "deadline"
        budgets = self.limits.budgets
        if budgets is not None:
            if not budgets.retry.spend():
                self._budget_event("retry", target)
                return None, RETRY_BUDGET
            self.retry_paid_in = budgets.retry.spent_in  # as charged, not read again
        return delay_s, None

    def settle_retry(self, made: bool) -> None:
        """The backoff of a retry the budget paid for is over: the retry is made, or not after
        all (the request aborted, its breaker opened or its deadline came meanwhile), and then
        the budget gets it back, so no later request is refused a retry for one never made."""
        if self.retry_paid_in is not None and not made:
            budgets = self.limits.budgets
            assert budgets is not None
            budgets.retry.refund(self.retry_paid_in)
        self.retry_paid_in = None

    # Endings.

    def succeed(self, outcome: Outcome, retry: int) -> ChainResult:
        target, answer = outcome.target, outcome.reply
        assert isinstance(answer, ProviderOk)
        won = Attempt(  # positional, in field order: once per request (see engine._reply)
            target.provider,
            answer.model or target.model,
            "ok",
            outcome.latency_ms,
            None,  # error_type
            None,  # status_code
            None,  # message
            target.name,
            retry,
            None,  # reason
            None,  # next
            outcome.hedge,
            outcome.streamed,  # chunks
        )
        lost = outcome.cancelled
        if lost:
            self.attempts.extend([*lost, won] if outcome.hedge else [won, *lost])
        else:
            self.attempts.append(won)
        return ChainResult(answer, target, self.attempts, None)

    def fail(self, stop: Stop) -> ChainResult:
        if stop.skip_rest is not None:
            targets, reason, message = stop.skip_rest
            for target in targets:
                self.skip(target, reason, message)
        return ChainResult(None, None, self.attempts, self._with_back_after(stop.error))

    def _with_back_after(self, error: ErrorInfo) -> ErrorInfo:
        """A chain every call of which was rate limited says when the soonest of its providers
        will take calls again (what the HTTP gateway's 429 passes on as Retry-After)."""
        if (
            self.back_after_s is None
            or error.type not in _SPENT
            or any(kind != "rate_limit" for kind in self.errors)
        ):
            return error
        return msgspec.structs.replace(error, retry_after_s=self.back_after_s)

    def exhausted(self) -> Stop:
        """Every target was skipped or failed."""
        if self.physical == 0:
            return Stop(_nothing_capable_error(self.attempts))
        return Stop(_all_failed_error(self.attempts))

    # What the attempts and the trace say.

    def _record(self, outcome: Outcome, retry: int, next_: Next, reason: str | None = None) -> None:
        failure = outcome.reply
        assert isinstance(failure, ProviderFailure)
        failed = _failed(outcome, failure, retry, next_, reason)
        # In the order the calls started, as for a race won (see succeed): the hedge after.
        lost = outcome.cancelled
        self.attempts.extend([*lost, failed] if outcome.hedge else [failed, *lost])

    def skip(self, target: Target, reason: str, message: str) -> None:
        self.attempts.append(
            Attempt(
                target.provider,
                target.model,
                "skipped",
                0.0,
                target=target.name,
                reason=reason,
                message=message,
            )
        )
        self._emit(
            "lifeline.skip",
            {
                "lifeline.target": target.name,
                "lifeline.skip.reason": reason,
                "lifeline.skip.message": message,
            },
        )

    def _emit(self, name: str, attributes: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(name, attributes)

    def _budget_event(self, budget: str, target: Target) -> None:
        self._emit(
            "lifeline.budget_spent", {"lifeline.budget": budget, "lifeline.target": target.name}
        )

    def _event(
        self, name: str, target: Target, failure: ProviderFailure, extra: dict[str, Any]
    ) -> None:
        self._emit(
            name,
            {
                "lifeline.target": target.name,
                "lifeline.reason": failure.kind,
                "lifeline.status_code": failure.status_code or 0,
                **extra,
            },
        )

    def _fallback_event(self, failed: Outcome, successor: Target) -> None:
        """Sent only once the successor really starts, so a skipped target gets no fallback
        event."""
        failure = failed.reply
        assert isinstance(failure, ProviderFailure)
        self._emit(
            "lifeline.fallback",
            {
                "lifeline.fallback.from": failed.target.name,
                "lifeline.fallback.to": successor.name,
                "lifeline.fallback.reason": failure.kind,
                "lifeline.fallback.status_code": failure.status_code or 0,
                "lifeline.fallback.chain": self.cursor.kind or "targets",
            },
        )


class _Running(NamedTuple):
    """A call in a race."""

    target: Target
    started: float
    timeout_s: float
    hedge: bool


def _failed(
    outcome: Outcome, failure: ProviderFailure, retry: int, next_: Next, reason: str | None
) -> Attempt:
    target = outcome.target
    return Attempt(
        provider=target.provider,
        model=target.model,
        outcome=_outcome_of(failure.kind),
        latency_ms=outcome.latency_ms,
        error_type=failure.kind,
        status_code=failure.status_code,
        message=failure.message,
        target=target.name,
        retry=retry,
        reason=reason,
        next=next_,
        hedge=outcome.hedge,
        chunks=outcome.streamed,
    )


def _answered(outcome: Outcome) -> Attempt:
    """A race's good answer, as succeed() will enter it (for a walk cut short before)."""
    target, answer = outcome.target, outcome.reply
    assert isinstance(answer, ProviderOk)
    return Attempt(
        target.provider,
        answer.model or target.model,
        "ok",
        outcome.latency_ms,
        target=target.name,
        hedge=outcome.hedge,
    )


def _outcome_of(kind: str) -> Literal["timeout", "no_responders", "error"]:
    """Transport outcomes that are not provider errors proper have their own outcome name."""
    if kind == "timeout":
        return "timeout"
    if kind == "no_responders":
        return "no_responders"
    return "error"


def describe(attempt: Attempt) -> str:
    if attempt.outcome in ("skipped", "cancelled"):  # not failures: why, instead of a kind
        return f"{attempt.target or attempt.provider}: {attempt.outcome} ({attempt.reason})"
    status = f" {attempt.status_code}" if attempt.status_code else ""
    retry = f" (retry {attempt.retry})" if attempt.retry else ""
    return f"{attempt.target or attempt.provider}: {attempt.error_type}{status}{retry}"


def _summary(attempts: Sequence[Attempt]) -> str:
    return "; ".join(describe(a) for a in attempts)


# The errors of a chain that spent its calls: when each was rate limited, worth sending again.
_SPENT = frozenset((ALL_FAILED, FALLBACK_STOPPED, MAX_ATTEMPTS_REACHED))


def _names(targets: Sequence[Target]) -> str:
    return ", ".join(t.name for t in targets) or "none"


def _all_failed_error(attempts: list[Attempt]) -> ErrorInfo:
    made = sum(1 for a in attempts if a.outcome != "skipped")
    return ErrorInfo(
        ALL_FAILED, f"all {made} attempts failed ({_summary(attempts)}); see attempts for details"
    )


def _nothing_capable_error(attempts: list[Attempt]) -> ErrorInfo:
    return ErrorInfo(
        NO_CAPABLE_TARGET,
        f"no target can take this request, so none was called ({_summary(attempts)}); shorten "
        "the input, "
        "drop response_format, or add a target that fits",
    )


def _stopped_error(target: Target, failure: ProviderFailure, rest: Sequence[Target]) -> ErrorInfo:
    status = f" ({failure.status_code})" if failure.status_code else ""
    return ErrorInfo(
        FALLBACK_STOPPED,
        f"{target.name} failed with {failure.kind}{status}, which fallback_on (the route's, or "
        f"the request's within it) does not include, so no fallback was tried (not tried: "
        f"{_names(rest)}): {failure.message}",
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


def _midstream_error(
    target: Target, failure: ProviderFailure, chunks: int, rest: Sequence[Target]
) -> ErrorInfo:
    return ErrorInfo(
        MIDSTREAM_FAILED,
        f"{target.name} failed with {failure.kind} after {chunks} chunks had been sent, and "
        f'on_midstream is "fail", so no fallback was tried (not tried: {_names(rest)}): '
        f"{failure.message}",
    )


def _deadline_error(rest: Sequence[Target]) -> ErrorInfo:
    return ErrorInfo(
        DEADLINE_EXCEEDED,
        f"the request's deadline passed before trying {_names(rest)}; raise timeout_s (or "
        "deadline_unix_ms)",
    )


def _max_attempts_error(max_attempts: int, attempts: list[Attempt]) -> ErrorInfo:
    return ErrorInfo(
        MAX_ATTEMPTS_REACHED,
        f"stopped after max_attempts ({max_attempts}) physical attempts ({_summary(attempts)}); "
        "raise max_attempts in the request or the route, up to dispatcher.max_attempts",
    )


_CAPPED_BELOW = WHOLE_TIMEOUT_SHARE  # an attempt given less of its timeout_s was cut short


def _result(task: asyncio.Future[ProviderReply | Started]) -> ProviderReply | Started | None:
    """A finished call's result, None if it raised or was cancelled."""
    if task.cancelled() or task.exception() is not None:
        return None
    return task.result()


def _precedence(task: asyncio.Future[ProviderReply | Started]) -> int:
    """The order in which calls that ended in the same turns are looked at."""
    result = _result(task)
    return 0 if isinstance(result, Started) else 1 if isinstance(result, ProviderOk) else 2


def _stop(task: asyncio.Future[ProviderReply | Started], why: str | None = None) -> None:
    """Stop a raced call: cancel it while it runs (`why` goes with the cancel, for its span);
    a call that already returned its output (Started) is abandoned, as cancelling a finished
    task does nothing."""
    if not task.done():
        task.cancel(why)
    elif isinstance(output := _result(task), Started):
        output.abandon(asyncio.CancelledError(why) if why else None)
