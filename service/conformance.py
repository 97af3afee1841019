"""The conformance kit: does a provider worker, in any language, keep Lifeline's worker protocol?

    lifeline conformance [--provider NAME] [--replicas 2] -- COMMAND [ARGS...]
    run_checks(command, provider=..., env=...) -> Report                     from Python
    pytest_plugins = ["service.conformance"], then the lifeline_conformance fixture

It starts a nats-server of its own (a free port, no JetStream), starts COMMAND as two
replicas (or --replicas) with this environment

    NATS_URL=<the kit's server>   LIFELINE_PROVIDER=<NAME, default conformance>
    LIFELINE_TEST_MODE=1

waits until both replicas subscribe to llm.provider.<NAME>, and then checks on the wire, each
check printed as `PASS name` or `FAIL name: expected ..., got ...`:

    replies_decode         a valid ProviderRequest gets a ProviderOk with a model
    bad_request            a malformed body (not JSON, JSON of the wrong shape) gets a
                           ProviderFailure of kind bad_request, and the worker serves on
    deadline               a request past its Lifeline-Deadline-Ms gets no reply
    cancel                 an attempt named on llm.cancel.<NAME> while it runs gets no reply;
                           one not cancelled does
    one_reply_per_request  a burst of requests gets exactly one reply each across the
                           replicas, all in the queue group lifeline-provider-<NAME>
    streaming              with Lifeline-Stream-To: chunks there, then one ProviderOk whose
                           `chunks` counts them, and nothing after it (or, from a worker
                           that does not stream, no chunk and one ProviderOk with chunks=0)
    error_kinds            failures carry a kind of schemas.errors.ERROR_KINDS, status_code and
                           retry_after_s as asked
    survives_bad_input     every replica is still running at the end

(and `starts` first: the replicas came up and subscribed). The slow call and the 429 come
from test mode (workers/testmode.py): with LIFELINE_TEST_MODE=1, a request whose last message
is a user message `lifeline-test: sleep <ms>` or `lifeline-test: fail <status> [retry_after
<s>]` is answered by the worker itself, as it says.

Readiness is read from the server's monitoring endpoint (/connz?subs=detail), not guessed
from replies: a probe through the queue group reaches one replica at random, so answers
cannot tell that both replicas listen, while the server's own list of connections and their
subscriptions can, with each one's queue group (quoted when one_reply_per_request fails).

A run takes about three seconds: the checks that must wait (a deadline, a cancel) run side by
side; bad_request, which may crash a replica on purpose, runs last.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas import ChatMessage, ProviderFailure, ProviderOk, ProviderRequest, subjects
from schemas.errors import ERROR_KINDS
from schemas.wire import encoder, provider_reply_decoder, tool_call_delta_decoder
from service.embedded import EmbeddedNats
from service.natsio import ensure_subscribed

try:  # the pytest plug-in's fixture; the `lifeline conformance` command needs no pytest
    import pytest
except ImportError:  # pragma: no cover
    pytest = None  # type: ignore[assignment]

DEFAULT_PROVIDER = "conformance"
PROVIDER_ENV = "LIFELINE_PROVIDER"
TEST_MODE_ENV = "LIFELINE_TEST_MODE"  # workers.testmode.TEST_MODE_ENV: the kit imports no worker
CHECKS = (
    "starts",
    "replies_decode",
    "bad_request",
    "deadline",
    "cancel",
    "one_reply_per_request",
    "streaming",
    "error_kinds",
    "survives_bad_input",
)

# How long the kit waits. Only the waits for silence (a deadline, a cancel, a duplicate) are
# spent on every run; the others end as soon as what they wait for has come.
REPLY_TIMEOUT_S = 5.0  # for an answer that should come
BAD_REPLY_TIMEOUT_S = 2.0  # for the bad_request answers (a crashed replica never sends one)
DEADLINE_WAIT_S = 1.0  # silence expected after a request past its deadline
SLEEP_MS = 1500  # the slow call the cancel check cancels
CANCEL_AFTER_S = 0.2  # ... this long after sending it
CANCEL_WAIT_S = 2.5  # the longest the cancel check listens
QUIET_S = 0.3  # listened after the last reply, for a duplicate or a late chunk
BURST = 20  # requests sent at once by one_reply_per_request
SPREAD = 8  # requests sent where every replica should get some (the queue group picks)
STOP_GRACE_S = 3.0  # SIGTERM to SIGKILL
LOG_LINES = 25  # of a replica's output, shown when a check failed

_MONITOR = re.compile(r"Starting http monitor on (\S+):(\d+)")


# ---- the report ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One check's outcome: on failure, what was expected and what came, and details."""

    name: str
    passed: bool
    expected: str = ""
    got: str = ""
    detail: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        if self.passed:
            return [f"PASS {self.name}"]
        head = f"FAIL {self.name}: expected {self.expected}, got {self.got}"
        return [head, *(f"     {line}" for line in self.detail)]


def _ok(name: str) -> Check:
    return Check(name, True)


def _fail(name: str, expected: str, got: str, *detail: str) -> Check:
    return Check(name, False, expected, got, tuple(d for d in detail if d))


@dataclass
class Report:
    """What one run of the kit found. `passed` is the verdict, `failed` the names of the checks
    that failed; `str(report)` is the text `lifeline conformance` prints."""

    command: list[str]
    provider: str
    replicas: int
    url: str = ""
    checks: list[Check] = field(default_factory=list)
    logs: dict[str, str] = field(default_factory=dict)  # replica -> the end of its output
    elapsed_s: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)

    @property
    def failed(self) -> list[str]:
        return [check.name for check in self.checks if not check.passed]

    def check(self, name: str) -> Check:
        return next(check for check in self.checks if check.name == name)

    def text(self) -> str:
        where = f" on {self.url}" if self.url else ""
        serving = f"serving {subjects.provider_subject(self.provider)}{where}"
        copies = f"{self.replicas} replica{'s' if self.replicas != 1 else ''}"
        lines = [f"lifeline conformance: {copies} of `{shlex.join(self.command)}` {serving}"]
        for check in self.checks:
            lines += check.lines()
        passed = sum(check.passed for check in self.checks)
        verdict = "conforms" if self.passed else "does NOT conform"
        lines.append(
            f"{passed} of {len(self.checks)} checks passed in {self.elapsed_s:.1f} s: "
            f"the worker {verdict}"
        )
        if not self.passed:
            for replica, tail in self.logs.items():
                lines.append(f"--- {replica}'s output, last {LOG_LINES} lines ---")
                lines += tail.splitlines() or ["(nothing)"]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()

    def assert_passed(self) -> None:
        """Raise AssertionError with the whole report when a check failed (for tests)."""
        if not self.passed:
            raise AssertionError(f"the worker failed {', '.join(self.failed)}:\n{self.text()}")


# ---- the API ------------------------------------------------------------------------------


def run_checks(
    command: Sequence[str] | str,
    provider: str = DEFAULT_PROVIDER,
    env: Mapping[str, str] | None = None,
    replicas: int = 2,
    start_timeout_s: float = 20.0,
    cwd: str | os.PathLike[str] | None = None,
) -> Report:
    """Run the kit against `command` (an argv list, or one string split as a shell would) and
    return its Report. `env` is added to this process's environment for the replicas.

    Blocks; from a running event loop (an async test), it runs in a thread of its own. In async
    code, `await check_worker(...)` instead."""
    run = check_worker(command, provider, env, replicas, start_timeout_s, cwd)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run).result()


async def check_worker(
    command: Sequence[str] | str,
    provider: str = DEFAULT_PROVIDER,
    env: Mapping[str, str] | None = None,
    replicas: int = 2,
    start_timeout_s: float = 20.0,
    cwd: str | os.PathLike[str] | None = None,
) -> Report:
    """run_checks, for a caller already in an event loop."""
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if not argv:
        raise ValueError("no worker command given")
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    started = time.monotonic()
    report = Report(argv, provider, replicas)
    server = EmbeddedNats(port=-1, jetstream=False, conf="http_port: -1\n")
    logs_dir = tempfile.mkdtemp(prefix="lifeline-conformance-")
    running: list[_Replica] = []
    nc: Client | None = None
    try:
        await asyncio.to_thread(server.start)
        report.url = server.url
        extra = {
            **(env or {}),
            "NATS_URL": server.url,
            PROVIDER_ENV: provider,
            TEST_MODE_ENV: "1",
        }
        async with httpx.AsyncClient(base_url=_monitor_url(server), trust_env=False) as http:
            monitor = _Monitor(http, provider)
            try:
                for index in range(1, replicas + 1):
                    running.append(_Replica.start(index, argv, extra, Path(logs_dir), cwd))
            except OSError as exc:
                got = f"{type(exc).__name__}: {exc}"
                report.checks.append(_fail("starts", f"`{shlex.join(argv)}` to start", got))
            else:
                starts = await _wait_ready(running, monitor, start_timeout_s)
                report.checks.append(starts)
                if starts.passed:
                    nc = await nats.connect(
                        server.url,
                        name="lifeline-conformance",
                        allow_reconnect=False,
                        error_cb=_ignore,
                    )
                    wire = _Wire(nc, provider)
                    await wire.start()
                    report.checks += await _Checks(wire, running, monitor).run()
    finally:
        if nc is not None:
            await nc.close()
        await _stop_all(running)
        report.logs = {replica.label: replica.tail() for replica in running}
        await asyncio.to_thread(server.stop)
        shutil.rmtree(logs_dir, ignore_errors=True)
    report.elapsed_s = time.monotonic() - started
    return report


async def _ignore(exc: Exception) -> None:
    """nats-py's error callback: a broken worker can make the kit's connection see errors."""


# ---- the replicas and the server's view of them -------------------------------------------


class _Replica:
    """One replica of the worker: a process in a session of its own, its output in a file."""

    def __init__(self, label: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.label = label
        self.proc = proc
        self.log_path = log_path

    @classmethod
    def start(
        cls,
        index: int,
        argv: list[str],
        extra: Mapping[str, str],
        logs_dir: Path,
        cwd: str | os.PathLike[str] | None,
    ) -> _Replica:
        log_path = logs_dir / f"replica-{index}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **extra},
                cwd=cwd,
                start_new_session=True,  # its own process group: stopped with its children
            )
        return cls(f"replica {index}", proc, log_path)

    @property
    def exit_status(self) -> int | None:
        return self.proc.poll()

    def tail(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-LOG_LINES:])

    def signal(self, signum: int) -> None:
        try:
            os.killpg(self.proc.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


async def _stop_all(running: list[_Replica]) -> None:
    """SIGTERM to every replica's process group, then SIGKILL to what is left after a grace."""
    for replica in running:
        replica.signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and any(r.exit_status is None for r in running):
        await asyncio.sleep(0.02)
    for replica in running:
        replica.signal(signal.SIGKILL)  # the group: children a wrapper script left behind too
        if replica.exit_status is None:
            await asyncio.to_thread(replica.proc.wait)


def _monitor_url(server: EmbeddedNats) -> str:
    """The monitoring endpoint the server chose (http_port: -1), read from its log."""
    assert server.store_dir is not None
    log = (Path(server.store_dir) / "nats-server.log").read_text()  # EmbeddedNats's log
    match = _MONITOR.search(log)
    if match is None:
        raise RuntimeError(f"nats-server started no monitoring endpoint; its log:\n{log[-2000:]}")
    return f"http://{match.group(1)}:{match.group(2)}"


@dataclass(frozen=True)
class _Sub:
    cid: int
    client: str  # the connection's name and language, as the client gave them
    subject: str
    queue: str | None


class _Monitor:
    """The server's list of connections and their subscriptions (/connz?subs=detail)."""

    def __init__(self, http: httpx.AsyncClient, provider: str) -> None:
        self.http = http
        self.subject = subjects.provider_subject(provider)
        self.cancel_subject = subjects.cancel_subject(provider)
        self.queue = subjects.provider_queue(provider)
        self.seen: list[_Sub] = []  # the workers' subscriptions when they were ready

    async def subscriptions(self) -> list[_Sub]:
        response = await self.http.get("/connz", params={"subs": "detail", "limit": 1024})
        response.raise_for_status()
        found = []
        for conn in response.json().get("connections") or []:
            client = " ".join(filter(None, (conn.get("name"), conn.get("lang"))))
            for sub in conn.get("subscriptions_list_detail") or []:
                found.append(_Sub(conn["cid"], client, sub["subject"], sub.get("qgroup")))
        return found

    def serving(self, subs: list[_Sub]) -> set[int]:
        return {s.cid for s in subs if s.subject == self.subject}

    def describe(self) -> str:
        """How the replicas subscribed to the provider's subject, for a failure's detail."""
        parts = [
            f"connection {s.cid}{f' ({s.client})' if s.client else ''} in "
            + (f"queue group {s.queue}" if s.queue else "NO queue group")
            for s in self.seen
            if s.subject == self.subject
        ]
        return f"the server saw {self.subject} subscribed by " + "; ".join(parts)


async def _wait_ready(running: list[_Replica], monitor: _Monitor, timeout_s: float) -> Check:
    """Until every replica's connection subscribes to the provider's subject (then a moment
    more for the cancel subject), or one exits, or the time is up."""
    want = len(running)
    deadline = time.monotonic() + timeout_s
    subs: list[_Sub] = []
    while True:
        subs = await monitor.subscriptions()
        serving = monitor.serving(subs)
        if len(serving) >= want:
            break
        dead = [r for r in running if r.exit_status is not None]
        if dead or time.monotonic() >= deadline:
            replicas = f"{want} replica{'s' if want != 1 else ''}"
            expected = f"{replicas} subscribed to {monitor.subject} within {timeout_s:g} s"
            exits = [f"{r.label} exited with status {r.exit_status}" for r in dead]
            got = f"{len(serving)} ({'; '.join(exits) or 'still waiting'})"
            return _fail(
                "starts",
                expected,
                got,
                f"{PROVIDER_ENV}={monitor.subject.removeprefix(subjects.PROVIDER_PREFIX)}, "
                "NATS_URL and LIFELINE_TEST_MODE=1 were set; their output is below",
            )
        await asyncio.sleep(0.05)
    cancel_by = time.monotonic() + 1.0
    while time.monotonic() < cancel_by:
        if {s.cid for s in subs if s.subject == monitor.cancel_subject} >= serving:
            break
        await asyncio.sleep(0.05)
        subs = await monitor.subscriptions()
    monitor.seen = subs
    return _ok("starts")


# ---- the wire -----------------------------------------------------------------------------


@dataclass
class _Event:
    what: str  # "reply", "chunk" or "no_responders"
    data: bytes
    headers: dict[str, str] | None
    after_s: float  # since the request was sent


@dataclass
class _Exchange:
    """One request the kit sent, and everything that came back for it, in arrival order."""

    sent_at: float
    events: list[_Event] = field(default_factory=list)

    @property
    def replies(self) -> list[_Event]:
        return [e for e in self.events if e.what == "reply"]

    @property
    def unheard(self) -> bool:
        """The server answered "no responders": no replica was subscribed."""
        return any(e.what == "no_responders" for e in self.events)


class _Wire:
    """Sends requests to llm.provider.<name> and collects what comes back for each.

    One subscription takes everything (<inbox>.<n>.r for replies, <inbox>.<n>.s for a stream's
    chunks), so events arrive in the order the server delivered them: a chunk after its reply
    is seen as such."""

    def __init__(self, nc: Client, provider: str) -> None:
        self.nc = nc
        self.provider = provider
        self.subject = subjects.provider_subject(provider)
        self.inbox = nc.new_inbox()
        self.exchanges: dict[str, _Exchange] = {}
        self._changed = asyncio.Event()
        self._n = 0

    async def start(self) -> None:
        await self.nc.subscribe(self.inbox + ".>", cb=self._on_msg, pending_msgs_limit=-1)
        await ensure_subscribed(self.nc)

    async def _on_msg(self, msg: Msg) -> None:
        token, _, kind = msg.subject[len(self.inbox) + 1 :].partition(".")
        exchange = self.exchanges.get(token)
        if exchange is None:
            return
        headers = msg.headers
        if kind == "s":
            what = "chunk"
        elif not msg.data and headers and headers.get("Status") == "503":
            what = "no_responders"
        else:
            what = "reply"
        after_s = time.monotonic() - exchange.sent_at
        exchange.events.append(_Event(what, msg.data, headers, after_s))
        self._changed.set()

    async def send(
        self,
        body: bytes,
        *,
        deadline_in_s: float = 30.0,
        attempt_id: str | None = None,
        stream: bool = False,
    ) -> _Exchange:
        """Publish one request with the headers a dispatcher sets."""
        self._n += 1
        token = str(self._n)
        headers = {
            subjects.DEADLINE_MS: str(int((time.time() + deadline_in_s) * 1000)),
            subjects.ATTEMPT_ID: attempt_id or f"conformance-{token}-{secrets.token_hex(4)}",
            subjects.REQUEST_ID: f"conformance-{token}",
            subjects.TRACEPARENT: f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01",
        }
        if stream:
            headers[subjects.STREAM_TO] = f"{self.inbox}.{token}.s"
        exchange = self.exchanges[token] = _Exchange(time.monotonic())
        await self.nc.publish(self.subject, body, reply=f"{self.inbox}.{token}.r", headers=headers)
        return exchange

    async def ask(self, text: str, **kw: Any) -> _Exchange:
        return await self.send(request_body(text), **kw)

    async def until(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until `condition()` holds or timeout_s passes; it is checked as events come,
        and every 50 ms (it may look at more than the wire, a replica's exit)."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.05))
        return True

    async def answered(self, exchanges: list[_Exchange], timeout_s: float) -> bool:
        return await self.until(lambda: all(x.replies or x.unheard for x in exchanges), timeout_s)

    def failure_kinds(self) -> set[str]:
        kinds = set()
        for exchange in self.exchanges.values():
            for event in exchange.replies:
                reply = decode(event.data)
                if isinstance(reply, ProviderFailure):
                    kinds.add(reply.kind)
        return kinds


def request_body(text: str) -> bytes:
    """A valid ProviderRequest whose one message is a user message saying `text`."""
    request = ProviderRequest(
        id=f"conformance-{secrets.token_hex(6)}",
        messages=[ChatMessage("user", text)],
        max_tokens=64,
    )
    return encoder.encode(request)


def decode(data: bytes) -> ProviderOk | ProviderFailure | str:
    """A reply as the protocol's types, or why it is not one."""
    try:
        return provider_reply_decoder.decode(data)
    except (msgspec.DecodeError, RecursionError) as exc:
        return f"{exc}"


def show(event: _Event | None) -> str:
    """One reply (or event), short, for a failure's message."""
    if event is None:
        return "no reply"
    if event.what == "no_responders":
        return "no responders (no replica subscribed)"
    reply = decode(event.data)
    when = f" {event.after_s * 1000:.0f} ms after sending"
    if isinstance(reply, ProviderOk):
        fields = f"model={reply.model!r}, content={reply.content[:40]!r}, chunks={reply.chunks}"
        return f"ProviderOk({fields}){when}"
    if isinstance(reply, ProviderFailure):
        fields = (
            f"kind={reply.kind!r}, status_code={reply.status_code}, "
            f"retry_after_s={reply.retry_after_s}, message={reply.message[:60]!r}"
        )
        return f"ProviderFailure({fields}){when}"
    return f"a body that is no ProviderOk | ProviderFailure ({reply}): {event.data[:80]!r}{when}"


def _first_reply(exchanges: list[_Exchange]) -> _Event | None:
    return next((e for x in exchanges for e in x.events if e.what != "chunk"), None)


# ---- the checks ---------------------------------------------------------------------------


class _Checks:
    def __init__(self, wire: _Wire, running: list[_Replica], monitor: _Monitor) -> None:
        self.wire = wire
        self.running = running
        self.monitor = monitor
        self.provider = wire.provider

    async def run(self) -> list[Check]:
        """Every check, in CHECKS' order. The ones that wait run side by side; bad_request,
        which may crash a replica, after them; survives_bad_input last."""
        side_by_side = await asyncio.gather(
            self.replies_decode(),
            self.deadline(),
            self.cancel(),
            self.one_reply_per_request(),
            self.streaming(),
        )
        errors = await self.error_kinds()
        bad = await self.bad_request()
        results = [*side_by_side, errors, bad, self.survives_bad_input()]
        return sorted(results, key=lambda check: CHECKS.index(check.name))

    def _alive(self) -> bool:
        return any(r.exit_status is None for r in self.running)

    def _dead(self) -> str:
        """Which replicas have exited, for a failure's detail ("" when none has)."""
        dead = [r for r in self.running if r.exit_status is not None]
        exits = ", ".join(f"{r.label} exited with status {r.exit_status}" for r in dead)
        return f"meanwhile {exits}" if dead else ""

    async def replies_decode(self) -> Check:
        name = "replies_decode"
        sent = [await self.wire.ask("Say hello in five words.") for _ in range(SPREAD // 2)]
        await self.wire.answered(sent, REPLY_TIMEOUT_S)
        for exchange in sent:
            event = _first_reply([exchange])
            reply = decode(event.data) if event is not None and event.what == "reply" else None
            if not (isinstance(reply, ProviderOk) and reply.model):
                return _fail(
                    name,
                    "a ProviderOk (status ok) with a model string for a valid ProviderRequest",
                    show(event) if event is not None else f"no reply within {REPLY_TIMEOUT_S:g} s",
                    self._dead(),
                )
        return _ok(name)

    async def bad_request(self) -> Check:
        name = "bad_request"
        bodies = {
            "a body that is not JSON": b"this is not JSON {",
            "JSON of the wrong shape (messages not a list)": b'{"id": 7, "messages": "hello"}',
            "a JSON array": b"[1, 2, 3]",
            "an object without messages": b'{"id": "conformance-no-messages"}',
        }
        sent = [(what, await self.wire.send(body)) for what, body in bodies.items() for _ in "ab"]
        everyone = [x for _, x in sent]
        await self.wire.until(
            lambda: all(x.replies or x.unheard for x in everyone) or not self._alive(),
            BAD_REPLY_TIMEOUT_S,
        )
        for what, exchange in sent:
            event = _first_reply([exchange])
            reply = decode(event.data) if event is not None and event.what == "reply" else None
            if not (isinstance(reply, ProviderFailure) and reply.kind == "bad_request"):
                got = show(event) if event else f"no reply within {BAD_REPLY_TIMEOUT_S:g} s"
                return _fail(
                    name,
                    f"a ProviderFailure of kind bad_request for {what}",
                    got,
                    self._dead(),
                )
        after = [await self.wire.ask("Still there?") for _ in range(SPREAD)]
        await self.wire.answered(after, REPLY_TIMEOUT_S)
        for exchange in after:
            event = _first_reply([exchange])
            reply = decode(event.data) if event is not None and event.what == "reply" else None
            if not isinstance(reply, ProviderOk):
                return _fail(
                    name,
                    "a ProviderOk for a valid request sent after the malformed ones",
                    show(event) if event else f"no reply within {REPLY_TIMEOUT_S:g} s",
                    self._dead(),
                )
        return _ok(name)

    async def deadline(self) -> Check:
        name = "deadline"
        sent = [
            await self.wire.ask("Too late for this.", deadline_in_s=-1.0)
            for _ in range(SPREAD // 2)
        ]
        await asyncio.sleep(DEADLINE_WAIT_S)
        answered = [x for x in sent if x.events]
        if answered:
            return _fail(
                name,
                f"no reply to a request whose {subjects.DEADLINE_MS} had passed "
                f"(listened {DEADLINE_WAIT_S:g} s)",
                f"replies to {len(answered)} of {len(sent)}",
                f"first: {show(_first_reply(answered))}",
                "a worker drops a request past its deadline: the dispatcher no longer waits",
            )
        return _ok(name)

    async def cancel(self) -> Check:
        name = "cancel"
        directive = f"lifeline-test: sleep {SLEEP_MS}"
        attempt = f"conformance-cancel-{secrets.token_hex(4)}"
        cancelled = await self.wire.ask(directive, attempt_id=attempt)
        kept = await self.wire.ask(directive)
        await self.wire.nc.flush()
        await asyncio.sleep(CANCEL_AFTER_S)
        cancel_subject = subjects.cancel_subject(self.provider)
        await self.wire.nc.publish(cancel_subject, attempt.encode())
        await self.wire.nc.flush()
        # Both sleeps started together: once the kept one has answered, the cancelled one would
        # have too, give or take; so listen a little past that, or CANCEL_WAIT_S in all.
        await self.wire.until(lambda: bool(kept.replies), CANCEL_WAIT_S - CANCEL_AFTER_S)
        if kept.replies:
            await asyncio.sleep(QUIET_S + 0.2)
        else:
            await asyncio.sleep(max(0.0, CANCEL_WAIT_S - (time.monotonic() - cancelled.sent_at)))
        if cancelled.replies:
            event = cancelled.replies[0]
            early = event.after_s < CANCEL_AFTER_S
            return _fail(
                name,
                f"no reply to an attempt ({directive!r}) cancelled on {cancel_subject} "
                f"{CANCEL_AFTER_S * 1000:.0f} ms after it was sent",
                show(event),
                "it answered before the cancel was sent: is `lifeline-test: sleep` obeyed "
                f"({TEST_MODE_ENV}=1)?"
                if early
                else f"the cancel's body is the {subjects.ATTEMPT_ID} header's value",
            )
        event = _first_reply([kept])
        reply = decode(event.data) if event is not None and event.what == "reply" else None
        if not isinstance(reply, ProviderOk):
            return _fail(
                name,
                f"a ProviderOk for an attempt not cancelled ({directive!r})",
                show(event) if event else f"no reply within {CANCEL_WAIT_S:g} s",
                f"in test mode ({TEST_MODE_ENV}=1) `lifeline-test: sleep <ms>` waits, then "
                "answers ok",
                self._dead(),
            )
        return _ok(name)

    async def one_reply_per_request(self) -> Check:
        name = "one_reply_per_request"
        sent = [await self.wire.ask(f"Request {i} of a burst.") for i in range(BURST)]
        await self.wire.answered(sent, REPLY_TIMEOUT_S)
        await asyncio.sleep(QUIET_S)
        counts = [len(x.replies) for x in sent]
        if all(count == 1 for count in counts):
            queue, subject = self.monitor.queue, self.wire.subject
            elsewhere = {s.queue for s in self.monitor.seen if s.subject == subject} - {queue}
            if not elsewhere:
                return _ok(name)
            return _fail(  # one reply here, but two beside a Lifeline worker of the provider
                name,
                f"every replica subscribed to {subject} in the queue group {queue}",
                f"queue group {', '.join(sorted(map(str, elsewhere)))}",
                self.monitor.describe(),
            )
        twice = sum(count > 1 for count in counts)
        none = sum(count == 0 for count in counts)
        return _fail(
            name,
            f"exactly one reply to each of {BURST} requests sent at once",
            " and ".join(
                part
                for part in (
                    f"{twice} with more than one reply" if twice else "",
                    f"{none} with none within {REPLY_TIMEOUT_S:g} s" if none else "",
                )
                if part
            )
            + f" ({sum(counts)} replies in all)",
            f"each replica must subscribe to {self.wire.subject} in the queue group "
            f"{self.monitor.queue}, so that one of them gets each request"
            if twice
            else "",
            self.monitor.describe() if twice else "",
            self._dead(),
        )

    async def streaming(self) -> Check:
        name = "streaming"
        sent = [await self.wire.ask("Stream me a story.", stream=True) for _ in range(2)]
        await self.wire.answered(sent, REPLY_TIMEOUT_S)
        await asyncio.sleep(QUIET_S)
        expected = (
            f"text chunks (or tool_call events) on {subjects.STREAM_TO}, then one ProviderOk "
            "whose `chunks` counts them, then nothing (or no chunk and chunks=0)"
        )
        for exchange in sent:
            problem = _stream_problem(exchange)
            if problem is not None:
                hint = ""
                return _fail(name, expected, problem, hint, self._dead())
        return _ok(name)

    async def error_kinds(self) -> Check:
        name = "error_kinds"
        cases = [
            ("lifeline-test: fail 429 retry_after 3", "rate_limit", 429, 3.0),
            ("lifeline-test: fail 503", "server_error", 503, None),
        ]
        sent = [await self.wire.ask(directive) for directive, *_ in cases]
        await self.wire.answered(sent, REPLY_TIMEOUT_S)
        for (directive, kind, status, retry_after), exchange in zip(cases, sent, strict=True):
            event = _first_reply([exchange])
            reply = decode(event.data) if event is not None and event.what == "reply" else None
            want = (kind, status, retry_after)
            if not (
                isinstance(reply, ProviderFailure)
                and (reply.kind, reply.status_code, reply.retry_after_s) == want
            ):
                return _fail(
                    name,
                    f"a ProviderFailure with kind {kind}, status_code {status} and retry_after_s "
                    f"{retry_after} for {directive!r}",
                    show(event) if event else f"no reply within {REPLY_TIMEOUT_S:g} s",
                    f"in test mode ({TEST_MODE_ENV}=1) `lifeline-test: fail <status>` fails with "
                    "the kind schemas.errors.classify_status(status) gives",
                )
        unknown = sorted(self.wire.failure_kinds() - set(ERROR_KINDS))
        if unknown:
            return _fail(
                name,
                f"every ProviderFailure kind one of {', '.join(ERROR_KINDS)}",
                ", ".join(unknown),
            )
        return _ok(name)

    def survives_bad_input(self) -> Check:
        name = "survives_bad_input"
        dead = [r for r in self.running if r.exit_status is not None]
        if not dead:
            return _ok(name)
        return _fail(
            name,
            f"all {len(self.running)} replicas still running after every check",
            "; ".join(f"{r.label} exited with status {r.exit_status}" for r in dead),
            "a worker answers bad input with a bad_request failure and serves on; "
            "its output is below",
        )


def _stream_problem(exchange: _Exchange) -> str | None:
    """What is wrong with one streamed exchange's events, or None."""
    if exchange.unheard:
        return "no responders (no replica subscribed)"
    replies = exchange.replies
    if not replies:
        return f"no reply within {REPLY_TIMEOUT_S:g} s"
    if len(replies) > 1:
        return f"{len(replies)} replies to one request"
    at = exchange.events.index(replies[0])
    before, after = exchange.events[:at], exchange.events[at + 1 :]
    reply = decode(replies[0].data)
    if not isinstance(reply, ProviderOk):
        return f"{show(replies[0])} after {len(before)} chunks"
    if not before and reply.chunks == 0 and not after:
        return None  # a worker that does not stream answers once; the dispatcher streams that
    if reply.chunks != len(before):
        return f"{len(before)} chunks, and then a ProviderOk with chunks={reply.chunks}"
    if after:
        return f"{len(after)} chunks after the reply"
    for i, chunk in enumerate(before, 1):
        if (chunk.headers or {}).get(subjects.EVENT) == "tool_call":
            try:
                tool_call_delta_decoder.decode(chunk.data)
            except msgspec.DecodeError as exc:
                return f"chunk {i}, a tool_call event, is no ToolCallDelta ({exc})"
            continue
        try:
            chunk.data.decode()
        except UnicodeDecodeError:
            return f"chunk {i} is not UTF-8 text: {chunk.data[:40]!r}"
    return None


# ---- the pytest plug-in -------------------------------------------------------------------

if pytest is not None:

    @pytest.fixture
    def lifeline_conformance() -> Callable[..., Report]:
        """The conformance kit, for a test: in a conftest.py or test module,

            pytest_plugins = ["service.conformance"]

            def test_my_worker_conforms(lifeline_conformance):
                report = lifeline_conformance(["python", "my_worker.py"])
                report.assert_passed()  # fails with the whole report

        Takes run_checks' arguments (provider=, env=, replicas=, start_timeout_s=, cwd=)."""
        return run_checks
