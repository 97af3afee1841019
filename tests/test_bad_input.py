"""Bad input never crashes anything: each gets one clear error reply and one audit event."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import USER_HELLO, Ledger, ask, config, fake, hpub, raw_publish

from schemas import subjects
from schemas.wire import encoder


def deep_schema(depth: int) -> dict[str, Any]:
    """A json_schema response_format whose schema nests `depth` levels of properties (within
    msgspec's nesting limit, beyond what jsonschema's recursion can check)."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return {"type": "json_schema", "json_schema": {"name": "deep", "schema": schema}}


CASES = {
    "malformed JSON": (b'{"messages": [', "invalid_request", "JSON"),
    "not an object": (b"[1, 2, 3]", "invalid_request", "object"),
    "wrong type": (encoder.encode({"messages": "hello"}), "invalid_request", "$.messages"),
    "empty messages": (encoder.encode({"messages": []}), "invalid_request", "$.messages"),
    "missing messages": (encoder.encode({"route": "default"}), "invalid_request", "messages"),
    "unknown role": (
        encoder.encode({"messages": [{"role": "robot", "content": "x"}]}),
        "invalid_request",
        "role",
    ),
    "negative max_tokens": (
        encoder.encode({**USER_HELLO, "max_tokens": -1}),
        "invalid_request",
        "max_tokens",
    ),
    "unknown route": (encoder.encode({**USER_HELLO, "route": "nope"}), "unknown_route", "'nope'"),
    "unknown provider": (
        encoder.encode({**USER_HELLO, "targets": ["nope"]}),
        "unknown_provider",
        "'nope'",
    ),
    "empty targets": (encoder.encode({**USER_HELLO, "targets": []}), "unknown_provider", "targets"),
    "timeout above max": (
        encoder.encode({**USER_HELLO, "timeout_s": 10_000}),
        "invalid_request",
        "timeout_s",
    ),
    "not UTF-8": (b"\xff\xfe\x00", "invalid_request", "invalid request"),
    # Ignored before: the request ran with no max_tokens, the client never told.
    "misspelt field": (
        encoder.encode({**USER_HELLO, "max_token": 5}),
        "invalid_request",
        "unknown field `max_token` (did you mean `max_tokens`?)",
    ),
    "unknown field": (
        encoder.encode({**USER_HELLO, "zzz": 1}),
        "invalid_request",
        "unknown field `zzz` (the fields are messages, id, route,",
    ),
}


@pytest.fixture
async def stack(lifeline):
    return await lifeline(config({"primary": fake()}, max_request_bytes=4096, max_timeout_s=60))


@pytest.mark.parametrize("payload, error_type, mentions", CASES.values(), ids=CASES.keys())
async def test_bad_request_gets_a_clear_error_reply_and_an_audit_event(
    stack, client, audit, payload, error_type, mentions
):
    reply = await ask(client, payload)
    assert reply.status == "error" and reply.error is not None
    assert reply.error.type == error_type
    assert mentions in reply.error.message
    assert reply.attempts == []  # nothing was sent to a provider
    [(subject, event)] = await audit.wait_for(1)
    assert subject == "llm.audit.error"
    assert (event.id, event.error_type) == (reply.id, error_type)


async def test_oversized_request_is_refused_with_the_limit_named(stack, client, audit):
    big = {"messages": [{"role": "user", "content": "x" * 10_000}]}
    reply = await ask(client, big)
    assert reply.error is not None and reply.error.type == "payload_too_large"
    assert "4096" in reply.error.message and "max_request_bytes" in reply.error.message
    [(_, event)] = await audit.wait_for(1)
    assert event.error_type == "payload_too_large" and event.request_bytes > 4096


async def test_an_invalid_request_keeps_its_id_when_it_has_a_readable_one(stack, client):
    reply = await ask(client, encoder.encode({"id": "job-7", "messages": []}))
    assert (reply.id, reply.status) == ("job-7", "error")


async def test_the_dispatcher_keeps_serving_after_bad_input(stack, client):
    for payload, _, _ in CASES.values():
        await ask(client, payload)
    assert (await ask(client, USER_HELLO)).status == "ok"


async def test_a_request_without_a_reply_subject_is_still_audited(stack, client, audit):
    await client.publish("llm.complete", encoder.encode({**USER_HELLO, "id": "fire-and-forget"}))
    [(subject, event)] = await audit.wait_for(1)
    assert (subject, event.id, event.status) == ("llm.audit.ok", "fire-and-forget", "ok")


@pytest.mark.parametrize(
    "fields",
    [
        {"response_format": deep_schema(150)},
        {"tools": [{"name": "t", "parameters": deep_schema(150)["json_schema"]["schema"]}]},
    ],
    ids=["response_format", "tools"],
)
async def test_a_schema_too_deep_to_check_is_refused_as_invalid(lifeline, client, audit, fields):
    """msgspec reads it, but checking an answer against it would recurse past Python's
    limit: refused up front, with one reply and one audit event, and nothing else harmed."""
    await lifeline(config({"primary": fake()}))
    reply = await ask(client, {**USER_HELLO, **fields})
    assert reply.error is not None and reply.error.type == "invalid_request", reply
    assert "nested too deeply" in reply.error.message
    [(_, event)] = await audit.wait_for(1)
    assert event.error_type == "invalid_request"
    assert (await ask(client, USER_HELLO)).status == "ok"


async def test_requests_with_any_header_block_or_reply_subject_get_their_one_reply_and_audit(
    lifeline, client, nats_url
):
    """Written as a raw client may write them: a status line in the header block (odd bytes in
    it, too), each followed by an abort of its key, and reply subjects with a form feed or a
    vertical tab. The status lines went to nats-py's parser, which dropped one it could not
    decode (no reply, no audit event) and delivered the rest after the abort behind them (not
    aborted); the form feed split the reply subject, so the answer went to another subject or
    none while the audit said ok."""
    await lifeline(config({"slow": fake(latency_ms=3000)}))
    ledger = await Ledger(client).start()
    frames, aborted = [], []
    for n, status_line in enumerate(
        (b"NATS/1.0 200", b"NATS/1.0 200 \xff\xfe", b"NATS/1.0 \xff", b"NATS/1.0 503")
    ):
        request_id, key = f"status-{n}", f"key-{n}".encode()
        block = status_line + b"\r\nLifeline-Abort-Key: " + key + b"\r\n\r\n"
        body = encoder.encode({**USER_HELLO, "id": request_id})
        reply = ledger.reply_to(request_id).encode()
        frames.append(hpub(subjects.COMPLETE.encode(), block, body, reply))
        frames.append(b"PUB %s %d\r\n%s\r\n" % (subjects.ABORT.encode(), len(key), key))
        aborted.append(request_id)
    odd = {"form-feed-first": b"\x0cabc", "form-feed": b"rep\x0cly", "vertical-tab": b"x\x0by"}
    for request_id, reply in odd.items():
        body = encoder.encode({**USER_HELLO, "id": request_id})
        frames.append(
            b"PUB %s %s %d\r\n%s\r\n" % (subjects.COMPLETE.encode(), reply, len(body), body)
        )
    elsewhere = await client.subscribe("abc")
    await raw_publish(nats_url, frames)
    await ledger.settle(len(aborted), len(aborted) + len(odd))
    assert [(ledger.replies[i], ledger.audits[i]) for i in aborted] == [(1, 1)] * len(aborted)
    assert [ledger.audits[i] for i in odd] == [1] * len(odd) and sum(ledger.audits.values()) == 7
    assert all(ledger.reply_of[i].error.type == "aborted" for i in aborted), ledger.reply_of
    assert all(ledger.audit_types[i] == "reply_subject_refused" for i in odd), ledger.audit_types
    assert elsewhere.pending_msgs == 0


async def test_unknown_route_of_a_config_without_routes_says_to_name_a_target(lifeline, client):
    """A plug-in's config as the README writes it is one provider and no route: a request
    without `targets` got "unknown route 'default'; configured routes: []", nothing to do."""
    await lifeline(config({"shouty": fake()}, routes={}) | {"model_aliases": {"loud": "shouty"}})
    reply = await ask(client, USER_HELLO)
    assert reply.error is not None and reply.error.type == "unknown_route"
    assert reply.error.message == (
        "unknown route 'default'; no route is configured: name one of ['shouty'] in targets; "
        "model aliases: ['loud']"
    )
    assert (await ask(client, {**USER_HELLO, "route": "loud"})).provider == "shouty"
