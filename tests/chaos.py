"""`python -m tests.chaos [--seconds S] [--rate R] [--cluster]` (or `make chaos`): jobs while
things die.

Real processes on a nats-server with JetStream: a worker for an OpenAI-compatible local
server that counts every call it gets per job, and two dispatchers. Jobs are published at
--rate per second for --seconds; meanwhile a dispatcher is SIGKILLed and started again every
few seconds, and once the nats-server itself is SIGKILLed and started again on its port and
store. With --cluster, NATS is three nats-servers joined by routes, every stream and bucket
kept on all three (`[jetstream] replicas = 3`), and every other round SIGKILLs one of the
nodes instead of a dispatcher and starts it again. Then it waits for every accepted job's
result and prints: jobs accepted, results stored, provider calls and how many of them were
repeats, jobs lost (must be 0) and dead-lettered, and the audit events the audit stream keeps
(exactly one per job). Writes bench-results/chaos.json (or chaos-cluster.json); exits 1 when a
job was lost or has other than one event, its processes' logs kept in bench-results/chaos-logs/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import nats
import nats.js.errors

from schemas import subjects
from schemas.wire import audit_decoder
from service.audit import read_events
from service.config import AuditSettings, DispatcherSettings, JobsSettings
from service.embedded import server_binary
from tests.helpers import LifelineProcess, LocalHTTPServer, free_port, serving, write_config

RESULTS = Path(__file__).resolve().parents[1] / "bench-results"
PROVIDER_LATENCY_S = 0.15
ACK_WAIT_S = 3
# A job's event is tried for up to 20 s until the stream confirms it (service/transport.py)
AUDIT_WAIT_S = 40


async def _quiet(exc: Exception) -> None:
    """The clients' connection errors while the server is down are expected: no tracebacks."""


class CountingProvider(LocalHTTPServer):
    """OpenAI's chat completions, answering with the user's message after a short wait, and
    counting the calls per message (each job's message is its id)."""

    def __init__(self) -> None:
        super().__init__(_Handler)
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    server: CountingProvider

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        text = body["messages"][-1]["content"]
        with self.server.lock:
            self.server.calls[text] += 1
        time.sleep(PROVIDER_LATENCY_S)
        answer = json.dumps(
            {
                "id": "c",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


class NatsServer:
    """A nats-server on a fixed port and store, that can be killed and started again."""

    def __init__(self, store: str, extra: list[str] | None = None) -> None:
        self.port = free_port()
        self.store = store
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", self.store]
        self.proc = subprocess.Popen(
            args + self.extra, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(0.5)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


class Nats:
    """One nats-server, or three joined by routes into a cluster; `url` lists them all."""

    def __init__(self, tmp: Path, nodes: int) -> None:
        if nodes == 1:
            self.servers = [NatsServer(str(tmp / "js"))]
        else:
            routes = [free_port() for _ in range(nodes)]
            self.servers = [
                NatsServer(
                    str(tmp / f"js-{n}"),
                    [
                        "--name",
                        f"n{n}",
                        "--cluster_name",
                        "lifeline",
                        "--cluster",
                        f"nats://127.0.0.1:{routes[n]}",
                        "--routes",
                        ",".join(f"nats://127.0.0.1:{p}" for p in routes if p != routes[n]),
                    ],
                )
                for n in range(nodes)
            ]

    @property
    def url(self) -> str:
        return ",".join(server.url for server in self.servers)

    def start(self) -> None:
        for server in self.servers:
            server.start()

    def kill(self) -> None:
        for server in self.servers:
            server.kill()


async def _connect(url: str) -> nats.aio.client.Client:
    return await nats.connect(
        servers=url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.2, error_cb=_quiet
    )


class Fleet:
    """The worker and the dispatchers, as `lifeline` processes."""

    def __init__(self, tmp: Path, url: str, config: Path) -> None:
        self.tmp, self.url, self.config = tmp, url, config
        self.n = 0
        self.worker = self._start("worker", "llm")
        self.dispatchers = [self._start("dispatcher"), self._start("dispatcher")]

    def _start(self, *args: str) -> LifelineProcess:
        self.n += 1
        log = self.tmp / f"{args[0]}-{self.n}.log"
        proc = LifelineProcess([*args, "--config", str(self.config), "--nats-url", self.url], log)
        proc.wait_for_log("serving")
        return proc

    def kill_one_dispatcher(self) -> None:
        victim = random.randrange(len(self.dispatchers))
        self.dispatchers[victim].proc.send_signal(signal.SIGKILL)
        self.dispatchers[victim].proc.wait()
        time.sleep(0.5)
        self.dispatchers[victim] = self._start("dispatcher")

    def stop(self) -> None:
        for proc in [*self.dispatchers, self.worker]:
            proc.stop()


async def publish_jobs(url: str, total: int, rate: float, accepted: set[str]) -> None:
    """Publish `total` jobs at `rate` per second; each is retried until JetStream accepts it
    (through a nats-server restart too), so every id in `accepted` was acknowledged."""
    nc = await _connect(url)
    js = nc.jetstream(timeout=2)
    started = time.monotonic()
    for n in range(total):
        job_id = f"chaos-{n}"
        body = json.dumps({"id": job_id, "messages": [{"role": "user", "content": job_id}]})
        while True:
            try:
                await js.publish(
                    subjects.JOBS_SUBMIT, body.encode(), headers={subjects.MSG_ID: job_id}
                )
                accepted.add(job_id)
                break
            except (nats.errors.Error, nats.js.errors.Error):
                await asyncio.sleep(0.2)
        await asyncio.sleep(max(0.0, started + (n + 1) / rate - time.monotonic()))
    await nc.close()


async def collect(url: str, ids: set[str], timeout_s: float) -> dict[str, Any]:
    """Every accepted job's result, read from the results bucket (until timeout_s). A node
    killed near the end may leave the cluster electing leaders while this starts: it waits."""
    nc = await _connect(url)
    kv = None
    results: dict[str, Any] = {}
    give_up = time.monotonic() + timeout_s
    while len(results) < len(ids) and time.monotonic() < give_up:
        try:
            if kv is None:
                kv = await nc.jetstream(timeout=5).key_value(JobsSettings().results_bucket)
            for job_id in sorted(ids - set(results)):
                try:
                    entry = await kv.get(subjects.job_key(job_id))
                    results[job_id] = json.loads(entry.value)
                except nats.js.errors.KeyNotFoundError:
                    pass
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            print(f"chaos: reading results: {exc!r}; trying again", flush=True)
        if len(results) < len(ids):
            await asyncio.sleep(1)
    await nc.close()
    return results


async def audited(url: str, ids: set[str], timeout_s: float) -> Counter[str]:
    """The audit events the audit stream keeps, counted by id, for the jobs in `ids`: read
    again until every job has one or timeout_s is over. A job's result is stored before its
    event is confirmed by the stream (and a stream electing a leader after the last node kill
    confirms nothing for a while), so a job can have its result and not yet its event."""
    nc = await _connect(url)
    give_up = time.monotonic() + timeout_s
    first: int | None = None  # how many jobs had their event at the first read
    try:
        while True:
            counts: Counter[str] = Counter()
            try:
                async for data in read_events(nc.jetstream(timeout=10), AuditSettings(), 0, False):
                    event_id = audit_decoder.decode(data).id
                    if event_id in ids:
                        counts[event_id] += 1
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                print(f"chaos: reading audit events: {exc!r}; trying again", flush=True)
            if first is None:
                first = len(set(counts))
            if ids <= set(counts) or time.monotonic() > give_up:
                if len(set(counts)) > first:
                    print(
                        f"chaos: {len(set(counts)) - first} job(s)' events reached the audit "
                        "stream after their results were read",
                        flush=True,
                    )
                return counts
            await asyncio.sleep(1)
    finally:
        await nc.close()


def keep_logs(tmp: Path) -> None:
    """The run's dispatcher and worker logs, copied next to its figures."""
    into = RESULTS / "chaos-logs"
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    for log in tmp.glob("*.log"):
        shutil.copy(log, into / log.name)
    print(f"chaos: a job without its audit event: the logs are in {into}", flush=True)


async def run(seconds: float, rate: float, nodes: int = 1) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, serving(CountingProvider()) as provider:
        server = Nats(Path(tmp), nodes)
        server.start()
        if nodes > 1:
            await wait_for_jetstream(server.url)
        config = write_config(
            Path(tmp) / "chaos.toml",
            {
                "providers": {
                    "llm": {
                        "kind": "openai",
                        "model": "chaos-1",
                        "base_url": f"http://127.0.0.1:{provider.server_address[1]}/v1",
                        "api_key_env": "",
                        "timeout_s": 10,
                    }
                },
                "routes": {"default": {"targets": ["llm"]}},
                "jobs": {"ack_wait_s": ACK_WAIT_S, "in_flight": 50},
                "jetstream": {"replicas": nodes},
            },
        )
        fleet = Fleet(Path(tmp), server.url, config)
        dead: list[bytes] = []
        watcher = await _connect(server.url)

        async def note(msg: Any) -> None:
            dead.append(msg.data)

        await watcher.subscribe(subjects.JOBS_DEAD, cb=note)
        accepted: set[str] = set()
        total = int(seconds * rate)
        publisher = asyncio.create_task(publish_jobs(server.url, total, rate, accepted))
        kills, started = 0, time.monotonic()
        server_kills, rounds = 0, 0
        try:
            while not publisher.done():
                await asyncio.sleep(3)
                if publisher.done():
                    break
                rounds += 1
                if nodes > 1 and rounds % 2 == 0:
                    node = random.choice(server.servers)
                    print(f"chaos: SIGKILL nats-server {node.url}, start it again in 2 s")
                    node.kill()
                    await asyncio.sleep(2)
                    await asyncio.to_thread(node.start)
                    server_kills += 1
                    continue
                if nodes == 1 and not server_kills and time.monotonic() - started > seconds * 0.4:
                    print("chaos: SIGKILL nats-server, start it again in 2 s", flush=True)
                    server.kill()
                    await asyncio.sleep(2)
                    server.start()
                    server_kills += 1
                    continue
                print("chaos: SIGKILL a dispatcher, start another", flush=True)
                await asyncio.to_thread(fleet.kill_one_dispatcher)
                kills += 1
            await publisher
            results = await collect(server.url, accepted, timeout_s=120)
            kept_on = await replicas(server.url)
            events = await audited(server.url, accepted, timeout_s=AUDIT_WAIT_S)
            if accepted - set(events):  # the logs say why: kept where the run's figures are
                keep_logs(Path(tmp))
        finally:
            await watcher.close()
            fleet.stop()
            server.kill()
        calls = provider.calls
        lost = sorted(accepted - set(results))
        return {
            "seconds": seconds,
            "rate_per_s": rate,
            "jobs_published": total,
            "jobs_accepted": len(accepted),
            "results_stored": len(results),
            "results_ok": sum(1 for r in results.values() if r["status"] == "ok"),
            "result_errors": dict(
                Counter(r["error"]["type"] for r in results.values() if r["status"] != "ok")
            ),
            # Why, for a few: a job's error result is its result (not lost), yet worth a look.
            "result_error_samples": [
                r["error"]["message"][:300] for r in results.values() if r["status"] != "ok"
            ][:3],
            "provider_calls": sum(calls.values()),
            "repeated_provider_calls": sum(n - 1 for n in calls.values() if n > 1),
            "jobs_lost": len(lost),
            "lost_ids": lost[:20],
            "dead_lettered": len(dead),
            # The audit stream keeps one event per job (deduplicated by its id's hash).
            "audit_events_missing": len(accepted - set(events)),
            "audit_missing_ids": sorted(accepted - set(events))[:20],
            "audit_events_repeated": sum(n - 1 for n in events.values() if n > 1),
            "dispatcher_kills": kills,
            "nats_servers": nodes,
            "nats_server_kills": server_kills,
            "replicas": kept_on,
        }


async def replicas(url: str, timeout_s: float = 30) -> dict[str, int]:
    """On how many servers each of Lifeline's streams and buckets is kept."""
    nc = await _connect(url)
    js = nc.jetstream(timeout=5)
    streams = [
        JobsSettings().stream,
        "KV_" + JobsSettings().results_bucket,
        AuditSettings().stream,
        "KV_" + DispatcherSettings().health_bucket,
    ]
    give_up = time.monotonic() + timeout_s
    try:
        while True:
            try:
                return {name: (await js.stream_info(name)).config.num_replicas for name in streams}
            except (nats.errors.Error, nats.js.errors.Error):
                if time.monotonic() > give_up:
                    raise
                await asyncio.sleep(1)  # a cluster electing after the last kill
    finally:
        await nc.close()


async def wait_for_jetstream(url: str, timeout_s: float = 30) -> None:
    """Until the cluster has elected its JetStream leader (before that, creating a stream
    fails), so the run starts from a working cluster."""
    nc = await _connect(url)
    give_up = time.monotonic() + timeout_s
    try:
        while True:
            try:
                await nc.jetstream(timeout=2).account_info()
                return
            except (nats.errors.Error, nats.js.errors.Error):
                if time.monotonic() > give_up:
                    raise
                await asyncio.sleep(0.5)
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long jobs flow")
    parser.add_argument("--rate", type=float, default=20.0, help="jobs published per second")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="three nats-servers joined by routes, streams and buckets on all three; "
        "kills nodes as well as dispatchers",
    )
    args = parser.parse_args(argv)
    figures = asyncio.run(run(args.seconds, args.rate, nodes=3 if args.cluster else 1))
    out = RESULTS / ("chaos-cluster.json" if args.cluster else "chaos.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    print(f"wrote {out}")
    broken = ("jobs_lost", "audit_events_missing", "audit_events_repeated")
    return 1 if any(figures[name] for name in broken) else 0


if __name__ == "__main__":
    sys.exit(main())
