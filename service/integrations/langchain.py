"""Lifeline as a LangChain chat model: one model where a chain had `with_fallbacks`.

    from service.integrations.langchain import ChatLifeline

    # before: primary.with_fallbacks([backup]); now the route's targets are the fallbacks
    model = ChatLifeline(model="default", timeout=30)      # model = a Lifeline route
    model.invoke("Why did the chicken cross the road?")
    for chunk in model.stream("Tell me a story"): ...
    await model.ainvoke(...); async for chunk in model.astream(...): ...
    model.bind_tools([get_weather]).invoke("Weather in Paris?").tool_calls
    model.with_structured_output(Person, method="json_schema").invoke(...)

An AIMessage carries `usage_metadata` and, in `response_metadata`, who served (`provider`,
`target`, `model_name`), every `attempts` entry, the `trace_id` and the reply's `id`.
`invoke(..., model="other-route")` sends one call to another route; any CompletionRequest
field works as a call keyword too (`seed=7`, `targets=[...]`, `fallback_on=[...]`), or for every
call in `request_options`.

Errors: an error reply raises ReplyError (its `.reply` has the attempts), so LangChain's own
retries and fallbacks still see a failure: RequestRefused (a ValueError) when no resend can
cure it, Unavailable (overloaded, shutting_down), DeadlineExceeded (a TimeoutError), else
ReplyError itself (service/client.py says which is which); a transport problem raises the client's
LifelineError (Unreachable, NoDispatcher, NoAnswer, NotPermitted: a ValueError, its user may not
publish the request). `max_retries` sends a request again when
the dispatcher answers `overloaded` or `shutting_down` (the errors worth resending: the rest
Lifeline retried and fell back on already).

Streaming: LangChain adds up the chunks it was given and has no way to take one back, so a
stream asks Lifeline for on_midstream = "fail" by default: an attempt that fails before its
first token falls back unseen, one that fails after it ends the stream with ReplyError
(midstream_failed), as `with_fallbacks` does. With `on_midstream="continue"`, a target that
can continue the text does so seamlessly; a reset that would take text back raises
TextWithdrawn instead of handing out a wrong sum.

Sync and async alike: Lifeline's client is async (nats-py), and LangChain calls models from
any thread and any event loop. Every call runs on one private event loop in a daemon thread
that owns the NATS connection for this URL (service/integrations/bridge.py): invoke() blocks
only its own thread, ainvoke() awaits it from the caller's loop (cancelling it cancels the
request), and a stream's events cross over through a queue. Models naming the same
`nats_url` share the connection; a model's `close()` releases its own hold, and the
connection closes with the last model's (the next call opens another).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

import msgspec
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages import ChatMessage as LangChainMessage
from langchain_core.messages.ai import InputTokenDetails, OutputTokenDetails, UsageMetadata
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import (
    JsonOutputKeyToolsParser,
    PydanticToolsParser,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel, Field, SecretStr, field_serializer

from schemas import ChatMessage, CompletionReply, CompletionRequest
from schemas.streaming import Event
from schemas.wire import ImagePart, Part, TextPart, ToolCall
from service.client import (
    DeadlineExceeded,
    LifelineError,
    ReplyError,
    RequestRefused,
    Unavailable,
    request_of,
)
from service.embedded import redact_url
from service.integrations import bridge

__all__ = [
    "ChatLifeline",
    "DeadlineExceeded",
    "ReplyError",
    "RequestRefused",
    "TextWithdrawn",
    "Unavailable",
]

_ROLES = {"system", "user", "assistant", "tool", "developer"}
# Call keywords LangChain itself passes along, not for Lifeline.
_LANGCHAIN_KWARGS = {"stream", "ls_structured_output_format"}


class TextWithdrawn(LifelineError):
    """Lifeline took streamed text back (a reset: the attempt that wrote it failed), and a
    LangChain stream cannot: its chunks are already added up. Use on_midstream "fail" (the
    default) or "continue" with targets that can continue, or invoke()."""


class ChatLifeline(BaseChatModel):
    """A LangChain chat model backed by Lifeline (see the module's docstring)."""

    model: str = "default"
    """The Lifeline route (its targets, in order, are the fallbacks)."""
    nats_url: str | None = Field(default=None, repr=False)  # credentials: shown, dumped as ***
    """NATS URL, or a comma-separated cluster list. Default: $NATS_URL, else
    nats://127.0.0.1:4222; credentials in it or in NATS_CREDS, NATS_USER, ... as for the
    `lifeline` commands."""
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    timeout: float | None = None
    """Seconds for the whole request, every retry and fallback included (timeout_s)."""
    max_retries: int = 2
    """Resends of a request the dispatcher answered `overloaded` or `shutting_down`."""
    streaming: bool = False
    on_midstream: Literal["fail", "continue", "reset"] = "fail"
    """For streams: what a failure after the first token does (see the module's docstring)."""
    request_options: dict[str, Any] = Field(default_factory=dict)
    """Other CompletionRequest fields for every call: targets, fallback_on, metadata, ..."""
    api_key: SecretStr | None = Field(default=None, exclude=True, repr=False)
    """Accepted as LangChain's standard parameter and never used or sent: the providers'
    keys live in Lifeline's config, and NATS credentials go in nats_url or NATS_*."""

    @field_serializer("nats_url")
    def _nats_url_dumped(self, url: str | None) -> str | None:
        """model_dump() and model_dump_json() (what a tracer, a cache or a saved chain may
        keep) give the URL without its user info or query values, as the `lifeline` commands
        print it: the credentials go to the connection only."""
        return redact_url(url) if url else url

    @property
    def _llm_type(self) -> str:
        return "lifeline"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "stop": self.stop,
            "seed": self.seed,
            "timeout": self.timeout,
            **self.request_options,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="lifeline",
            ls_model_name=kwargs.get("model") or self.model,
            ls_model_type="chat",
        )
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    # ---- the calls --------------------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        request = self.lifeline_request(messages, stop, **kwargs)
        reply = self._connection().call(
            lambda client: client.complete(request, overloaded_retries=self.max_retries)
        )
        return _result(reply, request)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        request = self.lifeline_request(messages, stop, **kwargs)
        reply = await self._connection().acall(
            lambda client: client.complete(request, overloaded_retries=self.max_retries)
        )
        return _result(reply, request)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        request = self._stream_request(messages, stop, kwargs)
        events = self._connection().iterate(
            lambda client: client.stream(request, overloaded_retries=self.max_retries)
        )
        with contextlib.closing(events):  # stopped early: the stream is unsubscribed at once
            for event in events:
                chunk = _chunk(event, request)
                if chunk is None:
                    continue
                if run_manager is not None:  # see _astream
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        request = self._stream_request(messages, stop, kwargs)
        events = self._connection().aiterate(
            lambda client: client.stream(request, overloaded_retries=self.max_retries)
        )
        async with contextlib.aclosing(events):
            async for event in events:
                chunk = _chunk(event, request)
                if chunk is None:
                    continue
                if run_manager is not None:
                    # Given a run manager (LangChain's v3 event path), the model tells the
                    # callbacks of every chunk, as LangChain does itself on the others: a
                    # tool call's pieces and the last chunk's usage too, not the text alone.
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    def _should_stream(
        self,
        *,
        async_api: bool,
        run_manager: Any = None,
        **kwargs: Any,
    ) -> bool:
        """invoke() streams only when asked (stream(), or streaming=True). LangChain streams
        it too whenever a streaming observer is attached (astream_events, LangGraph's
        "messages" mode), and a stream asks for on_midstream="fail": observing a chain took
        away the fallback its invoke() would make on an answer that fails a check (JSON, a
        tool call)."""
        if not (kwargs.get("stream") or self.streaming):
            return False
        return super()._should_stream(async_api=async_api, run_manager=run_manager, **kwargs)

    def _should_use_protocol_streaming(
        self,
        *,
        async_api: bool,
        run_manager: Any = None,
        **kwargs: Any,
    ) -> bool:
        """The same for LangChain's v3 event path, which an invoke takes instead when a v3
        event handler watches it (LangGraph's "messages" stream): only when asked."""
        if not (kwargs.get("stream") or self.streaming):
            return False
        return super()._should_use_protocol_streaming(
            async_api=async_api, run_manager=run_manager, **kwargs
        )

    def close(self) -> None:
        """Release this model's hold on the NATS connection of its URL: the connection closes
        once no model holds it (their calls in flight end with LifelineError then); other
        models' calls, and this one's in flight, go on while another holds it. A call after
        close() holds it again (or opens a new one)."""
        bridge.release(self.nats_url, self)

    def _connection(self) -> bridge.Shared:
        return bridge.shared(self.nats_url, "lifeline-langchain", holder=self)

    # ---- the request ------------------------------------------------------------------------

    def lifeline_request(
        self, messages: Sequence[BaseMessage], stop: list[str] | None = None, **kwargs: Any
    ) -> CompletionRequest:
        """The CompletionRequest a call with these messages and keywords sends."""
        settings = {
            "route": self.model,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "seed": self.seed,
            "timeout_s": self.timeout,
            "stop": self.stop or None,
        }
        fields = {**self.request_options, **{k: v for k, v in settings.items() if v is not None}}
        for name, value in kwargs.items():
            if name in _LANGCHAIN_KWARGS:
                continue
            if name == "model":
                fields["route"] = value
            elif name == "timeout":
                fields["timeout_s"] = value
            elif name in CompletionRequest.__struct_fields__:
                fields[name] = value
            else:
                raise ValueError(
                    f"ChatLifeline: unknown call argument {name!r} "
                    f"(Lifeline takes: model, timeout, {', '.join(_REQUEST_FIELDS)})"
                )
        if stop:
            fields["stop"] = stop
        return request_of([_to_wire(m) for m in messages], **fields)

    def _stream_request(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> CompletionRequest:
        return self.lifeline_request(
            messages, stop, **{"on_midstream": self.on_midstream, **kwargs}
        )

    # ---- tools and structured output ---------------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        parallel_tool_calls: bool | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """The model with `tools` (any form LangChain converts to an OpenAI tool: BaseTool,
        function, pydantic class, dict) in every request. `tool_choice`: "auto", "none",
        "any" / "required" / True (at least one call), or a tool's name (that one)."""
        specs = [_tool(t, strict) for t in tools]
        if tool_choice is not None and tool_choice is not False:
            kwargs["tool_choice"] = _tool_choice(tool_choice)
        elif tool_choice is False:
            kwargs["tool_choice"] = "none"
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        return super().bind(tools=specs, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        include_raw: bool = False,
        method: Literal["function_calling", "json_schema", "json_mode"] = "function_calling",
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """Answers parsed into `schema` (a pydantic class, a JSON Schema, a TypedDict, an
        OpenAI tool). `method`: "function_calling" forces one call of a tool shaped like the
        schema; "json_schema" sends it as response_format json_schema and "json_mode" asks for
        a JSON object: Lifeline checks the answer either way, and one that does not parse or
        validate falls back to the route's next target like a failure."""
        if kwargs:
            raise ValueError(f"with_structured_output: unsupported arguments {sorted(kwargs)}")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        spec = convert_to_openai_tool(schema, strict=strict)["function"]
        structured = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
        parser: Runnable[Any, Any]
        if method == "function_calling":
            llm = self.bind_tools(
                [schema],
                tool_choice=spec["name"],
                strict=strict,
                ls_structured_output_format=structured,
            )
            parser = (
                PydanticToolsParser(tools=[schema], first_tool_only=True)  # type: ignore[list-item]
                if is_pydantic
                else JsonOutputKeyToolsParser(key_name=spec["name"], first_tool_only=True)
            )
        elif method in ("json_schema", "json_mode"):
            if method == "json_schema":
                json_schema = {"name": spec["name"], "schema": spec.get("parameters", {})}
                if spec.get("description"):
                    json_schema["description"] = spec["description"]
                if strict is not None:
                    json_schema["strict"] = strict
                response_format = {"type": "json_schema", "json_schema": json_schema}
            else:
                response_format = {"type": "json_object"}
            llm = self.bind(response_format=response_format, ls_structured_output_format=structured)
            parser = (
                PydanticOutputParser(pydantic_object=schema)  # type: ignore[arg-type]
                if is_pydantic
                else JsonOutputParser()
            )
        else:
            raise ValueError(f"method {method!r}: use function_calling, json_schema or json_mode")
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(
            parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
        )
        unparsed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks(
            [unparsed], exception_key="parsing_error"
        )


_REQUEST_FIELDS = [f for f in CompletionRequest.__struct_fields__ if f not in ("messages", "id")]


# ---- LangChain -> the wire ------------------------------------------------------------------


def _to_wire(message: BaseMessage) -> ChatMessage:
    if isinstance(message, SystemMessage):
        return ChatMessage("system", _content(message))
    if isinstance(message, HumanMessage):
        return ChatMessage("user", _content(message))
    if isinstance(message, AIMessage):
        calls = [
            ToolCall(call.get("id") or "", call["name"], json.dumps(call["args"]))
            for call in message.tool_calls
        ]
        return ChatMessage("assistant", _content(message, assistant=True), tool_calls=calls or None)
    if isinstance(message, ToolMessage):
        return ChatMessage("tool", _content(message), tool_call_id=message.tool_call_id)
    if isinstance(message, LangChainMessage) and message.role in _ROLES:
        return ChatMessage(message.role, _content(message))  # type: ignore[arg-type]
    raise ValueError(f"Lifeline has no role for a {type(message).__name__}")


def _content(message: BaseMessage, assistant: bool = False) -> str | list[Part]:
    """A message's content: its string, or its text and image blocks (LangChain's own or
    OpenAI's form; an assistant's tool-call and reasoning blocks are left out)."""
    if isinstance(message.content, str):
        return message.content
    parts: list[Part] = []
    for block in message.content_blocks:
        kind = block["type"]
        if kind == "text":
            parts.append(TextPart(block["text"]))  # type: ignore[typeddict-item]
        elif kind == "image" and block.get("url"):
            parts.append(ImagePart(url=block["url"]))  # type: ignore[typeddict-item]
        elif kind == "image" and block.get("base64"):
            media_type = block.get("mime_type") or "image/png"
            data = block["base64"]  # type: ignore[typeddict-item]
            parts.append(ImagePart(data=data, media_type=media_type))
        elif not assistant:
            raise ValueError(
                f"Lifeline takes text and images (by URL or base64); a {kind!r} block is not "
                "supported"
            )
    return parts


def _tool(tool: Any, strict: bool | None) -> dict[str, Any]:
    converted = convert_to_openai_tool(tool, strict=strict)
    if converted.get("type") != "function":  # passed through as it is: a provider's own tool
        raise ValueError(
            f"Lifeline sends function tools (a name, a description, JSON Schema parameters), "
            f"which every provider of a route can take; not a {converted.get('type')!r} tool"
        )
    function = converted["function"]
    spec = {"name": function["name"], "parameters": function.get("parameters") or {}}
    if function.get("description"):
        spec["description"] = function["description"]
    return spec


def _tool_choice(choice: str | dict[str, Any] | bool) -> str | dict[str, str]:
    if choice is True or choice in ("any", "required"):
        return "required"
    if choice in ("auto", "none"):
        return choice  # type: ignore[return-value]
    if isinstance(choice, str):
        return {"name": choice}
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") or choice.get("name")
        if name:
            return {"name": name}
    raise ValueError(f"tool_choice {choice!r}: use auto, none, any, required or a tool's name")


# ---- the wire -> LangChain ------------------------------------------------------------------


def _result(reply: CompletionReply, request: CompletionRequest) -> ChatResult:
    if reply.status != "ok":
        raise ReplyError(reply)
    calls, invalid = [], []
    for call in reply.tool_calls or ():
        args = _arguments(call.arguments)
        if isinstance(args, dict):
            calls.append(tool_call(name=call.name, args=args, id=call.id))
        else:
            invalid.append(
                invalid_tool_call(name=call.name, args=call.arguments, id=call.id, error=args)
            )
    message = AIMessage(
        content=reply.content or "",
        tool_calls=calls,
        invalid_tool_calls=invalid,
        usage_metadata=_usage(reply),
        response_metadata=_metadata(reply, request),
        id=reply.id,
    )
    info = {"finish_reason": reply.finish_reason} if reply.finish_reason else None
    return ChatResult(generations=[ChatGeneration(message=message, generation_info=info)])


def _arguments(arguments: str) -> dict[str, Any] | str:
    """A tool call's arguments, or why they are not a JSON object."""
    try:
        value = json.loads(arguments or "{}")
    except ValueError as exc:
        return f"the arguments are not JSON: {exc}"
    return value if isinstance(value, dict) else "the arguments are not a JSON object"


def _chunk(event: Event, request: CompletionRequest) -> ChatGenerationChunk | None:
    if event.kind == "delta":
        return ChatGenerationChunk(message=AIMessageChunk(content=event.text))
    if event.kind == "tool_call" and event.tool_call is not None:
        piece = event.tool_call
        chunk = tool_call_chunk(
            name=piece.name, args=piece.arguments, id=piece.id, index=piece.index
        )
        return ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[chunk]))
    if event.kind == "reset":
        if event.reset is not None and event.reset.discard:
            raise TextWithdrawn(
                f"attempt {event.reset.attempt} failed after {event.reset.discard} streamed "
                f"pieces ({event.reset.error.type}: {event.reset.error.message}) and Lifeline "
                "took them back, which a LangChain stream cannot"
            )
        return None  # continued from the text already sent: nothing to take back
    reply = event.reply
    assert reply is not None
    if reply.status != "ok":
        raise ReplyError(reply)
    last = AIMessageChunk(
        content="",
        usage_metadata=_usage(reply),
        response_metadata=_metadata(reply, request),
        id=reply.id,
        chunk_position="last",
    )
    info = {"finish_reason": reply.finish_reason} if reply.finish_reason else None
    return ChatGenerationChunk(message=last, generation_info=info)


def _usage(reply: CompletionReply) -> UsageMetadata | None:
    usage = reply.usage
    if usage is None:
        return None
    metadata = UsageMetadata(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        total_tokens=usage.input_tokens + usage.output_tokens,
    )
    if usage.cached_input_tokens:
        metadata["input_token_details"] = InputTokenDetails(cache_read=usage.cached_input_tokens)
    if usage.reasoning_tokens:
        metadata["output_token_details"] = OutputTokenDetails(reasoning=usage.reasoning_tokens)
    return metadata


def _metadata(reply: CompletionReply, request: CompletionRequest) -> dict[str, Any]:
    """Who served and how: Lifeline's reply, less the answer."""
    return {
        "model_name": reply.model,
        "provider": reply.provider,
        "target": reply.target,
        "route": request.route,
        "id": reply.id,
        "trace_id": reply.trace_id,
        "finish_reason": reply.finish_reason,
        "latency_ms": reply.latency_ms,
        "attempts": msgspec.to_builtins(reply.attempts),
    }
