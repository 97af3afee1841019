"""A provider that catches its call's CancelledError and runs on (a library catching
BaseException, a retry loop) must not hold its caller: whoever ends the call (its deadline,
a shutdown, a cancel) settles its reply then, and what the provider gives when it does end is
dropped. A real nats-server and a real worker serving a Python model that runs on until the
test lets it go, so what is asserted is the order of events, not how long they took."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import nats.errors
import pytest
from helpers import config, wait_for
from nats.aio.client import Client
from nats.aio.subscription import Subscription

from schemas import subjects
from schemas.deadline import Deadline
from schemas.wire import ProviderFailure, encoder, provider_reply_decoder
from workers.plugin import Answer, Model, ModelError, ProviderRequest, Usage

PROVIDER = "runaway"


class Held:
    """What the model does, seen by the test: how many cancels it caught, and whether it has
    returned; `release` lets it go. Made again for each test (the `held` fixture)."""

    def __init__(self) -> None:
        self.cancels = 0
        self.caught = asyncio.Event()  # it caught a cancel and runs on
        self.release = asyncio.Event()
        self.returned = asyncio.Event()


HELD = Held()


class RunsOnAfterCancel(Model):
    """Catches every cancel and runs on until the test releases it; then answers, or fails
    when asked to "fail". A request saying "quick" is answered at once."""

    async def call(self, request: ProviderRequest) -> str:
        text = request.messages[-1].text
        if text == "quick":
            return "quick"
        await _run_on()
        if text == "fail":  # as a retry loop that caught the cancel gives up in the end
            raise ModelError("connection", "gave up after the cancel")
        return "an answer past the deadline"

    async def stream(self, request: ProviderRequest) -> AsyncIterator[str | Answer]:
        yield "before the deadline"
        await _run_on()
        yield "after the deadline"
        yield Answer(usage=Usage(1, 2), finish_reason="stop")


async def _run_on() -> None:
    held = HELD
    while not held.release.is_set():
        try:
            await held.release.wait()
        except asyncio.CancelledError:
            held.cancels += 1
            held.caught.set()
    held.returned.set()


@pytest.fixture
def held() -> Iterator[Held]:
    global HELD
    HELD = Held()
    yield HELD
    HELD.release.set()  # a test that failed early leaves no call running


async def start(lifeline: Any) -> Any:
    model = {"kind": "python", "class": f"{__name__}:RunsOnAfterCancel", "timeout_s": 30}
    stack = await lifeline(config({PROVIDER: model}))
    return stack.workers[PROVIDER]


async def send(
    client: Client, inbox: str, deadline_s: float, text: str = "hi", **headers: str
) -> None:
    request = encoder.encode({"id": "r", "messages": [{"role": "user", "content": text}]})
    headers[subjects.DEADLINE_MS] = Deadline.header_after(deadline_s)
    await client.publish(subjects.provider_subject(PROVIDER), request, inbox, headers=headers)


async def settle(client: Client, worker: Any, held: Held) -> None:
    """Let the model return, and wait until the worker is done with it, and until whatever it
    sent meanwhile has reached the client: a quick call's reply comes after it on the same
    connection."""
    held.release.set()
    await held.returned.wait()
    await wait_for(lambda: worker.in_flight == 0, what="the runaway call still counted")
    inbox = client.new_inbox()
    replies = await client.subscribe(inbox)
    await send(client, inbox, 30, "quick")
    reply = provider_reply_decoder.decode((await replies.next_msg(timeout=5)).data)
    assert getattr(reply, "content", None) == "quick", reply


async def first_reply(replies: Subscription) -> Any:
    """The first reply; the timeout only bounds a test of a worker that never answers."""
    return provider_reply_decoder.decode((await replies.next_msg(timeout=10)).data)


def worker_spans(exporter: Any) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith("chat ")]


async def test_the_timeout_goes_at_the_deadline_while_the_provider_runs_on(
    lifeline, client, held, exporter, caplog
):
    worker = await start(lifeline)
    inbox = client.new_inbox()
    replies = await client.subscribe(inbox)
    await send(client, inbox, 0.3)
    reply = await first_reply(replies)
    assert not held.returned.is_set()  # it came at the deadline, not when the provider ended
    assert isinstance(reply, ProviderFailure) and reply.kind == "timeout", reply
    assert held.cancels == 1
    # The runaway call holds what it holds until it ends: it keeps its place in flight.
    assert worker.in_flight == 1
    assert worker.in_flight_bytes > 0
    await settle(client, worker, held)
    assert replies.pending_msgs == 0  # the provider's late answer went nowhere
    assert caplog.text.count("what it gave is dropped") == 1
    assert worker.in_flight_bytes == 0
    assert (worker.tally.errors, worker.tally.last_error) == (1, "timeout")
    await wait_for(lambda: len(worker_spans(exporter)) == 2)  # the runaway call's, the quick one's
    assert sorted(s.attributes.get("error.type", "ok") for s in worker_spans(exporter)) == [
        "ok",
        "timeout",
    ]


async def test_a_stream_gets_its_timeout_at_the_deadline_and_no_piece_after_it(
    lifeline, client, held
):
    worker = await start(lifeline)
    inbox, chunks_to = client.new_inbox(), client.new_inbox()
    replies, chunks = await client.subscribe(inbox), await client.subscribe(chunks_to)
    await send(client, inbox, 0.3, **{subjects.STREAM_TO: chunks_to})
    reply = await first_reply(replies)
    assert not held.returned.is_set()
    assert isinstance(reply, ProviderFailure) and reply.kind == "timeout", reply
    assert chunks.pending_msgs == 1  # the piece before the deadline
    await settle(client, worker, held)
    assert replies.pending_msgs == 0
    assert chunks.pending_msgs == 1  # none of the pieces the provider gave after its cancel


@pytest.mark.parametrize("ending", ["hi", "fail"], ids=["answers", "fails"])
async def test_a_call_its_dispatcher_cancelled_gets_no_reply_when_its_deadline_passes(
    lifeline, client, held, ending
):
    """The dispatcher gave up on it (a cancel message): it gets nothing, its deadline's
    timeout included, however long the provider runs on, and however it ends."""
    worker = await start(lifeline)
    inbox = client.new_inbox()
    replies = await client.subscribe(inbox)
    await send(client, inbox, 0.5, ending, **{subjects.ATTEMPT_ID: "a1"})
    await wait_for(lambda: worker.in_flight == 1)
    await client.publish(subjects.cancel_subject(PROVIDER), b"a1")
    await held.caught.wait()
    await wait_for(lambda: held.cancels == 2, what="the deadline's cancel never came")
    # A while for a reply that must not come: a slow machine can only make this miss one.
    with pytest.raises(nats.errors.TimeoutError):
        await replies.next_msg(timeout=0.5)
    await settle(client, worker, held)
    assert replies.pending_msgs == 0
    assert worker.cancelled == 1


async def test_a_call_cut_short_at_shutdown_gets_no_responders_while_its_provider_runs_on(
    lifeline, client, held
):
    worker = await start(lifeline)
    inbox = client.new_inbox()
    replies = await client.subscribe(inbox)
    await send(client, inbox, 30)
    await wait_for(lambda: worker.in_flight == 1)
    stopping = asyncio.ensure_future(worker.stop(grace_s=0))
    reply = await first_reply(replies)
    assert not held.returned.is_set()  # its dispatcher moves on now, not when the call ends
    assert isinstance(reply, ProviderFailure) and reply.kind == "no_responders", reply
    held.release.set()
    await held.returned.wait()
    await stopping
    await wait_for(lambda: worker.in_flight == 0)
    await worker.nc.flush()  # what the worker sent has reached the server, then the client
    await client.flush()
    assert replies.pending_msgs == 0
