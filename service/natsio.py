"""NATS helpers both sides use, the dispatcher and the workers: a low module that imports
nothing of Lifeline but the wire (see the layers in pyproject.toml's [tool.importlinter])."""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import inspect
import logging
import math
import re
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import ConnectionClosedError
from nats.errors import Error as NatsError
from nats.protocol.parser import (
    AWAITING_CONTROL_LINE,
    CRLF_SIZE,
    Parser,
)

from schemas import subjects
from schemas.wire import message_bytes

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext

log = logging.getLogger("lifeline.nats")

T = TypeVar("T")


class PublishRefused(NatsError):
    """The server refused a client's request (its user may not publish there): it went
    nowhere, and no answer will come (PublishRefusals)."""


def refused_publish(exc: Exception) -> str | None:
    """The subject of a publish the server refused, as its error names it; else None."""
    match = _REFUSED_PUBLISH.search(str(exc))
    return match.group(1) if match else None


_REFUSED_PUBLISH = re.compile(r'permissions violation for publish to "([^"]*)"', re.IGNORECASE)


class PublishRefusals:
    """A client connection's requests waiting for an answer, by subject. The server refuses a
    publish its user may not make in an -ERR that nats-py passes to the error callback alone,
    while the request waits out its timeout for an answer that never comes: the callback's
    refused() ends the requests waiting on that subject at once, as PublishRefused."""

    def __init__(self) -> None:
        self._waiting: dict[str, set[asyncio.Future[str]]] = {}  # by subject, in lower case

    def refused(self, subject: str, who: str) -> bool:
        """Tell the requests waiting on `subject` that `who` may not publish it; whether any
        waited (else the refusal was another publish's)."""
        waiting = self._waiting.get(subject.lower(), ())
        for refusal in waiting:
            if not refusal.done():
                refusal.set_result(who)
        return bool(waiting)

    async def unless_refused(self, subject: str, work: Awaitable[T]) -> T:
        """What `work` (which publishes to `subject`, then waits) returns, or PublishRefused as
        soon as the server refuses that publish (`work` cancelled, and waited for: what it
        does when cancelled, an abort say, goes out before the connection closes)."""
        refusal: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        waiting = self._waiting.setdefault(subject.lower(), set())
        waiting.add(refusal)
        doing = asyncio.ensure_future(work)
        try:
            await asyncio.wait((doing, refusal), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.discard(refusal)
            if not waiting:
                self._waiting.pop(subject.lower(), None)
            finished = doing.done()
            if not finished:
                doing.cancel()
                await asyncio.wait((doing,))
        if finished:
            return doing.result()
        raise PublishRefused(f"{refusal.result()} may not publish {subject}")


ErrorCallback = Callable[[Exception], Awaitable[None]]
# Each connection's refusals, and the error callback this module chained onto it to tell them
# (None: the callback the connection was made with tells them itself).
_TOLD: weakref.WeakKeyDictionary[Client, tuple[PublishRefusals, ErrorCallback | None]] = (
    weakref.WeakKeyDictionary()
)


def tells_refusals(nc: Client, refusals: PublishRefusals) -> None:
    """`nc` is made with an error callback that tells `refusals` (Lifeline.connect's): the
    requests on it wait on those, and nothing is chained onto it."""
    _TOLD[nc] = (refusals, None)


def publish_refusals(nc: Client) -> PublishRefusals | None:
    """The PublishRefusals that `nc`'s error callback tells, for a request to wait on. On a
    connection made without one (a user's own `nats.connect`), nats-py passes a refused
    publish's -ERR to the error callback alone (Client._process_err), and no public hook adds
    a listener: this chains onto nats-py 2.16's `Client._error_cb` once per connection (again
    only if nats-py replaced it, as its connect() does), telling the refusals first and then
    calling the callback it had with every error, unchanged. None, as before, when nats-py
    has no such coroutine callback (tests/test_client.py pins it)."""
    told = _TOLD.get(nc)
    current = getattr(nc, "_error_cb", None)
    if told is not None and (told[1] is None or current is told[1]):
        return told[0]
    if not inspect.iscoroutinefunction(current):
        return None
    refusals = told[0] if told is not None else PublishRefusals()
    chained = _telling(refusals, weakref.ref(nc), current)
    nc._error_cb = chained
    _TOLD[nc] = (refusals, chained)
    return refusals


def _telling(
    refusals: PublishRefusals, connection: weakref.ref[Client], then: ErrorCallback
) -> ErrorCallback:
    # The connection by a weak reference: the callback it holds must not keep it alive.
    async def on_error(exc: Exception) -> None:
        subject = refused_publish(exc)
        nc = connection()
        if subject is not None and nc is not None:
            refusals.refused(subject, _user_of(nc))
        await then(exc)

    return on_error


def _user_of(nc: Client) -> str:
    """The connection's NATS user as a message names it (natsopts' NatsOptions.who): by name
    when it has one and a password, given as options or in the URL."""
    user, password = nc.options.get("user"), nc.options.get("password")
    url = nc.connected_url
    if not (user and password) and url is not None:
        user, password = url.username, url.password
    return f"NATS user {user}" if user and password else "this NATS user"


async def ensure_subscribed(nc: Client) -> None:
    """Return once the server has registered every subscription made so far on `nc`.

    One flush is not enough with nats-py 2.16: flush() writes its PING straight to the
    socket, ahead of a SUB still waiting in the pending buffer, so the PONG can come back
    before the server has seen the SUB. The first flush pushes the buffer out; the second
    PING then travels behind the SUB.
    """
    await nc.flush()
    await nc.flush()


async def subscribe_to_an_inbox(nc: Client, timeout_s: float) -> str | None:
    """Subscribe to a fresh inbox of `nc`'s, wait until the server has seen it (two round
    trips, each within timeout_s), and drop it: the inbox, whose refusal (a least-privilege
    user connected without its inbox prefix) has then reached `nc`'s error callback; None
    when the server was too slow to tell."""
    inbox = nc.new_inbox()
    try:
        sub = await nc.subscribe(inbox)
        try:
            for _ in range(2):  # as ensure_subscribed, each bounded: a frozen server
                await nc.flush(timeout=timeout_s)
        finally:
            await sub.unsubscribe()
    except NatsError:
        return None
    return inbox


async def publish_checked(
    nc: Client,
    subject: str,
    payload: bytes,
    what: str,
    headers: dict[str, str] | None = None,
    urgent: bool = False,
) -> bool:
    """Publish unless the message cannot go out; a failure is logged, never raised. Goes
    through the connection's fast path when it can (see FastPath.publish for `urgent`)."""
    sent = publish_now(nc, subject, payload, what, headers, urgent)
    return sent if sent is not None else await publish_later(nc, subject, payload, what, headers)


async def publish_later(
    nc: Client,
    subject: str,
    payload: bytes,
    what: str,
    headers: dict[str, str] | None = None,
) -> bool:
    """What publish_checked does when publish_now could not send (it has checked the size):
    through nats-py's publish, which buffers through a reconnect; a failure is logged."""
    try:
        await nc.publish(subject, payload, headers=headers)
    except NatsError as exc:  # closed, draining, or reconnecting with the pending buffer full
        log.warning("could not publish %s on %s: %s", what, subject, type(exc).__name__)
        return False
    return True


def publish_now(
    nc: Client,
    subject: str,
    payload: bytes,
    what: str,
    headers: dict[str, str] | None = None,
    urgent: bool = False,
) -> bool | None:
    """`publish_checked` without waiting, for the hot path (no coroutine to make): True when
    sent through the fast path, False when refused as larger than max_payload (logged), None
    when it must go through nats-py's publish (`await publish_later` then)."""
    if headers:
        size, block = measured(payload, headers)
    else:  # measured's answer, without its call: most messages have no headers
        size, block = len(payload), None
    if size > nc._max_payload:  # the property's attribute: its call cost about 600 instructions
        log.error(
            "not publishing %s on %s: %d bytes, above max_payload %d",
            what,
            subject,
            len(payload),
            nc.max_payload,
        )
        return False
    # Positionally: keywords cost a Python call more to match.
    if fast_path(nc).publish(subject, payload, "", headers, block, urgent):
        return True
    return None


def measured(payload: bytes, headers: dict[str, str] | None) -> tuple[int, bytes | None]:
    """What a message counts against max_payload, and its header block (built once, to be sent
    as it is through FastPath.publish); None when it has no headers, or headers only nats-py's
    publish takes."""
    if not headers:
        return len(payload), None
    block = header_block(headers)
    if block is None:
        return message_bytes(payload, headers), None
    return len(block) + len(payload), block


async def stop_taking(sub: Subscription) -> None:
    """Stop a subscription's intake but handle what it has already received: `unsubscribe()`
    would drop the messages still queued in nats-py, and a request dropped there would get
    neither a reply nor an audit event. Without a usable connection nothing can be answered.

    nats-py 2.16's drain() is not enough alone: it queues its UNSUB in the pending buffer,
    then writes its flush's PING straight to the socket, ahead of it. The server answers that
    PING before it has seen the UNSUB, routes requests to the subscription until it does, and
    drain() removes the subscription on the PONG: a request that comes after it is dropped.
    So the UNSUB goes first, confirmed by ensure_subscribed's two flushes (the second PING
    travels behind it); drain() then handles what came before, and its own UNSUB, for a
    subscription the server no longer has, changes nothing."""
    nc = sub._conn
    try:
        if nc.is_connected and not nc.is_draining:
            await nc._send_unsubscribe(sub._id)
            await ensure_subscribed(nc)
        await sub.drain()
    except NatsError:  # closed or draining already
        pass


_JS_ACK = "$JS.ACK."  # the reply subject of every JetStream delivery; server statuses have none


def deliveries_keep_no_status(pull: JetStreamContext.PullSubscription) -> None:
    """Let a pull subscription's fetch() tell a delivery from a server status by where it
    came from, not by its headers: a delivery whose publisher set a `Status` header (or a
    header block with a status line) loses it as it is queued.

    nats-py's fetch() takes any message with a `Status` header for the server's: with 404,
    408 or 409 it dropped the delivery unseen (no result, no audit event, delivered again at
    every ack wait, never dead-lettered), with any other it raised (KeyError('Description'))
    and lost the whole batch with it, every pull that met it again failing too. A client may
    publish any header on the jobs' subject; JetStream's own statuses (no messages, request
    timeout, conflicts, heartbeats) come without a reply subject, a delivery always with its
    $JS.ACK one. It relies on the PullSubscription's `_sub` (a core Subscription) and that
    one's `_pending_queue`, an asyncio.Queue nats-py fills with put_nowait."""
    queue = pull._sub._pending_queue
    put = queue.put_nowait

    def put_nowait(msg: Msg) -> None:
        headers = msg.headers
        if headers and _STATUS in headers and msg.reply.startswith(_JS_ACK):
            msg.headers = {name: v for name, v in headers.items() if name != _STATUS} or None
        put(msg)

    queue.put_nowait = put_nowait  # type: ignore[method-assign]


async def close(nc: Client) -> None:
    """`nc.close()`, also while the server is gone.

    nats-py 2.16's close writes what it buffered for the server (its own UNSUBs, requests
    made during the outage) into the transport even when that transport has died. That raises
    (OSError; RuntimeError on uvloop; TypeError on Python 3.13's asyncio, whose closed
    transport has dropped its write callback) and leaves the close half done: the transport
    is not closed, the subscriptions are not cancelled, no closed callback runs. Nothing in
    that buffer can reach a server that is gone, so it is dropped first."""
    if nc.is_closed:
        return
    if not nc.is_connected:
        nc._pending = []
        nc._pending_data_size = 0
    await nc.close()
    # nats-py's close leaves each request() waiting for its answer until its timeout (a
    # minute, for a client's default): they end now, as subscriptions' next_msg() do.
    for future in list(getattr(nc, "_resp_map", {}).values()):
        if not future.done():
            future.set_exception(ConnectionClosedError())


# ---- the hot path: a contained adapter over nats-py's read and write path ------------------
#
# nats-py hands each message from its read loop to a coroutine (_process_msg), a per-
# subscription queue and task, then the callback; each publish builds its header block with a
# regex per key and wakes the flusher task through an asyncio.Queue and a Future. At 64
# requests in flight that machinery was most of what separated a dispatcher from a plain
# relay (see the README's benchmarks). The adapter below takes the common case straight
# through and leaves everything else to nats-py:
#
#   read   a parser subclass (installed per connection by `FastPath.install`) hands a complete
#          MSG, or an HMSG with a plain header block, for a subscription made with
#          `FastPath.subscribe` straight to its handler. Every other message, and every
#          other protocol line (PING, INFO, -ERR, ...), goes to nats-py's own parser, one
#          frame at a time, so the frames after it keep their order. A protocol set on the
#          socket's transport (`_DirectReader`, through asyncio's public set_protocol) does the
#          same from the socket's callback while nats-py's read loop has nothing to parse, so
#          those messages skip the loop's wake-up, a turn of the event loop.
#   write  `FastPath.publish` appends the PUB/HPUB command to nats-py's pending buffer and
#          writes the buffer once per event-loop turn (an urgent message at once, when
#          traffic is light: see `publish`); when the connection is not up,
#          it falls back to nats-py's publish (which buffers through a reconnect).
#
# It relies on these nats-py 2.16 internals, and tests/test_natsio.py fails loudly when any
# of them changes: Client._ps, ._subs, ._pending, ._pending_data_size, ._transport,
# ._max_payload (what the max_payload property returns: read on the hot path, as
# transport.py and the worker runtime do, it saves the property's call, ~600 instructions),
# ._parse_header_lines, ._send_unsubscribe (stop_taking), .stats, ._status (the
# states in which a publish goes out: _OPEN); Subscription._id, ._conn; Parser.buf, .state, .needed,
# the AWAITING_CONTROL_LINE state and CRLF_SIZE; TcpTransport._io_reader and ._io_writer; and
# of asyncio, StreamReader._buffer. (Off the hot path, `deliveries_keep_no_status` relies on
# PullSubscription._sub and Subscription._pending_queue, `_headers_made_readable` on
# Client._process_headers: the jobs' tests, and the audit listing's, fail without them.)
# The upstream change that would make it unnecessary: a synchronous per-subscription
# handler in nats-py (called from the socket's data callback, as nats.go's handlers are
# called from its reader), and a publish that schedules one write per loop turn instead of a
# Future per call.
#
# Why nats-py with this adapter and not a FastStream subscriber: on a 2-core machine a
# FastStream 0.7.8 subscriber relays at about a quarter of a plain nats-py relay, and with its
# default `max_workers=1` it handles one message at a time. FastStream writes the wire's
# AsyncAPI document (`lifeline spec`); nothing else imports it. The newer `nats-core` package
# was no option: PyPI has only a 0.0.0 placeholder (a 76-byte `__init__.py`, October 2025).

NATS_PY_VERSIONS = ("2.16.",)  # what the adapter was written and tested against
# The connection states in which nats-py publishes (is_connected and not is_draining_pubs).
_OPEN = (Client.CONNECTED, Client.DRAINING_SUBS)


class Message(msgspec.Struct, gc=False):
    """What a fast-path handler is handed: the four fields of nats-py's Msg a core
    subscription's handler reads, and nothing else (no respond(): publish to `reply`). Made
    in C, where a Msg's dataclass __init__ runs in Python: three messages of every request
    come through here. A message nats-py's own parser reads (odd headers) reaches the
    handler as nats-py's Msg, which has the same four. (gc=False: its fields hold only
    strings, bytes and a dict of strings, so it is never part of a cycle.)"""

    subject: str
    reply: str
    data: bytes
    headers: dict[str, str] | None


# What a fast-path handler is handed: a Message, or nats-py's Msg (see Message).
Received = Message | Msg


def fast_path(nc: Client) -> FastPath:
    """The connection's FastPath, installed on first use (kept on the client itself)."""
    path: FastPath | None = getattr(nc, "_lifeline_fast_path", None)
    if path is None:
        path = FastPath(nc).install()
        setattr(nc, "_lifeline_fast_path", path)  # noqa: B010 (not an attribute of Client)
    return path


class FastPath:
    """The fast read and write path of one connection."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        # Each fast-path subscription's sid and handler, by its sid as nats-server writes it.
        self._handlers: dict[bytes, tuple[int, Callable[[Received], None]]] = {}
        self._flush_scheduled = False
        # Messages the connection's last read brought for fast-path subscriptions: 1 or 0
        # when traffic comes one message at a time (see `publish`'s `urgent`).
        self.last_read = 0
        self.enabled = _supported() and isinstance(getattr(nc, "_ps", None), Parser)
        # How many requests the connection's owner works on (a dispatcher's, a worker's), once
        # it says: traffic is light, for `publish(urgent=True)`, while that is at most LIGHT.
        # Without it, light means the last read brought at most one message.
        self.in_flight: Callable[[], int] | None = None
        # The reader (of nats-py's transport) the direct reader serves: a reconnect's is new.
        self._direct_for: object = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the one `publish` last ran on
        # Messages (and their payloads' bytes) queued since the last write, for nats-py's stats.
        self._sent = self._sent_bytes = 0

    def install(self) -> FastPath:
        """Put the fast parser in front of nats-py's (after connect; reconnects keep it), and
        the direct reader in front of the connection's socket (a reconnect's new socket gets
        its own on its first read: see _FastParser.parse)."""
        if self.enabled and not isinstance(self.nc._ps, _FastParser):
            self.nc._ps = _FastParser(self.nc, self._handlers, self)
        if self.enabled:
            self.read_directly()
        return self

    def read_directly(self) -> None:
        """Put a _DirectReader between the connection's socket and nats-py's reader (a plain
        TCP or TLS connection; a WebSocket one keeps nats-py's read loop alone)."""
        transport = self.nc._transport
        parser = self.nc._ps
        if type(transport).__name__ != "TcpTransport" or not isinstance(parser, _FastParser):
            return
        writer, reader = transport._io_writer, transport._io_reader
        if writer is None or reader is None or writer.transport.is_closing():
            return
        socket_side = writer.transport
        inner = socket_side.get_protocol()
        if isinstance(inner, _DirectReader):
            return
        socket_side.set_protocol(_DirectReader(inner, parser, reader))
        self._direct_for = reader

    async def subscribe(
        self, subject: str, handler: Callable[[Received], None], queue: str = ""
    ) -> Subscription:
        """Subscribe with a plain (non-async) handler, called in order from the read loop with
        a Message. It must not block: start a task for anything that waits. Messages nats-py's
        own parser handles (odd headers) reach the same handler through the subscription, as
        nats-py's Msg (the same four fields)."""

        async def through_nats_py(msg: Msg) -> None:
            handler(msg)

        sub = await self.nc.subscribe(
            subject, queue=queue, cb=through_nats_py, pending_msgs_limit=-1
        )
        if self.enabled:
            gone = [key for key, (sid, _) in self._handlers.items() if sid not in self.nc._subs]
            for key in gone:
                del self._handlers[key]
            self._handlers[b"%d" % sub._id] = (sub._id, handler)
        return sub

    def publish(
        self,
        subject: str,
        payload: bytes,
        reply: str = "",
        headers: dict[str, str] | None = None,
        block: bytes | None = None,
        urgent: bool = False,
    ) -> bool:
        """Queue one message for the next write (once per event-loop turn, so the messages of
        every task that ran in a turn go out in one system call); False when it must go through
        nats-py's publish instead (not connected, or headers that need its checks). `block` is
        a header block built by the caller (b"NATS/1.0\r\n...\r\n\r\n", see `header_block`).

        `urgent` marks a message on a request's critical path (an attempt, a reply). When
        traffic is light (the connection's owner works on at most LIGHT requests, see
        `in_flight`; without one, the last read brought at most one message), the first one
        of a turn is written at once: nothing would share its write, and waiting costs a turn of
        the loop plus whatever its task does next (after a reply, a dispatcher's audit event
        and spans). Anything after it in the same turn (a burst of timeouts, say) waits for the
        turn's one write, as every message does when traffic is busy: one system call per
        message would cost more than the latency it saves. (Judged by the reads alone, with the
        direct reader, the dispatcher and the worker spent about a tenth more CPU per request at
        64 in flight, in bench-ab: the reads no longer told busy from idle.)"""
        nc = self.nc
        if not self.enabled or nc._status not in _OPEN:  # read as is: two properties cost more
            return False  # nats-py buffers through a reconnect, or refuses while draining
        if headers and block is None:
            block = header_block(headers)
            if block is None:
                return False
        if block is not None:
            size = len(block) + len(payload)
            cmd = b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
                subject.encode(),
                reply.encode(),
                len(block),
                size,
                block,
                payload,
            )
        else:
            cmd = b"PUB %s %s %d\r\n%s\r\n" % (
                subject.encode(),
                reply.encode(),
                len(payload),
                payload,
            )
        nc._pending.append(cmd)
        nc._pending_data_size += len(cmd)
        self._sent += 1  # into nats-py's stats once a write (see _write)
        self._sent_bytes += len(payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # The connection's loop, kept: asking for the running loop costs a system call on
            # 3.11 (getpid, to notice a fork), 0.8 % of a dispatcher's time at 64 in flight.
            loop = self._loop
            if loop is None or not loop.is_running():
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._flush)
            if urgent and (
                self.last_read <= 1 if self.in_flight is None else self.in_flight() <= LIGHT
            ):
                self._write()  # the turn's first message: the rest share one more write
        return True

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._write()

    def _write(self) -> None:
        nc = self.nc
        if self._sent:  # nats-py's out_msgs and out_bytes, counted once a write, not once a
            # message: two updates of a dict's ints cost about 1,500 instructions each time
            stats = nc.stats
            stats["out_msgs"] += self._sent
            stats["out_bytes"] += self._sent_bytes
            self._sent = self._sent_bytes = 0
        if nc._pending and nc.is_connected and nc._transport is not None:
            pending, nc._pending, nc._pending_data_size = nc._pending, [], 0
            try:
                nc._transport.writelines(pending)
            except (RuntimeError, OSError) as exc:  # the socket closed before nats-py noticed:
                # it reconnects and sends its pending buffer then, so these go back to its front.
                log.warning("write failed (%s); left to nats-py's reconnect", type(exc).__name__)
                nc._pending[:0] = pending
                nc._pending_data_size += sum(len(cmd) for cmd in pending)


# Light traffic: at most this many requests in flight, the one at hand included. Then an urgent
# message is written at once, and a dispatcher or a worker starts a request's work in the read
# that brought it (service.loop.start_now).
LIGHT = 2


def _supported() -> bool:
    try:
        version = importlib.metadata.version("nats-py")
    except importlib.metadata.PackageNotFoundError:
        return False
    return version.startswith(NATS_PY_VERSIONS)


_SAFE_HEADER = re.compile(r"[!-9;-~]+")  # a header name nats-py accepts: printable, no ':'
_safe_names: dict[str, bytes] = {}  # names seen and checked: Lifeline sends a handful


def header_block(headers: dict[str, str]) -> bytes | None:
    """The NATS/1.0 header block, or None for anything unusual (nats-py then checks it). Its
    length plus the payload's is what the message counts against max_payload."""
    parts = [b"NATS/1.0\r\n"]
    for key, value in headers.items():
        name = _safe_names.get(key)
        if name is None:
            if not _SAFE_HEADER.fullmatch(key) or len(_safe_names) > 64:
                return None
            name = _safe_names[key] = key.encode() + b": "
        if "\r" in value or "\n" in value:
            return None
        parts += (name, value.strip().encode(), b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


class Drops:
    """Messages dropped, each counted, told at most once a minute: a flood (unreadable frames,
    a full subscription's queue, asks past a backlog) must cost a count each, not a log line
    each, which held a dispatcher's reads for seconds."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.dropped = 0
        self.every_s = every_s
        self._since = 0
        self._told_at = -math.inf

    def drop(self) -> int | None:
        """Count one; the number dropped since the last telling when it is time to tell again
        (the caller says it), else None."""
        self.dropped += 1
        self._since += 1
        now = time.monotonic()
        if now - self._told_at < self.every_s:
            return None
        since, self._told_at, self._since = self._since, now, 0
        return since


class _Unreadable(Drops):
    """Messages dropped as unreadable."""

    def drop(self, exc: Exception) -> None:  # type: ignore[override]
        since = super().drop()
        if since is not None:
            log.warning(
                "dropped %d message(s) nats-py cannot read (the last: %s: %s); a client or a "
                "worker publishes bytes that are not NATS text",
                since,
                type(exc).__name__,
                str(exc)[:200],
            )


_unreadable = _Unreadable()


class _FastParser(Parser):
    """nats-py's parser, with complete MSG/HMSG for fast-path subscriptions taken first."""

    def __init__(
        self,
        nc: Client,
        handlers: dict[bytes, tuple[int, Callable[[Received], None]]],
        path: FastPath,
    ) -> None:
        super().__init__(nc)
        self.handlers = handlers
        self.path = path
        self.busy = False  # nats-py's read loop is in parse(): what it holds goes first

    async def parse(self, data: bytes = b"") -> None:
        """Frames in the order they came: fast-path messages to their handlers, and each other
        frame to nats-py's parser alone. Handed the rest of the buffer, nats-py would queue the
        fast-path messages after it for their subscription's task, and the next read's would
        overtake them (a stream's chunks out of order, an abort before its request)."""
        path = self.path
        if path._direct_for is not getattr(self.nc._transport, "_io_reader", None):
            path.read_directly()  # a new socket: a reconnect's
        self.busy = True
        try:
            await self._parse(data)
        finally:
            self.busy = False

    async def _parse(self, data: bytes) -> None:
        self.buf.extend(data)
        self.path.last_read = 0
        while self.buf:
            if self.state == AWAITING_CONTROL_LINE:
                taken = self._take()
                if taken:
                    del self.buf[:taken]
                    continue
                end = self._frame_end()
            else:  # nats-py holds a message's control line: its payload and CRLF complete it
                need = self.needed + CRLF_SIZE
                end = need if len(self.buf) >= need else None
            if end is None or not await self._nats_py_parse(end):
                return  # the rest of the frame is still on its way

    def _frame_end(self) -> int | None:
        """Where the buffer's first frame ends; None while it has not all arrived."""
        buf = self.buf
        end = buf.find(b"\r\n")
        if end < 0:  # a control line still coming (an INFO can be long: nats-py waits too)
            return None
        if not buf.startswith((b"MSG ", b"HMSG ")):
            return end + 2  # PING, PONG, INFO, +OK, -ERR: one line
        try:
            total = int(bytes(buf[:end]).split()[-1])
        except (ValueError, IndexError):
            return end + 2  # malformed: nats-py's parser says so
        frame = end + 2 + total + CRLF_SIZE
        return frame if len(buf) >= frame else None

    async def _nats_py_parse(self, end: int) -> bool:
        """nats-py's parser on the buffer's first `end` bytes alone; whether it took any.

        A message nats-py cannot read (a subject, reply subject or status line that is not
        UTF-8, a header block cut short: nats-server passes on whatever a client publishes)
        is dropped here: raised, it would end nats-py's read loop for good, and the process
        would go on, connected and ready by every probe, reading nothing more."""
        rest = self.buf
        self.buf = rest[:end]
        del rest[:end]
        message = self.state != AWAITING_CONTROL_LINE or self.buf.startswith((b"MSG ", b"HMSG "))
        # A whole HMSG: kept, to be read again with a header block nats-py can read.
        frame = bytes(self.buf) if self.buf.startswith(b"HMSG ") else None
        try:
            await super().parse()
        except Exception as exc:
            if not message:
                raise
            self.state, self.needed, self.header_needed = AWAITING_CONTROL_LINE, 0, 0
            self.buf.clear()  # the rest of its frame
            again = await _headers_made_readable(self.nc, frame) if frame is not None else None
            if again is None or not await self._parsed_alone(again):
                _unreadable.drop(exc)
        finally:
            left, self.buf = self.buf, rest
            if left:  # not expected: it takes whole frames; what it left waits for more bytes
                self.buf[:0] = left
        return len(left) < end

    async def _parsed_alone(self, frame: bytes) -> bool:
        """nats-py's parser on this one whole frame (the buffer otherwise empty): whether it
        read it."""
        self.buf = bytearray(frame)
        try:
            await super().parse()
        except Exception:  # noqa: BLE001 - unreadable still: the caller drops it, saying so
            self.state, self.needed, self.header_needed = AWAITING_CONTROL_LINE, 0, 0
            self.buf.clear()
            return False
        return True

    def _take(self, buf: bytes | bytearray | None = None) -> int:
        """Handle the complete fast-path messages at the front of `buf` (by default the
        parser's buffer); bytes used. One loop, no call per message but the handler's and
        the Message's: at 64 requests in flight this runs for three messages of every request."""
        if buf is None:
            buf = self.buf
        pos, nc, handlers, path = 0, self.nc, self.handlers, self.path
        whole = type(buf) is bytes  # else a bytearray: its pieces are copied out as bytes
        # nats-py's in_msgs and in_bytes counted once a call, not once a message: two updates
        # of a dict's ints (past the small ones' cache) cost about 1,500 instructions each time.
        taken = taken_bytes = 0
        try:
            while True:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    return pos
                # Split as nats-server writes it, on single spaces: split() would also split
                # a (reply) subject at the \x0b or \x0c a client may put in it, and answer
                # elsewhere.
                line = (buf[pos:end] if whole else bytes(buf[pos:end])).split(b" ")
                parts, kind = len(line), line[0]
                if kind == b"MSG" and (parts == 5 or parts == 4):
                    headered, reply = False, line[3] if parts == 5 else b""
                elif kind == b"HMSG" and (parts == 6 or parts == 5):
                    headered, reply = True, line[3] if parts == 6 else b""
                else:
                    return pos  # anything else, malformed ones too: nats-py's parser decides
                # By the sid as nats-server writes it: an int() of bytes costs more than this.
                taker = handlers.get(line[2])
                if taker is None:
                    return pos
                sid, handler = taker
                if sid not in nc._subs:  # unsubscribed: nats-py drops what still comes for it
                    del handlers[line[2]]
                    return pos
                try:
                    total = int(line[-1])
                    hsize = int(line[-2]) if headered else 0
                except ValueError:
                    return pos
                start = end + 2
                stop = start + total
                if len(buf) < stop + 2:
                    return pos  # the rest is still on its way
                headers = None
                if headered:
                    if not 0 <= hsize <= total:
                        return pos
                    try:
                        headers = _plain_headers(nc, bytes(buf[start : start + hsize]))
                    except ValueError:  # UnicodeDecodeError too: nats-py's parser decides
                        return pos
                    if headers is None:
                        return pos  # headers for fast_mail_parser: nats-py's parser decides
                    headers = headers or None
                data = buf[start + hsize : stop] if whole else bytes(buf[start + hsize : stop])
                try:
                    subject, reply_to = line[1].decode(), reply.decode()
                except UnicodeDecodeError:  # nats-server passes on any bytes a publisher
                    # chose: kept as surrogates, so a reply subject no subject may be is
                    # refused, and audited
                    subject = line[1].decode(errors="surrogateescape")
                    reply_to = reply.decode(errors="surrogateescape")
                pos = stop + 2
                taken += 1
                taken_bytes += len(data)
                path.last_read += 1
                try:
                    handler(Message(subject, reply_to, data, headers))
                except Exception:  # a handler's bug must not stop the connection's read loop
                    log.exception("handler of %s failed", subject)
        finally:
            if taken:
                stats = nc.stats
                stats["in_msgs"] += taken
                stats["in_bytes"] += taken_bytes


class _DirectReader(asyncio.Protocol):
    """Stands between a connection's socket and nats-py's StreamReaderProtocol. While nats-py's
    read loop has nothing left to parse (nothing buffered for it, not in the middle of a
    parse), the complete fast-path messages at the front of what the socket brings go to their
    handlers from the socket's own callback: no wake-up of the read loop's task, a turn of the
    event loop sooner (a dispatcher gets one per request and one per worker's reply, a worker
    one per call). The first frame that is not one, and everything after it until the read
    loop has caught up, goes to nats-py's reader as before, so frames keep their order."""

    def __init__(
        self, inner: asyncio.BaseProtocol, parser: _FastParser, reader: asyncio.StreamReader
    ) -> None:
        self.inner = inner
        self.parser = parser
        self.reader = reader

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if (
            parser.busy
            or parser.buf
            or parser.state != AWAITING_CONTROL_LINE
            or self.reader._buffer
        ):
            self.inner.data_received(data)  # type: ignore[attr-defined]
            return
        parser.path.last_read = 0
        try:  # read where it lies: slices of bytes are one copy, of the buffer two
            taken = parser._take(data)
        except Exception:  # not expected (_take guards its handlers): nats-py's parser decides
            log.exception("the fast path failed on a read; left to nats-py's parser")
            taken = 0
        if taken < len(data):
            self.inner.data_received(data[taken:] if taken else data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def __getattr__(self, name: str) -> object:  # anything else a transport may ask of it
        return getattr(self.inner, name)


def _plain_headers(nc: Client, block: bytes) -> dict[str, str] | None:
    """A header block parsed as nats-py parses it, a status line's too (nats-server's 503 for
    no responders; `Status` and `Description`, as nats-py names them), but never raising:
    nats-py decodes a status line strictly, and a client may publish any bytes in one, so a
    request carrying one was dropped, unanswered and unaudited, or handled after the frames
    that came behind it. None only when fast_mail_parser is installed (nats-py's parser
    decides). {} for a block that is no NATS header block at all, which nats-py reads from its
    11th byte on (one shorter than that raised IndexError in it, and the message, a whole one,
    was dropped): the message has no headers."""
    if not block.startswith(b"NATS/1.0"):
        return {}
    if _HAS_EMAIL_PARSER:
        return None
    headers: dict[str, str] = {}
    lines = block[10:]
    if block[8:9] == b" ":  # "NATS/1.0 503[ description]\r\n", header lines may follow
        first, _, lines = block[9:].partition(b"\r\n")
        status, description = first[:3], first[4:]
        if status.strip().isdigit():  # nats-py's rule: its 3 characters, if a number
            headers[_STATUS] = status.strip().decode()
        if description:
            headers[_DESCRIPTION] = description.decode("utf-8", "replace")
    for line in lines.split(b"\r\n"):
        if line:
            raw, sep, value = line.partition(b":")
            name = _names_read.get(raw) if sep else None
            if name is None:
                stripped = raw.strip()
                if not sep or _TOKEN.fullmatch(stripped) is None:  # nats-py's own rules decide
                    return {**headers, **nc._parse_header_lines(lines)} or None
                name = stripped.decode()
                if len(_names_read) < _KNOWN_NAMES + 64:
                    _names_read[raw] = name
            try:  # decode()'s arguments cost about 300 instructions a line: given only when needed
                headers[name] = value.strip().decode()
            except UnicodeDecodeError:
                headers[name] = value.strip().decode("utf-8", "replace")
    return headers


async def _headers_made_readable(nc: Client, frame: bytes) -> bytes | None:
    """An HMSG frame nats-py could not read, with its header block written again as one it
    reads: the headers `_plain_headers` reads in it (a status line's as `Status` and
    `Description` lines), values not UTF-8 replaced, or none at all for a block that is no
    NATS header block. None when its header block is not what nats-py failed on (read again,
    the message could be handed on twice) or its control line is (a subject, a reply subject
    not UTF-8: a message for somewhere else cannot be made readable without changing where).

    nats-server passes on any header block a client publishes, and JetStream stores it: a job
    whose block was cut short (`NATS/1.0` without its line end: nats-py's IndexError) was
    dropped as unreadable at every delivery, so never answered, audited nor dead-lettered,
    and delivered again for good."""
    end = frame.find(b"\r\n")
    line = frame[:end].split(b" ")  # HMSG <subject> <sid> [reply] <header size> <total size>
    if len(line) not in (5, 6):
        return None
    try:
        b" ".join(line[1:-2]).decode()  # where it goes, as it came, or not at all
        hsize, total = int(line[-2]), int(line[-1])
    except (UnicodeDecodeError, ValueError):
        return None
    if not 0 <= hsize <= total:
        return None
    body = frame[end + 2 : end + 2 + total]
    if await _reads_headers(nc, body[:hsize]):
        return None
    try:
        headers = _plain_headers(nc, body[:hsize])
    except Exception:  # noqa: BLE001 - nats-py's own rules (odd names) may raise: unreadable
        return None
    if headers is None:  # fast_mail_parser reads them: nats-py's parser decides
        return None
    lines = [b"NATS/1.0\r\n"]
    for name, value in headers.items():
        if _SAFE_HEADER.fullmatch(name) is None:
            continue  # a name nats-py would read otherwise: left out rather than guessed
        lines += (
            name.encode(),
            b": ",
            value.replace("\r", " ").replace("\n", " ").encode(),
            b"\r\n",
        )
    block = b"".join([*lines, b"\r\n"])
    data = body[hsize:]
    line[-2], line[-1] = b"%d" % len(block), b"%d" % (len(block) + len(data))
    return b" ".join(line) + b"\r\n" + block + data + b"\r\n"


async def _reads_headers(nc: Client, block: bytes) -> bool:
    """Whether nats-py reads this header block (its parser's own step for one)."""
    try:
        await nc._process_headers(block)
    except Exception:  # noqa: BLE001 - any failure of it is the answer
        return False
    return True


_STATUS, _DESCRIPTION = "Status", "Description"  # nats.js.api.Header's, as nats-py sets them
_TOKEN = re.compile(rb"[!-~]+")  # a name nats-py keeps as it is: printable ASCII, no space
# Header names seen and checked: Lifeline reads a handful, known from the start, so names a
# client makes up (at most 64 kept) never push its own out.
_names_read: dict[bytes, str] = {
    value.encode(): value
    for name, value in vars(subjects).items()
    if isinstance(value, str) and value[:1].isupper() and "-" in value and " " not in value
} | {b"traceparent": "traceparent", b"tracestate": "tracestate"}


_HAS_EMAIL_PARSER = importlib.util.find_spec("fast_mail_parser") is not None


_KNOWN_NAMES = len(_names_read)
