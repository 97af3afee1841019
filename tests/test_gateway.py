"""`lifeline gateway`: OpenAI's Chat Completions over HTTP, spoken by the official SDKs (Python
here, Node.js through tests/node/openai-gateway.mjs) to a real gateway on a free port, in front
of a real nats-server and Lifeline stack.

Most tests share one nats-server, stack and gateway (`shared`, on the module's event loop), each
with a route of its own; those that need a config of their own start one (`gateway`)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import openai
import pytest
import pytest_asyncio
import uvloop
from helpers import (
    ROOT,
    cli_env,
    config,
    fake,
    loop_stall,
    peer_on_its_own_loop,
    run_lifeline,
    spawn_lifeline,
    wait_for,
    wait_for_line,
)
from nats.aio.msg import Msg

from schemas import errors
from schemas.subjects import COMPLETE
from schemas.wire import Attempt, CompletionReply, ErrorInfo, NamedTool, encoder
from service import cli
from service.app import Stack, connect, start_stack
from service.config import parse_config
from service.embedded import EmbeddedNats
from service.gateway import ChatRequest, Gateway, HTTPError, Models, _Message, translate
from service.probes import component_state
from service.telemetry import Tracing

HELLO = [{"role": "user", "content": "one two three four five six"}]
ANSWER = HELLO[0]["content"]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALLS = [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]

# One stack for the shared tests: a route each. Breakers off, so that no test's failures make
# another's targets skipped.
SHARED = config(
    {
        "main": fake(),
        "flaky": fake(fail_status=429),
        "throttled": fake(fail_status=429),
        "sleepy": fake(hang=True, timeout_s=0.1),
        "backup": fake(chunks=4),
        "chatty": fake(chunks=6, fail_after_chunks=3),
        "cutoff": fake(chunks=6, fail_after_chunks=2),
        "agent": fake(tool_calls=CALLS, chunks=2),
        "mirror": fake(reply="request"),
        "mute": fake(reply=""),
        "a": fake(fail_status=500),
        "b": fake(fail_status=503),
        "hung": fake(hang=True, timeout_s=30),
    },
    routes={
        "default": {"targets": ["main"]},
        "fallback": {"targets": ["flaky", "sleepy", "backup"]},
        "resetting": {"targets": ["chatty", "backup"]},
        "midstream": {"targets": ["cutoff", "backup"]},
        "tools": {"targets": ["agent"]},
        "mute": {"targets": ["mute"]},
        "failing": {"targets": ["a", "b"]},
        "deadline": {"targets": ["hung", "main"]},
        "limited": {"targets": ["flaky", "throttled"]},
        "mixed": {"targets": ["flaky", "a"]},
    },
    max_request_bytes=16_384,
) | {
    "breaker": {"enabled": False},
    "model_aliases": {"gpt-4o-mini": "fallback", "my-llama/3.1": "mirror"},
}

shared_loop = pytest.mark.asyncio(loop_scope="module")


def models_of(cfg: dict[str, Any]) -> Models:
    return cli._models(parse_config(cfg))  # as `lifeline gateway` makes them


class Shared:
    def __init__(self, gw: Gateway, client: openai.AsyncOpenAI, stack: Stack, url: str) -> None:
        self.gw, self.client, self.stack, self.url = gw, client, stack, url


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def shared() -> AsyncIterator[Shared]:
    with EmbeddedNats(port=-1) as server:
        tracers = Tracing()
        stack = await start_stack(parse_config(SHARED), server.url, tracers)
        nc = await nats.connect(server.url)
        gw = Gateway(nc, models=models_of(SHARED))
        await gw.start(port=0)
        client = openai.AsyncOpenAI(base_url=gw.url, api_key="unused", max_retries=0)
        try:
            yield Shared(gw, client, stack, server.url)
        finally:
            await client.close()
            await gw.stop()
            await nc.close()
            await stack.stop()
            tracers.shutdown()


@pytest.fixture
async def gateway(lifeline, nats_url):
    """Factory for a test that needs a config of its own: `await gateway(config_dict, **kw)`
    starts a stack and a gateway; returns (gateway, AsyncOpenAI client, stack)."""
    started: list[tuple[Gateway, Any, openai.AsyncOpenAI]] = []

    async def start(cfg: dict[str, Any], **kw: Any) -> Any:
        stack = await lifeline(cfg)
        nc = await nats.connect(nats_url)
        gw = Gateway(nc, models=models_of(cfg), **kw)
        await gw.start(port=0)
        client = openai.AsyncOpenAI(base_url=gw.url, api_key="unused", max_retries=0)
        started.append((gw, nc, client))
        return gw, client, stack

    yield start
    for gw, nc, client in started:
        await client.close()
        await gw.stop()
        await nc.close()


def chat(model: str = "default", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": HELLO, **kw}


# ---- answers ------------------------------------------------------------------------------


@shared_loop
async def test_a_plain_completion_comes_back_in_openai_s_shape_with_lifeline_s_fields(shared):
    completion = await shared.client.chat.completions.create(**chat())
    assert completion.object == "chat.completion"
    [choice] = completion.choices
    assert (choice.message.role, choice.message.content) == ("assistant", ANSWER)
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    usage = completion.usage
    assert usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == 0
    lifeline = completion.model_extra["lifeline"]
    assert (lifeline["route"], lifeline["provider"], lifeline["target"]) == (
        "default",
        "main",
        "main",
    )
    assert [a["outcome"] for a in lifeline["attempts"]] == ["ok"]
    assert completion.id == "chatcmpl-" + lifeline["request_id"]
    assert completion._request_id == lifeline["request_id"]  # the SDK reads x-request-id


@shared_loop
async def test_a_fallback_shows_in_the_x_lifeline_headers(shared):
    raw = await shared.client.chat.completions.with_raw_response.create(**chat("fallback"))
    h = raw.headers
    assert (h["x-lifeline-provider"], h["x-lifeline-target"], h["x-lifeline-attempts"]) == (
        "backup",
        "backup",
        "3",
    )
    assert h["x-lifeline-attempt-list"] == (
        "flaky=rate_limit/429->fallback, sleepy=timeout->fallback, backup=ok"
    )
    assert re.fullmatch(r"[0-9a-f]{32}", h["x-lifeline-trace-id"])
    completion = raw.parse()
    assert completion.model_extra["lifeline"]["trace_id"] == h["x-lifeline-trace-id"]
    assert completion.choices[0].message.content == ANSWER


@shared_loop
async def test_a_stream_with_a_reset_is_tolerated_by_the_sdk_and_readable_by_lifeline(shared):
    stream = await shared.client.chat.completions.create(
        **chat("resetting"), stream=True, stream_options={"include_usage": True}
    )
    naive, pieces, resets, last, usage = "", [], [], None, None
    async for chunk in stream:  # as any OpenAI client reads it: nothing breaks
        assert chunk.object == "chat.completion.chunk"
        extra = (chunk.model_extra or {}).get("lifeline") or {}
        if "reset" in extra:  # ... and as a Lifeline-aware one does
            resets.append(extra["reset"])
            del pieces[len(pieces) - extra["reset"]["discard"] :]
        for choice in chunk.choices:
            naive += choice.delta.content or ""
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                last = (choice.finish_reason, extra)
        usage = chunk.usage or usage
    assert [(r["attempt"], r["discard"], r["error"]["type"]) for r in resets] == [
        (1, 3, "server_error")
    ]
    assert "".join(pieces) == ANSWER
    assert naive.endswith(ANSWER) and len(naive) > len(ANSWER)  # a naive reader shows both
    finish, final = last  # type: ignore[misc]
    assert finish == "stop" and final["content"] == ANSWER  # the answer with resets applied
    assert [a["target"] for a in final["attempts"]] == ["chatty", "backup"]
    assert final["stream"]["resets"] == 1
    assert usage is not None and usage.total_tokens > 0


@shared_loop
async def test_the_sdk_stream_helper_accumulates_a_stream(shared):
    async with shared.client.chat.completions.stream(**chat()) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == ANSWER


@shared_loop
async def test_every_chunk_of_a_stream_names_the_model_it_was_asked_for(shared):
    """The chunks named the route until the last, which named the provider's model, so a reader
    taking the first chunk's (the SDKs' stream helpers) and one taking the last's disagreed;
    OpenAI names one model on every chunk. Which model answers is known only at the end (a
    reset can hand the answer to another provider): every chunk names the `model` asked for,
    and the last one's `lifeline` the model that answered."""
    for asked in ("default", "main"):  # a route, and a target by name
        stream = await shared.client.chat.completions.create(
            **chat(asked), stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        assert [chunk.model for chunk in chunks] == [asked] * len(chunks)
        [final] = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
        assert (final.model_extra["lifeline"]["model"], chunks[-1].usage is not None) == (
            "fake-1",
            True,
        )


@shared_loop
async def test_an_empty_answer_streams_as_one_chunk_the_sdk_reads(shared):
    """An answer without text or tool calls (a model that spent its tokens thinking) ended in
    a chunk that was not JSON, and the SDKs raised on it."""
    stream = await shared.client.chat.completions.create(**chat("mute"), stream=True)
    chunks = [chunk async for chunk in stream]
    deltas = [(c.delta.role, c.delta.content, c.finish_reason) for k in chunks for c in k.choices]
    assert deltas == [("assistant", None, "stop")]


@shared_loop
async def test_a_tool_call_round_trip_whole_and_streamed(shared):
    client = shared.client
    ask = chat("tools", tools=[WEATHER_TOOL], tool_choice="required")
    completion = await client.chat.completions.create(**ask)
    [call] = completion.choices[0].message.tool_calls
    assert (call.type, call.function.name, call.function.arguments) == (
        "function",
        "get_weather",
        '{"city": "Paris"}',
    )
    assert completion.choices[0].finish_reason == "tool_calls"

    stream = await client.chat.completions.create(**ask, stream=True)
    arguments, names, finish = "", [], None
    async for chunk in stream:
        for choice in chunk.choices:
            for piece in choice.delta.tool_calls or ():
                names += [piece.function.name] if piece.function.name else []
                arguments += piece.function.arguments or ""
            finish = choice.finish_reason or finish
    assert (names, json.loads(arguments), finish) == (
        ["get_weather"],
        {"city": "Paris"},
        "tool_calls",
    )

    follow_up = [
        *HELLO,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "21 °C, clear"},
    ]
    sent = await client.chat.completions.create(model="mirror", messages=follow_up)
    messages = json.loads(sent.choices[0].message.content)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["tool_calls"] == [
        {"id": call.id, "name": "get_weather", "arguments": '{"city": "Paris"}'}
    ]
    assert messages[2]["tool_call_id"] == call.id


@shared_loop
async def test_the_whole_chat_request_reaches_the_provider_translated(shared):
    completion = await shared.client.chat.completions.create(
        model="mirror",  # a provider's name: sent as targets=["mirror"]
        messages=[
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is here?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}},
                ],
            },
        ],
        tools=[WEATHER_TOOL],
        tool_choice="auto",  # a named one is {"name": ...} (below): this answer calls none
        parallel_tool_calls=False,
        max_completion_tokens=50,
        temperature=0.5,
        top_p=0.9,
        stop="END",
        seed=7,
        response_format={"type": "text"},
        extra_body={"lifeline": {"metadata": {"team": "search"}}},
    )
    sent = json.loads(completion.choices[0].message.content)
    assert [m["role"] for m in sent["messages"]] == ["developer", "user"]
    assert sent["messages"][1]["content"] == [
        {"type": "text", "text": "What is here?"},
        {"type": "image", "url": "https://example.com/a.png"},
        {"type": "image", "data": "iVBORw0K", "media_type": "image/png"},
    ]
    assert sent["tools"][0]["name"] == "get_weather" and sent["tool_choice"] == "auto"
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"]) == (50, 0.5, 0.9)
    assert (sent["stop"], sent["seed"], sent["parallel_tool_calls"]) == (["END"], 7, False)
    assert sent["response_format"] == {"type": "text"} and sent["metadata"] == {"team": "search"}
    raw = await shared.client.chat.completions.with_raw_response.create(
        **chat(),
        presence_penalty=0.5,  # not on Lifeline's wire: ignored, and said so
    )
    assert raw.headers["x-lifeline-ignored"] == "presence_penalty"
    named = {"type": "function", "function": {"name": "get_weather"}}
    request, _ = translate(
        ChatRequest("default", [_Message("user", "hi")], tool_choice=named), "r1", None, None
    )
    assert request.tool_choice == NamedTool("get_weather")


def test_an_images_detail_is_carried_and_an_unknown_one_refused():
    def part(image_url: dict[str, Any]) -> Any:
        content = [{"type": "image_url", "image_url": image_url}]
        request, _ = translate(
            ChatRequest("default", [_Message("user", content)]), "r1", None, None
        )
        return request.messages[0].content[0]

    assert part({"url": "https://example.com/a.png", "detail": "low"}).detail == "low"
    assert part({"url": "data:image/png;base64,iVBORw0K", "detail": "high"}).detail == "high"
    assert part({"url": "https://example.com/a.png"}).detail is None
    with pytest.raises(HTTPError) as refused:
        part({"url": "https://example.com/a.png", "detail": "tiny"})
    assert refused.value.param == "messages[0].content[0].image_url.detail"


@shared_loop
async def test_openai_fields_the_wire_cannot_carry_are_named_as_ignored(shared):
    """`user`, `store`, `metadata` and the like are OpenAI's own fields, which Lifeline's wire
    does not carry: they were dropped without a word, unlike presence_penalty. A caller who
    sends metadata to see it in Lifeline's audit learns it goes in `lifeline.metadata`. So
    was a message's `name` (who of several users said it)."""
    named = {**chat(), "messages": [{"role": "user", "content": "hi", "name": "ada"}]}
    raw = await shared.client.chat.completions.with_raw_response.create(**named)
    assert raw.headers["x-lifeline-ignored"] == "messages[].name"
    raw = await shared.client.chat.completions.with_raw_response.create(
        **chat(),
        user="u-1",
        store=True,
        metadata={"team": "search"},
        prompt_cache_key="k",
        safety_identifier="s",
    )
    assert raw.headers["x-lifeline-ignored"] == (
        "user, store, metadata, prompt_cache_key, safety_identifier"
    )


@shared_loop
async def test_an_assistant_s_refusal_sent_back_in_the_history_reaches_the_provider(shared):
    """A refused answer comes back from OpenAI-shaped providers as `content: null` with its
    text in `refusal`, and the SDK user appends the message as it is: the history lost the
    refusal and showed the model an empty answer of its own."""
    refused = {"role": "assistant", "content": None, "refusal": "I can't help with that."}
    completion = await shared.client.chat.completions.create(
        model="mirror", messages=[*HELLO, refused, {"role": "user", "content": "Why not?"}]
    )
    sent = json.loads(completion.choices[0].message.content)["messages"]
    assert sent[1] == {"role": "assistant", "content": "I can't help with that."}


# ---- errors -------------------------------------------------------------------------------


@shared_loop
async def test_invalid_requests_are_400_naming_the_parameter(shared):
    client = shared.client
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(**chat(temperature=3))  # refused by the dispatcher
    assert (bad.value.param, bad.value.code) == ("temperature", "invalid_request")
    with pytest.raises(openai.BadRequestError) as bad:  # 0 is a limit too, not "no limit"
        await client.chat.completions.create(**chat(max_completion_tokens=0, max_tokens=5))
    assert bad.value.code == "invalid_request"
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(**chat(n=2))  # refused by the gateway
    assert (bad.value.param, bad.value.code) == ("n", "unsupported_parameter")
    async with httpx.AsyncClient(base_url=shared.gw.url) as http:
        response = await http.post("/chat/completions", content=b"{not json")
        assert response.status_code == 400 and "not JSON" in response.json()["error"]["message"]
        response = await http.post(
            "/chat/completions", json=chat(), headers={"x-lifeline-timeout-s": "soon"}
        )
        assert response.json()["error"]["param"] == "x-lifeline-timeout-s"
        response = await http.get("/chat/completions")
        assert response.status_code == 405 and "error" in response.json()
        # No redirect to the path without its slash (whose Location would name the client's
        # own Host): a 404 in OpenAI's shape, as for any unknown path.
        response = await http.post("/chat/completions/", json=chat(), headers={"host": "evil"})
        assert response.status_code == 404 and "location" not in response.headers
        assert "error" in response.json()


@shared_loop
async def test_an_unknown_model_is_404_listing_the_routes_before_and_after_the_stream_starts(
    shared,
):
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as missing:
            await shared.client.chat.completions.create(**chat("gpt-4o"), stream=stream)
        assert missing.value.code == "model_not_found" and "fallback" in missing.value.message


@shared_loop
async def test_an_unknown_model_s_404_names_each_model_once(shared):
    """A name that is both a route and a target or provider (here `mute`), and every target
    named after its provider, was listed twice in the message."""
    with pytest.raises(openai.NotFoundError) as missing:
        await shared.client.chat.completions.create(**chat("gpt-4o"))
    known = missing.value.message.rpartition("(")[2].rstrip(")").split(", ")
    assert known.count("mute") == 1 and len(known) == len(set(known)), known


@shared_loop
async def test_a_refusal_quotes_what_the_client_sent_cut_short(shared):
    """A refusal quoting a long value (an unknown model, an unknown role, msgspec's message
    on a bad value) sent it back whole: a 100,000-character model came back in a 100 KB
    error. Cut as the NATS path cuts them, what to do (at the message's end) kept."""
    long = "m" * 100_000
    bodies = {
        404: chat(long),
        400: {"model": "default", "messages": [{"role": long, "content": "hi"}]},
    }
    async with httpx.AsyncClient(base_url=shared.gw.url) as http:
        for status, body in bodies.items():
            response = await http.post("/chat/completions", json=body)
            message = response.json()["error"]["message"]
            assert response.status_code == status and len(response.content) < 2_000, message
        assert message.endswith("(use tools for function calls)")
        response = await http.post("/chat/completions", json=bodies[404])
        assert "names a Lifeline route" in response.json()["error"]["message"]


@shared_loop
async def test_a_request_too_large_is_413(shared):
    long = [{"role": "user", "content": "x" * 20_000}]
    with pytest.raises(openai.APIStatusError) as large:  # refused by the dispatcher
        await shared.client.chat.completions.create(model="default", messages=long)
    assert (large.value.status_code, large.value.code) == (413, "payload_too_large")
    small = Gateway(shared.gw.nc, max_body_bytes=10_000)  # refused by the gateway, unread
    await small.start(port=0)
    try:
        async with openai.AsyncOpenAI(base_url=small.url, api_key="-", max_retries=0) as client:
            with pytest.raises(openai.APIStatusError) as large:
                await client.chat.completions.create(model="default", messages=long)
        assert large.value.status_code == 413 and "10000" in large.value.message
    finally:
        await small.stop()


@shared_loop
async def test_a_gzip_body_is_read_within_the_body_limit_and_other_encodings_are_415(shared):
    """A body sent with `Content-Encoding: gzip` was read as JSON as it came, and refused with
    a 400 saying it is not JSON. It is inflated, its inflated size held to the same limit as a
    plain body's (a small bomb that inflates past it is a 413, no more of it inflated); an
    encoding the gateway cannot read is a 415 naming the one it can (RFC 9110, 7694)."""
    body = encoder.encode(chat())
    limit = shared.gw.max_body_bytes

    async def post(content: bytes, encoding: str) -> httpx.Response:
        headers = {"content-type": "application/json", "content-encoding": encoding}
        async with httpx.AsyncClient(base_url=shared.gw.url) as http:
            return await http.post("/chat/completions", content=content, headers=headers)

    served = await post(gzip.compress(body), "gzip")
    assert served.status_code == 200, served.text
    assert served.json()["choices"][0]["message"]["content"] == ANSWER
    two_members = gzip.compress(body[:10]) + gzip.compress(body[10:])  # as `cat a.gz b.gz`
    assert (await post(two_members, "GZIP")).status_code == 200

    bomb = gzip.compress(body[:-1] + b" " * (limit * 8) + b"}")
    assert len(bomb) < limit
    too_large = await post(bomb, "gzip")
    assert too_large.status_code == 413
    assert too_large.json()["error"]["code"] == "payload_too_large", too_large.text
    assert str(limit) in too_large.json()["error"]["message"]

    broken = await post(gzip.compress(body)[:-8], "gzip")  # its end cut off
    assert (broken.status_code, broken.json()["error"]["param"]) == (400, None)
    assert "gzip" in broken.json()["error"]["message"], broken.text

    for encoding in ("br", "deflate", "gzip, gzip"):
        refused = await post(body, encoding)
        assert refused.status_code == 415, (encoding, refused.text)
        assert refused.json()["error"]["code"] == "unsupported_content_encoding"
        assert refused.headers["accept-encoding"] == "gzip"
    assert (await post(body, "identity")).status_code == 200


async def test_a_request_that_fits_nats_only_without_its_headers_is_413_and_spares_the_rest(
    gateway,
):
    """The gateway adds an abort key to every request it sends: a body that fits max_payload by
    itself but not with that header must be refused, not sent (one message over max_payload
    makes the server close the connection, every other request's with it)."""
    gw, client, _ = await gateway(config({"main": fake()}, max_request_bytes=4 << 20))

    def body(padding: int) -> tuple[bytes, int]:
        raw = json.dumps(chat(messages=[{"role": "user", "content": "x" * padding}])).encode()
        sent, _ = translate(msgspec.json.decode(raw, type=ChatRequest), "0" * 32, gw.models, None)
        return raw, len(encoder.encode(sent))

    bare = body(0)[1]
    raw, size = body(gw.nc.max_payload - bare - 20)  # 20 bytes short of max_payload
    assert gw.nc.max_payload - 40 < size <= gw.nc.max_payload
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        for stream in (b"false", b"true"):
            streamed = raw.replace(b'"model"', b'"stream": ' + stream + b', "model"', 1)
            response = await http.post("/chat/completions", content=streamed)
            assert response.status_code == 413, response.text
            assert "max_payload" in response.json()["error"]["message"]
    assert not gw.nc.is_closed
    answer = await client.chat.completions.create(**chat())
    assert answer.choices[0].message.content


@shared_loop
async def test_a_tool_choice_whose_function_is_no_object_is_400(shared):
    async with httpx.AsyncClient(base_url=shared.gw.url) as http:
        for function in ("x", [1], None):
            choice = {"type": "function", "function": function}
            response = await http.post("/chat/completions", json=chat(tool_choice=choice))
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == "tool_choice"


@shared_loop
async def test_control_characters_in_a_clients_target_name_or_model_never_reach_a_header(shared):
    async with httpx.AsyncClient(base_url=shared.gw.url, timeout=10) as http:
        for field in ("name", "model"):
            target = {"provider": "main", field: "evil\r\nx-injected: 1\x00"}
            response = await http.post(
                "/chat/completions", json=chat(lifeline={"targets": [target]})
            )
            assert response.status_code == 200, response.text
            assert "x-injected" not in response.headers
            shown = response.headers["x-lifeline-target" if field == "name" else "x-lifeline-model"]
            assert shown == "evil??x-injected: 1?"


@shared_loop
async def test_every_target_failing_is_502_with_every_attempt(shared):
    with pytest.raises(openai.APIStatusError) as failed:
        await shared.client.chat.completions.with_raw_response.create(**chat("failing"))
    error = failed.value
    assert (error.status_code, error.code, error.type) == (502, "all_failed", "upstream_error")
    assert error.response.headers["x-lifeline-attempt-list"] == (
        "a=server_error/500->fallback, b=server_error/503->stop"
    )
    assert [a["target"] for a in error.response.json()["lifeline"]["attempts"]] == ["a", "b"]


@shared_loop
async def test_the_sdks_own_retries_do_not_run_a_spent_fallback_chain_again(shared):
    """An SDK left at its defaults sends a 5xx again, twice: an all_failed 502 ran every
    target three times (and paid its providers three times), a deadline_exceeded 504 spent
    the request's whole timeout three times. Lifeline already retried and fell back, so it
    says `x-should-retry: false`, which both SDKs obey."""
    sent: list[httpx.Request] = []

    async def count(request: httpx.Request) -> None:
        sent.append(request)

    http = httpx.AsyncClient(event_hooks={"request": [count]})
    async with openai.AsyncOpenAI(base_url=shared.gw.url, api_key="-", http_client=http) as sdk:
        for ask, status in (
            (chat("failing"), 502),
            (chat("failing", stream=True), 502),
            (chat("deadline", extra_headers={"x-lifeline-timeout-s": "0.2"}), 504),
        ):
            sent.clear()
            with pytest.raises(openai.APIStatusError) as failed:
                await sdk.chat.completions.create(**ask)
            assert failed.value.status_code == status
            assert len(sent) == 1, [r.headers.get("x-stainless-retry-count") for r in sent]


@shared_loop
async def test_a_chain_failed_only_by_rate_limits_is_429_with_retry_after(shared):
    """Every provider of the chain said 429: that was a 502 with `x-should-retry: false`, so the
    SDKs raised InternalServerError and never tried again, although the providers will answer
    later (and a 429 is not billed). It is a 429 with Retry-After, as LiteLLM's proxy answers
    when all its deployments cool down, which the SDKs raise as RateLimitError and retry."""
    for ask in (chat("limited"), chat("limited", stream=True)):
        with pytest.raises(openai.RateLimitError) as limited:
            await shared.client.chat.completions.create(**ask)
        error = limited.value
        assert (error.status_code, error.code, error.type) == (
            429,
            "all_failed",
            "rate_limit_error",
        )
        headers = error.response.headers
        assert (headers["retry-after"], headers["retry-after-ms"]) == ("5", "5000")
        assert "x-should-retry" not in headers
        assert headers["x-lifeline-attempt-list"] == (
            "flaky=rate_limit/429->fallback, throttled=rate_limit/429->stop"
        )
    # One provider failing otherwise: retrying the chain would pay that one again.
    with pytest.raises(openai.InternalServerError) as mixed:
        await shared.client.chat.completions.create(**chat("mixed"))
    assert (mixed.value.status_code, mixed.value.code) == (502, "all_failed")
    assert mixed.value.response.headers["x-should-retry"] == "false"


async def test_an_sdk_sends_a_rate_limited_chain_again_after_the_dispatchers_hint(client):
    """Where the dispatcher's error carries when to try again (`retry_after_s`), the 429 says
    it (retry-after-ms to the millisecond, which the SDKs read first), and an SDK at its
    defaults sends the request again after it."""
    limited = CompletionReply(
        id="",
        status="error",
        attempts=[Attempt("p", "m", "error", 1.0, "rate_limit", 429, "slow down", "p")],
        error=ErrorInfo(errors.ALL_FAILED, "all 1 attempts failed", retry_after_s=0.25),
    )

    async def dispatcher(msg: Msg) -> None:  # the error reply a dispatcher may send
        request = msgspec.json.decode(msg.data)
        await msg.respond(encoder.encode(msgspec.structs.replace(limited, id=request["id"])))

    await client.subscribe(COMPLETE, cb=dispatcher)
    gw = Gateway(client)
    await gw.start(port=0)
    sent: list[httpx.Request] = []

    async def count(request: httpx.Request) -> None:
        sent.append(request)

    http = httpx.AsyncClient(event_hooks={"request": [count]})
    try:
        async with openai.AsyncOpenAI(
            base_url=gw.url, api_key="-", http_client=http, max_retries=1
        ) as sdk:
            with pytest.raises(openai.RateLimitError) as failed:
                await sdk.chat.completions.create(**chat())
        headers = failed.value.response.headers
        assert (headers["retry-after"], headers["retry-after-ms"]) == ("1", "250")
        assert len(sent) == 2
    finally:
        await gw.stop()


async def test_an_overloaded_dispatcher_is_503_with_retry_after(gateway):
    _, client, stack = await gateway(config({"slow": fake(latency_ms=300)}, max_in_flight=1))
    first = asyncio.ensure_future(client.chat.completions.create(**chat()))
    await wait_for(lambda: stack.dispatcher.in_flight == 1)
    with pytest.raises(openai.InternalServerError) as busy:
        await client.chat.completions.create(**chat())
    assert (busy.value.status_code, busy.value.code) == (503, "overloaded")
    assert int(busy.value.response.headers["retry-after"]) >= 1
    assert int(busy.value.response.headers["retry-after-ms"]) > 0
    assert (await first).choices[0].message.content


@shared_loop
@pytest.mark.parametrize(
    ("model", "timeout_s", "status", "kind"),
    [
        ("deadline", "0.0005", 504, "deadline_exceeded"),  # under a call's millisecond: none
        ("deadline", "0.2", 504, "deadline_exceeded"),  # `hung` cut by it, `main` skipped
        ("hung", "0.2", 502, "all_failed"),  # the last target cut by it: it failed (timeout)
    ],
    ids=["before-any-call", "during-a-call-a-target-left", "during-the-last-call"],
)
async def test_a_timeout_header_ends_a_request_as_the_same_timeout_s_does_on_nats(
    shared, model, timeout_s, status, kind
):
    """`x-lifeline-timeout-s` is the request's timeout_s: whenever it runs out, the answer is
    the error kind a NATS client gets for the same request and timeout_s (deadline_exceeded
    when a target was left untried, else the chain's own end), streamed or not, with the
    status of that kind."""
    on_nats = {"route": model} if model == "deadline" else {"targets": [model]}
    nc = await nats.connect(shared.url)
    try:
        request = on_nats | {"messages": HELLO, "timeout_s": float(timeout_s)}
        answer = await nc.request(COMPLETE, encoder.encode(request), timeout=10)
    finally:
        await nc.close()
    reply = msgspec.json.decode(answer.data, type=CompletionReply)
    assert reply.error is not None and reply.error.type == kind
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as late:
            await shared.client.chat.completions.create(
                **chat(model, stream=stream), extra_headers={"x-lifeline-timeout-s": timeout_s}
            )
        assert (late.value.status_code, late.value.code) == (status, kind), stream


@shared_loop
async def test_an_error_after_the_stream_started_is_raised_by_the_sdk(shared):
    stream = await shared.client.chat.completions.create(
        **chat("midstream"), stream=True, extra_body={"lifeline": {"on_midstream": "fail"}}
    )
    seen = []
    with pytest.raises(openai.APIError) as failed:
        async for chunk in stream:
            seen += [c.delta.content for c in chunk.choices if c.delta.content]
    assert len(seen) == 2 and "midstream_failed" in str(failed.value.body)


async def test_no_dispatcher_is_503(nats_url):
    nc = await nats.connect(nats_url)
    gw = Gateway(nc)
    await gw.start(port=0)
    try:
        async with openai.AsyncOpenAI(base_url=gw.url, api_key="-", max_retries=0) as client:
            with pytest.raises(openai.InternalServerError) as none:
                await client.chat.completions.create(**chat())
        assert (none.value.status_code, none.value.code) == (503, "no_dispatcher")
        # As an overloaded dispatcher's 503: the same type, and when to send it again.
        assert none.value.type == "overloaded_error"
        assert none.value.response.headers["retry-after-ms"] == "1000"
    finally:
        await gw.stop()
        await nc.close()


async def test_a_dispatcher_that_never_answers_is_504_and_the_request_is_aborted(
    nats_url, monkeypatch
):
    """A dispatcher that took the request and died: the gateway gives up after the request's
    timeout and its grace, answers 504 with the request's id (its audit event's, should a
    dispatcher have got as far), and aborts the request with the key it sent it with."""
    monkeypatch.setattr("service.gateway._GRACE_S", 0.2)
    taken: list[str] = []
    ids: list[str] = []
    aborted: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    nc = await nats.connect(nats_url)
    silent = await nats.connect(nats_url)  # takes requests and answers none

    async def take(msg: Any) -> None:
        taken.append(msg.headers["Lifeline-Abort-Key"])
        ids.append(json.loads(msg.data)["id"])

    async def abort(msg: Any) -> None:
        aborted.set_result(msg.data)

    await silent.subscribe("llm.complete", cb=take)
    await silent.subscribe("llm.abort", cb=abort)
    await silent.flush()
    gw = Gateway(nc)
    await gw.start(port=0)
    try:
        async with httpx.AsyncClient(base_url=gw.url) as client:
            answer = await client.post(
                "/chat/completions", json=chat(), headers={"x-lifeline-timeout-s": "0.1"}
            )
        assert answer.status_code == 504, answer.text
        assert answer.json()["error"]["type"] == "timeout_error"
        assert "no answer from Lifeline within 0.3 s" in answer.json()["error"]["message"]
        assert answer.headers["x-request-id"] == ids[0]
        assert await asyncio.wait_for(aborted, 5) == taken[0].encode()
        assert not gw.inbox.waiting  # nothing left behind for the answer that never came
    finally:
        await gw.stop()
        await nc.close()
        await silent.close()


@pytest.mark.parametrize("deltas", [0, 1], ids=["before_the_first_event", "mid_stream"])
async def test_a_stream_whose_dispatcher_goes_silent_ends_at_once_not_at_its_timeout(
    nats_url, monkeypatch, deltas
):
    """A dispatcher that took a stream, sent the heartbeat the gateway asks for (and a delta),
    then died: its HTTP client waited out the request's whole timeout (a minute here). Once a
    heartbeat came, a silence longer than heartbeats allow ends it: a 504 before its first
    event, an error event after it, saying the dispatcher most likely died; the request is
    aborted."""
    monkeypatch.setattr("service.gateway._SILENCE_S", 0.5)
    monkeypatch.setattr("service.gateway._UNREAD_SWEEP_S", 0.1)
    aborted: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    nc = await nats.connect(nats_url)
    doomed = await nats.connect(nats_url)
    asked: list[str | None] = []

    async def take(msg: Msg) -> None:
        asked.append(msg.headers.get("Lifeline-Heartbeat-Ms"))
        await doomed.publish(msg.reply, b"", headers={"Lifeline-Event": "heartbeat"})
        for seq in range(1, deltas + 1):
            headers = {"Lifeline-Seq": str(seq), "Lifeline-Attempt": "1"}
            await doomed.publish(msg.reply, b"Hel", headers=headers)

    async def abort(msg: Msg) -> None:
        if not aborted.done():
            aborted.set_result(msg.data)

    await doomed.subscribe("llm.stream", cb=take)
    await doomed.subscribe("llm.abort", cb=abort)
    await doomed.flush()
    gw = Gateway(nc)
    await gw.start(port=0)
    try:
        async with openai.AsyncOpenAI(base_url=gw.url, api_key="-", max_retries=0) as client:
            slow = {"x-lifeline-timeout-s": "60"}
            with pytest.raises(openai.APIError) as failed:
                stream = await client.chat.completions.create(
                    **chat(stream=True), extra_headers=slow
                )
                async for _ in stream:
                    pass
        said = str(failed.value.body) + str(failed.value)
        assert re.search(r"went silent.*heartbeat.*most likely died", said), said
        if not deltas:
            assert failed.value.status_code == 504  # type: ignore[attr-defined]
        assert asked == ["2000"]
        assert await asyncio.wait_for(aborted, 5)
        assert not gw.inbox.waiting
    finally:
        await gw.stop()
        await nc.close()
        await doomed.close()


@pytest.mark.parametrize("answers", [False, True], ids=["dies", "answers_after_it"])
async def test_a_request_whose_dispatcher_goes_silent_is_504_at_once_not_at_its_timeout(
    nats_url, monkeypatch, answers
):
    """The same for a request without `stream`: a dispatcher that took it, sent a heartbeat,
    then died left its HTTP client waiting its whole timeout; now a 504 says why once the
    heartbeats stop, and the request is aborted. A heartbeat is never taken for its answer."""
    monkeypatch.setattr("service.gateway._SILENCE_S", 0.5)
    monkeypatch.setattr("service.gateway._UNREAD_SWEEP_S", 0.1)
    aborted: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    nc = await nats.connect(nats_url)
    doomed = await nats.connect(nats_url)

    async def take(msg: Msg) -> None:
        assert msg.headers["Lifeline-Heartbeat-Ms"] == "2000"
        await doomed.publish(msg.reply, b"", headers={"Lifeline-Event": "heartbeat"})
        if answers:
            await asyncio.sleep(0.2)
            reply = CompletionReply("r1", "ok", content="late", provider="p", attempts=[])
            await doomed.publish(msg.reply, encoder.encode(reply))

    async def abort(msg: Msg) -> None:
        if not aborted.done():
            aborted.set_result(msg.data)

    await doomed.subscribe("llm.complete", cb=take)
    await doomed.subscribe("llm.abort", cb=abort)
    await doomed.flush()
    gw = Gateway(nc)
    await gw.start(port=0)
    try:
        async with httpx.AsyncClient(base_url=gw.url) as client:
            answer = await client.post(
                "/chat/completions", json=chat(), headers={"x-lifeline-timeout-s": "60"}
            )
        if answers:
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["message"]["content"] == "late"
        else:
            assert answer.status_code == 504, answer.text
            said = answer.json()["error"]["message"]
            assert re.search(r"went silent.*heartbeat.*most likely died", said), said
            assert await asyncio.wait_for(aborted, 5)
        assert not gw.inbox.waiting and not gw.inbox.heard
    finally:
        await gw.stop()
        await nc.close()
        await doomed.close()


async def test_a_stream_whose_end_the_gateways_own_reconnect_lost_does_not_blame_the_dispatcher(
    nats_url, monkeypatch
):
    """The gateway's NATS connection dropped mid-stream and came back: the end event, sent
    meanwhile by a dispatcher alive and well, was lost, and the silence that followed ended
    the stream saying the dispatcher most likely died. It says the gateway's own reconnect
    lost what was sent meanwhile."""
    from test_client import _Cuttable

    monkeypatch.setattr("service.gateway._SILENCE_S", 3.0)
    monkeypatch.setattr("service.gateway._UNREAD_SWEEP_S", 0.1)
    proxy = _Cuttable(nats_url)
    nc = await nats.connect(await proxy.up(), reconnect_time_wait=0.1)
    dispatcher = await nats.connect(nats_url)
    asked: list[Msg] = []
    ended = asyncio.Event()

    async def take(msg: Msg) -> None:  # a live dispatcher: heartbeats until its end
        asked.append(msg)
        delta = {"Lifeline-Seq": "1", "Lifeline-Attempt": "1"}
        await dispatcher.publish(msg.reply, b"Hel", headers=delta)
        while not ended.is_set():
            await dispatcher.publish(msg.reply, b"", headers={"Lifeline-Event": "heartbeat"})
            await asyncio.sleep(0.1)

    await dispatcher.subscribe("llm.stream", cb=take)
    await dispatcher.flush()
    gw = Gateway(nc)
    await gw.start(port=0)
    try:
        async with openai.AsyncOpenAI(base_url=gw.url, api_key="-", max_retries=0) as client:
            with pytest.raises(openai.APIError) as failed:
                stream = await client.chat.completions.create(**chat(stream=True))
                async for _ in stream:
                    await proxy.down()
                    await wait_for(lambda: not nc.is_connected)
                    reply = CompletionReply("r", "ok", provider="p", attempts=[])
                    end = {"Lifeline-Seq": "2", "Lifeline-Attempt": "1", "Lifeline-Event": "end"}
                    await dispatcher.publish(asked[0].reply, encoder.encode(reply), headers=end)
                    ended.set()
                    await dispatcher.flush()  # lost: the gateway is away
                    await proxy.up()
                    await wait_for(lambda: nc.is_connected, 10)
        said = str(failed.value.body) + str(failed.value)
        assert "went silent" in said and "reconnected" in said, said
        assert "most likely died" not in said, said
    finally:
        ended.set()
        await gw.stop()
        await nc.close()
        await dispatcher.close()
        await proxy.down()


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "request"])
@pytest.mark.parametrize(
    "factory", [pytest.param(uvloop.new_event_loop, id="uvloop"), pytest.param(None, id="asyncio")]
)
def test_a_stream_whose_heartbeats_came_while_the_gateway_was_stalled_goes_on(
    nats_url, monkeypatch, factory, stream
):
    """The gateway's loop stood still for longer than the silence heartbeats allow (a read
    callback holding it, a paused process) while its dispatcher, alive, kept sending them:
    uvloop runs due timers before it reads its sockets again, so the silence sweep found the
    stream silent and ended it with a 504 that blamed the dispatcher, with its heartbeats
    waiting unread. A sweep that woke late judges no silence: the next one does, after the
    sockets were read. The same for a request without `stream`."""
    monkeypatch.setattr("service.gateway._SILENCE_S", 0.5)
    monkeypatch.setattr("service.gateway._UNREAD_SWEEP_S", 0.1)
    finish = threading.Event()

    async def take(nc: Any, msg: Msg) -> None:  # a dispatcher alive while the gateway stalls
        while not finish.is_set():
            await nc.publish(msg.reply, b"", headers={"Lifeline-Event": "heartbeat"})
            await asyncio.sleep(0.05)
        if not stream:
            reply = CompletionReply("r", "ok", content="Hi", provider="p", attempts=[])
            await nc.publish(msg.reply, encoder.encode(reply))
            return
        delta = {"Lifeline-Seq": "1", "Lifeline-Attempt": "1"}
        await nc.publish(msg.reply, b"Hi", headers=delta)
        reply = CompletionReply("r", "ok", provider="p", attempts=[])
        end = {**delta, "Lifeline-Seq": "2", "Lifeline-Event": "end"}
        await nc.publish(msg.reply, encoder.encode(reply), headers=end)

    async def scenario() -> httpx.Response:
        nc = await nats.connect(nats_url)
        gw = Gateway(nc)
        await gw.start(port=0)
        async with loop_stall(1.5) as stall:
            try:
                async with httpx.AsyncClient(base_url=gw.url, timeout=20) as http:
                    call = asyncio.ensure_future(
                        http.post("/chat/completions", json=chat(stream=stream))
                    )
                    await wait_for(lambda: gw.inbox.waiting, what="the stream's request")
                    stall()
                    await asyncio.sleep(0.3)  # the loop turns again after its stall
                    finish.set()
                    return await call
            finally:
                await gw.stop()
                await nc.close()

    subject = "llm.stream" if stream else "llm.complete"
    with peer_on_its_own_loop(nats_url, subject, take):
        try:
            with asyncio.Runner(loop_factory=factory) as runner:
                response = runner.run(scenario())
        finally:
            finish.set()
    assert response.status_code == 200, response.text
    assert '"content":"Hi"' in response.text.replace(" ", "") and "went silent" not in response.text


async def test_probes_answer_without_a_key_and_turn_503_when_nats_is_gone(nats_url):
    nc = await nats.connect(nats_url)
    gw = Gateway(nc, keys=["sekret"])
    await gw.start(port=0)
    base = f"http://127.0.0.1:{gw.port}"
    try:
        async with httpx.AsyncClient(base_url=base) as http:
            live, ready = await http.get("/healthz"), await http.get("/readyz")
            assert (live.status_code, ready.status_code) == (200, 200)
            assert ready.json() == {
                "name": "lifeline-gateway",
                "connected": True,
                "ready": True,
                "problems": [],
            }
            assert (await http.get("/v1/models")).status_code == 401  # the API still wants one
            await nc.close()
            live, ready = await http.get("/healthz"), await http.get("/readyz")
            assert (live.status_code, ready.status_code) == (503, 503)
            assert ready.json()["problems"] == ["not connected to NATS"]
    finally:
        await gw.stop()
        await nc.close()


@shared_loop
async def test_a_port_in_use_is_an_oserror_naming_it(shared):
    with pytest.raises(OSError, match=f"127.0.0.1:{shared.gw.port}"):
        await Gateway(shared.gw.nc).start("127.0.0.1", shared.gw.port)


# ---- auth, trace context, models ----------------------------------------------------------


@shared_loop
async def test_api_keys_from_the_environment_are_checked(shared):
    keyed = Gateway(shared.gw.nc, keys=["key-1", "key-2"])
    await keyed.start(port=0)
    try:
        for key, ok in (("key-2", True), ("wrong", False)):
            async with openai.AsyncOpenAI(base_url=keyed.url, api_key=key, max_retries=0) as c:
                if ok:
                    assert (await c.chat.completions.create(**chat())).choices[0].message.content
                    continue
                with pytest.raises(openai.AuthenticationError) as refused:
                    await c.chat.completions.create(**chat())
        assert refused.value.code == "invalid_api_key"
        assert "LIFELINE_GATEWAY_KEYS" in refused.value.message
    finally:
        await keyed.stop()


@shared_loop
async def test_without_keys_only_loopback_clients_are_served(shared):
    assert (await shared.client.models.list()).data  # this test is on loopback
    remote = httpx.ASGITransport(shared.gw.app, client=("198.51.100.7", 40000))  # no packet sent
    async with httpx.AsyncClient(transport=remote, base_url="http://gateway") as http:
        response = await http.post("/v1/chat/completions", json=chat())
    assert response.status_code == 403
    assert "LIFELINE_GATEWAY_KEYS" in response.json()["error"]["message"]


@shared_loop
async def test_traceparent_is_forwarded_so_lifeline_joins_the_caller_s_trace(shared):
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    raw = await shared.client.chat.completions.with_raw_response.create(
        **chat(), extra_headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"}
    )
    assert raw.headers["x-lifeline-trace-id"] == trace_id


@shared_loop
async def test_a_later_versions_traceparent_with_more_fields_is_joined_as_on_nats(shared):
    """W3C: a traceparent of a version after 00 may add fields, and is read by its first 55
    characters. The NATS path joined one; the gateway dropped it and began a trace of its own."""
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    raw = await shared.client.chat.completions.with_raw_response.create(
        **chat(), extra_headers={"traceparent": f"01-{trace_id}-b7ad6b7169203331-01-future"}
    )
    assert raw.headers["x-lifeline-trace-id"] == trace_id


@shared_loop
@pytest.mark.parametrize(
    "traceparent",
    [
        f"00-{'0' * 32}-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-more",  # only later versions
    ],
)
async def test_a_stream_names_the_trace_it_made_not_one_the_dispatcher_refused(shared, traceparent):
    """A stream's x-lifeline-trace-id goes out before the dispatcher's reply says which trace
    it made: a traceparent it would not join was echoed there, naming no exported trace."""
    raw = await shared.client.chat.completions.with_raw_response.create(
        **chat(), stream=True, extra_headers={"traceparent": traceparent}
    )
    chunks = [chunk async for chunk in raw.parse()]
    made = chunks[-1].model_extra["lifeline"]["trace_id"]
    assert raw.headers.get("x-lifeline-trace-id", made) == made != traceparent.split("-")[1]


@shared_loop
async def test_models_lists_the_routes_then_the_targets(shared):
    models = [(m.id, m.owned_by) for m in (await shared.client.models.list()).data]
    routes = [m for m in models if m[1] == "lifeline-route"]
    assert models[: len(routes)] == routes and routes[:2] == [
        ("default", "lifeline-route"),
        ("fallback", "lifeline-route"),
    ]
    assert ("mirror", "lifeline-target") in models
    assert (await shared.client.models.retrieve("mirror")).id == "mirror"
    with pytest.raises(openai.NotFoundError):
        await shared.client.models.retrieve("gpt-4o")


@shared_loop
async def test_a_model_alias_runs_the_route_or_target_it_names_and_is_listed(shared):
    """Code written for OpenAI's models (model="gpt-4o-mini") got model_not_found until it was
    rewritten for a route's name, and a name with a dot could be no route at all: the config's
    [model_aliases] send such names to a route or a target."""
    routed = await shared.client.chat.completions.create(**chat("gpt-4o-mini"))
    lifeline = routed.model_extra["lifeline"]
    assert (lifeline["route"], lifeline["provider"]) == ("fallback", "backup")  # its chain ran
    assert [a["outcome"] for a in lifeline["attempts"]] == ["error", "timeout", "ok"]
    targeted = await shared.client.chat.completions.create(**chat("my-llama/3.1"))
    assert (targeted.model_extra["lifeline"]["target"], targeted.model) == ("mirror", "fake-1")
    models = [(m.id, m.owned_by) for m in (await shared.client.models.list()).data]
    assert models[-2:] == [("gpt-4o-mini", "lifeline-alias"), ("my-llama/3.1", "lifeline-alias")]
    assert (await shared.client.models.retrieve("my-llama/3.1")).owned_by == "lifeline-alias"
    with pytest.raises(openai.NotFoundError) as missing:
        await shared.client.chat.completions.create(**chat("gpt-4o"))
    assert "names a Lifeline route, target or alias (default, fallback," in missing.value.message


# ---- Node.js, and the commands ------------------------------------------------------------


@shared_loop
@pytest.mark.skipif(shutil.which("node") is None, reason="node is missing")
async def test_the_node_openai_package_completes_and_streams(shared):
    if not (ROOT / "tests/node/node_modules/openai").exists():
        pytest.fail("tests/node's packages are not installed: npm ci --prefix tests/node")
    node = await asyncio.create_subprocess_exec(
        "node",
        str(ROOT / "tests/node/openai-gateway.mjs"),
        shared.gw.url,
        "default",
        "resetting",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(node.communicate(), 30)
    assert node.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["completion"] == {
        "content": ANSWER,
        "finish_reason": "stop",
        "provider": "main",
        "attempts_header": "1",
    }
    s = result["stream"]
    assert (s["text"], s["resets"], s["finish"], s["final_content"]) == (ANSWER, 1, "stop", ANSWER)
    assert len(s["naive"]) > len(ANSWER) and s["total_tokens"] > 0


@shared_loop
async def test_lifeline_gateway_serves_until_sigterm(shared):
    proc = spawn_lifeline(
        "gateway",
        "--nats-url",
        shared.url,
        "--port",
        "0",
        "--max-connections",
        "1",
        "--config",
        str(ROOT / "lifeline.example.toml"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        line, _ = await asyncio.to_thread(wait_for_line, proc, r"http://127\.0\.0\.1:\d+/v1")
        url = re.search(r"http://127\.0\.0\.1:\d+/v1", line).group(0)  # type: ignore[union-attr]
        async with openai.AsyncOpenAI(base_url=url, api_key="-", max_retries=2) as client:
            # The example config's routes are listed; the stack here serves "default" too.
            assert "streaming" in [m.id for m in (await client.models.list()).data]
            completion = await client.chat.completions.create(**chat())
        assert completion.model_extra["lifeline"]["provider"] == "main"
        # --max-connections 1: while one connection is open, the next is turned away.
        async with httpx.AsyncClient(base_url=url, timeout=5) as first:

            async def served() -> bool:  # once the SDK's closed connection is gone there too
                return (await first.get("/models")).status_code == 200

            await wait_for(served, what="a connection served")
            async with httpx.AsyncClient(base_url=url, timeout=5) as second:
                refused = await second.get("/models")
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "too_many_connections"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            stream and stream.close()


async def test_a_stopping_gateway_answers_what_still_waits_and_aborts_it(gateway, caplog):
    """Past uvicorn's grace a stream was cut mid-body without an error event (the SDK saw a
    broken connection) and the log had a traceback. A second before it, what still waits is
    answered gateway_stopping, a stream by an error event, and its request aborted."""
    cfg = config({"slow": fake(chunks=50, chunk_delay_ms=200), "hung": fake(hang=True)})
    gw, client, stack = await gateway(cfg | {"routes": {"default": {"targets": ["slow"]}}})
    stream = await client.chat.completions.create(**chat(), stream=True)
    first = await anext(aiter(stream))
    waiting = asyncio.ensure_future(client.chat.completions.create(**chat("hung")))
    await wait_for(lambda: stack.dispatcher.in_flight == 2, timeout_s=5)
    # A third client still sending its body: uvicorn's cancel answered it a plain-text 500.
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b'content-length: 100\r\n\r\n{"model": '
    )
    await writer.drain()
    stopping = asyncio.ensure_future(gw.stop())
    with pytest.raises(openai.APIError) as cut:
        async for _ in stream:
            pass
    assert first.choices[0].delta.content and cut.value.code == "gateway_stopping"
    with pytest.raises(openai.InternalServerError) as refused:
        await waiting
    assert (refused.value.status_code, refused.value.code) == (503, "gateway_stopping")
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), answer
    assert json.loads(body)["error"]["code"] == "gateway_stopping"
    await stopping
    await wait_for(lambda: stack.dispatcher.aborts == 2, timeout_s=5)
    assert "Exception in ASGI application" not in caplog.text


async def test_a_stopping_gateway_aborts_a_stream_whose_client_stopped_reading(gateway):
    """A stream whose client reads nothing (its socket full) is stuck writing: it never takes
    the gateway_stopping the others get, and uvicorn's cancel at the end of its grace left its
    events unread and its request running, to be aborted only when Python collected it, by
    then past the gateway's NATS connection: its provider went on to the end of the answer."""
    answer = "h" * 8_000_000  # 800 events of 10,000 characters over 16 s: more than sockets hold
    slow = fake(reply=answer, chunks=800, chunk_delay_ms=20, max_response_bytes=10_000_000)
    gw, _, stack = await gateway(config({"slow": slow}))
    _, writer = await _a_stream_asked_by_a_client_that_does_not_read("127.0.0.1", gw.port)

    def stuck() -> bool:  # its writes wait for a client that does not read
        return any(c.flow.write_paused for c in gw.server.server_state.connections)

    await wait_for(stuck, timeout_s=10)
    await gw.stop()
    try:
        await wait_for(lambda: stack.dispatcher.aborts == 1, timeout_s=2)
        assert stack.dispatcher.in_flight == 0
    finally:
        writer.close()


def test_a_serving_command_raises_its_open_files_limit_to_the_hard_one(nats_url):
    """A soft limit of 1,024 open files (a common default) would end a busy gateway or
    worker in EMFILE; serving commands raise it to the hard limit, as Go's runtime does."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 512:
        pytest.skip(f"the hard limit here ({hard}) leaves nothing to raise")

    def lowered() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))

    proc = spawn_lifeline(
        "gateway",
        "--nats-url",
        nats_url,
        "--port",
        "0",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lowered,
    )
    try:
        wait_for_line(proc, r"http://127\.0\.0\.1:\d+/v1")
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        soft = re.search(r"Max open files\s+(\d+)", limits).group(1)  # type: ignore[union-attr]
        assert int(soft) > 512, limits
        assert int(soft) == (hard if hard != resource.RLIM_INFINITY else 1 << 20)
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            stream and stream.close()


def test_out_of_file_descriptors_on_asyncio_s_loop_the_gateway_pauses_rather_than_spins(
    nats_url, tmp_path
):
    """Out of file descriptors (connections held past what `ulimit -n` allows), asyncio's
    accept loop (CPython before gh-151615) went on calling accept() for the rest of its backlog
    after EMFILE, logging each failure and scheduling a retry for each: the retries multiplied,
    thousands of failed accepts and log lines a second, a core spinning. It pauses instead, one
    failed accept a second (asyncio's retry delay), and serves again once descriptors free up."""
    import resource

    def lowered() -> None:  # soft and hard: the gateway cannot raise it
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    log = tmp_path / "gateway.log"
    env = cli_env(LIFELINE_EVENT_LOOP="asyncio", LIFELINE_LOG_LEVEL="DEBUG")
    with log.open("w") as stderr:
        proc = spawn_lifeline(
            *("gateway", "--nats-url", nats_url, "--port", "0", "--max-connections", "1000"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            preexec_fn=lowered,
        )
    held: list[socket.socket] = []
    try:
        line, _ = wait_for_line(proc, r"http://127\.0\.0\.1:\d+/v1")
        port = int(re.search(r"127\.0\.0\.1:(\d+)/v1", line).group(1))  # type: ignore[union-attr]
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(80)]
        failed = "socket.accept() out of system resource"
        asyncio.run(wait_for(lambda: failed in log.read_text(), timeout_s=10))
        for sock in held:
            sock.close()

        async def served() -> bool:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                with contextlib.suppress(httpx.HTTPError):
                    return (await http.get("/healthz", timeout=1)).status_code == 200
            return False

        asyncio.run(wait_for(served, timeout_s=10))
        # One failed accept per retry, a second apart, for the few seconds descriptors ran out
        # here. The spinning loop failed once for each connection its backlog allows (2048,
        # uvicorn's) at the first failure alone, and its retries multiplied from there.
        failures = log.read_text().count(failed)
        assert failures < 50, f"{failures} failed accepts logged"
    finally:
        for sock in held:
            sock.close()
        proc.kill()
        proc.wait()
        proc.stdout and proc.stdout.close()


def test_lifeline_gateway_refuses_a_maximum_of_no_connections():
    done = run_lifeline("gateway", "--max-connections", "0")
    assert done.returncode != 0
    assert "--max-connections must be at least 1, not 0" in done.stderr, done.stderr


def test_lifeline_run_serves_the_gateway_and_prints_its_url():
    proc = spawn_lifeline(
        "run",
        "--port",
        "-1",
        "--gateway-port",
        "-1",
        "--quiet",
        "--config",
        str(ROOT / "lifeline.example.toml"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        line, _ = wait_for_line(proc, r"OpenAI-compatible gateway on http://127\.0\.0\.1:\d+/v1")
        url = re.search(r"http://127\.0\.0\.1:\d+/v1", line).group(0)  # type: ignore[union-attr]
        wait_for_line(proc, r"dispatcher ready")
        models = httpx.get(f"{url}/models", timeout=5).json()
        assert "default" in [m["id"] for m in models["data"]]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            stream and stream.close()


async def _half_sent(gw: Gateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to `gw` that has sent a request's headers and 9 of its 500 body bytes."""
    host, port = gw.url.split("//")[1].split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 500\r\n\r\n{"model":'
    )
    await writer.drain()
    return reader, writer


async def test_a_body_that_stalls_is_refused_with_408_and_frees_its_request(gateway, monkeypatch):
    """A client that sends its headers and part of its body, then nothing: without a bound
    its connection, task and bytes would be held for good; after _BODY_TIMEOUT_S it gets a
    408 in OpenAI's error shape and the connection is closed."""
    monkeypatch.setattr("service.gateway._BODY_TIMEOUT_S", 0.3)
    gw, _, _ = await gateway(config({"main": fake()}))
    reader, writer = await _half_sent(gw)
    answer = await asyncio.wait_for(reader.read(), 10)  # all of it: the gateway closes
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and "9 bytes came" in error["message"]
    assert gw.in_flight == 0
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:  # others still served
        assert (await http.post("/chat/completions", json=chat())).status_code == 200


async def _connect(gw: Gateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = gw.url.split("//")[1].split("/")[0].split(":")
    return await asyncio.open_connection(host, int(port))


def _refusal(answer: bytes) -> tuple[int, dict[str, Any], bytes]:
    """The status, the error and the head of a whole answer the gateway closed after."""
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower(), answer
    return int(head.split()[1]), json.loads(body)["error"], head


async def test_a_streams_backlog_is_written_with_turns_for_the_gateways_other_clients(
    lifeline, nats_url
):
    """Events already queued are taken without a wait, and uvicorn writes without one while
    the socket takes them: a backlog of 100,000 tiny deltas was written in one turn of the
    event loop, every other client of the gateway waiting up to 1.8 s."""
    from types import SimpleNamespace

    from schemas import subjects
    from schemas.streaming import Assembler
    from service.gateway import _SSE, _Unread

    await lifeline(config({"tiny": fake(reply="ab" * 600, chunks=600, chunk_delay_ms=0.01)}))
    nc = await nats.connect(nats_url)
    try:  # a real stream's events, as the gateway's inbox queues them
        inbox, got, end = nc.new_inbox(), [], asyncio.Event()
        reader = Assembler()

        async def keep(msg: Any) -> None:
            got.append(msg)
            if reader.feed(msg.headers, msg.data).reply is not None:
                end.set()

        await nc.subscribe(inbox, cb=keep)
        request = encoder.encode({"messages": [{"role": "user", "content": "hi"}]})
        await nc.publish(subjects.STREAM, request, reply=inbox)
        await asyncio.wait_for(end.wait(), 10)
        assert len(got) > 500
        queue, assembler = _Unread(), Assembler()
        for msg in got[1:]:
            queue.put_nowait(msg)
        first = assembler.feed(got[0].headers, got[0].data)
        turns = 0

        async def other_clients() -> None:
            nonlocal turns
            while True:
                await asyncio.sleep(0)
                turns += 1

        others = asyncio.ensure_future(other_clients())
        stub = SimpleNamespace(inbox=SimpleNamespace(close=lambda token, done: None), nc=nc)
        sse = _SSE("default", "default", "token", 0, False)
        events = Gateway._events(stub, "token", queue, assembler, first, 30.0, sse)
        written = [chunk async for chunk in events]
        others.cancel()
        assert len(written) == len(got) and b"[DONE]" in written[-1]
        assert turns >= len(got) // 32 - 1  # a turn for the others every 32 events at least
    finally:
        await nc.close()


@pytest.mark.parametrize("parser", ["httptools", "h11"])
async def test_a_request_asking_for_a_websocket_is_served_without_a_warning(
    gateway, monkeypatch, caplog, parser
):
    """uvicorn logged two warnings per request with an Upgrade header, one advising to
    install a WebSocket library: a client could write two lines a request into the log, and
    the advice is wrong (the gateway serves no WebSockets by design)."""
    import service.gateway as module

    guarded = module._http_protocol
    monkeypatch.setattr(module, "_http_protocol", lambda: guarded(parser))
    gw, _, _ = await gateway(config({"main": fake()}))
    caplog.set_level(logging.WARNING)
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket"}
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        for _ in range(3):
            answer = await http.get("/models", headers=upgrade)
            assert answer.status_code == 200, answer.text
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("uvicorn")]


@pytest.mark.parametrize("parser", ["httptools", "h11"])
async def test_a_head_that_does_not_come_in_time_is_refused_with_408(gateway, monkeypatch, parser):
    """uvicorn times out neither a connection that never sends its request's head nor one
    that trickles it: each would hold its connection (a file descriptor) for good. After
    _HEAD_TIMEOUT_S each gets a 408 in OpenAI's error shape and is closed, on a new
    connection and on a kept-alive one between requests; a request that came in time is
    served, whatever its own length."""
    import service.gateway as module

    monkeypatch.setattr(module, "_HEAD_TIMEOUT_S", 0.5)
    guarded = module._http_protocol
    monkeypatch.setattr(module, "_http_protocol", lambda: guarded(parser))
    gw, _, _ = await gateway(config({"main": fake(latency_ms=800)}))
    silent = await _connect(gw)
    partial = await _connect(gw)
    partial[1].write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    kept = await _connect(gw)
    request = encoder.encode(chat())
    kept[1].write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(request), request)
    )
    for _, writer in (partial, kept):
        await writer.drain()
    # The kept-alive connection's request takes longer than the head timeout: it is served.
    first = await asyncio.wait_for(kept[0].readuntil(b"\r\n\r\n"), 10)
    assert first.startswith(b"HTTP/1.1 200"), first
    length = int(_header(first, b"content-length"))
    assert json.loads(await kept[0].readexactly(length))["object"] == "chat.completion"
    kept[1].write(b"GET /v1/models HTTP/1.1\r\n")  # the next request's head, never finished
    answers = [await asyncio.wait_for(reader.read(), 10) for reader, _ in (silent, partial, kept)]
    for answer, came in zip(answers, (0, 45, 25), strict=True):
        status, error, _ = _refusal(answer)
        assert status == 408 and error["code"] == "request_timeout", answer
        assert f"({came} bytes came)" in error["message"], answer
    for _, writer in (silent, partial, kept):
        writer.close()
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:  # others still served
        assert (await http.post("/chat/completions", json=chat())).status_code == 200


@pytest.mark.parametrize("parser", ["httptools", "h11"])
async def test_a_body_answered_before_it_was_read_gets_no_second_answer(
    gateway, monkeypatch, parser
):
    """A body refused by its Content-Length (413) is answered before it is read; the rest of
    it, still coming, was counted as the next request's head, and the client got a second
    answer to its one request: a 431 past 64 KiB of it, a 408 after _HEAD_TIMEOUT_S of a
    shorter one. A client reusing the connection reads such an answer as its next one's."""
    import service.gateway as module

    monkeypatch.setattr(module, "_HEAD_TIMEOUT_S", 0.5)
    guarded = module._http_protocol
    monkeypatch.setattr(module, "_http_protocol", lambda: guarded(parser))
    gw, _, _ = await gateway(config({"main": fake()}), max_body_bytes=50_000)
    for size in (1_000_000, 60_000):
        reader, writer = await _connect(gw)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n" % size
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 413"), head
        length = int(_header(head, b"content-length"))
        await reader.readexactly(length)
        with contextlib.suppress(ConnectionError):  # the body the 413 answered, sent anyway
            for _ in range(size // 10_000):
                writer.write(b"a" * 10_000)
                await writer.drain()
        try:
            rest = await asyncio.wait_for(reader.read(), 5)
        except (ConnectionError, TimeoutError):
            rest = b""
        assert b"HTTP/1.1" not in rest, (size, rest)
        writer.close()


@pytest.mark.parametrize("parser", ["httptools", "h11"])
async def test_a_head_over_its_bound_is_refused_before_it_fills_the_memory(
    gateway, monkeypatch, parser
):
    """A client that sends header lines and never ends them: uvicorn with httptools keeps
    every one, so one connection could take all the gateway's memory. Past _MAX_HEAD_BYTES
    it gets a 431 and is closed (with h11 too, whose own bound, 16 KiB, answered 400 first)."""
    import service.gateway as module

    guarded = module._http_protocol
    monkeypatch.setattr(module, "_http_protocol", lambda: guarded(parser))
    gw, _, _ = await gateway(config({"main": fake()}))
    reader, writer = await _connect(gw)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    answered = asyncio.ensure_future(reader.read())  # all of it: the gateway ends its side
    sent = 0
    with contextlib.suppress(ConnectionError):
        while sent < 2 * 1024 * 1024 and not answered.done():
            writer.write(b"x-pad-%d: %s\r\n" % (sent, b"a" * 1000))
            await writer.drain()
            sent += 1000
            await asyncio.sleep(0.0005)
    answer = await asyncio.wait_for(answered, 10)
    writer.close()
    status, error, _ = _refusal(answer)
    assert status == 431 and error["code"] == "request_header_fields_too_large", answer
    assert sent < 128 * 1024  # refused at the bound, not after the 2 MiB
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        assert (await http.post("/chat/completions", json=chat())).status_code == 200


@pytest.mark.parametrize("parser", ["httptools", "h11"])
async def test_a_head_over_its_bound_that_comes_in_one_read_is_refused_and_never_served(
    gateway, monkeypatch, audit, parser
):
    """The bound holds for a head that arrives whole in one read too: its request is taken
    back before it runs (no call, no audit event) and it gets the 431 (h11's own 16 KiB bound
    covers only a head still incomplete)."""
    import service.gateway as module

    guarded = module._http_protocol
    monkeypatch.setattr(module, "_http_protocol", lambda: guarded(parser))
    gw, _, _ = await gateway(config({"main": fake()}))
    request = encoder.encode(chat())
    padding = b"".join(b"x-pad-%d: %s\r\n" % (n, b"a" * 1000) for n in range(100))
    reader, writer = await _connect(gw)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"%sContent-Length: %d\r\n\r\n%s" % (padding, len(request), request)
    )
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status, error, _ = _refusal(answer)
    assert status == 431 and error["code"] == "request_header_fields_too_large", answer[:300]
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:  # others still served
        assert (await http.post("/chat/completions", json=chat())).status_code == 200
    [(_, event)] = await audit.wait_for(1)  # the served one's only
    assert event.status == "ok"


async def test_connections_past_the_maximum_get_503_and_the_others_are_served(
    gateway, caplog, monkeypatch
):
    """Each open connection holds a file descriptor, which the gateway's NATS connection
    needs too: past max_connections a new one is answered 503 with Retry-After at once and
    closed, and once one closes, a new one is served. Operators get one line at most every
    _WARN_EVERY_S, counting every refusal."""
    import service.gateway as module

    monkeypatch.setattr(module, "_WARN_EVERY_S", 0.5)
    gw, _, _ = await gateway(config({"main": fake()}), max_connections=3)
    idle = [await _connect(gw) for _ in range(3)]
    reader, writer = await _connect(gw)
    status, error, head = _refusal(await asyncio.wait_for(reader.read(), 10))
    writer.close()
    assert status == 503 and error["code"] == "too_many_connections", error
    assert error["type"] == "overloaded_error"  # as a dispatcher's overloaded
    assert b"retry-after: 1" in head.lower() and "--max-connections" in error["message"]
    assert "1 connection(s) refused with 503: 3 open, the maximum" in caplog.text  # for operators
    for _ in range(2):  # within the interval: told in the next line, not lost
        reader, writer = await _connect(gw)
        assert b" 503 " in await asyncio.wait_for(reader.read(), 10)
        writer.close()
    await wait_for(lambda: "2 connection(s) refused with 503" in caplog.text)
    idle[0][1].close()
    await wait_for(lambda: len(gw.server.server_state.connections) < 3)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        assert (await http.post("/chat/completions", json=chat())).status_code == 200
    for _, w in idle[1:]:
        w.close()


@shared_loop
async def test_answers_on_a_kept_alive_connection_are_not_held_back_by_nagle(shared):
    """The SDKs keep their connection open and send every request after the first on it.
    uvicorn writes an answer's head, then its body: with Nagle on, the body waited for the
    client's delayed ACK, 40 ms on Linux, and each such request took 45 ms instead of 1. The
    listening socket was made with proto 0, so asyncio's TCP_NODELAY skipped its connections."""
    async with httpx.AsyncClient(base_url=shared.gw.url, timeout=10) as http:
        for _ in range(2):
            assert (await http.post("/chat/completions", json=chat())).status_code == 200
        sockets = [
            c.transport.get_extra_info("socket") for c in shared.gw.server.server_state.connections
        ]
        assert sockets and all(
            s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets
        )


async def test_a_stream_read_too_slowly_is_stopped_and_its_client_told(
    gateway, nats_url, monkeypatch
):
    """A client that keeps its stream's connection open but reads nothing: its events would
    pile up in the gateway, several hundred bytes per token, for as long as the answer lasts.
    Past _MAX_UNREAD_BYTES, with none taken for _UNREAD_GRACE_S, they are dropped and the
    request is aborted (its dispatcher still answers and audits it); a client that reads on
    gets what was written before, then an error event saying why, and no [DONE]."""
    import service.gateway as module

    monkeypatch.setattr(module, "_MAX_UNREAD_BYTES", 256 * 1024)
    monkeypatch.setattr(module, "_UNREAD_GRACE_S", 0.3)
    monkeypatch.setattr(module, "_UNREAD_SWEEP_S", 0.1)
    answer = "abcd" * 1_000_000  # 4,000 events of 1,000 characters: more than sockets hold
    gw, _, _ = await gateway(config({"main": fake(reply=answer, chunks=4_000)}))
    watcher = await nats.connect(nats_url)
    aborts = await watcher.subscribe("llm.abort")
    await watcher.flush()
    host, port = gw.url.split("//")[1].split("/")[0].split(":")
    reader, writer = await _a_stream_asked_by_a_client_that_does_not_read(host, int(port))
    assert (await aborts.next_msg(timeout=30)).data  # its request aborted
    assert not gw.inbox.waiting  # and its events no longer held
    await watcher.close()
    answer_bytes = b""  # the client reads on at last, up to the response's last chunk
    while not answer_bytes.endswith(b"\r\n0\r\n\r\n"):
        chunk = await asyncio.wait_for(reader.read(1 << 20), 10)
        assert chunk, answer_bytes[-300:]  # not closed before its end
        answer_bytes += chunk
    writer.close()
    # Each SSE event is one chunk of the chunked response: "<size>\r\ndata: ...\n\n\r\n".
    events = [e for e in answer_bytes.split(b"\r\n") if e.startswith(b"data: ")]
    assert json.loads(events[-1][6:])["error"]["code"] == "stream_read_too_slowly", events[-1]
    assert b"data: [DONE]" not in answer_bytes
    written = [json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events[:-1]]
    # Each event whole fake pieces (past the worker's burst, pieces that come without a wait
    # go out merged, several to a chunk), and cut short.
    assert written and all(w == "abcd" * (len(w) // 4) and len(w) % 1000 == 0 for w in written)
    assert 0 < len("".join(written)) < len(answer)


async def test_a_burst_over_the_unread_bound_is_not_cut_while_its_client_reads(
    gateway, monkeypatch
):
    """The bound on unread events is for a client that stopped reading: a whole answer that
    comes faster than the socket takes it, to a client that reads, is delivered whole. The
    client pauses now and then (well within the grace), so that the events pile up past the
    bound however fast the machine is."""
    import service.gateway as module

    # small, so that a loaded machine's slower burst passes it too
    monkeypatch.setattr(module, "_MAX_UNREAD_BYTES", 16 * 1024)
    monkeypatch.setattr(module, "_UNREAD_GRACE_S", 0.3)
    monkeypatch.setattr(module, "_UNREAD_SWEEP_S", 0.1)
    answer = "abcd" * 1_000_000
    gw, client, _ = await gateway(config({"main": fake(reply=answer, chunks=4_000)}))
    peak = 0
    on_msg = gw.inbox._on_msg

    def measured(msg: Any) -> None:  # subscribed with the first request, below
        nonlocal peak
        on_msg(msg)
        peak = max([peak] + [q.bytes for q in gw.inbox.waiting.values() if hasattr(q, "bytes")])

    gw.inbox._on_msg = measured  # type: ignore[method-assign]
    stream = await client.chat.completions.create(**chat(stream=True))
    pieces, read, paused_at = [], 0, 0
    async for chunk in stream:
        pieces += [chunk.choices[0].delta.content or ""] if chunk.choices else []
        read += len(pieces[-1]) if chunk.choices else 0
        # A reader's hiccup every 500,000 characters (by text, not by events: the worker
        # merges pieces that come without a wait, so events carry several): the next events
        # wait meanwhile.
        if read - paused_at >= 500_000:
            paused_at = read
            await asyncio.sleep(0.05)
    assert "".join(pieces) == answer
    assert peak > module._MAX_UNREAD_BYTES  # the bound was passed, and the stream went on


async def test_a_client_gone_mid_body_is_no_bug_and_a_closed_connection_is_503(gateway, caplog):
    gw, _, _ = await gateway(config({"main": fake()}))
    _, writer = await _half_sent(gw)
    await asyncio.sleep(0.2)
    writer.close()  # gone, 492 bytes short
    await asyncio.sleep(0.3)
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    await gw.nc.close()
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        for stream in (False, True):
            response = await http.post("/chat/completions", json=chat(stream=stream))
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "gateway_unavailable"
            assert "retry-after" in response.headers


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_pipelines_and_hangs_up_has_its_running_request_aborted(
    gateway, audit, stream
):
    """HTTP/1.1 lets a client send its next request before its first is answered. uvicorn's
    httptools protocol then makes the queued request its current one, and a hang-up reached
    only that one (never run, nothing to stop): the request being served ran to its end, its
    provider called all along (a stream written to the closed socket, asyncio's warning
    line at each write), as if its client still waited for it."""
    cfg = config(
        {"slow": fake(latency_ms=3000), "drip": fake(chunks=30, chunk_delay_ms=100)},
        routes={"default": {"targets": ["slow"]}, "drip": {"targets": ["drip"]}},
    )
    gw, _, stack = await gateway(cfg)
    _, writer = await _connect(gw)
    first = encoder.encode(chat("drip", stream=True) if stream else chat())  # mid-stream, or
    second = encoder.encode(chat())  # waiting for its answer, when its client hangs up
    writer.write(
        b"".join(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            for body in (first, second)
        )
    )
    await writer.drain()
    await wait_for(lambda: stack.dispatcher.in_flight == 1, timeout_s=5)
    await asyncio.sleep(0.7)  # past _WATCH_AFTER_S: the hang-up is watched for
    writer.close()
    await wait_for(lambda: stack.dispatcher.aborts == 1, timeout_s=2)
    [(_, event)] = await audit.wait_for(1)  # the first's only: the second never ran
    assert event.error_type == errors.ABORTED


async def test_pipelined_requests_are_answered_in_turn_a_large_body_too(gateway, audit):
    """The bound on a head sent before the last answer leaves a pipelined request's body
    alone: a 200 KB one, read in several pieces while the first request is served."""
    gw, _, _ = await gateway(config({"slow": fake(latency_ms=700)}))
    reader, writer = await _connect(gw)
    large = [{"role": "user", "content": "word " * 40_000}]
    bodies = [encoder.encode(chat()), encoder.encode(chat(messages=large))]
    writer.write(
        b"".join(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            for body in bodies
        )
    )
    await writer.drain()
    ids = []
    for _ in bodies:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200"), head
        await reader.readexactly(int(_header(head, b"content-length")))
        ids.append(_header(head, b"x-lifeline-request-id").decode())
    writer.close()
    events = await audit.wait_for(2)
    assert sorted(event.id for _, event in events) == sorted(ids) and len(set(ids)) == 2


async def test_a_pipelined_head_over_its_bound_is_not_held_while_a_request_is_served(
    gateway, audit
):
    """The head bound held only between requests: while one was served, httptools' protocol
    read the next request's head (pipelined) and kept every header of it, without bound, for
    as long as the first ran (62 MB in 2.5 s here, and on). Past the bound the connection is
    closed, with no answer (one now would read as the first request's), and the first is
    aborted as at any hang-up."""
    gw, _, stack = await gateway(config({"slow": fake(latency_ms=3000)}))
    reader, writer = await _connect(gw)
    body = encoder.encode(chat())
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    await wait_for(lambda: stack.dispatcher.in_flight == 1, timeout_s=5)
    with contextlib.suppress(ConnectionError):
        for _ in range(200):  # 200 KB, a line at a time: each read under the bound
            writer.write(b"x-pad: " + b"a" * 1000 + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.001)
    try:  # closed (reset) before the first request's answer, and with none
        answer = await asyncio.wait_for(reader.read(), 2)
    except ConnectionError:
        answer = b""
    assert answer == b""
    writer.close()
    await wait_for(lambda: stack.dispatcher.aborts == 1, timeout_s=2)
    [(_, event)] = await audit.wait_for(1)
    assert event.error_type == errors.ABORTED


async def test_while_nats_is_down_a_request_is_503_at_once_and_served_again_after(
    tracers, monkeypatch
):
    """A gateway whose NATS server went away refuses new requests with a 503 and Retry-After
    after a short wait for the reconnect (not a 504 after the request's whole timeout, which
    would blame the dispatcher and hold the HTTP client); once the server is back, the gateway
    and the stack reconnect by themselves and serve again."""
    monkeypatch.setattr("service.gateway._RECONNECT_WAIT_S", 0.3)
    cfg = config({"main": fake()}, routes={"default": {"targets": ["main"]}})
    server = EmbeddedNats(port=-1)
    server.start()
    stack = await start_stack(parse_config(cfg), server.url, tracers)
    nc = await connect(server.url, "lifeline-gateway")  # reconnects for as long as it takes
    gw = Gateway(nc, models=models_of(cfg))
    await gw.start(port=0)
    slow = {"x-lifeline-timeout-s": "60"}  # a 504 would come only after a minute
    try:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
            assert (await http.post("/chat/completions", json=chat())).status_code == 200
            server.stop()
            await wait_for(lambda: not nc.is_connected)
            for body in (chat(), chat(stream=True)):
                down = await http.post("/chat/completions", json=body, headers=slow)
                assert down.status_code == 503, down.text
                assert down.json()["error"]["code"] == "nats_unavailable"
                assert "reconnecting" in down.json()["error"]["message"]
                assert down.headers["retry-after"] == "1"
            assert (await http.get(gw.url.removesuffix("/v1") + "/readyz")).status_code == 503

            server.start()  # the same port
            await wait_for(lambda: nc.is_connected, timeout_s=15)
            await wait_for(lambda: all(component_state(c)["ready"] for c in stack.components), 15)
            # Connected again, its subscriptions sent but maybe not yet taken by the server (a
            # request then finds no dispatcher: a 503): a round trip on each connection says
            # they are.
            for component in stack.components:
                await component.nc.flush()
            back = await http.post("/chat/completions", json=chat(), headers=slow)
            assert back.status_code == 200, back.text
            assert back.json()["choices"][0]["message"]["content"] == ANSWER
    finally:
        await gw.stop()
        await nc.close()
        await stack.stop()
        server.stop()


async def test_after_a_flood_of_requests_the_gateway_hands_memory_back(gateway, monkeypatch):
    """Thousands of HTTP requests at once leave CPython's and glibc's heaps grown (hundreds of
    MiB for 15,000); once the last is answered the gateway collects and trims, as a
    dispatcher does after a burst. One at a time is no flood: nothing is trimmed."""
    trims: list[None] = []
    monkeypatch.setattr("service.gateway.release_memory_soon", lambda: trims.append(None))
    monkeypatch.setattr("service.gateway._TRIM_AFTER_PEAK", 20)
    # Each answer takes 2.5 s, so a third of the 60 overlap even when opening their connections
    # is slowed by a busy machine (with 1 s and a bar of 40, a loaded CI run once saw fewer).
    gw, _, _ = await gateway(config({"main": fake(latency_ms=2500)}))
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(base_url=gw.url, timeout=30, limits=limits) as http:
        assert (await http.post("/chat/completions", json=chat())).status_code == 200
        assert trims == [] and gw.in_flight == 0
        answers = await asyncio.gather(
            *(http.post("/chat/completions", json=chat()) for _ in range(60))
        )
    assert {a.status_code for a in answers} == {200}
    assert gw.in_flight == 0 and trims == [None]


async def test_a_gateway_stopped_past_a_requests_wait_gives_the_answer_that_came_meanwhile(
    nats_url,
):
    """A gateway frozen (SIGSTOP) or starved past a request's wait, its answer arriving in the
    meantime: on waking, its timers ran before the answer was read, and a request already
    served got a 504 (and a retrying client paid for a second call)."""
    import threading

    from schemas import subjects
    from service.gateway import _Inbox

    answer = encoder.encode({"id": "r1", "status": "ok", "content": "served"})
    ready, stop = threading.Event(), threading.Event()

    def dispatcher() -> None:  # answers 50 ms after it is asked, from a loop of its own
        async def main() -> None:
            nc = await nats.connect(nats_url)

            async def answer_later(msg: Any) -> None:
                await asyncio.sleep(0.05)
                await msg.respond(answer)

            await nc.subscribe(subjects.COMPLETE, cb=answer_later)
            await nc.flush()
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.01)
            await nc.close()

        asyncio.run(main())

    thread = threading.Thread(target=dispatcher)
    thread.start()
    nc = await nats.connect(nats_url)
    try:
        assert await asyncio.to_thread(ready.wait, 10)
        inbox = _Inbox(nc)
        await inbox._ready()
        asyncio.get_running_loop().call_later(0.01, time.sleep, 0.6)  # the stall
        reply = await inbox.request("r1", b"{}", None, wait_s=0.3)
        assert reply is not None and reply.content == "served"
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 10)
        await nc.close()


@pytest.mark.parametrize(
    "soft, expected", [(64, 32), (128, 64), (511, 255), (512, 256), (4096, 3840)]
)
def test_the_default_connection_bound_stays_inside_a_low_open_files_limit(
    monkeypatch, soft, expected
):
    """At a limit of 64 the bound was 64 (a floor), the file descriptors ran out first, and
    every new connection was reset instead of answered 503 too_many_connections."""
    import resource

    from service.gateway import max_connections_default

    monkeypatch.setattr(resource, "getrlimit", lambda _: (soft, soft))
    assert max_connections_default() == expected


def test_tool_calls_after_a_reset_follow_the_voided_ones_for_the_sdks_stream_helper():
    """Each attempt numbers its tool calls from 0: after a reset, the SDK's stream helper (which
    joins pieces by index) glued the voided call and the next attempt's into one, named
    get_weatherget_weather with both arguments. Numbered after them, it has two calls, the
    second the answer's, and a Lifeline-aware reader drops the first by the reset's discard."""
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    from schemas.streaming import Assembler, Event, StreamReset
    from schemas.wire import ErrorInfo, ToolCallDelta
    from service.gateway import _SSE

    sse, assembler = _SSE("tools", "tools", "t", 0, include_usage=False), Assembler()
    events = [
        Event("tool_call", 1, 1, tool_call=ToolCallDelta(0, "call_A", "get_weather", '{"city": ')),
        Event("tool_call", 2, 1, tool_call=ToolCallDelta(0, arguments='"Lyon"}')),
        Event("reset", 3, 1, reset=StreamReset(1, 2, ErrorInfo("connection", "cut"))),
        Event("tool_call", 4, 2, tool_call=ToolCallDelta(0, "call_B", "get_weather", '{"city": ')),
        Event("tool_call", 5, 2, tool_call=ToolCallDelta(0, arguments='"Paris"}')),
    ]
    state = ChatCompletionStreamState()
    for event in events:
        data = sse.event(event, assembler).removeprefix(b"data: ").strip()
        state.handle_chunk(ChatCompletionChunk.model_validate_json(data))
    calls = state.current_completion_snapshot.choices[0].message.tool_calls
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        ("call_A", "get_weather", '{"city": "Lyon"}'),
        ("call_B", "get_weather", '{"city": "Paris"}'),
    ]


async def _a_stream_asked_by_a_client_that_does_not_read(
    host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that asks for a stream and then reads nothing (its receive buffer small,
    so the gateway's writes soon wait for it)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, port))
    reader, writer = await asyncio.open_connection(sock=sock)
    body = encoder.encode(chat(stream=True))
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    return reader, writer


@pytest.mark.parametrize("parser", ["httptools", "h11"])
async def test_an_http_1_0_client_gets_its_stream_delimited_by_the_close(
    gateway, monkeypatch, parser
):
    """HTTP/1.0 has no chunked transfer coding: uvicorn's httptools protocol sent a stream to
    an HTTP/1.0 client chunked all the same, so the client read chunk sizes in its events. It
    gets the events as they are, without Transfer-Encoding, the end of the body where the
    connection closes (as h11 frames it)."""
    import service.gateway as module

    guarded = module._http_protocol
    monkeypatch.setattr(module, "_http_protocol", lambda: guarded(parser))
    gw, _, _ = await gateway(config({"main": fake(chunks=3)}))
    body = encoder.encode(chat(stream=True))
    reader, writer = await _connect(gw)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    answer = await asyncio.wait_for(reader.read(), 10)  # all of it: the close ends the body
    writer.close()
    head, _, events = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer
    assert b"transfer-encoding" not in head.lower(), head
    assert b"content-length" not in head.lower(), head
    data = [line[6:] for line in events.split(b"\n\n") if line]
    assert all(line.startswith(b"data: ") for line in events.split(b"\n\n") if line), events
    assert data[-1] == b"[DONE]"
    text = "".join(json.loads(d)["choices"][0]["delta"].get("content") or "" for d in data[:-1])
    assert text == ANSWER


_BAD_HEADER = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nBad Header: yes\r\n\r\n"
_BAD_LINE = b"NOT HTTP AT ALL\r\n\r\n"
_LENGTH_AND_CHUNKED = (  # h11 reads such a body by its Transfer-Encoding, as RFC 9112 allows
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
)


@pytest.mark.parametrize(
    ("parser", "request_bytes"),
    [
        ("httptools", _LENGTH_AND_CHUNKED),
        ("httptools", _BAD_HEADER),
        ("httptools", _BAD_LINE),
        ("h11", _BAD_HEADER),
        ("h11", _BAD_LINE),
    ],
    ids=["length-and-chunked", "bad-header", "bad-line", "h11-bad-header", "h11-bad-line"],
)
async def test_a_request_the_http_parser_refuses_is_400_in_openai_s_shape(
    gateway, monkeypatch, parser, request_bytes
):
    """uvicorn answers a request its parser refuses (both Content-Length and Transfer-Encoding,
    a malformed header or request line) with a plain-text 400: the one answer of the gateway's
    that an SDK could not read as an error of OpenAI's shape (its 408, 431 and 503 are)."""
    import service.gateway as module

    guarded = module._http_protocol
    monkeypatch.setattr(module, "_http_protocol", lambda: guarded(parser))
    gw, _, _ = await gateway(config({"main": fake()}))
    reader, writer = await _connect(gw)
    writer.write(request_bytes)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status, error, head = _refusal(answer)
    assert status == 400 and b"application/json" in head, answer
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_http_request")
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:  # others still served
        assert (await http.post("/chat/completions", json=chat())).status_code == 200


async def test_a_malformed_request_pipelined_behind_one_being_served_is_not_answered_for_it(
    gateway, audit
):
    """httptools' protocol reads a pipelined request while the one before it is served: one
    its parser refuses was answered 400 there and then, which the client read as the answer
    to the request being served. The connection is closed unanswered instead, and the request
    being served aborted, as at any hang-up."""
    cfg = config({"slow": fake(latency_ms=3000)})
    gw, _, stack = await gateway(cfg)
    reader, writer = await _connect(gw)
    body = encoder.encode(chat())
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    await wait_for(lambda: stack.dispatcher.in_flight == 1, timeout_s=5)
    writer.write(_BAD_LINE)
    try:
        answer = await asyncio.wait_for(reader.read(), 10)
    except ConnectionError:
        answer = b""
    writer.close()
    assert b"HTTP/1.1" not in answer, answer
    [(_, event)] = await audit.wait_for(1)
    assert event.error_type == errors.ABORTED


@pytest.mark.parametrize("parser", ["httptools", "h11"])
@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_its_client_never_reads_is_not_held_for_as_long_as_it_stays_connected(
    gateway, monkeypatch, stream, parser
):
    """A client that sends its request and never reads the answer, its connection left open:
    the answer's bytes that the sockets could not take (a body whole in the transport's
    buffer; a stream's events in its queue too, up to 16 MiB) were held for as long as the
    connection stayed, past the answer's end and uvicorn's keep-alive timeout (closing waits
    for the buffer to be sent). Once none of it was taken for _UNDRAINED_S, the connection is
    closed and nothing is held for it."""
    import service.gateway as module

    monkeypatch.setattr(module, "_UNDRAINED_S", 0.5)
    guarded = module._http_protocol
    monkeypatch.setattr(module, "_http_protocol", lambda: guarded(parser))
    answer = "abcd" * 100_000  # in 400 events streamed
    gw, _, _ = await gateway(config({"main": fake(reply=answer, chunks=400)}))
    assert gw._sock is not None  # its connections' send buffers small: the sockets take little
    gw._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    def holding() -> int:  # the answer's bytes held for the client: unsent, and unread events
        protocols = gw.server.server_state.connections  # type: ignore[union-attr]
        unsent = sum(p.transport.get_write_buffer_size() for p in protocols)
        return unsent + sum(getattr(q, "bytes", 0) for q in gw.inbox.waiting.values())

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((gw.host, gw.port))
    _, writer = await asyncio.open_connection(sock=sock)
    body = encoder.encode(chat(stream=stream))
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    await wait_for(lambda: holding() > 100_000)  # what the sockets could not take
    await wait_for(lambda: gw.connections == 0 and holding() == 0 and not gw.inbox.waiting)
    writer.close()


def test_malformed_requests_in_a_flood_write_a_few_log_lines_not_one_each(nats_url, tmp_path):
    """uvicorn logs "Invalid HTTP request received." at WARNING for every request its parser
    refuses: hostile traffic must not become a log line per request (the README's promise), so
    the gateway's log holds at most a burst of them while each still gets its 400."""
    from service import logs

    log = tmp_path / "gateway.log"
    with log.open("w") as err:
        proc = spawn_lifeline(
            "gateway", "--nats-url", nats_url, "--port", "0", stdout=subprocess.PIPE, stderr=err
        )
    try:
        line, _ = wait_for_line(proc, r"http://127\.0\.0\.1:\d+/v1")
        port = int(re.search(r":(\d+)/v1", line).group(1))  # type: ignore[union-attr]
        answers = []
        for _ in range(40):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(b"GARBAGE / NOT-HTTP\r\n\r\n")
                answers.append(conn.recv(4096).split(b"\r\n", 1)[0])
        assert answers == [b"HTTP/1.1 400 Bad Request"] * 40, set(answers)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        proc.stdout and proc.stdout.close()
    written = log.read_text()
    assert 0 < written.count("Invalid HTTP request") <= logs.REPEATS_BURST, written


def _header(head: bytes, name: bytes) -> bytes:
    """A header's value in an HTTP answer's head (its name in any case)."""
    found = re.search(rb"\r\n" + re.escape(name) + rb":[ \t]*([^\r]*)", head, re.IGNORECASE)
    assert found is not None, head
    return found.group(1).strip()
