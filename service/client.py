"""A Python client for llm.stream: the request's events as they come, resets applied.

    async for event in stream(nc, CompletionRequest(messages=[ChatMessage("user", "Hi")])):
        if event.kind == "delta":
            print(event.text, end="", flush=True)
        elif event.kind == "reset":
            ...  # the last event.reset.discard deltas are void: redraw from assembler.text
    # the last event is "end" (event.reply: attempts, usage, trace id) or "error"

`stream_text` collects the whole answer instead. Both raise StreamGap when an event went
missing, NoDispatcher when no dispatcher listens, and TimeoutError when the stream stalls for
longer than the request's own timeout allows. Any other language does the same with its NATS
client and the protocol in schemas/streaming.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError

from schemas import CompletionReply, CompletionRequest
from schemas.streaming import Assembler, Event, StreamGap, StreamProtocolError
from schemas.subjects import STREAM
from schemas.wire import encoder

__all__ = ["NoDispatcher", "StreamGap", "StreamProtocolError", "stream", "stream_text"]

_GRACE_S = 5.0  # past the request's own deadline, the dispatcher has surely answered or died
_DEFAULT_TIMEOUT_S = 60.0  # the dispatcher's default_timeout_s, for requests without their own


class NoDispatcher(Exception):
    """Nobody is subscribed to llm.stream: no dispatcher runs on this NATS server."""


async def stream(
    nc: Client, request: CompletionRequest, assembler: Assembler | None = None
) -> AsyncIterator[Event]:
    """Send `request` to llm.stream and yield its events until the end or error event.
    Pass an Assembler to read the text so far (with resets applied) between events."""
    assembler = assembler or Assembler()
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    timeout_s = (request.timeout_s or _DEFAULT_TIMEOUT_S) + _GRACE_S
    give_up = time.monotonic() + timeout_s
    try:
        await nc.publish(STREAM, encoder.encode(request), reply=inbox)
        while not assembler.done:
            left = give_up - time.monotonic()
            try:
                msg = await sub.next_msg(timeout=max(left, 0.001))
            except NatsTimeoutError:
                raise TimeoutError(
                    f"the stream stalled: no end after {timeout_s:g} s (the request's timeout "
                    "and a grace); the dispatcher may have stopped"
                ) from None
            if msg.headers and msg.headers.get("Status") == "503":
                raise NoDispatcher(
                    f"no dispatcher is subscribed to {STREAM}: start one (`lifeline run`)"
                )
            yield assembler.feed(msg.headers, msg.data)
    finally:
        await asyncio.shield(sub.unsubscribe())


async def stream_text(nc: Client, request: CompletionRequest) -> tuple[str, CompletionReply]:
    """The whole streamed answer with resets applied, and the end (or error) event's reply."""
    assembler = Assembler()
    async for _ in stream(nc, request, assembler):
        pass
    assert assembler.reply is not None
    return assembler.text, assembler.reply
