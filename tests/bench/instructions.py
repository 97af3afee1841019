"""`python -m tests.bench.instructions [REV ...]`: instructions per request of the dispatcher's
engine and of the worker, counted under valgrind (callgrind), for this tree or git revisions.

Timings on a shared 2-core machine drift by 10-20 % from minute to minute; the number of
machine instructions a request executes does not (within about 0.5 % from run to run here).
It is not the time a request takes (caches, branch prediction and the other processes on the
cores are not in it), but a change that makes a request execute fewer instructions makes it
cheaper wherever it runs, and one that does not, does not. Each figure is the difference
between two runs of one process, 1,000 and 6,000 requests after a warm-up, divided by 5,000,
so the start-up's imports and compilation cancel out.

    engine   Engine.serve for one good call, without NATS: a fake transport answers at once
             and encodes what the engine hands it, as publishing does; the route `main` of the
             benchmark's config, tracing at the default sampler into a batch processor
    worker   WorkerRuntime.handle for one `fake` call as the dispatcher sends it (traced,
             sampled), on uvloop; its reply goes through nats-py's publish to a stand-in that
             drops it (the fast path needs a real connection)
    natsio   the NATS messages of one request through service.natsio's fast path, on uvloop:
             the dispatcher reading the request, publishing the attempt (its header block
             made as NatsTransport.ask_provider makes it), reading the worker's
             answer, publishing the reply and the audit event; the worker reading the attempt
             and publishing its answer (frames as the benchmark's are, read through the
             direct reader, written to a transport that drops them; handlers do nothing)

Needs valgrind (Debian: `apt-get install valgrind`); each revision is checked out into a
temporary git worktree. Takes about 30 s per figure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNS = (1000, 6000)  # requests per run: the difference of the two is counted
WARMUP = 200
_NO_SAMPLING = "LIFELINE_BENCH_NO_SAMPLING"  # set for the children by --no-sampling


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.instructions",
        description=__doc__.split("\n\n")[0],
        epilog="Example: python -m tests.bench.instructions HEAD~3 HEAD  (no revision: this tree)",
    )
    parser.add_argument("revisions", nargs="*", help="git revisions (default: the working tree)")
    parser.add_argument(
        "--part", choices=("engine", "worker", "natsio"), action="append", help="default: both"
    )
    parser.add_argument(
        "--no-sampling",
        action="store_true",
        help="trace with the always_off sampler (nothing recorded): what tracing costs is the "
        "difference from a run without it",
    )
    parser.add_argument("--_run", nargs=2, metavar=("PART", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._run:  # a child under valgrind
        _run(args._run[0], int(args._run[1]))
        return
    if args.no_sampling:  # read by the children (_tracing)
        os.environ[_NO_SAMPLING] = "1"
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind)")
    parts = args.part or ["engine", "worker", "natsio"]
    sampling = ", nothing sampled" if args.no_sampling else ""
    for revision in args.revisions or [None]:
        with _checkout(revision) as tree:
            for part in parts:
                print(
                    f"{revision or 'working tree'}: {part} {_per_request(tree, part):,} "
                    f"instructions per request{sampling}",
                    flush=True,
                )


def _per_request(tree: Path, part: str) -> int:
    counts = [_count(tree, part, n) for n in RUNS]
    return round((counts[1] - counts[0]) / (RUNS[1] - RUNS[0]))


def _count(tree: Path, part: str, n: int) -> int:
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "tests.bench.instructions",
        "--_run",
        part,
        str(n),
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(tree)}
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=True)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{done.stderr[-2000:]}")
    return int(found.group(1))


class _checkout:
    """The working tree, or a revision in a temporary worktree (removed afterwards)."""

    def __init__(self, revision: str | None) -> None:
        self.revision = revision
        self.tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Path:
        if self.revision is None:
            return ROOT
        self.tmp = tempfile.TemporaryDirectory(prefix="lifeline-instr-")
        tree = Path(self.tmp.name) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-q", str(tree), self.revision],
            cwd=ROOT,
            check=True,
        )
        return tree

    def __exit__(self, *exc: object) -> None:
        if self.tmp is not None:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(Path(self.tmp.name) / "tree")],
                cwd=ROOT,
                check=False,
            )
            self.tmp.cleanup()


def _run(part: str, n: int) -> None:
    """In the child: `n` requests of `part` after the warm-up, collected as a serving process
    collects (service.memory.settle_after_start)."""
    from service.memory import settle_after_start

    run = {"engine": _engine, "worker": _worker, "natsio": _natsio}[part]
    settle_after_start()
    if part != "engine":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(run(n))


def _tracing():
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from service.telemetry import Tracing
    from tests.bench.servers import DropSpans

    if os.environ.get(_NO_SAMPLING):
        from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

        tracing = Tracing(sampler=ALWAYS_OFF)
    else:
        tracing = Tracing()  # the default sampler, every span kept until the batch's export
    tracing.add_span_processor(BatchSpanProcessor(DropSpans(), max_queue_size=10**7))
    return tracing


async def _engine(n: int) -> None:
    from schemas import ProviderOk, Usage
    from schemas.wire import encoder
    from service.config import parse_config
    from service.engine import Engine, Inbound
    from service.health import Health
    from tests.bench.cases import FULL, completion_request, lifeline_config

    answer = ProviderOk(content="Hello", model="fake-1", usage=Usage(1, 1))

    class Transport:
        max_payload = _max_payload = 1 << 20

        async def ask_provider(self, provider, payload, timeout_s, headers, own_timeout_s=None):
            return answer

        async def audit(self, event, msg_id=None):
            encoder.encode(event)

    async def respond(reply):
        encoder.encode(reply)
        return reply

    engine = Engine(
        parse_config(lifeline_config(FULL)), Transport(), Health(), _tracing().recorder("x")
    )
    data = completion_request("main")
    for _ in range(WARMUP + n):
        await engine.serve(Inbound(data, None, time.monotonic()), respond)


async def _worker(n: int) -> None:
    from nats.aio.msg import Msg

    from schemas import ProviderRequest
    from schemas.subjects import ATTEMPT_ID, DEADLINE_MS, REQUEST_ID, TRACEPARENT
    from schemas.wire import ChatMessage, encoder
    from workers.fake import FakeProvider, FakeSettings
    from workers.runtime import WorkerRuntime

    class Connection:  # what the runtime uses of nats-py's client, replies dropped
        max_payload = _max_payload = 1 << 20

        async def publish(self, subject, payload, reply="", headers=None):
            pass

    message = Msg(
        None,  # no client: the runtime never acks
        subject="llm.provider.ok",
        reply="_INBOX.bench",
        data=encoder.encode(ProviderRequest(id="r1", messages=[ChatMessage("user", "Hello")])),
        headers={
            DEADLINE_MS: str(int((time.time() + 3600) * 1000)),
            REQUEST_ID: "r1",
            ATTEMPT_ID: "a" * 24,
            TRACEPARENT: f"00-{'1' * 32}-{'2' * 16}-01",
        },
    )

    provider = FakeProvider(FakeSettings(kind="fake"))
    runtime = WorkerRuntime("ok", "fake", provider, Connection(), _tracing().recorder("w"), 30.0)
    for _ in range(WARMUP + n):
        await runtime.handle(message)


async def _natsio(n: int) -> None:
    from nats.aio.client import Client

    from schemas import CompletionReply, ProviderOk, ProviderRequest, Usage
    from schemas.subjects import ATTEMPT_ID, DEADLINE_MS, REQUEST_ID, TRACEPARENT
    from schemas.wire import ChatMessage, encoder
    from service.natsio import FastPath, _DirectReader, _FastParser, measured
    from service.transport import attempt_block
    from tests.bench.cases import completion_request

    class Socket:  # a transport that drops what is written
        def writelines(self, data):
            pass

    class Inner:  # nats-py's StreamReaderProtocol: nothing is left for it
        def data_received(self, data):
            raise AssertionError("a frame went to nats-py's parser")

    def connection():
        nc = Client()
        nc._status = Client.CONNECTED
        nc._transport = Socket()
        path = FastPath(nc)
        nc._ps = _FastParser(nc, path._handlers, path)
        nc._lifeline_fast_path = path  # what fast_path(nc) finds
        path.in_flight = lambda: 64  # busy: writes once per turn
        return nc, path, _DirectReader(Inner(), nc._ps, asyncio.StreamReader())

    def handled(msg):
        pass

    def subscribe(nc, path, sid):
        nc._subs[sid] = object()
        path._handlers[b"%d" % sid] = (sid, handled)

    def frame(subject, sid, reply, payload, headers=None):
        if headers is None:
            return b"MSG %s %d %s %d\r\n%s\r\n" % (subject, sid, reply, len(payload), payload)
        _, block = measured(payload, headers)
        return b"HMSG %s %d %s %d %d\r\n%s%s\r\n" % (
            subject,
            sid,
            reply,
            len(block),
            len(block) + len(payload),
            block,
            payload,
        )

    headers = {
        DEADLINE_MS: str(int((time.time() + 3600) * 1000)),
        REQUEST_ID: "r" * 26,
        ATTEMPT_ID: "a" * 24,
        TRACEPARENT: f"00-{'1' * 32}-{'2' * 16}-01",
    }
    attempt = encoder.encode(ProviderRequest(id="r" * 26, messages=[ChatMessage("user", "Hello")]))
    answer = encoder.encode(ProviderOk(content="Hello", model="fake-1", usage=Usage(1, 1)))
    reply = (
        encoder.encode(
            CompletionReply(
                id="r" * 26, status="ok", content="Hello", provider="ok", model="fake-1"
            )
        )
        + b" " * 300
    )  # a reply is about 580 bytes
    event = b"{}" + b" " * 600
    client_inbox, worker_inbox = (
        b"_INBOX.abcdefghijklmnopqrstuv.1234",
        b"_LIFELINE_DISPATCHER.x.y.1",
    )
    request_frame = frame(b"llm.complete", 1, client_inbox, completion_request("main"))
    answer_frame = b"MSG %s 2 %d\r\n%s\r\n" % (worker_inbox, len(answer), answer)
    attempt_frame = frame(b"llm.provider.ok", 1, worker_inbox, attempt, headers)
    dispatcher, d_path, d_reader = connection()
    worker, w_path, w_reader = connection()
    subscribe(dispatcher, d_path, 1)
    subscribe(dispatcher, d_path, 2)
    subscribe(worker, w_path, 1)
    for _ in range(WARMUP + n):
        d_reader.data_received(request_frame)
        block = attempt_block(headers)  # as NatsTransport.ask_provider makes it
        d_path.publish("llm.provider.ok", attempt, "_LIFELINE_DISPATCHER.x.y.1", block=block)
        w_reader.data_received(attempt_frame)
        # A reply and an audit event fit max_payload: published as the worker runtime and
        # NatsTransport publish them, through the fast path itself (publish_now checks sizes).
        w_path.publish(worker_inbox.decode(), answer, "", None, None, True)
        d_reader.data_received(answer_frame)
        d_path.publish(client_inbox.decode(), reply, "", None, None, True)
        d_path.publish("llm.audit.ok", event)
        await asyncio.sleep(0)  # the turn's writes


if __name__ == "__main__":
    main()
