"""The jobs front end: requests published through JetStream, results kept by id.

    submit   a client publishes a request body to llm.jobs.submit through JetStream, its id as
             Nats-Msg-Id. The stream (work queue, bounded, discard new) keeps it until a
             dispatcher has stored its result, whether or not a dispatcher runs when it is
             published; a repeat within the dedup window is acknowledged as a duplicate and
             kept once; a full stream refuses the publish
    work     every dispatcher pulls from one durable consumer, at most jobs.in_flight at once;
             a job runs through the engine like a core request (same routes, policy,
             breakers), each delivery in one trace under the job's span (JobTrace), and is
             heartbeated (in_progress) while it runs, so a slow provider does not get it
             delivered again
    result   a job is claimed before it runs, across dispatchers (its claim key created; a
             copy of the id finding another's claim waits for its result), then the reply
             goes into the results bucket under subjects.job_key(id), create-if-absent, and
             only then is the job acknowledged: a dispatcher killed before the ack
             leaves the job to be delivered again after ack_wait_s, and a delivery that finds a
             result already stored (or a repeat of the id after the dedup window) is
             acknowledged without a provider call. A store that fails while the bucket is
             unreachable (a node restarting) is tried again for a while, the answer held, so
             a blip does not cost a second provider call; a bucket found gone is made again.
             A store refused for good (over the bucket's max value size, a full store) ends
             the job with an error result, stored if it can be. A job with a Lifeline-Notify
             header also gets its reply published on that subject
    bounds   an invalid job gets an error result at once, never a redelivery; a failure of this
             front end itself (a bug, the results bucket unreachable) is retried after a delay,
             and its last delivery (jobs.max_deliver) goes to llm.jobs.dead with the error in
             Lifeline-Error and leaves the stream: no hot redelivery loop, nothing kept forever

Audit: one event per job handled by the engine (a delivery that finds its result stored adds
none). Without JetStream on the server the dispatcher logs why and takes no jobs.

Claims, as the README gave them until 2026-12-04: a dispatcher claims the id before running a
job (it creates the key `claim.` + the result key's hash in the bucket, which fails where it
exists), writes the claim again every third of `jobs.ack_wait_s` while the job runs, and purges
it as the job ends, its result stored first (two round trips more per job, and no claim left to
fill a bucket limited in values or bytes). A copy finding another job's claim looks for the
result until it is there, and takes the claim over from its own job's earlier delivery (come
back after its dispatcher died) and from a dispatcher that has not written it for that
dispatcher's ack wait (died, or stopped; the claim says it, read up to 300 s, so a rolling
change of `jobs.ack_wait_s` takes no live claim early).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, NamedTuple

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.kv import KeyValue
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, Status, StatusCode

from schemas import CompletionReply, subjects
from schemas.wire import (
    INTERNAL,
    INVALID_REQUEST,
    MAX_ID_LENGTH,
    REPLY_TOO_LARGE,
    SHUTTING_DOWN,
    ErrorInfo,
    encoder,
    message_bytes,
    reply_decoder,
    salvage_id,
)
from service import jetstream, telemetry
from service.config import JobsSettings
from service.discovery import Tally
from service.engine import DeliverAgain, Engine, Inbound, NotKept
from service.jobstore import ensure_jobs, max_value_of, results_max_value
from service.loop import cancel_and_wait
from service.natsio import (
    Drops,
    Received,
    deliveries_keep_no_status,
    fast_path,
    publish_checked,
)
from service.routing import Rejected
from service.transport import ClientStream, as_error, fitted

log = logging.getLogger("lifeline.jobs")

_FETCH_WAIT_S = 1.0  # one pull's wait for jobs; the loop checks for stop between pulls
# What one pull may bring at most, counting each job as large as the server allows: a batch
# that arrives at once waits at the server until it is read, and past the server's
# max_pending (64 MiB by default) the server would cut the whole connection (README, Limits
# and overload). nats-py's fetch takes no byte limit, so the batch is sized for the worst case.
_FETCH_MAX_BYTES = 16 * 1024 * 1024
_FETCH_MAX_JOBS = 64
_RETRY_DELAY_S = 5.0  # before a job whose handling failed by a bug is delivered again
_OP_TIMEOUT_S = 5.0
# llm.jobs.result: lookups run at once, each a KV round trip, and asks held waiting for one;
# past that an ask is dropped as it is read (its asker times out, as it would behind the
# backlog). One at a time behind nats-py's queue (524,288 asks), a flood of 200,000 took 55 s
# and +73 MiB to answer, a real asker behind it timing out; of 1,000,000, the queue's drops (a
# coroutine and an error callback each) held the dispatcher's reads: requests 15 s late.
_RESULT_LOOKUPS = 64
_RESULT_BACKLOG = 4096
_CANCELLED_WAIT_S = 1.0  # for jobs cancelled at stop to tell their workers and end their spans
_KV_HEADER_ROOM = 1024  # a KV write's headers (expected last sequence, and what JetStream adds)
# A KV write's own headers, which a bucket's max value size counts with the value (52 bytes
# for a create, a few more for an update over a revision).
_KV_VALUE_HEADERS = 128
_SETUP_RETRY_S = 2.0  # between tries to set up the stream and the consumer
_RESETUP_AFTER = 5  # pulls failed in a row after which the stream and consumer are set up again
# How long a job's answer is held while the results bucket cannot be reached, and the waits
# between tries: a node restarting and its streams electing a leader take a few seconds.
_STORE_PATIENCE_S = 30.0
_STORE_BACKOFF_S = jetstream.BACKOFF_S
_UNREACHABLE = jetstream.UNREACHABLE  # what a bucket answers while briefly out of reach
# What a bucket answers when it is gone (deleted, or a server restarted on an empty store): a
# direct get and a write find no stream to answer them. It is made again, as at setup.
_GONE = (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError)
_REMAKE_EVERY_S = 1.0  # at most one try to make the bucket again in this time, however many fail
# JetStream's refusals of a store that no retry cures (service/jetstream.py's codes): a job
# whose result is refused so ends with an error result.
_TOO_LARGE = jetstream.MESSAGE_TOO_LARGE  # the bucket's max value size
_STORE_FULL = (
    jetstream.INSUFFICIENT_RESOURCES,
    jetstream.INSUFFICIENT_STORAGE,
    jetstream.INSUFFICIENT_MEMORY,
)
_STORE_FAILED = jetstream.STORE_FAILED  # lasting when the bucket is at its own maximum (below)
# What an error kept as a job's result says of sending the job again: a job of the same id
# gets the stored result, an error too, for as long as the bucket keeps it.
_ANOTHER_ID = (
    "submit the job again under another id: this one keeps this result until the results "
    "bucket's TTL ends it"
)


def _nobody_there(reply: CompletionReply) -> bool:
    """An error where no target had a worker listening: each attempt no_responders, or
    skipped (its breaker open, a capability)."""
    attempts = reply.attempts
    return (
        reply.status == "error"
        and any(a.outcome == "no_responders" for a in attempts)
        and all(a.outcome in ("no_responders", "skipped") for a in attempts)
    )


def _no_worker_yet(reply: CompletionReply) -> str:
    """Why a job waits when no worker listened for any of its targets, and what to do."""
    names = list(dict.fromkeys(a.provider for a in reply.attempts if a.outcome == "no_responders"))
    return (
        f"no worker listens for its providers ({', '.join(names)}): start one "
        f"(lifeline worker {names[0]}); tried again in {_RETRY_DELAY_S:g} s"
    )


def fetch_batch(max_payload: int) -> int:
    """Jobs one pull asks for: up to 64, and no more than 16 MiB of the largest ones."""
    return max(1, min(_FETCH_MAX_JOBS, _FETCH_MAX_BYTES // max(max_payload, 1)))


class _NotStored(Exception):
    """A job answered whose result could not be stored: it is delivered again."""


class _Waits(Exception):
    """A job not delivered on this try (no worker yet, its result not stored), its reason
    logged by the engine as `keep` raised DeliverAgain: delivered again, not logged twice."""


class _LastDeliveryLost(Exception):
    """A job delivered past jobs.max_deliver: its last delivery ended with no result stored and
    no dead letter (its dispatcher died, or stopped past its grace, while running it; it may
    have answered and audited the job, whose result could not be stored). Dead-lettered at
    once: the audit stream keeps the first event of the job, if one went out."""


_BUCKET_TROUBLE = (
    _NotStored,
    _Waits,
    _LastDeliveryLost,
    *_UNREACHABLE,
)  # a job failed by these is no bug
# The consumer delivers without a limit of its own: the dispatcher ends a job on its
# jobs.max_deliver-th delivery, or, when that delivery is lost with its dispatcher, on the one
# after it. A consumer limit of max_deliver left such a job in the stream, never delivered
# again: no result, no dead letter, no audit event.
_CONSUMER_MAX_DELIVER = -1
_HEARTBEAT_MAX_S = 1.0  # a running job's in_progress at least this often (see _heartbeat)
_UNCLAIM_PAUSE_S = 60.0  # claims not purged for this long after a purge timed out
_CLAIM_POLL_S = jetstream.BACKOFF_S  # a copy of an id waiting for another's claim looks again


# The most a claim's value may say its holder goes without writing it (the largest ack_wait_s
# a config takes): a corrupt or hostile value does not hold its id for longer.
_CLAIM_STALE_MAX_S = 300.0


def _claim_key(key: str) -> str:
    """Where the job of result key `key` is claimed, in the results bucket (see _claimed)."""
    return "claim." + key.removeprefix("job.")


def _claim_value(place: str, ack_wait_s: float) -> bytes:
    """A claim: its job's place in the stream, and the ack wait its dispatcher writes it again
    within (see _hold), by which a copy waiting for it judges it stale: not by its own, which
    a rolling config change may have set shorter."""
    return f"{place} {ack_wait_s:g}".encode()


def _claim_read(value: bytes, own_ack_wait_s: float) -> tuple[bytes, float]:
    """A claim's place, and how long it may go unwritten before it is taken over: what its
    holder said, at most _CLAIM_STALE_MAX_S; `own_ack_wait_s` when it said nothing readable
    (an earlier version's claim, a corrupt one)."""
    place, _, promised = value.partition(b" ")
    try:
        stale_s = float(promised)
    except ValueError:
        return place, own_ack_wait_s
    if not math.isfinite(stale_s) or stale_s <= 0:
        return place, own_ack_wait_s
    return place, min(stale_s, _CLAIM_STALE_MAX_S)


def _said(exc: BaseException) -> str:
    """`exc` in words: our own errors' messages as they are, others' with their type."""
    if isinstance(exc, (_NotStored, _Waits, _LastDeliveryLost)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


class JobIdentity(NamedTuple):
    id: str  # what its reply and audit event carry
    key: str  # its result's key in the results bucket
    audit_id: str  # its audit event's Nats-Msg-Id: the audit stream keeps one per job


def identity(msg: Msg) -> JobIdentity:
    """A job's id: its body's, else its Nats-Msg-Id. A job sent with neither can be neither
    deduplicated nor fetched by its sender: it answers as `seq-<its stream sequence>`, and
    its result and audit event are kept under its place in the stream (its sequence and the
    time it was stored), which no id a client sends maps to, so no other job finds them.

    Its audit event's Nats-Msg-Id is that of this job, not of its id: a hash of both its id
    and its place, the same on each of its deliveries (the audit stream keeps one event
    however often it was delivered) and on no other job. From its id alone, a job of the id
    run again (its result expired or never stored) had its event dropped by the audit stream
    as the earlier one's duplicate, for the stream's 10-minute window: a provider call paid
    for and kept nowhere."""
    job_id = salvage_id(msg.data)
    if not job_id:
        job_id = (msg.headers or {}).get(subjects.MSG_ID, "")
        if "\ufffd" in job_id:  # bytes not UTF-8, as nats-py replaced them: refused (_answer)
            # JetStream told two such ids apart by their bytes; read, they may be one id, and
            # a job would be answered with another's result. Kept by its place, as unnamed.
            place = _UNREADABLE_ID + _place(msg)
            return JobIdentity(job_id, "job." + place, "job:" + place)
        if _UNCLEAR_MSG_ID in (msg.headers or {}):  # refused (_answer), kept by its place too
            place = _UNCLEAR_ID + _place(msg)
            return JobIdentity(job_id, "job." + place, "job:" + place)
    if job_id:
        audit_id = subjects.job_audit_id(job_id, _place(msg))
        return JobIdentity(job_id, subjects.job_key(job_id), audit_id)
    place = "anon." + _place(msg)
    return JobIdentity(f"seq-{msg.metadata.sequence.stream}", "job." + place, "job:" + place)


def _kept_on_a_dead_letter(headers: Mapping[str, str] | None) -> dict[str, str]:
    """A job's headers as its dead letter carries them: all but JetStream's directives to a
    stream (`Nats-Expected-Stream`, `Nats-Expected-Last-*`, `Nats-Rollup`, `Nats-TTL`, ...),
    which a client set for the jobs stream. On llm.jobs.dead they would direct a stream an
    operator made to keep dead letters: `Nats-Expected-Stream: LIFELINE_JOBS` made it refuse
    every one (a core publish: lost unseen), a `Nats-Rollup` could purge it. Its Nats-Msg-Id
    stays: the job's id, when it has no other."""
    return {
        name: value
        for name, value in (headers or {}).items()
        if name == subjects.MSG_ID
        or not (name.lower().startswith("nats-") or name == _UNCLEAR_MSG_ID)
    }


_UNREADABLE_ID = "unreadable."  # the place-keyed result of a job whose Nats-Msg-Id is not UTF-8
_UNCLEAR_ID = "unclear."  # and of one whose Nats-Msg-Id nats-server reads otherwise
# Set on headers whose Nats-Msg-Id nats-server reads otherwise than nats-py: a name no header
# read from the wire has (nats-py drops names holding whitespace), so no client can set it.
_UNCLEAR_MSG_ID = "Lifeline unclear-msg-id"
_MSG_ID_NAME = subjects.MSG_ID.encode()


def read_msg_ids_as_the_server_does(nc: Client) -> None:
    """Mark (with _UNCLEAR_MSG_ID) the headers of a message whose Nats-Msg-Id nats-server
    reads otherwise than nats-py does. nats-server deduplicates by the first line written
    exactly `Nats-Msg-Id:` (none when a space comes before the colon); nats-py strips each
    name and keeps the last line's value. A job known by that id was deduplicated by another,
    or by none: such a job is refused (_answer). It wraps the connection's
    `_parse_header_lines`, which nats-py calls through the instance for every header block
    it reads (not with fast_mail_parser installed, which Lifeline does not use); a header
    block without a Nats-Msg-Id costs a dict lookup."""
    parse = nc._parse_header_lines
    if getattr(parse, "lifeline", False):  # once per connection
        return

    def parse_header_lines(raw: bytes) -> dict[str, str]:
        headers = parse(raw)
        if subjects.MSG_ID in headers and _msg_id_unclear(raw):
            headers[_UNCLEAR_MSG_ID] = "1"
        return headers

    parse_header_lines.lifeline = True  # type: ignore[attr-defined]
    nc._parse_header_lines = parse_header_lines  # type: ignore[method-assign]


def _msg_id_unclear(raw: bytes) -> bool:
    """Whether a header block gives Nats-Msg-Id twice, or with whitespace before its colon."""
    names = [
        name
        for name, _, _ in (line.partition(b":") for line in raw.split(b"\r\n"))
        if name.strip() == _MSG_ID_NAME
    ]
    return len(names) > 1 or (len(names) == 1 and names[0] != _MSG_ID_NAME)


def _place(msg: Msg) -> str:
    """The job's place in the stream, the same on each of its deliveries: its sequence and
    the time it was stored (a stream made again counts from 1 again)."""
    meta = msg.metadata
    return f"{meta.sequence.stream}.{int(meta.timestamp.timestamp() * 1_000_000)}"


class _Claim:
    """A job's hold on its id (see Jobs._claimed)."""

    __slots__ = ("came", "stored")

    def __init__(self, stored: bytes | None, came: float) -> None:
        self.stored = stored  # its result, stored before the job had its id
        self.came = came  # when it had its id (monotonic)


class JobTrace(NamedTuple):
    """The trace each delivery of a job joins, on whichever dispatcher: under a `job` span
    whose ids come from the job's place in the stream, the same on every delivery, itself a
    child of the trace context the job was submitted with, if any. Each delivery's `chat`
    span is the job span's child; the job span goes out once, from the delivery that ends
    the job (see `end`). Without it, a job sent without a traceparent (as `lifeline submit`
    and the client send it outside a traced process) began a trace on each delivery: its
    earlier deliveries' attempts were in traces nobody could find from its result."""

    headers: Mapping[str, str] | None  # the job's, its traceparent the job span's
    context: trace.SpanContext | None  # the job span's, when it records
    parent: trace.SpanContext | None  # what the job was submitted with

    @property
    def trace_id(self) -> str | None:
        """The job's trace id as replies carry it."""
        joined = telemetry.remote_parent(self.headers)
        return f"{joined.trace_id:032x}" if joined is not None else None

    @classmethod
    def of(cls, msg: Msg, spans: telemetry.SpanRecorder) -> JobTrace:
        headers = msg.headers or {}
        parent = telemetry.remote_parent(headers)
        digest = hashlib.sha256(f"lifeline job {_place(msg)}".encode()).digest()
        trace_id = parent.trace_id if parent is not None else _nonzero(digest[:16])
        span_id = _nonzero(digest[16:24])
        decided = spans.sampler.should_sample(
            telemetry.extract(headers), trace_id, "job", SpanKind.CONSUMER
        )
        sampled = decided.decision.is_sampled()
        if not sampled and parent is not None:  # passed on as it came, as W3C asks
            return cls(msg.headers, None, parent)
        flags = "01" if sampled else "00"
        joined = {**headers, subjects.TRACEPARENT: f"00-{trace_id:032x}-{span_id:016x}-{flags}"}
        if parent is None:  # one it came with belongs to no valid traceparent
            joined.pop(subjects.TRACESTATE, None)
        if not sampled:  # a trace id all the same: the job's replies and events carry it
            return cls(joined, None, None)
        state = parent.trace_state if parent is not None else decided.trace_state
        context = trace.SpanContext(trace_id, span_id, False, _SAMPLED, state)
        return cls(joined, context, parent)

    def end(
        self,
        spans: telemetry.SpanRecorder,
        msg: Msg,
        outcome: str,
        reply: CompletionReply | None,
        error_text: bool,
    ) -> None:
        """The job span, from when the stream stored the job until now (its end here:
        `outcome`), handed to the span processors as the dispatcher's ended spans are. A
        failed job's error message, which may quote a provider's words about the prompt,
        only with `error_text` (`audit.error_text`), as on the request's own span."""
        if self.context is None:
            return
        job_id = reply.id if reply is not None and reply.id else job_id_of(msg)
        attributes: dict[str, str | int] = {
            "messaging.system": "nats",
            "messaging.destination.name": subjects.JOBS_SUBMIT,
            # Clipped as a request's id is bounded: a Nats-Msg-Id may be 60 KB (a job refused
            # or dead-lettered for it), and the export queue counts spans, not bytes.
            "lifeline.request.id": job_id[:MAX_ID_LENGTH],
            "lifeline.job.deliveries": msg.metadata.num_delivered,
            "lifeline.job.outcome": outcome,
        }
        status = Status(StatusCode.UNSET)
        error = reply.error if reply is not None else None
        if error is not None:
            attributes["error.type"] = error.type
            status = Status(StatusCode.ERROR, error.message if error_text else None)
        elif reply is None:  # dead-lettered
            attributes["error.type"] = INTERNAL
            status = Status(StatusCode.ERROR, f"dead-lettered on {subjects.JOBS_DEAD}")
        span = ReadableSpan(
            "job",
            self.context,
            self.parent,
            spans.resource,
            attributes,
            kind=SpanKind.CONSUMER,
            status=status,
            start_time=int(msg.metadata.timestamp.timestamp() * 1_000_000) * 1000,
            end_time=time.time_ns(),
            instrumentation_scope=spans.scope,
        )
        for hand in spans.enders:
            hand((span,))


_SAMPLED = trace.TraceFlags(trace.TraceFlags.SAMPLED)


def _nonzero(digits: bytes) -> int:
    return int.from_bytes(digits) or 1  # W3C: an all-zero id is invalid


def job_id_of(msg: Msg) -> str:
    return identity(msg).id


class Jobs:
    """Pulls jobs for one dispatcher and answers each into the results bucket."""

    def __init__(
        self, nc: Client, engine: Engine, settings: JobsSettings, replicas: int = 1
    ) -> None:
        self.nc = nc
        self.engine = engine
        self.settings = settings
        self.replicas = replicas
        self.kv: KeyValue | None = None
        self.max_value: int | None = None  # the results bucket's own max value size, if any
        self._remaking: asyncio.Task[bool] | None = None  # the results bucket, made again
        self._remade_at = 0.0
        self._unclaim_from = 0.0  # no claim purged before then (see _unclaim)
        self._sub: Any = None
        self._results_sub: Any = None  # llm.jobs.result, once the bucket is there
        self._lookups: set[asyncio.Task[None]] = set()  # llm.jobs.result's, _RESULT_LOOKUPS at most
        self._asks: collections.deque[Msg] = collections.deque()  # waiting for a lookup
        self._asks_dropped = Drops()  # llm.jobs.result asks past _RESULT_BACKLOG
        # The jobs this dispatcher runs, by stream sequence: each one's latest delivery (see
        # _pull), which its heartbeats and its ack go to.
        self._running: dict[tuple[int, Any], list[Msg]] = {}
        self._turns: dict[str, asyncio.Event] = {}  # by job key: the job of it running here
        self._unstored = _Unstored()
        self._loop: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.handled = 0  # jobs answered by the engine
        self.found = 0  # deliveries answered from a result already stored
        self.tally = Tally()  # figures for the NATS service API ($SRV.STATS)

    async def start(self) -> None:
        """Take jobs from now on. When the stream cannot be set up yet (no JetStream, or a
        cluster still electing its leaders), say why and keep trying in the background."""
        problem = await self._setup()
        if problem is not None:
            log.warning(
                "jobs: not taking jobs on %s yet (%s); trying again every %g s",
                subjects.JOBS_SUBMIT,
                problem,
                _SETUP_RETRY_S,
            )
        self._loop = asyncio.create_task(self._run())

    async def _setup(self) -> str | None:
        """The stream, the bucket and this dispatcher's pull subscription; what went wrong,
        or None."""
        s = self.settings
        try:
            js = self.nc.jetstream(timeout=_OP_TIMEOUT_S)
            self.kv = await ensure_jobs(js, s, self.replicas)
            await self._look_at_bucket(js)
            read_msg_ids_as_the_server_does(self.nc)
            consumer = api.ConsumerConfig(
                ack_wait=s.ack_wait_s,
                max_deliver=_CONSUMER_MAX_DELIVER,
                max_ack_pending=-1,
            )
            await _keep_consumer_to(js, s)
            self._sub = await js.pull_subscribe(
                subjects.JOBS_SUBMIT, durable=subjects.JOBS_CONSUMER, config=consumer
            )
            deliveries_keep_no_status(self._sub)  # a job with a Status header is a job
        except Exception as exc:  # noqa: BLE001 - nats-py: no JetStream answers with many types
            return jetstream.hint(exc, self.replicas)
        if self._results_sub is None:
            # Read as llm.complete is (no coroutine per message): a flood costs its reads little.
            self._results_sub = await fast_path(self.nc).subscribe(
                subjects.JOBS_RESULT, self._on_result_asked, queue=subjects.JOBS_RESULT_QUEUE
            )
        log.info("jobs: taking jobs from %s (stream %s)", subjects.JOBS_SUBMIT, s.stream)
        return None

    def _on_result_asked(self, msg: Received) -> None:
        """llm.jobs.result: the result stored for the job id in the body, or an empty body.
        Not on a reply subject of Lifeline's or the server's: a dispatcher may write there (a
        result into another job's key, an event into the audit stream, a JetStream API
        request), and an asker may name any subject."""
        if not msg.reply or self.kv is None or subjects.reply_subject_refused(msg.reply):
            return
        if len(self._lookups) < _RESULT_LOOKUPS:
            self._start_lookup(msg)
        elif len(self._asks) < _RESULT_BACKLOG:
            self._asks.append(msg)
        elif self._asks_dropped.drop() is not None:  # its asker times out, as behind the backlog
            log.warning(
                "jobs: %d ask(s) on %s dropped so far: they came faster than results are "
                "read (%d at once, %d waiting)",
                self._asks_dropped.dropped,
                subjects.JOBS_RESULT,
                _RESULT_LOOKUPS,
                _RESULT_BACKLOG,
            )

    def _start_lookup(self, msg: Received) -> None:
        task = asyncio.create_task(self._look_up(msg))
        self._lookups.add(task)
        task.add_done_callback(self._looked_up)

    def _looked_up(self, task: asyncio.Task[None]) -> None:
        self._lookups.discard(task)
        if self._asks:
            self._start_lookup(self._asks.popleft())

    async def _look_up(self, msg: Received) -> None:
        job_id = msg.data.decode("utf-8", "replace")  # whole: a prefix could name another
        try:
            stored = await self._stored(subjects.job_key(job_id)) if job_id else None
        except Exception as exc:  # noqa: BLE001 - the bucket's errors are many types
            log.warning("jobs: could not read a result for %s: %r", subjects.JOBS_RESULT, exc)
            return  # the client's request times out, and says so
        await publish_checked(self.nc, msg.reply, stored or b"", "a job's result")

    async def _run(self) -> None:
        while self._sub is None:
            await asyncio.sleep(_SETUP_RETRY_S)
            problem = await self._setup()
            if problem is not None:
                log.debug("jobs: still not set up: %s", problem)
        await self._pull()

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop pulling; jobs in flight finish (up to grace_s), the rest are cancelled and
        redelivered."""
        if self._loop is not None:
            await cancel_and_wait(self._loop)
            self._loop = None
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        if self._tasks:
            # Past the grace: stopped here (their workers told to cancel, so no provider call
            # runs on unread, and their spans end), not acknowledged: delivered again.
            for task in set(self._tasks):
                task.cancel(SHUTTING_DOWN)
            await asyncio.wait(set(self._tasks), timeout=_CANCELLED_WAIT_S)
        if self._remaking is not None:
            await cancel_and_wait(self._remaking)
        sub, self._sub = self._sub, None
        results, self._results_sub = self._results_sub, None
        for one in (sub, results):
            if one is not None:  # else draining the connection waits on it for its whole timeout
                try:
                    await one.unsubscribe()
                except (nats.errors.Error, nats.js.errors.Error) as exc:
                    log.debug("jobs: unsubscribing: %s", exc)
        self._asks.clear()  # not looked up: their askers time out
        if self._lookups:  # their askers wait for them; each is one KV read, bounded by its timeout
            await asyncio.wait(set(self._lookups), timeout=_OP_TIMEOUT_S + 1)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def subscribed(self) -> bool:
        """Whether it pulls from the jobs stream (not while JetStream cannot be reached)."""
        return self._sub is not None

    async def _pull(self) -> None:
        failed = 0  # pulls failed in a row
        while True:
            free = self.settings.in_flight - len(self._tasks)
            if free <= 0:
                await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                batch = min(free, fetch_batch(self.nc.max_payload))
                msgs = await self._sub.fetch(batch, timeout=_FETCH_WAIT_S)
                failed = 0
            except TimeoutError:  # nats-py raises its own and asyncio's: no jobs this second
                failed = 0
                continue
            except Exception as exc:  # noqa: BLE001 - this loop must outlive any one failure
                failed += 1
                log.warning("jobs: pulling failed (%r); trying again", exc)
                await asyncio.sleep(_FETCH_WAIT_S)
                if failed % _RESETUP_AFTER == 0:
                    await self._setup_again()
                continue
            for msg in msgs:
                # The stream's sequence and the job's time in it: a stream made again counts
                # from 1, and a new job with the number of one still running from before was
                # taken for its redelivery, never run, and acknowledged by the old one's end.
                seq = (msg.metadata.sequence.stream, msg.metadata.timestamp)
                latest = self._running.get(seq)
                if latest is not None:
                    # Delivered again while this dispatcher still runs it (stopped or starved
                    # past the ack wait, its heartbeats late): the run under way answers this
                    # delivery, and a second one would call the provider again.
                    latest[0] = msg
                    await _quietly(msg.in_progress())
                    continue
                latest = self._running[seq] = [msg]
                task = asyncio.create_task(self._job(latest, time.monotonic()))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                task.add_done_callback(lambda _, seq=seq: self._running.pop(seq, None))

    async def _setup_again(self) -> None:
        """The stream, the bucket and the consumer made again where they are gone (a server
        restarted on an empty store, an operator who deleted one), and pulled from anew:
        pulls failing for good would otherwise leave every job waiting."""
        old = self._sub
        problem = await self._setup()
        if problem is not None:
            log.warning("jobs: could not set up again (%s); still trying", problem)
            return
        if old is not None and old is not self._sub:
            with contextlib.suppress(Exception):  # its consumer may be gone with its stream
                await old.unsubscribe()

    async def _job(self, latest: list[Msg], arrived: float) -> None:
        """One job, from its first delivery here; `latest` holds its latest delivery, which
        JetStream may have made again meanwhile (see _pull). A job that fails ends (delivered
        again, or dead-lettered and its error result stored) before its id is let go: let go
        first, a copy of the id waiting for it ran the provider before the error was stored."""
        msg = latest[0]
        heartbeat = asyncio.create_task(self._heartbeat(latest))
        served: list[bool] = []  # the engine had it, and published its audit event
        traced = self._trace(msg)
        ended: tuple[str, CompletionReply | None] | None = None
        failed_inside = False
        try:
            key = identity(msg).key
            async with self._turn(key) as turn, self._claimed(key, msg) as claim:
                arrived = max(arrived, turn, claim.came)  # its deadline counts from its turn
                try:
                    ended = await self._answer(
                        msg, arrived, served, latest, traced.headers, claim.stored
                    )
                except Exception as exc:  # noqa: BLE001 - _failed logs it, traceback and all
                    failed_inside = True
                    ended = await self._failed(latest, exc, served, traced.trace_id)
        except Exception as exc:  # its id not had: the bucket unreachable, say
            if failed_inside:
                raise
            ended = await self._failed(latest, exc, served, traced.trace_id)
        finally:
            heartbeat.cancel()
        if ended is None:  # delivered again
            return
        try:
            traced.end(self.engine.spans, latest[0], *ended, self.engine.error_text)
        except Exception:
            log.exception("jobs: bug while ending the span of job %r", job_id_of(msg))

    async def _failed(
        self, latest: list[Msg], exc: Exception, served: list[bool], trace_id: str | None
    ) -> tuple[str, CompletionReply | None] | None:
        """A job whose handling failed: delivered again later (None), or, on its last
        delivery, dead-lettered (how it ended, and its result)."""
        msg = latest[0]
        last = msg.metadata.num_delivered >= self.settings.max_deliver
        if isinstance(exc, _Waits) and not last:
            pass  # the engine logged why, and when it is tried again
        elif isinstance(exc, _BUCKET_TROUBLE):  # not a bug: no traceback
            log.warning(
                "jobs: job %r not finished (%s); %s",
                job_id_of(msg),
                _said(exc),
                "its last delivery: dead-lettered"
                if last
                else f"it is delivered again in {_RETRY_DELAY_S:g} s",
            )
        elif last:
            log.error(
                "jobs: bug while handling a job, its last delivery: dead-lettered", exc_info=exc
            )
        else:
            log.error("jobs: bug while handling a job; it is delivered again later", exc_info=exc)
        if not last:
            await _quietly(msg.nak(delay=_RETRY_DELAY_S))
            return None
        return "dead_lettered", await self._dead_letter(msg, exc, bool(served), trace_id)

    @contextlib.asynccontextmanager
    async def _turn(self, key: str) -> AsyncIterator[float]:
        """One job of an id at a time here, the others waiting their turn (the time it came):
        one sent again past the dedup window while the first still waited or ran was run
        beside it (a second provider call, and a second audit event the audit stream kept);
        after it, it finds its result stored."""
        while (ahead := self._turns.get(key)) is not None:
            await ahead.wait()
        done = self._turns[key] = asyncio.Event()
        try:
            yield time.monotonic()
        finally:
            del self._turns[key]
            done.set()

    @contextlib.asynccontextmanager
    async def _claimed(self, key: str, msg: Msg) -> AsyncIterator[_Claim]:
        """One job of an id at a time across dispatchers, as `_turn` is here: its claim key
        created (which fails where it exists) before it runs. A copy of the id another
        dispatcher runs waits for its result, and is answered from it. Yields the result
        stored already, if any, and when its claim was settled. The claim goes as the job
        ends (see _unclaim): its result stored, a copy claiming the id after finds it; none
        stored (the job failed), the next copy runs."""
        assert self.kv is not None
        claim, place = _claim_key(key), _place(msg)
        mine = _claim_value(place, self.settings.ack_wait_s)
        revision, stored = await self._claim(key, claim, mine)
        found = _Claim(stored, time.monotonic())
        if not revision:
            yield found
            return
        held = [revision]
        refresh = asyncio.create_task(self._hold(claim, mine, held))
        try:
            yield found
        finally:
            refresh.cancel()
            if held[0]:  # not taken over meanwhile
                await self._unclaim(claim, held[0])

    async def _unclaim(self, claim: str, revision: int) -> None:
        """A claim purged from the bucket's stream, if its message is still `revision`: a KV
        delete leaves a marker in the key's place until the TTL, so a bucket limited in values
        or bytes held a claim beside each result and filled twice as fast (the stream denies
        deleting a message; a purge up to a sequence, on one subject, leaves nothing). A claim
        taken over meanwhile is written anew, past `revision`, and stays: another's."""
        if time.monotonic() < self._unclaim_from:
            return  # left to expire with the results, as a purge that timed out said
        bucket = self.settings.results_bucket
        js = self.nc.jetstream(timeout=_OP_TIMEOUT_S)
        try:
            await js.purge_stream(f"KV_{bucket}", seq=revision + 1, subject=f"$KV.{bucket}.{claim}")
        except nats.errors.TimeoutError:
            # A NATS user made before claims were purged is refused without an answer: each
            # job would hold its place here for the timeout.
            self._unclaim_from = time.monotonic() + _UNCLAIM_PAUSE_S
            log.warning(
                "jobs: a claim was not purged within %g s; claims are left to expire with the "
                "results for %g s. May this NATS user publish $JS.API.STREAM.PURGE.KV_%s? "
                "(`lifeline nats-config` gives the dispatcher's user what it needs)",
                _OP_TIMEOUT_S,
                _UNCLAIM_PAUSE_S,
                bucket,
            )
        except (nats.errors.Error, nats.js.errors.Error) as exc:  # taken over, say
            log.debug("jobs: the claim %s not purged (%r)", claim, exc)

    async def _claim(self, key: str, claim: str, mine: bytes) -> tuple[int, bytes | None]:
        """The claim's revision once this job holds it (0 when the result came first), and
        the result stored. A claim is taken over when it is this job's own (an earlier
        delivery's, whose dispatcher died or stopped) or not written for its holder's ack
        wait (see _hold)."""
        assert self.kv is not None
        own = _claim_read(mine, self.settings.ack_wait_s)[0]
        seen, since, tries = 0, 0.0, 0
        while True:
            revision = 0
            try:
                revision = await self.kv.create(claim, mine)
            except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError):
                pass  # held (not found: let go or expired between nats-py's create and its read)
            except _GONE as exc:
                if not await self._bucket_again(exc):
                    raise
                await asyncio.sleep(_CLAIM_POLL_S[0])
                continue
            if not revision and (entry := await self._entry(claim)) is not None:
                if entry.revision != seen:
                    seen, since = entry.revision, time.monotonic()
                held_by, stale_s = _claim_read(entry.value or b"", self.settings.ack_wait_s)
                if held_by == own or time.monotonic() - since > stale_s:
                    with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                        revision = await self.kv.update(claim, mine, last=entry.revision)
            stored = await self._stored(key)
            if revision or stored is not None:
                return revision, stored
            await asyncio.sleep(_CLAIM_POLL_S[min(tries, len(_CLAIM_POLL_S) - 1)])
            tries += 1

    async def _hold(self, claim: str, mine: bytes, held: list[int]) -> None:
        """The claim written again every third of the ack wait while its job runs, so that a
        copy waiting for it takes it over only from a dispatcher gone for the ack wait. Most
        jobs end sooner: no write."""
        assert self.kv is not None
        while held[0]:
            await asyncio.sleep(self.settings.ack_wait_s / 3)
            try:
                held[0] = await self.kv.update(claim, mine, last=held[0])
            except nats.js.errors.KeyWrongLastSequenceError:
                held[0] = 0  # taken over: no longer this job's to write or release
            except Exception as exc:  # noqa: BLE001 - tried again next time
                log.debug("jobs: the claim %s not written again (%r)", claim, exc)

    def _trace(self, msg: Msg) -> JobTrace:
        """The job's trace; tracing that fails (a sampler's bug) fails no job."""
        try:
            return JobTrace.of(msg, self.engine.spans)
        except Exception:
            log.exception(
                "jobs: bug while tracing job %r; its headers' trace is used", job_id_of(msg)
            )
            return JobTrace(msg.headers, None, None)

    async def _dead_letter(
        self, msg: Msg, exc: Exception, audited: bool, trace_id: str | None = None
    ) -> CompletionReply | None:
        """The job as it was submitted, on llm.jobs.dead with what went wrong (without its body
        when the error's header would push it over max_payload, which would close the
        connection); unless the engine had it (and audited it), its result: an `internal`
        error saying so, stored when the bucket takes it, pushed to its Lifeline-Notify
        subject and audited, returned; then out of the stream (a work queue keeps a message
        that reached max_deliver unless it is acked). Stored, its result is found by a
        delivery that comes again (its dispatcher died before the ack), which dead-letters
        nothing more; the dead letter goes first, so such a death loses none."""
        error = f"{type(exc).__name__}: {exc}"[:500].replace("\r", " ").replace("\n", " ")
        headers = {**_kept_on_a_dead_letter(msg.headers), subjects.JOB_ERROR: error}
        body = msg.data
        if message_bytes(body, headers) > self.nc.max_payload:
            body = b""
            headers[subjects.JOB_ERROR] = error + " (the job's body left out: too large with it)"
        if message_bytes(body, headers) > self.nc.max_payload:
            headers = {subjects.JOB_ERROR: headers[subjects.JOB_ERROR]}
        await publish_checked(self.nc, subjects.JOBS_DEAD, body, "a dead-lettered job", headers)
        result = None
        if not audited:  # it failed before the engine had it: its one result and event
            job_id, key, audit_id = identity(msg)
            if len(job_id) > MAX_ID_LENGTH:  # a Nats-Msg-Id's: none, as a job answered says
                job_id = ""
            inbound = Inbound(msg.data, msg.headers, time.monotonic(), job_id, audit_id)
            message = (
                f"the jobs front end failed on each of the job's {msg.metadata.num_delivered} "
                f"deliveries ({error}); it was published on {subjects.JOBS_DEAD}"
            )
            failed = CompletionReply(
                salvage_id(msg.data) or job_id,
                "error",
                trace_id=trace_id,
                error=ErrorInfo(INTERNAL, f"{message}; once the cause is fixed, {_ANOTHER_ID}"),
            )
            result, not_stored = await self._keep_or_fit(key, failed)
            if not_stored is not None:  # a job of its id sent again runs again: not said
                result = as_error(result, INTERNAL, message)
                log.warning(
                    "jobs: the error result of dead-lettered job %r could not be stored (%r)",
                    failed.id,
                    not_stored,
                )
            await self.engine.audit_again(inbound, result)
            await self._notify(msg, encoder.encode(result))
        await _quietly(msg.term())
        return result

    async def _answer(
        self,
        msg: Msg,
        arrived: float,
        served: list[bool],
        latest: list[Msg] | None = None,
        headers: Mapping[str, str] | None = None,
        stored: bytes | None = None,
    ) -> tuple[str, CompletionReply]:
        """`msg` answered and its result kept, then acknowledged (its `latest` delivery); how
        it ended, and its result. `headers`: the job's, with its trace (JobTrace); `stored`:
        its result, read as it was claimed (see _claimed)."""
        latest = latest or [msg]
        assert self.kv is not None
        job_id, key, audit_id = identity(msg)
        refused = None
        if len(job_id) > MAX_ID_LENGTH:  # from its Nats-Msg-Id, which has no bound of its own
            refused = Rejected(
                INVALID_REQUEST,
                f"a job's id is at most {MAX_ID_LENGTH} characters; this one (its Nats-Msg-Id) "
                f"is {len(job_id)}: send a shorter one",
            )
            job_id = ""  # as for an id in the body that is too long
        elif key.startswith("job." + _UNCLEAR_ID):
            refused = Rejected(
                INVALID_REQUEST,
                "a job's Nats-Msg-Id is given once, as `Nats-Msg-Id: <id>`; this one is given "
                "twice, or with a space before its colon, and nats-server deduplicates jobs by "
                "the first line written exactly so (none here when it has a space), not by the "
                "id it would be known by: send it once, or give the job an `id` in its body",
            )
            job_id = ""
        elif key.startswith("job." + _UNREADABLE_ID):
            refused = Rejected(
                INVALID_REQUEST,
                "a job's Nats-Msg-Id is UTF-8 text; this one is not (or holds U+FFFD, which "
                "stands for bytes that are not): send it as UTF-8, or give the job an `id` in "
                "its body",
            )
            job_id = ""
        inbound = Inbound(msg.data, headers or msg.headers, arrived, job_id, audit_id)
        self.tally.requests += 1
        if stored is not None:  # answered before: a redelivery, or the id sent again
            self.found += 1
            # The delivery that stored it may have died before its audit event went out: this
            # message's own earlier delivery, not another job of the id (sent again later,
            # whose event the audit stream may no longer know to drop).
            reply = reply_decoder.decode(stored)
            if msg.metadata.num_delivered > 1 and await self._stored_by_this_job(key, msg):
                await self.engine.audit_again(inbound, reply)
            await self._notify(msg, stored)
            await self._stream_stored(msg, reply)
            await latest[0].ack()
            return "stored_before", reply
        if msg.metadata.num_delivered > self.settings.max_deliver:
            raise _LastDeliveryLost(
                f"its last delivery (jobs.max_deliver = {self.settings.max_deliver}) ended "
                "with no result stored: its dispatcher died or stopped while running it"
            )

        kept: list[CompletionReply] = []
        not_kept: list[str] = []  # why, when `keep` sent it to be delivered again

        async def keep(reply: CompletionReply) -> CompletionReply:
            if (
                _nobody_there(reply)
                and latest[0].metadata.num_delivered < self.settings.max_deliver
            ):
                # Workers not up yet (a fleet started all at once, its dispatcher first): a
                # durable job waits for them, where a core request's client would ask again.
                not_kept.append(_no_worker_yet(reply))
                raise DeliverAgain(not_kept[-1])
            try:
                result = await self._keep_patiently(key, reply)
            except Exception as exc:  # the bucket's errors are many types
                refusal = self._refusal(exc)
                if refusal is not None:  # no retry cures it: the job ends now, with an error
                    result = await self._refused(key, reply, exc, refusal)
                elif latest[0].metadata.num_delivered < (max_deliver := self.settings.max_deliver):
                    # Not stored: the job is delivered again, and that delivery audits what
                    # it stores (the audit stream keeps one event per job: it must be that).
                    # Its answer is kept meanwhile: delivered here again, it is not paid twice.
                    self._unstored.keep(key, reply)
                    not_kept.append(
                        f"its result could not be stored ({_said(exc)}); "
                        f"tried again in {_RETRY_DELAY_S:g} s"
                    )
                    raise DeliverAgain(not_kept[-1]) from exc
                else:  # its last delivery: its client gets the answer all the same (it cannot
                    # be fetched by id); dead-lettered next, audited now, as it ends
                    _, payload = fitted(reply, self.nc.max_payload - _KV_HEADER_ROOM)
                    await self._notify(msg, payload)
                    raise NotKept(
                        f"its result could not be stored in {max_deliver} deliveries ({exc!r}); "
                        "it went to the job's Lifeline-Notify subject only, and the job to "
                        f"{subjects.JOBS_DEAD}"
                    ) from exc
            kept.append(result)
            await self._notify(msg, encoder.encode(result))
            return result

        sink = self._events_sink(msg)
        answered = self._unstored.take(key)  # answered on an earlier delivery, not stored
        reply = await self.engine.serve(inbound, keep, refused, sink=sink, answered=answered)
        served.append(True)
        self.tally.busy_ms += reply.latency_ms
        if reply.error is not None:
            self.tally.errors += 1
            self.tally.last_error = reply.error.type
        if not kept:  # the engine logs what `keep` raised and audits nothing: never ack then
            if not_kept:
                raise _Waits(not_kept[-1])
            raise _NotStored("its result could not be stored (see the log above)")
        self.handled += 1
        await latest[0].ack()
        return "answered", kept[-1]

    async def _stored_by_this_job(self, key: str, msg: Msg) -> bool:
        """Whether the result under `key` was stored after `msg` was published (by one of its
        deliveries); when that cannot be read, True."""
        assert self.kv is not None
        bucket = self.settings.results_bucket
        try:
            entry = await self.nc.jetstream(timeout=_OP_TIMEOUT_S).get_msg(
                f"KV_{bucket}",
                subject=f"$KV.{bucket}.{key}",
                direct=bool(getattr(self.kv, "_direct", False)),
            )
        except Exception as exc:  # noqa: BLE001 - the bucket's errors are many types
            log.debug("jobs: when %s was stored is unknown (%r)", key, exc)
            return True
        return entry.time is None or entry.time >= msg.metadata.timestamp

    async def _stored(self, key: str) -> bytes | None:
        """The result stored under `key`; None without one, or when what is there is no
        reply: within one account, anyone may make JetStream itself answer onto a key (a
        publish's acknowledgement or an API reply goes to the reply subject its sender names,
        whatever its permissions), and that must neither pass for a job's result nor keep the
        job from being answered (`_keep` writes over it)."""
        entry = await self._entry(key)
        return entry.value if entry is not None and _as_reply(entry.value) else None

    async def _entry(self, key: str) -> Any:
        """The bucket's entry under `key`, or None; a bucket found gone is made again first
        (empty: its results went with it)."""
        try:
            return await self._get(key)
        except _GONE as exc:
            if not await self._bucket_again(exc):
                raise
            return await self._get(key)

    async def _get(self, key: str) -> Any:
        assert self.kv is not None
        try:
            return await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None

    async def _bucket_again(self, exc: BaseException) -> bool:
        """The results bucket made again when a read or a store found it gone (an operator
        deleted it, a server restarted on an empty store), as at setup: else every job from
        then on would be answered and never stored. One try at a time, and at most one a
        second, whatever number of jobs find it so; whether the bucket is there now."""
        task = self._remaking
        if task is None or (task.done() and time.monotonic() - self._remade_at >= _REMAKE_EVERY_S):
            task = self._remaking = asyncio.create_task(self._make_bucket(exc))
        return await asyncio.shield(task)

    async def _look_at_bucket(self, js: Any) -> None:
        """The results bucket's limits, read once: its max value size, and a TTL other than
        the config's said."""
        info = await js.stream_info(f"KV_{self.settings.results_bucket}")
        self.max_value = max_value_of(info)
        _say_if_other_ttl(info, self.settings)

    async def _make_bucket(self, exc: BaseException) -> bool:
        s = self.settings
        js = self.nc.jetstream(timeout=_OP_TIMEOUT_S)
        try:
            try:
                self.max_value = await results_max_value(js, s)
                return True  # there: what failed was a moment's (a node restarting)
            except nats.js.errors.NotFoundError:
                pass
            self.kv = await ensure_jobs(js, s, self.replicas)
            await self._look_at_bucket(js)
        except Exception as failed:  # noqa: BLE001 - nats-py: no JetStream answers with many types
            log.warning(
                "jobs: the results bucket %s did not answer (%r), and could not be set up "
                "again: %s; trying again with the next job",
                s.results_bucket,
                exc,
                jetstream.hint(failed, self.replicas),
            )
            return False
        finally:
            self._remade_at = time.monotonic()
        log.warning(
            "jobs: the results bucket %s was gone (%r); made it again", s.results_bucket, exc
        )
        return True

    async def _keep_patiently(self, key: str, reply: CompletionReply) -> CompletionReply:
        """`_keep`, tried again while the bucket is unreachable (up to _STORE_PATIENCE_S; the
        job's heartbeat holds it meanwhile): the provider's answer is in hand, and giving up
        at once would have the job delivered again and the provider paid a second time. A
        try that timed out may have stored it after all: the next finds it there."""
        give_up, tries = time.monotonic() + _STORE_PATIENCE_S, 0
        while True:
            try:
                return await self._keep(key, reply)
            except _UNREACHABLE as exc:
                if self._refusal(exc) is not None:  # a full store answers 503 too: not waited out
                    raise
                wait_s = _STORE_BACKOFF_S[min(tries, len(_STORE_BACKOFF_S) - 1)]
                if time.monotonic() + wait_s > give_up:
                    raise
                if tries == 0:
                    log.warning(
                        "jobs: the result of %r cannot be stored yet (%r); trying again for up "
                        "to %g s",
                        reply.id,
                        exc,
                        _STORE_PATIENCE_S,
                    )
                if isinstance(exc, _GONE):
                    await self._bucket_again(exc)
                await asyncio.sleep(wait_s)
                tries += 1

    async def _keep(self, key: str, reply: CompletionReply) -> CompletionReply:
        """Store `reply` unless a result is stored already (the first one stays); what is
        stored is what the job's result is."""
        assert self.kv is not None
        reply, payload = self._fitted(reply)
        try:
            await self.kv.create(key, payload)
            return reply
        except nats.js.errors.KeyWrongLastSequenceError:
            entry = await self._entry(key)
            stored = _as_reply(entry.value) if entry is not None else None
            if stored is not None:  # the first result stays
                return stored
            if entry is not None:  # not a result (see _stored): this one goes over it
                log.warning("jobs: the key of job %r held no result; storing its own", reply.id)
                await self.kv.update(key, payload, last=entry.revision)
            return reply

    async def _keep_or_fit(
        self, key: str, reply: CompletionReply
    ) -> tuple[CompletionReply, Exception | None]:
        """`_keep` tried once, for a job that ends now whatever the bucket says: its result
        (what was stored, else `reply` fitted to go out), and why it was not stored."""
        try:
            return await self._keep(key, reply), None
        except Exception as exc:  # noqa: BLE001 - the bucket's errors are many types
            return fitted(reply, self.nc.max_payload - _KV_HEADER_ROOM)[0], exc

    def _fitted(self, reply: CompletionReply) -> tuple[CompletionReply, bytes]:
        """`reply` as it is stored, and its encoding. Room for the KV write's subject and
        headers under max_payload, and within the bucket's own max value size: a result too
        large for either is stored as the same reply_too_large error a core request gets (a
        message over max_payload would close the connection; one over the bucket's limit is
        refused; either would be delivered again and again)."""
        room = self.nc.max_payload - _KV_HEADER_ROOM
        if self.max_value is None or self.max_value - _KV_VALUE_HEADERS >= room:
            return fitted(reply, room, self._over_max_payload)
        # A bucket too small even for the error refuses it (see _refused): the operator's
        # misconfiguration, warned about at start, so its names stay whole.
        room = self.max_value - _KV_VALUE_HEADERS
        return fitted(reply, room, self._too_large, cut_names=False)

    def _over_max_payload(self, reply: CompletionReply, size: int, room: int) -> CompletionReply:
        message = (
            f"the answer makes a result of {size} bytes, above the {room} that the NATS server's "
            f"max_payload ({self.nc.max_payload} bytes) leaves for it; ask for fewer max_tokens, "
            f"or raise max_payload in nats-server's config, and {_ANOTHER_ID}"
        )
        return as_error(reply, REPLY_TOO_LARGE, message)

    def _too_large(
        self, reply: CompletionReply, size: int, _room: int = 0, *, kept: bool = True
    ) -> CompletionReply:
        """The error of a result over the bucket's max value size; `kept`: stored as the job's
        result (it says to send the job again under another id)."""
        bucket = self.settings.results_bucket
        limit = f" ({self.max_value} bytes, with the write's headers)" if self.max_value else ""
        message = (
            f"the answer makes a result of {size} bytes, above the max value size of the "
            f"results bucket {bucket}{limit}; ask for fewer max_tokens, or raise the bucket's "
            f"max value size (the max_msg_size of its stream KV_{bucket})"
        )
        return as_error(
            reply, REPLY_TOO_LARGE, f"{message}, and {_ANOTHER_ID}" if kept else message
        )

    def _refusal(self, exc: BaseException) -> str | None:
        """Why the bucket refuses a result for good, and what to raise for it; None for a
        failure that may pass (a node restarting, a leader being elected, anything else)."""
        code = getattr(exc, "err_code", None)
        said = f"JetStream: {getattr(exc, 'description', None) or type(exc).__name__}"
        bucket = self.settings.results_bucket
        if code == _TOO_LARGE:
            return (
                f"{said}: the result is over the max value size of the results bucket {bucket}; "
                f"raise it (the max_msg_size of its stream KV_{bucket})"
            )
        if code == _STORE_FAILED and "maximum" in said:  # max_bytes or max_msgs, discard new
            return (
                f"{said}: the results bucket {bucket} is full; raise its max_bytes (or its "
                "maximum of values), or lower jobs.results_ttl_s so that results expire sooner"
            )
        if code in _STORE_FULL:
            return (
                f"{said}: JetStream's store is full; raise the server's max_file_store "
                "(max_memory_store for a bucket kept in memory) or the account's JetStream "
                "limits, or free space on its disk"
            )
        return None

    async def _refused(
        self, key: str, reply: CompletionReply, exc: BaseException, refusal: str
    ) -> CompletionReply:
        """A job's result the bucket refuses for good (`refusal`): the job ends with an error
        result saying so, stored when the bucket takes that (and the first result stored
        stays), pushed to its Lifeline-Notify subject and audited by the engine either way;
        it is acknowledged, never delivered again to call its provider once more."""
        if getattr(exc, "err_code", None) == _TOO_LARGE:
            with contextlib.suppress(Exception):  # made smaller since setup, maybe
                js = self.nc.jetstream(timeout=_OP_TIMEOUT_S)
                self.max_value = await results_max_value(js, self.settings)
            failed = self._too_large(reply, len(encoder.encode(reply)))
            unkept = self._too_large(reply, len(encoder.encode(reply)), kept=False)
        else:
            message = f"the answer could not be stored ({refusal}); the operator's to fix, then "
            failed = as_error(reply, INTERNAL, message + _ANOTHER_ID)
            unkept = as_error(reply, INTERNAL, message + "send the job again")
        result, again = await self._keep_or_fit(key, failed)
        stored = "stored" if again is None else f"not stored either ({again!r})"
        if again is not None:  # a job of its id sent again runs again
            result = fitted(unkept, self.nc.max_payload - _KV_HEADER_ROOM)[0]
        log.warning(
            "jobs: the result of %r cannot be stored, and trying again would not change that: "
            "%s. The job ends with the error %s, %s, and is not delivered again",
            reply.id,
            refusal,
            failed.error.type if failed.error is not None else None,
            stored,
        )
        return result

    async def _notify(self, msg: Msg, payload: bytes) -> None:
        subject = (msg.headers or {}).get(subjects.NOTIFY)
        if subject and subjects.reply_subject_refused(subject) is None:
            await publish_checked(self.nc, subject, payload, "a job's result")

    def _events_sink(self, msg: Msg) -> ClientStream | None:
        """Where the job's answer is streamed as it is written (its Lifeline-Events), if any."""
        events_to = (msg.headers or {}).get(subjects.JOB_EVENTS)
        if events_to and subjects.reply_subject_refused(events_to) is None:
            return ClientStream(self.nc, events_to)
        return None

    async def _stream_stored(self, msg: Msg, reply: CompletionReply) -> None:
        """A result found stored, streamed to the job's Lifeline-Events subject as one answer
        written at once: its text, then its end (or error) event. Its listener (the id sent
        again, a delivery whose first died before its end event) got no event at all, and
        waited for an end that never came."""
        sink = self._events_sink(msg)
        if sink is None:
            return
        attempt = 0  # none: an error found before any call
        if reply.content:
            attempt = 1
            sink.delta(attempt, reply.content.encode())
        await sink.end(msgspec.structs.replace(reply, content=None), attempt)

    async def _heartbeat(self, latest: list[Msg]) -> None:
        """Tell JetStream the job (its latest delivery) is still being worked on, well within
        each ack wait: a third of this dispatcher's, and at least every second, since the
        consumer is shared and another dispatcher's config may have set it lower (a rolling
        deploy lowering jobs.ack_wait_s had every long job here delivered, and paid, twice)."""
        every_s = min(self.settings.ack_wait_s / 3, _HEARTBEAT_MAX_S)
        while True:
            await asyncio.sleep(every_s)
            await _quietly(latest[0].in_progress())


_told_ttl: set[tuple[str, Any, float]] = set()  # (bucket, when made, its TTL): said once each


def _say_if_other_ttl(info: Any, settings: JobsSettings) -> None:
    """A results bucket made before (by a client's submit, another config) keeps its own TTL,
    whatever jobs.results_ttl_s says: said once, as for the jobs stream's other limits."""
    ttl = info.config.max_age or 0.0
    key = (settings.results_bucket, info.created, ttl)
    if abs(ttl - settings.results_ttl_s) < 0.5 or key in _told_ttl:
        return
    _told_ttl.add(key)
    log.warning(
        "jobs: the results bucket %s keeps results %s, not the %g s of jobs.results_ttl_s (it "
        "existed already, made otherwise; used as it is): to change it, update its stream "
        "KV_%s's max_age, or delete the bucket so that Lifeline makes it anew",
        settings.results_bucket,
        f"for {ttl:g} s" if ttl else "for ever",
        settings.results_ttl_s,
        settings.results_bucket,
    )


_UNSTORED_MAX_BYTES = 64 * 1024 * 1024
# Longer than a job's redeliveries take (5 deliveries, 5 s apart, each up to ack_wait_s = 300
# s at most), shorter than any results TTL worth having.
_UNSTORED_FOR_S = 1800.0


class _Unstored:
    """Answers of jobs whose results could not be stored (a bucket unreachable, JetStream's disk
    full), by job key, until their next delivery here: it stores one without calling the
    provider again (with a full disk, each of a job's deliveries paid its provider anew). At
    most _UNSTORED_MAX_BYTES of them, the oldest left out first, and none older than
    _UNSTORED_FOR_S (a job of the same id sent again much later is a new one)."""

    def __init__(
        self,
        max_bytes: int = _UNSTORED_MAX_BYTES,
        for_s: float = _UNSTORED_FOR_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes, self.for_s, self.clock = max_bytes, for_s, clock
        self._kept: collections.OrderedDict[str, tuple[float, bytes]] = collections.OrderedDict()
        self._bytes = 0

    def keep(self, key: str, reply: CompletionReply) -> None:
        self.take(key)
        payload = encoder.encode(reply)
        if len(payload) > self.max_bytes:
            return
        self._kept[key] = (self.clock(), payload)
        self._bytes += len(payload)
        while self._bytes > self.max_bytes:
            _, (_, oldest) = self._kept.popitem(last=False)
            self._bytes -= len(oldest)

    def take(self, key: str) -> CompletionReply | None:
        kept = self._kept.pop(key, None)
        if kept is None:
            return None
        at, payload = kept
        self._bytes -= len(payload)
        return reply_decoder.decode(payload) if self.clock() - at <= self.for_s else None


async def _keep_consumer_to(js: Any, settings: JobsSettings) -> None:
    """The durable consumer keeps the ack_wait and max_deliver it was made with (binding to it
    changes nothing), while this dispatcher heartbeats and dead-letters by its own settings:
    one made with other values (an earlier config) is updated to these."""
    try:
        info = await js.consumer_info(settings.stream, subjects.JOBS_CONSUMER)
    except nats.js.errors.NotFoundError:
        return  # pull_subscribe makes it, with these
    config = info.config
    if (
        config.max_deliver in (_CONSUMER_MAX_DELIVER, 0)  # 0: the server's own "unlimited"
        and config.ack_wait is not None
        and abs(config.ack_wait - settings.ack_wait_s) < 0.001
    ):
        return
    await js.add_consumer(
        settings.stream,
        config.evolve(ack_wait=settings.ack_wait_s, max_deliver=_CONSUMER_MAX_DELIVER),
    )
    log.info(
        "jobs: consumer %s updated to ack_wait %g s and no delivery limit of its own (it had "
        "%s s and %s)",
        subjects.JOBS_CONSUMER,
        settings.ack_wait_s,
        config.ack_wait,
        config.max_deliver,
    )


async def _quietly(work: Any) -> None:
    try:
        await work
    except (nats.errors.Error, nats.js.errors.Error, msgspec.DecodeError) as exc:
        log.debug("jobs: %s", exc)


def _as_reply(value: bytes | None) -> CompletionReply | None:
    """A results bucket's value as a job's result; None when it is none."""
    if not value:
        return None
    try:
        return reply_decoder.decode(value)
    except msgspec.DecodeError:
        return None
