"""The audit events' durable home: a JetStream stream capturing llm.audit.>.

Every request's one audit event is published on llm.audit.<status> with a core publish: live
subscribers get it at once, and the stream keeps it for later (for `lifeline audit`, and for
consumers that were offline), up to audit.max_age_s and audit.max_bytes, dropping the oldest
past them. A job's event carries Nats-Msg-Id "job:<a hash of its id and its place in the
jobs stream>" (schemas.subjects.job_audit_id), so a job answered again after a dispatcher died
keeps one event in the stream; it is a JetStream publish, waited for while the stream is there
to capture its subject (service.transport's _audit_acked, told which subjects by
keep_audit_stream). With audit.confirm_requests, a request's event goes the same way, under a
Nats-Msg-Id of its own, in a task apart from its request (answered: its place in max_in_flight
let go, so an outage of the stream refuses no request).

Why a core publish into a captured subject rather than a JetStream publish: measured here (one
process, an audit-sized event, 20,000 of each), the fast path's core publish costs 2 µs of
CPU per event, nats-py's core publish 4 µs, a JetStream publish awaiting its ack 200 µs and
with acks gathered 93 µs. The price: the server does not confirm the capture, so an event
published while the stream is unavailable reaches only live subscribers.
"""

from __future__ import annotations

import asyncio
import logging
import time
import typing
from collections.abc import AsyncIterator, Callable

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from schemas.subjects import AUDIT_ALL, AUDIT_PREFIX, audit_subject
from schemas.wire import AuditEvent
from service import jetstream
from service.config import AUDIT_DEDUP_WINDOW_S, AuditSettings
from service.natsio import deliveries_keep_no_status

log = logging.getLogger("lifeline.audit")

# Longer than a job's redeliveries take (jobs.ack_wait_s <= 300); audit.max_age_s covers it.
DEDUP_WINDOW_S = AUDIT_DEDUP_WINDOW_S
_SETUP_RETRY_S = 2.0  # between tries to make the stream, while it cannot be made
_WATCH_S = 30.0  # between looks at whether the stream is still there
_SILENT_LOOKS = 2  # looks in a row at which JetStream did not answer, before that is said
_AUDIT_STATUSES = AUDIT_PREFIX + "*"  # every subject an event goes out on: a stream of
# Lifeline's name made beforehand must capture them all (llm.audit.> does)


# Every subject an event goes out on, one per AuditEvent.status.
_EVENT_SUBJECTS = tuple(
    audit_subject(status) for status in typing.get_args(typing.get_type_hints(AuditEvent)["status"])
)


def _captures(info: api.StreamInfo) -> frozenset[str]:
    """The event subjects the stream captures: an operator's stream made beforehand may miss
    some (ensure_audit_stream warned), and a job's event on one of those would wait for an ack
    that never comes, all of its patience (service.transport's _AUDIT_PATIENCE_S)."""
    patterns = info.config.subjects or ()
    return frozenset(s for s in _EVENT_SUBJECTS if any(jetstream.covers(p, s) for p in patterns))


async def _captured(js: JetStreamContext, settings: AuditSettings) -> frozenset[str] | None:
    """_captures of the stream as it is now; None when it cannot be looked at (a cluster
    electing its leaders: not "none", which would send jobs' events unconfirmed; the watch's
    next look says)."""
    try:
        return _captures(await js.stream_info(settings.stream))
    except Exception as exc:  # noqa: BLE001 - not there for now: looked at again within _WATCH_S
        log.debug("audit: could not look at stream %s: %r", settings.stream, exc)
        return None


_STALL_S = 5.0  # the longest wait for the next event of those the stream holds
_BATCH = 256  # the most events asked for at once
_GONE_AFTER_S = 10.0  # a reader's consumer unused this long goes (made again if it was needed)


class AuditStalled(Exception):
    """The stream stopped sending the events it holds before the last of them."""


class _Reader:
    """An ephemeral pull consumer on the audit stream that sees every stored message as an
    event, whatever headers its publisher gave it, and hands them on in stream order, each once.

    Not a push consumer (nats-py's ordered one, as it was): nats-py reads an empty message with
    `Status: 100` on one as JetStream's heartbeat or flow control, and any client may publish
    one on llm.audit.>, so the stream keeps it. It was swallowed (the listing short, or failed
    as stalled), and with a Nats-Consumer-Stalled header the reader published to the subject
    named there. A pull subscription is a core one to nats-py, and deliveries_keep_no_status
    lets fetch() tell a delivery (an ack-none one still has its $JS.ACK reply) from a status."""

    def __init__(self, js: JetStreamContext, stream: str) -> None:
        self.js, self.stream = js, stream
        self.sub: JetStreamContext.PullSubscription | None = None
        self.next_seq = self.next_delivery = 1
        self.pending = 0  # events the consumer has still to deliver, as its last one said

    async def open(self, start: int, pending: int = 0) -> None:
        """A consumer from stream sequence `start` on, in place of the one before."""
        await self.close()
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=_GONE_AFTER_S,
            num_replicas=1,
            mem_storage=True,
        )
        self.sub = await self.js.pull_subscribe(AUDIT_ALL, stream=self.stream, config=config)
        deliveries_keep_no_status(self.sub)
        self.next_seq, self.next_delivery, self.pending = start, 1, pending

    async def fetch(self, timeout: float) -> list[Msg]:
        """The next events, in order; raises TimeoutError when none came within `timeout`,
        nats.js.errors.APIError when the consumer is gone (no responders)."""
        assert self.sub is not None  # open, as read_events checks
        # One at a time once caught up: a larger batch's fetch waits out its timeout for more.
        msgs = await self.sub.fetch(max(1, min(_BATCH, self.pending)), timeout=timeout)
        events = []
        for msg in msgs:
            meta = msg.metadata
            if meta.sequence.consumer != self.next_delivery:
                # A delivery lost on the way (a reconnect; nats-py drops what overflows a
                # subscription): an ack-none consumer never sends it again, so from there anew.
                await self.open(self.next_seq, self.pending)
                break
            self.next_delivery += 1
            if meta.sequence.stream < self.next_seq:
                continue  # handed on already
            self.next_seq, self.pending = meta.sequence.stream + 1, meta.num_pending
            events.append(msg)
        return events

    async def close(self) -> None:
        if self.sub is not None:
            sub, self.sub = self.sub, None
            try:
                await sub.unsubscribe()
            except nats.errors.Error:  # closed, draining: nothing comes for it anymore
                pass


async def read_events(
    js: JetStreamContext, settings: AuditSettings, last: int, follow: bool
) -> AsyncIterator[bytes]:
    """The stream's audit events (every message it holds, whatever its headers), oldest first:
    the `last` ones (0: all of them), then, with `follow`, each new one as it comes."""
    info = await js.stream_info(settings.stream)
    state = info.state
    if state.messages == 0 and not follow:
        return
    if state.messages == 0:  # nothing kept yet: from the next event on
        start = state.last_seq + 1
    else:
        start = max(state.first_seq, state.last_seq - last + 1) if last else 1
    reader = _Reader(js, settings.stream)
    await reader.open(start, pending=state.last_seq - start + 1)
    read, made, looked = 0, info.created, time.monotonic()
    try:
        while True:
            msgs: list[Msg] | None = None  # None: no consumer to read from
            try:
                if reader.sub is not None:
                    msgs = await reader.fetch(_LOOK_EVERY_S if follow else _STALL_S)
            except TimeoutError:
                if not follow:  # events were still pending: what was read is not all of them
                    raise AuditStalled(
                        f"the audit stream sent nothing for {_STALL_S:g} s after {read} "
                        "event(s) while more were pending (a slow or lost connection): what was "
                        "shown is not all of them; ask again"
                    ) from None
                msgs = []
            except nats.js.errors.APIError:  # its consumer is gone: idle past _GONE_AFTER_S (a
                # paused output), a server restarted, the stream deleted
                pass
            lost = msgs is None
            if lost or (follow and time.monotonic() - looked >= _LOOK_EVERY_S):
                # A stream made again (deleted, a server restarted on an empty store) counts
                # from 1: resumed past the old place, its first events were never shown. Read
                # from its start.
                looked = time.monotonic()
                now = await _made(js, settings.stream)
                if now is not None and now != made:
                    made, again = now, 1
                elif lost:
                    again = reader.next_seq
                else:
                    again = 0
                if again:
                    try:
                        await reader.open(again)
                    except (nats.errors.Error, nats.js.errors.Error):
                        if not follow:
                            raise
                        await asyncio.sleep(_LOOK_EVERY_S)  # gone for now: tried again then
                        continue
            for msg in msgs or ():
                read += 1
                yield msg.data
                if not follow and msg.metadata.num_pending == 0:
                    return
    finally:
        await reader.close()


_LOOK_EVERY_S = 2.0  # while following: how often to look whether the stream was made again


async def _made(js: JetStreamContext, stream: str) -> object | None:
    """When `stream` was made, or None when that cannot be told now."""
    try:
        return (await js.stream_info(stream)).created
    except Exception:  # noqa: BLE001 - gone for now, the connection down: look again later
        return None


async def ensure_audit_stream(
    js: JetStreamContext, settings: AuditSettings, replicas: int = 1
) -> str | None:
    """Create the audit stream (on `replicas` servers of a cluster) when missing: None once it
    is there or none is wanted, else what went wrong and what to do about it."""
    if not settings.stream:
        return None
    config = api.StreamConfig(
        name=settings.stream,
        subjects=[AUDIT_ALL],
        retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.OLD,
        max_age=settings.max_age_s,
        max_bytes=settings.max_bytes,
        duplicate_window=DEDUP_WINDOW_S,
        num_replicas=replicas,
        description="Lifeline audit events, one per request",
    )
    try:
        await js.add_stream(config)
    except Exception as exc:  # noqa: BLE001 - no JetStream answers with many types
        if not jetstream.exists_already(exc):
            return jetstream.hint(exc, replicas)
        # Perhaps with other limits: the operator's stand, but what loses events is said.
        try:
            await jetstream.look_at_existing(
                js, settings.stream, _AUDIT_STATUSES, log, jobs=False, wanted=config
            )
        except Exception as err:  # noqa: BLE001 - a look that failed loses nothing
            log.debug("audit: could not look at stream %s: %r", settings.stream, err)
    return None


async def keep_audit_stream(
    js: JetStreamContext,
    settings: AuditSettings,
    replicas: int,
    problem: str | None,
    kept: Callable[[frozenset[str] | None], None] = lambda _: None,
) -> None:
    """Keep the audit stream there for as long as the dispatcher runs. After ensure_audit_stream
    said `problem`: try again every _SETUP_RETRY_S until it is there (a cluster still electing
    its leaders, a JetStream turned on later), saying so once; meanwhile events reach live
    subscribers only. Then look every _WATCH_S, and make it again when it is gone (a server
    restarted on an empty store, an operator who deleted it): nobody would keep events else.
    JetStream silent at two looks in a row (nats-server disables it when its disk is full, and
    a server restarted without -js has none) is said once, and its return: meanwhile events
    reach live subscribers only, and the server confirms no capture that would tell.
    `kept(subjects)` is told which audit subjects the stream is there to capture, as each of
    these finds it: a job's event on another one is not waited for. None while that is not
    known (a look failed, the stream not made yet or gone): a job's event waits then (a
    cluster's stream has no leader for a few seconds after a node dies, and a core publish is
    kept by nobody), at most its patience (service.transport's _audit_acked), after which the
    next ones do not wait until the stream is seen. None kept (no wait) while JetStream does
    not answer at all."""
    silent = 0
    kept(await _captured(js, settings) if problem is None else None)
    while True:
        if problem is not None:
            log.warning(
                "audit: events are not kept in stream %s yet (%s); trying again every %g s "
                '(audit.stream = "" keeps no stream)',
                settings.stream,
                problem,
                _SETUP_RETRY_S,
            )
            while problem is not None:
                await asyncio.sleep(_SETUP_RETRY_S)
                problem = await ensure_audit_stream(js, settings, replicas)
            log.warning("audit: events are kept in stream %s from now on", settings.stream)
            kept(await _captured(js, settings))
        await asyncio.sleep(_WATCH_S)
        try:
            info = await js.stream_info(settings.stream)
        except nats.js.errors.ServiceUnavailableError:
            silent += 1
            if silent == _SILENT_LOOKS:
                kept(frozenset())
                log.warning(
                    "audit: JetStream does not answer (a server whose disk filled up disables "
                    "it; one restarted without -js has none): events reach live subscribers "
                    "only and are not kept in stream %s until it does; check the server's log",
                    settings.stream,
                )
            continue
        except nats.js.errors.NotFoundError:
            problem = "it is gone (a server restarted on an empty store, or it was deleted)"
            kept(None)  # made again within _SETUP_RETRY_S: a job's event waits for it
            silent = 0  # JetStream answers: making the stream again says what follows
        except Exception as exc:  # noqa: BLE001 - unreachable for now: looked at next time
            log.debug("audit: could not look at stream %s: %r", settings.stream, exc)
        else:
            if silent >= _SILENT_LOOKS:
                log.warning(
                    "audit: JetStream answers again: events are kept in %s", settings.stream
                )
            kept(_captures(info))  # also after a job's event the stream did not confirm in time
            silent = 0
