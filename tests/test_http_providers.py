"""End to end over real sockets: client -> NATS -> dispatcher -> worker -> local HTTP server.

The local server speaks OpenAI's Chat Completions shape, so this also covers any
OpenAI-compatible server (vLLM, Ollama, llama.cpp) reached through `base_url`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import nats
import pytest
from helpers import (
    USER_HELLO,
    LocalHTTPServer,
    ask,
    config,
    fake,
    serving,
    spawn_lifeline,
    wait_for,
    write_config,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from schemas import ChatMessage, ProviderRequest, subjects
from schemas.wire import encoder


class FakeOpenAI(LocalHTTPServer):
    """Answers POST /v1/chat/completions from a script: ("ok", text) | (status, message or the
    whole error object[, headers]) | ("hang", s) | ("slow", s): "hi" after s seconds."""

    def __init__(self) -> None:
        super().__init__(_Handler)
        self.script: list[tuple[Any, ...]] = []
        self.requests: list[dict] = []
        self.finished_hangs = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    server: FakeOpenAI

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.requests.append(
            {"path": self.path, "headers": dict(self.headers), "body": body}
        )
        action, arg, *headers = self.server.script.pop(0) if self.server.script else ("ok", "hi")
        if action == "hang":
            time.sleep(float(arg))  # type: ignore[arg-type]
            self.server.finished_hangs += 1
            return
        if action == "slow":  # answers after a while, holding its connection meanwhile
            time.sleep(float(arg))  # type: ignore[arg-type]
            action, arg = "ok", "hi"
        if action == "ok":
            self._send(200, _completion(str(arg), body["model"]))
        else:
            error = arg if isinstance(arg, dict) else _error(str(arg))
            self._send(int(action), {"error": error}, *headers)  # type: ignore[call-overload]

    def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def _error(message: str) -> dict:
    return {"message": message, "type": "x", "param": None, "code": None}


def _completion(text: str, model: str) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    }


@pytest.fixture
def http_server() -> Iterator[FakeOpenAI]:
    with serving(FakeOpenAI()) as server:
        yield server


def openai_at(server: FakeOpenAI, **extra: object) -> dict:
    return {
        "kind": "openai",
        "model": "local-llama",
        "base_url": server.base_url,
        "api_key_env": "",
        **extra,
    }


async def test_an_openai_compatible_server_answers_through_nats(lifeline, client, http_server):
    await lifeline(config({"local": openai_at(http_server)}))
    http_server.script = [("ok", "Because.")]
    reply = await ask(client, {**USER_HELLO, "max_tokens": 5})
    assert (reply.status, reply.content, reply.model) == ("ok", "Because.", "local-llama")
    assert reply.usage is not None and (reply.usage.input_tokens, reply.usage.output_tokens) == (
        9,
        2,
    )
    [sent] = http_server.requests
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"]["max_tokens"] == 5 and sent["body"]["messages"] == USER_HELLO["messages"]


async def test_an_http_429_falls_back_with_the_providers_message(lifeline, client, http_server):
    await lifeline(config({"local": openai_at(http_server), "backup": fake(reply="b")}))
    http_server.script = [(429, "Rate limit reached for requests")]
    reply = await ask(client, USER_HELLO)
    assert reply.provider == "backup"
    failed = reply.attempts[0]
    assert (failed.error_type, failed.status_code) == ("rate_limit", 429)
    assert "Rate limit reached" in (failed.message or "")


# A reasoning model (o1, o3, gpt-5) answers 400 to temperature, top_p and stop; a local model
# takes them. Sampling parameters every target gets but those the first drops:
SAMPLED = {"temperature": 0.2, "top_p": 0.9, "stop": ["END"], "seed": 7, "max_tokens": 50}


def reasoning_first(reasoning: FakeOpenAI, local: FakeOpenAI) -> dict:
    data = config(
        {"o3": openai_at(reasoning, model="o3-mini"), "local": openai_at(local)},
        {"default": {"targets": ["reasoning", "local"]}},
    )
    data["targets"] = {"reasoning": {"provider": "o3", "drop": ["temperature", "top_p", "stop"]}}
    return data


@pytest.fixture
def second_server() -> Iterator[FakeOpenAI]:
    with serving(FakeOpenAI()) as server:
        yield server


async def test_a_target_that_drops_parameters_its_model_refuses_answers_without_them(
    lifeline, client, audit, http_server, second_server
):
    await lifeline(reasoning_first(http_server, second_server))
    http_server.script = [("ok", "Because.")]
    reply = await ask(client, {**USER_HELLO, **SAMPLED})
    assert (reply.status, reply.content, reply.target) == ("ok", "Because.", "reasoning")
    [sent] = http_server.requests
    assert {"temperature", "top_p", "stop"}.isdisjoint(sent["body"])
    assert (sent["body"]["seed"], sent["body"]["max_tokens"]) == (7, 50)
    [(_, event)] = await audit.wait_for(1)
    assert (event.status, event.target, event.model) == ("ok", "reasoning", "o3-mini")
    assert second_server.requests == []


async def test_the_next_target_after_one_that_drops_parameters_gets_them_all(
    lifeline, client, http_server, second_server
):
    await lifeline(reasoning_first(http_server, second_server))
    http_server.script = [(503, "overloaded")]
    reply = await ask(client, {**USER_HELLO, **SAMPLED})
    assert (reply.status, reply.target) == ("ok", "local")
    assert [(a.target, a.outcome) for a in reply.attempts] == [
        ("reasoning", "error"),
        ("local", "ok"),
    ]
    [dropped], [whole] = http_server.requests, second_server.requests
    assert {"temperature", "top_p", "stop"}.isdisjoint(dropped["body"])
    assert {name: whole["body"][name] for name in SAMPLED} == SAMPLED


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "1e306"}, 3600.0),
        ({"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"}, 3600.0),
        ({"retry-after-ms": "1e300", "retry-after": "2"}, 3600.0),
        ({"retry-after": "-5"}, None),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "NaN"}, None),
        ({"retry-after": "in a while"}, None),
        ({"retry-after": "Fri, 31 Dec 99999 23:59:59 GMT"}, None),
    ],
    ids=["1e306", "year-9999", "huge-ms", "negative", "inf", "nan", "words", "year-99999"],
)
async def test_a_providers_retry_after_reaches_the_client_at_most_an_hour(
    lifeline, client, http_server, headers, seconds
):
    """A Retry-After of years (or 1e306 seconds) came through as it was: a client told to wait
    that long, and the gateway's 429 failed to be written (round(1e306 * 1000) overflows).
    It is bounded by the longest breaker cooldown, an hour; nonsense says nothing."""
    await lifeline(config({"local": openai_at(http_server)}))
    http_server.script = [(429, "Rate limit reached for requests", headers)]
    reply = await ask(client, USER_HELLO)
    assert reply.error is not None and reply.error.type == "all_failed"
    assert reply.error.retry_after_s == seconds
    assert (reply.attempts[0].error_type, reply.attempts[0].status_code) == ("rate_limit", 429)


@pytest.mark.parametrize("echoed", [0, 100_000], ids=["short", "over-64-kib"])
async def test_a_context_length_error_takes_its_chain_however_long_its_body(
    lifeline, client, http_server, echoed
):
    """OpenAI's context_length_exceeded in a body over 64 KiB (the prompt quoted in its message,
    before the code) was a bad_request: the request went on down the route's targets instead
    of to its context_length chain. The message stays one short line either way."""
    providers = {"local": openai_at(http_server), "next": fake(), "long": fake(reply="long")}
    route = {"targets": ["local", "next"], "context_length_fallbacks": ["long"]}
    await lifeline(config(providers, routes={"default": route}))
    message = "This model's maximum context length is 8192 tokens. However, your messages"
    error = {
        "message": f"{message} resulted in 40000 tokens: {'x' * echoed}",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
    http_server.script = [(400, error)]
    reply = await ask(client, USER_HELLO)
    failed = reply.attempts[0]
    assert (failed.error_type, failed.status_code, reply.provider) == (
        "context_length",
        400,
        "long",
    )
    assert failed.message.startswith("openai 400: ") and message in failed.message
    assert len(failed.message) <= 300


async def test_an_error_body_with_a_lone_surrogate_keeps_its_kind_and_status(
    lifeline, client, http_server, exporter
):
    """JSON may escape a lone surrogate, which no UTF-8 reply can carry: the worker still
    answers at once, with the failure's kind and status, and its span's status says it in
    UTF-8 (an OTLP exporter failed on the surrogate and dropped its whole batch of spans)."""
    providers = {"local": openai_at(http_server, timeout_s=30), "backup": fake()}
    await lifeline({**config(providers), "audit": {"error_text": True}})  # messages on spans
    http_server.script = [(503, "upstream overloaded \ud800")]  # json.dumps writes \ud800
    reply = await ask(client, USER_HELLO, timeout_s=60)
    failed = reply.attempts[0]
    assert (failed.error_type, failed.status_code) == ("server_error", 503)
    assert "upstream overloaded ?" in failed.message and reply.provider == "backup"

    def statuses() -> list[str]:  # the worker's call and the dispatcher's attempt
        spans = exporter.get_finished_spans()
        return [s.status.description for s in spans if "overloaded" in (s.status.description or "")]

    await wait_for(lambda: len(statuses()) == 2, what=lambda: f"spans: {statuses()}")
    for status in statuses():
        status.encode()  # no lone surrogate left


@pytest.mark.parametrize("error_text", [False, True], ids=["default", "opted-in"])
async def test_a_providers_error_quoting_the_prompt_stays_out_of_audit_and_spans(
    lifeline, client, http_server, exporter, audit, error_text
):
    """Prompt text stays out of audit events and spans unless the config opts in (DESIGN.md),
    and a provider's error may quote the input it refused (a validation error quoting the
    value, say). The client's reply keeps the provider's words, whatever the setting; the audit
    event and every span (the worker's call, the dispatcher's attempt, the request's) say
    why by the failure's kind and HTTP status, and carry its message only with
    `audit.error_text = true`."""
    providers = {"local": openai_at(http_server), "backup": fake(reply="fine")}
    opted_in = {"audit": {"error_text": True}} if error_text else {}  # else the default
    await lifeline({**config(providers), **opted_in})
    prompt = "my card is 4111 1111 1111 1111"
    quoted = {"message": f"Invalid content {prompt!r}", "type": "invalid_request_error"}
    http_server.script = [(400, quoted), (400, quoted)]
    for route in ("default", "alone"):  # a fallback, and a request that fails for good
        request = {"messages": [{"role": "user", "content": prompt}]}
        targets = None if route == "default" else [{"provider": "local"}]
        reply = await ask(client, {**request, "targets": targets} if targets else request)
        assert prompt in reply.attempts[0].message  # the reply is the client's: it keeps it
    assert reply.status == "error"
    events = [event for _, event in await audit.wait_for(2)]
    failed = [a for event in events for a in event.attempts if a.outcome == "error"]
    assert [(a.error_type, a.status_code) for a in failed] == [("bad_request", 400)] * 2
    assert all((prompt in (a.message or "")) is error_text for a in failed)

    def traced() -> list[str]:  # every ended span, whole
        return [span.to_json() for span in exporter.get_finished_spans()]

    # Two requests: each a request span, its attempts' spans and the worker's span per call.
    await wait_for(lambda: len(traced()) >= 8, what=lambda: f"{len(traced())} spans")
    quoting = [span for span in traced() if "4111 1111" in span]
    assert len(quoting) == (4 if error_text else 0), quoting  # each call's worker and attempt
    assert sum('"error.type": "bad_request"' in span for span in traced()) == 4


@pytest.mark.parametrize("error_text", [False, True], ids=["default", "opted-in"])
async def test_a_failed_jobs_span_quotes_the_provider_only_when_opted_in(
    lifeline, client, http_server, exporter, error_text
):
    """A durable job's span ends with the job's error, and a job stopped without a fallback
    carries the provider's words in that error ("...: Invalid content '<prompt>'"): the job
    span set it as its status description whatever `audit.error_text` said, the one span
    the request's own settings did not reach. The stored result keeps the words (it is the
    submitter's); the span says why by `error.type`, and quotes only when opted in."""
    from test_jobs import job, result_of, submit

    providers = {"local": openai_at(http_server), "backup": fake(reply="fine")}
    opted_in = {"audit": {"error_text": True}} if error_text else {}
    await lifeline({**config(providers), **opted_in})
    prompt = "my card is 4111 1111 1111 1111"
    quoted = {"message": f"Invalid content {prompt!r}", "type": "invalid_request_error"}
    http_server.script = [(400, quoted)]
    await submit(client, job("refused", prompt, fallback=False), "refused")
    reply = await result_of(client, "refused", timeout_s=15)
    assert (reply.status, reply.error.type) == ("error", "fallback_stopped")
    assert prompt in reply.error.message  # the result is the submitter's: it keeps it

    def job_spans() -> list:
        return [s for s in exporter.get_finished_spans() if s.name == "job"]

    await wait_for(lambda: len(job_spans()) == 1, what="the job span")
    [span] = job_spans()
    assert span.attributes["error.type"] == "fallback_stopped"
    assert (prompt in (span.status.description or "")) is error_text
    if not error_text:  # nor any other span of the job's deliveries
        assert not [s.name for s in exporter.get_finished_spans() if "4111 1111" in s.to_json()]


async def test_the_provider_http_call_carries_the_requests_trace(
    lifeline, client, http_server, tracers
):
    await lifeline(config({"local": openai_at(http_server)}))
    with tracers.get_tracer("client").start_as_current_span("client") as span:
        headers: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(headers)
        await ask(client, USER_HELLO, headers=headers)
    [sent] = http_server.requests
    traceparent = {k.lower(): v for k, v in sent["headers"].items()}["traceparent"]
    assert traceparent.split("-")[1] == format(span.get_span_context().trace_id, "032x")


async def test_a_hung_http_provider_is_abandoned_at_its_timeout_and_the_next_one_serves(
    lifeline, client, http_server
):
    await lifeline(
        config({"local": openai_at(http_server, timeout_s=0.2), "backup": fake(reply="b")})
    )
    http_server.script = [("hang", 1.0)]
    reply = await ask(client, USER_HELLO)
    assert (reply.provider, reply.attempts[0].error_type) == ("backup", "timeout")
    assert len(http_server.requests) == 1  # no hidden retry inside the worker


async def test_a_cancel_message_aborts_the_workers_http_call(lifeline, client, http_server):
    # Nothing but the cancel ends the call within the bounds below: not the server's hang, the
    # provider's timeout_s nor the attempt's deadline.
    stack = await lifeline(config({"local": openai_at(http_server, timeout_s=600)}))
    worker = stack.workers["local"]
    http_server.script = [("hang", 600.0)]
    inbox = client.new_inbox()
    replies = await client.subscribe(inbox)
    far = str(int((time.time() + 600) * 1000))
    request = encoder.encode(ProviderRequest(id="r1", messages=[ChatMessage("user", "hi")]))
    headers = {subjects.ATTEMPT_ID: "attempt-1", subjects.DEADLINE_MS: far}
    await client.publish(subjects.provider_subject("local"), request, reply=inbox, headers=headers)
    await wait_for(lambda: http_server.requests, timeout_s=30)  # the HTTP call is under way
    await client.publish(subjects.cancel_subject("local"), b"attempt-1")
    await wait_for(lambda: not worker.in_flight, timeout_s=30)
    assert worker.cancelled == 1
    with pytest.raises(nats.errors.TimeoutError):
        await replies.next_msg(timeout=0.2)  # nobody waits for it, so no reply is sent


async def test_a_hedge_wins_over_a_hung_http_provider_and_its_http_call_is_cancelled(
    lifeline, client, http_server
):
    # Nothing but the hedge's cancel ends local's call within the bounds below: not the
    # server's hang, the provider's timeout_s nor the request's own (60 s, the default).
    stack = await lifeline(
        config(
            {"local": openai_at(http_server, timeout_s=600), "backup": fake(reply="b")},
            routes={"default": {"targets": ["local", "backup"], "hedge_after_ms": 100}},
        )
    )
    http_server.script = [("hang", 600.0)]
    reply = await ask(client, USER_HELLO, timeout_s=30)
    assert (reply.provider, reply.content) == ("backup", "b")
    assert [(a.provider, a.outcome, a.hedge) for a in reply.attempts] == [
        ("local", "cancelled", False),
        ("backup", "ok", True),
    ]
    worker = stack.workers["local"]
    # The dispatcher's cancel reaches the worker, which drops the HTTP call.
    await wait_for(lambda: not worker.in_flight, timeout_s=30)
    assert worker.cancelled == 1
    assert len(http_server.requests) == 1 and http_server.finished_hangs == 0


def test_a_workers_http_pool_takes_as_many_calls_as_the_worker_does():
    """A call the worker admitted must not wait for a pooled connection until its deadline
    (a timeout counted against a healthy provider): the pool follows max_in_flight."""
    from workers.openai import OpenAIProvider, OpenAISettings

    settings = OpenAISettings(kind="openai", model="m", api_key_env="", max_in_flight=700)
    provider = OpenAIProvider(settings)
    pool = provider._client._transport._pool
    assert pool._max_connections == 700


def _answer(text: str) -> bytes:
    body = json.dumps(
        {
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "model": "m",
            "usage": {"prompt_tokens": 1, "completion_tokens": 1},
        }
    ).encode()
    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


_PAST_THE_ANSWER = {  # what a broken server or proxy writes for the first call
    "a 204 with a body": lambda: (
        f"HTTP/1.1 204 No Content\r\ncontent-length: {len(_answer('SMUGGLED'))}\r\n\r\n".encode()
        + _answer("SMUGGLED")
    ),
    "bytes past the content-length": lambda: _answer("first") + _answer("SMUGGLED"),
}


@pytest.mark.parametrize("broken", [None, *_PAST_THE_ANSWER])
async def test_what_a_provider_sends_past_an_answer_never_answers_the_next_call(broken):
    """httpcore reused the kept-alive connection with what its parser had read past the last
    answer, which became the next call's answer: one client's answer served to another's
    request, audited ok. The connection is dropped instead, and each call gets its own; a
    clean answer's is reused."""
    import msgspec

    from workers.openai import OpenAIProvider, OpenAISettings

    calls = connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls, connections
        connections += 1
        with (
            contextlib.closing(writer),
            contextlib.suppress(ConnectionError, asyncio.IncompleteReadError),
        ):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))
                await reader.readexactly(length)
                calls += 1
                first = _PAST_THE_ANSWER[broken]() if broken else _answer("call 1")
                writer.write(first if calls == 1 else _answer(f"call {calls}"))
                await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = msgspec.convert(
        {
            "kind": "openai",
            "model": "m",
            "api_key_env": "",
            "base_url": f"http://127.0.0.1:{port}/v1",
        },
        OpenAISettings,
    )
    provider = OpenAIProvider(settings)
    request = ProviderRequest(id="r", messages=[ChatMessage("user", "hi")])
    try:
        with contextlib.suppress(Exception):  # the first call's own answer: broken or not
            await provider.complete(request, timeout_s=5)
        second = await provider.complete(request, timeout_s=5)
        assert second.content == "call 2"
        assert calls == 2
        # A clean answer's connection is kept for the next call (which the check of what h11
        # holds, on httpcore's internals, must not prevent: it fails safe, closing them all).
        assert connections == (1 if broken is None else 2)
    finally:
        await provider.aclose()
        server.close()
        await server.wait_closed()


_UNAUTHORIZED = (
    b'{"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}'
)


@pytest.mark.parametrize(
    ("status", "then", "kind"),
    [
        (401, "close", "auth"),
        (413, "close", "bad_request"),
        (401, "stop reading", "auth"),
    ],
)
async def test_a_provider_answering_before_reading_a_large_request_is_heard(status, then, kind):
    """A server that answers from the request's head (a bad key, a body too large) and closes,
    or stops reading, before the body is in: httpcore wrote the whole body before reading
    anything, so the answer was lost (the close resets the connection: `connection`) or never
    read (the write waited until the deadline: `timeout`). It is read as soon as it comes,
    and the writing stops, as RFC 9112 asks of a client sending a body (section 9.5)."""
    import msgspec

    from workers.base import ProviderError
    from workers.openai import OpenAIProvider, OpenAISettings

    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.closing(writer), contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")  # the head only
            writer.write(
                f"HTTP/1.1 {status} Nope\r\ncontent-type: application/json\r\n"
                f"content-length: {len(_UNAUTHORIZED)}\r\nconnection: close\r\n\r\n".encode()
                + _UNAUTHORIZED
            )
            await writer.drain()
            if then == "stop reading":
                await done.wait()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = {"kind": "openai", "model": "m", "api_key_env": ""}
    settings["base_url"] = f"http://127.0.0.1:{port}/v1"
    provider = OpenAIProvider(msgspec.convert(settings, OpenAISettings))
    large = ProviderRequest(id="r", messages=[ChatMessage("user", "x" * (8 << 20))])
    try:
        with pytest.raises(ProviderError) as failed:
            await provider.complete(large, timeout_s=3)
        assert (failed.value.kind, failed.value.status_code) == (kind, status)
        assert "Incorrect API key provided" in failed.value.message
    finally:
        done.set()
        await provider.aclose()
        server.close()
        await server.wait_closed()


async def test_a_worker_out_of_file_descriptors_says_so_and_which_limit_to_raise(
    lifeline, client, http_server, nats_url, tmp_path
):
    """Under an open-files limit below its max_in_flight, calls past it failed as `connection`
    ("All connection attempts failed"): a provider blamed (and its breaker fed) for the
    worker's own limit, with nothing said of it at start or in the log."""
    import resource

    http_server.script = [("slow", 1.0)] * 120
    settings = config({"local": openai_at(http_server)})
    path = write_config(tmp_path / "lifeline.toml", settings)
    await lifeline(settings, workers=[])  # the dispatcher only: the worker is the process below
    log = (tmp_path / "worker.log").open("w")
    worker = spawn_lifeline(
        "worker",
        "local",
        "--config",
        str(path),
        "--nats-url",
        nats_url,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)),
    )
    try:
        await wait_for(lambda: "serving" in (tmp_path / "worker.log").read_text(), timeout_s=30)
        said = (tmp_path / "worker.log").read_text()
        assert "open-files limit is 64" in said and "providers.local.max_in_flight" in said
        replies = await asyncio.gather(
            *(ask(client, {**USER_HELLO, "id": f"r{n}"}, timeout_s=20) for n in range(120))
        )
        kinds = Counter(a.error_type or a.outcome for r in replies for a in r.attempts)
        assert kinds["ok"] and kinds["rate_limit"] and not kinds["connection"], kinds
        failed = next(a for r in replies for a in r.attempts if a.error_type)
        assert "out of file descriptors" in failed.message and "ulimit -n" in failed.message
        assert failed.message.endswith("max_in_flight in [providers.local]"), failed.message
    finally:
        worker.terminate()
        worker.wait(timeout=15)
        log.close()


async def test_a_worker_calls_its_provider_through_the_environments_proxy(monkeypatch):
    """Behind a proxy (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, as httpx and the providers' SDKs
    read them), the worker's calls go through it: the client made with a transport of its own
    (to hear an answer sent before the body is all written) had httpx ignore the environment's
    proxies, and every call went straight to a provider a proxy-only network cannot reach."""
    import msgspec

    from workers.openai import OpenAIProvider, OpenAISettings

    with serving(FakeOpenAI()) as proxy:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_address[1]}")
        for name in ("NO_PROXY", "no_proxy", "http_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        settings = msgspec.convert(
            {
                "kind": "openai",
                "model": "m",
                "api_key_env": "",
                "base_url": "http://llm.invalid/v1",
            },
            OpenAISettings,
        )
        provider = OpenAIProvider(settings)
        try:
            answer = await provider.complete(
                ProviderRequest(id="r", messages=[ChatMessage("user", "hi")]), timeout_s=5
            )
        finally:
            await provider.aclose()
    assert answer.content == "hi"
    assert [r["path"] for r in proxy.requests] == ["http://llm.invalid/v1/chat/completions"]


@pytest.mark.parametrize(
    "big",
    [
        pytest.param(lambda server: openai_at(server, max_response_bytes=64), id="openai"),
        pytest.param(lambda server: fake(reply="x" * 100, max_response_bytes=64), id="fake"),
    ],
)
async def test_an_answer_over_max_response_bytes_names_the_table_to_raise_it_in(
    lifeline, client, http_server, big
):
    """It said "raise max_response_bytes in this provider's [providers.<name>] table", the
    placeholder and all: a built-in kind was not told its name."""
    await lifeline(config({"wordy": big(http_server), "backup": fake(reply="b")}))
    http_server.script = [("ok", "x" * 100)]
    reply = await ask(client, USER_HELLO)
    failed = reply.attempts[0]
    assert (reply.provider, failed.error_type) == ("backup", "response_too_large")
    assert "max_response_bytes in [providers.wordy]" in (failed.message or "")
    assert "<name>" not in (failed.message or "")
