"""Bad input never crashes anything: each gets one clear error reply and one audit event."""

from __future__ import annotations

from typing import Any

import pytest

from helpers import USER_HELLO, ask, config, fake
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
