"""Lifeline as a Haystack chat generator: one component where a pipeline had a
FallbackChatGenerator.

    from service.integrations.haystack import LifelineChatGenerator

    # before: FallbackChatGenerator([OpenAIChatGenerator(...), AnthropicChatGenerator(...)])
    generator = LifelineChatGenerator(route="default", timeout=30)   # the route's targets
    pipeline.add_component("llm", generator)                          # fall back in Lifeline
    generator.run([ChatMessage.from_user("Hi")])["replies"][0].text

`run(messages, streaming_callback=None, generation_kwargs=None, *, tools=None)` returns
{"replies": [ChatMessage]}; `run_async` is the same for AsyncPipeline. `generation_kwargs`
(at init and per run, merged) are CompletionRequest fields: max_tokens (or OpenAI's
max_completion_tokens), temperature, top_p, stop, seed, response_format, tool_choice,
parallel_tool_calls (each in the wire's form or OpenAIChatGenerator's: a Pydantic model as
response_format is sent as its JSON Schema), and Lifeline's own (route, targets, fallback_on,
timeout_s, ...).
Tools are Haystack Tools or Toolsets; the reply's tool calls are ToolCalls, and a tool result
message goes back as a `tool` message. The reply's `meta` has Haystack's model, index,
finish_reason and usage (prompt_tokens, completion_tokens, total_tokens), and Lifeline's
provider, target, attempts, trace_id and id.

Streaming: with a streaming_callback (sync, or async in run_async) the answer is asked of
llm.stream and each piece reaches the callback as a StreamingChunk. When Lifeline takes text
back (a reset: the attempt that wrote it failed mid-answer, and the next target answers from
its start, as FallbackChatGenerator's next generator would) the callback gets an empty chunk
whose meta has "lifeline_reset" (the attempt, how many chunks are void, why) and
"lifeline_text" (the answer so far without them): a callback that cares redraws from it. The
reply itself is always the final text, resets applied.

Errors: an error reply raises ReplyError (its `.reply` has the attempts), so a wrapper that
falls back on exceptions still sees it: RequestRefused (a ValueError) when no resend can cure
it, Unavailable (overloaded, shutting_down), DeadlineExceeded (a TimeoutError), else ReplyError
itself (service/client.py says which is which); a transport problem raises the client's
LifelineError. Sync and async calls share one NATS connection per URL, owned by a private
event loop in a daemon thread (service/integrations/bridge.py explains why); a generator's
`close()` releases its own hold, and the connection closes with the last model's.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from haystack import component, default_from_dict, default_to_dict
from haystack.dataclasses import (
    ChatMessage,
    ChatRole,
    ComponentInfo,
    ImageContent,
    StreamingCallbackT,
    StreamingChunk,
    TextContent,
    ToolCall,
    ToolCallResult,
    select_streaming_callback,
)
from haystack.dataclasses.streaming_chunk import ToolCallDelta
from haystack.tools import (
    ToolsType,
    deserialize_tools_or_toolset_inplace,
    flatten_tools_or_toolsets,
    serialize_tools_or_toolset,
)
from haystack.utils import deserialize_callable, serialize_callable
from pydantic import BaseModel

from schemas import ChatMessage as WireMessage
from schemas import CompletionReply, CompletionRequest
from schemas.streaming import Event
from schemas.wire import ImagePart, Part, TextPart
from schemas.wire import ToolCall as WireToolCall
from service.client import (
    DeadlineExceeded,
    Lifeline,
    ReplyError,
    RequestRefused,
    Unavailable,
    request_of,
)
from service.integrations import bridge

__all__ = [
    "DeadlineExceeded",
    "LifelineChatGenerator",
    "ReplyError",
    "RequestRefused",
    "Unavailable",
]

_ALIASES = {"max_completion_tokens": "max_tokens"}  # OpenAIChatGenerator's names


@component
class LifelineChatGenerator:
    """A Haystack chat generator backed by Lifeline (see the module's docstring).

    :param route: the Lifeline route; its targets, in order, are the fallbacks.
    :param nats_url: NATS URL or comma-separated cluster list; default $NATS_URL, else
        nats://127.0.0.1:4222; credentials in it or in NATS_CREDS, NATS_USER, ... as for the
        `lifeline` commands.
    :param generation_kwargs: CompletionRequest fields for every run.
    :param streaming_callback: called with each StreamingChunk; the run streams when set.
    :param tools: Tools or Toolsets offered on every run (a run's `tools` replace them).
    :param timeout: seconds for the whole request, every retry and fallback included.
    :param max_retries: resends of a request the dispatcher answered `overloaded` or
        `shutting_down`.
    """

    def __init__(
        self,
        route: str = "default",
        *,
        nats_url: str | None = None,
        generation_kwargs: dict[str, Any] | None = None,
        streaming_callback: StreamingCallbackT | None = None,
        tools: ToolsType | None = None,
        timeout: float | None = None,
        max_retries: int = 2,
    ) -> None:
        self.route = route
        self.nats_url = nats_url
        self.generation_kwargs = generation_kwargs or {}
        self.streaming_callback = streaming_callback
        self.tools = tools
        self.timeout = timeout
        self.max_retries = max_retries

    def to_dict(self) -> dict[str, Any]:
        # Any "@": no host or port holds one. Looked for only between "://" and a "/", it was
        # missed in a URL without its scheme (alice:pw@host:4222, which nats-py dials as
        # nats://) and in one whose password holds a '/', and the password written out.
        if any(mark in (self.nats_url or "") for mark in "@?"):  # user info, a query's token
            # As Haystack's own Secret refuses to write a token: a pipeline file is shared.
            raise ValueError(
                "nats_url holds credentials, which a pipeline's file must not: give them in "
                "NATS_USER and NATS_PASSWORD, NATS_TOKEN or NATS_CREDS instead"
            )
        callback = serialize_callable(self.streaming_callback) if self.streaming_callback else None
        return default_to_dict(
            self,
            route=self.route,
            nats_url=self.nats_url,
            generation_kwargs=_wire_forms(self.generation_kwargs),
            streaming_callback=callback,
            tools=serialize_tools_or_toolset(self.tools),
            timeout=self.timeout,
            max_retries=self.max_retries,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LifelineChatGenerator:
        params = data.get("init_parameters", {})
        deserialize_tools_or_toolset_inplace(params, key="tools")
        if params.get("streaming_callback"):
            params["streaming_callback"] = deserialize_callable(params["streaming_callback"])
        return default_from_dict(cls, data)

    def close(self) -> None:
        """Release this generator's hold on the NATS connection of its URL: the connection
        closes once no model holds it (their calls in flight end with LifelineError then);
        other models' calls, and this one's in flight, go on while another holds it."""
        bridge.release(self.nats_url, self)

    @component.output_types(replies=list[ChatMessage])
    def run(
        self,
        messages: list[ChatMessage] | str,
        streaming_callback: StreamingCallbackT | None = None,
        generation_kwargs: dict[str, Any] | None = None,
        *,
        tools: ToolsType | None = None,
    ) -> dict[str, list[ChatMessage]]:
        """Ask Lifeline for a reply to `messages` (a string is one user message)."""
        callback = select_streaming_callback(
            self.streaming_callback, streaming_callback, requires_async=False
        )
        request = self.lifeline_request(messages, generation_kwargs, tools)
        connection = self._connection()
        if callback is None:
            reply = connection.call(
                lambda client: client.complete(request, overloaded_retries=self.max_retries)
            )
            return {"replies": [_message(reply, request, reply.content or "")]}
        relay = _Relay(self, request)
        for event, text in connection.iterate(relay.events):
            chunk = relay.chunk(event, text)
            if chunk is not None:
                callback(chunk)
        return {"replies": [relay.message()]}

    @component.output_types(replies=list[ChatMessage])
    async def run_async(
        self,
        messages: list[ChatMessage] | str,
        streaming_callback: StreamingCallbackT | None = None,
        generation_kwargs: dict[str, Any] | None = None,
        *,
        tools: ToolsType | None = None,
    ) -> dict[str, list[ChatMessage]]:
        """run(), awaited: the caller's event loop stays free while Lifeline answers."""
        callback = select_streaming_callback(
            self.streaming_callback, streaming_callback, requires_async=True
        )
        request = self.lifeline_request(messages, generation_kwargs, tools)
        connection = self._connection()
        if callback is None:
            reply = await connection.acall(
                lambda client: client.complete(request, overloaded_retries=self.max_retries)
            )
            return {"replies": [_message(reply, request, reply.content or "")]}
        relay = _Relay(self, request)
        async for event, text in connection.aiterate(relay.events):
            chunk = relay.chunk(event, text)
            if chunk is not None:
                result = callback(chunk)
                if inspect.isawaitable(result):
                    await result
        return {"replies": [relay.message()]}

    def lifeline_request(
        self,
        messages: list[ChatMessage] | str,
        generation_kwargs: dict[str, Any] | None = None,
        tools: ToolsType | None = None,
    ) -> CompletionRequest:
        """The CompletionRequest a run with these arguments sends."""
        if isinstance(messages, str):
            messages = [ChatMessage.from_user(messages)]
        fields: dict[str, Any] = {"route": self.route, "timeout_s": self.timeout}
        given = _wire_forms({**self.generation_kwargs, **(generation_kwargs or {})})
        for name, value in given.items():
            fields[_ALIASES.get(name, name)] = value
        offered = flatten_tools_or_toolsets(tools if tools is not None else self.tools)
        if offered:
            fields["tools"] = [_tool(t.tool_spec) for t in offered]
        try:
            return request_of([_to_wire(m) for m in messages], **fields)
        except TypeError as exc:
            raise ValueError(f"generation_kwargs: {exc}") from None

    def _connection(self) -> bridge.Shared:
        return bridge.shared(self.nats_url, "lifeline-haystack", holder=self)


class _Relay:
    """One streamed run: Lifeline's events as Haystack StreamingChunks, and the reply."""

    def __init__(self, generator: LifelineChatGenerator, request: CompletionRequest) -> None:
        self.request = request
        self.retries = generator.max_retries
        self.info = ComponentInfo.from_component(generator)
        self.started: set[int] = set()  # content blocks begun: 0 for text, 1+ for tool calls
        self.reply: CompletionReply | None = None
        self.text = ""

    async def events(self, client: Lifeline) -> AsyncIterator[tuple[Event, str]]:
        """On the connection's loop: each event, with the text so far (resets applied) when
        it is a reset or the end."""
        async with client.stream(self.request, overloaded_retries=self.retries) as streamed:
            async for event in streamed:
                yield event, streamed.text if event.kind in ("reset", "end") else ""

    def chunk(self, event: Event, text: str) -> StreamingChunk | None:
        meta: dict[str, Any] = {"route": self.request.route}
        if event.kind == "delta":
            start = self._start(0)
            return StreamingChunk(
                content=event.text, meta=meta, component_info=self.info, index=0, start=start
            )
        if event.kind == "tool_call" and event.tool_call is not None:
            piece, block = event.tool_call, event.tool_call.index + 1
            delta = ToolCallDelta(
                index=piece.index, tool_name=piece.name, arguments=piece.arguments, id=piece.id
            )
            return StreamingChunk(
                content="",
                meta=meta,
                component_info=self.info,
                index=block,
                start=self._start(block),
                tool_calls=[delta],
            )
        if event.kind == "reset" and event.reset is not None:
            self.started.clear()  # the next attempt starts its blocks again
            reset = {
                "attempt": event.reset.attempt,
                "discard": event.reset.discard,
                "error": msgspec.to_builtins(event.reset.error),
            }
            meta |= {"lifeline_reset": reset, "lifeline_text": text}
            return StreamingChunk(content="", meta=meta, component_info=self.info)
        self.reply, self.text = event.reply, text
        if self.reply is None or self.reply.status != "ok":
            return None  # message() raises it
        reply = self.reply
        meta |= {"model": reply.model, "usage": _usage(reply), "finish_reason": reply.finish_reason}
        return StreamingChunk(
            content="", meta=meta, component_info=self.info, finish_reason=reply.finish_reason
        )

    def message(self) -> ChatMessage:
        assert self.reply is not None
        return _message(self.reply, self.request, self.text)

    def _start(self, block: int) -> bool:
        first = block not in self.started
        self.started.add(block)
        return first


# ---- Haystack -> the wire ------------------------------------------------------------------


def _wire_forms(generation_kwargs: dict[str, Any]) -> dict[str, Any]:
    """`generation_kwargs` with OpenAIChatGenerator's forms of them in the wire's (a
    FallbackChatGenerator hands every generator the same): a Pydantic model as response_format
    becomes its JSON Schema (the form a pipeline's file holds too), a tool_choice naming a
    function {"type": "function", "function": {"name": ...}} becomes {"name": ...}, and a stop
    that is one string a list of it."""
    kwargs = dict(generation_kwargs)
    model = kwargs.get("response_format")
    if isinstance(model, type) and issubclass(model, BaseModel):
        schema = {"name": model.__name__, "schema": model.model_json_schema()}
        kwargs["response_format"] = {"type": "json_schema", "json_schema": schema}
    choice = kwargs.get("tool_choice")
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        kwargs["tool_choice"] = {"name": choice["function"].get("name")}
    if isinstance(kwargs.get("stop"), str):
        kwargs["stop"] = [kwargs["stop"]]
    return kwargs


def _to_wire(message: ChatMessage) -> WireMessage:
    role = message.role
    if role == ChatRole.TOOL:
        result = message.tool_call_result
        assert result is not None
        if not result.origin.id:
            raise ValueError("Lifeline needs the id of the tool call a tool result answers")
        content = result.result if isinstance(result.result, str) else _parts(result.result)
        return WireMessage("tool", content, tool_call_id=result.origin.id)
    if role == ChatRole.ASSISTANT:
        calls = [
            WireToolCall(call.id or "", call.tool_name, json.dumps(call.arguments))
            for call in message.tool_calls
        ]
        text = "".join(message.texts)  # every text part: .text is the first one only
        return WireMessage("assistant", text, tool_calls=calls or None)
    if role not in (ChatRole.SYSTEM, ChatRole.USER):
        raise ValueError(f"Lifeline has no role for a {role.value} message")
    parts = [p for p in message._content if not isinstance(p, ToolCall | ToolCallResult)]
    if len(parts) == 1 and isinstance(parts[0], TextContent):
        return WireMessage(role.value, parts[0].text)  # type: ignore[arg-type]
    return WireMessage(role.value, _parts(parts))  # type: ignore[arg-type]  # (texts, images)


def _parts(content: Any) -> list[Part]:
    parts: list[Part] = []
    for part in content:
        if isinstance(part, TextContent):
            parts.append(TextPart(part.text))
        elif isinstance(part, ImageContent):
            parts.append(ImagePart(data=part.base64_image, media_type=part.mime_type))
        else:
            raise TypeError(f"Lifeline takes text and images; not a {type(part).__name__}")
    return parts


def _tool(spec: dict[str, Any]) -> dict[str, Any]:
    tool = {"name": spec["name"], "parameters": spec.get("parameters") or {}}
    if spec.get("description"):
        tool["description"] = spec["description"]
    return tool


# ---- the wire -> Haystack ------------------------------------------------------------------


def _message(reply: CompletionReply, request: CompletionRequest, text: str) -> ChatMessage:
    if reply.status != "ok":
        raise ReplyError(reply)
    calls = [
        ToolCall(tool_name=call.name, arguments=_arguments(call.arguments), id=call.id)
        for call in reply.tool_calls or ()
    ]
    meta = {
        "model": reply.model,
        "index": 0,
        "finish_reason": reply.finish_reason,
        "usage": _usage(reply),
        "provider": reply.provider,
        "target": reply.target,
        "route": request.route,
        "id": reply.id,
        "trace_id": reply.trace_id,
        "latency_ms": reply.latency_ms,
        "attempts": msgspec.to_builtins(reply.attempts),
    }
    return ChatMessage.from_assistant(text or None, meta=meta, tool_calls=calls or None)


def _arguments(arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return {"_raw": arguments}  # kept for the caller to see; a tool will refuse it
    return value if isinstance(value, dict) else {"_raw": arguments}


def _usage(reply: CompletionReply) -> dict[str, int]:
    usage = reply.usage
    if usage is None:
        return {}
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
    }
