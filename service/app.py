"""Wiring: connect to NATS and start a dispatcher, a worker, or all of them.

Each component gets its own NATS connection, exactly as if it ran in its own process:
`lifeline run` is the same thing as one `lifeline dispatcher` plus one `lifeline worker`
per provider, just in one process for convenience.

Connecting loads NATS alone: the dispatcher, the workers (their HTTP clients, every provider
kind) and telemetry are imported by the start_* functions that start them, so that a client
command (`lifeline ask`, `status`, `health`) starts without them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, TypeVar

import nats
from nats.aio.client import Client, ServerVersion

from schemas import subjects
from service import logs, natsio
from service.discovery import Responder, dispatcher_endpoints, worker_endpoints
from service.embedded import redact_url
from service.natsopts import NatsOptions, server_list

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from opentelemetry.sdk.metrics import MeterProvider

    from service.config import Config
    from service.dispatcher import Dispatcher
    from service.telemetry import Tracing
    from workers.base import Provider
    from workers.runtime import WorkerRuntime

log = logging.getLogger("lifeline")

T = TypeVar("T")


class NatsUnreachable(RuntimeError):
    pass


class _CommandConnection(Client):
    """A client command's connection (connect(wait_for_server=False)): a request whose publish
    the server refuses raises PublishRefused as soon as the server says so, and the client's
    streams and jobs on it (`ask --stream`) NotPermitted, from the same refusals
    (natsio.tells_refusals). nats-py waits out the request's timeout (the server drops the
    message and says so only in an error), and the command then blamed the dispatcher:
    `lifeline ask` as the operator, 32 s later."""

    def __init__(self) -> None:
        super().__init__()
        self.refusals = natsio.PublishRefusals()

    async def request(  # type: ignore[override]
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float = 0.5,
        old_style: bool = False,
        headers: dict[str, str] | None = None,
    ) -> Msg:
        asking = super().request(subject, payload, timeout, old_style, headers)
        return await self.refusals.unless_refused(subject, asking)


# The NATS connections this process has made (connect() below): a serving command stopped
# before its first has taken nothing, so has nothing to finish (service/cli.py's _Stop).
connections_made = 0


class ConnectionWatch:
    """Tells a component whose NATS connection nats-py gave up on (closed, not reconnecting).

    nats-py closes a connection for good on some server errors (a publish over max_payload,
    an authorization violation) and never reconnects it; a process left like that looks
    alive to its supervisor while it serves nothing. So the component stops and the process
    exits non-zero, and compose, systemd or Kubernetes start a fresh one.

    A credential the server stopped accepting can also show up while reconnecting (the
    connection dropped first, then every CONNECT is refused); nats-py would retry that
    forever. As the Go client does, the same refusal twice in a row closes the connection.
    """

    AUTH_REFUSALS_TO_GIVE_UP = 2

    def __init__(self, name: str) -> None:
        self.name = name
        self.lost = asyncio.Event()
        self.closing = False  # set by Component.stop: our own close is not a loss
        self.nc: Client | None = None
        self.options: NatsOptions | None = None  # set by connect(): names a refused credential
        self._auth_refusals = 0
        self._giving_up: asyncio.Future[None] | None = None
        self.refused_subjects: list[str] = []  # subscriptions the server refused (at most 16)
        self.probing: frozenset[str] = frozenset()  # must_be_allowed_to_publish's, lower case
        self.refused_probes: set[str] = set()  # those of them the server refused

    def probe_refused(self, exc: Exception) -> bool:
        """Whether a refused publish was one of must_be_allowed_to_publish's (kept for it)."""
        subject = _refused_publish(exc).lower()
        if subject not in self.probing:
            return False
        self.refused_probes.add(subject)
        return True

    def on_error(self, exc: Exception) -> None:
        refused = _refused_subscription(exc)
        if refused is not None and len(self.refused_subjects) < 16:
            self.refused_subjects.append(refused)
        if not _is_auth_refusal(exc):
            return
        self._auth_refusals += 1
        if self._auth_refusals >= self.AUTH_REFUSALS_TO_GIVE_UP and self.nc is not None:
            # Not awaited: nats-py calls this from its reconnect task, which close() cancels.
            self._giving_up = asyncio.ensure_future(self._give_up(self.nc))

    async def wait_lost(self) -> str:
        """Until the connection is gone for good; returns the component's name. nats-py's
        closed callback says so, but its close can stop at a dead socket before calling it;
        so the state is checked every second too. So is its read loop: on an error it does
        not expect (a MemoryError under a memory limit, say) it logs it and stops reading,
        while the connection stays open and looks connected: a process that hears nothing
        more, left alone by every supervisor. Two checks in a row find it stopped before it
        counts (a reconnect replaces it in between)."""
        deaf = 0
        while not self.lost.is_set():
            try:
                await asyncio.wait_for(self.lost.wait(), 1.0)
            except TimeoutError:
                nc = self.nc
                if nc is not None and nc.is_closed:
                    await self.on_closed()
                deaf = deaf + 1 if nc is not None and _not_reading(nc) else 0
                if deaf >= 2 and not self.closing:
                    log.error(
                        "%s: the NATS client stopped reading its connection (see the error "
                        "before this line: out of memory?); stopping so a supervisor can "
                        "restart it",
                        self.name,
                    )
                    self.lost.set()
        return self.name

    async def _give_up(self, nc: Client) -> None:
        try:
            await nc.close()
        except Exception as exc:  # noqa: BLE001 - closing a dead socket raises what it likes
            # nats-py then skips its closed callback (its close stops at the socket).
            log.debug("%s: closing the refused connection: %r", self.name, exc)
        await self.on_closed()

    async def on_reconnected(self) -> None:
        self._auth_refusals = 0
        # Said, so a log whose last lines were a failover's refusals shows it came back.
        where = self.nc.connected_url if self.nc is not None else None
        shown = redact_url(where.geturl()) if where is not None else "its server"
        log.info("%s: reconnected to NATS at %s", self.name, shown)

    async def on_closed(self) -> None:
        if self.closing or self.lost.is_set():
            return
        error = self.nc.last_error if self.nc is not None else None
        if error is not None and _is_auth_refusal(error) and self.options is not None:
            # Which credential, and what to do, as a refusal at start-up says.
            refused = _refusal(self.options, error).removesuffix("; not retrying")
            log.error(
                "%s: %s; the NATS connection is gone for good: stopping so a supervisor can "
                "restart it",
                self.name,
                refused,
            )
            self.lost.set()
            return
        why = f"{type(error).__name__}: {error}" if error is not None else "closed"
        log.error(
            "%s: the NATS connection is gone for good (%s); "
            "stopping so a supervisor can restart it",
            self.name,
            why,
        )
        self.lost.set()


def _not_reading(nc: Client) -> bool:
    """Whether nats-py's read loop has ended on a connection that is still connected (its
    `_reading_task`: pinned by a test in tests/test_replica_death.py)."""
    reading = getattr(nc, "_reading_task", None)
    return nc.is_connected and reading is not None and reading.done()


async def connect(
    url: NatsOptions | str,
    name: str,
    *,
    wait_for_server: bool = True,
    watch: ConnectionWatch | None = None,
) -> Client:
    """Connect to NATS (a URL, or NatsOptions with credentials, TLS, an inbox prefix).
    Services wait for the server (logging each retry), clients give up fast. A server that
    refuses the credentials or the TLS handshake is an error at once, not retried forever;
    NatsOptionError (a ValueError) before connecting for a missing or unreadable file."""
    options = url if isinstance(url, NatsOptions) else NatsOptions(servers=url)
    kwargs = options.connect_kwargs()
    connected = False
    # A cluster's list is tried server by server, in turn: one refusing is no outage until
    # every one of them has refused in a row (one reachable server is enough to start).
    servers = len(kwargs["servers"])
    refused_in_a_row = 0
    told_undiscoverable = False
    inbox_refused: list[str] = []  # a client's check of its inbox, below
    checking_inbox = not wait_for_server
    # A service says so; a client (ask, audit --follow, ...) as before, only when debugging.
    slow = _SlowConsumerDrops(name, logging.WARNING if wait_for_server else logging.DEBUG)
    lost_answers = _RefusedAnswers(name)

    async def on_error(exc: Exception) -> None:
        nonlocal told_undiscoverable, refused_in_a_row
        if isinstance(exc, nats.errors.SlowConsumerError):  # first: one per message dropped
            slow.drop(exc)
            return
        if not connected and (_is_auth_refusal(exc) or _is_tls_refusal(exc)):
            raise _Refused(exc)  # out of nats-py's first-connect loop, which would retry
        if checking_inbox and (refused := _refused_subscription(exc)) is not None:
            inbox_refused.append(refused.lower())  # said by the check, as the command's error
            return
        if _is_service_api_refusal(exc):  # one per $SRV subject: say it once, and what to do
            if not told_undiscoverable:
                told_undiscoverable = True
                log.warning(
                    "%s: this NATS user may not subscribe to the NATS service API ($SRV), so "
                    "`lifeline health` and `nats micro ls` will not find it; it serves all the "
                    "same. `lifeline nats-config` gives each role its $SRV subjects (a gateway: "
                    "--gateways NAME)",
                    name,
                )
            return
        if _is_inbox_refusal(exc):  # every answer to this connection would go unseen
            if watch is not None:  # a dispatcher stops at start (must_have_subscribed)
                watch.on_error(exc)
            log.warning(
                "%s: the NATS server refused this connection's subscription to its inbox "
                "(%s), so no answer can reach it. A least-privilege user connects with its "
                "inbox prefix: set NATS_INBOX_PREFIX=_INBOX.<user> (or --nats-inbox-prefix; "
                "a dispatcher's is %s, its default)",
                name,
                exc,
                subjects.DISPATCHER_INBOX_PREFIX,
            )
            return
        if _is_publish_refusal(exc) and watch is not None and watch.probe_refused(exc):
            return  # a start-up check's own: it says what is wrong, and what to grant
        if _is_publish_refusal(exc) and isinstance(nc, _CommandConnection):  # its own request
            subject = _refused_publish(exc)
            refused = f"{options.who} may not publish {subject}"
            nc.refusals.refused(subject, options.who)
            log.warning(
                "%s: %s: its role does not allow it (`lifeline nats-config`). `lifeline "
                "status`, `audit` and `health` are the operator's; the jobs stream is made by "
                "the first dispatcher (start one first)",
                name,
                refused,
            )
            return
        if _is_publish_refusal(exc):  # an answer to a reply subject this user may not use
            lost_answers.drop(exc)
            return
        refused_in_a_row += not connected
        outage = wait_for_server and (connected or refused_in_a_row >= servers)
        if outage and not connected and options.shown not in _told_waiting:
            _told_waiting.add(options.shown)  # once a process, not at each retry
            log.warning(
                "%s: cannot reach NATS at %s (%s); waiting for it, trying again every 2 s: "
                "start nats-server there, or use `lifeline run` with no NATS URL for an "
                "embedded one, or check the URL (--nats-url, $NATS_URL, the config's [nats])",
                name,
                options.shown,
                options.origin.get("url", "the default"),
            )
        # A service logs each retry; a client (ask, status, ...) says once why it gave up.
        log.log(
            logging.WARNING if outage else logging.DEBUG,
            "%s: NATS at %s: %s: %s%s",
            name,
            options.shown,
            type(exc).__name__,
            exc or "retrying",
            _CLOSED_BY_SERVER if connected and isinstance(exc, _CLOSES) else "",
        )
        if watch is not None:
            watch.on_error(exc)

    nc = Client() if wait_for_server else _CommandConnection()
    try:
        await nc.connect(
            **kwargs,
            name=name,
            connect_timeout=5,
            # nats-py retries the first connect too; -1 waits for a server that starts later.
            max_reconnect_attempts=-1 if wait_for_server else 1,
            reconnect_time_wait=2 if wait_for_server else 0.2,
            error_cb=on_error,
            closed_cb=watch.on_closed if watch is not None else None,
            reconnected_cb=watch.on_reconnected if watch is not None else None,
        )
    except _Refused as refused:
        await _abandon(nc, watch)
        raise NatsRefused(_refusal(options, refused.error)) from None
    except Exception as exc:  # noqa: BLE001 - nats-py raises several unrelated types here
        await _abandon(nc, watch)
        if _is_auth_refusal(exc) or _is_tls_refusal(exc):
            raise NatsRefused(_refusal(options, exc)) from None
        raise NatsUnreachable(
            f"cannot reach NATS at {options.shown} ({type(exc).__name__}: {exc}). "
            + _unreachable_hint(options)
        ) from None
    connected = True
    if isinstance(nc, _CommandConnection):  # the client's requests on it wait on these too
        natsio.tells_refusals(nc, nc.refusals)
    global connections_made
    connections_made += 1
    if watch is not None:
        watch.nc = nc
        watch.options = options
    if checking_inbox:
        await _must_reach_its_inbox(nc, options, inbox_refused)
        checking_inbox = False
    return nc


# The NATS URLs this process said it waits for (app.connect): said once, not per connection.
_told_waiting: set[str] = set()


_INBOX_CHECK_S = 2.0  # each round trip of a client's check of its inbox, at most


async def _must_reach_its_inbox(nc: Client, options: NatsOptions, refused: list[str]) -> None:
    """NatsRefused, the connection closed, when the server refuses a client's subscription to
    its inbox, found before the client sends anything: every answer to it (a reply, a
    JetStream or $SRV answer) would be dropped, while what it sends would still run (a
    dispatcher paying a provider for an answer nobody may read), and it would wait out its
    timeout. A server slow to confirm it is left to the command's own request."""
    inbox = await natsio.subscribe_to_an_inbox(nc, _INBOX_CHECK_S)
    if inbox is None or inbox.lower() not in refused:
        return
    await _abandon(nc, None)

    prefix = subjects.client_inbox(options.user) if options.user and options.password else None
    raise NatsRefused(
        f"NATS at {options.shown} refused this connection's subscription to its inbox "
        f"({inbox.rpartition('.')[0]}.>), so no answer could reach it; nothing was sent. A "
        "least-privilege user connects with its inbox prefix: set "
        f"NATS_INBOX_PREFIX={prefix or '_INBOX.<user>'} (or --nats-inbox-prefix, [nats] "
        "inbox_prefix)"
    )


class _SlowConsumerDrops(natsio.Drops):
    """Messages nats-py dropped for a subscription's full queue (a flood on llm.jobs.result or
    $SRV.*). nats-py calls the error callback for each one, in its read: logging each (a
    LogRecord, and the checks of on_error, every one a str() of the error) cost ~30 us, and a
    flood of 450,000 on llm.jobs.result held the dispatcher's reads for seconds: its requests
    answered 15 s late, its health bucket and results reads timed out."""

    def __init__(self, name: str, level: int) -> None:
        super().__init__()
        self.name, self.level = name, level

    def drop(self, exc: nats.errors.SlowConsumerError) -> None:  # type: ignore[override]
        since = super().drop()
        if since is not None:
            log.log(
                self.level,
                "%s: dropped %d message(s) that came faster than their subscription handled "
                "them (the last on %s); their senders get no answer",
                self.name,
                since,
                exc.subject,
            )


class _RefusedAnswers(natsio.Drops):
    """Answers (replies, stream events, heartbeats) the server refused: a client may publish a
    request whose reply subject its publish rights do not cover, and the server then refuses
    each answer sent there. A warning each let one client make a dispatcher write lines as
    fast as it sent requests (five a second per slow request with 200 ms heartbeats)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def drop(self, exc: Exception) -> None:  # type: ignore[override]
        since = super().drop()
        if since is not None:
            log.warning(
                "%s: the NATS server refused a publish (%s; %d refused since the last such "
                "warning, at most one a minute): an answer sent there is lost. A client whose "
                "reply subject is outside its own inbox gets no answer when Lifeline's users "
                "may publish only to inboxes (`lifeline nats-config`): ask with a reply "
                "subject from nc.new_inbox()",
                self.name,
                exc,
                since,
            )


# How a connection the server closes shows in nats-py, and what that can mean.
_CLOSES = (ConnectionResetError, nats.errors.UnexpectedEOF)
_CLOSED_BY_SERVER = (
    " (the server closed the connection: it restarted, or this process fell behind by more "
    "than the server's max_pending and was cut as a slow consumer, which drops the messages "
    "the server held for it; see the README's Limits and overload)"
)


def _unreachable_hint(options: NatsOptions) -> str:
    """What to try. Over TLS without a client certificate, a server that verifies clients may
    reset the connection after the handshake instead of sending its alert (TLS 1.3 sends it
    after the client thinks the handshake is done), so say that too."""
    hint = (
        "Start one, set NATS_URL or --nats-url, "
        "or use `lifeline run`, which starts an embedded server"
    )
    tls = options.uses_tls_files or "tls://" in options.servers
    if tls and not options.cert:
        hint += "; if the server verifies clients (mutual TLS), set --nats-cert and --nats-key"
    return hint


class NatsRefused(NatsUnreachable):
    """The server refused the credentials or the TLS handshake: retrying would not help."""


class _Refused(Exception):
    def __init__(self, error: Exception) -> None:
        self.error = error


async def _abandon(nc: Client, watch: ConnectionWatch | None) -> None:
    """Close a connection that never connected, without reporting it lost."""
    if watch is not None:
        watch.closing = True
    try:  # after a failed TLS handshake the socket's close is never confirmed: do not wait
        await asyncio.wait_for(nc.close(), 0.5)
    except Exception as exc:  # noqa: BLE001 - closing a half-open socket raises what it likes
        log.debug("closing a connection that never connected: %r", exc)


def _refusal(options: NatsOptions, exc: Exception) -> str:
    if _is_tls_refusal(exc):
        files = ", ".join(
            f"{what} {path} ({options.where(key)})"
            for key, what, path in (
                ("ca", "CA", options.ca),
                ("cert", "client certificate", options.cert),
            )
            if path
        )
        return (
            f"NATS at {options.shown}: the TLS handshake failed ({exc}); "
            + (f"with {files}. " if files else "with the system's CAs: set --nats-ca. ")
            + "Check the server's certificate and, if it verifies clients, "
            "--nats-cert and --nats-key"
        )
    if options.auth() == "no credentials":
        return (
            f"NATS at {options.shown} wants credentials ({exc}): set --nats-creds, "
            "--nats-nkey, --nats-user or --nats-token, a [nats] table or $NATS_CREDS, ... "
            "(README: Connecting to a secured NATS)"
        )
    return (
        f"NATS at {options.shown} refused {options.auth()} ({exc}): check them "
        "(README: Connecting to a secured NATS); not retrying"
    )


def servers(url: str) -> list[str]:
    """A NATS URL, or a comma-separated list of a cluster's URLs (service.natsopts)."""
    return server_list(url)


def _is_tls_refusal(exc: Exception) -> bool:
    """A certificate the client or the server does not accept (not a dropped connection)."""
    return isinstance(exc, ssl.SSLCertVerificationError) or (
        isinstance(exc, ssl.SSLError) and "certificate" in str(exc).lower()
    )


def _is_service_api_refusal(exc: Exception) -> bool:
    """The server refused a subscription to a $SRV subject (nats-py says it in lower case)."""
    text = str(exc).lower()
    return "permissions violation for subscription to" in text and '"$srv.' in text


def _refused_subscription(exc: Exception) -> str | None:
    """The subject of a subscription the server refused, as its error names it; else None."""
    match = re.search(
        r'permissions violation for subscription to "([^"]*)"', str(exc), re.IGNORECASE
    )
    return match.group(1) if match else None


def _refused_publish(exc: Exception) -> str:
    """The subject of a publish the server refused, as its error names it."""
    subject = natsio.refused_publish(exc)
    return subject if subject is not None else str(exc)


def must_have_subscribed(
    watch: ConnectionWatch,
    who: str,
    subjects_: Sequence[str],
    fix: str = "connect it with its own role's credentials (`lifeline nats-config` gives each "
    "role its subjects)",
) -> None:
    """NatsRefused when the server refused one of the subscriptions a component's work comes
    on (its flush, ensure_subscribed, has had the server's answer): one left running would be
    ready by every probe and `lifeline health`, and serve nothing (another role's
    credentials, copied by mistake). A subject ending in `.>` stands for every subject under
    it, as in NATS: an inbox's subscription is <prefix>.<random id>.>."""
    wanted = [x.lower() for x in subjects_]
    refused = [
        s
        for s in watch.refused_subjects
        if any(
            s.lower() == w or (w.endswith(".>") and s.lower().startswith(w[:-1])) for w in wanted
        )
    ]
    if refused:
        raise NatsRefused(
            f"{who}: this NATS user may not subscribe to {', '.join(refused)}, where its work "
            f"comes: {fix}"
        )


_SMALL_PAYLOAD = 64 * 1024  # a max_payload below this is said at a dispatcher's start


async def must_have_its_inbox(
    nc: Client, watch: ConnectionWatch, who: str, prefix: str, fix: str
) -> None:
    """NatsRefused at once when the server refuses subscriptions under this connection's inbox
    prefix (as must_have_subscribed), found by making one and dropping it. A server slow to
    confirm it is left to the checks after the component started."""
    try:
        sub = await nc.subscribe(f"{prefix}.{nc.new_inbox().rpartition('.')[2]}.>")
        try:
            await natsio.ensure_subscribed(nc)
        finally:
            await sub.unsubscribe()
    except nats.errors.Error:  # the connection slow or gone again: the later checks decide
        return
    must_have_subscribed(watch, who, (prefix + ".>",), fix)


# NATS message tracing (nats-server 2.11): a message with both headers is checked against its
# publisher's permissions as any other, then delivered to no subscriber, stream or other server;
# only its trace goes out, to Nats-Trace-Dest, which the publisher must be allowed to publish
# to as well (checked first: refused there, the message is not checked further).
_TRACE_DEST = "Nats-Trace-Dest"
_TRACE_ONLY = "Nats-Trace-Only"
_TRACE_ONLY_SINCE = (2, 11)


async def must_be_allowed_to_publish(
    nc: Client, watch: ConnectionWatch, who: str, subjects_: Sequence[str], fix: str
) -> None:
    """NatsRefused when this NATS user may not publish to one of `subjects_`, where a
    component's work goes. The server refuses such a publish with an error and drops the
    message, and the connection stays up: a gateway refused llm.complete was ready by every
    probe while each request waited out its timeout for a 504. A publish is the only way to
    ask, so each subject is sent a trace-only message (above), which reaches nobody; its trace
    goes to a fresh inbox of this connection's, where nobody listens. A user that may not
    publish there cannot be checked (a warning says so), nor can a server before 2.11, which
    would deliver the message as any other."""
    version = nc.connected_server_version
    if not _traces_only(version):
        log.info("%s: NATS server %s: its publish rights are not checked (2.11+)", who, version)
        return
    trace_to = nc.new_inbox()
    headers = {_TRACE_DEST: trace_to, _TRACE_ONLY: "true"}
    watch.probing = frozenset(s.lower() for s in (*subjects_, trace_to))
    try:
        for subject in subjects_:
            await nc.publish(subject, b"", headers=headers)
        await natsio.ensure_subscribed(nc)  # its flushes come back after the server's errors
    except nats.errors.Error as exc:  # slow to answer (a fleet restarting), or gone again
        log.warning("%s: its publish rights were not checked (%s)", who, type(exc).__name__)
        return
    finally:
        watch.probing = frozenset()
        refused, watch.refused_probes = watch.refused_probes, set()
    if trace_to.lower() in refused:
        log.warning(
            "%s: its rights to publish to %s were not checked: this NATS user may not publish "
            "to its own inbox (%s.>), where the check's answer goes; grant it that too (%s)",
            who,
            ", ".join(subjects_),
            trace_to.rpartition(".")[0],
            fix,
        )
        return
    denied = [s for s in subjects_ if s.lower() in refused]
    if denied:
        raise NatsRefused(
            f"{who}: this NATS user may not publish to {', '.join(denied)}, where its work goes: "
            f"grant it publish there ({fix})"
        )


def _traces_only(version: ServerVersion) -> bool:
    """Whether a server of this version delivers a trace-only message to nobody."""
    try:
        return (version.major, version.minor) >= _TRACE_ONLY_SINCE
    except ValueError:  # no version nats-py can read
        return False


def _is_inbox_refusal(exc: Exception) -> bool:
    """The server refused a subscription to an _INBOX subject: a user whose permissions name
    an inbox prefix of its own, connected without it."""
    text = str(exc).lower()
    return "permissions violation for subscription to" in text and '"_inbox.' in text


def _is_publish_refusal(exc: Exception) -> bool:
    """The server refused a publish: the connection stays up, the message is dropped."""
    return natsio.refused_publish(exc) is not None


def _is_auth_refusal(exc: Exception) -> bool:
    return isinstance(exc, nats.errors.AuthorizationError) or (
        isinstance(exc, nats.errors.Error) and "authorization violation" in str(exc).lower()
    )


@dataclass
class Component:
    """A started dispatcher or worker and its connection."""

    name: str
    nc: Client
    stop_runtime: Callable[[], Awaitable[None]]
    watch: ConnectionWatch
    responder: Responder | None = None  # the NATS service API ($SRV), service/discovery.py

    async def stop(self, drain_timeout_s: float = 5.0) -> None:
        self.watch.closing = True
        if self.responder is not None:  # gone from `nats micro ls` before it stops taking work
            await self.responder.stop()
        await self.stop_runtime()
        if self.nc.is_closed:
            return
        try:  # drain flushes replies still buffered; a vanished server must not hang shutdown
            await asyncio.wait_for(self.nc.drain(), drain_timeout_s)
        except (TimeoutError, nats.errors.Error):
            # The server is gone (the stop came during an outage): nothing buffered for it
            # can go out, nothing to report, and no reason to exit 1.
            await natsio.close(self.nc)


async def start_dispatcher(
    config: Config, url: NatsOptions | str, tracers: Tracing, meters: MeterProvider | None = None
) -> tuple[Component, Dispatcher]:
    from service.dispatcher import Dispatcher
    from service.telemetry import observe_health

    watch = ConnectionWatch("dispatcher")
    options = url if isinstance(url, NatsOptions) else NatsOptions(servers=url)
    if not options.inbox_prefix:  # where workers may stream chunks (service/permissions.py)
        options = replace(options, inbox_prefix=subjects.DISPATCHER_INBOX_PREFIX)
    nc = await connect(options, "lifeline-dispatcher", watch=watch)
    # Its inbox, where its workers' replies and stream chunks come: refused (a client's
    # NATS_INBOX_PREFIX left set), every attempt would time out. Checked first: the JetStream
    # setup below asks through it, and waited out a timeout per ask (12 s) before stopping.
    inbox_fix = (
        f"connect it with inbox prefix {subjects.DISPATCHER_INBOX_PREFIX}, its default "
        "(leave NATS_INBOX_PREFIX, --nats-inbox-prefix and [nats] inbox_prefix unset)"
    )
    try:
        await must_have_its_inbox(nc, watch, "dispatcher", options.inbox_prefix, inbox_fix)
    except BaseException:
        await natsio.close(nc)
        raise
    if nc.max_payload < _SMALL_PAYLOAD:
        log.warning(
            "dispatcher: the NATS server's max_payload is %d bytes (nats-server's default is "
            "1 MiB): a request over it is refused as payload_too_large, an answer over it as "
            "reply_too_large, and a stream's chunks keep 1 KiB of it for their headers; raise "
            "max_payload in the server's configuration",
            nc.max_payload,
        )
    dispatcher = Dispatcher(nc, config, tracers.recorder("lifeline.dispatcher"))
    await dispatcher.start()
    try:
        must_have_subscribed(
            watch, "dispatcher", (subjects.COMPLETE, subjects.STREAM, subjects.ABORT)
        )
        must_have_subscribed(watch, "dispatcher", (options.inbox_prefix + ".>",), inbox_fix)
        # Where each request's attempts and audit event go: refused, every attempt would time
        # out, or every audit event be lost, without a word at start.
        await must_be_allowed_to_publish(
            nc,
            watch,
            "dispatcher",
            _dispatcher_publishes(config),
            "`lifeline nats-config` gives the dispatcher's user what it needs",
        )
    except NatsRefused:
        await dispatcher.stop()
        await natsio.close(nc)
        raise
    if meters is not None:
        observe_health(meters, dispatcher.health)
    responder = Responder(
        nc,
        subjects.DISPATCHER_SERVICE,
        "Lifeline dispatcher: llm.complete, llm.stream and llm.jobs.submit",
        lambda: dispatcher_endpoints(dispatcher),
    )
    await responder.start()
    component = Component("dispatcher", nc, dispatcher.stop, watch, responder)
    return component, dispatcher


def _dispatcher_publishes(config: Config) -> list[str]:
    """What a dispatcher publishes every request to: its audit subjects, its providers'."""
    audit = [subjects.audit_subject(status) for status in ("ok", "error")]  # AuditEvent.status
    return audit + [subjects.provider_subject(name) for name in config.providers]


def make_provider(config: Config, name: str) -> Provider:
    """The provider a worker of `name` calls, made now (a plug-in's model class too): raises
    ValueError naming the config key at fault, a missing API key, or a model class that does
    not load or cannot be made."""
    from workers import testmode
    from workers.base import HttpProvider
    from workers.registry import build_provider
    from workers.scrubbing import Scrubber

    settings = config.providers[name]
    provider = build_provider(settings, name)
    logs.hide(Scrubber(getattr(provider, "secrets", ())))  # from its log lines too
    if testmode.enabled():  # the conformance kit's workers: lifeline-test: directives obeyed
        provider = testmode.with_test_mode(provider)
        log.warning("worker %s in test mode (%s=1)", name, testmode.TEST_MODE_ENV)
    if isinstance(provider, HttpProvider):
        _warn_of_few_files(name, settings.max_in_flight)
    return provider


async def make_providers(config: Config, names: Sequence[str]) -> dict[str, Provider]:
    """make_provider for each of `names`; those made are closed when one cannot be."""
    made: dict[str, Provider] = {}
    try:
        for name in names:
            made[name] = make_provider(config, name)
    except BaseException:
        await close_providers(made)
        raise
    return made


async def close_providers(providers: dict[str, Provider]) -> None:
    """Close providers no worker has taken (a worker's stop closes its own)."""
    for provider in providers.values():
        await provider.aclose()


async def start_worker(
    config: Config,
    name: str,
    url: NatsOptions | str,
    tracers: Tracing,
    provider: Provider | None = None,
) -> tuple[Component, WorkerRuntime]:
    """A worker of provider `name`, serving `provider` (made by make_provider) or one made
    now, before connecting; the provider is the worker's from the call on, closed with it."""
    from workers.runtime import WorkerRuntime

    settings = config.providers[name]
    # Fails here, before connecting, on a missing API key or a plug-in that does not load.
    provider = make_provider(config, name) if provider is None else provider
    watch = ConnectionWatch(f"worker {name}")
    try:
        nc = await connect(url, f"lifeline-worker-{name}", watch=watch)
    except BaseException:  # refused, or stopped while it waited for its NATS server
        await provider.aclose()
        raise
    runtime = WorkerRuntime(
        name=name,
        kind=settings.kind,
        provider=provider,
        nc=nc,
        spans=tracers.recorder("lifeline.worker"),
        timeout_s=settings.timeout_s,
        max_in_flight=settings.max_in_flight,
        max_in_flight_bytes=settings.max_in_flight_bytes,
        error_text=config.audit.error_text,
    )
    await runtime.start()
    try:
        work = (subjects.provider_subject(name), subjects.cancel_subject(name))
        must_have_subscribed(watch, f"worker {name}", work)
    except NatsRefused:
        await runtime.stop()
        await natsio.close(nc)
        raise
    responder = Responder(
        nc,
        subjects.worker_service(name),
        f"Lifeline worker of provider {name} ({settings.kind})",
        lambda: worker_endpoints(runtime),
        {"provider": name, "kind": settings.kind},
    )
    await responder.start()
    component = Component(f"worker {name}", nc, runtime.stop, watch, responder)
    return component, runtime


_FILES_FOR_THE_REST = 64  # NATS, logs, the interpreter's own files: what a worker needs besides


def _warn_of_few_files(name: str, max_in_flight: int) -> None:
    """A worker's pool opens a connection per call it takes (max_in_flight): under an open-files
    limit that leaves no room for them, calls past it fail, as rate_limit saying so. Said at
    start, where an operator looks, not first under load."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return
    if soft != resource.RLIM_INFINITY and max_in_flight + _FILES_FOR_THE_REST > soft:
        log.warning(
            "worker %s: the open-files limit is %d, under its max_in_flight of %d plus %d for "
            "the rest: calls past about %d at once will fail as rate_limit; raise `ulimit -n` "
            "(the hard limit) or lower providers.%s.max_in_flight",
            name,
            soft,
            max_in_flight,
            _FILES_FOR_THE_REST,
            max(0, soft - _FILES_FOR_THE_REST),
            name,
        )


@dataclass
class Stack:
    """Everything `lifeline run` starts; stopped in reverse order."""

    components: list[Component] = field(default_factory=list)
    dispatcher: Dispatcher | None = None
    workers: dict[str, WorkerRuntime] = field(default_factory=dict)

    async def stop(self) -> None:
        for component in reversed(self.components):
            await component.stop()
        self.components.clear()

    async def lost(self) -> str:
        """Wait until some component's connection is gone for good; returns its name."""
        waits = {asyncio.ensure_future(c.watch.wait_lost()): c.name for c in self.components}
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return waits[next(iter(done))]


async def start_stack(
    config: Config,
    url: NatsOptions | str,
    tracers: Tracing,
    workers: list[str] | None = None,
    meters: MeterProvider | None = None,
    providers: dict[str, Provider] | None = None,
) -> Stack:
    """One dispatcher and one worker per provider (or per name in `workers`), each serving
    its provider of `providers` (make_providers) or one made as it starts. The stack takes
    `providers` over: those it did not start are closed when it cannot start."""
    stack = Stack()
    left = dict(providers or {})  # made, and not yet a worker's
    try:
        for name in config.providers if workers is None else workers:
            provider = left.pop(name, None)
            component, stack.workers[name] = await start_worker(
                config, name, url, tracers, provider
            )
            stack.components.append(component)
        component, stack.dispatcher = await start_dispatcher(config, url, tracers, meters)
        stack.components.append(component)
    except BaseException:
        await stack.stop()
        await close_providers(left)
        raise
    return stack
