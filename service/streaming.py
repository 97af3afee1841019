"""A streamed request's output (llm.stream): which attempt owns it, and what a failure voids.

The engine makes one Relay per streamed request. Every attempt gets a number (1, 2, ... in
the order attempts start) and hands its chunks to the relay as they arrive. The first
attempt to send a chunk owns the output: its chunks go to the client as deltas, at once,
and its call returns `Started` to the policy, which settles a hedged race on it. A chunk of
any other attempt is dropped (the policy cancels that attempt next).

When the owner fails after its first chunk, or its assembled text fails the request's
response_format, what the client has seen is dealt with per on_midstream:

    reset     a reset event at once: drop the last N deltas; the next attempt streams from
              the start
    continue  the next attempt gets the text so far as a last assistant message (prefill) if
              its target says it can (prefill = true); when that attempt sends its first
              chunk, a reset event with discard 0 says the text goes on from there, or, for a
              target without prefill, discard N as in reset. A text some of whose chunks
              may be lost or repeated on the way (its attempt's end counted others, or the
              dispatcher's connection dropped meanwhile) is reset at once
    fail      nothing here: the policy stops the request, and the error event ends it

Pure: no NATS (the Sink is), no policy decisions (service/policy.py makes them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import msgspec

from schemas import (
    Attempt,
    ChatMessage,
    CompletionReply,
    ErrorInfo,
    ProviderFailure,
    ProviderOk,
)
from schemas.errors import HEDGE_LOST
from schemas.streaming import StreamReset
from schemas.wire import ProviderReply, ProviderRequest, StreamStats
from service.policy import OnEvent, Started, Validate

RESET, CONTINUE = "reset", "continue"


class StreamLimits(NamedTuple):
    """How long a streaming attempt may take: in all, to its first chunk, between chunks."""

    timeout_s: float
    ttft_s: float | None = None
    idle_s: float | None = None
    # A simulated mid-stream failure (a request's faults): after this many chunks, this failure.
    cut: tuple[int, ProviderFailure] | None = None
    # The deltas' bytes (schemas.wire.delta_bytes) past which the attempt fails as
    # response_too_large (None: no bound).
    max_bytes: int | None = None


Finished = Callable[[ProviderReply | None, BaseException | None], None]


class Sink(Protocol):
    """Where a streamed request's events go (transport.ClientStream publishes them)."""

    def delta(self, attempt: int, text: bytes) -> None: ...

    def tool_call(self, attempt: int, piece: bytes) -> None: ...

    def reset(self, reset: StreamReset) -> None: ...

    async def end(self, reply: CompletionReply, attempt: int) -> CompletionReply: ...


class Stream(Protocol):
    """One streaming attempt as the transport runs it (transport.ProviderStream)."""

    chunks: int
    first_at: float | None

    @property
    def intact(self) -> bool: ...  # False: some chunks may be lost or repeated on the way

    @property
    def first(self) -> Any: ...  # awaitable: the first chunk came, or the attempt ended

    @property
    def done(self) -> Any: ...  # awaitable ProviderReply: the attempt ended

    def abandon(self) -> None: ...


class Relay:
    __slots__ = (
        "_answered",
        "_arrived",
        "_closed",
        "_continuing",
        "_cut",
        "_first_at",
        "_held",
        "_mode",
        "_on_event",
        "_owner_sent",
        "_partial",
        "_sink",
        "_text",
        "_tool_held",
        "_validate",
        "_voided",
        "attempts",
        "chunks",
        "owner",
        "resets",
    )

    def __init__(self, sink: Sink, arrived: float) -> None:
        self._sink = sink
        self._mode = RESET  # until follow() gives the request's (a refused one has none)
        self._validate: Validate | None = None
        self._arrived = arrived
        self._on_event: OnEvent | None = None
        self.attempts = 0  # attempts numbered so far
        self.owner = 0  # the attempt whose deltas the client gets (0: none now)
        self._owner_sent = 0  # chunks the owner sent
        # The text deltas the client holds now (after resets), joined as they come: a bytes
        # object each cost some 40 bytes besides its own, and a delta is often a few bytes.
        self._text = bytearray()
        self._held = 0  # the deltas (text and tool-call pieces) the client holds now
        self._tool_held = False  # some of them are pieces of tool calls
        self._partial: tuple[int, ProviderFailure] | None = None  # continue: failed, not reset
        self._continuing: set[int] = set()  # attempts sent the text so far as prefill
        self._first_at: float | None = None
        self._answered = 0  # the last attempt that answered whole, without a chunk
        self._cut: tuple[int, ProviderFailure] | None = None
        self.chunks = 0
        self.resets = 0
        # The end or error event went: nothing may follow it. An attempt's task can still be
        # reading chunks then (a hedging route's first call, cancelled a turn after its
        # request was aborted): they are dropped here.
        self._closed = False
        # Attempts voided as they lost a race, and the chunks of each the client had got: the
        # policy lists a loser as it cancels it, before those are known (see counted()).
        self._voided: dict[int, int] | None = None

    def follow(
        self, on_midstream: str, validate: Validate | None, on_event: OnEvent | None
    ) -> None:
        """The request's rules, once it is planned: on_midstream, its output checks (on the
        assembled text), and where reset events go in its trace."""
        self._mode, self._validate, self._on_event = on_midstream, validate, on_event

    # The engine, around each attempt.

    def number(self) -> int:
        self.attempts += 1
        return self.attempts

    def cut(self, target: object, after: int, failure: ProviderFailure) -> None:
        """A request's fault: the next attempt fails with `failure` after `after` chunks."""
        self._cut = (after, failure)

    def take_cut(self) -> tuple[int, ProviderFailure] | None:
        cut, self._cut = self._cut, None
        return cut

    def continues(self, can: bool) -> bool:
        """Whether the next attempt, on a target that can (`can`) or cannot take a prefill,
        continues from the text so far: on_midstream is continue, and an attempt left some."""
        if not can or self._mode != CONTINUE or self._partial is None or self._tool_held:
            return False  # a half-made tool call cannot be continued as text
        return self._held > 0  # text deltas, none a tool call's (empty ones count)

    def with_text(self, request: ProviderRequest) -> ProviderRequest:
        """`request` with the text so far as its last message; nothing decided yet."""
        text = self._text.decode()
        return msgspec.structs.replace(
            request, messages=[*request.messages, ChatMessage("assistant", text)]
        )

    def continuing(self, number: int) -> None:
        """Attempt `number` continues the text so far (it was sent `with_text`)."""
        self._continuing.add(number)

    def on_chunk(self, number: int) -> Callable[[bytes, bool], None]:
        def chunk(data: bytes, tool: bool = False) -> None:
            if self._closed:
                return
            if self.owner != number:
                if self.owner:
                    return  # a rival that lost the race to the first chunk: it is cancelled next
                self._claim(number)
            self._owner_sent += 1
            self.chunks += 1
            self._held += 1
            if tool:
                self._tool_held = True
                self._sink.tool_call(number, data)
            else:
                self._text += data
                self._sink.delta(number, data)

        return chunk

    async def started(
        self, number: int, stream: Stream, finished: Finished
    ) -> ProviderReply | Started:
        """What attempt `number`'s call returns to the policy: Started once it owns the
        output, else its reply (it ended without a chunk). `finished` hears how the attempt
        ended (None: abandoned, with the cancel that stopped it when there was one), once."""
        try:
            await stream.first
            if self.owner != number:
                # It ended without a chunk, or a rival owns the output (then the policy
                # cancels this call before it ends).
                reply: ProviderReply = await stream.done
                if self.owner == 0 and self._partial is not None and isinstance(reply, ProviderOk):
                    # An answer without a chunk after a failed attempt's output was kept for it
                    # (continue): it settles that output as a first chunk would have, with a
                    # reset, so the client's text is this answer's.
                    self._claim(number)
                    reply = self.ended(number, reply)
                elif self.owner != number:
                    reply = self._checked(number, reply)
                if isinstance(reply, ProviderOk) and self.owner in (0, number):
                    self._answered = number  # the end event's attempt, should this answer win
                finished(reply, None)
                return reply
        except BaseException as exc:
            delivered = self._owner_sent if self.owner == number else 0  # voided or not
            stream.abandon()
            self.abandoned(number, exc)
            finished(None, exc)
            if delivered and isinstance(exc, asyncio.CancelledError):
                # Its first chunks went out in the read that brought the cancel (an abort):
                # the policy's cancelled attempt says so (policy._CutShort), not 0.
                exc.chunks_delivered = delivered  # type: ignore[attr-defined]
            raise
        return _Output(self, number, stream, finished)

    def ended(
        self, number: int, reply: ProviderReply, stream: Stream | None = None
    ) -> ProviderReply:
        """The owner's stream ended: its answer with the whole text as content, checked
        against response_format, or its failure, after which the output is voided or kept
        for the next attempt (not when `stream` is not intact)."""
        reply = self._checked(number, reply)
        if isinstance(reply, ProviderFailure) and self.owner == number:
            self._fail(number, reply, stream)
        return reply

    def stats(self) -> StreamStats:
        ttft_ms = None if self._first_at is None else (self._first_at - self._arrived) * 1000
        return StreamStats(ttft_ms, self.chunks, self.resets)

    def counted(self, attempts: list[Attempt]) -> list[Attempt]:
        """The request's `attempts` with the chunks the client got of each race loser voided
        as it lost (an attempt's number is its place among the attempts not skipped)."""
        voided = self._voided
        if not voided:
            return attempts
        out, number = [], 0
        for attempt in attempts:
            if attempt.outcome != "skipped":
                number += 1
                chunks = voided.get(number)
                if chunks and attempt.reason == HEDGE_LOST and not attempt.chunks:
                    attempt = msgspec.structs.replace(attempt, chunks=chunks)
            out.append(attempt)
        return out

    def serving(self) -> int:
        """The attempt the end event names: the owner, else the one that answered whole,
        else the last one started."""
        return self.owner or self._answered or self.attempts

    async def end(self, reply: CompletionReply) -> CompletionReply:
        self._closed = True
        reply = msgspec.structs.replace(reply, content=None, stream=self.stats())
        return await self._sink.end(reply, self.serving())

    # Inside.

    def _checked(self, number: int, reply: ProviderReply) -> ProviderReply:
        if not isinstance(reply, ProviderOk):
            return reply
        if self.owner == number:
            reply = msgspec.structs.replace(reply, content=self._text.decode())
        return reply if self._validate is None else self._validate(reply)

    def _claim(self, number: int) -> None:
        if self._first_at is None:
            self._first_at = time.monotonic()
        partial, self._partial = self._partial, None
        if partial is not None:
            failed, failure = partial
            discard = 0 if number in self._continuing else self._held
            self._reset(failed, discard, failure)
        self.owner, self._owner_sent = number, 0

    def abandoned(self, number: int, why: BaseException | None) -> None:
        """Attempt `number` is given up. If it lost its race yet owns the output (its first
        chunk came in the turns between a rival settling the race, by a failure that stops or
        switches the chain or an answer without chunks, and this call's cancel), what it sent
        is nobody's answer: voided, or it would own the output for good and every later
        attempt's chunks would be dropped."""
        if self.owner == number and _lost_race(why):
            self._void(number)

    def _void(self, number: int) -> None:
        self.owner = 0
        if self._voided is None:
            self._voided = {}
        self._voided[number] = self._owner_sent
        failure = ProviderFailure(HEDGE_LOST, f"attempt {number} lost the race to a rival")
        self._reset(number, self._held, failure)

    def _fail(self, number: int, failure: ProviderFailure, stream: Stream | None) -> None:
        self.owner = 0
        if self._mode == CONTINUE and (stream is None or stream.intact):
            self._partial = (number, failure)
        elif self._mode in (RESET, CONTINUE):  # a text with a hole or a repeat: no prefill
            self._reset(number, self._held, failure)

    def _reset(self, attempt: int, discard: int, failure: ProviderFailure) -> None:
        if self._closed:
            return
        if discard:  # every delta the client holds: nothing of the failed answer stays
            self._text.clear()
            self._held, self._tool_held = 0, False
        self._sink.reset(StreamReset(attempt, discard, ErrorInfo(failure.kind, failure.message)))
        self.resets += 1
        if self._on_event is not None:
            self._on_event(
                "lifeline.reset",
                {
                    "lifeline.reset.attempt": attempt,
                    "lifeline.reset.discard": discard,
                    "lifeline.reset.reason": failure.kind,
                },
            )


def _lost_race(exc: BaseException | None) -> bool:
    """Whether `exc` is the policy's cancel of a call that lost its race (policy's `_stop`)."""
    return isinstance(exc, asyncio.CancelledError) and exc.args[:1] == (HEDGE_LOST,)


class _Output(Started):
    """An attempt that owns the output: the policy waits for its end here."""

    __slots__ = ("_abandoned", "_delivered", "_finished", "_number", "_relay", "_stream")

    def __init__(self, relay: Relay, number: int, stream: Stream, finished: Finished) -> None:
        self._relay = relay
        self._number = number
        self._stream = stream
        self._finished = finished
        self._abandoned = False
        self._delivered: int | None = None  # as its stream ended

    @property
    def delivered(self) -> int:  # type: ignore[override]
        """The chunks of this attempt the client got: so far, or as its stream ended."""
        if self._delivered is not None:
            return self._delivered
        relay = self._relay
        return relay._owner_sent if relay.owner == self._number else 0

    async def end(self) -> ProviderReply:
        try:
            reply: ProviderReply = await self._stream.done
        except BaseException as exc:
            self.abandon(exc)
            raise
        self._delivered = self.delivered
        reply = self._relay.ended(self._number, reply, self._stream)
        self._finished(reply, None)
        return reply

    def abandon(self, why: BaseException | None = None) -> None:
        if not self._abandoned:  # `finished` hears once
            self._abandoned = True
            self._delivered = self.delivered  # as the client got them, voided or not
            self._stream.abandon()
            self._relay.abandoned(self._number, why)
            self._finished(None, why)
