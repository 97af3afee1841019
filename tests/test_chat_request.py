"""The whole chat request over a real nats-server: tools, tool calls, images, stop and seed,
finish reasons, and the checks that make "the model did not do what was asked" fall back."""

from __future__ import annotations

import json
from typing import Any

import pytest
from helpers import ask, config, fake, settled

from schemas.wire import provider_request_decoder

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "when": {"type": "string", "format": "date"}},
        "required": ["city"],
    },
}
PARIS = {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def chat(text: str = "What is the weather in Paris?", **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **fields}


def route(*targets: Any, **settings: Any) -> dict[str, Any]:
    return {"default": {"targets": list(targets), **settings}}


def outcomes(reply: Any) -> list[tuple[str, str, str | None]]:
    return [(a.target, a.outcome, a.error_type or a.reason) for a in reply.attempts]


async def test_a_tool_call_comes_back_normalised_and_the_audit_names_only_the_tool(
    lifeline, client, audit
):
    await lifeline(config({"agent": fake(reply="", tool_calls=[PARIS])}))
    reply = await ask(client, chat(tools=[WEATHER]))
    assert reply.status == "ok"
    assert reply.finish_reason == "tool_calls" and reply.content == ""
    [call] = reply.tool_calls
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    [(_, event)] = await audit.wait_for(1)
    assert event.finish_reason == "tool_calls" and event.tools_called == ["get_weather"]
    assert b"Paris" not in audit.raw[0]  # never the arguments


async def test_the_audit_names_a_bounded_few_of_the_tools_an_answer_calls(lifeline, client, audit):
    """The names are the provider's text: 900 made-up names of 1,000 characters made one audit
    event of 906 KB, and 1,150 such requests pushed a week of history out of the stream."""
    names = [f"t{n:03d}" + "x" * 60 for n in range(100)]
    calls = [{"name": name, "arguments": "{}"} for name in names]
    await lifeline(config({"agent": fake(reply="", tool_calls=calls)}))
    reply = await ask(client, chat(tools=[{"name": name} for name in names]))
    assert reply.status == "ok" and len(reply.tool_calls) == 100  # the reply: whole
    [(_, event)] = await audit.wait_for(1)
    assert event.tools_called == names[:64]


async def test_tools_stop_and_seed_reach_the_provider_and_a_target_can_drop_or_set_them(
    lifeline, client
):
    # reply = "request": the fake answers with the ProviderRequest it got.
    providers = {"plain": fake(reply="request"), "shaped": fake(reply="request")}
    chain = route("plain")
    chain["shaped"] = {
        "targets": [{"provider": "shaped", "drop": ["seed", "tools"], "stop": ["END"]}]
    }
    await lifeline(config(providers, chain))
    asked = chat(tools=[WEATHER], tool_choice="auto", stop=["\n\n"], seed=7)
    sent = provider_request_decoder.decode((await ask(client, asked)).content)
    assert [t.name for t in sent.tools] == ["get_weather"]
    assert (sent.tool_choice, sent.stop, sent.seed) == ("auto", ["\n\n"], 7)
    sent = provider_request_decoder.decode(
        (await ask(client, {**asked, "route": "shaped"})).content
    )
    assert (sent.tools, sent.tool_choice, sent.seed, sent.stop) == (None, None, None, ["END"])


# ---- capability checks: skipped, never called ------------------------------------------------


async def test_a_target_without_tools_is_skipped_for_a_request_with_tools(lifeline, client):
    providers = {"textonly": fake(), "agent": fake(tool_calls=[PARIS])}
    await lifeline(config(providers, route({"provider": "textonly", "tools": False}, "agent")))
    reply = await ask(client, chat(tools=[WEATHER]))
    assert outcomes(reply) == [("textonly", "skipped", "tools"), ("agent", "ok", None)]
    reply = await ask(client, chat())  # without tools it is called
    assert outcomes(reply) == [("textonly", "ok", None)]


@pytest.mark.parametrize("choice", ["required", {"name": "get_weather"}], ids=["required", "named"])
async def test_a_target_that_drops_tools_is_skipped_for_a_request_that_must_call_one(
    lifeline, client, choice
):
    """drop = ["tools"] sends a target no tools, so it cannot call the one the request
    requires: it was called (and paid) anyway, its answer sure to fail as invalid_output."""
    providers = {"textonly": fake(), "agent": fake(tool_calls=[PARIS])}
    dropping = {"provider": "textonly", "drop": ["tools"]}
    await lifeline(config(providers, route(dropping, "agent")))
    reply = await ask(client, chat(tools=[WEATHER], tool_choice=choice))
    assert outcomes(reply) == [("textonly", "skipped", "tools"), ("agent", "ok", None)]
    assert "tool call" in reply.attempts[0].message
    reply = await ask(client, chat(tools=[WEATHER], tool_choice="auto"))  # it may answer in text
    assert outcomes(reply) == [("textonly", "ok", None)]


async def test_a_target_without_vision_is_skipped_for_a_request_with_an_image(lifeline, client):
    providers = {"blind": fake(), "seeing": fake(reply="a cat")}
    await lifeline(config(providers, route({"provider": "blind", "vision": False}, "seeing")))
    image = {"type": "image", "url": "https://example.com/cat.png"}
    asked = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What?"}, image]}]}
    reply = await ask(client, asked)
    assert outcomes(reply) == [("blind", "skipped", "vision"), ("seeing", "ok", None)]


async def test_images_count_towards_max_input_tokens(lifeline, client):
    providers = {"small": fake(), "large": fake(reply="big enough")}
    await lifeline(
        config(providers, route({"provider": "small", "max_input_tokens": 500}, "large"))
    )
    image = {"type": "image", "data": "iVBORw0KGgo=", "media_type": "image/png"}
    reply = await ask(client, {"messages": [{"role": "user", "content": [image]}]})
    assert outcomes(reply) == [("small", "skipped", "max_input_tokens"), ("large", "ok", None)]


async def test_a_low_detail_image_counts_what_openai_charges_for_it(lifeline, client):
    """OpenAI charges a fixed 85 tokens for an image in low detail: five of them fit a target
    of 500 input tokens, which five of any other detail do not."""
    providers = {"small": fake(reply="low is enough"), "large": fake(reply="big enough")}
    await lifeline(
        config(providers, route({"provider": "small", "max_input_tokens": 500}, "large"))
    )
    image = {"type": "image", "url": "https://example.com/cat.png"}
    for detail, answered in [("low", "small"), ("high", "large"), (None, "large")]:
        part = image if detail is None else {**image, "detail": detail}
        reply = await ask(client, {"messages": [{"role": "user", "content": [part] * 5}]})
        assert reply.provider == answered, detail


# ---- output checks: invalid_output, and the next target answers -----------------------------


@pytest.mark.parametrize(
    "weak, asked, why",
    [
        (fake(reply="prose instead"), {"tool_choice": "required"}, "calls no tool"),
        (
            fake(tool_calls=[{"name": "get_time", "arguments": "{}"}]),
            {"tool_choice": {"name": "get_weather"}},
            "calls another tool",
        ),
        (
            fake(tool_calls=[{"name": "get_weather", "arguments": '{"city": '}]),
            {},
            "not valid JSON",
        ),
        (
            fake(tool_calls=[{"name": "get_weather", "arguments": '{"town": "Paris"}'}]),
            {},
            "fail its parameters: at the top level, required",
        ),
        (
            fake(tool_calls=[{"name": "get_weather", "arguments": '{"city": "P", "when": "Fri"}'}]),
            {},
            'at schema properties/when, format "date" fails',
        ),
    ],
    ids=["required", "named", "arguments-json", "arguments-schema", "arguments-format"],
)
async def test_a_tool_call_that_is_not_what_was_asked_falls_back(
    lifeline, client, weak, asked, why
):
    tools = [WEATHER, {"name": "get_time", "parameters": {"type": "object"}}]
    await lifeline(config({"weak": weak, "strong": fake(reply="", tool_calls=[PARIS])}))
    reply = await ask(client, chat(tools=tools, **asked))
    assert outcomes(reply) == [("weak", "error", "invalid_output"), ("strong", "ok", None)]
    assert why in reply.attempts[0].message
    assert "Fri" not in reply.attempts[0].message  # said from the schema's side, never quoted
    assert reply.tool_calls[0].name == "get_weather"


async def test_a_tool_call_against_tool_choice_none_falls_back(lifeline, client):
    """tool_choice "none" asks for an answer in words; a server that ignores it (several
    OpenAI-compatible ones do) answered with a call, passed on as the answer."""
    providers = {"weak": fake(tool_calls=[PARIS]), "strong": fake(reply="Sunny, 21 C.")}
    await lifeline(config(providers))
    reply = await ask(client, chat(tools=[WEATHER], tool_choice="none"))
    assert outcomes(reply) == [("weak", "error", "invalid_output"), ("strong", "ok", None)]
    assert "tool_choice none" in reply.attempts[0].message
    assert reply.content == "Sunny, 21 C." and reply.tool_calls is None


async def test_a_target_that_drops_response_format_is_still_held_to_it(lifeline, client):
    """drop sends the target no response_format; the answer is checked as for any other."""
    providers = {"plain": fake(reply="Sunny."), "strict": fake(reply='{"sky": "sunny"}')}
    dropping = {"provider": "plain", "drop": ["response_format"]}
    await lifeline(config(providers, route(dropping, "strict")))
    reply = await ask(client, chat(response_format={"type": "json_object"}))
    assert outcomes(reply) == [("plain", "error", "invalid_output"), ("strict", "ok", None)]


async def test_fail_on_length_treats_a_truncated_answer_as_a_failure(lifeline, client):
    providers = {"cut": fake(reply="Once upon a", finish_reason="length"), "whole": fake()}
    await lifeline(config(providers))
    reply = await ask(client, chat("hi"))  # without the flag a cut answer is an answer
    assert (reply.provider, reply.finish_reason) == ("cut", "length")
    reply = await ask(client, chat("hi", fail_on_length=True))
    assert outcomes(reply) == [("cut", "error", "invalid_output"), ("whole", "ok", None)]
    assert "max_tokens" in reply.attempts[0].message


# LangChain's "better model when parsing fails" example parses a datetime.
DATE_SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "when",
        "schema": {
            "type": "object",
            "properties": {"at": {"type": "string", "format": "date-time"}},
            "required": ["at"],
        },
    },
}


@pytest.mark.parametrize(
    "response_format, weak, good",
    [
        (
            {"type": "regex", "pattern": r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z"},
            "It happened on the 4th of July",
            "1776-07-04T12:00:00Z",
        ),
        (DATE_SCHEMA, '{"at": "the 4th of July"}', '{"at": "1776-07-04T12:00:00Z"}'),
    ],
    ids=["regex", "date-time"],
)
async def test_a_datetime_answer_that_does_not_parse_falls_back_to_a_better_model(
    lifeline, client, response_format, weak, good
):
    await lifeline(config({"cheap": fake(reply=weak), "better": fake(reply=good)}))
    reply = await ask(client, chat("When was it?", response_format=response_format))
    assert outcomes(reply) == [("cheap", "error", "invalid_output"), ("better", "ok", None)]
    assert reply.content == good
    assert "July" not in reply.attempts[0].message


@pytest.mark.parametrize(
    "fields, why",
    [
        ({"tool_choice": "required"}, "no tools"),
        ({"tools": [WEATHER], "tool_choice": {"name": "nope"}}, "not one of the request's tools"),
        ({"tools": [{"name": "bad", "parameters": {"type": 12}}]}, "tools[0].parameters"),
        ({"response_format": {"type": "regex", "pattern": "("}}, "not a regular expression"),
        ({"response_format": {"type": "regex"}}, "needs a pattern"),
        ({"messages": [{"role": "tool", "content": "42"}]}, "tool_call_id"),
        ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "exactly one of"),
    ],
)
async def test_an_unusable_tool_or_check_is_refused_before_any_call(lifeline, client, fields, why):
    stack = await lifeline(config({"main": fake()}))
    reply = await ask(client, {**chat(), **fields})
    assert reply.status == "error" and reply.error.type == "invalid_request"
    assert why in reply.error.message and reply.attempts == []
    await settled(client, stack)


CALL = {"id": "call_1", **PARIS}


@pytest.mark.parametrize(
    "messages",
    [
        [
            {"role": "user", "content": "hi"},
            {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        ],
        [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 °C"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
        ],
        [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_2", "content": "18 °C"},
        ],
    ],
)
async def test_a_tool_result_answering_no_earlier_call_is_refused_naming_it(
    lifeline, client, audit, messages
):
    """It went to every target, each refused it with a 400 and the client got all_failed,
    with nothing saying which message was wrong."""
    stack = await lifeline(config({"main": fake(), "backup": fake()}))
    reply = await ask(client, {"messages": messages})
    assert (reply.status, reply.error.type, reply.attempts) == ("error", "invalid_request", [])
    wrong = next(i for i, m in enumerate(messages) if m["role"] == "tool")
    assert f"$.messages[{wrong}].tool_call_id" in reply.error.message
    [(_, event)] = await audit.wait_for(1)
    assert event.error_type == "invalid_request"
    await settled(client, stack)


async def test_a_tool_result_answering_an_earlier_call_is_sent_on(lifeline, client):
    await lifeline(config({"main": fake(reply="18 °C and sunny")}))
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 °C"},
    ]
    reply = await ask(client, {"messages": messages})
    assert (reply.status, reply.content) == ("ok", "18 °C and sunny")


@pytest.mark.parametrize("choice", ["auto", "required"])
async def test_a_json_request_answered_by_a_tool_call_with_a_sentence_before_it_is_kept(
    lifeline, client, choice
):
    """Claude says what it will do before it calls a tool: with response_format json_object
    too, the sentence was judged as the JSON answer and a good tool call failed as
    invalid_output. A call is judged by the tool checks, whatever text comes with it."""
    say = "I'll look up the weather in Paris."
    await lifeline(config({"agent": fake(reply=say, tool_calls=[PARIS])}))
    reply = await ask(
        client,
        chat(tools=[WEATHER], tool_choice=choice, response_format={"type": "json_object"}),
    )
    assert (reply.status, reply.content, reply.finish_reason) == ("ok", say, "tool_calls")
