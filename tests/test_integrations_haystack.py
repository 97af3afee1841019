"""The Haystack chat generator (service/integrations/haystack.py) in a small Pipeline over a
real nats-server and stack: a prompt builder into the generator, streamed with a reset, tools,
run_async, and an error reply raised.

Pipeline.run is sync: it runs in a thread (asyncio.to_thread), as the stack under test runs on
this test's event loop."""

from __future__ import annotations

import asyncio
import json
import os

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")  # before haystack is imported

import pytest
from haystack import Pipeline
from haystack.components.builders import ChatPromptBuilder
from haystack.dataclasses import ChatMessage, StreamingChunk, ToolCall
from haystack.tools import Tool
from helpers import config, fake

from service.integrations.haystack import LifelineChatGenerator, ReplyError, RequestRefused

STORY = "Once upon a time, a lighthouse keeper kept the light burning."


def get_weather(city: str) -> str:
    return f"sunny in {city}"


weather = Tool(
    name="get_weather",
    description="The weather in a city.",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}},
    function=get_weather,
)


@pytest.fixture
async def generator(nats_url: str):
    llm = LifelineChatGenerator(nats_url=nats_url, timeout=5)
    yield llm
    await asyncio.to_thread(llm.close)


def pipeline_with(generator: LifelineChatGenerator) -> Pipeline:
    pipe = Pipeline()
    template = [ChatMessage.from_user("Tell me about {{ topic }}")]
    pipe.add_component("prompt", ChatPromptBuilder(template=template, required_variables="*"))
    pipe.add_component("llm", generator)
    pipe.connect("prompt.prompt", "llm.messages")
    return pipe


async def test_a_pipeline_streams_through_a_reset_and_gets_the_final_reply(lifeline, generator):
    providers = {
        "chatty": fake(fail_after_chunks=2, chunks=4),
        "storyteller": fake(reply=STORY, chunks=3),
    }
    await lifeline(config(providers))
    chunks: list[StreamingChunk] = []
    pipe = pipeline_with(generator)
    result = await asyncio.to_thread(
        pipe.run, {"prompt": {"topic": "lighthouses"}, "llm": {"streaming_callback": chunks.append}}
    )
    [reply] = result["llm"]["replies"]
    assert reply.text == STORY
    assert (reply.meta["provider"], reply.meta["finish_reason"]) == ("storyteller", "stop")
    assert [a["target"] for a in reply.meta["attempts"]] == ["chatty", "storyteller"]
    assert reply.meta["usage"]["completion_tokens"] == len(STORY.split())
    [reset] = [c for c in chunks if "lifeline_reset" in c.meta]
    assert reset.meta["lifeline_reset"]["discard"] == 2 and reset.meta["lifeline_text"] == ""
    after = chunks[chunks.index(reset) + 1 :]
    assert "".join(c.content for c in after) == STORY and after[0].start
    assert after[-1].finish_reason == "stop"


async def test_tools_go_out_and_tool_calls_and_results_come_back(lifeline, generator):
    providers = {
        "agent": fake(
            reply="", tool_calls=[{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
        ),
        "echo": fake(reply="request"),  # answers with the request it got, as JSON
    }
    await lifeline(
        config(providers, {"default": {"targets": ["agent"]}, "echo": {"targets": ["echo"]}})
    )
    asked = await asyncio.to_thread(generator.run, "Weather in Paris?", tools=[weather])
    [reply] = asked["replies"]
    assert reply.tool_calls == [
        ToolCall(tool_name="get_weather", arguments={"city": "Paris"}, id="call_1")
    ]
    result = ChatMessage.from_tool("sunny in Paris", origin=reply.tool_call)
    history = [
        ChatMessage.from_system("Be brief."),
        ChatMessage.from_user("Weather?"),
        reply,
        result,
    ]
    echoed = await generator.run_async(
        history, generation_kwargs={"route": "echo", "seed": 7}, tools=[weather]
    )
    sent = json.loads(echoed["replies"][0].text)
    assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "tool"]
    assert sent["messages"][3] == {
        "role": "tool",
        "content": "sunny in Paris",
        "tool_call_id": "call_1",
    }
    assert sent["tools"][0]["name"] == "get_weather" and sent["seed"] == 7

    pieces: list[StreamingChunk] = []

    async def collect(chunk: StreamingChunk) -> None:
        pieces.append(chunk)

    streamed = await generator.run_async(
        "Weather in Paris?", streaming_callback=collect, tools=[weather]
    )
    assert streamed["replies"][0].tool_calls[0].arguments == {"city": "Paris"}
    calls = [c for c in pieces if c.tool_calls]
    assert (
        calls[0].start and "".join(c.tool_calls[0].arguments for c in calls) == '{"city": "Paris"}'
    )


async def test_an_error_reply_is_raised(lifeline, generator):
    await lifeline(config({"down": fake(fail_status=503)}))
    with pytest.raises(ReplyError, match="all_failed"):
        await generator.run_async("Hi")
    with pytest.raises(ValueError, match="not a CompletionRequest field: temprature"):
        generator.lifeline_request("Hi", {"temprature": 1})


async def test_an_error_reply_no_resend_cures_is_raised_as_a_value_error(lifeline, generator):
    """A retry that skips ValueErrors (tenacity's retry_if_not_exception_type, LangGraph's
    default) pays once for a request every provider refused, and again for an unwell one."""
    providers = {"down": fake(fail_status=503), "refuses": fake(fail_status=422)}
    routes = {name: {"targets": [name]} for name in providers}
    await lifeline(config(providers, {"default": {"targets": ["down"]}, **routes}))
    with pytest.raises(RequestRefused, match="all_failed") as refused:
        await generator.run_async("Hi", generation_kwargs={"route": "refuses"})
    assert isinstance(refused.value, ValueError) and refused.value.reply.attempts
    with pytest.raises(RequestRefused, match="unknown_route"):
        await generator.run_async("Hi", generation_kwargs={"route": "nowhere"})
    with pytest.raises(ReplyError, match="all_failed") as down:
        await generator.run_async("Hi")
    assert not isinstance(down.value, ValueError | OSError)


def test_it_serializes_like_any_component():
    llm = LifelineChatGenerator("fast", generation_kwargs={"max_tokens": 9}, timeout=3)
    again = LifelineChatGenerator.from_dict(llm.to_dict())
    assert (again.route, again.generation_kwargs, again.timeout) == ("fast", {"max_tokens": 9}, 3)


async def test_a_message_of_many_text_parts_reaches_the_provider_whole(lifeline, generator):
    """The first text part went out alone (ChatMessage.text is the first one): the document
    after an instruction was dropped without a word."""
    await lifeline(config({"echo": fake(reply="request")}))
    message = ChatMessage.from_user(content_parts=["Summarise the document below.", "DOCUMENT"])
    echoed = await generator.run_async([message])
    [sent] = json.loads(echoed["replies"][0].text)["messages"]
    assert "Summarise" in json.dumps(sent["content"]) and "DOCUMENT" in json.dumps(sent["content"])


def test_a_pipeline_file_never_holds_the_nats_urls_credentials():
    """to_dict() wrote nats://alice:<password>@... into the pipeline's YAML."""
    llm = LifelineChatGenerator("fast", nats_url="nats://alice:TopSecret-PW@nats.internal:4222")
    with pytest.raises(ValueError, match="NATS_USER and NATS_PASSWORD"):
        llm.to_dict()
    cluster = "nats://a:4222, nats://alice:TopSecret-PW@b:4222"  # in any URL of the list
    with pytest.raises(ValueError, match="NATS_USER and NATS_PASSWORD"):
        LifelineChatGenerator("fast", nats_url=cluster).to_dict()
    # Without the scheme (nats-py dials it as nats://), a token, a password with a '/' in it.
    # A WebSocket proxy's token in a query: nats-py sends the URL as written.
    for url in (
        "alice:TopSecret-PW@b:4222",
        "TopSecret-TOKEN@b",
        "nats://alice:Top/Secret@b",
        "wss://b/nats?token=TopSecret",
    ):
        with pytest.raises(ValueError, match="NATS_USER and NATS_PASSWORD"):
            LifelineChatGenerator("fast", nats_url=f"nats://a:4222,{url}").to_dict()
    plain = LifelineChatGenerator("fast", nats_url="nats://nats.internal:4222")
    assert plain.to_dict()["init_parameters"]["nats_url"] == "nats://nats.internal:4222"


async def test_a_pydantic_response_format_is_asked_for_and_checked_as_its_json_schema(
    lifeline, generator
):
    """OpenAIChatGenerator, and so a pipeline moving off one, takes a Pydantic model as
    generation_kwargs' response_format: it raised msgspec's "Expected `object | null`, got
    `ModelMetaclass`" here, and the pipeline's file could not be written."""
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    ada = '{"name": "Ada", "age": 36}'
    await lifeline(config({"sloppy": fake(reply="Sure! Ada is 36."), "good": fake(reply=ada)}))
    asked = await generator.run_async("Ada?", generation_kwargs={"response_format": Person})
    [reply] = asked["replies"]
    assert Person.model_validate_json(reply.text) == Person(name="Ada", age=36)
    assert [a["target"] for a in reply.meta["attempts"]] == ["sloppy", "good"]  # checked
    saved = LifelineChatGenerator("fast", generation_kwargs={"response_format": Person}).to_dict()
    again = LifelineChatGenerator.from_dict(json.loads(json.dumps(saved)))
    assert again.lifeline_request("Ada?").response_format.json_schema.name == "Person"


async def test_generation_kwargs_in_openais_forms_are_taken(lifeline, generator):
    """A FallbackChatGenerator hands every generator the same generation_kwargs, written for
    OpenAIChatGenerator: a tool_choice naming a function ({"type": "function", "function":
    {"name": ...}}) and a stop that is one string were refused (msgspec's "Object missing
    required field `name`"), so the pipeline always fell past Lifeline."""
    from haystack.components.generators.chat import FallbackChatGenerator

    calls = [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    await lifeline(config({"agent": fake(reply="", tool_calls=calls)}))
    openai_forms = {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    openai_forms["stop"] = "END"
    fallback = FallbackChatGenerator([generator])
    asked = await asyncio.to_thread(
        fallback.run, "Weather in Paris?", generation_kwargs=openai_forms, tools=[weather]
    )
    assert asked["replies"][0].tool_calls[0].tool_name == "get_weather"
    request = generator.lifeline_request("Hi", openai_forms, [weather])
    assert (request.tool_choice.name, request.stop) == ("get_weather", ["END"])
