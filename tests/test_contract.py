"""The fault suite: hostile input, floods and misbehaving providers against real `lifeline`
processes on a real nats-server. Every test counts, per request id, the replies a client
got and the audit events Lifeline published, and asserts exactly one of each.

The server runs with max_payload = 256 KiB (not NATS's default 1 MiB), so these tests also
prove Lifeline learns the limit from the connection instead of assuming it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import pytest
from helpers import (
    SECRET_KEY,
    Ledger,
    MisbehavingProvider,
    Service,
    free_port,
    hpub,
    published,
    raw_publish,
    wait_for,
)

from schemas.subjects import ABORT, ABORT_KEY, DISPATCHER_SERVICE
from schemas.wire import MAX_ID_LENGTH, encoder
from service import discovery
from service.embedded import EmbeddedNats

MAX_PAYLOAD = 256 * 1024
MAX_IN_FLIGHT = 40
HELLO = [{"role": "user", "content": "hello"}]


def request(request_id: str, content: str = "hello", **fields: Any) -> bytes:
    return encoder.encode(
        {"id": request_id, "messages": [{"role": "user", "content": content}], **fields}
    )


@pytest.fixture
def provider() -> Iterator[MisbehavingProvider]:
    with MisbehavingProvider() as server:
        yield server


@pytest.fixture
def server() -> Iterator[EmbeddedNats]:
    """A server of its own, for a test that starts (and stops, kills, starves) its own processes."""
    with EmbeddedNats(port=-1, conf=f"max_payload: {MAX_PAYLOAD}\n") as nats_server:
        yield nats_server


def contract_config(provider: MisbehavingProvider, **dispatcher: Any) -> dict[str, Any]:
    return {
        "dispatcher": {"max_in_flight": MAX_IN_FLIGHT, "max_timeout_s": 60, **dispatcher},
        "providers": {
            "echo": {"kind": "fake", "model": "echo-1"},
            "slow": {"kind": "fake", "model": "slow-1", "latency_ms": 1000},
            "http": {
                "kind": "openai",
                "model": "gpt-test",
                "base_url": provider.base_url,
                "timeout_s": 30,  # a loaded machine is slow to serve a huge answer's first 4 MiB
            },
        },
        "routes": {
            "default": {"targets": ["echo"]},
            "slow": {"targets": ["slow"]},
            "http": {"targets": ["http"]},
        },
    }


@pytest.fixture(scope="module")
def shared_server() -> Iterator[EmbeddedNats]:
    """The server of the module's `service`, which nothing else runs on."""
    with EmbeddedNats(port=-1, conf=f"max_payload: {MAX_PAYLOAD}\n") as nats_server:
        yield nats_server


@pytest.fixture(scope="module")
def shared_service(
    tmp_path_factory: pytest.TempPathFactory, shared_server: EmbeddedNats
) -> Iterator[Service]:
    """The three workers and two dispatchers of the tests that only send requests, started
    once for the module (a start is seconds of Python importing, five times over)."""
    with MisbehavingProvider() as provider:
        svc = Service(
            tmp_path_factory.mktemp("contract"), shared_server.url, contract_config(provider)
        )
        try:
            # two dispatcher replicas: one bad request must not take down either
            svc.start_all(["echo", "slow", "http"], dispatchers=2)
            yield svc
        finally:
            svc.stop()


@pytest.fixture
def service(shared_service: Service) -> Iterator[Service]:
    """The module's service, for the tests that only send it requests. Each settles its own
    (every reply and audit event it waits for has come, then a quiet spell) and counts only what
    its own ledger sent, so none sees another's; after each, every process must still be up."""
    yield shared_service
    for proc in shared_service.procs:
        assert proc.proc.poll() is None, (
            f"{proc.log_path.name} exited ({proc.proc.returncode}); log:\n{proc.log()[-3000:]}"
        )


async def dispatchers_in_flight(nc: Any) -> list[int]:
    stats = await discovery.ask(nc, "STATS", DISPATCHER_SERVICE, timeout_s=2.0)
    return [
        e["data"]["in_flight"] for s in stats for e in s["endpoints"] if e["name"] == "complete"
    ]


@pytest.fixture
async def ledger(shared_server: EmbeddedNats) -> AsyncIterator[Ledger]:
    """A client of the module's server. After the test, the module's dispatchers must have
    nothing left in flight: a request held past its answer would fill the next test's bound."""
    nc = await nats.connect(shared_server.url)
    yield await Ledger(nc).start()
    try:
        counts: list[int] = []

        async def idle() -> bool:
            counts[:] = await dispatchers_in_flight(nc)
            return len(counts) == 2 and not any(counts)

        await wait_for(idle, 10, what=lambda: f"the dispatchers' requests in flight: {counts}")
    finally:
        await nc.close()


async def still_serving(ledger: Ledger, rounds: int = 8) -> None:
    """Both dispatchers still answer: the queue group spreads these over them."""
    ids = [f"alive-{random.getrandbits(48):x}" for _ in range(rounds)]
    before = sum(ledger.replies.values()), ledger.audit_events
    for request_id in ids:
        await ledger.send(request_id, request(request_id))
    await ledger.settle(before[0] + rounds, before[1] + rounds)
    assert all(ledger.reply_of[i].status == "ok" for i in ids)


def iter_sizes(top: int, span: int, step: int) -> Iterator[int]:
    """top-span .. top, every `step` bytes, and top itself."""
    yield from range(top - span, top, step)
    yield top


def padded(request_id: str, size: int, route: str = "default") -> bytes:
    """A request of exactly `size` bytes (its one message padded)."""
    bare = len(request(request_id, "", route=route))
    payload = request(request_id, "x" * (size - bare), route=route)
    assert len(payload) == size
    return payload


async def test_requests_swept_up_to_max_payload_each_get_one_answer_and_the_dispatchers_survive(
    service, ledger
):
    ids = []
    for size in iter_sizes(MAX_PAYLOAD, 512, 32):
        ids.append(f"size-{size}")
        await ledger.send(ids[-1], padded(ids[-1], size))
    await ledger.settle(len(ids), len(ids))
    ledger.assert_exactly_once(ids)
    for request_id in ids:
        error = ledger.reply_of[request_id].error
        assert error is not None and error.type == "payload_too_large", request_id
        assert "max_payload" in error.message and str(MAX_PAYLOAD) in error.message
    await still_serving(ledger)


async def test_answers_swept_up_to_max_payload_get_one_reply_each_and_say_why_they_failed(
    service, ledger
):
    # The echo provider answers with the request's text: small requests, answers near the limit.
    ids, sizes = [], list(iter_sizes(MAX_PAYLOAD, 400, 25)) + [MAX_PAYLOAD - 1500]
    for size in sizes:
        ids.append(f"answer-{size}")
        await ledger.send(ids[-1], request(ids[-1], f"size {size}", route="http"))
    await ledger.settle(len(ids), len(ids))
    ledger.assert_exactly_once(ids)
    for request_id in ids[:-1]:
        reply = ledger.reply_of[request_id]
        assert reply.status == "error" and reply.error is not None
        kinds = {a.error_type for a in reply.attempts}
        # Too large for the worker's reply, or (a few bytes under) too large for the client's.
        assert reply.error.type == "reply_too_large" or kinds == {"response_too_large"}, (
            request_id,
            reply,
        )
        assert ledger.audit_types[request_id] == reply.error.type
    assert ledger.reply_of[ids[-1]].status == "ok"
    await still_serving(ledger)


async def test_request_ids_have_a_length_limit_and_a_huge_id_is_refused_once(service, ledger):
    ok_id = "i" * MAX_ID_LENGTH
    await ledger.send(ok_id, request(ok_id))
    for n, size in enumerate((MAX_ID_LENGTH + 1, 100_000, MAX_PAYLOAD - 200)):
        await ledger.send("", request("j" * size))
        await ledger.settle(n + 2, n + 2)
        reply = ledger.reply_of[""]
        assert reply.error is not None and reply.error.type == "invalid_request"
        assert f"length <= {MAX_ID_LENGTH}" in reply.error.message and "$.id" in reply.error.message
    assert ledger.replies == {ok_id: 1, "": 3} and ledger.audits == {ok_id: 1, "": 3}
    assert ledger.reply_of[ok_id].status == "ok"
    await still_serving(ledger)


async def test_names_lists_and_quoted_values_near_max_payload_each_get_one_short_refusal(
    service, ledger
):
    """What a reply and its audit event repeat of a request (its route, its targets' names and
    models, a value an error quotes) is bounded, so neither outgrows max_payload: before, a
    route near it made an audit event too large to publish (none went out), a long target name
    an `internal` reply, and 20,000 targets a reply listing each."""
    huge = MAX_PAYLOAD - 400
    cases = {
        "route": ({"route": "r" * huge}, "$.route"),
        "model": ({"targets": [{"provider": "echo", "model": "m" * huge}]}, "$.targets[0].model"),
        "name": ({"targets": [{"provider": "echo", "name": "n" * huge}]}, "$.targets[0].name"),
        "target": ({"targets": ["t" * huge]}, "$.targets[0]"),
        "many": ({"targets": ["echo"] * 20_000}, "$.targets"),
        "role": ({"messages": [{"role": "x" * huge, "content": "hi"}]}, "$.messages[0].role"),
        "fault": ({"faults": {"f" * huge: 503}}, "$.faults"),
    }
    for request_id, (fields, field) in cases.items():
        payload = encoder.encode({"id": request_id, "messages": HELLO, **fields})
        assert len(payload) < MAX_PAYLOAD - 200
        await ledger.send(request_id, payload)
    await ledger.settle(len(cases), len(cases))
    ledger.assert_exactly_once(list(cases))
    for request_id, (_, field) in cases.items():
        error = ledger.reply_of[request_id].error
        assert error is not None and error.type == "invalid_request", (request_id, error)
        assert field in error.message and len(error.message) < 700, (request_id, error.message)
        assert ledger.audit_types[request_id] == "invalid_request"
    await still_serving(ledger)


async def test_requests_whose_id_fills_them_up_to_max_payload_each_get_one_refusal(service, ledger):
    bare = len(request(""))
    sizes = list(iter_sizes(MAX_PAYLOAD, 400, 20))
    for n, size in enumerate(sizes):
        await ledger.send(
            f"#{n}", request("k" * (size - bare))
        )  # the ledger files it under its reply subject
    await ledger.settle(len(sizes), len(sizes))
    assert sum(ledger.replies.values()) == ledger.audit_events == len(sizes)
    assert all(count == 1 for count in ledger.replies.values()) and ledger.audits == {
        "": len(sizes)
    }
    assert {ledger.reply_of[f"#{n}"].error.type for n in range(len(sizes))} == {"invalid_request"}
    await still_serving(ledger)


@pytest.mark.parametrize("depth", [10_000, 100_000])
async def test_deeply_nested_input_gets_an_invalid_request_answer(service, ledger, depth):
    nested = b"[" * depth + b"]" * depth
    payloads = {
        "in-metadata": b'{"id": "in-metadata", "messages": [{"role": "user", "content": "x"}], '
        b'"metadata": {"a": ' + nested + b"}}",
        "top": b'{"id": "top", "x": ' + nested + b"}",
    }
    for request_id, payload in payloads.items():
        await ledger.send(request_id, payload)
    await ledger.settle(2, 2)
    ledger.assert_exactly_once(list(payloads))
    # Under a field the request may not carry, it is refused for that field before its depth.
    said = {"in-metadata": "nested too deeply", "top": "unknown field `x`"}
    for request_id in payloads:
        error = ledger.reply_of[request_id].error
        assert (
            error is not None
            and error.type == "invalid_request"
            and said[request_id] in error.message
        )
    await still_serving(ledger)


RESERVED = [
    "llm.complete",
    "llm.audit.ok",
    "llm.audit.error",
    "llm.provider.echo",
    "llm.cancel.echo",
    "llm.stream",
    "$JS.API.INFO",
    "$KV.lifeline_health.x",
    "$SYS.REQ.SERVER.PING",
    "$SRV.PING",
    "_INBOX.*",
    "_INBOX.>",
]


async def test_a_reply_subject_in_lifelines_or_the_servers_namespace_gets_nothing_and_one_audit(
    service, ledger
):
    landed: dict[str, int] = {}

    async def count(msg) -> None:  # type: ignore[no-untyped-def]
        landed[msg.subject] = landed.get(msg.subject, 0) + 1

    for subject in {s for s in RESERVED if "*" not in s and ">" not in s} - {
        "llm.audit.ok",
        "llm.audit.error",
    }:
        await ledger.nc.subscribe(subject, cb=count)
    await ledger.nc.flush()
    ids = []
    for n, subject in enumerate(RESERVED):
        ids.append(f"reserved-{n}")
        await ledger.send(ids[-1], request(ids[-1]), reply=subject)
    await ledger.settle(0, len(ids))
    ledger.assert_exactly_once(ids, replied=False)
    assert {ledger.audit_types[i] for i in ids} == {"reply_subject_refused"}
    assert landed == {
        "llm.complete": len(ids)
    }  # only the requests themselves: no reply looped back
    assert all(
        b"hello" not in raw for raw in ledger.audit_bytes
    )  # no answer text on the audit subject
    await still_serving(ledger)


async def test_any_bytes_get_one_answer_each(service, ledger):
    rng = random.Random(10)
    pieces = [
        b"{",
        b"}",
        b"[",
        b"]",
        b'"',
        b"\\",
        b":",
        b",",
        b"null",
        b"1e999",
        b"\xff",
        b"\x00",
        b"\xe2\x80\xa8",
        b'"messages"',
        b'"id"',
        b'{"role":"user","content":"x"}',
        b"\xf0\x9f\x92\xa9",
        b"-0",
        b"9" * 400,
    ]
    payloads = [b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 60))) for _ in range(150)]
    payloads += [os.urandom(rng.randint(1, 5000)) for _ in range(50)]
    payloads += [b"", b"null", b"{}", b'{"messages": null}', "\ufeff{}".encode("utf-16")]
    for n, payload in enumerate(payloads):
        await ledger.send(f"fuzz-{n}", payload)
    await ledger.settle(len(payloads), len(payloads))
    # Ids are unreadable in most of these: count per reply subject and in total.
    assert sum(ledger.replies.values()) == len(payloads) and ledger.audit_events == len(payloads)
    assert all(count == 1 for request_id, count in ledger.replies.items())
    await still_serving(ledger)


TRACE_HEADERS = [
    {"traceparent": "garbage"},
    {"traceparent": "00-" + "0" * 32 + "-" + "0" * 16 + "-01"},
    {"traceparent": "00-" + "z" * 32 + "-" + "1" * 16 + "-zz"},
    {"traceparent": "ff-" + "1" * 32 + "-" + "1" * 16 + "-01-extra"},
    {"traceparent": "00-" + "1" * 32 + "-" + "1" * 16 + "-01", "tracestate": "a=" + "b" * 5000},
    {"traceparent": "00-" + "1" * 32 + "-" + "1" * 16 + "-01", "tracestate": ",,=,=x,\u0000"},
    {"tracestate": "only=state"},
    {"Status": "503"},
    {"Lifeline-Deadline-Ms": "yesterday", "Nats-Msg-Id": "x" * 2000},
]


async def test_bytes_nats_py_cannot_read_leave_every_process_serving_and_each_request_audited(
    shared_server, service, ledger
):
    """A request whose reply subject is not UTF-8 is refused and audited like any other that
    cannot be answered on; frames nats-py cannot read on the subjects every dispatcher and
    worker hear (llm.abort, llm.cancel.<name>) are dropped. Each once ended a process's read
    loop for good: up, ready by every probe, deaf to every request."""
    body = request("not-utf8")
    await raw_publish(
        shared_server.url,
        [
            b"PUB llm.complete _INBOX.\xff\xfe %d\r\n%s\r\n" % (len(body), body),
            hpub(b"llm.abort", b"NATS/1.0 \xff\r\n\r\n"),
            hpub(b"llm.abort", b"NATS/1.0"),
            hpub(b"llm.cancel.echo", b"NATS/1.0 503 \xff\xfe\r\n\r\n"),
        ],
    )
    await ledger.settle(0, 1)
    assert ledger.audit_types["not-utf8"] == "reply_subject_refused"
    await still_serving(ledger, rounds=16)


async def test_any_trace_and_other_headers_get_one_answer_each(service, ledger):
    ids = [f"headers-{n}" for n in range(len(TRACE_HEADERS))]
    for request_id, headers in zip(ids, TRACE_HEADERS):
        await ledger.send(request_id, request(request_id), headers=headers)
    await ledger.settle(len(ids), len(ids))
    ledger.assert_exactly_once(ids)
    assert {ledger.reply_of[i].status for i in ids} == {"ok"}


async def test_aborts_at_any_moment_and_junk_on_llm_abort_leave_one_answer_per_request(
    service, ledger
):
    """Requests on a 1 s provider, half of them aborted at a random moment (right behind the
    request, in flight, after the answer), odd abort keys, and junk on llm.abort, spread over
    two dispatchers: every request still gets one reply and one audit event."""
    rng = random.Random(7)
    odd_keys = ["", " ", "x" * 300, "k\u00e9y", "dup", "dup"]
    ids, aborted = [], set()
    # No more than one dispatcher admits (MAX_IN_FLIGHT): however the server spreads them, none
    # is refused `overloaded` (60 were, once in a few hundred runs, when 41 went to one).
    for n in range(MAX_IN_FLIGHT):
        request_id = f"abort-{n}"
        key = odd_keys[n] if n < len(odd_keys) else f"key-{n}"
        ids.append(request_id)
        await ledger.send(request_id, request(request_id, route="slow"), headers={ABORT_KEY: key})
        if n % 2 and n >= len(odd_keys):
            aborted.add(request_id)
            if n % 3 == 0:  # right behind its request, in the same read, most often
                await ledger.nc.publish(ABORT, key.encode())
            else:
                delay = rng.choice([0.01, 0.3, 0.8, 1.5])  # in flight, or after the answer
                asyncio.get_running_loop().call_later(
                    delay, lambda k=key: asyncio.ensure_future(ledger.nc.publish(ABORT, k.encode()))
                )
        for junk in (os.urandom(rng.randint(0, 64)), b"dup", b"x" * 5000):
            await ledger.nc.publish(ABORT, junk)
    await ledger.settle(len(ids), len(ids), timeout_s=30, quiet_s=1.0)
    ledger.assert_exactly_once(ids)
    outcomes = {i: ledger.reply_of[i].error.type if ledger.reply_of[i].error else "ok" for i in ids}
    assert {outcomes[i] for i in ids if i not in aborted} <= {"ok", "aborted"}, outcomes  # "dup"
    assert {outcomes[i] for i in aborted} <= {"ok", "aborted"}, outcomes
    assert sum(outcomes[i] == "aborted" for i in aborted) >= len(aborted) // 2
    assert all(outcomes[i] == "ok" for i in ids[len(odd_keys) :] if i not in aborted)
    await still_serving(ledger)


async def test_a_provider_echoing_the_api_key_never_gets_it_into_replies_audit_logs_or_spans(
    tmp_path, server, provider
):
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": provider.base_url.removesuffix("/v1"),
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_METRIC_EXPORT_INTERVAL": "200",
        "LIFELINE_LOG_LEVEL": "DEBUG",  # every library's lines too: httpx quotes status lines
    }
    svc = Service(tmp_path, server.url, contract_config(provider), env=otel)
    try:
        svc.start_all(["http"], dispatchers=1)
        nc = await nats.connect(server.url)
        ledger = await Ledger(nc).start()
        outcomes = {
            "echo key": "auth",
            "shape key": "server_error",
            "escaped key": "bad_request",
            "status key": "server_error",
            "answer key": None,  # answered: the key is in its model and its text
            "tool key": "invalid_output",  # a tool the request does not offer: quoted by id
        }
        ids = list(outcomes)
        offered = {"tools": [{"name": "get_weather"}]}
        for request_id in ids:
            fields = offered if request_id == "tool key" else {}
            await ledger.send(request_id, request(request_id, request_id, route="http", **fields))
        await ledger.settle(len(ids), len(ids))
        ledger.assert_exactly_once(ids)
        replies = [encoder.encode(ledger.reply_of[i]) for i in ids]
        assert {i: ledger.reply_of[i].attempts[0].error_type for i in ids} == outcomes
        answered = ledger.reply_of["answer key"]
        assert answered.content == "your key is Bearer ***" and answered.model == "Bearer ***"
        await nc.close()
    finally:
        svc.stop()  # flushes the spans
    secret = SECRET_KEY.encode()
    assert provider.exported, "no spans were exported"
    for text in [
        *replies,
        *ledger.audit_bytes,
        *provider.exported,
        *(p.log().encode() for p in svc.procs),
    ]:
        assert secret not in text


async def test_huge_and_compression_bomb_answers_are_cut_off_and_the_worker_stays_small(
    service, ledger
):
    worker = service.procs[2]  # the http worker
    ids = ["size 50000000", "bomb 1000000000"]
    for request_id in ids:
        await ledger.send(request_id, request(request_id, request_id, route="http"))
    await ledger.settle(2, 2, timeout_s=60)
    ledger.assert_exactly_once(ids)
    for request_id in ids:
        [attempt] = ledger.reply_of[request_id].attempts
        assert attempt.error_type == "response_too_large" and "max_response_bytes" in (
            attempt.message or ""
        )
    assert worker.memory_kib()["VmHWM"] < 200 * 1024, worker.memory_kib()


async def test_a_burst_twenty_times_the_in_flight_bound_is_answered_within_each_deadline(
    service, ledger
):
    timeout_s, burst = 3.0, 20 * MAX_IN_FLIGHT
    ids = [f"burst-{n}" for n in range(burst)]
    for request_id in ids:
        await ledger.send(request_id, request(request_id, route="slow", timeout_s=timeout_s))
    await ledger.settle(burst, burst, timeout_s=timeout_s + 10)
    ledger.assert_exactly_once(ids)
    # Within each deadline: served by one call that ended in time (one past it would be a
    # timeout, and one never started a deadline_exceeded), or refused without being tried
    # (overloaded), never held waiting for a slot.
    replies = [ledger.reply_of[i] for i in ids]
    errors = Counter(r.error.type if r.error else "ok" for r in replies)
    assert (
        set(errors) <= {"ok", "overloaded"}
        and errors["ok"] >= 2 * MAX_IN_FLIGHT
        and errors["overloaded"]
    ), errors

    def in_time(reply: Any) -> bool:
        if reply.error is None:
            return [(a.target, a.outcome) for a in reply.attempts] == [("slow", "ok")]
        return not reply.attempts

    assert all(in_time(r) for r in replies), [r for r in replies if not in_time(r)][:2]
    overloaded = next(
        r for r in ledger.reply_of.values() if r.error and r.error.type == "overloaded"
    )
    assert overloaded.error.retry_after_s and "max_in_flight" in overloaded.error.message
    for dispatcher in service.procs[-2:]:
        assert dispatcher.memory_kib()["VmHWM"] < 250 * 1024, dispatcher.memory_kib()
    await still_serving(ledger)


async def test_a_burst_of_long_prompts_beyond_the_servers_default_backlog_loses_none(
    service, shared_server, ledger
):
    """Long prompts sent faster than the dispatchers read them wait at the server. Past
    nats-server's default max_pending (64 MiB, about 330 of these) it would close a
    dispatcher's connection as a slow consumer and drop all it held for it: requests with
    neither a reply nor an audit event. The embedded server allows a larger backlog."""
    size, burst, senders = 200_000, 2000, 4
    ids = [f"long-{n}" for n in range(burst)]
    text = "x" * size
    connections = [
        await nats.connect(shared_server.url, pending_size=256 * 2**20) for _ in range(senders)
    ]

    async def send(connection: Any, mine: list[str]) -> None:
        for request_id in mine:
            payload = request(request_id, text, route="slow", timeout_s=10)
            await connection.publish("llm.complete", payload, reply=ledger.reply_to(request_id))
        await connection.flush(timeout=60)

    try:
        await asyncio.gather(*(send(c, ids[k::senders]) for k, c in enumerate(connections)))
        await ledger.settle(burst, burst, timeout_s=60)
    finally:
        for connection in connections:
            await connection.close()
    ledger.assert_exactly_once(ids)
    outcomes = Counter(
        ledger.reply_of[i].error.type if ledger.reply_of[i].error else "ok" for i in ids
    )
    assert set(outcomes) <= {"ok", "overloaded"} and outcomes["ok"] >= MAX_IN_FLIGHT, outcomes
    await still_serving(ledger)


async def test_a_request_that_cannot_start_before_its_deadline_is_not_sent_to_a_provider(
    service, ledger
):
    # deadline_unix_ms counts from the client's clock: a request queued past it is answered
    # without a call.
    ids = [f"late-{n}" for n in range(3)]
    for request_id in ids:
        await ledger.send(request_id, request(request_id, deadline_unix_ms=1_000))
    await ledger.settle(3, 3)
    ledger.assert_exactly_once(ids)
    assert {ledger.reply_of[i].error.type for i in ids} == {"deadline_exceeded"}
    assert all(ledger.reply_of[i].attempts == [] for i in ids)


# ---- the connection -----------------------------------------------------------------------


TOKEN = "s3cret-token-0123456789"


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    with EmbeddedNats(
        port=free_port(), conf=f'authorization {{ token: "{TOKEN}" }}\n'
    ) as nats_server:
        yield nats_server


def revoke(server: EmbeddedNats) -> None:
    """Change the server's token and reload its config: it closes the connections that used the
    old one."""
    assert server.store_dir is not None and server.pid is not None
    conf = Path(server.store_dir) / "nats.conf"
    conf.write_text(conf.read_text().replace(TOKEN, "another-token"))
    os.kill(server.pid, signal.SIGHUP)


def authed(server: EmbeddedNats) -> str:
    return f"nats://{TOKEN}@{server.host}:{server.port}"


async def test_a_connection_closed_for_good_by_the_server_ends_the_processes_non_zero(
    tmp_path, auth_server, provider
):
    svc = Service(tmp_path, authed(auth_server), contract_config(provider))
    try:
        worker, dispatcher = svc.start_all(["echo"], dispatchers=1)
        revoke(auth_server)
        for proc in (worker, dispatcher):
            assert proc.proc.wait(timeout=20) == 1
            assert "gone for good" in proc.log() and "authorization" in proc.log().lower()
            assert "refused the user info in the URL" in proc.log()  # which credential
            assert TOKEN not in proc.log()  # the URL is logged without its secret
    finally:
        svc.stop()


async def test_lifeline_run_stops_as_a_whole_when_its_connection_is_closed_for_good(
    tmp_path, auth_server, provider
):
    svc = Service(tmp_path, authed(auth_server), contract_config(provider))
    try:
        run = svc.start("run", ready="dispatcher ready")
        revoke(auth_server)
        assert run.proc.wait(timeout=30) == 1
        assert "lost its NATS connection for good" in run.log() and TOKEN not in run.log()
    finally:
        svc.stop()


async def test_a_credential_refused_on_reconnect_ends_the_process_instead_of_retrying_forever(
    tmp_path, provider
):
    """The server comes back with another token: every reconnect is refused. nats-py would
    retry forever; Lifeline gives up on the second refusal, as the Go client does, saying which
    credential was refused and what to do, as a refusal at start-up does (it said only "gone
    for good (Error: nats: 'Authorization Violation')")."""
    port = free_port()
    conf = 'authorization {{ token: "{}" }}\n'
    first = EmbeddedNats(port=port, conf=conf.format(TOKEN))
    first.start()
    svc = Service(tmp_path, authed(first), contract_config(provider))
    second = None
    try:
        dispatcher = svc.dispatcher()
        first.stop()
        second = EmbeddedNats(port=port, conf=conf.format("another-token"))
        second.start()
        assert dispatcher.proc.wait(timeout=30) == 1
        assert "gone for good" in dispatcher.log() and "Authorization" in dispatcher.log()
        assert TOKEN not in dispatcher.log()
        assert "refused the user info in the URL" in dispatcher.log()
        assert "check them (README: Connecting to a secured NATS)" in dispatcher.log()
    finally:
        svc.stop()
        if second is not None:
            second.stop()


async def test_a_server_restart_is_survived_by_reconnecting(tmp_path, provider):
    port = free_port()
    first = EmbeddedNats(port=port)
    first.start()
    svc = Service(tmp_path, first.url, contract_config(provider))
    second = None
    try:
        _, dispatcher = svc.start_all(["echo"], dispatchers=1)
        first.stop()
        second = EmbeddedNats(port=port)
        second.start()
        nc = await nats.connect(second.url)
        try:
            ledger = await Ledger(nc).start()
            # Until both have reconnected: the dispatcher alone answers no_responders.
            for _ in range(100):
                await ledger.send("after-restart", request("after-restart"))
                await asyncio.sleep(0.1)
                reply = ledger.reply_of.get("after-restart")
                if reply is not None and reply.status == "ok":
                    break
            assert ledger.reply_of["after-restart"].status == "ok"
            assert dispatcher.proc.poll() is None
            # What a closed connection can mean, said where an operator looks first.
            assert "or this process fell behind by more than the server's max_pending" in (
                dispatcher.log()
            )
            # And that it came back: its log ended on "Connection refused" warnings.
            assert f"reconnected to NATS at {second.url}" in dispatcher.log()
        finally:
            await nc.close()
    finally:
        svc.stop()
        if second is not None:
            second.stop()


async def test_lifeline_run_stopped_while_nats_is_down_stops_cleanly(tmp_path, provider):
    """A stop during an outage: what the components still held for the server is lost with
    it, and nats-py's close raises writing it into the dead socket; the process still exits
    0, as a supervisor expects of a clean stop, and without a traceback."""
    server = EmbeddedNats(port=-1)
    server.start()
    svc = Service(tmp_path, server.url, contract_config(provider))
    try:
        run = svc.start("run", "--gateway-port", "-1", ready="dispatcher ready")
        server.stop()
        run.wait_for_log("Connection refused|unexpected EOF")
        assert run.stop() == 0, run.log()[-3000:]
        assert "Traceback" not in run.log() and "stopped" in run.log()
    finally:
        svc.stop()
        server.stop()


# ---- what a request can name, and a replica that dies ----------------------------------


async def stats_since(kv: Any, since_ms: int) -> list[Any]:
    """Every dispatcher's stats document in the bucket, once each was written at or after
    since_ms."""
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:  # nats-py's answer for an empty bucket: none written yet
        return []
    entries = [await kv.get(key) for key in keys if key.startswith("stats.")]
    fresh = all(json.loads(entry.value)["ts_unix_ms"] >= since_ms for entry in entries)
    return entries if entries and fresh else []


async def test_thousands_of_made_up_models_neither_grow_the_dispatcher_nor_its_shared_stats(
    tmp_path, server, provider
):
    config = contract_config(provider)
    config["providers"]["listed"] = {"kind": "fake", "model": "m1", "models": ["m2"]}
    config["dispatcher"]["max_in_flight"] = 10_000  # this test is about state, not admission
    svc = Service(tmp_path, server.url, config)
    try:
        *_, dispatcher = svc.start_all(["echo", "listed"], dispatchers=1)
        nc = await nats.connect(server.url)
        ledger = await Ledger(nc).start()
        await still_serving(ledger)
        before_kib = dispatcher.memory_kib()["VmRSS"]
        ids = []
        for n in range(4000):
            ids.append(f"model-{n}")
            provider_name = "listed" if n % 8 == 0 else "echo"
            await ledger.send(
                ids[-1],
                request(ids[-1], targets=[{"provider": provider_name, "model": f"made-up-{n}"}]),
            )
            if n % 500 == 499:  # in batches: what is measured is state, not requests in flight
                await ledger.settle(n + 9, n + 9, timeout_s=60, quiet_s=0)
        await ledger.settle(len(ids) + 8, len(ids) + 8, timeout_s=60)
        burst_done_ms = int(time.time() * 1000)
        # A change after the burst, so that the dispatcher writes its stats document again
        # (it does so each second it has news): a document this new has seen the whole burst.
        await still_serving(ledger)
        ledger.assert_exactly_once([*ids, *(i for i in ledger.audits if i.startswith("alive-"))])
        refused = [ledger.reply_of[i].error for i in ids[::8]]
        assert all(
            e is not None and e.type == "invalid_request" and "providers.listed.models" in e.message
            for e in refused
        ), [e for e in refused if e is None or "providers.listed.models" not in e.message][:2]
        assert all(ledger.reply_of[i].status == "ok" for n, i in enumerate(ids) if n % 8)

        def grown_mib() -> float:
            return (dispatcher.memory_kib()["VmRSS"] - before_kib) / 1024

        # The dispatcher hands memory back a moment after a burst (service/memory.py).
        await wait_for(
            lambda: grown_mib() < 25,
            timeout_s=5,
            what=lambda: f"the dispatcher grew {grown_mib():.1f} MiB for 3,500 made-up models",
            interval_s=0.1,
        )
        kv = await nc.jetstream().key_value("lifeline_health")
        stats = await wait_for(lambda: stats_since(kv, burst_done_ms), timeout_s=5, interval_s=0.1)
        assert all(len(entry.value) < 8 * 1024 for entry in stats), [len(e.value) for e in stats]
        await nc.close()
    finally:
        svc.stop()


async def test_a_killed_replica_costs_its_attempts_in_flight_and_the_survivor_takes_the_traffic(
    tmp_path, server, provider
):
    timeout_s, cooldown_s = 1.0, 1.0
    config = contract_config(provider)
    config["providers"]["pair"] = {"kind": "fake", "model": "pair-1", "latency_ms": 200}
    config["routes"]["pair"] = {
        "targets": [{"provider": "pair", "timeout_s": timeout_s}, "echo"],
        "breaker": {"cooldown_s": cooldown_s},
    }
    svc = Service(tmp_path, server.url, config)
    try:
        _, doomed, _survivor, _ = svc.start_all(["echo", "pair", "pair"], dispatchers=1)
        nc = await nats.connect(server.url)
        ledger = await Ledger(nc).start()
        ids: list[str] = []

        async def steady(seconds: float) -> None:
            end = asyncio.get_running_loop().time() + seconds
            while asyncio.get_running_loop().time() < end:
                ids.append(f"pair-{len(ids)}")
                await ledger.send(ids[-1], request(ids[-1], route="pair"))
                await asyncio.sleep(0.02)

        await steady(1.0)
        doomed.proc.kill()  # SIGKILL: no goodbye, its attempts in flight are never answered
        doomed.proc.wait()

        # The story in the order things happened (readings of one clock, never durations):
        # the dead replica's first attempt times out; every request sent before that is
        # answered (the last late timeout is in); the survivor serves again; ten more after.
        def answered_at(request_id: str) -> float:
            return ledger.sent_at[request_id] + ledger.reply_after_s[request_id]

        def fell_back(request_id: str) -> bool:
            reply = ledger.reply_of.get(request_id)
            return reply is not None and [a.outcome for a in reply.attempts] == ["timeout", "ok"]

        def back_at() -> float | None:
            """When the survivor's first answer to a request sent after the late timeouts
            came; None until then."""
            first_timeout = min((answered_at(i) for i in ids if fell_back(i)), default=None)
            if first_timeout is None:
                return None
            before = [i for i in ids if ledger.sent_at[i] < first_timeout]
            if not all(i in ledger.reply_of for i in before):
                return None
            last_timeout = max(answered_at(i) for i in before)
            served = [
                answered_at(i)
                for i in ids
                if ledger.sent_at[i] > last_timeout
                and i in ledger.reply_of
                and ledger.reply_of[i].target == "pair"
            ]
            return min(served, default=None)

        def sent_after(moment: float) -> list[str]:
            return [i for i in ids if ledger.sent_at[i] > moment]

        async with asyncio.timeout(60):
            while (back := back_at()) is None or len(sent_after(back)) < 10:
                ids.append(f"pair-{len(ids)}")
                await ledger.send(ids[-1], request(ids[-1], route="pair"))
                await asyncio.sleep(0.02)
        await ledger.settle(len(ids), len(ids), timeout_s=30)
        ledger.assert_exactly_once(ids)
        assert all(
            ledger.reply_of[i].status == "ok" for i in ids
        )  # what was in flight fell back to echo
        # Only what was sent before the server noticed the closed socket went to the dead
        # replica: nothing sent after its first attempt timed out did.
        fell = [i for i in ids if fell_back(i)]
        first_timeout = min(answered_at(i) for i in fell)
        assert all(ledger.sent_at[i] < first_timeout for i in fell), fell
        later = sent_after(back)
        assert all(ledger.reply_of[i].target == "pair" for i in later), (
            "the survivor is benched again"
        )
        await nc.close()
    finally:
        svc.stop()


async def test_requests_still_in_flight_when_the_shutdown_grace_ends_are_answered_shutting_down(
    tmp_path, server, provider
):
    config = contract_config(provider, shutdown_grace_s=1.5)
    config["providers"]["crawl"] = {"kind": "fake", "model": "crawl-1", "latency_ms": 20_000}
    config["providers"]["quick"] = {"kind": "fake", "model": "quick-1", "latency_ms": 300}
    config["routes"]["crawl"] = {"targets": [{"provider": "crawl", "timeout_s": 30}]}
    config["routes"]["quick"] = {"targets": ["quick"]}
    svc = Service(tmp_path, server.url, config)
    try:
        _, _, dispatcher = svc.start_all(["crawl", "quick"], dispatchers=1)
        nc = await nats.connect(server.url)
        ledger = await Ledger(nc).start()
        crawling = [f"crawl-{n}" for n in range(5)]
        quick = [f"quick-{n}" for n in range(5)]
        for request_id in crawling:
            await ledger.send(request_id, request(request_id, route="crawl", timeout_s=60))
        for request_id in quick:
            await ledger.send(request_id, request(request_id, route="quick"))
        await nc.flush()
        await asyncio.sleep(0.1)  # all ten are in flight at the dispatcher
        dispatcher.proc.send_signal(signal.SIGTERM)

        await ledger.settle(10, 10, timeout_s=15)
        ledger.assert_exactly_once(crawling + quick)
        assert all(ledger.reply_of[i].status == "ok" for i in quick)  # done within the grace
        for request_id in crawling:
            reply = ledger.reply_of[request_id]
            assert reply.error is not None and reply.error.type == "shutting_down", reply
            assert [(a.target, a.outcome, a.reason) for a in reply.attempts] == [
                ("crawl", "cancelled", "shutting_down")
            ]
            assert reply.error.retry_after_s and "Send it again" in reply.error.message
            assert ledger.audit_types[request_id] == "shutting_down"
        # Answered at the grace's end (1.5 s), not when crawl would have answered (20 s) or
        # timed out (30 s), which the wait for the replies above does not reach.
        assert await asyncio.to_thread(dispatcher.proc.wait, 15) == 0
        assert "answering them shutting_down" in dispatcher.log()
        # Their attempts were cancelled at the worker: nothing keeps the provider call running.
        stats = await discovery.ask(nc, "STATS", "lifeline-worker-crawl", timeout_s=2.0)
        (cancel,) = [e for e in stats[0]["endpoints"] if e["name"] == "cancel"]
        assert cancel["data"]["cancelled"] == len(crawling)
        await nc.close()
    finally:
        svc.stop()


async def test_a_rolling_restart_of_the_dispatchers_leaves_no_request_without_its_reply(
    tmp_path, server, provider
):
    """Steady traffic while one dispatcher after the other gets SIGTERM and a new one starts:
    every request is answered once and audited once, and none finds nobody listening."""
    config = contract_config(provider, shutdown_grace_s=5)
    config["providers"]["steady"] = {"kind": "fake", "model": "steady-1", "latency_ms": 200}
    config["routes"]["steady"] = {"targets": ["steady"]}
    svc = Service(tmp_path, server.url, config)
    try:
        _, first, second = svc.start_all(["steady"], dispatchers=2)
        nc = await nats.connect(server.url)
        ledger = await Ledger(nc).start()
        ids: list[str] = []
        sending = True

        async def steady() -> None:
            while sending:
                ids.append(f"roll-{len(ids)}")
                await ledger.send(ids[-1], request(ids[-1], route="steady"))
                await asyncio.sleep(0.01)

        traffic = asyncio.ensure_future(steady())
        for old in (first, second):
            await asyncio.sleep(0.5)
            old.proc.send_signal(signal.SIGTERM)  # while requests are in flight at it
            await asyncio.to_thread(svc.dispatcher)  # its replacement, before the next goes
            assert await asyncio.to_thread(old.proc.wait, 15) == 0
        await asyncio.sleep(0.5)
        sending = False
        await traffic
        await ledger.settle(len(ids), len(ids), timeout_s=30)
        ledger.assert_exactly_once(ids)
        assert not ledger.unheard  # a dispatcher was always subscribed
        assert {ledger.reply_of[i].status for i in ids} == {"ok"}  # each done within the grace
        await nc.close()
    finally:
        svc.stop()


async def test_requests_still_waiting_for_their_refusal_at_shutdown_are_each_answered(
    lifeline, nats_url
):
    """A flood past max_in_flight queues its refusals; the shutdown grace ends while thousands
    still wait: each still gets its one reply and audit event before the dispatcher stops."""
    from helpers import config, fake

    stack = await lifeline(
        config({"slow": fake(latency_ms=3000)}, max_in_flight=1, shutdown_grace_s=0.2)
    )
    dispatcher = stack.dispatcher
    nc = await nats.connect(nats_url, pending_size=64 * 1024 * 1024)
    ledger = await Ledger(nc).start()
    ids = [f"r{n}" for n in range(6_000)]
    for request_id in ids:
        await ledger.send(
            request_id,
            encoder.encode({"id": request_id, "messages": [{"role": "user", "content": "hi"}]}),
        )
    await published(nc)  # all 6,000 reached the server while the dispatcher took them
    await wait_for(lambda: len(dispatcher._refusals) > 1000, timeout_s=20)
    await stack.stop()
    assert not dispatcher._refusals
    await ledger.settle(len(ids), len(ids), timeout_s=60)
    ledger.assert_exactly_once(ids)
    await nc.close()
