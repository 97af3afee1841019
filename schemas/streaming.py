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
    error      Lifeline-Event: error; body: the error CompletionReply llm.complete would send,
               with `stream` as on end (its chunks: the deltas sent before the failure)

Every event carries Lifeline-Seq (1, 2, 3, ... per request) and Lifeline-Attempt (the attempt
it belongs to: 1, 2, ... in the order attempts started, as the non-skipped entries of the
reply's `attempts` are listed; 0 on an error event when no attempt started). Exactly one end
or error event closes a stream. Core NATS drops messages for a consumer that falls too far
behind: a missing Lifeline-Seq means the text cannot be trusted, and Assembler raises
StreamGap.

A client may ask for heartbeats with the request header Lifeline-Heartbeat-Ms (milliseconds,
kept within HEARTBEAT_MS_BOUNDS): the dispatcher that takes the request then sends an empty
message with Lifeline-Event: heartbeat at once, and another whenever the stream sent nothing
for that long, until its end event. A heartbeat has no Lifeline-Seq (it is no part of the
answer) and comes at most once per interval. Once one came, a stream silent for
`heartbeat_silence_s(interval)` lost its dispatcher (it died, or its NATS connection did):
core NATS delivers a request once, so no other dispatcher takes it over; send it again. A
client that asks for none gets none.
"""

from __future__ import annotations

from array import array
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
HEARTBEAT = "heartbeat"
EventKind = Literal["delta", "tool_call", "reset", "end", "error", "heartbeat"]

HEARTBEAT_MS_BOUNDS = (200, 60_000)  # a request's Lifeline-Heartbeat-Ms is kept within these


def heartbeat_silence_s(every_s: float) -> float:
    """How long a stream that sends heartbeats every `every_s` may stay silent before its
    dispatcher counts as gone: a dispatcher sends one within twice the interval of its last
    event at most, so three intervals and a second leave room for a busy one."""
    return 3 * every_s + 1.0


def is_heartbeat(headers: Mapping[str, str] | None) -> bool:
    return headers is not None and headers.get(EVENT) == HEARTBEAT


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

    Raises StreamGap on a missing event, StreamProtocolError on anything else unreadable.

    The deltas are kept joined as they come (the text's UTF-8, each call's arguments'), with
    each one's size for a reset to take it off: a provider's pieces are often a few bytes
    each, and one Python object per piece cost tens of times the answer's size."""

    __slots__ = ("_arguments", "_count", "_named", "_runs", "_text", "reply", "seq")

    def __init__(self) -> None:
        self._text = bytearray()  # the text deltas, joined
        self._arguments: dict[int, bytearray] = {}  # each call's pieces' arguments, joined
        self._runs: list[_Run] = []  # every delta's size, in order, in runs of one kind
        self._count = 0  # the deltas held
        # (place among the deltas, index, id, name) of each piece that names its call.
        self._named: list[tuple[int, int, str | None, str]] = []
        self.seq = 0  # the last event's Lifeline-Seq
        self.reply: CompletionReply | None = None  # set by the end or error event

    @property
    def text(self) -> str:
        return self._text.decode()

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The tool calls the deltas so far make, in index order (the end event's reply has
        them whole too)."""
        names = {index: (call_id or "", name) for _, index, call_id, name in self._named}
        return [
            ToolCall(*names[i], self._arguments[i].decode() or "{}")
            for i in sorted(self._arguments)
            if i in names  # a piece naming it is held (a reset may have taken all off)
        ]

    @property
    def done(self) -> bool:
        return self.reply is not None

    def feed(self, headers: Mapping[str, str] | None, data: bytes) -> Event:
        if self.reply is not None:
            raise StreamProtocolError(f"an event after the stream ended ({len(data)} bytes)")
        headers = headers or {}
        if headers.get(EVENT) == HEARTBEAT:  # no part of the answer, and not numbered
            return Event(HEARTBEAT, self.seq, 0)
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
                self._text += data
                self._add(None, len(data))
                return Event(DELTA, seq, attempt, text=text)
            if kind == TOOL_CALL:
                piece = tool_call_delta_decoder.decode(data)
                self._add_piece(piece)
                return Event(TOOL_CALL, seq, attempt, tool_call=piece)
            if kind == RESET:
                reset = reset_decoder.decode(data)
                if reset.discard:  # as `del deltas[-discard:]` would, whatever the number
                    self._drop(len(range(self._count)[-reset.discard :]))
                return Event(RESET, seq, attempt, reset=reset)
            if kind in (END, ERROR):
                self.reply = reply_decoder.decode(data)
                return Event(kind, seq, attempt, reply=self.reply)
        except (UnicodeDecodeError, msgspec.DecodeError) as exc:
            raise StreamProtocolError(f"unreadable {kind} event {seq}: {exc}") from None
        raise StreamProtocolError(f"unknown event kind {kind!r} (event {seq})")

    def _add_piece(self, piece: ToolCallDelta) -> None:
        if piece.name is not None:
            self._named.append((self._count, piece.index, piece.id, piece.name))
        arguments = piece.arguments.encode()
        joined = self._arguments.get(piece.index)
        if joined is None:
            joined = self._arguments[piece.index] = bytearray()
        joined += arguments
        self._add(piece.index, len(arguments))

    def _add(self, index: int | None, size: int) -> None:
        """One more delta of `size` bytes: text (`index` None), or a piece of call `index`."""
        runs = self._runs
        if not runs or runs[-1].index != index:
            runs.append(_Run(index))
        runs[-1].sizes.append(size)
        self._count += 1

    def _drop(self, count: int) -> None:
        """Takes the last `count` deltas off."""
        self._count -= count
        while count:
            run = self._runs[-1]
            taken = min(count, len(run.sizes))
            size = sum(run.sizes[-taken:])
            joined = self._text if run.index is None else self._arguments[run.index]
            del joined[len(joined) - size :]
            del run.sizes[-taken:]
            if not run.sizes:
                self._runs.pop()
            count -= taken
        while self._named and self._named[-1][0] >= self._count:
            self._named.pop()


class _Run:
    """Deltas in a row of one kind, text (`index` None) or pieces of call `index`: each one's
    size in bytes (a delta is one NATS message: 64 MiB at most)."""

    __slots__ = ("index", "sizes")

    def __init__(self, index: int | None) -> None:
        self.index = index
        self.sizes = array("I")


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
    # ASCII digits, and few enough for int(): str.isdigit() also takes "²" (which int()
    # refuses) and "١", and over 4,300 digits int() raises ValueError. Anyone who knows a
    # stream's reply subject may publish there, and its reader must get this error, not those.
    value = headers.get(name, "")
    if not (value.isascii() and value.isdigit()) or len(value) > 20:
        raise StreamProtocolError(f"an llm.stream event needs a numeric {name} header")
    return int(value)
