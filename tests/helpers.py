"""Every helper the tests share, in one module; the fixtures stay in conftest.py.

Test files import from here (`from helpers import ask, wait_for`); `python -m tests.soak`
imports it as `tests.helpers`. A helper two test files need belongs here, not copied.

    waiting         wait_for: poll the state a test needs instead of sleeping
    configs         fake, config, toml_value, write_config
    requests        USER_HELLO, ask, settled, AuditFeed, Ledger (per-id replies and audits)
    processes       ROOT, cli_env, run_lifeline, lifelines_side_by_side, spawn_lifeline,
                    wait_for_line, rest_of_output, LifelineProcess, Service (workers and
                    dispatchers as processes), free_port
    HTTP servers    LocalHTTPServer, serving, MisbehavingProvider (OpenAI's shapes, misbehaving)
    provider wire   MockServer, provider_fixture, expect_failure (httpx MockTransport)
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar, Self

import httpx
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas import AuditEvent, ProviderRequest, subjects
from schemas.wire import CompletionReply, audit_decoder, encoder, reply_decoder
from service.natsio import ensure_subscribed
from workers.base import Provider, ProviderError

ROOT = Path(__file__).resolve().parent.parent
# The API key the workers under test send: with a "/", which some JSON writers escape as "\/".
SECRET_KEY = "sk-contract-0123456789ab/cdefSECRET"
USER_HELLO = {"messages": [{"role": "user", "content": "Why did the chicken cross the road?"}]}


# ---- waiting ------------------------------------------------------------------------------

# How much sooner than its time a timer of the service may fire, as measured with
# time.monotonic(): a deadline is set on the event loop's clock, which uvloop reads once a turn
# and in whole milliseconds, and service.loop.Timeouts fires an entry within half a millisecond
# of it (CI once saw a 0.2 s timeout's attempt last 199.95 ms). A lower bound on how long
# something waited for a timer ("it waited for the timeout, not less") allows this much.
TIMER_SLACK_MS = 5.0


async def wait_for(
    condition: Callable[[], Any],
    timeout_s: float = 5.0,
    what: str | Callable[[], str] = "",
    interval_s: float = 0.01,
) -> Any:
    """Poll `condition` (a function; it may return an awaitable) until it gives something true,
    and return that. Fails the test when it has not within timeout_s, saying `what` (a text, or
    a function giving one then) or else the condition's source line.

    Wait on the state itself, never with a sleep: a sleep long enough on a loaded machine is
    needlessly long everywhere else, and one too short makes the test fail at random."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() >= deadline:
            detail = what() if callable(what) else what
            raise AssertionError(f"not so within {timeout_s:g} s: {detail or _source(condition)}")
        await asyncio.sleep(interval_s)


def _source(function: Callable[..., Any]) -> str:
    try:
        return inspect.getsource(function).strip()
    except (OSError, TypeError):
        return repr(function)


# ---- configs ------------------------------------------------------------------------------


def fake(**settings: Any) -> dict[str, Any]:
    return {"kind": "fake", **settings}


def config(
    providers: dict[str, dict[str, Any]], routes: dict[str, Any] | None = None, **dispatcher: Any
) -> dict:
    """A config dict; the default route tries the providers in the order given."""
    data: dict[str, Any] = {
        "providers": providers,
        "routes": routes if routes is not None else {"default": {"targets": list(providers)}},
    }
    if dispatcher:
        data["dispatcher"] = dispatcher
    return data


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """A config dict as TOML tables (one level of [section.name] nesting, as Lifeline's)."""
    lines: list[str] = []
    for section, body in config.items():
        flat = {k: v for k, v in body.items() if not isinstance(v, dict)}
        if flat:
            lines.append(f"[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in flat.items()]
        for name, table in body.items():
            if isinstance(table, dict):
                lines.append(f"[{section}.{name}]")
                lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- requests -----------------------------------------------------------------------------


async def ask(
    client: Client, request: dict[str, Any] | bytes, timeout_s: float = 5.0, **kw: Any
) -> CompletionReply:
    payload = request if isinstance(request, bytes) else encoder.encode(request)
    msg = await client.request(subjects.COMPLETE, payload, timeout=timeout_s, **kw)
    return reply_decoder.decode(msg.data)


async def published(client: Client) -> None:
    """Return once the server has every message `client` published so far. One nats-py
    flush() does not promise that: it writes its PING straight to the socket, ahead of
    publishes still in the client's pending buffer, so its PONG can come first (a test that
    stopped its dispatcher then saw requests it had sent answered "no responders" on Python
    3.12). service.natsio.ensure_subscribed flushes twice for the same reason."""
    await ensure_subscribed(client)


async def settled(client: Client, *stacks: Any) -> None:
    """Return once everything the stacks' dispatchers will ever send for the requests so far has
    reached `client`'s callbacks: a barrier for "no duplicate came", instead of a sleep.

    No request in flight means no more publishes; `published` on each dispatcher's connection
    means the server has routed what they published; on the client's then, that the server
    wrote those messages to it before its PONG; a few loop turns let the callbacks run."""
    for stack in stacks:
        await _idle(stack.dispatcher)
        await published(stack.components[-1].nc)
    await published(client)
    for _ in range(10):
        await asyncio.sleep(0)


async def _idle(dispatcher: Any) -> None:
    """Return once `dispatcher` has no request in flight."""
    assert dispatcher is not None
    await wait_for(
        lambda: not dispatcher.in_flight,
        10,
        what=lambda: f"{dispatcher.in_flight} requests still in flight",
        interval_s=0.005,
    )


class AuditFeed:
    """Every audit event on subjects.AUDIT_ALL, decoded (the `audit` fixture subscribes it)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, AuditEvent]] = []
        self.raw: list[bytes] = []
        self._changed = asyncio.Event()

    async def on_msg(self, msg: Any) -> None:
        self.raw.append(msg.data)
        self.events.append((msg.subject, audit_decoder.decode(msg.data)))
        self._changed.set()

    async def wait_for(self, count: int, timeout_s: float = 5.0) -> list[tuple[str, AuditEvent]]:
        async with asyncio.timeout(timeout_s):
            while len(self.events) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.events


class Ledger:
    """Sends requests on one inbox subscription and counts every reply and audit event per id.

    Each request gets its own reply subject `<inbox>.<n>`, so a second reply to the same
    request is seen (nc.request would drop it)."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.inbox = nc.new_inbox()
        self.ids: dict[str, str] = {}  # reply token -> request id
        self.sent_at: dict[str, float] = {}
        self.replies: Counter[str] = Counter()
        self.reply_of: dict[str, CompletionReply] = {}
        self.reply_after_s: dict[str, float] = {}
        self.audits: Counter[str] = Counter()
        self.audit_types: dict[str, str | None] = {}
        self.audit_events = 0
        self.audit_bytes: list[bytes] = []
        self.unheard: set[str] = set()  # requests the server answered "no responders" to
        self._n = 0

    async def start(self) -> Ledger:
        await self.nc.subscribe(self.inbox + ".*", cb=self._on_reply, pending_msgs_limit=-1)
        await self.nc.subscribe(subjects.AUDIT_ALL, cb=self._on_audit, pending_msgs_limit=-1)
        await ensure_subscribed(self.nc)
        return self

    async def _on_reply(self, msg: Msg) -> None:
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            # The server's "no responders": no dispatcher was subscribed, Lifeline never saw it.
            self.unheard.add(self.ids.get(msg.subject.rsplit(".", 1)[1], "?"))
            return
        request_id = self.ids.get(msg.subject.rsplit(".", 1)[1], "?")
        self.replies[request_id] += 1
        self.reply_after_s[request_id] = time.monotonic() - self.sent_at.get(
            request_id, time.monotonic()
        )
        self.reply_of[request_id] = reply_decoder.decode(msg.data)

    async def _on_audit(self, msg: Msg) -> None:
        self.audit_events += 1
        self.audit_bytes.append(msg.data)
        event = audit_decoder.decode(msg.data)
        self.audits[event.id] += 1
        self.audit_types[event.id] = event.error_type

    async def send(
        self,
        request_id: str,
        payload: bytes,
        reply: str | None = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        """Publish `payload` as request `request_id`; reply="" means the ledger's own inbox."""
        if reply == "":
            reply = self.reply_to(request_id)
        else:
            self.reply_to(request_id)
        await self.nc.publish(subjects.COMPLETE, payload, reply=reply or "", headers=headers)

    def reply_to(self, request_id: str) -> str:
        """The ledger's reply subject for request `request_id`, for one sent on another
        connection; it counts from now."""
        self._n += 1
        token = str(self._n)
        self.ids[token] = request_id
        self.sent_at[request_id] = time.monotonic()
        return f"{self.inbox}.{token}"

    async def settle(
        self, replies: int, audits: int, timeout_s: float = 30, quiet_s: float = 0.3
    ) -> None:
        """Wait for at least this many replies and audit events, then a quiet spell in which
        nothing more arrives (a duplicate would show up in it)."""
        await wait_for(
            lambda: sum(self.replies.values()) >= replies and self.audit_events >= audits,
            timeout_s,
            what=lambda: (
                f"got {sum(self.replies.values())}/{replies} replies"
                f" and {self.audit_events}/{audits} audit events"
            ),
            interval_s=0.02,
        )
        await asyncio.sleep(quiet_s)

    def assert_exactly_once(self, ids: list[str], replied: bool = True) -> None:
        """Every id: one reply (when `replied`) and one audit event, and nothing for any other
        id."""
        for request_id in ids:
            assert self.audits[request_id] == 1, (
                f"{request_id[:60]!r}: {self.audits[request_id]} audit events"
            )
            assert self.replies[request_id] == (1 if replied else 0), (
                f"{request_id[:60]!r}: {self.replies[request_id]} replies"
            )
        assert sum(self.audits.values()) == len(ids), (
            f"audit events for unknown ids: {set(self.audits) - set(ids)}"
        )


# ---- processes ----------------------------------------------------------------------------

LIFELINE = [sys.executable, "-m", "service.cli"]


def cli_env(**extra: str) -> dict[str, str]:
    """This environment for a `lifeline` process: without the caller's NATS_* and OTEL_*
    settings (a test names its server and exporters itself), with this checkout importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "OTEL_"))}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def run_lifeline(
    *args: str,
    env: dict[str, str] | None = None,
    timeout_s: float = 30,
    cwd: str | os.PathLike[str] = ROOT,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """`lifeline <args>` to its end (in `cwd`, fed `input`), its output captured."""
    return subprocess.run(
        [*LIFELINE, *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=cwd,
        env=env or cli_env(),
        check=False,  # the caller reads returncode: many tests expect a failure
    )


@contextlib.contextmanager
def lifelines_side_by_side(
    commands: dict[Any, list[str]],
    env: dict[str, str] | None = None,
    timeout_s: float = 30,
    parallel: int = 4,
) -> Iterator[dict[Any, Future[subprocess.CompletedProcess[str]]]]:
    """`run_lifeline` for each command (by key), `parallel` at a time in threads, all started
    at once. A command that only checks its arguments or its config is mostly Python starting
    up, about a second on a busy machine: a module's many run side by side while each test
    waits for its own (`.result()`, which raises what run_lifeline raised)."""
    with ThreadPoolExecutor(parallel, thread_name_prefix="lifeline") as pool:
        runs = {
            key: pool.submit(run_lifeline, *args, env=env, timeout_s=timeout_s)
            for key, args in commands.items()
        }
        try:
            yield runs
        finally:
            for run in runs.values():
                run.cancel()


def spawn_lifeline(*args: str, **popen: Any) -> subprocess.Popen[str]:
    """`lifeline <args>` started and left running (text streams; Popen's keywords as given)."""
    settings: dict[str, Any] = {"cwd": ROOT, "env": cli_env(), "text": True, **popen}
    return subprocess.Popen([*LIFELINE, *args], **settings)


_unread: dict[
    tuple[int, int], bytes
] = {}  # per process and pipe: read past the last line waited for


def wait_for_line(
    proc: subprocess.Popen[str], pattern: str, timeout_s: float = 20, stream: Any = None
) -> tuple[str, list[str]]:
    """The first new line of proc's stdout (or `stream`, say proc.stderr) matching `pattern`,
    and every line read up to it. Reads the pipe with select(), so a process that goes quiet
    fails the test after timeout_s instead of hanging it."""
    stream = stream if stream is not None else proc.stdout
    assert stream is not None
    deadline, seen = time.monotonic() + timeout_s, []
    fd = stream.fileno()
    buffer = _unread.pop((proc.pid, fd), b"")
    while True:
        while b"\n" in buffer:
            raw, buffer = buffer.split(b"\n", 1)
            line = raw.decode() + "\n"
            seen.append(line)
            if re.search(pattern, line):
                _unread[(proc.pid, fd)] = buffer
                return line, seen
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buffer += chunk
    other = proc.stderr if stream is proc.stdout else proc.stdout
    rest = other.read() if other is not None and proc.poll() is not None else ""
    raise AssertionError(
        f"never printed {pattern!r} (exit {proc.poll()}); got:\n"
        f"{''.join(seen)}{buffer.decode()}\n{rest}"
    )


def rest_of_output(proc: subprocess.Popen[str]) -> str:
    """What proc printed on stdout after the last line waited for, up to its exit."""
    assert proc.stdout is not None
    return _unread.pop((proc.pid, proc.stdout.fileno()), b"").decode() + proc.stdout.read()


class LifelineProcess:
    """One `lifeline ...` command as a real process, its log in a file."""

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = spawn_lifeline(
            *args,
            env=cli_env(OPENAI_API_KEY=SECRET_KEY, **(env or {})),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if re.search(pattern, self.log()):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"never logged {pattern!r} (exit {self.proc.poll()}); log:\n{self.log()[-3000:]}"
        )

    def memory_kib(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) from /proc, in KiB."""
        figures = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                figures[key] = int(value.split()[0])
        return figures

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class Service:
    """Workers and dispatchers as real processes on one nats-server."""

    def __init__(
        self, tmp_path: Path, url: str, config: dict[str, Any], env: dict[str, str] | None = None
    ) -> None:
        self.tmp_path, self.url, self.env = tmp_path, url, env
        self.config_path = write_config(tmp_path / "lifeline.toml", config)
        self.procs: list[LifelineProcess] = []

    def start(self, *args: str, ready: str) -> LifelineProcess:
        proc = self._spawn(args)
        proc.wait_for_log(ready)
        return proc

    def _spawn(self, args: tuple[str, ...]) -> LifelineProcess:
        log = self.tmp_path / f"{args[0]}-{len(self.procs)}.log"
        proc = LifelineProcess(
            [*args, "--config", str(self.config_path), "--nats-url", self.url], log, self.env
        )
        self.procs.append(proc)
        return proc

    def start_all(self, workers: list[str], dispatchers: int) -> list[LifelineProcess]:
        """Workers and dispatchers started side by side (each one's start-up is mostly Python
        importing), returned once every one of them serves."""
        started = [(self._spawn(("worker", name)), f"worker {name} serving") for name in workers]
        for _ in range(dispatchers):
            started.append((self._spawn(("dispatcher",)), "dispatcher serving"))
        for proc, ready in started:
            proc.wait_for_log(ready)
        return [proc for proc, _ in started]

    def worker(self, name: str) -> LifelineProcess:
        return self.start("worker", name, ready=f"worker {name} serving")

    def dispatcher(self) -> LifelineProcess:
        return self.start("dispatcher", ready="dispatcher serving")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


class SilentServer:
    """A TCP server that takes connections and never says a word of NATS's INFO: a NATS
    server slow to answer. `dialed` holds each connection's writer, `hung_up` those the client
    closed. Use it as `async with SilentServer() as server:`, dialing `server.url`."""

    def __init__(self) -> None:
        self.dialed: list[asyncio.StreamWriter] = []
        self.hung_up: list[asyncio.StreamWriter] = []
        self.url = ""
        self._server: asyncio.Server | None = None

    async def _take(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.dialed.append(writer)
        await reader.read()
        self.hung_up.append(writer)
        writer.close()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._take, "127.0.0.1", 0)
        self.url = f"nats://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        for writer in self.dialed:
            writer.close()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- HTTP servers -------------------------------------------------------------------------


class LocalHTTPServer(ThreadingHTTPServer):
    """A test's HTTP server on 127.0.0.1, a free port: a thread per request, all daemons."""

    daemon_threads = True
    # socketserver's default listen backlog is 5: a burst of connections from a worker would
    # be refused by the kernel, and the test would measure the harness, not Lifeline.
    request_queue_size = 256

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)


@contextlib.contextmanager
def serving(server: ThreadingHTTPServer, poll_interval_s: float = 0.05) -> Iterator[Any]:
    """`server` answering from a daemon thread until the block ends; then shut down and closed
    (shutdown() waits for the serving loop's next poll: socketserver's 0.5 s default cost
    each test that used one up to half a second)."""
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": poll_interval_s}, daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _completion(
    content: str | None, model: str = "gpt-test", tool_calls: list[dict[str, Any]] | None = None
) -> bytes:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": "tool_calls" if tool_calls else "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
    ).encode()


class _Handler(BaseHTTPRequestHandler):
    """OpenAI's chat completions; the last user message says how to misbehave:
    "size N" answers with N characters, "echo key" answers 401 echoing the Authorization header
    in the error, "shape key" answers 200 with an unexpected body that echoes it, "answer key"
    a good answer echoing it in its model and its text, "tool key" a tool call (of a tool the
    request may not offer) echoing it in its id and arguments, "escaped key" a 400 whose JSON
    body escapes every "/" as PHP does, "status key" a 500 whose status line quotes it, "bomb
    N" a gzip body that expands to N bytes; anything else is echoed."""

    # Shared by the handler's instances (one a request): OTLP bodies (traces, metrics) posted
    # to this server, and the gzip bombs made so far by size.
    exported: ClassVar[list[bytes]] = []
    bombs: ClassVar[dict[int, bytes]] = {}

    def log_message(self, *args: Any) -> None:  # keep pytest's output clean
        pass

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers["content-length"]))
        if self.path.startswith("/v1/") and not self.path.endswith("/chat/completions"):
            self.exported.append(raw)  # an OTLP export: kept so tests can search it for secrets
            self._send(200, b"", {"content-type": "application/x-protobuf"})
            return
        body = json.loads(raw)
        command = body["messages"][-1]["content"]
        key = self.headers.get("authorization", "")
        verb, _, arg = command.partition(" ")
        if verb == "size":
            self._send(200, _completion("x" * int(arg)))
        elif command == "echo key":
            error = {
                "error": {
                    "message": {"detail": f"bad key {key}", "got": key},
                    "type": "invalid_request_error",
                }
            }
            self._send(401, json.dumps(error).encode())
        elif command == "shape key":
            self._send(
                200,
                json.dumps(
                    {"choices": [{"message": {"content": {"echo": key}}}], "debug": key}
                ).encode(),
            )
        elif command == "answer key":
            self._send(200, _completion(f"your key is {key}", model=key))
        elif command == "tool key":
            call = {
                "id": key,
                "type": "function",
                "function": {"name": "lookup", "arguments": json.dumps({"key": key})},
            }
            self._send(200, _completion(None, tool_calls=[call]))
        elif command == "escaped key":
            self._send(400, json.dumps({"detail": {"got": key}}).replace("/", "\\/").encode())
        elif command == "status key":
            self.send_response(500, f"denied {key}")
            self.send_header("content-length", "0")
            self.end_headers()
        elif verb == "bomb":
            self._send(200, _bomb(int(arg)), {"Content-Encoding": "gzip"})
        else:
            self._send(200, _completion(command))

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        if "content-type" not in (headers or {}):
            self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


def _bomb(size: int) -> bytes:
    """A gzip body that expands to `size` bytes (whole MiB) of JSON-ish spaces, kept. After a
    full flush the compressor starts afresh, so every MiB after the first compresses to the same
    bytes: compressed once and repeated (compressing 1 GiB took 5 s, and on a loaded machine
    past the provider's timeout), then the trailer every gzip reader checks."""
    if size not in _Handler.bombs:
        chunk, count = b" " * (1 << 20), size >> 20
        packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip framing
        first = packer.compress(chunk) + packer.flush(zlib.Z_FULL_FLUSH)
        again = packer.compress(chunk) + packer.flush(zlib.Z_FULL_FLUSH)
        end = packer.flush()[:-8]  # the last block, less the trailer of two chunks
        crc = 0
        for _ in range(count):
            crc = zlib.crc32(chunk, crc)
        trailer = struct.pack("<II", crc, (count << 20) & 0xFFFFFFFF)
        _Handler.bombs[size] = first + again * (count - 1) + end + trailer
    return _Handler.bombs[size]


class MisbehavingProvider:
    """A real local HTTP server speaking OpenAI's shapes, in a thread."""

    def __enter__(self) -> Self:
        _Handler.exported.clear()
        self.exported = _Handler.exported
        server = LocalHTTPServer(_Handler)
        self._running = contextlib.ExitStack()
        self.server = self._running.enter_context(serving(server))
        self.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        return self

    def __exit__(self, *exc: object) -> None:
        self._running.close()


# ---- provider wire formats (httpx MockTransport) -----------------------------------------


class MockServer:
    """A MockTransport handler: records every request and gives each the same answer.

    `body` is sent as JSON, as plain text when it is a str, as is when it is bytes (default:
    the subclass's `default_body`, the provider's documented success body); `raises` is an
    httpx transport error to raise instead of answering. The body is an unread stream, as a
    real transport's is, so the workers' streaming read runs as it does against a server.
    """

    default_body: ClassVar[Any] = {}

    def __init__(
        self,
        status: int = 200,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raises: type[httpx.TransportError] | None = None,
    ) -> None:
        self.status, self.headers, self.raises = status, headers or {}, raises
        self.body = self.default_body if body is None else body
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.raises is not None:
            raise self.raises("simulated", request=request)
        if isinstance(self.body, bytes):
            content, content_type = self.body, "application/octet-stream"
        elif isinstance(self.body, str):
            content, content_type = self.body.encode(), "text/plain; charset=utf-8"
        else:
            content, content_type = json.dumps(self.body).encode(), "application/json"
        headers = {
            "content-type": content_type,
            "content-length": str(len(content)),
            **self.headers,
        }
        return httpx.Response(self.status, headers=headers, stream=httpx.ByteStream(content))

    @property
    def request(self) -> httpx.Request:
        assert len(self.requests) == 1, f"{len(self.requests)} requests, not one"
        return self.requests[0]

    def sent_json(self) -> dict[str, Any]:
        return json.loads(self.request.content)


def provider_fixture(build: Callable[..., Any]) -> Any:
    """A `make` fixture: make(server, **kw) -> build(client_for(server), **kw); all closed after
    the test."""

    @pytest.fixture
    async def make():
        providers: list[Provider] = []

        def _make(server: MockServer, **kw: Any) -> Any:
            provider = build(httpx.AsyncClient(transport=httpx.MockTransport(server)), **kw)
            providers.append(provider)
            return provider

        yield _make
        for provider in providers:
            await provider.aclose()

    return make


async def expect_failure(provider: Provider, request: ProviderRequest) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await provider.complete(request, timeout_s=5)
    return caught.value


# ---- raw NATS protocol ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def loop_stall(
    seconds: float, first: Callable[[], None] | None = None
) -> AsyncIterator[Callable[[], None]]:
    """A read callback that, once the yielded function is called, holds this event loop in
    its I/O phase for `seconds` (a burst to handle, a paused process), calling `first` as it
    begins: uvloop then runs the timers that came due before it reads its sockets again."""
    loop = asyncio.get_running_loop()
    reader, writer = socket.socketpair()
    reader.setblocking(False)

    def a_long_read() -> None:
        reader.recv(1)
        if first is not None:
            first()
        time.sleep(seconds)

    loop.add_reader(reader.fileno(), a_long_read)
    try:
        yield lambda: writer.send(b"x")
    finally:
        loop.remove_reader(reader.fileno())
        reader.close()
        writer.close()


@contextlib.contextmanager
def peer_on_its_own_loop(
    url: str, subject: str, handle: Callable[[Client, Msg], Any]
) -> Iterator[None]:
    """A NATS peer (a dispatcher, a worker) on a thread and an event loop of its own, so it
    goes on while the test's loop stands still: `await handle(nc, msg)` for each message on
    `subject`. Subscribed on entry; stopped on exit (a handler still looping must be told to
    end first)."""
    import nats

    ready, done = threading.Event(), threading.Event()

    def run() -> None:
        async def serve() -> None:
            nc = await nats.connect(url)

            async def on_msg(msg: Msg) -> None:
                await handle(nc, msg)

            await nc.subscribe(subject, cb=on_msg)
            await ensure_subscribed(nc)
            ready.set()
            await asyncio.get_running_loop().run_in_executor(None, done.wait, 30)
            await nc.close()

        asyncio.run(serve())

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert ready.wait(10), f"the peer on {subject} did not subscribe"
        yield
    finally:
        done.set()
        thread.join(10)


async def raw_publish(url: str, frames: list[bytes]) -> None:
    """Publish protocol frames as written, bytes nats-py would never send included (nats-server
    passes on any subject, reply subject or header block a client chooses)."""
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    await reader.readline()  # INFO
    writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n')
    for frame in frames:
        writer.write(frame)
    writer.write(b"PING\r\n")
    await writer.drain()
    while not (await reader.readline()).startswith(b"PONG"):
        pass
    writer.close()


def hpub(subject: bytes, headers: bytes, payload: bytes = b"", reply: bytes = b"") -> bytes:
    line = b" ".join(p for p in (b"HPUB", subject, reply) if p)
    total = len(headers) + len(payload)
    return b"%s %d %d\r\n%s%s\r\n" % (line, len(headers), total, headers, payload)


async def dial_upstream(
    server: asyncio.Server, upstream: tuple[str, int], writers: list[asyncio.StreamWriter]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """A test proxy's connection to the server behind it, for a client it took, kept in
    `writers` (which the proxy closes as it stops or cuts its links); None, closed at once, when
    the proxy stopped serving while it was being made. Made after the proxy's stop, it stayed
    open until the collector found it in a later test, which then failed on its ResourceWarning
    ("unclosed transport", a StreamWriter whose "loop is closed": what a CI run once showed)."""
    up_reader, up_writer = await asyncio.open_connection(*upstream)
    if not server.is_serving():
        up_writer.close()
        return None
    writers.append(up_writer)
    return up_reader, up_writer


class DeliveryProxy:
    """A TCP proxy to a NATS server that passes on what the server sends until `after`
    JetStream deliveries (messages with a `$JS.ACK.` reply subject) have passed; past them it
    either `loses` every further delivery (API answers and heartbeats still come: a link that
    drops messages) or holds back every byte, the connection left open (a link that stalls).
    With `late` (a number of deliveries), the client's first consumer info request waits until
    that many deliveries have come from the server, and they reach the client only after its
    answer (a server that answered it after sending them, the answer overtaking them on the
    way: nats-py's key listing took that for an empty bucket)."""

    def __init__(self, upstream: str, after: int, loses: bool, late: int = 0) -> None:
        host, port = upstream.removeprefix("nats://").rsplit(":", 1)
        self.upstream, self.after, self.loses, self.passed = (host, int(port)), after, loses, 0
        self.writers: list[asyncio.StreamWriter] = []
        self.late = late
        self.info_reply: bytes | None = None  # the inbox of the first consumer info request
        self.held: list[bytes] = []
        self.all_held = asyncio.Event()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"nats://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        if (upstream := await dial_upstream(self.server, self.upstream, self.writers)) is None:
            writer.close()
            return
        up_reader, up_writer = upstream
        await asyncio.gather(self._pass(reader, up_writer), self._frames(up_reader, writer))

    async def _pass(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                info = re.search(rb"PUB \$JS\.API\.CONSUMER\.INFO\.\S+ (\S+)", data)
                if self.late and self.info_reply is None and info is not None:
                    self.info_reply = info[1]
                    writer.write(data[: info.start()])  # its subscription, sent with it
                    await writer.drain()
                    await asyncio.wait_for(self.all_held.wait(), 10)
                    data = data[info.start() :]
                writer.write(data)
                await writer.drain()

    async def _frames(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                frame = await reader.readuntil(b"\r\n")
                parts = frame.split()
                delivery = False
                if parts[0] in (b"MSG", b"HMSG"):
                    frame += await reader.readexactly(int(parts[-1]) + 2)
                    has_reply = len(parts) == (5 if parts[0] == b"MSG" else 6)
                    delivery = has_reply and parts[3].startswith(b"$JS.ACK.")
                if self.passed >= self.after and (delivery or not self.loses):
                    continue  # lost, or held back: the connection stays up
                if self.late and delivery:
                    self.held.append(frame)  # until the consumer info's answer has passed
                    if len(self.held) >= self.late:
                        self.all_held.set()
                    continue
                self.passed += delivery
                writer.write(frame)
                if self.late and parts[1:2] == [self.info_reply]:
                    self.late = 0
                    await writer.drain()
                    await asyncio.sleep(0.1)  # the answer read and acted on before they come
                    for held in self.held:
                        writer.write(held)
                    self.passed += len(self.held)
                await writer.drain()

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.server.close()
