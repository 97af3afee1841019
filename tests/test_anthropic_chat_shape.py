"""The anthropic provider and the whole chat request: images, tools, tool calls and their
results, stop sequences, and the answer's tool calls, finish reason and cache usage, against
the documented Messages API bodies, whole and streamed.

    https://docs.anthropic.com/en/api/messages
    https://docs.anthropic.com/en/docs/agents-and-tools/tool-use/implement-tool-use
    https://docs.anthropic.com/en/docs/build-with-claude/vision
    https://docs.anthropic.com/en/docs/build-with-claude/streaming
"""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import msgspec
import pytest
from helpers import MockServer, provider_fixture
from httpx_sse import ServerSentEvent

from schemas import ChatMessage, ProviderOk, ProviderRequest, Usage
from schemas.wire import (
    ImagePart,
    JsonSchemaFormat,
    NamedTool,
    ResponseFormat,
    TextPart,
    Tool,
    ToolCall,
    ToolCallDelta,
)
from workers.anthropic import AnthropicProvider, AnthropicSettings, MessageStream
from workers.base import ProviderError

KEY = "sk-ant-api03-shape-7Yq2Lm4Np8Rs"
MODEL = "claude-sonnet-4-20250514"

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["location"],
}
GET_WEATHER = Tool("get_weather", "Get the current weather in a given location", WEATHER_SCHEMA)
# A 1x1 PNG, base64.
PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5E"
    "rkJggg=="
)
IMAGE_URL = "https://upload.wikimedia.org/wikipedia/commons/a/a7/Camponotus_flavomarginatus_ant.jpg"

# https://docs.anthropic.com/en/docs/agents-and-tools/tool-use/implement-tool-use (response)
TOOL_USE = {
    "type": "tool_use",
    "id": "toolu_01A09q90qw90lq917835lq9",
    "name": "get_weather",
    "input": {"location": "San Francisco, CA", "unit": "celsius"},
}
MESSAGE = {
    "id": "msg_01Aq9w938a90dw8q",
    "type": "message",
    "role": "assistant",
    "model": MODEL,
    "content": [
        {"type": "text", "text": "I'll check the current weather in San Francisco for you."},
        TOOL_USE,
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 384, "output_tokens": 87},
}


class Server(MockServer):
    default_body = MESSAGE


make = provider_fixture(
    lambda client: AnthropicProvider(
        msgspec.convert({"kind": "anthropic", "model": MODEL}, AnthropicSettings),
        client,
        environ={"ANTHROPIC_API_KEY": KEY},
    )
)


def request(*messages: ChatMessage, **fields: Any) -> ProviderRequest:
    chat = list(messages) or [ChatMessage("user", "What's the weather like in San Francisco?")]
    return ProviderRequest(id="r1", messages=chat, **fields)


def answer(**fields: Any) -> Server:
    """A server answering MESSAGE with `fields` replaced."""
    return Server(body={**MESSAGE, **fields})


def calls(ok: ProviderOk) -> list[tuple[str, str, Any]]:
    """The answer's tool calls as a client reads them: id, name and the decoded arguments."""
    return [(call.id, call.name, json.loads(call.arguments)) for call in ok.tool_calls or []]


# ---- the request ----------------------------------------------------------------------

CONVERSATION = request(
    ChatMessage("system", "You are a weather assistant."),
    ChatMessage("developer", "Answer in one sentence."),
    ChatMessage(
        "user",
        [
            TextPart("Where were these taken, and what is the weather there now?"),
            ImagePart(url=IMAGE_URL),
            ImagePart(data=PNG, media_type="image/png"),
        ],
    ),
    ChatMessage(
        "assistant",
        "I'll check the weather in both places.",
        tool_calls=[
            ToolCall("toolu_01A09q90qw90lq917835lq9", "get_weather", '{"location": "Paris"}'),
            ToolCall(
                "toolu_01B3ZQm5xJr5aT8m9oVYhq2c",
                "get_weather",
                '{"location": "San Francisco, CA", "unit": "celsius"}',
            ),
        ],
    ),
    ChatMessage("tool", "15 degrees, cloudy", tool_call_id="toolu_01A09q90qw90lq917835lq9"),
    ChatMessage("tool", "18 degrees, sunny", tool_call_id="toolu_01B3ZQm5xJr5aT8m9oVYhq2c"),
    ChatMessage("user", "Which one is warmer?"),
    tools=[GET_WEATHER],
    max_tokens=512,
)

CONVERSATION_BODY = {
    "model": MODEL,
    "max_tokens": 512,
    "system": "You are a weather assistant.\n\nAnswer in one sentence.",
    "tools": [
        {
            "name": "get_weather",
            "description": "Get the current weather in a given location",
            "input_schema": WEATHER_SCHEMA,
        }
    ],
    "messages": [
        {
            "role": "user",
            "content": [
                {
                    "type": "text",
                    "text": "Where were these taken, and what is the weather there now?",
                },
                {"type": "image", "source": {"type": "url", "url": IMAGE_URL}},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                },
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "I'll check the weather in both places."},
                {
                    "type": "tool_use",
                    "id": "toolu_01A09q90qw90lq917835lq9",
                    "name": "get_weather",
                    "input": {"location": "Paris"},
                },
                {
                    "type": "tool_use",
                    "id": "toolu_01B3ZQm5xJr5aT8m9oVYhq2c",
                    "name": "get_weather",
                    "input": {"location": "San Francisco, CA", "unit": "celsius"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01A09q90qw90lq917835lq9",
                    "content": "15 degrees, cloudy",
                },
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01B3ZQm5xJr5aT8m9oVYhq2c",
                    "content": "18 degrees, sunny",
                },
                {"type": "text", "text": "Which one is warmer?"},
            ],
        },
    ],
}


async def test_a_multi_turn_tool_conversation_is_sent_as_the_documented_body(make):
    server = Server()
    await make(server).complete(CONVERSATION, timeout_s=5)
    assert server.sent_json() == CONVERSATION_BODY


async def test_messages_in_parts_keep_their_parts_as_blocks(make):
    """A system prompt, a tool's result and a tool-calling turn sent in parts: each part is a
    block of its own (their text was glued into one string, "Be brief.Use metric units.")."""
    server = Server()
    chat = request(
        ChatMessage("system", [TextPart("Be brief."), TextPart("Use metric units.")]),
        ChatMessage("user", "Weather in Paris?"),
        ChatMessage(
            "assistant",
            [TextPart("Checking."), TextPart("")],
            tool_calls=[ToolCall("toolu_1", "get_weather", '{"location": "Paris"}')],
        ),
        ChatMessage(
            "tool",
            [TextPart("15 C,"), TextPart(" cloudy"), ImagePart(url=IMAGE_URL)],
            tool_call_id="toolu_1",
        ),
    )
    await make(server).complete(chat, timeout_s=5)
    sent = server.sent_json()
    assert sent["system"] == [
        {"type": "text", "text": "Be brief."},
        {"type": "text", "text": "Use metric units."},
    ]
    assert sent["messages"][1]["content"][0] == {"type": "text", "text": "Checking."}
    assert sent["messages"][1]["content"][1]["type"] == "tool_use"
    assert sent["messages"][2]["content"] == [
        {
            "type": "tool_result",
            "tool_use_id": "toolu_1",
            "content": [
                {"type": "text", "text": "15 C,"},
                {"type": "text", "text": " cloudy"},
                {"type": "image", "source": {"type": "url", "url": IMAGE_URL}},
            ],
        }
    ]


async def test_an_image_sent_as_a_data_url_reaches_anthropic_as_a_base64_source(make):
    """OpenAI's inline form, data:image/png;base64,..., went as a url source, which the API
    refuses: every fallback to Claude of a request with such an image was a 400."""
    server = Server()
    image = ImagePart(url=f"data:image/png;base64,{PNG}")
    await make(server).complete(request(ChatMessage("user", [image])), timeout_s=5)
    assert server.sent_json()["messages"][0]["content"] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    ]


@pytest.mark.parametrize(
    ("prefill", "sent"),
    [
        ("Hello\n\n", "Hello"),
        (
            [TextPart("The answer is "), TextPart(" \n")],
            [{"type": "text", "text": "The answer is"}],
        ),
        (" \n", ""),
    ],
)
async def test_a_last_assistant_turn_ending_in_whitespace_is_sent_without_it(make, prefill, sent):
    """The API refuses a final assistant turn ending in whitespace: on_midstream "continue"
    after a first target's "Hello\n\n" failed on every Claude target ("final assistant
    content cannot end with trailing whitespace"). Earlier turns keep theirs."""
    server = Server()
    chat = request(
        ChatMessage("user", "Say hello twice"),
        ChatMessage("assistant", "Hello.\n\n"),
        ChatMessage("user", "Again"),
        ChatMessage("assistant", prefill),
    )
    await make(server).complete(chat, timeout_s=5)
    turns = server.sent_json()["messages"]
    assert turns[1]["content"] == "Hello.\n\n"
    assert turns[3] == {"role": "assistant", "content": sent}


async def test_an_empty_text_part_is_left_out_as_the_api_refuses_an_empty_block(make):
    """A user message of an empty caption and an image ([{"type": "text", "text": ""}, image],
    as some clients send) fell back to Claude as a 400: "text content blocks must be
    non-empty"."""
    server = Server()
    parts = [TextPart(""), ImagePart(data=PNG, media_type="image/png"), TextPart("")]
    await make(server).complete(request(ChatMessage("user", parts)), timeout_s=5)
    assert server.sent_json()["messages"][0]["content"] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    ]


async def test_the_streamed_request_is_the_same_body_with_stream_true(make):
    server = stream_server(stream_events())
    [_ async for _ in make(server).stream(CONVERSATION, timeout_s=5)]
    assert server.sent_json() == {**CONVERSATION_BODY, "stream": True}


async def test_an_assistant_message_calling_tools_without_text_sends_only_tool_use(make):
    server = Server()
    call = ToolCall("toolu_01A09q90qw90lq917835lq9", "get_weather", "{}")
    chat = request(
        ChatMessage("user", "Weather?"),
        ChatMessage("assistant", None, tool_calls=[call]),
        ChatMessage("tool", "15 degrees", tool_call_id=call.id),
        tools=[GET_WEATHER],
    )
    await make(server).complete(chat, timeout_s=5)
    assert server.sent_json()["messages"][1] == {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": call.id, "name": "get_weather", "input": {}}],
    }


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("required", None, {"type": "any"}),
        ("none", None, {"type": "none"}),
        (NamedTool("get_weather"), None, {"type": "tool", "name": "get_weather"}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("auto", False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        (
            NamedTool("get_weather"),
            False,
            {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        ),
        ("none", False, {"type": "none"}),
        ("auto", True, {"type": "auto"}),
    ],
)
async def test_tool_choice_and_parallel_tool_calls_map_to_tool_choice(
    make, choice, parallel, expected
):
    server = Server()
    chat = request(tools=[GET_WEATHER], tool_choice=choice, parallel_tool_calls=parallel)
    await make(server).complete(chat, timeout_s=5)
    assert server.sent_json()["tool_choice"] == expected


async def test_tools_without_a_tool_choice_send_none(make):
    server = Server()
    await make(server).complete(request(tools=[GET_WEATHER]), timeout_s=5)
    assert "tool_choice" not in server.sent_json()


async def test_a_tool_choice_without_tools_is_left_out(make):
    server = Server()
    chat = request(tool_choice="required", parallel_tool_calls=False)
    await make(server).complete(chat, timeout_s=5)
    assert "tools" not in server.sent_json()
    assert "tool_choice" not in server.sent_json()


async def test_a_tool_without_parameters_or_description_gets_an_empty_object_schema(make):
    server = Server()
    await make(server).complete(request(tools=[Tool("get_time")]), timeout_s=5)
    assert server.sent_json()["tools"] == [
        {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}
    ]


async def test_stop_becomes_stop_sequences_and_seed_is_left_out(make):
    server = Server()
    await make(server).complete(request(stop=["\n\nHuman:", "END"], seed=42), timeout_s=5)
    sent = server.sent_json()
    assert sent["stop_sequences"] == ["\n\nHuman:", "END"]
    assert "stop" not in sent
    assert "seed" not in sent


INVOICE = {"type": "object", "properties": {"number": {"type": "string"}}, "required": ["number"]}


@pytest.mark.parametrize(
    ("system", "response_format", "said"),
    [
        (None, ResponseFormat("json_object"), "a JSON object"),
        ("Be brief.", ResponseFormat("json_object"), "a JSON object"),
        (
            [TextPart("Be brief.")],
            ResponseFormat("json_schema", JsonSchemaFormat("invoice", INVOICE, strict=True)),
            json.dumps(INVOICE),
        ),
    ],
    ids=["json_object", "json_object-beside-a-system-prompt", "json_schema-in-parts"],
)
async def test_a_json_response_format_is_said_in_the_system_prompt(
    make, system, response_format, said
):
    """The Messages API has no response_format: a request for JSON (OpenAI's json_schema
    gives the model the schema) fell back to Claude without a word of it, so its answer, in
    prose or in keys of its own choosing, failed the dispatcher's check: the fallback could
    not serve. The system prompt now asks for it, after the client's own."""
    server = Server(body={**MESSAGE, "content": [{"type": "text", "text": '{"number": "7"}'}]})
    chat = [ChatMessage("user", "Extract the invoice number: INV 7")]
    if system is not None:
        chat.insert(0, ChatMessage("system", system))
    await make(server).complete(request(*chat, response_format=response_format), timeout_s=5)
    sent = server.sent_json()["system"]
    text = sent if isinstance(sent, str) else "\n\n".join(block["text"] for block in sent)
    assert said in text and "JSON" in text
    if system is not None:
        assert text.startswith("Be brief.")


async def test_a_text_or_regex_response_format_adds_nothing_to_the_system_prompt(make):
    for response_format in (ResponseFormat("text"), ResponseFormat("regex", pattern=r"\d+")):
        server = Server()
        await make(server).complete(request(response_format=response_format), timeout_s=5)
        assert "system" not in server.sent_json()


async def test_top_p_is_sent_only_without_a_temperature_as_newer_models_refuse_both(make):
    """A request (or a target) setting both made every call to Claude Sonnet 4.5 a 400."""
    both, alone = Server(), Server()
    await make(both).complete(request(temperature=0.2, top_p=0.9), timeout_s=5)
    await make(alone).complete(request(top_p=0.9), timeout_s=5)
    assert both.sent_json()["temperature"] == 0.2
    assert "top_p" not in both.sent_json()
    assert alone.sent_json()["top_p"] == 0.9
    assert "temperature" not in alone.sent_json()


async def test_a_whitespace_only_stop_sequence_is_left_out_as_the_api_refuses_it(make):
    """The README's own "stop": ["\n\n"] made every fallback to Claude a 400 ("each stop
    sequence must contain non-whitespace")."""
    some, only = Server(), Server()
    await make(some).complete(request(stop=["\n\n", "END", " \t"]), timeout_s=5)
    await make(only).complete(request(stop=["\n\n"]), timeout_s=5)
    assert some.sent_json()["stop_sequences"] == ["END"]
    assert "stop_sequences" not in only.sent_json()


@pytest.mark.parametrize(
    "arguments",
    # the last three: json.loads took them, and the body's encoding then failed (server_error)
    ["not json", "[1, 2]", '"Paris"', '{"location": "Par', '{"a": NaN}', '{"a": 1e400}']
    + ['{"a": "\\ud800"}'],
)
async def test_assistant_tool_call_arguments_that_are_no_object_are_a_bad_request(make, arguments):
    server = Server()
    call = ToolCall("toolu_01A09q90qw90lq917835lq9", "get_weather", arguments)
    chat = request(
        ChatMessage("user", "Weather?"),
        ChatMessage("assistant", None, tool_calls=[call]),
        ChatMessage("tool", "15 degrees", tool_call_id=call.id),
    )
    provider = make(server)
    with pytest.raises(ProviderError) as complete:
        await provider.complete(chat, timeout_s=5)
    with pytest.raises(ProviderError) as streamed:
        [_ async for _ in provider.stream(chat, timeout_s=5)]
    for error in (complete.value, streamed.value):
        assert error.kind == "bad_request"
        assert "toolu_01A09q90qw90lq917835lq9" in error.message
        assert arguments not in error.message
    assert server.requests == []  # refused before any call


@pytest.mark.parametrize("arguments", ["", " ", "\n"])
async def test_an_earlier_call_with_empty_arguments_is_sent_with_an_empty_input(make, arguments):
    """Several OpenAI-compatible servers call a tool without parameters with arguments "",
    and OpenAI takes the call back so in the history: falling back to Claude, such a
    conversation failed as a bad_request before any call, though it means no arguments (as
    Lifeline reads such an answer: "{}")."""
    server = Server()
    call = ToolCall("call_1", "get_time", arguments)
    chat = request(
        ChatMessage("user", "Time?"),
        ChatMessage("assistant", None, tool_calls=[call]),
        ChatMessage("tool", "12:00", tool_call_id="call_1"),
    )
    await make(server).complete(chat, timeout_s=5)
    [use] = server.sent_json()["messages"][1]["content"]
    assert use == {"type": "tool_use", "id": "call_1", "name": "get_time", "input": {}}


# ---- the answer -----------------------------------------------------------------------


async def test_text_and_tool_use_blocks_answer_content_tool_calls_and_finish_reason(make):
    ok = await make(Server()).complete(CONVERSATION, timeout_s=5)
    assert ok.content == "I'll check the current weather in San Francisco for you."
    assert calls(ok) == [
        (
            "toolu_01A09q90qw90lq917835lq9",
            "get_weather",
            {"location": "San Francisco, CA", "unit": "celsius"},
        )
    ]
    assert ok.finish_reason == "tool_calls"
    assert (ok.model, ok.usage) == (MODEL, Usage(input_tokens=384, output_tokens=87))


async def test_an_answer_of_tool_use_blocks_only_has_empty_content(make):
    second = {**TOOL_USE, "id": "toolu_01B3ZQm5xJr5aT8m9oVYhq2c", "input": {"location": "Paris"}}
    ok = await make(answer(content=[TOOL_USE, second])).complete(request(), timeout_s=5)
    assert ok.content == ""
    assert [(call_id, args) for call_id, _, args in calls(ok)] == [
        ("toolu_01A09q90qw90lq917835lq9", {"location": "San Francisco, CA", "unit": "celsius"}),
        ("toolu_01B3ZQm5xJr5aT8m9oVYhq2c", {"location": "Paris"}),
    ]
    assert ok.finish_reason == "tool_calls"


async def test_a_text_answer_has_no_tool_calls(make):
    body = answer(content=[{"type": "text", "text": "Hi!"}], stop_reason="end_turn")
    ok = await make(body).complete(request(), timeout_s=5)
    assert (ok.content, ok.tool_calls, ok.finish_reason) == ("Hi!", None, "stop")


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
    ],
)
async def test_stop_reason_maps_to_finish_reason(make, stop_reason, finish_reason):
    ok = await make(answer(stop_reason=stop_reason)).complete(request(), timeout_s=5)
    assert ok.finish_reason == finish_reason


async def test_a_refusal_is_still_a_content_filter_failure(make):
    with pytest.raises(ProviderError) as caught:
        await make(answer(stop_reason="refusal")).complete(request(), timeout_s=5)
    assert caught.value.kind == "content_filter"


async def test_cache_reads_and_writes_count_as_input_and_reads_as_cached(make):
    usage = {
        "input_tokens": 21,
        "cache_creation_input_tokens": 188,
        "cache_read_input_tokens": 1800,
        "output_tokens": 393,
    }
    ok = await make(answer(usage=usage)).complete(request(), timeout_s=5)
    assert ok.usage == Usage(input_tokens=2009, output_tokens=393, cached_input_tokens=1800)


async def test_a_tool_use_block_without_an_id_is_a_server_error(make):
    block = {key: value for key, value in TOOL_USE.items() if key != "id"}
    with pytest.raises(ProviderError) as caught:
        await make(answer(content=[block])).complete(request(), timeout_s=5)
    assert caught.value.kind == "server_error"
    assert "tool_use" in caught.value.message


# ---- the streamed answer --------------------------------------------------------------


def sse(data: dict[str, Any]) -> str:
    return f"event: {data['type']}\ndata: {json.dumps(data)}\n\n"


def stream_events(
    pieces: list[str] | None = None, stop_reason: str = "tool_use", more_blocks: int = 0
) -> list[dict[str, Any]]:
    """The documented tool use stream: a text block, then a get_weather tool_use block whose
    input arrives as `pieces` (and `more_blocks` further tool_use blocks with no delta)."""
    if pieces is None:
        pieces = ["", '{"loc', 'ation": "San Fra', 'ncisco, CA", "u', 'nit": "fahr', 'enheit"}']
    usage = {"input_tokens": 472, "cache_creation_input_tokens": 0, "output_tokens": 2}
    usage["cache_read_input_tokens"] = 1024
    message = {"id": "msg_014p7gG3wDgGV9EUtLvnow3U", "type": "message", "role": "assistant"}
    message |= {"model": MODEL, "content": [], "stop_reason": None, "usage": usage}
    text = ["Okay", ",", " let's check the weather for San Francisco, CA:"]
    tool = {"type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather"}
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": message},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        *(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}}
            for t in text
        ),
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {**tool, "input": {}}},
        *(
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": piece},
            }
            for piece in pieces
        ),
        {"type": "content_block_stop", "index": 1},
    ]
    for index in range(2, 2 + more_blocks):
        block = {**tool, "id": f"toolu_0{index}", "name": "get_time", "input": {}}
        events.append({"type": "content_block_start", "index": index, "content_block": block})
        events.append({"type": "content_block_stop", "index": index})
    delta = {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None}}
    delta["usage"] = {"output_tokens": 89}
    return [*events, delta, {"type": "message_stop"}]


def event(data: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(event=data["type"], data=json.dumps(data))


def stream_server(events: list[dict[str, Any]]) -> Server:
    body = "".join(sse(event) for event in events).encode()
    return Server(body=body, headers={"content-type": "text/event-stream"})


async def stream(
    make: Any, events: list[dict[str, Any]], tool_deltas: list[ToolCallDelta] | None = None
) -> tuple[list[str], ProviderOk]:
    """The text deltas and the final ProviderOk; the tool-call deltas go to `tool_deltas`."""
    *deltas, last = [item async for item in make(stream_server(events)).stream(request(), 5)]
    assert isinstance(last, ProviderOk), last
    if tool_deltas is not None:
        tool_deltas += [d for d in deltas if isinstance(d, ToolCallDelta)]
    return [d for d in deltas if isinstance(d, str)], last


async def test_a_streamed_tool_use_block_is_a_tool_call_of_the_joined_input(make):
    tool_deltas: list[ToolCallDelta] = []
    deltas, ok = await stream(make, stream_events(more_blocks=1), tool_deltas)
    assert "".join(deltas) == "Okay, let's check the weather for San Francisco, CA:"
    # Passed on as they came: each call's first piece names it, numbered in answer order.
    assert [(d.index, d.id, d.name) for d in tool_deltas if d.name] == [
        (0, "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "get_weather"),
        (1, "toolu_02", "get_time"),
    ]
    joined = "".join(d.arguments for d in tool_deltas if d.index == 0)
    assert joined == '{"location": "San Francisco, CA", "unit": "fahrenheit"}'
    assert ok.tool_calls == [
        ToolCall(
            "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
            "get_weather",
            '{"location": "San Francisco, CA", "unit": "fahrenheit"}',
        ),
        ToolCall("toolu_02", "get_time", "{}"),  # no input_json_delta came: no arguments
    ]
    assert ok.finish_reason == "tool_calls"
    assert ok.usage == Usage(input_tokens=1496, output_tokens=89, cached_input_tokens=1024)


async def test_a_streamed_tool_use_block_without_deltas_has_empty_arguments(make):
    """A tool without parameters: no input_json_delta comes (or an empty one). Its streamed
    pieces join to "{}" as the end's call does: joined to "", the next turn's request sent
    back through the gateway was refused as arguments that are no JSON object."""
    for pieces in ([], [""]):
        tool_deltas: list[ToolCallDelta] = []
        _, ok = await stream(make, stream_events(pieces=pieces), tool_deltas)
        assert calls(ok) == [("toolu_01T1x1fJ34qAmk2tNTrN7Up6", "get_weather", {})]
        assert "".join(d.arguments for d in tool_deltas) == "{}"


def test_a_tool_input_streamed_in_many_small_pieces_is_held_in_about_its_own_size():
    """The API streams a tool call's input in pieces of a few characters, and each was held
    as a string of its own until the call ended: some 60 bytes for every 2 of input, 120 MB
    for a call at the default max_response_bytes (4 MiB), in one worker, for one stream."""
    text = json.dumps({"digits": "0123456789" * 20_000})
    pieces = [text[i : i + 2] for i in range(0, len(text), 2)]
    tool = {"type": "tool_use", "id": "toolu_01", "name": "get_digits", "input": {}}
    reader = MessageStream("anthropic", MODEL)
    reader.read(event({"type": "content_block_start", "index": 0, "content_block": tool}))
    deltas = [
        event(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": piece},
            }
        )
        for piece in pieces
    ]
    tracemalloc.start()
    try:
        for delta in deltas:
            reader.read(delta)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 2 * len(text), f"{held} bytes held for {len(text)} bytes of input"
    reader.read(event({"type": "content_block_stop", "index": 0}))
    reader.read(event({"type": "message_delta", "delta": {"stop_reason": "tool_use"}}))
    ok = reader.read(event({"type": "message_stop"}))
    assert isinstance(ok, ProviderOk)
    assert ok.tool_calls == [ToolCall("toolu_01", "get_digits", text)]


@pytest.mark.parametrize("second", ["tool_use", "text"])
async def test_a_block_started_at_an_index_a_tool_call_holds_fails_the_answer(make, second):
    """Each content block has an index of its own (its place in the message's content). A
    second tool_use block started at the index of the first replaced it: the first call was
    lost from the answer (though streamed on), and the deltas that followed were no one's.
    Such a stream is malformed, as other unexpected events: a server_error, to fall back on."""
    events = stream_events(more_blocks=1)
    [start] = [e for e in events if e["type"] == "content_block_start" and e["index"] == 2]
    start["index"] = 1
    if second == "text":
        start["content_block"] = {"type": "text", "text": ""}
    with pytest.raises(ProviderError) as failed:
        await stream(make, events)
    assert (failed.value.kind, failed.value.status_code) == ("server_error", 200)
    assert failed.value.message == (
        "provider sent an unexpected stream event: a content block started at index 1, "
        "which a tool_use block already has"
    )


async def test_a_streamed_answer_cut_by_max_tokens_finishes_with_length(make):
    _, ok = await stream(make, stream_events(stop_reason="max_tokens"))
    assert ok.finish_reason == "length"


async def test_a_streamed_text_answer_has_no_tool_calls(make):
    events = [e for e in stream_events(stop_reason="end_turn") if e.get("index", 0) == 0]
    deltas, ok = await stream(make, events)
    assert "".join(deltas) == "Okay, let's check the weather for San Francisco, CA:"
    assert (ok.tool_calls, ok.finish_reason) == (None, "stop")


async def test_a_tool_conversation_without_tools_declares_the_tools_it_used_and_calls_none(make):
    """The API refuses tool_use and tool_result blocks in a request without tools (OpenAI's
    takes it: a fallback's last turn often offers none). The history's tools are declared,
    taking any input, and tool_choice "none" keeps the answer text."""
    without_tools = msgspec.structs.replace(CONVERSATION, tools=None)
    server = Server()
    await make(server).complete(without_tools, timeout_s=5)
    sent = server.sent_json()
    assert sent["tools"] == [{"name": "get_weather", "input_schema": {"type": "object"}}]
    assert sent["tool_choice"] == {"type": "none"}
    assert sent["messages"] == CONVERSATION_BODY["messages"]


async def test_a_conversation_without_tool_calls_or_tools_declares_none(make):
    server = Server()
    await make(server).complete(request(tool_choice="required"), timeout_s=5)
    assert "tools" not in server.sent_json() and "tool_choice" not in server.sent_json()
