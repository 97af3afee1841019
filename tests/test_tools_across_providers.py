"""Tool calling end to end, across provider families: client -> NATS -> dispatcher -> workers
-> local HTTP servers speaking OpenAI's Chat Completions and Anthropic's Messages API, with
their documented bodies. The same tool call comes back the same from both, and a multi-turn
tool conversation that falls back from one family to the other arrives there intact."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import msgspec
import pytest
from helpers import LocalHTTPServer, ask, config, serving

KEY = "sk-ant-test-key"


class Scripted(LocalHTTPServer):
    """Answers each POST with the next (status, body) of `script`, and keeps what it was sent."""

    def __init__(self) -> None:
        super().__init__(_Handler)
        self.script: list[tuple[int, dict[str, Any]]] = []
        self.bodies: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Scripted

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.server.bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
        status, body = self.server.script.pop(0)
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def openai_server() -> Iterator[Scripted]:
    with serving(Scripted()) as server:
        yield server


@pytest.fixture
def anthropic_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Scripted]:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    with serving(Scripted()) as server:
        yield server


def providers(openai: Scripted, anthropic: Scripted) -> dict[str, dict[str, Any]]:
    return {
        "gpt": {
            "kind": "openai",
            "model": "gpt-4o",
            "base_url": openai.url + "/v1",
            "api_key_env": "",
        },
        "claude": {"kind": "anthropic", "model": "claude-sonnet-4-5", "base_url": anthropic.url},
    }


WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}

# Documented answers calling get_weather({"city": "Paris"}).
OPENAI_TOOL_CALL = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_abc",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {"prompt_tokens": 80, "completion_tokens": 17, "total_tokens": 97},
}
ANTHROPIC_TOOL_CALL = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5",
    "content": [
        {"type": "tool_use", "id": "toolu_abc", "name": "get_weather", "input": {"city": "Paris"}}
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 80, "output_tokens": 17},
}
ANTHROPIC_TEXT = {
    **ANTHROPIC_TOOL_CALL,
    "content": [{"type": "text", "text": "It is 18 °C and sunny in Paris."}],
    "stop_reason": "end_turn",
}


async def test_the_same_tool_call_comes_back_the_same_from_either_family(
    lifeline, client, openai_server, anthropic_server
):
    openai_server.script = [(200, OPENAI_TOOL_CALL)]
    anthropic_server.script = [(200, ANTHROPIC_TOOL_CALL)]
    await lifeline(config(providers(openai_server, anthropic_server)))
    asked = {
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER],
        "tool_choice": "required",
    }
    replies = [await ask(client, {**asked, "targets": [name]}) for name in ("gpt", "claude")]
    for reply in replies:
        assert (reply.status, reply.content, reply.finish_reason) == ("ok", "", "tool_calls")
        [call] = reply.tool_calls
        assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
        assert (reply.usage.input_tokens, reply.usage.output_tokens) == (80, 17)
    assert [r.tool_calls[0].id for r in replies] == ["call_abc", "toolu_abc"]  # the providers' ids
    # Each got the tools and the choice in its own shape.
    assert openai_server.bodies[0]["tools"][0]["function"]["name"] == "get_weather"
    assert openai_server.bodies[0]["tool_choice"] == "required"
    assert anthropic_server.bodies[0]["tools"][0]["input_schema"] == WEATHER["parameters"]
    assert anthropic_server.bodies[0]["tool_choice"] == {"type": "any"}


async def test_a_tool_conversation_falls_back_from_openai_to_anthropic_intact(
    lifeline, client, openai_server, anthropic_server
):
    """Turn 3 of an agent loop: the model asked for two tools, the client ran them. OpenAI is
    overloaded; Claude must get the same conversation in its own shape, and answer."""
    openai_server.script = [(503, {"error": {"message": "overloaded", "type": "server_error"}})]
    anthropic_server.script = [(200, ANTHROPIC_TEXT)]
    await lifeline(config(providers(openai_server, anthropic_server)))
    image = {"type": "image", "data": "iVBORw0KGgo=", "media_type": "image/png"}
    conversation = [
        {"role": "system", "content": "You are a weather assistant."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Weather here and in Paris?"}, image],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Lyon"}'},
                {"id": "call_2", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 °C, clear"},
        {"role": "tool", "tool_call_id": "call_2", "content": "18 °C, sunny"},
    ]
    reply = await ask(client, {"messages": conversation, "tools": [WEATHER], "stop": ["END"]})
    assert [(a.target, a.outcome, a.error_type) for a in reply.attempts] == [
        ("gpt", "error", "server_error"),
        ("claude", "ok", None),
    ]
    assert (reply.content, reply.finish_reason) == ("It is 18 °C and sunny in Paris.", "stop")
    # What OpenAI was sent: its own shape.
    sent = openai_server.bodies[0]["messages"]
    assert sent[2]["tool_calls"][1]["function"] == {
        "name": "get_weather",
        "arguments": '{"city": "Paris"}',
    }
    assert sent[3] == {"role": "tool", "tool_call_id": "call_1", "content": "21 °C, clear"}
    assert sent[1]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
    }
    # What Claude was sent: the same conversation, translated.
    body = anthropic_server.bodies[0]
    assert body["system"] == "You are a weather assistant."
    assert body["stop_sequences"] == ["END"]
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather here and in Paris?"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
                },
            ],
        },
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "call_1",
                    "name": "get_weather",
                    "input": {"city": "Lyon"},
                },
                {
                    "type": "tool_use",
                    "id": "call_2",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "21 °C, clear"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": "18 °C, sunny"},
            ],
        },
    ]


async def test_another_providers_tool_call_ids_reach_anthropic_in_a_shape_it_takes(
    lifeline, client, openai_server, anthropic_server
):
    """Kimi's and other compatible servers' ids ("functions.get_weather:0") were sent to
    Claude as they were, and it refuses any tool_use id outside ^[a-zA-Z0-9_-]+$: every
    fallback of such a conversation was a 400. Each call and its result must still pair, and
    ids that differ only in such characters must stay apart."""
    openai_server.script = [(503, {"error": {"message": "overloaded", "type": "server_error"}})]
    anthropic_server.script = [(200, ANTHROPIC_TEXT)]
    await lifeline(config(providers(openai_server, anthropic_server)))
    ids = ["functions.get_weather:0", "functions.get_weather.0", "toolu_01A09q90qw"]
    conversation = [
        {"role": "user", "content": "Weather in Lyon, Paris and Nice?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": i, "name": "get_weather", "arguments": json.dumps({"city": city})}
                for i, city in zip(ids, ["Lyon", "Paris", "Nice"], strict=True)
            ],
        },
        *({"role": "tool", "tool_call_id": i, "content": "20 °C"} for i in ids),
    ]
    reply = await ask(client, {"messages": conversation, "tools": [WEATHER]})
    assert [(a.target, a.outcome) for a in reply.attempts] == [("gpt", "error"), ("claude", "ok")]
    assert openai_server.bodies[0]["messages"][2]["tool_call_id"] == ids[0]  # OpenAI's as sent
    assistant, results = anthropic_server.bodies[0]["messages"][1:]
    uses = [block["id"] for block in assistant["content"]]
    assert [block["tool_use_id"] for block in results["content"]] == uses
    assert uses[2] == "toolu_01A09q90qw"  # an id the API takes is kept as it is
    assert all(re.fullmatch(r"[a-zA-Z0-9_-]+", i) for i in uses)
    assert len(set(uses)) == 3


async def test_a_tool_call_a_compatible_server_gave_no_id_can_still_be_answered(
    lifeline, client, openai_server, anthropic_server
):
    """A compatible server's call with "id": "" came back with that empty id, and the client's
    tool message answering it was refused (a tool message needs its tool_call_id): the loop
    could not go on. Lifeline gives such a call an id of its own."""
    nameless = json.loads(json.dumps(OPENAI_TOOL_CALL))
    nameless["choices"][0]["message"]["tool_calls"][0]["id"] = ""
    answered = {**OPENAI_TOOL_CALL, "choices": [{"index": 0, "finish_reason": "stop"}]}
    answered["choices"][0]["message"] = {"role": "assistant", "content": "18 °C"}
    openai_server.script = [(200, nameless), (200, answered)]
    await lifeline(config(providers(openai_server, anthropic_server)))
    asked = [{"role": "user", "content": "Weather in Paris?"}]
    first = await ask(client, {"messages": asked, "tools": [WEATHER], "targets": ["gpt"]})
    [call] = first.tool_calls
    assert re.fullmatch(r"call_[0-9a-f]{24}", call.id)
    turn = {"role": "assistant", "content": None, "tool_calls": [msgspec.to_builtins(call)]}
    answer = {"role": "tool", "tool_call_id": call.id, "content": "18 °C, sunny"}
    second = await ask(
        client, {"messages": [*asked, turn, answer], "tools": [WEATHER], "targets": ["gpt"]}
    )
    assert (second.status, second.content) == ("ok", "18 °C")
    assert openai_server.bodies[1]["messages"][2]["tool_call_id"] == call.id


def openai_refusal(body: dict[str, Any]) -> str | None:
    """OpenAI's answer to a tool call id over 40 characters (code string_above_max_length):
    https://github.com/agno-agi/agno/issues/5382,
    https://github.com/langmanus/langmanus/issues/119."""
    for i, message in enumerate(body["messages"]):
        for j, call in enumerate(message.get("tool_calls") or ()):
            if len(call["id"]) > 40:
                return f"Invalid 'messages[{i}].tool_calls[{j}].id': string too long."
        if len(message.get("tool_call_id") or "") > 40:
            return f"Invalid 'messages[{i}].tool_call_id': string too long."
    return None


async def test_another_providers_long_tool_call_ids_reach_openai_in_a_length_it_takes(
    lifeline, client, openai_server, anthropic_server
):
    """vLLM names its calls "chatcmpl-tool-" and 32 hex digits (46 characters), and OpenAI
    refuses a tool call id over 40: every fallback to OpenAI of a conversation another server
    began was a 400. Each call and its result must still pair, and ids that differ only past
    their 40th character must stay apart."""
    anthropic_server.script = [(503, {"type": "error", "error": {"type": "overloaded_error"}})]
    answer = {**OPENAI_TOOL_CALL, "choices": [{"index": 0, "finish_reason": "stop"}]}
    answer["choices"][0]["message"] = {"role": "assistant", "content": "All warm."}
    openai_server.script = [(200, answer)]
    await lifeline(config(providers(openai_server, anthropic_server)))
    stem = "chatcmpl-tool-" + "9f" * 16
    ids = [stem, stem + "-a", stem + "-b", "call_abc"]
    conversation = [
        {"role": "user", "content": "Weather in Lyon, Paris, Nice and Metz?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": i, "name": "get_weather", "arguments": json.dumps({"city": city})}
                for i, city in zip(ids, ["Lyon", "Paris", "Nice", "Metz"], strict=True)
            ],
        },
        *({"role": "tool", "tool_call_id": i, "content": "20 °C"} for i in ids),
    ]
    reply = await ask(
        client, {"messages": conversation, "tools": [WEATHER], "targets": ["claude", "gpt"]}
    )
    assert (reply.status, reply.content) == ("ok", "All warm.")
    sent = openai_server.bodies[0]
    assert openai_refusal(sent) is None
    calls = [call["id"] for call in sent["messages"][1]["tool_calls"]]
    assert [message["tool_call_id"] for message in sent["messages"][2:]] == calls
    assert calls[3] == "call_abc"  # an id OpenAI takes is kept as it is
    assert len(set(calls)) == 4
