"""The LangChain chat model (service/integrations/langchain.py): langchain-tests' standard unit
tests, and invoke, stream, async, tools and structured output over a real nats-server and stack.

The sync calls run in a thread (asyncio.to_thread): the stack under test runs on this test's
event loop, which a blocking call on it would stall."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest
from helpers import SilentServer, config, fake, wait_for
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.load import dumpd
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import tool
from langchain_core.tracers._streaming import _V2StreamingCallbackHandler
from langchain_tests.unit_tests import ChatModelUnitTests
from pydantic import BaseModel

from service.client import NoDispatcher
from service.integrations import bridge
from service.integrations.langchain import (
    ChatLifeline,
    ReplyError,
    RequestRefused,
    TextWithdrawn,
    Unavailable,
)


class TestChatLifelineStandard(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatLifeline]:
        return ChatLifeline

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": "default", "nats_url": "nats://127.0.0.1:4222"}

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_image_inputs(self) -> bool:
        return True

    @property
    def supports_image_urls(self) -> bool:
        return True

    @property
    def supports_image_tool_message(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def model_override_value(self) -> str:
        return "another-route"


@pytest.fixture
def benchmark(benchmark):
    """langchain-tests times the model's construction with pytest-benchmark, for about a
    second; once is enough here (Lifeline's own benchmarks are tests/bench)."""
    benchmark.disabled = True
    return benchmark


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


class Person(BaseModel):
    """A person."""

    name: str
    age: int


@pytest.fixture
async def model(nats_url: str):
    chat = ChatLifeline(model="default", nats_url=nats_url, timeout=5)
    yield chat
    await asyncio.to_thread(chat.close)


def test_a_request_carries_the_chat_and_the_settings():
    model = ChatLifeline(model="main", temperature=0.5, max_tokens=9, stop=["\n"], seed=3)
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    history = [
        SystemMessage("Be brief."),
        HumanMessage(content=[{"type": "text", "text": "What is this?"}, image]),
        AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "c1"}]),
        ToolMessage("sunny", tool_call_id="c1"),
    ]
    bound = model.bind_tools([get_weather], tool_choice="get_weather")
    request = model.lifeline_request(history, **bound.kwargs, model="other", timeout=3)
    assert (request.route, request.timeout_s, request.temperature) == ("other", 3, 0.5)
    assert (request.max_tokens, request.stop, request.seed) == (9, ["\n"], 3)
    assert [m.role for m in request.messages] == ["system", "user", "assistant", "tool"]
    assert request.messages[1].images == 1 and request.messages[1].text == "What is this?"
    call = request.messages[2].tool_calls[0]
    assert (call.id, call.name, json.loads(call.arguments)) == (
        "c1",
        "get_weather",
        {"city": "Paris"},
    )
    assert request.messages[3].tool_call_id == "c1"
    assert request.tools[0].name == "get_weather" and request.tool_choice.name == "get_weather"
    assert request.tools[0].parameters["properties"]["city"]["type"] == "string"
    with pytest.raises(ValueError, match="unknown call argument 'temprature'"):
        model.lifeline_request(history, temprature=1)
    options = ChatLifeline(request_options={"temperature": 0.3, "targets": ["a", "b"]})
    request = options.lifeline_request(history)
    assert (request.temperature, request.targets, request.route) == (0.3, ["a", "b"], "default")


def test_a_providers_own_tool_is_refused_saying_what_lifeline_takes():
    """OpenAI's built-in tools (web search, file search, ...), which LangChain passes through
    as they are, raised KeyError: 'function' from bind_tools."""
    for kind in ("web_search_preview", "file_search"):
        with pytest.raises(ValueError, match=f"function tools.*'{kind}'"):
            ChatLifeline().bind_tools([get_weather, {"type": kind}])


async def test_invoke_stream_and_their_async_twins_over_lifeline(lifeline, model):
    providers = {"flaky": fake(fail_status=429), "backup": fake(chunks=3)}
    await lifeline(config(providers))
    answer = await asyncio.to_thread(model.invoke, "To get to the other side")
    assert answer.content == "To get to the other side"
    meta = answer.response_metadata
    assert (meta["provider"], meta["route"], meta["model_name"]) == ("backup", "default", "fake-1")
    assert [(a["target"], a["error_type"]) for a in meta["attempts"]] == [
        ("flaky", "rate_limit"),
        ("backup", None),
    ]
    assert meta["trace_id"] and answer.id == meta["id"]
    assert (
        answer.usage_metadata["input_tokens"] == 6 and answer.usage_metadata["total_tokens"] == 12
    )

    chunks = await asyncio.to_thread(lambda: list(model.stream("one two three four")))
    assert [c.content for c in chunks[:-1]] and len(chunks) == 4  # three deltas and the end
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    assert whole.content == "one two three four" and whole.usage_metadata["output_tokens"] == 4
    assert whole.response_metadata["provider"] == "backup"

    answer = await model.ainvoke([HumanMessage("async hello")])
    assert answer.content == "async hello"
    pieces = [chunk.content async for chunk in model.astream("async stream")]
    assert "".join(pieces) == "async stream"


async def test_a_tool_call_and_its_result_round_trip(lifeline, model):
    providers = {
        "agent": fake(
            reply="", tool_calls=[{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
        ),
        "echo": fake(reply="request"),  # answers with the request it got, as JSON
    }
    routes = {"default": {"targets": ["agent"]}, "echo": {"targets": ["echo"]}}
    await lifeline(config(providers, routes))
    with_tools = model.bind_tools([get_weather], tool_choice="any")
    asked = await asyncio.to_thread(with_tools.invoke, "Weather in Paris?")
    assert asked.tool_calls == [
        {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1", "type": "tool_call"}
    ]
    assert asked.response_metadata["finish_reason"] == "tool_calls"
    streamed = [chunk async for chunk in with_tools.astream("Weather in Paris?")]
    whole = streamed[0]
    for chunk in streamed[1:]:
        whole += chunk
    assert whole.tool_calls[0]["args"] == {"city": "Paris"}

    result = ToolMessage(get_weather.invoke({"city": "Paris"}), tool_call_id="call_1")
    echo = model.bind_tools([get_weather])  # "required" would refuse an answer without a call
    seen = await echo.ainvoke(["Weather in Paris?", asked, result], model="echo")
    sent = json.loads(seen.content)
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool"]
    assert sent["messages"][1]["tool_calls"] == [
        {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    ]
    assert sent["messages"][2] == {
        "role": "tool",
        "content": "sunny in Paris",
        "tool_call_id": "call_1",
    }
    assert sent["tools"][0]["name"] == "get_weather"


async def test_structured_output_and_errors(lifeline, model):
    ada = '{"name": "Ada", "age": 36}'
    providers = {
        "main": fake(reply=ada, tool_calls=[{"name": "Person", "arguments": ada}]),
        "down": fake(fail_status=503),
    }
    await lifeline(
        config(providers, {"default": {"targets": ["main"]}, "down": {"targets": ["down"]}})
    )
    for method in ("function_calling", "json_schema", "json_mode"):
        person = await model.with_structured_output(Person, method=method).ainvoke("Ada?")
        assert person == Person(name="Ada", age=36)
    with pytest.raises(ReplyError, match="all_failed") as failed:
        await model.ainvoke("Hi", model="down")
    assert failed.value.reply.attempts[0].error_type == "server_error"
    # LangChain's own fallbacks see the failure: the error reply is an exception
    fallback = model.bind(model="down").with_fallbacks([model])
    assert (await fallback.ainvoke("rescued")).content == ada


def _langgraph_retries(exc: BaseException) -> bool:
    """LangGraph's RetryPolicy default, default_retry_on (langgraph/_internal/_retry.py), less
    its checks of requests' and httpx's own errors."""
    if isinstance(exc, ConnectionError):
        return True
    final = (ValueError, TypeError, ArithmeticError, ImportError, LookupError, NameError)
    final += (SyntaxError, RuntimeError, ReferenceError, StopIteration, StopAsyncIteration)
    return not isinstance(exc, (*final, OSError))


async def test_retry_policies_pay_again_only_for_what_a_resend_can_cure(lifeline, model, audit):
    """Every error reply was one plain ReplyError, so a retry policy deciding by type (LangGraph's
    default, or with_retry given it) sent again requests that every provider had refused, or
    that named no route: wasted calls. Now those are ValueErrors, and an overloaded one is not."""
    providers = {"main": fake(), "refuses": fake(fail_status=400), "down": fake(fail_status=503)}
    providers["slow"] = fake(chunks=2, chunk_delay_ms=4000)
    routes = {name: {"targets": [name]} for name in providers}
    await lifeline(config(providers, {"default": {"targets": ["main"]}, **routes}, max_in_flight=1))
    once = model.model_copy(update={"max_retries": 0})  # no resends of its own on overloaded
    policy = {"retry_if_exception_type": _langgraph_retries, "wait_exponential_jitter": False}

    def retried(route: str) -> Any:
        return once.bind(model=route).with_retry(**policy, stop_after_attempt=3)

    with pytest.raises(RequestRefused, match="unknown_route"):
        await retried("nowhere").ainvoke("Hi")
    with pytest.raises(RequestRefused, match="all_failed") as refused:
        await retried("refuses").ainvoke("Hi")
    assert refused.value.reply.attempts[0].error_type == "bad_request"
    with pytest.raises(ReplyError, match="all_failed") as down:  # a provider unwell: sent again
        await retried("down").ainvoke("Hi")
    assert not isinstance(down.value, ValueError)
    events = await audit.wait_for(5)
    assert [e.error_type for _, e in events] == ["unknown_route", "all_failed"] + ["all_failed"] * 3

    held = once.bind(model="slow").astream("hold the dispatcher's one slot")
    assert (await anext(held)).content
    with pytest.raises(Unavailable, match="overloaded") as overloaded:
        await retried("default").ainvoke("Hi")
    assert overloaded.value.retry_after_s is not None
    await held.aclose()
    events = await audit.wait_for(5 + 3)
    assert [e.error_type for _, e in events[5:]].count("overloaded") == 3


async def test_a_stream_that_fails_midway_raises_rather_than_adding_up_wrong_text(lifeline, model):
    providers = {"chatty": fake(fail_after_chunks=2, chunks=4), "backup": fake(reply="whole")}
    await lifeline(config(providers))
    pieces = []
    with pytest.raises(ReplyError, match="midstream_failed"):  # on_midstream "fail"
        async for chunk in model.astream("one two three four"):
            pieces.append(chunk.content)
    assert len(pieces) == 2
    resetting = model.model_copy(update={"on_midstream": "reset"})
    with pytest.raises(TextWithdrawn, match="failed after 2 streamed pieces"):
        await asyncio.to_thread(lambda: list(resetting.stream("one two three four")))
    assert (await resetting.ainvoke("not streamed: no reset")).content == "not streamed: no reset"


async def test_no_dispatcher_is_a_clear_error(nats_url):
    model = ChatLifeline(nats_url=nats_url)
    try:
        with pytest.raises(NoDispatcher):
            await model.ainvoke("Hi")
    finally:
        await asyncio.to_thread(bridge.close, nats_url)


async def test_a_call_given_up_on_stops_its_provider_call(lifeline, model):
    """A cancelled ainvoke and an astream left after its first chunk abort their requests
    (llm.abort): the worker's provider calls are cancelled, not left running."""
    slow = fake(reply=" ".join(["word"] * 100), chunks=100, chunk_delay_ms=100, latency_ms=1000)
    stack = await lifeline(config({"main": slow}))
    worker = stack.workers["main"]
    call = asyncio.ensure_future(model.ainvoke("Hi"))
    await wait_for(lambda: worker.in_flight == 1, 5, what="the call at the worker")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await wait_for(lambda: worker.cancelled == 1 and not worker.in_flight, 5, what="its cancel")

    async for chunk in model.astream("Hi"):
        assert chunk.content
        break  # the reader leaves after one chunk of a hundred
    await wait_for(lambda: worker.cancelled == 2 and not worker.in_flight, 5, what="its cancel")
    assert stack.dispatcher.aborts == 2


# ---- when NATS is not there, or its connection was closed for good ---------------------------

_DEAD = "nats://127.0.0.1:1"  # nothing listens there


def test_a_stream_raises_unreachable_instead_of_waiting_for_ever_when_nats_is_down():
    from service.client import Unreachable

    model, raised = ChatLifeline(nats_url=_DEAD), []

    def consume() -> None:
        try:
            list(model.stream("hi"))
        except Exception as exc:  # noqa: BLE001 - what it raises is the test's subject
            raised.append(exc)

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    reader.join(timeout=30)
    try:
        assert not reader.is_alive(), "stream() still waiting after 30 s"
        assert [type(exc) for exc in raised] == [Unreachable]
    finally:
        bridge.close(_DEAD)


async def test_an_async_stream_raises_unreachable_when_nats_is_down():
    from service.client import Unreachable

    model = ChatLifeline(nats_url=_DEAD)

    async def consume() -> None:
        async for _ in model.astream("hi"):
            pass

    try:
        with pytest.raises(Unreachable):
            await asyncio.wait_for(consume(), 30)
    finally:
        await asyncio.to_thread(bridge.close, _DEAD)


async def test_closing_the_shared_connection_ends_every_call_in_flight_with_an_error(
    lifeline, nats_url
):
    """Sync and async calls from other threads, waiting on a slow provider when the
    connection is closed: each ends with an error at once, none blocks for ever."""
    from service.client import LifelineError

    await lifeline(config({"main": fake(latency_ms=3000)}))
    model = ChatLifeline(nats_url=nats_url, timeout=10)
    outcomes: dict[str, BaseException | None] = {}

    def call(name: str, run: Any) -> None:
        try:
            run()
            outcomes[name] = None
        except BaseException as exc:  # noqa: BLE001 - what each caller got
            outcomes[name] = exc

    runs = {
        "invoke": lambda: model.invoke("hi"),
        "ainvoke": lambda: asyncio.run(model.ainvoke("hi")),
        "stream": lambda: list(model.stream("hi")),
    }
    threads = [threading.Thread(target=call, args=item) for item in runs.items()]
    for thread in threads:
        thread.start()
    await asyncio.sleep(0.5)
    await asyncio.to_thread(bridge.close, nats_url)
    for thread in threads:
        await asyncio.to_thread(thread.join, 5)
    assert not any(thread.is_alive() for thread in threads), outcomes
    assert all(isinstance(outcomes[name], LifelineError) for name in runs), outcomes


async def test_a_connection_closed_for_good_is_replaced_on_the_next_call(lifeline, nats_url):
    await lifeline(config({"main": fake()}))
    model = ChatLifeline(nats_url=nats_url, timeout=5)
    try:
        assert (await model.ainvoke("first")).content == "first"
        shared = bridge.connection(nats_url)
        await asyncio.wrap_future(  # as nats-py does after an authorization error, say
            asyncio.run_coroutine_threadsafe(shared._client.nc.close(), shared._loop)
        )
        assert (await model.ainvoke("second")).content == "second"
    finally:
        await asyncio.to_thread(bridge.close, nats_url)


async def test_a_call_whose_shared_connection_another_user_closes_opens_a_new_one(
    lifeline, nats_url, monkeypatch
):
    """The shared connection was closed for every model (bridge.close()) between a call
    taking it and sending on it: that call raised a bare RuntimeError ("this Lifeline
    connection is closed", or "Event loop is closed"), no LifelineError, where the bridge
    promises the next call after a close() a new connection."""
    await lifeline(config({"main": fake(chunks=2)}))
    model = ChatLifeline(nats_url=nats_url, timeout=5)
    handed_out = bridge.connection

    def closed_once_handed_out(
        url: str | None = None, name: str = "x", **hold: Any
    ) -> bridge.Connection:
        shared = handed_out(url, name, **hold)
        if not closed:  # the first one handed out, once
            closed.append(shared)
            bridge.close(url)  # closed for every model, just then
        return shared

    closed: list[bridge.Connection] = []
    monkeypatch.setattr(bridge, "connection", closed_once_handed_out)
    calls = {
        "invoke": lambda: asyncio.to_thread(model.invoke, "one"),
        "ainvoke": lambda: model.ainvoke("two"),
        "stream": lambda: asyncio.to_thread(lambda: _sum(list(model.stream("three four")))),
        "astream": lambda: _asum(model.astream("five six")),
    }
    try:
        for name, call in calls.items():
            closed.clear()
            answer = await asyncio.wait_for(call(), 10)
            assert len(closed) == 1, name  # it happened, and the call went on all the same
            assert answer.content in ("one", "two", "three four", "five six"), name
    finally:
        monkeypatch.undo()
        await asyncio.to_thread(bridge.close, nats_url)


async def test_closing_the_connection_while_a_call_connects_ends_the_call_with_an_error():
    """close() cancels what it cannot end within a second, such as a call still connecting
    to a NATS server slow to answer: the cancel reached callers no one had cancelled,
    ainvoke() failing with LangChain's AttributeError on a CancelledError and invoke() with
    concurrent.futures' CancelledError, and the connect went on, its socket left open."""
    from service.client import LifelineError

    async with SilentServer() as server:
        url = server.url
        model = ChatLifeline(nats_url=url)
        try:
            calls = [
                asyncio.ensure_future(model.ainvoke("hi")),
                asyncio.ensure_future(asyncio.to_thread(model.invoke, "hi")),
            ]
            await wait_for(lambda: server.dialed)
            await asyncio.to_thread(bridge.close, url)
            for call in calls:
                with pytest.raises(LifelineError, match="closed"):
                    await asyncio.wait_for(call, 10)
            await wait_for(lambda: len(server.hung_up) == len(server.dialed))
        finally:
            await asyncio.to_thread(bridge.close, url)


async def test_a_connection_of_your_own_says_it_is_closed(nats_url):
    """bridge.connection() kept after bridge.close(): its calls raised RuntimeError."""
    from service.client import LifelineError

    shared = bridge.connection(nats_url)
    await asyncio.to_thread(bridge.close, nats_url)
    with pytest.raises(LifelineError, match="closed.*bridge.connection"):
        await shared.acall(lambda client: client.complete("hi"))
    with pytest.raises(LifelineError, match="closed"):
        await asyncio.to_thread(lambda: list(shared.iterate(lambda client: client.stream("hi"))))


async def _asum(chunks: Any) -> Any:
    return _sum([chunk async for chunk in chunks])


async def test_an_invoke_watched_by_a_streaming_observer_keeps_its_fallback(lifeline, model):
    """astream_events (as LangGraph's "messages" mode and tracing UIs watch a graph) made
    LangChain stream an invoke(), with on_midstream "fail": an answer failing the JSON check
    raised where the same invoke() unwatched fell back to the next target. So did a handler of
    LangChain's v3 events, which takes an invoke down another path."""
    from langchain_core.runnables import RunnableLambda

    await lifeline(
        config({"sloppy": fake(reply="Sure! Ada is 36."), "good": fake(reply='{"age": 36}')})
    )
    json_model = model.bind(response_format={"type": "json_object"})
    chain = RunnableLambda(lambda q: json_model.invoke(q).content)
    events = [event async for event in chain.astream_events("Ada as JSON?", version="v2")]
    assert any(e["event"] == "on_chat_model_start" for e in events)  # it was watched
    [end] = [e for e in events if e["event"] == "on_chain_end" and not e["parent_ids"]]
    assert end["data"]["output"] == '{"age": 36}'
    # A v3 event handler (LangGraph's "messages" stream) made LangChain stream it all the same.
    watched = await json_model.ainvoke("Ada as JSON?", config={"callbacks": [_EventWatcher()]})
    assert watched.content == '{"age": 36}'


def test_the_credentials_in_its_nats_url_leave_through_no_dump_trace_or_callback():
    """What LangChain hands tracers (LangSmith, the console) and what saves a model: repr,
    its dumps, dumpd and to_json, its identifying and LangSmith params, and a callback's
    serialized model, invocation params, metadata and error. The URL stays, its user info
    as ***; the model still connects with it."""
    from service.client import Unreachable

    url = _DEAD.replace("//", "//alice:TopSecret-PW@")
    model = ChatLifeline(nats_url=url, metadata={"team": "search"})
    seen: list[Any] = []

    class Watcher(BaseCallbackHandler):
        def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
            seen.extend([args, kwargs])

        def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
            seen.extend([repr(error), kwargs])

    try:
        with pytest.raises(Unreachable):
            model.invoke("hi", config={"callbacks": [Watcher()]})
    finally:
        bridge.close(url)
    dumps = [model.model_dump(), json.loads(model.model_dump_json()), dumpd(model)]
    seen += [
        *dumps,
        repr(model),
        model.to_json(),
        model._identifying_params,
        model._get_ls_params(),
    ]
    assert len(seen) > 8 and "TopSecret" not in str(seen)
    assert model.model_dump()["nats_url"] == "nats://***@127.0.0.1:1"
    assert model.nats_url == url  # what it connects with
    proxied = ChatLifeline(nats_url="wss://proxy/nats?token=TopSecret-TOKEN")
    assert proxied.model_dump()["nats_url"] == "wss://proxy/nats?token=***"
    plain = ChatLifeline(nats_url="nats://nats.internal:4222")
    assert json.loads(plain.model_dump_json())["nats_url"] == "nats://nats.internal:4222"


async def test_a_forked_child_calls_through_a_connection_of_its_own(lifeline, nats_url):
    """The child of a fork (gunicorn --preload, Celery's prefork) had its parent's shared
    connection without its thread: every call waited for ever."""
    import os

    await lifeline(config({"main": fake()}))
    chat = ChatLifeline(nats_url=nats_url, timeout=5)
    assert (await asyncio.to_thread(chat.invoke, "before")).content == "before"

    def forked() -> int:
        pid = os.fork()
        if pid == 0:  # the child: one call, its answer as the exit status
            try:
                os._exit(0 if chat.invoke("in the child").content == "in the child" else 1)
            except BaseException:  # noqa: BLE001 - any failure is the child's exit status
                os._exit(2)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        return -9  # still waiting: the hang

    assert await asyncio.to_thread(forked) == 0
    await asyncio.to_thread(chat.close)


class _TokenWatcher(AsyncCallbackHandler):
    """A callback handler told of each streamed chunk (on_llm_new_token), as LangChain's token
    handlers and tracers are."""

    def __init__(self) -> None:
        self.chunks: list[Any] = []

    async def on_llm_new_token(self, token: str, *, chunk: Any = None, **kwargs: Any) -> None:
        self.chunks.append(chunk.message)


class _EventWatcher(AsyncCallbackHandler, _V2StreamingCallbackHandler):
    """A handler of the v3 event protocol, as LangGraph's "messages" stream attaches: a model
    invoked under it streams through LangChain's v3 event path."""


def _sum(chunks: list[Any]) -> Any:
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    return whole


async def test_a_streamed_tool_call_reaches_every_watcher_of_the_stream(lifeline, model):
    """On LangChain's v3 event path (astream_events(version="v3"), or an invoke a v3 handler
    watches) the model itself tells the callbacks of each chunk, and it told them of the text
    alone: a token handler, and astream_events(version="v2") watching the same chain, saw the
    answer's words and never its tool call."""
    calls = [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    await lifeline(config({"agent": fake(reply="Let me check.", chunks=2, tool_calls=calls)}))
    expected = [
        {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1", "type": "tool_call"}
    ]
    with_tools = model.bind_tools([get_weather])
    tokens = _TokenWatcher()
    events = await with_tools.astream_events(
        "Weather in Paris?", version="v3", config={"callbacks": [tokens]}
    )
    message = await events
    assert message.tool_calls == expected  # the v3 events themselves had it
    heard = _sum(tokens.chunks)
    assert (heard.content, heard.tool_calls) == ("Let me check.", expected)
    tokens = _TokenWatcher()  # the same through stream_events and the sync _stream
    watching = {"callbacks": [tokens]}
    events = with_tools.stream_events("Weather in Paris?", version="v3", config=watching)
    assert (await asyncio.to_thread(lambda: events.output)).tool_calls == expected
    assert _sum(tokens.chunks).tool_calls == expected

    streaming = model.model_copy(update={"streaming": True}).bind_tools([get_weather])
    chain = RunnableLambda(streaming.ainvoke)
    watched = chain.astream_events(
        "Weather?", version="v2", config={"callbacks": [_EventWatcher()]}
    )
    streamed = [e["data"]["chunk"] async for e in watched if e["event"] == "on_chat_model_stream"]
    seen = _sum(streamed)
    assert (seen.content, seen.tool_calls) == ("Let me check.", expected)
