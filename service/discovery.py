"""The NATS service API (ADR-32) for dispatchers, workers and gateways, and asking it.

Every dispatcher, worker and HTTP gateway answers `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS`
(each also with `.<name>` and `.<name>.<id>`) as nats.micro's services do, so `nats micro
ls`, `nats micro stats lifeline-dispatcher` and any ADR-32 client find them: their name
(`lifeline-dispatcher`, `lifeline-worker-<provider>`, `lifeline-gateway`), version, id,
endpoints (subject and queue group) and figures. A gateway takes its requests over HTTP, so
its one endpoint (`chat_completions`) has no subject, and its URL is in its metadata (`url`). The requests themselves never
go through nats.micro: its handler wrapper (nats-py's queue and task per subscription, a
Request and two clock reads per message) would sit on the hot path, which Lifeline's fast
path (service/natsio.py) keeps clear. The figures are counters on the existing path (an
integer added as a request arrives; the milliseconds the engine or the worker measured anyway,
and an error count, as it is answered), read only when someone asks. Each endpoint's `data` carries its live load: `in_flight`,
`max_in_flight` (absent where there is none) and `subscribed`; `problems` reads readiness
from it; a gateway's adds `connections` and `max_connections` (HTTP connections open, and
the most it serves).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import os
import secrets
import socket
from collections import deque
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from typing import Annotated, Any, NamedTuple

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas import subjects
from service.loop import cancel_and_wait
from service.natsio import Drops, Received, ensure_subscribed, fast_path

log = logging.getLogger("lifeline.discovery")

_TYPE = "io.nats.micro.v1.{}_response"
# Service API requests held waiting for their answer; past it one is dropped as it is read (its
# asker collects answers for a moment, and a flood's are stale long before they are answered).
# Through nats-py (a coroutine per message read, its queue of 524,288 a subscription, answered
# one after another without a yield), 600,000 pings held a dispatcher's loop: its requests on
# llm.complete answered 17 s late, its health bucket's reads timed out.
_BACKLOG = 1024


class Endpoint(NamedTuple):
    """One subject a component takes requests on, with its figures since it started."""

    name: str  # [A-Za-z0-9_-]+, as ADR-32 names endpoints
    subject: str
    queue_group: str  # "" for a plain subscription: every replica gets every message
    num_requests: int = 0
    num_errors: int = 0
    processing_ms: float = 0.0  # summed over the requests answered
    last_error: str = ""
    data: dict[str, Any] | None = None  # in_flight, max_in_flight, subscribed ...


class Tally:
    """An endpoint's figures, kept by its component: a request counted as it arrives, an error
    and the milliseconds it took as it is answered."""

    __slots__ = ("busy_ms", "errors", "last_error", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.busy_ms = 0.0
        self.last_error = ""

    def endpoint(self, name: str, subject: str, queue_group: str, **data: Any) -> Endpoint:
        return Endpoint(
            name,
            subject,
            queue_group,
            self.requests,
            self.errors,
            self.busy_ms,
            self.last_error,
            data,
        )


def dispatcher_endpoints(dispatcher: Any) -> list[Endpoint]:
    """A Dispatcher's (service/dispatcher.py) endpoints: llm.complete and llm.stream, which
    share its in-flight maximum, llm.jobs.submit when it takes jobs, and the aborts every
    dispatcher hears."""
    load = {
        "in_flight": dispatcher.in_flight,
        "max_in_flight": dispatcher.max_in_flight,
        "in_flight_bytes": dispatcher.in_flight_bytes,
        "max_in_flight_bytes": dispatcher.max_in_flight_bytes,
        "subscribed": dispatcher.subscribed,
    }
    queue = subjects.DISPATCHER_QUEUE
    found = [
        dispatcher.complete_tally.endpoint("complete", subjects.COMPLETE, queue, **load),
        dispatcher.stream_tally.endpoint("stream", subjects.STREAM, queue, **load),
    ]
    jobs = dispatcher.jobs
    if jobs is not None:  # pulled from a JetStream consumer, shared by every dispatcher
        found.append(
            jobs.tally.endpoint(
                "jobs",
                subjects.JOBS_SUBMIT,
                subjects.JOBS_CONSUMER,
                in_flight=jobs.in_flight,
                subscribed=jobs.subscribed,
            )
        )
    found.append(
        Endpoint(
            "abort",
            subjects.ABORT,
            "",
            dispatcher.aborts_heard,
            data={"aborted": dispatcher.aborts, "subscribed": dispatcher.subscribed},
        )
    )
    return found


def worker_endpoints(runtime: Any) -> list[Endpoint]:
    """A WorkerRuntime's (workers/runtime.py) endpoints: its provider's subject, and the
    cancels every replica hears."""
    provider = runtime.name
    return [
        runtime.tally.endpoint(
            "provider",
            subjects.provider_subject(provider),
            subjects.provider_queue(provider),
            in_flight=runtime.in_flight,
            max_in_flight=runtime.max_in_flight,
            in_flight_bytes=runtime.in_flight_bytes,
            max_in_flight_bytes=runtime.max_in_flight_bytes,
            subscribed=runtime.subscribed,
            expired=runtime.expired,
        ),
        Endpoint(
            "cancel",
            subjects.cancel_subject(provider),
            "",
            runtime.cancels_heard,
            data={"cancelled": runtime.cancelled, "subscribed": runtime.subscribed},
        ),
    ]


def version() -> str:
    """The installed package's version (SemVer, as ADR-32 wants)."""
    try:
        return importlib.metadata.version("lifeline")
    except importlib.metadata.PackageNotFoundError:  # a checkout never installed
        return "0.0.0-unknown"


class Responder:
    """Answers the service API for one component on its own connection. `endpoints` gives
    the component's figures when someone asks."""

    def __init__(
        self,
        nc: Client,
        name: str,
        description: str,
        endpoints: Callable[[], list[Endpoint]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.nc = nc
        self.name = name
        self.id = secrets.token_hex(11)
        self.description = description
        self.endpoints = endpoints
        # Immutable, as ADR-33 wants: where this instance runs.
        self.metadata = {"host": socket.gethostname(), "pid": str(os.getpid()), **(metadata or {})}
        self.version = version()
        self.started = datetime.now(UTC)
        self._subs: list[Subscription] = []
        self._waiting: deque[Msg] = deque()  # asked, not yet answered: _BACKLOG at most
        self._answering: asyncio.Task[None] | None = None
        self._dropped = Drops()  # asks past _BACKLOG

    async def start(self) -> None:
        for subject in subjects.service_api_subjects(self.name, self.id):
            self._subs.append(await fast_path(self.nc).subscribe(subject, self._asked))
        await ensure_subscribed(self.nc)

    async def stop(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(Exception):  # a closed connection has nothing to drop
                await sub.unsubscribe()
        self._waiting.clear()
        if self._answering is not None:
            await cancel_and_wait(self._answering)

    def _asked(self, msg: Received) -> None:
        """Called in the read: kept for `_answer_waiting`, or dropped past _BACKLOG."""
        if not msg.reply or subjects.reply_subject_refused(msg.reply) is not None:
            return  # never answered (see _answer): no room taken
        if len(self._waiting) >= _BACKLOG:
            if self._dropped.drop() is not None:
                log.warning(
                    "%s: %d service API request(s) ($SRV) dropped so far: they came faster than "
                    "they were answered (%d waiting at most)",
                    self.name,
                    self._dropped.dropped,
                    _BACKLOG,
                )
            return
        self._waiting.append(msg)
        if self._answering is None or self._answering.done():
            self._answering = asyncio.create_task(self._answer_waiting())

    async def _answer_waiting(self) -> None:
        while self._waiting:
            await self._answer(self._waiting.popleft())
            # nats-py's publish does not yield: without this a backlog is answered in one go,
            # and nothing else on this loop (a dispatcher's requests) runs meanwhile.
            await asyncio.sleep(0)

    async def _answer(self, msg: Received) -> None:
        verb = msg.subject.split(".")[1]
        body = {"PING": self.ping, "INFO": self.info, "STATS": self.stats}[verb]()
        # Not on a subject of Lifeline's or the server's: whoever asks chooses the reply
        # subject, and this connection may write where the asker may not.
        if msg.reply and subjects.reply_subject_refused(msg.reply) is None:
            with contextlib.suppress(Exception):  # the asker may be gone; nothing to do then
                await self.nc.publish(msg.reply, json.dumps(body).encode())

    def _identity(self, verb: str) -> dict[str, Any]:
        return {
            "type": _TYPE.format(verb),
            "name": self.name,
            "id": self.id,
            "version": self.version,
            "metadata": self.metadata,
        }

    def ping(self) -> dict[str, Any]:
        return self._identity("ping")

    def info(self) -> dict[str, Any]:
        endpoints = [
            {"name": e.name, "subject": e.subject, "queue_group": e.queue_group, "metadata": {}}
            for e in self.endpoints()
        ]
        return {**self._identity("info"), "description": self.description, "endpoints": endpoints}

    def stats(self) -> dict[str, Any]:
        return {
            **self._identity("stats"),
            # RFC 3339 in UTC with microseconds: what Go's and nats-py's clients both parse.
            "started": self.started.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "endpoints": [_endpoint_stats(e) for e in self.endpoints()],
        }


def _endpoint_stats(e: Endpoint) -> dict[str, Any]:
    processing_ns = int(e.processing_ms * 1_000_000)
    return {
        "name": e.name,
        "subject": e.subject,
        "queue_group": e.queue_group,
        "num_requests": e.num_requests,
        "num_errors": e.num_errors,
        "last_error": e.last_error,
        "processing_time": processing_ns,
        "average_processing_time": processing_ns // e.num_requests if e.num_requests else 0,
        "data": e.data,
    }


# What `lifeline health` reads of a STATS answer, as the NATS service API defines it (metadata
# values are strings) with Lifeline's endpoint data: an answer of another shape (any client may
# answer $SRV subjects: a number, a list, a count that is a string or NaN) is left out rather
# than read into a wrong verdict, or a crash that hides every other instance. A count is at most
# an int64, as every client writes it: JSON integers have no bound, and one past a float's range
# (bytes in flight shown in GiB) ended `lifeline health` in an OverflowError.
Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class _EndpointData(msgspec.Struct):
    subscribed: bool | None = None
    in_flight: Count | None = None
    max_in_flight: Count | None = None
    in_flight_bytes: Count | None = None
    max_in_flight_bytes: Count | None = None
    expired: Count = 0
    connections: Count | None = None
    max_connections: Count | None = None


class _Endpoint(msgspec.Struct):
    subject: str = ""
    num_requests: Count = 0
    num_errors: Count = 0
    data: _EndpointData | None = None


class _Stats(msgspec.Struct):
    name: str
    id: str = "?"
    version: str = "?"
    metadata: dict[str, str] | None = None
    endpoints: list[_Endpoint] | None = None


def readable_stats(answers: list[Any]) -> tuple[list[dict[str, Any]], int]:
    """The STATS answers of Lifeline's own services that have the service API's shape, and
    how many answers were left out for not having it."""
    kept, unreadable = [], 0
    for answer in answers:
        try:
            stats = msgspec.convert(answer, _Stats)
        except msgspec.ValidationError:
            unreadable += 1
            continue
        if stats.name.startswith("lifeline-"):
            kept.append(answer)
    return kept, unreadable


def problems(stats: dict[str, Any]) -> list[str]:
    """What keeps an instance from being ready, read from its STATS: an endpoint not
    subscribed (a gateway: not connected to NATS), or one at its maximum of requests in flight,
    of their bytes or of connections (past which it takes nothing more). [] when it is ready."""
    found: dict[str, None] = {}  # ordered, without repeats (a dispatcher's endpoints share a load)
    for endpoint in stats.get("endpoints") or []:
        data = endpoint.get("data") or {}
        if data.get("subscribed") is False:
            subject = endpoint.get("subject")
            found[f"not subscribed to {subject}" if subject else "not connected to NATS"] = None
        in_flight, most = data.get("in_flight"), data.get("max_in_flight")
        if isinstance(in_flight, int) and isinstance(most, int) and in_flight >= most:
            found[f"overloaded: {in_flight} requests in flight, its maximum is {most}"] = None
        size, most_bytes = data.get("in_flight_bytes"), data.get("max_in_flight_bytes")
        if isinstance(size, int) and isinstance(most_bytes, int) and size >= most_bytes:
            found[
                f"overloaded: {size:,} bytes of requests in flight, its maximum is {most_bytes:,}"
            ] = None
        open_, most_open = data.get("connections"), data.get("max_connections")
        if isinstance(open_, int) and isinstance(most_open, int) and open_ >= most_open:
            found[f"overloaded: {open_} connections open, its maximum is {most_open}"] = None
    return list(found)


def instance_state(stats: dict[str, Any]) -> dict[str, Any]:
    """One instance's readiness and figures from its STATS, as `lifeline health` shows them.
    Its requests, errors and load are those of the endpoints that take work (not cancels); a
    gateway's (its `url` set) are its chat completions', with its HTTP connections."""
    metadata = stats.get("metadata") or {}
    working = [e for e in stats.get("endpoints") or [] if "in_flight" in (e.get("data") or {})]
    found = problems(stats)
    first = working[0]["data"] if working else {}
    figures = {
        "in_flight": first.get("in_flight"),
        "max_in_flight": first.get("max_in_flight"),
        "in_flight_bytes": first.get("in_flight_bytes"),
        "max_in_flight_bytes": first.get("max_in_flight_bytes"),
        "requests": sum(e.get("num_requests", 0) for e in working),
        "errors": sum(e.get("num_errors", 0) for e in working),
        # a worker's requests dropped as late on arrival (falling behind, or a clock ahead)
        "expired": sum((e.get("data") or {}).get("expired", 0) for e in working),
        "connections": first.get("connections"),  # a gateway's
        "max_connections": first.get("max_connections"),
    }
    return {
        "name": stats.get("name", "?"),
        "id": stats.get("id", "?"),
        "version": stats.get("version", "?"),
        "host": metadata.get("host", "?"),
        "pid": metadata.get("pid", "?"),
        "url": metadata.get("url"),  # a gateway's
        "ready": not found,
        "problems": found,
        **figures,
    }


async def ask(
    nc: Client,
    verb: str,
    name: str | None = None,
    timeout_s: float = 2.0,
    stall_s: float = 0.3,
    expect: Collection[str] = (),
) -> list[dict[str, Any]]:
    """Every answer to `$SRV.<verb>[.<name>]`: waits up to timeout_s, and stall_s after the
    latest answer (as the nats CLI does), or not at all when nobody listens. While a service
    named in `expect` has not answered, it waits on up to timeout_s: an instance slow to
    answer (a paused or busy process) is late, not missing."""
    subject = f"{subjects.SERVICE_API_PREFIX}.{verb}" + (f".{name}" if name else "")
    answers: list[dict[str, Any]] = []
    arrived = asyncio.Event()
    nobody = asyncio.Event()

    async def collect(msg: Msg) -> None:
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            nobody.set()  # no responders: the server says nobody is subscribed
            return
        with contextlib.suppress(ValueError):
            answers.append(json.loads(msg.data))
            arrived.set()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await ensure_subscribed(nc)
        await nc.publish(subject, b"", reply=inbox)
        wanted = set(expect)

        def complete() -> bool:
            return wanted <= {a.get("name") for a in answers if isinstance(a, dict)}

        await _gather(arrived, nobody, timeout_s, stall_s, complete)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return answers


async def _gather(
    arrived: asyncio.Event,
    nobody: asyncio.Event,
    timeout_s: float,
    stall_s: float,
    complete: Callable[[], bool] = lambda: True,
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    wait_s = timeout_s
    while not nobody.is_set():
        arrived.clear()
        waits = {asyncio.ensure_future(arrived.wait()), asyncio.ensure_future(nobody.wait())}
        done, pending = await asyncio.wait(
            waits, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED
        )
        for wait in pending:
            wait.cancel()
        left = deadline - loop.time()
        if left <= 0 or (not done and complete()):
            return
        wait_s = min(stall_s, left) if complete() else left
