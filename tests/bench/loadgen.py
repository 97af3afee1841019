"""The load generator: a child process that drives request/reply load over one connection.

Two commands:

    run    closed loop: `in_flight` client coroutines, each sending its next request when
           the reply to its previous one arrives. Requests run for `warmup_s` unmeasured,
           then for `duration_s` measured: throughput counts the replies that arrive in the
           measured window, latency is taken from those replies. After the window the
           coroutines stop sending and the outstanding requests are awaited, so nothing
           spills into the next measurement.
    burst  open burst: `count` requests sent at once, all awaited (for the memory case).
    http   closed loop, as `run`, of OpenAI-shaped chat requests over HTTP (POST
           <url>/chat/completions), each client coroutine on a keep-alive HTTP/1.1
           connection of its own: the same load generator for Lifeline's gateway, the HTTP
           floor and LiteLLM's proxy. A success is status 200 with a choice's message
           content. The client is a few lines of asyncio with httptools' response parser:
           httpx spent about 1 ms of CPU per request here, more than the servers measured.
    stream closed loop of streams, as `run`: straight from the streamer (`direct`), or through
           Lifeline's llm.stream (`lifeline`). Per stream: time to first chunk; per chunk:
           its latency from the streamer's send (the time in its text) to its arrival.

Every reply is decoded (ProviderReply for direct/relay, CompletionReply for Lifeline) and
anything but a success counts as an error. For the hung-provider case, `lateness_of_ms`
asks for the lateness of the first attempt's timeout: attempts[0].latency_ms minus it.
For the hedging case, `count_hedged` counts the measured replies with a hedged attempt
(and those a hedge won); other cases never look at the attempts.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httptools
import msgspec
import nats
from nats.aio.msg import Msg

from schemas import ChatMessage, CompletionRequest, ProviderOk, ProviderRequest, subjects
from schemas.streaming import Assembler, StreamGap, StreamProtocolError
from schemas.wire import encoder, provider_reply_decoder, reply_decoder
from tests.bench.harness import Served


async def _quiet(exc: Exception) -> None:
    """Connection trouble shows up as failed requests; no need to log it too."""


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..1); NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def _check(kind: str, data: bytes) -> tuple[bool, Any]:
    """(success, decoded reply) for a reply body."""
    if kind == "lifeline":
        reply = reply_decoder.decode(data)
        return reply.status == "ok", reply
    reply = provider_reply_decoder.decode(data)
    return isinstance(reply, ProviderOk), reply


def _describe_error(reply: Any) -> str:
    error = getattr(reply, "error", None) or reply
    return repr(error)[:300]


class _Tally:
    """What one measurement collects."""

    def __init__(self, count_hedged: bool = False) -> None:
        self.count_hedged = count_hedged
        self.hedged = 0  # measured replies with an attempt started as a hedge
        self.hedge_won = 0  # ... whose answer came from that hedge
        self.latencies_ms: list[float] = []
        self.lateness_ms: list[float] = []
        self.errors = 0
        self.handled = 0  # every reply or failure, measured or not (CPU per request uses it)
        self.first_error = ""
        self.chunks_handled = 0  # streams: every chunk, measured or not (CPU per chunk uses it)
        self.ttft_ms: list[float] = []
        self.chunk_ms: list[float] = []

    def took(self, sent: float, counts: Any, ok: bool, error: Callable[[], str]) -> bool:
        """A request (or stream) sent at `sent` just ended: counted as handled, and, if
        `counts(sent, now)` puts it in the measured window, as a latency or as error().
        True when it is a measured success."""
        done = time.perf_counter()
        self.handled += 1
        if not counts(sent, done):
            return False
        if not ok:
            self.error(error())
            return False
        self.latencies_ms.append((done - sent) * 1000)
        return True

    def error(self, text: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or text

    def hedges(self, attempts: Any) -> None:
        hedges = [a for a in attempts if a.hedge]
        if hedges:
            self.hedged += 1
            self.hedge_won += any(a.outcome == "ok" for a in hedges)

    def summary(self, window_s: float) -> dict[str, Any]:
        latencies = sorted(self.latencies_ms)
        lateness = sorted(self.lateness_ms)
        counted = self.count_hedged and bool(latencies)
        return {
            "completed": len(latencies),
            "handled": self.handled,
            "errors": self.errors,
            "first_error": self.first_error,
            "window_s": window_s,
            "rps": len(latencies) / window_s if window_s > 0 else math.nan,
            "p50_ms": percentile(latencies, 0.50),
            "p99_ms": percentile(latencies, 0.99),
            "lateness_p50_ms": percentile(lateness, 0.50),
            "lateness_p99_ms": percentile(lateness, 0.99),
            "hedged_share": self.hedged / len(latencies) if counted else math.nan,
            "hedge_won_share": self.hedge_won / len(latencies) if counted else math.nan,
        }


async def closed_loop(spec: dict[str, Any], tally: _Tally, one: Any) -> None:
    """`in_flight` clients, each sending its next request (or stream) when the one before
    it ends: `warmup_s` unmeasured, then `duration_s` measured (`one(spec, tally, counts)`
    asks `counts(sent, done)` whether a request falls in the window). Fails loudly instead of
    hanging when requests never finish (e.g. nats-server died)."""
    begin = time.perf_counter() + spec["warmup_s"]
    end = begin + spec["duration_s"]

    def in_window(_sent: float, done: float) -> bool:
        return begin <= done <= end

    async def client() -> None:
        while time.perf_counter() < end:
            await one(spec, tally, in_window)

    limit_s = spec["warmup_s"] + spec["duration_s"] + spec["timeout_s"] + 5
    try:
        async with asyncio.timeout(limit_s):
            await asyncio.gather(*(client() for _ in range(spec["in_flight"])))
    except TimeoutError:
        raise RuntimeError(
            f"requests still unfinished after {limit_s:g} s; is nats-server alive?"
        ) from None


class LoadGen:
    def __init__(self, nc: nats.NATS) -> None:
        self.nc = nc

    async def _one(self, spec: dict[str, Any], tally: _Tally, counts: Any) -> None:
        """One request; `counts(t_sent, t_done)` says whether it is measured."""
        sent = time.perf_counter()
        try:
            msg = await self.nc.request(spec["subject"], spec["payload"], timeout=spec["timeout_s"])
            ok, reply = _check(spec["decode"], msg.data)
        except Exception as exc:  # noqa: BLE001 - any failure is this request's error, described
            ok, reply = False, exc
        if not tally.took(sent, counts, ok, lambda: _describe_error(reply)):
            return
        late_of = spec.get("lateness_of_ms")
        if late_of is not None and len(reply.attempts) > 1:
            tally.lateness_ms.append(reply.attempts[0].latency_ms - late_of)
        if tally.count_hedged:
            tally.hedges(reply.attempts)

    async def run(self, spec: dict[str, Any]) -> dict[str, Any]:
        tally = _Tally(spec.get("count_hedged", False))
        pair = spec.get("pair")
        if pair is None:
            await closed_loop(spec, tally, self._one)
            return tally.summary(spec["duration_s"])
        # Paired: each client sends one of its own and one of the pair's, taking turns at
        # going first, so the two see the same moments and neither always follows the other.
        other, other_spec, turn = _Tally(), {**spec, **pair, "lateness_of_ms": None}, [0]

        async def both(spec: dict[str, Any], tally: _Tally, counts: Any) -> None:
            turn[0] += 1
            first, second = (spec, tally), (other_spec, other)
            for side_spec, side in (first, second) if turn[0] % 2 else (second, first):
                await self._one(side_spec, side, counts)

        await closed_loop(spec, tally, both)
        summary, theirs = tally.summary(spec["duration_s"]), other.summary(spec["duration_s"])
        summary["pair_p50_ms"] = theirs["p50_ms"]
        summary["paired_gap_p50_ms"] = summary["p50_ms"] - theirs["p50_ms"]
        summary["errors"] += theirs["errors"]
        summary["first_error"] = summary["first_error"] or theirs["first_error"]
        return summary

    async def _bounded(self, work: Any, limit_s: float) -> None:
        """Fail loudly instead of hanging when requests never finish (e.g. nats-server died)."""
        try:
            async with asyncio.timeout(limit_s + 5):
                await work
        except TimeoutError:
            raise RuntimeError(
                f"requests still unfinished after {limit_s + 5:g} s; is nats-server alive?"
            ) from None

    async def burst(self, spec: dict[str, Any]) -> dict[str, Any]:
        tally = _Tally()
        started = time.perf_counter()
        await self._bounded(
            asyncio.gather(
                *(self._one(spec, tally, lambda s, d: True) for _ in range(spec["count"]))
            ),
            spec["timeout_s"],
        )
        return tally.summary(time.perf_counter() - started)


class _Stream:
    """One stream in flight: its events as they arrive."""

    __slots__ = ("assembler", "chunks", "done", "first_ms", "sent", "sent_ns")

    def __init__(self) -> None:
        self.sent = time.perf_counter()
        self.first_ms: float | None = None
        self.chunks: list[float] = []  # each chunk's latency, ms
        self.assembler = Assembler()
        self.done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def chunk(self, data: bytes) -> None:
        now_ns = time.monotonic_ns()
        if self.first_ms is None:
            self.first_ms = (time.perf_counter() - self.sent) * 1000
        self.chunks.append((now_ns - int(data.split(b" ", 1)[0])) / 1e6)


class StreamGen:
    """Streams over one wildcard inbox: <prefix>.<n> for a stream's end (direct) or all its
    events (Lifeline), <prefix>.<n>.c for its chunks (direct)."""

    def __init__(self, nc: nats.NATS) -> None:
        self.nc = nc
        self.prefix = nc.new_inbox() + "."
        self.streams: dict[str, _Stream] = {}
        self.count = 0
        self.sub: Any = None

    async def on_msg(self, msg: Msg) -> None:
        token = msg.subject[len(self.prefix) :]
        direct_chunk = token.endswith(".c")
        stream = self.streams.get(token[:-2] if direct_chunk else token)
        if stream is None or stream.done.done():
            return
        if direct_chunk:
            stream.chunk(msg.data)
            return
        if msg.headers and subjects.SEQ in msg.headers:  # an llm.stream event
            try:
                event = stream.assembler.feed(msg.headers, msg.data)
            except (StreamGap, StreamProtocolError):
                stream.done.set_result(False)
                return
            if event.kind == "delta":
                stream.chunk(msg.data)
            elif event.kind in ("end", "error"):
                stream.done.set_result(event.kind == "end")
            return
        reply = provider_reply_decoder.decode(msg.data)  # the streamer's end (direct)
        stream.done.set_result(isinstance(reply, ProviderOk) and reply.chunks == len(stream.chunks))

    async def one(self, spec: dict[str, Any], tally: _Tally, counts: Any) -> None:
        if self.sub is None:
            self.sub = await self.nc.subscribe(self.prefix + ">", cb=self.on_msg)
        self.count += 1
        token = str(self.count)
        stream = self.streams[token] = _Stream()
        text = f"{spec['chunks']} {spec['interval_ms']}"
        reply = self.prefix + token
        try:
            if spec["mode"] == "direct":
                request = ProviderRequest(id=token, messages=[ChatMessage("user", text)])
                headers = {subjects.STREAM_TO: reply + ".c"}
                await self.nc.publish(
                    spec["subject"], encoder.encode(request), reply=reply, headers=headers
                )
            else:
                request = CompletionRequest(
                    [ChatMessage("user", text)], id=token, route=spec["route"]
                )
                await self.nc.publish(spec["subject"], encoder.encode(request), reply=reply)
            ok = await asyncio.wait_for(stream.done, spec["timeout_s"])
        except Exception as exc:  # noqa: BLE001 - any failure is this stream's error, described
            ok = False
            tally.first_error = tally.first_error or repr(exc)
        finally:
            del self.streams[token]
        tally.chunks_handled += len(stream.chunks)
        ok = ok and stream.first_ms is not None

        def failed() -> str:
            return f"stream {token} failed after {len(stream.chunks)} chunks"

        if not tally.took(stream.sent, counts, ok, failed):
            return
        tally.ttft_ms.append(stream.first_ms)
        tally.chunk_ms += stream.chunks

    async def run(self, spec: dict[str, Any]) -> dict[str, Any]:
        tally = _Tally()
        await closed_loop(spec, tally, self.one)
        summary = tally.summary(spec["duration_s"])
        ttft, chunk_ms = sorted(tally.ttft_ms), sorted(tally.chunk_ms)
        summary |= {
            "chunks_handled": tally.chunks_handled,
            "ttft_p50_ms": percentile(ttft, 0.50),
            "ttft_p99_ms": percentile(ttft, 0.99),
            "chunk_p50_ms": percentile(chunk_ms, 0.50),
            "chunk_p99_ms": percentile(chunk_ms, 0.99),
        }
        return summary


class JobGen:
    """Durable jobs, closed loop: each is published through JetStream (awaiting its PubAck)
    with a Lifeline-Notify subject on one wildcard inbox, and is done when its result is
    pushed there; its latency runs from the publish to that push."""

    def __init__(self, nc: nats.NATS) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=10)
        self.prefix = nc.new_inbox() + "."
        self.waiting: dict[str, asyncio.Future[bytes]] = {}
        self.run_id = uuid.uuid4().hex[:12]  # ids never repeat across rounds: no dedup, no reuse
        self.count = 0
        self.sub: Any = None

    async def on_result(self, msg: Msg) -> None:
        future = self.waiting.pop(msg.subject[len(self.prefix) :], None)
        if future is not None and not future.done():
            future.set_result(msg.data)

    async def one(self, spec: dict[str, Any], tally: _Tally, counts: Any) -> None:
        if self.sub is None:
            self.sub = await self.nc.subscribe(self.prefix + "*", cb=self.on_result)
        self.count += 1
        token = str(self.count)
        job_id = f"{self.run_id}-{token}"
        future = self.waiting[token] = asyncio.get_running_loop().create_future()
        body = encoder.encode(
            CompletionRequest([ChatMessage("user", "Hello")], id=job_id, route=spec["route"])
        )
        headers = {subjects.MSG_ID: job_id, subjects.NOTIFY: self.prefix + token}
        sent = time.perf_counter()
        try:
            await self.js.publish(spec["subject"], body, headers=headers)
            ok, reply = _check("lifeline", await asyncio.wait_for(future, spec["timeout_s"]))
        except Exception as exc:  # noqa: BLE001 - a failed job is counted, whatever failed
            ok, reply = False, exc
        finally:
            self.waiting.pop(token, None)
        tally.took(sent, counts, ok, lambda: _describe_error(reply))

    async def run(self, spec: dict[str, Any]) -> dict[str, Any]:
        tally = _Tally()
        await closed_loop(spec, tally, self.one)
        return tally.summary(spec["duration_s"])


class _HTTPConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: a request written whole, its response read with
    httptools' parser (llhttp: Content-Length and chunked bodies alike)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.body: list[bytes] = []

    @classmethod
    async def open(cls, host: str, port: int) -> _HTTPConnection:
        _, protocol = await asyncio.get_running_loop().create_connection(cls, host, port)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("the server closed the connection"))

    def on_message_begin(self) -> None:
        self.body = []

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((self.parser.get_status_code(), b"".join(self.body)))

    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    async def request(self, data: bytes) -> tuple[int, bytes]:
        assert self.transport is not None and self.waiter is None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def http_run(spec: dict[str, Any]) -> dict[str, Any]:
    """Closed-loop chat completions over HTTP (see the module's docstring): each client
    coroutine keeps its own connection, as a pool of `in_flight` connections would."""
    tally = _Tally()
    url = urlsplit(spec["url"] + "/chat/completions")
    host, port = url.hostname or "127.0.0.1", url.port or 80
    head = (
        f"POST {url.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nAuthorization: Bearer {spec['api_key']}\r\n"
        f"Content-Length: {len(spec['payload'])}\r\n\r\n"
    )
    data = head.encode() + spec["payload"]
    connections: list[_HTTPConnection] = []

    async def one(spec: dict[str, Any], tally: _Tally, counts: Any) -> None:
        conn = connections.pop() if connections else None
        sent = time.perf_counter()
        failure: Any = None
        try:
            if conn is None:
                conn = await _HTTPConnection.open(host, port)
            status, body = await asyncio.wait_for(conn.request(data), spec["timeout_s"])
            reply = msgspec.json.decode(body)
            ok = status == 200 and bool(reply["choices"][0]["message"]["content"])
            failure = (status, body[:300])
        except Exception as exc:  # noqa: BLE001 - a failed request is counted, whatever failed
            ok, failure = False, exc
            if conn is not None:
                conn.close()
                conn = None
        if conn is not None:
            connections.append(conn)
        tally.took(sent, counts, ok, lambda: repr(failure)[:300])

    try:
        await closed_loop(spec, tally, one)
    finally:
        for conn in connections:
            conn.close()
    return tally.summary(spec["duration_s"])


async def setup(params: dict[str, Any]) -> Served:
    nc = await nats.connect(params["url"], name=params["name"], error_cb=_quiet)
    gen, streams, jobs = LoadGen(nc), StreamGen(nc), JobGen(nc)
    handlers = {
        "run": gen.run,
        "burst": gen.burst,
        "stream": streams.run,
        "jobs": jobs.run,
        "http": http_run,
    }
    return Served(handlers, stop=nc.close)
