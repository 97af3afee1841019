"""The connection the LangChain and Haystack models share per NATS URL
(service/integrations/bridge.py), held by every model that calls through it: one model's
close() releases its own hold, and the connection closes with the last one.

The sync calls run in a thread (asyncio.to_thread): the stack under test runs on this test's
event loop, which a blocking call on it would stall."""

from __future__ import annotations

import asyncio
import gc
import os

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")  # before haystack is imported

import pytest
from helpers import config, fake, wait_for

from service.client import LifelineError
from service.integrations import bridge
from service.integrations.haystack import LifelineChatGenerator
from service.integrations.langchain import ChatLifeline

# A quick route for the calls that take a hold, a slow one for the calls in flight.
PROVIDERS = {"quick": fake(), "slow": fake(latency_ms=2000)}
ROUTES = {"default": {"targets": ["quick"]}, "slow": {"targets": ["slow"]}}


@pytest.fixture
async def models(nats_url: str):
    """A LangChain chain's model and a Haystack pipeline's generator on the same URL, as two
    components of one app hold them; both closed at the end, and the URL's connection too."""
    chain = ChatLifeline(model="slow", nats_url=nats_url, timeout=10)
    generator = LifelineChatGenerator(nats_url=nats_url, timeout=10)
    yield chain, generator
    for model in (chain, generator):
        await asyncio.to_thread(model.close)
    await asyncio.to_thread(bridge.close, nats_url)


async def test_a_models_close_leaves_the_calls_of_the_other_models_alone(
    lifeline, nats_url, models
):
    """A Haystack generator's close() (a pipeline's cleanup), and that of a copy of the chain's
    model, closed the connection they shared with the chain: its calls in flight raised
    LifelineError."""
    stack = await lifeline(config(PROVIDERS, ROUTES))
    chain, generator = models
    copy = chain.model_copy(update={"streaming": True})  # as LangChain's own code makes them
    await generator.run_async("hold")
    await copy.ainvoke("hold", model="default")
    asked = asyncio.gather(
        chain.ainvoke("one"),
        asyncio.to_thread(lambda: "".join(chunk.content for chunk in chain.stream("two three"))),
    )
    slow = stack.workers["slow"]
    await wait_for(lambda: slow.in_flight == 2, 5, what="both calls at the worker")
    await asyncio.to_thread(generator.close)
    await asyncio.to_thread(copy.close)
    one, two = await asyncio.wait_for(asked, 10)
    assert (one.content, two) == ("one", "two three")
    again = await asyncio.to_thread(generator.run, "again")  # a closed model calls again
    assert again["replies"][0].text == "again"


async def test_the_last_holders_close_ends_the_calls_in_flight_with_an_error(
    lifeline, nats_url, models
):
    stack = await lifeline(config(PROVIDERS, ROUTES))
    chain, generator = models
    await generator.run_async("hold")
    await asyncio.to_thread(generator.close)
    call = asyncio.ensure_future(asyncio.to_thread(chain.invoke, "one"))
    await wait_for(lambda: stack.workers["slow"].in_flight == 1, 5, what="the call at the worker")
    await asyncio.to_thread(chain.close)  # no other model holds it: it closes
    with pytest.raises(LifelineError, match="closed"):
        await asyncio.wait_for(call, 10)


async def test_a_model_dropped_without_close_does_not_keep_the_connection_open(
    lifeline, nats_url, models
):
    """A model never closed holds the connection while it lives; once it is garbage, the
    close() of the last model still holding it closes it (no thread left behind)."""
    await lifeline(config(PROVIDERS, ROUTES))
    chain, _ = models
    dropped = LifelineChatGenerator(nats_url=nats_url, timeout=10)
    await dropped.run_async("hold")
    await chain.ainvoke("hold", model="default")
    shared = bridge.connection(nats_url)
    del dropped
    gc.collect()
    assert not shared.closed
    await asyncio.to_thread(chain.close)
    assert shared.closed and not shared._thread.is_alive()
