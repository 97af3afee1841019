"""The `openai` provider: OpenAI Chat Completions, and any server that speaks it.

    POST {base_url}/chat/completions     Authorization: Bearer <key>, OpenAI-Organization: <org>
    {"model", "messages": [{"role", "content": str | [part] | null, "tool_calls"?,
                            "tool_call_id"?}],
     "max_tokens"?, "temperature"?, "top_p"?, "response_format"?, "tools"?, "tool_choice"?,
     "parallel_tool_calls"?, "stop"?, "seed"?}
      part:      {"type": "text", "text"} | {"type": "image_url", "image_url": {"url"}}
      tool_call: {"id", "type": "function", "function": {"name", "arguments": JSON text}}
      tool:      {"type": "function", "function": {"name", "description"?, "parameters"}}
    200 -> {"id", "object": "chat.completion", "model",
            "choices": [{"message": {"role", "content", "tool_calls"?}, "finish_reason"}],
            "usage": {"prompt_tokens", "completion_tokens", "total_tokens",
                      "prompt_tokens_details"?: {"cached_tokens"},
                      "completion_tokens_details"?: {"reasoning_tokens"}}}
    4xx/5xx -> {"error": {"message", "type", "param", "code"}}

    streamed: the same body with "stream": true, "stream_options": {"include_usage": true}
    200 -> text/event-stream, one chat.completion.chunk per event
           data: {"model", "choices": [{"delta": {"role"?, "content"?, "tool_calls"?},
                                        "finish_reason"}], "usage": null}
             a tool call streams as deltas of one index: the first {"index", "id", "type",
             "function": {"name", "arguments": ""}}, then {"index", "function": {"arguments"}}
           then one {"choices": [], "usage": {...}}, then data: [DONE];
           an error mid-stream is data: {"error": {"message", "type", "code"}}

Local OpenAI-compatible servers (vLLM, Ollama, llama.cpp, LM Studio) work with
`base_url` pointed at them and `api_key_env = ""` (no Authorization header).
The body builder and the response and error parsing are shared with workers.azure_openai.
"""

from __future__ import annotations

import hashlib
import os
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

import httpx
import msgspec
from httpx_sse import ServerSentEvent

from schemas import ChatMessage, ProviderOk, ProviderRequest, Usage
from schemas.wire import (
    FinishReason,
    ImagePart,
    NamedTool,
    Part,
    TextPart,
    TokenCount,
    Tool,
    ToolCall,
    ToolCallDelta,
)
from workers.base import (
    Delta,
    HttpProvider,
    ProviderError,
    classify_status,
    decode_body,
    decode_event,
    error_body,
    error_message,
    error_text,
    event_error,
    require_api_key,
    retry_after_s,
    stream_error,
    stream_error_text,
    unexpected_body,
)

# The kind's keys live with the others' (no HTTP code loaded to check a config); imported from
# here as before.
from workers.settings import OpenAISettings

# error.code (and Azure's error.innererror.code) values that mean more than the HTTP status says.
_CODE_KINDS = {
    "context_length_exceeded": "context_length",
    "content_filter": "content_filter",
    "content_policy_violation": "content_filter",
    "ResponsibleAIPolicyViolation": "content_filter",
    # A 429 that no wait cures: the account's credit is spent, or its billing is not active
    # (a retry would only fail again).
    "insufficient_quota": "quota",
    "billing_not_active": "quota",
}
# The longest tool call id OpenAI takes (400 string_above_max_length past it).
_MOST_ID_CHARS = 40
# error.type values that say more than the status, where error.code does not: llama.cpp's
# server names a prompt over its context so (a 400, code 400); OpenAI's inactive billing has
# come with a null code, its type saying it.
_TYPE_KINDS = {"exceed_context_size_error": "context_length", "billing_not_active": "quota"}
# How OpenAI words a prompt past the model's context, which servers that copy its message but
# not its code say alone (vLLM: type BadRequestError, code 400; DeepSeek; OpenRouter).
_TOO_LONG = "maximum context length is"
# How OpenRouter words a 403 for an input the moderation its model requires flagged ("<model>
# requires moderation on <provider>. Your input was flagged for ..."), with an integer code.
_FLAGGED = "your input was flagged"


# The most stop sequences OpenAI and Azure OpenAI take (their reference: "Up to 4 sequences
# where the API will stop generating further tokens"; a 400 past them). Other OpenAI-compatible
# servers (vLLM, llama.cpp) take any number.
MOST_STOPS = 4


def max_tokens_field(settings: OpenAISettings) -> str:
    if settings.max_tokens_field is not None:
        return settings.max_tokens_field
    host = urllib.parse.urlsplit(settings.base_url).hostname
    return "max_completion_tokens" if host == "api.openai.com" else "max_tokens"


def chat_body(
    request: ProviderRequest,
    model: str,
    max_tokens_as: str = "max_tokens",
    most_stops: int | None = None,
) -> dict[str, Any]:
    """The Chat Completions body; ProviderError(bad_request) for more stop sequences than
    `most_stops` (None: any number), which the server would refuse."""
    if most_stops is not None and len(request.stop or ()) > most_stops:
        raise ProviderError(
            "bad_request",
            f"the request has {len(request.stop or ())} stop sequences; this API takes at most "
            f"{most_stops}: send fewer",
        )
    body: dict[str, Any] = {
        "model": model,
        "messages": chat_messages(request.messages),
    }
    # Unset options are left out so the provider's own defaults apply.
    if request.max_tokens is not None:
        body[max_tokens_as] = request.max_tokens
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop is not None:
        body["stop"] = request.stop
    if request.seed is not None:
        body["seed"] = request.seed
    # json_object / json_schema, OpenAI's own shape; "regex" is Lifeline's check, not OpenAI's.
    if request.response_format is not None and request.response_format.type != "regex":
        body["response_format"] = msgspec.to_builtins(request.response_format)
        if request.response_format.type == "json_object" and not _says_json(request.messages):
            _ask_for_json(body["messages"])
    return body | _tool_options(request)


def _says_json(messages: Iterable[ChatMessage]) -> bool:
    return any("json" in message.text.lower() for message in messages)


def _ask_for_json(messages: list[dict[str, Any]]) -> None:
    """OpenAI refuses json_object unless a message says "JSON" (400 "'messages' must contain
    the word 'json'"), and documents that a model not told may write whitespace to max_tokens:
    a system message asks for it, after the client's own."""
    first = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    messages.insert(first, {"role": "system", "content": "Answer with a JSON object."})


def chat_messages(messages: Iterable[ChatMessage]) -> list[dict[str, Any]]:
    """The conversation in Chat Completions' shape. OpenAI takes images in user messages only
    (a 400 for one elsewhere): the images of any other message follow it, in order, as a user
    message; those of a run of tool results follow the run (a message between them would part
    them from the calls they answer, which OpenAI refuses)."""
    sent: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    for message in messages:
        if images and message.role != "tool":
            sent.append({"role": "user", "content": images})
            images = []
        sent.append(chat_message(message))
        if message.role != "user" and isinstance(message.content, list):
            images += [_part(part) for part in message.content if isinstance(part, ImagePart)]
    if images:
        sent.append({"role": "user", "content": images})
    return sent


def chat_message(message: ChatMessage) -> dict[str, Any]:
    """One message in Chat Completions' shape. A developer message goes as system: every
    compatible server knows system (local ones may not know developer), and OpenAI's newer
    models read system as developer."""
    if message.role == "tool":
        call_id = _call_id(message.tool_call_id or "")
        return {"role": "tool", "tool_call_id": call_id, "content": message.text}
    if message.role == "assistant" and message.tool_calls:
        calls = [_tool_call(call) for call in message.tool_calls]
        return {"role": "assistant", "content": message.text or None, "tool_calls": calls}
    role = "system" if message.role == "developer" else message.role
    return {"role": role, "content": _content(message.content, images=role == "user")}


def _content(content: str | list[Part] | None, images: bool) -> str | list[dict[str, Any]]:
    """A message's content: a string as is, parts as OpenAI's content parts, without images
    unless `images` (see chat_messages). Only an assistant message calling tools may go without
    content: for any other, none (or no text part) is the empty string."""
    if content is None or isinstance(content, str):
        return content or ""
    if images:
        return [_part(part) for part in content]
    return [_part(part) for part in content if isinstance(part, TextPart)] or ""


def _part(part: Part) -> dict[str, Any]:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    # An inline image goes as a data URL, the one form image_url takes besides a link.
    url = part.url if part.url is not None else f"data:{part.media_type};base64,{part.data}"
    image = {"url": url} if part.detail is None else {"url": url, "detail": part.detail}
    return {"type": "image_url", "image_url": image}


def _tool_call(call: ToolCall) -> dict[str, Any]:
    function = {"name": call.name, "arguments": call.arguments}
    return {"id": _call_id(call.id), "type": "function", "function": function}


def _call_id(call_id: str) -> str:
    """A tool call's id as OpenAI takes it: at most 40 characters (another server's may be
    longer: vLLM's are 46). A longer one is cut, and a short digest of the whole id ends it so
    that two ids never become one; the call and the result answering it get the same id."""
    if len(call_id) <= _MOST_ID_CHARS:
        return call_id
    digest = hashlib.sha256(call_id.encode()).hexdigest()[:12]
    return f"{call_id[: _MOST_ID_CHARS - 13]}_{digest}"


def _tool_options(request: ProviderRequest) -> dict[str, Any]:
    """tools, tool_choice and parallel_tool_calls. Without tools the other two are left out:
    OpenAI refuses them then (400 "only allowed when 'tools' are specified")."""
    if not request.tools:  # an empty list too: OpenAI refuses "tools": []
        return {}
    options: dict[str, Any] = {"tools": [_tool(tool) for tool in request.tools]}
    choice = request.tool_choice
    if isinstance(choice, NamedTool):
        options["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice is not None:
        options["tool_choice"] = choice  # "auto", "none" or "required", as OpenAI names them
    if request.parallel_tool_calls is not None:
        options["parallel_tool_calls"] = request.parallel_tool_calls
    return options


def _tool(tool: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    # No arguments, spelled as the object schema compatible servers expect rather than {}.
    function["parameters"] = tool.parameters or {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


# finish_reason as the wire normalises it: "function_call" is the name before tools were. A
# server's own reasons (vLLM's "abort", ...) say nothing the wire has a name for: None.
# content_filter never gets here: the call fails instead (see _withheld).
_FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
}


def finish_reason(reason: str | None, tool_calls: list[ToolCall] | None) -> FinishReason | None:
    """The wire's finish_reason for OpenAI's. An answer that calls tools but says "stop" (OpenAI's
    answer to a tool_choice naming a function; Gemini's compatible endpoint's always) reads
    "tool_calls", so a client can tell from finish_reason alone that tools are to be run."""
    normalised = _FINISH_REASONS.get(reason) if reason is not None else None
    return "tool_calls" if tool_calls and normalised == "stop" else normalised


def _refused(status: int) -> ProviderError:
    """message.refusal: the model declined to answer, a failure the route may fall back on.
    Its text is the model's output, kept out of error messages (and so of audit events)."""
    return ProviderError(
        "content_filter", "the model refused to answer (message.refusal; its text not kept)", status
    )


def _withheld(status: int) -> ProviderError:
    """finish_reason content_filter: the answer is missing or cut short, a failure the route
    may fall back on, not an answer."""
    return ProviderError(
        "content_filter", "provider withheld the answer (finish_reason content_filter)", status
    )


# The parts of a chat.completion Lifeline reads, typed: msgspec skips the rest, and a body
# that differs fails with the path and the type it found, never a value (see decode_body).
class _Function(msgspec.Struct):
    name: str
    arguments: str = "{}"  # a JSON object, encoded: passed on as sent, never parsed here


class _ToolCall(msgspec.Struct):
    function: _Function
    id: str | None = None

    def wire(self) -> ToolCall:
        # A tool without parameters may be called with arguments "" (several compatible
        # servers): that is no JSON object, so it is "{}", as a streamed call without pieces is.
        return ToolCall(
            self.id or _new_call_id(), self.function.name, self.function.arguments or "{}"
        )


class _Message(msgspec.Struct):
    content: str | None = None  # null when the answer only calls tools, or was filtered
    tool_calls: list[_ToolCall] | None = None
    refusal: str | None = None  # the model declined (Structured Outputs): instead of content


class _Choice(msgspec.Struct):
    message: _Message
    finish_reason: str | None = None


class _PromptDetails(msgspec.Struct):
    cached_tokens: TokenCount | None = None


class _CompletionDetails(msgspec.Struct):
    reasoning_tokens: TokenCount | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: TokenCount | None = None
    completion_tokens: TokenCount | None = None
    # Newer than the counts, and left out by many compatible servers.
    prompt_tokens_details: _PromptDetails | None = None
    completion_tokens_details: _CompletionDetails | None = None

    def tokens(self) -> Usage:
        """The wire's Usage: a count the body leaves out is 0."""
        prompt = self.prompt_tokens_details or _PromptDetails()
        completion = self.completion_tokens_details or _CompletionDetails()
        return Usage(
            input_tokens=self.prompt_tokens or 0,
            output_tokens=self.completion_tokens or 0,
            cached_input_tokens=prompt.cached_tokens or 0,
            reasoning_tokens=completion.reasoning_tokens or 0,
        )


class _Completion(msgspec.Struct):
    choices: Annotated[list[_Choice], msgspec.Meta(min_length=1)]
    model: str | None = None
    usage: _Usage | None = None  # some compatible servers leave usage out


_completion_decoder = msgspec.json.Decoder(_Completion)


# The parts of a chat.completion.chunk Lifeline reads, typed as the whole body's are.
class _FunctionDelta(msgspec.Struct):
    name: str | None = None  # in a call's first delta
    arguments: str | None = None  # a piece of the arguments' JSON text, cut anywhere


class _ToolCallDelta(msgspec.Struct):
    # Which call this delta is part of; Gemini's compatible endpoint leaves it out.
    index: Annotated[int, msgspec.Meta(ge=0)] | None = None
    id: str | None = None  # in a call's first delta
    function: _FunctionDelta | None = None


class _Delta(msgspec.Struct):
    content: str | None = None  # absent from the first chunk (role only) and the last ones
    tool_calls: list[_ToolCallDelta] | None = None
    refusal: str | None = None  # pieces of a refusal, instead of content


class _ChunkChoice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    # Empty in the usage chunk, and in Azure's chunks of prompt_filter_results.
    choices: list[_ChunkChoice] = []
    model: str | None = None
    usage: _Usage | None = None  # null but in the last chunk (include_usage)
    error: msgspec.Raw = msgspec.Raw()  # {"message", "type", "code"}: the stream failed


_chunk_decoder = msgspec.json.Decoder(_Chunk)


def parse_chat_completion(response: httpx.Response, model: str) -> ProviderOk:
    """A 200 chat.completion as ProviderOk; `model` stands in when the body names none."""
    data = decode_body(response, _completion_decoder)
    choice = data.choices[0]
    if choice.finish_reason == "content_filter":
        raise _withheld(response.status_code)
    message = choice.message
    if message.refusal:
        raise _refused(response.status_code)
    calls = [call.wire() for call in message.tool_calls or ()]
    if message.content is None and not calls:
        raise unexpected_body(response, "choices[0].message has neither content nor tool_calls")
    return ProviderOk(
        content=message.content or "",
        model=data.model or model,
        usage=(data.usage or _Usage()).tokens(),
        tool_calls=calls or None,
        finish_reason=finish_reason(choice.finish_reason, calls),
    )


def _code_kind(error: dict[str, Any]) -> str | None:
    """The kind error.code (or Azure's error.innererror.code) names, else error.type, else
    error.message's wording of a prompt too long or of an input flagged, if one names one."""
    inner = error.get("innererror")
    codes = [error.get("code"), inner.get("code") if isinstance(inner, dict) else None]
    kinds = [_CODE_KINDS[c] for c in codes if isinstance(c, str) and c in _CODE_KINDS]
    kind = error.get("type")
    if isinstance(kind, str) and kind in _TYPE_KINDS:
        kinds.append(_TYPE_KINDS[kind])
    message = error.get("message")
    if isinstance(message, str) and _TOO_LONG in message.lower():
        kinds.append("context_length")
    if isinstance(message, str) and _FLAGGED in message.lower():
        kinds.append("content_filter")
    return kinds[0] if kinds else None


def chat_error(response: httpx.Response, label: str, secrets: Iterable[str]) -> ProviderError:
    error = error_body(response)
    kind = _code_kind(error) or classify_status(response.status_code)
    message = error_message(label, response.status_code, error_text(error, response), secrets)
    return ProviderError(
        kind,
        message,
        status_code=response.status_code,
        retry_after_s=retry_after_s(response),
    )


def _new_call_id() -> str:
    """An id for a tool call a compatible server gave none (or ""): the client answers a call
    by its id, and the wire refuses a tool message without one."""
    return "call_" + os.urandom(12).hex()


class _StreamedCall:
    """One tool call as its deltas arrive: id and name from the first, arguments in pieces."""

    def __init__(self, ordinal: int) -> None:
        self.ordinal = ordinal  # its place among the answer's tool calls (0, 1, ...)
        self.id = ""
        self.name = ""
        # The id made for a call its server gave none (streamed on with its name): the
        # server's own id alone tells calls apart, so this one is kept beside it.
        self.made_id = ""
        # UTF-8, one buffer: a str per piece held ~30 times the arguments' size when they came
        # two characters at a time. Exact: msgspec refuses lone surrogates, so each encodes.
        self.arguments = bytearray()


class _StreamedCalls:
    """A stream's tool calls, built from their deltas by index. A delta without an index
    (Gemini's compatible endpoint sends each call whole, without one) starts a call when it
    brings an id the last call does not have, and adds to the last call otherwise; so does a
    delta whose index is a call's with another id (Ollama, SGLang and others number every
    parallel call 0: merged, two calls became one whose arguments were not JSON).

    What streams on is normalised as the wire says: the calls numbered 0, 1, ... in the order
    they begin (an upstream's indexes may skip), each call's id and name in its first piece
    only (some compatible servers repeat them in every delta, and a reader joining the pieces,
    as the SDKs' stream helpers do, would double them)."""

    def __init__(self) -> None:
        self._calls: dict[int, _StreamedCall] = {}  # by key, in the order begun
        self._keys: dict[int, int] = {}  # the upstream's index -> the key of its latest call
        self._last: int | None = None
        self._top = -1  # the highest key so far

    def add(self, delta: _ToolCallDelta) -> ToolCallDelta:
        """Keep a delta for the final answer; the same delta, normalised, to stream on."""
        key = self._indexed(delta) if delta.index is not None else self._unindexed(delta)
        call = self._calls.get(key)
        if call is None:
            call = self._calls[key] = _StreamedCall(len(self._calls))
        self._last = key
        self._top = max(self._top, key)
        function = delta.function or _FunctionDelta()
        new_id = delta.id if delta.id and not call.id else None
        new_name = function.name if function.name and not call.name else None
        call.id = call.id or delta.id or ""
        call.name = call.name or function.name or ""
        if new_name and not call.id:  # a call begins without an id: one a client can answer
            call.made_id = new_id = _new_call_id()
        if function.arguments:
            call.arguments += function.arguments.encode()
        return ToolCallDelta(call.ordinal, new_id, new_name, function.arguments or "")

    def _indexed(self, delta: _ToolCallDelta) -> int:
        assert delta.index is not None
        key = self._keys.get(delta.index)
        if key is None or (delta.id and self._calls[key].id not in ("", delta.id)):
            key = self._keys[delta.index] = self._top + 1
        return key

    def _unindexed(self, delta: _ToolCallDelta) -> int:
        last = self._last
        if last is not None and (not delta.id or delta.id == self._calls[last].id):
            return last
        return self._top + 1

    def finished(self, label: str) -> list[ToolCall] | None:
        """The calls in index order, or None without any; a call whose deltas never named its
        function is a server_error (there is nothing to call)."""
        calls: list[ToolCall] = []
        for call in self._calls.values():  # in the order streamed on
            if not call.name:
                raise ProviderError(
                    "server_error", f"{label} streamed tool call {call.ordinal} without a name", 200
                )
            arguments = call.arguments.decode() or "{}"
            calls.append(ToolCall(call.id or call.made_id or _new_call_id(), call.name, arguments))
        return calls or None


class ChatStream:
    """One streamed chat completion's chunks (a StreamReader): the text deltas, passed on; the
    tool-call deltas, the finish_reason, the model the chunks name and the usage the last one
    carries, kept for the final ProviderOk at data: [DONE]."""

    end = "[DONE]"

    def __init__(self, label: str, model: str) -> None:
        self.label = label
        self.model = model
        self.usage = _Usage()
        self.calls = _StreamedCalls()
        self.finish_reason: str | None = None
        self.chosen = False  # a chunk with a choice came: the usage chunk alone is no answer

    def read(self, event: ServerSentEvent) -> Delta | list[Delta] | ProviderOk | None:
        if event.event == "error":  # llama.cpp's `error:` line (see base._events_of), and ours
            raise self._failed(event_error(event))
        if event.data == "[DONE]":
            if not self.chosen:  # as parse_chat_completion finds a body without a choice
                raise ProviderError(
                    "server_error", f"{self.label} stream ended ([DONE]) without a choice", 200
                )
            return self._finished()
        chunk: _Chunk = decode_event(event, _chunk_decoder)
        error = stream_error(chunk.error)
        if error is not None:
            raise self._failed(error)
        self.model = chunk.model or self.model  # Azure's filter results name "": kept as was
        if chunk.usage is not None:
            self.usage = chunk.usage
        if not chunk.choices:
            return None
        choice = chunk.choices[0]
        self.chosen = True
        if choice.finish_reason == "content_filter":  # as parse_chat_completion: no answer
            raise _withheld(200)
        self.finish_reason = choice.finish_reason or self.finish_reason
        delta = choice.delta or _Delta()
        if delta.refusal:
            raise _refused(200)
        if not delta.tool_calls:
            return delta.content
        calls: list[Delta] = [self.calls.add(call) for call in delta.tool_calls]
        return [delta.content, *calls] if delta.content else calls

    def _finished(self) -> ProviderOk:
        calls = self.calls.finished(self.label)
        return ProviderOk(
            content="",
            model=self.model,
            usage=self.usage.tokens(),
            tool_calls=calls,
            finish_reason=finish_reason(self.finish_reason, calls),
        )

    def _failed(self, error: Any) -> ProviderError:
        """An error chunk: its code's kind as chat_error reads it, else a server_error (the
        request was accepted; the provider failed while answering)."""
        kind = (_code_kind(error) if isinstance(error, dict) else None) or "server_error"
        message = f"{self.label} failed mid-stream: {stream_error_text(error)}"
        return ProviderError(kind, message, 200)


class OpenAIProvider(HttpProvider):
    label = "openai"

    def __init__(
        self,
        settings: OpenAISettings,
        client: httpx.AsyncClient | None = None,
        environ: Mapping[str, str] = os.environ,
        name: str = "",
    ) -> None:
        key = require_api_key(environ, settings.api_key_env) if settings.api_key_env else ""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if settings.organization:
            headers["OpenAI-Organization"] = settings.organization
        url = settings.base_url.rstrip("/") + "/chat/completions"
        self.max_tokens_as = max_tokens_field(settings)
        official = urllib.parse.urlsplit(settings.base_url).hostname == "api.openai.com"
        self.most_stops = MOST_STOPS if official else None
        super().__init__(
            settings,
            url=url,
            secrets=(key,),
            headers=headers,
            client=client,
            base_url=settings.base_url,
            name=name,
        )

    def body(self, request: ProviderRequest, model: str) -> dict[str, Any]:
        return chat_body(request, model, self.max_tokens_as, self.most_stops)

    def parse(self, response: httpx.Response, model: str) -> ProviderOk:
        return parse_chat_completion(response, model)

    def error(self, response: httpx.Response) -> ProviderError:
        return chat_error(response, self.label, self.secrets)

    def stream_body(self, request: ProviderRequest, model: str) -> dict[str, Any]:
        # include_usage: the last chunk carries the usage, as the whole answer's body does.
        stream_options = {"include_usage": True}
        body = chat_body(request, model, self.max_tokens_as, self.most_stops)
        return {**body, "stream": True, "stream_options": stream_options}

    def stream_reader(self, model: str) -> ChatStream:
        return ChatStream(self.label, model)
