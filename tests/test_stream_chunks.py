"""A worker's chunks of a stream whose pieces come without a wait (an async generator that
never awaits): merged, so that its dispatcher relays a chunk per turn of the worker's event
loop, not one per piece, and every other request through that dispatcher is still served;
the text whole, in order and scrubbed, and the end's `chunks` what was sent."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import plugin_models
import pytest
from helpers import ROOT, Service, ask, config, fake
from nats.aio.msg import Msg

from schemas.streaming import TOOL_CALL, Assembler
from schemas.subjects import ATTEMPT_ID, DEADLINE_MS, EVENT, STREAM_TO, provider_subject
from schemas.wire import (
    ChatMessage,
    CompletionRequest,
    ProviderOk,
    ProviderRequest,
    ToolCall,
    ToolCallDelta,
    encoder,
    provider_reply_decoder,
    tool_call_delta_decoder,
)
from service.client import stream
from service.natsio import fast_path
from workers.runtime import _STREAM_BURST, WorkerRuntime


async def test_a_stream_that_never_awaits_is_merged_and_its_dispatcher_serves_the_others(
    tmp_path: Path, nats_url: str, client: nats.NATS
) -> None:
    """200,000 one-character pieces, none after a wait, from a plug-in in a worker process of
    its own: the client's stream inbox gets a small fraction of that many deltas (one a piece,
    the dispatcher lagged seconds behind them, every other request through it with it), the
    text whole and in order; an ordinary request sent meanwhile through the same dispatcher
    gets its answer."""
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    providers = {
        "hot": {"kind": "python", "class": "plugin_models:TinyPieces"},
        "other": fake(reply="still served"),
    }
    routes = {"default": {"targets": ["hot"]}, "other": {"targets": ["other"]}}
    service = Service(tmp_path, nats_url, config(providers, routes=routes), env=env)
    try:
        service.start_all(["hot", "other"], dispatchers=1)
        streaming = asyncio.Event()
        deltas = 0
        assembler = Assembler()

        async def read() -> None:
            nonlocal deltas
            request = CompletionRequest([ChatMessage("user", "go")], timeout_s=60)
            async for event in stream(client, request, assembler):
                if event.kind == "delta":
                    deltas += 1
                    streaming.set()

        reading = asyncio.ensure_future(read())
        await asyncio.wait([reading, asyncio.ensure_future(streaming.wait())], timeout=60)
        other = await ask(client, {**hello(), "route": "other"}, timeout_s=60)
        await asyncio.wait_for(reading, 120)
    finally:
        service.stop()
    assert (other.status, other.content) == ("ok", "still served"), other
    reply = assembler.reply
    assert reply is not None and reply.status == "ok", reply
    assert assembler.text == plugin_models.TINY_TEXT  # whole, in order
    assert reply.stream is not None and reply.stream.chunks == deltas
    # About a chunk per turn the worker's loop gets (every 8 KiB of pieces, their framing
    # counted), after the first _STREAM_BURST pieces one by one: some 1,500 here.
    assert deltas < len(plugin_models.TINY_TEXT) // 50, deltas


def hello() -> dict[str, object]:
    return {"messages": [{"role": "user", "content": "hi"}]}


KEY = "sk-test-Zq7xW2vB9nK4mT1r"
TOOL_CALL_PIECE = ToolCallDelta(0, "call_1", "lookup", "{}")


class KeyedHotStream:
    """A provider with a key, as the runtime sees one, whose stream waits once: before the wait,
    a run of pieces that come at once, the key among them a character a piece, a tool-call
    piece, more text; after it, another such run, then the end."""

    secrets = (KEY,)
    model = "hot-1"

    async def complete(self, request: ProviderRequest, timeout_s: float) -> ProviderOk:
        return ProviderOk("x", self.model)

    async def stream(
        self, request: ProviderRequest, timeout_s: float
    ) -> AsyncIterator[str | ToolCallDelta | ProviderOk]:
        for character in "." * (_STREAM_BURST + 2) + f" key {KEY} end":
            yield character
        yield TOOL_CALL_PIECE
        for _ in range(5):
            yield "x"
        await asyncio.sleep(0)
        for _ in range(_STREAM_BURST + 2):
            yield "y"
        yield ProviderOk("", self.model)

    async def aclose(self) -> None:
        pass


async def streamed_chunks(
    nats_url: str, client: nats.NATS, tracers: Any, provider: Any, fast: bool
) -> tuple[ProviderOk, list[Msg]]:
    """`provider`'s stream through a worker runtime (its fast path on or off): the end, and
    the chunk messages it published, in order."""
    worker_nc = await nats.connect(nats_url)
    runtime = WorkerRuntime(
        "keyed", "test", provider, worker_nc, tracers.recorder("lifeline.worker"), 10
    )
    await runtime.start()
    fast_path(worker_nc).enabled = fast
    try:
        inbox = "lifeline-test.chunks"
        sub = await client.subscribe(inbox)
        await client.flush()
        headers = {
            STREAM_TO: inbox,
            DEADLINE_MS: str(int((time.time() + 10) * 1000)),
            ATTEMPT_ID: uuid.uuid4().hex,
        }
        request = ProviderRequest(id="t", messages=[ChatMessage("user", "go")])
        msg = await client.request(
            provider_subject("keyed"), encoder.encode(request), timeout=10, headers=headers
        )
        end = provider_reply_decoder.decode(msg.data)
        assert isinstance(end, ProviderOk), end
        # The chunks came before the reply, on the same connection: all are here.
        chunks = [await sub.next_msg(timeout=5) for _ in range(end.chunks)]
        await client.flush()
        assert sub.pending_msgs == 0  # and no more than it says
    finally:
        await runtime.stop()
        await worker_nc.close()
    return end, chunks


@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "nats_py_publish"])
async def test_merged_pieces_are_scrubbed_kept_in_order_and_counted(
    nats_url: str, client: nats.NATS, tracers: Any, fast: bool
) -> None:
    """Pieces past the burst are held and go out as one chunk, scrubbed together (the key
    split across them is found), before the tool-call piece that follows them, when the
    stream waits, and before the end; a piece after the wait goes out alone again; the end's
    `chunks` counts the messages published. The same through nats-py's publish, when the
    fast path cannot be used."""
    _, chunks = await streamed_chunks(nats_url, client, tracers, KeyedHotStream(), fast)
    events = [
        ("tool_call" if (c.headers or {}).get(EVENT) == TOOL_CALL else "text", c.data.decode())
        for c in chunks
    ]
    assert events == [
        *[("text", ".")] * _STREAM_BURST,  # the burst, one by one
        ("text", ".. key *** end"),  # the rest of the run, merged and scrubbed
        ("tool_call", encoder.encode(TOOL_CALL_PIECE).decode()),
        ("text", "xxxxx"),  # still the same run: held until the stream waited
        *[("text", "y")] * _STREAM_BURST,  # after the wait, a run of its own
        ("text", "yy"),  # held until the end
    ]


# Two calls' arguments, each streamed in pieces of two characters after a piece naming it.
CALLS = [json.dumps({"query": f"{n} " * 700}) for n in ("one", "two")]


class ManyToolPieces:
    """A stream that never waits: two tool calls, each in some 2,000 pieces, then a text."""

    model = "hot-1"

    async def complete(self, request: ProviderRequest, timeout_s: float) -> ProviderOk:
        return ProviderOk("x", self.model)

    async def stream(
        self, request: ProviderRequest, timeout_s: float
    ) -> AsyncIterator[str | ToolCallDelta | ProviderOk]:
        for index, arguments in enumerate(CALLS):
            yield ToolCallDelta(index, f"call_{index}", "lookup")
            for i in range(0, len(arguments), 2):
                yield ToolCallDelta(index, arguments=arguments[i : i + 2])
        yield "done"
        calls = [ToolCall(f"call_{i}", "lookup", arguments) for i, arguments in enumerate(CALLS)]
        yield ProviderOk("", self.model, tool_calls=calls, finish_reason="tool_calls")

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "nats_py_publish"])
async def test_a_tool_call_streamed_in_many_pieces_without_a_wait_goes_out_in_few_chunks(
    nats_url: str, client: nats.NATS, tracers: Any, fast: bool
) -> None:
    """Past the burst, the pieces of one call that come together go out merged, as text does:
    one chunk each made its dispatcher relay, and its client read, some 4,000 events here (an
    Anthropic tool input streams in pieces of a few characters). A piece naming a call, and
    every piece of another call, begins a chunk of its own; the calls put together from the
    chunks are the stream's."""
    end, chunks = await streamed_chunks(nats_url, client, tracers, ManyToolPieces(), fast)
    pieces = [
        tool_call_delta_decoder.decode(c.data)
        for c in chunks
        if (c.headers or {}).get(EVENT) == TOOL_CALL
    ]
    assert len(chunks) < 100, len(chunks)  # about one per 8 KiB of pieces and framing
    assert pieces[:_STREAM_BURST] == [
        ToolCallDelta(0, "call_0", "lookup"),
        *(ToolCallDelta(0, arguments=CALLS[0][i : i + 2]) for i in range(0, 126, 2)),
    ]  # the burst, one by one
    assert [(p.index, p.id, p.name) for p in pieces if p.name is not None] == [
        (0, "call_0", "lookup"),
        (1, "call_1", "lookup"),
    ]  # each call named once, by a chunk beginning it
    for index, arguments in enumerate(CALLS):
        assert "".join(p.arguments for p in pieces if p.index == index) == arguments
    assert [c.data for c in chunks[len(pieces) :]] == [b"done"]
    assert end.tool_calls == [
        ToolCall(f"call_{i}", "lookup", arguments) for i, arguments in enumerate(CALLS)
    ]
