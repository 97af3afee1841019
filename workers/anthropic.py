"""The `anthropic` provider: the Anthropic Messages API.

    POST {base_url}/v1/messages     x-api-key: <key>, anthropic-version: <version>
    {"model", "max_tokens", "system"?,
     "messages": [{"role": "user"|"assistant", "content": str | [block, ...]}],
     "temperature"?, "top_p"?, "stop_sequences"?, "tools"?, "tool_choice"?}
        blocks: {"type": "text", "text"}, {"type": "image", "source": {"type": "url", "url"} |
                {"type": "base64", "media_type", "data"}}, {"type": "tool_use", "id", "name",
                "input"} (assistant), {"type": "tool_result", "tool_use_id", "content"?} (user)
        tools: [{"name", "description"?, "input_schema"}]
        tool_choice: {"type": "auto" | "any" | "none"} | {"type": "tool", "name"},
                     with "disable_parallel_tool_use"? (not on "none")
    200 -> {"id", "type": "message", "role": "assistant", "model",
            "content": [{"type": "text", "text"} | {"type": "tool_use", "id", "name", "input"},
                        ...], "stop_reason",
            "usage": {"input_tokens", "output_tokens", "cache_creation_input_tokens"?,
                      "cache_read_input_tokens"?}}
    4xx/5xx -> {"type": "error", "error": {"type", "message"}}   (529 overloaded_error)

    streamed: the same body with "stream": true
    200 -> text/event-stream, each event's data an object whose "type" is its name:
           message_start {"message": {"model", "usage": {"input_tokens", ...}}}
           content_block_start {"index", "content_block": {"type": "text", "text"} |
           {"type": "tool_use", "id", "name", "input": {}}}, then content_block_delta
           {"index", "delta": {"type": "text_delta", "text"} |
           {"type": "input_json_delta", "partial_json"}} ..., content_block_stop, for each block
           message_delta {"delta": {"stop_reason"}, "usage": {"output_tokens", ...}} (cumulative)
           message_stop (the end); ping at any time; error {"error": {"type", "message"}}

System prompts are a top-level field, not a message role, and max_tokens is required. The
messages alternate user and assistant: a tool's answer is a block of a user message.
"""

from __future__ import annotations

import binascii
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import httpx
import imagesize
import msgspec
from httpx_sse import ServerSentEvent

from schemas import ChatMessage, ProviderOk, ProviderRequest, Usage
from schemas.wire import (
    DATA_URL,
    FinishReason,
    ImagePart,
    NamedTool,
    Part,
    ResponseFormat,
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
from workers.settings import AnthropicSettings

_MOST_TOKENS = 2**53 - 1  # TokenCount's bound (schemas.wire)
# How the API words a prompt that does not fit the model's context window (invalid_request_error).
_TOO_LONG = ("prompt is too long", "exceed context limit")
# How it words an answer its filters withheld (invalid_request_error, as a 400 or mid-stream):
# no answer, as a refusal is, which the request's content_filter chain may take.
_BLOCKED = "output blocked by content filtering policy"
# How it words a spent balance and a reached spend limit: an invalid_request_error (a 400), not
# the billing_error its reference lists, yet no wait and no other request cures them.
_SPENT = ("credit balance is too low", "reached your specified api usage limits")
# Each error type with the HTTP status it comes with (https://docs.anthropic.com/en/api/errors):
# an error event in a stream has its type, and no status of its own.
_TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
# The roles the Messages API takes as the top-level system prompt, not as messages.
_SYSTEM_ROLES = ("system", "developer")
# stop_reason as Lifeline's finish_reason. "refusal" is no answer at all (content_filter
# error); "pause_turn" is a long turn the API paused, whose answer so far is whole as it is; a
# stop_reason not listed here (one added later) gives no finish_reason.
_FINISH: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
}
# Lifeline's tool_choice as the Messages API's: "required" is its "any".
_TOOL_CHOICE = {"auto": "auto", "none": "none", "required": "any"}
# A tool_use block's id, as the API requires it (^[a-zA-Z0-9_-]+$), and what may not be in one.
_TOOL_ID = re.compile(r"[a-zA-Z0-9_-]+")
_NOT_IN_TOOL_ID = re.compile(r"[^a-zA-Z0-9_-]")
# The image types the API takes, by the bytes each begins with (WebP: RIFF, then WEBP at 8).
# It refuses a base64 source whose media_type is not one of them, or not what its bytes are;
# OpenAI reads an image whatever it is said to be.
_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)
_IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
# The API's image limits (its vision guide, "General limits"), each a 400 past it: 600 images
# a request (100 for models of a 200k-token context, which the worker cannot tell); 8000
# pixels on a side, 2000 in a request of more than 20 images; and a base64 source of at most
# 5 MiB, counted in base64 characters ("image exceeds 5 MB maximum: ... bytes > 5242880").
_MOST_IMAGES = 600
_MOST_SIDE, _MOST_SIDE_OF_MANY, _MANY_IMAGES = 8000, 2000, 20
_MOST_BASE64_CHARS = 5 * 1024 * 1024
# How much of a JPEG is read for its size (in base64 characters): its SOF segment follows
# the APP ones (EXIF, with a thumbnail, is at most 64 KiB); past this, it is left to the API.
_JPEG_HEAD_CHARS = 128 * 1024
# The input_schema of a tool declared without parameters: the API requires an object schema.
_NO_PARAMETERS = {"type": "object", "properties": {}}
# A tool declared only because the conversation used it (see _tool_fields): any object input.
_ANY_INPUT = {"type": "object"}


# ---- the request ----------------------------------------------------------------------


def messages_body(
    request: ProviderRequest, model: str, default_max_tokens: int
) -> tuple[dict[str, Any], str]:
    """The Messages API body of `request`, and the whitespace left off the end of its prefill
    ("" if it has none: see _turns); ProviderError(bad_request) for an assistant tool call whose
    arguments the API cannot take (not a JSON object)."""
    _check_images(request.messages)
    turns, stripped = _turns(request.messages)
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": request.max_tokens if request.max_tokens is not None else default_max_tokens,
        "messages": turns,
    }
    system = _with_format(_system(request.messages), request.response_format)
    if system:
        body["system"] = system
    if request.temperature is not None:
        # Anthropic takes 0 to 1, the wire (OpenAI's range) 0 to 2: a request falling back here
        # from an OpenAI target with 1.5 is sent Anthropic's highest, not refused as a 400.
        body["temperature"] = min(request.temperature, 1.0)
    # The API reference says to alter temperature or top_p, not both, and newer models refuse
    # the two together with a 400: with a temperature set, top_p is left out.
    if request.top_p is not None and request.temperature is None:
        body["top_p"] = request.top_p
    # The API refuses a stop sequence of only whitespace ("\n\n", which OpenAI takes): such a
    # sequence is left out, so the answer may run past it, rather than every call failing.
    stops = [stop for stop in request.stop or () if stop.strip()]
    if stops:
        body["stop_sequences"] = stops
    body.update(_tool_fields(request))
    # seed has no Messages API equivalent: the API cannot make an answer repeatable, so it is
    # left out. Nor has response_format: it is said in the system prompt (_with_format).
    return body, stripped


def _with_format(
    system: str | list[dict[str, Any]], response_format: ResponseFormat | None
) -> str | list[dict[str, Any]]:
    """The system prompt, and after it what a JSON response_format asks: the Messages API has
    no such field, and a model not told (of the schema, which OpenAI's json_schema gives its
    model) answered in prose or in keys of its own, which the dispatcher's check fails."""
    if response_format is None or response_format.type not in ("json_object", "json_schema"):
        return system
    asked = "Your text answer must be only a JSON object, without any other text"
    spec = response_format.json_schema
    if response_format.type == "json_schema" and spec is not None:
        schema = json.dumps(spec.schema, ensure_ascii=False)
        asked += f", valid against this JSON Schema ({spec.name}): {schema}"
    if isinstance(system, list):
        return [*system, {"type": "text", "text": asked + "."}]
    return f"{system}\n\n{asked}." if system else asked + "."


def _system(messages: Sequence[ChatMessage]) -> str | list[dict[str, Any]]:
    """The system and developer messages as the API's `system`: their strings joined by blank
    lines, or, when one came in parts, a text block per part (the API's long form: parts stay
    apart as sent; images have no place there: see _turns). A message or part of only
    whitespace is left out: the API refuses a system text block without other text, even
    beside others."""
    own = [m for m in messages if m.role in _SYSTEM_ROLES]
    if all(m.content is None or isinstance(m.content, str) for m in own):
        return "\n\n".join(m.content for m in own if m.content and m.content.strip())
    return [block for m in own for block in _text_blocks(m) if block["text"].strip()]


def _text_blocks(message: ChatMessage) -> list[dict[str, Any]]:
    """The message's text as text blocks, one per part (the API refuses an empty one)."""
    content = message.content
    if content is None or isinstance(content, str):
        return _as_blocks(content or "")
    return [{"type": "text", "text": p.text} for p in content if isinstance(p, TextPart) and p.text]


def _turns(messages: Sequence[ChatMessage]) -> tuple[list[dict[str, Any]], str]:
    """The conversation as the API's messages, and the whitespace left off the end of its
    prefill (see below). The API wants user and assistant turns in alternation, and a tool's
    answer is a user turn's block: so consecutive messages of one resulting role (tool
    results, then the user's next words) become one turn of blocks. A conversation the
    assistant begins is sent as it begins: the API takes it (its reference no longer asks for
    a user turn first), and a user turn made up before it would be words nobody wrote. The
    system prompt takes text only: a system message's images are a user turn where it was."""
    turns: list[dict[str, Any]] = []
    final = max((i for i, m in enumerate(messages) if m.role not in _SYSTEM_ROLES), default=-1)
    for index, message in enumerate(messages):
        if message.role in _SYSTEM_ROLES:
            if isinstance(message.content, str) or not message.images:
                continue
            role = "user"
            content: str | list[dict[str, Any]] = [
                _part(p) for p in message.content or () if isinstance(p, ImagePart)
            ]
        else:
            role = "assistant" if message.role == "assistant" else "user"
            content = _content(message)
        if index != final or role != "assistant":  # a prefill's whitespace is stripped below
            content = _without_blank_text(content)
        if not content and index != final:
            # The API refuses an empty turn (OpenAI takes one): it is left out, and the turns
            # either side of it, of one role then, become one.
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = _as_blocks(turns[-1]["content"]) + _as_blocks(content)
        else:
            turns.append({"role": role, "content": content})
    stripped = ""
    if turns and turns[-1]["role"] == "assistant":
        # A last assistant turn is a prefill the answer goes on from (a client's own, or the
        # text so far of on_midstream "continue"), and the API refuses one ending in
        # whitespace: that is stripped, and the answer's text does not repeat it (_Unrepeated).
        turns[-1]["content"], stripped = _without_trailing_whitespace(turns[-1]["content"])
    elif not turns:
        raise _no_conversation()
    elif not turns[-1]["content"]:
        raise _empty_last(final, messages[final].role)
    return turns, stripped


def _without_blank_text(content: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """`content` without its text when that is only whitespace (" ", which OpenAI sometimes
    answers): the API refuses such a turn, though it takes whitespace beside other text."""
    if isinstance(content, str):
        return content if content.strip() else ""
    if any(block["type"] == "text" and block["text"].strip() for block in content):
        return content
    return [block for block in content if block["type"] != "text"]


def _no_conversation() -> ProviderError:
    """Only system and developer messages: OpenAI answers such a request, and the Messages API
    refuses one with no messages. Sent as a user's words instead, they would be another
    request; nothing is asked."""
    return ProviderError(
        "bad_request",
        "the request has no user, assistant or tool message (system and developer ones are "
        "the Messages API's system prompt), and the API refuses it: add a user message",
    )


def _empty_last(index: int, role: str) -> ProviderError:
    """The last message is empty (or only whitespace) and no assistant's: left out, the turn
    before it would be a prefill to go on from (a different question), and sent, the API
    refuses it."""
    return ProviderError(
        "bad_request",
        f"messages[{index}] (the last, a {role} message) is empty or only whitespace, which "
        "the Messages API refuses: give it some text, or leave it out",
    )


def _without_trailing_whitespace(
    content: str | list[dict[str, Any]],
) -> tuple[str | list[dict[str, Any]], str]:
    """`content` without the whitespace it ends in, and that whitespace."""
    if isinstance(content, str):
        kept = content.rstrip()
        return kept, content[len(kept) :]
    blocks = list(content)
    stripped = ""
    while blocks and blocks[-1]["type"] == "text":
        text = blocks.pop()["text"]
        kept = text.rstrip()
        stripped = text[len(kept) :] + stripped
        if kept:
            blocks.append({"type": "text", "text": kept})
            break
    # An empty last assistant turn is the one empty turn the API takes.
    return blocks or "", stripped


class _Unrepeated:
    """An answer's text, piece by piece, without the whitespace stripped from its prefill
    where it starts with it again: the client holds the prefill as it was, whitespace and
    all, and Claude's answer to "Hello" typically begins " world", which joined to "Hello "
    read "Hello  world". Only what matches goes, and nothing once the text went past it."""

    __slots__ = ("_left",)

    def __init__(self, stripped: str) -> None:
        self._left = stripped  # what was left off the prefill the answer goes on from

    def __call__(self, text: str) -> str:
        left, same = self._left, 0
        while same < len(text) and same < len(left) and text[same] == left[same]:
            same += 1
        self._left = left[same:] if same == len(text) else ""  # a next piece may repeat more
        return text[same:]

    def __bool__(self) -> bool:
        return bool(self._left)


def _content(message: ChatMessage) -> str | list[dict[str, Any]]:
    """One message's content: a string as is (the API's short form), else blocks."""
    if message.role == "tool":
        return [_tool_result(message)]
    if message.role == "assistant" and message.tool_calls:
        return _text_blocks(message) + [_tool_use(call) for call in message.tool_calls]
    return _plain_content(message)


def _plain_content(message: ChatMessage) -> str | list[dict[str, Any]]:
    """The message's string, or its parts as text and image blocks."""
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    # An empty text part is left out: the API refuses an empty text block.
    return [_part(p) for p in message.content if not isinstance(p, TextPart) or p.text]


def _tool_result(message: ChatMessage) -> dict[str, Any]:
    """A tool's answer as a tool_result block, a result in parts keeping them. A result that is
    empty or only whitespace (a command that printed nothing, or a line end) has no content:
    the API refuses such a text there, and documents a tool_result without content as an
    empty result."""
    block: dict[str, Any] = {
        "type": "tool_result",
        "tool_use_id": _tool_id(message.tool_call_id or ""),
    }
    result = _without_blank_text(_plain_content(message))
    if result:
        block["content"] = result
    return block


def _as_blocks(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Content as blocks, to merge with another's; an empty string is no block (the API
    refuses an empty text block)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return content


def _part(part: Part) -> dict[str, Any]:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    return {"type": "image", "source": _image_source(part)}


def _image_source(part: ImagePart) -> dict[str, Any]:
    if part.url is not None:
        # The API fetches a URL source itself and refuses a data: URL (OpenAI's inline form,
        # which the wire passes on as a URL): that one is sent as the base64 source it is.
        inline = DATA_URL.fullmatch(part.url)
        if inline is not None and inline["type"].startswith("image/"):
            return _base64_source(inline["type"], inline["data"])
        return {"type": "url", "url": part.url}
    return _base64_source(part.media_type or "", part.data or "")


def _base64_source(declared: str, data: str) -> dict[str, Any]:
    """An inline image as a base64 source, its media_type what its bytes are (a screenshot
    tool may label a JPEG as PNG), else the declared one in the API's spelling (image/jpg,
    image/PNG); ProviderError(bad_request) for a type the API does not take (HEIC, BMP, SVG)."""
    media_type = _sniffed(data) or declared.lower().replace("/jpg", "/jpeg")
    if media_type not in _IMAGE_TYPES:
        raise ProviderError(
            "bad_request",
            f"an inline image is of type {declared[:64]!r}, which the Messages API does not "
            f"take: send it as {', '.join(_IMAGE_TYPES)}",
        )
    return {"type": "base64", "media_type": media_type, "data": data}


def _sniffed(data: str) -> str | None:
    """The image type of base64 `data` by its first bytes; None when they tell none."""
    head = "".join(data[:64].split())[:16]  # 12 bytes; line breaks in base64 are allowed
    try:
        first = binascii.a2b_base64(head[: len(head) // 4 * 4])
    except binascii.Error:
        return None
    if first[:4] == b"RIFF" and first[8:12] == b"WEBP":
        return "image/webp"
    return next((kind for magic, kind in _IMAGE_MAGIC if first.startswith(magic)), None)


def _check_images(messages: Sequence[ChatMessage]) -> None:
    """ProviderError(bad_request) for images past the API's limits (_MOST_IMAGES and the
    others): the count, and each inline image's base64 length and, from its header, size."""
    images = [
        (index, part)
        for index, message in enumerate(messages)
        if isinstance(message.content, list)
        for part in message.content
        if isinstance(part, ImagePart)
    ]
    if len(images) > _MOST_IMAGES:
        raise ProviderError(
            "bad_request",
            f"the request has {len(images)} images; the Messages API takes at most "
            f"{_MOST_IMAGES}: send fewer",
        )
    most_side = _MOST_SIDE_OF_MANY if len(images) > _MANY_IMAGES else _MOST_SIDE
    for index, part in images:
        inline = DATA_URL.fullmatch(part.url) if part.url is not None else None
        if inline is not None and inline["type"].startswith("image/"):
            data: str | None = inline["data"]
        else:
            data = part.data
        if data is None:
            continue  # a URL the API fetches itself
        where = f"an inline image in message {index}"
        if len(data) > _MOST_BASE64_CHARS:
            raise ProviderError(
                "bad_request",
                f"{where} is {len(data)} base64 characters; the Messages API takes at most "
                f"{_MOST_BASE64_CHARS} (5 MiB): send it smaller",
            )
        size = _pixels(data)
        if size is not None and max(size) > most_side:
            many = _MANY_IMAGES if most_side == _MOST_SIDE_OF_MANY else None
            many = f" in a request of more than {many} images" if many else ""
            raise ProviderError(
                "bad_request",
                f"{where} is {size[0]}x{size[1]} pixels; the Messages API takes at most "
                f"{most_side} on a side{many}: resize it",
            )


def _pixels(data: str) -> tuple[int, int] | None:
    """An image's width and height from its header, read by imagesize (PNG, GIF, WebP, JPEG:
    a JPEG's frame header follows its APP segments, so more of it is decoded); None when it
    tells none (another type, or a JPEG whose frame header is not near its start).

    imagesize (MIT, pure Python, no dependencies, 2.0.1 in August 2026) replaced hand-written
    PNG, GIF, WebP and JPEG parsers (puremagic and filetype tell the type only); the type
    itself is still four magic numbers here, imagesize keeping its detection private."""
    head = _decoded("".join(data[:128].split())[:64])  # 48 bytes
    if head.startswith(b"\xff\xd8"):
        head = _decoded("".join(data[:_JPEG_HEAD_CHARS].split()))
    width, height = imagesize.get(io.BytesIO(head), exif_rotation=False)  # -1, -1: none
    return (width, height) if width >= 0 and height >= 0 else None


def _decoded(text: str) -> bytes:
    """The bytes of base64 `text`'s whole quads (a head cut anywhere); b"" if it is not base64."""
    try:
        return binascii.a2b_base64(text[: len(text) // 4 * 4])
    except binascii.Error:
        return b""


def _tool_use(call: ToolCall) -> dict[str, Any]:
    """An earlier tool call of the assistant's. The API takes its input as an object, not as
    the encoded JSON OpenAI's wire carries: arguments that do not decode to one are the
    client's mistake, named by the call's id (the arguments are the client's data, not quoted).
    Arguments of only whitespace, or none, are no arguments: several OpenAI-compatible servers
    call a tool without parameters so, OpenAI takes the call back so, and Lifeline reads such
    an answer as "{}"."""
    try:  # msgspec refuses what json.loads lets by (NaN, 1e400, a lone surrogate), which the
        # body's encoding then failed on: a server_error, charged to the provider's breaker
        arguments = msgspec.json.decode(call.arguments) if call.arguments.strip() else {}
    except (msgspec.DecodeError, RecursionError):
        arguments = None
    if not isinstance(arguments, dict):
        raise ProviderError(
            "bad_request",
            f"the arguments of assistant tool call {call.id!r} are not a JSON object",
        )
    return {"type": "tool_use", "id": _tool_id(call.id), "name": call.name, "input": arguments}


def _tool_id(call_id: str) -> str:
    """A tool call's id as the API takes it (letters, digits, _ and -). Another provider's may
    have other characters (Kimi's "functions.get_weather:0"): they become _, and a short digest
    of the whole id is added so that two ids never become one. The tool_use and the
    tool_result answering it get the same id, so they still pair."""
    if _TOOL_ID.fullmatch(call_id):
        return call_id
    digest = hashlib.sha256(call_id.encode()).hexdigest()[:12]
    return f"{_NOT_IN_TOOL_ID.sub('_', call_id)}_{digest}"


def _tool_fields(request: ProviderRequest) -> dict[str, Any]:
    """tools and tool_choice. Without tools there is nothing to choose from, so a tool_choice
    (or parallel_tool_calls) alone is left out: the API refuses a tool_choice without tools.
    It also refuses tool_use and tool_result blocks in a request without tools (a chat's last
    turn that no longer offers them, typical of a fallback from OpenAI, which takes it): then
    the tools the history names are declared, taking any input, with tool_choice "none", so
    the model answers in text, as with no tools offered."""
    if not request.tools:
        used = _tools_in_history(request.messages)
        if not used:
            return {}
        declared = [{"name": name, "input_schema": _ANY_INPUT} for name in used]
        return {"tools": declared, "tool_choice": {"type": "none"}}
    fields: dict[str, Any] = {"tools": [_tool(tool) for tool in request.tools]}
    choice = _tool_choice(request.tool_choice)
    # parallel_tool_calls is a flag of the tool_choice here, on every type but "none".
    if request.parallel_tool_calls is False and (choice is None or choice["type"] != "none"):
        choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    if choice is not None:
        fields["tool_choice"] = choice
    return fields


def _tools_in_history(messages: Sequence[ChatMessage]) -> list[str]:
    """The names of the tools the conversation's assistant tool calls used, once each."""
    calls = (call for m in messages if m.role == "assistant" for call in m.tool_calls or ())
    return list(dict.fromkeys(call.name for call in calls))


def _tool(tool: Tool) -> dict[str, Any]:
    declared: dict[str, Any] = {"name": tool.name}
    if tool.description:
        declared["description"] = tool.description
    declared["input_schema"] = tool.parameters or _NO_PARAMETERS
    return declared


def _tool_choice(choice: str | NamedTool | None) -> dict[str, Any] | None:
    if choice is None:
        return None
    if isinstance(choice, NamedTool):
        return {"type": "tool", "name": choice.name}
    return {"type": _TOOL_CHOICE[choice]}


# ---- the answer -----------------------------------------------------------------------


# The parts of a message object Lifeline reads, typed: msgspec skips the rest, and a body
# that differs fails with the path and the type it found, never a value (see decode_body).
class _Block(msgspec.Struct):
    type: str | None = None  # "text", "tool_use", "thinking", ...: the others are no answer
    text: str | None = None  # text
    id: str | None = None  # tool_use
    name: str | None = None  # tool_use
    input: dict[str, Any] | None = None  # tool_use: the call's arguments, an object


class _Usage(msgspec.Struct):
    """Token counts. input_tokens leaves out what was read from or written to the prompt
    cache: the cache_* counts are the rest of the input."""

    input_tokens: TokenCount | None = None
    output_tokens: TokenCount | None = None
    cache_creation_input_tokens: TokenCount | None = None
    cache_read_input_tokens: TokenCount | None = None


class _Message(msgspec.Struct):
    content: list[_Block]
    model: str | None = None
    stop_reason: str | None = None
    usage: _Usage | None = None


_message_decoder = msgspec.json.Decoder(_Message)


def _usage(usage: _Usage | None) -> Usage:
    """Lifeline's Usage: input_tokens is the whole input, cache reads and writes included, and
    cached_input_tokens the part of it read from the cache (as OpenAI counts them)."""
    usage = usage or _Usage()
    cache_read = usage.cache_read_input_tokens or 0
    whole_input = (usage.input_tokens or 0) + cache_read + (usage.cache_creation_input_tokens or 0)
    return Usage(
        # Each count is within the wire's bound, but their sum may not be: a reply over it the
        # dispatcher would refuse, and a paid answer would be lost.
        input_tokens=min(whole_input, _MOST_TOKENS),
        output_tokens=usage.output_tokens or 0,
        cached_input_tokens=cache_read,
    )


def _refused() -> ProviderError:
    """stop_reason "refusal": the safety classifiers stopped the answer; it is not one to pass
    on, whole or streamed."""
    return ProviderError("content_filter", "provider refused to answer (stop_reason refusal)", 200)


def parse_message(response: httpx.Response, model: str) -> ProviderOk:
    """A 200 message object as ProviderOk; `model` stands in when the body names none. An
    answer may be text, tool calls, or both: one that only calls tools has content ""."""
    data = decode_body(response, _message_decoder)
    texts: list[str] = []
    calls: list[ToolCall] = []
    for block in data.content:
        if block.type == "text":
            if block.text is None:
                raise unexpected_body(response, "a content block of type text has no text")
            texts.append(block.text)
        elif block.type == "tool_use":
            calls.append(_tool_call(response, block))
    if data.stop_reason == "refusal":
        raise _refused()
    return ProviderOk(
        content="".join(texts),
        model=data.model or model,
        usage=_usage(data.usage),
        tool_calls=calls or None,
        finish_reason=_FINISH.get(data.stop_reason or ""),
    )


def _tool_call(response: httpx.Response, block: _Block) -> ToolCall:
    """A tool_use block as a ToolCall, its input encoded as OpenAI's arguments are. Without
    its id or name a call cannot be answered: the body is not the documented one."""
    for field in ("id", "name"):
        if not getattr(block, field):
            raise unexpected_body(response, f"a content block of type tool_use has no {field}")
    arguments = json.dumps(block.input or {}, ensure_ascii=False)
    return ToolCall(id=block.id or "", name=block.name or "", arguments=arguments)


def _error_kind(error_type: object, text: str, status: int) -> str:
    """The kind of an error of `error_type` saying `text`, answered with HTTP `status`."""
    if (
        error_type == "request_too_large"
        or status == 413
        or (
            error_type == "invalid_request_error"
            and any(phrase in text.lower() for phrase in _TOO_LONG)
        )
    ):
        return "context_length"
    if error_type == "invalid_request_error" and _BLOCKED in text.lower():
        return "content_filter"
    if error_type == "overloaded_error":  # 529: capacity, worth trying elsewhere
        return "server_error"
    if error_type == "timeout_error":  # 504: it took too long processing, as a timeout does
        return "timeout"
    if error_type == "billing_error" or (  # 402: the account's credit is spent
        error_type == "invalid_request_error" and any(p in text.lower() for p in _SPENT)
    ):
        return "quota"
    return classify_status(status)


def message_error(response: httpx.Response, secrets: Iterable[str]) -> ProviderError:
    error = error_body(response)
    text = error_text(error, response)
    kind = _error_kind(error.get("type"), text, response.status_code)
    message = error_message("anthropic", response.status_code, text, secrets)
    return ProviderError(
        kind,
        message,
        status_code=response.status_code,
        retry_after_s=retry_after_s(response),
    )


# ---- the streamed answer --------------------------------------------------------------


# The parts of a stream's events Lifeline reads, typed as the whole message's are: one shape
# for every event type (no tagged union, whose Literal tags would quote an unexpected value).
class _EventDelta(msgspec.Struct):
    type: str | None = None  # in content_block_delta: "text_delta", "input_json_delta", ...
    text: str | None = None  # text_delta
    partial_json: str | None = None  # input_json_delta: the next piece of a tool call's input
    stop_reason: str | None = None  # in message_delta


class _StartedMessage(msgspec.Struct):
    model: str | None = None
    usage: _Usage | None = None


class _Event(msgspec.Struct):
    type: str
    index: int | None = None  # content_block_*: the block's place in the message's content
    message: _StartedMessage | None = None  # message_start
    content_block: _Block | None = None  # content_block_start
    delta: _EventDelta | None = None  # content_block_delta, message_delta
    usage: _Usage | None = None  # message_delta
    error: msgspec.Raw = msgspec.Raw()  # error: {"type", "message"}


_event_decoder = msgspec.json.Decoder(_Event)
_COUNTS = tuple(_Usage.__struct_fields__)


class _StreamedCall:
    """A tool_use block as it streams: its id and name come first, its input in pieces."""

    def __init__(self, block: _Block, ordinal: int) -> None:
        self.id = block.id or ""
        self.name = block.name or ""
        self.start = block.input  # {} as documented; an input given whole stands when no piece
        # The input so far, as UTF-8: the API's pieces are a few characters each, and held as
        # a string each they took some 60 bytes for every 2 of input. (surrogatepass: a piece
        # comes back exactly as it went in, whatever it holds.)
        self.input = bytearray()
        self.ordinal = ordinal  # its place among the answer's tool calls (0, 1, ...)

    def add(self, piece: str) -> None:
        """The next piece of the call's input."""
        self.input += piece.encode("utf-8", "surrogatepass")

    def first(self) -> ToolCallDelta:
        """The delta that begins this call, streamed on as its block starts."""
        start = json.dumps(self.start, ensure_ascii=False) if self.start else ""
        return ToolCallDelta(self.ordinal, self.id, self.name, start)

    def stopped(self) -> ToolCallDelta | None:
        """At its block's end: "{}" for a call whose input came neither whole at its start nor
        in pieces (a tool without parameters), so that its streamed pieces join to what
        call() gives, as the wire promises; None otherwise."""
        if self.start or self.input:
            return None
        self.add("{}")
        return ToolCallDelta(self.ordinal, arguments="{}")

    def call(self) -> ToolCall:
        """The call, its arguments the pieces joined as the API wrote them: not checked, as a
        call cut short by max_tokens has only the start of its input."""
        arguments = self.input.decode("utf-8", "surrogatepass") or json.dumps(
            self.start or {}, ensure_ascii=False
        )
        return ToolCall(id=self.id, name=self.name, arguments=arguments)


class MessageStream:
    """One streamed message's events (a StreamReader): its text deltas, the tool calls its
    tool_use blocks make, the model message_start names, the token counts message_start and
    message_delta report and message_delta's stop_reason, until message_stop."""

    end = "message_stop"

    def __init__(self, label: str, model: str, prefill_stripped: str = "") -> None:
        self.label = label
        self.model = model
        self.unrepeated = _Unrepeated(prefill_stripped)
        self.counts: dict[str, int] = dict.fromkeys(_COUNTS, 0)
        self.calls: dict[int | None, _StreamedCall] = {}  # by block index, in block order
        self.finish_reason: FinishReason | None = None
        # A content block or a stop_reason came: a message that starts and stops with neither
        # says nothing, not even that it is empty.
        self.said = False

    def read(self, event: ServerSentEvent) -> Delta | ProviderOk | None:
        if event.event == "error":  # its data's type is error too; llama.cpp's has none
            raise self._failed(event_error(event))
        data: _Event = decode_event(event, _event_decoder)
        if data.type == "content_block_delta" and data.delta is not None:
            return self._delta(data.index, data.delta)
        if data.type == "content_block_start" and data.content_block is not None:
            return self._block(data.index, data.content_block)
        if data.type == "message_start" and data.message is not None:
            self.model = data.message.model or self.model
            self._count(data.message.usage)
        elif data.type == "message_delta":
            self._count(data.usage)
            self._stopped(data.delta)
        elif data.type == "content_block_stop":
            call = self.calls.get(data.index)
            return call.stopped() if call is not None else None
        elif data.type == "message_stop":
            return self._answer()
        elif data.type == "error":
            raise self._failed(stream_error(data.error))
        return None  # ping, and event types added later

    def _block(self, index: int | None, block: _Block) -> Delta | None:
        """A block's start: a text block's first text (normally ""), or a tool call begun.
        Other blocks (thinking, server tools) are no part of the answer, as in parse_message.
        Each block has an index of its own: one started at a tool call's would replace it."""
        if index in self.calls:
            raise self._unexpected(
                f"a content block started at index {index}, which a tool_use block already has"
            )
        self.said = True
        if block.type == "text":
            return self.unrepeated(block.text) if self.unrepeated and block.text else block.text
        if block.type == "tool_use":
            for field in ("id", "name"):
                if not getattr(block, field):
                    raise self._unexpected(f"a tool_use block has no {field}")
            call = self.calls[index] = _StreamedCall(block, len(self.calls))
            return call.first()
        return None

    def _delta(self, index: int | None, delta: _EventDelta) -> Delta | None:
        """A text_delta's text, passed on; an input_json_delta's piece, kept for its call. The
        deltas of other blocks (thinking) are no part of the answer."""
        if delta.type == "text_delta":
            if delta.text is None:
                raise self._unexpected("a text_delta has no text")
            return self.unrepeated(delta.text) if self.unrepeated else delta.text
        if delta.type == "input_json_delta":
            call = self.calls.get(index)
            if call is None:
                raise self._unexpected("an input_json_delta is for no tool_use block")
            if delta.partial_json is None:
                raise self._unexpected("an input_json_delta has no partial_json")
            call.add(delta.partial_json)
            return ToolCallDelta(call.ordinal, arguments=delta.partial_json)
        return None

    def _stopped(self, delta: _EventDelta | None) -> None:
        """message_delta's stop_reason, once it names one; a refusal fails the answer."""
        if delta is None or delta.stop_reason is None:
            return
        self.said = True
        if delta.stop_reason == "refusal":
            raise _refused()  # as parse_message: no answer to pass on
        self.finish_reason = _FINISH.get(delta.stop_reason)

    def _answer(self) -> ProviderOk:
        if not self.said:
            raise self._unexpected("message_stop came without a content block or a stop_reason")
        calls = [call.call() for call in self.calls.values()]
        return ProviderOk(
            content="",
            model=self.model,
            usage=_usage(_Usage(**self.counts)),
            tool_calls=calls or None,
            finish_reason=self.finish_reason,
        )

    def _count(self, usage: _Usage | None) -> None:
        """The counts `usage` has replace those held: message_delta's are cumulative."""
        if usage is None:
            return
        for field in _COUNTS:
            value = getattr(usage, field)
            if value is not None:
                self.counts[field] = value

    def _unexpected(self, detail: str) -> ProviderError:
        return ProviderError(
            "server_error", f"provider sent an unexpected stream event: {detail}", 200
        )

    def _failed(self, error: Any) -> ProviderError:
        """An error event: the kind message_error gives its type answered with that type's
        HTTP status; an unknown type is a server_error (the request was accepted)."""
        error_type = error.get("type") if isinstance(error, dict) else None
        status = _TYPE_STATUS.get(error_type, 500) if isinstance(error_type, str) else 500
        text = stream_error_text(error)
        return ProviderError(
            _error_kind(error_type, text, status), f"{self.label} failed mid-stream: {text}", 200
        )


class AnthropicProvider(HttpProvider):
    label = "anthropic"

    def __init__(
        self,
        settings: AnthropicSettings,
        client: httpx.AsyncClient | None = None,
        environ: Mapping[str, str] = os.environ,
        name: str = "",
    ) -> None:
        key = require_api_key(environ, settings.api_key_env)
        headers = {"x-api-key": key, "anthropic-version": settings.anthropic_version}
        url = settings.base_url.rstrip("/") + "/v1/messages"
        super().__init__(
            settings,
            url=url,
            secrets=(key,),
            headers=headers,
            client=client,
            base_url=settings.base_url,
            name=name,
        )
        self.default_max_tokens = settings.default_max_tokens

    async def complete(self, request: ProviderRequest, timeout_s: float) -> ProviderOk:
        """HttpProvider.complete, its text not repeating what was stripped from its prefill."""
        model = request.model or self.model
        body, stripped = messages_body(request, model, self.default_max_tokens)
        answer = await self.post(body, model, timeout_s)
        if not stripped or not answer.content:
            return answer
        return msgspec.structs.replace(answer, content=_Unrepeated(stripped)(answer.content))

    def body(self, request: ProviderRequest, model: str) -> dict[str, Any]:
        return messages_body(request, model, self.default_max_tokens)[0]

    def parse(self, response: httpx.Response, model: str) -> ProviderOk:
        return parse_message(response, model)

    def error(self, response: httpx.Response) -> ProviderError:
        return message_error(response, self.secrets)

    def stream_body(self, request: ProviderRequest, model: str) -> dict[str, Any]:
        return {**self.body(request, model), "stream": True}

    def stream_reader(self, model: str) -> MessageStream:
        return MessageStream(self.label, model)

    def stream_call(
        self, request: ProviderRequest, model: str
    ) -> tuple[dict[str, Any], MessageStream]:
        """The body, and a reader whose text does not repeat what was stripped from its prefill
        (known once the body is built: converting the conversation again to learn those few
        characters, inline images and all, would cost as much as building it)."""
        body, stripped = messages_body(request, model, self.default_max_tokens)
        return {**body, "stream": True}, MessageStream(self.label, model, stripped)
