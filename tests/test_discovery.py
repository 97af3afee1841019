"""Discovery and health: dispatchers and workers answer the NATS service API ($SRV, ADR-32)
as nats.micro's services do, with figures that match what they served; `lifeline health` and
the HTTP probes (/healthz, /readyz) say whether each is connected, subscribed and not
overloaded. Everything over real nats-servers; the `nats` CLI is not needed: nats-py's own
nats.micro types parse every answer, as its clients would."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import signal
import time
from typing import Any

import httpx
import pytest
from helpers import (
    USER_HELLO,
    Service,
    ask,
    config,
    fake,
    run_lifeline,
    settled,
    wait_for,
    write_config,
)
from nats.aio.client import Client
from nats.micro.service import ServiceInfo, ServicePing, ServiceStats

from schemas import subjects
from service import cli, discovery
from service.app import start_stack
from service.config import parse_config
from service.embedded import EmbeddedNats
from service.natsopts import NatsOptions
from service.probes import Probes
from service.telemetry import Tracing

PARSERS = {"PING": ServicePing, "INFO": ServiceInfo, "STATS": ServiceStats}


async def srv(client: Client, verb: str, name: str = "", instance: str = "") -> list[dict]:
    """Every answer to $SRV.<verb>[.<name>[.<id>]], each checked by nats.micro's parser."""
    suffix = ".".join(part for part in (name, instance) if part)
    answers = await discovery.ask(client, verb, suffix or None, timeout_s=2.0, stall_s=0.2)
    for answer in answers:
        PARSERS[verb].from_dict(answer)  # raises on a field nats.micro's clients need
        assert answer["type"] == f"io.nats.micro.v1.{verb.lower()}_response"
    return sorted(answers, key=lambda a: (a["name"], a["id"]))


def by_name(answers: list[dict]) -> dict[str, dict]:
    return {a["name"]: a for a in answers}


async def health(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """`lifeline health ...` in this process (the stacks under test share its event loop)."""
    capsys.readouterr()
    code = await cli.cmd_health(cli.build_parser().parse_args(["health", *argv]))
    return code, capsys.readouterr().out


async def test_every_instance_answers_ping_info_and_stats_by_verb_name_and_id(lifeline, client):
    cfg = config({"backup": fake()})
    await lifeline(cfg)
    await lifeline(cfg)  # a second dispatcher and a second worker replica

    pings = await srv(client, "PING")
    names = [p["name"] for p in pings]
    assert names == ["lifeline-dispatcher"] * 2 + ["lifeline-worker-backup"] * 2
    assert len({p["id"] for p in pings}) == 4
    assert {p["version"] for p in pings} == {importlib.metadata.version("lifeline")}
    worker = pings[2]
    assert worker["metadata"]["provider"] == "backup" and worker["metadata"]["kind"] == "fake"

    assert [p["id"] for p in await srv(client, "PING", "lifeline-dispatcher")] == [
        p["id"] for p in pings[:2]
    ]
    one = await srv(client, "STATS", "lifeline-worker-backup", worker["id"])
    assert [s["id"] for s in one] == [worker["id"]]
    assert await srv(client, "INFO", "lifeline-worker-nobody") == []

    infos = by_name(await srv(client, "INFO"))
    endpoints = {
        name: [(e["name"], e["subject"], e["queue_group"]) for e in info["endpoints"]]
        for name, info in infos.items()
    }
    assert endpoints == {
        "lifeline-dispatcher": [
            ("complete", subjects.COMPLETE, subjects.DISPATCHER_QUEUE),
            ("stream", subjects.STREAM, subjects.DISPATCHER_QUEUE),
            ("jobs", subjects.JOBS_SUBMIT, subjects.JOBS_CONSUMER),
            ("abort", subjects.ABORT, ""),
        ],
        "lifeline-worker-backup": [
            ("provider", "llm.provider.backup", "lifeline-provider-backup"),
            ("cancel", "llm.cancel.backup", ""),
        ],
    }


async def test_stats_count_every_request_its_errors_and_its_processing_time(lifeline, client):
    cfg = config(
        {"backup": fake(), "broken": fake(fail_status=503)},
        routes={"default": {"targets": ["backup"]}, "broken": {"targets": ["broken"]}},
    )
    stack = await lifeline(cfg)
    for _ in range(12):
        assert (await ask(client, USER_HELLO)).status == "ok"
    failed = [await ask(client, {**USER_HELLO, "route": "broken"}) for _ in range(3)]
    assert {r.status for r in failed} == {"error"}
    inbox = client.new_inbox()
    await client.subscribe(inbox)
    for _ in range(2):
        await client.publish(subjects.STREAM, json.dumps(USER_HELLO).encode(), reply=inbox)
    dispatcher = stack.dispatcher
    await wait_for(lambda: dispatcher.stream_tally.requests == 2 and not dispatcher.in_flight)

    stats = by_name(await srv(client, "STATS"))
    complete, stream, jobs, abort = stats["lifeline-dispatcher"]["endpoints"]
    assert (complete["num_requests"], complete["num_errors"]) == (15, 3)
    assert complete["last_error"] == failed[0].error.type
    assert (stream["num_requests"], stream["num_errors"]) == (2, 0)
    assert jobs["num_requests"] == 0
    assert complete["processing_time"] > 0
    assert complete["average_processing_time"] == complete["processing_time"] // 15
    assert complete["data"] == {
        "in_flight": 0,
        "max_in_flight": 1000,
        "in_flight_bytes": 0,
        "max_in_flight_bytes": 256 * 1024 * 1024,
        "subscribed": True,
    }
    assert abort["num_requests"] == 0 and abort["data"] == {"aborted": 0, "subscribed": True}

    backup = stats["lifeline-worker-backup"]["endpoints"][0]
    broken = stats["lifeline-worker-broken"]["endpoints"][0]
    assert (backup["num_requests"], backup["num_errors"]) == (14, 0)  # the streams' included
    assert (broken["num_requests"], broken["num_errors"], broken["last_error"]) == (
        3,
        3,
        "server_error",
    )
    assert backup["data"] == {
        "in_flight": 0,
        "max_in_flight": 1000,
        "in_flight_bytes": 0,
        "max_in_flight_bytes": 256 * 1024 * 1024,
        "subscribed": True,
        "expired": 0,
    }
    assert 0 < backup["processing_time"] < complete["processing_time"]


async def test_an_answer_too_large_for_nats_counts_as_the_workers_error(lifeline, client):
    stack = await lifeline(config({"huge": fake(reply="x" * (client.max_payload + 1))}))
    reply = await ask(client, USER_HELLO)
    assert reply.attempts[0].error_type == "response_too_large"
    await settled(client, stack)
    (worker,) = await srv(client, "STATS", "lifeline-worker-huge")
    provider = worker["endpoints"][0]
    assert (provider["num_errors"], provider["last_error"]) == (1, "response_too_large")


async def test_health_says_ready_then_overloaded_then_ready_again(
    lifeline, client, nats_url, capsys
):
    cfg = config({"slow": fake(latency_ms=1000)}, max_in_flight=2)
    stack = await lifeline(cfg)
    probes = Probes(stack.components)
    await probes.start("127.0.0.1:0")
    readyz = f"http://127.0.0.1:{probes.port}/readyz"
    try:
        async with httpx.AsyncClient() as http:
            code, out = await health(capsys, "--nats-url", nats_url)
            assert code == 0, out
            assert "ready      lifeline-dispatcher" in out
            assert "in flight 0 of 2 (0 B of 256 MiB), requests 0, errors 0" in out
            assert "2 of 2 ready" in out
            assert (await http.get(readyz)).status_code == 200

            busy = [asyncio.create_task(ask(client, USER_HELLO)) for _ in range(2)]
            await wait_for(lambda: stack.dispatcher.in_flight == 2)
            code, out = await health(capsys, "--nats-url", nats_url, "--json")
            assert code == 1
            states = by_name(json.loads(out)["instances"])
            assert states["lifeline-dispatcher"]["problems"] == [
                "overloaded: 2 requests in flight, its maximum is 2"
            ]
            assert states["lifeline-worker-slow"]["ready"]  # workers have no maximum
            answer = await http.get(readyz)
            assert answer.status_code == 503
            dispatcher = answer.json()["components"][-1]
            assert dispatcher["name"] == "lifeline-dispatcher" and not dispatcher["ready"]

            assert {r.status for r in await asyncio.gather(*busy)} == {"ok"}
            assert (await health(capsys, "--nats-url", nats_url))[0] == 0
            assert (await http.get(readyz)).status_code == 200
    finally:
        await probes.stop()


async def test_health_says_overloaded_while_the_bytes_in_flight_reach_their_maximum(
    lifeline, client, nats_url, capsys
):
    """A request that comes while none is in flight is taken whatever its size; past
    max_in_flight_bytes nothing more is, so the dispatcher and the worker say so, by bytes."""
    cfg = config(
        {"slow": fake(latency_ms=1000, max_in_flight_bytes=1_000)}, max_in_flight_bytes=1_000
    )
    stack = await lifeline(cfg)
    long = {"messages": [{"role": "user", "content": "x" * 5_000}]}
    busy = asyncio.create_task(ask(client, long))
    await wait_for(lambda: stack.workers["slow"].in_flight == 1)
    code, out = await health(capsys, "--nats-url", nats_url, "--json")
    assert code == 1, out
    states = by_name(json.loads(out)["instances"])
    size = stack.dispatcher.in_flight_bytes
    assert size > 5_000 and states["lifeline-dispatcher"]["in_flight_bytes"] == size
    assert states["lifeline-dispatcher"]["problems"] == [
        f"overloaded: {size:,} bytes of requests in flight, its maximum is 1,000"
    ]
    worker = states["lifeline-worker-slow"]
    assert not worker["ready"] and "bytes of requests in flight" in worker["problems"][0]
    assert (await busy).status == "ok"
    code, out = await health(capsys, "--nats-url", nats_url)
    assert code == 0 and "in flight 0 of 1000 (0 B of 1000 B)" in out, out


async def test_health_shows_the_requests_a_worker_dropped_as_late(
    lifeline, client, nats_url, capsys
):
    """A worker whose clock runs ahead sees every request past its deadline and drops it:
    health shows how many, while the worker stays ready (it is not overloaded)."""
    stack = await lifeline(config({"ahead": fake()}))
    late = {subjects.DEADLINE_MS: str(int((time.time() - 5) * 1000))}
    for _ in range(2):
        await client.publish(subjects.provider_subject("ahead"), b'{"messages": []}', headers=late)
    await wait_for(lambda: stack.workers["ahead"].expired == 2)
    code, out = await health(capsys, "--nats-url", nats_url)
    assert code == 0, out
    line = next(x for x in out.splitlines() if "lifeline-worker-ahead" in x)
    assert line.startswith("ready") and "expired 2 (late on arrival: see its log)" in line
    dispatcher = next(x for x in out.splitlines() if "lifeline-dispatcher" in x)
    assert "expired" not in dispatcher
    code, out = await health(capsys, "--nats-url", nats_url, "--json")
    assert by_name(json.loads(out)["instances"])["lifeline-worker-ahead"]["expired"] == 2


async def test_health_names_the_missing_worker_and_fails_without_any_instance(
    lifeline, nats_url, capsys, tmp_path
):
    path = write_config(tmp_path / "lifeline.toml", config({"backup": fake(), "spare": fake()}))
    code, out = await health(capsys, "--nats-url", nats_url)
    assert code == 1
    assert "no Lifeline dispatcher, worker or gateway answered" in out

    await lifeline(config({"backup": fake()}))
    code, out = await health(capsys, "--nats-url", nats_url, "--config", str(path), "--expect-all")
    assert code == 1
    assert "MISSING    lifeline-worker-spare" in out
    assert "2 of 3 ready on" in out and "1 missing" in out  # counted, not left out
    assert (await health(capsys, "--nats-url", nats_url))[0] == 0


async def test_health_waits_its_timeout_for_an_expected_instance_that_answers_late(
    nats_url, capsys, tmp_path
):
    """--expect-all with --timeout 10: a worker paused (or too busy to answer at once) answered
    a second and a half after the dispatcher, and health had reported it MISSING 0.3 s after
    the dispatcher's answer, exit 1, though it answered well within the timeout."""
    cfg = config({"backup": fake()})
    service = Service(tmp_path, nats_url, cfg)
    try:
        service.dispatcher()
        worker = service.worker("backup")
        path = str(service.config_path)
        expect = ("--nats-url", nats_url, "--config", path, "--expect-all")
        await wait_for(lambda: run_lifeline("health", *expect).returncode == 0, timeout_s=15)
        worker.proc.send_signal(signal.SIGSTOP)
        loop = asyncio.get_running_loop()
        loop.call_later(1.5, worker.proc.send_signal, signal.SIGCONT)
        code, out = await health(capsys, *expect, "--timeout", "10")
        assert code == 0 and "MISSING" not in out, out
    finally:
        for proc in service.procs:  # a stopped process would not see its SIGTERM
            proc.proc.send_signal(signal.SIGCONT)
        service.stop()


async def test_a_gateway_is_found_with_its_url_its_figures_and_gone_once_it_stops(
    lifeline, client, nats_url, capsys
):
    """`lifeline gateway` answers the service API as dispatchers and workers do, so `lifeline
    health` and `nats micro ls` list it; its requests come over HTTP, so its one endpoint has
    no subject, it names its URL, and its figures are its chat completions and connections."""
    cfg = config({"backup": fake()})
    await lifeline(cfg)
    component, server = await cli._start_gateway(
        parse_config(cfg), NatsOptions(servers=nats_url), "127.0.0.1", 0
    )
    try:
        [info] = await srv(client, "INFO", subjects.GATEWAY_SERVICE)
        assert [(e["name"], e["subject"]) for e in info["endpoints"]] == [("chat_completions", "")]
        assert info["metadata"]["url"] == server.url
        async with httpx.AsyncClient(base_url=server.url) as http:
            chat = {"messages": [{"role": "user", "content": "hi"}]}
            ok = await http.post("/chat/completions", json={"model": "default", **chat})
            unknown = await http.post("/chat/completions", json={"model": "nope", **chat})
            assert (ok.status_code, unknown.status_code) == (200, 404)
            [stats] = await srv(client, "STATS", subjects.GATEWAY_SERVICE, info["id"])
            [endpoint] = stats["endpoints"]
            assert (endpoint["num_requests"], endpoint["num_errors"]) == (2, 1)
            assert endpoint["last_error"] == unknown.json()["error"]["code"]
            assert endpoint["data"] == {
                "in_flight": 0,
                "connections": 1,  # this client's, kept alive
                "max_connections": server.max_connections,
                "subscribed": True,
            }
            code, out = await health(capsys, "--nats-url", nats_url)
        assert code == 0, out
        line = next(x for x in out.splitlines() if "lifeline-gateway" in x)
        assert line.startswith("ready") and f"serving {server.url}  in flight 0, " in line
        assert line.endswith("requests 2, errors 1")
        assert "3 of 3 ready" in out
        code, out = await health(capsys, "--nats-url", nats_url, "--json")
        gateway = by_name(json.loads(out)["instances"])["lifeline-gateway"]
        assert gateway["url"] == server.url and (gateway["requests"], gateway["errors"]) == (2, 1)
        assert gateway["max_connections"] == server.max_connections
    finally:
        await component.stop()
    assert subjects.GATEWAY_SERVICE not in by_name(await srv(client, "PING"))


async def test_the_probes_follow_the_connection_through_a_server_restart():
    server = EmbeddedNats(port=-1)
    server.start()
    tracers = Tracing()
    stack = await start_stack(parse_config(config({"backup": fake()})), server.url, tracers)
    probes = Probes(stack.components)
    await probes.start("127.0.0.1:0")
    base = f"http://127.0.0.1:{probes.port}"
    try:
        async with httpx.AsyncClient() as http:

            async def status(path: str) -> tuple[int, Any]:
                answer = await http.get(base + path)
                return answer.status_code, answer.json()

            assert (await status("/readyz"))[0] == 200
            server.stop()
            _, body = await wait_for(lambda: _when(status("/readyz"), lambda r: r[0] == 503), 10)
            assert all(c["problems"] == ["not connected to NATS"] for c in body["components"])
            assert (await status("/healthz"))[0] == 200  # reconnecting is alive
            assert (await http.post(base + "/readyz")).status_code == 405
            assert (await http.get(base + "/metrics")).status_code == 404

            server.start()  # the same port: the components reconnect by themselves
            await wait_for(lambda: _when(status("/readyz"), lambda r: r[0] == 200), 15)
    finally:
        await probes.stop()
        await stack.stop()
        tracers.shutdown()
        server.stop()


async def _when(answer: Any, accept: Any) -> Any:
    result = await answer
    return result if accept(result) else None


def test_lifeline_health_as_a_command_exits_1_without_a_server():
    result = run_lifeline("health", "--nats-url", "nats://127.0.0.1:1", timeout_s=30)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "cannot reach NATS" in result.stderr


ROGUE_STATS = [
    b"42",
    b"[1, 2]",
    b'{"name": "lifeline-rogue", "endpoints": "none"}',
    b'{"name": "lifeline-rogue", "endpoints": [{"num_requests": "7"}]}',
    b'{"name": "lifeline-rogue", "metadata": {"pid": 7}}',
    b'{"name": "lifeline-rogue", "endpoints": [{"data": {"in_flight": 10.0, "max_in_flight": 10}}]}',
    # JSON integers have no bound: 10**400 bytes in flight, shown in GiB, is past a float's
    # range (an OverflowError traceback, and no word on the real instances)
    b'{"name": "lifeline-rogue", "id": "x", "endpoints": [{"data": {"in_flight": 0, '
    b'"in_flight_bytes": 1' + b"0" * 400 + b', "max_in_flight_bytes": 2' + b"0" * 400 + b"}}]}",
]


async def test_health_reads_past_answers_of_another_shape_and_escapes_what_it_prints(
    lifeline, client, nats_url, capsys
):
    """Any client may answer $SRV.STATS. One answer of another shape (a number, a list, a
    count that is a string or a float) crashed `lifeline health` with a traceback and no word
    on the real instances; a name with escape sequences reached the terminal raw."""
    await lifeline(config({"backup": fake()}))
    ansi = "lifeline-\x1b]0;pwned\x07\x1b[2J"

    async def rogue(msg: Any) -> None:
        for body in ROGUE_STATS:
            await client.publish(msg.reply, body)
        answer = {"name": ansi, "id": "x", "metadata": {"host": "\x1b[31mred"}, "endpoints": []}
        await client.publish(msg.reply, json.dumps(answer).encode())

    await client.subscribe(f"{subjects.SERVICE_API_PREFIX}.STATS", cb=rogue)
    await client.flush()
    capsys.readouterr()
    code = await cli.cmd_health(cli.build_parser().parse_args(["health", "--nats-url", nats_url]))
    out, err = capsys.readouterr()
    assert code == 0  # the rogues' answers left out, the real instances all ready
    assert "lifeline-dispatcher" in out and "lifeline-worker-backup" in out
    assert "\x1b" not in out and "\\x1b]0;pwned\\x07\\x1b[2J" in out
    assert f"left out {len(ROGUE_STATS)} answer(s)" in err
    assert "lifeline-rogue" not in out


async def test_stopping_the_probes_ends_the_connections_they_serve():
    """Python 3.11's wait_closed leaves a connection's handler running; each one still open
    as the loop closed logged a traceback (a client that holds thousands open floods the
    log at every stop)."""
    probes = Probes([])
    await probes.start("127.0.0.1:0")
    held = [await asyncio.open_connection("127.0.0.1", probes.port) for _ in range(20)]
    for _, writer in held:
        writer.write(b"GET /readyz HTTP/1.1\r\n")  # and never the rest of the head
    await wait_for(lambda: len(probes._serving) == 20)
    await probes.stop()
    assert not probes._serving
    for reader, writer in held:
        with contextlib.suppress(ConnectionResetError):  # hung up on, either way
            assert await reader.read() == b""
        writer.close()


async def test_a_flood_of_held_probe_connections_is_turned_away_past_a_bound():
    """Every connection to the probe port (every interface by default) was served for up to
    5 s with no bound on their number: a client that opens thousands and never finishes a
    request took every file descriptor of the process, its NATS reconnects and gateway
    included. Past the bound a new connection is hung up on at once; those within it are
    still served."""
    probes = Probes([])
    await probes.start("127.0.0.1:0")
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    waits: list[asyncio.Task[None]] = []
    try:
        held += [await asyncio.open_connection("127.0.0.1", probes.port) for _ in range(300)]
        for _, writer in held:
            writer.write(b"GET /healthz HTTP/1.1\r\n")  # and, for now, not the rest
        hung_up: list[bytes] = []

        async def until_hung_up(reader: asyncio.StreamReader) -> None:
            try:
                hung_up.append(await reader.read())
            except ConnectionError:  # hung up on with a reset: as much a hang-up
                hung_up.append(b"")

        waits += [asyncio.create_task(until_hung_up(reader)) for reader, _ in held[1:]]
        await wait_for(lambda: len(hung_up) >= 200, 10)
        assert set(hung_up) == {b""}  # hung up on without an answer
        reader, writer = held[0]  # within the bound: its request is still answered
        writer.write(b"\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 200 OK")
    finally:
        for _, writer in held:
            writer.close()
        await probes.stop()
        await asyncio.gather(*waits, return_exceptions=True)


async def test_the_probes_answer_a_request_in_absolute_form_or_without_a_version():
    """`GET http://host:port/readyz HTTP/1.1` (the absolute form, which HTTP/1.1 servers
    must accept) and a request line without its version were answered 404 Not Found."""
    probes = Probes([])
    await probes.start("127.0.0.1:0")
    try:
        for line in (
            f"GET http://127.0.0.1:{probes.port}/healthz?x=1 HTTP/1.1",
            "GET /healthz",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", probes.port)
            writer.write(line.encode() + b"\r\n\r\n")
            assert (await reader.read()).startswith(b"HTTP/1.1 200 OK"), line
            writer.close()
    finally:
        await probes.stop()


async def test_the_probes_answer_a_request_whose_lines_end_in_a_bare_lf():
    """HTTP/1.1 lets a server take a bare LF as a line's end (RFC 9112, 2.2), and hand-written
    probes (`printf 'GET /readyz\\n\\n' | nc`) send one: such a request waited out the read
    timeout and was hung up on without an answer. A client that sends nothing still gets none."""
    probes = Probes([])
    await probes.start("127.0.0.1:0")
    try:
        for request in (b"GET /healthz HTTP/1.1\nHost: x\n\n", b"GET /healthz\r\nHost: x\n\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", probes.port)
            writer.write(request)
            answer = await asyncio.wait_for(reader.read(), 3)
            assert answer.startswith(b"HTTP/1.1 200 OK"), request
            writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", probes.port)
        writer.write_eof()  # nothing sent
        assert await asyncio.wait_for(reader.read(), 3) == b""
        writer.close()
    finally:
        await probes.stop()
