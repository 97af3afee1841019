"""llm.stream's events, and the one way to read them (any language can do the same).

A client sends the same CompletionRequest as to llm.complete, to llm.stream, with a reply
subject of its own that it subscribed to first, and receives one NATS message per event:

    delta      body: a piece of the answer's text, UTF-8; no Lifeline-Event header
    tool_call  Lifeline-Event: tool_call; body: a ToolCallDelta, a piece of a tool call: the
               first piece of call `index` has its id and name, and the pieces' arguments
               joined are the call's arguments (a delta too: resets count it)
    reset      Lifeline-Event: reset; body: a StreamReset. Attempt `attempt` failed after its
               deltas were sent: drop the last `discard` deltas (0 when the next attempt
               continues from them, on_midstream = "continue"); the answer goes on with the
               next deltas
    end        Lifeline-Event: end; body: the CompletionReply llm.complete would send, with
               content null (the text came as deltas), its tool_calls whole, and `stream`
               (ttft_ms, chunks, resets)
    error      Lifeline-Event: error; body: the error CompletionReply llm.complete would send

Every event carries Lifeline-Seq (1, 2, 3, ... per request) and Lifeline-Attempt (the attempt
it belongs to: 1, 2, ... in the order attempts started, as the non-skipped entries of the
reply's `attempts` are listed; 0 on an error event when no attempt started). Exactly one end
or error event closes a stream. Core NATS drops messages for a consumer that falls too far
behind: a missing Lifeline-Seq means the text cannot be trusted, and Assembler raises
StreamGap.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, NamedTuple

import msgspec

from schemas.subjects import ATTEMPT_NO, EVENT, SEQ
from schemas.wire import (
    CompletionReply,
    ErrorInfo,
    ToolCall,
    ToolCallDelta,
    reply_decoder,
    tool_call_delta_decoder,
)

DELTA = "delta"
TOOL_CALL = "tool_call"
RESET = "reset"
END = "end"
ERROR = "error"
EventKind = Literal["delta", "tool_call", "reset", "end", "error"]


class StreamReset(msgspec.Struct, frozen=True):
    attempt: int  # the attempt that failed after its deltas were sent
    discard: int  # how many of the most recent deltas to drop
    error: ErrorInfo  # why the attempt failed (its error kind and message)


reset_decoder = msgspec.json.Decoder(StreamReset)


class StreamGap(Exception):
    """An event is missing (Lifeline-Seq skipped a number): the assembled text is not the answer."""


class StreamProtocolError(Exception):
    """A message on the reply subject that is not an llm.stream event."""


class Event(NamedTuple):
    kind: EventKind
    seq: int
    attempt: int
    text: str = ""  # a delta's text
    tool_call: ToolCallDelta | None = None  # a tool_call event's piece
    reset: StreamReset | None = None
    reply: CompletionReply | None = None  # the end or error event's reply


class Assembler:
    """Turns a stream's events, in the order they arrived, into its text with resets applied.

        assembler = Assembler()
        for msg in messages:                    # each NATS message on the reply subject
            event = assembler.feed(msg.headers, msg.data)
            if event.kind == "reset": ...        # e.g. clear what the user saw: assembler.text
            if assembler.done: break
        assembler.text, assembler.reply          # the answer, and llm.complete's reply to it
        assembler.tool_calls                     # the tool calls so far, put together

    Raises StreamGap on a missing event, StreamProtocolError on anything else unreadable."""

    __slots__ = ("_deltas", "reply", "seq")

    def __init__(self) -> None:
        self._deltas: list[str | ToolCallDelta] = []
        self.seq = 0  # the last event's Lifeline-Seq
        self.reply: CompletionReply | None = None  # set by the end or error event

    @property
    def text(self) -> str:
        return "".join(d for d in self._deltas if isinstance(d, str))

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The tool calls the deltas so far make, in index order (the end event's reply has
        them whole too)."""
        calls: dict[int, list[str]] = {}
        names: dict[int, tuple[str, str]] = {}
        for d in self._deltas:
            if isinstance(d, ToolCallDelta):
                calls.setdefault(d.index, []).append(d.arguments)
                if d.name is not None:
                    names[d.index] = (d.id or "", d.name)
        return [
            ToolCall(names[i][0], names[i][1], "".join(calls[i]) or "{}")
            for i in sorted(calls)
            if i in names
        ]

    @property
    def done(self) -> bool:
        return self.reply is not None

    def feed(self, headers: Mapping[str, str] | None, data: bytes) -> Event:
        if self.reply is not None:
            raise StreamProtocolError(f"an event after the stream ended ({len(data)} bytes)")
        headers = headers or {}
        seq, attempt = _number(headers, SEQ), _number(headers, ATTEMPT_NO)
        if seq != self.seq + 1:
            raise StreamGap(
                f"event {seq} arrived after event {self.seq}: {seq - self.seq - 1} lost "
                "(the consumer fell behind, or the connection dropped); ask again"
            )
        self.seq = seq
        kind = headers.get(EVENT, DELTA)
        try:
            if kind == DELTA:
                text = data.decode()
                self._deltas.append(text)
                return Event(DELTA, seq, attempt, text=text)
            if kind == TOOL_CALL:
                piece = tool_call_delta_decoder.decode(data)
                self._deltas.append(piece)
                return Event(TOOL_CALL, seq, attempt, tool_call=piece)
            if kind == RESET:
                reset = reset_decoder.decode(data)
                if reset.discard:
                    del self._deltas[-reset.discard :]
                return Event(RESET, seq, attempt, reset=reset)
            if kind in (END, ERROR):
                self.reply = reply_decoder.decode(data)
                return Event(kind, seq, attempt, reply=self.reply)
        except (UnicodeDecodeError, msgspec.DecodeError) as exc:
            raise StreamProtocolError(f"unreadable {kind} event {seq}: {exc}") from None
        raise StreamProtocolError(f"unknown event kind {kind!r} (event {seq})")


def pieces(text: str, max_bytes: int) -> list[bytes]:
    """`text` as UTF-8 pieces of at most max_bytes each, cut between characters (a chunk
    must fit one NATS message, and each must decode on its own)."""
    data = text.encode()
    if len(data) <= max_bytes:
        return [data] if data else []
    out = []
    while len(data) > max_bytes:
        cut = max_bytes
        while cut > 0 and (data[cut] & 0xC0) == 0x80:  # a continuation byte: inside a character
            cut -= 1
        out.append(data[:cut])
        data = data[cut:]
    if data:
        out.append(data)
    return out


def _number(headers: Mapping[str, str], name: str) -> int:
    value = headers.get(name, "")
    if not value.isdigit():
        raise StreamProtocolError(f"an llm.stream event needs a numeric {name} header")
    return int(value)
