"""The whole chat request through the openai kind (and Azure OpenAI, which shares its body and
parsers), both ways: image parts, tools, tool calls and their results, finish_reason and the
usage details, against OpenAI's documented Chat Completions bodies and chunks.

    https://platform.openai.com/docs/api-reference/chat/create
    https://platform.openai.com/docs/api-reference/chat/object
    https://platform.openai.com/docs/api-reference/chat-streaming
    https://platform.openai.com/docs/guides/function-calling
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import msgspec
import pytest
from helpers import MockServer, expect_failure, provider_fixture

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
from workers.azure_openai import AzureOpenAIProvider, AzureOpenAISettings
from workers.base import ProviderError
from workers.openai import OpenAIProvider, OpenAISettings

KEY = "sk-proj-shape-0123456789abcdef"
MODEL = "gpt-4o-2024-08-06"
IMAGE_URL = "https://upload.wikimedia.org/wikipedia/commons/d/dd/Gfp-wisconsin-madison.jpg"
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5E"

MADISON = ToolCall("call_abc123", "get_weather", '{"location": "Madison, WI", "unit": "c"}')
PARIS = ToolCall("call_def456", "get_weather", '{"location": "Paris, France", "unit": "c"}')

# A multi-turn tool conversation, in Lifeline's messages ...
CONVERSATION = [
    ChatMessage("system", "You are a helpful assistant."),
    ChatMessage("developer", "Answer in metric units."),
    ChatMessage(
        "user",
        [
            TextPart("What is the weather where these were taken?"),
            ImagePart(url=IMAGE_URL),
            ImagePart(data=PNG, media_type="image/png"),
        ],
    ),
    ChatMessage("assistant", None, tool_calls=[MADISON, PARIS]),
    ChatMessage("tool", "18 C, sunny", tool_call_id="call_abc123"),
    ChatMessage("tool", [TextPart("12 C, "), TextPart("light rain")], tool_call_id="call_def456"),
    ChatMessage("user", "And tomorrow?"),
]
# ... and as OpenAI documents them.
CONVERSATION_SENT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "system", "content": "Answer in metric units."},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is the weather where these were taken?"},
            {"type": "image_url", "image_url": {"url": IMAGE_URL}},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        ],
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_abc123",
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "arguments": '{"location": "Madison, WI", "unit": "c"}',
                },
            },
            {
                "id": "call_def456",
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "arguments": '{"location": "Paris, France", "unit": "c"}',
                },
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_abc123", "content": "18 C, sunny"},
    {"role": "tool", "tool_call_id": "call_def456", "content": "12 C, light rain"},
    {"role": "user", "content": "And tomorrow?"},
]

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. Boston, MA"},
        "unit": {"type": "string", "enum": ["c", "f"]},
    },
    "required": ["location"],
    "additionalProperties": False,
}
TOOLS = [
    Tool("get_weather", "Get the current weather in a given location", WEATHER_PARAMETERS),
    Tool("get_time"),  # no description, no parameters
]
TOOLS_SENT = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a given location",
            "parameters": WEATHER_PARAMETERS,
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    },
]


def completion(message: dict[str, Any], finish_reason: str, **usage: Any) -> dict[str, Any]:
    """A chat.completion as OpenAI documents it, answering `message`."""
    return {
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
        "object": "chat.completion",
        "created": 1741569952,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "refusal": None, "annotations": [], **message},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": {"prompt_tokens": 82, "completion_tokens": 17, "total_tokens": 99, **usage},
        "service_tier": "default",
        "system_fingerprint": "fp_06737a9306",
    }


def sent_call(call: ToolCall) -> dict[str, Any]:
    function = {"name": call.name, "arguments": call.arguments}
    return {"id": call.id, "type": "function", "function": function}


TOOL_CALLS_ANSWER = completion(
    {"content": None, "tool_calls": [sent_call(MADISON), sent_call(PARIS)]}, "tool_calls"
)


class Server(MockServer):
    default_body = completion({"content": "Tomorrow: 20 C in Madison, 14 C in Paris."}, "stop")


make = provider_fixture(
    lambda client, **settings: OpenAIProvider(
        msgspec.convert({"kind": "openai", "model": "gpt-4o", **settings}, OpenAISettings),
        client,
        environ={"OPENAI_API_KEY": KEY},
    )
)
make_azure = provider_fixture(
    lambda client: AzureOpenAIProvider(
        msgspec.convert(
            {
                "kind": "azure_openai",
                "endpoint": "https://myres.openai.azure.com",
                "deployment": "gpt4o-prod",
            },
            AzureOpenAISettings,
        ),
        client,
        environ={"AZURE_OPENAI_API_KEY": KEY},
    )
)


def request(messages: list[ChatMessage] | None = None, **fields: Any) -> ProviderRequest:
    return ProviderRequest(id="r1", messages=messages or [ChatMessage("user", "Hi")], **fields)


async def sent(make: Any, **fields: Any) -> dict[str, Any]:
    """The body the provider posts for a request with `fields`."""
    server = Server()
    await make(server).complete(request(**fields), timeout_s=5)
    return server.sent_json()


# ---- the request ----------------------------------------------------------------------


async def test_a_multi_turn_tool_conversation_is_sent_as_openai_documents_it(make):
    body = await sent(make, messages=CONVERSATION, tools=TOOLS)
    assert body == {"model": "gpt-4o", "messages": CONVERSATION_SENT, "tools": TOOLS_SENT}


async def test_images_a_tool_returned_follow_its_results_as_a_user_message(make):
    """OpenAI's tool messages take text only: a screenshot a tool returned was dropped without
    a word, and the model answered about an image it never saw. The images of a run of tool
    results follow it in a user message, in order (a message between tool results would part
    them from the calls they answer, which OpenAI refuses)."""
    shot = ImagePart(data=PNG, media_type="image/png")
    chat = [
        ChatMessage("user", "Open both pages"),
        ChatMessage("assistant", None, tool_calls=[MADISON, PARIS]),
        ChatMessage("tool", [TextPart("page 1"), shot], tool_call_id="call_abc123"),
        ChatMessage("tool", [ImagePart(url=IMAGE_URL)], tool_call_id="call_def456"),
        ChatMessage("user", "Which is brighter?"),
    ]
    body = await sent(make, messages=chat)
    assert body["messages"][2:] == [
        {"role": "tool", "tool_call_id": "call_abc123", "content": "page 1"},
        {"role": "tool", "tool_call_id": "call_def456", "content": ""},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                {"type": "image_url", "image_url": {"url": IMAGE_URL}},
            ],
        },
        {"role": "user", "content": "Which is brighter?"},
    ]


@pytest.mark.parametrize("role", ["assistant", "system", "developer"])
async def test_images_in_a_message_openai_takes_none_in_follow_it_as_a_user_message(make, role):
    """OpenAI takes images in user messages only ("Image URLs are only allowed for messages
    with role 'user'"): an image an assistant drew, echoed back in the history, made every
    call to an OpenAI target a 400, though Claude reads it. Its text stays in the message, and
    its images follow it as a user message."""
    drawn = ImagePart(url=IMAGE_URL)
    chat = [
        ChatMessage("user", "Draw a cat"),
        ChatMessage(role, [TextPart("Here it is:"), drawn]),  # type: ignore[arg-type]
        ChatMessage("user", "Describe it"),
    ]
    body = await sent(make, messages=chat)
    assert body["messages"][1:] == [
        {
            "role": "system" if role == "developer" else role,
            "content": [{"type": "text", "text": "Here it is:"}],
        },
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE_URL}}]},
        {"role": "user", "content": "Describe it"},
    ]


async def test_an_images_detail_reaches_openai(make):
    """OpenAI's image_url.detail ("low": 85 tokens an image, not up to some 1,100 in high
    detail) was dropped, and every image was read, and billed, at the model's default."""
    low, plain = ImagePart(url=IMAGE_URL, detail="low"), ImagePart(data=PNG, media_type="image/png")
    body = await sent(make, messages=[ChatMessage("user", [low, plain])])
    assert body["messages"][0]["content"] == [
        {"type": "image_url", "image_url": {"url": IMAGE_URL, "detail": "low"}},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
    ]


async def test_the_streamed_request_carries_the_same_messages_and_tools(make):
    server = events_server(text_chunks(["Sunny."]))
    await answer_of(make(server).stream(request(CONVERSATION, tools=TOOLS), timeout_s=5))
    body = server.sent_json()
    assert (body["messages"], body["tools"]) == (CONVERSATION_SENT, TOOLS_SENT)
    assert body["stream"] is True


@pytest.mark.parametrize(
    ("choice", "choice_sent"),
    [
        ("auto", "auto"),
        ("none", "none"),
        ("required", "required"),
        (NamedTool("get_weather"), {"type": "function", "function": {"name": "get_weather"}}),
    ],
    ids=["auto", "none", "required", "named"],
)
async def test_tool_choice_is_sent_in_each_of_its_forms(make, choice, choice_sent):
    body = await sent(make, tools=TOOLS, tool_choice=choice)
    assert body["tool_choice"] == choice_sent


async def test_parallel_tool_calls_stop_and_seed_are_sent_when_set(make):
    body = await sent(make, tools=TOOLS, parallel_tool_calls=False, stop=["\n\n", "END"], seed=42)
    assert body["parallel_tool_calls"] is False
    assert body["stop"] == ["\n\n", "END"]
    assert body["seed"] == 42


@pytest.mark.parametrize("which", ["openai", "azure"])
async def test_more_stop_sequences_than_openai_takes_fail_before_the_call(make, make_azure, which):
    """OpenAI and Azure take up to 4 stop sequences (a 400 past them): a fifth is the
    request's fault, named, without a call (the next target may take them)."""
    server = Server()
    provider = (make if which == "openai" else make_azure)(server)
    failure = await expect_failure(provider, request(stop=["a", "b", "c", "d", "e"]))
    assert failure.kind == "bad_request"
    assert "5 stop sequences" in failure.message and "at most 4" in failure.message
    assert server.requests == []


async def test_an_openai_compatible_server_gets_more_than_4_stop_sequences(make):
    """vLLM and llama.cpp's servers take any number: the limit is OpenAI's own."""
    server = Server()
    await make(server, base_url="http://localhost:8000/v1").complete(
        request(stop=["a", "b", "c", "d", "e"]), timeout_s=5
    )
    assert server.sent_json()["stop"] == ["a", "b", "c", "d", "e"]


async def test_unset_tool_options_stop_and_seed_are_left_out(make):
    body = await sent(make)
    assert body == {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}


async def test_without_tools_tool_choice_and_parallel_tool_calls_are_left_out(make):
    # OpenAI answers either without tools with a 400 ("only allowed when 'tools' are specified").
    for tools in (None, []):
        body = await sent(make, tools=tools, tool_choice="none", parallel_tool_calls=True)
        assert not {"tools", "tool_choice", "parallel_tool_calls"} & body.keys()


async def test_a_regex_response_format_is_lifelines_own_check_and_not_sent(make):
    body = await sent(make, response_format=ResponseFormat("regex", pattern=r"\d+ C"))
    assert "response_format" not in body


async def test_json_object_without_the_word_json_in_the_messages_asks_for_it(make):
    """OpenAI refuses json_object unless a message says "JSON" (400 "'messages' must contain
    the word 'json' in some form"), and documents that a model not told may write whitespace
    until max_tokens: `lifeline ask --json-output "List three colours"` failed on every OpenAI
    and Azure target. A system message asking for it follows the client's own."""
    chat = [ChatMessage("system", "Be brief."), ChatMessage("user", "List three colours")]
    body = await sent(make, messages=chat, response_format=ResponseFormat("json_object"))
    assert [m["role"] for m in body["messages"]] == ["system", "system", "user"]
    assert "JSON" in body["messages"][1]["content"]
    said = [ChatMessage("user", "List three colours, as json")]
    body = await sent(make, messages=said, response_format=ResponseFormat("json_object"))
    assert body["messages"] == [{"role": "user", "content": "List three colours, as json"}]


async def test_a_json_schema_response_format_is_still_sent(make):
    schema = JsonSchemaFormat("weather", {"type": "object"}, strict=True)
    body = await sent(make, response_format=ResponseFormat("json_schema", json_schema=schema))
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "weather", "schema": {"type": "object"}, "strict": True},
    }


# ---- the answer -----------------------------------------------------------------------


async def test_an_answer_calling_tools_with_null_content_is_an_answer(make):
    ok = await make(Server(body=TOOL_CALLS_ANSWER)).complete(request(tools=TOOLS), timeout_s=5)
    assert ok == ProviderOk(
        content="",
        model=MODEL,
        usage=Usage(input_tokens=82, output_tokens=17),
        tool_calls=[MADISON, PARIS],  # the arguments exactly as sent
        finish_reason="tool_calls",
    )


async def test_a_parameterless_tool_called_with_empty_arguments_gets_an_empty_object(make):
    """Compatible servers call a parameterless tool with "arguments": "", which stayed "" and
    failed the tool check as invalid_output once paid for; streamed, it was already "{}"."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": ""}}
    body = completion({"content": None, "tool_calls": [call]}, "tool_calls")
    ok = await make(Server(body=body)).complete(request(tools=[Tool("get_time")]), timeout_s=5)
    assert ok.tool_calls == [ToolCall("call_1", "get_time", "{}")]


async def test_an_answer_with_neither_content_nor_tool_calls_is_still_a_server_error(make):
    for message in ({"content": None}, {"content": None, "tool_calls": []}):
        server = Server(body=completion(message, "stop"))
        error = await expect_failure(make(server), request())
        assert (error.kind, error.status_code) == ("server_error", 200)
        assert "neither content nor tool_calls" in error.message


async def test_a_forced_tool_call_that_says_stop_reads_as_tool_calls(make):
    # OpenAI ends an answer to a tool_choice naming a function with "stop", though it calls it.
    body = completion({"content": None, "tool_calls": [sent_call(MADISON)]}, "stop")
    choice = NamedTool("get_weather")
    ok = await make(Server(body=body)).complete(request(tool_choice=choice), timeout_s=5)
    assert (ok.tool_calls, ok.finish_reason) == ([MADISON], "tool_calls")


@pytest.mark.parametrize(
    ("reason", "normalised"),
    [("stop", "stop"), ("length", "length"), ("function_call", "tool_calls"), ("abort", None)],
)
async def test_finish_reason_is_normalised(make, reason, normalised):
    body = completion({"content": "Tomorrow: 20 C in Madi"}, reason)
    ok = await make(Server(body=body)).complete(request(max_tokens=8), timeout_s=5)
    assert (ok.content, ok.finish_reason) == ("Tomorrow: 20 C in Madi", normalised)
    assert ok.tool_calls is None


async def test_a_content_filter_finish_reason_is_still_a_content_filter_failure(make):
    body = completion({"content": None, "tool_calls": [sent_call(MADISON)]}, "content_filter")
    error = await expect_failure(make(Server(body=body)), request())
    assert (error.kind, error.status_code) == ("content_filter", 200)


async def test_cached_and_reasoning_tokens_are_read_from_the_usage_details(make):
    details = {
        "prompt_tokens_details": {"cached_tokens": 64, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 12,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    body = completion({"content": "20 C."}, "stop", **details)
    ok = await make(Server(body=body)).complete(request(), timeout_s=5)
    assert ok.usage == Usage(
        input_tokens=82, output_tokens=17, cached_input_tokens=64, reasoning_tokens=12
    )


async def test_usage_without_details_or_with_null_ones_counts_none(make):
    for details in ({}, {"prompt_tokens_details": None, "completion_tokens_details": None}):
        body = completion({"content": "20 C."}, "stop", **details)
        ok = await make(Server(body=body)).complete(request(), timeout_s=5)
        assert ok.usage == Usage(input_tokens=82, output_tokens=17)


# ---- streamed -------------------------------------------------------------------------


def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    """A chat.completion.chunk as OpenAI documents it."""
    return {
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion.chunk",
        "created": 1741570283,
        "model": MODEL,
        "system_fingerprint": "fp_06737a9306",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        "usage": None,
    }


def usage_chunk(**details: Any) -> dict[str, Any]:
    usage = {"prompt_tokens": 82, "completion_tokens": 17, "total_tokens": 99, **details}
    return {**chunk({}), "choices": [], "usage": usage}


def first_delta(index: int, call: ToolCall) -> dict[str, Any]:
    """A call's first delta: its id, type and name, and no arguments yet."""
    function = {"name": call.name, "arguments": ""}
    return {"index": index, "id": call.id, "type": "function", "function": function}


def arguments_delta(index: int, piece: str) -> dict[str, Any]:
    """A later delta of a call: only a piece of its arguments (id, type and name null)."""
    function = {"name": None, "arguments": piece}
    return {"index": index, "id": None, "type": None, "function": function}


def text_chunks(texts: list[str]) -> list[dict[str, Any]]:
    return [
        chunk({"role": "assistant", "content": "", "refusal": None}),
        *(chunk({"content": text}) for text in texts),
        chunk({}, "stop"),
        usage_chunk(),
    ]


def events_server(chunks: list[dict[str, Any]]) -> Server:
    """A server answering with `chunks` as server-sent events, then data: [DONE]."""
    events = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    return Server(body=events, headers={"content-type": "text/event-stream"})


async def answer_of(
    stream: Any, tool_deltas: list[ToolCallDelta] | None = None
) -> tuple[list[str], ProviderOk]:
    """A stream's text deltas and its final ProviderOk; its tool-call deltas, streamed on as
    they come, go to `tool_deltas`."""
    *deltas, last = [item async for item in stream]
    assert isinstance(last, ProviderOk), last
    if tool_deltas is not None:
        tool_deltas += [d for d in deltas if isinstance(d, ToolCallDelta)]
    return [d for d in deltas if isinstance(d, str)], last


def pieces(text: str, *cuts: int) -> list[str]:
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


async def test_streamed_parallel_tool_calls_are_put_together_from_their_deltas(make):
    madison = pieces(MADISON.arguments, 1, 3, 17, 18, 30)  # '{', '"l', 'ocation": "Mad', 'i', ...
    paris = pieces(PARIS.arguments, 2, 9, 25)
    chunks = [
        chunk({"role": "assistant", "content": None, "refusal": None}),
        chunk({"content": "Let me check both."}),
        chunk({"tool_calls": [first_delta(0, MADISON)]}),
        *(chunk({"tool_calls": [arguments_delta(0, piece)]}) for piece in madison),
        chunk({"tool_calls": [first_delta(1, PARIS)]}),
        *(chunk({"tool_calls": [arguments_delta(1, piece)]}) for piece in paris),
        chunk({}, "tool_calls"),
        usage_chunk(
            prompt_tokens_details={"cached_tokens": 64, "audio_tokens": 0},
            completion_tokens_details={"reasoning_tokens": 0, "audio_tokens": 0},
        ),
    ]
    stream = make(events_server(chunks)).stream(request(CONVERSATION, tools=TOOLS), timeout_s=5)
    calls: list[ToolCallDelta] = []
    deltas, ok = await answer_of(stream, calls)
    assert deltas == ["Let me check both."]
    # Streamed on as they came: the first piece of each call names it, the rest add arguments.
    assert [(d.index, d.id, d.name) for d in calls if d.name] == [
        (0, MADISON.id, "get_weather"),
        (1, PARIS.id, "get_weather"),
    ]
    assert "".join(d.arguments for d in calls if d.index == 1) == PARIS.arguments
    assert ok == ProviderOk(
        content="",
        model=MODEL,
        usage=Usage(input_tokens=82, output_tokens=17, cached_input_tokens=64),
        tool_calls=[MADISON, PARIS],
        finish_reason="tool_calls",
    )


async def test_interleaved_call_deltas_are_kept_apart_in_the_order_they_begin(make):
    chunks = [
        chunk({"tool_calls": [first_delta(0, MADISON), first_delta(1, PARIS)]}),
        *(
            chunk({"tool_calls": [arguments_delta(1, p), arguments_delta(0, m)]})
            for p, m in zip(pieces(PARIS.arguments, 5), pieces(MADISON.arguments, 11), strict=True)
        ),
        chunk({}, "tool_calls"),
        usage_chunk(),
    ]
    _, ok = await answer_of(make(events_server(chunks)).stream(request(), timeout_s=5))
    assert ok.tool_calls == [MADISON, PARIS]


async def test_streamed_calls_are_numbered_as_they_begin_and_named_once(make):
    """A compatible server that skips an index (0, 2) and repeats each call's id and name in
    every delta: streamed on as 0, 1, with id and name once, so that the pieces join to the
    end's calls (the SDKs' stream helpers raised IndexError, or doubled the names)."""
    chunks = [
        chunk({"tool_calls": [first_delta(index, call)]})
        for index, call in ((0, MADISON), (2, PARIS))
    ]
    for index, call in ((0, MADISON), (2, PARIS)):
        for piece in pieces(call.arguments, 7):
            chunks.append(
                chunk(
                    {
                        "tool_calls": [
                            {
                                **first_delta(index, call),
                                "function": {"name": call.name, "arguments": piece},
                            }
                        ]
                    }
                )
            )
    chunks += [chunk({}, "tool_calls"), usage_chunk()]
    calls: list[ToolCallDelta] = []
    _, ok = await answer_of(make(events_server(chunks)).stream(request(), timeout_s=5), calls)
    assert ok.tool_calls == [MADISON, PARIS]
    assert [(d.index, d.id, d.name) for d in calls if d.id or d.name] == [
        (0, MADISON.id, MADISON.name),
        (1, PARIS.id, PARIS.name),
    ]
    for n, call in enumerate(ok.tool_calls):
        assert "".join(d.arguments for d in calls if d.index == n) == call.arguments


async def test_streamed_calls_without_an_index_are_told_apart_by_their_ids(make):
    # Gemini's OpenAI-compatible endpoint: each call whole in one delta, no index, and "stop".
    chunks = [
        chunk({"role": "assistant", "tool_calls": [{**sent_call(c), "index": None}]})
        for c in (MADISON, PARIS)
    ]
    chunks += [chunk({}, "stop"), usage_chunk()]
    _, ok = await answer_of(make(events_server(chunks)).stream(request(), timeout_s=5))
    assert (ok.tool_calls, ok.finish_reason) == ([MADISON, PARIS], "tool_calls")


async def test_parallel_calls_all_numbered_0_are_told_apart_by_their_ids(make):
    """Ollama, SGLang and others stream every parallel call at index 0, each with its own id:
    merged, two calls became one with the first's id and both arguments, not JSON, and a
    healthy provider's answer failed as invalid_output."""
    chunks = []
    for call in (MADISON, PARIS):
        chunks.append(chunk({"tool_calls": [first_delta(0, call)]}))
        chunks += [
            chunk({"tool_calls": [arguments_delta(0, p)]}) for p in pieces(call.arguments, 6)
        ]
    chunks += [chunk({}, "tool_calls"), usage_chunk()]
    calls: list[ToolCallDelta] = []
    _, ok = await answer_of(make(events_server(chunks)).stream(request(), timeout_s=5), calls)
    assert ok.tool_calls == [MADISON, PARIS]
    assert [(d.index, d.id) for d in calls if d.id] == [(0, MADISON.id), (1, PARIS.id)]
    for n, call in enumerate(ok.tool_calls):
        assert "".join(d.arguments for d in calls if d.index == n) == call.arguments


async def test_thousands_of_streamed_calls_without_an_index_are_kept_in_order(make):
    """Each new call's index follows the highest so far, kept as the calls come (taking the
    maximum of all of them per call made 40,000 calls cost the worker 10 s)."""
    many = [ToolCall(f"call_{n}", "get_weather", "{}") for n in range(5_000)]
    chunks = [chunk({"tool_calls": [{**sent_call(c), "index": None}]}) for c in many]
    chunks += [chunk({}, "stop"), usage_chunk()]
    _, ok = await answer_of(make(events_server(chunks)).stream(request(), timeout_s=30))
    assert ok.tool_calls == many


async def test_a_streamed_text_answer_has_no_tool_calls_and_its_finish_reason(make):
    chunks = text_chunks(["Tomorrow: ", "20 C."])
    chunks[-2] = chunk({}, "length")
    deltas, ok = await answer_of(make(events_server(chunks)).stream(request(), timeout_s=5))
    assert deltas == ["Tomorrow: ", "20 C."]
    assert (ok.tool_calls, ok.finish_reason) == (None, "length")


async def test_a_streamed_call_that_never_names_its_function_is_a_server_error(make):
    chunks = [chunk({"tool_calls": [arguments_delta(0, "{}")]}), chunk({}, "tool_calls")]
    with pytest.raises(ProviderError) as caught:
        await answer_of(make(events_server(chunks)).stream(request(), timeout_s=5))
    assert (caught.value.kind, caught.value.status_code) == ("server_error", 200)


async def test_streamed_calls_a_server_gave_no_id_get_ids_of_their_own(make):
    """As a whole answer's: a call without an id could not be answered by the client. The id
    goes with the call's first piece, as the wire says, so a client reading the pieces (the
    gateway's OpenAI SDK clients) has it too, the same as the end's."""
    chunks = [
        chunk({"tool_calls": [first_delta(0, ToolCall("", "get_weather"))]}),
        chunk({"tool_calls": [arguments_delta(0, "{}")]}),
        chunk({"tool_calls": [first_delta(1, ToolCall("", "get_time"))]}),
        chunk({}, "tool_calls"),
    ]
    streamed: list[ToolCallDelta] = []
    _, ok = await answer_of(make(events_server(chunks)).stream(request(), timeout_s=5), streamed)
    ids = [call.id for call in ok.tool_calls or []]
    assert len(ids) == 2 and len(set(ids)) == 2
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)
    assert [d.id for d in streamed if d.name] == ids


# ---- Azure OpenAI ---------------------------------------------------------------------


async def test_azure_sends_the_same_messages_and_tools(make_azure):
    server = Server()
    choice = NamedTool("get_weather")
    await make_azure(server).complete(
        request(CONVERSATION, tools=TOOLS, tool_choice=choice), timeout_s=5
    )
    body = server.sent_json()
    assert body["messages"] == CONVERSATION_SENT
    assert body["tools"] == TOOLS_SENT
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
