"""What a stream costs in memory where its whole answer is kept: the dispatcher's Relay (the
text, for the end's checks and a prefill) and the reader's Assembler (a client's, the
gateway's). Providers stream in pieces of a few bytes (a token, two characters of a tool
call's input), and each piece held as its own Python object cost tens of times its bytes:
the answer at max_response_bytes (4 MiB) took some 250 MB of the gateway's memory, and the
dispatcher's end some 250 MB more, per stream. Memory is measured with tracemalloc."""

from __future__ import annotations

import json
import random
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import TypeVar

from schemas import ErrorInfo, ProviderOk
from schemas.streaming import RESET, TOOL_CALL, Assembler, StreamReset
from schemas.subjects import ATTEMPT_NO, EVENT, SEQ
from schemas.wire import ToolCall, ToolCallDelta, encoder
from service.streaming import Relay

# A tool call's arguments, about 200 KB, and their pieces of two characters each.
ARGUMENTS = json.dumps({"digits": "0123456789" * 20_000})
TWO = [ARGUMENTS[i : i + 2] for i in range(0, len(ARGUMENTS), 2)]

T = TypeVar("T")


def held_and_peak(call: Callable[[], T]) -> tuple[T, int, int]:
    """`call()`, the memory Python still held for what it made, and the most it held at once."""
    tracemalloc.start()
    try:
        result = call()
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, held, peak


class Discard:
    def delta(self, attempt: int, text: bytes) -> None:
        pass

    def tool_call(self, attempt: int, piece: bytes) -> None:
        pass

    def reset(self, reset: StreamReset) -> None:
        pass

    async def end(self, reply: object, attempt: int) -> object:
        return reply


def test_the_dispatcher_holds_a_streamed_text_in_about_its_own_size():
    """The relay keeps the owner's text for the end (its content, checked against
    response_format) and for a prefill: each chunk was a bytes object of its own, some 40
    bytes for 2 of text, and joining them at the end took 80 more each."""
    chunks = [piece.encode() for piece in TWO]  # made before memory is traced
    relay = Relay(Discard(), time.monotonic())
    number = relay.number()
    chunk = relay.on_chunk(number)

    def streamed_and_ended() -> ProviderOk:
        for data in chunks:
            chunk(data, False)
        reply = relay.ended(number, ProviderOk("", "m"))
        assert isinstance(reply, ProviderOk)
        return reply

    reply, _, peak = held_and_peak(streamed_and_ended)
    assert reply.content == ARGUMENTS
    assert peak < 4 * len(ARGUMENTS), f"{peak} bytes at most for {len(ARGUMENTS)} of text"


def events(pieces: Iterator[tuple[str, bytes]]) -> list[tuple[dict[str, str], bytes]]:
    """Stream events (headers, body) numbered from 1, each a (kind, body) of `pieces`."""
    out = []
    for seq, (kind, body) in enumerate(pieces, 1):
        headers = {SEQ: str(seq), ATTEMPT_NO: "1"}
        if kind != "delta":
            headers[EVENT] = kind
        out.append((headers, body))
    return out


def tool_call_pieces() -> Iterator[tuple[str, bytes]]:
    yield TOOL_CALL, encoder.encode(ToolCallDelta(0, "call_1", "get_digits"))
    for piece in TWO:
        yield TOOL_CALL, encoder.encode(ToolCallDelta(0, arguments=piece))


def test_a_reader_holds_a_tool_call_streamed_in_many_small_pieces_in_about_its_own_size():
    """Each piece was kept as a ToolCallDelta until the call was put together: some 120
    bytes for every 2 of arguments."""
    stream = events(tool_call_pieces())
    assembler = Assembler()

    def fed() -> None:
        for headers, body in stream:
            assembler.feed(headers, body)

    _, held, _ = held_and_peak(fed)
    assert held < 4 * len(ARGUMENTS), f"{held} bytes held for {len(ARGUMENTS)} of arguments"
    assert assembler.tool_calls == [ToolCall("call_1", "get_digits", ARGUMENTS)]


def test_a_reader_holds_a_text_streamed_in_many_small_deltas_in_about_its_own_size():
    stream = events(("delta", piece.encode()) for piece in TWO)
    assembler = Assembler()

    def fed() -> None:
        for headers, body in stream:
            assembler.feed(headers, body)

    _, held, _ = held_and_peak(fed)
    assert held < 4 * len(ARGUMENTS), f"{held} bytes held for {len(ARGUMENTS)} of text"
    assert assembler.text == ARGUMENTS


class ListAssembler:
    """The reader as the protocol describes it, every delta kept in a list: what Assembler's
    text and tool calls must equal after any events."""

    def __init__(self) -> None:
        self.deltas: list[str | ToolCallDelta] = []

    def feed(self, kind: str, item: str | ToolCallDelta | StreamReset) -> None:
        if isinstance(item, StreamReset):
            if item.discard:
                del self.deltas[-item.discard :]
        else:
            self.deltas.append(item)

    @property
    def text(self) -> str:
        return "".join(d for d in self.deltas if isinstance(d, str))

    @property
    def tool_calls(self) -> list[ToolCall]:
        calls: dict[int, list[str]] = {}
        names: dict[int, tuple[str, str]] = {}
        for d in self.deltas:
            if isinstance(d, ToolCallDelta):
                calls.setdefault(d.index, []).append(d.arguments)
                if d.name is not None:
                    names[d.index] = (d.id or "", d.name)
        return [
            ToolCall(names[i][0], names[i][1], "".join(calls[i]) or "{}")
            for i in sorted(calls)
            if i in names
        ]


def random_event(rng: random.Random) -> tuple[str, str | ToolCallDelta | StreamReset]:
    roll = rng.random()
    if roll < 0.4:
        return "delta", rng.choice(["", "a", "é", "日本", "🙂", 'say "hi"\n'])
    if roll < 0.9:
        index = rng.choice([0, 1, 2, 7])
        arguments = rng.choice(["", "{", '"k"', ": ", "ü", "}", "\\n"])
        if rng.random() < 0.2:
            return TOOL_CALL, ToolCallDelta(index, rng.choice([None, "", "c1"]), "f", arguments)
        return TOOL_CALL, ToolCallDelta(index, arguments=arguments)
    discard = rng.choice([0, 1, 2, 3, 5, 8, 40, 10_000, -1, -3])
    return RESET, StreamReset(1, discard, ErrorInfo("server_error", "failed"))


def test_a_readers_text_and_tool_calls_are_the_deltas_left_after_any_resets():
    """Text and pieces of several calls interleaved, resets discarding any number of the last
    deltas (more than there are too): the text and calls are those of the deltas left."""
    rng = random.Random(7)
    for _ in range(200):
        assembler, reference = Assembler(), ListAssembler()
        for seq in range(1, rng.randint(1, 60)):
            kind, item = random_event(rng)
            body = item.encode() if isinstance(item, str) else encoder.encode(item)
            headers = {SEQ: str(seq), ATTEMPT_NO: "1"}
            if kind != "delta":
                headers[EVENT] = kind
            assembler.feed(headers, body)
            reference.feed(kind, item)
            assert assembler.text == reference.text
            assert assembler.tool_calls == reference.tool_calls
