"""The conformance kit: does a provider worker, in any language, keep Lifeline's worker protocol?

    lifeline conformance [--provider NAME] [--replicas 2] [--timeout S] [--check NAME]...
                         -- COMMAND [ARGS...]
    run_checks(command, provider=..., env=..., timeout_s=..., checks=...) -> Report
    pytest_plugins = ["service.conformance"], then the lifeline_conformance fixture

It starts a nats-server of its own (a free port, no JetStream), starts COMMAND as two
replicas (or --replicas) with this environment

    NATS_URL=<the kit's server, twice: a cluster's comma-separated list>
    LIFELINE_PROVIDER=<NAME, default conformance>
    LIFELINE_TEST_MODE=1

waits until both replicas subscribe to llm.provider.<NAME>, and then checks on the wire, each
check printed as `PASS name` or `FAIL name: expected ..., got ...`:

    replies_decode         a valid ProviderRequest gets a ProviderOk (a `model` of "" is the
                           target's, as the dispatcher reads it), on exactly the reply subject
                           it came with (nothing on any other subject); one
                           of the whole chat request's shape (parts, images, tool calls) gets
                           a reply too
    bad_request            a malformed body (not UTF-8, not JSON, nested too deeply, JSON of
                           the wrong shape) gets a ProviderFailure of kind bad_request, and
                           the worker serves on
    deadline               no reply or chunk for a request past its Lifeline-Deadline-Ms when
                           it arrives (streamed or not), nor for one whose deadline passes
                           while it is worked on (a `lifeline-test: sleep`; and ordinary
                           requests, from a slow worker)
    cancel                 every replica subscribes to llm.cancel.<NAME> in no queue group; an
                           attempt named there while it runs gets no reply (a sleep; and
                           ordinary ones, from a slow worker); one not cancelled does
    one_reply_per_request  a burst of requests gets exactly one reply each across the
                           replicas, all in the queue group lifeline-provider-<NAME>; and no
                           request of the whole run gets a second reply
    streaming              with Lifeline-Stream-To: chunks there, then one ProviderOk whose
                           `chunks` counts them, and nothing after it (or, from a worker
                           that does not stream, no chunk and one ProviderOk with chunks=0);
                           the final content does not repeat the streamed text, and the
                           chunks come in the text's order, text ones bare (no
                           Lifeline-Event header: only a tool_call piece has one), a tool
                           call's first piece with its id and name (where the worker sends any),
                           and no chunk over the server's max_payload less 1 KiB
    error_kinds            failures carry the kind their HTTP status maps to (408 timeout, 429
                           rate_limit, 401/403 auth, 402 quota, other 5xx server_error, other
                           4xx bad_request), a kind of schemas.errors.ERROR_KINDS, and status_code
                           and retry_after_s as asked, streamed (a 429, a 401) as not
    survives_bad_input     every replica is still running at the end

(and `starts` first: the replicas came up and subscribed; `checks` / --check run only the
named ones after it, for a worker author fixing one breach). The slow call and the failures come
from test mode (workers/testmode.py): with LIFELINE_TEST_MODE=1, a request whose last message
is a user message `lifeline-test: sleep <ms>` or `lifeline-test: fail <status> [retry_after
<s>]` is answered by the worker itself, as it says, carried out where it calls its model (in
place of that call), so that its own deadline timer and cancel handling are what stop a sleep.

A test layer in front of the provider, with a timer and cancels of its own, would pass those
checks for a provider whose calls ignore both; so a worker whose first call took
ORDINARY_MIN_S or more (a real model's pace) also gets ordinary requests, no directive, cut
short by a deadline and by a cancel: they outlast both, and only the worker's own handling
keeps them quiet (a cancelled one may be answered up to DEADLINE_GRACE_S after its cancel: it
may have been on its way). A quick worker's calls are over before anything can cut them short.

Readiness is read from the server's monitoring endpoint (/connz?subs=detail), not guessed
from replies: a probe through the queue group reaches one replica at random, so answers
cannot tell that both replicas listen, while the server's own list of connections and their
subscriptions can, with each one's queue group: quoted when one_reply_per_request fails, and
how the cancel check finds a cancel subscription in a queue group (cancels sent to find it
would reach the replica running the attempt only by chance).

Every reply, chunk and stray message is kept until the end of the run, which listens
LATE_WAIT_S past the last first reply: a second reply, a reply past a deadline or a cancel,
or a late chunk fails its check even when it came after that check had passed.

Slow workers: the first request is sent alone, and how long it took (the worker's pace) is
added to every later wait for answers once per call that may be queued ahead (a model on one
thread answers a burst one by one); `timeout_s` (--timeout, default REPLY_TIMEOUT_S) is the
longest wait beyond that, and the first request's. A reply that did not come says so, naming
the wait.

A run takes about four seconds: the checks that must wait (a deadline, a cancel) run side by
side; bad_request, which may crash a replica on purpose, runs last. A worker that sends nothing
back for the first request fails replies_decode after `timeout_s`, and the checks that need
answers are reported as not run.
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
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas import ChatMessage, ProviderFailure, ProviderOk, ProviderRequest, subjects
from schemas.errors import ERROR_KINDS, classify_status
from schemas.wire import (
    CONFIG_NAME,
    ImagePart,
    TextPart,
    Tool,
    ToolCall,
    encoder,
    provider_reply_decoder,
    tool_call_delta_decoder,
)
from service.embedded import EmbeddedNats
from service.natsio import ensure_subscribed

try:  # the pytest plug-in's fixture; the `lifeline conformance` command needs no pytest
    import pytest
except ImportError:  # pragma: no cover
    pytest = None  # type: ignore[assignment]

DEFAULT_PROVIDER = "conformance"
PROVIDER_ENV = "LIFELINE_PROVIDER"
TEST_MODE_ENV = "LIFELINE_TEST_MODE"  # workers.testmode.TEST_MODE_ENV: the kit imports no worker
STREAM_HEADER_ROOM = 1024  # service.transport's: a stream event's headers, below max_payload
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
# How _Checks.run runs them after `starts`: these side by side, then these one by one
# (bad_request, which may crash a replica on purpose, last), then survives_bad_input.
WAITING_CHECKS = ("replies_decode", "deadline", "cancel", "one_reply_per_request", "streaming")
LATER_CHECKS = ("error_kinds", "bad_request")

# How long the kit waits. Only the waits for silence (a deadline, a cancel, a duplicate) are
# spent on every run; the others end as soon as what they wait for has come.
REPLY_TIMEOUT_S = 10.0  # for an answer that should come, beyond the worker's pace (--timeout)
BAD_REPLY_TIMEOUT_S = 2.0  # for the bad_request answers (a crashed replica never sends one)
DEADLINE_WAIT_S = 1.0  # silence expected after a request past its deadline
DEADLINE_SLEEP_MS = 1000  # a call that is still working when its deadline passes ...
DEADLINE_AFTER_S = 0.3  # ... this long after it was sent; nothing may come past the deadline,
# Give or take this: Lifeline's worker answers `timeout` right at the deadline, and on a loaded
# machine the kit reads it a little late (tests/minimal_worker.py's --late-timeout-reply, 450 ms
# late, fails it).
DEADLINE_GRACE_S = 0.25
DEADLINE_HINT = (
    "a worker stops a call still running at its deadline (a timer, asyncio.timeout) and sends "
    "nothing: checking the deadline when a request arrives is not enough"
)
# A worker whose first call took this long or more (a real model's pace) gets ordinary
# requests (no directive) cut short too, by a deadline and by a cancel, as the directive's are:
# its calls outlast both by more than DEADLINE_GRACE_S, so only its own deadline timer and
# cancel handling keep them quiet, where a directive may be answered by a test layer in front
# of the provider, with handling of its own.
ORDINARY_MIN_S = 0.7
ORDINARY_HINT = (
    "{what} must stop the provider's own call, not only a `lifeline-test: sleep`: carry the "
    "directives out where the provider is called, in place of its call, under the deadline "
    "timer and cancel handling every call gets"
)
SLEEP_MS = 1500  # the slow call the cancel check cancels
CANCEL_AFTER_S = 0.2  # ... this long after sending it
CANCEL_WAIT_S = 2.5  # the longest the cancel check listens
QUIET_S = 0.3  # listened after the last reply, for a duplicate or a late chunk
LATE_WAIT_S = 1.5  # listened at the end, after the last first reply: a late second reply
BURST = 20  # requests sent at once by one_reply_per_request
SPREAD = 8  # requests sent where every replica should get some (the queue group picks)
STREAMS = 2  # streamed requests sent by streaming (and two more unstreamed, to compare)
# Model calls that may be queued at once while the checks run side by side: replies_decode's,
# the burst, streaming's. A wait for answers grows by the worker's pace once per call.
SIDE_BY_SIDE_CALLS = SPREAD // 2 + BURST + STREAMS + 2
ORDINARY_CALLS = SPREAD // 2 + 3  # and deadline's and cancel's, when they cut calls short
NESTING = 100_000  # arrays in one another, in bad_request's deeply nested body (200 KB)
STOP_GRACE_S = 3.0  # SIGTERM to SIGKILL
LOG_LINES = 25  # of a replica's output, shown when a check failed
# The HTTP statuses error_kinds asks for (retry_after_s where given); each must come back as
# schemas.errors.classify_status's kind.
STATUSES: tuple[tuple[int, float | None], ...] = (
    (400, None),
    (401, None),
    (402, None),
    (403, None),
    (404, None),
    (408, None),
    (422, None),
    (429, 3.0),
    (500, None),
    (502, None),
    (503, 2.0),
    (529, None),
)
STREAMED_STATUSES = ((429, 3.0), (401, None))  # asked for again with Lifeline-Stream-To
STATUS_MAP = (
    "408 timeout, 429 rate_limit, 401/403 auth, 402 quota, other 5xx server_error, "
    "other 4xx bad_request"
)

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


def count(n: int, noun: str) -> str:
    """A number of things, its noun singular for one: "1 chunk", "2 chunks"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


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
        subject = subjects.provider_subject(self.provider)
        copies = count(self.replicas, "replica")
        if any(check.name == "starts" and check.passed for check in self.checks):
            what = f"serving {subject}{where}"
        else:  # the replicas never came up: "serving" would say they had
            gone = "it did not start" if self.replicas == 1 else "not all started"
            what = f"to serve {subject}{where}: {gone} (see starts)"
        lines = [f"lifeline conformance: {copies} of `{shlex.join(self.command)}` {what}"]
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
    timeout_s: float = REPLY_TIMEOUT_S,
    checks: Sequence[str] | None = None,
) -> Report:
    """Run the kit against `command` (an argv list, or one string split as a shell would) and
    return its Report. `env` is added to this process's environment for the replicas;
    `timeout_s` is how long an answer may take beyond the worker's measured pace (raise it for
    a model slower than that per call); `checks` names the checks to run (default: all of
    CHECKS; `starts` always runs first).

    Blocks; from a running event loop (an async test), it runs in a thread of its own. In async
    code, `await check_worker(...)` instead."""
    run = check_worker(command, provider, env, replicas, start_timeout_s, cwd, timeout_s, checks)
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
    timeout_s: float = REPLY_TIMEOUT_S,
    checks: Sequence[str] | None = None,
) -> Report:
    """run_checks, for a caller already in an event loop."""
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if not argv:
        raise ValueError("no worker command given")
    if (problem := provider_problem(provider)) is not None:
        raise ValueError(problem)
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    if not timeout_s > 0:
        raise ValueError(f"the timeout must be more than 0 s, got {timeout_s}")
    if (problem := checks_problem(checks or ())) is not None:
        raise ValueError(problem)
    chosen = frozenset(checks or CHECKS)
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
            # A cluster's list, as the README promises workers: here the one server twice.
            "NATS_URL": f"{server.url},{server.url}",
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
                if isinstance(exc, FileNotFoundError):
                    got += _off_path(argv[0], {**os.environ, **extra}.get("PATH"))
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
                    report.checks += await _Checks(wire, running, monitor, timeout_s, chosen).run()
    finally:
        if nc is not None:
            await nc.close()
        await _stop_all(running)
        report.logs = {replica.label: replica.tail() for replica in running}
        await asyncio.to_thread(server.stop)
        shutil.rmtree(logs_dir, ignore_errors=True)
    report.elapsed_s = time.monotonic() - started
    return report


def _off_path(program: str, path: str | None) -> str:
    """Where a command not found may be: beside this Python, as the README's `lifeline` is
    in `.venv/bin` when that virtualenv is not activated."""
    if os.sep in program or shutil.which(program, path=path):
        return ""
    beside = Path(sys.executable).parent
    if (beside / program).is_file():
        return f": `{program}` is not on PATH; there is one in {beside} (give its path)"
    return f": `{program}` is not on PATH"


def provider_problem(provider: str) -> str | None:
    """Why `provider` names no provider a config could hold, or None. The name makes the
    subject and the queue group: a dot, a space or a wildcard would make others."""
    if CONFIG_NAME.match(provider):  # the config's own rule for the name
        return None
    return f"the provider name {provider!r} is not 1 to 256 letters, digits, '_' and '-'"


def checks_problem(names: Sequence[str]) -> str | None:
    """Why `names` are not all names of CHECKS, or None."""
    unknown = [name for name in names if name not in CHECKS]
    if not unknown:
        return None
    return f"no check named {', '.join(map(repr, unknown))}: the checks are {', '.join(CHECKS)}"


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

    def describe(self, subject: str | None = None, subs: list[_Sub] | None = None) -> str:
        """How the replicas subscribed to `subject` (the provider's), for a failure's detail."""
        subject = subject or self.subject
        parts = [
            f"connection {s.cid}{f' ({s.client})' if s.client else ''}"
            + (f" as {s.subject}" if s.subject != subject else "")
            + " in "
            + (f"queue group {s.queue}" if s.queue else "NO queue group")
            for s in (self.seen if subs is None else subs)
            if _covers(s.subject, subject)
        ]
        return f"the server saw {subject} subscribed by " + ("; ".join(parts) or "no connection")

    def listing(self, subs: list[_Sub]) -> str:
        """Every subscription the server saw (before the kit connects: the replicas'), for a
        worker that subscribed to something else than its subject: a name of its own, say."""
        seen = [
            f"connection {s.cid}{f' ({s.client})' if s.client else ''}: {s.subject} in "
            + (f"queue group {s.queue}" if s.queue else "NO queue group")
            for s in subs[:LOG_LINES]
        ]
        name = f"<{PROVIDER_ENV}>"
        return (
            f"subscribe to {subjects.provider_subject(name)} in the queue group "
            f"{subjects.provider_queue(name)}; the server saw "
            + ("; ".join(seen) or "no subscription at all")
        )

    def cancel_problem(self, subs: list[_Sub]) -> str | None:
        """What keeps some replica from hearing every cancel, read from the server's own
        subscriptions (not left to chance: a cancel in a queue group reaches one replica at
        random, so it stops the right attempt only now and then), or None."""
        cancels = [s for s in subs if _covers(s.subject, self.cancel_subject)]
        queued = [s for s in cancels if s.queue]
        if queued:
            first = queued[0]
            return f"connection {first.cid} subscribed to it in the queue group {first.queue}"
        hearing, serving = {s.cid for s in cancels}, self.serving(subs)
        if len(hearing) < len(serving):
            return (
                f"{count(len(hearing), 'connection')} subscribed to it, "
                f"for {len(serving)} serving {self.subject}"
            )
        return None


def _covers(pattern: str, subject: str) -> bool:
    """Whether a subscription to `pattern` (NATS wildcards * and >) receives `subject`."""
    want, tokens = subject.split("."), pattern.split(".")
    for i, token in enumerate(tokens):
        if token == ">":
            return len(want) > i
        if i >= len(want) or token not in ("*", want[i]):
            return False
    return len(tokens) == len(want)


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
            replicas = count(want, "replica")
            expected = f"{replicas} subscribed to {monitor.subject} within {timeout_s:g} s"
            exits = [f"{r.label} exited with status {r.exit_status}" for r in dead]
            got = f"{len(serving)} ({'; '.join(exits) or 'still waiting'})"
            return _fail(
                "starts",
                expected,
                got,
                f"{PROVIDER_ENV}={monitor.subject.removeprefix(subjects.PROVIDER_PREFIX)}, "
                "LIFELINE_TEST_MODE=1 and NATS_URL, a comma-separated list of servers as for a "
                "cluster (README: Write your own provider), were set; their output is below",
                monitor.listing(subs),
            )
        await asyncio.sleep(0.05)
    cancel_by = time.monotonic() + 1.0
    while time.monotonic() < cancel_by:
        if {s.cid for s in subs if _covers(s.subject, monitor.cancel_subject)} >= serving:
            break
        await asyncio.sleep(0.05)
        subs = await monitor.subscriptions()
    monitor.seen = subs
    return _ok("starts")


# ---- the wire -----------------------------------------------------------------------------


@dataclass
class _Event:
    what: str  # "reply", "chunk", "no_responders" or "stray" (on a subject the kit never gave)
    data: bytes
    headers: dict[str, str] | None
    after_s: float  # since the request was sent
    subject: str = ""


@dataclass
class _Exchange:
    """One request the kit sent, and everything that came back for it, in arrival order."""

    sent_at: float
    label: str = ""  # the check that sent it
    events: list[_Event] = field(default_factory=list)

    @property
    def replies(self) -> list[_Event]:
        return [e for e in self.events if e.what == "reply"]

    @property
    def strays(self) -> list[_Event]:
        """What came under this request's reply subject, but not on it (nor on its stream)."""
        return [e for e in self.events if e.what == "stray"]

    @property
    def unheard(self) -> bool:
        """The server answered "no responders": no replica was subscribed."""
        return any(e.what == "no_responders" for e in self.events)

    @property
    def settled(self) -> bool:
        """Something came that ends the wait for a reply (a stray one counts: it will not be
        followed by a reply on the right subject)."""
        return any(e.what != "chunk" for e in self.events)


class _Wire:
    """Sends requests to llm.provider.<name> and collects what comes back for each.

    One subscription takes everything (<inbox>.<n>.r for replies, <inbox>.<n>.s for a stream's
    chunks), so events arrive in the order the server delivered them: a chunk after its reply
    is seen as such. Anything else under the inbox (a reply sent to <inbox>.<n>.r.x) is a
    stray, never a reply. The subscription stays open to the end of the run, so a late second
    reply is counted too."""

    def __init__(self, nc: Client, provider: str) -> None:
        self.nc = nc
        self.provider = provider
        self.subject = subjects.provider_subject(provider)
        self.inbox = nc.new_inbox()
        self.exchanges: dict[str, _Exchange] = {}
        self.strays: list[_Event] = []  # every stray, whichever request it was near
        self._changed = asyncio.Event()
        self._n = 0

    async def start(self) -> None:
        await self.nc.subscribe(self.inbox + ".>", cb=self._on_msg, pending_msgs_limit=-1)
        await ensure_subscribed(self.nc)

    async def _on_msg(self, msg: Msg) -> None:
        token, _, kind = msg.subject[len(self.inbox) + 1 :].partition(".")
        exchange = self.exchanges.get(token)
        headers = msg.headers
        what = {"r": "reply", "s": "chunk"}.get(kind, "stray") if exchange else "stray"
        if what == "reply" and not msg.data and headers and headers.get("Status") == "503":
            what = "no_responders"
        sent_at = exchange.sent_at if exchange is not None else time.monotonic()
        event = _Event(what, msg.data, headers, time.monotonic() - sent_at, msg.subject)
        if what == "stray":
            self.strays.append(event)
        if exchange is not None:
            exchange.events.append(event)
        self._changed.set()

    async def send(
        self,
        body: bytes,
        *,
        deadline_in_s: float = 30.0,
        attempt_id: str | None = None,
        stream: bool = False,
        label: str = "",
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
        exchange = self.exchanges[token] = _Exchange(time.monotonic(), label)
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

    async def linger(self, wait_s: float) -> None:
        """Listen until `wait_s` after the last first reply so far: for a late second reply."""
        firsts = [x.sent_at + x.replies[0].after_s for x in self.exchanges.values() if x.replies]
        if firsts:
            await asyncio.sleep(max(0.0, max(firsts) + wait_s - time.monotonic()))

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


# A 1x1 PNG, inline, for the whole chat request below.
PIXEL = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5Er"
    "kJggg=="
)
WEATHER = Tool(
    "get_weather",
    "The weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
RICH = "a request of the whole chat request's shape (parts, images, tool calls, tools)"


def rich_request_body() -> bytes:
    """A valid ProviderRequest as a dispatcher sends one for a real conversation: content in
    parts (text, an image by URL and inline), an assistant's tool call with null content, the
    tool's result, tools and the other parameters set. A worker may refuse what its model
    cannot take (a failure), but must answer."""
    call = ToolCall("call_1", "get_weather", '{"city": "Lyon"}')
    request = ProviderRequest(
        id=f"conformance-{secrets.token_hex(6)}",
        messages=[
            ChatMessage("system", "You are a weather assistant."),
            ChatMessage(
                "user",
                [TextPart("Weather here?"), ImagePart(url="https://example.com/street.jpg")],
            ),
            ChatMessage("assistant", None, tool_calls=[call]),
            ChatMessage("tool", "21 °C, clear", tool_call_id="call_1"),
            ChatMessage(
                "user",
                [TextPart("And in this picture?"), ImagePart(data=PIXEL, media_type="image/png")],
            ),
        ],
        max_tokens=64,
        temperature=0.2,
        top_p=0.9,
        tools=[WEATHER],
        tool_choice="auto",
        parallel_tool_calls=True,
        stop=["\n\n"],
        seed=7,
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
    when = f" {event.after_s * 1000:.0f} ms after sending"
    if event.what == "stray":
        return (
            f"a message on {event.subject}, a subject no request named: {event.data[:60]!r}{when}"
        )
    if event.what == "chunk":
        return f"a chunk on {subjects.STREAM_TO}: {event.data[:40]!r}{when}"
    reply = decode(event.data)
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
    return next(
        (e for x in exchanges for e in x.events if e.what in ("reply", "no_responders")), None
    )


def _reply_of(exchange: _Exchange) -> ProviderOk | ProviderFailure | str | None:
    """The first reply to `exchange`, decoded (a str says why it does not decode), or None."""
    event = _first_reply([exchange])
    return decode(event.data) if event is not None and event.what == "reply" else None


# ---- the checks ---------------------------------------------------------------------------

HELLO = "Say hello in five words."
STRAY_HINT = (
    "a reply goes to the request's reply subject exactly as it came (the message's reply "
    f"subject), with nothing added to it; chunks to its {subjects.STREAM_TO}"
)


class _Checks:
    """The checks of one run. Each sends its requests, waits, and judges what came; a check
    whose judgement can change with what comes later (a second reply, a reply past a deadline
    or a cancel, a late chunk, a stray) leaves it in `again`, judged once more at the end."""

    def __init__(
        self,
        wire: _Wire,
        running: list[_Replica],
        monitor: _Monitor,
        timeout_s: float,
        chosen: frozenset[str] = frozenset(CHECKS),
    ) -> None:
        self.wire = wire
        self.chosen = chosen  # the checks to run: the first request goes out for any of them
        self.running = running
        self.monitor = monitor
        self.provider = wire.provider
        self.timeout_s = timeout_s
        self.pace_s = 0.0  # how long the worker took to answer the first request, alone
        self.first: _Exchange | None = None
        self.again: dict[str, Callable[[], Check]] = {}

    async def run(self) -> list[Check]:
        """Every chosen check, in CHECKS' order. The first request goes alone (the worker's pace);
        the checks that wait run side by side; bad_request, which may crash a replica, after
        them; then the run listens for late replies, and survives_bad_input is last. A worker
        that gets its first request and sends nothing back is told so at once: every other
        check would wait out the same timeout for answers that will not come."""
        await self.pace()
        assert self.first is not None
        if not self.first.settled and self._alive():
            return self._unanswered()
        side_by_side = await asyncio.gather(
            *[self._run(name) for name in WAITING_CHECKS if name in self.chosen]
        )
        later = [await self._run(name) for name in LATER_CHECKS if name in self.chosen]
        await self.wire.linger(LATE_WAIT_S)
        results = [self._by_the_end(check) for check in (*side_by_side, *later)]
        if "survives_bad_input" in self.chosen:
            results.append(self.survives_bad_input())
        return sorted(results, key=lambda check: CHECKS.index(check.name))

    async def _run(self, name: str) -> Check:
        check: Callable[[], Awaitable[Check]] = getattr(self, name)
        return await check()

    def _unanswered(self) -> list[Check]:
        """The checks of a run whose first request got nothing back: replies_decode fails
        saying so, survives_bad_input is judged, and the checks that need answers are not run
        (a deadline's or a cancel's silence would pass for the wrong reason)."""
        assert self.first is not None
        waited = self.timeout_s
        expected = "a ProviderOk (status ok) with a model string for a valid ProviderRequest"
        first = self._wrong("replies_decode", expected, self.first, waited)
        results = [first]  # the reason for the rest, chosen or not
        if "survives_bad_input" in self.chosen:
            results.append(self.survives_bad_input())
        for name in CHECKS:
            if name in self.chosen and name not in (
                "starts",
                "replies_decode",
                "survives_bad_input",
            ):
                got = f"not run: the first request got no reply within {waited:g} s"
                results.append(_fail(name, "a worker that answers", got, "see replies_decode"))
        return sorted(results, key=lambda check: CHECKS.index(check.name))

    def _by_the_end(self, check: Check) -> Check:
        """A passed check judged again on everything its requests got in the whole run."""
        judge = self.again.get(check.name)
        return judge() if check.passed and judge is not None else check

    # -- waiting, and saying what did not come

    async def pace(self) -> None:
        """The first request, alone: how long the worker takes for one call, added to every
        later wait once per call that may be queued ahead of the last one."""
        self.first = await self.wire.ask(HELLO, label="replies_decode")
        await self._answers([self.first], self.timeout_s)
        if self.first.replies:
            self.pace_s = self.first.replies[0].after_s

    def wait_s(self, calls: int) -> float:
        """How long to wait for the answers to `calls` model calls sent at once."""
        return self.timeout_s + self.pace_s * calls

    @property
    def cuts_ordinary(self) -> bool:
        """Whether the worker's own calls are slow enough to be cut short (ORDINARY_MIN_S)."""
        return self.pace_s >= ORDINARY_MIN_S

    def side_by_side_s(self) -> float:
        """How long to wait for answers while the checks run side by side."""
        return self.wait_s(SIDE_BY_SIDE_CALLS + (ORDINARY_CALLS if self.cuts_ordinary else 0))

    async def _answers(self, exchanges: list[_Exchange], timeout_s: float) -> None:
        """Until each exchange has its reply (or a stray, or no responders), every replica has
        exited, or timeout_s has passed."""
        await self.wire.until(
            lambda: all(x.settled for x in exchanges) or not self._alive(), timeout_s
        )

    def _wrong(
        self,
        name: str,
        expected: str,
        exchange: _Exchange,
        waited_s: float,
        *detail: str,
        timed: bool = True,
    ) -> Check:
        """A failure for an exchange whose reply is not what `expected` says: the reply shown,
        or, when none came, why none did (a stray, the time waited)."""
        event = _first_reply([exchange])
        if event is not None:
            return _fail(name, expected, show(event), *detail, self._dead())
        if exchange.strays:
            stray = exchange.strays[0]
            got = f"no reply on its reply subject, but {show(stray)}"
            return _fail(name, expected, got, STRAY_HINT, *detail, self._dead())
        got = f"no reply within {waited_s:.3g} s"
        hint = self._timeout_hint(waited_s) if timed and self._alive() else ""
        return _fail(name, expected, got, hint, *detail, self._dead())

    def _timeout_hint(self, waited_s: float) -> str:
        pace = (
            f" plus {self.pace_s:.2g} s (the first request's time) for each call sent with it"
            if self.pace_s
            else ""
        )
        late = ""
        if not self.pace_s and self.first is not None and self.first.replies:
            late = f" (the first request was answered after {self.first.replies[0].after_s:.2g} s)"
        if not any(x.settled for x in self.wire.exchanges.values()):
            late = " (and no request of the run got a reply: does the worker answer at all?)"
        return (
            f"the kit waited {waited_s:.3g} s: the timeout ({self.timeout_s:g} s){pace}{late}; "
            "for a worker this slow, raise it: `lifeline conformance --timeout SECONDS`"
        )

    def _alive(self) -> bool:
        return any(r.exit_status is None for r in self.running)

    def _dead(self) -> str:
        """Which replicas have exited, for a failure's detail ("" when none has)."""
        dead = [r for r in self.running if r.exit_status is not None]
        exits = ", ".join(f"{r.label} exited with status {r.exit_status}" for r in dead)
        return f"meanwhile {exits}" if dead else ""

    def _judge(self, name: str, judge: Callable[[], Check]) -> Check:
        """`judge()` now, and again at the end of the run."""
        self.again[name] = judge
        return judge()

    # -- the checks

    async def replies_decode(self) -> Check:
        name = "replies_decode"
        assert self.first is not None
        sent = [
            self.first,
            *[await self.wire.ask(HELLO, label=name) for _ in range(SPREAD // 2 - 1)],
        ]
        rich = await self.wire.send(rich_request_body(), label=name)
        waited = self.side_by_side_s()
        await self._answers([*sent, rich], waited)
        return self._judge(name, lambda: self._replies_decode(sent, rich, waited))

    def _replies_decode(self, sent: list[_Exchange], rich: _Exchange, waited_s: float) -> Check:
        name = "replies_decode"
        for exchange in sent:
            reply = _reply_of(exchange)
            # An empty `model` is no breach: the dispatcher puts the target's in its place.
            if not isinstance(reply, ProviderOk):
                return self._wrong(
                    name,
                    "a ProviderOk (status ok) with a model string for a valid ProviderRequest",
                    exchange,
                    waited_s,
                )
        if not isinstance(_reply_of(rich), ProviderOk | ProviderFailure):
            return self._wrong(
                name,
                f"a ProviderOk, or a ProviderFailure for what the model cannot take, for {RICH}",
                rich,
                waited_s,
                "a message's content is a string, a list of parts (text, image by url or "
                "data) or, for an assistant's tool calls, null: read every shape",
                timed=False,  # the plain requests sent with it were answered
            )
        if self.wire.strays:
            strays = self.wire.strays
            return _fail(
                name,
                "every reply on its request's reply subject (and chunks on its "
                f"{subjects.STREAM_TO}), nothing on other subjects",
                f"{count(len(strays), 'message')} elsewhere; the first: {show(strays[0])}",
                STRAY_HINT,
            )
        return _ok(name)

    async def bad_request(self) -> Check:
        name = "bad_request"
        bodies = {
            "a body that is not JSON": b"this is not JSON {",
            "JSON of the wrong shape (messages not a list)": b'{"id": 7, "messages": "hello"}',
            "a JSON array": b"[1, 2, 3]",
            "an object without messages": b'{"id": "conformance-no-messages"}',
            # What a JSON parser may raise other than its syntax error (Python's json: a
            # UnicodeDecodeError, a RecursionError), left unanswered by a worker catching only that.
            "a body that is not UTF-8": b"\xc3\x28 is not UTF-8, nor JSON",
            "JSON nested too deeply": b"[" * NESTING + b"]" * NESTING,
        }
        sent = [
            (what, await self.wire.send(body, label=name))
            for what, body in bodies.items()
            for _ in "ab"
        ]
        waited = BAD_REPLY_TIMEOUT_S + self.pace_s
        await self._answers([x for _, x in sent], waited)
        for what, exchange in sent:
            reply = _reply_of(exchange)
            if not (isinstance(reply, ProviderFailure) and reply.kind == "bad_request"):
                expected = f"a ProviderFailure of kind bad_request for {what}"
                hint = (
                    "any error reading a body (its parser's, a decoding's, a recursion's: not "
                    "only a syntax error) is answered as a bad_request failure"
                )
                return self._wrong(name, expected, exchange, waited, hint, timed=False)
        after = [await self.wire.ask("Still there?", label=name) for _ in range(SPREAD)]
        waited = self.wait_s(SPREAD)
        await self._answers(after, waited)
        for exchange in after:
            if not isinstance(_reply_of(exchange), ProviderOk):
                expected = "a ProviderOk for a valid request sent after the malformed ones"
                return self._wrong(name, expected, exchange, waited)
        return _ok(name)

    async def deadline(self) -> Check:
        name = "deadline"
        late = [  # half of them streamed: a worker may check on arrival only what it answers
            await self.wire.ask(
                "Too late for this.", deadline_in_s=-1.0, stream=i % 2 == 1, label=name
            )
            for i in range(SPREAD // 2)
        ]
        working = [  # still working when the deadline passes; half of them streamed
            await self.wire.ask(
                f"lifeline-test: sleep {DEADLINE_SLEEP_MS}",
                deadline_in_s=DEADLINE_AFTER_S,
                stream=i % 2 == 1,
                label=name,
            )
            for i in range(SPREAD // 2)
        ]
        ordinary: list[_Exchange] = []  # the provider's own calls: cut short the same way
        if self.cuts_ordinary:
            ordinary = [
                await self.wire.ask(
                    HELLO, deadline_in_s=DEADLINE_AFTER_S, stream=i % 2 == 1, label=name
                )
                for i in range(SPREAD // 2)
            ]
        await asyncio.sleep(DEADLINE_WAIT_S + (self.pace_s if ordinary else 0.0))
        return self._judge(name, lambda: self._deadline(late, working, ordinary))

    def _deadline(
        self, late: list[_Exchange], working: list[_Exchange], ordinary: list[_Exchange]
    ) -> Check:
        name = "deadline"
        answered = [x for x in late if x.events]
        if answered:
            return _fail(
                name,
                f"no reply or chunk for a request whose {subjects.DEADLINE_MS} had passed "
                f"(half of them with {subjects.STREAM_TO}; listened {DEADLINE_WAIT_S:g} s, and "
                "to the end of the run)",
                f"something for {len(answered)} of {len(late)}",
                f"first: {show(answered[0].events[0])}",
                "a worker drops a request past its deadline: the dispatcher no longer waits",
            )
        directive = f"lifeline-test: sleep {DEADLINE_SLEEP_MS}"
        deadline = (
            f"the deadline {DEADLINE_AFTER_S * 1000:.0f} ms after sending; "
            f"{DEADLINE_GRACE_S * 1000:.0f} ms of grace"
        )
        cut_short = (
            (working, "a request", f"{directive!r}, {deadline}", DEADLINE_HINT),
            (
                ordinary,
                "an ordinary request (no directive)",
                f"the worker's first call took {self.pace_s:.2g} s; {deadline}",
                ORDINARY_HINT.format(what="the deadline"),
            ),
        )
        past = DEADLINE_AFTER_S + DEADLINE_GRACE_S
        for sent, what, how, hint in cut_short:
            worked = [x for x in sent if any(e.after_s > past for e in x.events)]
            if worked:
                return _fail(
                    name,
                    f"nothing (no reply, no chunk) past the {subjects.DEADLINE_MS} of {what} "
                    f"still worked on when it passed ({how})",
                    f"something for {len(worked)} of {len(sent)}",
                    f"first: {show(next(e for e in worked[0].events if e.after_s > past))}",
                    hint,
                )
        return _ok(name)

    async def cancel(self) -> Check:
        name = "cancel"
        cancel_subject = subjects.cancel_subject(self.provider)
        subs = await self.monitor.subscriptions()
        hears = (
            f"every replica subscribes to {cancel_subject} in NO queue group, so that each "
            "hears every cancel and the one running the attempt stops it (in a queue group, a "
            "cancel reaches one replica at random)"
        )
        problem = self.monitor.cancel_problem(subs)
        if problem is not None:
            return _fail(
                name,
                f"every replica subscribed to {cancel_subject} in no queue group",
                problem,
                hears,
                self.monitor.describe(cancel_subject, subs),
            )
        directive = f"lifeline-test: sleep {SLEEP_MS}"
        # A streamed attempt too: a worker may stop only the calls it answers at once.
        attempts: dict[str, _Exchange] = {}
        for stream in (False, True):
            attempt = f"conformance-cancel-{secrets.token_hex(4)}"
            attempts[attempt] = await self.wire.ask(
                directive, attempt_id=attempt, stream=stream, label=name
            )
        cancelled, streamed = attempts.values()
        kept = await self.wire.ask(directive, label=name)
        # The provider's own calls, when they are as slow as the first: cancelled alike, and
        # one kept, whose answer says when theirs would have come.
        ordinary: dict[str, tuple[_Exchange, str]] = {}  # attempt -> its exchange, how sent
        clocks = [kept]
        if self.cuts_ordinary:
            for stream in (False, True):
                attempt = f"conformance-cancel-{secrets.token_hex(4)}"
                exchange = await self.wire.ask(HELLO, attempt_id=attempt, stream=stream, label=name)
                ordinary[attempt] = exchange, f", with {subjects.STREAM_TO}" if stream else ""
            clocks.append(await self.wire.ask(HELLO, label=name))
        await self.wire.nc.flush()
        await asyncio.sleep(CANCEL_AFTER_S)
        for attempt in (*attempts, *ordinary):
            await self.wire.nc.publish(cancel_subject, attempt.encode())
        await self.wire.nc.flush()
        cancelled_at = time.monotonic()
        # Both sleeps started together: once the kept one has answered, the cancelled one would
        # have too, give or take; so listen a little past that, or CANCEL_WAIT_S in all.
        waited = CANCEL_WAIT_S + self.pace_s
        longest = self.side_by_side_s() if ordinary else waited
        await self.wire.until(lambda: all(x.settled for x in clocks), longest - CANCEL_AFTER_S)
        if all(x.replies for x in clocks):
            await asyncio.sleep(QUIET_S + 0.2)
        else:
            await asyncio.sleep(max(0.0, waited - (time.monotonic() - cancelled.sent_at)))
        where = self.monitor.describe(cancel_subject, subs)

        def judge() -> Check:
            check = self._cancel(cancelled, streamed, kept, waited, hears, where)
            if not check.passed:
                return check
            return self._cancel_ordinary(list(ordinary.values()), cancelled_at)

        return self._judge(name, judge)

    def _cancel(
        self,
        cancelled: _Exchange,
        streamed: _Exchange,
        kept: _Exchange,
        waited_s: float,
        hears: str,
        where: str,
    ) -> Check:
        """The directive's attempts."""
        name = "cancel"
        directive = f"lifeline-test: sleep {SLEEP_MS}"
        cancel_subject = subjects.cancel_subject(self.provider)
        for exchange, how in ((cancelled, ""), (streamed, f", with {subjects.STREAM_TO}")):
            if not exchange.events:
                continue
            event = exchange.events[0]
            seen = ""  # the server's cancel subscriptions, when the cancel may have gone unheard
            if event.after_s < CANCEL_AFTER_S:
                hint = (
                    "it answered before the cancel was sent: is `lifeline-test: sleep` obeyed "
                    f"({TEST_MODE_ENV}=1)?"
                )
            elif event.after_s < SLEEP_MS / 1000:  # heard, and answered, not run to its end
                hint = (
                    "it answered once the cancel came: a cancelled attempt is stopped and sent "
                    "nothing, not even a failure (the dispatcher has stopped waiting for it)"
                )
            else:
                hint = f"the cancel's body is the {subjects.ATTEMPT_ID} header's value; {hears}"
                seen = where
            return _fail(
                name,
                f"no reply or chunk to an attempt ({directive!r}{how}) cancelled on "
                f"{cancel_subject} {CANCEL_AFTER_S * 1000:.0f} ms after it was sent",
                show(event),
                hint,
                seen,
            )
        if not isinstance(_reply_of(kept), ProviderOk):
            return self._wrong(
                name,
                f"a ProviderOk for an attempt not cancelled ({directive!r})",
                kept,
                waited_s,
                f"in test mode ({TEST_MODE_ENV}=1) `lifeline-test: sleep <ms>` waits, then "
                "answers ok",
                timed=False,
            )
        return _ok(name)

    def _cancel_ordinary(self, ordinary: list[tuple[_Exchange, str]], cancelled_at: float) -> Check:
        """The provider's own calls cancelled: nothing from them once the cancel has had
        DEADLINE_GRACE_S to reach the worker (before, it may have been answering already)."""
        name = "cancel"
        for exchange, how in ordinary:
            by = cancelled_at - exchange.sent_at + DEADLINE_GRACE_S
            after = [e for e in exchange.events if e.after_s > by]
            if after:
                return _fail(
                    name,
                    f"nothing (no reply, no chunk) for an ordinary attempt (no directive{how}; "
                    f"the worker's first call took {self.pace_s:.2g} s) from "
                    f"{DEADLINE_GRACE_S * 1000:.0f} ms after a cancel on "
                    f"{subjects.cancel_subject(self.provider)} named it, "
                    f"{CANCEL_AFTER_S * 1000:.0f} ms after it was sent",
                    show(after[0]),
                    ORDINARY_HINT.format(what="a cancel"),
                )
        return _ok(name)

    async def one_reply_per_request(self) -> Check:
        name = "one_reply_per_request"
        sent = [await self.wire.ask(f"Request {i} of a burst.", label=name) for i in range(BURST)]
        waited = self.side_by_side_s()
        await self._answers(sent, waited)
        await asyncio.sleep(QUIET_S)
        return self._judge(name, lambda: self._one_reply(sent, waited))

    def _one_reply(self, sent: list[_Exchange], waited_s: float) -> Check:
        name = "one_reply_per_request"
        queue, subject = self.monitor.queue, self.wire.subject
        elsewhere = {s.queue for s in self.monitor.seen if s.subject == subject} - {queue}
        counts = [len(x.replies) for x in sent]
        twice = sum(count > 1 for count in counts)
        missing = [x for x in sent if not x.replies]
        if not missing and not (twice and elsewhere):
            if twice or not elsewhere:  # in the queue group, and yet answered twice
                return self._no_second_reply()
            return _fail(  # one reply here, but two beside a Lifeline worker of the provider
                name,
                f"every replica subscribed to {subject} in the queue group {queue}",
                ", ".join(sorted(f"queue group {q}" if q else "NO queue group" for q in elsewhere)),
                self.monitor.describe(),
            )
        strays = [e for x in missing for e in x.strays]
        got = [f"{twice} with more than one reply"] if twice else []
        if missing and strays:
            got.append(f"{len(missing)} with none on their reply subject, but {show(strays[0])}")
        elif missing:
            got.append(f"{len(missing)} with none within {waited_s:.3g} s")
        timed_out = missing and not strays and not twice and self._alive()
        return _fail(
            name,
            f"exactly one reply to each of {BURST} requests sent at once",
            " and ".join(got) + f" ({sum(counts)} replies in all)",
            f"each replica must subscribe to {subject} in the queue group {queue}, so that one "
            "of them gets each request"
            if twice
            else "",
            self.monitor.describe() if twice else "",
            self._timeout_hint(waited_s) if timed_out else "",
            STRAY_HINT if strays else "",
            self._dead(),
        )

    def _no_second_reply(self) -> Check:
        """Every request of the whole run, not only the burst: at most one reply each."""
        name = "one_reply_per_request"
        twice = [x for x in self.wire.exchanges.values() if len(x.replies) > 1]
        if not twice:
            return _ok(name)
        replies = twice[0].replies
        later_ms = (replies[1].after_s - replies[0].after_s) * 1000
        sent_by = ", ".join(sorted({x.label for x in twice}))
        return _fail(
            name,
            "at most one reply to every request the kit sent (listened until "
            f"{LATE_WAIT_S:g} s after the last first reply)",
            f"{count(len(twice), 'request')} with more than one reply "
            f"(sent by {sent_by}); the first got {len(replies)}, the second {later_ms:.0f} ms "
            f"after the first: {show(replies[1])}",
            "answer each request once: no second reply on an error path, a timer or a retry "
            "after the first was sent (the dispatcher takes the first and counts the rest as a "
            "broken protocol)",
        )

    async def streaming(self) -> Check:
        name = "streaming"
        text = "Stream me a story."
        sent = [await self.wire.ask(text, stream=True, label=name) for _ in range(STREAMS)]
        # The text to compare with, asked twice: a model answering it the same both times
        # answers it so streamed too, so any other text there is a piece lost or repeated.
        unstreamed = [await self.wire.ask(text, label=name) for _ in range(2)]
        waited = self.side_by_side_s()
        await self._answers([*sent, *unstreamed], waited)
        await asyncio.sleep(QUIET_S)
        return self._judge(name, lambda: self._streaming(sent, unstreamed, waited))

    def _streaming(
        self, sent: list[_Exchange], unstreamed: list[_Exchange], waited_s: float
    ) -> Check:
        name = "streaming"
        expected = (
            f"text chunks (or tool_call events) on {subjects.STREAM_TO}, then one ProviderOk "
            "whose `chunks` counts them, then nothing (or no chunk and chunks=0)"
        )
        said = [
            r.content if isinstance(r, ProviderOk) else None for r in map(_reply_of, unstreamed)
        ]
        for exchange in sent:
            chunks = sum(e.what == "chunk" for e in exchange.events)
            if not exchange.settled and chunks:
                got = f"{count(chunks, 'chunk')}, then no reply within {waited_s:.3g} s"
                hint = "after the chunks, one reply ends the stream: a ProviderOk counting them"
                last = exchange.events[-1]
                if isinstance(decode(last.data), ProviderOk | ProviderFailure):
                    hint = (
                        f"the last chunk is a reply, {show(replace(last, what='reply'))}"
                        f": it goes to the request's reply subject, not {subjects.STREAM_TO}"
                    )
                return _fail(name, expected, got, hint, self._dead())
            if not exchange.replies and not exchange.unheard:
                return self._wrong(name, expected, exchange, waited_s)
            max_chunk = self.wire.nc.max_payload - STREAM_HEADER_ROOM
            problem = _stream_problem(exchange, said[0], max_chunk, steady=said[0] == said[1])
            if problem is not None:
                got, hint = problem
                return _fail(name, expected, got, hint, self._dead())
        return _ok(name)

    async def error_kinds(self) -> Check:
        name = "error_kinds"
        cases = [
            (
                f"lifeline-test: fail {status}"
                + (f" retry_after {retry_after:g}" if retry_after is not None else ""),
                classify_status(status),
                status,
                retry_after,
                stream,
            )
            # A streamed call fails before its first chunk with the same kinds (a 429 when
            # the stream is asked for, say): a worker may map them on one path only.
            for statuses, stream in ((STATUSES, False), (STREAMED_STATUSES, True))
            for status, retry_after in statuses
        ]
        sent = [
            await self.wire.ask(directive, stream=stream, label=name)
            for directive, *_, stream in cases
        ]
        waited = self.timeout_s + self.pace_s
        await self._answers(sent, waited)
        wrong = []
        for case, exchange in zip(cases, sent, strict=True):
            _, kind, status, retry_after, _ = case
            reply = _reply_of(exchange)
            if not (
                isinstance(reply, ProviderFailure)
                and (reply.kind, reply.status_code, reply.retry_after_s)
                == (kind, status, retry_after)
            ):
                wrong.append((case, exchange))
        if wrong:
            (directive, kind, status, retry_after, stream), exchange = wrong[0]
            others = ", ".join(
                f"{case[2]}{' streamed' if case[4] else ''}" for case, _ in wrong[1:]
            )
            how = f" with {subjects.STREAM_TO}" if stream else ""
            return self._wrong(
                name,
                f"a ProviderFailure with kind {kind}, status_code {status} and retry_after_s "
                f"{retry_after} for {directive!r}{how}",
                exchange,
                waited,
                f"wrong too: the failures for {others}" if others else "",
                f"an HTTP status maps to a kind as {STATUS_MAP} (schemas.errors.classify_status); "
                f"in test mode ({TEST_MODE_ENV}=1) `lifeline-test: fail <status>` fails with "
                "that kind, status_code <status> and retry_after_s as asked",
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


def _stream_problem(
    exchange: _Exchange, said: str | None, max_chunk: int, steady: bool = False
) -> tuple[str, str] | None:
    """What is wrong with one streamed exchange's events, and a hint, or None. `said` is the
    text the same request got unstreamed (None when it got none): the stream is compared with
    it only where a difference cannot be a model answering differently; `steady`, the model
    answered it so twice (not sampling), lets a piece lost or repeated be told."""
    if exchange.unheard:
        return "no responders (no replica subscribed)", ""
    replies = exchange.replies
    if len(replies) > 1:
        later_ms = (replies[1].after_s - replies[0].after_s) * 1000
        got = f"{len(replies)} replies to one request, the second {later_ms:.0f} ms after the first"
        return got, "one reply ends a stream: nothing after it, not even the same reply again"
    if not replies:
        return "no reply", ""
    events = [e for e in exchange.events if e.what != "stray"]
    at = events.index(replies[0])
    before, after = events[:at], events[at + 1 :]
    reply = decode(replies[0].data)
    if not isinstance(reply, ProviderOk):
        return f"{show(replies[0])} after {count(len(before), 'chunk')}", ""
    if not before and reply.chunks == 0 and not after:
        return None  # a worker that does not stream answers once; the dispatcher streams that
    if reply.chunks != len(before):
        got = f"{count(len(before), 'chunk')}, and then a ProviderOk with chunks={reply.chunks}"
        return got, ""
    if after:
        return f"{count(len(after), 'chunk')} after the reply", ""
    pieces = []
    calls: set[int] = set()  # the tool calls whose first piece came
    for i, chunk in enumerate(before, 1):
        if len(chunk.data) > max_chunk:
            got = f"chunk {i} of {len(chunk.data)} bytes, over {max_chunk}"
            hint = (
                "keep each piece under the server's max_payload less 1 KiB, room for the "
                "dispatcher's headers: it fails a larger one (README: Provider workers)"
            )
            return got, hint
        event = (chunk.headers or {}).get(subjects.EVENT)
        if event is not None and event != "tool_call":  # the spec's text piece has none
            got = f"chunk {i} with the header {subjects.EVENT}: {event!r}"
            return got, f"a text piece is bare: only a tool-call piece has {subjects.EVENT}"
        if event == "tool_call":
            try:
                delta = tool_call_delta_decoder.decode(chunk.data)
            except msgspec.DecodeError as exc:
                return f"chunk {i}, a tool_call event, is no ToolCallDelta ({exc})", ""
            if delta.index not in calls:
                calls.add(delta.index)
                lacks = " and ".join(f for f in ("id", "name") if not getattr(delta, f))
                if lacks:
                    got = (
                        f"chunk {i}, the first piece of tool call {delta.index} without its {lacks}"
                    )
                    hint = (
                        "a call's first piece carries its id and name, as clients read them "
                        "(README: Streaming: llm.stream)"
                    )
                    return got, hint
            continue
        try:
            pieces.append(chunk.data.decode())
        except UnicodeDecodeError:
            return f"chunk {i} is not UTF-8 text: {chunk.data[:40]!r}", ""
    problem = _text_problem("".join(pieces), reply.content, len(pieces), said)
    if problem is None and steady and said:
        problem = _pieces_problem([*pieces, reply.content], said)
    return problem


def _pieces_problem(pieces: list[str], said: str) -> tuple[str, str] | None:
    """A piece published twice or lost, told from a text the model answers differently
    streamed (a mock's separate streaming sample, say): `said` is what the same request got
    unstreamed, twice alike; a piece repeated when leaving pieces out makes it, a piece lost
    when it holds every piece, in order, with text between."""
    whole = "".join(pieces)
    if whole == said:
        return None
    at = 0
    for piece in pieces:  # the pieces `said` starts with, in turn, any others left out
        if said.startswith(piece, at):
            at += len(piece)
    if at == len(said):
        what = "a piece repeated"
    else:
        at = 0
        for piece in pieces:
            found = said.find(piece, at)
            if found < 0:
                return None  # another text: the model's, not the worker's doing
            at = found + len(piece)
        what = "a piece lost"
    got = (
        f"{count(len(pieces) - 1, 'text chunk')} reading {whole[:60]!r} joined as they came, "
        f"where the same request unstreamed was answered {said[:60]!r}, twice alike: {what}"
    )
    return got, "publish every piece once, in order: none lost, none repeated"


def _text_problem(
    streamed: str, content: str, pieces: int, said: str | None
) -> tuple[str, str] | None:
    """The streamed text against the final content and the unstreamed answer."""
    whole = streamed + content  # what the dispatcher passes on: the chunks, then the content
    if streamed and content and content in (streamed, said):
        got = (
            f"{count(pieces, 'text chunk')} reading {streamed[:40]!r}, then a ProviderOk whose "
            f"content repeats the text: {content[:40]!r}"
        )
        hint = (
            'content holds only what was not streamed (normally ""): the dispatcher sends it '
            "after the chunks, so the client would read the text twice"
        )
        return got, hint
    if said and whole != said and sorted(whole) == sorted(said):
        got = (
            f"{count(pieces, 'text chunk')} reading {whole[:60]!r} joined as they came, where "
            f"the same request unstreamed was answered {said[:60]!r}: the same text in another "
            "order"
        )
        hint = (
            "publish the pieces one after the other, in the text's order: they carry no "
            "number, so their order on the subject is the order the client reads"
        )
        return got, hint
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

        Takes run_checks' arguments (provider=, env=, replicas=, start_timeout_s=, cwd=,
        timeout_s=, checks=)."""
        return run_checks
