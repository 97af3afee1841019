"""Fixtures: a real nats-server per test, a Lifeline stack on it, a client, the audit feed.

No mock broker: every integration test talks to a nats-server started on a free port
with its own JetStream directory, and stopped afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from schemas import AuditEvent, CompletionReply, subjects
from schemas.wire import audit_decoder, encoder, reply_decoder
from service.app import Stack, start_stack
from service.config import parse_config
from service.embedded import EmbeddedNats
from service.telemetry import Tracing
from service.natsio import ensure_subscribed

USER_HELLO = {"messages": [{"role": "user", "content": "Why did the chicken cross the road?"}]}


@pytest.fixture
def nats_url() -> Iterator[str]:
    with EmbeddedNats(port=-1) as server:
        yield server.url


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracers(exporter: InMemorySpanExporter) -> Iterator[Tracing]:
    provider = Tracing()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_url)
    yield nc
    await nc.close()


@pytest.fixture
async def lifeline(nats_url: str, tracers: Tracing) -> AsyncIterator[Any]:
    """Factory: `await lifeline(toml_dict, workers=[...])` starts a stack; all are stopped at the end."""
    stacks: list[Stack] = []

    async def start(config: dict[str, Any], workers: list[str] | None = None) -> Stack:
        stack = await start_stack(parse_config(config), nats_url, tracers, workers=workers)
        stacks.append(stack)
        return stack

    yield start
    for stack in stacks:
        await stack.stop()


class AuditFeed:
    def __init__(self) -> None:
        self.events: list[tuple[str, AuditEvent]] = []
        self.raw: list[bytes] = []
        self._changed = asyncio.Event()

    async def on_msg(self, msg: Any) -> None:
        self.raw.append(msg.data)
        self.events.append((msg.subject, audit_decoder.decode(msg.data)))
        self._changed.set()

    async def wait_for(self, count: int, timeout_s: float = 5.0) -> list[tuple[str, AuditEvent]]:
        async with asyncio.timeout(timeout_s):
            while len(self.events) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.events


@pytest.fixture
async def audit(client: Client) -> AuditFeed:
    feed = AuditFeed()
    await client.subscribe(subjects.AUDIT_ALL, cb=feed.on_msg)
    await ensure_subscribed(client)
    return feed


async def settled(client: Client, *stacks: Stack) -> None:
    """Return once everything the stacks' dispatchers will ever send for the requests so far has
    reached `client`'s callbacks: a barrier for "no duplicate came", instead of a sleep.

    No request in flight means no more publishes; a flush of each dispatcher's connection means
    the server has routed what they published; a flush of the client's then means the server
    wrote those messages to it before its PONG; a few loop turns let the callbacks run."""
    for stack in stacks:
        assert stack.dispatcher is not None
        async with asyncio.timeout(10):
            while stack.dispatcher.in_flight:
                await asyncio.sleep(0.005)
        await stack.components[-1].nc.flush()
    await client.flush()
    for _ in range(10):
        await asyncio.sleep(0)


async def ask(
    client: Client, request: dict[str, Any] | bytes, timeout_s: float = 5.0, **kw: Any
) -> CompletionReply:
    payload = request if isinstance(request, bytes) else encoder.encode(request)
    msg = await client.request(subjects.COMPLETE, payload, timeout=timeout_s, **kw)
    return reply_decoder.decode(msg.data)


def fake(**settings: Any) -> dict[str, Any]:
    return {"kind": "fake", **settings}


def config(
    providers: dict[str, dict[str, Any]], routes: dict[str, Any] | None = None, **dispatcher: Any
) -> dict:
    """A config dict; the default route tries the providers in the order given."""
    data: dict[str, Any] = {
        "providers": providers,
        "routes": routes if routes is not None else {"default": {"targets": list(providers)}},
    }
    if dispatcher:
        data["dispatcher"] = dispatcher
    return data


def as_dict(struct: msgspec.Struct) -> dict[str, Any]:
    return msgspec.to_builtins(struct)
