"""The server-side processes under test; each function is the setup of one child process.

    responder   a plain nats-py subscriber that answers every message with one fixed
                ProviderOk JSON, one asyncio task per message (the "instant provider")
    relay       the plain nats-py baseline for a hop: for each message a task does
                nc.request(<responder subject>) and publishes the answer to msg.reply
    dispatcher  the real Lifeline dispatcher (service.app.start_dispatcher), with tracing on
    worker      a real Lifeline worker (service.app.start_worker) for one provider
    gateway     Lifeline's OpenAI-compatible HTTP gateway (service.gateway), uvicorn on a free
                port of 127.0.0.1, in front of the dispatcher's llm.complete, checking an API key
    canned      the same HTTP server stack (Starlette on uvicorn with httptools) answering every
                POST with one fixed chat.completion: the HTTP floor, without NATS or Lifeline
    streamer    a plain nats-py streaming provider worker (the worker protocol's streaming
                variant): each chunk's text is the time it was sent (time.monotonic_ns, one
                clock for every process on the machine), so a client can tell each chunk's
                latency; it answers Lifeline's dispatcher on llm.provider.streamer and clients
                directly on bench.stream.direct, the same way

Lifeline runs with its real default features: msgspec decoding, one audit event per
request, and tracing through an SDK TracerProvider with the default sampler (parent-based
always-on) and a BatchSpanProcessor whose exporter drops the spans, so spans are created,
recorded and queued for real, and only the export (network I/O) is skipped.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Sequence
from typing import Any

import nats
from nats.aio.msg import Msg
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from schemas import ProviderOk, Usage, subjects
from schemas.wire import encoder, provider_request_decoder
from service.app import start_dispatcher, start_worker
from service.config import parse_config
from service.memory import release_memory, settle_after_start
from service.natsio import ensure_subscribed
from service.telemetry import Tracing
from tests.bench.harness import Served

INSTANT_ANSWER = encoder.encode(ProviderOk(content="Hello", model="fake-1", usage=Usage(1, 1)))


class DropSpans(SpanExporter):
    """An exporter that accepts every batch and throws it away."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def tracer_provider() -> Tracing:
    provider = Tracing()  # default sampler: ParentBased(ALWAYS_ON)
    provider.add_span_processor(BatchSpanProcessor(DropSpans()))
    return provider


async def _quiet(exc: Exception) -> None:
    """Error callback of the plain clients: connection trouble is the harness's business."""


async def _connect(params: dict[str, Any]) -> nats.NATS:
    return await nats.connect(params["url"], name=params["name"], error_cb=_quiet)


class _Tasks:
    """One asyncio task per message, referenced until done (as Lifeline does)."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


async def responder(params: dict[str, Any]) -> Served:
    nc = await _connect(params)
    tasks = _Tasks()

    async def answer(msg: Msg) -> None:
        await nc.publish(msg.reply, INSTANT_ANSWER)

    async def on_msg(msg: Msg) -> None:
        tasks.spawn(answer(msg))

    await nc.subscribe(params["subject"], cb=on_msg)
    await ensure_subscribed(nc)
    return Served(stop=nc.close)


async def relay(params: dict[str, Any]) -> Served:
    nc = await _connect(params)
    tasks = _Tasks()
    upstream = params["upstream"]

    async def forward(msg: Msg) -> None:
        try:
            answer = await nc.request(upstream, msg.data, timeout=params.get("timeout_s", 30.0))
        except nats.errors.Error:
            return  # the client times out; a baseline needs no error path
        await nc.publish(msg.reply, answer.data)

    async def on_msg(msg: Msg) -> None:
        tasks.spawn(forward(msg))

    await nc.subscribe(params["subject"], cb=on_msg)
    await ensure_subscribed(nc)
    return Served(stop=nc.close)


async def dispatcher(params: dict[str, Any]) -> Served:
    """A Lifeline dispatcher; "pause"/"resume" leave/rejoin its queue group, "stats" reports in-flight,
    "heap" counts live objects (and can collect garbage and trim malloc's free memory first)."""
    tracers = tracer_provider()
    component, disp = await start_dispatcher(parse_config(params["config"]), params["url"], tracers)
    if params.get("paused"):
        await disp.stop()
    settle_after_start()  # as `lifeline dispatcher` does once it is up

    async def pause(_: Any) -> None:
        await disp.stop()

    async def resume(_: Any) -> None:
        await disp.start()

    async def stats(_: Any) -> dict[str, int]:
        return {"in_flight": disp.in_flight}

    async def heap(collect: bool) -> dict[str, int]:
        """Live GC-tracked objects; with `collect`, after a full collection and malloc_trim(0)."""
        if collect:  # to tell allocator slack from live memory
            release_memory()
        return {"gc_objects": len(gc.get_objects())}

    async def stop() -> None:
        await component.stop()
        tracers.shutdown()

    return Served({"pause": pause, "resume": resume, "stats": stats, "heap": heap}, stop)


async def worker(params: dict[str, Any]) -> Served:
    tracers = tracer_provider()
    component, _runtime = await start_worker(
        parse_config(params["config"]), params["provider"], params["url"], tracers
    )
    settle_after_start()  # as `lifeline worker` does once it is up

    async def stop() -> None:
        await component.stop()
        tracers.shutdown()

    return Served(stop=stop)


async def gateway(params: dict[str, Any]) -> Served:
    from service.gateway import Gateway, Models

    nc = await _connect(params)
    server = Gateway(nc, models=Models(params["routes"]), keys=params["keys"])
    await server.start("127.0.0.1", 0)

    async def stop() -> None:
        await server.stop()
        await nc.close()

    return Served(stop=stop, info={"url": server.url})


CANNED_ANSWER = encoder.encode(
    {
        "id": "chatcmpl-canned",
        "object": "chat.completion",
        "created": 0,
        "model": "canned",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
)


async def canned(params: dict[str, Any]) -> Served:
    """The HTTP floor: the gateway's server stack, reading the body and answering at once."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def answer(request: Request) -> Response:
        await request.body()
        return Response(CANNED_ANSWER, media_type="application/json")

    app = Starlette(routes=[Route("/v1/chat/completions", answer, methods=["POST"])])
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        loop="none",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_config=None,
        log_level="warning",
    )
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    await server.startup()
    port = server.servers[0].sockets[0].getsockname()[1]

    async def stop() -> None:
        server.should_exit = True
        await server.shutdown()

    return Served(stop=stop, info={"url": f"http://127.0.0.1:{port}/v1"})


STREAMER = "streamer"  # its provider name in Lifeline's config
STREAM_DIRECT_SUBJECT = "bench.stream.direct"


def stream_spec(text: str) -> tuple[int, float]:
    """A streamer request's last message, "CHUNKS INTERVAL_MS": how much to stream, how fast."""
    chunks, interval_ms = text.split()
    return int(chunks), float(interval_ms)


async def streamer(params: dict[str, Any]) -> Served:
    nc = await _connect(params)
    tasks = _Tasks()

    async def stream(msg: Msg) -> None:
        request = provider_request_decoder.decode(msg.data)
        chunks, interval_ms = stream_spec(request.messages[-1].content)
        to = msg.headers[subjects.STREAM_TO] if msg.headers else None
        if to is None:
            return
        for i in range(chunks):
            if i and interval_ms:
                await asyncio.sleep(interval_ms / 1000)
            await nc.publish(to, b"%d token" % time.monotonic_ns())
        await nc.publish(msg.reply, encoder.encode(ProviderOk("", STREAMER, chunks=chunks)))

    async def on_msg(msg: Msg) -> None:
        tasks.spawn(stream(msg))

    await nc.subscribe(subjects.provider_subject(STREAMER), "lifeline-provider-streamer", on_msg)
    await nc.subscribe(STREAM_DIRECT_SUBJECT, cb=on_msg)
    await ensure_subscribed(nc)
    return Served(stop=nc.close)
