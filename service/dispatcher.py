"""The core front end: where llm.complete and llm.stream are handled.

It takes requests off NATS (queue group lifeline-dispatchers, so replicas share them),
admits at most dispatcher.max_in_flight at once, and hands each one to the engine
(service/engine.py) in a task of its own, with a `respond` that publishes the reply on the
message's reply subject (on llm.stream, a stream of events there: transport.ClientStream).
The engine does the rest: the plan, the chain, the reply, the audit event. Beyond
max_in_flight a request is answered at once with `overloaded`; a reply subject inside
Lifeline's own namespace (or the server's) is refused, and the refusal audited. A request
sent with an abort key (header Lifeline-Abort-Key) is stopped when its client publishes that
key on llm.abort: it is answered `aborted`, its attempts cancelled at their workers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from functools import partial

import nats.errors
from nats.aio.client import Client
from nats.aio.subscription import Subscription

from schemas import CompletionReply, subjects
from schemas.wire import (
    ABORTED,
    OVERLOADED,
    REPLY_SUBJECT_REFUSED,
    SHUTTING_DOWN,
    ErrorInfo,
    salvage_id,
)
from service import telemetry
from service.audit import ensure_audit_stream, keep_audit_stream
from service.config import Config
from service.discovery import Tally
from service.engine import Engine, Inbound, Respond
from service.health import Health, LocalStore
from service.jobs import Jobs
from service.loop import cancel_and_wait, start_now
from service.memory import release_memory_soon
from service.natsio import LIGHT, Received, ensure_subscribed, fast_path, stop_taking
from service.routing import Rejected
from service.shared_health import BucketStore
from service.transport import (
    ClientStream,
    Heartbeats,
    NatsTransport,
    ReplyHeartbeat,
    heartbeat_interval,
)

log = logging.getLogger("lifeline.dispatcher")

_TRIM_AFTER_PEAK = 256  # requests in flight at once that make a burst worth trimming memory after
_YIELD_EVERY = 32  # "overloaded" answers between two yields to the event loop
_ANSWER_AFTER_CANCEL_S = 2.0  # for a request cut short at shutdown to send its reply and audit
_ABORT_KEY_MAX = subjects.MAX_ABORT_KEY_LENGTH  # a longer Lifeline-Abort-Key: not abortable
# Answered without being served: their latency says nothing of overloaded's retry_after_s.
_REFUSALS = frozenset((OVERLOADED, REPLY_SUBJECT_REFUSED))


class Dispatcher:
    def __init__(self, nc: Client, config: Config, spans: telemetry.SpanRecorder) -> None:
        self.transport = NatsTransport(nc)
        self.transport.confirm_requests = config.audit.confirm_requests and bool(
            config.audit.stream
        )
        # Circuit breakers and recent figures; with shared_health, shared with the other replicas
        # through JetStream KV.
        settings = config.dispatcher
        replicas = config.jetstream.replicas
        store = (
            BucketStore(nc, settings.health_bucket, replicas)
            if settings.shared_health
            else LocalStore()
        )
        self.health = Health(store=store)
        self.health.own_outage = self.transport.spanned_an_outage
        self.health.longest_lease_s = settings.max_timeout_s + 1  # a probe's: its timeout and 1 s
        self.engine = Engine(config, self.transport, self.health, spans)
        models = self.engine.router.models
        self.health.configured = lambda provider, model: model in models.get(provider, ())
        # Durable jobs (llm.jobs.submit through JetStream), beside the core front end.
        self.jobs = Jobs(nc, self.engine, config.jobs, replicas) if config.jobs.enabled else None
        self.audit_settings = config.audit
        self.replicas = replicas
        # Each request's task, with its abort key (None without one), and the reverse for
        # llm.abort; the tasks aborted, until they end (their answer says `aborted`).
        self._tasks: dict[asyncio.Task[None], str | None] = {}
        self._abortable: dict[str, asyncio.Task[None]] = {}
        self._aborted: set[asyncio.Task[None]] = set()
        self._abort_sub: Subscription | None = None
        self.aborts_heard = 0  # llm.abort messages, for this dispatcher's requests or another's
        self.aborts = 0  # requests this dispatcher stopped on their client's abort
        self.max_in_flight = settings.max_in_flight
        self.max_in_flight_bytes = settings.max_in_flight_bytes
        self._bytes = 0  # of the requests in flight, their bodies' sizes by task in _sizes
        self._sizes: dict[asyncio.Task[None], int] = {}
        self.shutdown_grace_s = settings.shutdown_grace_s
        self._latency_s = 1.0  # moving average of served requests: overloaded's retry_after_s
        self._peak = 0  # most requests in flight since memory was last trimmed
        # Waiting for their "overloaded": (message, arrival, streamed, over the byte bound).
        self._refusals: deque[tuple[Received, float, bool, bool]] = deque()
        self._refuser: asyncio.Task[None] | None = None
        self._heartbeats = Heartbeats()  # requests whose client asked for them
        self._audit_setup: asyncio.Task[None] | None = None  # keeps the audit stream there
        self._subs: list[Subscription] = []
        # Figures for the NATS service API ($SRV.STATS, service/discovery.py).
        self.complete_tally = Tally()
        self.stream_tally = Tally()

    async def start(self) -> None:
        # Requests come on this loop (the subscriptions below): their tasks are made on it
        # without asyncio.create_task's lookup, a system call per request on Python 3.11.
        self._loop: asyncio.AbstractEventLoop = asyncio.get_running_loop()
        await self.health.start()
        await self.transport.start()
        nc = self.transport.nc
        path = fast_path(nc)
        path.in_flight = self._tasks.__len__  # light traffic: attempts and replies go at once
        self._subs = [
            await path.subscribe(subjects.COMPLETE, self._on_msg, queue=subjects.DISPATCHER_QUEUE),
            await path.subscribe(subjects.STREAM, self._on_stream, queue=subjects.DISPATCHER_QUEUE),
        ]
        # Every dispatcher hears every abort (no queue group): the one holding the request acts.
        self._abort_sub = await path.subscribe(subjects.ABORT, self._on_abort)
        try:
            await ensure_subscribed(nc)
        except nats.errors.FlushTimeoutError:
            # The server slow to confirm (a fleet restarting at once, a large health bucket
            # replaying to this connection): its subscriptions are on their way, and exiting
            # here made a rolling restart lose dispatchers. It serves as soon as they arrive.
            log.warning(
                "the NATS server did not confirm this dispatcher's subscriptions within its "
                "flush timeout; serving as soon as they are registered"
            )
        js = nc.jetstream(timeout=5)
        problem = await ensure_audit_stream(js, self.audit_settings, self.replicas)
        if self.audit_settings.stream:  # kept there from now on, or made when it can be
            self._audit_setup = asyncio.create_task(
                keep_audit_stream(js, self.audit_settings, self.replicas, problem, self._audit_kept)
            )
        else:  # no stream to keep events: none waits for one
            self._audit_kept(frozenset())
        if self.jobs is not None:
            await self.jobs.start()

    def _audit_kept(self, captured: frozenset[str] | None) -> None:
        # Jobs' events on these wait for the stream's ack (on any while it is not known: None).
        self.transport.audit_kept = captured

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop taking requests, answer those already received, then let the ones in flight
        finish, up to grace_s (dispatcher.shutdown_grace_s). Requests still in flight then are
        answered `shutting_down`; jobs still running are cancelled at their workers, unanswered,
        and left to be delivered again."""
        grace_s = self.shutdown_grace_s if grace_s is None else grace_s
        loop = asyncio.get_running_loop()
        until = loop.time() + grace_s
        subs, self._subs = self._subs, []
        for sub in subs:
            await stop_taking(sub)
        if self.jobs is not None:
            await self.jobs.stop(grace_s)
        if self._audit_setup is not None:
            await cancel_and_wait(self._audit_setup)
            self._audit_setup = None
        waits = set(self._tasks)
        if self._refuser is not None:
            waits.add(self._refuser)
        if waits:
            await asyncio.wait(waits, timeout=max(until - loop.time(), 0.0))
        if self._tasks:
            await self._cut_short(set(self._tasks), grace_s)
        if self._refuser is not None and not self._refuser.done():
            # Refusals cost no provider call and must each still get their one reply and
            # audit event: past the grace too (nothing new arrives any more).
            log.warning(
                "answering the %d requests still waiting for their overloaded refusal",
                len(self._refusals),
            )
            await self._refuser
        # Requests' events waiting for the audit stream (audit.confirm_requests), every request
        # answered (the refused ones too): the rest of the grace, then sent as core publishes.
        await self.transport.settle_audits(max(until - loop.time(), 0.0))
        if self._abort_sub is not None:  # aborts are honoured until every request is answered
            await stop_taking(self._abort_sub)
            self._abort_sub = None
        self._heartbeats.stop()
        await self.health.stop()

    async def _cut_short(self, tasks: set[asyncio.Task[None]], grace_s: float) -> None:
        """Answer the requests still in flight when the shutdown grace ran out: each task is
        cancelled, and its engine answers `shutting_down` and audits it (Engine.serve)."""
        log.warning(
            "%d requests still in flight after the shutdown grace (%g s, "
            "dispatcher.shutdown_grace_s): answering them shutting_down",
            len(tasks),
            grace_s,
        )
        for task in tasks:
            task.cancel(SHUTTING_DOWN)  # the why, for its attempts' spans
        _, late = await asyncio.wait(tasks, timeout=_ANSWER_AFTER_CANCEL_S)
        if late:
            log.error(
                "%d requests were not answered within %g s of their cancel",
                len(late),
                _ANSWER_AFTER_CANCEL_S,
            )

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def in_flight_bytes(self) -> int:
        return self._bytes

    @property
    def subscribed(self) -> bool:
        return bool(self._subs)

    def _on_msg(self, msg: Received, stream: bool = False) -> None:
        """Called for each request as it is read: starts its task, or queues its refusal."""
        arrived = time.monotonic()
        (self.stream_tally if stream else self.complete_tally).requests += 1
        size = len(msg.data)
        full = len(self._tasks) >= self.max_in_flight
        if full or (self._bytes + size > self.max_in_flight_bytes and self._tasks):
            self._refusals.append((msg, arrived, stream, not full))
            if self._refuser is None or self._refuser.done():
                self._refuser = asyncio.create_task(self._refuse_backlog())
            return
        # The engine's own coroutine is the task (no wrapper frame kept alive while it waits:
        # memory per request in flight); the tally is taken when it is done (_done).
        inbound, respond, refused, sink = self._front(msg, arrived, stream)
        beat = every_s = None
        asked = msg.headers.get(subjects.HEARTBEAT_MS) if msg.headers else None
        if asked is not None and (respond is not None or sink is not None):
            every_s = heartbeat_interval(asked)
            if every_s is not None:  # a client that asked for heartbeats
                beat = sink
                if beat is None:  # on llm.complete, each tells the request's progress
                    beat = ReplyHeartbeat(self.transport, msg.reply, arrived)
                    respond = beat.respond
        if beat is None or sink is not None:
            serve = self.engine.serve(
                inbound, respond, refused, sink, if_cancelled=self._why_cancelled
            )
        else:
            serve = self.engine.serve(
                inbound,
                respond,
                refused,
                if_cancelled=self._why_cancelled,
                progress=beat.attempts,  # type: ignore[union-attr]
            )
        # Light traffic: the plan and the attempt's publish run in this read (see start_now).
        task = (
            start_now(serve, loop=self._loop)
            if len(self._tasks) < LIGHT
            else self._loop.create_task(serve)
        )
        key = msg.headers.get(subjects.ABORT_KEY) if msg.headers else None
        # A key names one request in flight: a reused one stops none, and so does an empty one
        # (any stray empty abort would stop it) or one not UTF-8 (read with U+FFFD for its
        # bytes, two clients' keys could read alike, and one's abort stop the other's request).
        if key is not None and (
            not key or len(key) > _ABORT_KEY_MAX or "\ufffd" in key or key in self._abortable
        ):
            key = None
        self._tasks[task] = key
        self._sizes[task] = size
        self._bytes += size
        if key is not None:
            self._abortable[key] = task
        if beat is not None and every_s is not None:  # until `_done`
            self._heartbeats.add(task, beat, every_s, at_once=sink is not None)
        task.add_done_callback(self._stream_done if stream else self._done)

    def _on_stream(self, msg: Received) -> None:
        self._on_msg(msg, stream=True)

    def _on_abort(self, msg: Received) -> None:
        """llm.abort: stop the request sent with this abort key, if this dispatcher runs it."""
        self.aborts_heard += 1
        # As a header value is read (whitespace around it stripped): the key it was sent as.
        task = self._abortable.get(msg.data.strip().decode("utf-8", "replace"))
        if task is not None and task not in self._aborted:
            self._aborted.add(task)
            self.aborts += 1
            # Its engine answers it `aborted` (see _why_cancelled) and audits it. Cancelled after
            # the task's first step (create_task scheduled that before this): a task cancelled
            # before it starts never runs its body, and its request would go unanswered.
            asyncio.get_running_loop().call_soon(task.cancel, ABORTED)  # the why, for spans

    def _why_cancelled(self) -> ErrorInfo:
        """The error a request's engine answers with when its task is cancelled: its client
        aborted it, or the shutdown grace ran out."""
        if asyncio.current_task() in self._aborted:
            return ErrorInfo(
                ABORTED,
                "aborted by its client (llm.abort) before it was answered; its attempts were "
                "cancelled at their workers",
            )
        message = (
            "this dispatcher stopped (its shutdown grace ran out) before the request was "
            "answered; its attempts were cancelled. Send it again: another dispatcher takes it"
        )
        return ErrorInfo(SHUTTING_DOWN, message, retry_after_s=1.0)

    async def _refuse_backlog(self) -> None:
        """Answer `overloaded` to the requests over max_in_flight, in one task rather than
        one each: shedding must cost less than the work it sheds. The answers go out without
        waiting, so yield now and then, or a backlog of refusals would starve the requests
        in flight (not after each one: every yield costs a small socket write). Yielding after
        each one let nats-py's flusher make one socket write per reply, which took a third of
        the CPU in a 60,000-request burst (py-spy) and pushed replies past their deadlines."""
        answered = 0
        while self._refusals:
            msg, arrived, stream, by_bytes = self._refusals.popleft()
            await self.handle(msg, arrived, self._overloaded(msg.data, by_bytes), stream)
            answered += 1
            if answered % _YIELD_EVERY == 0:
                await asyncio.sleep(0)

    def _stream_done(self, task: asyncio.Task[CompletionReply]) -> None:
        self._done(task, self.stream_tally)

    def _done(self, task: asyncio.Task[CompletionReply], tally: Tally | None = None) -> None:
        if not task.cancelled():  # cancelled before its first step: it never ran
            failed = task.exception()  # serve answers whatever happens: only a bug lands here
            if failed is not None:
                log.error("a request's task failed", exc_info=failed)
            else:
                self._count(task.result(), self.complete_tally if tally is None else tally)
        key = self._tasks.pop(task, None)
        self._bytes -= self._sizes.pop(task, 0)
        if self._heartbeats.beating:
            self._heartbeats.discard(task)
        if key is not None:
            del self._abortable[key]
            self._aborted.discard(task)
        # With this one; max() spelled out: its call costs about 1,300 instructions on 3.11.
        held = len(self._tasks) + 1
        if held > self._peak:  # noqa: PLR1730
            self._peak = held
        if held == 1 and self._peak >= _TRIM_AFTER_PEAK:
            self._peak = 0
            release_memory_soon()  # a burst is over: hand its memory back to the system

    def _overloaded(self, data: bytes, by_bytes: bool = False) -> Rejected:
        retry_after_s = round(min(max(self._latency_s, 0.05), 30.0), 2)
        most = (
            f"{self.max_in_flight_bytes:,} bytes of requests (dispatcher.max_in_flight_bytes; "
            f"this one is {len(data):,})"
            if by_bytes
            else f"{self.max_in_flight} requests (dispatcher.max_in_flight)"
        )
        return Rejected(
            OVERLOADED,
            f"this dispatcher is working on its maximum of {most}; retry after "
            f"{retry_after_s:g} s, or add dispatcher replicas",
            salvage_id(data),
            retry_after_s=retry_after_s,
        )

    async def handle(
        self,
        msg: Received,
        arrived: float | None = None,
        refused: Rejected | None = None,
        stream: bool = False,
    ) -> None:
        """Answer one llm.complete message (llm.stream with `stream`) here and now (a refusal
        from the backlog; _on_msg gives the engine's coroutine a task of its own)."""
        arrived = time.monotonic() if arrived is None else arrived
        inbound, respond, refused, sink = self._front(msg, arrived, stream, refused)
        reply = await self.engine.serve(
            inbound, respond, refused, sink, if_cancelled=self._why_cancelled
        )
        self._count(reply, self.stream_tally if stream else self.complete_tally)

    def _front(
        self, msg: Received, arrived: float, stream: bool, refused: Rejected | None = None
    ) -> tuple[Inbound, Respond | None, Rejected | None, ClientStream | None]:
        """What the engine needs to answer `msg` (Engine.serve): exactly one reply, or one
        stream ending in one end or error event (if it has a reply subject that may be
        answered on), and exactly one audit event, whatever the message holds. Nobody sends a
        core request again: cut short (at shutdown, or aborted by its client), it is still
        answered and audited (`_why_cancelled`)."""
        respond: Respond | None = None
        sink: ClientStream | None = None
        if msg.reply:
            why = subjects.reply_subject_refused(msg.reply)
            if why is not None:  # the refusal is audited; nobody is answered
                refused = _refused_reply_subject(msg.reply, why, msg.data)
            elif stream:
                sink = self.transport.client_stream(msg.reply)
            else:  # a C-level partial: no closure, no coroutine of its own
                respond = partial(self.transport.answer, msg.reply)
        return Inbound(msg.data, msg.headers, arrived), respond, refused, sink

    def _count(self, reply: CompletionReply, tally: Tally) -> None:
        tally.busy_ms += reply.latency_ms
        if reply.error is None:
            self._latency_s += (reply.latency_ms / 1000 - self._latency_s) / 16
            return
        tally.errors += 1
        tally.last_error = reply.error.type
        if reply.error.type not in _REFUSALS:  # refusals take no time: not a served request's
            self._latency_s += (reply.latency_ms / 1000 - self._latency_s) / 16


def _refused_reply_subject(reply_to: str, why: str, data: bytes) -> Rejected:
    return Rejected(
        REPLY_SUBJECT_REFUSED,
        f"reply subject {reply_to[:200]!r} refused: {why}; use an inbox (nc.request does) or a "
        "subject of your own",
        salvage_id(data),
    )
